"""Dataverse emulator contract: create, read, update/upsert, delete, keys, lookups and validation errors.

Each test names the rule of docs/wire-formats.md part A §1 it pins down.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from devkit.sandbox.dataverse import AGENT_USER, CURRENCY_IDS, INTEGRATION_USER, create_app

TOKEN = "dv-crud-token"
BASE = "http://localhost/api/data/v9.2/"
CARDS = "msdyn_loyaltycards"
POINTS = "msdyn_loyaltyrewardpoints"


@pytest.fixture
async def dv() -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    app = create_app(token=TOKEN)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        yield app, c


@pytest.fixture
def client(dv: tuple[Starlette, httpx.AsyncClient]) -> httpx.AsyncClient:
    return dv[1]


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    return dict(body["error"])


async def create_card(client: httpx.AsyncClient, number: str, **columns: Any) -> str:
    response = await client.post(CARDS, json={"msdyn_cardnumber": number, **columns})
    assert response.status_code == 204, response.text
    return response.headers["OData-EntityId"].rsplit("(", 1)[1].rstrip(")")


# -- create ---------------------------------------------------------------------------------


async def test_create_answers_204_with_the_entity_id_and_the_row_reads_back(client: httpx.AsyncClient) -> None:
    response = await client.post(CARDS, json={"msdyn_cardnumber": "C-1", "msdyn_cardtendertype": 806380003})
    assert response.status_code == 204
    assert response.content == b""
    location = response.headers["OData-EntityId"]
    assert location.startswith(BASE + "msdyn_loyaltycards(")
    row_id = location.rsplit("(", 1)[1].rstrip(")")
    row = (await client.get(f"{CARDS}({row_id})")).json()
    assert row["msdyn_cardnumber"] == "C-1"
    assert row["msdyn_cardtendertype"] == 806380003
    assert row["msdyn_loyaltycardid"] == row_id
    assert row["@odata.context"] == BASE + "$metadata#msdyn_loyaltycards/$entity"


async def test_create_with_return_representation_answers_201_with_the_row_and_no_entity_id(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        f"{CARDS}?$select=msdyn_cardnumber",
        json={"msdyn_cardnumber": "C-2"},
        headers={"Prefer": "return=representation"},
    )
    assert response.status_code == 201
    assert "OData-EntityId" not in response.headers
    assert response.headers["Preference-Applied"] == "return=representation"
    body = response.json()
    assert set(body) == {"@odata.context", "@odata.etag", "msdyn_loyaltycardid", "msdyn_cardnumber"}
    assert body["@odata.etag"] == response.headers["ETag"]


async def test_every_row_has_platform_columns_and_a_version_etag_monotonic_across_tables(
    client: httpx.AsyncClient,
) -> None:
    card = await create_card(client, "C-3")
    await client.post("msdyn_loyaltylevels", json={"msdyn_levelphrase": "Gold"})
    await client.patch(f"{CARDS}({card})", json={"msdyn_partynumber": "P-1"})
    level = (await client.get("msdyn_loyaltylevels(msdyn_levelphrase='Gold')")).json()
    row = (await client.get(f"{CARDS}({card})")).json()
    assert row["versionnumber"] > level["versionnumber"]
    assert row["@odata.etag"] == f'W/"{row["versionnumber"]}"'
    assert row["createdon"].endswith("Z") and len(row["createdon"]) == 20
    assert row["modifiedon"] >= row["createdon"]
    assert row["_createdby_value"] == row["_modifiedby_value"] == INTEGRATION_USER.systemuserid
    assert row["_createdonbehalfby_value"] is None
    assert (row["statecode"], row["statuscode"]) == (0, 1)


async def test_duplicate_alternate_key_on_create_is_412_0x80040237_case_insensitively(
    client: httpx.AsyncClient,
) -> None:
    await create_card(client, "DUP-1")
    response = await client.post(CARDS, json={"msdyn_cardnumber": "dup-1"})
    assert response.status_code == 412
    error = error_of(response)
    assert error["code"] == "0x80040237"
    assert "duplicate key" in error["message"]


# -- read -----------------------------------------------------------------------------------


async def test_read_by_alternate_key_decodes_the_url_and_unescapes_quotes(client: httpx.AsyncClient) -> None:
    row_id = await create_card(client, "O'B 1")
    response = await client.get("msdyn_loyaltycards(msdyn_cardnumber='O%27%27B%201')")
    assert response.status_code == 200
    assert response.json()["msdyn_loyaltycardid"] == row_id
    by_name = await client.get(f"{CARDS}(msdyn_loyaltycardid={row_id})")
    assert by_name.json()["msdyn_cardnumber"] == "O'B 1"


async def test_read_of_a_missing_row_is_404_0x80040217(client: httpx.AsyncClient) -> None:
    response = await client.get(f"{CARDS}(00000000-0000-0000-0000-00000000abcd)")
    assert response.status_code == 404
    assert error_of(response)["code"] == "0x80040217"
    assert "Does Not Exist" in error_of(response)["message"]


@pytest.mark.parametrize("char", list("/<>*%&:\\?+"))
async def test_alternate_key_with_a_reserved_character_is_refused(client: httpx.AsyncClient, char: str) -> None:
    from urllib.parse import quote

    response = await client.get(f"{CARDS}(msdyn_cardnumber='{quote('A' + char + 'B', safe='')}')")
    assert response.status_code == 400
    assert "potentially dangerous" in error_of(response)["message"]


async def test_a_column_that_is_not_a_key_in_the_predicate_is_the_documented_error(client: httpx.AsyncClient) -> None:
    response = await client.get(f"{CARDS}(msdyn_partynumber='P-1')")
    assert response.status_code == 400
    assert error_of(response)["message"].startswith(
        "The key in the request URI is not valid for resource 'Microsoft.Dynamics.CRM.msdyn_loyaltycard'. "
        "Ensure that the names and number of key properties match"
    )


async def test_conditional_get_answers_304_when_the_etag_matches(client: httpx.AsyncClient) -> None:
    row_id = await create_card(client, "ETAG-1")
    first = await client.get(f"{CARDS}({row_id})")
    again = await client.get(f"{CARDS}({row_id})", headers={"If-None-Match": first.headers["ETag"]})
    assert again.status_code == 304
    annotated = await client.get(
        f"{CARDS}({row_id})",
        headers={"If-None-Match": first.headers["ETag"], "Prefer": 'odata.include-annotations="*"'},
    )
    assert annotated.status_code == 200


# -- update and upsert ----------------------------------------------------------------------


async def test_patch_upserts_204_and_twice_creates_no_duplicate(client: httpx.AsyncClient) -> None:
    url = "msdyn_loyaltycards(msdyn_cardnumber='UP-1')"
    assert (await client.patch(url, json={"msdyn_partynumber": "P-1"})).status_code == 204
    assert (await client.patch(url, json={"msdyn_partynumber": "P-2"})).status_code == 204
    rows = (await client.get(f"{CARDS}?$filter=msdyn_cardnumber eq 'UP-1'")).json()["value"]
    assert len(rows) == 1
    assert rows[0]["msdyn_partynumber"] == "P-2"


async def test_upsert_with_return_representation_is_201_on_create_and_200_on_update(client: httpx.AsyncClient) -> None:
    url = "msdyn_loyaltycards(msdyn_cardnumber='UP-2')"
    prefer = {"Prefer": "return=representation"}
    created = await client.patch(url, json={"msdyn_partynumber": "A"}, headers=prefer)
    updated = await client.patch(url, json={"msdyn_partynumber": "B"}, headers=prefer)
    assert (created.status_code, updated.status_code) == (201, 200)
    assert created.json()["msdyn_cardnumber"] == "UP-2"
    assert updated.json()["msdyn_partynumber"] == "B"
    assert updated.json()["versionnumber"] > created.json()["versionnumber"]


async def test_if_match_star_updates_only_and_misses_with_404(client: httpx.AsyncClient) -> None:
    missing_id = "00000000-0000-0000-0000-0000000000aa"
    by_id = await client.patch(f"{CARDS}({missing_id})", json={"msdyn_partynumber": "X"}, headers={"If-Match": "*"})
    assert by_id.status_code == 404
    assert error_of(by_id) == {"code": "", "message": f"msdyn_loyaltycard With Id = {missing_id} Does Not Exist"}
    by_key = await client.patch(
        "msdyn_loyaltycards(msdyn_cardnumber='NOPE')", json={"msdyn_partynumber": "X"}, headers={"If-Match": "*"}
    )
    assert by_key.status_code == 404
    assert error_of(by_key)["code"] == "0x80060891"
    await create_card(client, "IM-1")
    ok = await client.patch(
        "msdyn_loyaltycards(msdyn_cardnumber='IM-1')", json={"msdyn_partynumber": "X"}, headers={"If-Match": "*"}
    )
    assert ok.status_code == 204


async def test_if_none_match_star_creates_only_and_an_existing_row_is_412(client: httpx.AsyncClient) -> None:
    url = "msdyn_loyaltycards(msdyn_cardnumber='INM-1')"
    assert (await client.patch(url, json={}, headers={"If-None-Match": "*"})).status_code == 204
    again = await client.patch(url, json={}, headers={"If-None-Match": "*"})
    assert again.status_code == 412
    assert error_of(again) == {"code": "", "message": "A record with matching key values already exists."}


async def test_if_match_etag_is_optimistic_concurrency_for_patch_and_delete(client: httpx.AsyncClient) -> None:
    row_id = await create_card(client, "OC-1")
    etag = (await client.get(f"{CARDS}({row_id})")).headers["ETag"]
    assert (
        await client.patch(f"{CARDS}({row_id})", json={"msdyn_partynumber": "A"}, headers={"If-Match": etag})
    ).status_code == 204
    stale = await client.patch(f"{CARDS}({row_id})", json={"msdyn_partynumber": "B"}, headers={"If-Match": etag})
    assert stale.status_code == 412
    assert error_of(stale)["message"] == (
        "The version of the existing record doesn't match the RowVersion property provided."
    )
    stale_delete = await client.delete(f"{CARDS}({row_id})", headers={"If-Match": etag})
    assert stale_delete.status_code == 412


async def test_update_changes_only_the_sent_columns(client: httpx.AsyncClient) -> None:
    row_id = await create_card(client, "U-1", msdyn_partynumber="P", msdyn_operatingunitnumber="OU")
    await client.patch(f"{CARDS}({row_id})", json={"msdyn_partynumber": "Q"})
    row = (await client.get(f"{CARDS}({row_id})")).json()
    assert (row["msdyn_partynumber"], row["msdyn_operatingunitnumber"]) == ("Q", "OU")


# -- delete and single columns --------------------------------------------------------------


async def test_delete_is_204_then_404(client: httpx.AsyncClient) -> None:
    row_id = await create_card(client, "D-1")
    assert (await client.delete(f"{CARDS}({row_id})")).status_code == 204
    again = await client.delete(f"{CARDS}({row_id})")
    assert again.status_code == 404
    assert error_of(again)["code"] == "0x80040217"


async def test_single_column_put_get_and_delete(client: httpx.AsyncClient) -> None:
    row_id = await create_card(client, "COL-1", msdyn_partynumber="P")
    assert (await client.put(f"{CARDS}({row_id})/msdyn_partynumber", json={"value": "Q"})).status_code == 204
    got = await client.get(f"{CARDS}({row_id})/msdyn_partynumber")
    assert got.json()["value"] == "Q"
    assert (await client.delete(f"{CARDS}({row_id})/msdyn_partynumber")).status_code == 204
    assert (await client.get(f"{CARDS}({row_id})")).json()["msdyn_partynumber"] is None
    too_long = await client.put(f"{CARDS}({row_id})/msdyn_partynumber", json={"value": "x" * 101})
    assert error_of(too_long)["code"] == "0x80044331"


# -- lookups --------------------------------------------------------------------------------


async def test_lookup_binds_by_id_and_by_alternate_key_reads_back_as_value_and_null_clears(
    client: httpx.AsyncClient,
) -> None:
    url = "msdyn_loyaltyrewardpoints(msdyn_rewardpointid='RP-1')"
    await client.patch(
        url, json={"msdyn_rewardpointcurrency@odata.bind": "/transactioncurrencies(isocurrencycode='EUR')"}
    )
    row = (await client.get(url, headers={"Prefer": 'odata.include-annotations="*"'})).json()
    assert row["_msdyn_rewardpointcurrency_value"] == CURRENCY_IDS["EUR"]
    assert row["_msdyn_rewardpointcurrency_value@OData.Community.Display.V1.FormattedValue"] == "Euro"
    assert row["_msdyn_rewardpointcurrency_value@Microsoft.Dynamics.CRM.lookuplogicalname"] == "transactioncurrency"
    await client.patch(
        url, json={"msdyn_rewardpointcurrency@odata.bind": f"{BASE}transactioncurrencies({CURRENCY_IDS['USD']})"}
    )
    assert (await client.get(url)).json()["_msdyn_rewardpointcurrency_value"] == CURRENCY_IDS["USD"]
    await client.patch(url, json={"msdyn_rewardpointcurrency@odata.bind": None})
    assert (await client.get(url)).json()["_msdyn_rewardpointcurrency_value"] is None


async def test_binding_an_undeclared_navigation_property_is_400_0x80048d19(client: httpx.AsyncClient) -> None:
    response = await client.post(
        POINTS,
        json={
            "msdyn_rewardpointid": "RP-2",
            "transactioncurrencyid@odata.bind": f"/transactioncurrencies({CURRENCY_IDS['USD']})",
        },
    )
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "0x80048d19"
    assert error["message"].startswith(
        "An undeclared property 'transactioncurrencyid' which only has property annotations in the payload"
    )


async def test_binding_a_missing_currency_is_404(client: httpx.AsyncClient) -> None:
    response = await client.post(
        POINTS,
        json={
            "msdyn_rewardpointid": "RP-3",
            "msdyn_rewardpointcurrency@odata.bind": "/transactioncurrencies(isocurrencycode='XXX')",
        },
    )
    assert response.status_code == 404


# -- validation -----------------------------------------------------------------------------


async def test_unknown_column_is_400_0x0_with_the_documented_message(client: httpx.AsyncClient) -> None:
    response = await client.post(CARDS, json={"msdyn_cardnumber": "V-1", "msdyn_color": "red"})
    assert response.status_code == 400
    assert error_of(response) == {
        "code": "0x0",
        "message": "Could not find a property named 'msdyn_color' on type 'Microsoft.Dynamics.CRM.msdyn_loyaltycard'.",
    }


async def test_choice_outside_the_option_set_is_0x8004431a_listing_accepted_values(client: httpx.AsyncClient) -> None:
    response = await client.post(CARDS, json={"msdyn_cardnumber": "V-2", "msdyn_cardtendertype": 5})
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "0x8004431A"
    assert error["message"] == (
        "A validation error occurred. The value 5 of 'msdyn_cardtendertype' on record of type 'msdyn_loyaltycard' "
        "is outside the valid range. Accepted Values: 806380000,806380001,806380002,806380003"
    )


async def test_string_longer_than_the_column_is_0x80044331(client: httpx.AsyncClient) -> None:
    response = await client.post(CARDS, json={"msdyn_cardnumber": "X" * 31})
    assert response.status_code == 400
    assert error_of(response) == {
        "code": "0x80044331",
        "message": "A validation error occurred. The length of the 'msdyn_cardnumber' attribute of the "
        "'msdyn_loyaltycard' entity exceeded the maximum allowed length of '30'.",
    }


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("msdyn_redeemable", "yes"),
        ("msdyn_redeemranking", 1.5),
        ("msdyn_redeemranking", "3"),
        ("msdyn_maximumloyaltyrewardpoints", "10"),
        ("msdyn_rewardpointtype", True),
    ],
)
async def test_values_of_the_wrong_type_are_refused(client: httpx.AsyncClient, column: str, value: Any) -> None:
    response = await client.post(POINTS, json={"msdyn_rewardpointid": "T-1", column: value})
    assert response.status_code == 400
    assert error_of(response)["message"].startswith("Cannot convert the literal")


async def test_typed_columns_store_what_they_are_given(client: httpx.AsyncClient) -> None:
    url = "msdyn_loyaltyrewardpoints(msdyn_rewardpointid='T-2')"
    await client.patch(
        url,
        json={
            "msdyn_redeemable": True,
            "msdyn_redeemranking": 3,
            "msdyn_maximumloyaltyrewardpoints": 1234.567,
            "msdyn_expirationtimeunit": 806380001,
            "msdyn_expirationtimevalue": 12,
        },
    )
    await client.patch(
        "msdyn_loyaltycards(msdyn_cardnumber='T-2')", json={"msdyn_enrollmentdate": "2026-03-01T10:30:00+02:00"}
    )
    row = (await client.get(url)).json()
    assert (row["msdyn_redeemable"], row["msdyn_redeemranking"]) == (True, 3)
    assert row["msdyn_maximumloyaltyrewardpoints"] == 1234.57  # decimal precision 2
    card = (await client.get("msdyn_loyaltycards(msdyn_cardnumber='T-2')")).json()
    assert card["msdyn_enrollmentdate"] == "2026-03-01T08:30:00Z"


async def test_unknown_entity_set_is_404_0x8006088a(client: httpx.AsyncClient) -> None:
    response = await client.get("msdyn_LoyaltyCards")
    assert response.status_code == 404
    assert error_of(response) == {
        "code": "0x8006088a",
        "message": "Resource not found for the segment 'msdyn_LoyaltyCards'.",
    }


async def test_body_that_is_not_json_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(CARDS, content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert error_of(response)["code"] == "0x80048d19"


async def test_system_columns_sent_by_a_client_are_ignored(client: httpx.AsyncClient) -> None:
    response = await client.post(
        CARDS,
        json={"msdyn_cardnumber": "SYS-1", "createdon": "2000-01-01T00:00:00Z", "versionnumber": 1},
        headers={"Prefer": "return=representation"},
    )
    body = response.json()
    assert body["createdon"] != "2000-01-01T00:00:00Z"
    assert body["versionnumber"] > 1


async def test_impersonated_writes_record_the_agent_and_the_application_on_behalf(client: httpx.AsyncClient) -> None:
    response = await client.post(
        CARDS,
        json={"msdyn_cardnumber": "IMP-1"},
        headers={"CallerObjectId": AGENT_USER.azureactivedirectoryobjectid, "Prefer": "return=representation"},
    )
    body = response.json()
    assert body["_createdby_value"] == AGENT_USER.systemuserid
    assert body["_createdonbehalfby_value"] == INTEGRATION_USER.systemuserid


async def test_read_one_row_with_an_expanded_lookup(client: httpx.AsyncClient) -> None:
    url = "msdyn_loyaltyrewardpoints(msdyn_rewardpointid='EX-1')"
    await client.patch(
        url, json={"msdyn_rewardpointcurrency@odata.bind": "/transactioncurrencies(isocurrencycode='JPY')"}
    )
    body = (
        await client.get(
            f"{url}?$select=msdyn_rewardpointid&$expand=msdyn_rewardpointcurrency($select=isocurrencycode)"
        )
    ).json()
    assert body["msdyn_rewardpointcurrency"]["isocurrencycode"] == "JPY"
    assert body["msdyn_rewardpointcurrency"]["transactioncurrencyid"] == CURRENCY_IDS["JPY"]
