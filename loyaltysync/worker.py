"""Queue-triggered work: apply one change, park what cannot be applied, drain poison queues.

The retry rule (docs/retries.md): a transient failure (throttling, an outage of
either side or of Storage, a lost state race) does not fail the message. The
worker puts the same change back on its queue, invisible for the back-off of
`loyaltysync.retries` (never shorter than the service's Retry-After), and the
message completes; the change is parked only when RETRY_BUDGET_SECONDS have
passed since its first failure. A permanent failure (a mapping error, a 4xx
from a target) is parked at once, so one bad record never blocks the others.

The host's own retry stays the safety net: when the change cannot be put back
(Storage refuses) the message fails and the queue redelivers it after
host.json's visibilityTimeout; the last allowed attempt parks the reason first,
then the host moves the message to `<queue>-poison`, which `drain_poison` turns
into the same dead letter (after one last try when no attempt recorded a
reason: their processes died).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from azure.core.exceptions import ServiceRequestError, ServiceResponseError

from loyaltysync import host_limits, telemetry, timesource
from loyaltysync.errors import MappingError, TargetError
from loyaltysync.events.model import ChangeEvent, utc_now
from loyaltysync.mapping import parse_datetime
from loyaltysync.retries import (
    Deferral,
    GiveUp,
    RetrySchedule,
    RetryState,
    read_envelope,
    read_message,
    with_deferral,
    with_retry,
)
from loyaltysync.runtime import Runtime
from loyaltysync.state import dead_letter_id
from loyaltysync.sync import RECORD_BUSY, Outcome
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
    runtime: Runtime,
    body: str,
    *,
    dequeue_count: int = 1,
    max_dequeue: int = 5,
    host_traceparent: str | None = None,
    last_try: bool = False,
) -> Outcome | None:
    """Process one queue message (a change, maybe retried). Returns the outcome, or None when the
    change was parked, held or put back for a later attempt.

    Traced as a span continuing the trace the event carries from the inbound request
    (`host_traceparent`, the host's invocation, is linked). Returns normally when a transient
    failure put the change back on the queue; raises only when it could not be put back. `last_try`
    (the poison queue's) parks a transient failure instead, and raises.
    """
    if runtime.function_timeout_s is None:
        return await _handle_change(runtime, body, dequeue_count, max_dequeue, host_traceparent, last_try)
    with host_limits.invocation_deadline(runtime.function_timeout_s):
        return await _handle_change(runtime, body, dequeue_count, max_dequeue, host_traceparent, last_try)


async def _handle_change(
    runtime: Runtime,
    body: str,
    dequeue_count: int,
    max_dequeue: int,
    host_traceparent: str | None,
    last_try: bool,
) -> Outcome | None:
    try:
        envelope = read_envelope(body)
    except (ValueError, TypeError) as exc:
        await runtime.dead_letters.park(
            "(unknown)", "fo", "(unreadable)", f"unreadable queue message: {exc}", "UnreadableMessage", body, ""
        )
        return None
    event, retry = envelope.event, envelope.retry
    attempt = (retry.attempts if retry else 0) + dequeue_count
    with telemetry.current().change_span(event, attempt=attempt, host_traceparent=host_traceparent):
        return await _handle_event(
            runtime, event, body, retry, dequeue_count, max_dequeue, last_try=last_try, deferral=envelope.deferral
        )


async def _handle_event(
    runtime: Runtime,
    event: ChangeEvent,
    body: str,
    retry: RetryState | None,
    dequeue_count: int,
    max_dequeue: int,
    *,
    last_try: bool,
    deferral: Deferral | None,
) -> Outcome | None:
    recorder = telemetry.current()
    if await runtime.paused(event.template):
        # Held, not applied: put it back for later. A hold is no failed attempt: after a resume the
        # change starts a fresh retry budget (a pause for a long maintenance must not park it).
        await _requeue(runtime, event.template, body, None, runtime.settings.pause_recheck_seconds)
        recorder.held(event)
        log.info(
            "template %s is paused; event %s held",
            event.template,
            event.event_id,
            extra=recorder.log_extra(event, decision="held"),
        )
        return None
    if deferral is not None and await _recheck_waits(runtime, event, deferral, body):
        return None
    if deferral is None and event.wire_format != "reconcile" and retry is None and dequeue_count == 1:
        runtime.lag.observe(event.template, _age_seconds(event.received_at), timesource.monotonic())
    try:
        outcome = await _process(runtime, event, deferral)
    except MappingError as exc:
        with telemetry.personal_values(str(exc.value) if exc.value is not None else None):
            await _park(runtime, event, str(exc), "MappingError")
        return None
    except TargetError as exc:
        if exc.code == RECORD_BUSY:
            # Another instance is writing the record (or died doing so): back on the queue for when its
            # intent is old enough to judge, without spending one of the change's attempts.
            await _requeue(runtime, event.template, body, retry, max(1, math.ceil(exc.retry_after or 1)))
            recorder.retrying(event, RECORD_BUSY)
            log.info("%s %s is busy elsewhere; event %s re-queued", event.template, event.key_text, event.event_id,
                     extra=recorder.log_extra(event, decision="retrying"))
            return None
        if not exc.transient:
            await _park(runtime, event, str(exc), exc.code or str(exc.status), status=exc.status)
            return None
        if last_try:
            attempts = (retry.attempts if retry else 0) + dequeue_count
            await _park(runtime, event, f"gave up after {attempts} attempts: {exc}", exc.code or str(exc.status),
                        status=exc.status)
            raise
        await _retry_later(runtime, event, body, retry, exc, dequeue_count, max_dequeue)
        return None
    if outcome.deferred and (deferral is None or outcome.waiting is not None):
        # A re-check that meets an interrupted step's intent waits, like a live event, for the event that
        # tells what the step did (or for the time it may be held back); another deferred conflict is not
        # deferred again: the re-check decided it.
        await _recheck_later(runtime, event, body, outcome)
    await _succeeded(runtime, event, outcome)
    return outcome


async def _retry_later(
    runtime: Runtime,
    event: ChangeEvent,
    body: str,
    retry: RetryState | None,
    exc: TargetError,
    dequeue_count: int,
    max_dequeue: int,
) -> None:
    """A transient failure: the change goes back on the queue after its back-off, or is parked when its
    retry budget is spent. Raises `exc` when the change cannot be put back, for the host's retry."""
    recorder = telemetry.current()
    code = exc.code or str(exc.status)
    verdict = retry_schedule(runtime).after_failure(retry, timesource.utc(), str(exc), exc.retry_after)
    if isinstance(verdict, GiveUp):
        reason = f"gave up after {verdict.state.attempts} attempts in {_duration(verdict.waited_s)}: {exc}"
        await _park(runtime, event, reason, code, status=exc.status)
        return
    try:
        await _requeue(runtime, event.template, body, verdict.state, verdict.delay_s)
    except Exception as failure:  # Storage refused the new message: the host's retry is the safety net
        log.warning("event %s could not be put back on the queue (%s); the queue will redeliver it",
                    event.event_id, failure, extra=recorder.log_extra(event, decision="retrying", code=code))
        if dequeue_count >= max_dequeue:
            reason = f"gave up after {(retry.attempts if retry else 0) + dequeue_count} attempts: {exc}"
            await _park(runtime, event, reason, code, status=exc.status)
        else:
            recorder.retrying(event, code)
        raise exc from failure
    recorder.retrying(event, code)
    log.info(
        "%s %s failed (%s, attempt %d); retrying in %d s",
        event.template,
        recorder.redactor.key(event.key_text or event.row_id or "?"),
        code,
        verdict.state.attempts,
        verdict.delay_s,
        extra=recorder.log_extra(event, decision="retrying", code=code, target_status=exc.status),
    )


def retry_schedule(runtime: Runtime) -> RetrySchedule:
    """The back-off and retry budget of RETRY_BASE_SECONDS, RETRY_MAX_SECONDS and RETRY_BUDGET_SECONDS."""
    settings = runtime.settings
    return RetrySchedule(
        base_s=settings.retry_base_seconds,
        max_s=settings.retry_max_seconds,
        budget_s=settings.retry_budget_seconds,
    )


async def _requeue(runtime: Runtime, template: str, body: str, retry: RetryState | None, delay_s: int) -> None:
    """Put a change back on its template's queue, invisible for `delay_s` seconds, carrying `retry`.

    The one way a change goes back on the queue (a hold, a busy record, a transient failure, a
    re-check): the change itself is kept as it came, so its ids and trace context go with it.
    """
    await runtime.enqueue(template, with_retry(body, retry), delay_s=delay_s)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


async def _process(runtime: Runtime, event: ChangeEvent, deferral: Deferral | None) -> Outcome:
    """Apply the event (a re-check when `deferral`); Storage that cannot be reached (after the SDK's own
    retries) is a transient failure like an unreachable target: the change is tried again later."""
    live = deferral is None and event.wire_format != "reconcile"
    try:
        return await runtime.engine.process(event, live=live, deferral=deferral)
    except (ServiceRequestError, ServiceResponseError) as exc:
        raise TargetError("storage", 503, "StorageUnreachable", str(exc)) from exc


async def _recheck_later(runtime: Runtime, event: ChangeEvent, body: str, outcome: Outcome) -> None:
    """A conflict deferred to the other side's event is looked at again after a grace period.

    Normally that event comes first and decides. If it never comes (the other side's change
    was older than its event time could prove), the re-check decides on the times known by
    then, so a deferred conflict never waits for the next reconciliation pass. The grace is
    CONFLICT_GRACE_SECONDS, or twice this event's own lag when events run later than that
    (a backlog delays the other side's event as much). The deferral carries F&O's values of
    the deferred fields and its moment: if F&O changed them after that, F&O's change is the
    later one, whatever its event says when it comes.

    A deferral that waits for the event telling what an interrupted step did (a person's delete
    or create after the step's intent) waits the grace plus the queue's message lease: that event
    may be held by an instance that died (the crash that interrupted the step, or another), and
    comes back only when the lease runs out; this event's own lag says nothing about it.
    """
    deferred = [c for c in outcome.conflicts if c["winner"] is None]
    whole_record = outcome.waiting is not None
    if whole_record and not deferred:
        delay = runtime.settings.conflict_grace_seconds + runtime.settings.queue_lease_seconds
    else:
        lag = _age_seconds(event.modified_on or event.received_at)
        delay = min(MAX_RECHECK_DELAY_S, max(runtime.settings.conflict_grace_seconds, math.ceil(2 * lag)))
    reasons = [outcome.waiting] if outcome.waiting is not None else [c["rule"] for c in deferred]
    deferral = Deferral(utc_now(), "; ".join(reasons), {c["field"]: c["fo"] for c in deferred}, whole_record)
    await _requeue(runtime, event.template, with_deferral(body, deferral), None, delay)


async def _recheck_waits(runtime: Runtime, event: ChangeEvent, deferral: Deferral, body: str) -> bool:
    """A re-check comes due while the queue runs behind: put it back until the events on their way at
    the deferral have had the time the queue needs now (the grace plus its recent lag, lag.py), so an F&O
    edit made before the deferral is dated by its own event before the conflict is decided. Never past
    MAX_RECHECK_DELAY_S after the deferral; True when put back."""
    telemetry.current().recheck(deferral.reason)
    since = _age_seconds(deferral.at)
    behind = runtime.lag.recent(event.template, timesource.monotonic())
    needed = runtime.settings.conflict_grace_seconds + behind
    if since >= needed or since >= MAX_RECHECK_DELAY_S:
        return False
    wait = max(1, math.ceil(min(needed, MAX_RECHECK_DELAY_S) - since))
    await _requeue(runtime, event.template, body, None, wait)
    log.info("%s %s: re-check waits %d s more (the queue runs %.0f s behind)", event.template,
             telemetry.current().redactor.key(event.key_text or event.row_id or "?"), wait, behind,
             extra=telemetry.current().log_extra(event, decision="held"))
    return True


def _age_seconds(moment: str | None) -> float:
    """Seconds since an ISO time (0 when unknown or in the future)."""
    try:
        at = parse_datetime(moment) if moment else None
    except ValueError:
        return 0.0
    return 0.0 if at is None else max(0.0, (timesource.utc() - at).total_seconds())


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
        {"at": timesource.utc().isoformat(), "key": outcome.key, "reason": outcome.reason, "event_id": event.event_id},
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
        event, _ = read_message(body)
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
            await handle_change(runtime, body, dequeue_count=last, max_dequeue=last, last_try=True)
            return
        except Exception as exc:  # a transient failure was parked with its reason; anything else is below
            if await runtime.dead_letters.get(dead_letter_id(event.template, event.side, key)) is not None:
                return
            reason = f"{reason}; the last try failed: {exc}"
    payload = with_retry(body, None)  # the change as it came: replay reads it like any dead letter
    await runtime.dead_letters.park(event.template, event.side, key, reason, "Poison", payload, event.event_id)


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
            event, _ = read_message(entry.payload)
        except (ValueError, TypeError):
            continue
        # Replays re-read both sides: the parked payload may be older than what they hold now.
        event.complete, event.source_version, event.wire_format = False, None, "replay"
        await runtime.enqueue(entry.template, event.to_json())
        await runtime.dead_letters.remove(entry.id)
        count += 1
    return count
