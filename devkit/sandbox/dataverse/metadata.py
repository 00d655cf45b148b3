"""Table metadata objects: EntityMetadata, the typed AttributeMetadata, option sets, keys, relationships.

Every object carries the full property set of its type (`metadata_types`):
what the sandbox knows (names, types, lengths, ranges, options, keys, lookups,
`TableType` and `ExternalName` of virtual tables) and, for the rest, the
service's defaults. Built from the `TableDef`s alone, so a table added to the
organization (a template table, an F&O virtual table) gets full metadata with
nothing else to write. `metadata_query` answers the endpoints from these.
"""

from __future__ import annotations

import uuid
from typing import Any

from devkit.sandbox.dataverse.metadata_types import (
    ATTRIBUTE_TYPES,
    NAMESPACE,
    NIL_GUID,
    defaults,
    label,
    managed,
)
from devkit.sandbox.dataverse.org import Organization
from devkit.sandbox.dataverse.schema import CHOICE_TYPES, Column, TableDef

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
# ObjectTypeCode of the platform tables the sandbox has; custom tables number from 10000 as the service's do.
_TYPE_CODES = {
    "systemuser": 8,
    "transactioncurrency": 9105,
    "sdkmessage": 4606,
    "sdkmessagefilter": 4607,
    "sdkmessageprocessingstep": 4608,
    "sdkmessageprocessingstepimage": 4615,
    "serviceendpoint": 4618,
}
_PRIVILEGES = ("Create", "Read", "Write", "Delete", "Append", "AppendTo", "Assign", "Share")
_VERSION = "1.0"


def metadata_id(*parts: str) -> str:
    """The fixed MetadataId of a table, column, key or relationship."""
    return str(uuid.uuid5(_IDS, ":".join(parts)))


def _custom(definition: TableDef) -> bool:
    return definition.logical_name.startswith(("msdyn_", "mserp_")) or "_" in definition.logical_name


def _privileges(definition: TableDef, user_owned: bool) -> list[dict[str, Any]]:
    out = []
    for kind in _PRIVILEGES:
        if kind in ("Assign", "Share") and not user_owned:
            continue
        out.append(
            {
                "CanBeBasic": user_owned,
                "CanBeDeep": user_owned,
                "CanBeGlobal": True,
                "CanBeLocal": user_owned,
                "CanBeEntityReference": False,
                "CanBeParentEntityReference": False,
                "Name": f"prv{kind}{definition.logical_name}",
                "PrivilegeId": metadata_id(definition.logical_name, "privilege", kind),
                "PrivilegeType": kind,
            }
        )
    return out


def entity_metadata(org: Organization, definition: TableDef) -> dict[str, Any]:
    """Every structural EntityMetadata property of a table."""
    name = definition.logical_name
    user_owned = "ownerid" in definition.columns
    codes = {d: 10000 + i for i, d in enumerate(sorted(n for n in org.defs if n not in _TYPE_CODES))}
    out = defaults("EntityMetadata")
    out.update(
        {
            "MetadataId": metadata_id(name),
            "LogicalName": name,
            "SchemaName": name,
            "EntitySetName": definition.entity_set,
            "LogicalCollectionName": definition.entity_set,
            "CollectionSchemaName": definition.entity_set,
            "PrimaryIdAttribute": definition.primary_id,
            "PrimaryNameAttribute": definition.primary_name,
            "PrimaryImageAttribute": "entityimage" if "entityimage" in definition.columns else None,
            "DisplayName": label(definition.display_name),
            "DisplayCollectionName": label(definition.display_name),
            "ObjectTypeCode": _TYPE_CODES.get(name, codes.get(name)),
            "OwnershipType": "UserOwned" if user_owned else "OrganizationOwned",
            "IsCustomEntity": _custom(definition),
            "IsManaged": name.startswith(("msdyn_", "mserp_")) or name in _TYPE_CODES,
            "IsStateModelAware": "statecode" in definition.columns,
            "IsOptimisticConcurrencyEnabled": True,
            "IsValidForAdvancedFind": True,
            "IsSolutionAware": True,
            "IsEnabledForCharts": True,
            "IsImportable": True,
            "CanTriggerWorkflow": True,
            "IsCustomizable": managed("IsCustomizable", True),
            "IsRenameable": managed("IsRenameable", True),
            "CanCreateAttributes": managed("CanCreateAttributes", True),
            "CanCreateForms": managed("CanCreateForms", True),
            "CanCreateViews": managed("CanCreateViews", True),
            "CanCreateCharts": managed("CanCreateCharts", True),
            "CanBePrimaryEntityInRelationship": managed("CanBePrimaryEntityInRelationship", True),
            "CanBeRelatedEntityInRelationship": managed("CanBeRelatedEntityInRelationship", True),
            "CanBeInManyToMany": managed("CanBeInManyToMany", True),
            "IntroducedVersion": _VERSION,
            "TableType": definition.table_type,
            "ExternalName": definition.external_name,
            "Privileges": _privileges(definition, user_owned),
        }
    )
    return out


def attribute_type(column: Column) -> str:
    """The derived AttributeMetadata type of a column (`StringAttributeMetadata`, ...)."""
    return ATTRIBUTE_TYPES[column.type]


def attribute_metadata(definition: TableDef, column: Column) -> dict[str, Any]:
    """Every structural property of a column's typed AttributeMetadata, `@odata.type` first."""
    type_name = attribute_type(column)
    out: dict[str, Any] = {"@odata.type": f"#{NAMESPACE}{type_name}"}
    out.update(defaults(type_name))
    primary = column.name == definition.primary_id
    out.update(
        {
            "MetadataId": metadata_id(definition.logical_name, column.name),
            "LogicalName": column.name,
            "SchemaName": column.name,
            "EntityLogicalName": definition.logical_name,
            "AttributeType": column.type,
            "AttributeTypeName": {"Value": TYPE_NAMES[column.type]},
            "ColumnNumber": list(definition.columns).index(column.name) + 1,
            "DisplayName": label(column.display),
            "IntroducedVersion": _VERSION,
            "IsCustomAttribute": not column.system and column.name.startswith(("msdyn_", "mserp_", "new_")),
            "IsPrimaryId": primary,
            "IsPrimaryName": column.name == definition.primary_name,
            "IsValidForRead": column.readable,
            "IsValidForCreate": not column.system,
            "IsValidForUpdate": not column.system and not primary,
            "IsValidODataAttribute": True,
            "IsValidForForm": not primary,
            "IsValidForGrid": not primary,
            "IsFilterable": column.readable,
            "IsRetrievable": column.readable,
            "IsSearchable": column.readable,
            "SourceType": 0,
            "RequiredLevel": {
                "Value": "SystemRequired" if primary or column.name == definition.primary_name else "None",
                "CanBeChanged": not primary,
                "ManagedPropertyLogicalName": "canmodifyrequirementlevelsettings",
            },
            "IsCustomizable": managed("IsCustomizable", True),
            "IsRenameable": managed("IsRenameable", True),
            "IsAuditEnabled": managed("IsAuditEnabled", True),
            "IsValidForAdvancedFind": managed("IsValidForAdvancedFind", column.readable),
            "CanModifyAdditionalSettings": managed("CanModifyAdditionalSettings", True),
        }
    )
    out.update(_typed(column))
    return out


def _typed(column: Column) -> dict[str, Any]:
    """The type-specific properties the sandbox knows."""
    kind = column.type
    if kind == "String":
        length = column.max_length or 100
        return {"MaxLength": length, "DatabaseLength": length * 2, "Format": "Text", "FormatName": {"Value": "Text"},
                "ImeMode": "Auto", "IsLocalizable": False}
    if kind == "Memo":
        return {"MaxLength": column.max_length, "Format": "TextArea", "FormatName": {"Value": "TextArea"},
                "ImeMode": "Auto", "IsLocalizable": False}
    if kind == "Picklist":
        return {"DefaultFormValue": -1}
    if kind == "Boolean":
        return {"DefaultValue": False}
    if kind == "Lookup":
        return {"Targets": [column.target] if column.target else []}
    if kind == "DateTime":
        return {"Format": "DateAndTime", "DateTimeBehavior": {"Value": "UserLocal"}, "ImeMode": "Auto",
                "MinSupportedValue": "1753-01-01T00:00:00Z", "MaxSupportedValue": "9999-12-30T23:59:59Z",
                "CanChangeDateTimeBehavior": managed("CanChangeDateTimeBehavior", False)}
    if kind == "Integer":
        return {"MinValue": _whole(column.min_value), "MaxValue": _whole(column.max_value), "Format": "None"}
    if kind == "BigInt":
        return {"MinValue": -9_223_372_036_854_775_808, "MaxValue": 9_223_372_036_854_775_807}
    if kind in ("Decimal", "Money", "Double"):
        out: dict[str, Any] = {"MinValue": column.min_value, "MaxValue": column.max_value,
                               "Precision": column.precision, "ImeMode": "Auto"}
        if kind == "Money":
            out.update({"PrecisionSource": 2, "IsBaseCurrency": False})
        return out
    return {}


def _whole(value: float | None) -> int | None:
    return None if value is None else int(value)


def _option(value: int, text: str, option_id: str) -> dict[str, Any]:
    return {"Value": value, "Color": None, "IsManaged": True, "ExternalValue": None, "Label": label(text),
            "Description": label(None), "MetadataId": option_id, "HasChanged": None}


def option_set(definition: TableDef, column: Column) -> dict[str, Any] | None:
    """The OptionSet of a choice or Boolean column (None for other types)."""
    if column.type not in CHOICE_TYPES and column.type != "Boolean":
        return None
    options = dict(column.options or {})
    set_id = metadata_id(definition.logical_name, column.name, "options")
    kind = "BooleanOptionSetMetadata" if column.type == "Boolean" else "OptionSetMetadata"
    out = defaults(kind)
    out.update(
        {
            "MetadataId": set_id,
            "Name": f"{definition.logical_name}_{column.name}",
            "OptionSetType": column.type,
            "IsGlobal": False,
            "IsCustomOptionSet": column.name.startswith(("msdyn_", "new_")),
            "IsManaged": True,
            "DisplayName": label(column.display),
            "IsCustomizable": managed("IsCustomizable", True),
            "IntroducedVersion": _VERSION,
        }
    )
    if column.type == "Boolean":
        out["TrueOption"] = _option(1, options.get(1, "Yes"), metadata_id(set_id, "1"))
        out["FalseOption"] = _option(0, options.get(0, "No"), metadata_id(set_id, "0"))
        return out
    states = list((definition.columns["statecode"].options or {}) if "statecode" in definition.columns else {})
    statuses = list((definition.columns["statuscode"].options or {}) if "statuscode" in definition.columns else {})
    items = []
    for position, (value, text) in enumerate(options.items()):
        option: dict[str, Any] = {}
        if column.type == "State":
            option["@odata.type"] = f"#{NAMESPACE}StateOptionMetadata"
            default = statuses[min(position, len(statuses) - 1)] if statuses else None
            option.update({"DefaultStatus": default, "InvariantName": text})
        elif column.type == "Status":
            option["@odata.type"] = f"#{NAMESPACE}StatusOptionMetadata"
            option.update({"State": states[min(position, len(states) - 1)] if states else 0, "TransitionData": None})
        option.update(_option(value, text, metadata_id(set_id, str(value))))
        items.append(option)
    out["Options"] = items
    return out


def entity_keys(definition: TableDef) -> list[dict[str, Any]]:
    """The EntityKeyMetadata of a table's alternate keys."""
    out = []
    for key in definition.keys:
        item = defaults("EntityKeyMetadata")
        item.update(
            {
                "MetadataId": metadata_id(definition.logical_name, key.schema_name),
                "SchemaName": key.schema_name,
                "LogicalName": key.schema_name.lower(),
                "EntityLogicalName": definition.logical_name,
                "KeyAttributes": list(key.columns),
                "EntityKeyIndexStatus": "Active",
                "DisplayName": label(key.schema_name),
                "IsCustomizable": managed("IsCustomizable", True),
                "IntroducedVersion": _VERSION,
            }
        )
        out.append(item)
    return out


def _menu() -> dict[str, Any]:
    return {"Behavior": "UseCollectionName", "Group": "Details", "Label": label(None), "Order": 10000,
            "IsCustomizable": True, "Icon": None, "ViewId": NIL_GUID, "AvailableOffline": True, "MenuId": None,
            "QueryApi": None}


def _cascade() -> dict[str, Any]:
    return {"Assign": "NoCascade", "Delete": "RemoveLink", "Merge": "NoCascade", "Reparent": "NoCascade",
            "Share": "NoCascade", "Unshare": "NoCascade", "RollupView": "NoCascade", "Archive": "NoCascade"}


def relationships(org: Organization) -> list[dict[str, Any]]:
    """Every one-to-many relationship of the organization: one per lookup column of every table."""
    out = []
    for definition in org.defs.values():
        for column in definition.columns.values():
            if column.type != "Lookup" or not column.target:
                continue
            target = org.defs.get(column.target)
            prefix = "lk" if column.system else column.target
            item = defaults("OneToManyRelationshipMetadata")
            item.update(
                {
                    "MetadataId": metadata_id(definition.logical_name, column.name, "rel"),
                    "SchemaName": f"{prefix}_{definition.logical_name}_{column.name}",
                    "ReferencedEntity": column.target,
                    "ReferencedAttribute": target.primary_id if target else f"{column.target}id",
                    "ReferencingEntity": definition.logical_name,
                    "ReferencingAttribute": column.name,
                    "ReferencingEntityNavigationPropertyName": column.navigation or column.name,
                    "ReferencedEntityNavigationPropertyName": f"{prefix}_{definition.logical_name}_{column.name}",
                    "RelationshipType": "OneToManyRelationship",
                    "SecurityTypes": "Append",
                    "IsCustomRelationship": not column.system and column.name.startswith(("msdyn_", "new_")),
                    "IsManaged": True,
                    "IsValidForAdvancedFind": True,
                    "IsCustomizable": managed("IsCustomizable", True),
                    "IntroducedVersion": _VERSION,
                    "AssociatedMenuConfiguration": _menu(),
                    "CascadeConfiguration": _cascade(),
                }
            )
            out.append(item)
    return out
