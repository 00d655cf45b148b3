"""Timer schedules as the timer trigger reads them: NCRONTAB expressions and TimeSpan intervals.

NCRONTAB has six fields, `{second} {minute} {hour} {day} {month} {day-of-week}`
(five fields means no seconds). Each field is `*`, a value, a range `a-b`, a
step `*/n` or `a-b/n`, or a comma list of those; months and days of the week
also take English names (JAN, MON). Day of week 0 is Sunday. Unlike Vixie cron,
NCRONTAB requires the day of month AND the day of week to match. A TimeSpan
(`hh:mm:ss`) schedule repeats at that interval.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from devkit.devhost.host_json import parse_timespan

_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
_FIELDS: tuple[tuple[str, int, int, tuple[str, ...]], ...] = (
    ("second", 0, 59, ()),
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day", 1, 31, ()),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 6, _DAYS),
)
_SEARCH_YEARS = 30  # long enough for Feb 29 on a given weekday; an impossible date gives up after this
_TIMESPAN = re.compile(r"^\d+(?:\.\d+)?:\d")


class Schedule(Protocol):
    """When a timer fires next."""

    expression: str

    def next_after(self, moment: datetime) -> datetime:
        """The first firing time strictly after `moment` (same time zone)."""
        ...


@dataclass(frozen=True)
class CronSchedule:
    """A parsed NCRONTAB expression."""

    expression: str
    seconds: frozenset[int]
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]

    def next_after(self, moment: datetime) -> datetime:
        """The first time strictly after `moment` that matches every field. Raises ValueError if none ever does."""
        current = moment.replace(microsecond=0) + timedelta(seconds=1)
        limit = moment.year + _SEARCH_YEARS
        while current.year <= limit:
            if current.month not in self.months:
                current = _first_of_next_month(current)
            elif current.day not in self.days or (current.weekday() + 1) % 7 not in self.weekdays:
                current = current.replace(hour=0, minute=0, second=0) + timedelta(days=1)
            elif current.hour not in self.hours:
                current = current.replace(minute=0, second=0) + timedelta(hours=1)
            elif current.minute not in self.minutes:
                current = current.replace(second=0) + timedelta(minutes=1)
            elif current.second not in self.seconds:
                current += timedelta(seconds=1)
            else:
                return current
        raise ValueError(f"schedule {self.expression!r} never fires")


@dataclass(frozen=True)
class IntervalSchedule:
    """A TimeSpan schedule: fires every `interval` seconds."""

    expression: str
    interval: float

    def next_after(self, moment: datetime) -> datetime:
        """`moment` plus the interval."""
        return moment + timedelta(seconds=self.interval)


def parse_schedule(expression: str) -> CronSchedule | IntervalSchedule:
    """Parse a timer `schedule`. Raises ValueError naming the field that is wrong."""
    text = expression.strip()
    if _TIMESPAN.match(text):
        interval = parse_timespan(text)
        if interval <= 0:
            raise ValueError(f"schedule {expression!r}: a TimeSpan schedule must be positive")
        return IntervalSchedule(expression, interval)
    parts = text.split()
    if len(parts) == 5:
        parts = ["0", *parts]
    if len(parts) != 6:
        raise ValueError(
            f"schedule {expression!r} must have six fields: second minute hour day month day-of-week "
            "(e.g. '0 */5 * * * *')"
        )
    sets = [_field(expression, part, *spec) for part, spec in zip(parts, _FIELDS, strict=True)]
    schedule = CronSchedule(expression, *sets)
    schedule.next_after(datetime(2000, 1, 1))  # refuse at start-up a schedule that can never fire
    return schedule


def _field(expression: str, text: str, name: str, low: int, high: int, names: tuple[str, ...]) -> frozenset[int]:
    values: set[int] = set()
    for item in text.split(","):
        range_text, _, step_text = item.partition("/")
        try:
            step = int(step_text) if step_text else 1
            if step < 1:
                raise ValueError
            if range_text == "*":
                start, stop = low, high
            elif "-" in range_text:
                first, _, last = range_text.partition("-")
                start, stop = _value(first, names), _value(last, names)
            else:
                start = _value(range_text, names)
                stop = high if step_text else start  # `a/n` means from a to the end in steps of n
        except ValueError:
            raise ValueError(f"schedule {expression!r}: {name} field {text!r} is not valid") from None
        if not (low <= start <= high and low <= stop <= high) or start > stop:
            raise ValueError(f"schedule {expression!r}: {name} field {text!r} is outside {low}-{high}")
        values.update(range(start, stop + 1, step))
    return frozenset(values)


def _value(text: str, names: tuple[str, ...]) -> int:
    upper = text.strip().upper()
    if upper in names:
        return names.index(upper) + (1 if names is _MONTHS else 0)
    return int(upper)


def _first_of_next_month(moment: datetime) -> datetime:
    if moment.month == 12:
        return moment.replace(year=moment.year + 1, month=1, day=1, hour=0, minute=0, second=0)
    return moment.replace(month=moment.month + 1, day=1, hour=0, minute=0, second=0)
