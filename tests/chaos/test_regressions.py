"""Deterministic replays of what the chaos run found, one scenario each, against both emulators in-process.

Each test plays the exact order of events the chaos run logged (a late webhook,
a crash between a target write and the state update), so a failure here names
the bug without the noise of a whole run.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from loyaltysync.errors import TargetError
from loyaltysync.events.model import ChangeEvent
from loyaltysync.sandbox import dataverse as dataverse_emulator
from loyaltysync.sandbox import fno as fno_emulator
from loyaltysync.sandbox.dataverse import AGENT_USER, INTEGRATION_USER
from loyaltysync.state import MemoryStateStore
from loyaltysync.sync import Engine
from loyaltysync.targets.auth import StaticTokenCredential
from loyaltysync.targets.dataverse import DataverseClient
from loyaltysync.targets.fno import FnoClient
from loyaltysync.targets.lookups import LookupCache
from loyaltysync.templates import default_mappings_dir, load_templates

TOKEN = "chaos-regression-token"
WRITING_ELSEWHERE = 0.6
LEVELS = "loyalty-levels"
FO_SET, DV_SET = "LoyaltyLevels", "msdyn_loyaltylevels"


def utc_seconds() -> str:
    """Now, as F&O's events give their time (whole seconds, UTC)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Crash(Exception):
    pass


@dataclass
class World:
    engine: Engine
    fo: FnoClient
    dv: DataverseClient
    agent: DataverseClient
    state: MemoryStateStore

    async def fo_description(self, phrase: str) -> Any:
        row = await self.fo.get(FO_SET, {"LevelPhrase": phrase})
        return None if row is None else row["LevelDescription"]

    async def dv_row(self, phrase: str) -> dict[str, Any] | None:
        return await self.dv.get_by_key(DV_SET, {"msdyn_levelphrase": phrase})

    async def agent_edit(self, phrase: str, description: str) -> ChangeEvent:
        """An agent's edit in Dataverse and the complete webhook event it raises (payload, version, time)."""
        key, body = {"msdyn_levelphrase": phrase}, {"msdyn_description": description}
        await self.agent.upsert(DV_SET, key, body, mode="update")
        row = await self.dv_row(phrase)
        assert row is not None
        return ChangeEvent(
            template=LEVELS,
            side="dataverse",
            operation="update",
            key={"LevelPhrase": phrase},
            fields={"LevelPhrase": phrase, "LevelDescription": description},
            complete=True,
            row_id=row["msdyn_loyaltylevelid"],
            source_version=str(row["versionnumber"]),
            modified_on=row["modifiedon"],
            initiating_user=AGENT_USER.systemuserid,
        )


@pytest.fixture
async def world() -> AsyncIterator[World]:
    templates = load_templates(default_mappings_dir())
    fo_app = fno_emulator.create_app(token=TOKEN, templates=templates, public_url="http://fo.test")
    dv_app = dataverse_emulator.create_app(token=TOKEN, templates=templates, public_url="http://dv.test")
    credential = StaticTokenCredential(TOKEN)
    fo = FnoClient("http://fo.test", credential, transport=httpx.ASGITransport(app=fo_app))
    dv = DataverseClient("http://dv.test", credential, transport=httpx.ASGITransport(app=dv_app))
    state = MemoryStateStore()
    # Another instance's intent counts as "being written" for WRITING_ELSEWHERE (15 s in production).
    engine = Engine(
        templates, fo, dv, LookupCache(dv), state, integration_users=frozenset({INTEGRATION_USER.systemuserid}),
        writing_elsewhere_s=WRITING_ELSEWHERE,
    )
    yield World(engine, fo, dv, dv.as_caller(AGENT_USER.azureactivedirectoryobjectid), state)
    await fo.aclose()
    await dv.aclose()


async def synced_level(world: World, phrase: str, description: str) -> None:
    """A level created in F&O and copied to Dataverse by the engine, with sync state."""
    await world.fo.create(FO_SET, {"LevelPhrase": phrase, "LevelDescription": description})
    created = ChangeEvent(template=LEVELS, side="fo", operation="create", key={"LevelPhrase": phrase},
                          wire_format="fo-data-event")
    outcome = await world.engine.process(created)
    assert outcome.created == "dataverse"


async def test_a_late_update_webhook_does_not_bring_back_a_deleted_record(world: World) -> None:
    """Chaos run: an agent edits a record, then deletes it; the edit's webhook arrives after the delete's.

    The delete is applied (F&O row deleted, state a tombstone). The late update
    webhook carries a complete payload and a version newer than any the engine
    recorded (a delete webhook has no version), so it was trusted as the record's
    current state and the record was re-created in F&O, then deleted again by the
    next event: a record created twice and a deleted card reappearing in F&O.
    """
    await synced_level(world, "LATE-1", "first")
    late = await world.agent_edit("LATE-1", "edited just before the delete")
    row = await world.dv_row("LATE-1")
    assert row is not None
    assert await world.agent.delete_by_key(DV_SET, {"msdyn_levelphrase": "LATE-1"})
    deleted = ChangeEvent(template=LEVELS, side="dataverse", operation="delete", key={"LevelPhrase": "LATE-1"},
                          row_id=row["msdyn_loyaltylevelid"], initiating_user=AGENT_USER.systemuserid)
    assert (await world.engine.process(deleted)).deleted == "fo"

    outcome = await world.engine.process(late)

    assert outcome.created is None, f"the late webhook re-created the record: {outcome}"
    assert await world.fo_description("LATE-1") is None
    assert await world.dv_row("LATE-1") is None


async def test_a_crash_between_target_write_and_state_update_loses_no_later_edit(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chaos run: a worker dies right after writing F&O, before storing the sync state.

    An agent edits a level twice ("b", then "c"); the webhook of "b" is late.
    Processing it writes "b" to F&O and the worker dies before the state update,
    so the state still says "a". The webhook of "c" then sees F&O "b" and
    Dataverse "c", both changed since "a": a conflict, deferred until F&O's time
    is known. F&O's event for the engine's own write of "b" brings that time,
    which is later than the agent's "c", so F&O's "b" wins and the agent's last
    edit is lost on both sides. (The redelivered "b" message is skipped as stale.)
    """
    await synced_level(world, "CRASH-1", "a")
    edit_b = await world.agent_edit("CRASH-1", "b")
    await asyncio.sleep(1.1)  # "c" is the later edit, past modifiedon's one-second precision
    edit_c = await world.agent_edit("CRASH-1", "c")
    await asyncio.sleep(1.1)  # the late webhook of "b" is processed after both edits

    record = Engine._record

    async def die_before_state(self: Engine, *args: Any, **kwargs: Any) -> None:
        raise Crash("worker killed between the F&O write and the state update")

    monkeypatch.setattr(Engine, "_record", die_before_state)
    with pytest.raises(Crash):
        await world.engine.process(edit_b)
    monkeypatch.setattr(Engine, "_record", record)
    assert await world.fo_description("CRASH-1") == "b"  # written before the crash

    await world.engine.process(edit_c)
    echo = ChangeEvent(template=LEVELS, side="fo", operation="update", key={"LevelPhrase": "CRASH-1"},
                       modified_on=utc_seconds(), wire_format="fo-data-event")  # F&O's event for the write of "b"
    await world.engine.process(echo)
    await world.engine.process(edit_b)  # the crashed message, delivered again

    assert await world.fo_description("CRASH-1") == "c"
    dv_row = await world.dv_row("CRASH-1")
    assert dv_row is not None and dv_row["msdyn_description"] == "c"


async def test_a_late_fo_event_does_not_decide_a_conflict_for_the_earlier_writer(world: World) -> None:
    """Chaos run: an agent and then an F&O user edit the same field; an older F&O event arrives first.

    F&O has no modified time of its own (the templates name no `modified_field`),
    so the engine takes F&O's time from the event it is processing. A late F&O
    event (here the one for the engine's own copy of the record, stuck behind a
    backlog) carries a time older than the agent's edit, and Dataverse wins,
    although the F&O user wrote last. The F&O user's own event then finds both
    sides equal and changes nothing: the last writer's value is lost.
    """
    await synced_level(world, "LATE-FO", "a")
    # An F&O event from before the edits (F&O's event for the engine's own create), not delivered yet.
    old_fo_event = ChangeEvent(template=LEVELS, side="fo", operation="create", key={"LevelPhrase": "LATE-FO"},
                               modified_on=utc_seconds(), wire_format="fo-data-event")
    await asyncio.sleep(1.1)
    agent = await world.agent_edit("LATE-FO", "agent")
    await asyncio.sleep(1.1)
    await world.fo.update(FO_SET, {"LevelPhrase": "LATE-FO"}, {"LevelDescription": "fo user, last"})
    fo_user = ChangeEvent(template=LEVELS, side="fo", operation="update", key={"LevelPhrase": "LATE-FO"},
                          modified_on=utc_seconds(), wire_format="fo-data-event")

    for event in (agent, old_fo_event, fo_user):
        await world.engine.process(event)

    assert await world.fo_description("LATE-FO") == "fo user, last"
    dv_row = await world.dv_row("LATE-FO")
    assert dv_row is not None and dv_row["msdyn_description"] == "fo user, last"


async def test_an_fo_change_older_than_the_agents_edit_waits_for_the_recheck_then_loses(world: World) -> None:
    """The other half of the late-event rule: F&O's event time is only a lower bound of its value's time.

    An F&O user edits first, an agent a second later. Neither event can prove who wrote last
    (F&O's time is older than Dataverse's, but a later F&O change could still be on its way),
    so both defer; the re-check after the grace period (not live) decides on the times known:
    the agent's later edit wins on both sides.
    """
    await synced_level(world, "OLDER-FO", "a")
    await world.fo.update(FO_SET, {"LevelPhrase": "OLDER-FO"}, {"LevelDescription": "fo user, first"})
    fo_user = ChangeEvent(template=LEVELS, side="fo", operation="update", key={"LevelPhrase": "OLDER-FO"},
                          modified_on=utc_seconds(), wire_format="fo-data-event")
    await asyncio.sleep(1.1)
    agent = await world.agent_edit("OLDER-FO", "agent, last")

    assert (await world.engine.process(agent)).reason == "conflict-deferred"  # F&O's time: not known yet
    assert (await world.engine.process(fo_user)).reason == "conflict-deferred"  # known: older, but a lower bound
    assert await world.fo_description("OLDER-FO") == "fo user, first"  # nothing decided yet

    recheck = ChangeEvent(template=LEVELS, side="dataverse", operation="update", key={"LevelPhrase": "OLDER-FO"},
                          wire_format="recheck")
    outcome = await world.engine.process(recheck, live=False)

    assert outcome.writes == {"fo": ["LevelDescription"]}
    assert [c["winner"] for c in outcome.conflicts] == ["dataverse"]
    assert await world.fo_description("OLDER-FO") == "agent, last"
    state = await world.state.get(LEVELS, "OLDER-FO")
    assert state is not None and state.values["LevelDescription"] == "agent, last" and state.pending == {}


async def test_edits_of_different_fields_both_survive_on_records_that_predate_the_sync(world: World) -> None:
    """Records equal on both sides before the sync started have no sync state (the state table starts
    empty when the integration is deployed next to data that is already in step).

    An agent edits one field; with no agreed values to compare with, the engine could not tell which side
    changed and deferred until F&O's time was known. An F&O user then edited another field: F&O's record
    was newer, so F&O's values won for every differing field, including the agent's, which was lost.
    The update webhook's pre-image (registered for Update steps) now says which fields the agent changed.
    """
    card = {"CardNumber": "OLD-1", "CardTenderType": "AsCardTender", "PartyNumber": "P-0",
            "OmOperatingUnitNumber": "S-0"}
    dv_card = {"msdyn_cardnumber": "OLD-1", "msdyn_cardtendertype": 806380000, "msdyn_partynumber": "P-0",
               "msdyn_operatingunitnumber": "S-0"}
    await world.fo.create("RetailLoyaltyCards", card)
    await world.agent.create("msdyn_loyaltycards", dv_card)

    await world.agent.upsert("msdyn_loyaltycards", {"msdyn_cardnumber": "OLD-1"},
                             {"msdyn_operatingunitnumber": "S-AGENT"}, mode="update")
    row = await world.dv.get_by_key("msdyn_loyaltycards", {"msdyn_cardnumber": "OLD-1"})
    assert row is not None
    agent = ChangeEvent(template="loyalty-cards", side="dataverse", operation="update", key={"CardNumber": "OLD-1"},
                        fields={"CardNumber": "OLD-1", "CardTenderType": "AsCardTender", "PartyNumber": "P-0",
                                "OmOperatingUnitNumber": "S-AGENT", "LoyaltyEnrollmentDate": None,
                                "LoyaltyEnrollmentDateLocal": None},
                        complete=True, row_id=row["msdyn_loyaltycardid"], source_version=str(row["versionnumber"]),
                        modified_on=row["modifiedon"], initiating_user=AGENT_USER.systemuserid,
                        before={"CardNumber": "OLD-1", "CardTenderType": "AsCardTender", "PartyNumber": "P-0",
                                "OmOperatingUnitNumber": "S-0", "LoyaltyEnrollmentDate": None,
                                "LoyaltyEnrollmentDateLocal": None})
    await world.engine.process(agent)
    await asyncio.sleep(1.1)  # the F&O edit is later, past modifiedon's one-second precision
    await world.fo.update("RetailLoyaltyCards", {"CardNumber": "OLD-1"}, {"PartyNumber": "P-FO"})
    fo_user = ChangeEvent(template="loyalty-cards", side="fo", operation="update", key={"CardNumber": "OLD-1"},
                          modified_on=utc_seconds(), wire_format="fo-data-event")
    await world.engine.process(fo_user)

    fo = await world.fo.get("RetailLoyaltyCards", {"CardNumber": "OLD-1"})
    dv = await world.dv.get_by_key("msdyn_loyaltycards", {"msdyn_cardnumber": "OLD-1"})
    assert fo is not None and dv is not None
    assert (fo["PartyNumber"], fo["OmOperatingUnitNumber"]) == ("P-FO", "S-AGENT")
    assert (dv["msdyn_partynumber"], dv["msdyn_operatingunitnumber"]) == ("P-FO", "S-AGENT")


async def _crash_before_state(world: World, monkeypatch: pytest.MonkeyPatch, event: ChangeEvent) -> None:
    """Process `event` in a worker that dies after its target writes, before storing the sync state."""

    async def die_before_state(self: Engine, *args: Any, **kwargs: Any) -> None:
        raise Crash("worker killed between the target write and the state update")

    with monkeypatch.context() as patch:
        patch.setattr(Engine, "_record", die_before_state)
        with pytest.raises(Crash):
            await world.engine.process(event)


async def test_a_record_recreated_after_a_crashed_delete_is_copied_not_deleted(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chaos run (a real process kill): F&O deletes a level; the worker deletes it in Dataverse and dies
    before storing the tombstone. F&O re-creates the level. With the state still saying "exists on both
    sides", F&O present and Dataverse missing read as "deleted in Dataverse", and the re-created level
    was deleted in F&O too: lost on both sides."""
    await synced_level(world, "GONE-1", "first life")
    await world.fo.delete(FO_SET, {"LevelPhrase": "GONE-1"})
    deleted = ChangeEvent(template=LEVELS, side="fo", operation="delete", key={"LevelPhrase": "GONE-1"},
                          wire_format="fo-data-event")
    await _crash_before_state(world, monkeypatch, deleted)
    assert await world.dv_row("GONE-1") is None  # the delete reached Dataverse before the crash

    await world.fo.create(FO_SET, {"LevelPhrase": "GONE-1", "LevelDescription": "second life"})
    recreated = ChangeEvent(template=LEVELS, side="fo", operation="create", key={"LevelPhrase": "GONE-1"},
                            wire_format="fo-data-event")
    for event in (recreated, deleted):  # the re-create's event, then the crashed message again
        await world.engine.process(event)

    assert await world.fo_description("GONE-1") == "second life"
    row = await world.dv_row("GONE-1")
    assert row is not None and row["msdyn_description"] == "second life"


async def test_a_late_create_after_a_crashed_copy_and_a_delete_deletes_instead_of_recreating(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chaos run (a real process kill): the worker copies a new F&O level to Dataverse and dies before
    storing the state. An agent edits it in Dataverse; F&O deletes it. The create event, delivered again,
    found no agreed state, F&O missing and Dataverse present, and re-created the level in F&O: created
    twice, and a deleted level back in F&O."""
    await world.fo.create(FO_SET, {"LevelPhrase": "TWICE-1", "LevelDescription": "new"})
    created = ChangeEvent(template=LEVELS, side="fo", operation="create", key={"LevelPhrase": "TWICE-1"},
                         wire_format="fo-data-event")
    await _crash_before_state(world, monkeypatch, created)
    assert await world.dv_row("TWICE-1") is not None
    await world.agent_edit("TWICE-1", "edited by an agent")
    await world.fo.delete(FO_SET, {"LevelPhrase": "TWICE-1"})

    outcome = await world.engine.process(created)

    assert outcome.created is None and outcome.deleted == "dataverse"
    assert await world.fo_description("TWICE-1") is None
    assert await world.dv_row("TWICE-1") is None


async def test_an_fo_edit_after_the_deferral_wins_the_recheck(world: World) -> None:
    """Chaos run: the re-check read F&O's newest value (an F&O user's edit made after the conflict was
    deferred, its event not processed yet) and gave Dataverse's older edit the win over it."""
    await synced_level(world, "AFTER-1", "a")
    await world.fo.update(FO_SET, {"LevelPhrase": "AFTER-1"}, {"LevelDescription": "fo, early"})
    await asyncio.sleep(1.1)
    agent = await world.agent_edit("AFTER-1", "agent")
    deferred = await world.engine.process(agent)
    assert deferred.reason == "conflict-deferred"
    # What the worker queues for later (loyaltysync/worker.py `_recheck_later`).
    recheck = ChangeEvent(template=LEVELS, side="dataverse", operation="update", key={"LevelPhrase": "AFTER-1"},
                          fields={c["field"]: c["fo"] for c in deferred.conflicts if c["winner"] is None},
                          modified_on=utc_seconds(), wire_format="recheck")
    assert recheck.fields == {"LevelDescription": "fo, early"}
    await asyncio.sleep(1.1)
    await world.fo.update(FO_SET, {"LevelPhrase": "AFTER-1"}, {"LevelDescription": "fo, last"})

    outcome = await world.engine.process(recheck, live=False)

    assert [c["winner"] for c in outcome.conflicts] == ["fo"]
    assert await world.fo_description("AFTER-1") == "fo, last"
    row = await world.dv_row("AFTER-1")
    assert row is not None and row["msdyn_description"] == "fo, last"


async def test_a_step_waits_for_another_instances_write_in_flight(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chaos run (two instances): instance A copies a new Dataverse level to F&O; while its F&O write is
    in flight, the agent deletes the level and instance B takes the delete webhook. B read F&O (not
    written yet) and Dataverse (gone), stored a tombstone over A's intent, and A's re-run then found F&O
    (its own write) and the tombstone, and created the level in Dataverse again. B now waits for A."""
    other = Engine(world.engine.templates, world.fo, world.dv, LookupCache(world.dv), world.state,
                   integration_users=world.engine.integration_users, writing_elsewhere_s=5)
    await world.agent.create(DV_SET, {"msdyn_levelphrase": "RACE-1", "msdyn_description": "new"})
    row = await world.dv_row("RACE-1")
    assert row is not None
    created = ChangeEvent(template=LEVELS, side="dataverse", operation="create", key={"LevelPhrase": "RACE-1"},
                          fields={"LevelPhrase": "RACE-1", "LevelDescription": "new"}, complete=True,
                          row_id=row["msdyn_loyaltylevelid"], source_version=str(row["versionnumber"]),
                          modified_on=row["modifiedon"], initiating_user=AGENT_USER.systemuserid)
    gate, writing = asyncio.Event(), asyncio.Event()
    write = world.fo.create_or_update

    async def slow_write(*args: Any, **kwargs: Any) -> Any:
        writing.set()
        await gate.wait()
        return await write(*args, **kwargs)

    monkeypatch.setattr(world.fo, "create_or_update", slow_write)
    a = asyncio.create_task(world.engine.process(created))
    await asyncio.wait_for(writing.wait(), 5)  # A stored its intent and is writing F&O
    assert await world.agent.delete_by_key(DV_SET, {"msdyn_levelphrase": "RACE-1"})
    deleted = ChangeEvent(template=LEVELS, side="dataverse", operation="delete", key={"LevelPhrase": "RACE-1"},
                          row_id=row["msdyn_loyaltylevelid"], initiating_user=AGENT_USER.systemuserid)
    b = asyncio.create_task(other.process(deleted))
    await asyncio.sleep(0.5)
    assert not b.done(), "B decided while A's write was in flight"
    gate.set()
    await a
    outcome = await b

    assert outcome.deleted == "fo"
    assert await world.fo_description("RACE-1") is None
    assert await world.dv_row("RACE-1") is None


async def test_a_record_busy_for_longer_than_the_pauses_is_retried_later_not_parked(world: World) -> None:
    """Another instance's fresh intent that does not clear in time: the step gives up with a transient
    error (the queue redelivers the message later), never a permanent one that would park the record."""
    other = Engine(world.engine.templates, world.fo, world.dv, LookupCache(world.dv), world.state,
                   integration_users=world.engine.integration_users, writing_elsewhere_s=60)
    await synced_level(world, "BUSY-1", "a")
    record = await world.state.get(LEVELS, "BUSY-1")
    assert record is not None
    foreign = {"fo": {"LevelDescription": "b"}, "@": {"at": utc_seconds(), "by": "another-instance"}}
    await world.state.put(replace(record, pending=foreign))
    event = ChangeEvent(template=LEVELS, side="fo", operation="update", key={"LevelPhrase": "BUSY-1"},
                        wire_format="fo-data-event")

    with pytest.raises(TargetError) as raised:
        await other.process(event)
    assert raised.value.transient


async def test_a_copy_deleted_right_after_a_crashed_create_is_not_created_again(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chaos run: the worker copies a new F&O level to Dataverse and dies before storing the state; an
    agent deletes the copy at once. The create event, delivered again, found Dataverse missing and no
    agreed state and created the level in Dataverse a second time, though a person had deleted it."""
    await world.fo.create(FO_SET, {"LevelPhrase": "QUICK-1", "LevelDescription": "new"})
    created = ChangeEvent(template=LEVELS, side="fo", operation="create", key={"LevelPhrase": "QUICK-1"},
                          wire_format="fo-data-event")
    await _crash_before_state(world, monkeypatch, created)
    row = await world.dv_row("QUICK-1")
    assert row is not None
    assert await world.agent.delete_by_key(DV_SET, {"msdyn_levelphrase": "QUICK-1"})
    deleted = ChangeEvent(template=LEVELS, side="dataverse", operation="delete", key={"LevelPhrase": "QUICK-1"},
                          row_id=row["msdyn_loyaltylevelid"], initiating_user=AGENT_USER.systemuserid)

    again = await world.engine.process(created)  # the crashed message first: it cannot tell yet
    assert again.created is None and again.reason == "conflict-deferred"
    assert await world.dv_row("QUICK-1") is None
    outcome = await world.engine.process(deleted)  # the delete event says the copy existed

    assert outcome.deleted == "fo"
    assert await world.fo_description("QUICK-1") is None
    assert await world.dv_row("QUICK-1") is None


async def test_a_crashed_create_that_never_landed_is_made_by_the_recheck(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other reading of the same intent: the worker died before the create reached Dataverse. No
    delete event will come; the re-check (not live) takes "never happened" and creates the copy."""
    await world.fo.create(FO_SET, {"LevelPhrase": "NEVER-1", "LevelDescription": "new"})
    created = ChangeEvent(template=LEVELS, side="fo", operation="create", key={"LevelPhrase": "NEVER-1"},
                          wire_format="fo-data-event")

    async def die_before_the_write(self: Engine, *args: Any, **kwargs: Any) -> None:
        raise Crash("worker killed after storing its intent, before the write")

    with monkeypatch.context() as patch:
        patch.setattr(Engine, "write_dataverse", die_before_the_write)
        with pytest.raises(Crash):
            await world.engine.process(created)
    assert (await world.engine.process(created)).reason == "conflict-deferred"

    recheck = ChangeEvent(template=LEVELS, side="fo", operation="create", key={"LevelPhrase": "NEVER-1"},
                          modified_on=utc_seconds(), wire_format="recheck")
    outcome = await world.engine.process(recheck, live=False)

    assert outcome.created == "dataverse"
    row = await world.dv_row("NEVER-1")
    assert row is not None and row["msdyn_description"] == "new"
