"""Delivery faults and an outage: duplicated and reordered events, and 30 s of Dataverse being down."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import pytest

from devkit.sandbox.dataverse import AGENT_USER

if TYPE_CHECKING:
    from tests.e2e.conftest import E2E

pytestmark = pytest.mark.e2e

CARDS = "loyalty-cards"
FO_CARDS, DV_CARDS = "RetailLoyaltyCards", "msdyn_loyaltycards"
OUTAGE_S = 30.0


async def _synced_cards(e2e: E2E, prefix: str, count: int) -> list[str]:
    keys = [e2e.key(prefix) for _ in range(count)]
    for key in keys:
        await e2e.fo.create(FO_CARDS, {"CardNumber": key, "PartyNumber": "P-0"})
    await asyncio.gather(*(e2e.dv_has(CARDS, key, {"PartyNumber": "P-0"}) for key in keys))
    await e2e.settle()
    return keys


async def test_duplicated_and_reordered_deliveries(faults: E2E) -> None:
    e2e = faults
    from_fo, from_dv = await _synced_cards(e2e, "DUP", 2)
    new = e2e.key("DUP")
    for server in (e2e.stack.fo, e2e.stack.dataverse):
        await e2e.set_faults(server, delivery_duplicate_rate=1.0, delivery_reorder=True)
    await e2e.reset_counters()

    # Bursts on both sides, no waiting in between: every event is sent twice, in random order.
    await e2e.fo.create(FO_CARDS, {"CardNumber": new, "PartyNumber": "N-0"})
    fo_changes = 1
    for i in range(1, 4):
        await e2e.fo.update(FO_CARDS, {"CardNumber": new}, {"PartyNumber": f"N-{i}"})
        await e2e.fo.update(FO_CARDS, {"CardNumber": from_fo}, {"PartyNumber": f"F-{i}"})
        fo_changes += 2
    dv_changes = 0
    for i in range(1, 4):
        await e2e.agent.upsert(DV_CARDS, {"msdyn_cardnumber": from_dv}, {"msdyn_partynumber": f"D-{i}"}, mode="update")
        dv_changes += 1

    await asyncio.gather(
        e2e.dv_has(CARDS, new, {"PartyNumber": "N-3"}),
        e2e.dv_has(CARDS, from_fo, {"PartyNumber": "F-3"}),
        e2e.fo_has(CARDS, from_dv, {"PartyNumber": "D-3"}),
    )
    await e2e.settle()
    await asyncio.sleep(1.5)  # a late duplicate must not undo anything
    await e2e.settle()
    for key, value in ((new, "N-3"), (from_fo, "F-3"), (from_dv, "D-3")):
        fo_values, dv_values = await e2e.fo_values(CARDS, key), await e2e.dv_values(CARDS, key)
        assert fo_values is not None and fo_values["PartyNumber"] == value
        assert fo_values == dv_values

    counters = await e2e.counters()
    assert counters["fo"]["deliveries_duplicated"] >= fo_changes
    assert counters["dataverse"]["deliveries_duplicated"] >= dv_changes
    # Writes bounded: at most one write to the other side per real change, duplicates or not.
    synced_to_fo = counters["fo"]["writes"] - fo_changes
    synced_to_dv = await e2e.writes_by("dataverse", "application")
    assert await e2e.writes_by("dataverse", AGENT_USER.azureactivedirectoryobjectid) == dv_changes
    assert 1 <= synced_to_fo <= dv_changes
    assert 1 <= synced_to_dv <= fo_changes


async def test_dataverse_outage_of_30_s_loses_nothing(faults: E2E) -> None:
    """F&O keeps changing while Dataverse answers 503 to everything for 30 s.

    Recovery path: the worker's back-off (docs/retries.md). Each failed attempt (the client's
    own retries exhausted) puts the change back on its queue for 5, 10, 20, ... s with the
    default settings, so nothing may be parked; tests/e2e/test_long_faults.py has faults
    longer than the queue's own retry ever reached.
    """
    e2e = faults
    keys = await _synced_cards(e2e, "OUT", 4)
    created = e2e.key("OUT")
    await e2e.reset_counters()

    started = time.monotonic()
    await e2e.set_faults(e2e.stack.dataverse, outage=True)
    try:
        for key in keys:
            await e2e.fo.update(FO_CARDS, {"CardNumber": key}, {"PartyNumber": "P-DURING"})
        await e2e.fo.create(FO_CARDS, {"CardNumber": created, "PartyNumber": "P-NEW"})
        await asyncio.sleep(OUTAGE_S / 2)
        await e2e.fo.update(FO_CARDS, {"CardNumber": keys[0]}, {"OmOperatingUnitNumber": "S-LATE"})
        await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - started)))
        during = await e2e.counters()
        assert during["dataverse"]["writes"] == 0
        assert during["dataverse"]["errors_injected"] > 0, "the worker should have hit the outage"
    finally:
        await e2e.set_faults(e2e.stack.dataverse, outage=False)

    await asyncio.gather(
        *(e2e.dv_has(CARDS, key, {"PartyNumber": "P-DURING"}, seconds=60) for key in keys),
        e2e.dv_has(CARDS, created, {"PartyNumber": "P-NEW"}, seconds=60),
        e2e.dv_has(CARDS, keys[0], {"OmOperatingUnitNumber": "S-LATE"}, seconds=60),
    )
    await e2e.settle()
    for key in (*keys, created):
        assert await e2e.fo_values(CARDS, key) == await e2e.dv_values(CARDS, key)
    parked = [d for d in await e2e.runtime.dead_letters.list(CARDS) if d.key in (*keys, created)]
    assert parked == []
    status = (await e2e.ops_status())["templates"][CARDS]
    assert status["poison_backlog"] == 0
    assert status["backlog"] == 0
