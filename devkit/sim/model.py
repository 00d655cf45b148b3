"""The expected final state of a chaos run, computed from the operations the generator played.

Written from the templates' specification (mappings/*.json and docs), not from
the engine: nothing here imports `loyaltysync.mapping`, `decide` or `sync`.
Values are compared in "F&O terms": F&O property names, enum member names,
ISO currency codes, aware datetimes, `Decimal`s, and `None` for every kind of
"nothing" (F&O's "" and 1900-01-01, Dataverse's null).

The rules (the generator keeps every operation inside them, see generator.py):

1. Only operations the emulator confirmed (2xx) count. A failed operation
   changed nothing (faults are injected before the emulator's handler runs).
2. Existence: the kind of the last structural operation on either side decides.
   A create (or the initial seed) makes the record exist, a delete makes it
   absent. An update that raced a delete (made on the other side before the
   delete reached it) does not bring the record back: deletes propagate both
   ways in all three templates.
3. Values after the last create: that create's values (fields it did not set
   are empty), then, per field, the value of the latest update made after it,
   on either side: last writer wins by operation time. The generator spaces
   two edits of one field on different sides at least 1.2 s apart, so their
   order is unambiguous at Dataverse's one-second `modifiedon` precision, and
   edits it on the other side only once both sides show the same value.
4. One-way fields (`>`, F&O to Dataverse): only F&O operations set them; a
   Dataverse edit of such a column is overwritten with F&O's value. A record
   created in Dataverse therefore ends with F&O's empty value there.
5. Records the generator poisoned on purpose (a reward point whose currency
   Dataverse does not know) are expected as dead letters, and after the
   currency is added and the dead letters replayed, like any other record.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

from loyaltysync.templates import Side, Template

Kind = Literal["create", "update", "delete"]
FO_EMPTY_YEAR = 1900


@dataclass(frozen=True)
class FieldSpec:
    """One mapped field, as the template file states it."""

    fo: str
    dataverse: str
    type: str
    value_map: Mapping[str, Any] | None
    lookup_entity_set: str | None
    navigation: str | None
    from_fo: bool
    from_dataverse: bool
    is_key: bool

    @property
    def two_way(self) -> bool:
        return self.from_fo and self.from_dataverse

    def flows_from(self, side: Side) -> bool:
        return self.from_fo if side == "fo" else self.from_dataverse


def field_specs(template: Template) -> list[FieldSpec]:
    """The fields mapped on both sides, in template order (the key first)."""
    keys = set(template.fo.keys)
    specs = []
    for f in template.fields:
        if not f.fo or not f.dataverse:
            continue
        specs.append(
            FieldSpec(
                fo=f.fo,
                dataverse=f.dataverse,
                type=f.type,
                value_map=f.value_map,
                lookup_entity_set=f.lookup.entity_set if f.lookup else None,
                navigation=(f.lookup.navigation_property or f.dataverse) if f.lookup else None,
                from_fo=f.map in ("=", "><", ">", ">>"),
                from_dataverse=f.map in ("=", "><", "<", "<<"),
                is_key=f.fo in keys,
            )
        )
    return sorted(specs, key=lambda s: not s.is_key)


_KEY_SPECS: dict[int, tuple[Template, FieldSpec]] = {}


def key_spec(template: Template) -> FieldSpec:
    """The single key field (the three templates have one-part keys)."""
    known = _KEY_SPECS.get(id(template))
    if known is not None and known[0] is template:
        return known[1]
    keys = [s for s in field_specs(template) if s.is_key]
    if len(keys) != 1:
        raise ValueError(f"{template.name}: the chaos model handles one-part keys only")
    _KEY_SPECS[id(template)] = (template, keys[0])
    return keys[0]


# ----------------------------------------------------------------------------- values in F&O terms


def _moment(text: str) -> datetime | None:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    moment = moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    return None if moment.year == FO_EMPTY_YEAR else moment


def model_value(spec: FieldSpec, value: Any) -> Any:
    """A value as F&O's JSON shows it (or as the generator meant it) -> the model's form."""
    if value is None or value == "":
        return None
    if spec.type == "datetime" and isinstance(value, str):
        return _moment(value)
    if spec.type == "decimal":
        return Decimal(str(value)).normalize()
    if spec.type == "integer":
        return int(value)
    return value


def fo_values(specs: Iterable[FieldSpec], row: Mapping[str, Any]) -> dict[str, Any]:
    """An F&O OData row in the model's form."""
    return {s.fo: model_value(s, row.get(s.fo)) for s in specs}


def dv_values(specs: Iterable[FieldSpec], row: Mapping[str, Any], currencies: Mapping[str, str]) -> dict[str, Any]:
    """A Dataverse Web API row in the model's form: choices through the value map, lookups to ISO codes.

    `currencies` maps transactioncurrency ids (lower case) to ISO codes. A value the map
    does not know is kept as it is, so a comparison shows it instead of hiding it.
    """
    values: dict[str, Any] = {}
    for s in specs:
        if s.lookup_entity_set is not None:
            row_id = row.get(f"_{s.dataverse}_value")
            values[s.fo] = None if row_id is None else currencies.get(str(row_id).lower(), row_id)
            continue
        raw = row.get(s.dataverse)
        if s.value_map is not None and raw is not None:
            member = next((m for m, v in s.value_map.items() if type(v) is type(raw) and v == raw), None)
            values[s.fo] = member if member is not None else raw
        else:
            values[s.fo] = model_value(s, raw)
    return values


# ----------------------------------------------------------------------------- operations and expectations


@dataclass(frozen=True)
class Op:
    """One operation the emulator confirmed. `values` are in the model's form (F&O property -> value)."""

    template: str
    key: str
    side: Side
    kind: Kind
    values: dict[str, Any]
    started: float
    ended: float
    seq: int = 0


@dataclass(frozen=True)
class Expected:
    """What both sides must hold for one key at the end."""

    exists: bool
    values: dict[str, Any] = field(default_factory=dict)


class Model:
    """Collects confirmed operations and answers what each record must look like at the end."""

    def __init__(self, templates: Mapping[str, Template]) -> None:
        self.specs = {name: field_specs(t) for name, t in templates.items()}
        self._ops: dict[tuple[str, str], list[Op]] = defaultdict(list)
        self._seq = 0
        self.poisoned: set[tuple[str, str]] = set()
        self.seeded: set[tuple[str, str]] = set()  # created in F&O through /_admin before the run

    def record(self, op: Op) -> Op:
        """Add a confirmed operation; returns it with its sequence number (the order of play per key)."""
        self._seq += 1
        stamped = Op(op.template, op.key, op.side, op.kind, dict(op.values), op.started, op.ended, self._seq)
        self._ops[(op.template, op.key)].append(stamped)
        return stamped

    def ops(self, template: str, key: str) -> list[Op]:
        return list(self._ops.get((template, key), ()))

    def keys(self, template: str) -> set[str]:
        return {key for name, key in self._ops if name == template}

    @property
    def operations(self) -> int:
        return sum(len(ops) for ops in self._ops.values())

    def creates(self, template: str, key: str, side: Side) -> int:
        """How many creates of this key the generator made on `side` (the seed counts, on F&O)."""
        return sum(1 for op in self._ops.get((template, key), ()) if op.kind == "create" and op.side == side)

    def expected(self, template: str, key: str) -> Expected:
        """The final state rules 2-4 of the module docstring give for one key."""
        ops = sorted(self._ops.get((template, key), ()), key=lambda op: op.seq)
        last_create = max((i for i, op in enumerate(ops) if op.kind == "create"), default=None)
        last_delete = max((i for i, op in enumerate(ops) if op.kind == "delete"), default=None)
        if last_create is None or (last_delete is not None and last_delete > last_create):
            return Expected(exists=False)
        specs = self.specs[template]
        create = ops[last_create]
        values = {s.fo: (create.values.get(s.fo) if s.flows_from(create.side) or s.is_key else None) for s in specs}
        for op in ops[last_create + 1 :]:
            for s in specs:
                if s.fo in op.values and s.flows_from(op.side) and not s.is_key:
                    values[s.fo] = op.values[s.fo]
        return Expected(exists=True, values=values)

    def last_edit(self, template: str, key: str, fo_field: str) -> Op | None:
        """The latest operation that set `fo_field` (a create sets every field)."""
        for op in sorted(self._ops.get((template, key), ()), key=lambda o: o.seq, reverse=True):
            if op.kind == "create" or fo_field in op.values:
                return op
            if op.kind == "delete":
                return op
        return None


# ----------------------------------------------------------------------------- comparing the end state


@dataclass
class Verdict:
    """How the end state compares with the model and across the two sides."""

    records: int = 0
    unequal: list[str] = field(default_factory=list)  # the two sides differ
    lost: list[str] = field(default_factory=list)  # a change the model expects is not there
    extra: list[str] = field(default_factory=list)  # a record the model says is gone is present

    @property
    def ok(self) -> bool:
        return not (self.unequal or self.lost or self.extra)


def compare(
    model: Model,
    template: str,
    fo_rows: Mapping[str, dict[str, Any]],
    dv_rows: Mapping[str, dict[str, Any]],
    verdict: Verdict,
    *,
    skip: Iterable[str] = (),
) -> None:
    """Check one template's final rows (key -> values in the model's form) and add the findings to `verdict`."""
    skipped = set(skip)
    specs = model.specs[template]
    for key in sorted((set(fo_rows) | set(dv_rows) | model.keys(template)) - skipped):
        verdict.records += 1
        fo, dv = fo_rows.get(key), dv_rows.get(key)
        where = f"{template} {key}"
        if (fo is None) != (dv is None):
            verdict.unequal.append(f"{where}: only in {'F&O' if dv is None else 'Dataverse'}")
        elif fo is not None and dv is not None:
            differing = [s.fo for s in specs if fo.get(s.fo) != dv.get(s.fo)]
            if differing:
                detail = ", ".join(f"{f}: F&O {fo.get(f)!r} / Dataverse {dv.get(f)!r}" for f in differing)
                verdict.unequal.append(f"{where}: {detail}")
        expected = model.expected(template, key)
        if not expected.exists:
            if fo is not None or dv is not None:
                verdict.extra.append(f"{where}: present, but the last operation deleted it")
            continue
        for side_name, actual in (("F&O", fo), ("Dataverse", dv)):
            if actual is None:
                verdict.lost.append(f"{where}: missing in {side_name}")
                continue
            wrong = [s.fo for s in specs if actual.get(s.fo) != expected.values.get(s.fo)]
            if wrong:
                detail = ", ".join(f"{f}: {actual.get(f)!r}, expected {expected.values.get(f)!r}" for f in wrong)
                verdict.lost.append(f"{where} in {side_name}: {detail}")
