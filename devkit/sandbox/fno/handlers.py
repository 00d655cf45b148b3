"""The `/data/` endpoints: service document, `$metadata`, collections, rows and `$count`.

One handler per kind of resource; each finds what a reader would look for
("what does PATCH on a missing key do") in one place. Every refusal is an
`FnoError` turned into F&O's error body by `DataApi.endpoint`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import Response

from devkit.sandbox.fno.addressing import COUNT_SEGMENT, Address, resolve, resource_path
from devkit.sandbox.fno.dataset import VERSION, FnoData, etag
from devkit.sandbox.fno.errors import (
    JSON_TYPE,
    ODATA_HEADERS,
    FnoError,
    bad_payload,
    no_resource,
    not_found,
    throttled,
    write_failed,
)
from devkit.sandbox.fno.filters import compile_filter, key_lookup, parse_filter_for
from devkit.sandbox.fno.metadata import render_metadata
from devkit.sandbox.fno.query import SKIPTOKEN, Page, Query, page_size, parse_query, run_query
from devkit.sandbox.fno.schema import EntityDef
from devkit.sandbox.fno.values import to_json
from devkit.sandbox.odata import format_key_predicate

ROOT = "/data/"
BatchHandler = Callable[[Request, str], Awaitable[Response]]


def _json(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body), status_code=status, media_type=JSON_TYPE,
                    headers={**ODATA_HEADERS, **(headers or {})})


def render_row(entity: EntityDef, row: dict[str, Any], select: tuple[str, ...] | None = None) -> dict[str, Any]:
    """A row as F&O's JSON: the ETag first, then the properties in declaration order."""
    out: dict[str, Any] = {"@odata.etag": etag(row[VERSION])}
    for prop in entity.properties:
        if select is None or prop.name in select:
            out[prop.name] = to_json(row[prop.name])
    return out


def company_scope(data: FnoData, entity: EntityDef, cross_company: bool) -> str | None:
    """The company a read is limited to: the default one unless cross-company=true."""
    return None if cross_company or not entity.company_specific else data.default_company


def find_row(data: FnoData, entity: EntityDef, key: tuple[Any, ...] | None, cross_company: bool) -> dict[str, Any]:
    """The row a key addresses; 404 when there is none, or it is another company's without cross-company=true."""
    row = data.get(entity, key) if key is not None else None
    company = company_scope(data, entity, cross_company)
    if row is None or (company is not None and str(row["dataAreaId"]).casefold() != company):
        raise not_found(entity.entity_set)
    return row


def query_page(
    data: FnoData, entity: EntityDef, params: Mapping[str, str], size: int
) -> tuple[Query, Page, list[dict[str, Any]]]:
    """One page of a collection read: the parsed query, the page, and its rows as F&O's JSON."""
    query = parse_query(entity, params)
    columns = data.columns(entity)
    rows = data.tuples(entity, company_scope(data, entity, query.cross_company), key_lookup(entity, query.filter))
    accept = compile_filter(entity, query.filter, columns) if query.filter is not None else None
    page = run_query(rows, columns, query, accept, size)
    return query, page, [render_row(entity, dict(zip(columns, r, strict=True)), query.select) for r in page.rows]


def _prefers(request: Request, token: str) -> bool:
    return token in request.headers.get("prefer", "").replace(" ", "").lower()


async def _read_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw or b"null")
    except ValueError:
        raise bad_payload("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise bad_payload("The request body must be a JSON object of property values.")
    return body


class DataApi:
    """Serves `/data/...` from an `FnoData`."""

    def __init__(self, data: FnoData, public_url: str | None, batch: BatchHandler) -> None:
        self.data = data
        self.public_url = public_url.rstrip("/") if public_url else None
        self.batch = batch

    def service_root(self, request: Request) -> str:
        base = self.public_url or str(request.base_url).rstrip("/")
        return f"{base}/data"

    def key_url(self, request: Request, entity: EntityDef, row: dict[str, Any]) -> str:
        pairs: list[tuple[str | None, str | int]] = [(k, row[k]) for k in entity.keys]
        if len(pairs) == 1:
            pairs = [(None, pairs[0][1])]
        # Clients URL-encode '/', '?', '#' and '%' inside key values; so does the service's Location.
        predicate = quote(format_key_predicate(pairs), safe="'(),=:@!$*+;")
        return f"{self.service_root(request)}/{entity.entity_set}({predicate})"

    async def endpoint(self, request: Request, *, in_batch: bool = False) -> Response:
        """The single Starlette endpoint under `/data/`."""
        try:
            if not in_batch and self.data.throttling.take():
                raise throttled(self.data.throttling.retry_after_s)
            return await self._dispatch(request)
        except FnoError as exc:
            return exc.response()

    async def _dispatch(self, request: Request) -> Response:
        raw = request.scope.get("raw_path") or request.scope["path"].encode()
        path = resource_path(raw, ROOT)
        method = request.method
        if path in ("", "/"):
            return self._service_document(request)
        if path == "$metadata":
            return Response(render_metadata(self.data.catalog), media_type="application/xml", headers=ODATA_HEADERS)
        if path == "$batch":
            if method != "POST":
                raise FnoError(405, "The requested resource does not support http method '" + method + "'.")
            return await self.batch(request, self.service_root(request))
        address = resolve(path, self.data.catalog.entities, str(request.url))
        if address.property == COUNT_SEGMENT:
            return self._count(request, address.entity)
        if address.key is None:
            if method == "GET":
                return self._collection(request, address.entity)
            if method == "POST":
                return await self._create(request, address.entity)
        elif method == "GET":
            return self._read(request, address)
        elif method in ("PATCH", "PUT", "MERGE"):
            return await self._update(request, address)
        elif method == "DELETE":
            return self._delete(request, address)
        raise FnoError(405, f"The requested resource does not support http method '{method}'.")

    def _service_document(self, request: Request) -> Response:
        root = self.service_root(request)
        sets = [{"name": n, "kind": "EntitySet", "url": n} for n in self.data.catalog.entities]
        return _json({"@odata.context": f"{root}/$metadata", "value": sets})

    def _company(self, request: Request, entity: EntityDef) -> str | None:
        """The company a read is limited to: the default one unless cross-company=true."""
        cross = request.query_params.get("cross-company", "").lower() == "true"
        return company_scope(self.data, entity, cross)

    def _collection(self, request: Request, entity: EntityDef) -> Response:
        size = page_size(request.headers.get("prefer"), self.data.max_page_size)
        query, page, rendered = query_page(self.data, entity, request.query_params, size)
        root = self.service_root(request)
        selected = f"({','.join(query.select)})" if query.select else ""
        body: dict[str, Any] = {"@odata.context": f"{root}/$metadata#{entity.entity_set}{selected}"}
        if page.total is not None:
            body["@odata.count"] = page.total
        body["value"] = rendered
        if page.next_skiptoken is not None:
            kept = [p for p in request.url.query.split("&") if p and not p.startswith(("$skiptoken=", "%24skiptoken="))]
            kept.append(f"{SKIPTOKEN}={page.next_skiptoken}")
            body["@odata.nextLink"] = f"{root}/{entity.entity_set}?{'&'.join(kept)}"
        headers = {}
        if size != self.data.max_page_size:
            headers["Preference-Applied"] = f"odata.maxpagesize={size}"
        return _json(body, headers=headers)

    def _count(self, request: Request, entity: EntityDef) -> Response:
        text = request.query_params.get("$filter")
        expr = parse_filter_for(entity, text) if text is not None else None
        rows = self.data.tuples(entity, self._company(request, entity), key_lookup(entity, expr))
        if expr is not None:
            rows = filter(compile_filter(entity, expr, self.data.columns(entity)), rows)
        return Response(str(sum(1 for _ in rows)), media_type="text/plain", headers=ODATA_HEADERS)

    def _row(self, request: Request, address: Address) -> dict[str, Any]:
        cross = request.query_params.get("cross-company", "").lower() == "true"
        return find_row(self.data, address.entity, address.key, cross)

    def _read(self, request: Request, address: Address) -> Response:
        entity = address.entity
        row = self._row(request, address)
        root = self.service_root(request)
        headers = {"ETag": etag(row[VERSION])}
        if address.property is not None:
            context = f"{root}/$metadata#{entity.entity_set}({address.property})"
            return _json({"@odata.context": context, "value": to_json(row[address.property])}, headers=headers)
        query = parse_query(entity, {k: v for k, v in request.query_params.items() if k == "$select"})
        body = {"@odata.context": f"{root}/$metadata#{entity.entity_set}/$entity",
                **render_row(entity, row, query.select)}
        return _json(body, headers=headers)

    async def _create(self, request: Request, entity: EntityDef) -> Response:
        body = await _read_body(request)
        row = self.data.create(entity, body)
        location = self.key_url(request, entity, row)
        headers = {"Location": location, "ETag": etag(row[VERSION])}
        if _prefers(request, "return=minimal"):
            return Response(status_code=204, headers={**ODATA_HEADERS, **headers, "OData-EntityId": location,
                                                      "Preference-Applied": "return=minimal"})
        root = self.service_root(request)
        rendered = {"@odata.context": f"{root}/$metadata#{entity.entity_set}/$entity", **render_row(entity, row)}
        return _json(rendered, status=201, headers=headers)

    def _check_etag(self, request: Request, entity: EntityDef, row: dict[str, Any]) -> None:
        wanted = request.headers.get("if-match")
        if wanted and wanted.strip() != "*" and wanted.strip() != etag(row[VERSION]):
            raise write_failed(
                entity.data_entity,
                f"Cannot edit a record in {entity.label} ({entity.data_entity}). An update conflict occurred "
                "due to another user process deleting the record or changing one or more fields in the record.",
                status=412,
            )

    async def _update(self, request: Request, address: Address) -> Response:
        if address.property is not None:
            raise no_resource(str(request.url))
        row = self._row(request, address)
        body = await _read_body(request)
        self._check_etag(request, address.entity, row)
        updated = self.data.update(address.entity, row, body)
        headers = {"ETag": etag(updated[VERSION])}
        if _prefers(request, "return=representation"):
            root = self.service_root(request)
            rendered = {"@odata.context": f"{root}/$metadata#{address.entity.entity_set}/$entity",
                        **render_row(address.entity, updated)}
            return _json(rendered, headers={**headers, "Preference-Applied": "return=representation"})
        return Response(status_code=204, headers={**ODATA_HEADERS, **headers})

    def _delete(self, request: Request, address: Address) -> Response:
        if address.property is not None:
            raise no_resource(str(request.url))
        row = self._row(request, address)
        self._check_etag(request, address.entity, row)
        self.data.delete(address.entity, row)
        return Response(status_code=204, headers=ODATA_HEADERS)
