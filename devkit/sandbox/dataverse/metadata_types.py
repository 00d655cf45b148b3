"""The Web API metadata types (`Microsoft.Dynamics.CRM.*Metadata`): their property sets and defaults.

Data, not code paths: each type names its base type, its structural properties
(with the kind of value each holds) and its navigation properties, as the
service's CSDL declares them. Sources (docs/sandbox-metadata.md): the Web API
reference pages (learn.microsoft.com/power-apps/developer/data-platform/webapi/reference/
entitymetadata, attributemetadata, ...) and Microsoft's typed Web API samples
(microsoft/PowerApps-Samples, dataverse/webapi/CSharp-NETx/WebAPIService/Metadata/Types).

`properties(type)` is what `$select`, `$filter` and `$expand` are checked against,
so a client may select every property the service has; `defaults(type)` gives
each the value the service shows when the sandbox knows nothing better (empty
labels, managed properties that can be changed, `null` strings).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

NAMESPACE = "Microsoft.Dynamics.CRM."
NIL_GUID = "00000000-0000-0000-0000-000000000000"
_LABEL_IDS = uuid.UUID("0b5c8e51-3d0f-4f7e-9a55-2c41d7e8f6a3")


@dataclass(frozen=True)
class MetadataType:
    """One metadata entity type: base type, structural properties (name -> kind) and navigation properties."""

    base: str | None
    properties: dict[str, str] = field(default_factory=dict)
    # navigation name -> the entity type it leads to (collection or single)
    navigation: dict[str, str] = field(default_factory=dict)


def _props(kind_by_names: dict[str, str]) -> dict[str, str]:
    """Expand `{"A B C": "bool"}` into `{"A": "bool", "B": "bool", "C": "bool"}`."""
    out: dict[str, str] = {}
    for names, kind in kind_by_names.items():
        for name in names.split():
            out[name] = kind
    return out


_ENTITY = _props(
    {
        "ActivityTypeMask ObjectTypeCode DaysSinceRecordLastModified": "int",
        "AutoCreateAccessTeams AutoRouteToOwnerQueue CanTriggerWorkflow ChangeTrackingEnabled EnforceStateTransitions "
        "EntityHelpUrlEnabled HasActivities HasFeedback HasNotes IsActivity IsActivityParty IsAIRUpdated "
        "IsAvailableOffline IsBPFEntity IsBusinessProcessEnabled IsChildEntity IsCustomEntity "
        "IsDocumentManagementEnabled IsDocumentRecommendationsEnabled IsEnabledForCharts "
        "IsEnabledForExternalChannels IsEnabledForTrace IsImportable IsInteractionCentricEnabled IsIntersect "
        "IsKnowledgeManagementEnabled IsLogicalEntity IsManaged IsMSTeamsIntegrationEnabled "
        "IsOneNoteIntegrationEnabled IsOptimisticConcurrencyEnabled IsPrivate IsQuickCreateEnabled "
        "IsReadingPaneEnabled IsSLAEnabled IsSolutionAware IsStateModelAware IsValidForAdvancedFind "
        "SyncToExternalSearchIndex UsesBusinessDataLabelTable": "bool",
        "CanBeInCustomEntityAssociation CanBeInManyToMany CanBePrimaryEntityInRelationship "
        "CanBeRelatedEntityInRelationship CanChangeHierarchicalRelationship CanChangeTrackingBeEnabled "
        "CanCreateAttributes CanCreateCharts CanCreateForms CanCreateViews CanEnableSyncToExternalSearchIndex "
        "CanModifyAdditionalSettings IsAuditEnabled IsConnectionsEnabled IsCustomizable IsDuplicateDetectionEnabled "
        "IsMailMergeEnabled IsMappable IsOfflineInMobileClient IsReadOnlyInMobileClient IsRenameable IsValidForQueue "
        "IsVisibleInMobile IsVisibleInMobileClient": "managed",
        "CollectionSchemaName EntityColor EntityHelpUrl EntitySetName ExternalCollectionName ExternalName "
        "IconLargeName IconMediumName IconSmallName IconVectorName IntroducedVersion LogicalCollectionName "
        "LogicalName MobileOfflineFilters PrimaryIdAttribute PrimaryImageAttribute PrimaryNameAttribute "
        "RecurrenceBaseEntityLogicalName ReportViewName SchemaName SettingOf TableType OwnershipType": "str",
        "CreatedOn ModifiedOn": "datetime",
        "DataProviderId DataSourceId": "guid",
        "Description DisplayCollectionName DisplayName": "label",
        "Privileges Settings": "list",
    }
)

_ATTRIBUTE = _props(
    {
        "AttributeOf AutoNumberFormat DeprecatedVersion EntityLogicalName ExternalName InheritsFrom "
        "IntroducedVersion LogicalName SchemaName AttributeType": "str",
        "CanBeSecuredForCreate CanBeSecuredForRead CanBeSecuredForUpdate IsCustomAttribute IsDataSourceSecret "
        "IsFilterable IsLogical IsManaged IsPrimaryId IsPrimaryName IsRequiredForForm IsRetrievable IsSearchable "
        "IsSecured IsValidForCreate IsValidForForm IsValidForGrid IsValidForRead IsValidForUpdate "
        "IsValidODataAttribute": "bool",
        "CanModifyAdditionalSettings IsAuditEnabled IsCustomizable IsGlobalFilterEnabled IsRenameable "
        "IsSortableEnabled IsValidForAdvancedFind": "managed",
        "ColumnNumber SourceType": "int",
        "CreatedOn ModifiedOn": "datetime",
        "Description DisplayName": "label",
        "LinkedAttributeId": "guid",
        "AttributeTypeName RequiredLevel Settings": "object",
    }
)

_OPTION_SET_BASE = _props(
    {
        "Description DisplayName": "label",
        "ExternalTypeName IntroducedVersion Name OptionSetType": "str",
        "IsCustomizable": "managed",
        "IsCustomOptionSet IsGlobal IsManaged": "bool",
    }
)

_RELATIONSHIP_BASE = _props(
    {
        "IntroducedVersion RelationshipType SchemaName SecurityTypes": "str",
        "IsCustomizable": "managed",
        "IsCustomRelationship IsManaged IsValidForAdvancedFind": "bool",
    }
)

_ENUM_NAV = {"OptionSet": "OptionSetMetadata", "GlobalOptionSet": "OptionSetMetadata"}

TYPES: dict[str, MetadataType] = {
    "MetadataBase": MetadataType(None, _props({"MetadataId": "guid", "HasChanged": "bool?"})),
    "EntityMetadata": MetadataType(
        "MetadataBase",
        _ENTITY,
        {
            "Attributes": "AttributeMetadata",
            "Keys": "EntityKeyMetadata",
            "ManyToManyRelationships": "ManyToManyRelationshipMetadata",
            "ManyToOneRelationships": "OneToManyRelationshipMetadata",
            "OneToManyRelationships": "OneToManyRelationshipMetadata",
        },
    ),
    "AttributeMetadata": MetadataType("MetadataBase", _ATTRIBUTE),
    "StringAttributeMetadata": MetadataType(
        "AttributeMetadata",
        _props(
            {
                "Format ImeMode YomiOf FormulaDefinition": "str",
                "MaxLength DatabaseLength SourceTypeMask": "int",
                "IsLocalizable": "bool",
                "FormatName": "object",
            }
        ),
    ),
    "MemoAttributeMetadata": MetadataType(
        "AttributeMetadata",
        _props({"Format ImeMode": "str", "MaxLength": "int", "IsLocalizable": "bool", "FormatName": "object"}),
    ),
    "EnumAttributeMetadata": MetadataType("AttributeMetadata", _props({"DefaultFormValue": "int"}), _ENUM_NAV),
    "PicklistAttributeMetadata": MetadataType(
        "EnumAttributeMetadata", _props({"FormulaDefinition ParentPicklistLogicalName": "str",
                                         "SourceTypeMask": "int", "ChildPicklistLogicalNames": "list"})
    ),
    "StateAttributeMetadata": MetadataType("EnumAttributeMetadata"),
    "StatusAttributeMetadata": MetadataType("EnumAttributeMetadata"),
    "EntityNameAttributeMetadata": MetadataType("EnumAttributeMetadata", _props({"IsEntityReferenceStored": "bool"})),
    "BooleanAttributeMetadata": MetadataType(
        "AttributeMetadata",
        _props({"DefaultValue": "bool", "FormulaDefinition": "str", "SourceTypeMask": "int"}),
        {"OptionSet": "BooleanOptionSetMetadata", "GlobalOptionSet": "BooleanOptionSetMetadata"},
    ),
    "LookupAttributeMetadata": MetadataType("AttributeMetadata", _props({"Targets": "list", "Format": "str"})),
    "MoneyAttributeMetadata": MetadataType(
        "AttributeMetadata",
        _props(
            {
                "ImeMode CalculationOf FormulaDefinition": "str",
                "MaxValue MinValue": "number",
                "Precision PrecisionSource SourceTypeMask": "int",
                "IsBaseCurrency": "bool",
            }
        ),
    ),
    "DateTimeAttributeMetadata": MetadataType(
        "AttributeMetadata",
        _props(
            {
                "MinSupportedValue MaxSupportedValue": "datetime",
                "Format ImeMode FormulaDefinition": "str",
                "SourceTypeMask": "int",
                "DateTimeBehavior": "object",
                "CanChangeDateTimeBehavior": "managed",
            }
        ),
    ),
    "IntegerAttributeMetadata": MetadataType(
        "AttributeMetadata",
        _props({"MaxValue MinValue SourceTypeMask": "int", "Format FormulaDefinition": "str"}),
    ),
    "BigIntAttributeMetadata": MetadataType("AttributeMetadata", _props({"MaxValue MinValue": "int"})),
    "DecimalAttributeMetadata": MetadataType(
        "AttributeMetadata",
        _props({"MaxValue MinValue": "number", "Precision SourceTypeMask": "int", "ImeMode FormulaDefinition": "str"}),
    ),
    "DoubleAttributeMetadata": MetadataType(
        "AttributeMetadata", _props({"MaxValue MinValue": "number", "Precision": "int", "ImeMode": "str"})
    ),
    "UniqueIdentifierAttributeMetadata": MetadataType("AttributeMetadata"),
    "OptionSetMetadataBase": MetadataType("MetadataBase", _OPTION_SET_BASE),
    "OptionSetMetadata": MetadataType("OptionSetMetadataBase", _props({"Options": "list"})),
    "BooleanOptionSetMetadata": MetadataType("OptionSetMetadataBase", _props({"TrueOption FalseOption": "object"})),
    "EntityKeyMetadata": MetadataType(
        "MetadataBase",
        _props(
            {
                "AsyncJob": "guid",
                "DisplayName": "label",
                "EntityKeyIndexStatus EntityLogicalName IntroducedVersion LogicalName SchemaName": "str",
                "IsCustomizable": "managed",
                "IsManaged": "bool",
                "KeyAttributes": "list",
            }
        ),
    ),
    "RelationshipMetadataBase": MetadataType("MetadataBase", _RELATIONSHIP_BASE),
    "OneToManyRelationshipMetadata": MetadataType(
        "RelationshipMetadataBase",
        _props(
            {
                "AssociatedMenuConfiguration CascadeConfiguration": "object",
                "IsHierarchical": "bool",
                "ReferencedAttribute ReferencedEntity ReferencedEntityNavigationPropertyName ReferencingAttribute "
                "ReferencingEntity ReferencingEntityNavigationPropertyName": "str",
            }
        ),
    ),
    "ManyToManyRelationshipMetadata": MetadataType(
        "RelationshipMetadataBase",
        _props(
            {
                "Entity1AssociatedMenuConfiguration Entity2AssociatedMenuConfiguration": "object",
                "Entity1IntersectAttribute Entity1LogicalName Entity1NavigationPropertyName Entity2IntersectAttribute "
                "Entity2LogicalName Entity2NavigationPropertyName IntersectEntityName": "str",
            }
        ),
    ),
}

# AttributeType (AttributeTypeCode) -> the derived AttributeMetadata type the service answers with.
ATTRIBUTE_TYPES = {
    "String": "StringAttributeMetadata",
    "Memo": "MemoAttributeMetadata",
    "Picklist": "PicklistAttributeMetadata",
    "State": "StateAttributeMetadata",
    "Status": "StatusAttributeMetadata",
    "EntityName": "EntityNameAttributeMetadata",
    "Boolean": "BooleanAttributeMetadata",
    "Lookup": "LookupAttributeMetadata",
    "Customer": "LookupAttributeMetadata",
    "Owner": "LookupAttributeMetadata",
    "Money": "MoneyAttributeMetadata",
    "DateTime": "DateTimeAttributeMetadata",
    "Integer": "IntegerAttributeMetadata",
    "BigInt": "BigIntAttributeMetadata",
    "Decimal": "DecimalAttributeMetadata",
    "Double": "DoubleAttributeMetadata",
    "Uniqueidentifier": "UniqueIdentifierAttributeMetadata",
}

# Managed properties whose ManagedPropertyLogicalName is not the property name in lower case.
_MANAGED_NAMES = {
    "IsAuditEnabled": "canmodifyauditsettings",
    "IsValidForAdvancedFind": "canmodifysearchsettings",
    "IsGlobalFilterEnabled": "canmodifyglobalfiltersettings",
    "IsSortableEnabled": "canmodifyissortablesettings",
    "IsConnectionsEnabled": "canmodifyconnectionsettings",
    "IsDuplicateDetectionEnabled": "canmodifyduplicatedetectionsettings",
    "IsMailMergeEnabled": "canmodifymailmergesettings",
    "IsOfflineInMobileClient": "canmodifymobileclientoffline",
    "IsReadOnlyInMobileClient": "canmodifymobileclientreadonly",
    "IsValidForQueue": "canmodifyqueuesettings",
    "IsVisibleInMobile": "canmodifymobilevisibility",
    "IsVisibleInMobileClient": "canmodifymobileclientvisibility",
}


def lineage(type_name: str) -> list[str]:
    """The type and its base types, most derived first."""
    out = []
    current: str | None = type_name
    while current is not None:
        out.append(current)
        current = TYPES[current].base
    return out


def properties(type_name: str) -> dict[str, str]:
    """Every structural property of a type (inherited ones included), name -> kind."""
    out: dict[str, str] = {}
    for name in reversed(lineage(type_name)):
        out.update(TYPES[name].properties)
    return out


def navigation(type_name: str) -> dict[str, str]:
    """Every navigation property of a type (inherited ones included), name -> target type."""
    out: dict[str, str] = {}
    for name in reversed(lineage(type_name)):
        out.update(TYPES[name].navigation)
    return out


def derives_from(type_name: str, base: str) -> bool:
    return base in lineage(type_name)


def label(text: str | None, *, managed: bool = True) -> dict[str, Any]:
    """A Label: the 1033 text as LocalizedLabels and UserLocalizedLabel; empty when there is no text."""
    if not text:
        return {"LocalizedLabels": [], "UserLocalizedLabel": None}
    label_id = str(uuid.uuid5(_LABEL_IDS, text))
    localized = {"Label": text, "LanguageCode": 1033, "IsManaged": managed, "MetadataId": label_id, "HasChanged": None}
    return {"LocalizedLabels": [localized], "UserLocalizedLabel": dict(localized)}


def managed(name: str, value: bool, can_be_changed: bool = True) -> dict[str, Any]:
    """A BooleanManagedProperty."""
    return {"Value": value, "CanBeChanged": can_be_changed, "ManagedPropertyLogicalName": _MANAGED_NAMES.get(
        name, name.lower())}


# Kind -> the value the service shows for a property the sandbox has nothing better for.
_DEFAULTS: dict[str, Any] = {"bool": False, "bool?": None, "str": None, "int": None, "number": None,
                             "datetime": None, "guid": None, "list": [], "object": None}


def defaults(type_name: str) -> dict[str, Any]:
    """Every structural property of a type with its default value (labels empty, managed properties False)."""
    out: dict[str, Any] = {}
    for name, kind in properties(type_name).items():
        if kind == "label":
            out[name] = label(None)
        elif kind == "managed":
            out[name] = managed(name, False)
        else:
            value = _DEFAULTS[kind]
            out[name] = list(value) if isinstance(value, list) else value
    return out
