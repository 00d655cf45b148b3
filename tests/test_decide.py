"""The sync decision, branch by branch, plus a property: one decision brings both sides together for good."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loyaltysync.decide import (
    MISSING,
    NO_STATE,
    Agreed,
    Conflict,
    Decision,
    SideRecord,
    agreed_from_state,
    decide,
    is_newer,
    is_stale,
)
from loyaltysync.intent import EventFacts, Evidence, Intent, SideIntent, settle
from loyaltysync.mapping import (
    canonical_to_dataverse,
    canonical_to_fo,
    dataverse_to_canonical,
    fo_to_canonical,
)
from loyaltysync.templates import (
    Lookup,
    Side,
    Template,
    default_mappings_dir,
    load_templates,
    other_side,
    parse_template,
)

MAPPINGS = default_mappings_dir()
FIXTURES = Path(__file__).parent / "fixtures" / "templates"
CARDS = load_templates(MAPPINGS)["loyalty-cards"]
EVERY = load_templates(FIXTURES)["every-map"]


def cards(**changes: str) -> Template:
    """The shipped cards template with only the given top-level settings changed."""
    data = json.loads((MAPPINGS / "loyalty-cards.json").read_text(encoding="utf-8"))
    data.update(changes)
    return parse_template(json.dumps(data), "loyalty-cards.json")


FO_WINS = cards(conflict_policy="fo-wins")
DV_WINS = cards(conflict_policy="dataverse-wins")
LWW = cards(conflict_policy="last-writer-wins")

CARD: dict[str, Any] = {
    "CardNumber": "C-1",
    "CardTenderType": "AsCardTender",
    "PartyNumber": "P-1",
    "ReplacementCardNumber": None,
    "OmOperatingUnitNumber": "OU-1",
    "LoyaltyEnrollmentDate": "2024-05-01T10:00:00Z",
    "LoyaltyEnrollmentDateLocal": "2024-05-01T03:00:00Z",
}
TO_FO = [f.key for f in CARDS.fields_to("fo")]  # every card field but ReplacementCardNumber ('>')
T1, T2 = "2024-06-01T10:00:00Z", "2024-06-01T11:00:00Z"


def card(**changes: Any) -> dict[str, Any]:
    return {**CARD, **changes}


def fo(values: dict[str, Any] | None = None, modified_on: str | None = None, **changes: Any) -> SideRecord:
    return SideRecord(values=card(**changes) if values is None else values, modified_on=modified_on)


dv = fo  # same constructor; the argument position in decide() says which side it is


def agreed(**changes: Any) -> Agreed:
    return Agreed(values=card(**changes), exists=True)


def apply(decision: Decision, fo_values: Mapping[str, Any], dv_values: Mapping[str, Any]) -> tuple[dict[str, Any],
                                                                                               dict[str, Any]]:
    """Canonical values of both sides after the decision's writes."""
    return {**fo_values, **decision.writes.get("fo", {})}, {**dv_values, **decision.writes.get("dataverse", {})}


# ----------------------------------------------------------------- records missing


def test_both_missing() -> None:
    decision = decide(CARDS, MISSING, MISSING, agreed(), trigger="fo")
    assert decision.reason == "both-missing"
    assert not decision.acts
    assert decision.writes == {}
    assert decision.exists_after is False


@pytest.mark.parametrize("state", [NO_STATE, Agreed(values=card(PartyNumber="old"), exists=False)],
                         ids=["no-state", "tombstone"])
def test_only_in_fo_creates_in_dataverse_with_every_field_that_flows_there(state: Agreed) -> None:
    decision = decide(CARDS, fo(), MISSING, state, trigger="fo")
    assert decision.reason == "created"
    assert decision.create == "dataverse"
    assert decision.delete is None
    assert decision.writes == {"dataverse": CARD}  # '>' ReplacementCardNumber included
    assert decision.agreed == CARD
    assert decision.exists_after is True


@pytest.mark.parametrize("state", [NO_STATE, Agreed(values=card(PartyNumber="old"), exists=False)],
                         ids=["no-state", "tombstone"])
def test_only_in_dataverse_creates_in_fo_without_fo_to_dataverse_fields(state: Agreed) -> None:
    decision = decide(CARDS, MISSING, dv(ReplacementCardNumber="C-0"), state, trigger="dataverse")
    assert decision.reason == "created"
    assert decision.create == "fo"
    assert decision.writes == {"fo": {k: CARD[k] for k in TO_FO}}
    assert "ReplacementCardNumber" not in decision.writes["fo"]


def test_create_takes_one_way_fields_by_direction() -> None:
    fo_values = {"WidgetId": "W-1", "Status": "Active", "Label": "L", "Segment": "Online", "InternalNote": "n",
                 "Rating": "High"}
    to_dv = decide(EVERY, SideRecord(fo_values), MISSING, NO_STATE, trigger="fo")
    assert to_dv.writes == {"dataverse": {"WidgetId": "W-1", "Status": "Active", "Label": "L", "Segment": "Online"}}
    to_fo = decide(EVERY, MISSING, SideRecord(fo_values), NO_STATE, trigger="dataverse")
    assert to_fo.writes == {"fo": {"WidgetId": "W-1", "Status": "Active", "InternalNote": "n", "Rating": "High"}}


def test_create_always_carries_the_key() -> None:
    decision = decide(CARDS, SideRecord({"CardNumber": "C-9"}), MISSING, NO_STATE, trigger="fo")
    assert decision.writes == {"dataverse": {"CardNumber": "C-9"}}


# (policy, deleted on, propagates)
DELETE_MATRIX = [
    ("both", "fo", True),
    ("both", "dataverse", True),
    ("fo-to-dataverse", "fo", True),
    ("fo-to-dataverse", "dataverse", False),
    ("dataverse-to-fo", "fo", False),
    ("dataverse-to-fo", "dataverse", True),
    ("none", "fo", False),
    ("none", "dataverse", False),
]


@pytest.mark.parametrize(("policy", "deleted_on", "propagates"), DELETE_MATRIX)
def test_delete_after_agreement(policy: str, deleted_on: Side, propagates: bool) -> None:
    template = cards(deletes=policy)
    survivor: Side = "dataverse" if deleted_on == "fo" else "fo"
    records = {deleted_on: MISSING, survivor: fo()}
    decision = decide(template, records["fo"], records["dataverse"], agreed(), trigger=deleted_on)
    if propagates:
        assert decision.reason == "deleted"
        assert decision.delete == survivor
        assert decision.writes == {}
        assert decision.create is None
        assert decision.exists_after is False
        assert decision.agreed == {}
    else:
        # Deletes do not flow that way: the record is put back where it was deleted.
        assert decision.reason == "deletes-disabled"
        assert decision.delete is None
        assert decision.create == deleted_on
        expected = CARD if deleted_on == "dataverse" else {k: CARD[k] for k in TO_FO}
        assert decision.writes == {deleted_on: expected}
        assert decision.exists_after is True
    assert decision.acts


def test_templates_for_delete_policies_differ_only_in_deletes() -> None:
    base = cards().model_dump()
    for policy in ("both", "fo-to-dataverse", "dataverse-to-fo", "none"):
        assert {**cards(deletes=policy).model_dump(), "deletes": base["deletes"]} == base


# ----------------------------------------------------------------- both present, no conflict


def test_equal_is_no_change_or_echo() -> None:
    plain = decide(CARDS, fo(), dv(), agreed(), trigger="dataverse")
    assert (plain.reason, plain.writes, plain.conflicts, plain.agreed) == ("no-change", {}, [], CARD)
    assert not plain.acts
    echo = decide(CARDS, fo(), dv(), agreed(), trigger="dataverse", from_integration_user=True)
    assert (echo.reason, echo.writes) == ("echo", {})


def test_echo_of_our_own_write_against_an_older_state_still_settles() -> None:
    # Our write to Dataverse comes back before the state was saved: both sides equal, nothing to do.
    decision = decide(CARDS, fo(PartyNumber="P-2"), dv(PartyNumber="P-2"), agreed(), trigger="dataverse",
                      from_integration_user=True)
    assert (decision.reason, decision.writes) == ("echo", {})
    assert decision.agreed["PartyNumber"] == "P-2"


@pytest.mark.parametrize("template", [LWW, FO_WINS, DV_WINS], ids=lambda t: t.conflict_policy)
def test_change_in_fo_writes_only_that_field_to_dataverse(template: Template) -> None:
    decision = decide(template, fo(PartyNumber="P-2"), dv(), agreed(), trigger="fo")
    assert decision.reason == "changed"
    assert decision.writes == {"dataverse": {"PartyNumber": "P-2"}}
    assert decision.conflicts == []
    assert decision.agreed == card(PartyNumber="P-2")
    assert decision.create is None and decision.delete is None


@pytest.mark.parametrize("template", [LWW, FO_WINS, DV_WINS], ids=lambda t: t.conflict_policy)
def test_change_in_dataverse_writes_only_that_field_to_fo(template: Template) -> None:
    decision = decide(template, fo(), dv(CardTenderType="Blocked"), agreed(), trigger="dataverse")
    assert decision.writes == {"fo": {"CardTenderType": "Blocked"}}
    assert decision.agreed == card(CardTenderType="Blocked")


def test_change_to_empty_propagates_as_none() -> None:
    decision = decide(CARDS, fo(), dv(LoyaltyEnrollmentDate=None), agreed(), trigger="dataverse")
    assert decision.writes == {"fo": {"LoyaltyEnrollmentDate": None}}


@pytest.mark.parametrize("template", [LWW, FO_WINS, DV_WINS], ids=lambda t: t.conflict_policy)
def test_concurrent_edits_of_different_fields_both_survive(template: Template) -> None:
    decision = decide(template, fo(PartyNumber="P-2"), dv(OmOperatingUnitNumber="OU-2"), agreed(), trigger="fo")
    assert decision.reason == "changed"
    assert decision.writes == {"dataverse": {"PartyNumber": "P-2"}, "fo": {"OmOperatingUnitNumber": "OU-2"}}
    assert decision.conflicts == []
    assert decision.agreed == card(PartyNumber="P-2", OmOperatingUnitNumber="OU-2")


# ----------------------------------------------------------------- same field, both sides


def fo_at(modified_on: str | None, **changes: Any) -> SideRecord:
    return SideRecord(values=card(**changes), modified_on=modified_on)


def conflict(template: Template, fo_time: str | None, dv_time: str | None, *, live: bool = True) -> Decision:
    return decide(template, fo_at(fo_time, PartyNumber="P-fo"), fo_at(dv_time, PartyNumber="P-dv"), agreed(),
                  trigger="fo", live=live)


def assert_won_by(decision: Decision, winner: Side) -> None:
    loser_side: Side = "dataverse" if winner == "fo" else "fo"
    value = "P-fo" if winner == "fo" else "P-dv"
    assert decision.reason == "changed"
    assert decision.writes == {loser_side: {"PartyNumber": value}}
    assert decision.agreed["PartyNumber"] == value
    assert len(decision.conflicts) == 1
    c = decision.conflicts[0]
    assert (c.field, c.fo_value, c.dataverse_value, c.winner) == ("PartyNumber", "P-fo", "P-dv", winner)


def test_fo_wins_policy() -> None:
    decision = conflict(FO_WINS, T1, T2)  # even when Dataverse is newer
    assert_won_by(decision, "fo")
    assert decision.conflicts[0].rule == "fo-wins"


def test_dataverse_wins_policy() -> None:
    decision = conflict(DV_WINS, T2, T1)  # even when F&O is newer
    assert_won_by(decision, "dataverse")
    assert decision.conflicts[0].rule == "dataverse-wins"


@pytest.mark.parametrize(("fo_time", "dv_time", "winner"), [(T2, T1, "fo"), (T1, T2, "dataverse"), (T1, T1, "fo")],
                         ids=["fo-newer", "dataverse-newer", "tie-goes-to-fo"])
def test_last_writer_wins_with_both_times(fo_time: str, dv_time: str, winner: Side) -> None:
    for live in (True, False):
        assert_won_by(conflict(LWW, fo_time, dv_time, live=live), winner)


@pytest.mark.parametrize(("fo_time", "dv_time"), [(None, T1), (T1, None), (None, None)])
def test_last_writer_wins_live_with_an_unknown_time_defers(fo_time: str | None, dv_time: str | None) -> None:
    decision = conflict(LWW, fo_time, dv_time, live=True)
    assert decision.reason == "conflict-deferred"
    assert decision.writes == {}
    assert not decision.acts
    assert decision.agreed["PartyNumber"] == "P-1"  # unchanged: the other side's event still sees the conflict
    assert [(c.field, c.winner) for c in decision.conflicts] == [("PartyNumber", None)]


def test_deferred_conflict_does_not_hold_back_other_fields() -> None:
    decision = decide(LWW, fo_at(None, PartyNumber="P-fo", OmOperatingUnitNumber="OU-2"),
                      fo_at(T1, PartyNumber="P-dv"), agreed(), trigger="dataverse")
    assert decision.reason == "changed"
    assert decision.writes == {"dataverse": {"OmOperatingUnitNumber": "OU-2"}}
    assert decision.agreed["PartyNumber"] == "P-1"
    assert decision.agreed["OmOperatingUnitNumber"] == "OU-2"
    assert [c.winner for c in decision.conflicts] == [None]


@pytest.mark.parametrize(("fo_time", "dv_time", "winner"), [(None, T1, "dataverse"), (T1, None, "fo"),
                                                            (None, None, "fo")])
def test_last_writer_wins_in_reconciliation_never_defers(fo_time: str | None, dv_time: str | None,
                                                         winner: Side) -> None:
    assert_won_by(conflict(LWW, fo_time, dv_time, live=False), winner)


def fo_floor(time: str, **changes: Any) -> SideRecord:
    """F&O timed by its latest event: its current values may be newer than `time`."""
    return SideRecord(values=card(**changes), modified_on=time, time_is_floor=True)


def test_an_fo_event_time_newer_than_dataverse_decides_for_fo_at_once() -> None:
    decision = decide(LWW, fo_floor(T2, PartyNumber="P-fo"), fo_at(T1, PartyNumber="P-dv"), agreed(), trigger="fo")
    assert_won_by(decision, "fo")


def test_an_fo_event_time_older_than_dataverse_proves_nothing_live_and_decides_after_the_grace() -> None:
    """A late F&O event's time says F&O's values are at least that old, not that Dataverse wrote last."""
    records = (fo_floor(T1, PartyNumber="P-fo"), fo_at(T2, PartyNumber="P-dv"))
    live = decide(LWW, *records, agreed(), trigger="fo", live=True)
    assert live.reason == "conflict-deferred" and not live.acts
    assert [c.winner for c in live.conflicts] == [None]
    assert "waiting for fo's events" in live.conflicts[0].rule
    assert_won_by(decide(LWW, *records, agreed(), trigger="fo", live=False), "dataverse")


def interrupted(agreed_state: Agreed, sides: dict[Side, SideIntent], records: dict[Side, SideRecord]) -> Agreed:
    """The agreed state after judging a step that died with `sides` intended, from a re-read (no event proof)."""
    evidence = Evidence(fo=records["fo"], dataverse=records["dataverse"], event=EventFacts("fo", "update"), live=False)
    settled = settle(agreed_state, Intent(sides), evidence)
    assert isinstance(settled, Agreed)
    return settled


def test_values_an_interrupted_step_wrote_count_as_agreed_where_they_landed() -> None:
    """The step copied Dataverse's P-b to F&O and died before storing it; Dataverse then moved on to P-c."""
    records: dict[Side, SideRecord] = {"fo": fo_at(T2, PartyNumber="P-b"), "dataverse": fo_at(T1, PartyNumber="P-c")}
    merged = interrupted(agreed(PartyNumber="P-a"), {"fo": SideIntent("write", {"PartyNumber": "P-b"})}, records)
    assert merged.values["PartyNumber"] == "P-b"
    decision = decide(LWW, records["fo"], records["dataverse"], merged, trigger="dataverse")
    assert decision.writes == {"fo": {"PartyNumber": "P-c"}}  # no conflict: F&O holds the sync's own copy
    assert decision.conflicts == []


def test_pending_values_that_did_not_land_change_nothing() -> None:
    records: dict[Side, SideRecord] = {
        "fo": fo_at(T2, PartyNumber="P-person"), "dataverse": fo_at(T1, PartyNumber="P-c")
    }
    before = agreed(PartyNumber="P-a")
    write = {"fo": SideIntent("write", {"PartyNumber": "P-b"})}
    assert interrupted(before, write, records) == before
    assert interrupted(before, write, {"fo": MISSING, "dataverse": records["dataverse"]}) == before


def test_a_delete_that_landed_before_the_step_died_makes_the_record_a_tombstone() -> None:
    """F&O present again (re-created) and Dataverse gone by the sync's own delete: copy, do not delete."""
    records: dict[Side, SideRecord] = {"fo": fo_at(T2, PartyNumber="P-new"), "dataverse": MISSING}
    merged = interrupted(agreed(), {"dataverse": SideIntent("delete")}, records)
    assert not merged.exists
    decision = decide(CARDS, records["fo"], MISSING, merged, trigger="fo")
    assert decision.create == "dataverse" and decision.delete is None
    # Not landed (the row is still there): the agreed state is untouched.
    assert interrupted(agreed(), {"dataverse": SideIntent("delete")}, {"fo": MISSING, "dataverse": fo_at(T1)}) \
        == agreed()


def test_a_create_that_landed_counts_even_when_every_value_was_edited_since() -> None:
    edited = {k: (v if k == "CardNumber" else None) for k, v in CARD.items()}
    records: dict[Side, SideRecord] = {"fo": MISSING, "dataverse": fo_at(T1, values=edited)}
    merged = interrupted(NO_STATE, {"dataverse": SideIntent("create", {"PartyNumber": "P-1"})}, records)
    assert merged.exists  # so F&O missing now is a delete to propagate, not a record to create again
    assert decide(CARDS, MISSING, records["dataverse"], merged, trigger="fo").delete == "dataverse"


def test_a_create_that_landed_before_the_step_died_makes_the_record_agreed() -> None:
    records: dict[Side, SideRecord] = {"fo": fo_at(T1), "dataverse": fo_at(T1)}
    merged = interrupted(NO_STATE, {"dataverse": SideIntent("write", dict(CARD))}, records)
    assert merged.exists and merged.values == CARD


@pytest.mark.parametrize(
    ("fo_time", "dv_time", "winner"),
    [
        ("2024-06-01T10:00:00.500Z", "2024-06-01T10:00:00Z", "fo"),  # fractional seconds are later, not earlier
        ("2024-06-01T10:00:00.000001Z", "2024-06-01T10:00:00Z", "fo"),
        ("2024-06-01T12:00:00+02:00", "2024-06-01T10:30:00Z", "dataverse"),  # 10:00Z is older than 10:30Z
        ("/Date(1717236000000)/", "2024-06-01T09:00:00Z", "fo"),  # business-event EventTime, 10:00Z
    ],
)
def test_last_writer_wins_compares_instants_not_text(fo_time: str, dv_time: str, winner: Side) -> None:
    assert_won_by(conflict(LWW, fo_time, dv_time), winner)


def test_no_state_and_both_present_differing_is_a_conflict() -> None:
    records = (fo_at(T1, PartyNumber="P-fo"), fo_at(T2, PartyNumber="P-dv"))
    assert decide(FO_WINS, *records, NO_STATE, trigger="fo").writes == {"dataverse": {"PartyNumber": "P-fo"}}
    assert decide(DV_WINS, *records, NO_STATE, trigger="fo").writes == {"fo": {"PartyNumber": "P-dv"}}
    assert decide(LWW, *records, NO_STATE, trigger="fo").writes == {"fo": {"PartyNumber": "P-dv"}}
    deferred = decide(LWW, fo_at(None, PartyNumber="P-fo"), fo_at(T2, PartyNumber="P-dv"), NO_STATE, trigger="fo")
    assert deferred.reason == "conflict-deferred"
    assert "PartyNumber" not in deferred.agreed
    for decision in (decide(FO_WINS, *records, NO_STATE, trigger="fo"), deferred):
        assert [c.field for c in decision.conflicts] == ["PartyNumber"]
        assert decision.agreed["CardNumber"] == "C-1"  # equal fields are agreed at once


def test_tombstone_with_both_present_treats_every_difference_as_a_conflict() -> None:
    # Both sides re-created the record independently after it was deleted: no agreed value to compare to.
    tombstone = Agreed(values=card(), exists=False)
    decision = decide(FO_WINS, fo(PartyNumber="P-fo"), dv(), tombstone, trigger="fo")
    assert decision.writes == {"dataverse": {"PartyNumber": "P-fo"}}
    assert [c.field for c in decision.conflicts] == ["PartyNumber"]


# ----------------------------------------------------------------- one-way fields


@pytest.mark.parametrize("template", [LWW, FO_WINS, DV_WINS], ids=lambda t: t.conflict_policy)
def test_fo_to_dataverse_field_is_fo_authoritative(template: Template) -> None:
    # Only Dataverse changed ReplacementCardNumber: F&O's value is put back, never the other way.
    decision = decide(template, fo(), dv(ReplacementCardNumber="typed-in-ce"), agreed(), trigger="dataverse")
    assert decision.writes == {"dataverse": {"ReplacementCardNumber": None}}
    assert decision.conflicts == []
    # Both changed: still F&O, and no conflict is logged.
    both = decide(template, fo(None, T1, ReplacementCardNumber="C-2"), dv(None, T2, ReplacementCardNumber="C-3"),
                  agreed(), trigger="dataverse")
    assert both.writes == {"dataverse": {"ReplacementCardNumber": "C-2"}}
    assert both.conflicts == []
    assert both.agreed["ReplacementCardNumber"] == "C-2"


WIDGET = {"WidgetId": "W-1", "Status": "Active", "Label": "L", "Segment": "Retail", "InternalNote": "n",
          "Rating": "Low"}


def widget(**changes: Any) -> SideRecord:
    return SideRecord(values={**WIDGET, **changes}, modified_on=T1)


def test_dataverse_to_fo_fields_are_dataverse_authoritative() -> None:
    state = Agreed(values=dict(WIDGET), exists=True)
    decision = decide(EVERY, widget(InternalNote="edited in F&O", Rating="High"), widget(), state, trigger="fo")
    assert decision.writes == {"fo": {"InternalNote": "n", "Rating": "Low"}}
    assert decision.conflicts == []


def test_translated_fo_to_dataverse_field_is_fo_authoritative() -> None:
    state = Agreed(values=dict(WIDGET), exists=True)
    decision = decide(EVERY, widget(), widget(Segment="Online", Label="x"), state, trigger="dataverse")
    assert decision.writes == {"dataverse": {"Segment": "Retail", "Label": "L"}}


def test_one_way_fields_decide_even_without_state() -> None:
    decision = decide(EVERY, widget(Label="fo", InternalNote="fo"), widget(Label="dv", InternalNote="dv"), NO_STATE,
                      trigger="fo")
    assert decision.writes == {"dataverse": {"Label": "fo"}, "fo": {"InternalNote": "dv"}}
    assert decision.conflicts == []


def test_emptied_choice_in_dataverse_cannot_empty_the_fo_enum() -> None:
    # F&O enums always hold a member: writing None there is a no-op, so the state would claim an
    # agreement F&O does not hold and the next look would undo the Dataverse change anyway.
    two_way = decide(CARDS, fo(), dv(CardTenderType=None), agreed(), trigger="dataverse")
    assert two_way.writes == {"dataverse": {"CardTenderType": "AsCardTender"}}
    assert two_way.agreed["CardTenderType"] == "AsCardTender"
    state = Agreed(values=dict(WIDGET), exists=True)
    one_way = decide(EVERY, widget(), widget(Rating=None), state, trigger="dataverse")  # '<<' Rating
    assert one_way.writes == {}
    assert one_way.reason == "no-change"


# ----------------------------------------------------------------- agreed = what both sides hold


@pytest.mark.parametrize(
    ("fo_changes", "dv_changes"),
    [
        ({"PartyNumber": "P-2"}, {}),
        ({}, {"PartyNumber": "P-3"}),
        ({"PartyNumber": "P-2"}, {"OmOperatingUnitNumber": "OU-9"}),
        ({"PartyNumber": "P-2"}, {"PartyNumber": "P-3"}),
        ({"ReplacementCardNumber": "R"}, {"ReplacementCardNumber": "S", "CardTenderType": "Blocked"}),
    ],
)
def test_agreed_after_the_decision_is_what_both_sides_hold(fo_changes: dict[str, Any],
                                                           dv_changes: dict[str, Any]) -> None:
    fo_values, dv_values = card(**fo_changes), card(**dv_changes)
    decision = decide(FO_WINS, SideRecord(fo_values), SideRecord(dv_values), agreed(), trigger="fo")
    fo_after, dv_after = apply(decision, fo_values, dv_values)
    assert fo_after == dv_after == decision.agreed


def test_deletion_and_creation_agree_too() -> None:
    created = decide(CARDS, fo(), MISSING, NO_STATE, trigger="fo")
    assert created.agreed == created.writes["dataverse"]
    deleted = decide(CARDS, fo(), MISSING, agreed(), trigger="dataverse")
    assert (deleted.agreed, deleted.exists_after) == ({}, False)


# ----------------------------------------------------------------- versions


@pytest.mark.parametrize(
    ("version", "than", "newer"),
    [
        ("10", "9", True),  # numeric, not text ("10" < "9" as text)
        ("9", "10", False),
        ("5", "5", False),
        ("2024-06-01T11:00:00Z", "2024-06-01T10:00:00Z", True),
        ("2024-06-01T10:00:00Z", "2024-06-01T11:00:00Z", False),
        ("2024-06-01T10:00:00Z", "2024-06-01T10:00:00Z", False),
        (None, "5", True),
        ("5", None, True),
        (None, None, True),
    ],
)
def test_is_newer(version: str | None, than: str | None, newer: bool) -> None:
    assert is_newer(version, than) is newer


def test_is_newer_compares_instants_with_fractions() -> None:
    # F&O and our own events carry microseconds, Dataverse modifiedon whole seconds.
    assert is_newer("2024-06-01T10:00:00.500000Z", "2024-06-01T10:00:00Z") is True
    assert is_newer("2024-06-01T10:00:00Z", "2024-06-01T10:00:00.500000Z") is False


@pytest.mark.parametrize(
    ("event", "seen", "stale"),
    [
        ("7", "8", True),
        ("8", "8", True),  # a duplicate delivery
        ("9", "8", False),
        ("10", "9", False),
        ("2024-06-01T10:00:00Z", "2024-06-01T11:00:00Z", True),
        ("2024-06-01T12:00:00Z", "2024-06-01T11:00:00Z", False),
        (None, "8", False),  # an event without a version is never skipped
        ("8", None, False),  # nothing applied yet
        (None, None, False),
    ],
)
def test_is_stale(event: str | None, seen: str | None, stale: bool) -> None:
    assert is_stale(event, seen) is stale


@pytest.mark.parametrize(
    ("event", "seen", "stale"),
    [
        # A Delete's pre-image carries the version of the row's last change: the very number the
        # last Update carried and the engine applied. The delete came after it: it is live.
        ("8", "8", False),
        ("9", "8", False),
        # A newer version was applied since (the key lives on in a row re-created after this delete).
        ("7", "8", True),
        (None, "8", False),
        ("8", None, False),
    ],
)
def test_a_delete_is_stale_only_when_a_newer_version_was_applied(
    event: str | None, seen: str | None, stale: bool
) -> None:
    assert is_stale(event, seen, "delete") is stale


def test_agreed_from_state() -> None:
    assert agreed_from_state(None, False) == NO_STATE
    assert agreed_from_state({"CardNumber": "C-1"}, False) == Agreed({"CardNumber": "C-1"}, True)
    tombstone = agreed_from_state({"CardNumber": "C-1"}, True)
    assert tombstone == Agreed({"CardNumber": "C-1"}, False)
    source = {"CardNumber": "C-1"}
    copied = agreed_from_state(source, False)
    source["CardNumber"] = "changed"
    assert copied.values == {"CardNumber": "C-1"}


def test_conflict_and_decision_shapes() -> None:
    c = Conflict("PartyNumber", "a", "b", "fo", "fo-wins")
    assert (c.field, c.winner, c.rule) == ("PartyNumber", "fo", "fo-wins")
    assert not Decision(reason="no-change").acts
    assert Decision(reason="deleted", delete="fo").acts
    assert Decision(reason="created", create="dataverse").acts
    assert Decision(reason="changed", writes={"fo": {"x": 1}}).acts


# ----------------------------------------------------------------- convergence (property-based)


class NoLookups:
    def id_for(self, lookup: Lookup, key: str) -> str | None:
        raise AssertionError("the cards template has no lookup")

    def key_for(self, lookup: Lookup, row_id: str) -> str | None:
        raise AssertionError("the cards template has no lookup")


POOLS: dict[str, list[Any]] = {
    "CardTenderType": ["AsCardTender", "Blocked", "NoTender"],
    "PartyNumber": [None, "P-1", "P-2"],
    "ReplacementCardNumber": [None, "R-1", "R-2"],
    "OmOperatingUnitNumber": [None, "OU-1", "OU-2"],
    "LoyaltyEnrollmentDate": [None, "2024-05-01T10:00:00Z", "2025-01-01T00:00:00Z"],
    "LoyaltyEnrollmentDateLocal": [None, "2024-05-01T03:00:00Z"],
}


def card_values(*, enum_may_be_empty: bool) -> st.SearchStrategy[dict[str, Any]]:
    pools = {name: st.sampled_from(values) for name, values in POOLS.items()}
    if enum_may_be_empty:  # a Dataverse choice can be cleared; an F&O enum always holds a member
        pools["CardTenderType"] = st.sampled_from([None, *POOLS["CardTenderType"]])
    return st.fixed_dictionaries({"CardNumber": st.just("C-1"), **pools})


def written_to(template: Template, side: Side, values: Mapping[str, Any]) -> dict[str, Any]:
    """What the side holds, read back in canonical form, after `values` were written to it."""
    if not values:
        return {}
    if side == "fo":
        return fo_to_canonical(template, canonical_to_fo(template, values))
    return dataverse_to_canonical(template, canonical_to_dataverse(template, values, NoLookups()), NoLookups())


def assert_converges(template: Template, fo_record: SideRecord, dv_record: SideRecord, state: Agreed, trigger: Side,
                     live: bool) -> None:
    first = decide(template, fo_record, dv_record, state, trigger=trigger, live=live)
    # Apply the writes through the real mapping, so what each side can actually hold counts.
    fo_after = {**(fo_record.values or {}), **written_to(template, "fo", first.writes.get("fo", {}))}
    dv_after = {**(dv_record.values or {}), **written_to(template, "dataverse", first.writes.get("dataverse", {}))}
    for f in template.fields:
        assert fo_after[f.key] == dv_after[f.key], f.key
        assert first.agreed[f.key] == fo_after[f.key], f.key
    # The echo of our own writes (and any later look at the pair) changes nothing: no ping-pong.
    second = decide(template, SideRecord(fo_after, fo_record.modified_on), SideRecord(dv_after, dv_record.modified_on),
                    Agreed(first.agreed, True), trigger=other_side(trigger), live=live, from_integration_user=True)
    assert second.writes == {}
    assert second.reason == "echo"
    assert second.conflicts == []


@settings(max_examples=200, deadline=None)
@given(
    fo_values=card_values(enum_may_be_empty=False),
    dv_values=card_values(enum_may_be_empty=True),
    agreed_values=card_values(enum_may_be_empty=True),
    exists=st.booleans(),
    trigger=st.sampled_from(["fo", "dataverse"]),
)
def test_one_decision_converges_and_the_next_is_a_no_op(
    fo_values: dict[str, Any], dv_values: dict[str, Any], agreed_values: dict[str, Any], exists: bool, trigger: Side
) -> None:
    assert_converges(FO_WINS, SideRecord(fo_values), SideRecord(dv_values), Agreed(agreed_values, exists), trigger,
                     live=True)


@pytest.mark.parametrize("template", [DV_WINS, LWW], ids=lambda t: t.conflict_policy)
@settings(max_examples=100, deadline=None)
@given(
    fo_values=card_values(enum_may_be_empty=False),
    dv_values=card_values(enum_may_be_empty=True),
    agreed_values=card_values(enum_may_be_empty=True),
    exists=st.booleans(),
    times=st.tuples(st.sampled_from([None, T1, T2]), st.sampled_from([None, T1, T2])),
    trigger=st.sampled_from(["fo", "dataverse"]),
)
def test_reconciliation_converges_under_every_policy(
    template: Template, fo_values: dict[str, Any], dv_values: dict[str, Any], agreed_values: dict[str, Any],
    exists: bool, times: tuple[str | None, str | None], trigger: Side,
) -> None:
    # Reconciliation (live=False) never defers, so every policy must settle in one step.
    assert_converges(template, SideRecord(fo_values, times[0]), SideRecord(dv_values, times[1]),
                     Agreed(agreed_values, exists), trigger, live=False)
