"""Template against live metadata: everything that would fail at run time, per template, side and field. Pure.

Severity `error`: the field (or the whole template) cannot work: a missing
entity set, table or column, a wrong type, a value-map entry the other side
does not accept, no alternate key, a lookup bound to the wrong table or
navigation property. `warning`: some records will fail: a member or choice
option with no value-map entry, a length one side accepts and the other does
not (the longer values fail or would be cut).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from loyaltysync.preflight.metadata import CHOICE_TYPES, STRING_TYPES, DvTable, FoEntityType, FoMetadata
from loyaltysync.templates import (
    COMPANY_FIELD,
    SIDES,
    TO_DATAVERSE,
    TO_FO,
    FieldMap,
    Lookup,
    Side,
    Template,
    other_side,
)

Severity = Literal["error", "warning"]

FO_TYPES: Mapping[str, frozenset[str]] = {
    "string": frozenset({"Edm.String"}),
    "integer": frozenset({"Edm.Int32", "Edm.Int64", "Edm.Int16", "Edm.Byte"}),
    "decimal": frozenset({"Edm.Decimal", "Edm.Double", "Edm.Single"}),
    "boolean": frozenset({"Edm.Boolean"}),
    "datetime": frozenset({"Edm.DateTimeOffset"}),
    "date": frozenset({"Edm.DateTimeOffset", "Edm.Date"}),
}
DV_TYPES: Mapping[str, frozenset[str]] = {
    "string": STRING_TYPES,
    "integer": frozenset({"Integer", "BigInt"}),
    "decimal": frozenset({"Decimal", "Money", "Double"}),
    "boolean": frozenset({"Boolean"}),
    "datetime": frozenset({"DateTime"}),
    "date": frozenset({"DateTime"}),
}
# Accepted, but some values fail: (canonical type, side type) -> why.
LOSSY: Mapping[tuple[str, str], str] = {
    ("decimal", "Edm.Int32"): "values with a fraction are refused",
    ("decimal", "Edm.Int64"): "values with a fraction are refused",
    ("decimal", "Integer"): "values with a fraction are refused",
    ("decimal", "BigInt"): "values with a fraction are refused",
    ("integer", "Decimal"): "values with a fraction cannot be read as integers",
    ("integer", "Money"): "values with a fraction cannot be read as integers",
    ("integer", "Double"): "values with a fraction cannot be read as integers",
    ("integer", "Edm.Decimal"): "values with a fraction cannot be read as integers",
}


@dataclass(frozen=True, order=True)
class Finding:
    """One thing that would fail at run time."""

    template: str
    side: Side
    field: str
    problem: str
    severity: Severity = "error"

    def line(self) -> str:
        """`error    loyalty-cards  dataverse  msdyn_x: problem` for a terminal or a log."""
        return f"{self.severity:<8} {self.template}  {self.side}  {self.field}: {self.problem}"


def _near(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _value_types(f: FieldMap) -> set[type]:
    values: list[object] = list((f.value_map or {}).values())
    if f.default is not None and f.value_map is None:
        values.append(f.default)
    return {type(v) for v in values}


class _Checker:
    def __init__(self, template: Template) -> None:
        self.template = template
        self.findings: list[Finding] = []

    def add(self, side: Side, field: str, problem: str, severity: Severity = "error") -> None:
        self.findings.append(Finding(self.template.name, side, field, problem, severity))

    # ------------------------------------------------------------ F&O

    def fo(self, metadata: FoMetadata) -> FoEntityType | None:
        t = self.template
        entity = metadata.entity(t.fo.entity_set)
        if entity is None:
            near = _near(t.fo.entity_set, metadata.entity_sets)
            self.add("fo", "(entity set)", f"/data/ has no entity set {t.fo.entity_set!r}{near}")
            return None
        expected = {*t.fo.keys, *([COMPANY_FIELD] if t.fo.company_specific else [])}
        if set(entity.keys) != expected:
            self.add("fo", "(key)", f"the entity key is {list(entity.keys)}, the template uses {sorted(expected)}")
        if t.fo.modified_field:
            prop = entity.properties.get(t.fo.modified_field)
            if prop is None:
                self.add("fo", t.fo.modified_field, f"modified_field: no such property on {entity.name}")
            elif prop.type != "Edm.DateTimeOffset":
                self.add("fo", t.fo.modified_field, f"modified_field is {prop.type}, not Edm.DateTimeOffset")
        for f in t.all_fields:
            if f.fo:
                self._fo_field(f, f.fo, entity, metadata)
        return entity

    def _fo_field(self, f: FieldMap, name: str, entity: FoEntityType, metadata: FoMetadata) -> None:
        prop = entity.properties.get(name)
        if prop is None:
            self.add("fo", name, f"no such property on {entity.name}{_near(name, entity.properties)}")
            return
        members = metadata.enums.get(prop.type)
        if f.type == "enum":
            if members is None:
                self.add("fo", name, f"is {prop.type}, not an enum: a value map of member names cannot apply")
                return
            self._fo_members(f, name, prop.type, members)
            return
        if members is not None:
            self.add("fo", name, f"is the enum {prop.type} ({', '.join(members)}): give type 'enum' and a value_map")
            return
        if f.lookup is not None or f.key == COMPANY_FIELD:
            accepted = FO_TYPES["string"]
        else:
            accepted = FO_TYPES[f.type]
        if prop.type not in accepted:
            why = LOSSY.get((f.type, prop.type))
            if why:
                self.add("fo", name, f"is {prop.type} for a {f.type} field: {why}", "warning")
            else:
                self.add("fo", name, f"is {prop.type}, which does not hold a {f.type} ({', '.join(sorted(accepted))})")

    def _fo_members(self, f: FieldMap, name: str, enum: str, members: tuple[str, ...]) -> None:
        mapped = list(f.value_map or {})
        if f.value_map is None and f.default is not None:
            mapped = [str(f.default)]
        for member in mapped:
            if member not in members:
                self.add("fo", name, f"value map entry {member!r} is not a member of {enum} ({', '.join(members)})")
        if f.map in TO_DATAVERSE and f.value_map is not None:
            unmapped = [m for m in members if m not in f.value_map]
            if unmapped:
                self.add(
                    "fo",
                    name,
                    f"members {', '.join(unmapped)} of {enum} have no value-map entry: records holding them fail",
                    "warning",
                )

    # ------------------------------------------------------------ Dataverse

    def dataverse(self, tables: Mapping[str, DvTable | None]) -> DvTable | None:
        t = self.template
        table = tables.get(t.dataverse.table)
        if table is None:
            self.add("dataverse", "(table)", f"no table {t.dataverse.table!r} (EntityDefinitions)")
            return None
        if table.entity_set != t.dataverse.entity_set:
            self.add("dataverse", "(entity set)", f"the entity set of {table.logical_name} is {table.entity_set!r}, "
                     f"the template says {t.dataverse.entity_set!r}")
        if table.primary_id != t.dataverse.primary_id:
            self.add("dataverse", "(primary id)", f"the primary id column is {table.primary_id!r}, "
                     f"the template says {t.dataverse.primary_id!r}")
        wanted = frozenset(t.dataverse.alternate_key)
        keys = [status for columns, status in table.keys if columns == wanted]
        if not keys:
            known = "; ".join(",".join(sorted(c)) for c, _ in table.keys) or "none"
            self.add("dataverse", "(alternate key)",
                     f"no alternate key on ({', '.join(sorted(wanted))}); the table's keys: {known}")
        elif "Active" not in keys:
            self.add("dataverse", "(alternate key)",
                     f"the alternate key on ({', '.join(sorted(wanted))}) is {keys[0]}, not Active: writes by key fail")
        for f in t.all_fields:
            if f.dataverse:
                self._dv_field(f, f.dataverse, table, tables)
        return table

    def _dv_field(self, f: FieldMap, name: str, table: DvTable, tables: Mapping[str, DvTable | None]) -> None:
        column = table.columns.get(name)
        if column is None:
            self.add("dataverse", name, f"no such column on {table.logical_name}{_near(name, table.columns)}")
            return
        if f.flows_to("dataverse") and not (column.valid_for_update or column.valid_for_create):
            self.add("dataverse", name, "the column is read-only (not valid for create or update)")
        if f.lookup is not None:
            self._lookup(f, name, f.lookup, table, tables)
            return
        if f.type == "enum":
            self._dv_choice(f, name, column.type, column.options)
            return
        accepted = DV_TYPES[f.type]
        if column.type not in accepted:
            why = LOSSY.get((f.type, column.type))
            if why:
                self.add("dataverse", name, f"is {column.type} for a {f.type} field: {why}", "warning")
            else:
                kinds = ", ".join(sorted(accepted))
                self.add("dataverse", name, f"is {column.type}, which does not hold a {f.type} ({kinds})")

    def _dv_choice(self, f: FieldMap, name: str, kind: str, options: frozenset[int] | None) -> None:
        types = _value_types(f)
        if types <= {int}:
            if kind not in CHOICE_TYPES:
                self.add("dataverse", name, f"is {kind}, not a choice: the value map's integers cannot apply")
                return
            values = [v for v in (f.value_map or {}).values() if isinstance(v, int) and not isinstance(v, bool)]
            if f.value_map is None and isinstance(f.default, int):
                values = [f.default]
            for value in values:
                if options is not None and value not in options:
                    accepted = ", ".join(str(o) for o in sorted(options))
                    self.add("dataverse", name, f"value map entry {value} is not a choice value ({accepted})")
            if f.map in TO_FO and f.value_map is not None and options:
                unmapped = sorted(options - set(values))
                if unmapped:
                    self.add("dataverse", name,
                             f"choice values {', '.join(map(str, unmapped))} have no value-map entry: records holding "
                             "them fail", "warning")
        elif types <= {bool}:
            if kind != "Boolean":
                self.add("dataverse", name, f"is {kind}, not Yes/No: the value map's booleans cannot apply")
        elif types <= {str}:
            if kind not in STRING_TYPES:
                self.add("dataverse", name, f"is {kind}, not text: the value map's strings cannot apply")
        else:
            self.add("dataverse", name, "the value map mixes value types; a column holds one type")

    def _lookup(
        self, f: FieldMap, name: str, lookup: Lookup, table: DvTable, tables: Mapping[str, DvTable | None]
    ) -> None:
        column = table.columns[name]
        if column.type not in ("Lookup", "Customer", "Owner"):
            self.add("dataverse", name, f"is {column.type}, not a lookup")
            return
        relationship = table.relationships.get(name)
        if relationship is None:
            self.add("dataverse", name, "no many-to-one relationship uses this lookup column")
        else:
            if relationship.referenced_entity != lookup.table:
                self.add("dataverse", name,
                         f"the lookup targets {relationship.referenced_entity!r}, the template says {lookup.table!r}")
            if relationship.navigation != f.navigation_property:
                self.add("dataverse", name, f"the navigation property is {relationship.navigation!r}; "
                         f"the template binds {f.navigation_property!r}@odata.bind")
        target = tables.get(lookup.table)
        if target is None:
            self.add("dataverse", name, f"the lookup's table {lookup.table!r} does not exist")
            return
        if target.entity_set != lookup.entity_set:
            self.add("dataverse", name, f"the entity set of {lookup.table} is {target.entity_set!r}, "
                     f"the template says {lookup.entity_set!r}")
        if target.primary_id != lookup.id_column:
            self.add("dataverse", name, f"the primary id of {lookup.table} is {target.primary_id!r}, "
                     f"the template says {lookup.id_column!r}")
        if lookup.key_column not in target.columns:
            self.add("dataverse", name, f"{lookup.table} has no column {lookup.key_column!r} to look up by")

    # ------------------------------------------------------------ both

    def lengths(self, entity: FoEntityType, table: DvTable) -> None:
        for f in self.template.all_fields:
            if f.type != "string" or f.lookup is not None or not (f.fo and f.dataverse):
                continue
            fo_prop = entity.properties.get(f.fo)
            dv_col = table.columns.get(f.dataverse)
            maxima: dict[Side, int | None] = {
                "fo": fo_prop.max_length if fo_prop else None,
                "dataverse": dv_col.max_length if dv_col else None,
            }
            names: dict[Side, str] = {"fo": f.fo, "dataverse": f.dataverse}
            limit = f.max_length
            for side in SIDES:
                side_max = maxima[side]
                if limit is not None and side_max is not None and limit > side_max and f.flows_to(side):
                    self.add(side, names[side], f"template max_length {limit} is more than the {side_max} characters "
                             "the column holds: longer values would be cut or refused")
            for target in SIDES:
                source = other_side(target)
                source_max, target_max = maxima[source], maxima[target]
                if source_max is None or target_max is None or source_max <= target_max:
                    continue
                if not f.flows_to(target) or (limit is not None and limit <= target_max):
                    continue
                self.add(target, names[target],
                         f"{source} holds up to {source_max} characters, {target} only {target_max}: longer values "
                         "would be cut or refused (a max_length makes them a clear mapping error)", "warning")


def check_template(template: Template, fo: FoMetadata, tables: Mapping[str, DvTable | None]) -> list[Finding]:
    """Every finding for one template, given F&O's metadata and the Dataverse tables it names (None: missing)."""
    checker = _Checker(template)
    entity = checker.fo(fo)
    table = checker.dataverse(tables)
    if entity is not None and table is not None:
        checker.lengths(entity, table)
    return sorted(checker.findings)

