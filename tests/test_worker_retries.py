"""The worker's retries: a transient failure puts the change back on its queue for later, never fails the message.

- the change goes back invisible for its back-off (Retry-After honoured), with its retry state and
  everything it came with, and the message completes;
- it is parked only when its retry budget is spent; a permanent failure is parked at once;
- when it cannot be put back (Storage refuses), the message fails and the host's retry takes over;
- a hold (paused template) starts a fresh budget, a busy record keeps it;
- a poison message that went through retries is parked as the plain change, so replay reads it.

Runs against the session's Azurite; the engine is replaced where a test needs a given failure.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest
from azure.core.exceptions import ServiceRequestError
from azure.storage.queue import QueueMessage

from loyaltysync import host_limits, worker
from loyaltysync.errors import MappingError, TargetError
from loyaltysync.events.model import ChangeEvent
from loyaltysync.retries import RetryState, read_message, with_retry
from loyaltysync.runtime import Runtime
from loyaltysync.sync import RECORD_BUSY, Outcome
from tests.conftest import RuntimeFactory

CARDS = "loyalty-cards"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

Process = Callable[..., Awaitable[Outcome]]



def _change(key: str = "C-RETRY") -> ChangeEvent:
    return ChangeEvent(
        template=CARDS,
        side="dataverse",
        operation="update",
        key={"CardNumber": key},
        correlation_id="c474239d-4233-41a9-8b17-a86cb4f737b5",
        traceparent=TRACEPARENT,
    )


def _failing(error: Exception) -> Process:
    async def process(event: ChangeEvent, **kwargs: object) -> Outcome:
        raise error

    return process


def _capture(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, int]]:
    """Record what the worker puts back on the queue instead of sending it."""
    sent: list[tuple[str, str, int]] = []

    async def enqueue(template: str, message: str, *, delay_s: int = 0) -> None:
        sent.append((template, message, delay_s))

    monkeypatch.setattr(runtime, "enqueue", enqueue)
    return sent


async def _receive_when_visible(runtime: Runtime) -> QueueMessage:
    """The next message of the cards queue, waiting for it to become visible (10 s at most)."""
    queue = runtime.queue(CARDS)
    for _ in range(200):
        async for message in queue.receive_messages(visibility_timeout=30):
            return message
        await asyncio.sleep(0.05)
    raise AssertionError("no message became visible on the queue")


async def test_a_transient_failure_puts_the_change_back_for_later_and_completes_the_message(
    make_runtime: RuntimeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = await make_runtime(RETRY_BASE_SECONDS="1", RETRY_MAX_SECONDS="1")
    monkeypatch.setattr(runtime.engine, "process", _failing(TargetError("fo", 503, "", "the service is unavailable")))
    change = _change()

    assert await worker.handle_change(runtime, change.to_json(), dequeue_count=1, max_dequeue=5) is None
    assert await runtime.dead_letters.list() == []

    message = await _receive_when_visible(runtime)  # invisible for its back-off, then delivered again
    event, state = read_message(bytes(message.content).decode())
    assert event == change  # event id, correlation id and trace context as they came
    assert state is not None and state.attempts == 1 and "503" in state.reason
    assert message.dequeue_count == 1  # a new message: the host's dequeue count starts again

    before = state.first_failed_at
    assert await worker.handle_change(runtime, bytes(message.content).decode()) is None
    await runtime.queue(CARDS).delete_message(message)
    again = await _receive_when_visible(runtime)
    _, state = read_message(bytes(again.content).decode())
    assert state is not None and state.attempts == 2 and state.first_failed_at == before


async def test_retry_after_is_honoured_and_the_change_stays_invisible_meanwhile(
    make_runtime: RuntimeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = await make_runtime()
    throttled = TargetError("dataverse", 429, "0x80072322", "Number of requests exceeded the limit", retry_after=120)
    monkeypatch.setattr(runtime.engine, "process", _failing(throttled))

    await worker.handle_change(runtime, _change().to_json())

    assert [m async for m in runtime.queue(CARDS).receive_messages(visibility_timeout=1)] == []
    props = await runtime.queue(CARDS).get_queue_properties()
    assert props.approximate_message_count == 1
    sent = _capture(runtime, monkeypatch)
    await worker.handle_change(runtime, _change().to_json())
    ((template, _, delay_s),) = sent
    assert template == CARDS and delay_s >= 120


async def test_the_change_is_parked_with_the_last_reason_once_the_budget_is_spent(
    make_runtime: RuntimeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = await make_runtime(RETRY_BUDGET_SECONDS="600")
    monkeypatch.setattr(runtime.engine, "process", _failing(TargetError("fo", 0, "ConnectError", "refused")))
    sent = _capture(runtime, monkeypatch)
    change = _change()
    young = RetryState(6, datetime.now(UTC) - timedelta(seconds=500), "fo answered 503")
    old = RetryState(9, datetime.now(UTC) - timedelta(seconds=600), "fo answered 503")

    await worker.handle_change(runtime, with_retry(change.to_json(), young))
    assert len(sent) == 1 and await runtime.dead_letters.list() == []

    await worker.handle_change(runtime, with_retry(change.to_json(), old))
    assert len(sent) == 1  # not put back again
    (letter,) = await runtime.dead_letters.list()
    assert (letter.key, letter.side, letter.error_code) == ("C-RETRY", "dataverse", "ConnectError")
    assert letter.reason.startswith("gave up after 10 attempts in 10 min")
    assert "refused" in letter.reason
    assert read_message(letter.payload) == (change, None)  # the change itself: replay reads it


@pytest.mark.parametrize(
    "error",
    [
        TargetError("dataverse", 400, "0x80040203", "Invalid value for msdyn_partynumber"),
        TargetError("fo", 409, "", "The record already exists"),
        MappingError(CARDS, "CardTenderType", "Bogus", "no value-map entry"),
    ],
    ids=["400", "409", "mapping"],
)
async def test_a_permanent_failure_is_parked_at_once_and_not_retried(
    make_runtime: RuntimeFactory, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    runtime = await make_runtime()
    monkeypatch.setattr(runtime.engine, "process", _failing(error))
    sent = _capture(runtime, monkeypatch)

    assert await worker.handle_change(runtime, _change().to_json()) is None

    assert sent == []
    (letter,) = await runtime.dead_letters.list()
    assert letter.key == "C-RETRY"


async def test_when_the_change_cannot_be_put_back_the_queue_retries_it_and_the_last_attempt_parks_it(
    make_runtime: RuntimeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Storage refuses the new message too: the message fails, so the host redelivers it after its
    visibilityTimeout; the last dequeue parks the reason first (then the host moves it to poison)."""
    runtime = await make_runtime()
    monkeypatch.setattr(runtime.engine, "process", _failing(TargetError("dataverse", 503, "", "down")))

    async def refused(template: str, message: str, *, delay_s: int = 0) -> None:
        raise ServiceRequestError("[Errno 111] Connection refused")

    monkeypatch.setattr(runtime, "enqueue", refused)

    with pytest.raises(TargetError):
        await worker.handle_change(runtime, _change().to_json(), dequeue_count=1, max_dequeue=2)
    assert await runtime.dead_letters.list() == []
    with pytest.raises(TargetError):
        await worker.handle_change(runtime, _change().to_json(), dequeue_count=2, max_dequeue=2)
    (letter,) = await runtime.dead_letters.list()
    assert letter.reason.startswith("gave up after 2 attempts") and "down" in letter.reason


async def test_a_retried_change_that_succeeds_completes_and_clears_its_dead_letters(
    make_runtime: RuntimeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = await make_runtime()

    async def applies(event: ChangeEvent, **kwargs: object) -> Outcome:
        return Outcome(CARDS, "dataverse", "C-RETRY", "changed", writes={"fo": ["PartyNumber"]})

    monkeypatch.setattr(runtime.engine, "process", applies)
    await runtime.dead_letters.park(CARDS, "dataverse", "C-RETRY", "an older failure", "503", "{}", "e0")
    sent = _capture(runtime, monkeypatch)
    retried = with_retry(_change().to_json(), RetryState(4, datetime.now(UTC) - timedelta(minutes=4), "503"))

    outcome = await worker.handle_change(runtime, retried)

    assert outcome is not None and outcome.reason == "changed"
    assert sent == [] and await runtime.dead_letters.list() == []


async def test_a_hold_starts_a_fresh_budget_and_a_busy_record_keeps_it(
    make_runtime: RuntimeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both go back on the queue the one way changes do; neither counts as a failed attempt."""
    runtime = await make_runtime()
    sent = _capture(runtime, monkeypatch)
    state = RetryState(5, datetime.now(UTC) - timedelta(minutes=50), "dataverse answered 503")
    retried = with_retry(_change().to_json(), state)

    busy = TargetError("state", 503, RECORD_BUSY, "C-RETRY is being written by another step", retry_after=7.2)
    monkeypatch.setattr(runtime.engine, "process", _failing(busy))
    await worker.handle_change(runtime, retried)
    await runtime.set_paused(CARDS, True)
    await worker.handle_change(runtime, retried)

    (_, after_busy, busy_delay), (_, after_hold, hold_delay) = sent
    assert read_message(after_busy) == (_change_of(retried), state) and busy_delay == 8
    assert read_message(after_hold) == (_change_of(retried), None)
    assert hold_delay == runtime.settings.pause_recheck_seconds
    assert await runtime.dead_letters.list() == []


def _change_of(message: str) -> ChangeEvent:
    return read_message(message)[0]


async def test_a_poisoned_retried_change_gets_its_last_try_and_is_parked_as_the_plain_change(
    make_runtime: RuntimeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The processes holding it died (no reason recorded): one last try, whose transient failure parks
    it (the poison queue is the safety net, not another retry loop); replay then re-queues the change."""
    runtime = await make_runtime()
    monkeypatch.setattr(runtime.engine, "process", _failing(TargetError("fo", 503, "", "maintenance")))
    change = _change()
    retried = with_retry(change.to_json(), RetryState(2, datetime.now(UTC) - timedelta(minutes=1), "503"))

    await worker.drain_poison(runtime, retried, dequeue_count=1, max_dequeue=5)

    (letter,) = await runtime.dead_letters.list()
    assert letter.reason.startswith("gave up after 8 attempts") and "maintenance" in letter.reason
    assert "retry" not in json.loads(letter.payload)
    assert await worker.replay(runtime, template=CARDS) == 1
    message = await _receive_when_visible(runtime)
    replayed, state = read_message(bytes(message.content).decode())
    assert state is None and replayed.event_id == change.event_id and replayed.wire_format == "replay"


async def test_the_step_runs_inside_the_invocations_budget_and_hands_the_change_back_when_it_is_spent(
    make_runtime: RuntimeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # functionTimeout 100 s: the host recycles the worker process of an invocation running longer (and every
    # other invocation in it). The step may use 80 s; the last fifth is for putting the change back.
    runtime = await make_runtime(AzureFunctionsJobHost__functionTimeout="00:01:40")
    assert runtime.function_timeout_s == 100
    left: list[float | None] = []

    async def process(event: ChangeEvent, **kwargs: object) -> Outcome:
        left.append(host_limits.seconds_left())
        raise TargetError("dataverse", 0, "InvocationBudgetSpent", "not sent: the invocation's time is spent")

    monkeypatch.setattr(runtime.engine, "process", process)
    sent = _capture(runtime, monkeypatch)
    assert await worker.handle_change(runtime, _change().to_json()) is None
    ((left_at_step,),) = [left]
    assert left_at_step is not None and 79 < left_at_step <= 80
    assert host_limits.seconds_left() is None  # the budget ends with the invocation
    ((template, message, _),) = sent
    _, state = read_message(message)
    assert template == CARDS and state is not None and "InvocationBudgetSpent" in state.reason
