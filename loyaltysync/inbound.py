"""Inbound webhooks: authenticate, size-check, parse, answer. The one place HTTP status is decided.

No I/O here: the function adapter puts `Reply.messages` on the template's
queue (through the queue output binding) and returns `Reply` as the response,
so answering takes milliseconds and never waits on F&O or Dataverse.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from loyaltysync import telemetry
from loyaltysync.errors import EventError
from loyaltysync.events import Handshake, parse_inbound
from loyaltysync.templates import Side, Template

log = logging.getLogger(__name__)
JSON_TYPES = ("application/json", "application/cloudevents+json", "application/cloudevents-batch+json", "text/json")


@dataclass(slots=True)
class Reply:
    """The HTTP answer and the queue messages (ChangeEvent JSON) to enqueue."""

    status: int
    body: dict[str, Any]
    messages: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    def body_bytes(self) -> bytes:
        return json.dumps(self.body, separators=(",", ":")).encode()


def _error(status: int, reason: str) -> Reply:
    return Reply(status=status, body={"error": reason, "status": status})


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def check_secret(headers: Mapping[str, str], secret: str | None, header: str) -> Reply | None:
    """With a shared secret configured, a request without the matching header gets 401."""
    if not secret:
        return None
    given = _lower(headers).get(header.lower(), "")
    if not hmac.compare_digest(given.encode(), secret.encode()):
        return _error(401, f"missing or wrong {header} header")
    return None


def handle_options(headers: Mapping[str, str]) -> Reply:
    """CloudEvents abuse-protection handshake (Event Grid sends OPTIONS with WebHook-Request-Origin)."""
    origin = _lower(headers).get("webhook-request-origin")
    if not origin:
        return _error(400, "OPTIONS is only for the CloudEvents handshake: WebHook-Request-Origin header missing")
    return Reply(status=200, body={}, headers={"WebHook-Allowed-Origin": origin, "Allow": "POST, OPTIONS"})


def handle_inbound(
    side: Side,
    template: Template | None,
    templates: Mapping[str, Template],
    body: bytes,
    headers: Mapping[str, str],
    *,
    max_body_bytes: int,
    secret: str | None = None,
    secret_header: str = "x-loyaltysync-secret",  # noqa: S107 - a header name, not a secret
    host_traceparent: str | None = None,
) -> Reply:
    """Turn one webhook delivery into queue messages and an HTTP answer.

    401 wrong shared secret; 413 body too large; 415 not JSON; 400/422 unreadable
    payload with the reason; 200 Event Grid validation answer; 202 accepted with
    the event ids, and the Event Grid events left out as not F&O's (`skipped`: each
    logged and counted; 202 even when none was F&O's, so Event Grid redelivers
    nothing). Nothing is queued unless the answer is 202. Traced as one span
    (a child of the host's request when `host_traceparent` names it); each queued
    event carries the trace context on to the worker.
    """
    recorder = telemetry.current()
    name = template.name if template is not None else None
    with recorder.inbound_span(side, name, host_traceparent=host_traceparent):
        reply = _handle(side, template, templates, body, headers, max_body_bytes, secret, secret_header)
        recorder.answered(side, name, reply.status, reply.body.get("error"))
        return reply


def _handle(
    side: Side,
    template: Template | None,
    templates: Mapping[str, Template],
    body: bytes,
    headers: Mapping[str, str],
    max_body_bytes: int,
    secret: str | None,
    secret_header: str,
) -> Reply:
    refused = check_secret(headers, secret, secret_header)
    if refused is not None:
        return refused
    if len(body) > max_body_bytes:
        return _error(413, f"body of {len(body)} bytes is over the limit of {max_body_bytes} bytes (MAX_BODY_BYTES)")
    content_type = _lower(headers).get("content-type", "").split(";")[0].strip().lower()
    if content_type and content_type not in JSON_TYPES:
        return _error(415, f"content type {content_type!r} is not JSON; send application/json")
    if not body.strip():
        return _error(400, "empty body: expected a JSON payload")
    try:
        result = parse_inbound(side, body, headers, templates=templates, template=template)
    except EventError as exc:
        return _error(exc.status, exc.reason)
    if isinstance(result, Handshake):
        return Reply(status=200, body=dict(result.response))
    events = result.events
    answer: dict[str, Any] = {"accepted": len(events), "event_ids": [e.event_id for e in events]}
    for item in result.skipped:
        log.warning(
            "Event Grid event [%d] (id %s, eventType %s) skipped: %s", item.index, item.id, item.event_type, item.reason
        )
        telemetry.current().foreign_event(side, item.event_type)
    if result.skipped:
        answer["skipped"] = [
            {"index": item.index, "id": item.id, "eventType": item.event_type, "reason": item.reason}
            for item in result.skipped
        ]
    return Reply(status=202, body=answer, messages=[telemetry.current().stamp(e).to_json() for e in events])
