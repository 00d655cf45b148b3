"""The F&O emulator as a Starlette app: `/data/` (OData) plus `/_admin/` (sandbox control).

`create_app` wires the pieces: the catalog of entity sets (built-in loyalty
entities plus template-derived ones), the data tables, the event publisher
feeding the shared delivery queue, the shared middleware (bearer token,
fault injection, request log) and the admin routes.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from devkit.sandbox.common import SUBREQUEST_SCOPE_KEY, Faults, SandboxMiddleware, SandboxState, admin_routes
from devkit.sandbox.fno.admin import admin_extras
from devkit.sandbox.fno.batching import BatchRunner
from devkit.sandbox.fno.dataset import FnoData
from devkit.sandbox.fno.errors import service_error, unauthorized
from devkit.sandbox.fno.handlers import DataApi
from devkit.sandbox.fno.schema import build_catalog
from devkit.sandbox.fno.subscriptions import Publisher
from loyaltysync.templates import Template

METHODS = ["GET", "POST", "PATCH", "PUT", "DELETE", "MERGE"]


def create_app(
    *,
    token: str,
    seed: int | None = None,
    templates: Mapping[str, Template] | None = None,
    public_url: str | None = None,
    faults: Faults | None = None,
    default_company: str = "usrt",
) -> Starlette:
    """An F&O OData emulator accepting `Authorization: Bearer <token>`.

    `app.state.fno` is the `FnoData` (tables, paging and throttling settings),
    `app.state.fno_events` the `Publisher` (subscriptions), `app.state.sandbox`
    the shared `SandboxState` (faults, counters, deliveries). `public_url` is
    the base used in `@odata.context`, `@odata.nextLink` and `Location`
    (default: the request's own base URL).
    """
    catalog = build_catalog(templates)
    state = SandboxState(name="fo", token=token, faults=faults or Faults(), seed=seed)
    # Separate generators so the number of events never shifts which faults fire.
    # Ids and ETags need to be reproducible, not secret: seeded pseudo-random generators are right here.
    publisher = Publisher(catalog, state.delivery.submit, random.Random(seed), default_company)  # noqa: S311
    data = FnoData(catalog, default_company=default_company, rng=random.Random(seed),  # noqa: S311
                   publish=publisher.publish)
    batch = BatchRunner(data)
    api = DataApi(data, public_url, batch.handle)

    async def data_endpoint(request: Request) -> Response:
        return await api.endpoint(request, in_batch=bool(request.scope.get(SUBREQUEST_SCOPE_KEY)))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await state.delivery.aclose()

    routes: list[BaseRoute] = [
        Route("/data", data_endpoint, methods=METHODS),
        Route("/data/{path:path}", data_endpoint, methods=METHODS),
        *admin_routes(state, admin_extras(data, publisher)),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(SandboxMiddleware, state=state, unauthorized=unauthorized, error=service_error)],
        lifespan=lifespan,
    )
    app.state.sandbox = state
    app.state.fno = data
    app.state.fno_events = publisher
    return app
