"""Timer triggers: NCRONTAB schedules, firing, run_on_startup, past_due and the no-overlap singleton."""

from __future__ import annotations

import asyncio
import importlib
import io
import itertools
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta, tzinfo

import pytest
from azure.functions.timer import TimerRequest

from devkit.devhost import DevHost
from devkit.devhost.app import FunctionSpec
from devkit.devhost.invocation import Outcome, TriggerData
from devkit.devhost.ncrontab import parse_schedule
from devkit.devhost.timers import TimerRunner
from devkit.devhost.worker_rules import IndexedFunction, ParamType, decode_argument

StartHost = Callable[..., Awaitable[DevHost]]
T0 = datetime(2024, 3, 14, 10, 7, 30, 500000, tzinfo=UTC)  # a Thursday


@pytest.mark.parametrize(
    ("expression", "after", "expected"),
    [
        ("*/15 * * * * *", T0, datetime(2024, 3, 14, 10, 7, 45, tzinfo=UTC)),
        ("0 */5 * * * *", T0, datetime(2024, 3, 14, 10, 10, 0, tzinfo=UTC)),
        ("0 0 8,12,18 * * *", T0, datetime(2024, 3, 14, 12, 0, 0, tzinfo=UTC)),
        ("0 0-30/10 11 * * *", T0, datetime(2024, 3, 14, 11, 0, 0, tzinfo=UTC)),
        ("0 30 9 * * MON-FRI", T0, datetime(2024, 3, 15, 9, 30, 0, tzinfo=UTC)),
        ("0 30 9 * * sat", T0, datetime(2024, 3, 16, 9, 30, 0, tzinfo=UTC)),
        ("0 0 0 1 JAN *", T0, datetime(2025, 1, 1, 0, 0, 0, tzinfo=UTC)),
        ("0 0 0 13 * 5", T0, datetime(2024, 9, 13, 0, 0, 0, tzinfo=UTC)),  # day AND weekday: Friday the 13th
        ("0 0 0 29 2 *", T0, datetime(2028, 2, 29, 0, 0, 0, tzinfo=UTC)),
        ("10 * * * *", T0, datetime(2024, 3, 14, 10, 10, 0, tzinfo=UTC)),  # five fields: no seconds
        ("30 7 10 14 3 *", T0, datetime(2025, 3, 14, 10, 7, 30, tzinfo=UTC)),  # strictly after
        ("5/20 * * * * *", T0, datetime(2024, 3, 14, 10, 7, 45, tzinfo=UTC)),
        ("00:00:05", T0, T0 + timedelta(seconds=5)),  # a TimeSpan repeats
    ],
)
def test_next_occurrence(expression: str, after: datetime, expected: datetime) -> None:
    assert parse_schedule(expression).next_after(after) == expected


@pytest.mark.parametrize(
    ("expression", "problem"),
    [
        ("* * * * *  * *", "six fields"),
        ("0 61 * * * *", "minute field '61' is outside 0-59"),
        ("0 0 25 * * *", "hour field '25'"),
        ("0 0 0 * 13 *", "month field '13'"),
        ("0 0 0 * * 7", "day of week field '7'"),
        ("0 0 0 * * FUNDAY", "day of week field 'FUNDAY' is not valid"),
        ("*/0 * * * * *", "second field '*/0' is not valid"),
        ("0 0 0 30 2 *", "never fires"),
    ],
)
def test_invalid_schedules_name_the_problem(expression: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_schedule(expression)


class _RecordingInvoker:
    def __init__(self) -> None:
        self.requests: list[TimerRequest] = []
        self.called = asyncio.Event()

    async def invoke(self, function: FunctionSpec, trigger: TriggerData) -> Outcome:
        # What the function receives: the host's timer data through the worker's converter.
        self.requests.append(decode_argument(ParamType("timerTrigger", TimerRequest), trigger.data, trigger.metadata))
        self.called.set()
        return Outcome(None, {})


async def test_past_due_when_a_whole_occurrence_was_missed() -> None:
    readings = iter([T0, T0 + timedelta(seconds=12)])  # the clock jumps past two 5-second occurrences

    def clock(zone: tzinfo) -> datetime:
        return next(readings, T0 + timedelta(seconds=12))

    function = FunctionSpec(
        name="tick",
        trigger={"type": "timerTrigger", "name": "timer", "schedule": "*/5 * * * * *"},
        outputs=(),
        indexed=IndexedFunction(
            name="tick",
            user_function=lambda timer: None,
            requires_context=False,
            is_async=False,
            has_return=False,
            inputs={"timer": ParamType("timerTrigger", TimerRequest)},
            outputs={},
            return_type=None,
        ),
        disabled=False,
        not_run=None,
    )
    invoker = _RecordingInvoker()
    runner = TimerRunner(function, invoker, UTC, clock)  # type: ignore[arg-type]
    task = asyncio.create_task(runner.run())
    try:
        await asyncio.wait_for(invoker.called.wait(), 5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    request = invoker.requests[0]
    assert request.past_due is True
    assert request.schedule_status["Next"] == datetime(2024, 3, 14, 10, 7, 40, tzinfo=UTC).isoformat()


TIMER_APP = """
import threading
import time
import azure.functions as func

app = func.FunctionApp()
TICKS = []
SLOW = {"active": 0, "overlapped": False, "starts": []}
LOCK = threading.Lock()

@app.timer_trigger(arg_name="timer", schedule="%TICK_SCHEDULE%", run_on_startup=True)
async def tick(timer: func.TimerRequest) -> None:
    TICKS.append((time.monotonic(), timer.past_due))

@app.timer_trigger(arg_name="timer", schedule="*/1 * * * * *")
def slow(timer: func.TimerRequest) -> None:
    with LOCK:
        SLOW["active"] += 1
        SLOW["overlapped"] |= SLOW["active"] > 1
        SLOW["starts"].append(time.monotonic())
    time.sleep(1.3)  # longer than the one-second schedule
    with LOCK:
        SLOW["active"] -= 1
"""


async def test_timers_fire_on_schedule_without_overlapping(
    write_app: Callable[[str], str], start_host: StartHost
) -> None:
    module = write_app(TIMER_APP)
    banner = io.StringIO()
    started = asyncio.get_running_loop().time()
    await start_host(module, settings={"TICK_SCHEDULE": "*/1 * * * * *"}, out=banner)
    app = importlib.import_module(module)
    await asyncio.sleep(0.3)
    assert app.TICKS, "run_on_startup fires as the host starts"
    assert app.TICKS[0][0] - started < 0.9  # before the first scheduled second could explain it
    assert app.TICKS[0][1] is False
    await asyncio.sleep(3.5 - (asyncio.get_running_loop().time() - started))
    assert len(app.TICKS) >= 3  # startup + one a second
    assert not any(past_due for _, past_due in app.TICKS)
    starts = app.SLOW["starts"]
    assert len(starts) >= 2
    assert all(later - earlier >= 1.3 for earlier, later in itertools.pairwise(starts))  # singleton
    assert app.SLOW["overlapped"] is False
    assert "tick: timerTrigger (schedule '*/1 * * * * *')" in banner.getvalue()
