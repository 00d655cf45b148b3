"""People's values: random ones in the model's "F&O terms", and the F&O / Dataverse bodies that write them.

Shared by the chaos generator (tests/chaos/generator.py), which writes through
the emulators' HTTP APIs, and the deterministic simulator's people
(devkit/sim/services.py), which write to the same data layer in memory: one
way of turning a person's intent into a request body.

Values are in the model's form (devkit/sim/model.py): F&O property names, enum
member names, ISO currency codes, aware datetimes, `Decimal`s, None for empty.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from devkit.sandbox.dataverse.seed import CURRENCY_IDS
from devkit.sim.model import FieldSpec

# ISO code -> transactioncurrency id (lower case), the currencies every emulated organization starts with.
CURRENCY_ROW_IDS: dict[str, str] = {code: row_id.lower() for code, row_id in CURRENCY_IDS.items()}
# transactioncurrency id -> ISO code (what `model.dv_values` needs).
CURRENCY_CODES: dict[str, str] = {row_id: code for code, row_id in CURRENCY_ROW_IDS.items()}
FO_EMPTY_DATE = "1900-01-01T00:00:00Z"
FIRST_DATE = datetime(2024, 1, 1, tzinfo=UTC)
DATE_SPAN_S = 4 * 365 * 86400


def random_value(rng: random.Random, spec: FieldSpec, currencies: Iterable[str] = CURRENCY_ROW_IDS) -> Any:
    """A random value in the model's form (never empty for choices, which F&O cannot hold empty)."""
    if spec.value_map is not None:
        return rng.choice(sorted(spec.value_map))
    if spec.lookup_entity_set is not None:
        return rng.choice(sorted(currencies))
    if spec.type == "string":
        return None if rng.random() < 0.08 else f"{spec.fo[:2].upper()}{rng.randrange(10**6):06d}"
    if spec.type == "integer":
        return rng.randrange(0, 1000)
    if spec.type == "decimal":
        return Decimal(rng.randrange(0, 10**6)).scaleb(-2).normalize()
    if spec.type == "datetime":
        if rng.random() < 0.08:
            return None
        return FIRST_DATE + timedelta(seconds=rng.randrange(DATE_SPAN_S))
    raise ValueError(f"no generator for {spec.type}")


def fresh_value(
    rng: random.Random, spec: FieldSpec, *avoid: Any, currencies: Iterable[str] = CURRENCY_ROW_IDS
) -> Any:
    """A random value that is none of `avoid` (the field must have room for one)."""
    while True:
        value = random_value(rng, spec, currencies)
        if value not in avoid:
            return value


def fo_json(spec: FieldSpec, value: Any) -> Any:
    """One value as F&O's OData JSON writes it ("" and 1900-01-01 for empty; F&O has no null)."""
    if value is None:
        return FO_EMPTY_DATE if spec.type == "datetime" else ""
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, Decimal):
        return float(value)
    return value


def dv_part(spec: FieldSpec, value: Any, currency_ids: Mapping[str, str] = CURRENCY_ROW_IDS) -> dict[str, Any]:
    """One value as Web API JSON: a lookup as `<nav>@odata.bind`, a choice as its option value."""
    if spec.lookup_entity_set is not None:
        bound = None if value is None else f"/{spec.lookup_entity_set}({currency_ids[value]})"
        return {f"{spec.navigation}@odata.bind": bound}
    if spec.value_map is not None:
        return {spec.dataverse: None if value is None else spec.value_map[value]}
    if isinstance(value, datetime):
        return {spec.dataverse: value.strftime("%Y-%m-%dT%H:%M:%SZ")}
    if isinstance(value, Decimal):
        return {spec.dataverse: float(value)}
    return {spec.dataverse: value}


def fo_body(specs: Iterable[FieldSpec], values: Mapping[str, Any]) -> dict[str, Any]:
    """An F&O OData body for `values` (F&O property -> model value)."""
    by_name = {s.fo: s for s in specs}
    return {name: fo_json(by_name[name], value) for name, value in values.items()}


def dv_body(
    specs: Iterable[FieldSpec], values: Mapping[str, Any], currency_ids: Mapping[str, str] = CURRENCY_ROW_IDS
) -> dict[str, Any]:
    """A Dataverse Web API body for `values` (F&O property -> model value)."""
    by_name = {s.fo: s for s in specs}
    body: dict[str, Any] = {}
    for name, value in values.items():
        body.update(dv_part(by_name[name], value, currency_ids))
    return body
