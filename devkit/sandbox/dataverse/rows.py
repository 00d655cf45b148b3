"""Stored rows as Web API JSON: `@odata.etag`, lookups as `_<nav>_value`, optional annotations.

Annotations follow [D9]: `<prop>@OData.Community.Display.V1.FormattedValue` for
choices, booleans, dates, numbers and lookups, plus
`@Microsoft.Dynamics.CRM.lookuplogicalname` and
`@Microsoft.Dynamics.CRM.associatednavigationproperty` on lookups, each only when
the `Prefer: odata.include-annotations` list asks for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from devkit.sandbox.dataverse.errors import unknown_property
from devkit.sandbox.dataverse.org import Organization
from devkit.sandbox.dataverse.prefer import Preferences
from devkit.sandbox.dataverse.schema import Column, TableDef
from devkit.sandbox.dataverse.values import formatted

FORMATTED = "OData.Community.Display.V1.FormattedValue"
LOOKUP_TABLE = "Microsoft.Dynamics.CRM.lookuplogicalname"
LOOKUP_NAV = "Microsoft.Dynamics.CRM.associatednavigationproperty"


def etag(row: Mapping[str, Any]) -> str:
    """The weak ETag of a row: its version number."""
    return f'W/"{row["versionnumber"]}"'


@dataclass(frozen=True)
class Expand:
    """A single-valued navigation property to inline, with the columns to show."""

    column: Column
    select: list[str] | None


def select_columns(definition: TableDef, select: Sequence[str] | None) -> list[Column]:
    """The readable columns to return; the primary key always comes back [D6]. Unknown names are a 400."""
    if not select:
        return [c for c in definition.columns.values() if c.readable]
    chosen: dict[str, Column] = {definition.primary_id: definition.columns[definition.primary_id]}
    for name in select:
        column = definition.readable.get(name)
        if column is None:
            if name in definition.columns and not definition.columns[name].readable:
                continue
            raise unknown_property(name, definition.logical_name)
        chosen[column.name] = column
    order = list(definition.columns)
    return sorted(chosen.values(), key=lambda c: order.index(c.name))


def render_row(
    org: Organization,
    definition: TableDef,
    row: Mapping[str, Any],
    columns: Sequence[Column],
    prefs: Preferences | None = None,
    expand: Sequence[Expand] = (),
) -> dict[str, Any]:
    """One row as the Web API returns it (without `@odata.context`)."""
    out: dict[str, Any] = {"@odata.etag": etag(row)}
    want_formatted = prefs is not None and prefs.wants(FORMATTED)
    for column in columns:
        value = row.get(column.name)
        prop = column.value_property
        if prefs is not None and prefs.any_annotations and value is not None:
            if column.type == "Lookup":
                if want_formatted:
                    out[f"{prop}@{FORMATTED}"] = org.primary_name(column.target or "", value)
                if prefs.wants(LOOKUP_NAV):
                    out[f"{prop}@{LOOKUP_NAV}"] = column.navigation
                if prefs.wants(LOOKUP_TABLE):
                    out[f"{prop}@{LOOKUP_TABLE}"] = column.target
            elif want_formatted:
                text = formatted(column, value)
                if text is not None:
                    out[f"{prop}@{FORMATTED}"] = text
        out[prop] = value
    for item in expand:
        out[item.column.navigation or item.column.name] = _expanded(org, item, row.get(item.column.name))
    return out


def _expanded(org: Organization, item: Expand, target_id: Any) -> dict[str, Any] | None:
    target = org.defs.get(item.column.target or "")
    if target is None or target_id is None:
        return None
    related = org.tables[target.logical_name].get(target_id)
    if related is None:
        return None
    return render_row(org, target, related, select_columns(target, item.select))


def context_url(org: Organization, definition: TableDef, select: Sequence[str] | None, *, entity: bool) -> str:
    """`@odata.context` of a collection or single row, with the `$select` list as the service writes it."""
    columns = f"({','.join(select)})" if select else ""
    return f"{org.base_url}/$metadata#{definition.entity_set}{columns}{'/$entity' if entity else ''}"
