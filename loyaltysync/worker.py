"""Queue-triggered work: apply one change, park what cannot be applied, drain poison queues.

The retry rule: a transient failure (throttling, outage, a lost state race)
raises, so the queue redelivers the message after the visibility timeout; on
the last allowed attempt the reason is parked first, then the host moves the
message to `<queue>-poison`, which `drain_poison` turns into the same dead
letter (after one last try when no attempt recorded a reason: their processes
died). A permanent failure (a mapping error, a 4xx from a target) is parked at
once and the message completes, so one bad record never blocks the others.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol, runtime_checkable

from azure.core.exceptions import ServiceRequestError, ServiceResponseError

from loyaltysync import telemetry
from loyaltysync.errors import MappingError, TargetError
from loyaltysync.events.model import ChangeEvent, utc_now
from loyaltysync.mapping import parse_datetime
from loyaltysync.runtime import Runtime
from loyaltysync.state import dead_letter_id
from loyaltysync.sync import RECORD_BUSY, WHOLE_RECORD, Outcome
from loyaltysync.templates import SIDES

log = logging.getLogger("loyaltysync.worker")

DEFAULT_MAX_DEQUEUE = 5
MAX_RECHECK_DELAY_S = 600

Observer = Callable[[ChangeEvent, "Outcome | None", "str | None"], None]
OBSERVERS: list[Observer] = []
"""Called after every change with (event, outcome or None, parked reason or None): the demo's event feed."""


def _notify(event: ChangeEvent, outcome: Outcome | None, parked: str | None) -> None:
    for observer in OBSERVERS:
        observer(event, outcome, parked)


def max_dequeue_count(host_json: Path = Path("host.json")) -> int:
    """host.json's queues.maxDequeueCount (or its app-setting override), as the host applies it."""
    override = os.environ.get("AzureFunctionsJobHost__extensions__queues__maxDequeueCount")
    if override and override.isdigit():
        return int(override)
    try:
        config = json.loads(host_json.read_text(encoding="utf-8"))
        return int(config.get("extensions", {}).get("queues", {}).get("maxDequeueCount", DEFAULT_MAX_DEQUEUE))
    except (OSError, ValueError, AttributeError):
        return DEFAULT_MAX_DEQUEUE


async def handle_change(
    runtime: Runtime, body: str, *, dequeue_count: int = 1, max_dequeue: int = 5, host_traceparent: str | None = None
) -> Outcome | None:
    """Process one queue message (ChangeEvent JSON). Returns the outcome, or None when parked/held.

    Traced as a span continuing the trace the event carries from the inbound request
    (`host_traceparent`, the host's invocation, is linked).
    """
    try:
        event = ChangeEvent.from_json(body)
    except (ValueError, TypeError) as exc:
        await runtime.dead_letters.park(
            "(unknown)", "fo", "(unreadable)", f"unreadable queue message: {exc}", "UnreadableMessage", body, ""
        )
        return None
    with telemetry.current().change_span(event, attempt=dequeue_count, host_traceparent=host_traceparent):
        return await _handle_event(runtime, event, body, dequeue_count, max_dequeue)


async def _handle_event(
    runtime: Runtime, event: ChangeEvent, body: str, dequeue_count: int, max_dequeue: int
) -> Outcome | None:
    recorder = telemetry.current()
    if await runtime.paused(event.template):
        # Held, not applied: put it back for later. Requeued messages never expire.
        await runtime.enqueue(event.template, body, delay_s=runtime.settings.pause_recheck_seconds)
        recorder.held(event)
        log.info(
            "template %s is paused; event %s held",
            event.template,
            event.event_id,
            extra=recorder.log_extra(event, decision="held"),
        )
        return None
    try:
        outcome = await _process(runtime, event)
    except MappingError as exc:
        with telemetry.personal_values(str(exc.value) if exc.value is not None else None):
            await _park(runtime, event, str(exc), "MappingError")
        return None
    except TargetError as exc:
        if exc.code == RECORD_BUSY:
            # Another instance is writing the record (or died doing so): back on the queue for when its
            # intent is old enough to judge, without spending one of the message's attempts.
            await runtime.enqueue(event.template, body, delay_s=max(1, math.ceil(exc.retry_after or 1)))
            recorder.retrying(event, RECORD_BUSY)
            log.info("%s %s is busy elsewhere; event %s re-queued", event.template, event.key_text, event.event_id,
                     extra=recorder.log_extra(event, decision="retrying"))
            return None
        if not exc.transient:
            await _park(runtime, event, str(exc), exc.code or str(exc.status), status=exc.status)
            return None
        if dequeue_count >= max_dequeue:
            await _park(
                runtime,
                event,
                f"gave up after {dequeue_count} attempts: {exc}",
                exc.code or str(exc.status),
                status=exc.status,
            )
        else:
            recorder.retrying(event, exc.code or str(exc.status))
        raise
    if event.wire_format != "recheck" and any(c["winner"] is None for c in outcome.conflicts):
        await _recheck_later(runtime, event, outcome)
    await _succeeded(runtime, event, outcome)
    return outcome


async def _process(runtime: Runtime, event: ChangeEvent) -> Outcome:
    """Apply the event; Storage that cannot be reached (after the SDK's own retries) is a transient
    failure like an unreachable target: the message is tried again, and parked after the last attempt."""
    try:
        return await runtime.engine.process(event, live=event.wire_format not in ("reconcile", "recheck"))
    except (ServiceRequestError, ServiceResponseError) as exc:
        raise TargetError("storage", 503, "StorageUnreachable", str(exc)) from exc


async def _recheck_later(runtime: Runtime, event: ChangeEvent, outcome: Outcome) -> None:
    """A conflict deferred to the other side's event is looked at again after a grace period.

    Normally that event comes first and decides. If it never comes (the other side's change
    was older than its event time could prove), the re-check decides on the times known by
    then, so a deferred conflict never waits for the next reconciliation pass. The grace is
    CONFLICT_GRACE_SECONDS, or twice this event's own lag when events run later than that
    (a backlog delays the other side's event as much). The re-check carries F&O's values of
    the deferred fields and the moment of deferral: if F&O changed them after that, F&O's
    change is the later one, whatever its event says when it comes.

    A deferral that waits for the event telling what an interrupted step did (a person's delete
    or create after the step's intent) waits the grace alone: that change was made after the
    intent, and this event's lag (often a message delivered again after its process died) says
    nothing about when its event comes.
    """
    deferred = {c["field"]: c["fo"] for c in outcome.conflicts if c["winner"] is None}
    interrupted = all(name == WHOLE_RECORD for name in deferred)
    lag = 0.0 if interrupted else _age_seconds(event.modified_on or event.received_at)
    delay = min(MAX_RECHECK_DELAY_S, max(runtime.settings.conflict_grace_seconds, math.ceil(2 * lag)))
    recheck = replace(
        event,
        complete=False,
        fields=deferred,
        lookup_ids={},
        before={},
        source_version=None,
        modified_on=utc_now(),
        wire_format="recheck",
    )
    await runtime.enqueue(event.template, recheck.to_json(), delay_s=delay)


def _age_seconds(moment: str | None) -> float:
    """Seconds since an ISO time (0 when unknown or in the future)."""
    try:
        at = parse_datetime(moment) if moment else None
    except ValueError:
        return 0.0
    return 0.0 if at is None else max(0.0, (datetime.now(UTC) - at).total_seconds())


async def _park(runtime: Runtime, event: ChangeEvent, reason: str, code: str, *, status: int | None = None) -> None:
    _notify(event, None, reason)
    recorder = telemetry.current()
    shown = recorder.parked(event, reason, code)
    log.warning(
        "parked %s %s %s: %s",
        event.template,
        event.side,
        recorder.redactor.key(event.key_text or event.row_id or "?"),
        shown,
        extra=recorder.log_extra(event, decision="parked", code=code, target_status=status),
    )
    await runtime.dead_letters.park(
        event.template, event.side, event.key_text or event.row_id or "?", reason, code, event.to_json(), event.event_id
    )


async def _succeeded(runtime: Runtime, event: ChangeEvent, outcome: Outcome) -> None:
    _notify(event, outcome, None)  # the change is applied (write acknowledged, state stored); the rest is bookkeeping
    if outcome.key:
        await _clear_dead_letters(runtime, event.template, outcome.key)
    # Written at most once per LAST_SUCCESS_WRITE_SECONDS per direction; ops status also shows the unwritten latest.
    await runtime.successes.put(
        f"{event.template}:{event.side}",
        {"at": datetime.now(UTC).isoformat(), "key": outcome.key, "reason": outcome.reason, "event_id": event.event_id},
    )
    recorder = telemetry.current()
    recorder.outcome(event, outcome)
    log.info(
        "%s %s %s -> %s writes=%s %.0f ms",
        event.template,
        event.side,
        recorder.redactor.key(outcome.key),
        outcome.reason,
        outcome.writes,
        outcome.duration_ms,
        extra=recorder.log_extra(event, decision=outcome.reason, applied=outcome.applied),
    )


@runtime_checkable
class _RemovesByKey(Protocol):
    async def remove_for(self, template: str, key: str) -> int: ...


async def _clear_dead_letters(runtime: Runtime, template: str, key: str) -> None:
    """A record that syncs again is no longer a dead letter on either side.

    With Table Storage: one query in the template's partition (`remove_for`); a store
    without it removes each side's entry by id.
    """
    store = runtime.dead_letters
    if isinstance(store, _RemovesByKey):
        await store.remove_for(template, key)
        return
    for side in SIDES:
        await store.remove(dead_letter_id(template, side, key))


async def drain_poison(runtime: Runtime, body: str, *, dequeue_count: int = 1, max_dequeue: int = 5) -> None:
    """A message the queue gave up on becomes a dead letter (keeping an earlier, more precise reason).

    When no attempt recorded a reason, every one ended with the process that held it (a crash, a
    scale-in, a deployment, another invocation's out-of-memory): the record itself may be fine, and
    parking it would leave a good change waiting for an operator. It gets one last try here, on the
    poison message's first delivery only (a message that kills every process taking it must not
    kill this one forever), and is parked only if that try fails too, with that failure's reason.
    """
    try:
        event = ChangeEvent.from_json(body)
    except (ValueError, TypeError) as exc:
        await runtime.dead_letters.park(
            "(unknown)", "fo", "(unreadable)", f"unreadable poison message: {exc}", "UnreadableMessage", body, ""
        )
        return
    key = event.key_text or event.row_id or "?"
    existing = await runtime.dead_letters.get(dead_letter_id(event.template, event.side, key))
    reason = existing.reason if existing else "the queue gave up after the maximum number of attempts"
    if existing is None and dequeue_count == 1:
        log.warning("event %s of %s: every attempt ended with its process; one last try", event.event_id,
                    event.template)
        try:
            last = max_dequeue + 1
            await handle_change(runtime, body, dequeue_count=last, max_dequeue=last)
            return
        except Exception as exc:  # a transient failure was parked with its reason; anything else is below
            if await runtime.dead_letters.get(dead_letter_id(event.template, event.side, key)) is not None:
                return
            reason = f"{reason}; the last try failed: {exc}"
    await runtime.dead_letters.park(event.template, event.side, key, reason, "Poison", body, event.event_id)


async def replay(runtime: Runtime, *, template: str | None = None, key: str | None = None) -> int:
    """Re-queue dead letters (all, one template's, or one key's) and remove them. Returns how many."""
    runtime.engine.lookups.forget()  # a replay follows a fix (e.g. a currency added): cached misses are stale
    count = 0
    for entry in await runtime.dead_letters.list(template):
        if key is not None and entry.key != key:
            continue
        if entry.template not in runtime.templates:
            continue
        try:
            event = ChangeEvent.from_json(entry.payload)
        except (ValueError, TypeError):
            continue
        # Replays re-read both sides: the parked payload may be older than what they hold now.
        event.complete, event.source_version, event.wire_format = False, None, "replay"
        await runtime.enqueue(entry.template, event.to_json())
        await runtime.dead_letters.remove(entry.id)
        count += 1
    return count
