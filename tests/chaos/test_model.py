"""The chaos run's model of the expected end state follows its documented rules (devkit/sim/model.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from devkit.sim.model import Model, Op, Verdict, compare, dv_values, field_specs, fo_values
from loyaltysync.templates import default_mappings_dir, load_templates

TEMPLATES = load_templates(default_mappings_dir())
CARDS = "loyalty-cards"


def card(**values: object) -> dict[str, object]:
    base: dict[str, object] = {"CardNumber": "K", "CardTenderType": "AsCardTender", "PartyNumber": "P0",
                               "ReplacementCardNumber": "R0", "OmOperatingUnitNumber": "S0",
                               "LoyaltyEnrollmentDate": None, "LoyaltyEnrollmentDateLocal": None}
    return {**base, **values}


def play(model: Model, side: str, kind: str, values: dict[str, object] | None = None, key: str = "K") -> None:
    model.record(Op(CARDS, key, side, kind, dict(values or {}), 0.0, 0.0))  # type: ignore[arg-type]


def test_last_writer_wins_per_field_across_sides() -> None:
    model = Model(TEMPLATES)
    play(model, "fo", "create", card())
    play(model, "dataverse", "update", {"PartyNumber": "P-dv"})
    play(model, "fo", "update", {"OmOperatingUnitNumber": "S-fo"})
    play(model, "fo", "update", {"PartyNumber": "P-fo"})
    expected = model.expected(CARDS, "K")
    assert expected.exists
    assert (expected.values["PartyNumber"], expected.values["OmOperatingUnitNumber"]) == ("P-fo", "S-fo")


def test_one_way_fields_take_only_fo_values() -> None:
    model = Model(TEMPLATES)
    play(model, "dataverse", "create", card(ReplacementCardNumber="R-dv"))
    assert model.expected(CARDS, "K").values["ReplacementCardNumber"] is None  # F&O was created without it
    play(model, "fo", "update", {"ReplacementCardNumber": "R-fo"})
    play(model, "dataverse", "update", {"ReplacementCardNumber": "R-dv-again"})
    assert model.expected(CARDS, "K").values["ReplacementCardNumber"] == "R-fo"


def test_a_delete_wins_over_updates_until_the_record_is_created_again() -> None:
    model = Model(TEMPLATES)
    play(model, "fo", "create", card())
    play(model, "fo", "delete")
    play(model, "dataverse", "update", {"PartyNumber": "raced the delete"})
    assert not model.expected(CARDS, "K").exists
    play(model, "dataverse", "create", card(PartyNumber="P-new", OmOperatingUnitNumber=None))
    expected = model.expected(CARDS, "K")
    assert expected.exists and expected.values["PartyNumber"] == "P-new"
    assert expected.values["OmOperatingUnitNumber"] is None
    assert model.creates(CARDS, "K", "fo") == 1 and model.creates(CARDS, "K", "dataverse") == 1


def test_rows_of_both_sides_compare_in_fo_terms() -> None:
    specs = field_specs(TEMPLATES[CARDS])
    fo_row = {"CardNumber": "K", "CardTenderType": "Blocked", "PartyNumber": "", "ReplacementCardNumber": "R",
              "OmOperatingUnitNumber": "S", "LoyaltyEnrollmentDate": "1900-01-01T00:00:00Z",
              "LoyaltyEnrollmentDateLocal": "2026-01-15T10:00:00+00:00"}
    dv_row = {"msdyn_cardnumber": "K", "msdyn_cardtendertype": 806380003, "msdyn_partynumber": None,
              "msdyn_replacementcardnumber": "R", "msdyn_operatingunitnumber": "S", "msdyn_enrollmentdate": None,
              "msdyn_effectivedate": "2026-01-15T10:00:00Z"}
    assert fo_values(specs, fo_row) == dv_values(specs, dv_row, {})
    assert fo_values(specs, fo_row)["LoyaltyEnrollmentDateLocal"] == datetime(2026, 1, 15, 10, tzinfo=UTC)
    points = field_specs(TEMPLATES["loyalty-reward-points"])
    dv_point = {"msdyn_rewardpointid": "P", "_msdyn_rewardpointcurrency_value": "ABC-ID",
                "msdyn_maximumloyaltyrewardpoints": 10.50, "msdyn_redeemable": False}
    values = dv_values(points, dv_point, {"abc-id": "EUR"})
    assert (values["RewardPointCurrency"], values["MaximumLoyaltyRewardPoints"], values["Redeemable"]) == (
        "EUR", Decimal("10.5"), "No"
    )


def test_compare_names_unequal_lost_and_extra_records() -> None:
    model = Model(TEMPLATES)
    play(model, "fo", "create", card(CardNumber="A"), key="A")
    play(model, "fo", "update", {"PartyNumber": "P-new"}, key="A")
    play(model, "fo", "create", card(CardNumber="B"), key="B")
    play(model, "dataverse", "delete", key="B")
    expected_a = {**card(CardNumber="A"), "PartyNumber": "P-new"}
    verdict = Verdict()
    compare(model, CARDS, {"A": expected_a, "B": card(CardNumber="B")}, {"A": {**expected_a, "PartyNumber": "P0"}},
            verdict)
    assert verdict.records == 2
    assert any("A: PartyNumber" in line for line in verdict.unequal)
    assert any("B: only in F&O" in line for line in verdict.unequal)
    assert verdict.lost == ["loyalty-cards A in Dataverse: PartyNumber: 'P0', expected 'P-new'"]
    assert verdict.extra == ["loyalty-cards B: present, but the last operation deleted it"]
    assert not verdict.ok
