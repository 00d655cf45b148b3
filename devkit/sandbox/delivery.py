"""Outgoing event deliveries (Dataverse webhooks, F&O data events), sent after the writer got its answer.

`submit` never waits: it applies the delivery faults (drop, duplicate, delay)
and queues the item. One background task per `Delivery`, started lazily on
the running loop at the first submit, sends ready items, up to
`max_in_flight` at once (Dataverse's asynchronous service and F&O's event
dispatch both deliver in parallel, so deliveries overlap and may finish out
of order); a retry goes back in the queue with its pause as a delay, so a
failing endpoint does not hold up the others. Waiting items sit in a heap ordered by
(not before, submission order), so picking the next one costs O(log n) even
with tens of thousands waiting. With `delivery_reorder`, the task picks at
random among the items that are ready together instead of the oldest.
Items that exhaust their retries land in `failed` with the last error, and
can be sent again with `resend`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    import random

    from devkit.sandbox.common import Counters, Faults

MAX_FAILED = 10_000
MAX_IN_FLIGHT = 8  # deliveries sent at once by one emulator
_GATEWAY = frozenset({502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """How a service retries one delivery.

    attempts: total tries, first included. retry_on: statuses worth another
    try; None means any non-2xx. A connection error or timeout counts as a
    gateway failure: retried when retry_on is None or holds 502/503/504.
    """

    attempts: int
    pause_s: float
    retry_on: frozenset[int] | None
    timeout_s: float

    def retries(self, status: int | None) -> bool:
        """Whether a failed try with this status (None: no response) is worth another try."""
        if self.retry_on is None:
            return True
        if status is None:
            return bool(self.retry_on & _GATEWAY)
        return status in self.retry_on


# Dataverse: 60 s timeout, one retry on 502/503/504.
DATAVERSE_WEBHOOK_RETRY = RetryPolicy(attempts=2, pause_s=0.0, retry_on=frozenset({502, 503, 504}), timeout_s=60)
# F&O data events: 1 + three retries, 1 s apart.
FNO_EVENT_RETRY = RetryPolicy(attempts=4, pause_s=1.0, retry_on=None, timeout_s=60)


@dataclass
class Outgoing:
    """One POST to send. `attempts` and `last_error` are filled in as it is tried."""

    id: str
    url: str
    headers: dict[str, str]
    body: bytes
    policy: RetryPolicy
    description: str = ""
    attempts: int = 0
    last_error: str | None = None


def _default_client() -> httpx.AsyncClient:
    return httpx.AsyncClient()


class Delivery:
    """The delivery queue of one emulator. Counts into `counters`, draws faults from `faults` with `rng`."""

    def __init__(
        self,
        faults: Faults,
        counters: Counters,
        rng: random.Random,
        client_factory: Callable[[], httpx.AsyncClient] = _default_client,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self.faults = faults
        self.max_in_flight = max_in_flight
        self.counters = counters
        self.rng = rng
        self.client_factory = client_factory
        self.failed: list[Outgoing] = []
        self._waiting: list[tuple[float, int, Outgoing]] = []  # heap of (not before, sequence, item)
        self._sequence = itertools.count()
        self._in_flight = 0
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: httpx.AsyncClient | None = None
        self._wakeup: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._sending: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        """Items waiting or being sent."""
        return len(self._waiting) + self._in_flight

    def submit(self, item: Outgoing) -> None:
        """Queue one delivery without waiting, after the drop / duplicate / delay faults.

        Must be called on the running event loop (from a request handler).
        """
        faults = self.faults
        if faults.delivery_drop_rate and self.rng.random() < faults.delivery_drop_rate:
            self.counters.deliveries_dropped += 1
            return
        copies = 1
        if faults.delivery_duplicate_rate and self.rng.random() < faults.delivery_duplicate_rate:
            self.counters.deliveries_duplicated += 1
            copies = 2
        for copy in range(copies):
            queued = item if copy == 0 else Outgoing(item.id, item.url, dict(item.headers), item.body, item.policy,
                                                     item.description)
            delay = self.rng.uniform(0, faults.delivery_delay_ms) / 1000 if faults.delivery_delay_ms else 0.0
            self._enqueue(queued, delay)

    async def drain(self, timeout_s: float = 30) -> None:
        """Wait until nothing is pending. Raises TimeoutError after `timeout_s`."""
        if self.pending == 0:
            return
        self._ensure_worker()
        assert self._idle is not None  # noqa: S101 - set by _ensure_worker
        async with asyncio.timeout(timeout_s):
            while self.pending:
                await self._idle.wait()

    async def resend(self, ids: list[str] | None = None) -> int:
        """Queue failed items again (all, or those with these ids) with fresh attempts; returns how many."""
        chosen = [item for item in self.failed if ids is None or item.id in ids]
        self.failed = [item for item in self.failed if not (ids is None or item.id in ids)]
        for item in chosen:
            item.attempts = 0
            item.last_error = None
            self._enqueue(item, 0.0)
        return len(chosen)

    async def aclose(self) -> None:
        """Stop the background task and close the HTTP client. Pending items are kept."""
        task, self._task = self._task, None
        sending, self._sending = list(self._sending), set()
        for running in [task, *sending]:
            if running is not None and not running.done():
                running.cancel()
                try:
                    await running
                except asyncio.CancelledError:
                    pass
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- internals --------------------------------------------------------------

    def _enqueue(self, item: Outgoing, delay_s: float) -> None:
        self._ensure_worker()
        assert self._loop is not None and self._wakeup is not None and self._idle is not None  # noqa: S101
        heapq.heappush(self._waiting, (self._loop.time() + delay_s, next(self._sequence), item))
        self._idle.clear()
        self._wakeup.set()

    def _ensure_worker(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # First use, or a new event loop (tests): the old client and events belong to the old loop.
            self._loop = loop
            self._client = None
            self._task = None
            self._wakeup = asyncio.Event()
            self._idle = asyncio.Event()
            self._slots = asyncio.Semaphore(self.max_in_flight)
            self._sending = set()
            self._in_flight = 0
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(), name="sandbox-delivery")

    async def _run(self) -> None:
        assert self._loop is not None and self._wakeup is not None and self._idle is not None  # noqa: S101
        assert self._slots is not None  # noqa: S101 - set by _ensure_worker
        loop, wakeup, idle, slots = self._loop, self._wakeup, self._idle, self._slots
        while True:
            if not self._waiting:
                if self._in_flight == 0:
                    idle.set()
                wakeup.clear()
                await wakeup.wait()
                continue
            now = loop.time()
            soonest = self._waiting[0][0]
            if soonest > now:
                wakeup.clear()
                try:
                    async with asyncio.timeout(soonest - now):
                        await wakeup.wait()
                except TimeoutError:
                    pass
                continue
            entry = heapq.heappop(self._waiting)
            if self.faults.delivery_reorder and self._waiting and self._waiting[0][0] <= now:
                # Every item ready now, oldest first (so a seeded choice is reproducible); one is picked.
                ready = [entry]
                while self._waiting and self._waiting[0][0] <= now:
                    ready.append(heapq.heappop(self._waiting))
                entry = ready.pop(self.rng.randrange(len(ready)))
                for other in ready:
                    heapq.heappush(self._waiting, other)
            self._in_flight += 1
            await slots.acquire()
            task = loop.create_task(self._send(entry[2], slots, wakeup), name="sandbox-delivery-send")
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, item: Outgoing, slots: asyncio.Semaphore, wakeup: asyncio.Event) -> None:
        try:
            await self._attempt(item)
        finally:
            self._in_flight -= 1
            slots.release()
            wakeup.set()  # the loop decides whether everything is done

    async def _attempt(self, item: Outgoing) -> None:
        if self._client is None:
            self._client = self.client_factory()
        item.attempts += 1
        status: int | None = None
        try:
            response = await self._client.post(
                item.url, content=item.body, headers=item.headers, timeout=item.policy.timeout_s
            )
            status = response.status_code
            if 200 <= status < 300:
                self.counters.deliveries += 1
                return
            item.last_error = f"HTTP {status}: {response.text[:500]}"
        except httpx.HTTPError as exc:
            item.last_error = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # an in-process receiver's own bug must not kill the queue
            item.last_error = f"{type(exc).__name__}: {exc}"
        if item.attempts < item.policy.attempts and item.policy.retries(status):
            self._enqueue(item, item.policy.pause_s)
            return
        self.counters.delivery_failures += 1
        self.failed.append(item)
        del self.failed[:-MAX_FAILED]
