"""Dataverse emulator contract: service protection limits per user (docs/wire-formats.md §1.9)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from devkit.sandbox.dataverse import AGENT_USER, ServiceProtectionLimits, create_app
from devkit.sandbox.dataverse.protection import CostModel, Limiter

TOKEN = "dv-limits-token"
BASE = "http://localhost/api/data/v9.2/"
AGENT = {"CallerObjectId": AGENT_USER.azureactivedirectoryobjectid}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_request_limit_refuses_after_the_limit_until_the_window_slides() -> None:
    clock = Clock()
    limiter = Limiter(ServiceProtectionLimits(requests=3, window_s=10), clock=clock)
    for _ in range(3):
        assert limiter.admit("u") is None
        limiter.finish("u", 1)
        clock.now += 1
    refused = limiter.admit("u")
    assert refused is not None
    assert refused.code == "0x80072322"
    assert refused.message == "Number of requests exceeded the limit of 3 over time window of 10 seconds."
    assert refused.retry_after_s == 7  # the first request leaves the window at t=1010
    assert limiter.admit("someone else") is None
    clock.now = 1010.5
    assert limiter.admit("u") is None


def test_execution_time_is_charged_and_the_crossing_request_is_still_served() -> None:
    clock = Clock()
    limiter = Limiter(ServiceProtectionLimits(execution_ms=1000, window_s=300), clock=clock)
    assert limiter.admit("u") is None
    limiter.finish("u", 1500)  # one expensive request crosses the budget...
    refused = limiter.admit("u")  # ...and the next one is refused
    assert refused is not None
    assert refused.code == "0x80072321"
    assert refused.message.startswith(
        "Combined execution time of incoming requests exceeded limit of 1,000 milliseconds over time window of "
        "300 seconds."
    )
    assert refused.retry_after_s == 300
    assert limiter.remaining("u") == (5999, 0.0)


def test_concurrency_fails_at_once() -> None:
    limiter = Limiter(ServiceProtectionLimits(concurrent=2))
    assert limiter.admit("u") is None
    assert limiter.admit("u") is None
    refused = limiter.admit("u")
    assert refused is not None
    assert (refused.code, refused.message) == ("0x80072326", "Number of concurrent requests exceeded the limit of 2.")
    limiter.finish("u", 0)
    assert limiter.admit("u") is None


def test_remaining_headers_use_the_observed_format() -> None:
    limiter = Limiter(ServiceProtectionLimits())
    limiter.admit("u")
    limiter.finish("u", 540)
    assert limiter.headers("u") == {
        "x-ms-ratelimit-burst-remaining-xrm-requests": "5999",
        "x-ms-ratelimit-time-remaining-xrm-requests": "1,199.46",
    }


@pytest.fixture
async def limited() -> AsyncIterator[httpx.AsyncClient]:
    limits = ServiceProtectionLimits(
        requests=5,
        window_s=60,
        execution_ms=400,
        concurrent=1,
        costs=CostModel(read_ms=1, bulk_ms=10, bulk_record_ms=20),
    )
    app = create_app(token=TOKEN, limits=limits)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        yield c


async def test_the_request_limit_answers_429_with_retry_after_per_user(limited: httpx.AsyncClient) -> None:
    remaining = []
    for _ in range(5):
        response = await limited.get("WhoAmI")
        assert response.status_code == 200
        remaining.append(int(response.headers["x-ms-ratelimit-burst-remaining-xrm-requests"]))
    assert remaining == [4, 3, 2, 1, 0]
    refused = await limited.get("WhoAmI")
    assert refused.status_code == 429
    assert refused.json()["error"] == {
        "code": "0x80072322",
        "message": "Number of requests exceeded the limit of 5 over time window of 60 seconds.",
    }
    assert 59 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["x-ms-ratelimit-burst-remaining-xrm-requests"] == "0"
    assert (await limited.get("WhoAmI", headers=AGENT)).status_code == 200


async def test_bulk_work_exhausts_execution_time(limited: httpx.AsyncClient) -> None:
    targets = [
        {"@odata.type": "Microsoft.Dynamics.CRM.msdyn_loyaltycard", "msdyn_cardnumber": f"E-{i}"} for i in range(20)
    ]
    response = await limited.post("msdyn_loyaltycards/Microsoft.Dynamics.CRM.UpsertMultiple", json={"Targets": targets})
    assert response.status_code == 204
    refused = await limited.get("WhoAmI")
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "0x80072321"
    assert refused.headers["x-ms-ratelimit-time-remaining-xrm-requests"] == "0.00"


async def test_concurrent_requests_over_the_limit_are_refused(limited: httpx.AsyncClient) -> None:
    started = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b'{"msdyn_cardnumber": '
        started.set()
        await asyncio.sleep(0.2)
        yield b'"SLOW-1"}'

    slow = asyncio.create_task(
        limited.post("msdyn_loyaltycards", content=slow_body(), headers={"Content-Type": "application/json"})
    )
    await started.wait()
    refused = await limited.get("WhoAmI")
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "0x80072326"
    assert (await slow).status_code == 204
