"""`create_app`: the Dataverse emulator as one Starlette app.

Layers, outside in: `SandboxMiddleware` (log, bearer token, faults) ->
routes: `/_admin/...` (shared admin endpoints plus this emulator's extras) and
`/api/data/v9.2/...` -> `ApiMiddleware` (caller, service protection, scope,
webhooks) -> `DataverseApi` (the handlers).

Admin extras:
- `POST /_admin/tables/{entity_set}/rows` with a JSON list of rows (or
  `{"rows": [...]}`): bulk seed, validated like the API but bypassing webhooks
  and service protection; all or nothing. Answers `{"inserted": n}`.
- `GET /_admin/webhooks/log?limit=N`: the webhook deliveries submitted, newest last.
- `POST /_admin/fno/data-events`: where F&O posts data events (a RemoteExecutionContext of a
  virtual table); raised on the virtual table's OnExternal* steps. `GET /_admin/fno/link`: the
  F&O URL, the data events active there and the last activation error (see `virtual`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractContextManager, asynccontextmanager
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from devkit.sandbox.common import Faults, SandboxMiddleware, SandboxState, admin_routes
from devkit.sandbox.dataverse import writes
from devkit.sandbox.dataverse.api import DataverseApi
from devkit.sandbox.dataverse.batching import change_set
from devkit.sandbox.dataverse.errors import DataverseError, fault, render, segment_not_found, unauthorized
from devkit.sandbox.dataverse.org import API_PATH, Organization
from devkit.sandbox.dataverse.pipeline import ApiMiddleware
from devkit.sandbox.dataverse.protection import Limiter, ServiceProtectionLimits
from devkit.sandbox.dataverse.seed import INTEGRATION_USER
from devkit.sandbox.dataverse.values import coerce
from devkit.sandbox.dataverse.virtual import DataEventLink, add_virtual_tables, virtual_tables
from devkit.sandbox.dataverse.webhooks import Dispatcher
from devkit.sandbox.store import DuplicateKey
from loyaltysync.templates import Template

DEFAULT_PUBLIC_URL = "http://localhost"


def _admin_extras(org: Organization, dispatcher: Dispatcher) -> list[BaseRoute]:
    async def seed_rows(request: Request) -> Response:
        definition = org.by_set.get(request.path_params["entity_set"])
        if definition is None:
            return JSONResponse({"error": f"no entity set {request.path_params['entity_set']!r}"}, status_code=404)
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            return JSONResponse({"error": f"body is not JSON: {exc}"}, status_code=400)
        rows = body.get("rows") if isinstance(body, dict) else body
        if not isinstance(rows, list):
            return JSONResponse({"error": 'body must be a list of rows or {"rows": [...]}'}, status_code=400)
        try:
            with org.store.transaction():
                for raw in rows:
                    values = writes.parse_body(org, definition, raw)
                    # A seed may also fix the platform stamps (e.g. an old modifiedon) that the API ignores.
                    for name, value in raw.items():
                        column = definition.columns.get(name)
                        if column is not None and column.system and column.type != "Lookup":
                            values[name] = coerce(column, value, definition.logical_name)
                    try:
                        org.seed_row(definition.logical_name, values)
                    except DuplicateKey as exc:
                        raise writes.duplicate_error(definition, exc) from exc
        except DataverseError as exc:
            return JSONResponse({"error": exc.message, "code": exc.code}, status_code=exc.status)
        return JSONResponse({"inserted": len(rows)})

    async def webhook_log(request: Request) -> Response:
        raw = request.query_params.get("limit", "100")
        if not raw.isdigit():
            return JSONResponse({"error": f"limit must be a non-negative integer, got {raw!r}"}, status_code=400)
        entries = list(dispatcher.log)
        return JSONResponse({"deliveries": entries[max(0, len(entries) - int(raw)) :]})

    return [
        Route("/tables/{entity_set}/rows", seed_rows, methods=["POST"]),
        Route("/webhooks/log", webhook_log, methods=["GET"]),
    ]


def create_app(
    *,
    token: str,
    seed: int | None = None,
    templates: Mapping[str, Template] | None = None,
    public_url: str | None = None,
    faults: Faults | None = None,
    limits: ServiceProtectionLimits | None = None,
    client_factory: Callable[[], httpx.AsyncClient] | None = None,
    fno_url: str | None = None,
) -> Starlette:
    """The Dataverse Web API emulator.

    `token` is the one bearer token accepted (the integration application user);
    `seed` makes injected faults reproducible; `templates` add tables for entity
    sets that are not built in; `public_url` (e.g. http://127.0.0.1:7082) is used
    in `OData-EntityId`, `@odata.context` and `@odata.nextLink`. The data is
    `app.state.dataverse` (an `Organization`), the shared sandbox state
    `app.state.sandbox`, the webhook dispatcher `app.state.webhooks` and the
    service-protection limiter `app.state.limiter`. `client_factory` gives the
    HTTP client webhooks are sent with (tests pass one with an in-process transport).
    Templates whose F&O side names a virtual table get it (`virtual`); with `fno_url`
    (the F&O emulator, same token) steps registered on its OnExternal* messages
    activate the data events there, as the F&O connection does (`app.state.fno_link`).
    """
    org = Organization(public_url=public_url or DEFAULT_PUBLIC_URL, templates=(templates or {}).values())
    state = SandboxState(
        name="dataverse", token=token, faults=faults or Faults(), seed=seed, client_factory=client_factory
    )
    dispatcher = Dispatcher(org, state.delivery.submit)
    tables = virtual_tables((templates or {}).values())
    add_virtual_tables(org, tables)
    # Through the delivery's factory, read at call time: tests swap it after the app is built.
    link = DataEventLink(org, dispatcher, tables, token=token, fno_url=fno_url,
                         client_factory=lambda: state.delivery.client_factory())
    limits = limits or ServiceProtectionLimits()
    limiter = Limiter(limits)

    def transaction() -> AbstractContextManager[Any]:
        return change_set(org)

    api = ApiMiddleware(DataverseApi(org, limits.costs, transaction), org, limiter, dispatcher, link.sync)

    async def not_found(request: Request) -> Response:
        return render(segment_not_found(request.url.path.rsplit("/", 1)[-1]))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await state.delivery.aclose()

    app = Starlette(
        routes=[
            *admin_routes(state, [*_admin_extras(org, dispatcher), *link.routes()]),
            Mount(API_PATH, app=api),
            Route("/{path:path}", not_found, methods=["GET", "POST", "PATCH", "PUT", "DELETE"]),
        ],
        middleware=[Middleware(SandboxMiddleware, state=state, unauthorized=unauthorized, error=fault)],
        lifespan=lifespan,
    )
    app.state.dataverse = org
    app.state.sandbox = state
    app.state.webhooks = dispatcher
    app.state.fno_link = link
    app.state.limiter = limiter
    app.state.integration_user_id = INTEGRATION_USER.systemuserid
    return app
