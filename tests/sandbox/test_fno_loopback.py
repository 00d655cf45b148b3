"""The F&O emulator over real loopback HTTP: data events reach a receiver; a failing receiver gets one try and
three retries, then the delivery sits in the error log until it is resent."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from devkit.sandbox.fno import create_app

TOKEN = "fno-loopback-token"


@asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    """Run `app` with uvicorn on a free 127.0.0.1 port; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


class Receiver:
    """An endpoint that records every delivery and fails with 503 while `failing` is set."""

    def __init__(self) -> None:
        self.failing = False
        self.calls: list[tuple[float, dict[str, str], dict[str, Any]]] = []
        self.app = Starlette(routes=[Route("/hook", self.hook, methods=["POST"])])

    async def hook(self, request: Request) -> Response:
        self.calls.append((time.monotonic(), dict(request.headers), json.loads(await request.body())))
        return Response(status_code=503 if self.failing else 202)


async def test_data_events_over_loopback_with_retries_error_log_and_resend() -> None:
    receiver = Receiver()
    fo_app = create_app(token=TOKEN, seed=2)
    async with serve(receiver.app) as hook_base, serve(fo_app) as fo_base, httpx.AsyncClient(
        base_url=fo_base, headers={"Authorization": f"Bearer {TOKEN}"}
    ) as fo:
        pause = 0.1
        assert (await fo.patch("/_admin/settings", json={"event_retry_pause_s": pause})).status_code == 200
        subscribed = await fo.post("/_admin/subscriptions", json={
            "entity_set": "RetailLoyaltyCards", "url": f"{hook_base}/hook", "format": "data-event",
            "headers": {"x-functions-key": "secret"}})
        assert subscribed.status_code == 201

        assert (await fo.post("/data/RetailLoyaltyCards", json={"CardNumber": "L-1"})).status_code == 201
        assert (await fo.post("/_admin/deliveries/drain")).status_code == 200
        [(_, headers, created)] = receiver.calls
        assert headers["x-functions-key"] == "secret"
        assert headers["x-ms-dynamics-request-name"] == "OnExternalCreated"
        assert created["PrimaryEntityName"] == "mserp_retailloyaltycardentity"

        receiver.failing = True
        receiver.calls.clear()
        assert (await fo.patch("/data/RetailLoyaltyCards('L-1')", json={"PartyNumber": "9"})).status_code == 204
        assert (await fo.post("/_admin/deliveries/drain")).status_code == 200
        assert len(receiver.calls) == 4  # one try and three retries
        times = [t for t, _, _ in receiver.calls]
        assert all(later - earlier >= pause * 0.9 for earlier, later in itertools.pairwise(times))
        assert {body["MessageName"] for _, _, body in receiver.calls} == {"OnExternalUpdated"}
        failed = (await fo.get("/_admin/deliveries/failed")).json()["failed"]
        assert len(failed) == 1 and failed[0]["attempts"] == 4 and "503" in failed[0]["error"]
        stats = (await fo.get("/_admin/stats")).json()["counters"]
        assert stats["delivery_failures"] == 1 and stats["deliveries"] == 1

        receiver.failing = False
        receiver.calls.clear()
        assert (await fo.post("/_admin/deliveries/resend", json={})).json() == {"resent": 1}
        assert (await fo.post("/_admin/deliveries/drain")).status_code == 200
        [(_, _, resent)] = receiver.calls
        assert resent["MessageName"] == "OnExternalUpdated"
        assert (await fo.get("/_admin/deliveries/failed")).json()["failed"] == []

        # Paging links point back at the server that answered.
        await fo.patch("/_admin/settings", json={"max_page_size": 1})
        await fo.post("/data/RetailLoyaltyCards", json={"CardNumber": "L-2"})
        first = (await fo.get("/data/RetailLoyaltyCards")).json()
        second = (await fo.get(first["@odata.nextLink"])).json()
        assert first["@odata.nextLink"].startswith(f"{fo_base}/data/RetailLoyaltyCards?")
        assert [r["CardNumber"] for r in first["value"] + second["value"]] == ["L-1", "L-2"]
        assert "@odata.nextLink" not in second
