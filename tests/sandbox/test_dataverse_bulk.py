"""Dataverse emulator contract: `$batch` (§1.7), CreateMultiple / UpdateMultiple / UpsertMultiple (§1.8), WhoAmI."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette

from devkit.sandbox.batch import parse_batch_response
from devkit.sandbox.dataverse import AGENT_USER, CURRENCY_IDS, INTEGRATION_USER, create_app
from devkit.sandbox.dataverse.org import Organization

TOKEN = "dv-bulk-token"
BASE = "http://localhost/api/data/v9.2/"
CARD_TYPE = "Microsoft.Dynamics.CRM.msdyn_loyaltycard"


@pytest.fixture
async def dv() -> AsyncIterator[tuple[Organization, httpx.AsyncClient]]:
    app: Starlette = create_app(token=TOKEN)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        yield app.state.dataverse, c


def part(method: str, url: str, body: dict[str, object] | None = None, content_id: str | None = None) -> str:
    lines = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if content_id:
        lines.append(f"Content-ID: {content_id}")
    target = url if url.startswith("$") else f"/api/data/v9.2/{url}"
    lines += ["", f"{method} {target} HTTP/1.1"]
    if body is not None:
        lines += ["Content-Type: application/json;type=entry", "", json.dumps(body)]
    else:
        lines += [""]
    return "\r\n".join(lines) + "\r\n"


def batch(items: list[str | list[str]]) -> bytes:
    out = []
    for item in items:
        out.append("--batch_AAA\r\n")
        if isinstance(item, list):
            out.append("Content-Type: multipart/mixed;boundary=changeset_BBB\r\n\r\n")
            for inner in item:
                out.append("--changeset_BBB\r\n" + inner)
            out.append("--changeset_BBB--\r\n")
        else:
            out.append(item)
    out.append("--batch_AAA--\r\n")
    return "".join(out).encode()


async def post_batch(client: httpx.AsyncClient, body: bytes, prefer: str | None = None) -> httpx.Response:
    headers = {"Content-Type": "multipart/mixed;boundary=batch_AAA"}
    if prefer:
        headers["Prefer"] = prefer
    return await client.post("$batch", content=body, headers=headers)


def cards(org: Organization) -> set[str]:
    return {row["msdyn_cardnumber"] for row in org.tables["msdyn_loyaltycard"].scan()}


# -- $batch ---------------------------------------------------------------------------------


async def test_change_set_with_content_id_reference_commits_together(
    dv: tuple[Organization, httpx.AsyncClient],
) -> None:
    _, client = dv
    body = batch(
        [
            [
                part("POST", "msdyn_loyaltycards", {"msdyn_cardnumber": "B-1"}, content_id="1"),
                part("PATCH", "$1", {"msdyn_partynumber": "P-9"}),
            ],
            part("GET", "msdyn_loyaltycards?$select=msdyn_cardnumber,msdyn_partynumber"),
        ]
    )
    response = await post_batch(client, body)
    assert response.status_code == 200
    items = parse_batch_response(response.content, response.headers["content-type"])
    changeset, query = items
    assert isinstance(changeset, list) and [p.status for p in changeset] == [204, 204]
    assert changeset[0].content_id == "1"
    assert not isinstance(query, list)
    assert json.loads(query.body)["value"][0]["msdyn_partynumber"] == "P-9"


async def test_a_failing_change_set_rolls_back_and_the_batch_answers_400_with_that_part(
    dv: tuple[Organization, httpx.AsyncClient],
) -> None:
    org, client = dv
    body = batch(
        [
            [
                part("POST", "msdyn_loyaltycards", {"msdyn_cardnumber": "B-2"}),
                part("POST", "msdyn_loyaltycards", {"msdyn_cardnumber": "B-3", "msdyn_cardtendertype": 1}),
            ],
            part("POST", "msdyn_loyaltycards", {"msdyn_cardnumber": "B-4"}),
        ]
    )
    response = await post_batch(client, body)
    assert response.status_code == 400
    items = parse_batch_response(response.content, response.headers["content-type"])
    assert len(items) == 1
    failed = items[0]
    assert not isinstance(failed, list)
    assert json.loads(failed.body)["error"]["code"] == "0x8004431A"
    assert cards(org) == set()


async def test_continue_on_error_answers_200_with_every_part(dv: tuple[Organization, httpx.AsyncClient]) -> None:
    org, client = dv
    body = batch(
        [
            part("POST", "msdyn_loyaltycards", {"msdyn_cardnumber": "X" * 40}),
            part("POST", "msdyn_loyaltycards", {"msdyn_cardnumber": "B-5"}),
        ]
    )
    response = await post_batch(client, body, prefer="odata.continue-on-error")
    assert response.status_code == 200
    assert response.headers["Preference-Applied"] == "odata.continue-on-error"
    items = parse_batch_response(response.content, response.headers["content-type"])
    assert [i.status for i in items if not isinstance(i, list)] == [400, 204]
    assert cards(org) == {"B-5"}


async def test_batch_limits_and_syntax(dv: tuple[Organization, httpx.AsyncClient]) -> None:
    _, client = dv
    too_many = batch([part("GET", "WhoAmI") for _ in range(1001)])
    response = await post_batch(client, too_many)
    assert response.status_code == 400
    assert "1000" in response.json()["error"]["message"]
    lf_only = batch([part("GET", "WhoAmI")]).replace(b"\r\n", b"\n")
    bad = await post_batch(client, lf_only)
    assert bad.status_code == 400
    assert bad.json()["error"] == {"code": "0x80048d19", "message": "Stream was not readable."}


async def test_batch_parts_run_as_the_impersonated_caller(dv: tuple[Organization, httpx.AsyncClient]) -> None:
    _, client = dv
    response = await client.post(
        "$batch",
        content=batch([part("GET", "WhoAmI")]),
        headers={
            "Content-Type": "multipart/mixed;boundary=batch_AAA",
            "CallerObjectId": AGENT_USER.azureactivedirectoryobjectid,
        },
    )
    item = parse_batch_response(response.content, response.headers["content-type"])[0]
    assert not isinstance(item, list)
    assert json.loads(item.body)["UserId"] == AGENT_USER.systemuserid


# -- bulk messages --------------------------------------------------------------------------


async def test_upsert_multiple_by_odata_id_and_by_key_columns_answers_204(
    dv: tuple[Organization, httpx.AsyncClient],
) -> None:
    org, client = dv
    await client.post("msdyn_loyaltycards", json={"msdyn_cardnumber": "U-1", "msdyn_partynumber": "old"})
    response = await client.post(
        "msdyn_loyaltycards/Microsoft.Dynamics.CRM.UpsertMultiple",
        json={
            "Targets": [
                {
                    "@odata.type": CARD_TYPE,
                    "@odata.id": "msdyn_loyaltycards(msdyn_cardnumber='U-1')",
                    "msdyn_partynumber": "new",
                },
                {
                    "@odata.type": CARD_TYPE,
                    "@odata.id": "msdyn_loyaltycards(msdyn_cardnumber='U-2')",
                    "msdyn_partynumber": "p2",
                },
                {"@odata.type": CARD_TYPE, "msdyn_cardnumber": "U-3", "msdyn_cardtendertype": 806380000},
            ]
        },
    )
    assert response.status_code == 204
    assert response.content == b""
    rows = {r["msdyn_cardnumber"]: r for r in org.tables["msdyn_loyaltycard"].scan()}
    assert set(rows) == {"U-1", "U-2", "U-3"}
    assert rows["U-1"]["msdyn_partynumber"] == "new"
    assert rows["U-2"]["msdyn_partynumber"] == "p2"


async def test_upsert_multiple_needs_odata_type_and_one_bad_target_rolls_back_all(
    dv: tuple[Organization, httpx.AsyncClient],
) -> None:
    org, client = dv
    url = "msdyn_loyaltycards/Microsoft.Dynamics.CRM.UpsertMultiple"
    missing_type = await client.post(url, json={"Targets": [{"msdyn_cardnumber": "M-1"}]})
    assert missing_type.status_code == 400
    assert "@odata.type" in missing_type.json()["error"]["message"]
    bad = await client.post(
        url,
        json={
            "Targets": [
                {"@odata.type": CARD_TYPE, "msdyn_cardnumber": "M-2"},
                {"@odata.type": CARD_TYPE, "msdyn_cardnumber": "M-3", "msdyn_cardtendertype": 42},
            ]
        },
    )
    assert bad.status_code == 400
    assert cards(org) == set()


async def test_create_multiple_answers_200_with_ids_and_update_multiple_204(
    dv: tuple[Organization, httpx.AsyncClient],
) -> None:
    org, client = dv
    created = await client.post(
        "msdyn_loyaltyrewardpoints/Microsoft.Dynamics.CRM.CreateMultiple",
        json={
            "Targets": [
                {
                    "@odata.type": "Microsoft.Dynamics.CRM.msdyn_loyaltyrewardpoint",
                    "msdyn_rewardpointid": f"R-{i}",
                    "msdyn_rewardpointcurrency@odata.bind": "/transactioncurrencies(isocurrencycode='GBP')",
                }
                for i in range(3)
            ]
        },
    )
    assert created.status_code == 200
    body = created.json()
    assert body["@odata.context"] == f"{BASE}$metadata#Microsoft.Dynamics.CRM.CreateMultipleResponse"
    assert len(body["Ids"]) == 3
    table = org.tables["msdyn_loyaltyrewardpoint"]
    assert {table.get(i)["msdyn_rewardpointcurrency"] for i in body["Ids"]} == {CURRENCY_IDS["GBP"]}
    updated = await client.post(
        "msdyn_loyaltyrewardpoints/Microsoft.Dynamics.CRM.UpdateMultiple",
        json={
            "Targets": [
                {
                    "@odata.type": "Microsoft.Dynamics.CRM.msdyn_loyaltyrewardpoint",
                    "msdyn_loyaltyrewardpointid": i,
                    "msdyn_redeemranking": 7,
                }
                for i in body["Ids"]
            ]
        },
    )
    assert updated.status_code == 204
    assert {table.get(i)["msdyn_redeemranking"] for i in body["Ids"]} == {7}


async def test_bulk_messages_only_where_the_table_supports_them(dv: tuple[Organization, httpx.AsyncClient]) -> None:
    _, client = dv
    response = await client.post("systemusers/Microsoft.Dynamics.CRM.CreateMultiple", json={"Targets": []})
    assert response.status_code == 400
    assert (
        response.json()["error"]["message"]
        == "The 'CreateMultiple' method does not support entities of type 'systemuser'."
    )


async def test_a_bulk_call_counts_as_one_request(dv: tuple[Organization, httpx.AsyncClient]) -> None:
    _, client = dv
    before = await client.get("WhoAmI")
    await client.post(
        "msdyn_loyaltycards/Microsoft.Dynamics.CRM.UpsertMultiple",
        json={"Targets": [{"@odata.type": CARD_TYPE, "msdyn_cardnumber": f"ONE-{i}"} for i in range(200)]},
    )
    after = await client.get("WhoAmI")
    burst = "x-ms-ratelimit-burst-remaining-xrm-requests"
    assert int(before.headers[burst]) - int(after.headers[burst]) == 2


# -- WhoAmI ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["WhoAmI", "WhoAmI()"])
async def test_who_am_i(dv: tuple[Organization, httpx.AsyncClient], path: str) -> None:
    _, client = dv
    body = (await client.get(path)).json()
    assert body["@odata.context"] == f"{BASE}$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse"
    assert body["UserId"] == INTEGRATION_USER.systemuserid
    assert set(body) == {"@odata.context", "BusinessUnitId", "UserId", "OrganizationId"}


async def test_post_who_am_i_is_404(dv: tuple[Organization, httpx.AsyncClient]) -> None:
    _, client = dv
    response = await client.post("WhoAmI")
    assert response.status_code == 404
    assert response.json()["error"]["message"].startswith("No HTTP resource was found that matches the request URI")
