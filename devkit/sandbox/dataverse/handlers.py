"""Entity-set and row handlers: query, create, read, update/upsert, delete, single columns.

One function per kind of request, each reading like docs/wire-formats.md §1.3:
POST answers 204 + `OData-EntityId` (201 with `return=representation`); PATCH
is an upsert whose status depends on `If-Match` / `If-None-Match`; a PATCH that
creates with `return=representation` answers 201, one that updates 200.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from devkit.sandbox.dataverse import query, scope, writes
from devkit.sandbox.dataverse.errors import (
    JSON_TYPE,
    NOT_FOUND,
    ODATA,
    ODATA_HEADERS,
    PAYLOAD,
    DataverseError,
    bad_request,
    key_not_found,
    unknown_property,
)
from devkit.sandbox.dataverse.org import Organization
from devkit.sandbox.dataverse.prefer import Preferences, parse_prefer
from devkit.sandbox.dataverse.protection import CostModel
from devkit.sandbox.dataverse.rows import context_url, etag, render_row, select_columns
from devkit.sandbox.dataverse.schema import TableDef
from devkit.sandbox.dataverse.seed import INTEGRATION_USER
from devkit.sandbox.dataverse.writes import Address
from devkit.sandbox.odata import ODataSyntaxError, parse_select


def json_response(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """An OData JSON response."""
    return Response(
        json.dumps(body, ensure_ascii=False).encode(),
        status,
        headers={**ODATA_HEADERS, **(headers or {})},
        media_type=JSON_TYPE,
    )


def no_content(headers: Mapping[str, str] | None = None) -> Response:
    """204 with the OData headers."""
    return Response(status_code=204, headers={**ODATA_HEADERS, **(headers or {})})


async def read_json(request: Request) -> Any:
    """The decoded JSON body; 400 0x80048d19 when it is not JSON."""
    raw = await request.body()
    if not raw.strip():
        raise bad_request("The request body is empty; an entity (JSON object) is required.", PAYLOAD)
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"Error in the JSON payload: {exc}.", PAYLOAD) from exc


def caller() -> scope.Caller:
    """The caller of the current request (the integration user outside the pipeline)."""
    current = scope.current()
    return current.caller if current else scope.Caller(INTEGRATION_USER.systemuserid)


def preferences(request: Request) -> Preferences:
    return parse_prefer(request.headers.getlist("prefer"))


def _select(request: Request) -> list[str] | None:
    text = request.query_params.get("$select")
    if not text:
        return None
    try:
        return parse_select(text)
    except ODataSyntaxError as exc:
        raise bad_request(exc.message) from exc


def _applied(prefs: Preferences, **kwargs: bool) -> dict[str, str]:
    value = prefs.applied(**kwargs)
    return {"Preference-Applied": value} if value else {}


def entity_id(org: Organization, definition: TableDef, row_id: str) -> str:
    """The absolute address of a row (`OData-EntityId`)."""
    return f"{org.base_url}/{definition.entity_set}({row_id})"


def representation(
    org: Organization, definition: TableDef, row: dict[str, Any], request: Request, prefs: Preferences
) -> dict[str, Any]:
    """A row as returned by GET or `return=representation`, with its `@odata.context`."""
    select = _select(request)
    body = {"@odata.context": context_url(org, definition, select, entity=True)}
    body.update(render_row(org, definition, row, select_columns(definition, select), prefs))
    return body


def missing(address: Address) -> DataverseError:
    """404 for a row that is not there (by id or by alternate key)."""
    if address.by_key:
        return key_not_found(address.definition.logical_name)
    return DataverseError(
        404, NOT_FOUND, f"Entity '{address.definition.logical_name}' With Id = {address.row_id} Does Not Exist"
    )


# -- collection -----------------------------------------------------------------------------


async def list_rows(
    org: Organization, snapshots: query.Snapshots, definition: TableDef, request: Request, costs: CostModel
) -> Response:
    prefs = preferences(request)
    body, returned = query.run(org, snapshots, definition, dict(request.query_params), prefs)
    scope.charge(costs.read_ms + costs.row_ms * returned)
    return json_response(body, headers=_applied(prefs, page_size=True))


async def count_rows(org: Organization, definition: TableDef, request: Request, costs: CostModel) -> Response:
    scope.charge(costs.read_ms)
    total = query.count(org, definition, dict(request.query_params))
    return Response(str(total), headers=ODATA_HEADERS, media_type="text/plain")


async def create_row(org: Organization, definition: TableDef, request: Request, costs: CostModel) -> Response:
    prefs = preferences(request)
    values = writes.parse_body(org, definition, await read_json(request))
    change = writes.create(org, definition, values, caller())
    scope.record([change])
    scope.charge(costs.write_ms)
    assert change.after is not None  # noqa: S101 - a create always has an after-row
    if prefs.representation:
        body = representation(org, definition, change.after, request, prefs)
        return json_response(body, 201, {"ETag": etag(change.after), **_applied(prefs, representation=True)})
    return no_content({"OData-EntityId": entity_id(org, definition, change.row_id)})


# -- one row --------------------------------------------------------------------------------


async def get_row(org: Organization, address: Address, request: Request, costs: CostModel) -> Response:
    scope.charge(costs.read_ms)
    prefs = preferences(request)
    if address.row is None:
        raise missing(address)
    definition = address.definition
    tag = etag(address.row)
    if (
        request.headers.get("if-none-match") == tag
        and "$expand" not in request.query_params
        and not prefs.any_annotations
    ):
        return Response(status_code=304, headers={**ODATA_HEADERS, "ETag": tag})
    select = _select(request)
    expand = (
        query.parse_expand(definition, request.query_params["$expand"]) if request.query_params.get("$expand") else []
    )
    body = {"@odata.context": context_url(org, definition, select, entity=True)}
    body.update(render_row(org, definition, address.row, select_columns(definition, select), prefs, expand))
    return json_response(body, headers={"ETag": tag, **_applied(prefs)})


def _precondition(message: str) -> DataverseError:
    return DataverseError(412, "", message)


async def patch_row(org: Organization, address: Address, request: Request, costs: CostModel) -> Response:
    """Update or upsert, with the conditional semantics of §1.3."""
    prefs = preferences(request)
    definition = address.definition
    values = writes.parse_body(org, definition, await read_json(request))
    change, status = patch(
        org, address, values, caller(), request.headers.get("if-match"), request.headers.get("if-none-match")
    )
    scope.record([change])
    scope.charge(costs.write_ms)
    assert change.after is not None  # noqa: S101 - create and update both leave a row
    if prefs.representation:
        body = representation(org, definition, change.after, request, prefs)
        return json_response(body, status, {"ETag": etag(change.after), **_applied(prefs, representation=True)})
    return no_content({"OData-EntityId": entity_id(org, definition, change.row_id)})


def patch(
    org: Organization,
    address: Address,
    values: Mapping[str, Any],
    by: scope.Caller,
    if_match: str | None,
    if_none_match: str | None,
) -> tuple[scope.Change, int]:
    """A PATCH's write: update-only (`If-Match`), create-only (`If-None-Match: *`) or upsert; the change
    and the status it answers (201 created, 200 updated). Raises DataverseError (404, 412)."""
    definition = address.definition
    row = address.row
    if if_match is not None:
        if row is None:
            if address.by_key:
                raise key_not_found(definition.logical_name)
            raise DataverseError(404, "", f"{definition.logical_name} With Id = {address.row_id} Does Not Exist")
        if if_match.strip() != "*" and if_match.strip() != etag(row):
            raise _precondition("The version of the existing record doesn't match the RowVersion property provided.")
    if if_none_match is not None and if_none_match.strip() == "*" and row is not None:
        raise _precondition("A record with matching key values already exists.")
    if row is None:
        change = writes.create(
            org,
            definition,
            values,
            by,
            row_id=None if address.by_key else address.row_id,
            key_values=address.key_values,
        )
        return change, 201
    return writes.update(org, definition, row, values, by, key_values=address.key_values), 200


async def delete_row(org: Organization, address: Address, request: Request, costs: CostModel) -> Response:
    change = remove(org, address, caller(), request.headers.get("if-match"))
    scope.record([change])
    scope.charge(costs.write_ms)
    return no_content()


def remove(org: Organization, address: Address, by: scope.Caller, if_match: str | None) -> scope.Change:
    """A DELETE's write; 404 for a row that is not there, 412 for an `If-Match` ETag that is not the row's."""
    if address.row is None:
        raise missing(address)
    if if_match is not None and if_match.strip() not in ("*", etag(address.row)):
        raise _precondition("The version of the existing record doesn't match the RowVersion property provided.")
    return writes.delete(org, address.definition, address.row, by)


# -- one column -----------------------------------------------------------------------------


async def column_request(
    org: Organization, address: Address, name: str, ref: bool, request: Request, costs: CostModel
) -> Response:
    """GET / PUT / DELETE `<set>(<key>)/<column>`, and PUT / DELETE `<set>(<key>)/<nav>/$ref`."""
    definition = address.definition
    if address.row is None:
        raise missing(address)
    if ref:
        column = definition.navigation.get(name)
        if column is None:
            raise unknown_property(name, definition.logical_name)
    else:
        found = definition.readable.get(name)
        if found is None or (found.type == "Lookup" and request.method != "GET"):
            raise unknown_property(name, definition.logical_name)
        column = found
    method = request.method
    if method == "GET" and not ref:
        scope.charge(costs.read_ms)
        value = address.row.get(column.name)
        if value is None:
            return no_content()
        return json_response(
            {
                "@odata.context": f"{org.base_url}/$metadata#{definition.entity_set}({address.row_id})/{name}",
                "value": value,
            }
        )
    if method == "PUT":
        body = await read_json(request)
        if not isinstance(body, dict) or ("@odata.id" if ref else "value") not in body:
            raise bad_request(f'The body must be {{"{"@odata.id" if ref else "value"}": ...}}.', PAYLOAD)
        if ref:
            values = writes.parse_body(org, definition, {f"{name}@odata.bind": body["@odata.id"]})
        else:
            values = writes.parse_body(org, definition, {name: body["value"]})
    elif method == "DELETE":
        values = {column.name: None}
    else:
        raise DataverseError(405, ODATA, f"The HTTP method '{method}' is not allowed for this resource.")
    change = writes.update(org, definition, address.row, values, caller())
    scope.record([change])
    scope.charge(costs.write_ms)
    return no_content()
