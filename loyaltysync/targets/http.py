"""The HTTP pipeline every F&O and Dataverse request goes through.

One `TargetHttp` per target wraps one shared `httpx.AsyncClient` (connection
pooling, timeouts) and applies, each in exactly one place: the bearer token,
the per-target concurrency cap, retry with capped jittered exponential
back-off honouring `Retry-After`, translation of failures into `TargetError`
with the service's own code and message, observer hooks for rate control and
metrics, and log redaction. The transport is a seam (httpx's): the same code
runs against Azure, the emulators over TCP, or an ASGI app in-process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from loyaltysync import host_limits
from loyaltysync.errors import TargetError
from loyaltysync.targets.auth import BearerToken
from loyaltysync.targets.redaction import install_log_redaction, redact

log = logging.getLogger("loyaltysync.targets.http")
# Filters only see records of their own logger, so each logger that may show request details is named.
install_log_redaction(
    "loyaltysync.targets.http",
    "loyaltysync.targets.fno",
    "httpx",
    "httpcore.connection",
    "httpcore.http11",
    "httpcore.http2",
    "httpcore.proxy",
    "httpcore.socks",
)

Sleep = Callable[[float], Awaitable[None]]
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH"})
_MAX_URL_IN_ERRORS = 512
_MAX_MESSAGE = 2000


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how long to wait before trying a failed request again.

    The n-th retry waits `min(max_delay, base_delay * 2**(n-1))`, of which the
    `jitter` fraction is random, unless the service said `Retry-After`, which
    is honoured exactly. A wait that would take the total past
    `max_total_wait` is not made: the error is raised with its `retry_after`
    so the caller can reschedule the work instead of holding a worker.
    """

    max_attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_total_wait: float = 120.0
    jitter: float = 0.5
    retry_statuses: frozenset[int] = frozenset({429, 502, 503, 504})

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1-based) when the service gave no Retry-After."""
        ceiling = min(self.max_delay, self.base_delay * 2.0 ** (retry - 1))
        return ceiling * (1 - self.jitter) + ceiling * self.jitter * random.random()  # noqa: S311 (not crypto)


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one try of one request came to; observers (metrics, rate control) receive these."""

    target: str
    method: str
    url: str
    status: int  # 0 when no HTTP answer came (connection error, timeout)
    elapsed: float
    attempt: int
    retry_after: float | None

    @property
    def throttled(self) -> bool:
        return self.status == 429


Observer = Callable[[Attempt], None]
ThrottleHook = Callable[[int, float | None], None]


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header: delta-seconds or an HTTP date; None when absent/garbled."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def error_from_body(
    target: str,
    status: int,
    body: bytes,
    *,
    reason: str = "",
    method: str = "",
    url: str = "",
    retry_after: float | None = None,
) -> TargetError:
    """A `TargetError` carrying the service's `error.code` and most useful message.

    F&O puts the real reason in `error.innererror.message` ("An error has
    occurred." outside); Dataverse may put it in an InnerError annotation.
    """
    code, message = "", ""
    try:
        data: Any = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        code = str(error.get("code") or "")
        message = str(error.get("message") or "")
        inner = error.get("innererror")
        inner_message = inner.get("message") if isinstance(inner, dict) else None
        inner_message = inner_message or error.get("@Microsoft.PowerApps.CDS.InnerError.Message")
        if inner_message:
            message = str(inner_message)
    elif body:
        message = body.decode("utf-8", "replace").strip()
    message = redact(message or reason or "no error message")[:_MAX_MESSAGE]
    return TargetError(
        target,
        status,
        code,
        message,
        method=method,
        url=redact(url)[:_MAX_URL_IN_ERRORS],
        retry_after=retry_after,
    )


def error_from_response(target: str, response: httpx.Response, retry_after: float | None = None) -> TargetError:
    """`error_from_body` for a whole httpx response."""
    return error_from_body(
        target,
        response.status_code,
        response.content,
        reason=response.reason_phrase,
        method=response.request.method,
        url=str(response.request.url),
        retry_after=retry_after,
    )


def _out_of_time(target: str, method: str, url: str) -> TargetError:
    """The invocation's budget is spent before this request was sent: transient, and certainly not sent."""
    return TargetError(
        target,
        0,
        "InvocationBudgetSpent",
        "not sent: the invocation's time (functionTimeout less the hand-back margin) is spent",
        method=method,
        url=redact(url)[:_MAX_URL_IN_ERRORS],
    )


def _transport_error(target: str, method: str, url: str, exc: httpx.TransportError) -> TargetError:
    detail = str(exc) or type(exc).__name__
    return TargetError(
        target,
        0,
        type(exc).__name__,
        redact(detail)[:_MAX_MESSAGE],
        method=method,
        url=redact(url)[:_MAX_URL_IN_ERRORS],
    )


# Errors after which the request certainly never reached the service: safe to retry any method.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_RETRYABLE_TRANSPORT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


class TargetHttp:
    """One target's HTTP pipeline; share one instance per target for the process lifetime."""

    def __init__(
        self,
        target: str,
        base_url: str,
        token: BearerToken,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 30.0,
        max_concurrency: int = 16,
        retry: RetryPolicy | None = None,
        sleep: Sleep = asyncio.sleep,
        default_headers: Mapping[str, str] | None = None,
        on_throttle: ThrottleHook | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.target = target
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.token = token
        self.retry = retry or RetryPolicy()
        self._timeout = timeout
        self.max_concurrency = max_concurrency
        self._origin = httpx.URL(self.base_url).copy_with(path="/", query=None, fragment=None)
        self._sleep = sleep
        self._gate = asyncio.Semaphore(max_concurrency)
        self._observers: list[Observer] = []
        self._throttle_hooks: list[ThrottleHook] = [on_throttle] if on_throttle else []
        if transport is None:
            limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
            transport = httpx.AsyncHTTPTransport(limits=limits, retries=0)
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(timeout),
            headers=dict(default_headers or {}),
            follow_redirects=False,
        )

    def add_observer(self, observer: Observer) -> None:
        """Call `observer` after every attempt (success or not), e.g. for metrics or an adaptive rate limit."""
        self._observers.append(observer)

    def add_throttle_hook(self, hook: ThrottleHook) -> None:
        """Call `hook(status, retry_after)` whenever an attempt fails in a way that is retried."""
        self._throttle_hooks.append(hook)

    def url(self, path: str) -> str:
        """The absolute URL of `path` (relative to the base URL); absolute URLs must share its origin.

        Links the service hands back (`@odata.nextLink`) are followed unchanged, but
        never to another host: the bearer token must not leave the target.
        """
        if path.startswith(("http://", "https://")):
            link = httpx.URL(path)
            if link.copy_with(path="/", query=None, fragment=None) != self._origin:
                raise ValueError(f"{self.target}: refusing to follow a link to another host: {redact(path)}")
            return path
        return self.base_url + path.lstrip("/")

    async def request(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        content: bytes | None = None,
        allow: Collection[int] = (),
        idempotent: bool | None = None,
    ) -> httpx.Response:
        """Send one request, retrying what is worth retrying; return the 2xx (or `allow`ed) response.

        Raises `TargetError`: the service's code and message for an error answer, status 0 when
        it could not be reached. A request that is not idempotent (POST by default) is retried only
        when it cannot have been processed (429, 503, connection never made), so a timed-out
        create is never sent twice.
        """
        method = method.upper()
        url = self.url(path)
        if idempotent is None:
            idempotent = method in IDEMPOTENT_METHODS
        policy = self.retry
        waited = 0.0
        attempt = 0
        reauthenticated = False
        while True:
            attempt += 1
            left = host_limits.seconds_left()
            if left is not None and left <= 0:
                raise _out_of_time(self.target, method, url)
            send_headers = dict(headers or {})
            send_headers["Authorization"] = await self.token.header()
            started = time.monotonic()
            response: httpx.Response | None = None
            try:
                async with self._gate:
                    # Never past the invocation's budget: a request cut off there is a timeout like any other.
                    timeout = httpx.USE_CLIENT_DEFAULT if left is None else min(self._timeout, left)
                    response = await self._client.request(
                        method, url, headers=send_headers, json=json, content=content, timeout=timeout
                    )
            except httpx.TransportError as exc:
                error = _transport_error(self.target, method, url, exc)
                retryable = isinstance(exc, _NOT_SENT) or (idempotent and isinstance(exc, _RETRYABLE_TRANSPORT))
                retry_after: float | None = None
                status = 0
            else:
                status = response.status_code
                if 200 <= status < 300:
                    self._notify(method, url, status, started, attempt, None)
                    return response
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                if status == 401 and not reauthenticated:
                    # A revoked or early-expired token: fetch a fresh one once, without counting a retry.
                    self._notify(method, url, status, started, attempt, None)
                    self.token.invalidate()
                    reauthenticated = True
                    attempt -= 1
                    continue
                retryable = status in policy.retry_statuses and (idempotent or status in (429, 503))
                if status in allow and not retryable:
                    self._notify(method, url, status, started, attempt, retry_after)
                    return response
                error = error_from_response(self.target, response, retry_after)
            self._notify(method, url, status, started, attempt, retry_after)
            log.debug("%s %s failed: %s", method, url, error)
            if not retryable:
                raise error
            for hook in self._throttle_hooks:
                hook(status, retry_after)
            if attempt >= policy.max_attempts:
                raise error
            delay = retry_after if retry_after is not None else policy.backoff(attempt)
            if waited + delay > policy.max_total_wait:
                raise error
            left = host_limits.seconds_left()
            if left is not None and delay >= left:
                # The host would end the invocation first: the worker hands the change back to its queue.
                raise error
            log.warning(
                "%s %s %s answered %s; retry %d of %d in %.2f s",
                self.target,
                method,
                url,
                status or error.code,
                attempt,
                policy.max_attempts - 1,
                delay,
            )
            await self._sleep(delay)
            waited += delay

    def _notify(
        self, method: str, url: str, status: int, started: float, attempt: int, retry_after: float | None
    ) -> None:
        elapsed = time.monotonic() - started
        log.debug("%s %s -> %s in %.0f ms (attempt %d)", method, url, status, elapsed * 1000, attempt)
        if not self._observers:
            return
        outcome = Attempt(self.target, method, redact(url), status, elapsed, attempt, retry_after)
        for observer in self._observers:
            observer(outcome)

    async def aclose(self) -> None:
        """Close the pooled connections."""
        await self._client.aclose()
