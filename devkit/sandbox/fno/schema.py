"""What the F&O emulator serves: entity sets, their properties and enum types.

The three loyalty entities are built in with the property names and types the
real `/data/$metadata` declares; any other entity set named by a template is
derived from the template's F&O side (types from the field types, enum members
from the value-map keys, `dataAreaId` in the key when company-specific).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from loyaltysync.templates import COMPANY_FIELD, Template

NAMESPACE = "Microsoft.Dynamics.DataEntities"
EMPTY_DATETIME = "1900-01-01T00:00:00Z"  # F&O's "no date" for UtcDateTime fields
EMPTY_DATE = "1900-01-01T12:00:00Z"  # ... and for date-only fields
COMPANY_MAX_LENGTH = 4

Kind = Literal["string", "int32", "int64", "decimal", "boolean", "datetime", "date", "enum"]

_EDM: dict[str, str] = {
    "string": "Edm.String",
    "int32": "Edm.Int32",
    "int64": "Edm.Int64",
    "decimal": "Edm.Decimal",
    "boolean": "Edm.Boolean",
    "datetime": "Edm.DateTimeOffset",
    "date": "Edm.DateTimeOffset",
}


@dataclass(frozen=True)
class EnumType:
    """An X++ enum as OData exposes it: members by name, values 0..n-1."""

    name: str
    members: tuple[str, ...]

    @property
    def full_name(self) -> str:
        return f"{NAMESPACE}.{self.name}"

    def value_of(self, member: str) -> int:
        """F&O's own integer value of `member`."""
        return self.members.index(member)


NO_YES = EnumType("NoYes", ("No", "Yes"))


@dataclass(frozen=True)
class Property:
    """One OData property of an entity type."""

    name: str
    kind: Kind
    key: bool = False
    max_length: int | None = None
    enum: EnumType | None = None

    @property
    def edm_type(self) -> str:
        if self.enum is not None:
            return self.enum.full_name
        return _EDM[self.kind]

    @property
    def default(self) -> object:
        """The value a row holds when a create leaves the property out (F&O has no nulls)."""
        if self.enum is not None:
            return self.enum.members[0]
        return {
            "string": "",
            "int32": 0,
            "int64": 0,
            "decimal": 0,
            "boolean": False,
            "datetime": EMPTY_DATETIME,
            "date": EMPTY_DATE,
        }[self.kind]


@dataclass(frozen=True)
class EntityDef:
    """An entity set and its entity type, as the emulator serves it."""

    entity_set: str
    entity_type: str  # OData type name, e.g. RetailLoyaltyCard
    data_entity: str  # X++ data entity, e.g. RetailLoyaltyCardEntity (names the virtual table)
    label: str  # table label used in infolog messages
    properties: tuple[Property, ...]
    company_specific: bool
    business_event_id: str
    entity_id: int  # used in the virtual-table row GUID
    by_name: dict[str, Property] = field(init=False, repr=False, compare=False)
    defaults: dict[str, object] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {p.name: p for p in self.properties})
        object.__setattr__(self, "defaults", {p.name: p.default for p in self.properties})

    @property
    def full_type(self) -> str:
        return f"{NAMESPACE}.{self.entity_type}"

    @property
    def keys(self) -> tuple[str, ...]:
        """Key properties in declaration order (dataAreaId first when company-specific)."""
        return tuple(p.name for p in self.properties if p.key)

    @property
    def virtual_table(self) -> str:
        """The Dataverse virtual table that carries this entity's data events."""
        return f"mserp_{self.data_entity.lower()}"


@dataclass
class Catalog:
    """Every entity set and enum type one emulator instance serves."""

    entities: dict[str, EntityDef] = field(default_factory=dict)
    enums: dict[str, EnumType] = field(default_factory=dict)

    def add_enum(self, wanted: EnumType, fallback_name: str) -> EnumType:
        """Register `wanted`, reusing an equal enum; a clash of names takes `fallback_name`."""
        for candidate in (wanted, EnumType(fallback_name, wanted.members)):
            existing = self.enums.get(candidate.name)
            if existing is None:
                self.enums[candidate.name] = candidate
                return candidate
            if existing.members == candidate.members:
                return existing
        raise ValueError(f"enum type names {wanted.name!r} and {fallback_name!r} are both taken")

    def add(self, entity: EntityDef) -> None:
        for prop in entity.properties:
            if prop.enum is not None:
                self.add_enum(prop.enum, prop.enum.name)
        self.entities[entity.entity_set] = entity


def _builtin() -> list[EntityDef]:
    tender = EnumType("RetailLoyaltyTenderTypeBase", ("AsCardTender", "AsContactTender", "NoTender", "Blocked"))
    point_type = EnumType("RetailLoyaltyRewardPointType", ("Quantity", "Amount"))
    time_unit = EnumType("RetailLoyaltyRewardPointTimeUnit", ("Day", "Month", "Year"))
    cards = EntityDef(
        entity_set="RetailLoyaltyCards",
        entity_type="RetailLoyaltyCard",
        data_entity="RetailLoyaltyCardEntity",
        label="Loyalty cards",
        properties=(
            Property("CardNumber", "string", key=True, max_length=30),
            Property("CardTenderType", "enum", enum=tender),
            Property("PartyNumber", "string", max_length=40),
            Property("ReplacementCardNumber", "string", max_length=30),
            Property("OmOperatingUnitNumber", "string"),
            Property("LoyaltyEnrollmentDate", "datetime"),
            Property("LoyaltyEnrollmentDateLocal", "datetime"),
            Property("LoyaltyEnrollmentTime", "int32"),
            Property("LoyaltyEnrollmentTimeLocal", "int32"),
        ),
        company_specific=False,
        business_event_id="LoyaltyCardChangedBusinessEvent",
        entity_id=0x2A01,
    )
    levels = EntityDef(
        entity_set="LoyaltyLevels",
        entity_type="LoyaltyLevel",
        data_entity="LoyaltyLevelEntity",
        label="Loyalty levels",
        properties=(Property("LevelPhrase", "string", key=True), Property("LevelDescription", "string")),
        company_specific=False,
        business_event_id="LoyaltyLevelChangedBusinessEvent",
        entity_id=0x2A02,
    )
    points = EntityDef(
        entity_set="RetailLoyaltyRewardPoints",
        entity_type="RetailLoyaltyRewardPoint",
        data_entity="RetailLoyaltyRewardPointEntity",
        label="Loyalty reward points",
        properties=(
            Property("RewardPointId", "string", key=True),
            Property("RewardPointType", "enum", enum=point_type),
            Property("Redeemable", "enum", enum=NO_YES),
            Property("RedeemRanking", "int32"),
            Property("RewardPointCurrency", "string", max_length=3),
            Property("MaximumLoyaltyRewardPoints", "decimal"),
            Property("ExpirationTimeUnit", "enum", enum=time_unit),
            Property("ExpirationTimeValue", "int32"),
            Property("VestingTimeUnit", "enum", enum=time_unit),
            Property("VestingTimeValue", "int32"),
        ),
        company_specific=False,
        business_event_id="LoyaltyRewardPointChangedBusinessEvent",
        entity_id=0x2A03,
    )
    return [cards, levels, points]


BUILTIN_SETS: frozenset[str] = frozenset(e.entity_set for e in _builtin())


def _singular(entity_set: str) -> str:
    if entity_set.endswith("ies"):
        return entity_set[:-3] + "y"
    if entity_set.endswith("s") and not entity_set.endswith("ss"):
        return entity_set[:-1]
    return entity_set


_KIND_OF_FIELD: dict[str, Kind] = {
    "string": "string",
    "integer": "int32",
    "decimal": "decimal",
    "boolean": "boolean",
    "datetime": "datetime",
    "date": "date",
    "enum": "enum",
}


def entity_from_template(template: Template, catalog: Catalog, entity_id: int) -> EntityDef:
    """Derive an entity set from a template's F&O side, registering its enums in `catalog`."""
    fo = template.fo
    if fo.entity_type:
        type_name = fo.entity_type.removesuffix("Entity") or fo.entity_type
    else:
        type_name = _singular(fo.entity_set)
    props: list[Property] = []
    if fo.company_specific:
        props.append(Property(COMPANY_FIELD, "string", key=True, max_length=COMPANY_MAX_LENGTH))
    for f in template.fields:
        if not f.fo:
            continue
        kind = _KIND_OF_FIELD[f.type]
        enum: EnumType | None = None
        if kind == "enum":
            members = tuple(f.value_map) if f.value_map else (str(f.default),)
            wanted = NO_YES if set(members) == set(NO_YES.members) else EnumType(f.fo, members)
            enum = catalog.add_enum(wanted, f"{type_name}{f.fo}")
        props.append(Property(f.fo, kind, key=f.fo in fo.keys, max_length=f.max_length, enum=enum))
    business_event = fo.business_events[0] if fo.business_events else f"{type_name}ChangedBusinessEvent"
    return EntityDef(
        entity_set=fo.entity_set,
        entity_type=type_name,
        data_entity=fo.entity_type or f"{type_name}Entity",
        label=fo.entity_set,
        properties=tuple(sorted(props, key=lambda p: not p.key)),
        company_specific=fo.company_specific,
        business_event_id=business_event,
        entity_id=entity_id,
    )


def build_catalog(templates: Mapping[str, Template] | Iterable[Template] | None) -> Catalog:
    """The built-in loyalty entities plus one entity per template whose set is not built in."""
    catalog = Catalog()
    for entity in _builtin():
        catalog.add(entity)
    items = templates.values() if isinstance(templates, Mapping) else (templates or ())
    for template in items:
        if template.fo.entity_set in catalog.entities:
            continue
        entity_id = 0x2B00 + len(catalog.entities)
        catalog.entities[template.fo.entity_set] = entity_from_template(template, catalog, entity_id)
    return catalog
