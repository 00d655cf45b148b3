"""$batch: the encoded request is read by an independent multipart parser (the email package) in a
test app that applies the operations to a dict; the answers it writes by hand are decoded and matched.
"""

from __future__ import annotations

import email
import email.policy
import json
import re
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from loyaltysync.errors import TargetError
from loyaltysync.targets.auth import StaticTokenCredential
from loyaltysync.targets.batch import (
    NOT_EXECUTED,
    BatchRequest,
    ChangeSet,
    ResponsePart,
    decode_batch,
    encode_batch,
    match,
)
from loyaltysync.targets.dataverse import DataverseClient
from loyaltysync.targets.fno import FnoClient
from loyaltysync.targets.http import RetryPolicy

CRLF = "\r\n"


@dataclass
class HttpRequest:
    method: str
    target: str
    headers: dict[str, str]
    body: Any
    mime: dict[str, str]


def parse_batch(content_type: str, body: bytes) -> list[HttpRequest | list[HttpRequest]]:
    """Read a multipart batch with the standard library's MIME parser (not the code under test)."""
    assert b"\n" not in body.replace(b"\r\n", b""), "every line must end in CRLF"
    message = email.message_from_bytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body, policy=email.policy.HTTP
    )
    assert isinstance(message, EmailMessage) and message.is_multipart()
    out: list[HttpRequest | list[HttpRequest]] = []
    for part in message.iter_parts():
        assert isinstance(part, EmailMessage)
        if part.get_content_type() == "multipart/mixed":
            out.append([_http_request(p) for p in part.iter_parts()])  # type: ignore[arg-type]
        else:
            out.append(_http_request(part))
    return out


def _http_request(part: EmailMessage) -> HttpRequest:
    assert part.get_content_type() == "application/http"
    assert part["Content-Transfer-Encoding"] == "binary"
    payload = part.get_payload()
    assert isinstance(payload, str)
    head, _, body = payload.partition("\r\n\r\n")
    request_line, *header_lines = head.split("\r\n")
    method, target, version = request_line.split(" ")
    assert version == "HTTP/1.1"
    headers = dict(line.split(": ", 1) for line in header_lines)
    return HttpRequest(method, target, headers, json.loads(body) if body.strip() else None, dict(part.items()))


def http_part(
    status: str, *, body: Any = None, headers: dict[str, str] | None = None, content_id: str | None = None
) -> str:
    mime = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if content_id:
        mime.append(f"Content-ID: {content_id}")
    lines = [*mime, "", f"HTTP/1.1 {status}", "OData-Version: 4.0"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body is not None:
        lines += ["Content-Type: application/json; odata.metadata=minimal", "", json.dumps(body)]
    else:
        lines += ["", ""]
    return CRLF.join(lines)


def multipart(boundary: str, parts: list[str]) -> str:
    return "".join(f"--{boundary}{CRLF}{p}{CRLF}" for p in parts) + f"--{boundary}--{CRLF}"


_KEY = re.compile(r"^/(?:api/data/v9\.2|data)/(\w+)\((\w+)='(.*)'\)$")


@dataclass
class FakeStore:
    """A batch endpoint over a dict of rows; a row body with "fail" in it is refused with 400."""

    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[dict[str, str], list[HttpRequest | list[HttpRequest]]]] = field(default_factory=list)
    whole_batch_answer: Response | None = None

    def apply(self, request: HttpRequest, rows: dict[str, dict[str, Any]]) -> tuple[str, Any, dict[str, str]]:
        found = _KEY.match(request.target)
        if request.method == "POST":
            if "fail" in request.body:
                return (
                    "400 Bad Request",
                    {"error": {"code": "0x80044331", "message": "A validation error occurred."}},
                    {},
                )
            key = request.body["name"]
            rows[key] = dict(request.body)
            return "204 No Content", None, {"OData-EntityId": f"https://x/api/data/v9.2/cards(name='{key}')"}
        assert found, request.target
        key = found.group(3).replace("''", "'")
        if request.method == "GET":
            if key not in rows:
                return "404 Not Found", {"error": {"code": "0x80040217", "message": f"card {key} Does Not Exist"}}, {}
            return "200 OK", rows[key], {}
        if request.method == "PATCH":
            if "fail" in request.body:
                return (
                    "400 Bad Request",
                    {"error": {"code": "0x80044331", "message": "A validation error occurred."}},
                    {},
                )
            rows.setdefault(key, {"name": key}).update(request.body)
            return "204 No Content", None, {}
        if request.method == "DELETE":
            return ("204 No Content", None, {}) if rows.pop(key, None) else ("404 Not Found", None, {})
        raise AssertionError(request.method)

    def app(self) -> Starlette:
        async def handler(request: Request) -> Response:
            parsed = parse_batch(request.headers["content-type"], await request.body())
            self.requests.append((dict(request.headers), parsed))
            if self.whole_batch_answer is not None:
                return self.whole_batch_answer
            go_on = "odata.continue-on-error" in request.headers.get("prefer", "")
            parts: list[str] = []
            failed = False
            for item in parsed:
                if isinstance(item, list):
                    scratch = {k: dict(v) for k, v in self.rows.items()}
                    answers = [(r, *self.apply(r, scratch)) for r in item]
                    bad = next((a for a in answers if not a[1].startswith("2")), None)
                    if bad is None:
                        self.rows = scratch
                        inner = [
                            http_part(s, body=b, headers=h, content_id=r.mime.get("Content-ID"))
                            for r, s, b, h in answers
                        ]
                        parts.append(
                            "Content-Type: multipart/mixed; boundary=changesetresponse_1"
                            + CRLF
                            + CRLF
                            + multipart("changesetresponse_1", inner).rstrip(CRLF)
                        )
                    else:
                        parts.append(http_part(bad[1], body=bad[2], content_id=bad[0].mime.get("Content-ID")))
                        failed = True
                else:
                    status, body, headers = self.apply(item, self.rows)
                    parts.append(http_part(status, body=body, headers=headers))
                    failed = not status.startswith("2")
                if failed and not go_on:
                    break
            status_code = 400 if failed and not go_on else 200
            return Response(
                multipart("batchresponse_9", parts),
                status_code=status_code,
                media_type="multipart/mixed; boundary=batchresponse_9",
            )

        return Starlette(routes=[Route("/{prefix:path}/$batch", handler, methods=["POST"])])

    def dataverse(self, **kwargs: Any) -> DataverseClient:
        return DataverseClient(
            "https://org.example.test",
            StaticTokenCredential("batch-token-123456"),
            transport=httpx.ASGITransport(app=self.app()),
            **kwargs,
        )


# Encoding --------------------------------------------------------------------------------------


def test_encoded_batch_is_crlf_multipart_with_change_sets_and_content_ids() -> None:
    items = [
        BatchRequest("GET", "cards(name='a')?$select=name"),
        ChangeSet(
            [
                BatchRequest("POST", "cards", {"name": "b"}),
                BatchRequest("PATCH", "$2", {"x": 1}, headers={"If-Match": "*"}),
            ]
        ),
        BatchRequest("DELETE", "cards(name='c')"),
    ]
    content_type, body = encode_batch(items, path_prefix="/api/data/v9.2/", boundary="batch_AAA")
    assert content_type == "multipart/mixed;boundary=batch_AAA"
    text = body.decode()
    assert text.startswith("--batch_AAA\r\n") and text.endswith("\r\n--batch_AAA--\r\n")
    assert re.search(r"\r\n--changeset_[0-9a-f-]+--\r\n--batch_AAA\r\n", text)
    get, changeset, delete = parse_batch(content_type, body)
    assert isinstance(get, HttpRequest) and isinstance(changeset, list) and isinstance(delete, HttpRequest)
    assert (get.method, get.target, get.body) == ("GET", "/api/data/v9.2/cards(name='a')?$select=name", None)
    assert "Content-ID" not in get.mime
    post, patch = changeset
    # Content-IDs are positions in the whole batch, so they are unique across change sets.
    assert (post.method, post.target, post.body, post.mime["Content-ID"]) == (
        "POST",
        "/api/data/v9.2/cards",
        {"name": "b"},
        "2",
    )
    assert post.headers["Content-Type"] == "application/json;type=entry"
    assert (patch.target, patch.mime["Content-ID"], patch.headers["If-Match"]) == ("$2", "3", "*")
    assert (delete.method, delete.target) == ("DELETE", "/api/data/v9.2/cards(name='c')")


def test_encoding_refuses_what_the_services_refuse() -> None:
    with pytest.raises(ValueError, match="GET"):
        encode_batch([ChangeSet([BatchRequest("GET", "cards")])], path_prefix="/")
    with pytest.raises(ValueError):
        encode_batch([], path_prefix="/")
    with pytest.raises(ValueError):
        encode_batch([ChangeSet([])], path_prefix="/")


# Decoding --------------------------------------------------------------------------------------

DOCUMENTED_ANSWER = """--batchresponse_3cace264
Content-Type: multipart/mixed; boundary=changesetresponse_1a5db8a1

--changesetresponse_1a5db8a1
Content-Type: application/http
Content-Transfer-Encoding: binary
Content-ID: 1

HTTP/1.1 204 No Content
OData-Version: 4.0
Location: https://org/api/data/v9.2/leads(425195a4-7a75-e911-a97a-000d3a34a1bd)
OData-EntityId: https://org/api/data/v9.2/leads(425195a4-7a75-e911-a97a-000d3a34a1bd)

--changesetresponse_1a5db8a1
Content-Type: application/http
Content-Transfer-Encoding: binary
Content-ID: 2

HTTP/1.1 204 No Content
OData-Version: 4.0

--changesetresponse_1a5db8a1--
--batchresponse_3cace264
Content-Type: application/http
Content-Transfer-Encoding: binary

HTTP/1.1 400 Bad Request
REQ_ID: 5ecd1cb3-1730-4ffc-909c-d44c22270026
Content-Type: application/json; odata.metadata=minimal
OData-Version: 4.0

{"error":{"code":"0x80044331","message":"A validation error occurred."}}
--batchresponse_3cace264--
"""


@pytest.mark.parametrize("line_end", ["\r\n", "\n"])
def test_decode_reads_nested_change_set_answers(line_end: str) -> None:
    body = DOCUMENTED_ANSWER.replace("\n", line_end).encode()
    changeset, failure = decode_batch("multipart/mixed; boundary=batchresponse_3cace264", body)
    assert isinstance(changeset, list) and isinstance(failure, ResponsePart)
    assert [(p.status, p.content_id) for p in changeset] == [(204, "1"), (204, "2")]
    assert changeset[0].headers["OData-EntityId"].endswith("leads(425195a4-7a75-e911-a97a-000d3a34a1bd)")
    assert changeset[1].json() is None
    assert (failure.status, failure.reason) == (400, "Bad Request")
    assert failure.headers["REQ_ID"] == "5ecd1cb3-1730-4ffc-909c-d44c22270026"
    assert failure.json() == {"error": {"code": "0x80044331", "message": "A validation error occurred."}}


def test_decode_refuses_a_non_multipart_answer() -> None:
    with pytest.raises(ValueError):
        decode_batch("application/json", b"{}")


# Round trips -----------------------------------------------------------------------------------


async def test_round_trip_applies_operations_and_matches_answers() -> None:
    store = FakeStore(rows={"a": {"name": "a", "x": 0}, "gone": {"name": "gone"}})
    client = store.dataverse()
    results = await client.batch(
        [
            BatchRequest("GET", "cards(name='a')"),
            ChangeSet(
                [BatchRequest("POST", "cards", {"name": "O'B"}), BatchRequest("PATCH", "cards(name='a')", {"x": 5})]
            ),
            BatchRequest("DELETE", "cards(name='gone')"),
            BatchRequest("GET", "cards(name='nobody')"),
        ]
    )
    assert [r.status for r in results] == [200, 204, 204, 204, 404]
    assert results[0].body == {"name": "a", "x": 0}
    assert results[1].headers["OData-EntityId"].endswith("cards(name='O'B')")
    assert results[4].error is not None and results[4].error.code == "0x80040217"
    assert [r.ok for r in results] == [True, True, True, True, False]
    assert store.rows == {"a": {"name": "a", "x": 5}, "O'B": {"name": "O'B"}}
    headers, parsed = store.requests[0]
    assert "prefer" not in headers
    assert headers["authorization"] == "Bearer batch-token-123456"
    assert len(parsed) == 4


async def test_without_continue_on_error_the_rest_is_not_executed() -> None:
    store = FakeStore(rows={"a": {"name": "a"}})
    results = await store.dataverse().batch(
        [
            ChangeSet([BatchRequest("PATCH", "cards(name='a')", {"x": 1})]),
            BatchRequest("POST", "cards", {"name": "b", "fail": True}),
            BatchRequest("GET", "cards(name='a')"),
        ]
    )
    assert [r.status for r in results] == [204, 400, NOT_EXECUTED]
    failed = results[1].error
    assert failed is not None and (failed.code, failed.message) == ("0x80044331", "A validation error occurred.")
    assert results[2].error is not None and results[2].error.code == "NotExecuted"
    with pytest.raises(TargetError):
        results[1].raise_for_error()
    assert results[0].raise_for_error() is results[0]
    assert store.rows == {"a": {"name": "a", "x": 1}}


async def test_continue_on_error_goes_on_and_a_failed_change_set_rolls_back_as_one() -> None:
    store = FakeStore(rows={"a": {"name": "a"}})
    results = await store.dataverse().batch(
        [
            ChangeSet(
                [
                    BatchRequest("PATCH", "cards(name='a')", {"x": 1}),
                    BatchRequest("PATCH", "cards(name='a')", {"fail": True}),
                ]
            ),
            BatchRequest("PATCH", "cards(name='a')", {"y": 2}),
        ],
        continue_on_error=True,
    )
    assert [r.status for r in results] == [400, 400, 204]
    assert all(r.error is not None and r.error.code == "0x80044331" for r in results[:2])
    assert store.rows == {"a": {"name": "a", "y": 2}}  # the change set left nothing behind
    assert store.requests[0][0]["prefer"] == "odata.continue-on-error"


async def test_fno_batches_go_to_data_batch() -> None:
    store = FakeStore(rows={"C-1": {"name": "C-1"}})
    client = FnoClient(
        "https://env.example.test",
        StaticTokenCredential("fno-batch-token-1234"),
        transport=httpx.ASGITransport(app=store.app()),
    )
    results = await client.batch([ChangeSet([BatchRequest("PATCH", "Cards(name='C-1')", {"x": 1})])])
    assert results[0].status == 204
    _, parsed = store.requests[0]
    assert isinstance(parsed[0], list) and parsed[0][0].target == "/data/Cards(name='C-1')"


async def test_a_batch_refused_as_a_whole_raises() -> None:
    store = FakeStore(
        whole_batch_answer=JSONResponse(
            {"error": {"code": "0x80048d19", "message": "Stream was not readable."}}, status_code=400
        )
    )
    with pytest.raises(TargetError) as caught:
        await store.dataverse().batch([BatchRequest("GET", "cards(name='a')")])
    assert (caught.value.status, caught.value.code) == (400, "0x80048d19")


async def test_batch_retries_depend_on_whether_it_creates() -> None:
    gateway = FakeStore(whole_batch_answer=Response("bad gateway", status_code=502))
    client = gateway.dataverse(sleep=_no_sleep, retry=RetryPolicy(max_attempts=3))
    with pytest.raises(TargetError):
        await client.batch([ChangeSet([BatchRequest("POST", "cards", {"name": "n"})])])
    assert len(gateway.requests) == 1  # a POST inside: an unknown outcome is not replayed
    with pytest.raises(TargetError):
        await client.batch([ChangeSet([BatchRequest("PATCH", "cards(name='n')", {"x": 1})])])
    assert len(gateway.requests) == 1 + 3


async def _no_sleep(seconds: float) -> None:
    return None


def test_change_set_answers_are_matched_by_content_id() -> None:
    changeset = ChangeSet(
        [BatchRequest("PATCH", "a", {}), BatchRequest("PATCH", "b", {}), BatchRequest("PATCH", "c", {})]
    )
    ok = ResponsePart(204, "No Content", httpx.Headers(), b"", "3")
    bad = ResponsePart(400, "Bad Request", httpx.Headers(), b'{"error":{"code":"0x1","message":"no"}}', "2")
    results = match("dataverse", [changeset], [[ok, bad]])  # answered out of order, the first one missing
    assert [(r.request.url, r.status) for r in results] == [("a", NOT_EXECUTED), ("b", 400), ("c", 204)]
    assert results[0].error is not None and "rolled back" in results[0].error.message
    assert results[1].error is not None and results[1].error.message == "no"
