"""Service protection API limits, per user, over a sliding window (docs/wire-formats.md §1.9).

Three facets, as api-limits.md describes them: the number of requests, the
combined execution time and the number of concurrent requests. The first two
are evaluated over the preceding window: the request that crosses a limit is
still served, later ones get 429 until enough of the window has slid by
(`Retry-After`). Concurrency fails at once.

Execution time is not measured (the emulator is far faster than Dataverse)
but charged by a cost model, so the budget binds the way it does on the real
service, where bulk work exhausts execution time long before the request count:

| operation                                   | charged                         |
|---------------------------------------------|---------------------------------|
| read by key, WhoAmI, `$count`               | `read_ms` (5 ms)                |
| collection query                            | `read_ms` + `row_ms` per row returned (0.05 ms) |
| metadata                                    | `metadata_ms` (10 ms)           |
| single write (POST, PATCH, PUT, DELETE)     | `write_ms` (25 ms)              |
| CreateMultiple / UpdateMultiple / UpsertMultiple | `bulk_ms` (10 ms) + `bulk_record_ms` per record (12 ms) |
| `$batch`                                    | the sum of its parts            |

Each `$batch` and each bulk call counts as one request.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from devkit.sandbox.dataverse.errors import CONCURRENCY, EXECUTION_TIME, TOO_MANY_REQUESTS


@dataclass(frozen=True)
class CostModel:
    """Milliseconds of execution time charged per operation (see the module docstring)."""

    read_ms: float = 5.0
    row_ms: float = 0.05
    metadata_ms: float = 10.0
    write_ms: float = 25.0
    bulk_ms: float = 10.0
    bulk_record_ms: float = 12.0


@dataclass(frozen=True)
class ServiceProtectionLimits:
    """Dataverse's default limits per user; benchmarks shrink `window_s` and the budgets."""

    requests: int = 6000
    window_s: float = 300.0
    execution_ms: float = 1_200_000.0
    concurrent: int = 52
    costs: CostModel = field(default_factory=CostModel)


@dataclass(frozen=True)
class Rejection:
    """Why a request is refused: Dataverse error code, message and seconds until a retry may succeed."""

    code: str
    message: str
    retry_after_s: int


class _UserWindow:
    __slots__ = ("cost_total", "costs", "in_flight", "requests")

    def __init__(self) -> None:
        self.requests: deque[float] = deque()
        self.costs: deque[tuple[float, float]] = deque()
        self.cost_total = 0.0
        self.in_flight = 0


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


class Limiter:
    """Tracks each user's window; `admit` before a request, `finish` after it."""

    def __init__(self, limits: ServiceProtectionLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._users: dict[str, _UserWindow] = {}

    def _window(self, user: str, now: float) -> _UserWindow:
        window = self._users.get(user)
        if window is None:
            window = self._users[user] = _UserWindow()
        start = now - self.limits.window_s
        while window.requests and window.requests[0] <= start:
            window.requests.popleft()
        while window.costs and window.costs[0][0] <= start:
            window.cost_total -= window.costs.popleft()[1]
        if not window.costs:
            window.cost_total = 0.0
        return window

    def admit(self, user: str) -> Rejection | None:
        """Refuse the request (a `Rejection`) or count it as started (None)."""
        now = self._clock()
        limits = self.limits
        window = self._window(user, now)
        if window.in_flight >= limits.concurrent:
            return Rejection(
                CONCURRENCY, f"Number of concurrent requests exceeded the limit of {limits.concurrent}.", 1
            )
        if len(window.requests) >= limits.requests:
            # The request that must leave the window before one more fits.
            leaving = window.requests[len(window.requests) - limits.requests]
            return Rejection(
                TOO_MANY_REQUESTS,
                f"Number of requests exceeded the limit of {limits.requests} over time window of "
                f"{_seconds(limits.window_s)} seconds.",
                self._retry_after(leaving, now),
            )
        if window.cost_total > limits.execution_ms:
            excess = window.cost_total - limits.execution_ms
            leaving_at = window.costs[-1][0]
            for stamp, cost in window.costs:
                excess -= cost
                if excess < 0:
                    leaving_at = stamp
                    break
            return Rejection(
                EXECUTION_TIME,
                f"Combined execution time of incoming requests exceeded limit of {limits.execution_ms:,.0f} "
                f"milliseconds over time window of {_seconds(limits.window_s)} seconds. Decrease number of "
                "concurrent requests or reduce the duration of requests and try again later.",
                self._retry_after(leaving_at, now),
            )
        window.requests.append(now)
        window.in_flight += 1
        return None

    def _retry_after(self, stamp: float, now: float) -> int:
        return max(1, math.ceil(stamp + self.limits.window_s - now))

    def finish(self, user: str, cost_ms: float) -> None:
        """Charge a finished (admitted) request's execution time."""
        now = self._clock()
        window = self._window(user, now)
        window.in_flight = max(0, window.in_flight - 1)
        if cost_ms > 0:
            window.costs.append((now, cost_ms))
            window.cost_total += cost_ms

    def remaining(self, user: str) -> tuple[int, float]:
        """(requests left, execution seconds left) in the user's current window."""
        window = self._window(user, self._clock())
        requests_left = max(0, self.limits.requests - len(window.requests))
        seconds_left = max(0.0, self.limits.execution_ms - window.cost_total) / 1000.0
        return requests_left, seconds_left

    def headers(self, user: str) -> dict[str, str]:
        """The debug headers Dataverse puts on every response (`1,199.46` seconds, as observed)."""
        requests_left, seconds_left = self.remaining(user)
        return {
            "x-ms-ratelimit-burst-remaining-xrm-requests": str(requests_left),
            "x-ms-ratelimit-time-remaining-xrm-requests": f"{seconds_left:,.2f}",
        }
