"""Adaptive rate control for writers: how many requests may be in flight, and when to hold off entirely.

Dataverse's service protection (wire-formats 1.9) and F&O's throttling (2.3)
answer 429 with `Retry-After` once a budget is spent; they publish no rate to
aim for (the `x-ms-ratelimit-*` headers are debug-only and must not be used
for pacing). So the only honest signals are the answers themselves, and the
controller is AIMD, as TCP congestion control is:

- it starts moderate: one request first (a probe), then `initial` in flight;
- while answers come back fast (latency within `slow_factor` of the best
  recently seen) and unthrottled, it adds about one request in flight per
  round trip (additive increase, `+increase / limit` per success); when
  answers slow down (the service is saturated), it takes as much back;
- on 429 (or 503 with `Retry-After`) it halves the limit (multiplicative
  decrease) and holds every writer until `Retry-After` has passed, so the
  requests already on their way are the only ones that can still be refused.
  Further 429s before the pause ends and the first round trip after it count
  as the same congestion event, so one burst of refusals halves only once.
  After a pause one request goes alone again: if the budget is still short,
  one refusal is all it costs;
- other server errors (5xx, connection failures) shrink the limit gently.

Sliding-window budgets (Dataverse's) refill in two ways, and the pause says which:
a long `Retry-After` means the window is full of earlier work that leaves in bulk later,
so after the pause the writers may go at full speed again; a short one (at most
`frontier_pause`) means the budget refills as fast as old work leaves the window, so
going at full speed only trips again a moment later. Then the controller also paces
request starts at the rate the last cycle got through (successes over its active time
plus the pause), growing it slowly (`pace_increase` per success) to find more room.

`AimdState` is the pure rule set (times are passed in); `RateController` is
the async gate writers take a slot from, fed by `TargetHttp` observer and
throttle hooks (`attach`). A bulk writer also takes 429s away from
`TargetHttp`'s own retry (`owning_throttling`): otherwise every refused
request would sleep `Retry-After` inside its slot and retry at the same
instant, ignoring the halved limit; instead the refused chunk goes back
through the gate once the pause is over.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace

from loyaltysync.targets.http import Attempt, TargetHttp

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class RateSettings:
    """Tuning of one controller. Defaults suit bulk requests against Dataverse and F&O."""

    initial: float = 4.0
    minimum: float = 1.0
    maximum: float = 32.0
    increase: float = 1.0  # requests in flight added per round trip of fast answers
    decrease: float = 0.5  # factor applied on throttling
    error_decrease: float = 0.8  # factor applied on other server errors
    slow_factor: float = 2.0  # slower than this many times the recent best latency is "not fast"
    latency_samples: int = 64  # the recent best latency is the minimum over this many answers
    default_pause: float = 1.0  # seconds to hold when a 429 names no Retry-After
    frontier_pause: float = 5.0  # a Retry-After this short means the budget refills as we go: pace
    pace_increase: float = 0.005  # the pacing rate grows by this fraction per success

    def __post_init__(self) -> None:
        if not 1 <= self.minimum <= self.initial <= self.maximum:
            raise ValueError("need 1 <= minimum <= initial <= maximum")
        if not 0 < self.decrease < 1 or not 0 < self.error_decrease <= 1:
            raise ValueError("decrease factors must be in (0, 1)")


@dataclass(slots=True)
class AimdState:
    """The controller's rules, pure: feed it answers with their time, read `allowed` and `pause_left`."""

    settings: RateSettings = field(default_factory=RateSettings)
    limit: float = 0.0
    paused_until: float = 0.0
    probing: bool = True  # one request at a time until an answer comes (at the start, after a pause)
    rate: float | None = None  # request starts per second while pacing, None when not
    _hold_until: float = 0.0  # congestion-event window: no second decrease before this
    _latencies: deque[float] = field(default_factory=deque)
    _cycle_start: float | None = None  # when the current run of unthrottled requests began
    _cycle_successes: int = 0
    _next_start: float = 0.0

    def __post_init__(self) -> None:
        self.limit = self.limit or self.settings.initial

    @property
    def allowed(self) -> int:
        """Requests that may be in flight now (at least 1)."""
        return 1 if self.probing else max(1, math.floor(self.limit))

    @property
    def best_latency(self) -> float | None:
        """The fastest answer among the recent ones (the service's unloaded speed), None before any."""
        return min(self._latencies) if self._latencies else None

    def pause_left(self, now: float) -> float:
        """Seconds every writer must still wait (0 when not paused)."""
        return max(0.0, self.paused_until - now)

    def start_delay(self, now: float) -> float:
        """Seconds until the next request may start: the pause, or the pacing interval while pacing."""
        wait = self.pause_left(now)
        if self.rate is not None:
            wait = max(wait, self._next_start - now)
        return wait

    def started(self, now: float) -> None:
        """A request starts now (spaces the next one while pacing)."""
        if self.rate is not None:
            self._next_start = max(now, self._next_start) + 1.0 / self.rate

    def on_success(self, latency: float, now: float) -> None:
        """A 2xx answer after `latency` seconds: grow while fast, shrink a little while slow."""
        s = self.settings
        self._latencies.append(latency)
        if len(self._latencies) > s.latency_samples:
            self._latencies.popleft()
        if now >= self.paused_until:
            self.probing = False  # the probe got through: open up to the limit
            self._cycle_successes += 1
            if self._cycle_start is None:
                self._cycle_start = now - latency
            if self.rate is not None:
                self.rate *= 1.0 + s.pace_increase
        if now < self._hold_until:
            return  # answers to requests sent before the congestion event say nothing new
        best = min(self._latencies)
        step = s.increase / max(self.limit, 1.0)
        if latency <= s.slow_factor * best:
            self.limit = min(s.maximum, self.limit + step)
        else:
            self.limit = max(s.minimum, self.limit - step)

    def on_throttle(self, retry_after: float | None, now: float) -> None:
        """429 (or 503 with Retry-After): halve once per congestion event and hold everyone off."""
        s = self.settings
        wait = s.default_pause if retry_after is None else max(0.0, retry_after)
        self.paused_until = max(self.paused_until, now + wait)
        self.probing = True
        if now >= self._hold_until:
            self.limit = max(s.minimum, self.limit * s.decrease)
            if wait > s.frontier_pause:
                self.rate = None  # the budget comes back in bulk after a long pause
            elif self._cycle_successes and self._cycle_start is not None:
                self.rate = self._cycle_successes / max(1e-3, now - self._cycle_start + wait)
            self._cycle_successes, self._cycle_start = 0, self.paused_until
        # Requests already sent may still be refused up to one round trip after the pause ends.
        self._hold_until = max(self._hold_until, self.paused_until + (self.best_latency or 0.0))

    def on_error(self, now: float) -> None:
        """A server error or an unreachable service: shrink gently, once per congestion event."""
        if now < self._hold_until:
            return
        self.limit = max(self.settings.minimum, self.limit * self.settings.error_decrease)
        self._hold_until = now + (self.best_latency or 0.0)


def counts_writes(attempt: Attempt) -> bool:
    """The default: only writes (anything but GET/HEAD) teach the controller about latency."""
    return attempt.method not in ("GET", "HEAD")


@dataclass(slots=True)
class RateStats:
    """What one controller saw: attempts, 429s, other failures."""

    requests: int = 0
    throttled: int = 0
    errors: int = 0

    @property
    def throttled_share(self) -> float:
        return self.throttled / self.requests if self.requests else 0.0


class RateController:
    """The async gate of one writer (or several sharing a target): `async with controller.slot(): ...`."""

    def __init__(
        self,
        settings: RateSettings | None = None,
        *,
        name: str = "",
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        counts: Callable[[Attempt], bool] = counts_writes,
    ) -> None:
        self.name = name
        self.state = AimdState(settings or RateSettings())
        self.stats = RateStats()
        self.in_flight = 0
        self.peak = 0
        self._clock = clock
        self._sleep = sleep
        self._counts = counts
        self._changed: asyncio.Event | None = None

    def attach(self, http: TargetHttp) -> RateController:
        """Learn from every attempt `http` makes (observer) and every throttled one (throttle hook)."""
        http.add_observer(self.observe)
        http.add_throttle_hook(self.throttled)
        return self

    # -- hooks (synchronous: TargetHttp calls them inline) -------------------------------------

    def observe(self, attempt: Attempt) -> None:
        """One attempt finished: count it; successes and failures adjust the limit."""
        self.stats.requests += 1
        now = self._clock()
        if attempt.status == 429:
            self.stats.throttled += 1
            # The throttle hook may report the same refusal: one congestion event, counted once.
            self.state.on_throttle(attempt.retry_after, now)
        elif 200 <= attempt.status < 300:
            if self._counts(attempt):
                self.state.on_success(attempt.elapsed, now)
        elif attempt.status == 0 or (attempt.status >= 500 and attempt.retry_after is None):
            self.stats.errors += 1
            self.state.on_error(now)
        self._wake()

    def throttled(self, status: int, retry_after: float | None) -> None:
        """TargetHttp is about to retry: 429 / Retry-After pauses everyone; other statuses shrink the limit."""
        if status == 429 or retry_after is not None:
            self.state.on_throttle(retry_after, self._clock())
        self._wake()

    @contextmanager
    def owning_throttling(self, http: TargetHttp) -> Iterator[None]:
        """While inside, `http` does not retry 429 itself: the refusal reaches the writer, which waits for
        this controller's pause and goes through the gate again (restored on exit)."""
        saved = http.retry
        http.retry = replace(saved, retry_statuses=saved.retry_statuses - {429})
        try:
            yield
        finally:
            http.retry = saved

    def hold(self, seconds: float) -> None:
        """Pause every writer for `seconds` (a writer saw a throttled request fail for good)."""
        self.state.on_throttle(seconds, self._clock())
        self._wake()

    # -- the gate --------------------------------------------------------------------------------

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait for the pause to end and for room under the limit; hold one slot while inside."""
        await self._acquire()
        try:
            yield
        finally:
            self.in_flight -= 1
            self._wake()

    async def _acquire(self) -> None:
        while True:
            wait = self.state.start_delay(self._clock())
            if wait > 0:
                await self._sleep(wait)
                continue
            if self.in_flight < self.state.allowed:
                self.in_flight += 1
                self.peak = max(self.peak, self.in_flight)
                self.state.started(self._clock())
                return
            changed = self._event()
            changed.clear()
            await changed.wait()

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def describe(self) -> str:
        """One line for logs and summaries."""
        s = self.stats
        return (
            f"{self.name or 'writer'}: {s.requests} requests, {s.throttled} throttled "
            f"({s.throttled_share:.1%}), limit {self.state.limit:.1f}, peak in flight {self.peak}"
            + (f", pacing {self.state.rate:.2f} requests/s" if self.state.rate is not None else "")
        )
