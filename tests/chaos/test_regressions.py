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

from devkit.sandbox import dataverse as dataverse_emulator
from devkit.sandbox import fno as fno_emulator
from devkit.sandbox.dataverse import AGENT_USER, INTEGRATION_USER
from loyaltysync.errors import TargetError
from loyaltysync.events.model import ChangeEvent
from loyaltysync.intent import Intent, SideIntent
from loyaltysync.retries import Deferral
from loyaltysync.state import MemoryStateStore
from loyaltysync.sync import RECORD_BUSY, Engine
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

    async def both_hold(self, phrase: str, description: str) -> bool:
        """Whether the level has `description` on both sides."""
        row = await self.dv_row(phrase)
        return await self.fo_description(phrase) == description and row is not None and (
            row["msdyn_description"] == description
        )

    async def agent_delete(self, phrase: str) -> ChangeEvent:
        """An agent's delete in Dataverse and the delete webhook event it raises (row id, no version)."""
        row = await self.dv_row(phrase)
        assert row is not None
        assert await self.agent.delete_by_key(DV_SET, {"msdyn_levelphrase": phrase})
        return ChangeEvent(template=LEVELS, side="dataverse", operation="delete", key={"LevelPhrase": phrase},
                           row_id=row["msdyn_loyaltylevelid"], initiating_user=AGENT_USER.systemuserid)

    async def gone(self, phrase: str) -> bool:
        """Whether the level is missing on both sides."""
        return await self.fo_description(phrase) is None and await self.dv_row(phrase) is None

    async def agent_create(self, phrase: str, description: str) -> ChangeEvent:
        """An agent's new level in Dataverse and the create webhook event it raises (row id, version, time)."""
        await self.agent.upsert(DV_SET, {"msdyn_levelphrase": phrase}, {"msdyn_description": description})
        row = await self.dv_row(phrase)
        assert row is not None
        return ChangeEvent(template=LEVELS, side="dataverse", operation="create", key={"LevelPhrase": phrase},
                           row_id=row["msdyn_loyaltylevelid"], source_version=str(row["versionnumber"]),
                           modified_on=row["modifiedon"], initiating_user=AGENT_USER.systemuserid)

    async def agent_edit(self, phrase: str, description: str) -> ChangeEvent:
        """An agent's edit in Dataverse and the complete webhook event it raises (payload, version, time,
        and the pre-image: the row just before the edit)."""
        key, body = {"msdyn_levelphrase": phrase}, {"msdyn_description": description}
        was = await self.dv_row(phrase)
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
            before={"LevelPhrase": phrase, "LevelDescription": was["msdyn_description"]} if was else {},
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
    # Another instance's intent counts as "being written" for WRITING_ELSEWHERE (functionTimeout in production).
    # A re-check here stands for one made after its wait (the grace plus the queue's lease): no event is held.
    engine = Engine(
        templates, fo, dv, LookupCache(dv), state, integration_users=frozenset({INTEGRATION_USER.systemuserid}),
        writing_elsewhere_s=WRITING_ELSEWHERE, events_held_s=0,
    )
    yield World(engine, fo, dv, dv.as_caller(AGENT_USER.azureactivedirectoryobjectid), state)
    await fo.aclose()
    await dv.aclose()


async def synced_level(world: World, phrase: str, description: str) -> None:
    """A level created in F&O and copied to Dataverse by the engine, with sync state, and the webhook of
    that copy processed (an echo: it re-reads Dataverse after the sync's write)."""
    await world.fo.create(FO_SET, {"LevelPhrase": phrase, "LevelDescription": description})
    created = ChangeEvent(template=LEVELS, side="fo", operation="create", key={"LevelPhrase": phrase},
                          wire_format="fo-data-event")
    outcome = await world.engine.process(created)
    assert outcome.created == "dataverse"
    row = await world.dv_row(phrase)
    assert row is not None
    echo = ChangeEvent(template=LEVELS, side="dataverse", operation="create", key={"LevelPhrase": phrase},
                       row_id=row["msdyn_loyaltylevelid"], source_version=str(row["versionnumber"]),
                       modified_on=row["modifiedon"], initiating_user=INTEGRATION_USER.systemuserid)
    assert (await world.engine.process(echo)).reason == "echo"


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
    deleted = await world.agent_delete("LATE-1")
    assert (await world.engine.process(deleted)).deleted == "fo"

    outcome = await world.engine.process(late)

    assert outcome.created is None, f"the late webhook re-created the record: {outcome}"
    assert await world.gone("LATE-1")


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

    recheck = ChangeEvent(template=LEVELS, side="dataverse", operation="update", key={"LevelPhrase": "OLDER-FO"})
    outcome = await world.engine.process(recheck, live=False, deferral=Deferral(utc_seconds()))

    assert outcome.writes == {"fo": ["LevelDescription"]}
    assert [c["winner"] for c in outcome.conflicts] == ["dataverse"]
    assert await world.fo_description("OLDER-FO") == "agent, last"
    state = await world.state.get(LEVELS, "OLDER-FO")
    assert state is not None and state.values["LevelDescription"] == "agent, last" and state.intent is None


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


async def _crash_before_write(
    world: World, monkeypatch: pytest.MonkeyPatch, event: ChangeEvent, owner: object, method: str
) -> None:
    """Process `event` in a worker that dies after storing its intent, before `owner.method` writes."""

    async def die_before_the_write(*args: Any, **kwargs: Any) -> None:
        raise Crash("worker killed after storing its intent, before the write")

    with monkeypatch.context() as patch:
        patch.setattr(owner, method, die_before_the_write)
        with pytest.raises(Crash):
            await world.engine.process(event)


async def _crash_before_state(world: World, monkeypatch: pytest.MonkeyPatch, event: ChangeEvent) -> None:
    """Process `event` in a worker that dies after its target writes, before storing the sync state."""

    async def die_before_state(self: Engine, *args: Any, **kwargs: Any) -> None:
        raise Crash("worker killed between the target write and the state update")

    with monkeypatch.context() as patch:
        patch.setattr(Engine, "_record", die_before_state)
        with pytest.raises(Crash):
            await world.engine.process(event)


async def _delete_in_fo_and_crash_in_dataverse(
    world: World, monkeypatch: pytest.MonkeyPatch, phrase: str
) -> ChangeEvent:
    """F&O deletes a synced level; the worker deletes it in Dataverse and dies before storing the tombstone."""
    await synced_level(world, phrase, "first life")
    await world.fo.delete(FO_SET, {"LevelPhrase": phrase})
    deleted = ChangeEvent(template=LEVELS, side="fo", operation="delete", key={"LevelPhrase": phrase},
                          modified_on=utc_seconds(), wire_format="fo-data-event")
    await _crash_before_state(world, monkeypatch, deleted)
    assert await world.dv_row(phrase) is None  # the delete reached Dataverse before the crash
    return deleted


async def test_a_record_recreated_after_a_crashed_delete_is_copied_not_deleted(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chaos run (a real process kill): F&O deletes a level; the worker deletes it in Dataverse and dies
    before storing the tombstone. F&O re-creates the level. With the state still saying "exists on both
    sides", F&O present and Dataverse missing read as "deleted in Dataverse", and the re-created level
    was deleted in F&O too: lost on both sides."""
    deleted = await _delete_in_fo_and_crash_in_dataverse(world, monkeypatch, "GONE-1")

    await world.fo.create(FO_SET, {"LevelPhrase": "GONE-1", "LevelDescription": "second life"})
    recreated = ChangeEvent(template=LEVELS, side="fo", operation="create", key={"LevelPhrase": "GONE-1"},
                            wire_format="fo-data-event")
    for event in (recreated, deleted):  # the re-create's event, then the crashed message again
        await world.engine.process(event)

    assert await world.both_hold("GONE-1", "second life")


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
    assert await world.gone("TWICE-1")


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
    recheck = ChangeEvent(template=LEVELS, side="dataverse", operation="update", key={"LevelPhrase": "AFTER-1"})
    deferral = Deferral(utc_seconds(), fields={c["field"]: c["fo"] for c in deferred.conflicts if c["winner"] is None})
    assert deferral.fields == {"LevelDescription": "fo, early"}
    await asyncio.sleep(1.1)
    await world.fo.update(FO_SET, {"LevelPhrase": "AFTER-1"}, {"LevelDescription": "fo, last"})

    outcome = await world.engine.process(recheck, live=False, deferral=deferral)

    assert [c["winner"] for c in outcome.conflicts] == ["fo"]
    assert await world.both_hold("AFTER-1", "fo, last")


async def test_a_step_waits_for_another_instances_write_in_flight(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chaos run (two instances): instance A copies a new Dataverse level to F&O; while its F&O write is
    in flight, the agent deletes the level and instance B takes the delete webhook. B read F&O (not
    written yet) and Dataverse (gone), stored a tombstone over A's intent, and A's re-run then found F&O
    (its own write) and the tombstone, and created the level in Dataverse again. B now waits for A."""
    other = Engine(world.engine.templates, world.fo, world.dv, LookupCache(world.dv), world.state,
                   integration_users=world.engine.integration_users, writing_elsewhere_s=5, events_held_s=0)
    await world.agent.create(DV_SET, {"msdyn_levelphrase": "RACE-1", "msdyn_description": "new"})
    row = await world.dv_row("RACE-1")
    assert row is not None
    created = ChangeEvent(template=LEVELS, side="dataverse", operation="create", key={"LevelPhrase": "RACE-1"},
                          fields={"LevelPhrase": "RACE-1", "LevelDescription": "new"}, complete=True,
                          row_id=row["msdyn_loyaltylevelid"], source_version=str(row["versionnumber"]),
                          modified_on=row["modifiedon"], initiating_user=AGENT_USER.systemuserid)
    gate, writing = asyncio.Event(), asyncio.Event()
    write = world.fo.create_new

    async def slow_write(*args: Any, **kwargs: Any) -> Any:
        writing.set()
        await gate.wait()
        return await write(*args, **kwargs)

    monkeypatch.setattr(world.fo, "create_new", slow_write)
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
    assert await world.gone("RACE-1")


async def test_a_record_busy_for_longer_than_the_pauses_is_retried_later_not_parked(world: World) -> None:
    """Another instance's fresh intent that does not clear in time: the step gives up with a transient
    error (the queue redelivers the message later), never a permanent one that would park the record."""
    other = Engine(world.engine.templates, world.fo, world.dv, LookupCache(world.dv), world.state,
                   integration_users=world.engine.integration_users, writing_elsewhere_s=60, events_held_s=0)
    await synced_level(world, "BUSY-1", "a")
    record = await world.state.get(LEVELS, "BUSY-1")
    assert record is not None
    foreign = Intent({"fo": SideIntent("write", {"LevelDescription": "b"})}, at=utc_seconds(), by="another-instance")
    await world.state.put(replace(record, intent=foreign))
    event = ChangeEvent(template=LEVELS, side="fo", operation="update", key={"LevelPhrase": "BUSY-1"},
                        wire_format="fo-data-event")

    with pytest.raises(TargetError) as raised:
        await other.process(event)
    assert raised.value.transient and raised.value.code == RECORD_BUSY
    assert raised.value.retry_after is not None and 50 < raised.value.retry_after <= 60  # when to look again


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
    deleted = await world.agent_delete("QUICK-1")

    again = await world.engine.process(created)  # the crashed message first: it cannot tell yet
    assert again.created is None and again.reason == "conflict-deferred"
    assert await world.dv_row("QUICK-1") is None
    outcome = await world.engine.process(deleted)  # the delete event says the copy existed

    assert outcome.deleted == "fo"
    assert await world.gone("QUICK-1")


async def test_a_crashed_create_that_never_landed_is_made_by_the_recheck(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other reading of the same intent: the worker died before the create reached Dataverse. No
    delete event will come; the re-check (not live) takes "never happened" and creates the copy."""
    await world.fo.create(FO_SET, {"LevelPhrase": "NEVER-1", "LevelDescription": "new"})
    created = ChangeEvent(template=LEVELS, side="fo", operation="create", key={"LevelPhrase": "NEVER-1"},
                          wire_format="fo-data-event")
    await _crash_before_write(world, monkeypatch, created, Engine, "write_dataverse")
    assert (await world.engine.process(created)).reason == "conflict-deferred"

    recheck = ChangeEvent(template=LEVELS, side="fo", operation="create", key={"LevelPhrase": "NEVER-1"})
    outcome = await world.engine.process(recheck, live=False, deferral=Deferral(utc_seconds()))

    assert outcome.created == "dataverse"
    row = await world.dv_row("NEVER-1")
    assert row is not None and row["msdyn_description"] == "new"


async def test_a_record_recreated_in_dataverse_after_a_crashed_delete_is_copied_not_deleted(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chaos run (a real process kill, seed 41): F&O deletes a card; the worker deletes it in Dataverse and
    dies before storing the tombstone. An agent creates the card again in Dataverse. Its create event found
    the intent "delete in Dataverse" and a Dataverse row, took the delete for one that never happened, and
    deleted the agent's new card: lost on both sides. The new row's id proves the delete landed."""
    deleted = await _delete_in_fo_and_crash_in_dataverse(world, monkeypatch, "AGAIN-1")

    recreated = await world.agent_create("AGAIN-1", "second life")
    for event in (recreated, deleted):  # the re-create's event, then the crashed message again
        await world.engine.process(event)

    assert await world.both_hold("AGAIN-1", "second life")


async def _delete_in_dataverse_and_crash_in_fo(world: World, monkeypatch: pytest.MonkeyPatch, phrase: str,
                                               *, landed: bool) -> ChangeEvent:
    """An agent deletes a synced level; the worker dies after (`landed`) or before deleting it in F&O."""
    await synced_level(world, phrase, "first life")
    row = await world.dv_row(phrase)
    assert row is not None
    assert await world.agent.delete_by_key(DV_SET, {"msdyn_levelphrase": phrase})
    deleted = ChangeEvent(template=LEVELS, side="dataverse", operation="delete", key={"LevelPhrase": phrase},
                          row_id=row["msdyn_loyaltylevelid"], initiating_user=AGENT_USER.systemuserid)
    if landed:
        await _crash_before_state(world, monkeypatch, deleted)
    else:
        await _crash_before_write(world, monkeypatch, deleted, world.fo, "delete")
    assert (await world.fo_description(phrase) is None) == landed
    return deleted


async def test_a_record_recreated_in_fo_after_a_crashed_delete_waits_for_its_create_event(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The F&O mirror of the case above, where no row id tells one row from another: the crashed message,
    delivered again before the re-create's event, sees an F&O row changed since the step read it (a new
    row, or the old one edited) and waits; the create event, later than the intent, proves a new row."""
    deleted = await _delete_in_dataverse_and_crash_in_fo(world, monkeypatch, "AGAIN-2", landed=True)
    await asyncio.sleep(2.1)  # clearly later than the intent: the clocks may be a second apart
    await world.fo.create(FO_SET, {"LevelPhrase": "AGAIN-2", "LevelDescription": "second life"})

    again = await world.engine.process(deleted)
    assert again.reason == "conflict-deferred" and again.deleted is None
    recreated = ChangeEvent(template=LEVELS, side="fo", operation="create", key={"LevelPhrase": "AGAIN-2"},
                            modified_on=utc_seconds(), wire_format="fo-data-event")
    outcome = await world.engine.process(recreated)

    assert outcome.created == "dataverse"
    row = await world.dv_row("AGAIN-2")
    assert row is not None and row["msdyn_description"] == "second life"
    assert await world.fo_description("AGAIN-2") == "second life"


async def test_an_fo_edit_racing_a_crashed_delete_that_never_landed_is_deleted_by_the_recheck(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other reading: the worker died before the F&O delete, and an F&O user edited the level. The
    crashed message waits as above; no create event comes; the re-check (not live) takes "the delete never
    happened", and an edit racing a delete does not bring the record back."""
    deleted = await _delete_in_dataverse_and_crash_in_fo(world, monkeypatch, "RACE-2", landed=False)
    await world.fo.update(FO_SET, {"LevelPhrase": "RACE-2"}, {"LevelDescription": "edited in F&O"})

    assert (await world.engine.process(deleted)).reason == "conflict-deferred"
    assert await world.fo_description("RACE-2") == "edited in F&O"
    outcome = await world.engine.process(deleted, live=False, deferral=Deferral(utc_seconds()))

    assert outcome.deleted == "fo"
    assert await world.gone("RACE-2")


async def test_an_untouched_record_after_a_crash_before_its_delete_is_deleted_at_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An F&O row unchanged since the crashed step read it (same ETag) was not deleted by it: the
    message delivered again deletes it without waiting."""
    deleted = await _delete_in_dataverse_and_crash_in_fo(world, monkeypatch, "STILL-1", landed=False)

    outcome = await world.engine.process(deleted)

    assert outcome.deleted == "fo"
    assert await world.fo_description("STILL-1") is None


async def test_a_late_delete_event_older_than_a_crashed_create_does_not_delete_the_record(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chaos run (real process kills): F&O deletes a level; the worker deletes it in Dataverse and dies; an
    agent creates it again, and the worker that takes the agent's create event dies before creating it in
    F&O. F&O's delete event, delivered late, was then taken for proof that the interrupted create had
    landed in F&O and been deleted, and the agent's new level was deleted: lost. A delete older than the
    intent proves nothing about it; the re-check creates the level."""
    fo_deleted = await _delete_in_fo_and_crash_in_dataverse(world, monkeypatch, "LATE-2")
    await asyncio.sleep(1.1)  # the agent's create comes in a later second than F&O's delete

    recreated = await world.agent_create("LATE-2", "second life")
    await _crash_before_write(world, monkeypatch, recreated, world.fo, "create_new")

    late = await world.engine.process(fo_deleted)
    assert late.reason == "conflict-deferred" and late.deleted is None
    assert await world.dv_row("LATE-2") is not None
    outcome = await world.engine.process(recreated, live=False, deferral=Deferral(utc_seconds()))

    assert outcome.created == "fo"
    assert await world.both_hold("LATE-2", "second life")


async def test_the_event_of_the_syncs_own_fo_write_does_not_date_older_fo_edits(world: World) -> None:
    """Chaos run: F&O edited one field, then an agent edited the same field later in Dataverse; before F&O's
    own event came, the engine wrote another field to F&O. The event of that write (F&O events name no user)
    carried a time later than the agent's edit and was taken as F&O's time: F&O's older edit won."""
    await synced_level(world, "ECHO-1", "a")
    await world.fo.update(FO_SET, {"LevelPhrase": "ECHO-1"}, {"LevelDescription": "from F&O"})
    fo_edit_time = utc_seconds()
    await asyncio.sleep(1.1)
    agent_edit = await world.agent_edit("ECHO-1", "from the agent")
    await asyncio.sleep(1.1)
    # The event of a sync write to F&O: it submitted a field that holds the agreed value now.
    echo = ChangeEvent(template=LEVELS, side="fo", operation="update", key={"LevelPhrase": "ECHO-1"},
                       modified_on=utc_seconds(), wire_format="fo-data-event", changed=["LevelPhrase"])

    first = await world.engine.process(agent_edit)  # conflict: F&O's time not known yet, so it waits
    assert first.reason == "conflict-deferred"
    assert (await world.engine.process(echo)).reason == "conflict-deferred"  # an echo: no time for F&O
    fo_event = replace(echo, modified_on=fo_edit_time, changed=["LevelDescription"])
    assert (await world.engine.process(fo_event)).reason == "conflict-deferred"  # older than the agent's
    deferral = Deferral(utc_seconds(), fields={"LevelDescription": "from F&O"})
    outcome = await world.engine.process(agent_edit, live=False, deferral=deferral)

    assert outcome.writes == {"fo": ["LevelDescription"]}
    assert await world.fo_description("ECHO-1") == "from the agent"


async def test_a_webhook_payload_older_than_the_syncs_own_write_is_not_taken_as_current(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chaos run: an agent's edit landed in Dataverse between a step's read there and its write. The edit's
    webhook (a later version than the read, so not stale) carried the row as of the edit, without the
    sync's write made after it; taken as Dataverse's current row, it was copied to F&O, while Dataverse kept
    the sync's value: the sides differed for good. Such a payload is now re-read."""
    await synced_level(world, "PAYLOAD-1", "a")
    await world.fo.update(FO_SET, {"LevelPhrase": "PAYLOAD-1"}, {"LevelDescription": "from F&O"})
    fo_event = ChangeEvent(template=LEVELS, side="fo", operation="update", key={"LevelPhrase": "PAYLOAD-1"},
                           modified_on=utc_seconds(), wire_format="fo-data-event", changed=["LevelDescription"])
    write = Engine.write_dataverse
    edits: list[ChangeEvent] = []

    async def agent_edits_in_between(self: Engine, *args: Any, **kwargs: Any) -> str | None:
        edits.append(await world.agent_edit("PAYLOAD-1", "from the agent"))
        return await write(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Engine, "write_dataverse", agent_edits_in_between)
        assert (await world.engine.process(fo_event)).writes == {"dataverse": ["LevelDescription"]}
    row = await world.dv_row("PAYLOAD-1")
    assert row is not None and row["msdyn_description"] == "from F&O"  # the sync's write came last

    outcome = await world.engine.process(edits[0])

    assert outcome.writes == {}
    assert await world.fo_description("PAYLOAD-1") == "from F&O"


CARDS_FO, CARDS_DV = "RetailLoyaltyCards", "msdyn_loyaltycards"


async def synced_card(world: World, number: str) -> None:
    """A card created in F&O and copied to Dataverse by the engine, with sync state."""
    await world.fo.create(CARDS_FO, {"CardNumber": number, "CardTenderType": "AsCardTender", "PartyNumber": "P-0"})
    created = ChangeEvent(template="loyalty-cards", side="fo", operation="create", key={"CardNumber": number},
                          wire_format="fo-data-event")
    assert (await world.engine.process(created)).created == "dataverse"


async def fo_card_update(world: World, number: str, values: dict[str, Any]) -> ChangeEvent:
    """An F&O user's edit of a card and the data event it raises (naming the fields it submitted)."""
    await world.fo.update(CARDS_FO, {"CardNumber": number}, values)
    return ChangeEvent(template="loyalty-cards", side="fo", operation="update", key={"CardNumber": number},
                       modified_on=utc_seconds(), wire_format="fo-data-event", changed=list(values))


async def card_rows(world: World, number: str) -> tuple[dict[str, Any], dict[str, Any]]:
    fo = await world.fo.get(CARDS_FO, {"CardNumber": number})
    dv = await world.dv.get_by_key(CARDS_DV, {"msdyn_cardnumber": number})
    assert fo is not None and dv is not None
    return fo, dv


async def test_an_fo_edit_of_another_field_does_not_date_an_older_fo_edit(world: World) -> None:
    """Chaos run: F&O changed a card's party, an agent changed the party later in Dataverse, then F&O
    changed another field. Processed first, the event of that last change gave F&O a time later than the
    agent's edit for the whole record, and F&O's older party won. F&O's update events name the fields
    they submitted: each event now dates its own fields only."""
    await synced_card(world, "FIELD-1")
    fo_party = await fo_card_update(world, "FIELD-1", {"PartyNumber": "P-FO"})
    await asyncio.sleep(1.1)
    await world.agent.upsert(CARDS_DV, {"msdyn_cardnumber": "FIELD-1"}, {"msdyn_partynumber": "P-AGENT"}, mode="update")
    await asyncio.sleep(1.1)
    fo_other = await fo_card_update(world, "FIELD-1", {"ReplacementCardNumber": "R-FO"})

    first = await world.engine.process(fo_other)  # the later F&O event comes first
    assert [c["winner"] for c in first.conflicts] == [None]  # the party waits for F&O's time
    assert (await world.engine.process(fo_party)).reason == "conflict-deferred"  # older than the agent's
    await world.engine.process(fo_party, live=False, deferral=Deferral(utc_seconds(), fields={"PartyNumber": "P-FO"}))

    fo, dv = await card_rows(world, "FIELD-1")
    assert (fo["PartyNumber"], fo["ReplacementCardNumber"]) == ("P-AGENT", "R-FO")
    assert (dv["msdyn_partynumber"], dv["msdyn_replacementcardnumber"]) == ("P-AGENT", "R-FO")


async def test_the_syncs_own_dataverse_write_does_not_date_an_older_agent_edit(world: World) -> None:
    """Chaos run: an agent changed a card's party, F&O changed it later, and the sync then wrote another
    field to Dataverse. Dataverse's `modifiedon` (one per row) became the time of that write, later than
    F&O's edit, and the agent's older party won. The sync's own write no longer dates Dataverse's fields:
    the time of the person's change seen before it does."""
    await synced_card(world, "OWN-1")
    await asyncio.sleep(1.1)  # Dataverse's times are whole seconds: the agent's edit is after the copy's second
    await world.agent.upsert(CARDS_DV, {"msdyn_cardnumber": "OWN-1"}, {"msdyn_partynumber": "P-AGENT"}, mode="update")
    await asyncio.sleep(1.1)
    fo_party = await fo_card_update(world, "OWN-1", {"PartyNumber": "P-FO"})
    await asyncio.sleep(1.1)
    fo_other = await fo_card_update(world, "OWN-1", {"OmOperatingUnitNumber": "S-FO"})

    first = await world.engine.process(fo_other)  # writes S-FO to Dataverse; the party waits for F&O's time
    assert first.writes == {"dataverse": ["OmOperatingUnitNumber"]}
    outcome = await world.engine.process(fo_party)

    assert [c["winner"] for c in outcome.conflicts] == ["fo"]
    fo, dv = await card_rows(world, "OWN-1")
    assert (fo["PartyNumber"], fo["OmOperatingUnitNumber"]) == ("P-FO", "S-FO")
    assert (dv["msdyn_partynumber"], dv["msdyn_operatingunitnumber"]) == ("P-FO", "S-FO")


async def test_a_record_created_by_a_person_after_a_crashed_create_is_copied_not_deleted(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chaos run (real process kills): the worker copying a new F&O level to Dataverse died before the
    write; F&O deleted the level; an agent created it in Dataverse. The intent "create in Dataverse" and a
    Dataverse row read as "the create landed", so the level counted as agreed on both sides, missing in
    F&O, and the agent's level was deleted. A create event later than the intent, not the sync's, with
    other values than the intent's, is a person's new record."""
    await world.fo.create(FO_SET, {"LevelPhrase": "NEW-2", "LevelDescription": "from F&O"})
    created = ChangeEvent(template=LEVELS, side="fo", operation="create", key={"LevelPhrase": "NEW-2"},
                          modified_on=utc_seconds(), wire_format="fo-data-event")
    await _crash_before_write(world, monkeypatch, created, Engine, "write_dataverse")
    await world.fo.delete(FO_SET, {"LevelPhrase": "NEW-2"})
    fo_deleted = replace(created, operation="delete", modified_on=utc_seconds())
    assert (await world.engine.process(fo_deleted)).reason == "both-missing"  # gone either way
    await asyncio.sleep(1.1)

    outcome = await world.engine.process(await world.agent_create("NEW-2", "from the agent"))

    assert outcome.created == "fo"
    assert await world.both_hold("NEW-2", "from the agent")


async def test_a_copy_that_finds_a_record_created_meanwhile_does_not_overwrite_it(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chaos run: a step read an agent's new level (missing in F&O) and created it in F&O; its POST came
    after an F&O user had created the same level. The create that found the record turned into an update
    and overwrote the F&O user's values with the agent's older ones. Now the step decides again."""
    created = await world.agent_create("BOTH-1", "from the agent")
    await asyncio.sleep(1.1)
    create_new = world.fo.create_new
    fo_created: list[ChangeEvent] = []

    async def fo_user_first(*args: Any, **kwargs: Any) -> bool:
        await world.fo.create(FO_SET, {"LevelPhrase": "BOTH-1", "LevelDescription": "from F&O"})
        fo_created.append(ChangeEvent(template=LEVELS, side="fo", operation="create", key={"LevelPhrase": "BOTH-1"},
                                      modified_on=utc_seconds(), wire_format="fo-data-event"))
        return await create_new(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(world.fo, "create_new", fo_user_first)
        outcome = await world.engine.process(created)
    assert outcome.created is None and outcome.reason == "conflict-deferred"  # F&O's time: in its event
    assert await world.fo_description("BOTH-1") == "from F&O"  # not overwritten

    decided = await world.engine.process(fo_created[0])

    assert [(c["field"], c["winner"]) for c in decided.conflicts] == [("LevelDescription", "fo")]  # the later
    row = await world.dv_row("BOTH-1")
    assert row is not None and row["msdyn_description"] == "from F&O"


async def test_a_value_put_back_after_a_crashed_copy_is_a_change(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chaos run (real process kills): F&O changed a level ("a" to "b"); the worker copied "b" to Dataverse
    and died before storing the state; an agent then put "a" back in Dataverse. Dataverse held the agreed
    "a" again, so it looked unchanged and F&O's older "b" was copied over the agent's later edit. The
    webhook of the sync's own write carries "b": proof the copy landed, so "a" is the agent's change."""
    await synced_level(world, "ABA-1", "a")
    await world.fo.update(FO_SET, {"LevelPhrase": "ABA-1"}, {"LevelDescription": "b"})
    fo_event = ChangeEvent(template=LEVELS, side="fo", operation="update", key={"LevelPhrase": "ABA-1"},
                           modified_on=utc_seconds(), wire_format="fo-data-event", changed=["LevelDescription"])
    await _crash_before_state(world, monkeypatch, fo_event)
    row = await world.dv_row("ABA-1")
    assert row is not None and row["msdyn_description"] == "b"
    echo = ChangeEvent(template=LEVELS, side="dataverse", operation="update", key={"LevelPhrase": "ABA-1"},
                       fields={"LevelPhrase": "ABA-1", "LevelDescription": "b"}, complete=True,
                       row_id=row["msdyn_loyaltylevelid"], source_version=str(row["versionnumber"]),
                       modified_on=row["modifiedon"], initiating_user=INTEGRATION_USER.systemuserid)
    await asyncio.sleep(1.1)
    await world.agent_edit("ABA-1", "a")

    outcome = await world.engine.process(echo)  # the webhook of the crashed step's write

    assert outcome.writes == {"fo": ["LevelDescription"]}
    assert await world.fo_description("ABA-1") == "a"


async def test_a_late_payload_after_a_crashed_delete_does_not_bring_the_record_back(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chaos run (real process kills): an agent edited a level, then deleted it; the worker deleted it in
    F&O and died before storing the tombstone. The edit's webhook, late, carried the row as it was before
    the delete: taken as Dataverse's current row, with F&O gone by the sync's intent (a tombstone), it
    read as a new record and the level was created again in F&O. With an intent left, payloads are
    re-read."""
    await synced_level(world, "PAY-2", "a")
    late = await world.agent_edit("PAY-2", "edited just before the delete")
    deleted = await world.agent_delete("PAY-2")
    await _crash_before_state(world, monkeypatch, deleted)
    assert await world.fo_description("PAY-2") is None  # the delete reached F&O before the crash

    outcome = await world.engine.process(late)

    assert outcome.created is None
    assert await world.gone("PAY-2")


async def _copied_then_crashed(world: World, monkeypatch: pytest.MonkeyPatch, phrase: str) -> ChangeEvent:
    """A level agreed as "a"; F&O changes it to "b"; the worker copies "b" to Dataverse and dies before
    storing the state. Returns F&O's event (its message is delivered again later)."""
    await synced_level(world, phrase, "a")
    await world.fo.update(FO_SET, {"LevelPhrase": phrase}, {"LevelDescription": "b"})
    fo_event = ChangeEvent(template=LEVELS, side="fo", operation="update", key={"LevelPhrase": phrase},
                           modified_on=utc_seconds(), wire_format="fo-data-event", changed=["LevelDescription"])
    await _crash_before_state(world, monkeypatch, fo_event)
    row = await world.dv_row(phrase)
    assert row is not None and row["msdyn_description"] == "b"
    await asyncio.sleep(1.1)
    return fo_event


async def test_a_value_put_back_after_a_crashed_copy_is_a_change_by_the_agents_pre_image(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chaos run (real process kills, seed 62): as above, but the agent's webhook is processed before the
    webhook of the sync's own write. Its pre-image (the row just before the agent's edit) holds "b": the
    copy had landed, and "a" is the agent's later change."""
    await _copied_then_crashed(world, monkeypatch, "ABA-2")
    edit = await world.agent_edit("ABA-2", "a")
    assert edit.before["LevelDescription"] == "b"

    outcome = await world.engine.process(edit)

    assert outcome.writes == {"fo": ["LevelDescription"]}
    assert await world.both_hold("ABA-2", "a")


async def test_the_crashed_message_waits_for_dataverse_events_when_its_copy_was_changed_since(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The crashed F&O message, delivered again before any Dataverse webhook: Dataverse holds "a" and
    a newer row version than the step read. The copy never landed and an agent edited the row, or it
    landed and the agent put "a" back: only Dataverse's events tell, so nothing is written yet."""
    fo_event = await _copied_then_crashed(world, monkeypatch, "ABA-3")
    edit = await world.agent_edit("ABA-3", "a")

    again = await world.engine.process(fo_event)
    assert again.reason == "conflict-deferred" and not again.applied
    assert await world.fo_description("ABA-3") == "b"
    row = await world.dv_row("ABA-3")
    assert row is not None and row["msdyn_description"] == "a"  # the agent's value is not overwritten

    outcome = await world.engine.process(edit)

    assert outcome.writes == {"fo": ["LevelDescription"]}
    assert await world.both_hold("ABA-3", "a")


async def test_a_value_put_back_in_fo_after_a_crashed_copy_is_a_change(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same in the other direction: an agent's "b" is copied to F&O and the worker dies before
    storing the state; an F&O user puts "a" back. F&O's event names the field and is later than the
    step's intent: F&O's "a" is a person's change made after the copy, not the agreed value."""
    await synced_level(world, "ABA-4", "a")
    edit = await world.agent_edit("ABA-4", "b")
    await _crash_before_state(world, monkeypatch, edit)
    assert await world.fo_description("ABA-4") == "b"
    await asyncio.sleep(2.1)  # clearly later than the intent: the clocks may be a second apart
    await world.fo.update(FO_SET, {"LevelPhrase": "ABA-4"}, {"LevelDescription": "a"})
    put_back = ChangeEvent(template=LEVELS, side="fo", operation="update", key={"LevelPhrase": "ABA-4"},
                           modified_on=utc_seconds(), wire_format="fo-data-event", changed=["LevelDescription"])

    outcome = await world.engine.process(put_back)

    assert outcome.writes == {"dataverse": ["LevelDescription"]}
    assert await world.both_hold("ABA-4", "a")


async def test_a_row_an_agent_created_after_a_crashed_create_is_theirs_whichever_event_comes_first(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chaos run (real process kills, seed 63): as in the test above of a record created by a person
    after a crashed create, but the first Dataverse event processed is the agent's update, not the
    create: "a row there after an intent to create it" read as "the create landed", and the agent's
    level was deleted for F&O's delete. The row's creator tells: only the sync creates as its user."""
    await world.fo.create(FO_SET, {"LevelPhrase": "NEW-3", "LevelDescription": "from F&O"})
    created = ChangeEvent(template=LEVELS, side="fo", operation="create", key={"LevelPhrase": "NEW-3"},
                          modified_on=utc_seconds(), wire_format="fo-data-event")
    await _crash_before_write(world, monkeypatch, created, Engine, "write_dataverse")
    await world.fo.delete(FO_SET, {"LevelPhrase": "NEW-3"})  # its event comes late
    await asyncio.sleep(1.1)
    await world.agent_create("NEW-3", "from the agent")

    outcome = await world.engine.process(await world.agent_edit("NEW-3", "edited by the agent"))

    assert outcome.created == "fo" and outcome.deleted is None
    assert await world.both_hold("NEW-3", "edited by the agent")


async def test_a_record_gone_on_both_sides_after_a_crashed_create_is_a_tombstone_at_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chaos run (real process kills): the worker copying an agent's new reward level to F&O died before
    the create; the agent deleted the level. The delete event found it missing on both sides but waited
    for an F&O delete event ("the create may have landed and been deleted"). An F&O user then created the
    level anew, and the re-check read that row as the interrupted create having landed: agreed on both
    sides, missing in Dataverse, so it deleted the F&O user's new record. Gone on both sides, the record
    is gone whatever the create did: nothing to wait for."""
    created = await world.agent_create("GONE-1", "from the agent")
    await _crash_before_write(world, monkeypatch, created, Engine, "write_fo")
    deleted = await world.agent_delete("GONE-1")

    outcome = await world.engine.process(deleted)
    assert outcome.reason == "both-missing" and not outcome.conflicts
    await asyncio.sleep(1.1)
    await world.fo.create(FO_SET, {"LevelPhrase": "GONE-1", "LevelDescription": "from F&O"})
    recheck = replace(deleted, operation="update")

    again = await world.engine.process(recheck, live=False, deferral=Deferral(utc_seconds()))

    assert again.created == "dataverse" and again.deleted is None
    assert await world.both_hold("GONE-1", "from F&O")


async def test_a_value_changed_after_a_crashed_create_is_a_change_against_the_created_values(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chaos run (real process kills, seed 68): a level was deleted (its tombstone remembers "old"); an
    F&O user created it anew with "new"; the worker copied it to Dataverse and died before storing the
    state; an agent then set "old" in Dataverse. The crashed message, delivered again, merged the landed
    create into the tombstone's values: Dataverse's "old" looked unchanged, and F&O's "new" overwrote the
    agent's later edit. A landed create means the row held all its created values."""
    await synced_level(world, "TOMB-1", "old")
    assert (await world.engine.process(await world.agent_delete("TOMB-1"))).deleted == "fo"
    await asyncio.sleep(1.1)
    await world.fo.create(FO_SET, {"LevelPhrase": "TOMB-1", "LevelDescription": "new"})
    created = ChangeEvent(template=LEVELS, side="fo", operation="create", key={"LevelPhrase": "TOMB-1"},
                          modified_on=utc_seconds(), wire_format="fo-data-event")
    await _crash_before_state(world, monkeypatch, created)
    await asyncio.sleep(1.1)
    await world.agent_edit("TOMB-1", "old")

    outcome = await world.engine.process(created)  # the crashed message, before any Dataverse webhook

    assert outcome.writes == {"fo": ["LevelDescription"]}
    assert await world.both_hold("TOMB-1", "old")


async def test_the_recheck_of_a_late_delete_event_does_not_prove_a_crashed_create_landed(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chaos run (real process kills, seed 71): an agent deleted a level (the sync deleted it in F&O), then
    created it again; the worker copying the new level to F&O died before the create. F&O's event of the
    sync's own delete, late, is older than that intent: it waits. Its re-check carried the moment of the
    deferral as its time, which is later than the intent, so it read as "F&O deleted the record after the
    create landed" and deleted the agent's new level. A re-check's time dates no change."""
    await synced_level(world, "REC-1", "a")
    assert (await world.engine.process(await world.agent_delete("REC-1"))).deleted == "fo"
    fo_deleted = ChangeEvent(template=LEVELS, side="fo", operation="delete", key={"LevelPhrase": "REC-1"},
                             modified_on=utc_seconds(), wire_format="fo-data-event")  # of the sync's own delete
    await asyncio.sleep(1.1)
    created = await world.agent_create("REC-1", "new")
    await _crash_before_write(world, monkeypatch, created, Engine, "write_fo")
    assert (await world.engine.process(fo_deleted)).reason == "conflict-deferred"
    await asyncio.sleep(1.1)
    outcome = await world.engine.process(fo_deleted, live=False, deferral=Deferral(utc_seconds()))

    assert outcome.deleted is None and outcome.created == "fo"
    assert await world.both_hold("REC-1", "new")
