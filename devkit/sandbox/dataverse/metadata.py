"""Table metadata: `EntityDefinitions`, `/Attributes` (with type casts and `$expand=OptionSet`), `/Keys`,
`/ManyToOneRelationships`, as the Web API metadata endpoints return them.

Only what a client of these tables reads is modelled. The one liberty: the
untyped `/Attributes` collection also shows `MaxLength` on string columns (the
service only shows it after the `StringAttributeMetadata` cast).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from devkit.sandbox.dataverse.errors import NOT_FOUND, ODATA, DataverseError, bad_request, segment_not_found
from devkit.sandbox.dataverse.org import Organization
from devkit.sandbox.dataverse.paths import Segment
from devkit.sandbox.dataverse.schema import CHOICE_TYPES, Column, TableDef
from devkit.sandbox.odata import ODataSyntaxError, evaluate, parse_filter, parse_key_predicate, parse_select

NAMESPACE = "Microsoft.Dynamics.CRM."
_IDS = uuid.UUID("6f1d5c2a-8b3e-4a71-9d20-5a7e3c9b10ee")
TYPE_NAMES = {
    "String": "StringType",
    "Memo": "MemoType",
    "Picklist": "PicklistType",
    "State": "StateType",
    "Status": "StatusType",
    "Boolean": "BooleanType",
    "Integer": "IntegerType",
    "BigInt": "BigIntType",
    "Decimal": "DecimalType",
    "Money": "MoneyType",
    "Double": "DoubleType",
    "DateTime": "DateTimeType",
    "Lookup": "LookupType",
    "Uniqueidentifier": "UniqueidentifierType",
}


def _id(*parts: str) -> str:
    return str(uuid.uuid5(_IDS, ":".join(parts)))


def _label(text: str) -> dict[str, Any]:
    localized = {"Label": text, "LanguageCode": 1033, "IsManaged": True}
    return {"LocalizedLabels": [localized], "UserLocalizedLabel": localized}


def entity_metadata(definition: TableDef) -> dict[str, Any]:
    """The EntityMetadata properties of a table."""
    return {
        "MetadataId": _id(definition.logical_name),
        "LogicalName": definition.logical_name,
        "SchemaName": definition.logical_name,
        "EntitySetName": definition.entity_set,
        "LogicalCollectionName": definition.entity_set,
        "PrimaryIdAttribute": definition.primary_id,
        "PrimaryNameAttribute": definition.primary_name,
        "DisplayName": _label(definition.display_name),
        "IsCustomEntity": definition.logical_name.startswith("msdyn_"),
        "ChangeTrackingEnabled": False,
        "TableType": "Standard",
    }


def _option_set(definition: TableDef, column: Column) -> dict[str, Any]:
    options = column.options or {}
    if column.type == "Boolean":
        return {
            "MetadataId": _id(definition.logical_name, column.name, "options"),
            "Name": f"{definition.logical_name}_{column.name}",
            "OptionSetType": "Boolean",
            "IsGlobal": False,
            "TrueOption": {"Value": 1, "Label": _label(options.get(1, "Yes"))},
            "FalseOption": {"Value": 0, "Label": _label(options.get(0, "No"))},
        }
    return {
        "MetadataId": _id(definition.logical_name, column.name, "options"),
        "Name": f"{definition.logical_name}_{column.name}",
        "OptionSetType": column.type,
        "IsGlobal": False,
        "Options": [{"Value": value, "Label": _label(label)} for value, label in options.items()],
    }


def attribute_metadata(definition: TableDef, column: Column, *, expand_options: bool) -> dict[str, Any]:
    """The AttributeMetadata of a column, typed by `@odata.type`."""
    out: dict[str, Any] = {
        "@odata.type": f"#{NAMESPACE}{column.type}AttributeMetadata",
        "MetadataId": _id(definition.logical_name, column.name),
        "LogicalName": column.name,
        "SchemaName": column.name,
        "EntityLogicalName": definition.logical_name,
        "AttributeType": column.type,
        "AttributeTypeName": {"Value": TYPE_NAMES[column.type]},
        "DisplayName": _label(column.display),
        "IsPrimaryId": column.name == definition.primary_id,
        "IsPrimaryName": column.name == definition.primary_name,
        "IsValidForRead": column.readable,
        "IsValidForCreate": not column.system,
        "IsValidForUpdate": not column.system and column.name != definition.primary_id,
    }
    if column.max_length is not None:
        out["MaxLength"] = column.max_length
    if column.type == "Lookup":
        out["Targets"] = [column.target]
    if column.precision is not None:
        out["Precision"] = column.precision
    if column.min_value is not None and column.type in ("Integer", "Decimal", "Money", "Double"):
        out["MinValue"], out["MaxValue"] = column.min_value, column.max_value
    if expand_options and (column.type in CHOICE_TYPES or column.type == "Boolean"):
        out["OptionSet"] = _option_set(definition, column)
    return out


def _relationships(org: Organization, definition: TableDef) -> list[dict[str, Any]]:
    out = []
    for column in definition.columns.values():
        if column.type != "Lookup":
            continue
        target = org.defs.get(column.target or "")
        out.append(
            {
                "MetadataId": _id(definition.logical_name, column.name, "rel"),
                "SchemaName": f"{column.target}_{definition.logical_name}_{column.name}",
                "ReferencedEntity": column.target,
                "ReferencedAttribute": target.primary_id if target else f"{column.target}id",
                "ReferencingEntity": definition.logical_name,
                "ReferencingAttribute": column.name,
                "ReferencingEntityNavigationPropertyName": column.navigation,
                "ReferencedEntityNavigationPropertyName": f"{definition.logical_name}_{column.name}",
                "RelationshipType": "OneToManyRelationship",
            }
        )
    return out


def _keys(definition: TableDef) -> list[dict[str, Any]]:
    return [
        {
            "MetadataId": _id(definition.logical_name, key.schema_name),
            "SchemaName": key.schema_name,
            "LogicalName": key.schema_name.lower(),
            "EntityLogicalName": definition.logical_name,
            "KeyAttributes": list(key.columns),
            "EntityKeyIndexStatus": "Active",
        }
        for key in definition.keys
    ]


def _project(items: list[dict[str, Any]], params: Mapping[str, str], type_name: str) -> list[dict[str, Any]]:
    """Apply `$filter` and `$select` to metadata objects."""
    try:
        expr = parse_filter(params["$filter"]) if params.get("$filter") else None
        select = parse_select(params["$select"]) if params.get("$select") else None
    except ODataSyntaxError as exc:
        raise DataverseError(400, ODATA, exc.message) from exc
    if expr is not None:
        items = [i for i in items if evaluate(expr, i, case_insensitive=True, wildcard=False)]
    if select is None:
        return items
    known = {key for item in items for key in item} | {"LogicalName", "MetadataId"}
    for name in select:
        if name not in known:
            raise bad_request(f"Could not find a property named '{name}' on type '{NAMESPACE}{type_name}'.")
    keep = {*select, "MetadataId", "@odata.type", "OptionSet"}
    return [{k: v for k, v in item.items() if k in keep} for item in items]


def _table_for(org: Organization, key: str) -> TableDef:
    try:
        pairs = parse_key_predicate(key)
    except ODataSyntaxError as exc:
        raise DataverseError(400, ODATA, exc.message) from exc
    name, value = pairs[0]
    for definition in org.defs.values():
        if (name == "LogicalName" and value == definition.logical_name) or (
            name in (None, "MetadataId") and str(value).lower() == _id(definition.logical_name)
        ):
            return definition
    raise DataverseError(404, NOT_FOUND, f"Could not find entity with key {key}.")


def answer(org: Organization, segments: Sequence[Segment], params: Mapping[str, str]) -> dict[str, Any]:
    """The JSON body for a GET under `EntityDefinitions`."""
    base = f"{org.base_url}/$metadata#EntityDefinitions"
    head = segments[0]
    if head.key is None:
        if len(segments) > 1:
            raise segment_not_found(segments[1].name)
        items = _project([entity_metadata(d) for d in org.defs.values()], params, "EntityMetadata")
        return {"@odata.context": base, "value": items}
    definition = _table_for(org, head.key)
    if len(segments) == 1:
        body = {"@odata.context": f"{base}/$entity"}
        body.update(_project([entity_metadata(definition)], params, "EntityMetadata")[0])
        return body
    part = segments[1]
    expand = "OptionSet" in params.get("$expand", "")
    if part.name == "Attributes":
        columns = list(definition.columns.values())
        type_name = "AttributeMetadata"
        if len(segments) == 3:
            cast = segments[2].name.removeprefix(NAMESPACE)
            wanted = cast.removesuffix("AttributeMetadata")
            if not cast.endswith("AttributeMetadata") or wanted not in TYPE_NAMES:
                raise segment_not_found(segments[2].name)
            columns = [c for c in columns if c.type == wanted]
            type_name = cast
        if part.key is not None:
            pairs = parse_key_predicate(part.key)
            columns = [c for c in columns if c.name == pairs[0][1]]
            if not columns:
                raise DataverseError(404, NOT_FOUND, f"Could not find attribute with key {part.key}.")
            item = _project([attribute_metadata(definition, columns[0], expand_options=expand)], params, type_name)[0]
            return {"@odata.context": f"{base}('{definition.logical_name}')/Attributes/$entity", **item}
        items = [attribute_metadata(definition, c, expand_options=expand) for c in columns]
        return {
            "@odata.context": f"{base}('{definition.logical_name}')/Attributes",
            "value": _project(items, params, type_name),
        }
    if part.name == "Keys":
        return {
            "@odata.context": f"{base}('{definition.logical_name}')/Keys",
            "value": _project(_keys(definition), params, "EntityKeyMetadata"),
        }
    if part.name == "ManyToOneRelationships":
        return {
            "@odata.context": f"{base}('{definition.logical_name}')/ManyToOneRelationships",
            "value": _project(_relationships(org, definition), params, "OneToManyRelationshipMetadata"),
        }
    raise segment_not_found(part.name)
