"""Around each request of a simulated client: the simulator's hooks, the faults they raise, the real client's retries.

A simulated client sends no HTTP, but each call still stands for the requests
the real client would send. `Attempts.send` runs one of them: `Hooks.before`
(a fault raises the TargetError the real client gets), the change applied to
the sandbox's store, `Hooks.after` (an answer lost after the change landed),
and a retry exactly when `TargetHttp` would make one. `fault` builds those
errors from the sandbox's own fault answers, read by the real client's
`error_from_body`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from http import HTTPStatus
from typing import Literal, Protocol, TypeVar

from devkit.sandbox.common import THROTTLE_MESSAGES
from devkit.sandbox.dataverse.errors import fault as dv_fault
from devkit.sandbox.fno.errors import service_error as fno_fault
from loyaltysync.errors import TargetError
from loyaltysync.targets import dataverse as dv_client
from loyaltysync.targets import fno as fno_client
from loyaltysync.targets.http import IDEMPOTENT_METHODS, RetryPolicy, Sleep, error_from_body, parse_retry_after
from loyaltysync.templates import Side

T = TypeVar("T")
# Transport failures after which the request certainly never reached the service (TargetHttp's _NOT_SENT).
NOT_SENT = frozenset({"ConnectError", "ConnectTimeout", "PoolTimeout"})


# ----------------------------------------------------------------------------- hooks and faults


class Hooks(Protocol):
    """What the simulator does around each request a client sends (faults, latency on virtual time).

    One call of each per attempt of each request the real client would send (a client retries as
    `TargetHttp` does, so a retried request calls them again). `operation` names the request:
    read, query, create, update, upsert (a Dataverse PATCH that may create), delete, batch.
    `before` runs before the request reaches the service and may raise the TargetError a fault
    causes (`fault()`; nothing is applied then). `after` runs once the service has answered
    (`committed`: the store changed; False for reads and refusals) and may raise the error of an
    answer lost on the way back (the change stays). People's writes go through the same hooks.
    """

    async def before(self, side: Side, operation: str) -> None: ...

    async def after(self, side: Side, operation: str, committed: bool) -> None: ...


class NoFaults:
    """Hooks that let every request through at once."""

    async def before(self, side: Side, operation: str) -> None:
        return None

    async def after(self, side: Side, operation: str, committed: bool) -> None:
        return None


FaultKind = Literal["throttled", "outage", "unavailable", "error", "gateway-timeout", "timeout", "dropped",
                    "unreachable"]
_FAULT_ANSWERS: dict[str, tuple[int, str]] = {
    "outage": (503, "The service is unavailable (sandbox outage)."),
    "unavailable": (503, "The service is temporarily unavailable (sandbox fault)."),
    "error": (500, "An unexpected error occurred (sandbox fault)."),
    "gateway-timeout": (504, "The operation has timed out."),
}
_TRANSPORT: dict[str, tuple[str, str]] = {
    # What TargetHttp makes of httpx's exceptions: status 0, the exception's name, its message.
    "timeout": ("ReadTimeout", "timed out"),  # sent; no answer in time (the request may have been applied)
    "dropped": ("RemoteProtocolError", "Server disconnected without sending a response."),
    "unreachable": ("ConnectError", "[Errno 111] Connection refused"),  # never sent
}


def fault_answer(side: Side, kind: FaultKind, *, retry_after: float = 1.0) -> tuple[int, bytes, dict[str, str]]:
    """The HTTP answer (status, body, headers) the sandbox's fault injection gives for an HTTP-level fault."""
    if kind == "throttled":
        status, message = 429, THROTTLE_MESSAGES["fo" if side == "fo" else "dataverse"]
        headers = {"Retry-After": format(retry_after, "g")}
    else:
        (status, message), headers = _FAULT_ANSWERS[kind], {}
    response = fno_fault(status, message) if side == "fo" else dv_fault(status, message)
    return status, bytes(response.body), headers


def fault(side: Side, kind: FaultKind, *, retry_after: float = 1.0, method: str = "", url: str = "") -> TargetError:
    """The TargetError one attempt of the real client gets for an injected fault.

    HTTP answers are the sandbox's own fault bodies (`SandboxMiddleware`, `fault_answer`), read by
    the real client's `error_from_body`; transport failures are what `TargetHttp` makes of httpx's
    exceptions (status 0, transient): "timeout" an `httpx.ReadTimeout` (retried for idempotent
    requests only: the request may have landed), "dropped" a connection closed without an
    answer, "unreachable" a connection never made (always retried).
    """
    target = _target(side)
    if kind in _TRANSPORT:
        code, message = _TRANSPORT[kind]
        return TargetError(target, 0, code, message, method=method, url=url)
    status, body, headers = fault_answer(side, kind, retry_after=retry_after)
    return error_from_body(target, status, body, reason=HTTPStatus(status).phrase, method=method, url=url,
                           retry_after=parse_retry_after(headers.get("Retry-After")))


def _target(side: Side) -> str:
    return fno_client.TARGET if side == "fo" else dv_client.TARGET


def _retryable(policy: RetryPolicy, error: TargetError, idempotent: bool) -> bool:
    """Whether TargetHttp tries a failed attempt again (see `TargetHttp.request`)."""
    if error.status == 0:
        return error.code in NOT_SENT or idempotent
    return error.status in policy.retry_statuses and (idempotent or error.status in (429, 503))


class Attempts:
    """One side's request loop: hooks around each attempt, retries as the real client's pipeline makes them."""

    def __init__(self, side: Side, hooks: Hooks, retry: RetryPolicy, sleep: Sleep, rng: random.Random) -> None:
        self.side: Side = side
        self.hooks = hooks
        self.retry = retry
        self.sleep = sleep
        self.rng = rng

    def backoff(self, attempt: int) -> float:
        policy = self.retry
        ceiling = min(policy.max_delay, policy.base_delay * 2.0 ** (attempt - 1))
        return ceiling * (1 - policy.jitter) + ceiling * policy.jitter * self.rng.random()

    async def send(
        self, operation: str, method: str, apply: Callable[[], tuple[T, bool]], *, idempotent: bool | None = None
    ) -> T:
        """Run `apply` (returns the result and whether the store changed) as one request of the real client."""
        if idempotent is None:
            idempotent = method in IDEMPOTENT_METHODS
        policy = self.retry
        attempt = 0
        waited = 0.0
        while True:
            attempt += 1
            try:
                await self.hooks.before(self.side, operation)
                try:
                    result, committed = apply()
                except TargetError:
                    await self.hooks.after(self.side, operation, False)
                    raise
                await self.hooks.after(self.side, operation, committed)
                return result
            except TargetError as error:
                if not _retryable(policy, error, idempotent) or attempt >= policy.max_attempts:
                    raise
                delay = error.retry_after if error.retry_after is not None else self.backoff(attempt)
                if waited + delay > policy.max_total_wait:
                    raise
                await self.sleep(delay)
                waited += delay
