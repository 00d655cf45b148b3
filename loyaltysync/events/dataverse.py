"""Dataverse webhook (RemoteExecutionContext) -> ChangeEvent(side="dataverse"). Pure: no I/O.

Part C: Target merged over the registered post-image is the record when it is
complete; otherwise (no image, the reduced 256 KB form) the worker re-reads the
row by its id. A delete carries only an EntityReference: its key comes from the
pre-image, or from the sync state by row id.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from loyaltysync.errors import EventError, MappingError
from loyaltysync.events.model import ChangeEvent, Operation, derived_event_id
from loyaltysync.events.remote_context import EntityData, RemoteContext, read_datetime
from loyaltysync.mapping import Canonical, dataverse_values, lookup_column, natural_key
from loyaltysync.templates import Template

OPERATIONS: dict[str, Operation] = {"Create": "create", "Update": "update", "Delete": "delete"}
SIZE_EXCEEDED_HEADER = "x-ms-dynamics-msg-size-exceeded"


def template_for_table(
    table: str, templates: Mapping[str, Template], template: Template | None = None
) -> Template:
    """The template whose `dataverse.table` is `table`; with `template` given, check it is that one (422)."""
    if template is not None:
        if template.dataverse.table.lower() != table.lower():
            raise EventError(
                f"webhook is for Dataverse table {table!r}, but this route is template {template.name!r} "
                f"(table {template.dataverse.table!r})",
                422,
            )
        return template
    for candidate in templates.values():
        if candidate.dataverse.table.lower() == table.lower():
            return candidate
    raise EventError(f"no template syncs Dataverse table {table!r}", 422)


def dataverse_change(context: RemoteContext, template: Template, *, size_exceeded: bool = False) -> ChangeEvent:
    """The change a Dataverse webhook announces, normalized.

    `fields` and `lookup_ids` are the canonical values the payload carried (Target
    over the post-image; a delete's pre-image); `complete` is True only when every
    synced field is among them. `key` is the natural key when the record carries
    the alternate-key columns, else `{}` (the worker finds it by `row_id`).
    Raises `EventError` 422 for another table or a message other than
    Create/Update/Delete.
    """
    operation = OPERATIONS.get(context.message_name)
    if operation is None:
        hint = " (an F&O data event: send it to the F&O route)" if context.message_name.startswith("OnExternal") else ""
        raise EventError(
            f"Dataverse message {context.message_name!r} is not synced: only Create, Update and Delete{hint}", 422
        )
    if context.primary_entity_name != template.dataverse.table.lower():
        raise EventError(
            f"webhook is for Dataverse table {context.primary_entity_name!r}, not {template.dataverse.table!r} "
            f"of template {template.name!r}",
            422,
        )
    # Over 256 KB Dataverse drops InputParameters and the images: only ids remain.
    reduced = size_exceeded or not context.has_input_parameters
    images = [] if reduced else _record_sources(context, operation)
    record: dict[str, Any] = {}
    for image in images:
        record.update(_with_null_lookups(template, _with_key_attributes(image)))
    values, lookup_ids, all_mapped = _canonical(template, record)
    before = {} if reduced or operation != "update" else _before(template, context)
    row_id = _row_id(context, template, record)
    key = _key(template, values)
    if not key and row_id is None:
        raise EventError(
            f"{context.message_name} webhook for {template.dataverse.table!r} has neither the alternate key "
            "nor a row id",
            422,
        )
    synced = [f for f in template.all_fields if f.fo and f.dataverse]
    present = all((f.key in lookup_ids) if f.lookup else (f.key in values) for f in synced)
    return ChangeEvent(
        template=template.name,
        side="dataverse",
        operation=operation,
        key=key,
        fields=values,
        complete=not reduced and all_mapped and present,
        lookup_ids=lookup_ids,
        row_id=row_id,
        source_version=_version(context, operation, record),
        modified_on=_modified_on(context, operation, record),
        event_id=context.operation_id or context.request_id or _derived_id(context, key, row_id, record),
        correlation_id=context.correlation_id,
        initiating_user=context.initiating_user,
        wire_format="dataverse-webhook",
        before=before,
    )


def _before(template: Template, context: RemoteContext) -> dict[str, Any]:
    """The pre-image's canonical values (lookups left out: they would need resolving); empty without one."""
    record: dict[str, Any] = {}
    for image in context.pre_images.values():
        record.update(image.attributes)
    if not record:
        return {}
    values, _, _ = _canonical(template, record)
    lookups = {f.key for f in template.all_fields if f.lookup is not None}
    return {name: value for name, value in values.items() if name not in lookups}


def _record_sources(context: RemoteContext, operation: Operation) -> list[EntityData]:
    """Images in merge order, the last one winning."""
    if operation == "delete":
        return list(context.pre_images.values())
    sources = list(context.post_images.values())
    if context.target_kind == "Entity" and context.target is not None:
        sources.append(context.target)  # what was submitted wins over the image
    return sources


def _with_key_attributes(image: EntityData) -> dict[str, Any]:
    # A Target addressed by alternate key carries the key in KeyAttributes, not always in Attributes.
    return {**image.key_attributes, **image.attributes}


def _derived_id(context: RemoteContext, key: Mapping[str, str], row_id: str | None, record: Mapping[str, Any]) -> str:
    """An id from the event itself, the same at every delivery of it (for payloads without OperationId)."""
    return derived_event_id(
        {
            "entity": context.primary_entity_name,
            "message": context.message_name,
            "key": dict(key),
            "row": row_id,
            "time": context.operation_created_on,
            "values": dict(record),
        }
    )


def _with_null_lookups(template: Template, attributes: Mapping[str, Any]) -> dict[str, Any]:
    # A cleared lookup arrives as `x: null`, with no EntityReference to tell it
    # is a lookup; the template knows, and the Web API shape says `_x_value`.
    # Done per image, so that a Target clearing the lookup wins over the image.
    record = dict(attributes)
    for f in template.all_fields:
        if f.lookup is not None and f.dataverse in record and record[f.dataverse] is None:
            del record[f.dataverse]
            record[lookup_column(f)] = None
    return record


def _canonical(template: Template, record: Mapping[str, Any]) -> tuple[Canonical, dict[str, str | None], bool]:
    """Canonical values and lookup ids, and whether every value mapped.

    A value the mapping rejects (say a choice integer missing from the value map)
    must not turn the webhook into a 4xx: Dataverse would retry or give up and
    the change would be lost without a trace. The field is dropped and the event
    marked incomplete instead, so the worker re-reads the row and the same
    MappingError surfaces there, where it parks the record with its reason.
    """
    try:
        values, lookup_ids = dataverse_values(template, record)
        ok = True
    except MappingError:
        values, lookup_ids, ok = {}, {}, False
        for column, raw in record.items():  # each field reads one column: map them one at a time
            try:
                one_value, one_lookup = dataverse_values(template, {column: raw})
            except MappingError:
                continue
            values.update(one_value)
            lookup_ids.update(one_lookup)
    for name, row_id in list(lookup_ids.items()):
        if row_id is None:
            continue
        canonical = _canonical_guid(row_id)
        if canonical is None:
            del lookup_ids[name]  # only a row id can be resolved; anything else is re-read
            ok = False
        else:
            lookup_ids[name] = canonical
    return values, lookup_ids, ok


def _key(template: Template, values: Canonical) -> dict[str, str]:
    try:
        return natural_key(template, values, "dataverse")
    except MappingError:
        return {}


def _row_id(context: RemoteContext, template: Template, record: Mapping[str, Any]) -> str | None:
    if context.primary_entity_id:
        return context.primary_entity_id
    if context.target is not None and context.target.id:
        return context.target.id
    raw = record.get(template.dataverse.primary_id)
    return _canonical_guid(raw) if isinstance(raw, str) else None


def _version(context: RemoteContext, operation: Operation, record: Mapping[str, Any]) -> str | None:
    """The row's version the event shows: `versionnumber`, else the images' `RowVersion` (the same number).

    A delete's is that of the row it removed (its pre-image): the version of the row's last change.
    The Target's RowVersion is never used: when set, it is the version the caller *expected* (an
    optimistic-concurrency check), which is older than the change.
    """
    raw = record.get("versionnumber")
    if isinstance(raw, int | str) and not isinstance(raw, bool) and str(raw):
        return str(raw)
    images = context.pre_images if operation == "delete" else context.post_images
    for image in reversed(list(images.values())):
        if image.row_version:
            return image.row_version
    return None


def _modified_on(context: RemoteContext, operation: Operation, record: Mapping[str, Any]) -> str | None:
    # A delete's pre-image says when the row was last changed, not when it was
    # deleted: the operation time is the delete's own time.
    if operation != "delete":
        try:
            modified = read_datetime(record.get("modifiedon"), "modifiedon")
        except EventError:
            modified = None  # an odd value in one column is no reason to refuse the event
        if modified is not None:
            return modified
    return context.operation_created_on


def _canonical_guid(text: str) -> str | None:
    try:
        value = uuid.UUID(text)
    except ValueError:
        return None
    return str(value) if value.int else None
