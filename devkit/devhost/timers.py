"""Timer triggers: fire on the NCRONTAB (or TimeSpan) schedule, never overlapping themselves.

The host holds a singleton lock per timer function, so an invocation that runs
past the next occurrence delays it instead of running beside it; the next
occurrence is then computed from when it finished (missed ones are not caught
up). `runOnStartup` fires once when the host starts. `past_due` is true when a
whole occurrence went by before the invocation started. Times are UTC unless
the app setting WEBSITE_TIME_ZONE names an IANA zone, as on Linux plans.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from azure.functions.meta import Datum

from devkit.devhost.app import FunctionSpec
from devkit.devhost.invocation import Invoker, TriggerData
from devkit.devhost.ncrontab import parse_schedule
from loyaltysync.errors import ConfigError

log = logging.getLogger("devkit.devhost")

TIME_ZONE_SETTING = "WEBSITE_TIME_ZONE"
_NEVER = "0001-01-01T00:00:00"


def timer_trigger_data(past_due: bool, schedule_status: Mapping[str, Any] | None = None) -> TriggerData:
    """The host's timer trigger data: the TimerInfo JSON the worker's converter reads."""
    info = {"Schedule": {"AdjustForDST": True}, "ScheduleStatus": dict(schedule_status or {}), "IsPastDue": past_due}
    return TriggerData(Datum(json.dumps(info), "json"))


def timer_zone(environ: Mapping[str, str]) -> tzinfo:
    """The zone schedules are read in: WEBSITE_TIME_ZONE (IANA name) or UTC. Raises ConfigError if unknown."""
    name = environ.get(TIME_ZONE_SETTING, "").strip()
    if not name or name.upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigError(TIME_ZONE_SETTING, f"{name!r} is not an IANA time zone name (e.g. Europe/Paris)") from exc


class TimerRunner:
    """Runs one timer-triggered function until cancelled."""

    def __init__(
        self,
        function: FunctionSpec,
        invoker: Invoker,
        zone: tzinfo = UTC,
        clock: Callable[[tzinfo], datetime] = datetime.now,
    ) -> None:
        """Raises ConfigError when the schedule is not valid (the host refuses to start such a timer)."""
        self.function = function
        self._invoker = invoker
        self._zone = zone
        self._clock = clock
        expression = str(function.trigger.get("schedule", ""))
        try:
            self.schedule = parse_schedule(expression)
        except ValueError as exc:
            raise ConfigError(f"{function.name} schedule", str(exc)) from exc
        self.run_on_startup = bool(function.trigger.get("runOnStartup"))

    async def run(self) -> None:
        """Fire on schedule until cancelled; each invocation finishes before the next is scheduled."""
        last: datetime | None = None
        if self.run_on_startup:
            last = self._now()
            await self._fire(past_due=False, last=None, next_at=self.schedule.next_after(last))
        next_at = self.schedule.next_after(self._now())
        while True:
            await self._sleep_until(next_at)
            started = self._now()
            past_due = self.schedule.next_after(next_at) <= started
            await self._fire(past_due=past_due, last=last, next_at=self.schedule.next_after(next_at))
            last = started
            next_at = self.schedule.next_after(max(self._now(), next_at))

    def _now(self) -> datetime:
        return self._clock(self._zone)

    async def _sleep_until(self, moment: datetime) -> None:
        await asyncio.sleep(max(0.0, (moment - self._now()).total_seconds()))

    async def _fire(self, *, past_due: bool, last: datetime | None, next_at: datetime) -> None:
        request = timer_trigger_data(
            past_due,
            {
                "Last": last.isoformat() if last else _NEVER,
                "Next": next_at.isoformat(),
                "LastUpdated": self._now().isoformat(),
            },
        )
        try:
            await self._invoker.invoke(self.function, request)
        except Exception:  # noqa: S110 - logged by the invoker; a failed run does not stop the timer
            pass
