"""Where the engine reads the time and draws new ids: the system in Azure, a virtual clock in the simulator.

One context variable holds the source. Tasks copy the context they are created in, so the
deterministic simulator (devkit/sim) gives each simulated function-app instance a clock of its
own (virtual time, skewed like a real machine's) while everything else keeps the system's.
Nothing else in the engine may call `datetime.now`, `time.monotonic` or `uuid.uuid4`: a run is
only replayable when every moment and id it sees comes from here.
"""

from __future__ import annotations

import time
import uuid
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import Protocol


class TimeSource(Protocol):
    def utc(self) -> datetime:
        """Now, an aware UTC datetime."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for intervals only)."""
        ...

    def new_id(self) -> str:
        """A new random id: 32 lower-case hex digits."""
        ...


class SystemTime:
    """The machine's clocks and uuid4."""

    def utc(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    def new_id(self) -> str:
        return uuid.uuid4().hex


SYSTEM = SystemTime()
_SOURCE: ContextVar[TimeSource] = ContextVar("loyaltysync_time_source", default=SYSTEM)


def utc() -> datetime:
    """Now (aware UTC) from the current source."""
    return _SOURCE.get().utc()


def monotonic() -> float:
    """Monotonic seconds from the current source."""
    return _SOURCE.get().monotonic()


def new_id() -> str:
    """A new id (32 hex digits) from the current source."""
    return _SOURCE.get().new_id()


def use(source: TimeSource) -> Token[TimeSource]:
    """Make `source` current in this context (and in tasks created from it); `restore` undoes it."""
    return _SOURCE.set(source)


def restore(token: Token[TimeSource]) -> None:
    _SOURCE.reset(token)
