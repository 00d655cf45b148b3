"""The platform around the engine, in virtual time: Storage queues, Table storage, the Functions host.

Everything the real engine and worker call goes through here, so each call is an await where
the seeded scheduler may switch tasks or kill the process (devkit/sim/loop.py):

- `SimQueue`: an Azure Storage queue. At-least-once: a received message is leased (invisible)
  for the lease time and comes back when it runs out; each receive counts a dequeue; deleting or
  updating needs the receipt of the latest lease; a message sent with a delay is invisible
  until then. No ordering promise beyond "roughly first in, first out".
- `Stores`: the sync state, dead letters and control documents of `loyaltysync.state`'s
  in-memory stores (the same ETag and size rules as Table Storage), each call an await before
  and after the change, so a process can die with its write landed but unanswered.
- `FunctionHost`: one function-app instance's queue listeners, as the storage queue extension
  runs them (devkit/devhost/queues.py is the same logic against Azurite): batches of
  `batchSize`, at most `batchSize + newBatchThreshold` at once, a 10-minute lease renewed at
  half-time, a failure visible again after `visibilityTimeout`, the attempt reaching
  `maxDequeueCount` moved to `<queue>-poison`, whose trigger drains it.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from devkit.devhost.host_json import QueueOptions
from devkit.sim.loop import CRASH_POINT, PROCESS, VirtualLoop
from loyaltysync import worker
from loyaltysync.host_limits import intent_horizon_seconds
from loyaltysync.runtime import Runtime
from loyaltysync.settings import Settings
from loyaltysync.state import (
    ControlStore,
    DeadLetter,
    DeadLetterStore,
    MemoryControlStore,
    MemoryDeadLetterStore,
    MemoryStateStore,
    StateStore,
    SyncRecord,
)
from loyaltysync.sync import Engine, Outcome
from loyaltysync.targets.dataverse import DataverseClient
from loyaltysync.targets.fno import FnoClient
from loyaltysync.targets.lookups import LookupCache
from loyaltysync.templates import Template

LEASE_S = 600.0  # the queue extension's receive visibility, renewed at half-time while a function runs
POISON_SUFFIX = "-poison"
T = TypeVar("T")


class ReceiptMismatch(LookupError):
    """Delete/update with the receipt of an older lease: the message was received again since (404 in Azure)."""


@dataclass(slots=True)
class _Stored:
    id: str
    body: str
    inserted: float
    visible_at: float
    dequeue_count: int = 0
    receipt: str | None = None


@dataclass(frozen=True, slots=True)
class Received:
    id: str
    body: str
    dequeue_count: int
    receipt: str


class SimQueue:
    """One Azure Storage queue in virtual time (see the module docstring)."""

    def __init__(self, name: str, now: Callable[[], float]) -> None:
        self.name = name
        self._now = now
        self._messages: dict[str, _Stored] = {}
        self._visible: list[tuple[float, int, str]] = []  # heap of (visible at, sequence, id); stale entries skipped
        self._sequence = itertools.count()
        self._receipts = itertools.count(1)
        self._waiters: list[asyncio.Future[None]] = []
        self.sent = 0

    def __len__(self) -> int:
        return len(self._messages)

    def send(self, body: str, delay_s: float = 0.0) -> None:
        message_id = f"{self.name}:{next(self._sequence)}"
        now = self._now()
        stored = _Stored(message_id, body, now, now + max(0.0, delay_s))
        self._messages[message_id] = stored
        self._hide(stored, stored.visible_at)
        self.sent += 1

    def receive(self, count: int, lease_s: float) -> list[Received]:
        now, found = self._now(), list[Received]()
        while self._visible and len(found) < count and self._visible[0][0] <= now:
            visible_at, _, message_id = heapq.heappop(self._visible)
            stored = self._messages.get(message_id)
            if stored is None or stored.visible_at != visible_at:
                continue  # deleted, or its visibility changed since this entry
            stored.dequeue_count += 1
            stored.receipt = f"r{next(self._receipts)}"
            self._hide(stored, now + lease_s)
            found.append(Received(stored.id, stored.body, stored.dequeue_count, stored.receipt))
        return found

    def delete(self, message_id: str, receipt: str) -> None:
        self._leased(message_id, receipt)
        del self._messages[message_id]

    def update(self, message_id: str, receipt: str, visibility_s: float) -> str:
        stored = self._leased(message_id, receipt)
        stored.receipt = f"r{next(self._receipts)}"
        self._hide(stored, self._now() + visibility_s)
        return stored.receipt

    def next_visible(self) -> float | None:
        """When the earliest message becomes visible (None: the queue is empty)."""
        while self._visible:
            visible_at, _, message_id = self._visible[0]
            stored = self._messages.get(message_id)
            if stored is not None and stored.visible_at == visible_at:
                return visible_at
            heapq.heappop(self._visible)
        return None

    async def changed(self, polling_s: float) -> None:
        """Return once a message may be visible: at the earliest visibility time, or when one is sent.

        What polling every `polling_s` finds, without waking up for nothing (an idle listener would
        otherwise cost more steps than the whole workload): a message is seen within one polling
        interval of becoming visible.
        """
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        when = self.next_visible()
        timer = None
        if when is not None:
            delay = max(0.0, when - self._now()) + polling_s
            timer = loop.call_later(delay, _wake, waiter)
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()

    def _leased(self, message_id: str, receipt: str) -> _Stored:
        stored = self._messages.get(message_id)
        if stored is None or stored.receipt != receipt:
            raise ReceiptMismatch(f"{self.name}: message {message_id} is not leased with receipt {receipt}")
        return stored

    def _hide(self, stored: _Stored, until: float) -> None:
        stored.visible_at = until
        heapq.heappush(self._visible, (until, next(self._sequence), stored.id))
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                _wake(waiter)


def _recycle(process: str | None) -> None:
    loop = asyncio.get_running_loop()
    if process is not None and isinstance(loop, VirtualLoop):
        loop.kill(process)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Latency:
    """A virtual pause drawn from the simulation's generator.

    Every platform call yields before it (another task may run first) and pauses after it (the
    call takes time; a process killed there has its write landed and its answer lost). One timed
    pause per call, not two: timers are what a simulated second costs.
    """

    def __init__(self, rng: random.Random, low_s: float = 0.002, high_s: float = 0.02) -> None:
        self._rng = rng
        self.low_s, self.high_s = low_s, high_s

    async def __call__(self) -> None:
        await asyncio.sleep(self._rng.uniform(self.low_s, self.high_s))

    async def around(self, work: Callable[[], Awaitable[T]]) -> T:
        await asyncio.sleep(0)
        result = await work()
        await self()
        return result


class SimStateStore:
    """`MemoryStateStore` with a latency await before and after each call."""

    def __init__(self, inner: MemoryStateStore, latency: Latency) -> None:
        self.inner, self._latency = inner, latency

    async def get(self, template: str, key: str) -> SyncRecord | None:
        return await self._latency.around(lambda: self.inner.get(template, key))

    async def put(self, record: SyncRecord) -> SyncRecord:
        return await self._latency.around(lambda: self.inner.put(record))

    async def put_many(self, records: Sequence[SyncRecord]) -> int:
        return await self._latency.around(lambda: self.inner.put_many(records))

    async def delete(self, record: SyncRecord) -> None:
        await self._latency.around(lambda: self.inner.delete(record))

    async def list(self, template: str) -> AsyncIterator[SyncRecord]:
        await self._latency()
        async for record in self.inner.list(template):
            yield record

    async def count(self, template: str) -> int:
        return await self._latency.around(lambda: self.inner.count(template))

    async def find_by_row_id(self, template: str, row_id: str) -> SyncRecord | None:
        return await self._latency.around(lambda: self.inner.find_by_row_id(template, row_id))

    async def close(self) -> None:
        return None


class SimDeadLetters:
    """`MemoryDeadLetterStore` with a latency await before and after each call."""

    def __init__(self, inner: MemoryDeadLetterStore, latency: Latency) -> None:
        self.inner, self._latency = inner, latency

    async def park(
        self, template: str, side: Any, key: str, reason: str, error_code: str, payload: str, event_id: str
    ) -> DeadLetter:
        return await self._latency.around(
            lambda: self.inner.park(template, side, key, reason, error_code, payload, event_id)
        )

    async def list(self, template: str | None = None) -> list[DeadLetter]:
        return await self._latency.around(lambda: self.inner.list(template))

    async def get(self, id: str) -> DeadLetter | None:
        return await self._latency.around(lambda: self.inner.get(id))

    async def remove(self, id: str) -> bool:
        return await self._latency.around(lambda: self.inner.remove(id))

    async def count(self, template: str | None = None) -> int:
        return await self._latency.around(lambda: self.inner.count(template))

    async def close(self) -> None:
        return None


class SimControl:
    """`MemoryControlStore` with a latency await before and after each call."""

    def __init__(self, inner: MemoryControlStore, latency: Latency) -> None:
        self.inner, self._latency = inner, latency

    async def get(self, scope: str, name: str) -> dict[str, Any] | None:
        return await self._latency.around(lambda: self.inner.get(scope, name))

    async def set(self, scope: str, name: str, value: dict[str, Any]) -> None:
        await self._latency.around(lambda: self.inner.set(scope, name, value))

    async def list(self, scope: str) -> dict[str, dict[str, Any]]:
        return await self._latency.around(lambda: self.inner.list(scope))

    async def close(self) -> None:
        return None


@dataclass
class Stores:
    """The storage account every instance shares: tables and queues."""

    state: MemoryStateStore
    dead_letters: MemoryDeadLetterStore
    control: MemoryControlStore
    queues: dict[str, SimQueue]


@dataclass
class SimRuntime(Runtime):
    """The worker's Runtime with its queue sends going to the simulation's queues (after a latency await)."""

    sim_queues: dict[str, SimQueue] = field(default_factory=dict)
    latency: Latency | None = None

    async def enqueue(self, template: str, message: str, *, delay_s: int = 0) -> None:
        queue = self.sim_queues[self.settings.queue_name(template)]
        if self.latency is not None:
            await self.latency()
        queue.send(message, delay_s)
        if self.latency is not None:
            await self.latency()

    async def aclose(self) -> None:
        return None


def build_runtime(
    settings: Settings,
    templates: dict[str, Template],
    fno: object,
    dataverse: object,
    stores: Stores,
    latency: Latency,
    function_timeout_s: float,
) -> SimRuntime:
    """One instance's runtime: its own engine (locks, instance id), lookup cache and caches; shared storage."""
    fno_client, dv_client = cast(FnoClient, fno), cast(DataverseClient, dataverse)
    state = cast(StateStore, SimStateStore(stores.state, latency))
    engine = Engine(
        templates, fno_client, dv_client, LookupCache(dv_client), state, integration_users=settings.integration_users,
        writing_elsewhere_s=intent_horizon_seconds(function_timeout_s),
        events_held_s=settings.conflict_grace_seconds + settings.queue_lease_seconds,
    )
    return SimRuntime(
        settings=settings,
        templates=templates,
        engine=engine,
        fno=fno_client,
        dataverse=dv_client,
        state=state,
        dead_letters=cast(DeadLetterStore, SimDeadLetters(stores.dead_letters, latency)),
        control=cast(ControlStore, SimControl(stores.control, latency)),
        queues=cast(Any, None),
        _storage=cast(Any, None),
        _credentials=[],
        function_timeout_s=function_timeout_s,
        sim_queues=stores.queues,
        latency=latency,
    )


Finished = Callable[[str, str, "Outcome | None", "BaseException | None", float], None]
"""Told (queue name, message body, outcome or None, the exception or None, virtual time) after each invocation."""


class FunctionHost:
    """One function-app instance: the worker and poison triggers of every template's queue."""

    def __init__(
        self,
        runtime: SimRuntime,
        options: QueueOptions,
        latency: Latency,
        finished: Finished,
        function_timeout_s: float,
    ) -> None:
        self.runtime = runtime
        self.options = options
        self.latency = latency
        self.finished = finished
        self.function_timeout_s = function_timeout_s
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start the listeners (call inside the instance's process context)."""
        for template in self.runtime.templates.values():
            name = self.runtime.settings.queue_name(template.name)
            self.tasks.append(asyncio.create_task(self._listen(name, poison=False)))
            self.tasks.append(asyncio.create_task(self._listen(name + POISON_SUFFIX, poison=True)))

    async def _listen(self, name: str, *, poison: bool) -> None:
        queue = self.runtime.sim_queues[name]
        running: set[asyncio.Task[None]] = set()
        while True:
            if len(running) > self.options.new_batch_threshold:
                await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                continue
            await self.latency()
            batch = queue.receive(self.options.batch_size, LEASE_S)
            await self.latency()
            if not batch:
                await queue.changed(self.options.max_polling_interval)
                continue
            for message in batch:
                context = contextvars.copy_context()
                context.run(CRASH_POINT.set, True)
                task = asyncio.get_running_loop().create_task(self._run(queue, message, poison=poison), context=context)
                running.add(task)
                task.add_done_callback(running.discard)

    async def _run(self, queue: SimQueue, message: Received, *, poison: bool) -> None:
        loop = asyncio.get_running_loop()
        limit = self.options.max_dequeue_count
        if message.dequeue_count > limit:
            await self._to_poison(queue, message, message.receipt)
            return
        lease = [message.receipt]

        def renew() -> None:  # the extension renews the lease at half-time while the function runs
            try:
                lease[0] = queue.update(message.id, lease[0], LEASE_S)
            except ReceiptMismatch:
                return
            timer[0] = loop.call_later(LEASE_S / 2, renew)

        timer = [loop.call_later(LEASE_S / 2, renew)]
        # functionTimeout: the host recycles the worker process of an invocation that runs longer.
        process = PROCESS.get()
        deadline = loop.call_later(self.function_timeout_s, _recycle, process)
        outcome: Outcome | None = None
        failure: BaseException | None = None
        try:
            if poison:
                await worker.drain_poison(self.runtime, message.body, dequeue_count=message.dequeue_count,
                                          max_dequeue=limit)
            else:
                outcome = await worker.handle_change(self.runtime, message.body,
                                                     dequeue_count=message.dequeue_count, max_dequeue=limit)
        except Exception as exc:  # the host logs it; the dequeue count decides what happens next
            failure = exc
        finally:
            timer[0].cancel()
            deadline.cancel()
        self.finished(queue.name, message.body, outcome, failure, loop.time())
        await self.latency()
        try:
            if failure is None:
                queue.delete(message.id, lease[0])
            elif message.dequeue_count >= limit and not poison:
                await self._to_poison(queue, message, lease[0])
            else:
                queue.update(message.id, lease[0], self.options.visibility_timeout)
        except ReceiptMismatch:
            pass  # the lease ran out and another instance has it now: as in Azure, that one settles it
        await self.latency()

    async def _to_poison(self, queue: SimQueue, message: Received, receipt: str) -> None:
        await self.latency()
        self.runtime.sim_queues[queue.name + POISON_SUFFIX].send(message.body)
        await self.latency()
        try:
            queue.delete(message.id, receipt)
        except ReceiptMismatch:
            pass
