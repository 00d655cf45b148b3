"""Webhook delivery: committed changes -> registered steps -> POSTs through `sandbox.delivery`.

Steps are read from the registration tables (enabled, webhook endpoint,
message and table from the sdkmessagefilter) and cached until one of those
tables changes. One POST per change and matching step, after the writer has its
response. Bodies over 256 KB lose `ParentContext`, `InputParameters`,
`PreEntityImages` and `PostEntityImages` and get `x-ms-dynamics-msg-size-exceeded`
[D16]. Header values are lower case, as docs/wire-formats.md §1.11 notes.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode, urlsplit

from devkit.sandbox.dataverse import context
from devkit.sandbox.dataverse.org import Organization
from devkit.sandbox.dataverse.registration import HTTP_HEADER, HTTP_QUERY, WEBHOOK, WEBHOOK_KEY, parse_settings
from devkit.sandbox.dataverse.scope import Change
from devkit.sandbox.delivery import DATAVERSE_WEBHOOK_RETRY, Outgoing

SIZE_LIMIT = 256 * 1024
REDUCED_AWAY = ("ParentContext", "InputParameters", "PreEntityImages", "PostEntityImages")
PRE, POST, BOTH = 0, 1, 2


@dataclass(frozen=True)
class ImageSpec:
    """A registered image: alias, 0 pre / 1 post / 2 both, and its attributes (None = all columns)."""

    alias: str
    kind: int
    attributes: tuple[str, ...] | None


@dataclass(frozen=True)
class Route:
    """Where and how one enabled webhook step delivers."""

    step_id: str
    step_name: str | None
    rank: int
    url: str
    headers: tuple[tuple[str, str], ...]
    filtering: frozenset[str] | None
    images: tuple[ImageSpec, ...]


def _columns(text: Any) -> tuple[str, ...] | None:
    names = tuple(n.strip() for n in str(text or "").split(",") if n.strip())
    return names or None


def _delivery_url(endpoint: dict[str, Any]) -> tuple[str, tuple[tuple[str, str], ...]]:
    url: str = endpoint["url"]
    authtype, secret = endpoint.get("authtype"), endpoint.get("authvalue") or ""
    joiner = "&" if urlsplit(url).query else "?"
    if authtype == WEBHOOK_KEY:
        return f"{url}{joiner}{urlencode({'code': secret})}", ()
    if authtype == HTTP_QUERY:
        return f"{url}{joiner}{urlencode(parse_settings(secret))}", ()
    if authtype == HTTP_HEADER:
        return url, tuple(parse_settings(secret))
    return url, ()


def _dumps(payload: dict[str, Any]) -> bytes:
    # DataContractJsonSerializer escapes every '/' (the sample shows "\/Date(...)\/" and "http:\/\/").
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).replace("/", "\\/").encode()


def _random_id() -> str:
    return str(uuid.uuid4())


class Dispatcher:
    """Turns committed changes into webhook deliveries and keeps a log of what it sent.

    `submit` takes each delivery (the sandbox's delivery queue; the simulator hands it on at once).
    `new_id` and `clock` (seconds since 1970) give operation and request ids and the operation time:
    random GUIDs and the wall clock by default, the simulator's seeded ones there.
    """

    def __init__(
        self,
        org: Organization,
        submit: Callable[[Outgoing], None],
        *,
        size_limit: int = SIZE_LIMIT,
        new_id: Callable[[], str] = _random_id,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.org = org
        self.submit = submit
        self.new_id = new_id
        self.clock = clock
        self.size_limit = size_limit
        self.log: deque[dict[str, Any]] = deque(maxlen=1000)
        self._routes: dict[tuple[str, str], list[Route]] = {}
        self._version = -1
        self.organization_host = (urlsplit(org.public_url).hostname or "localhost").lower()

    def routes(self, message: str, table: str) -> list[Route]:
        """The enabled webhook steps for a message on a table, by rank."""
        if self._version != self.org.registration_version:
            self._routes = self._load()
            self._version = self.org.registration_version
        return self._routes.get((message, table), [])

    def _load(self) -> dict[tuple[str, str], list[Route]]:
        org = self.org
        images: dict[str, list[ImageSpec]] = {}
        for image in org.tables["sdkmessageprocessingstepimage"].scan():
            images.setdefault(image["sdkmessageprocessingstepid"], []).append(
                ImageSpec(image["entityalias"], image["imagetype"], _columns(image.get("attributes")))
            )
        routes: dict[tuple[str, str], list[Route]] = {}
        for step in org.tables["sdkmessageprocessingstep"].scan():
            endpoint = org.row("serviceendpoint", step["eventhandler"]) if step.get("eventhandler") else None
            message = org.row("sdkmessage", step["sdkmessageid"])
            message_filter = (
                org.row("sdkmessagefilter", step["sdkmessagefilterid"]) if step.get("sdkmessagefilterid") else None
            )
            if step.get("statecode") != 0 or endpoint is None or endpoint.get("contract") != WEBHOOK:
                continue
            if message is None or message_filter is None:
                continue
            url, headers = _delivery_url(endpoint)
            step_id = step["sdkmessageprocessingstepid"]
            routes.setdefault((message["name"], message_filter["primaryobjecttypecode"]), []).append(
                Route(
                    step_id=step_id,
                    step_name=step.get("name"),
                    rank=step.get("rank") or 0,
                    url=url,
                    headers=headers,
                    filtering=frozenset(_columns(step.get("filteringattributes")) or ()) or None,
                    images=tuple(images.get(step_id, ())),
                )
            )
        for found in routes.values():
            found.sort(key=lambda r: r.rank)
        return routes

    def dispatch(self, changes: Iterable[Change], correlation_id: str) -> int:
        """Submit one delivery per change and matching step; returns how many were submitted."""
        submitted = 0
        for change in changes:
            for route in self.routes(change.message, change.table):
                if change.message == "Update" and route.filtering and not route.filtering & change.submitted.keys():
                    continue
                self.submit(self._outgoing(change, route, correlation_id))
                submitted += 1
        return submitted

    def _images(self, change: Change, route: Route) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        definition = self.org.defs[change.table]
        pre: list[dict[str, Any]] = []
        post: list[dict[str, Any]] = []
        for spec in route.images:
            if spec.kind in (PRE, BOTH) and change.before is not None:
                pre.append(
                    {"key": spec.alias, "value": context.image(self.org, definition, change.before, spec.attributes)}
                )
            if spec.kind in (POST, BOTH) and change.after is not None:
                post.append(
                    {"key": spec.alias, "value": context.image(self.org, definition, change.after, spec.attributes)}
                )
        return pre, post

    def _outgoing(self, change: Change, route: Route, correlation_id: str) -> Outgoing:
        pre, post = self._images(change, route)
        operation_id = self.new_id()
        payload = context.build(
            self.org,
            change,
            correlation_id=correlation_id,
            operation_id=operation_id,
            operation_created_ms=int(self.clock() * 1000),
            step_id=route.step_id,
            pre_images=pre,
            post_images=post,
        )
        return self.outgoing(
            payload, message=change.message, table=change.table, row_id=change.row_id,
            correlation_id=correlation_id, route=route,
        )

    def outgoing(
        self, payload: dict[str, Any], *, message: str, table: str, row_id: Any, correlation_id: str, route: Route
    ) -> Outgoing:
        """The delivery of one execution context to one step's endpoint: the service's headers, the reduced
        form when the body is over the size limit (the x-ms-dynamics-msg-size-exceeded header), logged."""
        operation_id = str(payload.get("OperationId"))
        body = _dumps(payload)
        headers = {
            "Content-Type": "application/json",
            "x-request-id": self.new_id(),
            "x-ms-dynamics-organization": self.organization_host,
            "x-ms-dynamics-entity-name": table.lower(),
            "x-ms-dynamics-request-name": message.lower(),
            "x-ms-correlation-request-id": correlation_id.lower(),
        }
        reduced = len(body) > self.size_limit
        if reduced:
            for key in REDUCED_AWAY:
                payload.pop(key, None)
            body = _dumps(payload)
            headers["x-ms-dynamics-msg-size-exceeded"] = "true"
        headers.update(route.headers)
        self.log.append(
            {
                "time": datetime.fromtimestamp(self.clock(), UTC).isoformat(),
                "operation_id": operation_id,
                "step_id": route.step_id,
                "url": route.url.split("?")[0],
                "message": message,
                "table": table,
                "row_id": row_id,
                "correlation_id": correlation_id,
                "bytes": len(body),
                "reduced": reduced,
            }
        )
        return Outgoing(
            id=operation_id,
            url=route.url,
            headers=headers,
            body=body,
            policy=DATAVERSE_WEBHOOK_RETRY,
            description=f"{message} {table}({row_id}) -> step {route.step_name or route.step_id}",
        )
