"""Dataverse emulator contract: the bearer token, impersonation, injected faults and the admin extras."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette

from devkit.sandbox.common import Faults
from devkit.sandbox.dataverse import SUPERVISOR_USER, create_app

TOKEN = "dv-access-token"
ROOT = "http://localhost"
BASE = f"{ROOT}/api/data/v9.2/"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def dv() -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    app = create_app(token=TOKEN, seed=7)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=ROOT) as client:
        yield app, client


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}])
async def test_missing_or_wrong_token_is_401_in_dataverse_shape(
    dv: tuple[Starlette, httpx.AsyncClient],
    headers: dict[str, str],
) -> None:
    _, client = dv
    response = await client.get(f"{BASE}WhoAmI", headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert set(response.json()["error"]) == {"code", "message"}


async def test_impersonation_by_object_id_and_by_systemuserid(dv: tuple[Starlette, httpx.AsyncClient]) -> None:
    _, client = dv
    by_object = await client.get(
        f"{BASE}WhoAmI", headers={**AUTH, "CallerObjectId": SUPERVISOR_USER.azureactivedirectoryobjectid}
    )
    by_user = await client.get(f"{BASE}WhoAmI", headers={**AUTH, "MSCRMCallerID": SUPERVISOR_USER.systemuserid})
    assert by_object.json()["UserId"] == by_user.json()["UserId"] == SUPERVISOR_USER.systemuserid


async def test_unknown_or_malformed_caller_is_refused(dv: tuple[Starlette, httpx.AsyncClient]) -> None:
    _, client = dv
    unknown = await client.get(
        f"{BASE}WhoAmI", headers={**AUTH, "CallerObjectId": "11111111-2222-3333-4444-555555555555"}
    )
    assert unknown.status_code == 403
    assert unknown.json()["error"]["code"] == "0x80040220"
    malformed = await client.get(f"{BASE}WhoAmI", headers={**AUTH, "CallerObjectId": "alex"})
    assert malformed.status_code == 400


async def test_faults_answer_in_dataverse_shape(dv: tuple[Starlette, httpx.AsyncClient]) -> None:
    _, client = dv
    assert (await client.patch(f"{ROOT}/_admin/faults", json={"outage": True}, headers=AUTH)).status_code == 200
    down = await client.get(f"{BASE}WhoAmI", headers=AUTH)
    assert down.status_code == 503
    assert set(down.json()["error"]) == {"code", "message"}
    await client.patch(f"{ROOT}/_admin/faults", json={"outage": False, "throttle_rate": 1.0}, headers=AUTH)
    throttled = await client.get(f"{BASE}WhoAmI", headers=AUTH)
    assert throttled.status_code == 429
    assert throttled.json()["error"]["code"] == "0x80072322"
    assert throttled.headers["Retry-After"] == "1"


async def test_faults_given_at_start_apply() -> None:
    app = create_app(token=TOKEN, faults=Faults(error_rate=1.0))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=ROOT) as client:
        response = await client.get(f"{BASE}WhoAmI", headers=AUTH)
    assert response.status_code == 500
    assert response.json()["error"]["message"]


async def test_admin_seed_inserts_validated_rows_without_webhooks_or_limits(
    dv: tuple[Starlette, httpx.AsyncClient],
) -> None:
    app, client = dv
    rows = [
        {"msdyn_cardnumber": f"S-{i}", "msdyn_cardtendertype": 806380000, "modifiedon": "2020-01-01T00:00:00Z"}
        for i in range(3)
    ]
    seeded = await client.post(f"{ROOT}/_admin/tables/msdyn_loyaltycards/rows", json=rows, headers=AUTH)
    assert seeded.json() == {"inserted": 3}
    listed = (await client.get(f"{BASE}msdyn_loyaltycards?$select=msdyn_cardnumber,modifiedon", headers=AUTH)).json()
    assert {r["msdyn_cardnumber"] for r in listed["value"]} == {"S-0", "S-1", "S-2"}
    assert {r["modifiedon"] for r in listed["value"]} == {"2020-01-01T00:00:00Z"}
    bad = await client.post(
        f"{ROOT}/_admin/tables/msdyn_loyaltycards/rows",
        json={"rows": [{"msdyn_cardnumber": "S-9"}, {"msdyn_cardnumber": "S-0"}]},
        headers=AUTH,
    )
    assert bad.status_code == 412
    assert len(app.state.dataverse.tables["msdyn_loyaltycard"]) == 3
    assert (await client.get(f"{ROOT}/_admin/webhooks/log", headers=AUTH)).json() == {"deliveries": []}
    assert (await client.post(f"{ROOT}/_admin/tables/nope/rows", json=[], headers=AUTH)).status_code == 404


async def test_shared_admin_endpoints_count_this_emulators_requests(dv: tuple[Starlette, httpx.AsyncClient]) -> None:
    _, client = dv
    await client.post(f"{BASE}msdyn_loyaltylevels", json={"msdyn_levelphrase": "A"}, headers=AUTH)
    stats = (await client.get(f"{ROOT}/_admin/stats", headers=AUTH)).json()
    assert stats["name"] == "dataverse"
    assert stats["counters"]["writes"] == 1
