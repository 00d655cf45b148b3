"""The Web API resource tree: which handler answers which path and method.

Paths are read from the raw (percent-encoded) request path, so key values
with encoded characters are decoded exactly once (see `paths.split_path`).

| path                                            | methods            |
|-------------------------------------------------|--------------------|
| `$batch`                                        | POST               |
| `WhoAmI`, `WhoAmI()`                            | GET (POST is 404)  |
| `EntityDefinitions...` and the other metadata roots (`metadata_query`) | GET |
| `<set>`                                         | GET, POST          |
| `<set>/$count`                                  | GET                |
| `<set>/Microsoft.Dynamics.CRM.<Bulk message>`   | POST               |
| `<set>(<key>)`                                  | GET, PATCH, DELETE |
| `<set>(<key>)/<column>`                         | GET, PUT, DELETE   |
| `<set>(<key>)/<nav>/$ref`                       | PUT, DELETE        |
| `<set>(<id>)/<collection navigation>`           | GET (registration) |
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from devkit.sandbox.dataverse import batching, bulk, handlers, metadata_query, query, scope
from devkit.sandbox.dataverse.errors import (
    ODATA,
    UNEXPECTED,
    DataverseError,
    error_response,
    render,
    segment_not_found,
)
from devkit.sandbox.dataverse.org import API_PATH, Organization
from devkit.sandbox.dataverse.paths import Segment, split_path
from devkit.sandbox.dataverse.protection import CostModel
from devkit.sandbox.dataverse.seed import BUSINESS_UNIT_ID, ORGANIZATION_ID
from devkit.sandbox.dataverse.tables import ONE_TO_MANY
from devkit.sandbox.dataverse.writes import locate

log = logging.getLogger(__name__)


def _not_allowed(method: str) -> DataverseError:
    return DataverseError(405, ODATA, f"The requested resource does not support http method '{method}'.")


class DataverseApi:
    """ASGI app for everything under `/api/data/v9.2/`; errors become Dataverse error bodies."""

    def __init__(
        self, org: Organization, costs: CostModel, transaction: Callable[[], AbstractContextManager[Any]]
    ) -> None:
        self.org = org
        self.costs = costs
        self.snapshots = query.Snapshots()
        self.transaction = transaction

    async def __call__(self, scope_: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope_, receive)
        try:
            response = await self.handle(request)
        except DataverseError as exc:
            response = render(exc)
        except ClientDisconnect:
            # The caller went away before sending its body (a killed worker): nothing to answer.
            log.info("caller disconnected during %s %s", request.method, request.url.path)
            return
        except Exception:
            log.exception("Dataverse emulator failed on %s %s", request.method, request.url.path)
            response = error_response(500, UNEXPECTED, "An unexpected error occurred.")
        await response(scope_, receive, send)

    async def handle(self, request: Request) -> Response:
        raw = scope_path(request)
        if not raw.startswith(API_PATH):
            raise segment_not_found(raw)
        segments = split_path(raw[len(API_PATH) :])
        head = segments[0]
        method = request.method
        if head.name in ("", "$metadata") and len(segments) == 1:
            return self.service_document()
        if head.name == "$batch":
            if method != "POST":
                raise _not_allowed(method)
            return await batching.run(self.org, request, self.transaction)
        if head.name == "WhoAmI" and head.key in (None, ""):
            if method != "GET":
                raise DataverseError(
                    404, ODATA, f"No HTTP resource was found that matches the request URI '{request.url}'."
                )
            return self.who_am_i()
        if head.name in metadata_query.ROOTS:
            if method != "GET":
                raise _not_allowed(method)
            scope.charge(self.costs.metadata_ms)
            return handlers.json_response(metadata_query.answer(self.org, segments, dict(request.query_params)))
        definition = self.org.table_def(head.name)
        if method in ("POST", "PATCH", "PUT"):
            # Read the body before looking the row up: no await may fall between the lookup and the write.
            await request.body()
        if head.key is None:
            return await self.collection(definition, segments, request)
        address = locate(self.org, definition, head.key)
        if len(segments) == 1:
            if method == "GET":
                return await handlers.get_row(self.org, address, request, self.costs)
            if method == "PATCH":
                return await handlers.patch_row(self.org, address, request, self.costs)
            if method == "DELETE":
                return await handlers.delete_row(self.org, address, request, self.costs)
            raise _not_allowed(method)
        related = ONE_TO_MANY.get((definition.logical_name, segments[1].name)) if len(segments) == 2 else None
        if related is not None and method == "GET":
            if address.row is None:
                raise handlers.missing(address)
            return await self.related(related, address.row_id or "", request)
        ref = len(segments) == 3 and segments[2].name == "$ref"
        if len(segments) == 2 or ref:
            return await handlers.column_request(self.org, address, segments[1].name, ref, request, self.costs)
        raise segment_not_found(segments[-1].name)

    async def collection(self, definition: Any, segments: list[Segment], request: Request) -> Response:
        method = request.method
        if len(segments) == 1:
            if method == "GET":
                return await handlers.list_rows(self.org, self.snapshots, definition, request, self.costs)
            if method == "POST":
                return await handlers.create_row(self.org, definition, request, self.costs)
            raise _not_allowed(method)
        if len(segments) == 2 and segments[1].name == "$count":
            if method != "GET":
                raise _not_allowed(method)
            return await handlers.count_rows(self.org, definition, request, self.costs)
        if len(segments) == 2 and segments[1].name.startswith(bulk.NAMESPACE):
            if method != "POST":
                raise _not_allowed(method)
            return await bulk.run(self.org, definition, segments[1].name, request, self.costs, self.transaction)
        raise segment_not_found(segments[-1].name)

    async def related(self, related: tuple[str, str], row_id: str, request: Request) -> Response:
        """`<set>(<id>)/<collection navigation>`: the related rows, as a query on their own entity set."""
        table, column = related
        definition = self.org.defs[table]
        params = dict(request.query_params)
        own = f"_{column}_value eq {row_id}"
        params["$filter"] = f"{own} and ({params['$filter']})" if params.get("$filter") else own
        prefs = handlers.preferences(request)
        body, returned = query.run(self.org, self.snapshots, definition, params, prefs)
        scope.charge(self.costs.read_ms + self.costs.row_ms * returned)
        return handlers.json_response(body)

    def who_am_i(self) -> Response:
        scope.charge(self.costs.read_ms)
        current = scope.current()
        return handlers.json_response(
            {
                "@odata.context": f"{self.org.base_url}/$metadata#{bulk.NAMESPACE}WhoAmIResponse",
                "BusinessUnitId": BUSINESS_UNIT_ID,
                "UserId": current.caller.user_id if current else handlers.caller().user_id,
                "OrganizationId": ORGANIZATION_ID,
            }
        )

    def service_document(self) -> Response:
        return handlers.json_response(
            {
                "@odata.context": f"{self.org.base_url}/$metadata",
                "value": [
                    {"name": d.entity_set, "kind": "EntitySet", "url": d.entity_set} for d in self.org.defs.values()
                ],
            }
        )


def scope_path(request: Request) -> str:
    """The raw request path (still percent-encoded)."""
    raw = request.scope.get("raw_path")
    if isinstance(raw, bytes | bytearray):
        return bytes(raw).decode("utf-8", "replace").split("?", 1)[0]
    return str(request.scope["path"])
