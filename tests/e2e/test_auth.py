"""Keys: every inbound route needs the function (or admin) key; every /api/ops route the admin key only."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.e2e.conftest import E2E

pytestmark = pytest.mark.e2e

OPS_ROUTES = [
    ("GET", "/api/ops/health"),
    ("GET", "/api/ops/status"),
    ("POST", "/api/ops/pause/loyalty-levels"),
    ("POST", "/api/ops/resume/loyalty-levels"),
    ("POST", "/api/ops/replay"),
]


def _inbound_routes(e2e: E2E) -> list[str]:
    return [f"/api/{side}/{name}" for name in e2e.stack.templates for side in ("fo", "dataverse")]


async def test_inbound_routes_refuse_requests_without_a_valid_key(e2e: E2E) -> None:
    routes = _inbound_routes(e2e)
    assert len(routes) == 2 * len(e2e.stack.templates) == 6
    body = b'{"BusinessEventId": "LoyaltyCardChangedBusinessEvent"}'
    for route in routes:
        for method in ("POST", "OPTIONS"):
            for credentials in ({}, {"code": "not-the-key"}):
                answer = await e2e.app.request(
                    method, route, params=credentials, content=body, headers={"content-type": "application/json"}
                )
                assert answer.status_code == 401, (method, route, credentials, answer.status_code)
            wrong_header = await e2e.app.request(method, route, content=body, headers={"x-functions-key": "nope"})
            assert wrong_header.status_code == 401, (method, route)
        # With the key the same route answers (here: 4xx for an unusable body, not 401).
        keyed = await e2e.app.post(route, params={"code": e2e.function_key}, content=b"{}")
        assert keyed.status_code not in (401, 403, 404), (route, keyed.status_code, keyed.text)


async def test_ops_routes_need_the_admin_key_and_refuse_the_function_key(e2e: E2E) -> None:
    for method, route in OPS_ROUTES:
        for headers in ({}, {"x-functions-key": e2e.function_key}, {"x-functions-key": "nope"}):
            answer = await e2e.app.request(method, route, headers=headers)
            assert answer.status_code == 401, (method, route, headers, answer.status_code)
        by_query = await e2e.app.request(method, route, params={"code": e2e.function_key})
        assert by_query.status_code == 401, (method, route, "function key as ?code=")
    assert await e2e.runtime.paused("loyalty-levels") is False

    admin = {"x-functions-key": e2e.admin_key}
    assert (await e2e.app.get("/api/ops/status", headers=admin)).status_code == 200
    assert (await e2e.app.get("/api/ops/health", headers=admin)).json()["ok"] is True
    try:
        paused = await e2e.app.post("/api/ops/pause/loyalty-levels", headers=admin)
        assert paused.status_code == 200 and await e2e.runtime.paused("loyalty-levels") is True
    finally:
        resumed = await e2e.app.post("/api/ops/resume/loyalty-levels", headers=admin)
    assert resumed.status_code == 200 and await e2e.runtime.paused("loyalty-levels") is False
    nothing = await e2e.app.post("/api/ops/replay", params={"key": "no-such-key"}, headers=admin)
    assert nothing.status_code == 200 and nothing.json() == {"replayed": 0}
