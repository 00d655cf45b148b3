"""Canonical mapping: F&O record ⇄ canonical values ⇄ Dataverse record. Pure: no I/O.

Canonical values are JSON scalars so they hash, compare and store as they are:
- string: `str`, with F&O's empty string and Dataverse's null both meaning `None`;
- integer: `int`; decimal: a normalized decimal string (`"1500.5"`, never an exponent);
- boolean: `bool`; datetime: `"YYYY-MM-DDTHH:MM:SSZ"` in UTC (F&O's empty date
  1900-01-01 is `None`); date: `"YYYY-MM-DD"`;
- enum (value-mapped): the F&O member name (`"Blocked"`), checked against the map;
- lookup: the referenced row's natural key (`"USD"`), never a row id.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol

from loyaltysync.errors import MappingError
from loyaltysync.templates import COMPANY_FIELD, FieldMap, Lookup, Side, Template

FO_EMPTY_DATETIME = "1900-01-01T00:00:00Z"
_FO_EMPTY_DATES = ("1900-01-01",)
_WCF_DATE = re.compile(r"^/Date\((-?\d+)([+-]\d{4})?\)/$")

Canonical = dict[str, Any]


class LookupResolver(Protocol):
    """Natural key ⇄ Dataverse row id for lookup columns; answers from a cache the shell filled.

    `None` means Dataverse has no such row.
    """

    def id_for(self, lookup: Lookup, key: str) -> str | None: ...

    def key_for(self, lookup: Lookup, row_id: str) -> str | None: ...


# ---------------------------------------------------------------- value normalization


def _fail(template: Template, f: FieldMap, value: Any, problem: str) -> MappingError:
    return MappingError(template.name, f.key, value, problem)


def parse_datetime(value: Any) -> datetime | None:
    """Read an ISO-8601 string or a WCF `/Date(ms[+zzzz])/` into an aware UTC datetime."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    if not isinstance(value, str):
        raise ValueError("not a date/time string")
    wcf = _WCF_DATE.match(value)
    if wcf:
        # The offset in /Date(ms-0700)/ is informational: ms is already UTC.
        return datetime.fromtimestamp(int(wcf.group(1)) / 1000, tz=UTC)
    text = value.strip()
    if len(text) == 10:
        return datetime.fromisoformat(text).replace(tzinfo=UTC)
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _canonical_datetime(value: Any) -> str | None:
    moment = parse_datetime(value)
    if moment is None:
        return None
    if moment.year == 1900 and moment.month == 1 and moment.day == 1:
        return None  # F&O's "no date" (UtcDateTime 00:00, date-only 12:00)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def normalize_time(value: Any) -> str | None:
    """A source modified time (ISO or WCF) as canonical UTC text; unreadable or empty -> None."""
    try:
        return _canonical_datetime(value)
    except (ValueError, TypeError, OverflowError):
        return None


def _canonical_date(value: Any) -> str | None:
    moment = parse_datetime(value)
    if moment is None:
        return None
    text = moment.date().isoformat()
    return None if text in _FO_EMPTY_DATES else text


def _canonical_decimal(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError("boolean is not a number")
    number = Decimal(str(value))
    if not number.is_finite():
        raise ValueError("not a finite number")
    normalized = number.normalize()
    text = format(normalized, "f")
    return "0" if text in ("-0", "0") else text


def _canonical_integer(value: Any) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError("boolean is not an integer")
    number = Decimal(str(value))
    if number != number.to_integral_value():
        raise ValueError("not a whole number")
    return int(number)


def _canonical_boolean(value: Any) -> bool | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError("not a boolean")


def _canonical_string(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError("not a string")
    return value


def _representative(f: FieldMap, member: Any) -> Any:
    """The first member with the same Dataverse value: what a many-to-one map reads back as."""
    if f.value_map is None:
        return member
    target = f.value_map[member]
    for name, value in f.value_map.items():
        if type(value) is type(target) and value == target:
            return name
    return member


def normalize(template: Template, f: FieldMap, value: Any) -> Any:
    """Bring a side-neutral value (enums already as F&O member names) to canonical form."""
    try:
        if f.type == "enum":
            if value is None or value == "":
                return None
            if f.value_map is not None and value not in f.value_map:
                raise _fail(template, f, value, f"not in the value map ({', '.join(f.value_map)})")
            return _representative(f, value)
        if f.type == "string":
            text = _canonical_string(value)
            if f.key == COMPANY_FIELD and text is not None:
                text = text.lower()  # F&O company ids are case-insensitive; stored lower case
            return text
        if f.type == "integer":
            return _canonical_integer(value)
        if f.type == "decimal":
            return _canonical_decimal(value)
        if f.type == "boolean":
            return _canonical_boolean(value)
        if f.type == "datetime":
            return _canonical_datetime(value)
        return _canonical_date(value)
    except (ValueError, TypeError, InvalidOperation, OverflowError) as exc:
        raise _fail(template, f, value, f"not a valid {f.type}: {exc}") from exc


# ---------------------------------------------------------------- F&O


def fo_to_canonical(template: Template, record: Mapping[str, Any]) -> Canonical:
    """Canonical values of every mapped field present in an F&O record (OData JSON)."""
    values: Canonical = {}
    for f in template.all_fields:
        if f.fo is None or f.dataverse is None or f.fo not in record:
            continue
        values[f.key] = normalize(template, f, record[f.fo])
    return values


def canonical_to_fo(template: Template, values: Mapping[str, Any], *, create: bool = False) -> dict[str, Any]:
    """The F&O body that writes `values` (fields that flow to F&O only).

    Empty values become what F&O stores for "nothing": "" for strings and the
    1900-01-01 date. An empty enum is left out (F&O enums always hold a member).
    Constant defaults of `<<` fields are added on create.
    """
    body: dict[str, Any] = {}
    for f in template.fields_to("fo"):
        if f.fo is None:
            continue
        if f.key in values:
            value = values[f.key]
            _check_length(template, f, value)
            if f.type == "enum":
                if value is None:
                    continue
                if f.value_map is not None and value not in f.value_map:
                    raise _fail(template, f, value, f"not in the value map ({', '.join(f.value_map)})")
                body[f.fo] = value
            elif value is None:
                body[f.fo] = _fo_empty(f)
            elif f.type == "decimal":
                body[f.fo] = _json_number(value)
            elif f.type == "date":
                body[f.fo] = f"{value}T12:00:00Z"
            else:
                body[f.fo] = value
        elif create and f.default is not None:
            body[f.fo] = f.default
    return body


def _fo_empty(f: FieldMap) -> Any:
    if f.type == "string":
        return ""
    if f.type in ("datetime", "date"):
        return FO_EMPTY_DATETIME
    return None


def fo_key(template: Template, key: Mapping[str, str]) -> dict[str, str]:
    """F&O entity key (property -> value) of a canonical natural key."""
    return {f.fo or f.key: key[f.key] for f in template.key_fields}


# ---------------------------------------------------------------- Dataverse


def lookup_column(f: FieldMap) -> str:
    """How Dataverse returns a lookup column in Web API JSON: `_<column>_value`."""
    return f"_{f.dataverse}_value"


def dataverse_values(template: Template, record: Mapping[str, Any]) -> tuple[Canonical, dict[str, str | None]]:
    """Canonical values of a Dataverse Web API record, with lookups left as row ids.

    Returns `(values, lookup_ids)`: lookup fields are not in `values` but in
    `lookup_ids` (field -> row id or None), because turning a row id into a
    natural key needs the resolver (I/O) that pure code must not do.
    """
    values: Canonical = {}
    lookup_ids: dict[str, str | None] = {}
    for f in template.all_fields:
        if f.dataverse is None or f.fo is None:
            continue
        if f.lookup is not None:
            column = lookup_column(f)
            if column in record:
                raw = record[column]
                lookup_ids[f.key] = str(raw).lower() if raw else None
            continue
        if f.dataverse not in record:
            continue
        values[f.key] = _from_dataverse(template, f, record[f.dataverse])
    return values, lookup_ids


def _from_dataverse(template: Template, f: FieldMap, raw: Any) -> Any:
    if f.value_map is None:
        return normalize(template, f, raw)
    if raw is None:
        return None
    for fo_value, dv_value in f.value_map.items():
        if type(dv_value) is type(raw) and dv_value == raw:
            return fo_value
    accepted = ", ".join(str(v) for v in f.value_map.values())
    raise _fail(template, f, raw, f"Dataverse value has no entry in the value map (accepted: {accepted})")


def resolve_lookups(template: Template, lookup_ids: Mapping[str, str | None], resolver: LookupResolver) -> Canonical:
    """Turn lookup row ids into natural keys; an id Dataverse does not know is a MappingError."""
    values: Canonical = {}
    for name, row_id in lookup_ids.items():
        f = template.field(name)
        if f.lookup is None:
            raise _fail(template, f, row_id, "is not a lookup field")
        if row_id is None:
            values[name] = None
            continue
        key = resolver.key_for(f.lookup, row_id)
        if key is None:
            raise _fail(template, f, row_id, f"no {f.lookup.table} row with this id")
        values[name] = normalize(template, f, key)
    return values


def dataverse_to_canonical(template: Template, record: Mapping[str, Any], resolver: LookupResolver) -> Canonical:
    """Canonical values of every mapped column present in a Dataverse Web API record."""
    values, lookup_ids = dataverse_values(template, record)
    values.update(resolve_lookups(template, lookup_ids, resolver))
    return values


def canonical_to_dataverse(
    template: Template, values: Mapping[str, Any], resolver: LookupResolver, *, create: bool = False
) -> dict[str, Any]:
    """The Dataverse body that writes `values` (fields that flow to Dataverse only).

    Lookups become `<nav>@odata.bind` to the row found by natural key; a key
    Dataverse does not have is a MappingError (the record is parked). Constant
    defaults of `>>` fields are added on create.
    """
    body: dict[str, Any] = {}
    for f in template.fields_to("dataverse"):
        if f.dataverse is None:
            continue
        if f.key in values:
            value = values[f.key]
            _check_length(template, f, value)
            if f.lookup is not None:
                body.update(_bind(template, f, value, resolver))
            elif f.value_map is not None:
                if value is None:
                    body[f.dataverse] = None
                elif value not in f.value_map:
                    raise _fail(template, f, value, f"not in the value map ({', '.join(f.value_map)})")
                else:
                    body[f.dataverse] = f.value_map[value]
            elif f.type == "decimal" and value is not None:
                body[f.dataverse] = _json_number(value)
            else:
                body[f.dataverse] = value
        elif create and f.default is not None:
            body[f.dataverse] = f.default
    return body


def _bind(template: Template, f: FieldMap, value: Any, resolver: LookupResolver) -> dict[str, Any]:
    if f.lookup is None:
        raise _fail(template, f, value, "is not a lookup field")
    name = f"{f.navigation_property}@odata.bind"
    if value is None:
        return {name: None}
    row_id = resolver.id_for(f.lookup, value)
    if row_id is None:
        raise _fail(template, f, value, f"Dataverse has no {f.lookup.table} with {f.lookup.key_column} {value!r}")
    return {name: f"/{f.lookup.entity_set}({row_id})"}


def dataverse_key(template: Template, key: Mapping[str, str]) -> dict[str, str]:
    """Dataverse alternate key (column -> value) of a canonical natural key."""
    return {f.dataverse or f.key: key[f.key] for f in template.key_fields}


def dataverse_select(template: Template) -> list[str]:
    """`$select` that reads every mapped column (lookups as their `_x_value`)."""
    columns = [template.dataverse.primary_id, "modifiedon", "versionnumber"]
    for f in template.all_fields:
        if f.dataverse:
            columns.append(lookup_column(f) if f.lookup else f.dataverse)
    return columns


def fo_select(template: Template) -> list[str]:
    """`$select` that reads every mapped F&O property."""
    columns = [f.fo for f in template.all_fields if f.fo]
    if template.fo.modified_field:
        columns.append(template.fo.modified_field)
    return columns


# ---------------------------------------------------------------- keys and helpers


def natural_key(template: Template, values: Mapping[str, Any], side: Side | None = None) -> dict[str, str]:
    """The natural key of a canonical record; a missing or empty key part is a MappingError."""
    key: dict[str, str] = {}
    for f in template.key_fields:
        value = values.get(f.key)
        if value is None or value == "":
            where = f" in the {side} record" if side else ""
            raise _fail(template, f, value, f"key field is missing or empty{where}")
        key[f.key] = str(value)
    return key


def key_text(key: Mapping[str, str]) -> str:
    """One readable string for a natural key (`usrt|C-1`), used as the state key."""
    return "|".join(key.values())


def _check_length(template: Template, f: FieldMap, value: Any) -> None:
    if f.max_length is not None and isinstance(value, str) and len(value) > f.max_length:
        raise _fail(template, f, value, f"longer than {f.max_length} characters ({len(value)})")


def _json_number(text: Any) -> int | float:
    number = Decimal(str(text))
    return int(number) if number == number.to_integral_value() else float(number)


def differing_fields(template: Template, left: Mapping[str, Any], right: Mapping[str, Any]) -> list[str]:
    """Names of fields whose canonical values differ (absent counts as None)."""
    return [f.key for f in template.all_fields if left.get(f.key) != right.get(f.key)]
