"""Contract tests of the F&O emulator's collection reads: $filter dialect, $select, $orderby, paging, $count."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import quote

import httpx
import pytest
from starlette.applications import Starlette

from devkit.sandbox.fno import create_app

TOKEN = "fno-test-token"
BASE = "https://fno.test"
TENDER = "Microsoft.Dynamics.DataEntities.RetailLoyaltyTenderTypeBase"
TENDERS = ["AsCardTender", "AsContactTender", "NoTender", "Blocked"]


@pytest.fixture
async def app() -> Starlette:
    app = create_app(token=TOKEN, seed=3, public_url=BASE)
    rows = [
        {"CardNumber": f"C-{i:03d}", "CardTenderType": TENDERS[i % 4], "PartyNumber": f"P{i % 5}",
         "OmOperatingUnitNumber": "Retail-Store" if i % 2 else "web", "LoyaltyEnrollmentTime": i,
         "LoyaltyEnrollmentDate": f"2026-01-{1 + i % 28:02d}T08:00:00Z"}
        for i in range(25)
    ]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE,
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        seeded = await client.post("/_admin/entities/RetailLoyaltyCards/rows", json=rows)
        assert seeded.json()["inserted"] == 25
    return app


@pytest.fixture
async def fo(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE,
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield client


async def cards(fo: httpx.AsyncClient, query: str, **headers: str) -> httpx.Response:
    return await fo.get(f"/data/RetailLoyaltyCards?{query}", headers=headers)


def numbers(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [r["CardNumber"] for r in response.json()["value"]]


async def test_filter_with_enum_literals_only_eq_and_ne(fo: httpx.AsyncClient) -> None:
    blocked = await cards(fo, f"$filter=CardTenderType eq {TENDER}'Blocked'")
    assert numbers(blocked) == [f"C-{i:03d}" for i in range(25) if i % 4 == 3]
    not_blocked = await cards(fo, f"$filter=CardTenderType ne {TENDER}'Blocked'")
    assert len(numbers(not_blocked)) == 25 - len(numbers(blocked))
    for bad in (
        f"CardTenderType gt {TENDER}'NoTender'",  # only eq / ne with enums
        "CardTenderType eq 'Blocked'",  # a plain string is not an enum literal
        "CardTenderType eq Microsoft.Dynamics.DataEntities.NoYes'Yes'",  # another enum type
        f"CardTenderType eq {TENDER}'Gold'",  # not a member
        f"PartyNumber eq {TENDER}'Blocked'",
    ):
        refused = await cards(fo, f"$filter={quote(bad)}")
        assert refused.status_code == 400, bad
        assert refused.json()["error"]["message"].startswith("The query specified in the URI is not valid.")


async def test_filter_operators_wildcards_and_rejected_syntax(fo: httpx.AsyncClient) -> None:
    assert numbers(await cards(fo, "$filter=LoyaltyEnrollmentTime ge 20 and LoyaltyEnrollmentTime lt 22")) == [
        "C-020", "C-021"]
    assert numbers(await cards(fo, "$filter=CardNumber eq 'c-007'")) == ["C-007"]  # case-insensitive
    assert len(numbers(await cards(fo, "$filter=OmOperatingUnitNumber eq '*retail*'"))) == 12
    assert numbers(await cards(fo, "$filter=CardNumber eq 'C-01*' and not (PartyNumber eq 'P0')")) == [
        f"C-01{i}" for i in range(10) if i % 5]
    dated = await cards(fo, "$filter=LoyaltyEnrollmentDate lt 2026-01-03T00:00:00Z")
    assert numbers(dated) == ["C-000", "C-001"]
    for bad, needle in (
        ("Colour eq 'red'", "Colour"),
        (f"CardTenderType has {TENDER}'Blocked'", "has"),
        ("CardNumber in ('C-001','C-002')", "in"),
        ("contains(CardNumber,'01')", "contains"),
        ("CardNumber eq 'unterminated", "unterminated"),
    ):
        refused = await cards(fo, f"$filter={quote(bad)}")
        assert refused.status_code == 400, bad
        assert needle in refused.json()["error"]["message"], refused.text


async def test_select_orderby_top_skip_and_count(fo: httpx.AsyncClient) -> None:
    response = await cards(fo, "$select=CardNumber,PartyNumber&$orderby=PartyNumber desc,CardNumber&$top=3&$skip=1"
                               "&$count=true")
    body = response.json()
    assert body["@odata.context"] == f"{BASE}/data/$metadata#RetailLoyaltyCards(CardNumber,PartyNumber)"
    assert body["@odata.count"] == 25
    assert [(r["CardNumber"], r["PartyNumber"]) for r in body["value"]] == [
        ("C-009", "P4"), ("C-014", "P4"), ("C-019", "P4")]
    assert set(body["value"][0]) == {"@odata.etag", "CardNumber", "PartyNumber"}
    assert "@odata.nextLink" not in body
    assert (await cards(fo, "$select=Nope")).status_code == 400
    assert (await cards(fo, "$orderby=Nope")).status_code == 400
    assert (await cards(fo, "$top=-1")).status_code == 400
    assert (await cards(fo, "$expand=Party")).status_code == 400
    count = await fo.get("/data/RetailLoyaltyCards/$count")
    assert count.status_code == 200 and count.text == "25"
    no_tender = quote(f"CardTenderType eq {TENDER}'NoTender'")
    filtered = await fo.get(f"/data/RetailLoyaltyCards/$count?$filter={no_tender}")
    assert filtered.text == "6"


async def test_server_driven_paging_follows_next_links(app: Starlette, fo: httpx.AsyncClient) -> None:
    app.state.fno.max_page_size = 10
    seen: list[str] = []
    url: str | None = f"{BASE}/data/RetailLoyaltyCards?$filter={quote('LoyaltyEnrollmentTime ge 2')}&$count=true"
    pages = 0
    while url is not None:
        body = (await fo.get(url)).json()
        assert body["@odata.count"] == 23
        seen += [r["CardNumber"] for r in body["value"]]
        url = body.get("@odata.nextLink")
        if url is not None:
            assert "$skiptoken=" in url and url.startswith(f"{BASE}/data/RetailLoyaltyCards?")
        pages += 1
    assert pages == 3 and seen == [f"C-{i:03d}" for i in range(2, 25)]
    # The client's smaller page size is honoured and announced.
    small = await cards(fo, "$top=7", Prefer="odata.maxpagesize=3")
    assert small.headers["Preference-Applied"] == "odata.maxpagesize=3"
    got, link = numbers(small), small.json()["@odata.nextLink"]
    while link:
        page = (await fo.get(link, headers={"Prefer": "odata.maxpagesize=3"})).json()
        got += [r["CardNumber"] for r in page["value"]]
        link = page.get("@odata.nextLink")
    assert got == [f"C-{i:03d}" for i in range(7)]  # $top caps the paged total
    # Larger than the service maximum: the maximum wins.
    assert len(numbers(await cards(fo, "", Prefer="odata.maxpagesize=50"))) == 10
