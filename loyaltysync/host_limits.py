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
from pathlib import Path

# Without functionTimeout in host.json: the longest default of the plans (Premium and Dedicated, 30 min).
DEFAULT_FUNCTION_TIMEOUT_S = 1800.0
# Clocks of two instances agree to a second or two: an intent's age is measured on another machine's clock.
CLOCK_MARGIN_S = 5.0
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
