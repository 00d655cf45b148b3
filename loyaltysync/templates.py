"""Entity templates: the `mappings/*.json` files, validated on load.

A template says, as data, which F&O entity pairs with which Dataverse table,
which fields flow in which direction, through which value map or lookup, how
conflicts are settled and whether deletes propagate. Dual-write's own map
symbols are kept (`=`, `><`, `>`, `>>`, `<`, `<<`) so a Dynamics consultant
can read the files without reading Python.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from loyaltysync.errors import TemplateError

Side = Literal["fo", "dataverse"]
SIDES: tuple[Side, Side] = ("fo", "dataverse")
MapType = Literal["=", "><", ">", ">>", "<", "<<"]
FieldType = Literal["string", "integer", "decimal", "boolean", "datetime", "date", "enum"]
ConflictPolicy = Literal["last-writer-wins", "fo-wins", "dataverse-wins"]
DeletePolicy = Literal["both", "fo-to-dataverse", "dataverse-to-fo", "none"]
Scalar = str | int | float | bool | None

TO_DATAVERSE: frozenset[str] = frozenset({"=", "><", ">", ">>"})
TO_FO: frozenset[str] = frozenset({"=", "><", "<", "<<"})
COMPANY_FIELD = "dataAreaId"
NAME_PATTERN = r"^[a-z][a-z0-9-]{0,62}$"


def other_side(side: Side) -> Side:
    """The side a change from `side` is written to."""
    return "dataverse" if side == "fo" else "fo"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Lookup(_Strict):
    """A Dataverse lookup column resolved through the referenced table's natural key.

    The canonical value is the natural key (for currencies: the ISO code); the
    Dataverse side holds a row id, bound on write as
    `<navigation_property>@odata.bind: /<entity_set>(<id>)` and read back as
    `_<column>_value`.
    """

    entity_set: str = Field(description="Entity set of the referenced table, e.g. transactioncurrencies.")
    table: str = Field(description="Logical name of the referenced table, e.g. transactioncurrency.")
    id_column: str = Field(description="Primary id column of the referenced table.")
    key_column: str = Field(description="Natural-key column used as the canonical value, e.g. isocurrencycode.")
    navigation_property: str | None = Field(
        default=None,
        description="Single-valued navigation property used in @odata.bind; defaults to the lookup column.",
    )


class FieldMap(_Strict):
    """One row of the field table: F&O property, map type, Dataverse column."""

    name: str | None = Field(
        default=None,
        description="Canonical field name; defaults to the F&O property (or the Dataverse column).",
    )
    fo: str | None = Field(default=None, description="F&O OData property name (PascalCase).")
    map: MapType = Field(description="Dual-write map type: = >< > >> < <<.")
    dataverse: str | None = Field(default=None, description="Dataverse column logical name.")
    type: FieldType = Field(default="string", description="Canonical type of the value.")
    value_map: dict[str, int | bool | str] | None = Field(
        default=None, description="F&O value (enum member name) to Dataverse value (choice integer, boolean)."
    )
    default: int | float | bool | str | None = Field(
        default=None, description="Constant written to the target on create when the source has no field."
    )
    lookup: Lookup | None = Field(default=None, description="Dataverse lookup resolved by natural key.")
    max_length: int | None = Field(default=None, ge=1, description="Longest string both sides accept.")

    @model_validator(mode="after")
    def _consistent(self) -> FieldMap:
        bidirectional = self.map in ("=", "><")
        has_default = self.default is not None
        if self.map in ("=", "><", ">", "<") and not (self.fo and self.dataverse):
            raise ValueError(f"map '{self.map}' needs both 'fo' and 'dataverse'")
        if self.map == ">>" and not self.dataverse:
            raise ValueError("map '>>' needs 'dataverse' (the column it writes)")
        if self.map == "<<" and not self.fo:
            raise ValueError("map '<<' needs 'fo' (the property it writes)")
        if self.map in (">>", "<<") and not (self.fo and self.dataverse) and not has_default:
            raise ValueError(f"map '{self.map}' with only one side needs a constant 'default'")
        if self.map == "><" and self.value_map is None:
            raise ValueError("map '><' translates both ways: give 'value_map'")
        if self.map in (">>", "<<") and self.value_map is None and not has_default:
            raise ValueError(f"map '{self.map}' translates: give 'value_map' (or a constant 'default')")
        if self.map in ("=", ">", "<") and self.value_map is not None:
            raise ValueError(f"map '{self.map}' copies values as is; a 'value_map' needs '><', '>>' or '<<'")
        if self.value_map is not None:
            if not self.value_map:
                raise ValueError("'value_map' is empty")
            if self.type != "enum":
                raise ValueError("a field with 'value_map' must have type 'enum'")
            targets = list(self.value_map.values())
            if bidirectional and len(set(map(repr, targets))) != len(targets):
                raise ValueError("'value_map' of a two-way field must be one-to-one (a Dataverse value repeats)")
        elif self.type == "enum" and not has_default:
            raise ValueError("type 'enum' needs a 'value_map'")
        if self.lookup is not None and (self.type != "string" or not (self.fo and self.dataverse)):
            raise ValueError("a 'lookup' field must have type 'string' and both sides")
        if self.max_length is not None and self.type != "string":
            raise ValueError("'max_length' applies to strings only")
        return self

    @property
    def key(self) -> str:
        """Canonical name of the field."""
        return self.name or self.fo or self.dataverse or ""

    def flows_to(self, side: Side) -> bool:
        """Whether a change on the other side is written to `side` through this field."""
        return self.map in (TO_DATAVERSE if side == "dataverse" else TO_FO)

    def read_from(self, side: Side) -> str | None:
        """The property or column that holds this field on `side`."""
        return self.fo if side == "fo" else self.dataverse

    @property
    def navigation_property(self) -> str:
        """Navigation property used in `@odata.bind` for a lookup field."""
        if self.lookup is not None and self.lookup.navigation_property:
            return self.lookup.navigation_property
        return self.dataverse or ""


class FoEntity(_Strict):
    """The F&O side: an OData entity set under /data/."""

    entity_set: str = Field(description="Public collection name, e.g. RetailLoyaltyCards (case-sensitive).")
    entity_type: str | None = Field(
        default=None, description="Data entity name, e.g. RetailLoyaltyCardEntity; names the virtual table."
    )
    keys: list[str] = Field(min_length=1, description="Entity key properties (without dataAreaId).")
    company_specific: bool = Field(default=False, description="Key includes dataAreaId; cross-company reads.")
    virtual_table: str | None = Field(
        default=None,
        description="Dataverse virtual table that carries this entity's data events; default mserp_<entity_type>.",
    )
    business_events: list[str] = Field(
        default_factory=list, description="BusinessEventId values that announce a change of this entity."
    )
    modified_field: str | None = Field(
        default=None, description="Property holding the last modified time, when the entity exposes one."
    )

    @property
    def virtual_table_name(self) -> str | None:
        if self.virtual_table:
            return self.virtual_table
        return f"mserp_{self.entity_type.lower()}" if self.entity_type else None


class DataverseTable(_Strict):
    """The Dataverse side: a table addressed by its alternate key."""

    entity_set: str = Field(description="Entity set name, e.g. msdyn_loyaltycards.")
    table: str = Field(description="Table logical name, e.g. msdyn_loyaltycard.")
    primary_id: str = Field(description="Primary id column, e.g. msdyn_loyaltycardid.")
    alternate_key: list[str] = Field(min_length=1, description="Columns of the alternate key.")
    company_column: str | None = Field(
        default=None, description="Column that holds the F&O company (dataAreaId) for company-specific data."
    )
    company_lookup: Lookup | None = Field(
        default=None, description="When the company column is a lookup (e.g. to cdm_company), how to resolve it."
    )


class Template(_Strict):
    """A whole entity template, as one `mappings/<name>.json` file holds it."""

    name: str = Field(pattern=NAME_PATTERN, description="Template name; names routes, queues and functions.")
    description: str = ""
    fo: FoEntity
    dataverse: DataverseTable
    fields: list[FieldMap] = Field(min_length=1)
    conflict_policy: ConflictPolicy = Field(
        default="last-writer-wins",
        description="Same field changed on both sides: newest source modified time wins, or one side always.",
    )
    deletes: DeletePolicy = Field(default="both", description="Which direction deletes propagate in.")

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={"title": "loyaltysync template"})

    @model_validator(mode="after")
    def _keys_and_names(self) -> Template:
        if self.fo.company_specific and not self.dataverse.company_column:
            raise ValueError("fo.company_specific needs dataverse.company_column")
        if any(f.fo == COMPANY_FIELD for f in self.fields) and self.fo.company_specific:
            raise ValueError(f"{COMPANY_FIELD} is added by fo.company_specific; do not list it as a field")
        rows = self.all_fields
        names = [f.key for f in rows]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"field names repeat: {', '.join(dupes)}")
        for column_side in SIDES:
            columns = [c for c in (f.read_from(column_side) for f in rows) if c]
            repeats = sorted({c for c in columns if columns.count(c) > 1})
            if repeats:
                raise ValueError(f"{column_side} columns mapped twice: {', '.join(repeats)}")
        by_fo = {f.fo: f for f in self.fields if f.fo}
        for key in self.fo.keys:
            field = by_fo.get(key)
            if field is None:
                raise ValueError(f"key property {key!r} has no field")
            if field.map != "=":
                raise ValueError(f"key property {key!r} must be mapped both ways with '='")
        key_columns = sorted(by_fo[k].dataverse or "" for k in self.fo.keys)
        if key_columns != sorted(self.dataverse.alternate_key) and self.company_field is None:
            raise ValueError(
                f"dataverse.alternate_key {self.dataverse.alternate_key} must be the columns of the F&O keys "
                f"{key_columns}"
            )
        if self.fo.company_specific:
            if not self.dataverse.company_column:
                raise ValueError("fo.company_specific needs dataverse.company_column")
            expected = sorted([*key_columns, self.dataverse.company_column])
            if sorted(self.dataverse.alternate_key) != expected:
                raise ValueError(
                    f"dataverse.alternate_key {self.dataverse.alternate_key} must be the key columns plus the "
                    f"company column: {expected}"
                )
            if COMPANY_FIELD in by_fo:
                raise ValueError(f"{COMPANY_FIELD} is added by fo.company_specific; do not list it as a field")
        return self

    @property
    def company_field(self) -> FieldMap | None:
        """The implicit dataAreaId ⇄ company column field of a company-specific template."""
        if not self.fo.company_specific or not self.dataverse.company_column:
            return None
        return FieldMap(
            name=COMPANY_FIELD,
            fo=COMPANY_FIELD,
            map="=",
            dataverse=self.dataverse.company_column,
            lookup=self.dataverse.company_lookup,
        )

    @cached_property
    def all_fields(self) -> tuple[FieldMap, ...]:
        """Every field including the implicit company field."""
        company = self.company_field
        return (company, *self.fields) if company else tuple(self.fields)

    @cached_property
    def key_fields(self) -> tuple[FieldMap, ...]:
        """The natural key, company first when company-specific."""
        by_fo = {f.fo: f for f in self.fields}
        keys = tuple(by_fo[k] for k in self.fo.keys)
        company = self.company_field
        return (company, *keys) if company else keys

    @cached_property
    def key_names(self) -> tuple[str, ...]:
        return tuple(f.key for f in self.key_fields)

    def fields_to(self, side: Side) -> tuple[FieldMap, ...]:
        """Fields a change on the other side writes to `side`."""
        return tuple(f for f in self.all_fields if f.flows_to(side))

    def field(self, name: str) -> FieldMap:
        for f in self.all_fields:
            if f.key == name:
                return f
        raise KeyError(name)

    def deletes_to(self, side: Side) -> bool:
        """Whether a delete on the other side deletes on `side`."""
        wanted = "fo-to-dataverse" if side == "dataverse" else "dataverse-to-fo"
        return self.deletes in ("both", wanted)

    @property
    def slug(self) -> str:
        """Name usable in function names and Azure resource names (underscores)."""
        return self.name.replace("-", "_")


def _describe_location(data: Any, loc: tuple[int | str, ...]) -> str:
    """Render a pydantic error location; a field row is named by its F&O/Dataverse name."""
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int):
            label = f"[{item}]"
            row = node[item] if isinstance(node, list) and item < len(node) else None
            if isinstance(row, dict):
                named = row.get("name") or row.get("fo") or row.get("dataverse")
                if named:
                    label += f" ({named})"
            parts.append(label)
        else:
            parts.append(("." if parts else "") + str(item))
        node = (
            node.get(item)
            if isinstance(node, dict) and isinstance(item, str)
            else (node[item] if isinstance(node, list) and isinstance(item, int) and item < len(node) else None)
        )
    return "".join(parts) or "(template)"


def parse_template(text: str, file: str) -> Template:
    """Validate one template's JSON text; raise `TemplateError` naming file, field and problem."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TemplateError(file, f"line {exc.lineno} column {exc.colno}", f"not valid JSON: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise TemplateError(file, "(template)", "must be a JSON object")
    data.pop("$schema", None)
    try:
        return Template.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        raise TemplateError(file, _describe_location(data, tuple(first["loc"])), message) from exc


def load_templates(directory: Path) -> dict[str, Template]:
    """Load every `*.json` template in `directory` (schema files excluded), keyed by name."""
    if not directory.is_dir():
        raise TemplateError(str(directory), "(directory)", "mappings directory not found")
    templates: dict[str, Template] = {}
    for path in sorted(directory.glob("*.json")):
        if path.name.endswith(".schema.json"):
            continue
        template = parse_template(path.read_text(encoding="utf-8"), str(path))
        if template.name in templates:
            raise TemplateError(str(path), "name", f"template name {template.name!r} is used by another file")
        templates[template.name] = template
    if not templates:
        raise TemplateError(str(directory), "(directory)", "no template files (*.json)")
    return templates


def json_schema() -> dict[str, Any]:
    """The JSON Schema editors use to validate template files (`mappings/template.schema.json`)."""
    schema = Template.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["properties"]["$schema"] = {"type": "string", "description": "Path of this schema, for editors."}
    return schema


def default_mappings_dir() -> Path:
    """`mappings/` beside the package (the repository root, or the deployed app root)."""
    return Path(__file__).resolve().parent.parent / "mappings"


def table_rows(templates: Iterable[Template]) -> list[dict[str, Any]]:
    """The effective field table of each template, one row per field (for `mappings show`)."""
    rows: list[dict[str, Any]] = []
    for template in templates:
        for f in template.all_fields:
            rows.append(
                {
                    "template": template.name,
                    "field": f.key,
                    "fo": f.fo,
                    "map": f.map,
                    "dataverse": (f"{f.dataverse}.{f.lookup.key_column}" if f.lookup and f.dataverse else f.dataverse),
                    "type": f.type,
                    "key": f in template.key_fields,
                    "value_map": f.value_map,
                    "default": f.default,
                    "lookup": f.lookup.model_dump(exclude_none=True) if f.lookup else None,
                }
            )
    return rows


_SAFE = re.compile(r"[^a-z0-9_]")


def function_safe(name: str) -> str:
    """A name that satisfies the Functions host rule ^[a-z][a-z0-9_-]{0,127}$."""
    return _SAFE.sub("_", name.lower())[:127]
