"""The F&O filter compiler: its fast tuple predicates agree with the shared OData evaluator."""

from __future__ import annotations

import random

import pytest

from devkit.sandbox.fno.filters import compile_filter, key_lookup, parse_filter_for
from devkit.sandbox.fno.schema import build_catalog
from devkit.sandbox.odata import evaluate

CATALOG = build_catalog(None)
CARDS = CATALOG.entities["RetailLoyaltyCards"]
TENDER = "Microsoft.Dynamics.DataEntities.RetailLoyaltyTenderTypeBase"
FILTERS = [
    "CardNumber eq 'c-0005'",
    "CardNumber ne 'C-0005'",
    f"CardTenderType eq {TENDER}'Blocked'",
    f"CardTenderType ne {TENDER}'Blocked' and LoyaltyEnrollmentTime gt 10",
    "LoyaltyEnrollmentTime le 7 or PartyNumber eq 'p1'",
    "not (LoyaltyEnrollmentTime lt 12)",
    "PartyNumber eq '*1*'",  # wildcard: evaluator fallback
    "LoyaltyEnrollmentDate ge 2026-01-10T00:00:00Z",  # date: evaluator fallback
    "LoyaltyEnrollmentTime add 1 eq 5",  # arithmetic: evaluator fallback
]


@pytest.mark.parametrize("text", FILTERS)
def test_compiled_filters_match_the_evaluator(text: str) -> None:
    rng = random.Random(text)
    columns = (*(p.name for p in CARDS.properties), "_recid", "_version")
    tenders = CARDS.by_name["CardTenderType"].enum
    assert tenders is not None
    rows = []
    for i in range(200):
        values = {p.name: p.default for p in CARDS.properties}
        values.update(CardNumber=f"C-{i:04d}", CardTenderType=rng.choice(tenders.members),
                      PartyNumber=rng.choice(["P1", "p2", "x1y", ""]), LoyaltyEnrollmentTime=rng.randrange(20),
                      LoyaltyEnrollmentDate=f"2026-01-{rng.randrange(1, 29):02d}T08:00:00Z")
        rows.append((*values.values(), i, i))
    expr = parse_filter_for(CARDS, text)
    accept = compile_filter(CARDS, expr, columns)
    expected = [evaluate(expr, dict(zip(columns, r, strict=True)), case_insensitive=True, wildcard=True) for r in rows]
    assert [accept(r) for r in rows] == expected
    assert any(expected)


def test_key_lookup_only_for_exact_key_equality() -> None:
    assert key_lookup(CARDS, parse_filter_for(CARDS, "CardNumber eq 'C-1'")) == "C-1"
    assert key_lookup(CARDS, parse_filter_for(CARDS, "CardNumber eq 'C-*'")) is None
    assert key_lookup(CARDS, parse_filter_for(CARDS, "CardNumber ne 'C-1'")) is None
    assert key_lookup(CARDS, parse_filter_for(CARDS, "PartyNumber eq 'C-1'")) is None
