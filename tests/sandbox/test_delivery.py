"""Outgoing deliveries: retries per policy, faults (drop, duplicate, delay, reorder), drain, resend, loopback."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from devkit.sandbox.common import Counters, Faults
from devkit.sandbox.delivery import (
    DATAVERSE_WEBHOOK_RETRY,
    FNO_EVENT_RETRY,
    Delivery,
    Outgoing,
    RetryPolicy,
)

QUICK = RetryPolicy(attempts=3, pause_s=0.0, retry_on=None, timeout_s=5)


class Receiver:
    """An in-process webhook endpoint that answers from a script of statuses (then 200)."""

    def __init__(self, statuses: dict[str, list[int]] | None = None, hang_s: float = 0.0) -> None:
        self.statuses = statuses or {}
        self.hang_s = hang_s
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        self.app = Starlette(routes=[Route("/{name}", self.hook, methods=["POST"])])

    async def hook(self, request: Request) -> Response:
        body = await request.body()
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        if self.hang_s:
            await asyncio.sleep(self.hang_s)
        script = self.statuses.get(request.path_params["name"], [])
        return Response(b"nope" if script and script[0] >= 300 else b"", status_code=script.pop(0) if script else 200)

    def factory(self) -> Callable[[], httpx.AsyncClient]:
        return lambda: httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app))


def make_delivery(receiver: Receiver | None = None, seed: int = 5, **faults: Any) -> Delivery:
    fault_set = Faults()
    fault_set.update(faults)
    factory = receiver.factory() if receiver else (lambda: httpx.AsyncClient())
    return Delivery(fault_set, Counters(), random.Random(seed), client_factory=factory)


def item(n: int | str, path: str = "hook", policy: RetryPolicy = QUICK) -> Outgoing:
    return Outgoing(f"d{n}", f"http://receiver/{path}", {"x-n": str(n)}, f"body {n}".encode(), policy, f"item {n}")


async def test_delivers_in_order_with_headers_and_counts() -> None:
    receiver = Receiver()
    delivery = make_delivery(receiver)
    for n in range(5):
        delivery.submit(item(n))
    assert delivery.pending == 5  # submit does not wait
    await delivery.drain(5)
    assert receiver.bodies == [f"body {n}".encode() for n in range(5)]
    assert receiver.headers[2]["x-n"] == "2"
    assert delivery.counters.deliveries == 5 and delivery.pending == 0
    await delivery.aclose()


async def test_dataverse_policy_retries_once_on_gateway_errors_only() -> None:
    receiver = Receiver({"gateway": [503], "twice": [504, 502], "server": [500]})
    delivery = make_delivery(receiver)
    policy = RetryPolicy(attempts=2, pause_s=0.0, retry_on=DATAVERSE_WEBHOOK_RETRY.retry_on, timeout_s=5)
    delivery.submit(item("g", "gateway", policy))
    delivery.submit(item("t", "twice", policy))
    delivery.submit(item("s", "server", policy))
    await delivery.drain(5)
    assert delivery.counters.deliveries == 1
    assert delivery.counters.delivery_failures == 2
    failed = {f.id: f for f in delivery.failed}
    assert failed["dt"].attempts == 2 and failed["dt"].last_error == "HTTP 502: nope"
    assert failed["ds"].attempts == 1 and failed["ds"].last_error == "HTTP 500: nope"
    await delivery.aclose()


def test_policies_match_the_services() -> None:
    assert DATAVERSE_WEBHOOK_RETRY.attempts == 2 and DATAVERSE_WEBHOOK_RETRY.timeout_s == 60
    assert DATAVERSE_WEBHOOK_RETRY.retries(503) and not DATAVERSE_WEBHOOK_RETRY.retries(500)
    assert DATAVERSE_WEBHOOK_RETRY.retries(None)  # no response counts as a gateway failure
    assert FNO_EVENT_RETRY.attempts == 4 and FNO_EVENT_RETRY.pause_s == 1.0
    assert FNO_EVENT_RETRY.retries(400) and FNO_EVENT_RETRY.retries(None)
    assert not RetryPolicy(2, 0, frozenset({500}), 1).retries(None)


async def test_fno_style_policy_retries_any_failure_with_pauses() -> None:
    receiver = Receiver({"flaky": [400, 500, 404]})
    delivery = make_delivery(receiver)
    policy = RetryPolicy(attempts=4, pause_s=0.05, retry_on=None, timeout_s=5)
    start = time.perf_counter()
    delivery.submit(item(1, "flaky", policy))
    await delivery.drain(5)
    assert time.perf_counter() - start >= 0.15  # three pauses
    assert len(receiver.bodies) == 4 and delivery.counters.deliveries == 1 and not delivery.failed
    await delivery.aclose()


async def test_a_retrying_item_does_not_hold_up_the_others() -> None:
    receiver = Receiver({"slow": [503]})
    delivery = make_delivery(receiver)
    delivery.submit(item("a", "slow", RetryPolicy(attempts=2, pause_s=0.3, retry_on=None, timeout_s=5)))
    delivery.submit(item("b"))
    await delivery.drain(5)
    assert receiver.bodies == [b"body a", b"body b", b"body a"]
    await delivery.aclose()


async def test_connection_errors_are_retried_then_failed() -> None:
    calls: list[str] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url))
        raise httpx.ConnectError("connection refused", request=request)

    fault_set = Faults()
    delivery = Delivery(fault_set, Counters(), random.Random(1),
                        client_factory=lambda: httpx.AsyncClient(transport=httpx.MockTransport(refuse)))
    delivery.submit(item(1, policy=RetryPolicy(attempts=3, pause_s=0, retry_on=None, timeout_s=1)))
    delivery.submit(item(2, policy=RetryPolicy(attempts=3, pause_s=0, retry_on=frozenset({500}), timeout_s=1)))
    await delivery.drain(5)
    assert len(calls) == 4  # 3 tries for the first, 1 for the second
    assert [f.last_error for f in delivery.failed] == ["ConnectError: connection refused"] * 2
    await delivery.aclose()


async def test_drop_and_duplicate_faults() -> None:
    receiver = Receiver()
    dropping = make_delivery(receiver, delivery_drop_rate=1.0)
    dropping.submit(item(1))
    await dropping.drain(5)
    assert receiver.bodies == [] and dropping.counters.deliveries_dropped == 1 and dropping.pending == 0

    doubling = make_delivery(receiver, delivery_duplicate_rate=1.0)
    doubling.submit(item(2))
    await doubling.drain(5)
    assert receiver.bodies == [b"body 2", b"body 2"]
    assert doubling.counters.deliveries_duplicated == 1 and doubling.counters.deliveries == 2
    await doubling.aclose()


async def test_delay_keeps_items_pending_until_due() -> None:
    receiver = Receiver()
    delivery = make_delivery(receiver, delivery_delay_ms=300)
    for n in range(10):
        delivery.submit(item(n))
    await asyncio.sleep(0)
    assert delivery.pending == 10
    await delivery.drain(5)
    assert sorted(receiver.bodies) == sorted(f"body {n}".encode() for n in range(10))
    await delivery.aclose()


async def test_reorder_shuffles_items_waiting_together() -> None:
    async def order(reorder: bool) -> list[bytes]:
        receiver = Receiver()
        delivery = make_delivery(receiver, seed=11, delivery_reorder=reorder)
        for n in range(20):
            delivery.submit(item(n))
        await delivery.drain(5)
        await delivery.aclose()
        return receiver.bodies

    in_order = [f"body {n}".encode() for n in range(20)]
    assert await order(False) == in_order
    shuffled = await order(True)
    assert shuffled != in_order and sorted(shuffled) == sorted(in_order)
    assert shuffled == await order(True)  # seeded: reproducible


async def test_drain_times_out_and_resend_retries_failed_items() -> None:
    receiver = Receiver({"hook": [500]})
    delivery = make_delivery(receiver)
    delivery.submit(item(1, policy=RetryPolicy(attempts=1, pause_s=0, retry_on=None, timeout_s=5)))
    delivery.submit(item(2, policy=RetryPolicy(attempts=1, pause_s=0, retry_on=None, timeout_s=5)))
    await delivery.drain(5)
    assert [f.id for f in delivery.failed] == ["d1"]
    assert await delivery.resend(["nope"]) == 0
    assert await delivery.resend() == 1
    await delivery.drain(5)
    assert delivery.failed == [] and delivery.counters.deliveries == 2

    slow = make_delivery(Receiver(hang_s=1.0))
    slow.submit(item(3))
    with pytest.raises(TimeoutError):
        await slow.drain(0.1)
    await slow.aclose()


@asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    """Run `app` under uvicorn on a free loopback port; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:  # uvicorn exposes a flag, not an event
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


async def test_over_real_loopback_http_with_policy_timeout() -> None:
    receiver = Receiver()
    slow = Receiver(hang_s=0.6)
    app = Starlette(routes=[Route("/hook/{name}", receiver.hook, methods=["POST"]),
                            Route("/slow/{name}", slow.hook, methods=["POST"])])
    async with serve(app) as url:
        delivery = make_delivery(None)
        delivery.submit(Outgoing("tcp-1", f"{url}/hook/x", {"x-ms-dynamics-entity-name": "contact"}, b"{}", QUICK))
        delivery.submit(
            Outgoing("tcp-2", f"{url}/slow/x", {}, b"{}", RetryPolicy(1, 0, None, timeout_s=0.2), "times out")
        )
        await delivery.drain(10)
        await delivery.aclose()
    assert receiver.bodies == [b"{}"]
    assert receiver.headers[0]["x-ms-dynamics-entity-name"] == "contact"
    assert [f.id for f in delivery.failed] == ["tcp-2"]
    assert (delivery.failed[0].last_error or "").startswith("ReadTimeout")
