"""The judge of an interrupted step's intent, rule by rule, and the intent's stored form.

The orderings that found these rules (a crash between a target write and the state update, a
person's change racing it) are replayed end to end in tests/chaos/test_regressions.py; here each
rule is one small case on plain values.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from loyaltysync.decide import MISSING, NO_STATE, Agreed, Decision, SideRecord
from loyaltysync.intent import (
    EventFacts,
    Evidence,
    Intent,
    Landed,
    NotLanded,
    SideIntent,
    Superseded,
    Wait,
    judge,
    settle,
)
from loyaltysync.templates import Side

AT = "2025-01-01T10:00:00.250000Z"
BEFORE, SAME, AFTER = "2025-01-01T09:59:59Z", "2025-01-01T10:00:00Z", "2025-01-01T10:00:02Z"  # whole seconds
SYNC_USER, AGENT = "sync-user", "agent-user"


def row(version: str | None = "10", row_id: str | None = "row-1", created_by: str | None = None,
        **values: Any) -> SideRecord:
    return SideRecord(values={"LevelPhrase": "L-1", **values}, version=version, row_id=row_id, created_by=created_by)


def evidence(fo: SideRecord, dv: SideRecord, event: EventFacts | None = None, *, live: bool = True,
             ours: bool = False, recheck: bool = False, own_fo_write: tuple[str, str] | None = None) -> Evidence:
    return Evidence(fo=fo, dataverse=dv, event=event or EventFacts("fo", "update"), ours=ours, recheck=recheck,
                    live=live, integration_users=frozenset({SYNC_USER}), own_fo_write=own_fo_write)


def intent(side: Side, wanted: SideIntent) -> Intent:
    return Intent({side: wanted}, at=AT, by="instance-1")


AGREED = Agreed(values={"LevelPhrase": "L-1", "LevelDescription": "agreed"}, exists=True)


def test_an_intent_round_trips_through_its_stored_form_and_keeps_what_the_step_read() -> None:
    read = {"fo": row(version="W/\"5\""), "dataverse": row(version="1137", row_id="row-9")}
    write = Intent.of(Decision(reason="changed", writes={"dataverse": {"LevelDescription": "x"}}), read, AT, "i-1")
    assert write.sides == {"dataverse": SideIntent("write", {"LevelDescription": "x"}, version="1137")}
    create = Intent.of(Decision(reason="created", writes={"fo": {"LevelPhrase": "L-1"}}, create="fo"), read, AT, "i-1")
    assert create.sides == {"fo": SideIntent("create", {"LevelPhrase": "L-1"})}
    delete = Intent.of(Decision(reason="deleted", delete="dataverse"), read, AT, "i-1")
    assert delete.sides == {"dataverse": SideIntent("delete", version="1137", row_id="row-9")}
    for each in (write, create, delete):
        assert Intent.from_dict(each.as_dict()) == each


def test_a_delete_is_judged_by_the_row_there_now() -> None:
    wanted = SideIntent("delete", version="10", row_id="row-1")
    deleting = intent("dataverse", wanted)
    assert judge(deleting, "dataverse", evidence(row(), MISSING)) == Landed(gone=True)
    assert judge(deleting, "dataverse", evidence(row(), row(version="10"))) == NotLanded()
    assert judge(deleting, "dataverse", evidence(row(), row(version="12", row_id="row-2"))) == Superseded(gone=True)
    fo_deleting = intent("fo", SideIntent("delete", version="10"))  # F&O: no row id to compare
    changed = evidence(row(version="12"), row())
    assert isinstance(judge(fo_deleting, "fo", changed), Wait)  # edited since, or deleted and created again
    assert judge(fo_deleting, "fo", evidence(row(version="12"), row(), live=False)) == NotLanded()
    created_after = EventFacts("fo", "create", at=AFTER)
    assert judge(fo_deleting, "fo", evidence(row(version="12"), row(), created_after)) == Superseded(gone=True)


def test_a_create_missing_now_waits_for_its_delete_event_which_proves_it_landed() -> None:
    creating = intent("dataverse", SideIntent("create", {"LevelDescription": "new"}))
    assert isinstance(judge(creating, "dataverse", evidence(row(), MISSING)), Wait)
    deleted_after = EventFacts("dataverse", "delete", at=AFTER)
    assert judge(creating, "dataverse", evidence(row(), MISSING, deleted_after)) == Superseded()
    assert settle(NO_STATE, creating, evidence(row(), MISSING, deleted_after)) == Agreed(values={}, exists=True)
    deleted_before = EventFacts("dataverse", "delete", at=BEFORE)  # a late delete: proves nothing
    assert isinstance(judge(creating, "dataverse", evidence(row(), MISSING, deleted_before)), Wait)
    # One dated in the intent's own second is later (whole seconds): a person deleted what the step created.
    deleted_then = EventFacts("dataverse", "delete", at=SAME)
    assert judge(creating, "dataverse", evidence(row(), MISSING, deleted_then)) == Superseded()
    assert judge(creating, "dataverse", evidence(MISSING, MISSING)) == NotLanded()  # gone on both: nothing to wait
    recheck = evidence(row(), MISSING, EventFacts("dataverse", "delete"), live=False, recheck=True)
    assert judge(creating, "dataverse", recheck) == NotLanded()  # a re-check takes "never happened"
    # ... once the delete cannot be held back any longer (a crashed instance's lease); before, it waits.
    young = replace(recheck, waited_out=False)
    assert isinstance(judge(creating, "dataverse", young), Wait)


def test_the_event_of_the_syncs_own_fo_delete_proves_nothing_about_a_later_create() -> None:
    # F&O's events name no user: the event of the sync's own F&O delete, in the same second as a later intent to
    # create the record again, "proved" that create landed and was deleted (the simulator found it deleting
    # the record a person had just created again in Dataverse).
    creating = intent("fo", SideIntent("create", {"LevelDescription": "new"}))
    echo = EventFacts("fo", "delete", at=SAME)
    own_delete = ("2025-01-01T09:59:59.500000Z", "2025-01-01T09:59:59.900000Z")
    assert isinstance(judge(creating, "fo", evidence(MISSING, row(), echo, own_fo_write=own_delete)), Wait)
    assert judge(creating, "fo", evidence(MISSING, row(), echo)) == Superseded()  # a person's delete


def test_who_created_the_dataverse_row_tells_whose_record_it_is() -> None:
    creating = intent("dataverse", SideIntent("create", {"LevelDescription": "new"}))
    by_sync = row(created_by=SYNC_USER, LevelDescription="edited since")
    assert judge(creating, "dataverse", evidence(row(), by_sync)) == Landed({"LevelDescription": "new"})
    by_agent = row(created_by=AGENT, LevelDescription="the agent's")
    assert judge(creating, "dataverse", evidence(row(), by_agent)) == Superseded(gone=True)
    assert settle(AGREED, creating, evidence(row(), by_agent)) == Agreed(values=AGREED.values, exists=False)


def test_a_dataverse_write_changed_since_waits_unless_an_event_shows_what_was_written() -> None:
    writing = intent("dataverse", SideIntent("write", {"LevelDescription": "copied"}, version="10"))
    changed = row(version="12", LevelDescription="the agent's")
    assert isinstance(judge(writing, "dataverse", evidence(row(), changed)), Wait)
    pre_image = EventFacts("dataverse", "update", at=AFTER, before={"LevelDescription": "copied"})
    shown = evidence(row(), changed, pre_image)
    assert judge(writing, "dataverse", shown) == Superseded({"LevelDescription": "copied"})
    echo = EventFacts("dataverse", "update", at=AFTER, payload={"LevelDescription": "copied"})
    landed = evidence(row(), row(version="11", LevelDescription="copied"), echo, ours=True)
    assert judge(writing, "dataverse", landed) == Landed({"LevelDescription": "copied"})
    assert settle(AGREED, writing, landed) == Agreed(values={**AGREED.values, "LevelDescription": "copied"},
                                                     exists=True)


def test_fields_a_person_wrote_in_fo_after_the_intent_are_a_change_against_the_intended_values() -> None:
    writing = intent("fo", SideIntent("write", {"LevelDescription": "copied"}, version="10"))
    edited = row(version="11", LevelDescription="the F&O user's")
    person = EventFacts("fo", "update", at=AFTER, changed=("LevelDescription",))
    assert judge(writing, "fo", evidence(edited, row(), person)) == Superseded({"LevelDescription": "copied"})
    earlier = EventFacts("fo", "update", at=BEFORE, changed=("LevelDescription",))
    assert judge(writing, "fo", evidence(edited, row(), earlier)) == NotLanded()
    assert judge(writing, "fo", evidence(edited, row(), person, ours=True)) == NotLanded()


def test_nothing_intended_on_a_side_is_not_landed_there_and_the_first_wait_decides() -> None:
    creating = intent("dataverse", SideIntent("create", {"LevelDescription": "new"}))
    assert judge(creating, "fo", evidence(row(), MISSING)) == NotLanded()
    waited = settle(AGREED, creating, evidence(row(), MISSING))
    assert isinstance(waited, Wait) and "interrupted create in dataverse" in waited.reason
