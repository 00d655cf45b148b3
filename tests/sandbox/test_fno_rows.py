"""Contract tests of the F&O emulator: rows by key, create / update / delete, JSON conventions, errors, 401."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from devkit.sandbox.fno import create_app
from loyaltysync.templates import default_mappings_dir, load_templates, parse_template

TOKEN = "fno-test-token"
BASE = "https://fno.test"
WRITE_EXCEPTION = "Microsoft.Dynamics.Platform.Integration.Services.OData.AxODataWriteException"
CUSTOMERS = Path(__file__).parent.parent / "fixtures" / "templates" / "company-customers.json"


@pytest.fixture
async def fo() -> AsyncIterator[httpx.AsyncClient]:
    templates = dict(load_templates(default_mappings_dir()))
    customers = parse_template(CUSTOMERS.read_text(), str(CUSTOMERS))
    templates[customers.name] = customers
    app = create_app(token=TOKEN, seed=7, templates=templates, public_url=BASE)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE,
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield client


def inner(response: httpx.Response) -> dict[str, str]:
    error = response.json()["error"]
    return error["innererror"]


async def test_create_returns_201_with_the_full_row_defaults_and_etag(fo: httpx.AsyncClient) -> None:
    response = await fo.post("/data/RetailLoyaltyCards", json={"CardNumber": "C-1", "PartyNumber": "004021"})
    assert response.status_code == 201
    row = response.json()
    assert response.headers["Location"] == f"{BASE}/data/RetailLoyaltyCards('C-1')"
    assert row["@odata.context"] == f"{BASE}/data/$metadata#RetailLoyaltyCards/$entity"
    assert row["CardNumber"] == "C-1" and row["PartyNumber"] == "004021"
    # F&O has no nulls: strings "", Int32 0, enums their first member, dates 1900-01-01.
    assert row["ReplacementCardNumber"] == "" and row["OmOperatingUnitNumber"] == ""
    assert row["LoyaltyEnrollmentTime"] == 0
    assert row["CardTenderType"] == "AsCardTender"
    assert row["LoyaltyEnrollmentDate"] == "1900-01-01T00:00:00Z"
    etag = row["@odata.etag"]
    assert etag.startswith('W/"') and etag.endswith('"')
    assert base64.b64decode(etag[3:-1]).decode().startswith("'0,")
    minimal = await fo.post("/data/LoyaltyLevels", json={"LevelPhrase": "Gold"}, headers={"Prefer": "return=minimal"})
    assert minimal.status_code == 204 and minimal.headers["OData-EntityId"] == f"{BASE}/data/LoyaltyLevels('Gold')"
    points = await fo.post("/data/RetailLoyaltyRewardPoints", json={"RewardPointId": "P-1"})
    assert points.json()["Redeemable"] == "No"
    assert points.json()["MaximumLoyaltyRewardPoints"] == 0


async def test_read_by_key_in_every_form(fo: httpx.AsyncClient) -> None:
    for number in ("C-1", "O'Brien", "A/B?C", "A(B)"):
        assert (await fo.post("/data/RetailLoyaltyCards", json={"CardNumber": number})).status_code == 201
    again = await fo.post("/data/RetailLoyaltyCards", json={"CardNumber": "X/Y"})
    assert again.headers["Location"].endswith("RetailLoyaltyCards('X%2FY')")
    assert (await fo.get(again.headers["Location"])).json()["CardNumber"] == "X/Y"
    assert (await fo.get("/data/RetailLoyaltyCards('C-1')")).json()["CardNumber"] == "C-1"
    assert (await fo.get("/data/RetailLoyaltyCards(CardNumber='C-1')")).json()["CardNumber"] == "C-1"
    assert (await fo.get("/data/RetailLoyaltyCards('O''Brien')")).json()["CardNumber"] == "O'Brien"
    assert (await fo.get("/data/RetailLoyaltyCards('A%2FB%3FC')")).json()["CardNumber"] == "A/B?C"
    assert (await fo.get("/data/RetailLoyaltyCards('A(B)')")).json()["CardNumber"] == "A(B)"
    # Keys compare case-insensitively, as F&O's SQL collation does.
    assert (await fo.get("/data/RetailLoyaltyCards('c-1')")).json()["CardNumber"] == "C-1"
    single = await fo.get("/data/RetailLoyaltyCards('C-1')/CardTenderType")
    assert single.json()["value"] == "AsCardTender"
    selected = (await fo.get("/data/RetailLoyaltyCards('C-1')?$select=CardNumber,PartyNumber")).json()
    assert set(selected) == {"@odata.context", "@odata.etag", "CardNumber", "PartyNumber"}
    missing = await fo.get("/data/RetailLoyaltyCards('NOPE')")
    assert missing.status_code == 404
    wrong_name = await fo.get("/data/RetailLoyaltyCards(PartyNumber='C-1')")
    assert wrong_name.status_code == 400


async def test_enums_dates_and_types_follow_fo_json(fo: httpx.AsyncClient) -> None:
    created = await fo.post("/data/RetailLoyaltyCards", json={
        "CardNumber": "C-2", "CardTenderType": "Blocked",
        "LoyaltyEnrollmentDate": "2026-07-15T12:30:45.123+02:00", "LoyaltyEnrollmentTime": 3600,
    })
    row = created.json()
    assert row["CardTenderType"] == "Blocked"
    assert row["LoyaltyEnrollmentDate"] == "2026-07-15T10:30:45Z"  # UTC, second precision
    assert row["LoyaltyEnrollmentTime"] == 3600
    bad_enum = await fo.post("/data/RetailLoyaltyCards", json={"CardNumber": "C-3", "CardTenderType": "Gold"})
    assert bad_enum.status_code == 400
    assert "RetailLoyaltyTenderTypeBase" in inner(bad_enum)["message"]
    integer_enum = await fo.post("/data/RetailLoyaltyCards", json={"CardNumber": "C-3", "CardTenderType": 3})
    assert integer_enum.status_code == 400
    naive_date = await fo.post("/data/RetailLoyaltyCards", json={"CardNumber": "C-3",
                                                                  "LoyaltyEnrollmentDate": "2026-07-15T10:00:00"})
    assert naive_date.status_code == 400
    text_int = await fo.post("/data/RetailLoyaltyCards", json={"CardNumber": "C-3", "LoyaltyEnrollmentTime": "5"})
    assert text_int.status_code == 400
    unknown = await fo.post("/data/RetailLoyaltyCards", json={"CardNumber": "C-3", "Colour": "red"})
    assert unknown.status_code == 400
    assert "Colour" in inner(unknown)["message"]
    decimal = await fo.post("/data/RetailLoyaltyRewardPoints",
                            json={"RewardPointId": "P-2", "MaximumLoyaltyRewardPoints": 1500.5,
                                  "Redeemable": "Yes", "ExpirationTimeUnit": "Month"})
    assert decimal.json()["MaximumLoyaltyRewardPoints"] == 1500.5
    assert decimal.json()["Redeemable"] == "Yes" and decimal.json()["ExpirationTimeUnit"] == "Month"
    assert (await fo.get("/data/RetailLoyaltyCards('C-3')")).status_code == 404  # nothing half-written


async def test_write_failures_have_the_fo_error_shape(fo: httpx.AsyncClient) -> None:
    no_key = await fo.post("/data/RetailLoyaltyCards", json={"PartyNumber": "1"})
    assert no_key.status_code == 400
    body = no_key.json()["error"]
    assert body["code"] == "" and body["message"] == "An error has occurred."
    assert body["innererror"]["type"] == WRITE_EXCEPTION and body["innererror"]["stacktrace"] == ""
    assert "CardNumber" in body["innererror"]["message"]
    assert (await fo.post("/data/RetailLoyaltyCards", json={"CardNumber": "C-1"})).status_code == 201
    duplicate = await fo.post("/data/RetailLoyaltyCards", json={"CardNumber": "c-1"})
    assert duplicate.status_code == 500
    assert inner(duplicate)["type"] == WRITE_EXCEPTION
    assert inner(duplicate)["message"].endswith("The record already exists.")
    too_long = await fo.post("/data/RetailLoyaltyCards", json={"CardNumber": "X" * 31})
    assert too_long.status_code == 400
    assert "'CardNumber'" in inner(too_long)["message"] and "30" in inner(too_long)["message"]
    currency = await fo.post("/data/RetailLoyaltyRewardPoints",
                             json={"RewardPointId": "P", "RewardPointCurrency": "EURO"})
    assert currency.status_code == 400 and "RewardPointCurrency" in inner(currency)["message"]
    not_json = await fo.post("/data/RetailLoyaltyCards", content=b"{", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 400


async def test_patch_updates_put_is_accepted_and_there_is_no_upsert(fo: httpx.AsyncClient) -> None:
    await fo.post("/data/RetailLoyaltyCards", json={"CardNumber": "C-1", "PartyNumber": "1"})
    patched = await fo.patch("/data/RetailLoyaltyCards('C-1')", json={"PartyNumber": "2", "CardTenderType": "Blocked"})
    assert patched.status_code == 204 and patched.content == b""
    row = (await fo.get("/data/RetailLoyaltyCards('C-1')")).json()
    assert row["PartyNumber"] == "2" and row["CardTenderType"] == "Blocked"
    put = await fo.put("/data/RetailLoyaltyCards(CardNumber='C-1')", json={"OmOperatingUnitNumber": "012"})
    assert put.status_code == 204
    after = (await fo.get("/data/RetailLoyaltyCards('C-1')")).json()
    assert after["OmOperatingUnitNumber"] == "012" and after["PartyNumber"] == "2"
    assert after["@odata.etag"] != row["@odata.etag"]
    missing = await fo.patch("/data/RetailLoyaltyCards('C-404')", json={"PartyNumber": "2"})
    assert missing.status_code == 404
    assert (await fo.get("/data/RetailLoyaltyCards('C-404')")).status_code == 404
    stale = await fo.patch("/data/RetailLoyaltyCards('C-1')", json={"PartyNumber": "3"},
                           headers={"If-Match": row["@odata.etag"]})
    assert stale.status_code == 412
    rekey = await fo.patch("/data/RetailLoyaltyCards('C-1')", json={"CardNumber": "C-9"})
    assert rekey.status_code == 400
    bad_enum = await fo.patch("/data/RetailLoyaltyCards('C-1')", json={"CardTenderType": "Nope"})
    assert bad_enum.status_code == 400


async def test_delete_answers_204_then_404(fo: httpx.AsyncClient) -> None:
    await fo.post("/data/LoyaltyLevels", json={"LevelPhrase": "Gold", "LevelDescription": "Gold tier"})
    assert (await fo.delete("/data/LoyaltyLevels('Gold')")).status_code == 204
    assert (await fo.get("/data/LoyaltyLevels('Gold')")).status_code == 404
    assert (await fo.delete("/data/LoyaltyLevels('Gold')")).status_code == 404


async def test_company_specific_entities_default_to_the_users_company(fo: httpx.AsyncClient) -> None:
    own = await fo.post("/data/CustomersV3", json={"CustomerAccount": "C1", "OrganizationName": "Own"})
    assert own.json()["dataAreaId"] == "usrt"  # the default company fills a missing dataAreaId
    assert own.headers["Location"] == f"{BASE}/data/CustomersV3(dataAreaId='usrt',CustomerAccount='C1')"
    other = await fo.post("/data/CustomersV3", json={"dataAreaId": "USMF", "CustomerAccount": "C1",
                                                     "CreditLimit": 10, "CreditLimitIsMandatory": True})
    assert other.status_code == 201 and other.json()["dataAreaId"] == "usmf"
    listed = (await fo.get("/data/CustomersV3")).json()["value"]
    assert [r["dataAreaId"] for r in listed] == ["usrt"]
    everything = (await fo.get("/data/CustomersV3?cross-company=true")).json()["value"]
    assert sorted(r["dataAreaId"] for r in everything) == ["usmf", "usrt"]
    one = (await fo.get("/data/CustomersV3?cross-company=true&$filter=dataAreaId eq 'usmf'")).json()["value"]
    assert [r["CreditLimit"] for r in one] == [10]
    assert (await fo.get("/data/CustomersV3(dataAreaId='usmf',CustomerAccount='C1')")).status_code == 404
    found = await fo.get("/data/CustomersV3(dataAreaId='usmf',CustomerAccount='C1')?cross-company=true")
    assert found.status_code == 200 and found.json()["CreditLimitIsMandatory"] is True
    assert (await fo.get("/data/CustomersV3(dataAreaId='usrt',CustomerAccount='C1')")).status_code == 200
    assert (await fo.get("/data/CustomersV3('C1')")).status_code == 400  # every key field is required
    assert (await fo.patch("/data/CustomersV3(dataAreaId='usmf',CustomerAccount='C1')",
                           json={"OrganizationName": "x"})).status_code == 404
    assert (await fo.get("/data/CustomersV3/$count?cross-company=true")).text == "2"


async def test_unknown_sets_and_the_service_document(fo: httpx.AsyncClient) -> None:
    unknown = await fo.get("/data/NoSuchEntities")
    assert unknown.status_code == 404
    assert "No HTTP resource was found" in unknown.json()["error"]["message"]
    assert (await fo.get("/data")).json()["@odata.context"] == f"{BASE}/data/$metadata"
    root = (await fo.get("/data/")).json()
    names = {s["name"] for s in root["value"]}
    assert {"RetailLoyaltyCards", "LoyaltyLevels", "RetailLoyaltyRewardPoints", "CustomersV3"} <= names


async def test_missing_or_wrong_token_is_401(fo: httpx.AsyncClient) -> None:
    anonymous = await fo.get("/data/RetailLoyaltyCards", headers={"Authorization": ""})
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = await fo.get("/data/RetailLoyaltyCards", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    admin = await fo.get("/_admin/stats", headers={"Authorization": "Bearer nope"})
    assert admin.status_code == 401
