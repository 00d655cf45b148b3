"""People editing both sides: a plan of operations drawn from the seed, played at their virtual times.

The plan is made before the run, from the seed alone, so a failing run can be shrunk by playing a
subset of it (devkit/sim/run.py). The planner tracks what it believes exists; the services decide
what really happens: an update of a record deleted meanwhile, or a create of a key that exists, is
refused and is simply not in the history. People play:

- creates of new records on either side, with every mapped field;
- updates of one to three random mapped fields, one-way columns included, from the wrong side too;
- deletes on either side, and re-creates of a deleted key on either side;
- conflicts: one two-way field edited on both sides, the second edit 0 to 2G seconds after the
  first (inside and beyond the window where either may win).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from devkit.sim.judge import G_SECONDS
from devkit.sim.model import FieldSpec
from devkit.sim.values import fresh_value, random_value
from loyaltysync.templates import Side

Kind = Literal["create", "update", "delete"]
SIDES: tuple[Side, Side] = ("fo", "dataverse")
PREFIX = {"loyalty-cards": "C", "loyalty-levels": "L", "loyalty-reward-points": "P"}
LIVE_RECORDS = 12  # per template: few records, many operations on each (interleavings, not volume)


@dataclass(frozen=True, slots=True)
class PlannedOp:
    """One operation a person will try at virtual time `at` (seconds from the start)."""

    index: int
    at: float
    template: str
    key: str
    side: Side
    kind: Kind
    values: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        shown = ", ".join(f"{k}={v!s}" for k, v in self.values.items())
        return f"#{self.index} t={self.at:.3f}s {self.kind} {self.template} {self.key} in {self.side}" + (
            f" ({shown})" if shown and self.kind == "update" else ""
        )


@dataclass
class _Belief:
    exists: bool = True


def plan(
    rng: random.Random, specs: Mapping[str, list[FieldSpec]], operations: int, *, rate_per_s: float = 4.0
) -> list[PlannedOp]:
    """`operations` planned operations over about `operations / rate_per_s` virtual seconds."""
    ops: list[PlannedOp] = []
    beliefs: dict[str, dict[str, _Belief]] = {name: {} for name in specs}
    serial = 0
    now = 1.0
    templates = sorted(specs)
    while len(ops) < operations:
        now += rng.expovariate(rate_per_s)
        template = rng.choice(templates)
        known = beliefs[template]
        live = [k for k, b in known.items() if b.exists]
        gone = [k for k, b in known.items() if not b.exists]
        roll = rng.random()
        side = rng.choice(SIDES)

        def add(at: float, key: str, where: Side, kind: Kind, values: Mapping[str, Any], name: str = template) -> None:
            ops.append(PlannedOp(len(ops), round(at, 3), name, key, where, kind, dict(values)))

        if not live or (roll < 0.15 and len(live) < LIVE_RECORDS):
            serial += 1
            key = f"{PREFIX.get(template, 'K')}{serial:05d}"
            add(now, key, side, "create", _record(rng, specs[template], key))
            known[key] = _Belief()
        elif roll < 0.22 and gone:
            key = rng.choice(sorted(gone))
            add(now, key, side, "create", _record(rng, specs[template], key))
            known[key].exists = True
        elif roll < 0.30:
            key = rng.choice(sorted(live))
            add(now, key, side, "delete", {})
            known[key].exists = False
        elif roll < 0.45:
            key = rng.choice(sorted(live))
            two_way = [s for s in specs[template] if s.two_way and not s.is_key]
            spec = rng.choice(two_way)
            first = fresh_value(rng, spec)
            second = fresh_value(rng, spec, first)
            add(now, key, side, "update", {spec.fo: first})
            gap = rng.uniform(0.0, 2 * G_SECONDS)
            add(now + gap, key, _other(side), "update", {spec.fo: second})
        else:
            key = rng.choice(sorted(live))
            editable = [s for s in specs[template] if not s.is_key]
            chosen = rng.sample(editable, k=min(len(editable), rng.randint(1, 3)))
            add(now, key, side, "update", {s.fo: fresh_value(rng, s) for s in chosen})
    ops.sort(key=lambda op: (op.at, op.index))
    return ops[:operations]


def _record(rng: random.Random, specs: list[FieldSpec], key: str) -> dict[str, Any]:
    values = {s.fo: random_value(rng, s) for s in specs if not s.is_key}
    values[next(s.fo for s in specs if s.is_key)] = key
    return values


def _other(side: Side) -> Side:
    return "dataverse" if side == "fo" else "fo"
