"""A generic OData v4 client works against the F&O emulator unchanged.

The client (`odata_v4_client`) is written from the OData v4 specification alone;
it reads the model from `$metadata` and knows nothing of F&O beyond the custom
query option its caller passes (`cross-company=true`). Covered: every row of
every entity set matches the types `$metadata` declares, server-driven paging
by `@odata.nextLink` with `Prefer: odata.maxpagesize`, `$count=true` and `/$count`,
`cross-company=true` kept across pages, and updates with `If-Match` on `@odata.etag`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from devkit.sandbox.fno import create_app
from loyaltysync.templates import default_mappings_dir, load_templates, parse_template
from tests.sandbox.odata_v4_client import Model, ODataError, ODataV4Client

TOKEN = "generic-odata-token"
BASE = "https://fno.test"
CUSTOMERS = Path(__file__).parent.parent / "fixtures" / "templates" / "company-customers.json"
CROSS = {"cross-company": "true"}
TENDERS = ["AsCardTender", "AsContactTender", "NoTender", "Blocked"]


@pytest.fixture
async def odata() -> AsyncIterator[ODataV4Client]:
    templates = dict(load_templates(default_mappings_dir()))
    customers = parse_template(CUSTOMERS.read_text(), str(CUSTOMERS))
    templates[customers.name] = customers
    app = create_app(token=TOKEN, seed=11, templates=templates, public_url=BASE)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE,
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        # Test data through the emulator's admin seed, not through the client under test.
        cards = [{"CardNumber": f"G-{i:03d}", "CardTenderType": TENDERS[i % 4], "LoyaltyEnrollmentTime": i}
                 for i in range(25)]
        assert (await http.post("/_admin/entities/RetailLoyaltyCards/rows", json=cards)).status_code == 200
        people = [{"dataAreaId": company, "CustomerAccount": f"{company.upper()}-{i}", "CreditLimit": 10 * i}
                  for company in ("usrt", "usmf") for i in range(3)]
        assert (await http.post("/_admin/entities/CustomersV3/rows", json=people)).status_code == 200
        client = ODataV4Client(http, f"{BASE}/data")
        await client.load_metadata()
        yield client


def matches(value: Any, declared: str, model: Model) -> bool:
    """Whether a JSON value is a valid instance of a declared CSDL type (OData JSON Format §7)."""
    if declared in model.enums:
        return value in model.enums[declared]
    if declared == "Edm.String":
        return isinstance(value, str)
    if declared == "Edm.Boolean":
        return isinstance(value, bool)
    if declared in ("Edm.Int32", "Edm.Int64"):
        return isinstance(value, int) and not isinstance(value, bool)
    if declared in ("Edm.Decimal", "Edm.Double"):
        return isinstance(value, int | float | str) and not isinstance(value, bool)
    if declared == "Edm.DateTimeOffset":
        return isinstance(value, str) and datetime.fromisoformat(value.replace("Z", "+00:00")).tzinfo is not None
    if declared == "Edm.Date":
        return isinstance(value, str) and len(value) == 10
    if declared == "Edm.Guid":
        return isinstance(value, str) and len(value) == 36
    return False


async def test_every_row_of_every_entity_set_matches_the_declared_model(odata: ODataV4Client) -> None:
    model = odata.model
    assert {"RetailLoyaltyCards", "CustomersV3"} <= set(model.entity_sets)
    assert model.entity_sets["CustomersV3"].key == ["dataAreaId", "CustomerAccount"]
    seen = 0
    for name, entity in model.entity_sets.items():
        async for page in odata.pages(name, options=CROSS):
            for row in page["value"]:
                data = {k: v for k, v in row.items() if "@" not in k}
                assert set(data) == set(entity.properties), name
                for prop, value in data.items():
                    assert matches(value, entity.properties[prop], model), (name, prop, value)
                assert row["@odata.etag"].startswith('W/"')
                seen += 1
    assert seen >= 31


async def test_pages_by_next_link_with_counts(odata: ODataV4Client) -> None:
    sizes, first = [], None
    async for page in odata.pages("RetailLoyaltyCards", options={"$count": "true", "$orderby": "CardNumber"},
                                  page_size=10):
        first = first or page
        sizes.append(len(page["value"]))
    assert sizes == [10, 10, 5]
    assert first is not None and first["@odata.count"] == 25
    assert await odata.count("RetailLoyaltyCards") == 25
    blocked = [r async for p in odata.pages("RetailLoyaltyCards", options={
        "$filter": "CardTenderType eq Microsoft.Dynamics.DataEntities.RetailLoyaltyTenderTypeBase'Blocked'"})
        for r in p["value"]]
    assert sorted(r["CardNumber"] for r in blocked) == [f"G-{i:03d}" for i in range(25) if i % 4 == 3]


async def test_cross_company_holds_on_every_page(odata: ODataV4Client) -> None:
    own = [r async for p in odata.pages("CustomersV3", page_size=2) for r in p["value"]]
    assert {r["dataAreaId"] for r in own} == {"usrt"}
    companies = [r["dataAreaId"] async for p in odata.pages("CustomersV3", options=CROSS, page_size=2)
                 for r in p["value"]]
    assert sorted(companies) == ["usmf"] * 3 + ["usrt"] * 3
    assert await odata.count("CustomersV3", CROSS) == 6
    assert await odata.count("CustomersV3") == 3


async def test_updates_with_if_match_on_the_etag(odata: ODataV4Client) -> None:
    key = {"dataAreaId": "usmf", "CustomerAccount": "USMF-1"}
    before = await odata.read("CustomersV3", key, CROSS)
    await odata.update("CustomersV3", key, {"CreditLimit": 500}, before["@odata.etag"], CROSS)
    after = await odata.read("CustomersV3", key, CROSS)
    assert after["CreditLimit"] == 500
    assert after["@odata.etag"] != before["@odata.etag"]
    with pytest.raises(ODataError) as stale:
        await odata.update("CustomersV3", key, {"CreditLimit": 1}, before["@odata.etag"], CROSS)
    assert stale.value.status == 412
    assert (await odata.read("CustomersV3", key, CROSS))["CreditLimit"] == 500
    with pytest.raises(ODataError) as elsewhere:
        await odata.read("CustomersV3", key)  # another company's row without cross-company
    assert elsewhere.value.status == 404
