"""Key values that try OData injection or path tricks, and values too long for a column, end to end.

Through the real wiring (both emulators, Azurite, the dev host running
function_app.py, webhooks registered through the Web API): people create,
edit and delete records whose natural keys hold quotes, `') or true or ('`,
`/`, `%2F`, `..`, spaces, `&?#+` and non-ASCII text. The test's own requests
never put those keys in a URL (it finds rows by listing them), so only the
product's escaping is exercised. Each time, exactly the right record is
written on the other side, and every other record on both sides stays as it
was. Values longer than the target column are refused with a reason that
says so, and nothing is written.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import httpx
import pytest

from devkit.sandbox.dataverse import AGENT_USER
from devkit.stack import Stack, running_stack, settle
from loyaltysync.runtime import Runtime, get_runtime

T = TypeVar("T")
LEVELS_FO, LEVELS_DV = "LoyaltyLevels", "msdyn_loyaltylevels"
CARDS_FO, CARDS_DV = "RetailLoyaltyCards", "msdyn_loyaltycards"
HOSTILE_KEYS = [
    "O'Brien",
    "') or true or ('",
    "x' or LevelPhrase ne '",
    "a/b",
    "a%2Fb",
    "..",
    "../../_admin/reset",
    "a b&c=d?e#f+g",
    "back\\slash",
    "Ünïcødé カード 😀",
    "(x)=1,y='2'",
]
DECOYS = ["DECOY-A", "DECOY-B", "O", "a", "b"]


class World:
    """The running stack and raw HTTP clients (no product code between the test and the emulators)."""

    def __init__(self, stack: Stack, runtime: Runtime) -> None:
        self.stack = stack
        self.runtime = runtime
        auth = {"Authorization": f"Bearer {stack.token}", "Accept": "application/json"}
        self.fo = httpx.AsyncClient(base_url=f"{stack.fo.url}/data/", headers=auth, timeout=30)
        self.dv = httpx.AsyncClient(base_url=f"{stack.dataverse.url}/api/data/v9.2/", headers=auth, timeout=30)
        self.agent = {"CallerObjectId": AGENT_USER.azureactivedirectoryobjectid}

    async def aclose(self) -> None:
        await self.fo.aclose()
        await self.dv.aclose()

    async def fo_rows(self, entity_set: str, key: str) -> dict[str, dict[str, Any]]:
        response = await self.fo.get(entity_set)
        response.raise_for_status()
        return {row[key]: row for row in response.json()["value"]}

    async def dv_rows(self, entity_set: str, key: str) -> dict[str, dict[str, Any]]:
        response = await self.dv.get(entity_set)
        response.raise_for_status()
        return {row[key]: row for row in response.json()["value"]}

    async def levels(self) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        return await self.fo_rows(LEVELS_FO, "LevelPhrase"), await self.dv_rows(LEVELS_DV, "msdyn_levelphrase")

    async def cards(self) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        return await self.fo_rows(CARDS_FO, "CardNumber"), await self.dv_rows(CARDS_DV, "msdyn_cardnumber")

    async def settle(self) -> None:
        await settle(self.stack, seconds=60)


async def eventually(fetch: Callable[[], Awaitable[T]], ok: Callable[[T], bool], what: str, seconds: float = 30) -> T:
    deadline = time.monotonic() + seconds
    value = await fetch()
    while not ok(value):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last seen: {value!r}")
        await asyncio.sleep(0.1)
        value = await fetch()
    return value


@pytest.fixture(scope="module")
async def world() -> AsyncIterator[World]:
    sys.modules.pop("function_app", None)  # it reads its settings at import: this stack's, not an earlier one's
    try:
        async with running_stack() as stack:
            world = World(stack, await get_runtime())
            try:
                yield world
            finally:
                await world.aclose()
    finally:
        sys.modules.pop("function_app", None)


def descriptions(rows: dict[str, dict[str, Any]], field: str) -> dict[str, Any]:
    return {key: row.get(field) for key, row in rows.items()}


async def test_hostile_level_keys_reach_exactly_their_own_record(world: World) -> None:
    for key in DECOYS:
        response = await world.fo.post(LEVELS_FO, json={"LevelPhrase": key, "LevelDescription": f"decoy {key}"})
        response.raise_for_status()
    await eventually(world.levels, lambda sides: all(k in sides[1] for k in DECOYS), "the decoys in Dataverse")
    await world.settle()
    before_fo, before_dv = await world.levels()

    # Created in F&O: each key arrives in Dataverse once, with its own value.
    for i, key in enumerate(HOSTILE_KEYS):
        response = await world.fo.post(LEVELS_FO, json={"LevelPhrase": key, "LevelDescription": f"fo {i}"})
        assert response.status_code == 201, response.text
    _, dv = await eventually(
        world.levels, lambda sides: all(k in sides[1] for k in HOSTILE_KEYS), "every hostile key in Dataverse"
    )
    assert {k: dv[k]["msdyn_description"] for k in HOSTILE_KEYS} == {k: f"fo {i}" for i, k in enumerate(HOSTILE_KEYS)}

    # Edited by an agent in Dataverse (by row id: the test never puts a key in a URL): F&O updates each one.
    for i, key in enumerate(HOSTILE_KEYS):
        response = await world.dv.patch(
            f"{LEVELS_DV}({dv[key]['msdyn_loyaltylevelid']})", json={"msdyn_description": f"dv {i}"},
            headers=world.agent,
        )
        assert response.status_code == 204, response.text
    expected = {k: f"dv {i}" for i, k in enumerate(HOSTILE_KEYS)}
    await eventually(
        world.levels,
        lambda sides: {k: sides[0].get(k, {}).get("LevelDescription") for k in HOSTILE_KEYS} == expected,
        "every edit in F&O",
    )
    await world.settle()
    after_fo, after_dv = await world.levels()
    assert set(after_fo) == set(before_fo) | set(HOSTILE_KEYS)
    assert set(after_dv) == set(before_dv) | set(HOSTILE_KEYS)
    assert {k: after_fo[k] for k in before_fo} == before_fo, "a record other than the hostile ones changed in F&O"
    assert {k: after_dv[k] for k in before_dv} == before_dv, "a record other than the hostile ones changed in Dataverse"

    # Deleted by the agent: F&O deletes exactly those records.
    for key in HOSTILE_KEYS:
        response = await world.dv.delete(f"{LEVELS_DV}({dv[key]['msdyn_loyaltylevelid']})", headers=world.agent)
        assert response.status_code == 204, response.text
    await eventually(
        world.levels, lambda sides: not set(HOSTILE_KEYS) & set(sides[0]), "every hostile key deleted in F&O"
    )
    await world.settle()
    assert await world.levels() == (before_fo, before_dv)
    assert await world.runtime.dead_letters.count() == 0


async def test_hostile_card_numbers_created_in_dataverse_reach_exactly_their_own_card(world: World) -> None:
    keys = ["C'1", "') or true or ('", "C/1", "C%2F1", "..", "Ω-カード-😀", "C 1&x=y"]
    before_fo, before_dv = await world.cards()
    for key in keys:
        body = {"msdyn_cardnumber": key, "msdyn_cardtendertype": 806380001, "msdyn_partynumber": "P-INJ"}
        response = await world.dv.post(CARDS_DV, json=body, headers=world.agent)
        assert response.status_code == 204, response.text
    fo, _ = await eventually(world.cards, lambda sides: all(k in sides[0] for k in keys), "the cards in F&O")
    for key in keys:
        assert fo[key]["PartyNumber"] == "P-INJ" and fo[key]["CardTenderType"] == "AsContactTender"

    # F&O edits one of them through OData by key (the product's escaping is the only one in play).
    await world.settle()
    target = keys[1]
    response = await world.fo.patch(
        f"{CARDS_FO}(CardNumber='{target.replace(chr(39), chr(39) * 2)}')".replace("/", "%2F"),
        json={"PartyNumber": "P-EDITED"},
    )
    assert response.status_code == 204, response.text
    await eventually(
        world.cards, lambda sides: sides[1][target]["msdyn_partynumber"] == "P-EDITED", "the edit in Dataverse"
    )
    await world.settle()
    after_fo, after_dv = await world.cards()
    for side_before, side_after in ((before_fo, after_fo), (before_dv, after_dv)):
        assert {k: side_after[k] for k in side_before} == side_before
    assert {k: after_dv[k]["msdyn_partynumber"] for k in keys} == {k: "P-EDITED" if k == target else "P-INJ"
                                                                    for k in keys}
    assert await world.runtime.dead_letters.count() == 0


async def test_a_key_longer_than_the_dataverse_column_is_parked_with_the_reason(world: World) -> None:
    key = "LONG-" + "x" * 100  # msdyn_levelphrase holds 100 characters; F&O's LevelPhrase has no limit
    before_dv = await world.dv_rows(LEVELS_DV, "msdyn_levelphrase")
    response = await world.fo.post(LEVELS_FO, json={"LevelPhrase": key, "LevelDescription": "too long a key"})
    assert response.status_code == 201, response.text

    letters = await eventually(
        lambda: world.runtime.dead_letters.list("loyalty-levels"),
        lambda found: any(d.key == key for d in found),
        "the long key to be parked",
    )
    letter = next(d for d in letters if d.key == key)
    assert "length" in letter.reason.lower() or "long" in letter.reason.lower(), letter.reason
    await world.settle()
    assert await world.dv_rows(LEVELS_DV, "msdyn_levelphrase") == before_dv  # nothing written
    for entry in letters:
        await world.runtime.dead_letters.remove(entry.id)


async def test_a_value_longer_than_the_fo_column_is_parked_and_fo_keeps_its_value(world: World) -> None:
    card = "LONGPARTY-1"
    body = {"CardNumber": card, "CardTenderType": "AsCardTender", "PartyNumber": "P-SHORT"}
    (await world.fo.post(CARDS_FO, json=body)).raise_for_status()
    _, dv = await eventually(world.cards, lambda sides: card in sides[1], "the card in Dataverse")
    await world.settle()
    before_fo = await world.fo_rows(CARDS_FO, "CardNumber")

    # Dataverse's party number holds 100 characters, F&O's 40.
    long_party = "P-" + "9" * 60
    response = await world.dv.patch(
        f"{CARDS_DV}({dv[card]['msdyn_loyaltycardid']})", json={"msdyn_partynumber": long_party}, headers=world.agent
    )
    assert response.status_code == 204, response.text
    letters = await eventually(
        lambda: world.runtime.dead_letters.list("loyalty-cards"),
        lambda found: any(d.key == card for d in found),
        "the long party number to be parked",
    )
    letter = next(d for d in letters if d.key == card)
    assert "PartyNumber" in letter.reason and ("length" in letter.reason.lower() or "40" in letter.reason)
    await world.settle()
    assert await world.fo_rows(CARDS_FO, "CardNumber") == before_fo  # F&O untouched
    for entry in letters:
        await world.runtime.dead_letters.remove(entry.id)
