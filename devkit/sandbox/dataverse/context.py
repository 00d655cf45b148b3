"""The `RemoteExecutionContext` a webhook receives, in the shape of the documented sample [D16].

Collections are `{"key":..., "value":...}` lists; entities carry `Attributes`,
`EntityState`, `FormattedValues`, `Id`, `KeyAttributes`, `LogicalName`,
`RelatedEntities`, `RowVersion`; values are typed the WCF way: choices as
`OptionSetValue`, lookups as `EntityReference`, money as `Money`, dates as
`/Date(ms)/`. As in the sample, the Target entity carries `__type` and image
entities do not; images leave out columns that are null (an SDK entity holds
only the attributes that have values), and the Target of an Update holds the
submitted columns plus the id and the modified stamp. Images carry `RowVersion`:
the row's `versionnumber` as a string, as it stood in that image (so a Delete's
pre-image holds the version of the row's last change, the number the last
Update's post-image held). The Target's `RowVersion` stays null, as in the
sample: the caller sets it only to ask for an optimistic-concurrency check.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from devkit.sandbox.dataverse import seed
from devkit.sandbox.dataverse.org import Organization
from devkit.sandbox.dataverse.schema import CHOICE_TYPES, TableDef
from devkit.sandbox.dataverse.scope import Change
from devkit.sandbox.dataverse.values import formatted, to_epoch_ms

CONTRACTS = "http://schemas.microsoft.com/xrm/2011/Contracts"
ENTITY_TYPE = f"Entity:{CONTRACTS}"
REFERENCE_TYPE = f"EntityReference:{CONTRACTS}"
OPTION_TYPE = f"OptionSetValue:{CONTRACTS}"
MONEY_TYPE = f"Money:{CONTRACTS}"
PAIR_TYPE = "KeyValuePairOfstringstring:#System.Collections.Generic"
_FORMATTED_TYPES = frozenset({*CHOICE_TYPES, "Boolean", "Money", "DateTime"})


def wcf_date(epoch_ms: int, offset: str = "") -> str:
    """The WCF JSON date form `/Date(1506384247000)/` (optionally with an offset such as `+0000`)."""
    return f"/Date({epoch_ms}{offset})/"


def reference(logical_name: str, row_id: str, name: str | None = None, *, typed: bool = True) -> dict[str, Any]:
    """An EntityReference."""
    ref: dict[str, Any] = {"__type": REFERENCE_TYPE} if typed else {}
    ref.update(Id=row_id, KeyAttributes=[], LogicalName=logical_name, Name=name, RowVersion=None)
    return ref


def typed_value(org: Organization, definition: TableDef, column_name: str, stored: Any) -> Any:
    """A stored value as the execution context serializes it."""
    if stored is None:
        return None
    column = definition.columns[column_name]
    kind = column.type
    if kind in CHOICE_TYPES:
        return {"__type": OPTION_TYPE, "Value": stored}
    if kind == "Lookup":
        target = column.target or ""
        return reference(target, stored, org.primary_name(target, stored))
    if kind == "Money":
        return {"__type": MONEY_TYPE, "Value": stored}
    if kind == "DateTime":
        return wcf_date(to_epoch_ms(stored))
    return stored


def entity(
    org: Organization,
    definition: TableDef,
    row_id: str,
    attributes: Iterable[tuple[str, Any]],
    *,
    with_type: bool,
    key_attributes: dict[str, Any] | None = None,
    row_version: str | None = None,
) -> dict[str, Any]:
    """An Entity with the given (column, stored value) attributes."""
    pairs = list(attributes)
    out: dict[str, Any] = {"__type": ENTITY_TYPE} if with_type else {}
    out["Attributes"] = [{"key": k, "value": typed_value(org, definition, k, v)} for k, v in pairs]
    out["EntityState"] = None
    out["FormattedValues"] = [
        {"key": k, "value": formatted(definition.columns[k], v)}
        for k, v in pairs
        if v is not None and definition.columns[k].type in _FORMATTED_TYPES
    ]
    out["Id"] = row_id
    out["KeyAttributes"] = [{"key": k, "value": v} for k, v in (key_attributes or {}).items()]
    out["LogicalName"] = definition.logical_name
    out["RelatedEntities"] = []
    out["RowVersion"] = row_version
    return out


def target(org: Organization, definition: TableDef, change: Change, *, full: bool) -> dict[str, Any]:
    """`InputParameters` Target: an Entity for Create/Update (submitted columns), an EntityReference for Delete.

    `full=False` gives the main-operation view the sample shows in `ParentContext`:
    only the submitted columns and the id.
    """
    if change.message == "Delete":
        return reference(definition.logical_name, change.row_id)
    after = change.after or {}
    pairs: list[tuple[str, Any]] = list(change.submitted.items())
    pairs.append((definition.primary_id, change.row_id))
    if full:
        stamps = ["modifiedon", "modifiedby", "modifiedonbehalfby"]
        if change.message == "Create":
            stamps = ["statecode", "statuscode", "createdon", "createdby", "createdonbehalfby", *stamps]
        pairs += [(name, after.get(name)) for name in stamps if name not in change.submitted]
    return entity(org, definition, change.row_id, pairs, with_type=True, key_attributes=change.key_attributes)


def image(
    org: Organization, definition: TableDef, row: dict[str, Any], attributes: Sequence[str] | None
) -> dict[str, Any]:
    """An entity image: the registered attributes (all when none are listed) that have values, and the id."""
    names = [
        c for c in (attributes or definition.columns) if c in definition.columns and definition.columns[c].readable
    ]
    if definition.primary_id not in names:
        names.append(definition.primary_id)
    pairs = [(name, row.get(name)) for name in names if row.get(name) is not None]
    version = row.get("versionnumber")
    return entity(
        org,
        definition,
        row[definition.primary_id],
        pairs,
        with_type=False,
        row_version=None if version is None else str(version),
    )


def build(
    org: Organization,
    change: Change,
    *,
    correlation_id: str,
    operation_id: str,
    operation_created_ms: int,
    step_id: str,
    pre_images: list[dict[str, Any]],
    post_images: list[dict[str, Any]],
) -> dict[str, Any]:
    """The whole context for one step execution, top-level keys in the sample's (alphabetical) order."""
    definition = org.defs[change.table]
    user = change.caller.user_id
    # The documented sample leaves the step's Name empty.
    owning = reference("sdkmessageprocessingstep", step_id, None, typed=False)
    created = wcf_date(operation_created_ms, "+0000")
    parent_inputs: list[dict[str, Any]] = [{"key": "Target", "value": target(org, definition, change, full=False)}]
    if change.message != "Delete":
        parent_inputs.append({"key": "SuppressDuplicateDetection", "value": False})
    parent = {
        "BusinessUnitId": seed.BUSINESS_UNIT_ID,
        "CorrelationId": correlation_id,
        "Depth": 1,
        "InitiatingUserId": user,
        "InputParameters": parent_inputs,
        "IsExecutingOffline": False,
        "IsInTransaction": False,
        "IsOfflinePlayback": False,
        "IsolationMode": 1,
        "MessageName": change.message,
        "Mode": 1,
        "OperationCreatedOn": created,
        "OperationId": operation_id,
        "OrganizationId": seed.ORGANIZATION_ID,
        "OrganizationName": seed.ORGANIZATION_NAME,
        "OutputParameters": [],
        "OwningExtension": owning,
        "ParentContext": None,
        "PostEntityImages": [],
        "PreEntityImages": [],
        "PrimaryEntityId": change.row_id,
        "PrimaryEntityName": change.table,
        "RequestId": None,
        "SecondaryEntityName": "none",
        "SharedVariables": [
            {
                "key": "ChangedEntityTypes",
                "value": [
                    {"__type": PAIR_TYPE, "key": change.table, "value": change.message},
                ],
            }
        ],
        "Stage": 30,
        "UserId": user,
    }
    outputs = [{"key": "id", "value": change.row_id}] if change.message == "Create" else []
    return {
        "BusinessUnitId": seed.BUSINESS_UNIT_ID,
        "CorrelationId": correlation_id,
        "Depth": 1,
        "InitiatingUserId": user,
        "InputParameters": [{"key": "Target", "value": target(org, definition, change, full=True)}],
        "IsExecutingOffline": False,
        "IsInTransaction": False,
        "IsOfflinePlayback": False,
        "IsolationMode": 1,
        "MessageName": change.message,
        "Mode": 1,
        "OperationCreatedOn": created,
        "OperationId": operation_id,
        "OrganizationId": seed.ORGANIZATION_ID,
        "OrganizationName": seed.ORGANIZATION_NAME,
        "OutputParameters": outputs,
        "OwningExtension": owning,
        "ParentContext": parent,
        "PostEntityImages": post_images,
        "PreEntityImages": pre_images,
        "PrimaryEntityId": change.row_id,
        "PrimaryEntityName": change.table,
        "RequestId": None,
        "SecondaryEntityName": "none",
        "SharedVariables": [],
        "Stage": 40,
        "UserId": user,
    }
