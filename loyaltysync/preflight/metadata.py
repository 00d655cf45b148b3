"""Live metadata of both sides, read through the app's own clients and reduced to what the checks need.

- F&O: `/data/$metadata` (CSDL): entity sets, entity types (key, properties
  with type and MaxLength) and enum types (members), wire-formats §2.1. A real
  environment's document is tens of megabytes, so it is parsed as a stream and
  only names, types and lengths are kept.
- Dataverse: `EntityDefinitions(LogicalName='<table>')` with its `Attributes`
  (type, writability), the typed casts for `MaxLength` and choice options
  (`$expand=OptionSet`), `Keys` and `ManyToOneRelationships` (wire-formats §1).
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from xml.etree import ElementTree as ET

from loyaltysync.targets.dataverse import DataverseClient
from loyaltysync.targets.fno import FnoClient
from loyaltysync.targets.odata import check_name

CRM = "Microsoft.Dynamics.CRM."
STRING_TYPES = frozenset({"String", "Memo"})
CHOICE_TYPES = frozenset({"Picklist", "State", "Status"})
_READ = {"If-None-Match": "null"}


@dataclass(frozen=True)
class FoProperty:
    """One property of an F&O entity type: `Edm.*` or an enum type's full name, and its MaxLength."""

    name: str
    type: str
    max_length: int | None = None


@dataclass(frozen=True)
class FoEntityType:
    name: str
    keys: tuple[str, ...]
    properties: dict[str, FoProperty]


@dataclass
class FoMetadata:
    """What `/data/$metadata` declares, by full type name (`Microsoft.Dynamics.DataEntities.X`)."""

    entity_sets: dict[str, str] = field(default_factory=dict)  # set name -> entity type full name
    entity_types: dict[str, FoEntityType] = field(default_factory=dict)
    enums: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def entity(self, entity_set: str) -> FoEntityType | None:
        """The entity type behind `entity_set`, None when there is no such set."""
        type_name = self.entity_sets.get(entity_set)
        return self.entity_types.get(type_name) if type_name else None


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _length(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


def parse_csdl(document: bytes) -> FoMetadata:
    """Entity sets, entity types and enum types of a CSDL document (any number of schemas)."""
    metadata = FoMetadata()
    namespace = ""
    entity: tuple[str, list[str], dict[str, FoProperty]] | None = None
    enum: tuple[str, list[str]] | None = None
    # The parser only sees the configured F&O environment's own metadata document.
    for event, element in ET.iterparse(io.BytesIO(document), events=("start", "end")):  # noqa: S314
        tag = _local(element.tag)
        if event == "start":
            if tag == "Schema":
                namespace = element.get("Namespace", "")
            elif tag == "EntityType":
                entity = (f"{namespace}.{element.get('Name', '')}", [], {})
            elif tag == "EnumType":
                enum = (f"{namespace}.{element.get('Name', '')}", [])
            continue
        if tag == "PropertyRef" and entity is not None:
            entity[1].append(element.get("Name", ""))
        elif tag == "Property" and entity is not None:
            name = element.get("Name", "")
            entity[2][name] = FoProperty(name, element.get("Type", ""), _length(element.get("MaxLength")))
        elif tag == "EntityType" and entity is not None:
            metadata.entity_types[entity[0]] = FoEntityType(entity[0], tuple(entity[1]), entity[2])
            entity = None
        elif tag == "Member" and enum is not None:
            enum[1].append(element.get("Name", ""))
        elif tag == "EnumType" and enum is not None:
            metadata.enums[enum[0]] = tuple(enum[1])
            enum = None
        elif tag == "EntitySet":
            metadata.entity_sets[element.get("Name", "")] = element.get("EntityType", "")
        if tag in ("EntityType", "EnumType", "EntityContainer", "Schema"):
            element.clear()  # keep memory flat on a large document
    return metadata


async def read_fo(client: FnoClient) -> FoMetadata:
    """F&O's `/data/$metadata`, parsed."""
    response = await client.http.request("GET", "$metadata", headers={"Accept": "application/xml"})
    return parse_csdl(response.content)


@dataclass(frozen=True)
class DvColumn:
    """One Dataverse column: attribute type, writability, MaxLength (strings), option values (choices)."""

    name: str
    type: str
    max_length: int | None = None
    options: frozenset[int] | None = None
    valid_for_create: bool = True
    valid_for_update: bool = True


@dataclass(frozen=True)
class DvRelationship:
    """A many-to-one relationship: the lookup column, the table it references and its navigation property."""

    attribute: str
    referenced_entity: str
    navigation: str


@dataclass
class DvTable:
    logical_name: str
    entity_set: str
    primary_id: str
    columns: dict[str, DvColumn]
    keys: list[tuple[frozenset[str], str]] = field(default_factory=list)  # (columns, index status)
    relationships: dict[str, DvRelationship] = field(default_factory=dict)


async def _get(client: DataverseClient, path: str, *, allow_missing: bool = False) -> dict[str, Any] | None:
    response = await client.http.request("GET", path, headers=_READ, allow={404} if allow_missing else ())
    if response.status_code == 404:
        return None
    body: dict[str, Any] = response.json()
    return body


async def _values(client: DataverseClient, path: str) -> list[dict[str, Any]]:
    body = await _get(client, path)
    return list((body or {}).get("value") or [])


def _options(option_set: dict[str, Any] | None) -> frozenset[int] | None:
    if not option_set:
        return None
    if option_set.get("OptionSetType") == "Boolean":
        return frozenset({0, 1})
    return frozenset(int(o["Value"]) for o in option_set.get("Options") or [] if "Value" in o)


async def read_table(
    client: DataverseClient, logical_name: str, *, columns: Iterable[str] = (), details: bool = True
) -> DvTable | None:
    """A table's definition, None when Dataverse has no such table.

    `columns` are the ones the caller cares about: the typed casts (lengths,
    options) are only requested for their types. `details=False` skips keys and
    relationships (enough for a lookup's referenced table).
    """
    base = f"EntityDefinitions(LogicalName='{check_name(logical_name)}')"
    entity = await _get(
        client, f"{base}?$select=LogicalName,EntitySetName,PrimaryIdAttribute", allow_missing=True
    )
    if entity is None:
        return None
    found: dict[str, DvColumn] = {}
    for item in await _values(
        client, f"{base}/Attributes?$select=LogicalName,AttributeType,IsValidForCreate,IsValidForUpdate"
    ):
        name = str(item.get("LogicalName"))
        found[name] = DvColumn(
            name,
            str(item.get("AttributeType")),
            valid_for_create=item.get("IsValidForCreate") is not False,
            valid_for_update=item.get("IsValidForUpdate") is not False,
        )
    wanted = {found[c].type for c in columns if c in found}
    for kind in sorted(wanted & (STRING_TYPES | CHOICE_TYPES | {"Boolean"})):
        query = "$select=LogicalName,MaxLength" if kind in STRING_TYPES else "$select=LogicalName&$expand=OptionSet"
        for item in await _values(client, f"{base}/Attributes/{CRM}{kind}AttributeMetadata?{query}"):
            column = found.get(str(item.get("LogicalName")))
            if column is None:
                continue
            length = item.get("MaxLength")
            found[column.name] = DvColumn(
                column.name,
                column.type,
                max_length=int(length) if isinstance(length, int) else None,
                options=_options(item.get("OptionSet")),
                valid_for_create=column.valid_for_create,
                valid_for_update=column.valid_for_update,
            )
    table = DvTable(
        logical_name=str(entity.get("LogicalName", logical_name)),
        entity_set=str(entity.get("EntitySetName", "")),
        primary_id=str(entity.get("PrimaryIdAttribute", "")),
        columns=found,
    )
    if details:
        for key in await _values(client, f"{base}/Keys?$select=KeyAttributes,EntityKeyIndexStatus"):
            table.keys.append((frozenset(key.get("KeyAttributes") or []), str(key.get("EntityKeyIndexStatus", ""))))
        for rel in await _values(
            client,
            f"{base}/ManyToOneRelationships"
            "?$select=ReferencingAttribute,ReferencedEntity,ReferencingEntityNavigationPropertyName",
        ):
            attribute = str(rel.get("ReferencingAttribute"))
            table.relationships[attribute] = DvRelationship(
                attribute, str(rel.get("ReferencedEntity")), str(rel.get("ReferencingEntityNavigationPropertyName"))
            )
    return table
