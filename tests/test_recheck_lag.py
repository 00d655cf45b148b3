"""A deferred conflict's re-check waits while the queue runs behind (loyaltysync/lag.py).

The case the chaos run found: an agent's edit in Dataverse, then an F&O user's later edit of the
same field; the conflict is deferred (F&O's time is only a lower bound until its event is taken),
and the re-check came due while the F&O event still sat behind a backlog longer than the grace:
the older Dataverse edit won. The re-check now waits for the grace plus the queue's recent lag.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from loyaltysync import worker
from loyaltysync.events.model import ChangeEvent
from loyaltysync.lag import LagWindow
from loyaltysync.retries import Deferral, read_envelope, with_deferral
from loyaltysync.runtime import Runtime
from loyaltysync.sync import Outcome
from loyaltysync.templates import default_mappings_dir, load_templates
from tests.conftest import RuntimeFactory

TEMPLATES = load_templates(default_mappings_dir())
CARDS = "loyalty-cards"


def _ago(seconds: float) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


def test_the_window_keeps_the_largest_recent_lag_per_template_and_forgets_old_ones() -> None:
    window = LagWindow(window_s=60)
    assert window.recent(CARDS, 0.0) == 0.0
    window.observe(CARDS, 40.0, now=100.0)
    window.observe(CARDS, 2.0, now=130.0)
    window.observe("loyalty-levels", 90.0, now=130.0)
    assert window.recent(CARDS, 130.0) == 40.0
    assert window.recent(CARDS, 161.0) == 2.0  # the 40 s sample is older than the window
    assert window.recent(CARDS, 191.0) == 0.0
    assert window.recent("loyalty-levels", 131.0) == 90.0
    window.observe(CARDS, -3.0, now=200.0)  # a receipt stamped by a clock ahead: no negative lag
    assert window.recent(CARDS, 200.0) == 0.0


@pytest.fixture
async def runtime(make_runtime: RuntimeFactory) -> Runtime:
    return await make_runtime(CONFLICT_GRACE_SECONDS="3")


def _recheck(deferred_seconds_ago: float, received_seconds_ago: float = 0) -> str:
    """The queue message of a re-check: the change as it came, and the deferral."""
    event = ChangeEvent(template=CARDS, side="dataverse", operation="update", key={"CardNumber": "C-LAG"},
                        received_at=_ago(received_seconds_ago))
    deferral = Deferral(_ago(deferred_seconds_ago), "waiting", fields={"CardTenderType": "AsCardTender"})
    return with_deferral(event.to_json(), deferral)


def _capture(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> tuple[list[tuple[str, int]], list[ChangeEvent]]:
    """The messages put back, and the events processed (a re-check's with `wire_format` "recheck" here)."""
    sent: list[tuple[str, int]] = []
    processed: list[ChangeEvent] = []

    async def enqueue(template: str, message: str, *, delay_s: int = 0) -> None:
        sent.append((message, delay_s))

    async def process(event: ChangeEvent, **kwargs: object) -> Outcome:
        processed.append(replace(event, wire_format="recheck") if kwargs.get("deferral") is not None else event)
        return Outcome(event.template, event.side, "C-LAG", "no-change")

    monkeypatch.setattr(runtime, "enqueue", enqueue)
    monkeypatch.setattr(runtime.engine, "process", process)
    return sent, processed


async def test_a_recheck_waits_while_the_queue_runs_further_behind_than_the_time_since_the_deferral(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent, processed = _capture(runtime, monkeypatch)
    # The queue is 40 s behind: an F&O change taken now was received 40 s ago.
    fo_change = ChangeEvent(template=CARDS, side="fo", operation="update", key={"CardNumber": "C-OTHER"},
                            received_at=_ago(40))
    await worker.handle_change(runtime, fo_change.to_json())
    assert [e.side for e in processed] == ["fo"]

    recheck = _recheck(deferred_seconds_ago=5)  # past the 3 s grace, but not past grace + 40 s of backlog
    assert await worker.handle_change(runtime, recheck) is None
    assert [e.side for e in processed] == ["fo"], "the re-check must not decide yet"
    (message, delay), = sent
    assert read_envelope(message) == read_envelope(recheck)  # the same re-check: its deferral time is kept
    assert 37 <= delay <= 39  # 3 s grace + 40 s lag - 5 s since the deferral


async def test_a_recheck_decides_once_the_grace_and_the_queues_lag_have_passed(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent, processed = _capture(runtime, monkeypatch)
    await worker.handle_change(runtime, ChangeEvent(template=CARDS, side="fo", operation="update",
                                                    key={"CardNumber": "C-OTHER"}, received_at=_ago(10)).to_json())
    await worker.handle_change(runtime, _recheck(deferred_seconds_ago=14))
    assert [e.wire_format for e in processed][-1] == "recheck" and sent == []


async def test_waits_on_purpose_are_not_taken_for_backlog(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-checks and reconcile passes are late by design; they say nothing of the queue's backlog."""
    sent, processed = _capture(runtime, monkeypatch)
    await worker.handle_change(runtime, _recheck(deferred_seconds_ago=500, received_seconds_ago=500))
    reconcile = ChangeEvent(template=CARDS, side="fo", operation="update", key={"CardNumber": "C-R"},
                            received_at=_ago(300), wire_format="reconcile")
    await worker.handle_change(runtime, reconcile.to_json())
    await worker.handle_change(runtime, _recheck(deferred_seconds_ago=4))
    assert [e.wire_format for e in processed] == ["recheck", "reconcile", "recheck"] and sent == []


async def test_a_recheck_never_waits_past_the_longest_delay(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    sent, processed = _capture(runtime, monkeypatch)
    await worker.handle_change(runtime, ChangeEvent(template=CARDS, side="fo", operation="update",
                                                    key={"CardNumber": "C-OTHER"}, received_at=_ago(3000)).to_json())
    await worker.handle_change(runtime, _recheck(deferred_seconds_ago=worker.MAX_RECHECK_DELAY_S + 1))
    assert processed[-1].wire_format == "recheck" and sent == []


async def test_a_recheck_queued_by_an_earlier_version_is_taken_as_its_deferral(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-checks on the queue at an upgrade: a ChangeEvent with `wire_format="recheck"`, F&O's deferred values
    in `fields` ("(record)" for a whole-record wait) and the deferral's moment in `modified_on`."""
    deferrals: list[object] = []

    async def process(event: ChangeEvent, **kwargs: object) -> Outcome:
        deferrals.append(kwargs.get("deferral"))
        return Outcome(event.template, event.side, "C-OLD", "no-change")

    monkeypatch.setattr(runtime.engine, "process", process)
    deferred_at = _ago(30)
    for fields in ({"CardTenderType": "AsCardTender"}, {"(record)": None}):
        old = ChangeEvent(template=CARDS, side="fo", operation="update", key={"CardNumber": "C-OLD"},
                          fields=fields, modified_on=deferred_at, wire_format="recheck")
        await worker.handle_change(runtime, old.to_json())
    assert deferrals == [
        Deferral(deferred_at, "re-check queued by an earlier version", {"CardTenderType": "AsCardTender"}),
        Deferral(deferred_at, "re-check queued by an earlier version", {}, whole_record=True),
    ]


async def test_a_recheck_that_meets_an_interrupted_steps_intent_waits_for_its_event_and_a_decided_one_does_not(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[tuple[str, int]] = []
    outcomes = [
        Outcome(CARDS, "dataverse", "C-LAG", "conflict-deferred", waiting="an interrupted create in fo may have "
                "landed and been deleted since: waiting for its delete"),
        Outcome(CARDS, "dataverse", "C-LAG", "changed", conflicts=[
            {"field": "CardTenderType", "fo": "Blocked", "dataverse": "NoTender", "winner": None, "rule": "r"}]),
    ]

    async def enqueue(template: str, message: str, *, delay_s: int = 0) -> None:
        sent.append((message, delay_s))

    async def process(event: ChangeEvent, **kwargs: object) -> Outcome:
        return outcomes.pop(0)

    monkeypatch.setattr(runtime, "enqueue", enqueue)
    monkeypatch.setattr(runtime.engine, "process", process)
    await worker.handle_change(runtime, _recheck(deferred_seconds_ago=60))
    (message, delay), = sent
    deferral = read_envelope(message).deferral
    assert deferral is not None and deferral.whole_record
    assert delay == 3 + runtime.settings.queue_lease_seconds  # the grace plus a crashed instance's lease
    await worker.handle_change(runtime, _recheck(deferred_seconds_ago=60))
    assert len(sent) == 1  # a re-check's still open conflict is not deferred again: it was decided
