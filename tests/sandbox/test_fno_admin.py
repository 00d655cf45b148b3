"""Contract tests of the F&O emulator's control surface: throttling, injected faults, seeding, settings, memory."""

from __future__ import annotations

import random
import tracemalloc
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette

from devkit.sandbox.common import Faults
from devkit.sandbox.fno import create_app
from devkit.sandbox.fno.dataset import FnoData
from devkit.sandbox.fno.schema import build_catalog

TOKEN = "fno-test-token"
BASE = "https://fno.test"
THROTTLED = "This request could not be processed at this time due to system experiencing high resource utilization."


@pytest.fixture
async def app() -> Starlette:
    return create_app(token=TOKEN, seed=1, public_url=BASE)


@pytest.fixture
async def fo(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE,
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield client


async def test_priority_throttling_answers_429_with_retry_after(fo: httpx.AsyncClient) -> None:
    patched = await fo.patch("/_admin/throttling", json={"active": True, "retry_after_s": 7, "remaining": 2})
    assert patched.json() == {"active": True, "retry_after_s": 7, "remaining": 2}
    for _ in range(2):
        throttled = await fo.get("/data/RetailLoyaltyCards")
        assert throttled.status_code == 429
        assert throttled.headers["Retry-After"] == "7"
        assert throttled.json()["error"]["message"] == THROTTLED
    assert (await fo.get("/_admin/throttling")).json() == {"active": False, "retry_after_s": 7, "remaining": 0}
    assert (await fo.get("/data/RetailLoyaltyCards")).status_code == 200  # the burst is over
    stats = (await fo.get("/_admin/stats")).json()
    assert stats["counters"]["throttled"] == 2
    assert (await fo.patch("/_admin/throttling", json={"retry_after_s": -1})).status_code == 400


async def test_injected_faults_use_the_fo_error_shapes() -> None:
    app = create_app(token=TOKEN, seed=1, faults=Faults(throttle_rate=1.0, throttle_retry_after_s=3))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE,
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        throttled = await client.get("/data/LoyaltyLevels")
        assert throttled.status_code == 429 and throttled.headers["Retry-After"] == "3"
        assert throttled.json()["error"]["message"] == THROTTLED
        assert (await client.patch("/_admin/faults", json={"throttle_rate": 0, "outage": True})).status_code == 200
        down = await client.get("/data/LoyaltyLevels")
        assert down.status_code == 503 and "error" in down.json()


async def test_bulk_seeding_is_all_or_nothing_and_raises_no_events(fo: httpx.AsyncClient) -> None:
    rows = [{"RewardPointId": f"P-{i}", "RewardPointType": "Amount"} for i in range(50)]
    bad = await fo.post("/_admin/entities/RetailLoyaltyRewardPoints/rows",
                        json=[*rows, {"RewardPointId": "P-X", "Redeemable": "Maybe"}])
    assert bad.status_code == 400 and "row 50" in bad.json()["error"]
    assert (await fo.get("/data/RetailLoyaltyRewardPoints/$count")).text == "0"
    duplicate = await fo.post("/_admin/entities/RetailLoyaltyRewardPoints/rows", json=[*rows, rows[0]])
    assert duplicate.status_code == 400 and "already exists" in duplicate.json()["error"]
    ok = await fo.post("/_admin/entities/RetailLoyaltyRewardPoints/rows", json={"rows": rows})
    assert ok.json() == {"entity_set": "RetailLoyaltyRewardPoints", "inserted": 50, "rows": 50}
    listed = (await fo.get("/_admin/entities")).json()["entity_sets"]
    assert listed["RetailLoyaltyRewardPoints"]["rows"] == 50
    assert listed["RetailLoyaltyCards"]["virtual_table"] == "mserp_retailloyaltycardentity"
    assert (await fo.get("/data/RetailLoyaltyRewardPoints('P-3')")).json()["RewardPointType"] == "Amount"
    assert (await fo.delete("/_admin/entities/RetailLoyaltyRewardPoints/rows")).json() == {"deleted": 50}
    assert (await fo.get("/data/RetailLoyaltyRewardPoints/$count")).text == "0"
    assert (await fo.post("/_admin/entities/Nope/rows", json=[])).status_code == 404
    stats = (await fo.get("/_admin/stats")).json()
    assert stats["pending_deliveries"] == 0 and stats["counters"]["deliveries"] == 0


async def test_settings_change_paging_and_the_default_company(fo: httpx.AsyncClient) -> None:
    settings = (await fo.get("/_admin/settings")).json()
    assert settings == {"max_page_size": 10_000, "event_retry_pause_s": 1.0, "default_company": "usrt"}
    await fo.post("/_admin/entities/LoyaltyLevels/rows", json=[{"LevelPhrase": f"L{i}"} for i in range(5)])
    patched = await fo.patch("/_admin/settings", json={"max_page_size": 2, "event_retry_pause_s": 0.01})
    assert patched.json()["max_page_size"] == 2
    page = (await fo.get("/data/LoyaltyLevels")).json()
    assert len(page["value"]) == 2 and "$skiptoken=2" in page["@odata.nextLink"]
    assert (await fo.patch("/_admin/settings", json={"max_page_size": 0})).status_code == 400
    assert (await fo.patch("/_admin/settings", json={"unknown": 1})).status_code == 400


def test_a_million_loyalty_cards_fit_in_memory() -> None:
    """Measure the bytes one realistic card row costs and extrapolate to a million rows."""
    data = FnoData(build_catalog(None), default_company="usrt", rng=random.Random(1))
    entity = data.catalog.entities["RetailLoyaltyCards"]
    rows = [
        {"CardNumber": f"CARD-{i:010d}", "CardTenderType": "AsCardTender", "PartyNumber": f"{i:09d}",
         "OmOperatingUnitNumber": "012", "LoyaltyEnrollmentDate": f"2026-01-{1 + i % 28:02d}T08:00:00Z"}
        for i in range(10_000)
    ]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    data.seed(entity, rows)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    per_row = used / len(rows)
    assert per_row * 1_000_000 < 1.0 * 2**30, f"{per_row:.0f} bytes per row"
