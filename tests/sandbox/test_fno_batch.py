"""Contract tests of `/data/$batch`: change sets are atomic, their events go out only on commit, 5000 ops max."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from devkit.sandbox.batch import ResponsePart, parse_batch_response
from devkit.sandbox.fno import create_app

TOKEN = "fno-test-token"
BASE = "https://fno.test"
Op = tuple[str, str, dict[str, Any] | None]


def encode(items: list[Op | list[Op]]) -> tuple[str, bytes]:
    """A multipart/mixed $batch body (CRLF line ends), change sets as nested lists."""

    def part(op: Op, content_id: int | None) -> list[str]:
        method, url, body = op
        lines = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
        if content_id is not None:
            lines.append(f"Content-ID: {content_id}")
        lines += ["", f"{method} {url} HTTP/1.1", "Content-Type: application/json", ""]
        lines.append(json.dumps(body) if body is not None else "")
        return lines

    lines: list[str] = []
    for index, item in enumerate(items):
        lines.append("--batch_B")
        if isinstance(item, list):
            lines += [f"Content-Type: multipart/mixed; boundary=changeset_{index}", ""]
            for n, op in enumerate(item, start=1):
                lines.append(f"--changeset_{index}")
                lines += part(op, n)
            lines.append(f"--changeset_{index}--")
        else:
            lines += part(item, None)
    lines.append("--batch_B--")
    return "multipart/mixed; boundary=batch_B", ("\r\n".join(lines) + "\r\n").encode()


@pytest.fixture
async def setup() -> AsyncIterator[tuple[Starlette, httpx.AsyncClient, list[dict[str, Any]]]]:
    app = create_app(token=TOKEN, seed=11, public_url=BASE)
    received: list[dict[str, Any]] = []

    async def hook(request: Request) -> Response:
        received.append(json.loads(await request.body()))
        return Response(status_code=200)

    receiver = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    app.state.sandbox.delivery.client_factory = lambda: httpx.AsyncClient(
        transport=httpx.ASGITransport(app=receiver))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE,
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        subscribed = await client.post("/_admin/subscriptions", json={
            "entity_set": "RetailLoyaltyCards", "url": "http://receiver/hook", "format": "business-event"})
        assert subscribed.status_code == 201
        yield app, client, received


async def send(client: httpx.AsyncClient, items: list[Op | list[Op]], **headers: str) -> tuple[int, list[Any]]:
    content_type, body = encode(items)
    response = await client.post("/data/$batch", content=body, headers={"Content-Type": content_type, **headers})
    if not response.headers["content-type"].startswith("multipart/mixed"):
        return response.status_code, [response.json()]
    return response.status_code, parse_batch_response(response.content, response.headers["content-type"])


async def test_a_change_set_commits_together_and_then_raises_its_events(setup: Any) -> None:
    app, client, received = setup
    status, answer = await send(client, [
        [("POST", "RetailLoyaltyCards", {"CardNumber": f"B-{i}"}) for i in range(3)],
        ("GET", "RetailLoyaltyCards/$count", None),
    ])
    assert status == 200
    changeset, count = answer
    assert [p.status for p in changeset] == [201, 201, 201]
    assert [p.content_id for p in changeset] == ["1", "2", "3"]
    assert json.loads(changeset[0].body)["CardNumber"] == "B-0"
    assert isinstance(count, ResponsePart) and count.body == b"3"
    await app.state.sandbox.delivery.drain(5)
    assert sorted(e["CardNumber"] for e in received) == ["B-0", "B-1", "B-2"]
    assert all(e["ChangeType"] == "Created" for e in received)


async def test_a_failing_change_set_rolls_back_and_raises_no_events(setup: Any) -> None:
    app, client, received = setup
    assert (await client.post("/data/RetailLoyaltyCards", json={"CardNumber": "TAKEN"})).status_code == 201
    await app.state.sandbox.delivery.drain(5)
    received.clear()
    status, answer = await send(client, [
        [("POST", "RetailLoyaltyCards", {"CardNumber": "NEW-1"}),
         ("PATCH", "RetailLoyaltyCards('TAKEN')", {"PartyNumber": "9"}),
         ("POST", "RetailLoyaltyCards", {"CardNumber": "TAKEN"})],
        ("POST", "RetailLoyaltyCards", {"CardNumber": "NEVER-RUN"}),
    ])
    # OData v4 without continue-on-error: stop at the first failure, answer what ran, the failure last.
    assert status == 200 and len(answer) == 1
    failure = answer[0]
    assert failure.status == 500
    assert json.loads(failure.body)["error"]["innererror"]["message"].endswith("The record already exists.")
    assert (await client.get("/data/RetailLoyaltyCards('NEW-1')")).status_code == 404
    assert (await client.get("/data/RetailLoyaltyCards('TAKEN')")).json()["PartyNumber"] == ""
    assert (await client.get("/data/RetailLoyaltyCards('NEVER-RUN')")).status_code == 404
    await app.state.sandbox.delivery.drain(5)
    assert received == []


async def test_continue_on_error_runs_every_part(setup: Any) -> None:
    _, client, _ = setup
    status, answer = await send(client, [
        ("POST", "RetailLoyaltyCards", {"CardNumber": "X" * 40}),
        ("POST", "RetailLoyaltyCards", {"CardNumber": "OK-1"}),
    ], Prefer="odata.continue-on-error")
    assert status == 200
    assert [p.status for p in answer] == [400, 201]


async def test_more_than_5000_operations_is_refused(setup: Any) -> None:
    _, client, _ = setup
    ops: list[Op | list[Op]] = [[("POST", "LoyaltyLevels", {"LevelPhrase": f"L{i}"}) for i in range(5001)]]
    status, answer = await send(client, ops)
    assert status == 400
    assert "5000" in answer[0]["error"]["message"]
    assert (await client.get("/data/LoyaltyLevels/$count")).text == "0"
    status, answer = await send(client, [[("POST", "LoyaltyLevels", {"LevelPhrase": f"L{i}"}) for i in range(5000)]])
    assert status == 200 and len(answer[0]) == 5000
    assert (await client.get("/data/LoyaltyLevels/$count")).text == "5000"
