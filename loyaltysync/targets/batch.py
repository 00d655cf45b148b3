"""OData `$batch` on the client side: encode the multipart request, decode and match the answer.

Both services speak OData v4 multipart batches (wire-formats 1.7, 2.2): parts
of `Content-Type: application/http` holding an HTTP request, writes grouped
in change sets (atomic) with a `Content-ID` each, every line ending in CRLF.
The answer nests `changesetresponse` parts inside the `batchresponse`, in
request order; a change set that failed may come back as one error part, and
without continue-on-error the service stops at the first failure. `match`
lines the answers up with the requests so each operation gets a result.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from loyaltysync.errors import TargetError
from loyaltysync.targets.http import TargetHttp, error_from_body, error_from_response

CRLF = "\r\n"
ENTRY_CONTENT_TYPE = "application/json;type=entry"
NOT_EXECUTED = 424  # our status for an operation the service never answered (Failed Dependency)


@dataclass(frozen=True, slots=True)
class BatchRequest:
    """One operation: `url` relative to the service root (or `$<content-id>...`, or absolute)."""

    method: str
    url: str
    body: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    content_id: str | None = None  # assigned from the position when None (change sets only)


@dataclass(frozen=True, slots=True)
class ChangeSet:
    """Writes applied atomically: all succeed or all roll back."""

    requests: Sequence[BatchRequest]


BatchItem = BatchRequest | ChangeSet


@dataclass(frozen=True, slots=True)
class ResponsePart:
    """One HTTP response decoded from a batch answer."""

    status: int
    reason: str
    headers: httpx.Headers
    body: bytes
    content_id: str | None

    def json(self) -> Any:
        """The body parsed as JSON, None when empty or not JSON."""
        text = self.body.strip()
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return None


# A decoded answer: a top-level response, or the responses of one change set.
DecodedPart = ResponsePart | list[ResponsePart]


@dataclass(frozen=True, slots=True)
class BatchResult:
    """The outcome of one operation of a batch, in request order."""

    request: BatchRequest
    status: int
    headers: httpx.Headers
    body: Any
    error: TargetError | None

    @property
    def ok(self) -> bool:
        return self.error is None

    def raise_for_error(self) -> BatchResult:
        """Self when the operation succeeded; otherwise raise its `TargetError`."""
        if self.error is not None:
            raise self.error
        return self


def flatten(items: Sequence[BatchItem]) -> list[BatchRequest]:
    """Every request of `items` in order, change sets opened up."""
    out: list[BatchRequest] = []
    for item in items:
        out.extend(item.requests if isinstance(item, ChangeSet) else (item,))
    return out


def _target_url(url: str, path_prefix: str) -> str:
    if url.startswith(("$", "http://", "https://", "/")):
        return url
    return path_prefix + url


def _http_part(request: BatchRequest, path_prefix: str, content_id: str | None) -> str:
    lines = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if content_id is not None:
        lines.append(f"Content-ID: {content_id}")
    lines += ["", f"{request.method.upper()} {_target_url(request.url, path_prefix)} HTTP/1.1"]
    headers = {k.lower(): (k, v) for k, v in request.headers.items()}
    if request.body is not None and "content-type" not in headers:
        headers["content-type"] = ("Content-Type", ENTRY_CONTENT_TYPE)
    if "accept" not in headers:
        headers["accept"] = ("Accept", "application/json")
    lines += [f"{k}: {v}" for k, v in headers.values()]
    lines.append("")
    body = json.dumps(request.body, separators=(",", ":")) if request.body is not None else ""
    lines.append(body)
    return CRLF.join(lines)


def encode_batch(items: Sequence[BatchItem], *, path_prefix: str, boundary: str | None = None) -> tuple[str, bytes]:
    """The `Content-Type` header and body of a `$batch` request for `items`.

    `path_prefix` (e.g. `/api/data/v9.2/`) turns relative URLs into the absolute
    paths written in each part's request line. Change-set requests without a
    `content_id` get their 1-based position in the whole batch.
    """
    if not items:
        raise ValueError("a batch needs at least one operation")
    batch = boundary or f"batch_{uuid.uuid4()}"
    chunks: list[str] = []
    position = 0
    for item in items:
        if isinstance(item, ChangeSet):
            if not item.requests:
                raise ValueError("a change set needs at least one operation")
            changeset = f"changeset_{uuid.uuid4()}"
            inner: list[str] = []
            for request in item.requests:
                position += 1
                if request.method.upper() == "GET":
                    raise ValueError("GET requests cannot sit inside a change set")
                content_id = request.content_id or str(position)
                inner.append(f"--{changeset}{CRLF}{_http_part(request, path_prefix, content_id)}")
            chunks.append(
                f"--{batch}{CRLF}Content-Type: multipart/mixed;boundary={changeset}{CRLF}{CRLF}"
                + CRLF.join(inner)
                + f"{CRLF}--{changeset}--"
            )
        else:
            position += 1
            chunks.append(f"--{batch}{CRLF}{_http_part(item, path_prefix, None)}")
    text = CRLF.join(chunks) + f"{CRLF}--{batch}--{CRLF}"
    return f"multipart/mixed;boundary={batch}", text.encode("utf-8")


_BOUNDARY = re.compile(r'boundary="?([^";,\s]+)"?', re.IGNORECASE)
_STATUS_LINE = re.compile(r"^HTTP/\d(?:\.\d)?\s+(\d{3})\s*(.*)$")


def boundary_of(content_type: str) -> str | None:
    """The boundary parameter of a multipart content type, None when it is not multipart."""
    if not content_type.lower().lstrip().startswith("multipart/"):
        return None
    found = _BOUNDARY.search(content_type)
    return found.group(1) if found else None


def _split_multipart(body: bytes, boundary: str) -> list[bytes]:
    delimiter = b"--" + boundary.encode("ascii")
    segments = body.split(delimiter)
    parts = []
    for segment in segments[1:]:
        if segment.startswith(b"--"):
            break
        # The line break before each delimiter belongs to the delimiter.
        segment = segment.removeprefix(b"\r\n").removeprefix(b"\n")
        segment = segment.removesuffix(b"\n").removesuffix(b"\r")
        parts.append(segment)
    return parts


def _split_head(data: bytes) -> tuple[list[str], bytes]:
    for separator in (b"\r\n\r\n", b"\n\n"):
        head, found, rest = data.partition(separator)
        if found:
            return head.decode("utf-8", "replace").splitlines(), rest
    return data.decode("utf-8", "replace").splitlines(), b""


def _headers(lines: Sequence[str]) -> httpx.Headers:
    headers = httpx.Headers()
    for line in lines:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip()] = value.strip()
    return headers


def _response_part(mime_headers: httpx.Headers, payload: bytes) -> ResponsePart:
    lines, body = _split_head(payload)
    lines = [line for line in lines if line.strip()] or [""]
    status_line = _STATUS_LINE.match(lines[0].strip())
    if status_line is None:
        raise ValueError(f"batch part has no HTTP status line: {lines[0][:100]!r}")
    return ResponsePart(
        status=int(status_line.group(1)),
        reason=status_line.group(2).strip(),
        headers=_headers(lines[1:]),
        body=body,
        content_id=mime_headers.get("Content-ID"),
    )


def decode_batch(content_type: str, body: bytes) -> list[DecodedPart]:
    """The responses of a `$batch` answer in order; a change set's responses come as one list.

    Tolerates LF-only line endings (we must send CRLF; we need not insist on it).
    """
    boundary = boundary_of(content_type)
    if boundary is None:
        raise ValueError(f"not a multipart batch answer: {content_type!r}")
    decoded: list[DecodedPart] = []
    for raw in _split_multipart(body, boundary):
        head, payload = _split_head(raw)
        mime_headers = _headers(head)
        inner_boundary = boundary_of(mime_headers.get("Content-Type", ""))
        if inner_boundary is not None:
            decoded.append([_response_part(*_mime(p)) for p in _split_multipart(payload, inner_boundary)])
        else:
            decoded.append(_response_part(mime_headers, payload))
    return decoded


def _mime(raw: bytes) -> tuple[httpx.Headers, bytes]:
    head, payload = _split_head(raw)
    return _headers(head), payload


def _result(target: str, request: BatchRequest, part: ResponsePart) -> BatchResult:
    error = None
    if not 200 <= part.status < 300:
        error = error_from_body(
            target, part.status, part.body, reason=part.reason, method=request.method.upper(), url=request.url
        )
    return BatchResult(request, part.status, part.headers, part.json(), error)


def _not_executed(target: str, request: BatchRequest, why: str) -> BatchResult:
    error = TargetError(target, NOT_EXECUTED, "NotExecuted", why, method=request.method.upper(), url=request.url)
    return BatchResult(request, NOT_EXECUTED, httpx.Headers(), None, error)


def _match_changeset(target: str, changeset: ChangeSet, first_position: int, answer: DecodedPart) -> list[BatchResult]:
    ids = [r.content_id or str(first_position + i) for i, r in enumerate(changeset.requests)]
    if isinstance(answer, ResponsePart):
        # The whole change set failed and came back as a single response: every member shares it.
        return [_result(target, r, answer) for r in changeset.requests]
    by_id = {p.content_id: p for p in answer if p.content_id is not None}
    results = []
    failure = next((p for p in answer if not 200 <= p.status < 300), None)
    for index, (request, content_id) in enumerate(zip(changeset.requests, ids, strict=True)):
        part = by_id.get(content_id)
        if part is None and not by_id and index < len(answer):
            part = answer[index]  # no Content-IDs echoed: rely on order
        if part is not None:
            results.append(_result(target, request, part))
        elif failure is not None:
            results.append(_not_executed(target, request, "rolled back: another operation in its change set failed"))
        else:
            results.append(_not_executed(target, request, "the service returned no answer for this operation"))
    return results


def match(target: str, items: Sequence[BatchItem], answer: Sequence[DecodedPart]) -> list[BatchResult]:
    """One `BatchResult` per request of `items` (flattened, in order).

    Answers are matched by position (the service answers in request order and,
    without continue-on-error, stops after the first failure) and inside a
    change set by `Content-ID`. Operations the service did not answer get
    status 424 and a `NotExecuted` error; members of a change set that failed as
    a whole share its error.
    """
    results: list[BatchResult] = []
    remaining = list(answer)
    position = 1
    for item in items:
        requests = item.requests if isinstance(item, ChangeSet) else (item,)
        if not remaining:
            why = (
                "not executed: an earlier operation in the batch failed"
                if any(not r.ok for r in results)
                else "the service returned no answer for this operation"
            )
            results.extend(_not_executed(target, r, why) for r in requests)
        elif isinstance(item, ChangeSet):
            results.extend(_match_changeset(target, item, position, remaining.pop(0)))
        else:
            part = remaining.pop(0)
            if not isinstance(part, ResponsePart):
                raise ValueError("batch answer has a change set response where a single response was expected")
            results.append(_result(target, item, part))
        position += len(requests)
    return results


async def execute(
    http: TargetHttp, items: Sequence[BatchItem], *, headers: Mapping[str, str] | None = None
) -> list[BatchResult]:
    """Send `items` as one `$batch` through `http`; one result per operation, in order.

    The whole batch is retried only when it holds no POST (a retried POST could
    create twice). An answer that is not multipart (the batch itself was
    refused) raises `TargetError`.
    """
    path_prefix = httpx.URL(http.base_url).path
    content_type, body = encode_batch(items, path_prefix=path_prefix)
    idempotent = all(r.method.upper() != "POST" for r in flatten(items))
    response = await http.request(
        "POST",
        "$batch",
        headers={**(headers or {}), "Content-Type": content_type},
        content=body,
        allow=_BATCH_ERROR_STATUSES,
        idempotent=idempotent,
    )
    answer_type = response.headers.get("Content-Type", "")
    if boundary_of(answer_type) is None:
        if response.is_success:
            raise TargetError(
                http.target,
                response.status_code,
                "BadBatchAnswer",
                f"expected a multipart answer, got {answer_type or 'no content type'}",
                method="POST",
                url=str(response.request.url),
            )
        raise error_from_response(http.target, response)
    return match(http.target, items, decode_batch(answer_type, response.content))


_BATCH_ERROR_STATUSES = frozenset(range(400, 600))
