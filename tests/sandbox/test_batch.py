"""$batch: multipart parsing (CRLF, change sets, limits), rendering, and execution through the app."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from devkit.sandbox.batch import (
    NOT_READABLE,
    BatchLimitError,
    BatchSyntaxError,
    Part,
    ResponsePart,
    execute_batch,
    forwarded_headers,
    parse_batch,
    parse_batch_response,
    render_batch,
)
from devkit.sandbox.common import SandboxMiddleware, SandboxState
from devkit.sandbox.store import Store, Table

BASE = "/api/data/v9.2"
TOKEN = "batch-token"
AUTH = f"Bearer {TOKEN}"
CT = "multipart/mixed;boundary=batch_AAA"

SPEC_EXAMPLE = (
    "--batch_AAA\r\n"
    "Content-Type: multipart/mixed;boundary=changeset_BBB\r\n"
    "\r\n"
    "--changeset_BBB\r\n"
    "Content-Type: application/http\r\n"
    "Content-Transfer-Encoding: binary\r\n"
    "Content-ID: 1\r\n"
    "\r\n"
    "POST /api/data/v9.2/contacts HTTP/1.1\r\n"
    "Content-Type: application/json;type=entry\r\n"
    "\r\n"
    '{"lastname":"X"}\r\n'
    "--changeset_BBB--\r\n"
    "--batch_AAA--\r\n"
)


def batch_body(items: list[Any], boundary: str = "batch_AAA") -> bytes:
    """Build a request body: items are (method, url, headers, body, content_id) tuples or lists of them."""

    def part(method: str, url: str, headers: dict[str, str], body: str, content_id: str | None) -> str:
        cid = f"Content-ID: {content_id}\r\n" if content_id else ""
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        return (
            f"Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n{cid}\r\n"
            f"{method} {url} HTTP/1.1\r\n{head}\r\n{body}\r\n"
        )

    out = []
    for item in items:
        out.append(f"--{boundary}\r\n")
        if isinstance(item, list):
            out.append("Content-Type: multipart/mixed;boundary=changeset_X\r\n\r\n")
            for inner in item:
                out.append("--changeset_X\r\n" + part(*inner))
            out.append("--changeset_X--\r\n")
        else:
            out.append(part(*item))
    out.append(f"--{boundary}--\r\n")
    return "".join(out).encode()


# --- parsing ----------------------------------------------------------------------------


def test_parse_the_spec_example() -> None:
    items = parse_batch(SPEC_EXAMPLE.encode(), CT)
    assert items == [
        [
            Part(
                "POST",
                "/api/data/v9.2/contacts",
                {"content-type": "application/json;type=entry"},
                b'{"lastname":"X"}',
                "1",
            )
        ]
    ]


def test_parse_get_outside_change_sets_and_quoted_boundary() -> None:
    body = batch_body([("GET", "contacts?$select=lastname", {"Accept": "application/json"}, "", None)], "b'x")
    items = parse_batch(body, 'multipart/mixed; boundary="b\'x"')
    assert items == [Part("GET", "contacts?$select=lastname", {"accept": "application/json"}, b"", None)]


def test_bare_lf_is_not_readable() -> None:
    with pytest.raises(BatchSyntaxError) as info:
        parse_batch(SPEC_EXAMPLE.replace("\r\n", "\n").encode(), CT)
    assert info.value.message == NOT_READABLE == "Stream was not readable."
    # One bare LF in a header block is enough.
    broken = SPEC_EXAMPLE.replace("Content-Transfer-Encoding: binary\r\n", "Content-Transfer-Encoding: binary\n")
    with pytest.raises(BatchSyntaxError, match="Stream was not readable"):
        parse_batch(broken.encode(), CT)


def test_bare_lf_inside_a_json_body_is_fine() -> None:
    body = batch_body([[("POST", "contacts", {}, '{\n  "lastname": "X"\n}', "1")]])
    (changeset,) = parse_batch(body, CT)
    assert isinstance(changeset, list) and json.loads(changeset[0].body) == {"lastname": "X"}


def test_get_inside_a_change_set_is_refused() -> None:
    body = batch_body([[("GET", "contacts", {}, "", None)]])
    with pytest.raises(BatchSyntaxError, match="invalid HTTP method 'GET'"):
        parse_batch(body, CT)


def test_limits_and_malformed_batches() -> None:
    body = batch_body([("GET", "a", {}, "", None), [("POST", "b", {}, "{}", "1"), ("POST", "c", {}, "{}", "2")]])
    assert len(parse_batch(body, CT, max_parts=3)) == 2
    with pytest.raises(BatchLimitError) as info:
        parse_batch(body, CT, max_parts=2)
    assert (info.value.count, info.value.limit) == (3, 2)
    with pytest.raises(BatchSyntaxError, match="boundary"):
        parse_batch(body, "multipart/mixed")
    with pytest.raises(BatchSyntaxError, match="multipart/mixed"):
        parse_batch(body, "application/json")
    with pytest.raises(BatchSyntaxError, match="closing boundary"):
        parse_batch(body.replace(b"--batch_AAA--", b""), CT)
    with pytest.raises(BatchSyntaxError, match="more than once"):
        parse_batch(batch_body([[("POST", "b", {}, "{}", "1"), ("POST", "c", {}, "{}", "1")]]), CT)
    with pytest.raises(BatchSyntaxError, match="request line"):
        parse_batch(batch_body([("GET", "a b", {}, "", None)]), CT)


def test_render_and_parse_response_round_trip() -> None:
    items: list[ResponsePart | list[ResponsePart]] = [
        ResponsePart(200, {"content-type": "application/json", "content-length": "9"}, b'{"a": 1}'),
        [
            ResponsePart(204, {"odata-entityid": "http://x/api/data/v9.2/contacts(1)"}, b"", "1"),
            ResponsePart(204, {}, b"", "2"),
        ],
    ]
    body, content_type = render_batch(items)
    assert content_type.startswith("multipart/mixed; boundary=batchresponse_")
    assert b"\n" not in body.replace(b"\r\n", b"")
    assert b"HTTP/1.1 204 No Content\r\nOData-EntityId: http://x/api/data/v9.2/contacts(1)\r\n" in body
    assert b"Content-ID: 1\r\n" in body
    assert b"Content-Length" not in body
    parsed = parse_batch_response(body, content_type)
    assert parsed == [
        ResponsePart(200, {"content-type": "application/json"}, b'{"a": 1}'),
        [
            ResponsePart(204, {"odata-entityid": "http://x/api/data/v9.2/contacts(1)"}, b"", "1"),
            ResponsePart(204, {}, b"", "2"),
        ],
    ]


def test_forwarded_headers() -> None:
    headers = {
        "Authorization": "Bearer x",
        "Content-Type": CT,
        "Content-Length": "100",
        "MSCRM.BypassCustomPluginExecution": "true",
        "CallerObjectId": "abc",
        "Prefer": "odata.continue-on-error, return=representation",
    }
    assert forwarded_headers(headers) == {
        "mscrm.bypasscustompluginexecution": "true",
        "callerobjectid": "abc",
        "prefer": "return=representation",
    }
    assert forwarded_headers({"Prefer": "odata.continue-on-error"}) == {}


# --- execution ----------------------------------------------------------------------------


class Service:
    """A minimal Dataverse-like app over a Store, with a $batch endpoint built on batch.py."""

    def __init__(self) -> None:
        self.store = Store()
        self.contacts = self.store.add(Table("contacts", ["contactid", "lastname", "parent", "points"]))
        self.seen_headers: list[dict[str, str]] = []
        self.state = SandboxState("dataverse", TOKEN, seed=1)
        self.app = Starlette(
            routes=[
                Route(f"{BASE}/$batch", self.batch, methods=["POST"]),
                Route(f"{BASE}/contacts", self.create, methods=["POST"]),
                Route(f"{BASE}/contacts({{id}})", self.update, methods=["PATCH"]),
                Route(f"{BASE}/contacts({{id}})", self.read, methods=["GET"]),
                Route(f"{BASE}/boom", self.boom, methods=["POST"]),
            ],
            middleware=[
                Middleware(
                    SandboxMiddleware,
                    state=self.state,
                    unauthorized=lambda: JSONResponse({"error": {"message": "401"}}, status_code=401),
                    error=lambda status, message: JSONResponse({"error": {"message": message}}, status_code=status),
                )
            ],
        )

    async def create(self, request: Request) -> Response:
        self.seen_headers.append(dict(request.headers))
        body = await request.json()
        if body.get("lastname") == "":
            return JSONResponse({"error": {"code": "0x80044331", "message": "lastname is required"}}, status_code=400)
        new_id = str(uuid.uuid4())
        parent = body.get("parent@odata.bind")
        self.contacts.insert({"contactid": new_id, "lastname": body["lastname"], "parent": parent})
        return Response(status_code=204, headers={"OData-EntityId": f"http://localhost{BASE}/contacts({new_id})"})

    async def update(self, request: Request) -> Response:
        row_id = request.path_params["id"]
        if self.contacts.get(row_id) is None:
            return JSONResponse({"error": {"code": "0x80040217", "message": "Does Not Exist"}}, status_code=404)
        self.contacts.update(row_id, await request.json())
        return Response(status_code=204)

    async def read(self, request: Request) -> Response:
        row = self.contacts.get(request.path_params["id"])
        return JSONResponse(row) if row else Response(status_code=404)

    async def boom(self, request: Request) -> Response:
        raise RuntimeError("handler crashed")

    async def batch(self, request: Request) -> Response:
        items = parse_batch(await request.body(), request.headers["content-type"], max_parts=1000)
        status, answers = await execute_batch(
            request.app,
            items,
            base_path=BASE,
            auth_header=request.headers["authorization"],
            extra_headers=dict(request.headers),
            continue_on_error="odata.continue-on-error" in request.headers.get("prefer", ""),
            transaction=self.store.transaction,
        )
        body, content_type = render_batch(answers)
        return Response(body, status_code=status, media_type=content_type)

    async def post_batch(self, items: list[Any], prefer: str | None = None) -> tuple[int, list[Any]]:
        headers = {"Authorization": AUTH, "Content-Type": CT, "MSCRM.SuppressDuplicateDetection": "false"}
        if prefer:
            headers["Prefer"] = prefer
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://localhost") as c:
            response = await c.post(f"{BASE}/$batch", content=batch_body(items), headers=headers)
        return response.status_code, parse_batch_response(response.content, response.headers["content-type"])


async def test_change_set_with_content_id_references() -> None:
    service = Service()
    status, items = await service.post_batch(
        [
            [
                ("POST", f"{BASE}/contacts", {"Content-Type": "application/json"}, '{"lastname":"Parent"}', "1"),
                ("POST", "contacts", {}, '{"lastname":"Child","parent@odata.bind":"$1"}', "2"),
                ("PATCH", "$1", {}, '{"points": 5}', "3"),
            ],
            ("GET", f"http://localhost{BASE}/contacts(nope)", {}, "", None),
        ],
        prefer="odata.continue-on-error",
    )
    assert status == 200
    changeset, single = items
    assert [p.status for p in changeset] == [204, 204, 204]
    assert [p.content_id for p in changeset] == ["1", "2", "3"]
    assert single.status == 404
    rows = {r["lastname"]: r for r in service.contacts.scan()}
    parent_id = rows["Parent"]["contactid"]
    assert rows["Child"]["parent"] == f"/contacts({parent_id})"  # service-root relative, as clients write it
    assert rows["Parent"]["points"] == 5
    assert changeset[0].headers["odata-entityid"].endswith(f"/contacts({parent_id})")


async def test_failing_change_set_rolls_back_and_stops_with_400() -> None:
    service = Service()
    status, items = await service.post_batch(
        [
            [
                ("POST", "contacts", {}, '{"lastname":"A"}', "1"),
                ("POST", "contacts", {}, '{"lastname":""}', "2"),
            ],
            [("POST", "contacts", {}, '{"lastname":"never"}', "3")],
        ]
    )
    assert status == 400
    assert len(items) == 1 and isinstance(items[0], ResponsePart)
    assert items[0].status == 400 and items[0].content_id == "2"
    assert json.loads(items[0].body)["error"]["code"] == "0x80044331"
    assert len(service.contacts) == 0


async def test_continue_on_error_answers_every_part() -> None:
    service = Service()
    status, items = await service.post_batch(
        [
            [("POST", "contacts", {}, '{"lastname":"A"}', "1"), ("POST", "contacts", {}, '{"lastname":""}', "2")],
            ("POST", "contacts", {}, '{"lastname":"B"}', None),
            [("POST", "contacts", {}, '{"lastname":"C"}', "3")],
        ],
        prefer="odata.continue-on-error",
    )
    assert status == 200
    assert isinstance(items[0], ResponsePart) and items[0].status == 400  # the failed change set's one answer
    assert items[1].status == 204
    assert [p.status for p in items[2]] == [204]
    assert sorted(r["lastname"] for r in service.contacts.scan()) == ["B", "C"]


async def test_unknown_content_id_reference() -> None:
    service = Service()
    status, items = await service.post_batch(
        [
            [
                ("POST", "contacts", {}, '{"lastname":"A"}', "1"),
                ("POST", "contacts", {}, '{"parent@odata.bind":"$9"}', "2"),
            ]
        ]
    )
    assert status == 400
    message = json.loads(items[0].body)["error"]["message"]
    assert message == "Content-ID Reference: '$9' does not exist in the batch context."
    assert len(service.contacts) == 0
    # References do not reach outside their change set.
    status, items = await service.post_batch(
        [[("POST", "contacts", {}, '{"lastname":"A"}', "1")], [("PATCH", "$1", {}, '{"points":1}', "2")]]
    )
    assert status == 400
    assert "'$1' does not exist" in json.loads(items[0].body)["error"]["message"]


async def test_parts_inherit_auth_and_request_headers_unless_overridden() -> None:
    service = Service()
    await service.post_batch(
        [
            ("POST", "contacts", {}, '{"lastname":"A"}', None),
            ("POST", "contacts", {"Prefer": "return=minimal", "MSCRM.SuppressDuplicateDetection": "true"},
             '{"lastname":"B"}', None),
        ],
        prefer="return=representation,odata.continue-on-error",
    )
    first, second = service.seen_headers
    assert first["authorization"] == AUTH and second["authorization"] == AUTH
    assert first["prefer"] == "return=representation"
    assert first["mscrm.suppressduplicatedetection"] == "false"
    assert second["prefer"] == "return=minimal"
    assert second["mscrm.suppressduplicatedetection"] == "true"


async def test_sub_requests_are_logged_counted_as_writes_and_get_no_faults() -> None:
    service = Service()
    service.state.faults.update({"error_rate": 1.0})  # would fail any top-level request
    items = parse_batch(batch_body([[("POST", "contacts", {}, '{"lastname":"A"}', "1")]]), CT)
    status, answers = await execute_batch(
        service.app,
        items,
        base_path=BASE,
        auth_header=AUTH,
        extra_headers={},
        continue_on_error=False,
        transaction=service.store.transaction,
    )
    assert status == 200 and [p.status for p in answers[0]] == [204]  # type: ignore[union-attr]
    assert service.state.counters.requests == 0
    assert service.state.counters.writes == 1
    assert service.state.log.recent()[-1]["subrequest"] is True


async def test_sub_requests_still_need_the_token() -> None:
    service = Service()
    items = parse_batch(batch_body([("POST", "contacts", {}, '{"lastname":"A"}', None)]), CT)
    status, answers = await execute_batch(
        service.app, items, base_path=BASE, auth_header="Bearer wrong", extra_headers={},
        continue_on_error=False, transaction=service.store.transaction,
    )
    assert status == 400 and answers[0].status == 401  # type: ignore[union-attr]


async def test_crashing_part_is_a_500_part_and_partial_on_stop() -> None:
    service = Service()
    items = parse_batch(
        batch_body(
            [
                ("POST", "contacts", {}, '{"lastname":"A"}', None),
                ("POST", "boom", {}, "{}", None),
                ("POST", "contacts", {}, '{"lastname":"B"}', None),
            ]
        ),
        CT,
    )
    status, answers = await execute_batch(
        service.app, items, base_path=BASE, auth_header=AUTH, extra_headers={},
        continue_on_error=False, transaction=service.store.transaction, partial_on_stop=True,
    )
    assert status == 200
    assert [a.status for a in answers] == [204, 500]  # type: ignore[union-attr]
    assert "handler crashed" in json.loads(answers[1].body)["error"]["message"]  # type: ignore[union-attr]
    assert [r["lastname"] for r in service.contacts.scan()] == ["A"]
