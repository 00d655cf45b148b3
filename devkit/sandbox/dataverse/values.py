"""Column values: check a JSON value against a column's type and turn it into the stored form.

Stored forms are small and JSON-ready: str for strings, GUIDs (lower case) and
dates (`YYYY-MM-DDTHH:MM:SSZ`, UTC, whole seconds, so that text order is time
order), int for choices, whole numbers and versions, float for decimals, bool.
Errors carry the codes and messages docs/wire-formats.md §1.4 documents.
"""

from __future__ import annotations

import functools
import math
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from devkit.sandbox.dataverse.errors import (
    ODATA,
    OUT_OF_RANGE,
    STRING_LENGTH,
    DataverseError,
)
from devkit.sandbox.dataverse.schema import CHOICE_TYPES, STRING_TYPES, Column

_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.\d{1,7})?)?(Z|[+-]\d{2}:\d{2})?)?$")
MIN_DATE = "1753-01-01T00:00:00Z"
EDM = {
    "String": "Edm.String",
    "Memo": "Edm.String",
    "Picklist": "Edm.Int32",
    "State": "Edm.Int32",
    "Status": "Edm.Int32",
    "Boolean": "Edm.Boolean",
    "Integer": "Edm.Int32",
    "BigInt": "Edm.Int64",
    "Decimal": "Edm.Decimal",
    "Money": "Edm.Decimal",
    "Double": "Edm.Double",
    "DateTime": "Edm.DateTimeOffset",
    "Lookup": "Edm.Guid",
    "Uniqueidentifier": "Edm.Guid",
}


def _cannot_convert(value: Any, column: Column) -> DataverseError:
    shown = value if isinstance(value, str) else repr(value)
    return DataverseError(
        400, ODATA, f"Cannot convert the literal '{shown}' to the expected type '{EDM[column.type]}'."
    )


def _out_of_range(value: Any, column: Column, table: str, accepted: str | None = None) -> DataverseError:
    message = (
        f"A validation error occurred. The value {value} of '{column.name}' on record of type '{table}' "
        "is outside the valid range."
    )
    if accepted is not None:
        message += f" Accepted Values: {accepted}"
    return DataverseError(400, OUT_OF_RANGE, message)


def parse_guid(text: str) -> str | None:
    """The canonical lower-case form of a GUID (braces allowed), or None."""
    try:
        return str(uuid.UUID(text.strip("{}")))
    except (ValueError, AttributeError):
        return None


def parse_datetime(text: str) -> str | None:
    """An ISO-8601 date or date-time as the stored UTC form, or None when it is not one."""
    match = _DATE.match(text)
    if not match:
        return None
    year, month, day, hour, minute, second, zone = match.groups()
    try:
        moment = datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0))
    except ValueError:
        return None
    if zone == "Z" and len(text) == 20 and text[10] == "T":
        return text  # already the stored form (validated by the constructor above)
    if zone and zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        offset_minutes = sign * (int(zone[1:3]) * 60 + int(zone[4:6]))
        moment = datetime.fromtimestamp(moment.replace(tzinfo=UTC).timestamp() - offset_minutes * 60, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@functools.lru_cache(maxsize=4096)
def to_epoch_ms(stored: str) -> int:
    """Milliseconds since 1970 of a stored date (for the WCF `/Date(ms)/` form)."""
    moment = datetime.strptime(stored, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


_NOW: list[Any] = [0, ""]


def utc_now() -> str:
    """Now, in the stored date form (one shared string per second: a million rows stamped alike share it)."""
    second = int(time.time())
    if _NOW[0] != second:
        _NOW[0], _NOW[1] = second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return str(_NOW[1])


def coerce(column: Column, value: Any, table: str) -> Any:
    """Check `value` (decoded JSON) for `column` of `table`; return the stored form. Raises DataverseError."""
    if value is None:
        return None
    kind = column.type
    if kind in STRING_TYPES:
        if not isinstance(value, str):
            raise _cannot_convert(value, column)
        if column.max_length is not None and len(value) > column.max_length:
            raise DataverseError(
                400,
                STRING_LENGTH,
                f"A validation error occurred. The length of the '{column.name}' attribute of the '{table}' "
                f"entity exceeded the maximum allowed length of '{column.max_length}'.",
            )
        return value
    if kind in CHOICE_TYPES:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _cannot_convert(value, column)
        options = column.options or {}
        if value not in options:
            raise _out_of_range(value, column, table, ",".join(str(v) for v in options))
        return value
    if kind == "Boolean":
        if not isinstance(value, bool):
            raise _cannot_convert(value, column)
        return value
    if kind in ("Integer", "BigInt"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _cannot_convert(value, column)
        _check_range(value, column, table)
        return value
    if kind in ("Decimal", "Money", "Double"):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise _cannot_convert(value, column)
        _check_range(value, column, table)
        number = float(value)
        return round(number, column.precision) if column.precision is not None else number
    if kind == "DateTime":
        stored = parse_datetime(value) if isinstance(value, str) else None
        if stored is None:
            raise _cannot_convert(value, column)
        if stored < MIN_DATE:
            raise _out_of_range(value, column, table)
        return stored
    if kind in ("Uniqueidentifier", "Lookup"):
        guid = parse_guid(value) if isinstance(value, str) else None
        if guid is None:
            raise _cannot_convert(value, column)
        return guid
    raise _cannot_convert(value, column)


@functools.lru_cache(maxsize=4096)
def _formatted_date(stored: str) -> str:
    moment = datetime.strptime(stored, "%Y-%m-%dT%H:%M:%SZ")
    hour = moment.hour % 12 or 12
    return f"{moment.month}/{moment.day}/{moment.year} {hour}:{moment.minute:02d} {'AM' if moment.hour < 12 else 'PM'}"


def _check_range(value: float, column: Column, table: str) -> None:
    low, high = column.min_value, column.max_value
    if (low is not None and value < low) or (high is not None and value > high):
        raise _out_of_range(value, column, table)


def formatted(column: Column, stored: Any) -> str | None:
    """The display text Dataverse puts in FormattedValue annotations (labels, Yes/No, dates, numbers)."""
    if stored is None:
        return None
    kind = column.type
    if kind in CHOICE_TYPES:
        return (column.options or {}).get(stored)
    if kind == "Boolean":
        return (column.options or {1: "Yes", 0: "No"}).get(1 if stored else 0)
    if kind == "DateTime":
        return _formatted_date(stored)
    if kind in ("Integer", "BigInt"):
        return f"{stored:,}"
    if kind in ("Decimal", "Double"):
        return f"{stored:,.{column.precision if column.precision is not None else 2}f}"
    if kind == "Money":
        return f"${stored:,.2f}"
    return None
