"""What the runtime and worker remember between events to save Storage calls, and that it stays correct.

- queues are created once per process, and again when one was deleted since;
- the pause flag is cached for PAUSE_CACHE_SECONDS, and `set_paused` in this process updates it at once;
- "last success" is written at most once per LAST_SUCCESS_WRITE_SECONDS per direction, and ops
  status shows the latest even before it is written;
- a successful sync clears the record's dead letters (both sides) with one partition query;
- the Storage transports read proxy settings once instead of on every request;
- a message poisoned only by dying processes gets one last try before it is parked;
- a deferred conflict's re-check waits the grace, or twice a late event's lag, but a wait for what an
  interrupted step did waits the grace alone.

Everything runs against the session's Azurite; time is a fake clock where a cache's age matters.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.core.exceptions import ServiceRequestError
from azure.core.pipeline.transport import AioHttpTransport
from azure.storage.queue.aio import QueueClient

from devkit.devhost.storage import _transport as devhost_transport
from loyaltysync import operations, worker
from loyaltysync.errors import TargetError
from loyaltysync.events.model import ChangeEvent
from loyaltysync.retries import RetryState, read_envelope, with_retry
from loyaltysync.runtime import SUCCESS_SCOPE, LatestDocuments, storage_transport
from loyaltysync.state import MemoryControlStore
from loyaltysync.state_tables import TableDeadLetterStore
from loyaltysync.sync import RECORD_BUSY, Outcome
from tests.conftest import RuntimeFactory

CARDS = "loyalty-cards"




class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------ queues


async def test_enqueue_creates_the_queue_once_and_again_after_it_was_deleted(
    make_runtime: RuntimeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = await make_runtime()
    created: list[str] = []
    real_create = QueueClient.create_queue

    async def counting_create(self: QueueClient, **kwargs: Any) -> None:
        created.append(self.queue_name)
        await real_create(self, **kwargs)

    monkeypatch.setattr(QueueClient, "create_queue", counting_create)
    for n in range(3):
        await runtime.enqueue(CARDS, f'{{"n": {n}}}')
    assert created == [runtime.settings.queue_name(CARDS)]

    await runtime.queue(CARDS).delete_queue()  # e.g. an operator cleaned up: the next send finds no queue
    await runtime.enqueue(CARDS, '{"n": 3}')
    assert created == [runtime.settings.queue_name(CARDS)] * 2
    props = await runtime.queue(CARDS).get_queue_properties()
    assert props.approximate_message_count == 1


# ------------------------------------------------------------------ pause flag


async def test_pause_set_in_this_process_applies_at_once_and_another_instance_within_the_cache_time(
    make_runtime: RuntimeFactory,
) -> None:
    here = await make_runtime(PAUSE_CACHE_SECONDS="5")
    other = await make_runtime()
    clock = Clock()
    here.clock = clock

    assert await here.paused(CARDS) is False
    await here.set_paused(CARDS, True, "maintenance")
    assert await here.paused(CARDS) is True  # no wait for the cache to expire

    await other.set_paused(CARDS, False)  # resumed from another instance (or the CLI)
    assert await here.paused(CARDS) is True  # still the cached flag
    assert await here.paused(CARDS, fresh=True) is False  # ops status reads the table

    await other.set_paused(CARDS, True)
    clock.now += 4.9
    assert await here.paused(CARDS) is False  # cached from the fresh read above
    clock.now += 0.2
    assert await here.paused(CARDS) is True  # older than PAUSE_CACHE_SECONDS: read again


async def test_a_zero_pause_cache_reads_the_flag_every_time(make_runtime: RuntimeFactory) -> None:
    here = await make_runtime(PAUSE_CACHE_SECONDS="0")
    other = await make_runtime()
    assert await here.paused(CARDS) is False
    await other.set_paused(CARDS, True)
    assert await here.paused(CARDS) is True


async def test_a_cached_pause_still_holds_events(make_runtime: RuntimeFactory) -> None:
    """The worker obeys the cached flag: an event for a template paused here is put back, not applied."""
    runtime = await make_runtime(PAUSE_CACHE_SECONDS="300")
    await runtime.set_paused(CARDS, True)
    event = ChangeEvent(template=CARDS, side="fo", operation="update", key={"CardNumber": "C-1"})
    assert await worker.handle_change(runtime, event.to_json()) is None
    props = await runtime.queue(CARDS).get_queue_properties()
    assert props.approximate_message_count == 1  # held for later


# ------------------------------------------------------------------ last success


async def test_last_success_is_written_at_most_once_per_interval_and_the_latest_wins() -> None:
    control = MemoryControlStore()
    clock = Clock()
    documents = LatestDocuments(control, SUCCESS_SCOPE, 5.0, clock)

    await documents.put("cards:fo", {"at": "t1"})
    assert await control.get(SUCCESS_SCOPE, "cards:fo") == {"at": "t1"}  # the first is written at once
    await documents.put("cards:fo", {"at": "t2"})
    await documents.put("cards:fo", {"at": "t3"})
    await documents.put("cards:dataverse", {"at": "d1"})  # another direction has its own interval
    assert await control.get(SUCCESS_SCOPE, "cards:fo") == {"at": "t1"}
    assert await control.get(SUCCESS_SCOPE, "cards:dataverse") == {"at": "d1"}
    assert documents.pending() == {"cards:fo": {"at": "t3"}}

    await documents.flush()  # what shutdown does
    assert await control.get(SUCCESS_SCOPE, "cards:fo") == {"at": "t3"}
    assert documents.pending() == {}


async def test_the_delayed_write_sends_the_latest_when_the_interval_ends() -> None:
    control = MemoryControlStore()
    documents = LatestDocuments(control, SUCCESS_SCOPE, 0.05)
    await documents.put("cards:fo", {"at": "t1"})
    await documents.put("cards:fo", {"at": "t2"})
    await documents.put("cards:fo", {"at": "t3"})
    assert await control.get(SUCCESS_SCOPE, "cards:fo") == {"at": "t1"}
    for _ in range(400):  # the delayed write is a task of its own: wait for it (bounded)
        if await control.get(SUCCESS_SCOPE, "cards:fo") == {"at": "t3"}:
            break
        await asyncio.sleep(0.01)
    assert await control.get(SUCCESS_SCOPE, "cards:fo") == {"at": "t3"}
    assert documents.pending() == {}


async def test_ops_status_shows_the_latest_success_before_it_is_written(make_runtime: RuntimeFactory) -> None:
    runtime = await make_runtime(LAST_SUCCESS_WRITE_SECONDS="3600")
    first = {"at": "2026-11-23T10:00:00+00:00", "key": "C-1", "reason": "applied", "event_id": "e1"}
    latest = {"at": "2026-11-23T10:00:01+00:00", "key": "C-2", "reason": "applied", "event_id": "e2"}
    await runtime.successes.put(f"{CARDS}:fo", first)
    await runtime.successes.put(f"{CARDS}:fo", latest)
    assert (await runtime.control.get(SUCCESS_SCOPE, f"{CARDS}:fo")) == first  # not written yet

    report = await operations.status(runtime)
    assert report["templates"][CARDS]["last_success"] == {"fo": latest["at"], "dataverse": None}

    other = await make_runtime()  # another instance sees what was written
    assert (await operations.status(other))["templates"][CARDS]["last_success"]["fo"] == first["at"]
    await runtime.aclose()  # shutdown writes the latest
    assert (await operations.status(other))["templates"][CARDS]["last_success"]["fo"] == latest["at"]


async def test_a_newer_success_written_by_another_instance_wins_in_status(make_runtime: RuntimeFactory) -> None:
    runtime = await make_runtime(LAST_SUCCESS_WRITE_SECONDS="3600")
    await runtime.successes.put(f"{CARDS}:fo", {"at": "2026-11-23T10:00:00+00:00"})
    await runtime.successes.put(f"{CARDS}:fo", {"at": "2026-11-23T10:00:01+00:00"})
    await runtime.control.set(SUCCESS_SCOPE, f"{CARDS}:fo", {"at": "2026-11-23T10:00:02+00:00"})
    assert (await runtime.last_successes())[f"{CARDS}:fo"] == {"at": "2026-11-23T10:00:02+00:00"}


# ------------------------------------------------------------------ dead letters


async def test_remove_for_drops_both_sides_of_one_record_only(make_runtime: RuntimeFactory) -> None:
    runtime = await make_runtime()
    store = runtime.dead_letters
    assert isinstance(store, TableDeadLetterStore)
    key = "it's #1/a?b"  # characters that need escaping in a filter and a key
    await store.park(CARDS, "fo", key, "r", "c", "{}", "e1")
    await store.park(CARDS, "dataverse", key, "r", "c", "{}", "e2")
    kept = [
        await store.park(CARDS, "fo", "C-2", "r", "c", "{}", "e3"),
        await store.park("loyalty-levels", "fo", key, "r", "c", "{}", "e4"),
    ]
    assert await store.remove_for(CARDS, key) == 2
    assert await store.remove_for(CARDS, key) == 0  # nothing left: one query, no error
    assert sorted(e.id for e in await store.list()) == sorted(e.id for e in kept)
    assert await store.remove_for(CARDS, "C-2", sides=("dataverse",)) == 0
    assert await store.remove_for(CARDS, "C-2", sides=("fo",)) == 1


async def test_a_successful_sync_clears_the_records_dead_letters(make_runtime: RuntimeFactory) -> None:
    runtime = await make_runtime()
    await runtime.dead_letters.park(CARDS, "fo", "C-1", "r", "c", "{}", "e1")
    await runtime.dead_letters.park(CARDS, "dataverse", "C-1", "r", "c", "{}", "e2")
    other = await runtime.dead_letters.park(CARDS, "fo", "C-9", "r", "c", "{}", "e3")
    event = ChangeEvent(template=CARDS, side="dataverse", operation="update", key={"CardNumber": "C-1"})
    await worker._succeeded(runtime, event, Outcome(CARDS, "dataverse", "C-1", "applied"))
    assert [e.id for e in await runtime.dead_letters.list()] == [other.id]


# ------------------------------------------------------------------ transports


@pytest.mark.parametrize("make", [storage_transport, devhost_transport])
def test_proxy_settings_are_read_once_unless_a_proxy_is_configured(make: Callable[..., dict[str, Any]]) -> None:
    transport = make({"PATH": "/usr/bin", "HOME": "/root"})["transport"]
    assert isinstance(transport, AioHttpTransport)
    assert transport._use_env_settings is False  # no per-request look-up of proxy variables and ~/.netrc
    assert make({"PATH": "/usr/bin", "HTTPS_PROXY": "http://proxy.corp:3128"}) == {}  # SDK default: uses it
    assert make({"no_proxy": "localhost"}) == {}


# ------------------------------------------------------------------ storage outages


async def test_unreachable_storage_is_a_transient_failure_retried_later_then_parked(
    make_runtime: RuntimeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK gave up (connection reset, Storage down): the change is retried later like any transient
    target failure, with the reason, and parked once its retry budget is spent."""
    runtime = await make_runtime()

    async def unreachable(template: str, key: str) -> None:
        raise ServiceRequestError("[Errno 104] Connection reset by peer")

    monkeypatch.setattr(runtime.state, "get", unreachable)
    event = ChangeEvent(template=CARDS, side="fo", operation="update", key={"CardNumber": "C-OUT"})

    assert await worker.handle_change(runtime, event.to_json(), dequeue_count=1, max_dequeue=2) is None
    assert await runtime.dead_letters.list() == []
    props = await runtime.queue(CARDS).get_queue_properties()
    assert props.approximate_message_count == 1  # the change, back on the queue for later

    spent = RetryState(9, datetime.now(UTC) - timedelta(seconds=runtime.settings.retry_budget_seconds), "")
    assert await worker.handle_change(runtime, with_retry(event.to_json(), spent)) is None
    (letter,) = await runtime.dead_letters.list()
    assert (letter.key, letter.error_code) == ("C-OUT", "StorageUnreachable")
    assert "gave up after 10 attempts" in letter.reason and "Connection reset by peer" in letter.reason


async def test_a_record_another_instance_is_writing_is_requeued_without_spending_an_attempt(
    make_runtime: RuntimeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record held by another instance's fresh intent (which may have died) is not an attempt that
    failed: even on the last attempt the event goes back on the queue for when the intent is old enough
    to judge, and nothing is parked."""
    runtime = await make_runtime()

    async def busy(*args: object, **kwargs: object) -> None:
        raise TargetError("state", 503, RECORD_BUSY, "C-BUSY is being written by another step", retry_after=7.2)

    monkeypatch.setattr(runtime.engine, "process", busy)
    event = ChangeEvent(template=CARDS, side="fo", operation="update", key={"CardNumber": "C-BUSY"})

    assert await worker.handle_change(runtime, event.to_json(), dequeue_count=5, max_dequeue=5) is None
    assert await runtime.dead_letters.list() == []
    messages = [m async for m in runtime.queue(CARDS).receive_messages(visibility_timeout=1)]
    assert messages == []  # not visible yet: delayed by the intent's remaining seconds
    props = await runtime.queue(CARDS).get_queue_properties()
    assert props.approximate_message_count == 1


# ------------------------------------------------------------------ poison messages


async def test_a_message_poisoned_by_dying_processes_gets_one_last_try_and_is_not_parked(
    make_runtime: RuntimeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every attempt ended with its process (a crash, a scale-in): no reason was recorded, so the record
    may be fine. The poison handler tries once more; it syncs, nothing is parked."""
    runtime = await make_runtime()
    seen: list[str] = []

    async def applies(event: ChangeEvent, **kwargs: object) -> Outcome:
        seen.append(event.event_id)
        return Outcome(CARDS, "fo", "C-DIED", "changed", writes={"dataverse": ["CardTenderType"]})

    monkeypatch.setattr(runtime.engine, "process", applies)
    event = ChangeEvent(template=CARDS, side="fo", operation="update", key={"CardNumber": "C-DIED"})

    await worker.drain_poison(runtime, event.to_json(), dequeue_count=1, max_dequeue=5)

    assert seen == [event.event_id]
    assert await runtime.dead_letters.list() == []


async def test_a_last_try_that_fails_parks_the_message_with_that_failures_reason(
    make_runtime: RuntimeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = await make_runtime()

    async def fails(event: ChangeEvent, **kwargs: object) -> Outcome:
        raise TargetError("dataverse", 503, "ServiceUnavailable", "Dataverse is down for maintenance")

    monkeypatch.setattr(runtime.engine, "process", fails)
    event = ChangeEvent(template=CARDS, side="fo", operation="update", key={"CardNumber": "C-DOWN"})

    await worker.drain_poison(runtime, event.to_json(), dequeue_count=1, max_dequeue=5)

    (letter,) = await runtime.dead_letters.list()
    assert (letter.key, letter.error_code) == ("C-DOWN", "ServiceUnavailable")
    assert "gave up after 6 attempts" in letter.reason and "down for maintenance" in letter.reason


@pytest.mark.parametrize("earlier_reason", [True, False])
async def test_no_last_try_for_a_message_with_a_reason_or_one_that_killed_the_poison_handler_too(
    make_runtime: RuntimeFactory, monkeypatch: pytest.MonkeyPatch, earlier_reason: bool
) -> None:
    """A message whose last attempt parked a reason keeps it; a poison message delivered again (its
    last try killed the process) is parked without trying a third time."""
    runtime = await make_runtime()
    tried: list[str] = []

    async def process(event: ChangeEvent, **kwargs: object) -> Outcome:
        tried.append(event.event_id)
        return Outcome(CARDS, "fo", "C-BAD", "changed")

    monkeypatch.setattr(runtime.engine, "process", process)
    event = ChangeEvent(template=CARDS, side="fo", operation="update", key={"CardNumber": "C-BAD"})
    if earlier_reason:
        await runtime.dead_letters.park(CARDS, "fo", "C-BAD", "gave up after 5 attempts: 503", "503", "{}", "e0")

    await worker.drain_poison(runtime, event.to_json(), dequeue_count=1 if earlier_reason else 2, max_dequeue=5)

    assert tried == []
    (letter,) = await runtime.dead_letters.list()
    expected = "gave up after 5 attempts: 503" if earlier_reason else "the queue gave up after the maximum"
    assert letter.reason.startswith(expected)


# ------------------------------------------------------------------ re-checks of deferred conflicts


@pytest.mark.parametrize(
    ("waits_for", "expected_s"),
    [("conflict", 2 * 40), ("interrupted-step", 15 + 600)],
)
async def test_a_recheck_waits_twice_a_late_events_lag_unless_it_waits_for_an_interrupted_step(
    make_runtime: RuntimeFactory, monkeypatch: pytest.MonkeyPatch, waits_for: str, expected_s: int
) -> None:
    """A conflict deferred by an event 40 s late re-checks after 80 s (the other side's event may be as
    late). A wait for the event that tells what an interrupted step did (a person's change after the
    step's intent) re-checks after the grace plus the queue's 10-minute message lease, whatever this
    event's lag: that event may be held by an instance that died, and comes back only after the lease."""
    runtime = await make_runtime(CONFLICT_GRACE_SECONDS="15")
    delays: list[float] = []
    bodies: list[str] = []

    async def enqueue(template: str, body: str, *, delay_s: float = 0) -> None:
        delays.append(delay_s)
        bodies.append(body)

    async def deferred(event: ChangeEvent, **kwargs: object) -> Outcome:
        if waits_for == "interrupted-step":
            return Outcome(CARDS, "fo", "C-LATE", "conflict-deferred", waiting="waiting for its delete")
        conflict = {"field": "CardTenderType", "fo": "AsCardTender", "dataverse": None, "winner": None,
                    "rule": "waiting"}
        return Outcome(CARDS, "fo", "C-LATE", "conflict-deferred", conflicts=[conflict])

    monkeypatch.setattr(runtime, "enqueue", enqueue)
    monkeypatch.setattr(runtime.engine, "process", deferred)
    late = datetime.now(UTC) - timedelta(seconds=40)
    event = ChangeEvent(template=CARDS, side="fo", operation="update", key={"CardNumber": "C-LATE"},
                        modified_on=late.strftime("%Y-%m-%dT%H:%M:%SZ"))

    await worker.handle_change(runtime, event.to_json())

    assert len(delays) == 1 and expected_s <= delays[0] <= expected_s + 2
    envelope = read_envelope(bodies[0])
    assert envelope.event == event  # the change as it came, and what waits
    assert envelope.deferral is not None
    if waits_for == "interrupted-step":
        assert (envelope.deferral.whole_record, envelope.deferral.fields) == (True, {})
        assert envelope.deferral.reason == "waiting for its delete"
    else:
        assert (envelope.deferral.whole_record, envelope.deferral.fields) == (False, {"CardTenderType": "AsCardTender"})


async def test_a_last_try_that_breaks_otherwise_is_parked_with_what_broke(
    make_runtime: RuntimeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = await make_runtime()

    async def breaks(event: ChangeEvent, **kwargs: object) -> Outcome:
        raise RuntimeError("state table answered garbage")

    monkeypatch.setattr(runtime.engine, "process", breaks)
    event = ChangeEvent(template=CARDS, side="fo", operation="update", key={"CardNumber": "C-ODD"})

    await worker.drain_poison(runtime, event.to_json(), dequeue_count=1, max_dequeue=5)

    (letter,) = await runtime.dead_letters.list()
    assert letter.key == "C-ODD" and letter.error_code == "Poison"
    assert letter.reason.endswith("the last try failed: state table answered garbage")
