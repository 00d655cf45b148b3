"""F&O events -> ChangeEvent(side="fo"). Pure: no I/O.

Two shapes announce an F&O change (wire-formats B2, B3):
- data events, proxied by the Power Platform integration as a
  RemoteExecutionContext of the virtual table (`OnExternalCreated` ...);
- business events, a flat PascalCase JSON object (`BusinessEventId`, ...).

Both are notifications only (part C): they give the natural key, and the
worker re-reads the record from F&O OData. Virtual-table enum integers are not
stable between systems, payloads may be partial and null dates are dropped,
so nothing else in them is trusted: `fields` stays empty, `complete` False.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loyaltysync.errors import EventError, MappingError
from loyaltysync.events.model import ChangeEvent, Operation, WireFormat, derived_event_id
from loyaltysync.events.remote_context import RemoteContext, read_datetime
from loyaltysync.mapping import normalize
from loyaltysync.templates import COMPANY_FIELD, FieldMap, Template

DATA_EVENT_OPERATIONS: dict[str, Operation] = {
    "OnExternalCreated": "create",
    "OnExternalUpdated": "update",
    "OnExternalDeleted": "delete",
}
CHANGE_TYPES: dict[str, Operation] = {
    "created": "create",
    "create": "create",
    "updated": "update",
    "update": "update",
    "deleted": "delete",
    "delete": "delete",
}
VIRTUAL_TABLE_PREFIX = "mserp_"
PRIMARY_FIELD = "mserp_primaryfield"


# ---------------------------------------------------------------- data events (virtual tables)


def template_for_virtual_table(
    table: str, templates: Mapping[str, Template], template: Template | None = None
) -> Template:
    """The template whose `fo.virtual_table_name` is `table`; with `template` given, check it (422).

    A given template that names no virtual table accepts any `mserp_` table no
    other template claims.
    """
    table = table.lower()
    owner = next(
        (t for t in templates.values() if (t.fo.virtual_table_name or "").lower() == table),
        None,
    )
    if template is None:
        if owner is None:
            raise EventError(f"no template has the F&O virtual table {table!r} (fo.virtual_table)", 422)
        return owner
    expected = template.fo.virtual_table_name
    if expected is not None and expected.lower() != table:
        raise EventError(
            f"data event is for virtual table {table!r}, but this route is template {template.name!r} "
            f"(virtual table {expected!r})",
            422,
        )
    if expected is None and owner is not None and owner.name != template.name:
        raise EventError(
            f"data event is for virtual table {table!r} of template {owner.name!r}, but this route is "
            f"template {template.name!r}",
            422,
        )
    if not table.startswith(VIRTUAL_TABLE_PREFIX):
        raise EventError(f"{table!r} is not an F&O virtual table (mserp_...)", 422)
    return template


def virtual_column(f: FieldMap) -> str:
    """The virtual-table column of an F&O property: `mserp_<property lower case>`."""
    return VIRTUAL_TABLE_PREFIX + (f.fo or f.key).lower()


def data_event_change(
    context: RemoteContext, template: Template, *, wire_format: WireFormat = "fo-data-event"
) -> ChangeEvent:
    """The F&O change a data event announces: operation, natural key and, for an update, which
    mapped fields it changed (`changed`: the Target's columns, less those the pre-image holds with the
    same value). Values are re-read from F&O.

    The key comes from the `mserp_` key columns (Target over the images), else from
    `mserp_primaryfield` (`company|key1|key2`). Raises `EventError` 422 for a
    message other than OnExternalCreated/Updated/Deleted or a payload without a key.
    """
    operation = DATA_EVENT_OPERATIONS.get(context.message_name)
    if operation is None:
        raise EventError(
            f"message {context.message_name!r} is not an F&O data event "
            "(OnExternalCreated, OnExternalUpdated or OnExternalDeleted)",
            422,
        )
    record: dict[str, Any] = {}
    for image in (*context.pre_images.values(), *context.input_images.values(), *context.post_images.values()):
        record.update({**image.key_attributes, **image.attributes})
    changed: list[str] = []
    if context.target is not None:
        record.update({**context.target.key_attributes, **context.target.attributes})
        if operation == "update":
            keys = set(template.key_names)
            before: dict[str, Any] = {}
            for image in context.pre_images.values():
                before.update(image.attributes)
            submitted = context.target.attributes
            # A column the pre-image holds with the same value was submitted, not changed (a form saved
            # whole): named as changed, it dated an older F&O edit of that field as new as this one.
            changed = [
                f.key
                for f in template.all_fields
                if f.fo and f.key not in keys and (column := virtual_column(f)) in submitted
                and (column not in before or before[column] != submitted[column])
            ]
    key = _data_event_key(template, record, context.message_name)
    # Without OperationId/RequestId the id comes from the event itself, so a redelivery is the same event.
    event_id = context.operation_id or context.request_id or derived_event_id(
        {
            "entity": context.primary_entity_name,
            "message": context.message_name,
            "key": key,
            "row": context.primary_entity_id,
            "time": context.operation_created_on,
            "values": record,
        }
    )
    return ChangeEvent(
        template=template.name,
        side="fo",
        operation=operation,
        key=key,
        modified_on=context.operation_created_on,
        event_id=event_id,
        correlation_id=context.correlation_id,
        initiating_user=context.initiating_user,
        wire_format=wire_format,
        changed=changed,
    )


def _data_event_key(template: Template, record: Mapping[str, Any], message: str) -> dict[str, str]:
    columns = {f.key: virtual_column(f) for f in template.key_fields}
    if all(record.get(column) not in (None, "") for column in columns.values()):
        return {
            f.key: _key_part(template, f, record[columns[f.key]], f"column {columns[f.key]}")
            for f in template.key_fields
        }
    primary = record.get(PRIMARY_FIELD)
    if not isinstance(primary, str) or not primary:
        wanted = ", ".join(columns.values())
        raise EventError(f"{message} data event carries no key: neither {wanted} nor {PRIMARY_FIELD}", 422)
    count = len(template.key_fields)
    # Only the last key part may itself contain "|": nothing else can be told apart.
    parts = primary.split("|", count - 1)
    if len(parts) != count:
        names = "|".join(template.key_names)
        raise EventError(f"{PRIMARY_FIELD} {primary[:80]!r} does not have the {count} parts {names}", 422)
    pairs = zip(template.key_fields, parts, strict=True)
    return {f.key: _key_part(template, f, part, PRIMARY_FIELD) for f, part in pairs}


# ---------------------------------------------------------------- business events


class BusinessEventEnvelope(BaseModel):
    """The fixed fields every F&O business event carries (B3); the rest are the event's own."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    BusinessEventId: str = Field(min_length=1)
    ControlNumber: int
    EventId: str = Field(min_length=1)
    EventTime: str | None = None
    EventTimeIso8601: str | None = None
    BusinessEventLegalEntity: str | None = None
    InitiatingUserAADObjectId: str | None = None
    ContextRecordSubject: str | None = None
    MajorVersion: int | None = None
    MinorVersion: int | None = None
    ParentContextRecordSubjects: list[Any] | None = None


ENVELOPE_FIELDS = frozenset(BusinessEventEnvelope.model_fields)


@dataclass(frozen=True, slots=True)
class BusinessEvent:
    """A validated business event: its envelope and its own fields (by name as sent)."""

    envelope: BusinessEventEnvelope
    own: dict[str, Any]

    def field(self, name: str) -> tuple[str, Any] | None:
        """The own field called `name`, matched case-insensitively (an exact match first)."""
        if name in self.own:
            return name, self.own[name]
        matches = [k for k in self.own if k.lower() == name.lower()]
        if len(matches) > 1:
            raise EventError(
                f"business event {self.envelope.BusinessEventId} has {', '.join(sorted(matches))}: which one is {name}?"
            )
        return (matches[0], self.own[matches[0]]) if matches else None

    @property
    def entity_name(self) -> str | None:
        found = self.field("EntityName")
        if found is None or found[1] in (None, ""):
            return None
        if not isinstance(found[1], str):
            raise EventError("business event field EntityName must be a string")
        return found[1]


def read_business_event(data: Any) -> BusinessEvent:
    """Validate the envelope of a decoded business event; `EventError` 400 names the bad field."""
    if not isinstance(data, dict):
        raise EventError("a business event must be a JSON object")
    try:
        envelope = BusinessEventEnvelope.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "(event)"
        raise EventError(f"business event: {where}: {first['msg']}") from exc
    own = {k: v for k, v in data.items() if k not in ENVELOPE_FIELDS}
    return BusinessEvent(envelope=envelope, own=own)


def template_for_business_event(
    event: BusinessEvent, templates: Mapping[str, Template], template: Template | None = None
) -> Template:
    """The template a business event is about: `fo.business_events` lists its id, or its
    `EntityName` field is the template's entity. With `template` given, check it (422)."""
    event_id = event.envelope.BusinessEventId
    entity = event.entity_name
    listed = next((t for t in templates.values() if event_id in t.fo.business_events), None)
    if template is None:
        if listed is not None:
            return listed
        by_entity = next((t for t in templates.values() if entity and _is_entity(t, entity)), None)
        if by_entity is not None:
            return by_entity
        about = f" about entity {entity!r}" if entity else ""
        raise EventError(f"no template lists business event {event_id!r}{about} (fo.business_events)", 422)
    if event_id in template.fo.business_events:
        return template
    if entity:
        if _is_entity(template, entity):
            return template
        raise EventError(
            f"business event {event_id!r} is about entity {entity!r}, but this route is template "
            f"{template.name!r} (entity {template.fo.entity_set!r})",
            422,
        )
    if listed is not None:
        raise EventError(
            f"business event {event_id!r} belongs to template {listed.name!r}, but this route is template "
            f"{template.name!r}",
            422,
        )
    if template.fo.business_events:
        raise EventError(
            f"business event {event_id!r} is not one of template {template.name!r}'s "
            f"fo.business_events ({', '.join(template.fo.business_events)})",
            422,
        )
    return template


def business_event_change(
    event: BusinessEvent, template: Template, *, wire_format: WireFormat = "fo-business-event"
) -> ChangeEvent:
    """The F&O change a business event announces.

    Key from the event's own fields by F&O property name (case-insensitive); the
    company from `dataAreaId` or `BusinessEventLegalEntity`; operation from an
    optional `ChangeType` (absent: "update", i.e. re-read and see). Raises
    `EventError` 422 when a key field is missing or unusable.
    """
    envelope = event.envelope
    key: dict[str, str] = {}
    for f in template.key_fields:
        found = event.field(f.fo or f.key)
        if found is None and f.key == COMPANY_FIELD and envelope.BusinessEventLegalEntity:
            found = ("BusinessEventLegalEntity", envelope.BusinessEventLegalEntity)
        if found is None or found[1] in (None, ""):
            raise EventError(
                f"business event {envelope.BusinessEventId!r} carries no {f.fo or f.key} "
                f"(key of template {template.name!r})",
                422,
            )
        key[f.key] = _key_part(template, f, found[1], f"field {found[0]}")
    return ChangeEvent(
        template=template.name,
        side="fo",
        operation=_change_type(event),
        key=key,
        source_version=str(envelope.ControlNumber),
        modified_on=_event_time(envelope),
        event_id=_maybe_guid(envelope.EventId),
        initiating_user=_user(envelope.InitiatingUserAADObjectId),
        wire_format=wire_format,
    )


def _change_type(event: BusinessEvent) -> Operation:
    found = event.field("ChangeType")
    if found is None or found[1] in (None, ""):
        return "update"
    if not isinstance(found[1], str):
        raise EventError("business event field ChangeType must be a string")
    operation = CHANGE_TYPES.get(found[1].lower())
    if operation is None:
        raise EventError(f"business event ChangeType {found[1][:40]!r} is not Created, Updated or Deleted", 422)
    return operation


def _event_time(envelope: BusinessEventEnvelope) -> str | None:
    # Both are read, so a malformed one is reported even when the other would do.
    iso = read_datetime(envelope.EventTimeIso8601, "business event EventTimeIso8601")
    wcf = read_datetime(envelope.EventTime, "business event EventTime")
    # /Date(-2208988800000)/ is F&O's empty date (1900-01-01): no time at all.
    known = [moment for moment in (iso, wcf) if moment and not moment.startswith("1900-01-01")]
    return known[0] if known else None


def _user(text: str | None) -> str | None:
    """An Entra object id in lower-case canonical form; None for none: empty, or the nil GUID F&O sends
    (`{00000000-0000-0000-0000-000000000000}`) when no user started the event."""
    if not text or not text.strip():
        return None
    canonical = _maybe_guid(text)
    try:
        return None if uuid.UUID(canonical).int == 0 else canonical
    except ValueError:
        return canonical.strip().strip("{}").lower() or None  # not a GUID: compared as written


def _maybe_guid(text: str) -> str:
    """A GUID (braces or not) in lower-case canonical form; any other id as it came."""
    try:
        return str(uuid.UUID(text.strip()))
    except ValueError:
        return text


# ---------------------------------------------------------------- shared


def _is_entity(template: Template, name: str) -> bool:
    names = {template.fo.entity_set.lower(), (template.fo.entity_type or "").lower()}
    return name.lower() in names


def _key_part(template: Template, f: FieldMap, raw: Any, where: str) -> str:
    """One natural-key value, canonical (company lower case); 422 when it is not a usable key."""
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise EventError(f"{where}: key {f.key} must be a string or a number", 422)
    if f.type == "string" and isinstance(raw, int):
        raw = str(raw)  # a numeric-looking id serialized as a number is still that id
    try:
        value = normalize(template, f, raw)
    except MappingError as exc:
        raise EventError(f"{where}: {exc}", 422) from exc
    if value is None or value == "":
        raise EventError(f"{where}: key {f.key} is empty", 422)
    return str(value)
