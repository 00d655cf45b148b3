"""Dataverse emulator contract: collection queries and server-driven paging (docs/wire-formats.md §1.6)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from devkit.sandbox.dataverse import create_app
from devkit.sandbox.dataverse.org import Organization

TOKEN = "dv-query-token"
PUBLIC = "http://127.0.0.1:7082"
BASE = f"{PUBLIC}/api/data/v9.2/"
CARDS = "msdyn_loyaltycards"


@pytest.fixture
async def dv() -> AsyncIterator[tuple[Organization, httpx.AsyncClient]]:
    app: Starlette = create_app(token=TOKEN, public_url=PUBLIC)
    org: Organization = app.state.dataverse
    for i in range(30):
        org.seed_row(
            "msdyn_loyaltycard",
            {
                "msdyn_cardnumber": f"Q-{i:03d}",
                "msdyn_partynumber": f"Party{i % 3}",
                "msdyn_cardtendertype": 806380000 + i % 4,
                "msdyn_operatingunitnumber": None if i % 5 else "OU-X",
            },
        )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        yield org, c


@pytest.fixture
def client(dv: tuple[Organization, httpx.AsyncClient]) -> httpx.AsyncClient:
    return dv[1]


async def values(client: httpx.AsyncClient, query: str, **headers: str) -> list[dict[str, Any]]:
    response = await client.get(f"{CARDS}?{query}", headers=headers)
    assert response.status_code == 200, response.text
    return list(response.json()["value"])


async def test_select_returns_the_columns_and_the_primary_key_with_a_context_naming_them(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get(f"{CARDS}?$select=msdyn_cardnumber,msdyn_partynumber&$top=1")
    body = response.json()
    assert body["@odata.context"] == f"{BASE}$metadata#msdyn_loyaltycards(msdyn_cardnumber,msdyn_partynumber)"
    assert set(body["value"][0]) == {"@odata.etag", "msdyn_loyaltycardid", "msdyn_cardnumber", "msdyn_partynumber"}


async def test_select_of_an_unknown_column_is_the_documented_400(client: httpx.AsyncClient) -> None:
    response = await client.get(f"{CARDS}?$select=Name")
    assert response.status_code == 400
    assert response.json()["error"] == {
        "code": "0x0",
        "message": "Could not find a property named 'Name' on type 'Microsoft.Dynamics.CRM.msdyn_loyaltycard'.",
    }


@pytest.mark.parametrize(
    ("filter_", "expected"),
    [
        ("msdyn_cardnumber eq 'q-007'", {"Q-007"}),
        ("msdyn_partynumber eq 'PARTY1' and msdyn_cardtendertype eq 806380001", {"Q-001", "Q-013", "Q-025"}),
        ("msdyn_cardnumber ge 'Q-027'", {"Q-027", "Q-028", "Q-029"}),
        ("msdyn_cardnumber lt 'Q-002' or msdyn_cardnumber gt 'Q-028'", {"Q-000", "Q-001", "Q-029"}),
        ("not (msdyn_cardnumber ne 'Q-004')", {"Q-004"}),
        ("contains(msdyn_cardnumber,'-01')", {f"Q-01{i}" for i in range(10)}),
        ("startswith(msdyn_cardnumber,'q-02') and endswith(msdyn_cardnumber,'9')", {"Q-029"}),
        ("msdyn_operatingunitnumber ne null and msdyn_cardnumber le 'Q-010'", {"Q-000", "Q-005", "Q-010"}),
        (
            'Microsoft.Dynamics.CRM.In(PropertyName=\'msdyn_cardnumber\',PropertyValues=["Q-001","Q-002"])',
            {"Q-001", "Q-002"},
        ),
    ],
)
async def test_filter_operators_with_case_insensitive_strings(
    client: httpx.AsyncClient, filter_: str, expected: set[str]
) -> None:
    rows = await values(client, f"$select=msdyn_cardnumber&$filter={filter_}")
    assert {r["msdyn_cardnumber"] for r in rows} == expected


async def test_filter_on_a_navigation_path(client: httpx.AsyncClient) -> None:
    response = await client.get(
        "sdkmessagefilters?$select=sdkmessagefilterid&$filter=sdkmessageid/name eq 'CreateMultiple' "
        "and primaryobjecttypecode eq 'msdyn_loyaltycard'"
    )
    assert len(response.json()["value"]) == 1
    none = await client.get(
        "sdkmessagefilters?$select=sdkmessagefilterid&$filter=sdkmessageid/name eq 'CreateMultiple' "
        "and primaryobjecttypecode eq 'systemuser'"
    )
    assert none.json()["value"] == []


async def test_filter_syntax_error_is_400(client: httpx.AsyncClient) -> None:
    response = await client.get(f"{CARDS}?$filter=msdyn_cardnumber eq 'O'Brien'")
    assert response.status_code == 400
    unknown = await client.get(f"{CARDS}?$filter=msdyn_colour eq 'x'")
    assert "Could not find a property named 'msdyn_colour'" in unknown.json()["error"]["message"]


async def test_orderby_and_top(client: httpx.AsyncClient) -> None:
    rows = await values(client, "$select=msdyn_cardnumber&$orderby=msdyn_partynumber desc,msdyn_cardnumber asc&$top=4")
    assert [r["msdyn_cardnumber"] for r in rows] == ["Q-002", "Q-005", "Q-008", "Q-011"]


async def test_count_true_and_count_segment(client: httpx.AsyncClient) -> None:
    body = (await client.get(f"{CARDS}?$count=true&$top=2&$filter=msdyn_partynumber eq 'Party0'")).json()
    assert body["@odata.count"] == 10
    assert len(body["value"]) == 2
    plain = await client.get(f"{CARDS}/$count")
    assert plain.headers["content-type"].startswith("text/plain")
    assert plain.text == "30"


async def test_skip_is_refused_like_dataverse(client: httpx.AsyncClient) -> None:
    response = await client.get(f"{CARDS}?$skip=2")
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "The query parameter $skip is not supported"


async def test_paging_with_maxpagesize_follows_next_links_unchanged_and_a_retry_is_stable(
    client: httpx.AsyncClient,
) -> None:
    prefer = {"Prefer": "odata.maxpagesize=7"}
    first = await client.get(f"{CARDS}?$select=msdyn_cardnumber&$filter=msdyn_cardnumber ne 'Q-003'", headers=prefer)
    assert first.headers["Preference-Applied"] == "odata.maxpagesize=7"
    seen = [r["msdyn_cardnumber"] for r in first.json()["value"]]
    link = first.json()["@odata.nextLink"]
    assert link.startswith(f"{BASE}msdyn_loyaltycards?") and "$skiptoken=" in link
    pages = 1
    while link:
        page = await client.get(link, headers=prefer)
        retried = await client.get(link, headers=prefer)
        assert retried.json()["value"] == page.json()["value"]
        seen += [r["msdyn_cardnumber"] for r in page.json()["value"]]
        link = page.json().get("@odata.nextLink")
        pages += 1
    assert pages == 5
    assert seen == [f"Q-{i:03d}" for i in range(30) if i != 3]


async def test_next_link_still_works_after_its_snapshot_is_evicted(dv: tuple[Organization, httpx.AsyncClient]) -> None:
    _, client = dv
    prefer = {"Prefer": "odata.maxpagesize=10"}
    link = (await client.get(f"{CARDS}?$select=msdyn_cardnumber", headers=prefer)).json()["@odata.nextLink"]
    for _ in range(40):  # push the snapshot out of the cache
        await client.get(f"{CARDS}?$select=msdyn_cardnumber", headers=prefer)
    page = (await client.get(link, headers=prefer)).json()
    assert [r["msdyn_cardnumber"] for r in page["value"]] == [f"Q-{i:03d}" for i in range(10, 20)]


async def test_default_page_is_5000_and_count_is_capped(dv: tuple[Organization, httpx.AsyncClient]) -> None:
    org, client = dv
    table = org.tables["msdyn_loyaltycard"]
    for i in range(5100 - len(table)):
        org.seed_row("msdyn_loyaltycard", {"msdyn_cardnumber": f"BULK-{i}"})
    body = (await client.get(f"{CARDS}?$select=msdyn_cardnumber&$count=true")).json()
    assert len(body["value"]) == 5000
    assert body["@odata.count"] == 5000
    assert "@odata.nextLink" in body
    assert (await client.get(f"{CARDS}/$count")).text == "5000"
    annotated = await client.get(
        f"{CARDS}?$select=msdyn_cardnumber&$count=true",
        headers={
            "Prefer": 'odata.include-annotations="Microsoft.Dynamics.CRM.totalrecordcount,'
            'Microsoft.Dynamics.CRM.totalrecordcountlimitexceeded",odata.maxpagesize=1'
        },
    )
    assert annotated.json()["@Microsoft.Dynamics.CRM.totalrecordcountlimitexceeded"] is True


async def test_formatted_values_on_choices_when_asked(client: httpx.AsyncClient) -> None:
    rows = await values(
        client,
        "$select=msdyn_cardtendertype&$filter=msdyn_cardnumber eq 'Q-003'",
        Prefer='odata.include-annotations="OData.Community.Display.V1.FormattedValue"',
    )
    assert rows[0]["msdyn_cardtendertype@OData.Community.Display.V1.FormattedValue"] == "Blocked"
    plain = await values(client, "$select=msdyn_cardtendertype&$filter=msdyn_cardnumber eq 'Q-003'")
    assert "msdyn_cardtendertype@OData.Community.Display.V1.FormattedValue" not in plain[0]


async def test_expand_a_registration_lookup(client: httpx.AsyncClient) -> None:
    response = await client.get(
        "sdkmessagefilters?$select=primaryobjecttypecode&$expand=sdkmessageid($select=name)"
        "&$filter=primaryobjecttypecode eq 'msdyn_loyaltylevel'&$orderby=primaryobjecttypecode"
    )
    names = {row["sdkmessageid"]["name"] for row in response.json()["value"]}
    assert names == {"Create", "Update", "Delete", "CreateMultiple", "UpdateMultiple", "UpsertMultiple"}


async def test_a_lookup_filter_uses_the_value_property(client: httpx.AsyncClient) -> None:
    from devkit.sandbox.dataverse import INTEGRATION_USER

    rows = await values(client, f"$select=msdyn_cardnumber&$filter=_createdby_value eq {INTEGRATION_USER.systemuserid}")
    assert len(rows) == 30


FAST_FILTERS = [
    "msdyn_cardnumber eq 'q-001'",
    "msdyn_cardnumber ne 'Q-001' and msdyn_partynumber ne null",
    "msdyn_partynumber eq null or msdyn_cardtendertype ge 806380002",
    "806380001 lt msdyn_cardtendertype",
    "not (msdyn_enrollmentdate gt 2026-01-15T00:00:00Z)",
    "msdyn_enrollmentdate le 2026-01-15T00:00:00+01:00",
    "contains(msdyn_partynumber,'ARTY') or endswith(msdyn_cardnumber,'7')",
    "startswith(msdyn_operatingunitnumber,'ou')",
    "_createdby_value eq a7c4f2d1-6b1e-4f0a-9c3d-000000000001",
]


@pytest.mark.parametrize("filter_", FAST_FILTERS)
def test_compiled_filters_agree_with_the_generic_evaluator(filter_: str) -> None:
    from devkit.sandbox.dataverse.predicates import compile_filter
    from devkit.sandbox.odata import evaluate, parse_filter

    org = Organization()
    definition = org.defs["msdyn_loyaltycard"]
    for i in range(40):
        org.seed_row(
            "msdyn_loyaltycard",
            {
                "msdyn_cardnumber": f"Q-{i:03d}",
                "msdyn_partynumber": None if i % 4 == 0 else f"Party{i % 3}",
                "msdyn_cardtendertype": None if i % 7 == 0 else 806380000 + i % 4,
                "msdyn_operatingunitnumber": "OU-1" if i % 2 else None,
                "msdyn_enrollmentdate": None if i % 5 == 0 else f"2026-01-{1 + i % 28:02d}T00:00:00Z",
            },
        )
    table = org.tables["msdyn_loyaltycard"]
    expr = parse_filter(filter_)
    predicate = compile_filter(expr, definition, table.column_index)
    assert predicate is not None
    for row in table.scan_tuples():
        mapping = {definition.columns[c].value_property: row[p] for c, p in table.column_index.items()}
        expected = evaluate(expr, mapping, case_insensitive=True, wildcard=False)
        assert predicate(row) == expected, (filter_, mapping)


def test_filters_the_fast_path_cannot_take_fall_back() -> None:
    from devkit.sandbox.dataverse.predicates import compile_filter
    from devkit.sandbox.odata import parse_filter

    org = Organization()
    definition = org.defs["msdyn_loyaltycard"]
    index = org.tables["msdyn_loyaltycard"].column_index
    for text in ["msdyn_cardnumber eq 5", "createdby/fullname eq 'x'", "tolower(msdyn_cardnumber) eq 'x'"]:
        assert compile_filter(parse_filter(text), definition, index) is None
