"""The app's metrics: one instrument per question an operator asks, dimensioned by template and direction.

Names are what appears as `name` in `customMetrics` / `Name` in `AppMetrics`
(docs/monitoring.md has the queries). Dimensions are low-cardinality on
purpose: template, direction, decision or reason, target, status, error code;
never a natural key.

Queue backlog is observed, not counted: `BacklogGauges` keeps the last
`operations.status` snapshot (refreshed by the monitor timer) and the metric
reader reads it on its own thread, so the callbacks never touch the event loop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry.metrics import CallbackOptions, Counter, Histogram, Meter, Observation

PREFIX = "loyaltysync"
SNAPSHOT_MAX_AGE_S = 600.0  # an older snapshot means the monitor stopped: report nothing rather than stale values


@dataclass(frozen=True)
class Instruments:
    """Counters and histograms; create once per meter."""

    received: Counter
    foreign: Counter
    refused: Counter
    applied: Counter
    skipped: Counter
    held: Counter
    conflicts: Counter
    dead_lettered: Counter
    retried: Counter
    target_requests: Counter
    target_throttled: Counter
    latency_from_event: Histogram
    latency_from_receipt: Histogram

    @classmethod
    def create(cls, meter: Meter) -> Instruments:
        """Every instrument on `meter`."""
        return cls(
            received=meter.create_counter(
                f"{PREFIX}.events.received", unit="{event}", description="Change events accepted and queued"
            ),
            foreign=meter.create_counter(
                f"{PREFIX}.events.foreign",
                unit="{event}",
                description="Event Grid events skipped as not F&O's (other publishers', Event Grid's own)",
            ),
            refused=meter.create_counter(
                f"{PREFIX}.events.refused", unit="{request}", description="Inbound requests answered 4xx"
            ),
            applied=meter.create_counter(
                f"{PREFIX}.events.applied", unit="{event}", description="Changes written to the other side"
            ),
            skipped=meter.create_counter(
                f"{PREFIX}.events.skipped",
                unit="{event}",
                description="Changes needing no write, by reason (echo, stale, no-change, ...)",
            ),
            held=meter.create_counter(
                f"{PREFIX}.events.held", unit="{event}", description="Changes put back because the template is paused"
            ),
            conflicts=meter.create_counter(
                f"{PREFIX}.conflicts", unit="{field}", description="Fields changed on both sides, settled by policy"
            ),
            dead_lettered=meter.create_counter(
                f"{PREFIX}.dead_letters", unit="{event}", description="Changes parked as dead letters"
            ),
            retried=meter.create_counter(
                f"{PREFIX}.events.retried", unit="{event}", description="Transient failures left to the queue to retry"
            ),
            target_requests=meter.create_counter(
                f"{PREFIX}.target.requests", unit="{request}", description="F&O and Dataverse request attempts"
            ),
            target_throttled=meter.create_counter(
                f"{PREFIX}.target.throttled", unit="{request}", description="Attempts answered 429 by a target"
            ),
            latency_from_event=meter.create_histogram(
                f"{PREFIX}.latency.event_to_write",
                unit="ms",
                description="From the change's time at the source to our write on the other side",
            ),
            latency_from_receipt=meter.create_histogram(
                f"{PREFIX}.latency.receipt_to_write",
                unit="ms",
                description="From webhook receipt to our write on the other side",
            ),
        )


class BacklogGauges:
    """Observable gauges over the latest per-template queue snapshot."""

    # gauge name suffix -> (key in operations.status' per-template dict, unit, description)
    GAUGES: Mapping[str, tuple[str, str, str]] = {
        "queue.backlog": ("backlog", "{message}", "Messages waiting in the template's queue"),
        "queue.oldest_age": ("oldest_age_s", "s", "Age of the oldest waiting message"),
        "queue.poison": ("poison_backlog", "{message}", "Messages in the template's poison queue"),
        "dead_letters.open": ("dead_letters", "{record}", "Records parked and not yet replayed"),
        "template.paused": ("paused", "1", "1 while the template is paused"),
    }

    def __init__(self, meter: Meter, *, clock: Any = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._taken: float | None = None
        self._templates: dict[str, dict[str, Any]] = {}
        for suffix, (field, unit, description) in self.GAUGES.items():
            meter.create_observable_gauge(
                f"{PREFIX}.{suffix}", callbacks=[self._callback(field)], unit=unit, description=description
            )

    def update(self, status: Mapping[str, Any]) -> None:
        """Take a new snapshot from an `operations.status` answer."""
        templates = {name: dict(values) for name, values in dict(status.get("templates", {})).items()}
        with self._lock:
            self._templates = templates
            self._taken = self._clock()

    def values(self, field: str) -> dict[str, float]:
        """Per template, the snapshot's `field` as a number (absent or unknown ages left out)."""
        with self._lock:
            if self._taken is None or self._clock() - self._taken > SNAPSHOT_MAX_AGE_S:
                return {}
            out: dict[str, float] = {}
            for name, values in self._templates.items():
                value = values.get(field)
                if isinstance(value, bool):
                    out[name] = 1.0 if value else 0.0
                elif isinstance(value, int | float):
                    out[name] = float(value)
                elif field == "oldest_age_s" and values.get("backlog") == 0:
                    out[name] = 0.0  # an empty queue has no oldest message: its age is 0, not unknown
            return out

    def _callback(self, field: str) -> Any:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(value, {"template": name}) for name, value in self.values(field).items()]

        return observe
