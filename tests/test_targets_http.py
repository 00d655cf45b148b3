"""The shared HTTP pipeline: retry and back-off, error translation, concurrency cap, hooks, redaction.

Services are small Starlette apps served in-process (httpx.ASGITransport); the
timeout and connection-refused cases use a real loopback uvicorn server.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
import uvicorn
from azure.core.credentials import AccessToken
from azure.core.pipeline.transport import AsyncHttpResponse, AsyncHttpTransport
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from loyaltysync import host_limits, timesource
from loyaltysync.errors import TargetError
from loyaltysync.targets.auth import BearerToken, StaticTokenCredential, build_credential
from loyaltysync.targets.dataverse import DataverseClient
from loyaltysync.targets.http import Attempt, RetryPolicy, TargetHttp, parse_retry_after
from loyaltysync.targets.redaction import RedactingFilter, redact

TOKEN = "tok-0123456789-very-secret-bearer"
Handler = Callable[[Request], Awaitable[Response]]


class Sleeps:
    """An injected sleep that records the waits instead of waiting."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def app_of(handler: Handler) -> Starlette:
    return Starlette(routes=[Route("/{rest:path}", handler, methods=["GET", "POST", "PATCH", "DELETE", "PUT"])])


def pipeline(
    app: Starlette | None = None,
    *,
    base_url: str = "https://svc.example.test/api/",
    transport: httpx.AsyncBaseTransport | None = None,
    **kwargs: object,
) -> TargetHttp:
    kwargs.setdefault("sleep", Sleeps())
    return TargetHttp(
        "dataverse",
        base_url,
        BearerToken(StaticTokenCredential(TOKEN), "https://svc.example.test/.default"),
        transport=transport or httpx.ASGITransport(app=app),
        **kwargs,  # type: ignore[arg-type]
    )


def scripted(*answers: Response) -> tuple[Starlette, list[Request]]:
    """An app that gives `answers` in turn (the last one repeats) and records the requests."""
    seen: list[Request] = []

    async def handler(request: Request) -> Response:
        seen.append(request)
        return answers[min(len(seen), len(answers)) - 1]

    return app_of(handler), seen


def dv_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


OK = JSONResponse({"ok": True})
THROTTLED = "Number of requests exceeded the limit of 6000 over time window of 300 seconds."


async def test_429_honours_retry_after_in_seconds() -> None:
    app, seen = scripted(
        dv_error(429, "0x80072322", THROTTLED, {"Retry-After": "7"}),
        dv_error(429, "0x80072322", THROTTLED, {"Retry-After": "2"}),
        OK,
    )
    sleeps = Sleeps()
    throttles: list[tuple[int, float | None]] = []
    http = pipeline(app, sleep=sleeps, on_throttle=lambda s, r: throttles.append((s, r)))
    response = await http.request("GET", "rows")
    assert response.json() == {"ok": True}
    assert len(seen) == 3
    assert sleeps.calls == [7.0, 2.0]
    assert throttles == [(429, 7.0), (429, 2.0)]


async def test_429_honours_retry_after_as_http_date() -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    app, seen = scripted(dv_error(429, "0x80072322", THROTTLED, {"Retry-After": when}), OK)
    sleeps = Sleeps()
    await pipeline(app, sleep=sleeps).request("GET", "rows")
    assert len(seen) == 2
    assert len(sleeps.calls) == 1
    assert 27.0 < sleeps.calls[0] <= 30.0


def test_parse_retry_after_forms() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120", now=now) == 120.0
    assert parse_retry_after(" 1.5 ", now=now) == 1.5
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:10 GMT", now=now) == 10.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now=now) == 0.0  # past: go now
    assert parse_retry_after("-5", now=now) == 0.0
    assert parse_retry_after("soon", now=now) is None
    assert parse_retry_after(None) is None


async def test_503_then_success_backs_off_exponentially() -> None:
    app, seen = scripted(dv_error(503, "", "busy"), dv_error(503, "", "busy"), dv_error(503, "", "busy"), OK)
    sleeps = Sleeps()
    http = pipeline(app, sleep=sleeps, retry=RetryPolicy(base_delay=0.5, jitter=0.0))
    assert (await http.request("GET", "rows")).status_code == 200
    assert len(seen) == 4
    assert sleeps.calls == [0.5, 1.0, 2.0]


@pytest.mark.parametrize("status", [502, 504])
async def test_gateway_errors_are_retried(status: int) -> None:
    app, seen = scripted(Response("bad gateway", status_code=status), OK)
    assert (await pipeline(app).request("GET", "rows")).status_code == 200
    assert len(seen) == 2


async def test_backoff_is_capped_and_attempts_are_bounded() -> None:
    app, seen = scripted(dv_error(503, "", "busy"))
    sleeps = Sleeps()
    policy = RetryPolicy(max_attempts=6, base_delay=1.0, max_delay=3.0, jitter=0.0, max_total_wait=100)
    with pytest.raises(TargetError) as caught:
        await pipeline(app, sleep=sleeps, retry=policy).request("GET", "rows")
    assert len(seen) == 6
    assert sleeps.calls == [1.0, 2.0, 3.0, 3.0, 3.0]
    assert caught.value.status == 503


def test_jitter_stays_within_its_share_of_the_delay() -> None:
    policy = RetryPolicy(base_delay=2.0, max_delay=10.0, jitter=0.5)
    samples = [policy.backoff(2) for _ in range(500)]  # ceiling 4 s: between 2 and 4
    assert all(2.0 <= s <= 4.0 for s in samples)
    assert max(samples) - min(samples) > 1.0  # it does vary
    assert all(5.0 <= policy.backoff(5) <= 10.0 for _ in range(100))  # capped at max_delay


async def test_exhausted_attempts_raise_the_services_code_and_message() -> None:
    app, seen = scripted(dv_error(429, "0x80072322", THROTTLED, {"Retry-After": "1"}))
    http = pipeline(app, retry=RetryPolicy(max_attempts=3))
    with pytest.raises(TargetError) as caught:
        await http.request("GET", "msdyn_loyaltycards?$select=a")
    error = caught.value
    assert len(seen) == 3
    assert (error.target, error.status, error.code, error.message) == ("dataverse", 429, "0x80072322", THROTTLED)
    assert error.retry_after == 1.0
    assert error.method == "GET"
    assert error.url == "https://svc.example.test/api/msdyn_loyaltycards?$select=a"
    assert error.transient


async def test_retry_after_beyond_the_wait_budget_is_left_to_the_caller() -> None:
    app, seen = scripted(dv_error(429, "0x80072321", "execution time", {"Retry-After": "600"}), OK)
    sleeps = Sleeps()
    with pytest.raises(TargetError) as caught:
        await pipeline(app, sleep=sleeps, retry=RetryPolicy(max_total_wait=60)).request("GET", "rows")
    assert len(seen) == 1
    assert sleeps.calls == []
    assert caught.value.retry_after == 600.0


@pytest.mark.parametrize(
    ("status", "code", "message"),
    [
        (400, "0x0", "Could not find a property named 'Name' on type 'Microsoft.Dynamics.CRM.account'"),
        (404, "0x80040217", "msdyn_loyaltycard With Id = 1 Does Not Exist"),
        (412, "", "A record with matching key values already exists."),
    ],
)
async def test_client_errors_are_not_retried(status: int, code: str, message: str) -> None:
    app, seen = scripted(dv_error(status, code, message), OK)
    with pytest.raises(TargetError) as caught:
        await pipeline(app).request("PATCH", "rows(1)", json={"a": 1})
    assert len(seen) == 1
    assert (caught.value.status, caught.value.code, caught.value.message) == (status, code, message)
    assert not caught.value.transient


async def test_a_post_is_retried_only_when_it_cannot_have_been_processed() -> None:
    app, seen = scripted(Response("gateway timeout", status_code=504), OK)
    with pytest.raises(TargetError) as caught:
        await pipeline(app).request("POST", "rows", json={"a": 1})
    assert caught.value.status == 504 and len(seen) == 1

    app, seen = scripted(dv_error(429, "0x80072322", THROTTLED, {"Retry-After": "1"}), OK)
    assert (await pipeline(app).request("POST", "rows", json={"a": 1})).status_code == 200
    assert len(seen) == 2


async def test_fo_innererror_message_is_the_one_reported() -> None:
    inner = "Write failed for table row of type 'RetailLoyaltyCardEntity'. Infolog: The record already exists."
    body = {"error": {"code": "", "message": "An error has occurred.", "innererror": {"message": inner}}}
    app, _ = scripted(JSONResponse(body, status_code=500))
    with pytest.raises(TargetError) as caught:
        await pipeline(app, retry=RetryPolicy(max_attempts=1)).request("POST", "RetailLoyaltyCards", json={})
    assert caught.value.status == 500
    assert caught.value.message == inner


async def test_an_error_that_is_not_json_keeps_its_text() -> None:
    app, _ = scripted(Response("Service Unavailable: upstream down", status_code=400))
    with pytest.raises(TargetError) as caught:
        await pipeline(app).request("GET", "rows")
    assert caught.value.code == ""
    assert caught.value.message == "Service Unavailable: upstream down"


async def test_allowed_statuses_are_returned_not_raised() -> None:
    app, _ = scripted(dv_error(404, "0x80040217", "missing"))
    response = await pipeline(app).request("GET", "rows(1)", allow={404})
    assert response.status_code == 404


async def test_concurrency_cap_is_honoured() -> None:
    in_flight = 0
    peak = 0

    async def handler(request: Request) -> Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return OK

    http = pipeline(app_of(handler), max_concurrency=3)
    await asyncio.gather(*(http.request("GET", f"rows/{i}") for i in range(20)))
    assert peak == 3


async def test_dataverse_client_defaults_to_52_concurrent_requests() -> None:
    client = DataverseClient("https://org.example.test", StaticTokenCredential(TOKEN))
    assert client.http.max_concurrency == 52
    await client.aclose()


async def test_observers_see_every_attempt() -> None:
    app, _ = scripted(dv_error(429, "0x80072322", THROTTLED, {"Retry-After": "3"}), OK)
    attempts: list[Attempt] = []
    http = pipeline(app)
    http.add_observer(attempts.append)
    await http.request("GET", "rows")
    assert [(a.status, a.attempt, a.retry_after, a.throttled) for a in attempts] == [
        (429, 1, 3.0, True),
        (200, 2, None, False),
    ]
    assert attempts[0].target == "dataverse" and attempts[0].method == "GET"


class CountingCredential:
    """A credential handing out a new token per call and counting the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    async def get_token(self, *scopes: str, **kwargs: object) -> AccessToken:
        self.calls.append(scopes)
        return AccessToken(f"token-number-{len(self.calls)}", int(datetime.now(UTC).timestamp()) + 3600)

    async def close(self) -> None:
        return None

    async def __aenter__(self) -> CountingCredential:
        return self

    async def __aexit__(self, *args: object) -> None:
        return None


async def test_401_fetches_a_fresh_token_once() -> None:
    async def handler(request: Request) -> Response:
        if request.headers["Authorization"] == "Bearer token-number-1":
            return dv_error(401, "", "token revoked")
        return OK

    credential = CountingCredential()
    http = TargetHttp(
        "fno",
        "https://env.example.test/data/",
        BearerToken(credential, "s"),
        transport=httpx.ASGITransport(app=app_of(handler)),
        sleep=Sleeps(),
    )
    assert (await http.request("GET", "Rows")).status_code == 200
    assert len(credential.calls) == 2

    always, seen = scripted(dv_error(401, "", "no such application user"))
    http = pipeline(always)
    with pytest.raises(TargetError) as caught:
        await http.request("GET", "rows")
    assert caught.value.status == 401 and len(seen) == 2


async def test_links_to_another_host_are_refused() -> None:
    http = pipeline(scripted(OK)[0])
    assert (
        http.url("https://svc.example.test/api/rows?$skiptoken=x") == "https://svc.example.test/api/rows?$skiptoken=x"
    )
    with pytest.raises(ValueError, match="another host"):
        await http.request("GET", "https://attacker.example.test/api/rows")


# Real sockets: timeouts and refused connections ----------------------------------------------------


@asynccontextmanager
async def loopback_server(app: Starlette) -> AsyncIterator[str]:
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(500):  # at most 5 s
        if server.started:
            break
        await asyncio.sleep(0.01)
    assert server.started, "uvicorn did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        await task


def slow_app(seconds: float) -> tuple[Starlette, list[Request]]:
    """An app that answers OK after `seconds` and records the requests."""
    seen: list[Request] = []

    async def slow(request: Request) -> Response:
        seen.append(request)
        await asyncio.sleep(seconds)
        return OK

    return app_of(slow), seen


async def test_slow_answers_time_out_are_retried_then_raise() -> None:
    app, seen = slow_app(0.6)
    async with loopback_server(app) as base:
        http = TargetHttp(
            "fno",
            base,
            BearerToken(StaticTokenCredential(TOKEN), "s"),
            timeout=0.15,
            sleep=Sleeps(),
            retry=RetryPolicy(max_attempts=2),
        )
        with pytest.raises(TargetError) as caught:
            await http.request("GET", "Rows")
        await http.aclose()
    assert len(seen) == 2
    assert caught.value.status == 0
    assert caught.value.code == "ReadTimeout"
    assert caught.value.transient


async def test_a_fast_answer_over_loopback_passes() -> None:
    async def fast(request: Request) -> Response:
        return OK

    async with loopback_server(app_of(fast)) as base:
        http = TargetHttp("fno", base, BearerToken(StaticTokenCredential(TOKEN), "s"), timeout=5)
        assert (await http.request("GET", "Rows")).json() == {"ok": True}
        await http.aclose()


async def test_connection_refused_is_status_0_after_retries() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sleeps = Sleeps()
    http = TargetHttp(
        "dataverse",
        f"http://127.0.0.1:{port}/api/",
        BearerToken(StaticTokenCredential(TOKEN), "s"),
        sleep=sleeps,
        retry=RetryPolicy(max_attempts=3, jitter=0.0, base_delay=0.1),
    )
    with pytest.raises(TargetError) as caught:
        await http.request("POST", "rows", json={"a": 1})  # never sent: safe to retry even a POST
    await http.aclose()
    assert caught.value.status == 0
    assert caught.value.code == "ConnectError"
    assert sleeps.calls == [0.1, 0.2]


# Secrets stay out of logs and errors ---------------------------------------------------------------


class NoNetwork(AsyncHttpTransport):
    """An azure-core transport for credentials that are built but never asked for a token."""

    async def send(self, request: object, **kwargs: object) -> AsyncHttpResponse:
        raise AssertionError("no token request expected")

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def __aexit__(self, *args: object) -> None:
        return None


async def test_no_secret_reaches_logs_or_error_text(caplog: pytest.LogCaptureFixture) -> None:
    secret = "client-secret-value-XYZ"
    credential = build_credential(
        "client-secret", tenant_id="t", client_id="c", client_secret=secret, transport=NoNetwork()
    )
    await credential.close()

    async def echo(request: Request) -> Response:
        # A hostile service echoing everything it received back in the error message.
        return dv_error(400, "0x0", f"bad request; headers were {dict(request.headers)} url={request.url}")

    caplog.set_level(logging.DEBUG)
    http = pipeline(app_of(echo))
    with pytest.raises(TargetError) as caught:
        await http.request("GET", "hook?code=function-key-123&x=1")
    logging.getLogger("loyaltysync.targets.http").info("registered %s with client_secret=%s", "hook", secret)
    logging.getLogger("httpx").debug("Authorization: Bearer %s", TOKEN)

    text = f"{caught.value} {caught.value.message} {caught.value.url}"
    assert TOKEN not in text and "function-key-123" not in text
    assert TOKEN not in caplog.text
    assert secret not in caplog.text
    assert "function-key-123" not in caplog.text
    assert "code=***" in caught.value.url
    assert "Bearer ***" in caplog.text  # the line is still there, masked
    assert caplog.records  # the requests were logged at all
    # httpcore logs on child loggers, which a filter on "httpcore" would not see.
    for name in ("httpx", "httpcore.http11", "httpcore.connection", "loyaltysync.targets.http"):
        assert any(isinstance(f, RedactingFilter) for f in logging.getLogger(name).filters), name


def test_redact_patterns() -> None:
    assert redact("Authorization: Basic dXNlcjpwYXNz") == "Authorization: ***"
    assert redact("{'authorization': 'Bearer abc.def'}") == "{'authorization': 'Bearer ***'}"
    assert redact("POST /api/hook?code=abc&x=1") == "POST /api/hook?code=***&x=1"
    assert redact('{"authvalue": "s3cr3t", "name": "hook"}') == '{"authvalue": "***", "name": "hook"}'
    assert redact("errorcode=5 status_code=200") == "errorcode=5 status_code=200"


# The invocation's budget (host_limits.invocation_deadline) --------------------------------------------


class SteppedClock:
    """A time source whose monotonic clock moves only when the injected sleep is called."""

    def __init__(self) -> None:
        self.now = 1000.0

    def utc(self) -> datetime:
        return datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=self.now)

    def monotonic(self) -> float:
        return self.now

    def new_id(self) -> str:
        return "0" * 32

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


async def test_no_wait_is_started_that_would_outlast_the_invocations_budget() -> None:
    app, seen = scripted(*[dv_error(429, "0x80072322", THROTTLED, {"Retry-After": "4"})] * 3, OK)
    clock = SteppedClock()
    token = timesource.use(clock)
    try:
        with host_limits.invocation_deadline(15.0):
            with pytest.raises(TargetError) as caught:
                await pipeline(app, sleep=clock.sleep).request("GET", "rows")
    finally:
        timesource.restore(token)
    # Waits of 4 s and 4 s fit the 10 s; a third would end at 12 s: the error goes to the worker instead.
    assert len(seen) == 3
    assert clock.now == 1008.0
    assert (caught.value.status, caught.value.retry_after) == (429, 4.0)
    assert caught.value.transient


async def test_outside_an_invocation_the_same_waits_are_made() -> None:
    app, seen = scripted(*[dv_error(429, "0x80072322", THROTTLED, {"Retry-After": "4"})] * 3, OK)
    clock = SteppedClock()
    token = timesource.use(clock)
    try:
        response = await pipeline(app, sleep=clock.sleep).request("GET", "rows")
    finally:
        timesource.restore(token)
    assert response.status_code == 200
    assert len(seen) == 4


async def test_a_spent_budget_sends_nothing() -> None:
    app, seen = scripted(OK)
    clock = SteppedClock()
    token = timesource.use(clock)
    try:
        with host_limits.invocation_deadline(10.0):
            clock.now += 5.0
            with pytest.raises(TargetError) as caught:
                await pipeline(app).request("POST", "rows", json={"a": 1})
    finally:
        timesource.restore(token)
    assert seen == []
    assert caught.value.code == "InvocationBudgetSpent"
    assert caught.value.transient


async def test_a_request_is_cut_off_where_the_budget_ends() -> None:
    app, seen = slow_app(2)
    async with loopback_server(app) as base:
        http = TargetHttp("fno", base, BearerToken(StaticTokenCredential(TOKEN), "s"), timeout=30, sleep=Sleeps(),
                          retry=RetryPolicy(max_attempts=3))
        with host_limits.invocation_deadline(0.6):
            with pytest.raises(TargetError) as caught:
                await http.request("GET", "Rows")
        await http.aclose()
    # One attempt cut off at the budget's end (not at the client's 30 s), then nothing more is sent.
    assert len(seen) == 1
    assert caught.value.code == "ReadTimeout"
