"""Row writes shared by single requests, `$batch` parts and the bulk messages.

`parse_body` turns a JSON entity (columns and `@odata.bind` lookups) into stored
values; `locate` resolves a key predicate (GUID or alternate key); `create`,
`update` and `delete` change the store, stamp the platform columns and return
the `Change` that webhooks are built from. Nothing here speaks HTTP.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from devkit.sandbox.dataverse import registration
from devkit.sandbox.dataverse.errors import (
    DUPLICATE,
    NOT_FOUND,
    ODATA,
    PAYLOAD,
    SEGMENT_NOT_FOUND,
    DataverseError,
    bad_request,
    key_not_found,
    unknown_property,
)
from devkit.sandbox.dataverse.org import REGISTRATION_TABLES, Organization
from devkit.sandbox.dataverse.paths import KEY_FORBIDDEN, split_path
from devkit.sandbox.dataverse.schema import Column, TableDef
from devkit.sandbox.dataverse.scope import Caller, Change
from devkit.sandbox.dataverse.values import coerce, parse_guid
from devkit.sandbox.odata import ODataSyntaxError, parse_key_predicate
from devkit.sandbox.store import DuplicateKey

BIND = "@odata.bind"
_ONE_STRING_KEY = re.compile(r"([A-Za-z_]\w*)='((?:[^']|'')*)'")


@dataclass
class Address:
    """Where a key predicate points: the row (if it exists) and, for alternate keys, the key values."""

    definition: TableDef
    row: dict[str, Any] | None
    row_id: str | None
    key_values: dict[str, Any] = field(default_factory=dict)

    @property
    def by_key(self) -> bool:
        return bool(self.key_values)


def _invalid_key(definition: TableDef) -> DataverseError:
    name = f"Microsoft.Dynamics.CRM.{definition.logical_name}"
    return bad_request(
        f"The key in the request URI is not valid for resource '{name}'. Ensure that the names and number of key "
        f"properties match the declared or alternate key properties for the resource '{name}'."
    )


def _pairs(key_text: str) -> list[tuple[str | None, str | int]]:
    # Bulk upserts address every row by `column='value'`: read that shape without the tokenizer.
    single = _ONE_STRING_KEY.fullmatch(key_text)
    if single is not None:
        return [(single.group(1), single.group(2).replace("''", "'"))]
    try:
        return parse_key_predicate(key_text)
    except ODataSyntaxError as exc:
        raise bad_request(exc.message) from exc


def locate(org: Organization, definition: TableDef, key_text: str) -> Address:
    """Resolve `<guid>`, `<id column>=<guid>` or `<alternate key columns>='value'` to an `Address`."""
    return locate_pairs(org, definition, _pairs(key_text))


def locate_pairs(org: Organization, definition: TableDef, pairs: Sequence[tuple[str | None, Any]]) -> Address:
    """`locate` for a key predicate already split into (name, value) pairs (decoded values)."""
    table = org.tables[definition.logical_name]
    if len(pairs) == 1 and pairs[0][0] in (None, definition.primary_id):
        value = pairs[0][1]
        guid = parse_guid(value) if isinstance(value, str) else None
        if guid is None:
            raise _invalid_key(definition)
        return Address(definition, table.get(guid), guid)
    columns: dict[str, Any] = {}
    for name, value in pairs:
        if name is None:
            raise _invalid_key(definition)
        column_name = name[1:-6] if name.startswith("_") and name.endswith("_value") else name
        if column_name not in definition.columns or column_name in columns:
            raise _invalid_key(definition)
        if isinstance(value, str) and not KEY_FORBIDDEN.isdisjoint(value):
            bad = next(char for char in value if char in KEY_FORBIDDEN)
            raise bad_request(f"A potentially dangerous Request.Path value was detected from the client ({bad}).")
        columns[column_name] = coerce(definition.columns[column_name], value, definition.logical_name)
    key = definition.key_named(columns)
    if key is None:
        raise _invalid_key(definition)
    row = table.find(",".join(key.columns), tuple(columns[c] for c in key.columns))
    return Address(definition, row, row[definition.primary_id] if row else None, columns)


def resolve_bind(org: Organization, column: Column, nav: str, reference: Any) -> str | None:
    """The id an `@odata.bind` URL (by id or alternate key, relative or absolute) points at."""
    if reference is None:
        return None
    if not isinstance(reference, str):
        raise bad_request(f"The value of '{nav}{BIND}' must be a URL string.", PAYLOAD)
    path = reference
    if "/api/data/" in path:
        # Absolute or rooted form: drop everything up to and including the version segment.
        path = path.split("/api/data/", 1)[1].partition("/")[2]
    segments = split_path(path)
    if len(segments) != 1 or segments[0].key is None:
        raise bad_request(f"The URL '{reference}' in '{nav}{BIND}' does not address a single record.", PAYLOAD)
    target = org.by_set.get(segments[0].name)
    if target is None:
        raise DataverseError(400, SEGMENT_NOT_FOUND, f"Resource not found for the segment '{segments[0].name}'.")
    if target.logical_name != column.target:
        raise bad_request(
            f"The navigation property '{nav}' expects a reference to '{column.target}', not to '{target.logical_name}'."
        )
    address = locate(org, target, segments[0].key)
    if address.row is None:
        if address.by_key:
            raise key_not_found(target.logical_name)
        raise DataverseError(404, NOT_FOUND, f"{target.logical_name} With Id = {address.row_id} Does Not Exist")
    return address.row_id


def parse_body(org: Organization, definition: TableDef, body: Any) -> dict[str, Any]:
    """Stored values of the columns an entity body sets, in the order sent. Raises DataverseError."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object (an entity).", PAYLOAD)
    values: dict[str, Any] = {}
    table = definition.logical_name
    for name, value in body.items():
        if name.endswith(BIND):
            nav = name[: -len(BIND)]
            column = definition.navigation.get(nav)
            if column is None:
                raise bad_request(
                    f"An undeclared property '{nav}' which only has property annotations in the payload but no "
                    "property value was found in the payload. In OData, only declared navigation properties and "
                    "declared named streams can be represented as properties without values.",
                    PAYLOAD,
                )
            values[column.name] = resolve_bind(org, column, nav, value)
            continue
        if "@" in name:
            continue  # instance annotations (@odata.type, @odata.etag, x@OData...) are not values
        column = definition.columns.get(name)
        if column is None or column.type == "Lookup":
            if name in definition.navigation:
                raise bad_request(
                    f"A node of type 'PrimitiveValue' was read from the JSON reader when trying to read the contents "
                    f"of the navigation property '{name}'; however, a 'StartObject' node was expected. Bind lookups "
                    f"with '{name}{BIND}'.",
                )
            raise unknown_property(name, table)
        if column.system:
            continue  # the platform owns these columns; the service ignores client values
        values[name] = coerce(column, value, table)
    return values


def duplicate_error(definition: TableDef, exc: DuplicateKey) -> DataverseError:
    """412 0x80040237 for a duplicate primary or alternate key."""
    if exc.key_name == definition.primary_id:
        return DataverseError(412, DUPLICATE, "Cannot insert duplicate key.")
    key = definition.key_named(exc.key_name.split(","))
    shown = ", ".join(str(v) for v in exc.values)
    schema = key.schema_name if key else exc.key_name
    return DataverseError(
        412,
        DUPLICATE,
        "Cannot insert duplicate key. A record that has the attribute values "  # noqa: S608 - not SQL
        f"{shown} already exists. The entity key {schema} requires that this set of attributes contains unique values.",
    )


def _touched(org: Organization, definition: TableDef) -> None:
    if definition.logical_name in REGISTRATION_TABLES:
        org.registration_version += 1


def create(
    org: Organization,
    definition: TableDef,
    values: Mapping[str, Any],
    caller: Caller,
    *,
    row_id: str | None = None,
    key_values: Mapping[str, Any] | None = None,
) -> Change:
    """Insert a row (key values from the URL win over the body); 412 0x80040237 on a duplicate key."""
    submitted = dict(values)
    if key_values:
        submitted.update(key_values)
    new_id = submitted.get(definition.primary_id) or row_id or org.new_id()
    if row_id and new_id != row_id:
        raise bad_request("The id in the URL and the id in the body are different.", ODATA)
    system = org.system_values(caller.user_id, caller.on_behalf_of, creating=True)
    full = {**system, **submitted, definition.primary_id: new_id}
    registration.validate(org, definition, full, None)
    try:
        after = org.tables[definition.logical_name].insert(full)
    except DuplicateKey as exc:
        raise duplicate_error(definition, exc) from exc
    _touched(org, definition)
    submitted.pop(definition.primary_id, None)
    return Change("Create", definition.logical_name, new_id, submitted, None, after, caller, dict(key_values or {}))


def update(
    org: Organization,
    definition: TableDef,
    row: dict[str, Any],
    values: Mapping[str, Any],
    caller: Caller,
    *,
    key_values: Mapping[str, Any] | None = None,
) -> Change:
    """Change the submitted columns of an existing row and stamp version, time and user."""
    row_id = row[definition.primary_id]
    submitted = {k: v for k, v in values.items() if k != definition.primary_id}
    if values.get(definition.primary_id, row_id) != row_id:
        raise bad_request("The id in the URL and the id in the body are different.", ODATA)
    changes = {**submitted, **org.system_values(caller.user_id, caller.on_behalf_of, creating=False)}
    registration.validate(org, definition, {**row, **changes}, row)
    try:
        after = org.tables[definition.logical_name].update(row_id, changes)
    except DuplicateKey as exc:
        raise duplicate_error(definition, exc) from exc
    _touched(org, definition)
    return Change("Update", definition.logical_name, row_id, submitted, row, after, caller, dict(key_values or {}))


def delete(org: Organization, definition: TableDef, row: dict[str, Any], caller: Caller) -> Change:
    """Remove a row."""
    row_id = row[definition.primary_id]
    org.tables[definition.logical_name].delete(row_id)
    _touched(org, definition)
    return Change("Delete", definition.logical_name, row_id, {}, row, None, caller)
