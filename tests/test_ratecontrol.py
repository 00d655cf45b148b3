"""Adaptive rate control: the AIMD rules as pure logic (fake clock), the async gate, and the Dataverse emulator."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from devkit.sandbox.common import Faults
from devkit.sandbox.dataverse import CostModel, ServiceProtectionLimits, create_app
from loyaltysync.bulk.prepare import Item
from loyaltysync.bulk.writers import DataverseWriter
from loyaltysync.ratecontrol import AimdState, RateController, RateSettings
from loyaltysync.targets.auth import StaticTokenCredential
from loyaltysync.targets.dataverse import DataverseClient
from loyaltysync.targets.http import Attempt, RetryPolicy
from loyaltysync.templates import default_mappings_dir, load_templates

TOKEN = "rate-control-token"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


def state(**settings: float) -> AimdState:
    return AimdState(RateSettings(**settings))  # type: ignore[arg-type]


# --- the rules ---------------------------------------------------------------------------------


def test_fast_answers_add_about_one_request_per_round_trip() -> None:
    aimd = state(initial=4, maximum=32)
    for _ in range(4):  # one round trip at 4 in flight
        aimd.on_success(0.05, now=1.0)
    assert 4.8 < aimd.limit < 5.0
    for _ in range(200):
        aimd.on_success(0.05, now=2.0)
    assert 20 < aimd.limit <= 32
    assert aimd.allowed == int(aimd.limit)


def test_growth_stops_at_the_maximum() -> None:
    aimd = state(initial=4, maximum=6)
    for _ in range(500):
        aimd.on_success(0.01, now=1.0)
    assert aimd.limit == 6


def test_slow_answers_hold_back_instead_of_growing() -> None:
    aimd = state(initial=8)
    for _ in range(10):
        aimd.on_success(0.1, now=1.0)  # the service's unloaded speed
    grown = aimd.limit
    for _ in range(16):
        aimd.on_success(0.5, now=2.0)  # five times slower: saturated
    assert aimd.limit < grown
    assert aimd.best_latency == 0.1


def test_a_429_halves_the_limit_and_pauses_for_retry_after() -> None:
    aimd = state(initial=16)
    aimd.on_success(0.2, now=1.0)
    aimd.on_throttle(30.0, now=10.0)
    assert aimd.limit == pytest.approx(8.0, abs=0.1)
    assert aimd.pause_left(10.0) == 30.0
    assert aimd.pause_left(39.0) == 1.0
    assert aimd.pause_left(41.0) == 0.0


def test_refusals_of_one_burst_halve_only_once() -> None:
    aimd = state(initial=16)
    aimd.on_success(0.2, now=1.0)
    aimd.on_throttle(5.0, now=10.0)
    aimd.on_throttle(5.0, now=10.1)  # requests already on their way when the budget ran out
    aimd.on_throttle(7.0, now=14.0)
    assert aimd.limit == pytest.approx(8.0, abs=0.1)
    assert aimd.pause_left(14.0) == 7.0  # but the longest Retry-After is honoured
    aimd.on_success(0.2, now=21.1)  # the pause and one round trip later: a new congestion event may count
    aimd.on_throttle(5.0, now=30.0)
    assert aimd.limit == pytest.approx(4.1, abs=0.2)


def test_answers_to_requests_sent_before_the_pause_do_not_grow_the_limit() -> None:
    aimd = state(initial=10)
    aimd.on_success(0.2, now=1.0)
    aimd.on_throttle(5.0, now=10.0)
    halved = aimd.limit
    for _ in range(20):
        aimd.on_success(0.2, now=12.0)
    assert aimd.limit == halved


def test_no_retry_after_pauses_for_the_default_and_the_floor_holds() -> None:
    aimd = state(initial=1, minimum=1, default_pause=2.0)
    aimd.on_throttle(None, now=0.0)
    assert aimd.limit == 1
    assert aimd.pause_left(0.0) == 2.0


def test_server_errors_shrink_gently_once_per_event() -> None:
    aimd = state(initial=10, error_decrease=0.8)
    aimd.on_success(0.5, now=0.0)
    aimd.on_error(now=1.0)
    aimd.on_error(now=1.1)  # the same incident
    assert aimd.limit == pytest.approx(8.0, abs=0.1)
    aimd.on_error(now=5.0)
    assert aimd.limit == pytest.approx(6.4, abs=0.1)


def test_one_request_probes_at_the_start_and_after_each_pause() -> None:
    aimd = state(initial=6)
    assert aimd.allowed == 1
    aimd.on_success(0.1, now=1.0)
    assert aimd.allowed == 6
    aimd.on_throttle(10.0, now=2.0)
    assert aimd.allowed == 1
    aimd.on_success(0.1, now=5.0)  # an answer to a request sent before the refusal: still paused
    assert aimd.allowed == 1
    aimd.on_success(0.1, now=12.5)  # the probe after the pause got through
    assert aimd.allowed == 3


def test_a_short_retry_after_paces_at_the_rate_that_got_through() -> None:
    aimd = state(initial=4, frontier_pause=5.0, pace_increase=0.01)
    for n in range(8):
        aimd.on_success(0.1, now=10.0 + n * 0.5)  # 8 requests got through between t=9.9 and t=13.5
    aimd.on_throttle(2.0, now=14.0)  # the budget ran out; it refills within 2 s: we are at its edge
    assert aimd.rate == pytest.approx(8 / (14.0 - 9.9 + 2.0), rel=0.01)
    assert aimd.start_delay(15.0) == 1.0  # the pause first
    aimd.started(16.0)
    assert aimd.start_delay(16.0) == pytest.approx(1 / aimd.rate)  # then one start per 1/rate seconds
    paced = aimd.rate
    aimd.on_success(0.1, now=16.2)
    assert aimd.rate == pytest.approx(paced * 1.01)  # and slowly faster while nothing is refused


def test_a_long_retry_after_stops_pacing_the_budget_comes_back_in_bulk() -> None:
    aimd = state(initial=4)
    aimd.on_success(0.1, now=1.0)
    aimd.on_throttle(1.0, now=2.0)
    assert aimd.rate is not None
    aimd.on_success(0.1, now=3.5)
    aimd.on_throttle(270.0, now=4.0)
    assert aimd.rate is None and aimd.start_delay(300.0) == 0.0


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        RateSettings(initial=0.5)
    with pytest.raises(ValueError):
        RateSettings(minimum=4, initial=2)
    with pytest.raises(ValueError):
        RateSettings(decrease=1.5)


# --- the gate ----------------------------------------------------------------------------------


async def test_the_gate_sends_a_probe_then_admits_up_to_the_limit_and_the_next_waits() -> None:
    controller = RateController(RateSettings(initial=2, maximum=2))
    entered: list[int] = []
    release = asyncio.Event()

    async def worker(n: int) -> None:
        async with controller.slot():
            entered.append(n)
            await release.wait()

    tasks = [asyncio.create_task(worker(n)) for n in range(4)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert entered == [0]  # the first request goes alone
    controller.observe(Attempt("dataverse", "POST", "x", 204, 0.1, 1, None))  # ...and its answer opens the gate
    for _ in range(5):
        await asyncio.sleep(0)
    assert entered == [0, 1] and controller.in_flight == 2
    release.set()
    await asyncio.gather(*tasks)
    assert entered == [0, 1, 2, 3] and controller.in_flight == 0 and controller.peak == 2


async def test_a_pause_holds_every_writer_until_it_ends() -> None:
    clock = Clock()
    controller = RateController(clock=clock, sleep=clock.sleep)
    controller.hold(12.5)
    started = clock.now
    async with controller.slot():
        assert clock.now - started >= 12.5
    async with controller.slot():  # the pause is over: no more waiting
        assert clock.now - started < 12.6


async def test_hooks_on_the_http_pipeline_count_and_pause() -> None:
    answers = [429, 204, 503, 204]

    async def respond(request: Request) -> Response:
        status = answers.pop(0)
        if status == 429:
            return JSONResponse({"error": {"code": "0x80072322", "message": "limit"}}, 429, {"Retry-After": "7"})
        if status == 503:
            return JSONResponse({"error": {"code": "", "message": "busy"}}, 503)
        return Response(status_code=204)

    app = Starlette(routes=[Route("/api/data/v9.2/{rest:path}", respond, methods=["PATCH", "POST"])])
    clock = Clock()
    waits: list[float] = []

    async def no_wait(seconds: float) -> None:
        waits.append(seconds)

    client = DataverseClient(
        "https://org.example.test",
        StaticTokenCredential(TOKEN),
        transport=httpx.ASGITransport(app=app),
        sleep=no_wait,
        retry=RetryPolicy(jitter=0.0, base_delay=0.5),
    )
    controller = RateController(RateSettings(initial=8), clock=clock, sleep=clock.sleep).attach(client.http)
    await client.upsert("msdyn_loyaltycards", {"msdyn_cardnumber": "C-1"}, {"msdyn_partynumber": "P"})
    assert waits == [7.0]  # TargetHttp honoured Retry-After itself...
    assert controller.stats.throttled == 1 and controller.stats.requests == 2
    assert controller.state.pause_left(clock.now) == 7.0  # ...and every other writer is held as long
    assert controller.state.limit == pytest.approx(4.0, abs=0.2)
    clock.now += 60
    await client.upsert("msdyn_loyaltycards", {"msdyn_cardnumber": "C-2"}, {"msdyn_partynumber": "P"})
    assert controller.stats.errors == 1 and controller.stats.requests == 4
    await client.aclose()


def test_reads_do_not_teach_latency_by_default() -> None:
    controller = RateController(RateSettings(initial=4))
    controller.observe(Attempt("dataverse", "GET", "x", 200, 0.01, 1, None))
    assert controller.state.best_latency is None and controller.stats.requests == 1
    controller.observe(Attempt("dataverse", "POST", "x", 204, 0.3, 1, None))
    assert controller.state.best_latency == 0.3


# --- against the Dataverse emulator -----------------------------------------------------------


def cards(first: int, count: int) -> list[Item]:
    return [
        Item(
            key={"CardNumber": f"R-{i:05d}"},
            key_text=f"R-{i:05d}",
            target_key={"msdyn_cardnumber": f"R-{i:05d}"},
            body={"msdyn_cardnumber": f"R-{i:05d}", "msdyn_partynumber": "P-1"},
            agreed={},
        )
        for i in range(first, first + count)
    ]


async def test_against_the_emulator_refusals_come_in_one_burst_then_pacing_keeps_within_the_budget() -> None:
    templates = load_templates(default_mappings_dir())
    limits = ServiceProtectionLimits(
        requests=10_000,
        window_s=1.0,
        execution_ms=400.0,  # about 40 records per 1 s window
        concurrent=52,
        costs=CostModel(bulk_ms=0.0, bulk_record_ms=10.0),
    )
    app = create_app(token=TOKEN, templates=templates, limits=limits, faults=Faults(latency_ms=15))
    client = DataverseClient("http://dv.test", StaticTokenCredential(TOKEN), transport=httpx.ASGITransport(app=app))
    controller = RateController(RateSettings(initial=8, maximum=16), name="test").attach(client.http)
    sent: list[tuple[float, int, float | None]] = []  # (sent at, status, Retry-After) of every write
    client.http.add_observer(
        lambda a: sent.append((time.monotonic() - a.elapsed, a.status, a.retry_after)) if a.method == "POST" else None
    )
    writer = DataverseWriter(client, templates["loyalty-cards"], controller)
    started = time.monotonic()

    with controller.owning_throttling(client.http):
        failures = await asyncio.gather(*(writer.write(cards(n * 5, 5)) for n in range(20)))

    assert all(f == [] for f in failures)
    assert len(app.state.dataverse.tables["msdyn_loyaltycard"]) == 100
    assert time.monotonic() - started >= 2.0  # the budget allows 40 records per second
    refusals = sorted((at, ra) for at, status, ra in sent if status == 429)
    assert refusals and controller.stats.throttled == len(refusals)
    bursts = [refusals[0]]
    for at, ra in refusals[1:]:
        if at - bursts[-1][0] > 0.5:
            bursts.append((at, ra))
    # Only requests already on their way when the budget ran out are refused; the short Retry-After
    # (the budget refills as old work leaves the window) switches to pacing at the rate that got through,
    # which stays within the budget: no second burst, or one more at most while the pace is found.
    assert len(bursts) <= 2
    assert controller.state.rate is not None and 4 < controller.state.rate < 16  # ~8 requests/s of 5 records
    # After a refusal nothing is sent until its Retry-After has passed (a margin for requests that
    # took their slot just before the refusal arrived).
    for burst_at, retry_after in bursts:
        assert retry_after is not None
        during = [at for at, _, _ in sent if burst_at + 0.25 < at < burst_at + retry_after - 0.1]
        assert during == []
    await client.aclose()
