"""`make demo`: the whole sync, both ways, on the built-in sandbox, as a scripted day.

Starts Azurite, both emulators and the dev host (function_app.py as deployed),
registers the Dataverse webhooks and the F&O virtual-table steps through the Web
API (which activates the F&O data events, delivered through Dataverse as in
Power Platform), seeds F&O and copies it to Dataverse, then plays a day of changes on
both sides, printing every event as the worker handles it. Exits 0 only when
both sides converged with no dead letters.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from devkit.stack import Stack, running_stack, settle
from loyaltysync import worker
from loyaltysync.errors import TargetError
from loyaltysync.events.model import ChangeEvent
from loyaltysync.mapping import parse_datetime
from loyaltysync.reconcile import ReconcileReport, reconcile_full
from loyaltysync.runtime import Runtime, get_runtime
from loyaltysync.sync import Outcome
from loyaltysync.targets.auth import StaticTokenCredential
from loyaltysync.targets.dataverse import DataverseClient
from loyaltysync.targets.fno import FnoClient

CARDS, LEVELS, POINTS = "RetailLoyaltyCards", "LoyaltyLevels", "RetailLoyaltyRewardPoints"
DV_CARDS, DV_POINTS = "msdyn_loyaltycards", "msdyn_loyaltyrewardpoints"
BLOCKED = 806380003


def _print_event(event: ChangeEvent, outcome: Outcome | None, parked: str | None) -> None:
    arrow = "F&O -> Dataverse" if event.side == "fo" else "Dataverse -> F&O"
    received = parse_datetime(event.received_at)
    latency = (time.time() - received.timestamp()) * 1000 if received else 0.0
    if parked is not None:
        print(f"    ! {event.template:<22} {arrow:<17} {event.key_text:<12} parked: {parked}")
        return
    assert outcome is not None  # noqa: S101 - observer contract: one of the two is set
    names = {"fo": "F&O", "dataverse": "Dataverse"}
    fields = "; ".join(f"to {names[side]}: {', '.join(f)}" for side, f in outcome.writes.items()) or "-"
    extra = ""
    if outcome.created:
        extra = f" (created in {outcome.created})"
    if outcome.deleted:
        extra = f" (deleted in {outcome.deleted})"
    if outcome.conflicts:
        extra += " conflict: " + "; ".join(f"{c['field']} -> {c['winner'] or 'deferred'}" for c in outcome.conflicts)
    print(
        f"    {event.template:<22} {arrow:<17} {outcome.key:<12} {outcome.reason:<17} {fields}{extra}"
        f"  [{latency:.0f} ms]"
    )


async def _converged(runtime: Runtime) -> list[ReconcileReport]:
    reports = []
    for template in runtime.templates.values():
        reports.append(await reconcile_full(runtime, template, fix=False))
    return reports


async def wait_until(check: Callable[[], Awaitable[bool]], seconds: float, what: str) -> None:
    """Poll `check` until it is true; fail the demo with `what` after `seconds` seconds."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.25)
    raise AssertionError(f"timed out after {seconds:.0f} s waiting for: {what}")


async def wait_converged(runtime: Runtime, seconds: float = 45.0) -> None:
    async def check() -> bool:
        try:
            return all(r.only_fo == r.only_dataverse == r.different == 0 for r in await _converged(runtime))
        except TargetError:
            return False  # throttled or down while comparing: look again

    await wait_until(check, seconds, "both sides to hold the same records")


def step(title: str) -> None:
    print(f"\n== {title}")


async def play(stack: Stack) -> int:
    """The scripted day. Returns the exit code."""
    from devkit.sandbox.dataverse import AGENT_USER

    runtime = await get_runtime()
    fo = FnoClient(stack.fo.url, StaticTokenCredential(stack.token))
    dv = DataverseClient(stack.dataverse.url, StaticTokenCredential(stack.token))
    agent = dv.as_caller(AGENT_USER.azureactivedirectoryobjectid)
    admin_fo, admin_dv = stack.admin(stack.fo), stack.admin(stack.dataverse)

    async def fo_card(number: str) -> dict[str, Any] | None:
        return await fo.get(CARDS, {"CardNumber": number})

    async def dv_card(number: str) -> dict[str, Any] | None:
        return await dv.get_by_key(DV_CARDS, {"msdyn_cardnumber": number})

    try:
        step("Seed F&O (40 cards, 3 levels, 3 reward points) and copy everything to Dataverse")
        cards = [
            {
                "CardNumber": f"C-{i:04d}",
                "CardTenderType": "AsCardTender",
                "PartyNumber": f"P-{i:05d}",
                "OmOperatingUnitNumber": "S0001",
                "LoyaltyEnrollmentDate": "2026-01-15T00:00:00Z",
            }
            for i in range(1, 41)
        ]
        levels = [
            {"LevelPhrase": p, "LevelDescription": d}
            for p, d in (("Bronze", "Entry level"), ("Silver", "Frequent buyer"), ("Gold", "Top customers"))
        ]
        points = [
            {
                "RewardPointId": rid,
                "RewardPointType": kind,
                "Redeemable": "Yes",
                "RedeemRanking": rank,
                "RewardPointCurrency": cur,
                "MaximumLoyaltyRewardPoints": 10000,
                "ExpirationTimeUnit": "Year",
                "ExpirationTimeValue": 1,
                "VestingTimeUnit": "Day",
                "VestingTimeValue": 30,
            }
            for rid, kind, rank, cur in (
                ("STAR", "Quantity", 1, "USD"),
                ("CASH", "Amount", 2, "USD"),
                ("EURO", "Amount", 3, "EUR"),
            )
        ]
        for entity_set, rows in ((CARDS, cards), (LEVELS, levels), (POINTS, points)):
            (await admin_fo.post(f"/_admin/entities/{entity_set}/rows", json={"rows": rows})).raise_for_status()
        worker.OBSERVERS.append(lambda e, o, p: None)  # quiet while copying
        for template in runtime.templates.values():
            report = await reconcile_full(runtime, template)
            print(f"  {report.summary()}")
        await wait_converged(runtime, 90)
        await settle(stack)
        worker.OBSERVERS.clear()
        print("  copied; both sides equal")
        worker.OBSERVERS.append(_print_event)

        step("Cards created and edited in F&O")
        await fo.create(
            CARDS,
            {
                "CardNumber": "C-1001",
                "CardTenderType": "AsCardTender",
                "PartyNumber": "P-10001",
                "OmOperatingUnitNumber": "S0002",
            },
        )
        await fo.update(CARDS, {"CardNumber": "C-0002"}, {"PartyNumber": "P-99999"})
        await wait_until(lambda: _dv_is(dv_card("C-1001"), "msdyn_partynumber", "P-10001"), 30, "C-1001 in Dataverse")
        await wait_until(lambda: _dv_is(dv_card("C-0002"), "msdyn_partynumber", "P-99999"), 30, "C-0002 edit")

        await settle(stack)

        step("An agent blocks card C-0003 in Dataverse")
        await agent.upsert(DV_CARDS, {"msdyn_cardnumber": "C-0003"}, {"msdyn_cardtendertype": BLOCKED}, mode="update")
        await wait_until(lambda: _dv_is(fo_card("C-0003"), "CardTenderType", "Blocked"), 30, "C-0003 blocked in F&O")

        await settle(stack)

        step("Card C-0004 edited on both sides at once, different fields: both survive")
        await asyncio.gather(
            fo.update(CARDS, {"CardNumber": "C-0004"}, {"PartyNumber": "P-40404"}),
            agent.upsert(
                DV_CARDS, {"msdyn_cardnumber": "C-0004"}, {"msdyn_operatingunitnumber": "S0404"}, mode="update"
            ),
        )
        await wait_until(lambda: _dv_is(fo_card("C-0004"), "OmOperatingUnitNumber", "S0404"), 30, "DV edit in F&O")
        await wait_until(lambda: _dv_is(dv_card("C-0004"), "msdyn_partynumber", "P-40404"), 30, "F&O edit in DV")

        await settle(stack)

        step("Card C-0005: the same field edited on both sides while the template is paused; last writer wins")
        await runtime.set_paused("loyalty-cards", True, "demo: hold events to show a conflict")
        print("    loyalty-cards paused: events are kept, not applied")
        await fo.update(CARDS, {"CardNumber": "C-0005"}, {"OmOperatingUnitNumber": "S-FO"})
        await asyncio.sleep(1.1)
        await agent.upsert(
            DV_CARDS, {"msdyn_cardnumber": "C-0005"}, {"msdyn_operatingunitnumber": "S-DV"}, mode="update"
        )
        await asyncio.sleep(1.5)
        await runtime.set_paused("loyalty-cards", False)
        print("    loyalty-cards resumed")
        await wait_until(lambda: _dv_is(fo_card("C-0005"), "OmOperatingUnitNumber", "S-DV"), 30, "Dataverse wins")
        await settle(stack)

        step("A reward point with a currency lookup, both ways")
        await fo.create(
            POINTS,
            {
                "RewardPointId": "POUND",
                "RewardPointType": "Amount",
                "Redeemable": "No",
                "RedeemRanking": 4,
                "RewardPointCurrency": "GBP",
                "MaximumLoyaltyRewardPoints": 500.5,
                "ExpirationTimeUnit": "Month",
                "ExpirationTimeValue": 6,
                "VestingTimeUnit": "Day",
                "VestingTimeValue": 0,
            },
        )
        await wait_converged(runtime)
        eur = await dv.find_id("transactioncurrencies", "transactioncurrencyid", {"isocurrencycode": "EUR"})
        await agent.upsert(
            DV_POINTS,
            {"msdyn_rewardpointid": "POUND"},
            {"msdyn_rewardpointcurrency@odata.bind": f"/transactioncurrencies({eur})"},
            mode="update",
        )
        await wait_until(
            lambda: _dv_is(fo.get(POINTS, {"RewardPointId": "POUND"}), "RewardPointCurrency", "EUR"),
            30,
            "currency change in F&O",
        )

        await settle(stack)

        step("Deletes on both sides")
        await fo.delete(CARDS, {"CardNumber": "C-0006"})
        await agent.delete_by_key(DV_CARDS, {"msdyn_cardnumber": "C-0007"})
        await wait_until(lambda: _missing(dv_card("C-0006")), 30, "C-0006 gone from Dataverse")
        await wait_until(lambda: _missing(fo_card("C-0007")), 30, "C-0007 gone from F&O")

        await settle(stack)

        step("A burst of Dataverse throttling (429 with Retry-After) while F&O edits 10 cards")
        await admin_dv.patch("/_admin/faults", json={"throttle_rate": 0.5, "throttle_retry_after_s": 0.2})
        for i in range(10, 20):
            await fo.update(CARDS, {"CardNumber": f"C-{i:04d}"}, {"PartyNumber": f"P-T{i}"})
        await wait_converged(runtime, 60)
        await admin_dv.patch("/_admin/faults", json={"throttle_rate": 0.0})
        await settle(stack)
        stats = (await admin_dv.get("/_admin/stats")).json()
        print(f"  converged; Dataverse answered {stats['counters'].get('throttled', 0)} requests with 429 so far")

        step("A 4-second Dataverse outage while F&O edits 5 cards: nothing is lost")
        await admin_dv.patch("/_admin/faults", json={"outage": True})
        for i in range(20, 25):
            await fo.update(CARDS, {"CardNumber": f"C-{i:04d}"}, {"OmOperatingUnitNumber": f"S-OUT{i}"})
        await asyncio.sleep(4)
        await admin_dv.patch("/_admin/faults", json={"outage": False})
        await wait_converged(runtime, 60)
        print("  caught up after the outage")
        await settle(stack)
        worker.OBSERVERS.clear()

        step("Field-by-field comparison of both sides")
        reports = await _converged(runtime)
        for report in reports:
            print(f"  {report.summary()}")
            for diff in report.differences[:10]:
                print(f"    {diff}")
        dead = await runtime.dead_letters.count()
        converged = all(r.only_fo == r.only_dataverse == r.different == 0 for r in reports)
        print(f"\n  dead letters: {dead}")
        print(f"  converged: {'yes' if converged else 'no'}")
        return 0 if converged and dead == 0 else 1
    finally:
        worker.OBSERVERS.clear()
        await admin_fo.aclose()
        await admin_dv.aclose()
        await fo.aclose()
        await dv.aclose()


async def _dv_is(read: Awaitable[dict[str, Any] | None], column: str, value: Any) -> bool:
    row = await read
    return row is not None and row.get(column) == value


async def _missing(read: Awaitable[dict[str, Any] | None]) -> bool:
    return await read is None


async def run_demo() -> int:
    """Run the whole demo; the exit code says whether both sides converged with no dead letters."""
    # Retries are expected during the throttling and outage steps; the feed shows their outcome.
    logging.getLogger("loyaltysync.targets").setLevel(logging.ERROR)
    logging.getLogger("devkit.devhost").setLevel(logging.CRITICAL)  # failed attempts are retried
    started = time.monotonic()
    print("loyaltysync demo: starting Azurite, the F&O and Dataverse emulators and the function app")
    async with running_stack() as stack:
        print(f"  F&O emulator        {stack.fo.url}/data/")
        print(f"  Dataverse emulator  {stack.dataverse.url}/api/data/v9.2/")
        print(f"  function app        {stack.function_url}/api/")
        print("  Dataverse webhooks and F&O virtual-table steps registered through the Web API;")
        print("  F&O data events reach the function through Dataverse (OnExternalCreated/Updated/Deleted)")
        code = await play(stack)
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s: {'OK' if code == 0 else 'FAILED'}")
    return code
