"""Read a serialized `RemoteExecutionContext` into a small typed object. Pure: no I/O.

Dataverse webhooks and F&O data events (proxied through the virtual tables)
both arrive as the DataContract JSON of `Microsoft.Xrm.Sdk.RemoteExecutionContext`
(wire-formats B1/B2, §1.11). Everything downstream wants the Dataverse Web API
JSON shape instead, because that is what `mapping.dataverse_values` reads and
what a re-read returns, so the attribute values are converted here:

- `{"__type":"OptionSetValue:…","Value":1}` -> `1`; Money -> its number;
- an EntityReference in attribute `x` -> `_x_value: "<id lower case>"`;
- `"/Date(1506384247000)/"` (optionally with `+zzzz`, or with the slashes still
  escaped) -> `"2017-09-26T00:04:07Z"`;
- DataContract-typed primitives, `{"__type": "Guid:#System", "__value": "…"}`
  (DateTime, Decimal, Double, Int32, Int64, Boolean, String…), -> the plain value,
  wherever a value may stand (attributes, images, input parameters, key attributes);
- strings, numbers, booleans and null as they are.

A shape that is not a RemoteExecutionContext raises `EventError` (400).
"""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from loyaltysync.errors import EventError
from loyaltysync.mapping import parse_datetime

TargetKind = Literal["Entity", "EntityReference"]

# DataContract dates: milliseconds since 1970 UTC, an optional informational
# offset, and the `\/` escape that sometimes survives double serialization.
_WCF_DATE = re.compile(r"^\\?/Date\((-?\d{1,18})([+-]\d{4})?\)\\?/$")
_WCF_LIKE = re.compile(r"^\\?/Date\(")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NIL_GUID = "00000000-0000-0000-0000-000000000000"
# The primitives the DataContract JSON serializer writes as {"__type": "<Name>:#System", "__value": ...}
# when they stand where any object may (an attribute value, a parameter): those whose plain JSON would
# read back as another type. All of them are unwrapped; what each becomes is decided by `_primitive`.
_INTEGERS = frozenset({"Byte", "SByte", "Int16", "Int32", "Int64", "UInt16", "UInt32", "UInt64"})
_REALS = frozenset({"Single", "Double", "Decimal"})
_TEXTS = frozenset({"String", "Char", "Uri", "TimeSpan"})


@dataclass(frozen=True, slots=True)
class EntityData:
    """An Entity (or EntityReference) of the context, attributes in Web API shape."""

    logical_name: str | None
    id: str | None
    attributes: dict[str, Any] = field(default_factory=dict)
    formatted_values: dict[str, str] = field(default_factory=dict)
    row_version: str | None = None
    # `KeyAttributes`: the alternate-key values the row was addressed by (Web API shape, like `attributes`).
    key_attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RemoteContext:
    """The parts of a RemoteExecutionContext the parsers use.

    `has_input_parameters` is False for the reduced form Dataverse sends when the
    payload exceeds 256 KB (InputParameters and images removed). `input_images`
    holds entity-valued input parameters other than Target, e.g. the `PreImage`
    that F&O data events carry inside InputParameters.
    """

    message_name: str
    primary_entity_name: str
    primary_entity_id: str | None
    has_input_parameters: bool
    target_kind: TargetKind | None
    target: EntityData | None
    pre_images: dict[str, EntityData]
    post_images: dict[str, EntityData]
    input_images: dict[str, EntityData]
    user_id: str | None
    initiating_user_id: str | None
    initiating_user_object_id: str | None  # `InitiatingUserAzureActiveDirectoryObjectId` (Entra object id)
    correlation_id: str | None
    operation_id: str | None
    request_id: str | None
    depth: int | None
    stage: int | None
    mode: int | None
    operation_created_on: str | None

    @property
    def initiating_user(self) -> str | None:
        """Who caused the change: `InitiatingUserId`, else the Entra object id; None for no one (nil GUID)."""
        return self.initiating_user_id or self.initiating_user_object_id


def read_remote_context(data: Any) -> RemoteContext:
    """Read a decoded RemoteExecutionContext JSON value; raise `EventError` (400) on a wrong shape."""
    if not isinstance(data, dict):
        raise EventError("a RemoteExecutionContext must be a JSON object")
    message = data.get("MessageName")
    if not isinstance(message, str) or not message:
        raise EventError("RemoteExecutionContext has no MessageName")
    primary = data.get("PrimaryEntityName")
    if not isinstance(primary, str) or not primary:
        raise EventError("RemoteExecutionContext has no PrimaryEntityName")
    has_inputs = data.get("InputParameters") is not None
    inputs = _pairs(data.get("InputParameters"), "InputParameters")
    target_kind: TargetKind | None = None
    target: EntityData | None = None
    input_images: dict[str, EntityData] = {}
    for name, raw in inputs:
        value = unwrap(raw, f"InputParameters.{name}")
        if name == "Target":
            if value is None:
                continue
            target_kind, target = _read_target(value)
        elif isinstance(value, dict) and "Attributes" in value:
            input_images[name] = read_entity(value, f"InputParameters.{name}")
    return RemoteContext(
        message_name=message,
        primary_entity_name=primary.lower(),
        primary_entity_id=_guid(data.get("PrimaryEntityId"), "PrimaryEntityId"),
        has_input_parameters=has_inputs,
        target_kind=target_kind,
        target=target,
        pre_images=_images(data.get("PreEntityImages"), "PreEntityImages"),
        post_images=_images(data.get("PostEntityImages"), "PostEntityImages"),
        input_images=input_images,
        user_id=_guid(data.get("UserId"), "UserId"),
        initiating_user_id=_guid(data.get("InitiatingUserId"), "InitiatingUserId"),
        initiating_user_object_id=_guid(
            data.get("InitiatingUserAzureActiveDirectoryObjectId"), "InitiatingUserAzureActiveDirectoryObjectId"
        ),
        correlation_id=_guid(data.get("CorrelationId"), "CorrelationId"),
        operation_id=_guid(data.get("OperationId"), "OperationId"),
        request_id=_guid(data.get("RequestId"), "RequestId"),
        depth=_int(data.get("Depth"), "Depth"),
        stage=_int(data.get("Stage"), "Stage"),
        mode=_int(data.get("Mode"), "Mode"),
        operation_created_on=read_datetime(data.get("OperationCreatedOn"), "OperationCreatedOn"),
    )


def read_entity(value: Any, where: str) -> EntityData:
    """Read an Entity object (`Attributes`, `FormattedValues`, `Id`, `KeyAttributes`, `LogicalName`, `RowVersion`)."""
    if not isinstance(value, dict):
        raise EventError(f"{where} must be an Entity object")
    attributes: dict[str, Any] = {}
    for name, raw in _pairs(value.get("Attributes"), f"{where}.Attributes"):
        column, converted = web_api_attribute(name, raw, f"{where}.Attributes.{name}")
        attributes[column] = converted
    key_attributes: dict[str, Any] = {}
    for name, raw in _pairs(value.get("KeyAttributes"), f"{where}.KeyAttributes"):
        column, converted = web_api_attribute(name, raw, f"{where}.KeyAttributes.{name}")
        key_attributes[column] = converted
    formatted = {
        name: text
        for name, text in _pairs(value.get("FormattedValues"), f"{where}.FormattedValues")
        if isinstance(text, str)
    }
    return EntityData(
        logical_name=_text(value.get("LogicalName"), f"{where}.LogicalName"),
        id=_guid(value.get("Id"), f"{where}.Id"),
        attributes=attributes,
        formatted_values=formatted,
        row_version=_text(value.get("RowVersion"), f"{where}.RowVersion"),
        key_attributes=key_attributes,
    )


def web_api_attribute(name: str, raw: Any, where: str) -> tuple[str, Any]:
    """One attribute as the Web API returns it: `(column, value)`; lookups become `_<name>_value`."""
    raw = unwrap(raw, where)
    if isinstance(raw, str):
        return name, _maybe_date(raw, where)
    if raw is None or isinstance(raw, bool | int | float):
        return name, raw
    if isinstance(raw, dict):
        kind = _type_name(raw)
        if kind == "EntityReference" or (kind is None and "Id" in raw and "LogicalName" in raw):
            return f"_{name}_value", _guid(raw.get("Id"), f"{where}.Id")
        if kind in ("OptionSetValue", "Money") or (kind is None and set(raw) == {"Value"}):
            return name, _number(raw.get("Value"), f"{where}.Value")
        # Entities, AliasedValues and the like carry nothing a template maps: kept as they came.
        return name, raw
    if isinstance(raw, list) and raw and all(_type_name(item) == "OptionSetValue" for item in raw):
        # A multi-select choice; the Web API writes it as "1,2,3".
        return name, ",".join(str(_number(item.get("Value"), where)) for item in raw)
    return name, raw


def unwrap(value: Any, where: str) -> Any:
    """The plain value of a DataContract-typed primitive (`{"__type": "Int32:#System", "__value": 5}` -> 5).

    Dates stay in the `/Date(ms)/` form they came in (the attribute reader converts them), GUIDs become
    lower case. Anything else is returned as it came. A typed primitive whose value does not fit its
    type is `EventError` (400): the payload contradicts itself.
    """
    if not isinstance(value, dict) or "__value" not in value:
        return value
    kind = value.get("__type")
    if not isinstance(kind, str) or not kind.endswith(":#System"):
        return value
    return _primitive(kind.split(":", 1)[0], value["__value"], where)


def _primitive(kind: str, inner: Any, where: str) -> Any:
    if inner is None:
        return None
    if kind == "Guid":
        if not isinstance(inner, str):
            raise EventError(f"{where}: Guid value must be a string")
        try:
            return str(uuid.UUID(inner.strip()))
        except ValueError as exc:
            raise EventError(f"{where}: Guid value is not a GUID: {inner[:40]!r}") from exc
    if kind in ("DateTime", "DateTimeOffset"):
        # DateTimeOffset is {"DateTime": "/Date(ms)/", "OffsetMinutes": n}; the milliseconds are UTC.
        moment = inner.get("DateTime") if kind == "DateTimeOffset" and isinstance(inner, dict) else inner
        if not isinstance(moment, str):
            raise EventError(f"{where}: {kind} value must be a date string")
        return moment
    if kind == "Boolean":
        if isinstance(inner, bool):
            return inner
        if isinstance(inner, str) and inner.lower() in ("true", "false"):
            return inner.lower() == "true"
        raise EventError(f"{where}: Boolean value must be true or false")
    if kind in _INTEGERS:
        number = _numeric(inner, where, kind)
        if not (isinstance(number, int) or number.is_integer()):
            raise EventError(f"{where}: {kind} value must be a whole number")
        return int(number)
    if kind in _REALS:
        return _numeric(inner, where, kind)
    if kind in _TEXTS:
        if not isinstance(inner, str):
            raise EventError(f"{where}: {kind} value must be a string")
        return inner
    return inner  # another System type: its value is all a template could map


def _numeric(inner: Any, where: str, kind: str) -> int | float:
    # Decimal and 64-bit values may come as strings so that JavaScript readers keep every digit.
    number: int | float
    if isinstance(inner, bool):
        raise EventError(f"{where}: {kind} value must be a number")
    if isinstance(inner, int | float):
        number = inner
    elif isinstance(inner, str):
        try:
            number = int(inner) if re.fullmatch(r"[+-]?\d+", inner.strip()) else float(inner)
        except ValueError as exc:
            raise EventError(f"{where}: {kind} value is not a number: {inner[:40]!r}") from exc
    else:
        raise EventError(f"{where}: {kind} value must be a number")
    if isinstance(number, float) and not math.isfinite(number):
        raise EventError(f"{where}: {kind} value must be a finite number")
    return number


def _read_target(value: Any) -> tuple[TargetKind, EntityData]:
    if not isinstance(value, dict):
        raise EventError("InputParameters.Target must be an Entity or an EntityReference object")
    kind = _type_name(value)
    if kind == "EntityReference" or (kind is None and "Attributes" not in value):
        return "EntityReference", EntityData(
            logical_name=_text(value.get("LogicalName"), "Target.LogicalName"),
            id=_guid(value.get("Id"), "Target.Id"),
        )
    return "Entity", read_entity(value, "Target")


def _images(value: Any, where: str) -> dict[str, EntityData]:
    return {
        alias: read_entity(image, f"{where}.{alias}")
        for alias, image in _pairs(value, where)
        if image is not None
    }


def _pairs(value: Any, where: str) -> list[tuple[str, Any]]:
    """A DataContract collection: a list of `{"key": ..., "value": ...}` (null or absent: empty)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise EventError(f"{where} must be a list of key/value pairs")
    pairs: list[tuple[str, Any]] = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("key"), str):
            raise EventError(f"{where} must be a list of {{\"key\": <string>, \"value\": ...}} objects")
        pairs.append((item["key"], item.get("value")))
    return pairs


def _type_name(value: Any) -> str | None:
    """`"OptionSetValue"` of `{"__type": "OptionSetValue:http://schemas..."}`; None without a `__type`."""
    if not isinstance(value, dict):
        return None
    kind = value.get("__type")
    return kind.split(":", 1)[0] if isinstance(kind, str) else None


def _maybe_date(text: str, where: str) -> str:
    match = _WCF_DATE.match(text)
    if not match:
        return text
    return _wcf_to_iso(int(match.group(1)), where)


def _wcf_to_iso(milliseconds: int, where: str) -> str:
    # The `+zzzz` part is informational: the milliseconds are already UTC.
    try:
        moment = _EPOCH + timedelta(milliseconds=milliseconds)
    except OverflowError as exc:
        raise EventError(f"{where}: date is out of range") from exc
    return iso_seconds(moment)


def iso_seconds(moment: datetime) -> str:
    """`YYYY-MM-DDTHH:MM:SSZ` of an aware datetime (the form Dataverse and the mapping use)."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="seconds") + "Z"


def read_datetime(value: Any, where: str) -> str | None:
    """A WCF `/Date(ms)/` or ISO-8601 string as `YYYY-MM-DDTHH:MM:SSZ`; null or "" is None; else `EventError`."""
    value = unwrap(value, where)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise EventError(f"{where} must be a date string")
    match = _WCF_DATE.match(value)
    if match:
        return _wcf_to_iso(int(match.group(1)), where)
    if _WCF_LIKE.match(value):
        raise EventError(f"{where} is not a date: {value[:40]!r}")
    try:
        moment = parse_datetime(value)
    except (ValueError, OverflowError, OSError) as exc:
        raise EventError(f"{where} is not a date: {value[:40]!r}") from exc
    return iso_seconds(moment) if moment else None


def _guid(value: Any, where: str) -> str | None:
    """A GUID in lower-case canonical form (braces or not, any case); None for null, "" and the nil GUID."""
    value = unwrap(value, where)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise EventError(f"{where} must be a GUID string")
    try:
        text = str(uuid.UUID(value.strip()))
    except ValueError as exc:
        raise EventError(f"{where} is not a GUID: {value[:40]!r}") from exc
    return None if text == _NIL_GUID else text


def _int(value: Any, where: str) -> int | None:
    value = unwrap(value, where)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise EventError(f"{where} must be an integer")
    return value


def _number(value: Any, where: str) -> int | float | None:
    if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
        return value
    raise EventError(f"{where} must be a number")


def _text(value: Any, where: str) -> str | None:
    value = unwrap(value, where)
    if value is None or isinstance(value, str):
        return value
    raise EventError(f"{where} must be a string")
