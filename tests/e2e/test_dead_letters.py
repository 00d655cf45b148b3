"""A record that cannot be mapped is parked with its reason, does not block others, and replays once fixed."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from devkit.sandbox.dataverse import CURRENCY_IDS

if TYPE_CHECKING:
    from tests.e2e.conftest import E2E

pytestmark = pytest.mark.e2e

CARDS, POINTS = "loyalty-cards", "loyalty-reward-points"
FO_POINTS, FO_CARDS = "RetailLoyaltyRewardPoints", "RetailLoyaltyCards"
GOLD = "XAU"  # an ISO 4217 code the Dataverse emulator does not seed


def _point(key: str, currency: str) -> dict[str, object]:
    return {
        "RewardPointId": key,
        "RewardPointType": "Amount",
        "Redeemable": "Yes",
        "RedeemRanking": 5,
        "RewardPointCurrency": currency,
        "MaximumLoyaltyRewardPoints": 50,
        "ExpirationTimeUnit": "Year",
        "ExpirationTimeValue": 2,
        "VestingTimeUnit": "Day",
        "VestingTimeValue": 1,
    }


async def test_poisoned_record_is_parked_then_replayed_after_the_fix(e2e: E2E) -> None:
    assert GOLD not in CURRENCY_IDS
    poisoned = e2e.key("GOLD")
    await e2e.fo.create(FO_POINTS, _point(poisoned, GOLD))

    async def parked_reasons() -> list[str]:
        return [d.reason for d in await e2e.runtime.dead_letters.list(POINTS) if d.key == poisoned]

    reasons = await e2e.eventually(parked_reasons, bool, f"{poisoned} to be parked")
    assert len(reasons) == 1 and "RewardPointCurrency" in reasons[0] and repr(GOLD) in reasons[0]
    listed = (await e2e.ops_status())["templates"][POINTS]
    assert listed["dead_letters"] >= 1
    entry = next(d for d in listed["dead_letter_reasons"] if d["key"] == poisoned)
    assert entry["side"] == "fo" and "RewardPointCurrency" in entry["reason"] and GOLD in entry["reason"]
    assert await e2e.dv_row(POINTS, poisoned) is None

    # Not blocked: other records of the same template and of others keep syncing meanwhile.
    fine_point, fine_card = e2e.key("FINE"), e2e.key("FINE")
    await e2e.fo.create(FO_POINTS, _point(fine_point, "EUR"))
    await e2e.fo.create(FO_CARDS, {"CardNumber": fine_card, "PartyNumber": "P-OK"})
    await e2e.dv_has(POINTS, fine_point, {"RewardPointCurrency": "EUR"})
    await e2e.dv_has(CARDS, fine_card, {"PartyNumber": "P-OK"})
    await e2e.fo.update(FO_POINTS, {"RewardPointId": fine_point}, {"RedeemRanking": 9})
    await e2e.dv_has(POINTS, fine_point, {"RedeemRanking": 9})

    # Fix the cause in Dataverse, then replay through the admin endpoint.
    added = await e2e.dv_admin.post(
        "/_admin/tables/transactioncurrencies/rows",
        json={
            "rows": [
                {
                    "isocurrencycode": GOLD,
                    "currencyname": "Gold (troy ounce)",
                    "currencysymbol": "XAU",
                    "exchangerate": 0.0004,
                    "currencyprecision": 2,
                }
            ]
        },
    )
    assert added.status_code == 200, added.text
    gold_id = await e2e.dv.find_id("transactioncurrencies", "transactioncurrencyid", {"isocurrencycode": GOLD})
    assert gold_id is not None

    replayed = await e2e.app.post(
        "/api/ops/replay", params={"template": POINTS}, headers={"x-functions-key": e2e.admin_key}
    )
    assert replayed.status_code == 200, replayed.text
    assert replayed.json()["replayed"] >= 1

    async def currency_id() -> object:
        row = await e2e.dv_row(POINTS, poisoned)
        return None if row is None else row["_msdyn_rewardpointcurrency_value"]

    await e2e.eventually(currency_id, lambda value: value == gold_id, f"{poisoned} in Dataverse bound to {GOLD}")
    await e2e.dv_has(POINTS, poisoned, {k: v for k, v in _point(poisoned, GOLD).items() if k != "RewardPointCurrency"})
    await e2e.settle()
    assert await parked_reasons() == []
    assert (await e2e.ops_status())["templates"][POINTS]["dead_letters"] == 0
