"""Transport envelopes: the request body as JSON, Event Grid (B4), CloudEvents and Service Bus (B5).

These only unwrap: they hand back the payloads inside (an F&O business event
or data event each) and leave turning them into ChangeEvents to `fno`. Pure:
no I/O. Anything unreadable raises `EventError` with the HTTP status to answer.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from loyaltysync.errors import EventError

MAX_EVENT_GRID_EVENTS = 5000
# Deep enough for a RemoteExecutionContext with a chain of ParentContexts,
# shallow enough that nothing downstream can hit the recursion limit.
MAX_JSON_DEPTH = 100
VALIDATION_EVENT_TYPE = "Microsoft.EventGrid.SubscriptionValidationEvent"
EVENT_GRID_TYPE_PREFIX = "Microsoft.EventGrid."
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


@dataclass(frozen=True, slots=True)
class ValidationRequest:
    """An Event Grid subscription validation: answer `{"validationResponse": code}` with 200."""

    code: str


@dataclass(frozen=True, slots=True)
class GridEvent:
    """One event of an Event Grid delivery: where it stood, its id and type, and its decoded `data`.

    `unreadable` says why `data` could not be decoded as JSON (it is then None): such an event is
    not an F&O one, whoever published it.
    """

    index: int
    id: str | None
    event_type: str
    data: Any
    unreadable: str | None = None


def decode_json(body: bytes | bytearray | memoryview | str, what: str = "body") -> Any:
    """The JSON value of a UTF-8 body (a BOM is tolerated); `EventError` 400 when it is not JSON.

    Also refused: nesting deeper than MAX_JSON_DEPTH, NaN/Infinity, and strings
    with unpaired surrogates (they cannot be written to either service).
    """
    if isinstance(body, str):
        text = body
    elif isinstance(body, bytes | bytearray | memoryview):
        try:
            text = bytes(body).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise EventError(f"{what} is not UTF-8 text (byte {exc.start})") from exc
    else:
        raise EventError(f"{what} must be bytes")
    if not text.strip():
        raise EventError(f"{what} is empty")
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise EventError(f"{what} is nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError, and integers past the digit limit
        raise EventError(f"{what} is not valid JSON: {str(exc)[:200]}") from exc
    # Decoded UTF-8 cannot hold a lone surrogate; only a \ud800-\udfff escape can produce one.
    check_strings = isinstance(body, str) or _SURROGATE_ESCAPE.search(text) is not None
    _check_value(value, what, check_strings=check_strings)
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _check_value(value: Any, what: str, *, check_strings: bool = True) -> None:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if check_strings and _LONE_SURROGATE.search(item):
                raise EventError(f"{what} has a string with an unpaired surrogate (\\ud800-\\udfff)")
            continue
        if not isinstance(item, dict | list):
            continue
        if depth > MAX_JSON_DEPTH:
            raise EventError(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, dict):
            children = [*item.keys(), *item.values()] if check_strings else list(item.values())
        else:
            children = item
        if check_strings:
            stack.extend((child, depth + 1) for child in children)
        else:
            stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


# ---------------------------------------------------------------- Event Grid and CloudEvents


def is_event_grid(value: Any) -> bool:
    """Whether a decoded body is an Event Grid delivery: an array, or one CloudEvent / Event Grid event."""
    if isinstance(value, list):
        return True
    return isinstance(value, dict) and (
        "specversion" in value or ("eventType" in value and "data" in value and "BusinessEventId" not in value)
    )


def read_event_grid(value: Any, headers: Mapping[str, str]) -> ValidationRequest | list[GridEvent]:
    """The validation request, or every notification event with its decoded `data`.

    Which events are F&O's is for the caller to decide: a topic may carry other
    publishers' events, and Event Grid's own notices (`Microsoft.EventGrid.*`).
    A malformed delivery (not an array of objects with an event type, bad
    `data_base64`) is `EventError` 400; more than MAX_EVENT_GRID_EVENTS events 413.
    """
    events = value if isinstance(value, list) else [value]
    if len(events) > MAX_EVENT_GRID_EVENTS:
        raise EventError(f"Event Grid delivery has {len(events)} events; at most {MAX_EVENT_GRID_EVENTS}", 413)
    if not events:
        raise EventError("Event Grid delivery has no events")
    for index, event in enumerate(events):
        if not isinstance(event, dict):
            raise EventError(f"Event Grid event [{index}] must be a JSON object")
    validations = [event for event in events if _event_type(event, 0) == VALIDATION_EVENT_TYPE]
    header = _header(headers, "aeg-event-type").lower()
    if validations or header == "subscriptionvalidation":
        if not validations:
            raise EventError(f"aeg-event-type SubscriptionValidation without a {VALIDATION_EVENT_TYPE} event")
        data = validations[0].get("data")
        code = data.get("validationCode") if isinstance(data, dict) else None
        if not isinstance(code, str) or not code:
            raise EventError("subscription validation event has no data.validationCode")
        return ValidationRequest(code)
    found: list[GridEvent] = []
    for index, event in enumerate(events):
        kind = _event_type(event, index)
        raw_id = event.get("id")
        event_id = raw_id if isinstance(raw_id, str) else None
        try:
            data = _event_data(event, index)
        except _NotJson as exc:
            found.append(GridEvent(index, event_id, kind, None, unreadable=str(exc)))
            continue
        found.append(GridEvent(index, event_id, kind, data))
    return found


class _NotJson(ValueError):
    """The event's data is not JSON (another publisher's binary or text payload)."""


def _event_type(event: dict[str, Any], index: int) -> str:
    kind = event.get("type") if "specversion" in event else event.get("eventType")
    if not isinstance(kind, str) or not kind:
        name = "type" if "specversion" in event else "eventType"
        raise EventError(f"Event Grid event [{index}] has no {name}")
    return kind


def _event_data(event: dict[str, Any], index: int) -> Any:
    where = f"Event Grid event [{index}] data"
    if "specversion" in event and "data" not in event and "data_base64" in event:
        encoded = event["data_base64"]
        if not isinstance(encoded, str):
            raise EventError(f"{where}_base64 must be a base64 string")
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise EventError(f"{where}_base64 is not base64") from exc
        return _json_or_not(raw, where)
    data = event.get("data")
    if isinstance(data, str):
        # Some publishers put the payload in as a JSON string rather than an object.
        return _json_or_not(data, where)
    return data


def _json_or_not(raw: bytes | str, where: str) -> Any:
    try:
        return decode_json(raw, where)
    except EventError as exc:
        raise _NotJson(exc.reason) from exc


def _header(headers: Mapping[str, str], name: str) -> str:
    for key, value in headers.items():
        if str(key).lower() == name:
            return str(value)
    return ""


def has_header(headers: Mapping[str, str], name: str) -> bool:
    """Whether `name` is among `headers`, in any letter case (HTTP header names are case-insensitive)."""
    return any(str(key).lower() == name.lower() for key in headers)


# ---------------------------------------------------------------- Service Bus


def read_service_bus(body: bytes | bytearray | memoryview | str, properties: Mapping[str, Any]) -> Any:
    """The F&O event a Service Bus message carries: its body, as JSON (B5).

    The application properties (`BusinessEventId`, `Category`, `LegalEntity`)
    only serve subscription filters; the body is authoritative, so they are
    not needed here and may be absent.
    """
    value = decode_json(body, "Service Bus message body")
    if not isinstance(value, dict):
        raise EventError("Service Bus message body must be a JSON object (the F&O event)")
    return value
