"""The sync step against both emulators in-process, with the in-memory state store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from devkit.sandbox import dataverse as dataverse_emulator
from devkit.sandbox import fno as fno_emulator
from loyaltysync.errors import MappingError, TargetError
from loyaltysync.events.model import ChangeEvent
from loyaltysync.state import MemoryStateStore
from loyaltysync.sync import Engine
from loyaltysync.targets.auth import StaticTokenCredential
from loyaltysync.targets.dataverse import DataverseClient
from loyaltysync.targets.fno import FnoClient
from loyaltysync.targets.lookups import LookupCache
from loyaltysync.templates import default_mappings_dir, load_templates

TOKEN = "sync-test-token"
OURS = dataverse_emulator.INTEGRATION_USER.systemuserid
TEMPLATES = load_templates(default_mappings_dir())


class World:
    def __init__(self) -> None:
        self.fo_app = fno_emulator.create_app(token=TOKEN, templates=TEMPLATES, public_url="http://fo.test")
        self.dv_app = dataverse_emulator.create_app(token=TOKEN, templates=TEMPLATES, public_url="http://dv.test")
        credential = StaticTokenCredential(TOKEN)
        self.fo = FnoClient("http://fo.test", credential, transport=httpx.ASGITransport(app=self.fo_app))
        self.dv = DataverseClient("http://dv.test", credential, transport=httpx.ASGITransport(app=self.dv_app))
        self.state = MemoryStateStore()
        self.engine = Engine(
            TEMPLATES, self.fo, self.dv, LookupCache(self.dv), self.state, integration_users=frozenset({OURS})
        )

    async def writes(self) -> tuple[int, int]:
        counts = []
        for app, base in ((self.fo_app, "http://fo.test"), (self.dv_app, "http://dv.test")):
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}
            ) as admin:
                counts.append((await admin.get("/_admin/stats")).json()["counters"]["writes"])
        return counts[0], counts[1]


@pytest.fixture
async def world() -> AsyncIterator[World]:
    w = World()
    yield w
    await w.fo.aclose()
    await w.dv.aclose()


def card(number: str, **changes: Any) -> dict[str, Any]:
    return {
        "CardNumber": number,
        "CardTenderType": "AsCardTender",
        "PartyNumber": "P-1",
        "OmOperatingUnitNumber": "S1",
        **changes,
    }


def event(side: str, number: str, **kw: Any) -> ChangeEvent:
    return ChangeEvent(
        template="loyalty-cards",
        side=side,
        operation=kw.pop("operation", "update"),  # type: ignore[arg-type]
        key={"CardNumber": number},
        **kw,
    )


async def test_fo_change_creates_then_updates_only_the_changed_field(world: World) -> None:
    await world.fo.create("RetailLoyaltyCards", card("S-1"))
    first = await world.engine.process(event("fo", "S-1", wire_format="fo-data-event"))
    assert first.reason == "created" and first.created == "dataverse"
    row = await world.dv.get_by_key("msdyn_loyaltycards", {"msdyn_cardnumber": "S-1"})
    assert row is not None and row["msdyn_partynumber"] == "P-1" and row["msdyn_cardtendertype"] == 806380000

    await world.fo.update("RetailLoyaltyCards", {"CardNumber": "S-1"}, {"PartyNumber": "P-2"})
    second = await world.engine.process(event("fo", "S-1", wire_format="fo-data-event"))
    assert second.reason == "changed" and second.writes == {"dataverse": ["PartyNumber"]}


async def test_our_own_write_coming_back_is_an_echo_and_writes_nothing(world: World) -> None:
    await world.fo.create("RetailLoyaltyCards", card("S-2"))
    await world.engine.process(event("fo", "S-2"))
    before = await world.writes()
    echo = await world.engine.process(
        event(
            "dataverse", "S-2", initiating_user=OURS, complete=True, fields={"CardNumber": "S-2", "PartyNumber": "P-1"}
        )
    )
    assert echo.reason == "echo"
    assert await world.writes() == before


async def test_a_stale_event_is_skipped_before_any_read(world: World) -> None:
    await world.fo.create("RetailLoyaltyCards", card("S-3"))
    await world.engine.process(event("fo", "S-3", source_version="500"))
    late = await world.engine.process(event("fo", "S-3", source_version="499"))
    duplicate = await world.engine.process(event("fo", "S-3", source_version="500"))
    assert late.reason == "stale" and duplicate.reason == "stale"


async def test_a_delete_with_only_a_row_id_finds_its_key_in_the_state(world: World) -> None:
    await world.fo.create("RetailLoyaltyCards", card("S-4"))
    await world.engine.process(event("fo", "S-4"))
    row = await world.dv.get_by_key("msdyn_loyaltycards", {"msdyn_cardnumber": "S-4"})
    assert row is not None
    await world.dv.delete_by_key("msdyn_loyaltycards", {"msdyn_cardnumber": "S-4"})
    gone = ChangeEvent(
        template="loyalty-cards", side="dataverse", operation="delete", key={}, row_id=row["msdyn_loyaltycardid"]
    )
    outcome = await world.engine.process(gone)
    assert outcome.reason == "deleted" and outcome.deleted == "fo"
    assert await world.fo.get("RetailLoyaltyCards", {"CardNumber": "S-4"}) is None


async def test_a_delete_carrying_the_version_already_applied_deletes(world: World) -> None:
    """A Delete's pre-image holds the row's last version, the one its last Update carried: not stale."""
    person = world.dv.as_caller(dataverse_emulator.AGENT_USER.azureactivedirectoryobjectid)
    await world.fo.create("RetailLoyaltyCards", card("S-9"))
    await world.engine.process(event("fo", "S-9"))
    await person.upsert("msdyn_loyaltycards", {"msdyn_cardnumber": "S-9"}, {"msdyn_partynumber": "P-9"}, mode="update")
    row = await world.dv.get_by_key("msdyn_loyaltycards", {"msdyn_cardnumber": "S-9"})
    assert row is not None
    version = str(row["versionnumber"])
    changed = await world.engine.process(event("dataverse", "S-9", source_version=version))
    assert changed.reason == "changed" and changed.writes == {"fo": ["PartyNumber"]}

    await person.delete_by_key("msdyn_loyaltycards", {"msdyn_cardnumber": "S-9"})
    gone = await world.engine.process(event("dataverse", "S-9", operation="delete", source_version=version))
    assert gone.reason == "deleted" and gone.deleted == "fo"
    assert await world.fo.get("RetailLoyaltyCards", {"CardNumber": "S-9"}) is None


async def test_a_late_delete_of_an_older_row_is_stale(world: World) -> None:
    person = world.dv.as_caller(dataverse_emulator.AGENT_USER.azureactivedirectoryobjectid)
    await world.fo.create("RetailLoyaltyCards", card("S-10"))
    await world.engine.process(event("fo", "S-10"))
    row = await world.dv.get_by_key("msdyn_loyaltycards", {"msdyn_cardnumber": "S-10"})
    assert row is not None
    await person.upsert(
        "msdyn_loyaltycards", {"msdyn_cardnumber": "S-10"}, {"msdyn_partynumber": "P-10"}, mode="update"
    )
    newer = await world.dv.get_by_key("msdyn_loyaltycards", {"msdyn_cardnumber": "S-10"})
    assert newer is not None
    await world.engine.process(event("dataverse", "S-10", source_version=str(newer["versionnumber"])))
    late = await world.engine.process(
        event("dataverse", "S-10", operation="delete", source_version=str(int(newer["versionnumber"]) - 1))
    )
    assert late.reason == "stale"
    assert await world.fo.get("RetailLoyaltyCards", {"CardNumber": "S-10"}) is not None


async def test_an_unknown_currency_is_a_mapping_error_naming_field_and_value(world: World) -> None:
    await world.fo.create(
        "RetailLoyaltyRewardPoints",
        {
            "RewardPointId": "GOLDBAR",
            "RewardPointType": "Amount",
            "Redeemable": "Yes",
            "RedeemRanking": 1,
            "RewardPointCurrency": "XAU",
            "MaximumLoyaltyRewardPoints": 5,
            "ExpirationTimeUnit": "Day",
            "ExpirationTimeValue": 1,
            "VestingTimeUnit": "Day",
            "VestingTimeValue": 1,
        },
    )
    points = ChangeEvent(
        template="loyalty-reward-points", side="fo", operation="create", key={"RewardPointId": "GOLDBAR"}
    )
    with pytest.raises(MappingError) as caught:
        await world.engine.process(points)
    assert caught.value.field == "RewardPointCurrency" and caught.value.value == "XAU"
    # Nothing was sent: the step's intent is gone, so a replay on any instance is not kept waiting for it.
    stored = await world.state.get("loyalty-reward-points", "GOLDBAR")
    assert stored is None or stored.intent is None


async def test_a_step_failing_after_its_request_leaves_an_ended_intent_another_instance_judges_at_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    await world.fo.create("RetailLoyaltyCards", card("E-1"))

    async def refused(*args: Any, **kwargs: Any) -> str:
        raise TargetError("dataverse", 500, "0x80040216", "An unexpected error occurred.")

    monkeypatch.setattr(world.dv, "upsert", refused)
    with pytest.raises(TargetError):
        await world.engine.process(event("fo", "E-1", operation="create", wire_format="fo-data-event"))
    stored = await world.state.get("loyalty-cards", "E-1")
    assert stored is not None and stored.intent is not None and stored.intent.ended
    assert set(stored.intent.sides) == {"dataverse"}  # the side a request went to: it may have landed
    monkeypatch.undo()
    other = Engine(TEMPLATES, world.fo, world.dv, LookupCache(world.dv), world.state,
                   integration_users=frozenset({OURS}))  # another instance, the default 10-minute horizon
    outcome = await other.process(event("fo", "E-1", operation="create", wire_format="fo-data-event"))
    assert outcome.reason == "conflict-deferred" and outcome.waiting is not None  # judged now: waits for evidence


async def test_concurrent_events_for_one_record_write_once(world: World) -> None:
    import asyncio

    await world.fo.create("RetailLoyaltyCards", card("S-5"))
    await world.engine.process(event("fo", "S-5"))
    await world.fo.update("RetailLoyaltyCards", {"CardNumber": "S-5"}, {"PartyNumber": "P-9"})
    before = await world.writes()
    outcomes = await asyncio.gather(*(world.engine.process(event("fo", "S-5")) for _ in range(5)))
    after = await world.writes()
    assert after[1] - before[1] == 1  # one Dataverse write, not five
    assert sorted(o.reason for o in outcomes) == ["changed", "no-change", "no-change", "no-change", "no-change"]


async def test_a_record_created_by_someone_else_meanwhile_is_decided_again(world: World) -> None:
    # Between our read (missing in Dataverse) and our create-only write, another writer creates the row:
    # Dataverse answers 412, the step re-runs from fresh reads and finds nothing left to do.
    await world.fo.create("RetailLoyaltyCards", card("S-6"))
    original = world.dv.upsert
    calls: list[str] = []

    async def someone_else_first(entity_set: str, key: Any, body: Any, **kw: Any) -> Any:
        calls.append(kw.get("mode", "upsert"))
        if len(calls) == 1:
            await original(entity_set, key, dict(body), mode="create", id_column=kw.get("id_column"))
        return await original(entity_set, key, body, **kw)

    world.dv.upsert = someone_else_first  # type: ignore[method-assign]
    outcome = await world.engine.process(event("fo", "S-6"))
    assert calls == ["create"]  # the 412 was not retried blindly as an update
    assert outcome.reason == "no-change"
    row = await world.dv.get_by_key("msdyn_loyaltycards", {"msdyn_cardnumber": "S-6"})
    assert row is not None and row["msdyn_partynumber"] == "P-1"
    record = await world.state.get("loyalty-cards", "S-6")
    assert record is not None and record.values["PartyNumber"] == "P-1"


async def test_fos_business_event_of_the_syncs_own_write_does_not_decide_an_open_conflict(world: World) -> None:
    # A business event names no fields: the event of the sync's own write to F&O dated F&O's whole record,
    # so F&O's older edit of a field whose conflict was still open beat Dataverse's later edit.
    await world.fo.create("RetailLoyaltyCards", card("S-9"))
    await world.engine.process(event("fo", "S-9", wire_format="fo-business-event", modified_on=_ago(60)))
    await world.fo.update("RetailLoyaltyCards", {"CardNumber": "S-9"}, {"CardTenderType": "Blocked"})
    await world.dv.upsert("msdyn_loyaltycards", {"msdyn_cardnumber": "S-9"},
                          {"msdyn_cardtendertype": 806380002, "msdyn_operatingunitnumber": "S2"}, mode="update")
    first = await world.engine.process(
        event("dataverse", "S-9", wire_format="dataverse-webhook", modified_on=_ago(30))
    )
    # F&O's edit has no time yet (its event is on its way): the tender type waits; the store is copied to F&O.
    assert first.writes == {"fo": ["OmOperatingUnitNumber"]}
    assert [(c["field"], c["winner"]) for c in first.conflicts] == [("CardTenderType", None)]

    own = await world.engine.process(event("fo", "S-9", wire_format="fo-business-event", modified_on=_ago(0)))
    assert "dataverse" not in own.writes
    assert [(c["field"], c["winner"]) for c in own.conflicts] == [("CardTenderType", None)]

    # An F&O event dated well after the sync's write is a person's: F&O's record changed then, so F&O's value
    # is the later one.
    later = await world.engine.process(event("fo", "S-9", wire_format="fo-business-event", modified_on=_ago(-10)))
    assert later.writes == {"dataverse": ["CardTenderType"]}


def _ago(seconds: float) -> str:
    moment = datetime.now(UTC) - timedelta(seconds=seconds)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


async def test_a_late_webhooks_payload_never_overwrites_a_later_edit_on_its_own_side(world: World) -> None:
    # The payload is Dataverse's row as of its change: enough to copy that change to F&O. A write back to
    # Dataverse decided on it undid the agent's later edit (the simulator found it); that is decided on a read.
    await world.fo.create("RetailLoyaltyCards", card("S-10"))
    await world.engine.process(event("fo", "S-10", wire_format="fo-business-event", modified_on=_ago(60)))
    # The echo of the sync's create: read, so payloads count again (P4).
    await world.engine.process(event("dataverse", "S-10", wire_format="dataverse-webhook", modified_on=_ago(59)))
    dv_key = {"msdyn_cardnumber": "S-10"}
    await world.dv.upsert("msdyn_loyaltycards", dv_key, {"msdyn_partynumber": "P-9"}, mode="update")
    payload = {**card("S-10"), "PartyNumber": "P-9"}  # the webhook of that edit, still on its way
    await world.fo.update("RetailLoyaltyCards", {"CardNumber": "S-10"}, {"CardTenderType": "NoTender"})
    await world.dv.upsert("msdyn_loyaltycards", dv_key, {"msdyn_cardtendertype": 806380001}, mode="update")

    late = await world.engine.process(
        event("dataverse", "S-10", wire_format="dataverse-webhook", modified_on=_ago(30), complete=True,
              fields=payload)
    )
    row = await world.dv.get_by_key("msdyn_loyaltycards", dv_key)
    assert row is not None and row["msdyn_cardtendertype"] == 806380001  # the agent's AsContactTender stays
    assert "dataverse" not in late.writes
    fo_row = await world.fo.get("RetailLoyaltyCards", {"CardNumber": "S-10"})
    assert fo_row is not None and fo_row["PartyNumber"] == "P-9"


def test_the_modifiedon_of_another_row_than_the_one_the_sync_wrote_is_a_persons() -> None:
    # A row deleted and created again by a person (T8) is not the sync's write, whatever the times say.
    from loyaltysync.decide import SideRecord
    from loyaltysync.state import SyncRecord
    from loyaltysync.sync import _without_own_write_time

    record = SyncRecord("loyalty-cards", "S-11", values=card("S-11"), dataverse_written_at="2026-01-05T08:10:53.800Z",
                        modified={"dataverse": "2026-01-05T08:01:40Z"}, row_id="row-1")
    own = SideRecord(values=card("S-11"), modified_on="2026-01-05T08:10:53Z", row_id="row-1")
    assert _without_own_write_time(own, record).modified_on == "2026-01-05T08:01:40Z"  # the last person's time
    anew = replace(own, row_id="row-2")
    assert _without_own_write_time(anew, record).modified_on == "2026-01-05T08:10:53Z"
