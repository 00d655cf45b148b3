"""The shared sandbox middleware: bearer check, fault injection, counting, admin endpoints, drops."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from devkit.sandbox.common import (
    ConnectionDropped,
    Faults,
    SandboxMiddleware,
    SandboxState,
    admin_routes,
    bearer_matches,
    drop_aware,
    sandbox_token,
)
from devkit.sandbox.delivery import Outgoing, RetryPolicy

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def unauthorized() -> Response:
    return JSONResponse({"error": {"code": "", "message": "no token"}}, status_code=401,
                        headers={"WWW-Authenticate": "Bearer"})


def error(status: int, message: str) -> Response:
    return JSONResponse({"error": {"code": f"E{status}", "message": message}}, status_code=status)


def make_app(state: SandboxState) -> Starlette:
    async def read(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def write(request: Request) -> Response:
        return Response(status_code=204)

    async def refuse(request: Request) -> Response:
        return Response(status_code=400)

    async def busy(request: Request) -> Response:
        return JSONResponse({"error": {"code": "0x80072322"}}, status_code=429, headers={"Retry-After": "2"})

    async def seed(request: Request) -> Response:
        return JSONResponse({"seeded": True})

    routes = [
        Route("/api/cards", read, methods=["GET"]),
        Route("/api/cards", write, methods=["POST", "PATCH", "DELETE"]),
        Route("/api/bad", refuse, methods=["POST"]),
        Route("/api/busy", busy, methods=["GET"]),
        *admin_routes(state, extra=[Route("/seed", seed, methods=["POST"])]),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(SandboxMiddleware, state=state, unauthorized=unauthorized, error=error)],
    )


@asynccontextmanager
async def client_for(state: SandboxState) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=make_app(state))
    async with httpx.AsyncClient(transport=transport, base_url="http://sandbox") as client:
        yield client


@asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    """Run `app` under uvicorn on a free loopback port; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:  # uvicorn exposes a flag, not an event
        if task.done():
            task.result()  # startup failed: raise its error
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


def new_state(**faults: Any) -> SandboxState:
    state = SandboxState("dataverse", TOKEN, seed=7)
    state.faults.update(faults)
    return state


# --- token ----------------------------------------------------------------------------


def test_sandbox_token_from_env_or_generated() -> None:
    assert sandbox_token({"LOYALTYSYNC_SANDBOX_TOKEN": "abc"}) == ("abc", False)
    token, generated = sandbox_token({})
    assert generated and len(token) >= 40
    assert sandbox_token({})[0] != token
    assert sandbox_token({"LOYALTYSYNC_SANDBOX_TOKEN": "  "})[1] is True


def test_bearer_matches() -> None:
    assert bearer_matches("Bearer abc", "abc")
    assert bearer_matches("bearer  abc ", "abc")
    assert not bearer_matches("Bearer abcd", "abc")
    assert not bearer_matches("Basic abc", "abc")
    assert not bearer_matches("abc", "abc")
    assert not bearer_matches(None, "abc")
    assert not bearer_matches("Bearer ", "abc")


async def test_requests_need_the_bearer_token_admin_included() -> None:
    state = new_state()
    async with client_for(state) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            response = await client.get("/api/cards", headers=headers)
            assert response.status_code == 401
            assert response.headers["WWW-Authenticate"] == "Bearer"
        assert (await client.get("/_admin/stats")).status_code == 401
        assert (await client.get("/api/cards", headers=AUTH)).json() == {"ok": True}
        assert (await client.get("/_admin/stats", headers=AUTH)).status_code == 200
    assert state.counters.requests == 6
    log = state.log.recent()
    assert [entry["status"] for entry in log] == [401, 401, 401, 401, 200, 200]
    assert log[0]["user"] is None and log[4]["user"] == "application"


# --- faults ---------------------------------------------------------------------------


def test_faults_update_validates_everything_before_applying() -> None:
    faults = Faults()
    faults.update({"error_rate": 0.5, "latency_ms": 10, "outage": True})
    assert (faults.error_rate, faults.latency_ms, faults.outage) == (0.5, 10.0, True)
    bad: list[dict[str, Any]] = [
        {"nope": 1},
        {"error_rate": 1.5},
        {"latency_ms": -1},
        {"outage": 1},
        {"hang_s": "3"},
        {"error_rate": True},
        {"latency_ms": float("nan")},
        {"throttle_rate": 0.2, "bogus": 1},
    ]
    for changes in bad:
        with pytest.raises(ValueError, match=next(iter(changes))):
            faults.update(changes)
    assert faults.throttle_rate == 0.0  # nothing applied from a rejected update


@pytest.mark.parametrize(
    ("faults", "status", "message"),
    [
        ({"outage": True}, 503, "outage"),
        ({"error_rate": 1.0}, 500, "unexpected"),
        ({"unavailable_rate": 1.0}, 503, "temporarily unavailable"),
        ({"timeout_rate": 1.0, "hang_s": 0.05}, 504, "timed out"),
    ],
)
async def test_injected_errors_use_the_service_error_shape(faults: dict[str, Any], status: int, message: str) -> None:
    state = new_state(**faults)
    async with client_for(state) as client:
        response = await client.get("/api/cards", headers=AUTH)
        assert response.status_code == status
        assert response.json()["error"]["code"] == f"E{status}"
        assert message in response.json()["error"]["message"]
        # Admin requests never get faults.
        assert (await client.get("/_admin/stats", headers=AUTH)).status_code == 200
    assert state.counters.errors_injected == 1


async def test_injected_throttle_has_retry_after_and_counts() -> None:
    state = new_state(throttle_rate=1.0, throttle_retry_after_s=0.25)
    async with client_for(state) as client:
        response = await client.get("/api/cards", headers=AUTH)
        assert response.status_code == 429
        assert response.headers["Retry-After"] == "0.25"
        assert "6000" in response.json()["error"]["message"]
        state.faults.update({"throttle_rate": 0.0})
        own = await client.get("/api/busy", headers=AUTH)  # the app's own service protection
        assert own.status_code == 429
    assert state.counters.throttled == 2
    assert state.counters.errors_injected == 1


async def test_fo_throttle_message() -> None:
    state = SandboxState("fo", TOKEN, seed=1)
    state.faults.update({"throttle_rate": 1.0})
    async with client_for(state) as client:
        response = await client.get("/api/cards", headers=AUTH)
    assert "high resource utilization" in response.json()["error"]["message"]


async def test_latency_is_added() -> None:
    state = new_state(latency_ms=80, latency_jitter_ms=20)
    async with client_for(state) as client:
        start = time.perf_counter()
        assert (await client.get("/api/cards", headers=AUTH)).status_code == 200
        elapsed = time.perf_counter() - start
    assert 0.08 <= elapsed < 1.0
    assert state.log.recent()[0]["ms"] >= 80


async def test_seeded_faults_are_reproducible() -> None:
    async def statuses(seed: int) -> list[int]:
        state = SandboxState("dataverse", TOKEN, seed=seed)
        state.faults.update({"error_rate": 0.5})
        async with client_for(state) as client:
            return [(await client.get("/api/cards", headers=AUTH)).status_code for _ in range(30)]

    first = await statuses(42)
    assert first == await statuses(42)
    assert {200, 500} == set(first)


async def test_writes_count_only_successful_write_methods() -> None:
    state = new_state()
    async with client_for(state) as client:
        await client.post("/api/cards", headers=AUTH)
        await client.patch("/api/cards", headers=AUTH)
        await client.delete("/api/cards", headers=AUTH)
        await client.get("/api/cards", headers=AUTH)
        await client.post("/api/bad", headers=AUTH)
        await client.post("/api/cards")  # 401
    assert state.counters.writes == 3
    assert state.counters.requests == 6


async def test_drop_in_process_raises_remote_protocol_error() -> None:
    state = new_state(drop_connection_rate=1.0)
    async with client_for(state) as client:
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response") as info:
            await client.get("/api/cards", headers=AUTH)
    assert isinstance(info.value, ConnectionDropped)
    assert state.counters.errors_injected == 1
    assert state.log.recent()[0]["status"] is None


async def test_drop_over_tcp_closes_with_no_response_behind_drop_aware() -> None:
    state = new_state(drop_connection_rate=1.0)
    async with serve(drop_aware(make_app(state))) as url, httpx.AsyncClient(base_url=url) as client:
        with pytest.raises(httpx.RemoteProtocolError, match="Server disconnected without sending a response"):
            await client.get("/api/cards", headers=AUTH)
        state.faults.update({"drop_connection_rate": 0.0})
        assert (await client.get("/api/cards", headers=AUTH)).status_code == 200  # server still up
    assert state.counters.requests == 2


async def test_drop_over_tcp_without_drop_aware_degrades_to_500() -> None:
    state = new_state(drop_connection_rate=1.0)
    async with serve(make_app(state)) as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/api/cards", headers=AUTH)).status_code == 500


# --- admin endpoints ------------------------------------------------------------------


async def test_admin_stats_requests_faults_reset() -> None:
    state = new_state()
    async with client_for(state) as client:
        await client.get("/api/cards", headers=AUTH)
        await client.post("/api/cards", headers=AUTH)
        stats = (await client.get("/_admin/stats", headers=AUTH)).json()
        assert stats["counters"]["requests"] == 3 and stats["counters"]["writes"] == 1
        assert stats["faults"]["hang_s"] == 30.0 and stats["pending_deliveries"] == 0
        recent = (await client.get("/_admin/requests?limit=2", headers=AUTH)).json()["requests"]
        assert [(e["method"], e["path"]) for e in recent] == [("POST", "/api/cards"), ("GET", "/_admin/stats")]
        assert (await client.get("/_admin/requests?limit=x", headers=AUTH)).status_code == 400

        changed = await client.patch("/_admin/faults", headers=AUTH, json={"latency_ms": 5, "outage": False})
        assert changed.status_code == 200 and changed.json()["latency_ms"] == 5.0
        assert state.faults.latency_ms == 5.0
        refused = await client.patch("/_admin/faults", headers=AUTH, json={"error_rate": 2})
        assert refused.status_code == 400 and "error_rate" in refused.json()["error"]
        assert (await client.patch("/_admin/faults", headers=AUTH, content=b"[1]")).status_code == 400
        assert (await client.patch("/_admin/faults", headers=AUTH, content=b"{")).status_code == 400

        assert (await client.post("/_admin/reset", headers=AUTH)).json()["counters"]["requests"] == 0
        assert len(state.log) == 1  # the reset request itself is logged after the reset
        assert (await client.post("/_admin/seed", headers=AUTH)).json() == {"seeded": True}


async def test_admin_deliveries_failed_resend_drain() -> None:
    received: list[bytes] = []
    fail = True

    async def hook(request: Request) -> Response:
        received.append(await request.body())
        return Response(status_code=500 if fail else 200)

    receiver = Starlette(routes=[Route("/hook", hook, methods=["POST"])])

    def factory() -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=receiver))

    state = SandboxState("fo", TOKEN, seed=3, client_factory=factory)
    once = RetryPolicy(attempts=1, pause_s=0, retry_on=None, timeout_s=5)
    state.delivery.submit(Outgoing("d1", "http://receiver/hook", {}, b"one", once, "first"))
    async with client_for(state) as client:
        drained = (await client.post("/_admin/deliveries/drain", headers=AUTH)).json()
        assert drained["pending"] == 0 and drained["failed"] == 1
        failed = (await client.get("/_admin/deliveries/failed", headers=AUTH)).json()["failed"]
        assert failed == [
            {"id": "d1", "url": "http://receiver/hook", "description": "first", "attempts": 1, "error": "HTTP 500: "}
        ]
        fail = False
        bad = await client.post("/_admin/deliveries/resend", headers=AUTH, json={"ids": "d1"})
        assert bad.status_code == 400
        resent = await client.post("/_admin/deliveries/resend", headers=AUTH, json={"ids": ["d1"]})
        assert resent.json() == {"resent": 1}
        await client.post("/_admin/deliveries/drain", headers=AUTH)
        assert (await client.get("/_admin/deliveries/failed", headers=AUTH)).json() == {"failed": []}
    assert received == [b"one", b"one"]
    assert state.counters.deliveries == 1 and state.counters.delivery_failures == 1
    await state.delivery.aclose()


def test_extra_admin_routes_get_the_prefix() -> None:
    state = new_state()
    handler: Callable[[Request], Any] = lambda request: Response()  # noqa: E731
    routes = admin_routes(state, extra=[Route("/seed", handler), Route("/_admin/other", handler)])
    paths = [getattr(r, "path", None) for r in routes]
    assert "/_admin/seed" in paths and "/_admin/other" in paths and "/_admin/stats" in paths
