"""What goes wrong during a chaos run: emulator faults on a schedule, and worker crashes.

Emulator faults (PATCH /_admin/faults, applied by the emulators before their
handlers run, so a faulted request changed nothing):
- all the time: 500 and 503 answers, timeouts (a short hang, then 504),
  dropped connections (no response at all), and event deliveries dropped,
  duplicated, delayed and reordered;
- storms: a few seconds in which half of one emulator's requests get 429 with
  Retry-After;
- outages: a few seconds in which Dataverse answers 503 to everything.

Worker crashes, two kinds, both at the same four points of an invocation: on
receiving the message, right after a write to F&O or Dataverse (so between the
two writes of a two-sided decision, and between a target write and the
sync-state update), before the sync state is stored, and after the change was
applied but before the queue message is completed.

- In-process (`Crashes`, in the run's own dev host): the hook raises
  `WorkerCrash`, which the host treats as a failed invocation: the message is
  not deleted, stays invisible for the host.json `visibilityTimeout` (5 s) and
  is then delivered again with its dequeue count raised, and nothing after the
  crash point ran (no state written, no success recorded). Each message is
  crashed at most once, so these crashes alone can never push a message to the
  poison queue. Only that one invocation fails; the others go on.
- Real process kills (`Kills`, in a second function-app instance,
  tests/chaos/worker_process.py): the same hook calls `os._exit(137)`, so the
  process dies on the spot with every other invocation it had in flight, its
  HTTP connections and its unsent Storage calls. Nothing is released: each
  message it held stays invisible until its lease runs out (8 s in that
  process; the real host's lease is 10 minutes) and is then delivered again,
  to either instance, with its dequeue count raised. The run restarts the
  process after a short pause, as the Functions platform restarts a worker, and
  stops it before the final drain so the surviving instance settles the end
  state.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import random
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loyaltysync import worker
from loyaltysync.errors import TargetError
from loyaltysync.sync import Engine
from tests.chaos.harness import Admin

log = logging.getLogger("tests.chaos")

BACKGROUND = {
    "error_rate": 0.01,
    "unavailable_rate": 0.01,
    "timeout_rate": 0.004,
    "hang_s": 0.25,
    "drop_connection_rate": 0.008,
    "delivery_drop_rate": 0.02,
    "delivery_duplicate_rate": 0.05,
    "delivery_delay_ms": 400.0,
    "delivery_reorder": True,
}
QUIET = {
    "error_rate": 0.0,
    "unavailable_rate": 0.0,
    "timeout_rate": 0.0,
    "drop_connection_rate": 0.0,
    "throttle_rate": 0.0,
    "outage": False,
    "delivery_drop_rate": 0.0,
    "delivery_duplicate_rate": 0.0,
    "delivery_delay_ms": 0.0,
    "delivery_reorder": False,
}
STORM = {"throttle_rate": 0.5, "throttle_retry_after_s": 0.3}
STORM_SECONDS = 3.0
OUTAGE_SECONDS = 5.0


CRASH_POINTS = frozenset(("on-receive", "after-write", "before-state", "before-complete"))


KILL_EXIT_CODE = 137  # what a shell reports for a process killed by SIGKILL (128 + 9)
KILL_MARK = "chaos-kill:"


class WorkerCrash(Exception):
    """The invocation dies here, in-process (see the module docstring)."""


_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("chaos_event_id", default=None)


@dataclass
class Crashes:
    """Crashes the worker at random points; `install()` patches the worker, `uninstall()` restores it."""

    rng: random.Random
    probability: float = 0.01
    points: frozenset[str] = CRASH_POINTS
    counts: Counter[str] = field(default_factory=Counter)
    crashed: set[str] = field(default_factory=set)
    enabled: bool = True
    _saved: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def _maybe(self, point: str) -> None:
        event_id = _current.get()
        if not self.enabled or point not in self.points or event_id is None or event_id in self.crashed:
            return
        if self.rng.random() < self.probability:
            self.crashed.add(event_id)
            self.counts[point] += 1
            raise WorkerCrash(point)

    def install(self) -> None:
        handle_change = worker.handle_change
        write_fo, write_dataverse, record = Engine.write_fo, Engine.write_dataverse, Engine._record
        self._saved = {"handle_change": handle_change, "write_fo": write_fo,
                       "write_dataverse": write_dataverse, "_record": record}
        crashes = self

        async def crashing_handle_change(runtime: Any, body: str, *args: Any, **kwargs: Any) -> Any:
            token = _current.set(_event_id(body))
            try:
                crashes._maybe("on-receive")
                outcome = await handle_change(runtime, body, *args, **kwargs)
                crashes._maybe("before-complete")
                return outcome
            finally:
                _current.reset(token)

        def after(original: Callable[..., Awaitable[Any]], point: str) -> Callable[..., Awaitable[Any]]:
            async def crashing(self: Engine, *args: Any, **kwargs: Any) -> Any:
                result = await original(self, *args, **kwargs)
                crashes._maybe(point)
                return result

            return crashing

        async def crashing_record(self: Engine, *args: Any, **kwargs: Any) -> Any:
            crashes._maybe("before-state")
            return await record(self, *args, **kwargs)

        worker.handle_change = crashing_handle_change
        Engine.write_fo = after(write_fo, "after-write")  # type: ignore[method-assign,assignment]
        Engine.write_dataverse = after(write_dataverse, "after-write")  # type: ignore[method-assign,assignment]
        Engine._record = crashing_record  # type: ignore[method-assign]

    def uninstall(self) -> None:
        if not self._saved:
            return
        worker.handle_change = self._saved["handle_change"]
        Engine.write_fo = self._saved["write_fo"]  # type: ignore[method-assign]
        Engine.write_dataverse = self._saved["write_dataverse"]  # type: ignore[method-assign]
        Engine._record = self._saved["_record"]  # type: ignore[method-assign]
        self._saved = {}


@dataclass
class Kills(Crashes):
    """Kills this whole process at random points: `probability` is per invocation, not per point.

    On receiving a message the invocation draws whether it dies and, if so, at which of `points`;
    it then dies when (if ever) it reaches that point: "after-write" only fires in an invocation
    that writes. The line `chaos-kill: <point>` goes to stderr first, so the run can tell where.
    """

    _plans: dict[str, str | None] = field(default_factory=dict)

    def _maybe(self, point: str) -> None:
        event_id = _current.get()
        if not self.enabled or event_id is None:
            return
        if point == "on-receive":  # every invocation passes here first: draw its fate
            doomed = self.rng.random() < self.probability
            self._plans[event_id] = self.rng.choice(sorted(self.points)) if doomed and self.points else None
        if self._plans.get(event_id) == point:
            os.write(2, f"{KILL_MARK} {point} {event_id}\n".encode())
            os._exit(KILL_EXIT_CODE)  # no cleanup, no finally blocks, no flushing: as SIGKILL
        if point == "before-complete":
            self._plans.pop(event_id, None)


def _event_id(body: str) -> str | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    value = data.get("event_id") if isinstance(data, dict) else None
    return str(value) if value else None


def _where_it_stood(error: BaseException | None) -> str:
    """For an invocation the host ended at functionTimeout: the awaits it was stuck in (innermost last)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, asyncio.CancelledError):
            frames = traceback.extract_tb(error.__traceback__)[-8:]
            return " stuck at: " + " > ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames)
        error = error.__cause__ or error.__context__
    return ""


class FailureWatch(logging.Handler):
    """Collects the invocation failures the host logs that are neither a crash we caused nor a retry."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.unexpected: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, WorkerCrash) or (isinstance(error, TargetError) and error.transient):
            return
        detail = f"{type(error).__name__}: {error}" if error is not None else record.getMessage()
        self.found(f"{record.name}: {record.getMessage()[:200]} ({detail[:300]}){_where_it_stood(error)}")

    def found(self, line: str) -> None:
        self.unexpected.append(line)


@dataclass
class Schedule:
    """Storms and outages at fixed points of the run's progress (fractions of the operations played)."""

    storms: list[float]
    outages: list[float]
    played: list[str] = field(default_factory=list)

    @classmethod
    def for_operations(cls, operations: int) -> Schedule:
        if operations >= 10_000:
            return cls(storms=[0.08 * i for i in range(1, 12)], outages=[0.25, 0.5, 0.75])
        return cls(storms=[0.2, 0.55, 0.8], outages=[0.4])

    async def run(self, admin: Admin, progress: Callable[[], float], stop: asyncio.Event) -> None:
        """Fire each storm and outage when the run reaches it; return when `stop` is set."""
        events = sorted([(p, "storm") for p in self.storms] + [(p, "outage") for p in self.outages])
        sides = ["dataverse", "fo"]
        while events and not stop.is_set():
            at, kind = events[0]
            if progress() < at:
                await _sleep_or_stop(stop, 0.2)
                continue
            events.pop(0)
            started = time.monotonic()
            if kind == "storm":
                side = sides[len(self.played) % 2]
                await admin.faults(side, **STORM)
                await _sleep_or_stop(stop, STORM_SECONDS)
                await admin.faults(side, throttle_rate=0.0)
                self.played.append(f"429 storm on {side} at {at:.0%} ({time.monotonic() - started:.1f} s)")
            else:
                await admin.faults("dataverse", outage=True)
                await _sleep_or_stop(stop, OUTAGE_SECONDS)
                await admin.faults("dataverse", outage=False)
                self.played.append(f"Dataverse outage at {at:.0%} ({time.monotonic() - started:.1f} s)")


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        pass


async def background(admin: Admin) -> None:
    """The faults that stay on for the whole load."""
    for side in ("fo", "dataverse"):
        await admin.faults(side, **BACKGROUND)


async def quiet(admin: Admin) -> None:
    """Every fault off (before the final reconcile pass and the verification reads)."""
    for side in ("fo", "dataverse"):
        await admin.faults(side, **QUIET)
