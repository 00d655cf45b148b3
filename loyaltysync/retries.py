"""When a change that failed for a passing reason is tried again, and when the sync stops trying.

The queue trigger's own retry cannot wait long: host.json gives one visibility
timeout for every failed message and a few dequeues before the poison queue,
about half a minute in all, while a Dataverse outage or a service-protection
window lasts minutes. So the worker completes a message that failed transiently
and puts the same change back on its queue, invisible for the back-off this
module computes, carrying a `RetryState` (how many attempts failed, since when,
why). A change is parked only when `RetrySchedule.budget_s` has passed since its
first failure without a success. docs/retries.md has the schedule and the
reasons.

On the queue a retried change is its ChangeEvent JSON with one more top-level
key, `"retry"`; everything else (event id, correlation id, trace context,
versions) is the change exactly as it first came, so the engine judges it as it
would a redelivery. A re-check (a change deferred until a later event could
decide it) carries a `Deferral` under `"deferral"` the same way.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from loyaltysync.events.model import ChangeEvent

RETRY_KEY = "retry"
DEFERRAL_KEY = "deferral"
_LEGACY_WHOLE_RECORD = "(record)"  # the field name an earlier version's re-check used for a whole-record wait
MAX_QUEUE_DELAY_S = 7 * 24 * 3600  # Put Message: the visibility timeout cannot exceed 7 days
_MAX_REASON = 500


@dataclass(frozen=True, slots=True)
class RetryState:
    """What the earlier attempts of one change came to: `attempts` failed, the first at `first_failed_at`."""

    attempts: int
    first_failed_at: datetime
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The JSON object carried under the message's `"retry"` key."""
        return {
            "attempts": self.attempts,
            "first_failed_at": self.first_failed_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, data: object) -> RetryState:
        """Inverse of `as_dict`; raises ValueError on anything else."""
        if not isinstance(data, dict):
            raise ValueError("retry must be a JSON object")
        attempts, first, reason = data.get("attempts"), data.get("first_failed_at"), data.get("reason", "")
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ValueError(f"retry.attempts must be a positive integer, got {attempts!r}")
        if not isinstance(first, str):
            raise ValueError(f"retry.first_failed_at must be an ISO-8601 time, got {first!r}")
        moment = datetime.fromisoformat(first.replace("Z", "+00:00"))
        moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
        return cls(attempts, moment.astimezone(UTC), reason if isinstance(reason, str) else str(reason))


@dataclass(frozen=True, slots=True)
class Deferral:
    """A change looked at again later because only a later event could decide it: a re-check.

    `at`: when it was deferred (ISO UTC); `reason`: the rule that deferred it. What waits: `fields`,
    conflicting fields, with F&O's values of them at the deferral (a different value at the re-check
    was written after the deferral), or the whole record (`whole_record`: what an interrupted step
    did, which only an event still to come could tell). Carried under the message's `"deferral"` key
    next to the change, which is kept as it came.
    """

    at: str
    reason: str = ""
    fields: dict[str, Any] = field(default_factory=dict)
    whole_record: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The JSON object carried under the message's `"deferral"` key."""
        return {"at": self.at, "reason": self.reason, "fields": dict(self.fields), "whole_record": self.whole_record}

    @classmethod
    def from_dict(cls, data: object) -> Deferral:
        """Inverse of `as_dict`; raises ValueError on anything else."""
        if not isinstance(data, dict):
            raise ValueError("deferral must be a JSON object")
        at, reason, fields = data.get("at"), data.get("reason", ""), data.get("fields") or {}
        if not isinstance(at, str) or not at:
            raise ValueError(f"deferral.at must be an ISO-8601 time, got {at!r}")
        if not isinstance(fields, dict):
            raise ValueError("deferral.fields must be a JSON object")
        whole = data.get("whole_record") is True
        return cls(at, reason if isinstance(reason, str) else str(reason), dict(fields), whole)


@dataclass(frozen=True, slots=True)
class RetryLater:
    """Try again in `delay_s` seconds; `state` travels with the message."""

    delay_s: int
    state: RetryState


@dataclass(frozen=True, slots=True)
class GiveUp:
    """The budget is spent: park the change. `waited_s` is the time since its first failure."""

    state: RetryState
    waited_s: float


@dataclass(frozen=True, slots=True)
class RetrySchedule:
    """Back-off between attempts of one change, and how long it may keep failing.

    The wait after the n-th failed attempt is `min(max_s, base_s * 2**(n-1))`, plus up to
    `jitter` of it at random (so changes that failed together in an outage do not all come
    back in the same second), and never shorter than the service's `Retry-After`. With the
    defaults: 5, 10, 20, 40, 80, 160, 300, 300, ... seconds. `budget_s` after the first
    failure, the next failure parks the change.
    """

    base_s: float = 5.0
    max_s: float = 300.0
    budget_s: float = 3600.0
    jitter: float = 0.2

    def nominal(self, attempt: int) -> float:
        """The wait after failed attempt number `attempt` (1-based), before jitter and Retry-After."""
        exponent = min(max(attempt, 1) - 1, 62)  # 2**62 s is far past any cap; keeps the float finite
        return min(self.max_s, self.base_s * 2.0**exponent)

    def delay(self, attempt: int, retry_after: float | None, rand: Callable[[], float] = random.random) -> int:
        """Whole seconds to keep the change invisible after failed attempt `attempt`."""
        backoff = self.nominal(attempt) * (1 + self.jitter * rand())
        wanted = max(backoff, retry_after or 0.0)
        return max(1, min(MAX_QUEUE_DELAY_S, math.ceil(wanted)))

    def after_failure(
        self,
        state: RetryState | None,
        now: datetime,
        reason: str,
        retry_after: float | None = None,
        rand: Callable[[], float] = random.random,
    ) -> RetryLater | GiveUp:
        """What to do about a transient failure at `now` of a change with `state` (None: its first failure)."""
        first = state.first_failed_at if state is not None else now
        attempts = (state.attempts if state is not None else 0) + 1
        updated = RetryState(attempts, first, reason[:_MAX_REASON])
        waited = max(0.0, (now - first).total_seconds())
        if waited >= self.budget_s:
            return GiveUp(updated, waited)
        return RetryLater(self.delay(attempts, retry_after, rand), updated)

    def minimum_waits(self) -> list[float]:
        """The shortest waits (no jitter, no Retry-After) a change gets before its budget is spent.

        Their sum is the least time between a first failure and the attempt that parks it:
        an outage shorter than that never parks a change.
        """
        waits: list[float] = []
        total = 0.0
        while total < self.budget_s:
            wait = float(max(1, math.ceil(self.nominal(len(waits) + 1))))
            waits.append(wait)
            total += wait
        return waits


@dataclass(frozen=True, slots=True)
class Envelope:
    """One queue message: the change as it came, its retry state and, for a re-check, its deferral."""

    event: ChangeEvent
    retry: RetryState | None = None
    deferral: Deferral | None = None


def read_envelope(body: str | bytes) -> Envelope:
    """The change a queue message carries, with its retry state and deferral (None when absent).

    A re-check queued by an earlier version (a ChangeEvent with `wire_format="recheck"` whose `fields`
    held F&O's deferred values, `"(record)"` for a whole-record wait, and `modified_on` the deferral's
    moment) is read as its Deferral. Raises ValueError/TypeError for a message that is not a change.
    """
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ValueError("a change message must be a JSON object")
    retry = RetryState.from_dict(data.pop(RETRY_KEY)) if RETRY_KEY in data else None
    deferral = Deferral.from_dict(data.pop(DEFERRAL_KEY)) if DEFERRAL_KEY in data else None
    event = ChangeEvent.from_json(json.dumps(data))
    if deferral is None and event.wire_format == "recheck":
        fields = {name: value for name, value in event.fields.items() if name != _LEGACY_WHOLE_RECORD}
        at = event.modified_on or event.received_at
        deferral = Deferral(at, "re-check queued by an earlier version", fields, _LEGACY_WHOLE_RECORD in event.fields)
    return Envelope(event, retry, deferral)


def read_message(body: str | bytes) -> tuple[ChangeEvent, RetryState | None]:
    """The change a queue message carries and its retry state (None on a first delivery).

    Raises ValueError/TypeError for a message that is not a change.
    """
    envelope = read_envelope(body)
    return envelope.event, envelope.retry


def with_retry(body: str, state: RetryState | None) -> str:
    """The queue message `body` (a change, retried or not) carrying `state` instead (none when None)."""
    return _with_key(body, RETRY_KEY, state.as_dict() if state is not None else None)


def with_deferral(body: str, deferral: Deferral | None) -> str:
    """The queue message `body` carrying `deferral` instead (none when None): a re-check of the change."""
    return _with_key(body, DEFERRAL_KEY, deferral.as_dict() if deferral is not None else None)


def _with_key(body: str, key: str, value: dict[str, Any] | None) -> str:
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ValueError("a change message must be a JSON object")
    data.pop(key, None)
    if value is not None:
        data[key] = value
    return json.dumps(data, separators=(",", ":"), sort_keys=True)
