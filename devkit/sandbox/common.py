"""What both emulators share around their handlers: state, the bearer check, fault injection, admin routes.

`SandboxMiddleware` is pure ASGI (not BaseHTTPMiddleware) so it can hold a
request for `hang_s`, answer for the app, or drop the connection.

Dropping a connection, as seen by the client:
- over TCP (uvicorn) the socket closes with no response at all, and httpx
  raises `httpx.RemoteProtocolError("Server disconnected without sending a
  response.")`. ASGI has no "close now" message, and uvicorn answers 500 when
  an app returns or raises before starting a response; it closes the socket
  silently only when the app callable returns a value other than None. So
  the app must be served through `drop_aware(app)` (run.py does), which
  swallows whatever an inner layer would send (Starlette's ServerErrorMiddleware
  sends a 500) and returns a marker. uvicorn logs one error line per drop:
  "ASGI callable should return None, but returned 'sandbox fault: connection dropped'".
  Without `drop_aware`, a drop reaches the client as a plain 500.
- in process (httpx.ASGITransport) the middleware raises `ConnectionDropped`, a
  subclass of `httpx.RemoteProtocolError` with the same message, and the
  transport re-raises it to the caller: the client sees the same exception
  type as over TCP. (With `ASGITransport(raise_app_exceptions=False)` it sees
  Starlette's 500 instead.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import math
import os
import random
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import InitVar, dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from devkit.sandbox.delivery import Delivery

TOKEN_ENV = "LOYALTYSYNC_SANDBOX_TOKEN"  # noqa: S105 - the name of the variable, not a secret
DROP_SCOPE_KEY = "devkit.sandbox.dropped"
# batch.py marks its sub-requests so faults hit the $batch request once, not every part again.
SUBREQUEST_SCOPE_KEY = "devkit.sandbox.subrequest"
DROPPED_MARKER = "sandbox fault: connection dropped"
WRITE_METHODS = frozenset({"POST", "PATCH", "PUT", "DELETE"})

THROTTLE_MESSAGES = {
    "dataverse": "Number of requests exceeded the limit of 6000 over time window of 300 seconds.",
    "fo": "This request could not be processed at this time due to system experiencing high resource utilization.",
}


@dataclass
class Faults:
    """Injected faults; every field can be set at start and changed at run time (PATCH /_admin/faults)."""

    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    error_rate: float = 0.0
    unavailable_rate: float = 0.0
    timeout_rate: float = 0.0
    hang_s: float = 30.0
    drop_connection_rate: float = 0.0
    outage: bool = False
    throttle_rate: float = 0.0
    throttle_retry_after_s: float = 1.0
    delivery_drop_rate: float = 0.0
    delivery_duplicate_rate: float = 0.0
    delivery_delay_ms: float = 0.0
    delivery_reorder: bool = False

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply all changes or none. Raises ValueError naming the first unknown or invalid field."""
        kinds = {f.name: f.type for f in dataclasses.fields(self)}
        checked: dict[str, Any] = {}
        for name, value in changes.items():
            kind = kinds.get(name)
            if kind is None:
                raise ValueError(f"unknown fault {name!r}; known: {', '.join(kinds)}")
            if kind in ("bool", bool):
                if not isinstance(value, bool):
                    raise ValueError(f"fault {name!r} must be true or false, got {value!r}")
                checked[name] = value
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"fault {name!r} must be a number, got {value!r}")
            if value < 0:
                raise ValueError(f"fault {name!r} must not be negative, got {value!r}")
            if name.endswith("_rate") and value > 1:
                raise ValueError(f"fault {name!r} is a probability between 0 and 1, got {value!r}")
            checked[name] = float(value)
        for name, value in checked.items():
            setattr(self, name, value)

    def as_dict(self) -> dict[str, Any]:
        """Every field and its value."""
        return dataclasses.asdict(self)


@dataclass
class Counters:
    """What an emulator has seen and done since start or the last reset."""

    requests: int = 0
    writes: int = 0
    throttled: int = 0
    errors_injected: int = 0
    deliveries: int = 0
    delivery_failures: int = 0
    deliveries_dropped: int = 0
    deliveries_duplicated: int = 0

    def snapshot(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return dataclasses.asdict(self)

    def reset(self) -> None:
        """Every counter back to zero."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, 0)


class RequestLog:
    """The most recent requests, oldest first: {time, method, path, query, status, ms, user, subrequest}."""

    def __init__(self, maxlen: int = 1000) -> None:
        self._entries: deque[dict[str, Any]] = deque(maxlen=maxlen)

    def append(self, entry: dict[str, Any]) -> None:
        """Record one request (the oldest entry falls off when full)."""
        self._entries.append(entry)

    def recent(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The last `limit` entries (all when None), oldest first."""
        entries = list(self._entries)
        return entries if limit is None else entries[max(0, len(entries) - limit) :]

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class SandboxState:
    """One per emulator app (`app.state.sandbox`). `seed` makes faults reproducible.

    `delivery` is built from the other fields; pass `client_factory` to send
    deliveries through an in-process transport.
    """

    name: str
    token: str
    faults: Faults = field(default_factory=Faults)
    counters: Counters = field(default_factory=Counters)
    log: RequestLog = field(default_factory=RequestLog)
    rng: random.Random = field(default_factory=random.Random)
    delivery: Delivery = field(init=False)
    seed: InitVar[int | None] = None
    client_factory: InitVar[Callable[[], httpx.AsyncClient] | None] = None

    def __post_init__(self, seed: int | None, client_factory: Callable[[], httpx.AsyncClient] | None) -> None:
        if seed is not None:
            self.rng.seed(seed)
        if client_factory is None:
            self.delivery = Delivery(self.faults, self.counters, self.rng)
        else:
            self.delivery = Delivery(self.faults, self.counters, self.rng, client_factory=client_factory)


def sandbox_token(env: Mapping[str, str] = os.environ) -> tuple[str, bool]:
    """LOYALTYSYNC_SANDBOX_TOKEN when set and not empty, else a fresh random token; the bool says generated."""
    token = env.get(TOKEN_ENV, "").strip()
    if token:
        return token, False
    return secrets.token_urlsafe(32), True


class ConnectionDropped(httpx.RemoteProtocolError):
    """Raised in place of a response when a drop fault fires (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__("Server disconnected without sending a response.")


def bearer_matches(authorization: str | None, token: str) -> bool:
    """True when the header is `Bearer <token>` (scheme case-insensitive), compared in constant time."""
    if not authorization:
        return False
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(credentials.strip().encode(), token.encode())


def drop_aware(app: ASGIApp) -> Callable[[Scope, Receive, Send], Any]:
    """Wrap the outermost app served by uvicorn so a dropped connection closes with no response at all."""

    async def serve(scope: Scope, receive: Receive, send: Send) -> str | None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return None

        async def guarded_send(message: Message) -> None:
            if not scope.get(DROP_SCOPE_KEY):
                await send(message)

        try:
            await app(scope, receive, guarded_send)
        except ConnectionDropped:
            pass
        # uvicorn closes the transport without writing anything when the app returns non-None.
        return DROPPED_MARKER if scope.get(DROP_SCOPE_KEY) else None

    return serve


class SandboxMiddleware:
    """Pure ASGI middleware: log and count -> bearer check -> faults -> app (see the module docstring).

    `unauthorized()` renders the service's own 401 (with WWW-Authenticate:
    Bearer); `error(status, message)` its error body for injected faults.
    Admin requests (under `admin_prefix`) need the token but get no faults.
    Sub-requests of a `$batch` are logged and counted as writes but not as
    requests, and get no faults of their own.
    """

    def __init__(
        self,
        app: ASGIApp,
        state: SandboxState,
        unauthorized: Callable[[], Response],
        error: Callable[[int, str], Response],
        admin_prefix: str = "/_admin",
    ) -> None:
        self.app = app
        self.state = state
        self.unauthorized = unauthorized
        self.error = error
        self.admin_prefix = admin_prefix.rstrip("/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state
        started = time.perf_counter()
        path: str = scope["path"]
        method: str = scope["method"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        admin = path == self.admin_prefix or path.startswith(self.admin_prefix + "/")
        subrequest = bool(scope.get(SUBREQUEST_SCOPE_KEY))
        status: list[int] = []

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        if not subrequest:
            state.counters.requests += 1
        try:
            if not bearer_matches(headers.get("authorization"), state.token):
                await self.unauthorized()(scope, receive, counting_send)
            elif admin or subrequest or not await self._inject(scope, receive, counting_send, method):
                await self.app(scope, receive, counting_send)
        finally:
            code = status[0] if status else None
            if code == 429:
                state.counters.throttled += 1
            if 200 <= (code or 0) < 300 and method in WRITE_METHODS and not (admin or path.endswith("$batch")):
                state.counters.writes += 1
            state.log.append(
                {
                    "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                    "method": method,
                    "path": path,
                    "query": scope.get("query_string", b"").decode("latin-1"),
                    "status": code,
                    "ms": round((time.perf_counter() - started) * 1000, 2),
                    "user": headers.get("callerobjectid") or ("application" if code != 401 else None),
                    "subrequest": subrequest,
                }
            )

    async def _inject(self, scope: Scope, receive: Receive, send: Send, method: str) -> bool:
        """Apply the faults to one API request. True when a fault answered (or dropped) it."""
        faults, rng, counters = self.state.faults, self.state.rng, self.state.counters
        if faults.outage:
            counters.errors_injected += 1
            await self.error(503, "The service is unavailable (sandbox outage).")(scope, receive, send)
            return True
        if faults.drop_connection_rate and rng.random() < faults.drop_connection_rate:
            counters.errors_injected += 1
            scope[DROP_SCOPE_KEY] = True
            raise ConnectionDropped()
        if faults.timeout_rate and rng.random() < faults.timeout_rate:
            counters.errors_injected += 1
            await asyncio.sleep(faults.hang_s)
            await self.error(504, "The operation has timed out.")(scope, receive, send)
            return True
        if faults.throttle_rate and rng.random() < faults.throttle_rate:
            counters.errors_injected += 1
            response = self.error(429, THROTTLE_MESSAGES.get(self.state.name, THROTTLE_MESSAGES["dataverse"]))
            response.headers["Retry-After"] = format(faults.throttle_retry_after_s, "g")
            await response(scope, receive, send)
            return True
        delay_ms = faults.latency_ms + (rng.uniform(0, faults.latency_jitter_ms) if faults.latency_jitter_ms else 0)
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000)
        if faults.error_rate and rng.random() < faults.error_rate:
            counters.errors_injected += 1
            await self.error(500, "An unexpected error occurred (sandbox fault).")(scope, receive, send)
            return True
        if faults.unavailable_rate and rng.random() < faults.unavailable_rate:
            counters.errors_injected += 1
            await self.error(503, "The service is temporarily unavailable (sandbox fault).")(scope, receive, send)
            return True
        return False


def admin_routes(state: SandboxState, extra: Sequence[BaseRoute] = (), prefix: str = "/_admin") -> list[BaseRoute]:
    """The admin endpoints, with full paths (`/_admin/stats`, ...): put them straight into the app's routes.

    `extra` routes are appended; a path that does not already start with the
    prefix gets it added (so `Route("/seed", ...)` becomes `/_admin/seed`).
    """

    async def stats(request: Request) -> Response:
        return JSONResponse(
            {
                "name": state.name,
                "counters": state.counters.snapshot(),
                "faults": state.faults.as_dict(),
                "pending_deliveries": state.delivery.pending,
            }
        )

    async def requests(request: Request) -> Response:
        raw = request.query_params.get("limit", "100")
        if not raw.isdigit():
            return _bad(f"limit must be a non-negative integer, got {raw!r}")
        return JSONResponse({"requests": state.log.recent(int(raw))})

    async def faults(request: Request) -> Response:
        body = await _json_object(request)
        if isinstance(body, Response):
            return body
        try:
            state.faults.update(body)
        except ValueError as exc:
            return _bad(str(exc))
        return JSONResponse(state.faults.as_dict())

    async def reset(request: Request) -> Response:
        state.counters.reset()
        state.log.clear()
        return JSONResponse({"counters": state.counters.snapshot()})

    async def failed(request: Request) -> Response:
        return JSONResponse({"failed": [_describe(item) for item in state.delivery.failed]})

    async def resend(request: Request) -> Response:
        body = await _json_object(request, allow_empty=True)
        if isinstance(body, Response):
            return body
        ids = body.get("ids")
        if ids is not None and (not isinstance(ids, list) or not all(isinstance(i, str) for i in ids)):
            return _bad('"ids" must be a list of delivery ids')
        return JSONResponse({"resent": await state.delivery.resend(ids)})

    async def drain(request: Request) -> Response:
        raw = request.query_params.get("timeout_s", "30")
        try:
            timeout_s = float(raw)
        except ValueError:
            return _bad(f"timeout_s must be a number, got {raw!r}")
        try:
            await state.delivery.drain(timeout_s)
        except TimeoutError:
            return JSONResponse(
                {"error": f"deliveries still pending after {timeout_s} s", "pending": state.delivery.pending},
                status_code=504,
            )
        return JSONResponse({"pending": 0, "counters": state.counters.snapshot(), "failed": len(state.delivery.failed)})

    routes: list[BaseRoute] = [
        Route(f"{prefix}/stats", stats, methods=["GET"]),
        Route(f"{prefix}/requests", requests, methods=["GET"]),
        Route(f"{prefix}/faults", faults, methods=["PATCH"]),
        Route(f"{prefix}/reset", reset, methods=["POST"]),
        Route(f"{prefix}/deliveries/failed", failed, methods=["GET"]),
        Route(f"{prefix}/deliveries/resend", resend, methods=["POST"]),
        Route(f"{prefix}/deliveries/drain", drain, methods=["POST"]),
    ]
    for route in extra:
        if isinstance(route, Route) and not route.path.startswith(prefix + "/"):
            route = Route(prefix + route.path, route.endpoint, methods=list(route.methods or ()), name=route.name)
        routes.append(route)
    return routes


def _bad(reason: str) -> Response:
    return JSONResponse({"error": reason}, status_code=400)


async def _json_object(request: Request, allow_empty: bool = False) -> dict[str, Any] | Response:
    raw = await request.body()
    if not raw.strip() and allow_empty:
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        return _bad(f"body is not JSON: {exc}")
    if not isinstance(body, dict):
        return _bad("body must be a JSON object")
    return body


def _describe(item: Any) -> dict[str, Any]:
    return {
        "id": item.id,
        "url": item.url,
        "description": item.description,
        "attempts": item.attempts,
        "error": item.last_error,
    }
