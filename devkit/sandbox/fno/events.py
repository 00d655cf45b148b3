"""Payloads F&O sends when a row changes: business events and data events.

- Business event (wire-formats B3): the PascalCase JSON envelope plus the
  event's own fields (entity set, change type, key fields).
- Data event (wire-formats B2): the `RemoteExecutionContext` the Power
  Platform integration delivers from the entity's virtual table
  (`mserp_<data entity lower case>`), messages OnExternalCreated / Updated /
  Deleted. Enum values are option-set integers deliberately unlike both F&O's
  enum values and the Dataverse msdyn choice values (200000000 + member
  index): they are not stable between systems and a consumer must not map
  them. Empty (1900-01-01) dates are dropped, as the service drops them.
"""

from __future__ import annotations

import functools
import json
import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from devkit.sandbox.fno.schema import EntityDef
from devkit.sandbox.fno.values import is_empty_date, parse_datetime, to_json

ChangeType = Literal["Created", "Updated", "Deleted"]
CHANGE_TYPES: tuple[ChangeType, ...] = ("Created", "Updated", "Deleted")
MESSAGES: dict[ChangeType, str] = {
    "Created": "OnExternalCreated",
    "Updated": "OnExternalUpdated",
    "Deleted": "OnExternalDeleted",
}
OPTION_SET_BASE = 200_000_000
MAX_CONTEXT_BYTES = 256 * 1024
_ENTITY_TYPE = "Entity:http://schemas.microsoft.com/xrm/2011/Contracts"
_REFERENCE_TYPE = "EntityReference:http://schemas.microsoft.com/xrm/2011/Contracts"
_OPTION_TYPE = "OptionSetValue:http://schemas.microsoft.com/xrm/2011/Contracts"
_FIRST_CONTROL_NUMBER = 5_637_144_576  # where F&O's RecId-like counters start


@dataclass(frozen=True)
class Change:
    """One committed create, update or delete of a row."""

    entity: EntityDef
    change_type: ChangeType
    row: dict[str, Any]  # the row after the change; for a delete, the row that was deleted
    before: dict[str, Any] | None  # the row before an update or delete
    submitted: tuple[str, ...]  # properties the request set (all of them for a create)
    recid: int
    time: datetime


def wcf_date(moment: datetime) -> str:
    """The WCF JSON date form `/Date(<ms since epoch>)/`."""
    return f"/Date({int(moment.timestamp() * 1000)})/"


def _guid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def row_guid(entity: EntityDef, recid: int) -> str:
    """The virtual-table row id: entity id in the first 4 bytes, RecId in the last 8."""
    return _row_guid(entity.entity_id, recid)


@functools.lru_cache(maxsize=65536)
def _row_guid(entity_id: int, recid: int) -> str:
    # Several times per event (Target, images, the id attribute): worth remembering.
    return str(uuid.UUID(bytes=entity_id.to_bytes(4, "big") + bytes(4) + recid.to_bytes(8, "big")))


def primary_field(entity: EntityDef, row: dict[str, Any]) -> str:
    """`mserp_primaryfield`: the key values joined by `|`, at most 255 characters."""
    return "|".join(str(row[k]) for k in entity.keys)[:255]


def column(name: str) -> str:
    """The virtual-table column of an F&O property."""
    return f"mserp_{name.lower()}"


@dataclass
class EventFactory:
    """Builds event payloads; ids and control numbers come from a seeded generator."""

    rng: random.Random
    control_number: int = _FIRST_CONTROL_NUMBER
    ids: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("user", "business_unit", "organization", "aad_object"):
            self.ids[name] = _guid(self.rng)

    def next_control_number(self) -> int:
        """Increasing, with gaps (F&O's numbers come from a shared sequence)."""
        self.control_number += self.rng.randint(1, 40)
        return self.control_number

    def business_event(self, change: Change, event_id: str, default_company: str) -> dict[str, Any]:
        """The business event JSON for `change` (wire-formats B3)."""
        t = change.time.astimezone(UTC)
        legal_entity = change.row.get("dataAreaId") if change.entity.company_specific else default_company
        body: dict[str, Any] = {
            "BusinessEventId": event_id,
            "BusinessEventLegalEntity": str(legal_entity).upper(),
            "ContextRecordSubject": "",
            "ControlNumber": self.next_control_number(),
            "EventId": _guid(self.rng).upper(),
            "EventTime": wcf_date(t),
            "EventTimeIso8601": f"{t:%Y-%m-%dT%H:%M:%S}.{t.microsecond:06d}0Z",
            "InitiatingUserAADObjectId": "{" + self.ids["aad_object"].upper() + "}",
            "MajorVersion": 1,
            "MinorVersion": 0,
            "ParentContextRecordSubjects": [],
            "EntityName": change.entity.entity_set,
            "ChangeType": change.change_type,
        }
        for key in change.entity.keys:
            body[key] = change.row[key]
        return body

    def _attributes(
        self, change: Change, row: dict[str, Any], names: tuple[str, ...]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        entity = change.entity
        attributes: list[dict[str, Any]] = []
        formatted: list[dict[str, Any]] = []
        for name in names:
            prop = entity.by_name[name]
            value = row[name]
            if prop.kind in ("datetime", "date"):
                if is_empty_date(value):
                    continue  # the service drops null dates from the payload
                moment = parse_datetime(value)
                out: Any = wcf_date(moment) if moment is not None else value
            elif prop.enum is not None:
                out = {"__type": _OPTION_TYPE, "Value": OPTION_SET_BASE + prop.enum.value_of(value)}
                formatted.append({"key": column(name), "value": value})
            elif value == "":
                out = None  # Dataverse has no empty strings
            else:
                out = to_json(value)
            attributes.append({"key": column(name), "value": out})
        attributes.append({"key": "mserp_primaryfield", "value": primary_field(entity, row)})
        attributes.append({"key": f"{entity.virtual_table}id", "value": row_guid(entity, change.recid)})
        return attributes, formatted

    def _entity(self, change: Change, row: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
        attributes, formatted = self._attributes(change, row, names)
        return {
            "__type": _ENTITY_TYPE,
            "Attributes": attributes,
            "EntityState": None,
            "FormattedValues": formatted,
            "Id": row_guid(change.entity, change.recid),
            "KeyAttributes": [],
            "LogicalName": change.entity.virtual_table,
            "RelatedEntities": [],
            "RowVersion": None,
        }

    def data_event(self, change: Change, step_id: str) -> tuple[dict[str, Any], dict[str, str]]:
        """The RemoteExecutionContext body and the delivery headers for `change` (wire-formats B2)."""
        context, headers, _ = self.encoded_data_event(change, step_id)
        return context, headers

    def encoded_data_event(self, change: Change, step_id: str) -> tuple[dict[str, Any], dict[str, str], bytes]:
        """`data_event` plus the JSON body as sent (encoded once: its size decides the reduced form)."""
        entity = change.entity
        all_names = tuple(p.name for p in entity.properties)
        target: dict[str, Any]
        if change.change_type == "Deleted":
            target = {
                "__type": _REFERENCE_TYPE,
                "Id": row_guid(entity, change.recid),
                "KeyAttributes": [],
                "LogicalName": entity.virtual_table,
                "Name": None,
                "RowVersion": None,
            }
        else:
            wanted = set(change.submitted) | set(entity.keys)
            names = all_names if change.change_type == "Created" else tuple(n for n in all_names if n in wanted)
            target = self._entity(change, change.row, names)
        pre_images = []
        if change.before is not None:
            pre_images.append({"key": "PreImage", "value": self._entity(change, change.before, all_names)})
        correlation = _guid(self.rng)
        message = MESSAGES[change.change_type]
        context: dict[str, Any] = {
            "BusinessUnitId": self.ids["business_unit"],
            "CorrelationId": correlation,
            "Depth": 1,
            "InitiatingUserId": self.ids["user"],
            "InputParameters": [{"key": "Target", "value": target}],
            "IsExecutingOffline": False,
            "IsInTransaction": False,
            "IsOfflinePlayback": False,
            "IsolationMode": 1,
            "MessageName": message,
            "Mode": 1,
            "OperationCreatedOn": wcf_date(change.time),
            "OperationId": _guid(self.rng),
            "OrganizationId": self.ids["organization"],
            "OrganizationName": "fnosandbox",
            "OutputParameters": [],
            "OwningExtension": {
                "Id": step_id,
                "KeyAttributes": [],
                "LogicalName": "sdkmessageprocessingstep",
                "Name": None,
                "RowVersion": None,
            },
            "ParentContext": None,
            "PostEntityImages": [],
            "PreEntityImages": pre_images,
            "PrimaryEntityId": row_guid(entity, change.recid),
            "PrimaryEntityName": entity.virtual_table,
            "RequestId": _guid(self.rng),
            "SecondaryEntityName": "none",
            "SharedVariables": [],
            "Stage": 40,
            "UserId": self.ids["user"],
        }
        headers = {
            "x-request-id": _guid(self.rng),
            "x-ms-dynamics-organization": "fnosandbox.crm.dynamics.com",
            "x-ms-dynamics-entity-name": entity.virtual_table,
            "x-ms-dynamics-request-name": message,
            "x-ms-correlation-request-id": correlation,
        }
        body = json.dumps(context).encode()
        if len(body) > MAX_CONTEXT_BYTES:
            # Over 256 KB the platform strips the row data: only ids and names remain.
            for key in ("ParentContext", "InputParameters", "PreEntityImages", "PostEntityImages"):
                context.pop(key)
            headers["x-ms-dynamics-msg-size-exceeded"] = "true"
            body = json.dumps(context).encode()
        return context, headers, body
