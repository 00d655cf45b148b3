"""The engine reads time and draws ids only through loyaltysync.timesource, so a simulation can replay it."""

from __future__ import annotations

import ast
import asyncio
import contextvars
from datetime import UTC, datetime
from pathlib import Path

from loyaltysync import timesource
from loyaltysync.events.model import utc_now

ROOT = Path(__file__).resolve().parents[1] / "loyaltysync"
# The code a sync step runs: the worker, the engine, its state, events and lookups, the reconciler.
ENGINE = [
    "sync.py", "decide.py", "worker.py", "runtime.py", "reconcile.py", "lag.py", "retries.py", "state.py",
    "mapping.py", "inbound.py", "targets/lookups.py", *(f"events/{p.name}" for p in (ROOT / "events").glob("*.py")),
]
FORBIDDEN = {("datetime", "now"), ("datetime", "utcnow"), ("time", "monotonic"), ("time", "time"), ("uuid", "uuid4")}


class _Fixed:
    def __init__(self, moment: datetime) -> None:
        self.moment = moment

    def utc(self) -> datetime:
        return self.moment

    def monotonic(self) -> float:
        return 42.0

    def new_id(self) -> str:
        return "0" * 32


def test_engine_modules_read_no_clock_of_their_own() -> None:
    found = []
    for name in ENGINE:
        tree = ast.parse((ROOT / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = node.func.value
                if isinstance(owner, ast.Name) and (owner.id, node.func.attr) in FORBIDDEN:
                    found.append(f"{name}:{node.lineno} {owner.id}.{node.func.attr}()")
    assert found == []


def test_a_source_set_in_a_context_is_seen_there_and_by_its_tasks_only() -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, 600000, tzinfo=UTC)

    async def inside() -> tuple[str, float, str]:
        return utc_now(), timesource.monotonic(), timesource.new_id()

    context = contextvars.copy_context()
    context.run(timesource.use, _Fixed(moment))
    seen = context.run(asyncio.run, inside())
    assert seen == ("2026-01-02T03:04:05.600000Z", 42.0, "0" * 32)
    assert utc_now() != seen[0]  # outside that context: the system clock
    assert len(timesource.new_id()) == 32
