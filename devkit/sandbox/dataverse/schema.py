"""Table definitions: typed columns, alternate keys and lookups, as Dataverse metadata describes them.

A `TableDef` is what the emulator knows about a table: its logical name, entity
set, primary id and name, columns (with the system columns every table has)
and alternate keys. The metadata endpoints, the validator, the serializer and
the webhook context all read it, so a table is described exactly once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

AttributeType = Literal[
    "String",
    "Memo",
    "Picklist",
    "State",
    "Status",
    "Boolean",
    "Integer",
    "BigInt",
    "Decimal",
    "Money",
    "Double",
    "DateTime",
    "Lookup",
    "Uniqueidentifier",
]
CHOICE_TYPES: frozenset[str] = frozenset({"Picklist", "State", "Status"})
STRING_TYPES: frozenset[str] = frozenset({"String", "Memo"})
INT32 = (-2_147_483_648, 2_147_483_647)
# Dataverse decimal columns hold at most 100 billion in magnitude.
DECIMAL_RANGE = (-100_000_000_000.0, 100_000_000_000.0)


@dataclass(frozen=True)
class Column:
    """One column (attribute). `options` for choices; `target`/`navigation` for lookups."""

    name: str
    type: AttributeType
    max_length: int | None = None
    options: Mapping[int, str] | None = None
    target: str | None = None
    navigation: str | None = None
    precision: int | None = None
    min_value: float | None = None
    max_value: float | None = None
    # System columns are set by the platform; a value a client sends for them is ignored.
    system: bool = False
    # IsValidForRead=False (serviceendpoint.authvalue): never returned.
    readable: bool = True
    label: str | None = None

    @property
    def value_property(self) -> str:
        """The property the Web API reads the column as (`_<name>_value` for lookups)."""
        return f"_{self.name}_value" if self.type == "Lookup" else self.name

    @property
    def display(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class AlternateKey:
    """An alternate key: schema name and its columns (metadata `/Keys`)."""

    schema_name: str
    columns: tuple[str, ...]


@dataclass
class TableDef:
    """A table: names, columns in definition order (system columns included) and keys."""

    logical_name: str
    entity_set: str
    primary_id: str
    primary_name: str | None
    columns: dict[str, Column]
    keys: list[AlternateKey] = field(default_factory=list)
    display_name: str = ""
    # Whether CreateMultiple / UpdateMultiple / UpsertMultiple have sdkmessagefilters for this table.
    bulk: bool = False
    # EntityMetadata.TableType ("Virtual" for an F&O virtual table) and, for those, the F&O entity's name.
    table_type: str = "Standard"
    external_name: str | None = None
    # Lookup navigation property name -> column.
    navigation: dict[str, Column] = field(init=False)
    # `_x_value` read name -> column, plus plain names of non-lookups.
    readable: dict[str, Column] = field(init=False)

    def __post_init__(self) -> None:
        self.navigation = {c.navigation or c.name: c for c in self.columns.values() if c.type == "Lookup"}
        self.readable = {c.value_property: c for c in self.columns.values() if c.readable}

    @property
    def column_names(self) -> list[str]:
        return list(self.columns)

    def key_named(self, columns: Iterable[str]) -> AlternateKey | None:
        """The alternate key made of exactly these columns (order free)."""
        wanted = sorted(columns)
        for key in self.keys:
            if sorted(key.columns) == wanted:
                return key
        return None


SYSTEMUSER = "systemuser"
STATE_OPTIONS = {0: "Active", 1: "Inactive"}
STATUS_OPTIONS = {1: "Active", 2: "Inactive"}


def system_columns(
    state: Mapping[int, str] = STATE_OPTIONS, status: Mapping[int, str] = STATUS_OPTIONS
) -> list[Column]:
    """The columns the platform keeps on every table."""

    def user(name: str, label: str) -> Column:
        return Column(name, "Lookup", target=SYSTEMUSER, navigation=name, system=True, label=label)

    return [
        Column("createdon", "DateTime", system=True, label="Created On"),
        Column("modifiedon", "DateTime", system=True, label="Modified On"),
        user("createdby", "Created By"),
        user("modifiedby", "Modified By"),
        user("createdonbehalfby", "Created By (Delegate)"),
        user("modifiedonbehalfby", "Modified By (Delegate)"),
        Column("versionnumber", "BigInt", system=True, label="Version Number"),
        Column("statecode", "State", options=state, label="Status"),
        Column("statuscode", "Status", options=status, label="Status Reason"),
    ]


def table(
    logical_name: str,
    entity_set: str,
    own: list[Column],
    *,
    primary_name: str | None,
    keys: Iterable[tuple[str, ...]] = (),
    display_name: str = "",
    bulk: bool = False,
    state: Mapping[int, str] = STATE_OPTIONS,
    status: Mapping[int, str] = STATUS_OPTIONS,
) -> TableDef:
    """Build a table: primary id `<logical_name>id` first, own columns, then system columns."""
    primary_id = f"{logical_name}id"
    columns = [Column(primary_id, "Uniqueidentifier"), *own, *system_columns(state, status)]
    return TableDef(
        logical_name=logical_name,
        entity_set=entity_set,
        primary_id=primary_id,
        primary_name=primary_name,
        columns={c.name: c for c in columns},
        keys=[AlternateKey(f"{logical_name}_{'_'.join(cols)}_key", tuple(cols)) for cols in keys],
        display_name=display_name or logical_name,
        bulk=bulk,
    )


def string(name: str, max_length: int, label: str | None = None) -> Column:
    return Column(name, "String", max_length=max_length, label=label)


def memo(name: str, max_length: int = 1_048_576) -> Column:
    return Column(name, "Memo", max_length=max_length)


def choice(name: str, options: Mapping[int, str], label: str | None = None) -> Column:
    return Column(name, "Picklist", options=dict(options), label=label)


def integer(name: str, low: float = INT32[0], high: float = INT32[1]) -> Column:
    return Column(name, "Integer", min_value=low, max_value=high)


def decimal(name: str, precision: int = 2) -> Column:
    return Column(name, "Decimal", precision=precision, min_value=DECIMAL_RANGE[0], max_value=DECIMAL_RANGE[1])


def boolean(name: str, yes: str = "Yes", no: str = "No") -> Column:
    return Column(name, "Boolean", options={1: yes, 0: no})


def lookup(name: str, target: str, navigation: str | None = None) -> Column:
    return Column(name, "Lookup", target=target, navigation=navigation or name)
