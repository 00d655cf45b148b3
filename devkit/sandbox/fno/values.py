"""Property values between F&O's JSON and the emulator's rows.

Rows hold plain Python values: strings, ints, `Decimal`, enum member names
and dates as normalised UTC strings (`YYYY-MM-DDTHH:MM:SSZ`, second
precision, as F&O's UtcDateTime keeps them). The empty date is 1900-01-01,
never null, because F&O has no nulls.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from devkit.sandbox.fno.errors import FnoError, bad_payload, write_failed
from devkit.sandbox.fno.schema import EMPTY_DATE, EMPTY_DATETIME, EntityDef, Property

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_MIN_YEAR, _MAX_YEAR = 1900, 2154  # F&O's date range
_CANONICAL = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def _cannot_convert(prop: Property, value: Any) -> FnoError:
    return bad_payload(f"Cannot convert the literal '{value}' to the expected type '{prop.edm_type}'.")


def _null_not_allowed(prop: Property) -> FnoError:
    return bad_payload(
        f"A null value was found for the property named '{prop.name}', which has the expected type "
        f"'{prop.edm_type}[Nullable=False]'. The expected type '{prop.edm_type}[Nullable=False]' "
        "does not allow null values."
    )


def parse_datetime(text: str) -> datetime | None:
    """An ISO-8601 date-time with an offset (or `Z`), in UTC; None when not one."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    return moment.astimezone(UTC)


def format_datetime(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _to_date(prop: Property, raw: Any) -> str:
    if raw is None:
        return EMPTY_DATE if prop.kind == "date" else EMPTY_DATETIME
    if prop.kind == "datetime" and isinstance(raw, str) and _CANONICAL.fullmatch(raw):
        if _MIN_YEAR <= int(raw[:4]) <= _MAX_YEAR and parse_datetime(raw) is not None:
            return raw  # already what the row stores
    moment = parse_datetime(raw) if isinstance(raw, str) else None
    if moment is None:
        raise _cannot_convert(prop, raw)
    if not _MIN_YEAR <= moment.year <= _MAX_YEAR:
        raise bad_payload(
            f"The value '{raw}' of property '{prop.name}' is outside the range F&O stores "
            f"({_MIN_YEAR}-01-01 to {_MAX_YEAR}-12-31)."
        )
    if prop.kind == "date":
        return moment.strftime("%Y-%m-%dT12:00:00Z")
    return format_datetime(moment)


def _to_integer(prop: Property, raw: Any) -> int:
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if not isinstance(raw, int) or isinstance(raw, bool):
        raise _cannot_convert(prop, raw)
    low, high = (INT32_MIN, INT32_MAX) if prop.kind == "int32" else (INT64_MIN, INT64_MAX)
    if not low <= raw <= high:
        raise _cannot_convert(prop, raw)
    return raw


def _to_decimal(prop: Property, raw: Any) -> Decimal:
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise _cannot_convert(prop, raw)
    try:
        value = Decimal(str(raw))
    except InvalidOperation:
        raise _cannot_convert(prop, raw) from None
    if not value.is_finite():
        raise _cannot_convert(prop, raw)
    return value


def to_stored(entity: EntityDef, prop: Property, raw: Any) -> object:
    """Validate one JSON value for `prop`; return what the row stores. Raises `FnoError`."""
    if prop.kind == "string":
        if raw is None:
            return ""
        if not isinstance(raw, str):
            raise _cannot_convert(prop, raw)
        if prop.max_length is not None and len(raw) > prop.max_length:
            raise write_failed(
                entity.data_entity,
                f"The value of field '{prop.name}' is {len(raw)} characters long; "
                f"the maximum length is {prop.max_length}.",
            )
        return raw
    if prop.kind in ("datetime", "date"):
        return _to_date(prop, raw)
    if raw is None:
        raise _null_not_allowed(prop)
    if prop.enum is not None:
        if not isinstance(raw, str) or raw not in prop.enum.members:
            raise bad_payload(
                f"The value '{raw}' is not a member of the enum type '{prop.enum.full_name}' "
                f"(property '{prop.name}'); members are {', '.join(prop.enum.members)}."
            )
        return raw
    if prop.kind in ("int32", "int64"):
        return _to_integer(prop, raw)
    if prop.kind == "decimal":
        return _to_decimal(prop, raw)
    if not isinstance(raw, bool):
        raise _cannot_convert(prop, raw)
    return raw


def to_json(value: object) -> object:
    """A stored value as F&O's JSON writes it."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def is_empty_date(value: object) -> bool:
    """Whether a stored date is F&O's "no value" (1900-01-01)."""
    return isinstance(value, str) and value.startswith("1900-01-01T")
