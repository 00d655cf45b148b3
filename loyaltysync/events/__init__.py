"""Inbound events: every wire format becomes `ChangeEvent`s here, and nowhere else. Pure: no I/O.

    parse_inbound("dataverse", body, headers, templates=...)  # Dataverse webhook
    parse_inbound("fo", body, headers, templates=...)         # data event, business event, Event Grid
    parse_service_bus(body, properties, templates=...)        # business event from Service Bus

Formats are told apart by shape (wire-formats part B). Anything unreadable
raises `EventError` with the HTTP status to answer (400 not JSON or wrong
shape, 413 too many events, 422 valid JSON for an unknown template, entity or
message) and never any other exception.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from loyaltysync.errors import EventError
from loyaltysync.events.dataverse import SIZE_EXCEEDED_HEADER, dataverse_change, template_for_table
from loyaltysync.events.envelopes import (
    EVENT_GRID_TYPE_PREFIX,
    GridEvent,
    ValidationRequest,
    decode_json,
    has_header,
    is_event_grid,
    read_event_grid,
    read_service_bus,
)
from loyaltysync.events.fno import (
    DATA_EVENT_OPERATIONS,
    business_event_change,
    data_event_change,
    read_business_event,
    template_for_business_event,
    template_for_virtual_table,
)
from loyaltysync.events.model import ChangeEvent, Operation, WireFormat
from loyaltysync.events.remote_context import read_remote_context
from loyaltysync.templates import Side, Template

__all__ = [
    "ChangeEvent",
    "EventError",
    "Handshake",
    "Operation",
    "Parsed",
    "Skipped",
    "WireFormat",
    "parse_inbound",
    "parse_service_bus",
]


@dataclass(slots=True)
class Handshake:
    """Not a change: a subscription handshake. Answer 200 with `response` as the JSON body."""

    response: dict[str, str]


@dataclass(frozen=True, slots=True)
class Skipped:
    """An event of an Event Grid delivery that is not F&O's (another publisher's, or Event Grid's own)."""

    index: int
    id: str | None
    event_type: str
    reason: str


@dataclass(slots=True)
class Parsed:
    """The changes a delivery announced (Event Grid may batch several), and the events it left out."""

    events: list[ChangeEvent]
    skipped: list[Skipped] = field(default_factory=list)


def parse_inbound(
    side: Side,
    body: bytes,
    headers: Mapping[str, str],
    *,
    templates: Mapping[str, Template],
    template: Template | None = None,
) -> Handshake | Parsed:
    """Read one HTTP delivery from `side` into change events (or a handshake to answer).

    Side "dataverse": a RemoteExecutionContext (Create/Update/Delete webhook).
    Side "fo": an Event Grid array or CloudEvent, a business event (has
    `BusinessEventId`) or a data event (MessageName `OnExternal*`). Without
    `template` the template is found from the payload; with it (the
    per-template route) a payload for another entity is `EventError` 422.
    An Event Grid delivery may mix publishers: events whose data is not an F&O
    event are left out and listed in `Parsed.skipped`, never a reason to refuse
    the others; an F&O event that cannot be read refuses the delivery, naming
    its index, id and type.
    """
    value = decode_json(body)
    if side == "dataverse":
        return Parsed([_dataverse_event(value, headers, templates, template)])
    if side == "fo":
        if is_event_grid(value):
            unwrapped = read_event_grid(value, headers)
            if isinstance(unwrapped, ValidationRequest):
                return Handshake({"validationResponse": unwrapped.code})
            return _event_grid_events(unwrapped, templates, template)
        return Parsed([_fo_event(value, templates, template, None)])
    raise EventError(f"unknown side {side!r}: 'fo' or 'dataverse'")


def parse_service_bus(
    body: bytes,
    properties: Mapping[str, Any],
    *,
    templates: Mapping[str, Template],
    template: Template | None = None,
) -> Parsed:
    """Read one Service Bus message (an F&O business event or data event) into a change event."""
    payload = read_service_bus(body, properties)
    return Parsed([_fo_event(payload, templates, template, "service-bus")])


def _dataverse_event(
    value: Any, headers: Mapping[str, str], templates: Mapping[str, Template], template: Template | None
) -> ChangeEvent:
    if not isinstance(value, dict) or "MessageName" not in value:
        raise EventError("a Dataverse webhook body is a RemoteExecutionContext JSON object (no MessageName)")
    context = read_remote_context(value)
    if context.message_name in DATA_EVENT_OPERATIONS:
        raise EventError(
            f"{context.message_name} is an F&O data event: register it on the F&O route, not the Dataverse one",
            422,
        )
    chosen = template_for_table(context.primary_entity_name, templates, template)
    return dataverse_change(context, chosen, size_exceeded=has_header(headers, SIZE_EXCEEDED_HEADER))


def _event_grid_events(
    grid_events: list[GridEvent], templates: Mapping[str, Template], template: Template | None
) -> Parsed:
    events: list[ChangeEvent] = []
    skipped: list[Skipped] = []
    for item in grid_events:
        reason = _not_fo(item)
        if reason is not None:
            skipped.append(Skipped(item.index, item.id, item.event_type, reason))
            continue
        try:
            events.append(_fo_event(item.data, templates, template, "event-grid"))
        except EventError as exc:
            raise EventError(
                f"Event Grid event [{item.index}] (id {item.id!r}, eventType {item.event_type!r}): {exc.reason}",
                exc.status,
            ) from exc
    return Parsed(events, skipped)


def _not_fo(item: GridEvent) -> str | None:
    """Why an Event Grid event is not an F&O one (None when it is): judged by its data, not its type name."""
    if item.event_type.startswith(EVENT_GRID_TYPE_PREFIX):
        return "an Event Grid system event"
    if item.unreadable is not None:
        return f"its data is not JSON ({item.unreadable})"
    if not isinstance(item.data, dict) or not ("BusinessEventId" in item.data or "MessageName" in item.data):
        return "its data is not an F&O business event (BusinessEventId) or data event (MessageName)"
    return None


def _fo_event(
    payload: Any, templates: Mapping[str, Template], template: Template | None, envelope: WireFormat | None
) -> ChangeEvent:
    """One F&O payload: a business event or a data event, perhaps inside an envelope."""
    if not isinstance(payload, dict):
        raise EventError("an F&O event must be a JSON object")
    if "BusinessEventId" in payload:
        event = read_business_event(payload)
        chosen = template_for_business_event(event, templates, template)
        return business_event_change(event, chosen, wire_format=envelope or "fo-business-event")
    if "MessageName" in payload:
        context = read_remote_context(payload)
        if context.message_name not in DATA_EVENT_OPERATIONS:
            raise EventError(
                f"message {context.message_name!r} is not an F&O data event "
                "(OnExternalCreated, OnExternalUpdated or OnExternalDeleted)",
                422,
            )
        chosen = template_for_virtual_table(context.primary_entity_name, templates, template)
        return data_event_change(context, chosen, wire_format=envelope or "fo-data-event")
    raise EventError(
        "not an F&O event: expected a business event (BusinessEventId), a data event "
        "(MessageName OnExternal*) or an Event Grid array"
    )
