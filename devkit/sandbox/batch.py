"""The server side of OData `$batch`: parse the multipart request, run its parts, render the answer.

Parts run as sub-requests through the emulator's own ASGI app, so a part
behaves exactly like the same request sent alone: same handlers, same bearer
check, same errors. Each part is one direct ASGI call (scope, receive, send
built here, as httpx.ASGITransport would build them) rather than a request
through an httpx client: a 1000-part batch then costs the handlers' work, not
1000 client round trips. Sub-requests carry a scope flag so the sandbox
middleware logs them but injects no faults of its own (the `$batch` request
already had its chance).

Wire rules (docs/wire-formats.md 1.7): lines must end in CRLF ("Stream was not
readable" otherwise); a change set is atomic and holds only writes;
`$<Content-ID>` refers to an earlier part of the same change set, in the URL
or as the value of an `@odata.bind` / `@odata.id`.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Mapping, MutableMapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from http import HTTPStatus
from itertools import pairwise
from typing import Any
from urllib.parse import unquote, urlsplit
from uuid import uuid4

from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Scope

from devkit.sandbox.common import SUBREQUEST_SCOPE_KEY

NOT_READABLE = "Stream was not readable."
CHANGE_SET_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE", "MERGE"})
# Request headers of the $batch request that every part inherits unless it sets its own.
FORWARDED = frozenset({"callerobjectid", "prefer", "consistency", "odata-version", "odata-maxversion"})
_DROPPED_PART_HEADERS = frozenset({"content-length", "host", "transfer-encoding", "content-id", "authorization"})
_REFERENCE = re.compile(r"\$([A-Za-z0-9_.\-]+)")
_HEADER_CASE = {
    "odata-entityid": "OData-EntityId",
    "odata-version": "OData-Version",
    "etag": "ETag",
    "www-authenticate": "WWW-Authenticate",
    "preference-applied": "Preference-Applied",
}


class BatchSyntaxError(ValueError):
    """A `$batch` body that cannot be read. `message` is what the service says; the answer is 400."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BatchLimitError(BatchSyntaxError):
    """More requests than the caller's limit (Dataverse 1000, F&O 5000). Callers may reword `message`."""

    def __init__(self, count: int, limit: int) -> None:
        super().__init__(f"The batch contains {count} requests; the limit is {limit} requests per batch.")
        self.count = count
        self.limit = limit


@dataclass
class Part:
    """One request of a batch. Header names are lower case."""

    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    content_id: str | None = None


@dataclass
class ResponsePart:
    """One response of a batch. Header names are lower case."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    content_id: str | None = None


BatchItem = Part | list[Part]
ResponseItem = ResponsePart | list[ResponsePart]


# --- parsing -------------------------------------------------------------------------


def parse_batch(body: bytes, content_type: str, *, max_parts: int | None = None) -> list[BatchItem]:
    """Parse a `$batch` request body; a list[Part] is one change set. Raises BatchSyntaxError.

    `max_parts` counts every request, those inside change sets included (BatchLimitError).
    """
    boundary = _boundary(content_type, "batch")
    items: list[BatchItem] = []
    count = 0
    seen_ids: set[str] = set()
    for headers, content in _split(body, boundary):
        part_type = headers.get("content-type", "")
        if part_type.lower().startswith("multipart/mixed"):
            changeset: list[Part] = []
            for inner_headers, inner in _split(content, _boundary(part_type, "change set")):
                inner_type = inner_headers.get("content-type", "")
                if inner_type.lower().startswith("multipart/"):
                    raise BatchSyntaxError("Change sets cannot be nested inside other change sets.")
                part = _request(inner_headers, inner)
                if part.method not in CHANGE_SET_METHODS:
                    raise BatchSyntaxError(
                        f"An invalid HTTP method '{part.method}' was detected for a request in a change set. "
                        "Requests in change sets only support the HTTP methods 'POST', 'PUT', 'DELETE', and 'PATCH'."
                    )
                _check_id(part, seen_ids)
                changeset.append(part)
            count += len(changeset)
            items.append(changeset)
        else:
            part = _request(headers, content)
            _check_id(part, seen_ids)
            count += 1
            items.append(part)
        if max_parts is not None and count > max_parts:
            raise BatchLimitError(count, max_parts)
    return items


def _check_id(part: Part, seen: set[str]) -> None:
    if part.content_id is None:
        return
    if part.content_id in seen:
        raise BatchSyntaxError(
            f"The content ID '{part.content_id}' was found more than once in the same change set or same batch "
            "request. Content IDs have to be unique across all operations of a change set for OData V4.0 and "
            "have to be unique across all operations in the whole batch request for OData V4.01."
        )
    seen.add(part.content_id)


def _boundary(content_type: str, what: str) -> str:
    media, _, params = content_type.partition(";")
    if media.strip().lower() != "multipart/mixed":
        raise BatchSyntaxError(
            f"The {what} content type '{content_type}' is not valid; expected multipart/mixed with a boundary."
        )
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "boundary" and value.strip().strip('"'):
            return value.strip().strip('"')
    raise BatchSyntaxError(f"The {what} content type '{content_type}' has no boundary parameter.")


def _split(body: bytes, boundary: str) -> list[tuple[dict[str, str], bytes]]:
    """The parts between `--boundary` lines, each as (MIME headers, content). Checks CRLF line ends."""
    delimiter = b"--" + boundary.encode("latin-1")
    starts: list[int] = []
    closed = False
    for match in re.finditer(re.escape(delimiter), body):
        at = match.start()
        if at > 0 and body[at - 1 : at] != b"\n":
            continue  # the boundary text inside content, not a delimiter line
        if at > 0 and body[at - 2 : at] != b"\r\n":
            raise BatchSyntaxError(NOT_READABLE)
        after = match.end()
        if body[after : after + 2] == b"--":
            closed = True
            starts.append(at)
            break
        eol = body.find(b"\n", after)
        line_rest = body[after:] if eol < 0 else body[after:eol]
        if line_rest.rstrip(b"\r").strip(b" \t"):
            continue  # a longer boundary that merely starts with ours
        if eol < 0 or body[eol - 1 : eol] != b"\r":
            raise BatchSyntaxError(NOT_READABLE)
        starts.append(at)
    if not closed:
        if b"\r\n" not in body and b"\n" in body:
            raise BatchSyntaxError(NOT_READABLE)
        raise BatchSyntaxError(f"The batch is missing its closing boundary '--{boundary}--'.")
    parts: list[tuple[dict[str, str], bytes]] = []
    for begin, end in pairwise(starts):
        line_end = body.index(b"\n", begin) + 1
        raw = body[line_end : end - 2]  # the CRLF before a delimiter belongs to the delimiter
        headers, content = _headers_and_content(raw)
        parts.append((headers, content))
    return parts


def _headers_and_content(raw: bytes) -> tuple[dict[str, str], bytes]:
    if raw.startswith(b"\r\n"):  # no headers: the blank line comes first
        return {}, raw[2:]
    head, sep, content = raw.partition(b"\r\n\r\n")
    if not sep:
        head, content = raw, b""  # headers only (a GET); bare LF is caught just below
    if b"\n" in head.replace(b"\r\n", b""):
        raise BatchSyntaxError(NOT_READABLE)
    headers: dict[str, str] = {}
    for line in head.decode("latin-1").split("\r\n"):
        if not line.strip():
            continue
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise BatchSyntaxError(f"The header line '{line}' is not valid; expected 'Name: value'.")
        headers[name.strip().lower()] = value.strip()
    return headers, content


def _request(mime: dict[str, str], content: bytes) -> Part:
    if mime.get("content-type", "").split(";")[0].strip().lower() != "application/http":
        raise BatchSyntaxError(
            f"The content type '{mime.get('content-type', '')}' of a batch part is not valid; "
            "expected application/http."
        )
    first, _, rest = content.partition(b"\r\n")
    if b"\n" in first:
        raise BatchSyntaxError(NOT_READABLE)
    words = first.decode("latin-1").split()
    if len(words) not in (2, 3) or (len(words) == 3 and not words[2].startswith("HTTP/")):
        raise BatchSyntaxError(f"The request line '{first.decode('latin-1')}' of a batch part is not valid.")
    headers, body = _headers_and_content(rest) if rest else ({}, b"")
    content_id = mime.get("content-id") or headers.get("content-id")
    return Part(words[0].upper(), words[1], headers, body, content_id)


def parse_batch_response(body: bytes, content_type: str) -> list[ResponseItem]:
    """Parse a `$batch` response (what render_batch writes); a list is one change-set response."""
    items: list[ResponseItem] = []
    for headers, content in _split(body, _boundary(content_type, "batch response")):
        part_type = headers.get("content-type", "")
        if part_type.lower().startswith("multipart/mixed"):
            items.append([_response(h, c) for h, c in _split(content, _boundary(part_type, "change set"))])
        else:
            items.append(_response(headers, content))
    return items


def _response(mime: dict[str, str], content: bytes) -> ResponsePart:
    first, _, rest = content.partition(b"\r\n")
    words = first.decode("latin-1").split(" ", 2)
    if len(words) < 2 or not words[1].isdigit():
        raise BatchSyntaxError(f"The status line '{first.decode('latin-1')}' is not valid.")
    headers, body = _headers_and_content(rest) if rest else ({}, b"")
    return ResponsePart(int(words[1]), headers, body, mime.get("content-id"))


# --- rendering -----------------------------------------------------------------------


def render_batch(items: list[ResponseItem], boundary_prefix: str = "batchresponse") -> tuple[bytes, str]:
    """Render responses as a multipart/mixed body (CRLF line ends); returns (body, content type)."""
    boundary = f"{boundary_prefix}_{uuid4()}"
    out: list[bytes] = []
    for item in items:
        out.append(f"--{boundary}\r\n".encode())
        if isinstance(item, list):
            inner = f"changesetresponse_{uuid4()}"
            out.append(f"Content-Type: multipart/mixed; boundary={inner}\r\n\r\n".encode())
            for part in item:
                out.append(f"--{inner}\r\n".encode())
                out.append(_render_part(part))
            out.append(f"--{inner}--\r\n".encode())
        else:
            out.append(_render_part(item))
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/mixed; boundary={boundary}"


def _render_part(part: ResponsePart) -> bytes:
    lines = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if part.content_id is not None:
        lines.append(f"Content-ID: {part.content_id}")
    try:
        reason = HTTPStatus(part.status).phrase
    except ValueError:
        reason = ""
    lines += ["", f"HTTP/1.1 {part.status} {reason}".rstrip()]
    lines += [f"{_header_name(k)}: {v}" for k, v in part.headers.items() if k.lower() != "content-length"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + part.body + b"\r\n"


def _header_name(name: str) -> str:
    lower = name.lower()
    return _HEADER_CASE.get(lower) or "-".join(word.capitalize() for word in lower.split("-"))


# --- execution -----------------------------------------------------------------------


_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "MERGE"})


def _ascii(text: str) -> bytes:
    """A URL part as the bytes a client sends: anything outside ASCII percent-encoded (as UTF-8)."""
    try:
        return text.encode("ascii")
    except UnicodeEncodeError:
        return "".join(c if c.isascii() else "".join(f"%{b:02X}" for b in c.encode()) for c in text).encode("ascii")


def _default_error(status: int, message: str) -> Response:
    return JSONResponse({"error": {"code": "", "message": message}}, status_code=status)


class _Rollback(Exception):
    """Raised inside a change set's transaction to undo it; carries the failing response."""

    def __init__(self, failure: ResponsePart) -> None:
        super().__init__(failure.status)
        self.failure = failure


class _UnknownReference(Exception):
    def __init__(self, reference: str) -> None:
        super().__init__(reference)
        self.reference = reference


def forwarded_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers of the `$batch` request that parts inherit: MSCRM.*, CallerObjectId, Prefer (without
    odata.continue-on-error), Consistency, OData-Version, OData-MaxVersion. Names lower case."""
    out: dict[str, str] = {}
    for name, value in headers.items():
        lower = name.lower()
        if lower == "prefer":
            kept = [p.strip() for p in value.split(",") if p.strip().lower() != "odata.continue-on-error"]
            if kept:
                out[lower] = ", ".join(kept)
        elif lower in FORWARDED or lower.startswith("mscrm."):
            out[lower] = value
    return out


async def execute_batch(
    app: ASGIApp,
    parts: list[BatchItem],
    *,
    base_path: str,
    auth_header: str,
    extra_headers: Mapping[str, str],
    continue_on_error: bool,
    transaction: Callable[[], AbstractContextManager[Any]],
    error: Callable[[int, str], Response] = _default_error,
    origin: str = "http://localhost",
    partial_on_stop: bool = False,
) -> tuple[int, list[ResponseItem]]:
    """Run the parts through `app` in order; returns (status of the $batch response, items to render).

    base_path: the service root path ("/api/data/v9.2", "/data") for part URLs relative to it.
    auth_header: the $batch request's Authorization value, sent with every part.
    extra_headers: headers of the $batch request; the ones in `forwarded_headers` reach every part
    that does not set them itself.
    A change set runs inside `transaction()` and is rolled back when one of its parts fails (status
    >= 400); its answer is then that one failing response. Without continue-on-error the batch stops
    at the first failure and answers 400 with only the failing response (Dataverse); with
    `partial_on_stop` it answers 200 with the responses so far, the failing one last (OData v4).
    With continue-on-error it answers 200 with every response.
    error(status, message) renders an error the batch itself produces (an unknown Content-ID reference).
    """
    inherited = forwarded_headers(extra_headers)
    inherited["authorization"] = auth_header
    items: list[ResponseItem] = []
    runner = _Runner(app, base_path, inherited, error, origin)
    for item in parts:
        if isinstance(item, Part):
            answer = await runner.run(item, references=None)
            failure = answer if answer.status >= 400 else None
            result: ResponseItem = answer
        else:
            failure, result = await _run_change_set(runner, item, transaction)
        if failure is not None and not continue_on_error:
            if partial_on_stop:
                return 200, [*items, failure]
            return 400, [failure]
        items.append(result)
    return 200, items


async def _run_change_set(
    runner: _Runner, changeset: list[Part], transaction: Callable[[], AbstractContextManager[Any]]
) -> tuple[ResponsePart | None, ResponseItem]:
    answers: list[ResponsePart] = []
    references: dict[str, str] = {}
    try:
        with transaction():
            for part in changeset:
                answer = await runner.run(part, references)
                if answer.status >= 400:
                    raise _Rollback(answer)
                answers.append(answer)
                if part.content_id is not None:
                    location = answer.headers.get("odata-entityid") or answer.headers.get("location")
                    if location:
                        references[part.content_id] = urlsplit(location).path
    except _Rollback as rollback:
        return rollback.failure, rollback.failure
    return None, answers


class _Runner:
    def __init__(
        self,
        app: ASGIApp,
        base_path: str,
        inherited: dict[str, str],
        error: Callable[[int, str], Response],
        origin: str,
    ) -> None:
        self.app = app
        self.base_path = "/" + base_path.strip("/") if base_path.strip("/") else ""
        self.inherited = inherited
        self.error = error
        split = urlsplit(origin)
        self.scheme = split.scheme or "http"
        self.host = split.netloc or "localhost"
        self.server = (split.hostname or "localhost", split.port or (443 if self.scheme == "https" else 80))

    async def run(self, part: Part, references: dict[str, str] | None) -> ResponsePart:
        """One part as a sub-request; `references` maps Content-IDs to entity paths (None outside change sets)."""
        try:
            url = self.url(part.url, references or {})
            body = self.substitute(part.body, references or {})
        except _UnknownReference as exc:
            return self.failure(
                400, f"Content-ID Reference: '${exc.reference}' does not exist in the batch context.", part
            )
        headers = dict(self.inherited)
        headers.update({k: v for k, v in part.headers.items() if k not in _DROPPED_PART_HEADERS})
        try:
            status, answer_headers, content = await self.call(part.method, url, headers, body)
        except Exception as exc:  # a dropped or crashed sub-request is that part's failure
            return self.failure(500, f"The request failed: {type(exc).__name__}: {exc}", part)
        return ResponsePart(status, answer_headers, content, part.content_id)

    async def call(
        self, method: str, url: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        """Send one request straight into the ASGI app: (status, lower-case headers, body)."""
        path, _, query = url.partition("?")
        raw_headers = [(b"host", self.host.encode("latin-1"))]
        raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items() if k != "host"]
        if body or method in _BODY_METHODS:
            raw_headers.append((b"content-length", str(len(body)).encode()))
        scope: Scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "headers": raw_headers,
            "scheme": self.scheme,
            "path": unquote(path),
            "raw_path": _ascii(path),
            "query_string": _ascii(query),
            "server": self.server,
            "client": ("127.0.0.1", 123),
            "root_path": "",
            SUBREQUEST_SCOPE_KEY: True,
        }
        sent_body = False
        done = asyncio.Event()
        status = 500
        answer_headers: dict[str, str] = {}
        chunks: list[bytes] = []

        async def receive() -> Message:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                for raw_name, raw_value in message.get("headers", []):
                    name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
                    answer_headers[name] = f"{answer_headers[name]}, {value}" if name in answer_headers else value
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    done.set()

        try:
            await self.app(scope, receive, send)
        finally:
            done.set()
        return status, answer_headers, b"".join(chunks)

    def failure(self, status: int, message: str, part: Part) -> ResponsePart:
        rendered = self.error(status, message)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in rendered.raw_headers}
        return ResponsePart(status, headers, bytes(rendered.body), part.content_id)

    def url(self, url: str, references: dict[str, str]) -> str:
        if url.startswith("$"):
            match = _REFERENCE.match(url)
            name = match.group(1) if match else ""
            if name not in references:
                raise _UnknownReference(name)
            return references[name] + url[1 + len(name) :]
        if url.startswith(("http://", "https://")):
            split = urlsplit(url)
            return split.path + (f"?{split.query}" if split.query else "")
        if url.startswith("/"):
            return url
        return f"{self.base_path}/{url}"

    def substitute(self, body: bytes, references: dict[str, str]) -> bytes:
        """Replace "$n" values of @odata.bind / @odata.id members with the entity path (service-root relative)."""
        if b"$" not in body:
            return body
        try:
            document = json.loads(body)
        except ValueError:
            return body
        changed = [False]

        def resolve(value: Any) -> Any:
            if isinstance(value, str) and value.startswith("$") and _REFERENCE.fullmatch(value):
                name = value[1:]
                if name not in references:
                    raise _UnknownReference(name)
                changed[0] = True
                path = references[name]
                return path[len(self.base_path) :] if self.base_path and path.startswith(self.base_path + "/") else path
            if isinstance(value, list):
                return [resolve(v) for v in value]
            return value

        def walk(node: Any) -> Any:
            if isinstance(node, dict):
                return {
                    k: resolve(v) if k.endswith("@odata.bind") or k == "@odata.id" else walk(v) for k, v in node.items()
                }
            if isinstance(node, list):
                return [walk(v) for v in node]
            return node

        result = walk(document)
        return json.dumps(result, ensure_ascii=False).encode() if changed[0] else body
