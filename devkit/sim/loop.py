"""An asyncio event loop on virtual time whose every scheduling choice comes from one seed.

The real engine and worker are asyncio code. Run on this loop they need no change to become
deterministic:

- time is virtual: `loop.time()` only moves when nothing is ready to run, and then jumps to the
  next timer, so a ten-minute lease or a one-hour retry budget costs no wall time;
- at every step the loop picks *which* ready callback runs from a seeded generator, so each
  await is a point where another task may run first: a seed decides one interleaving, and
  another seed another;
- a process is a context: the simulator runs each function-app instance's tasks with
  `PROCESS` set in their context (tasks copy it), and `kill(process)` drops every callback of
  that process from then on, at whatever await its tasks stand: no `finally`, no `except`, no
  clean-up runs, as when a real process is killed. `crash_rate` kills a live process at a
  random one of its steps.

Nothing here reads the wall clock. (CPython's own `_run_once` was read to learn which private
fields a loop keeps: `_ready`, `_scheduled`, `_stopping`, `_timer_cancelled_count`; they are the
same from 3.11 to 3.13.)
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import logging
import random
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

PROCESS: ContextVar[str | None] = ContextVar("devkit_sim_process", default=None)
# Set in the tasks where a crash is worth simulating (a function invocation); an idle listener's
# polling is not a point where a process dies more often than anywhere else, only more often.
CRASH_POINT: ContextVar[bool] = ContextVar("devkit_sim_crash_point", default=False)


class Deadlock(RuntimeError):
    """Nothing is ready and no timer is set, yet the main coroutine waits: it can never finish."""


class VirtualLoop(asyncio.BaseEventLoop):
    """The simulator's event loop. `rng` orders ready callbacks; `crash_rate` is per process step."""

    def __init__(self, rng: random.Random, *, crash_rate: float = 0.0) -> None:
        super().__init__()
        self._now = 0.0
        self._rng = rng
        self.crash_rate = crash_rate
        self.dead: set[str] = set()
        self.corpses: list[asyncio.Task[Any]] = []  # a killed process's tasks: kept, so nothing collects (runs) them
        self.crashable: set[str] = set()  # processes the crash dice may kill (the function-app instances)
        self.on_crash: Callable[[str], None] = lambda process: None
        self.steps = 0
        self.dropped = 0
        self.failures: list[str] = []  # exceptions nobody retrieved: a bug in the code under test
        self.set_exception_handler(self._unhandled)
        self.set_task_factory(_task_factory)

    # -- time -------------------------------------------------------------------------------

    def time(self) -> float:
        return self._now

    # -- processes --------------------------------------------------------------------------

    def kill(self, process: str) -> None:
        """From now on no callback of `process` runs (its tasks stay where they stand, forever)."""
        if process not in self.dead:
            self.dead.add(process)
            self.crashable.discard(process)
            self.corpses.extend(t for t in asyncio.all_tasks(self) if _owner(t) == process)
            self.on_crash(process)

    def shutdown(self) -> None:
        """End a run: cancel the live tasks (they clean up as on a graceful stop), discard the killed ones
        without running any of their code, and close the loop."""
        live = [t for t in asyncio.all_tasks(self) if _owner(t) not in self.dead]
        for task in live:
            task.cancel()
        if live:
            self.run_until_complete(asyncio.gather(*live, return_exceptions=True))
        # Closing a coroutine runs its `finally` blocks (outside any task: OpenTelemetry then logs that it
        # cannot detach its context). The run is over and judged; what they do no longer matters.
        quiet = logging.getLogger("opentelemetry.context")
        was = quiet.disabled
        quiet.disabled = True
        try:
            for task in self.corpses:
                coroutine = task.get_coro()
                try:
                    coroutine.close()
                except BaseException:  # noqa: S110 - a killed process's clean-up failing after the run
                    pass
                task._log_destroy_pending = False  # type: ignore[attr-defined]
        finally:
            quiet.disabled = was
        self.corpses.clear()
        self.close()

    # -- the scheduler ----------------------------------------------------------------------

    def _run_once(self) -> None:
        ready = self._ready  # type: ignore[attr-defined]
        scheduled: list[Any] = self._scheduled  # type: ignore[attr-defined]
        if not ready:
            while scheduled and scheduled[0]._cancelled:
                self._timer_cancelled_count -= 1  # type: ignore[attr-defined]
                heapq.heappop(scheduled)._scheduled = False
            if not scheduled:
                if self._stopping:  # type: ignore[attr-defined]
                    return
                raise Deadlock("the simulation waits for something nothing will ever do")
            self._now = max(self._now, scheduled[0]._when)
        while scheduled and scheduled[0]._when <= self._now:
            handle = heapq.heappop(scheduled)
            handle._scheduled = False
            if handle._cancelled:
                self._timer_cancelled_count -= 1  # type: ignore[attr-defined]
            else:
                ready.append(handle)
        if not ready:
            return
        count = len(ready)
        if count == 1:
            handle = ready.popleft()
        else:
            index = self._rng.randrange(count)
            ready.rotate(-index)
            handle = ready.popleft()
            ready.rotate(index)
        if handle._cancelled:
            return
        process = handle._context.get(PROCESS)
        if process is not None:
            if process in self.dead:
                self.dropped += 1
                return
            if (
                self.crash_rate
                and process in self.crashable
                and handle._context.get(CRASH_POINT)
                and self._rng.random() < self.crash_rate
            ):
                self.kill(process)
                self.dropped += 1
                return
        self.steps += 1
        handle._run()

    # -- what BaseEventLoop leaves to subclasses ---------------------------------------------

    def _write_to_self(self) -> None:
        return None

    def _process_events(self, event_list: Any) -> None:
        return None

    def _unhandled(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        task = context.get("task") or context.get("future")
        if isinstance(task, asyncio.Task) and _owner(task) in self.dead:
            return  # a killed process's task: nothing ran wrong
        exception = context.get("exception")
        self.failures.append(f"{context.get('message')}: {exception!r}" if exception else str(context.get("message")))


class _Task(asyncio.Task):  # type: ignore[type-arg]
    """A task that knows its process (Task.get_context() only comes with Python 3.12)."""

    owner: str | None = None


def _task_factory(
    loop: asyncio.AbstractEventLoop, coro: Any, *, context: contextvars.Context | None = None, **kwargs: Any
) -> _Task:
    task = _Task(coro, loop=loop, context=context, **kwargs)
    task.owner = (context if context is not None else contextvars.copy_context()).get(PROCESS)
    return task


def _owner(task: asyncio.Task[Any]) -> str | None:
    """The process a task belongs to (the PROCESS of the context it runs in)."""
    return getattr(task, "owner", None)
