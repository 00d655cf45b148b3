"""How far behind a template's queue runs: the lag of the changes this process took lately.

A deferred conflict's re-check decides on the F&O times known when it runs. F&O's loyalty
entities carry no modified time, so an F&O edit is dated only by its event, and that event
may still sit in the queue behind a backlog. The re-check therefore waits until the events
that were on their way at the deferral have had the time the queue currently needs to be
taken: the grace (the services' own delivery delay) plus the queue's recent lag. Without it, a
backlog longer than the grace let an older Dataverse edit beat a later F&O edit.

The lag of a change is the time from its receipt (the inbound function's stamp) to the moment
a worker takes it. Re-checks, reconcile passes and retried changes are waits on purpose, not
backlog, and are not sampled. Pure: the caller gives the times.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

WINDOW_S = 60.0  # lag samples older than this no longer describe the queue


@dataclass
class LagWindow:
    """Recent receipt-to-start lags, per template, each with the moment it was seen."""

    window_s: float = WINDOW_S
    _samples: dict[str, deque[tuple[float, float]]] = field(default_factory=dict)

    def observe(self, template: str, lag_s: float, now: float) -> None:
        """A change of `template` was taken `lag_s` seconds after it was received, at `now`."""
        samples = self._samples.setdefault(template, deque())
        samples.append((now, max(0.0, lag_s)))
        self._forget(samples, now)

    def recent(self, template: str, now: float) -> float:
        """The largest lag seen in the window (0 when nothing was seen)."""
        samples = self._samples.get(template)
        if not samples:
            return 0.0
        self._forget(samples, now)
        return max((lag for _, lag in samples), default=0.0)

    def _forget(self, samples: deque[tuple[float, float]], now: float) -> None:
        while samples and samples[0][0] < now - self.window_s:
            samples.popleft()
