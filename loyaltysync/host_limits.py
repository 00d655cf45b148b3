"""What the Functions host guarantees about an invocation's lifetime, read from host.json as the host reads it.

`functionTimeout` ends every invocation that runs longer (for Python the host recycles the worker
process). So a step's intent stored more than that long ago belongs to an invocation that is over:
its writes have all landed or never will. The engine waits that long before judging another
instance's intent (`Engine.writing_elsewhere_s`): a slow step (the clients retry throttling and
outages for minutes) is never taken for a dead one while it can still write. The deterministic
simulator found the step that was: it wrote a record a person had deleted meanwhile.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from loyaltysync import timesource

# Without functionTimeout in host.json: the longest default of the plans (Premium and Dedicated, 30 min).
DEFAULT_FUNCTION_TIMEOUT_S = 1800.0
# Clocks of two instances agree to a second or two: an intent's age is measured on another machine's clock.
CLOCK_MARGIN_S = 5.0
# What an invocation keeps back from functionTimeout to hand an unfinished change back to its queue.
HAND_BACK_MIN_S, HAND_BACK_MAX_S, HAND_BACK_SHARE = 5.0, 60.0, 0.2
# (end of the step's budget, end of the invocation) on the engine's monotonic clock, inside an invocation.
_DEADLINE: ContextVar[tuple[float, float] | None] = ContextVar("loyaltysync_invocation_deadline", default=None)
_TIMESPAN = re.compile(r"^(?:(\d+)\.)?(\d{1,2}):(\d{1,2}):(\d{1,2}(?:\.\d+)?)$")


def parse_timespan(text: str) -> float:
    """Seconds in a .NET TimeSpan such as `00:10:00` or `1.00:00:00`; ValueError otherwise."""
    match = _TIMESPAN.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a TimeSpan like 00:10:00")
    days, hours, minutes, seconds = match.groups()
    return int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def function_timeout_seconds(host_json: Path = Path("host.json"), override: str | None = None) -> float:
    """host.json's functionTimeout, or `override` (the app setting `AzureFunctionsJobHost__functionTimeout`)."""
    text = override
    if not text:
        try:
            config = json.loads(host_json.read_text(encoding="utf-8"))
            text = next((v for k, v in config.items() if k.lower() == "functiontimeout"), None)
        except (OSError, ValueError, AttributeError):
            text = None
    if not isinstance(text, str) or text.strip() == "-1":
        return DEFAULT_FUNCTION_TIMEOUT_S
    try:
        return parse_timespan(text)
    except ValueError:
        return DEFAULT_FUNCTION_TIMEOUT_S


def intent_horizon_seconds(function_timeout_s: float) -> float:
    """How old another instance's intent must be before it is judged as a dead step's."""
    return function_timeout_s + CLOCK_MARGIN_S


def step_budget_seconds(function_timeout_s: float) -> float:
    """How long one invocation may spend on its change before it stops retrying and hands it back.

    The host ends an invocation at functionTimeout by recycling the worker process, which ends every
    other invocation running in it too, mid-step. So a step's clients never start a wait or a request
    that would run past this budget: a fifth of the timeout (5 s to 60 s, at most half) is kept for
    putting the change back on its queue with its back-off (docs/retries.md).
    """
    margin = min(HAND_BACK_MAX_S, max(HAND_BACK_MIN_S, function_timeout_s * HAND_BACK_SHARE))
    return max(function_timeout_s / 2, function_timeout_s - margin)


@contextmanager
def invocation_deadline(function_timeout_s: float) -> Iterator[None]:
    """Within the block (one invocation), `seconds_left` counts down the step's budget and
    `seconds_to_timeout` the invocation's functionTimeout, on the engine's clock."""
    now = timesource.monotonic()
    token = _DEADLINE.set((now + step_budget_seconds(function_timeout_s), now + function_timeout_s))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def seconds_left() -> float | None:
    """Seconds left of the current invocation's step budget; None outside an invocation (no limit)."""
    deadline = _DEADLINE.get()
    return None if deadline is None else deadline[0] - timesource.monotonic()


def seconds_to_timeout() -> float | None:
    """Seconds until the host ends the current invocation; None outside an invocation (no limit).
    Storage calls may use the hand-back margin (`step_budget_seconds`), the targets may not."""
    deadline = _DEADLINE.get()
    return None if deadline is None else deadline[1] - timesource.monotonic()
