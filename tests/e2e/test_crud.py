"""Create, update of every mapped field, and delete, for each template in each direction; lookups; one-way fields.

Each change is made on one side through that side's own API and must show up on
the other side through the whole pipeline (events -> function app -> queue ->
worker -> target API). Expected values on the other side are the template's
own value maps and the emulator's currency ids, not values read from the engine.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest

from devkit.sandbox.dataverse import CURRENCY_IDS
from loyaltysync.templates import Side

if TYPE_CHECKING:
    from tests.e2e.conftest import E2E, Observed

pytestmark = pytest.mark.e2e

CARDS, LEVELS, POINTS = "loyalty-cards", "loyalty-levels", "loyalty-reward-points"
PREFIX = {CARDS: "CRD", LEVELS: "LVL", POINTS: "RP"}

# Per template: the values a new record is created with, then one new value per mapped
# field, each sent as its own update (F&O property names and F&O values).
SCENARIOS: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {
    CARDS: (
        {
            "CardTenderType": "AsCardTender",
            "PartyNumber": "P-100",
            "ReplacementCardNumber": "R-100",
            "OmOperatingUnitNumber": "S-100",
            "LoyaltyEnrollmentDate": "2026-01-15T10:00:00Z",
            "LoyaltyEnrollmentDateLocal": "2026-01-15T02:00:00Z",
        },
        [
            {"CardTenderType": "Blocked"},
            {"PartyNumber": "P-200"},
            {"ReplacementCardNumber": "R-200"},
            {"OmOperatingUnitNumber": "S-200"},
            {"LoyaltyEnrollmentDate": "2026-02-01T08:30:00Z"},
            {"LoyaltyEnrollmentDateLocal": "2026-02-01T00:30:00Z"},
        ],
    ),
    LEVELS: ({"LevelDescription": "Entry level"}, [{"LevelDescription": "Frequent buyer"}]),
    POINTS: (
        {
            "RewardPointType": "Quantity",
            "Redeemable": "Yes",
            "RedeemRanking": 1,
            "RewardPointCurrency": "USD",
            "MaximumLoyaltyRewardPoints": 100.25,
            "ExpirationTimeUnit": "Year",
            "ExpirationTimeValue": 1,
            "VestingTimeUnit": "Day",
            "VestingTimeValue": 30,
        },
        [
            {"RewardPointType": "Amount"},
            {"Redeemable": "No"},
            {"RedeemRanking": 7},
            {"RewardPointCurrency": "GBP"},
            {"MaximumLoyaltyRewardPoints": 2500.5},
            {"ExpirationTimeUnit": "Month"},
            {"ExpirationTimeValue": 18},
            {"VestingTimeUnit": "Year"},
            {"VestingTimeValue": 2},
        ],
    ),
}


def _flows(e2e: E2E, template: str, values: dict[str, Any], to: Side) -> dict[str, Any]:
    """Only the fields the template sends in direction `to`."""
    fields = {f.fo for f in e2e.template(template).fields if f.flows_to(to)}
    return {k: v for k, v in values.items() if k in fields}


async def _fo_to_dataverse(e2e: E2E, template: str, observed: Observed) -> None:
    t = e2e.template(template)
    key = e2e.key(PREFIX[template])
    created, updates = SCENARIOS[template]
    await e2e.fo.create(t.fo.entity_set, {t.fo.keys[0]: key, **created})
    await e2e.dv_has(template, key, {t.fo.keys[0]: key, **created})
    for change in updates:
        await e2e.fo.update(t.fo.entity_set, {t.fo.keys[0]: key}, change)
        await e2e.dv_has(template, key, change)
    await e2e.fo.delete(t.fo.entity_set, {t.fo.keys[0]: key})
    await e2e.eventually(lambda: e2e.dv_row(template, key), lambda row: row is None, f"{template} {key} deleted")
    await e2e.settle()
    # The data events came as RemoteExecutionContext (the stack subscribes data events).
    assert {e.wire_format for e in observed.events(template, key, "fo")} == {"fo-data-event"}
    assert observed.parked(template, key) == []


async def _dataverse_to_fo(e2e: E2E, template: str, observed: Observed) -> None:
    t = e2e.template(template)
    key = e2e.key(PREFIX[template])
    created, updates = SCENARIOS[template]
    created = _flows(e2e, template, created, "fo")
    await e2e.agent.create(t.dataverse.entity_set, e2e.dv_body(template, {t.fo.keys[0]: key, **created}))
    await e2e.fo_has(template, key, {t.fo.keys[0]: key, **created})
    for change in updates:
        change = _flows(e2e, template, change, "fo")
        if not change:
            continue  # a one-way F&O -> Dataverse field: see test_one_way_field_never_flows_back
        await e2e.agent.upsert(
            t.dataverse.entity_set, {t.dataverse.alternate_key[0]: key}, e2e.dv_body(template, change), mode="update"
        )
        await e2e.fo_has(template, key, change)
    await e2e.agent.delete_by_key(t.dataverse.entity_set, {t.dataverse.alternate_key[0]: key})
    await e2e.eventually(lambda: e2e.fo_row(template, key), lambda row: row is None, f"{template} {key} deleted")
    await e2e.settle()
    assert {e.wire_format for e in observed.events(template, key, "dataverse")} == {"dataverse-webhook"}
    assert observed.parked(template, key) == []


async def test_every_template_fo_to_dataverse_create_update_each_field_delete(e2e: E2E, observed: Observed) -> None:
    await asyncio.gather(*(_fo_to_dataverse(e2e, name, observed) for name in (CARDS, LEVELS, POINTS)))


async def test_every_template_dataverse_to_fo_create_update_each_field_delete(e2e: E2E, observed: Observed) -> None:
    await asyncio.gather(*(_dataverse_to_fo(e2e, name, observed) for name in (CARDS, LEVELS, POINTS)))


async def test_one_way_field_never_flows_back(e2e: E2E) -> None:
    """ReplacementCardNumber is '>': F&O is authoritative, so a Dataverse edit is overwritten, never sent."""
    key = e2e.key(PREFIX[CARDS])
    await e2e.fo.create(
        "RetailLoyaltyCards", {"CardNumber": key, "PartyNumber": "P-1", "ReplacementCardNumber": "R-FO"}
    )
    await e2e.dv_has(CARDS, key, {"ReplacementCardNumber": "R-FO"})
    await e2e.settle()
    await e2e.reset_counters()

    await e2e.agent.upsert(
        "msdyn_loyaltycards", {"msdyn_cardnumber": key}, {"msdyn_replacementcardnumber": "R-DV"}, mode="update"
    )
    # Documented behaviour: the engine writes F&O's value back over the Dataverse edit.
    await e2e.dv_has(CARDS, key, {"ReplacementCardNumber": "R-FO"})
    await e2e.settle()
    fo_row = await e2e.fo_row(CARDS, key)
    assert fo_row is not None and fo_row["ReplacementCardNumber"] == "R-FO"
    counters = await e2e.counters()
    assert counters["fo"]["writes"] == 0, "a Dataverse edit of a '>' field must not be written to F&O"
    assert counters["dataverse"]["writes"] == 2, "the agent's edit and the one write restoring F&O's value"

    # The F&O direction still works after that.
    await e2e.fo.update("RetailLoyaltyCards", {"CardNumber": key}, {"ReplacementCardNumber": "R-FO2"})
    await e2e.dv_has(CARDS, key, {"ReplacementCardNumber": "R-FO2"})


async def test_currency_lookup_both_ways(e2e: E2E) -> None:
    """F&O ISO code -> the right transactioncurrency row id in Dataverse, and a rebound lookup -> ISO code."""
    key = e2e.key(PREFIX[POINTS])
    created = dict(SCENARIOS[POINTS][0], RewardPointCurrency="JPY")
    await e2e.fo.create("RetailLoyaltyRewardPoints", {"RewardPointId": key, **created})

    async def currency_id() -> Any:
        row = await e2e.dv_row(POINTS, key)
        return None if row is None else row["_msdyn_rewardpointcurrency_value"]

    await e2e.eventually(currency_id, lambda value: value == CURRENCY_IDS["JPY"], "JPY's row id in Dataverse")
    await e2e.fo.update("RetailLoyaltyRewardPoints", {"RewardPointId": key}, {"RewardPointCurrency": "CHF"})
    await e2e.eventually(currency_id, lambda value: value == CURRENCY_IDS["CHF"], "CHF's row id in Dataverse")

    await e2e.agent.upsert(
        "msdyn_loyaltyrewardpoints",
        {"msdyn_rewardpointid": key},
        {"msdyn_rewardpointcurrency@odata.bind": f"/transactioncurrencies({CURRENCY_IDS['SEK']})"},
        mode="update",
    )
    await e2e.fo_has(POINTS, key, {"RewardPointCurrency": "SEK"})
