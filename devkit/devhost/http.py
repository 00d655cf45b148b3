"""HTTP triggers: the host's front end, as an ASGI app served by uvicorn.

Requests to `/<routePrefix>/<route>` go to the most specific function whose
route template and `methods` match; no match is a 404 with an empty body (the
host answers a known route with a wrong method with 404 too, not 405). Then the
key is checked for the function's `authLevel` (401, empty body), the request
becomes the host's RPC HTTP data (header names lower-cased, repeated values
joined with ",", empty query values dropped, the body as bytes up to the host's
100 MB limit, else 413) that the worker's converter turns into the
`func.HttpRequest`, and the response data the worker encodes from the function's
`func.HttpResponse` (or str) becomes the response. An unhandled exception is a
500 with an empty body; the traceback goes to the log.

Two admin APIs of the host are served with the master key: `GET /admin/host/status`
and `POST /admin/functions/<name>` with `{"input": "..."}` (202), which runs a
queue or timer function once, the way `func start` users trigger them by hand.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from azure.functions.meta import Datum
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import Receive, Scope, Send

from devkit.devhost.app import FunctionSpec
from devkit.devhost.invocation import Invoker, TriggerData
from devkit.devhost.keys import HostKeys, authorized, presented_key
from devkit.devhost.queues import queue_trigger_data
from devkit.devhost.routes import RouteTemplate, parse_route
from devkit.devhost.timers import timer_trigger_data
from loyaltysync.errors import ConfigError

log = logging.getLogger("devkit.devhost")

MAX_BODY_BYTES = 100 * 1024 * 1024  # the host's own request size limit
_ADMIN = "/admin/"


@dataclass(frozen=True)
class HttpRoute:
    """One HTTP-triggered function as the front end routes to it."""

    function: FunctionSpec
    template: RouteTemplate
    methods: frozenset[str] | None  # None: every method
    auth_level: str

    @property
    def response_binding(self) -> Mapping[str, Any] | None:
        """The `http` output binding whose value is the response."""
        return next((binding for binding in self.function.outputs if binding["type"] == "http"), None)


def build_routes(functions: Iterable[FunctionSpec]) -> list[HttpRoute]:
    """Routes for the HTTP functions the dev host runs, most specific first. Raises ConfigError for a bad route."""
    routes: list[HttpRoute] = []
    for function in functions:
        if not function.runs or function.trigger_type != "httpTrigger":
            continue
        try:
            template = parse_route(str(function.trigger["route"]))
        except ValueError as exc:
            raise ConfigError(f"{function.name} route", str(exc)) from exc
        methods = function.trigger.get("methods")
        routes.append(
            HttpRoute(
                function=function,
                template=template,
                methods=frozenset(str(method).upper() for method in methods) if methods else None,
                auth_level=str(function.trigger.get("authLevel", "FUNCTION")),
            )
        )
    return sorted(routes, key=lambda route: route.template.precedence)


class HttpFrontEnd:
    """The ASGI application: routing, keys, request/response conversion and the admin APIs."""

    def __init__(
        self,
        routes: list[HttpRoute],
        functions: Iterable[FunctionSpec],
        invoker: Invoker,
        keys: HostKeys,
        route_prefix: str,
    ) -> None:
        self._routes = routes
        self._functions = {function.name.lower(): function for function in functions}
        self._invoker = invoker
        self._keys = keys
        self._prefix = route_prefix.strip("/")
        self._started = time.monotonic()
        self._background: set[asyncio.Task[None]] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        response = await self._dispatch(request)
        await response(scope, receive, send)

    async def _dispatch(self, request: Request) -> Response:
        path = request.url.path
        if path.lower().startswith(_ADMIN):
            return await self._admin(request, path[len(_ADMIN) :].strip("/"))
        relative = self._relative(path)
        if relative is not None:
            for route in self._routes:
                values = route.template.match(relative)
                if values is not None and (route.methods is None or request.method in route.methods):
                    return await self._serve(route, values, request)
        if path == "/":
            return PlainTextResponse("Your Functions 4.0 app is up and running (loyaltysync dev host)")
        return Response(status_code=404)

    def _relative(self, path: str) -> str | None:
        """The path below the route prefix, or None when it is not under it."""
        trimmed = path.strip("/")
        if not self._prefix:
            return trimmed
        if trimmed.lower() == self._prefix.lower():
            return ""
        if trimmed.lower().startswith(self._prefix.lower() + "/"):
            return trimmed[len(self._prefix) + 1 :]
        return None

    async def _serve(self, route: HttpRoute, values: dict[str, str], request: Request) -> Response:
        if not authorized(route.auth_level, presented_key(request.headers, request.query_params), self._keys):
            return Response(status_code=401)
        body = await _read_body(request)
        if body is None:
            return Response(status_code=413)
        trigger = http_trigger_data(
            request.method,
            str(request.url),
            _joined(request.headers.items()),
            _joined(request.query_params.multi_items()),
            values,
            body,
        )
        try:
            outcome = await self._invoker.invoke(route.function, trigger)
        except Exception:  # logged with its traceback by the invoker; the caller sees a bare 500
            return Response(status_code=500)
        binding = route.response_binding
        return _to_response(outcome.value_of(binding) if binding is not None else None)

    async def _admin(self, request: Request, rest: str) -> Response:
        if not authorized("ADMIN", presented_key(request.headers, request.query_params), self._keys):
            return Response(status_code=401)
        if rest.lower() == "host/status" and request.method == "GET":
            uptime = int((time.monotonic() - self._started) * 1000)
            return JSONResponse({"id": "loyaltysync-devhost", "state": "Running", "processUptime": uptime})
        name = rest[len("functions/") :] if rest.lower().startswith("functions/") else ""
        function = self._functions.get(name.lower())
        if request.method != "POST" or function is None or not function.runs or function.trigger_type == "httpTrigger":
            return Response(status_code=404)
        try:
            document = json.loads(await request.body() or b"{}")
            text = str(document.get("input") or "") if isinstance(document, dict) else ""
        except json.JSONDecodeError:
            return Response(status_code=400)
        task = asyncio.create_task(self._invoke_by_hand(function, text))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return Response(status_code=202)

    async def _invoke_by_hand(self, function: FunctionSpec, text: str) -> None:
        if function.trigger_type == "queueTrigger":
            value = queue_trigger_data(text.encode("utf-8"), message_id=str(uuid.uuid4()), dequeue_count=1)
        else:
            value = timer_trigger_data(past_due=False)
        try:
            await self._invoker.invoke(function, value)
        except Exception:  # noqa: S110 - logged by the invoker; nobody waits for a 202
            pass

    async def aclose(self) -> None:
        """Cancel invocations started through the admin API."""
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _read_body(request: Request) -> bytes | None:
    """The request body, or None when it is larger than the host accepts."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def http_trigger_data(
    method: str,
    url: str,
    headers: Mapping[str, str],
    query: Mapping[str, str],
    route_params: Mapping[str, str],
    body: bytes,
) -> TriggerData:
    """The host's RPC HTTP data for a request, as it sends it to the Python worker.

    Header names are lower-cased and query parameters with an empty value are left out
    (GrpcMessageConversionExtensions.ToRpcHttp); the worker asks for the body as raw bytes.
    """
    def strings(values: Mapping[str, str]) -> dict[str, Datum]:
        return {name: Datum(value, "string") for name, value in values.items()}

    http = {
        "method": Datum(method, "string"),
        "url": Datum(url, "string"),
        "headers": strings({name.lower(): value for name, value in headers.items()}),
        "query": strings({name: value for name, value in query.items() if value}),
        "params": strings(route_params),
        "body": Datum(body, "bytes"),
    }
    return TriggerData(Datum(http, "http"))


def _joined(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    """A flat mapping, repeated names joined with "," (.NET StringValues.ToString), as the host joins them."""
    result: dict[str, str] = {}
    for name, value in items:
        result[name] = f"{result[name]},{value}" if name in result else value
    return result


def _to_response(data: Datum | None) -> Response:
    """The HTTP response for the data the worker encoded for the `http` output (HttpResponse or str)."""
    if data is not None and data.type == "string":
        return Response(str(data.value).encode("utf-8"), media_type="text/plain; charset=utf-8")
    if data is None or data.type != "http":
        return Response(status_code=500)
    fields: dict[str, Any] = data.value
    body = fields["body"].value
    response = Response(bytes(body or b""), status_code=int(fields["status_code"].value))
    headers = [
        (name, str(header.value)) for name, header in fields["headers"].items() if name.lower() != "content-length"
    ]
    for cookie in fields.get("cookies") or ():
        headers += [("set-cookie", morsel.OutputString()) for morsel in cookie.values()]
    response.raw_headers.extend((name.lower().encode("latin-1"), header.encode("latin-1")) for name, header in headers)
    return response
