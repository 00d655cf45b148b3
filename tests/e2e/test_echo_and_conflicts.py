"""No echo loops (counted with the emulators' write counters), concurrent edits and the conflict policies."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from loyaltysync.templates import default_mappings_dir

if TYPE_CHECKING:
    from tests.e2e.conftest import E2E, Observed

pytestmark = pytest.mark.e2e

CARDS = "loyalty-cards"
FO_CARDS, DV_CARDS = "RetailLoyaltyCards", "msdyn_loyaltycards"


async def _new_card(e2e: E2E) -> str:
    """A card created in F&O that has arrived in Dataverse."""
    key = e2e.key("ECH")
    await e2e.fo.create(FO_CARDS, {"CardNumber": key, "PartyNumber": "P-0", "OmOperatingUnitNumber": "S-0"})
    await e2e.dv_has(CARDS, key, {"PartyNumber": "P-0", "OmOperatingUnitNumber": "S-0"})
    return key


async def _writes_after_settling(e2e: E2E) -> dict[str, int]:
    await e2e.settle()
    return {side: counters["writes"] for side, counters in (await e2e.counters()).items()}


async def test_one_write_to_the_other_side_per_change_and_none_after_settling(e2e: E2E) -> None:
    key = await _new_card(e2e)
    await e2e.settle()

    # An F&O change: our own F&O write plus exactly one Dataverse write; the webhook of that
    # Dataverse write comes back and must not cause a write anywhere.
    await e2e.reset_counters()
    await e2e.fo.update(FO_CARDS, {"CardNumber": key}, {"PartyNumber": "P-FO"})
    await e2e.dv_has(CARDS, key, {"PartyNumber": "P-FO"})
    assert await _writes_after_settling(e2e) == {"fo": 1, "dataverse": 1}
    await asyncio.sleep(2)  # long enough for a late echo to be picked up by the 1 s queue polling
    assert await _writes_after_settling(e2e) == {"fo": 1, "dataverse": 1}

    # A Dataverse change by an agent: the agent's write plus exactly one F&O write.
    await e2e.reset_counters()
    await e2e.agent.upsert(DV_CARDS, {"msdyn_cardnumber": key}, {"msdyn_partynumber": "P-DV"}, mode="update")
    await e2e.fo_has(CARDS, key, {"PartyNumber": "P-DV"})
    assert await _writes_after_settling(e2e) == {"fo": 1, "dataverse": 1}
    await asyncio.sleep(2)
    assert await _writes_after_settling(e2e) == {"fo": 1, "dataverse": 1}

    # A change of two fields at once is still one write.
    await e2e.reset_counters()
    await e2e.fo.update(FO_CARDS, {"CardNumber": key}, {"PartyNumber": "P-FO2", "OmOperatingUnitNumber": "S-FO2"})
    await e2e.dv_has(CARDS, key, {"PartyNumber": "P-FO2", "OmOperatingUnitNumber": "S-FO2"})
    assert await _writes_after_settling(e2e) == {"fo": 1, "dataverse": 1}


async def test_concurrent_edits_of_different_fields_both_survive(e2e: E2E) -> None:
    key = await _new_card(e2e)
    await asyncio.gather(
        e2e.fo.update(FO_CARDS, {"CardNumber": key}, {"PartyNumber": "P-FO"}),
        e2e.agent.upsert(DV_CARDS, {"msdyn_cardnumber": key}, {"msdyn_operatingunitnumber": "S-DV"}, mode="update"),
    )
    both = {"PartyNumber": "P-FO", "OmOperatingUnitNumber": "S-DV"}
    await e2e.fo_has(CARDS, key, both)
    await e2e.dv_has(CARDS, key, both)
    await e2e.settle()
    assert await e2e.fo_values(CARDS, key) == await e2e.dv_values(CARDS, key)


async def test_records_held_before_the_sync_keep_both_edits_of_different_fields(e2e: E2E) -> None:
    """No sync state yet (both sides had the card before the sync was deployed): the update webhook's
    pre-image tells which field the agent changed, so the F&O user's later edit of another field does
    not carry F&O's old value of the agent's field back over it."""
    key = e2e.key("PRE")
    fo_row = {"CardNumber": key, "PartyNumber": "P-0", "OmOperatingUnitNumber": "S-0"}
    (await e2e.fo_admin.post(f"/_admin/entities/{FO_CARDS}/rows", json={"rows": [fo_row]})).raise_for_status()
    dv_row = e2e.dv_body(CARDS, fo_row)
    (await e2e.dv_admin.post(f"/_admin/tables/{DV_CARDS}/rows", json={"rows": [dv_row]})).raise_for_status()
    assert await e2e.runtime.state.get(CARDS, key) is None

    await e2e.agent.upsert(DV_CARDS, {"msdyn_cardnumber": key}, {"msdyn_operatingunitnumber": "S-AGENT"}, mode="update")
    await asyncio.sleep(1.1)  # the F&O edit is the later one, and comes before any conflict re-check
    await e2e.fo.update(FO_CARDS, {"CardNumber": key}, {"PartyNumber": "P-FO"})

    both = {"PartyNumber": "P-FO", "OmOperatingUnitNumber": "S-AGENT"}
    await e2e.dv_has(CARDS, key, both)
    await e2e.settle()
    assert await e2e.fo_values(CARDS, key) == await e2e.dv_values(CARDS, key)
    assert {k: (await e2e.fo_values(CARDS, key) or {})[k] for k in both} == both


async def _edit_both_while_paused(e2e: E2E, fo_first: str, dv_first: str) -> None:
    """Edit OmOperatingUnitNumber on both sides of two cards while the template is paused, so both
    events of each card are pending together. Round 0: F&O edits `fo_first`, Dataverse `dv_first`
    (values S-FO-0 / S-DV-0); a second later, round 1: the other side of each (S-DV-1 / S-FO-1)."""

    async def fo_edit(key: str, value: str) -> None:
        await e2e.fo.update(FO_CARDS, {"CardNumber": key}, {"OmOperatingUnitNumber": value})

    async def dv_edit(key: str, value: str) -> None:
        await e2e.agent.upsert(DV_CARDS, {"msdyn_cardnumber": key}, {"msdyn_operatingunitnumber": value}, mode="update")

    await e2e.runtime.set_paused(CARDS, True, "e2e: hold events so both edits are pending")
    try:
        await asyncio.gather(fo_edit(fo_first, "S-FO-0"), dv_edit(dv_first, "S-DV-0"))
        await asyncio.sleep(1.1)  # last-writer-wins compares modified times; make "later" unambiguous
        await asyncio.gather(dv_edit(fo_first, "S-DV-1"), fo_edit(dv_first, "S-FO-1"))
        await asyncio.sleep(1.0)  # the events reach the queue and are held
    finally:
        await e2e.runtime.set_paused(CARDS, False)


def _decided(observed: Observed, key: str) -> set[tuple[str, str | None]]:
    return {(c["field"], c["winner"]) for c in observed.conflicts(CARDS, key) if c["winner"] is not None}


async def test_same_field_conflict_last_writer_wins(e2e: E2E, observed: Observed) -> None:
    fo_first, dv_first = await _new_card(e2e), await _new_card(e2e)
    await e2e.settle()
    await _edit_both_while_paused(e2e, fo_first, dv_first)
    # fo_first: F&O edited first, Dataverse a second later -> Dataverse's value wins; dv_first the reverse.
    for key, winner in ((fo_first, "S-DV-1"), (dv_first, "S-FO-1")):
        await e2e.fo_has(CARDS, key, {"OmOperatingUnitNumber": winner})
        await e2e.dv_has(CARDS, key, {"OmOperatingUnitNumber": winner})
    await e2e.settle()
    for key, winner in ((fo_first, "S-DV-1"), (dv_first, "S-FO-1")):
        assert (await e2e.fo_values(CARDS, key) or {})["OmOperatingUnitNumber"] == winner
        assert (await e2e.dv_values(CARDS, key) or {})["OmOperatingUnitNumber"] == winner
    # Both edits were pending together, so the engine saw (and settled) a real conflict.
    assert _decided(observed, fo_first) == {("OmOperatingUnitNumber", "dataverse")}
    assert _decided(observed, dv_first) == {("OmOperatingUnitNumber", "fo")}


async def test_same_field_conflict_fo_wins_policy(
    separate_stack: Callable[..., AbstractAsyncContextManager[E2E]], tmp_path: Path, observed: Observed
) -> None:
    """A test-only copy of the cards template with conflict_policy fo-wins, on a stack of its own."""
    template = json.loads((default_mappings_dir() / f"{CARDS}.json").read_text(encoding="utf-8"))
    template["conflict_policy"] = "fo-wins"
    (tmp_path / f"{CARDS}.json").write_text(json.dumps(template), encoding="utf-8")
    async with separate_stack(templates_dir=tmp_path) as world:
        assert world.template(CARDS).conflict_policy == "fo-wins"
        fo_first, dv_first = await _new_card(world), await _new_card(world)
        await world.settle()
        await _edit_both_while_paused(world, fo_first, dv_first)
        # F&O wins whichever edit was later: round 1 for dv_first, round 0 for fo_first.
        for key, winner in ((fo_first, "S-FO-0"), (dv_first, "S-FO-1")):
            await world.fo_has(CARDS, key, {"OmOperatingUnitNumber": winner})
            await world.dv_has(CARDS, key, {"OmOperatingUnitNumber": winner})
        await world.settle()
        for key, winner in ((fo_first, "S-FO-0"), (dv_first, "S-FO-1")):
            assert (await world.fo_values(CARDS, key) or {})["OmOperatingUnitNumber"] == winner
            assert (await world.dv_values(CARDS, key) or {})["OmOperatingUnitNumber"] == winner
            assert {c["rule"] for c in observed.conflicts(CARDS, key)} == {"fo-wins"}
            assert _decided(observed, key) == {("OmOperatingUnitNumber", "fo")}
