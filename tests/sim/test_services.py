"""The simulator's in-memory F&O and Dataverse against the real clients on the sandbox apps.

Differential: the same calls go through the real `FnoClient` / `DataverseClient` over
`httpx.ASGITransport` to the emulators, and through `SimFnoClient` / `SimDataverseClient` on
the same seeded data; answers, errors and the notifications the services send must be equal.
Only values drawn from different generators are normalised before comparing (row ids and
other GUIDs, F&O ETags and control numbers: each replaced by its order of first appearance,
so "the same id/ETag twice" still has to match); times are the same fixed clock on both.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from devkit.sandbox import dataverse, fno
from devkit.sandbox.dataverse import seed
from devkit.sandbox.fno.subscriptions import SubscriptionRequest
from devkit.sim import services as sim
from loyaltysync import mapping
from loyaltysync import webhooks as registration
from loyaltysync.errors import TargetError
from loyaltysync.events.model import ChangeEvent
from loyaltysync.inbound import handle_inbound
from loyaltysync.state import MemoryStateStore
from loyaltysync.sync import Engine
from loyaltysync.targets.auth import StaticTokenCredential
from loyaltysync.targets.batch import BatchRequest
from loyaltysync.targets.dataverse import DataverseClient
from loyaltysync.targets.fno import FnoClient, key_path
from loyaltysync.targets.http import RetryPolicy
from loyaltysync.targets.lookups import LookupCache
from loyaltysync.templates import Side, default_mappings_dir, load_templates

TOKEN = "sim-differential-token-0123456789"
TEMPLATES = load_templates(default_mappings_dir())
CARDS, LEVELS, POINTS = TEMPLATES["loyalty-cards"], TEMPLATES["loyalty-levels"], TEMPLATES["loyalty-reward-points"]
FIXED = datetime(2026, 3, 1, 12, 30, 5, tzinfo=UTC)
FIXED_TEXT = "2026-03-01T12:30:05Z"
NO_RETRY = RetryPolicy(max_attempts=1)
GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
SEEDED_IDS = frozenset(
    {u.systemuserid for u in seed.USERS}
    | {c.transactioncurrencyid for c in seed.CURRENCIES}
    | {seed.BUSINESS_UNIT_ID, seed.ORGANIZATION_ID}
)
Delivery = tuple[Side, str, bytes, dict[str, str]]


# ----------------------------------------------------------------------------- normalising


class Normal:
    """Replaces values drawn from a generator by their order of first appearance."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], str] = {}

    def _mark(self, kind: str, value: str) -> str:
        return self.seen.setdefault((kind, value), f"<{kind}{sum(1 for k, _ in self.seen if k == kind)}>")

    def __call__(self, value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: self(v, k) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self(v) for v in value]
        if key in ("@odata.etag", "ETag") and isinstance(value, str):
            return self._mark("etag", value)
        if key == "ControlNumber":
            return self._mark("control", str(value))
        if key == "$skiptoken" or (isinstance(value, str) and "snapshot=" in value):
            return "<cookie>"
        if isinstance(value, str):
            return GUID.sub(
                lambda m: m.group(0) if m.group(0).lower() in SEEDED_IDS else self._mark("id", m.group(0).lower()),
                value,
            )
        return value


def failure(error: TargetError) -> tuple[Any, ...]:
    return ("error", error.status, error.code, error.message, error.transient, error.retry_after, error.method,
            error.url)


async def outcome(call: Awaitable[Any]) -> Any:
    try:
        return ("ok", await call)
    except TargetError as error:
        return failure(error)


async def pages(iterator: AsyncIterator[list[dict[str, Any]]]) -> Any:
    try:
        return ("ok", [page async for page in iterator])
    except TargetError as error:
        return failure(error)


# ----------------------------------------------------------------------------- the two worlds


class Hosts(httpx.AsyncBaseTransport):
    """Routes each request to the in-process app serving its host."""

    def __init__(self, apps: Mapping[str, ASGIApp]) -> None:
        self.transports = {host: httpx.ASGITransport(app=app) for host, app in apps.items()}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        transport = self.transports.get(request.url.host)
        if transport is None:
            raise httpx.ConnectError(f"no server at {request.url.host}", request=request)
        return await transport.handle_async_request(request)


@dataclass
class World:
    fo: FnoClient
    dv: DataverseClient
    received: list[Delivery] = field(default_factory=list)
    apps: tuple[ASGIApp, ASGIApp] | None = None
    settle: Callable[[], Awaitable[None]] | None = None
    close: Callable[[], Awaitable[None]] | None = None

    async def delivered(self) -> list[Delivery]:
        if self.settle is not None:
            await self.settle()
        return list(self.received)


async def real_world(form: sim.FoEventForm) -> World:
    fo_host, dv_host = httpx.URL(sim.FO_URL).host, httpx.URL(sim.DATAVERSE_URL).host
    function_host = httpx.URL(sim.FUNCTION_URL).host
    fo_app = fno.create_app(token=TOKEN, seed=3, templates=TEMPLATES, public_url=sim.FO_URL)
    dv_app = dataverse.create_app(token=TOKEN, seed=3, templates=TEMPLATES, public_url=sim.DATAVERSE_URL,
                                  fno_url=sim.FO_URL if form == "virtual-table" else None)
    # The same fixed clock as the simulated world's (the emulators read the wall clock by default).
    dv_app.state.dataverse.now = lambda: FIXED_TEXT
    dv_app.state.webhooks.clock = FIXED.timestamp
    fo_app.state.fno.clock = lambda: FIXED
    world = World(fo=None, dv=None)  # type: ignore[arg-type]

    async def function(request: Request) -> Response:
        side: Side = "fo" if request.path_params["side"] == "fo" else "dataverse"
        world.received.append((side, request.path_params["template"], await request.body(), dict(request.headers)))
        return Response(status_code=202)

    function_app = Starlette(routes=[Route("/api/{side}/{template}", function, methods=["POST"])])
    hosts = {fo_host: fo_app, dv_host: dv_app, function_host: function_app}
    for app in (fo_app, dv_app):
        app.state.sandbox.delivery.client_factory = lambda: httpx.AsyncClient(transport=Hosts(hosts))
    fo_app.state.fno_events.retry_pause_s = 0
    credential = StaticTokenCredential(TOKEN)
    world.fo = FnoClient(sim.FO_URL, credential, transport=httpx.ASGITransport(app=fo_app), retry=NO_RETRY)
    world.dv = DataverseClient(sim.DATAVERSE_URL, credential, transport=httpx.ASGITransport(app=dv_app),
                               retry=NO_RETRY)
    plan = await registration.plan(world.dv, TEMPLATES, function_url=sim.FUNCTION_URL, function_key=sim.FUNCTION_KEY)
    await registration.apply(world.dv, plan)
    if form != "virtual-table":
        for template in TEMPLATES.values():
            fo_app.state.fno_events.add(SubscriptionRequest(
                entity_set=template.fo.entity_set, url=f"{sim.FUNCTION_URL}/api/fo/{template.name}", format=form))

    async def settle() -> None:
        for _ in range(2):  # F&O -> Dataverse, then Dataverse -> the function
            await fo_app.state.sandbox.delivery.drain(timeout_s=10)
            await dv_app.state.sandbox.delivery.drain(timeout_s=10)

    async def close() -> None:
        await world.fo.aclose()
        await world.dv.aclose()
        for app in (fo_app, dv_app):
            await app.state.sandbox.delivery.aclose()

    world.settle, world.close, world.apps = settle, close, (fo_app, dv_app)
    return world


async def sim_world(
    form: sim.FoEventForm, hooks: sim.Hooks | None = None, seed_: int = 7
) -> tuple[World, sim.SimServices]:
    received: list[Delivery] = []

    def deliver(endpoint: Side, template: str, body: bytes, headers: dict[str, str]) -> None:
        received.append((endpoint, template, body, headers))

    services = await sim.build(TEMPLATES, fo_clock=lambda: FIXED, dataverse_clock=lambda: FIXED,
                               rng=random.Random(seed_), hooks=hooks or sim.NoFaults(), deliver=deliver, fo_events=form)
    world = World(fo=services.fno.client(retry=NO_RETRY), dv=services.dataverse.client(retry=NO_RETRY),
                  received=received)
    return world, services


@pytest.fixture(params=sim.FO_EVENT_FORMS)
async def worlds(request: pytest.FixtureRequest) -> AsyncIterator[tuple[World, World]]:
    real = await real_world(request.param)
    simulated, _ = await sim_world(request.param)
    try:
        yield real, simulated
    finally:
        assert real.close is not None
        await real.close()


# ----------------------------------------------------------------------------- the call sequences


async def fo_calls(world: World) -> list[Any]:
    fo, cards = world.fo, CARDS.fo.entity_set
    select = mapping.fo_select(CARDS)
    out: list[Any] = [
        await outcome(fo.get(cards, {"CardNumber": "C-1"})),
        await outcome(fo.create_new(cards, {"CardNumber": "C-1"}, {"CardTenderType": "Blocked", "PartyNumber": "P1"})),
        await outcome(fo.create_new(cards, {"CardNumber": "C-1"}, {"CardTenderType": "NoTender"})),
        await outcome(fo.get(cards, {"CardNumber": "C-1"}, select=select)),
        await outcome(fo.update(cards, {"CardNumber": "C-9"}, {"PartyNumber": "P9"})),
        await outcome(fo.update(cards, {"CardNumber": "C-1"}, {"PartyNumber": "P2"})),
        await outcome(fo.get(cards, {"CardNumber": "C-1"})),
        await outcome(fo.create(cards, {"CardNumber": "C-1", "PartyNumber": "again"})),
        await outcome(fo.update(cards, {"CardNumber": "C-1"}, {"NoSuchProperty": 1})),
        await outcome(fo.update(cards, {"CardNumber": "C-1"}, {"CardTenderType": "NotAMember"})),
    ]
    for n in range(2, 7):
        out.append(await outcome(fo.create_new(cards, {"CardNumber": f"C-{n}"}, {"PartyNumber": f"P{n}"})))
    out.append(await pages(fo.query(cards, select=select, page_size=2)))
    out.append(await pages(fo.query(cards, select=select, orderby="CardNumber desc", page_size=4)))
    out.append(await pages(fo.query(cards, filter="PartyNumber eq 'P3'", select=select)))
    out.append(await pages(fo.query(cards, filter="NoSuch eq 'P3'", select=select)))
    batch = await fo.batch(
        [BatchRequest("GET", key_path(cards, {"CardNumber": n}, params={"$select": "CardNumber,PartyNumber"}))
         for n in ("C-1", "C-404", "C-2")],
        continue_on_error=True,
    )
    out.append([(r.status, r.body, failure(r.error) if r.error else None) for r in batch])
    out.append(await outcome(fo.delete(cards, {"CardNumber": "C-1"})))
    out.append(await outcome(fo.delete(cards, {"CardNumber": "C-1"})))
    levels = LEVELS.fo.entity_set
    out.append(await outcome(fo.create_new(levels, {"LevelPhrase": "GOLD"}, {"LevelDescription": "Gold"})))
    out.append(await outcome(fo.get(levels, {"LevelPhrase": "GOLD"}, select=mapping.fo_select(LEVELS))))
    return out


def looked_up_column() -> str:
    return next(f.dataverse for f in POINTS.fields if f.lookup is not None and f.dataverse)


def engine_columns(template: Any) -> list[str]:
    return [*mapping.dataverse_select(template), "_createdby_value"]


async def dataverse_calls(world: World) -> list[Any]:
    dv, cards = world.dv, CARDS.dataverse.entity_set
    columns = engine_columns(CARDS)
    card = CARDS.dataverse.primary_id
    out: list[Any] = [
        await outcome(dv.get_by_key(cards, {"msdyn_cardnumber": "D-1"}, columns)),
        await outcome(dv.upsert(cards, {"msdyn_cardnumber": "D-1"},
                                {"msdyn_cardnumber": "D-1", "msdyn_cardtendertype": 806380003}, mode="create")),
        await outcome(dv.upsert(cards, {"msdyn_cardnumber": "D-1"}, {"msdyn_cardnumber": "D-1"}, mode="create")),
        await outcome(dv.upsert(cards, {"msdyn_cardnumber": "D-9"}, {"msdyn_partynumber": "x"}, mode="update")),
        await outcome(dv.upsert(cards, {"msdyn_cardnumber": "D-1"}, {"msdyn_partynumber": "P2"}, mode="update")),
        await outcome(dv.as_caller(seed.AGENT_USER.azureactivedirectoryobjectid).upsert(
            cards, {"msdyn_cardnumber": "D-1"}, {"msdyn_partynumber": "P3"}, mode="update")),
        await outcome(dv.upsert(cards, {"msdyn_cardnumber": "D-1"}, {"msdyn_nosuchcolumn": 1}, mode="update")),
        await outcome(dv.upsert(cards, {"msdyn_cardnumber": "D-1"}, {"msdyn_cardtendertype": 7}, mode="update")),
        await outcome(dv.get_by_key(cards, {"msdyn_cardnumber": "D-1"}, columns)),
        await outcome(dv.get_by_key("msdyn_nosuchtables", {"msdyn_cardnumber": "D-1"}, columns)),
        await outcome(dv.get_by_key(cards, {"msdyn_cardnumber": "D-1"}, ["msdyn_nosuchcolumn"])),
    ]
    row_id = await dv.find_id(cards, card, {"msdyn_cardnumber": "D-1"})
    assert row_id is not None
    out.append(await outcome(dv.get_by_id(cards, row_id, columns)))
    out.append(await outcome(dv.get_by_id(cards, "00000000-0000-4000-8000-000000000404", columns)))
    # A key value an alternate-key URL cannot carry: found with $filter, written by id.
    odd = {"msdyn_cardnumber": "A/B"}
    out.append(await outcome(dv.upsert(cards, odd, {"msdyn_partynumber": "odd"}, mode="create", id_column=card)))
    out.append(await outcome(dv.upsert(cards, odd, {"msdyn_partynumber": "odd2"}, mode="update", id_column=card)))
    out.append(await outcome(dv.get_by_key(cards, odd, columns)))
    for n in range(2, 6):
        out.append(await outcome(dv.upsert(cards, {"msdyn_cardnumber": f"D-{n}"}, {"msdyn_partynumber": f"P{n}"})))
    out.append(await pages(dv.query(cards, select=mapping.dataverse_select(CARDS), page_size=2)))
    out.append(await pages(dv.query(cards, select=["msdyn_cardnumber"], filter="msdyn_partynumber eq 'P3'",
                                    orderby="msdyn_cardnumber desc")))
    # Lookups: the LookupCache the engine uses, both ways.
    looked_up = next(f for f in POINTS.fields if f.lookup is not None)
    lookup = looked_up.lookup
    assert lookup is not None
    cache = LookupCache(dv)
    await cache.prepare(lookup, keys=["EUR", "usd", "XTS"], ids=[seed.CURRENCY_IDS["GBP"], "not-a-guid"])
    out.append([cache.id_for(lookup, "EUR"), cache.id_for(lookup, "usd"), cache.id_for(lookup, "XTS"),
                cache.key_for(lookup, seed.CURRENCY_IDS["GBP"])])
    points = POINTS.dataverse.entity_set
    point_key = mapping.dataverse_key(POINTS, {POINTS.fields[0].key: "R-1"})
    currency = f"/{lookup.entity_set}({seed.CURRENCY_IDS['EUR']})"
    nav = lookup.navigation_property or looked_up.dataverse
    out.append(await outcome(dv.upsert(points, point_key, {**point_key, f"{nav}@odata.bind": currency}, mode="create")))
    out.append(await outcome(dv.get_by_key(points, point_key, engine_columns(POINTS))))
    out.append(await outcome(dv.delete_by_key(cards, {"msdyn_cardnumber": "D-1"})))
    out.append(await outcome(dv.delete_by_key(cards, {"msdyn_cardnumber": "D-1"})))
    out.append(await outcome(dv.delete_by_key(cards, odd, id_column=card)))
    out.append(await outcome(dv.delete_by_id(cards, "00000000-0000-4000-8000-000000000404")))
    out.append(await outcome(dv.delete_by_key("msdyn_nosuchtables", {"msdyn_cardnumber": "D-1"})))
    out.append(await outcome(dv.who_am_i()))
    return out


def normal_deliveries(deliveries: list[Delivery]) -> list[str]:
    """Each delivery normalised on its own (the real queue may deliver out of commit order), sorted."""
    out = []
    for endpoint, template, body, headers in deliveries:
        normal = Normal()
        lowered = {k.lower(): v for k, v in headers.items()}
        out.append(json.dumps([endpoint, template, normal(json.loads(body)), normal(lowered)], sort_keys=True))
    return sorted(out)


def real_headers_like(real: list[Delivery], simulated: list[Delivery]) -> list[Delivery]:
    """The real deliveries with only the headers the service set (httpx adds host, length, agent...)."""
    names = {k.lower() for _, _, _, headers in simulated for k in headers}
    return [(e, t, b, {k: v for k, v in h.items() if k.lower() in names}) for e, t, b, h in real]


# ----------------------------------------------------------------------------- the tests


async def test_fno_calls_and_events_match_the_real_client_on_the_emulator(worlds: tuple[World, World]) -> None:
    real, simulated = worlds
    expected = await fo_calls(real)
    got = await fo_calls(simulated)
    for n, (want, have) in enumerate(zip(Normal()(expected), Normal()(got), strict=True)):
        assert have == want, f"call {n}"
    # What the calls came to (so "equal" is not "both failed alike").
    assert [got[n][0] for n in (0, 1, 2, 3, 5, 6)] == ["ok"] * 6
    assert (got[0][1], got[1][1], got[2][1]) == (None, True, False)
    assert [got[n][1] for n in (4, 7, 8, 9)] == [404, 500, 400, 400]
    assert got[-2] == ("ok", True) and got[-1][1] == {**got[-1][1], "LevelPhrase": "GOLD", "LevelDescription": "Gold"}
    assert [len(page) for page in got[15][1]] == [2, 2, 2]
    assert [r[0] for r in got[19]] == [200, 404, 200]
    assert (got[20], got[21]) == (("ok", True), ("ok", False))
    real_sent = [d for d in await real.delivered() if d[0] == "fo"]
    sim_sent = [d for d in await simulated.delivered() if d[0] == "fo"]
    assert len(sim_sent) == 9  # creates C-1 .. C-6 and GOLD, an update, a delete
    assert normal_deliveries(sim_sent) == normal_deliveries(real_headers_like(real_sent, sim_sent))


async def test_dataverse_calls_and_webhooks_match_the_real_client_on_the_emulator(
    worlds: tuple[World, World],
) -> None:
    real, simulated = worlds
    expected = await dataverse_calls(real)
    got = await dataverse_calls(simulated)
    for n, (want, have) in enumerate(zip(Normal()(expected), Normal()(got), strict=True)):
        assert have == want, f"call {n}"
    assert got[0] == ("ok", None) and got[1][0] == "ok" and GUID.fullmatch(got[1][1])
    assert [got[n][1] for n in (2, 3, 6, 7, 9, 10)] == [412, 404, 400, 400, 404, 400]
    assert got[8][1]["msdyn_partynumber"] == "P3"
    assert got[8][1]["_createdby_value"] == seed.INTEGRATION_USER.systemuserid
    assert got[13][1] is not None and got[14][1] is not None and got[15][1]["msdyn_partynumber"] == "odd2"
    assert got[-9] == [seed.CURRENCY_IDS["EUR"], seed.CURRENCY_IDS["USD"], None, "GBP"]
    assert got[-7][1][f"_{looked_up_column()}_value"] == seed.CURRENCY_IDS["EUR"]
    assert [got[n][1] for n in (-6, -5, -4, -3)] == [True, False, True, False]
    real_sent = [d for d in await real.delivered() if d[0] == "dataverse"]
    sim_sent = [d for d in await simulated.delivered() if d[0] == "dataverse"]
    assert len(sim_sent) == 12  # 7 creates, 3 updates (one by the agent), 2 deletes
    assert normal_deliveries(sim_sent) == normal_deliveries(real_headers_like(real_sent, sim_sent))


async def test_rows_carry_the_integration_users_stamps_and_versions() -> None:
    world, _ = await sim_world("virtual-table")
    cards = CARDS.dataverse.entity_set
    await world.dv.upsert(cards, {"msdyn_cardnumber": "V-1"}, {"msdyn_cardnumber": "V-1"}, mode="create")
    first = await world.dv.get_by_key(cards, {"msdyn_cardnumber": "V-1"}, engine_columns(CARDS))
    await world.dv.upsert(cards, {"msdyn_cardnumber": "V-1"}, {"msdyn_partynumber": "P"}, mode="update")
    second = await world.dv.get_by_key(cards, {"msdyn_cardnumber": "V-1"}, engine_columns(CARDS))
    assert first is not None and second is not None
    assert first["_createdby_value"] == seed.INTEGRATION_USER.systemuserid
    assert first["modifiedon"] == FIXED_TEXT
    assert second["versionnumber"] > first["versionnumber"]
    assert second["@odata.etag"] == f'W/"{second["versionnumber"]}"' != first["@odata.etag"]
    await world.fo.create_new(CARDS.fo.entity_set, {"CardNumber": "V-1"}, {})
    fo_first = await world.fo.get(CARDS.fo.entity_set, {"CardNumber": "V-1"})
    await world.fo.update(CARDS.fo.entity_set, {"CardNumber": "V-1"}, {"PartyNumber": "Q"})
    fo_second = await world.fo.get(CARDS.fo.entity_set, {"CardNumber": "V-1"})
    assert fo_first is not None and fo_second is not None
    assert fo_first["@odata.etag"] != fo_second["@odata.etag"]
    assert CARDS.fo.modified_field is None and not any("modified" in k.lower() for k in fo_second)


# ----------------------------------------------------------------------------- faults and retries


@dataclass
class Script:
    """Hooks that raise scripted faults: `plan[(side, operation, "before"|"after")]` is a list of kinds, one per
    attempt (None: no fault). Records every hook call."""

    plan: dict[tuple[str, str, str], list[sim.FaultKind | None]] = field(default_factory=dict)
    calls: list[tuple[str, str, str, bool | None]] = field(default_factory=list)

    def _next(self, side: Side, operation: str, when: str) -> None:
        queue = self.plan.get((side, operation, when))
        kind = queue.pop(0) if queue else None
        if kind is not None:
            raise sim.fault(side, kind, retry_after=1.0)

    async def before(self, side: Side, operation: str) -> None:
        self.calls.append((side, operation, "before", None))
        self._next(side, operation, "before")

    async def after(self, side: Side, operation: str, committed: bool) -> None:
        self.calls.append((side, operation, "after", committed))
        self._next(side, operation, "after")


class Faulty(httpx.AsyncBaseTransport):
    """The real client's side of the same faults: the sandbox's fault answers before the app, or the app's answer
    lost after it ran (httpx.ReadTimeout), scripted per request method."""

    def __init__(self, app: ASGIApp, side: Side, plan: dict[tuple[str, str], list[sim.FaultKind | None]]) -> None:
        self.inner = httpx.ASGITransport(app=app)
        self.side: Side = side
        self.plan = plan

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        before = self.plan.get((request.method, "before"))
        kind = before.pop(0) if before else None
        if kind == "timeout":
            raise httpx.ReadTimeout("timed out", request=request)
        if kind == "unreachable":
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        if kind == "dropped":
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
        if kind is not None:
            status, body, headers = sim.fault_answer(self.side, kind, retry_after=1.0)
            return httpx.Response(status, headers=headers, content=body, request=request)
        response = await self.inner.handle_async_request(request)
        after = self.plan.get((request.method, "after"))
        if after and after.pop(0) == "timeout":
            await response.aread()
            raise httpx.ReadTimeout("timed out", request=request)
        return response


class Sleeps:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


FaultPlan = dict[tuple[str, str], list[sim.FaultKind | None]]
JITTERLESS = RetryPolicy(max_attempts=3, base_delay=0.5, jitter=0.0)


@dataclass(frozen=True)
class Case:
    side: Side
    operation: str  # the sim hooks' name of the request
    method: str  # the HTTP method the real client sends for it
    when: str  # "before" or "after"
    faults: tuple[sim.FaultKind | None, ...]
    call: Callable[[World], Awaitable[Any]]


async def _card(world: World) -> None:
    await world.fo.create_new(CARDS.fo.entity_set, {"CardNumber": "F-1"}, {"PartyNumber": "P1"})
    await world.dv.upsert(CARDS.dataverse.entity_set, {"msdyn_cardnumber": "F-1"}, {"msdyn_partynumber": "P1"})


FO_CARD, DV_CARD = {"CardNumber": "F-1"}, {"msdyn_cardnumber": "F-1"}
CASES = {
    "fo read throttled twice": Case("fo", "read", "GET", "before", ("throttled", "throttled"),
                                    lambda w: w.fo.get(CARDS.fo.entity_set, FO_CARD)),
    "fo create_new answer lost": Case("fo", "create", "POST", "after", ("timeout",),
                                      lambda w: w.fo.create_new(CARDS.fo.entity_set, {"CardNumber": "F-2"}, {})),
    "fo create answer lost": Case("fo", "create", "POST", "after", ("timeout",),
                                  lambda w: w.fo.create(CARDS.fo.entity_set, {"CardNumber": "F-3"})),
    "fo update answer lost": Case("fo", "update", "PATCH", "after", ("timeout",),
                                  lambda w: w.fo.update(CARDS.fo.entity_set, FO_CARD, {"PartyNumber": "P2"})),
    "fo delete outage": Case("fo", "delete", "DELETE", "before", ("outage", "outage", "outage"),
                             lambda w: w.fo.delete(CARDS.fo.entity_set, FO_CARD)),
    "dataverse create-only answer lost": Case(
        "dataverse", "create", "PATCH", "after", ("timeout",),
        lambda w: w.dv.upsert(CARDS.dataverse.entity_set, {"msdyn_cardnumber": "F-2"}, {}, mode="create")),
    "dataverse delete answer lost": Case("dataverse", "delete", "DELETE", "after", ("timeout",),
                                         lambda w: w.dv.delete_by_key(CARDS.dataverse.entity_set, DV_CARD)),
    "dataverse POST unreachable": Case("dataverse", "create", "POST", "before", ("unreachable",),
                                       lambda w: w.dv.create(CARDS.dataverse.entity_set, {"msdyn_cardnumber": "F-4"})),
    "dataverse POST timed out": Case("dataverse", "create", "POST", "before", ("timeout",),
                                     lambda w: w.dv.create(CARDS.dataverse.entity_set, {"msdyn_cardnumber": "F-5"})),
    "dataverse read 500": Case("dataverse", "read", "GET", "before", ("error",),
                               lambda w: w.dv.get_by_key(CARDS.dataverse.entity_set, DV_CARD)),
    "dataverse update throttled": Case(
        "dataverse", "update", "PATCH", "before", ("throttled", "gateway-timeout"),
        lambda w: w.dv.upsert(CARDS.dataverse.entity_set, DV_CARD, {"msdyn_partynumber": "P9"}, mode="update")),
}


def fault_outcome(result: Any) -> Any:
    """An outcome without the URL and method of an injected fault (the simulator's hooks do not know them)."""
    if result[0] == "error" and result[1] in (0, 429, 500, 503, 504):
        return result[:6]
    return result


@pytest.mark.parametrize("name", sorted(CASES))
async def test_faults_come_out_as_the_real_clients_retries_make_them(name: str) -> None:
    case = CASES[name]
    real = await real_world("business-event")
    simulated, _ = await sim_world("business-event")
    try:
        await _card(real)
        await _card(simulated)
        assert real.apps is not None
        real_sleeps, sim_sleeps = Sleeps(), Sleeps()
        app = real.apps[0] if case.side == "fo" else real.apps[1]
        transport = Faulty(app, case.side, {(case.method, case.when): list(case.faults)})
        credential = StaticTokenCredential(TOKEN)
        script = Script({(case.side, case.operation, case.when): list(case.faults)})
        if case.side == "fo":
            faulty_real = World(FnoClient(sim.FO_URL, credential, transport=transport, retry=JITTERLESS,
                                          sleep=real_sleeps), real.dv)
            services = simulated.fo.service  # type: ignore[attr-defined]
            faulty_sim = World(sim.SimFnoClient(services, hooks=script, retry=JITTERLESS, sleep=sim_sleeps),
                               simulated.dv)
        else:
            faulty_real = World(real.fo, DataverseClient(sim.DATAVERSE_URL, credential, transport=transport,
                                                         retry=JITTERLESS, sleep=real_sleeps))
            services = simulated.dv.service  # type: ignore[attr-defined]
            faulty_sim = World(simulated.fo, sim.SimDataverseClient(services, hooks=script, retry=JITTERLESS,
                                                                    sleep=sim_sleeps))
        want = fault_outcome(await outcome(case.call(faulty_real)))
        have = fault_outcome(await outcome(case.call(faulty_sim)))
        assert Normal()(have) == Normal()(want)
        assert sim_sleeps.waits == real_sleeps.waits
        assert len([c for c in script.calls if c[2] == "before"]) == len(real_sleeps.waits) + 1
        # The same end state, and the same notifications (an applied-twice update sends two).
        state = [await fo_calls_state(w) for w in (real, simulated)]
        assert Normal()(state[1]) == Normal()(state[0])
        real_sent, sim_sent = await real.delivered(), await simulated.delivered()
        assert normal_deliveries(sim_sent) == normal_deliveries(real_headers_like(real_sent, sim_sent))
    finally:
        assert real.close is not None
        await real.close()


async def fo_calls_state(world: World) -> list[Any]:
    cards = [f"F-{n}" for n in range(1, 6)]
    fo = [await world.fo.get(CARDS.fo.entity_set, {"CardNumber": c}) for c in cards]
    dv = [await world.dv.get_by_key(CARDS.dataverse.entity_set, {"msdyn_cardnumber": c}, engine_columns(CARDS))
          for c in cards]
    return [fo, dv]


# ----------------------------------------------------------------------------- notifications parse


def parsed(deliveries: list[Delivery]) -> list[tuple[Side, ChangeEvent, dict[str, str]]]:
    """Each delivery through the function app's inbound handler (202 required), with its events."""
    out = []
    for endpoint, template, body, headers in deliveries:
        reply = handle_inbound(endpoint, TEMPLATES[template], TEMPLATES, body, headers, max_body_bytes=1 << 20)
        assert reply.status == 202, reply.body
        assert len(reply.messages) == 1
        out.append((endpoint, ChangeEvent.from_json(reply.messages[0]), headers))
    return out


async def play_people(world: World, services: sim.SimServices) -> None:
    card = {"PartyNumber": "P1", "CardTenderType": "Blocked"}
    await services.person_write("fo", "loyalty-cards", "create", "K-1", card)
    await services.person_write("fo", "loyalty-cards", "update", "K-1", {"PartyNumber": "P2"})
    await services.person_write("fo", "loyalty-cards", "delete", "K-1", {})
    await world.dv.upsert(CARDS.dataverse.entity_set, {"msdyn_cardnumber": "K-2"},
                          {"msdyn_cardnumber": "K-2", "msdyn_partynumber": "Q1"}, mode="create")
    await services.person_write("dataverse", "loyalty-cards", "update", "K-2", {"PartyNumber": "Q2"})
    await services.person_write("dataverse", "loyalty-cards", "delete", "K-2", {})


@pytest.mark.parametrize("form", sim.FO_EVENT_FORMS)
async def test_every_notification_is_accepted_by_the_function_app_as_the_change_it_was(form: sim.FoEventForm) -> None:
    world, services = await sim_world(form)
    await play_people(world, services)
    events = parsed(world.received)
    fo = [e for side, e, _ in events if side == "fo"]
    dv = [e for side, e, _ in events if side == "dataverse"]
    assert [(e.operation, e.key) for e in fo] == [(op, {"CardNumber": "K-1"}) for op in ("create", "update", "delete")]
    assert {e.wire_format for e in fo} == {"fo-business-event" if form == "business-event" else "fo-data-event"}
    assert all(e.modified_on == FIXED_TEXT for e in fo)  # F&O's clock: its rows carry no modified time
    if form != "business-event":
        assert fo[1].changed == ["PartyNumber"]  # the submitted fields of the update
    assert [(e.operation, e.key) for e in dv] == [(op, {"CardNumber": "K-2"}) for op in ("create", "update", "delete")]
    create, update, delete = dv
    assert create.initiating_user == seed.INTEGRATION_USER.systemuserid  # the sync's write
    assert update.initiating_user == delete.initiating_user == seed.AGENT_USER.systemuserid  # a person's
    assert create.fields["PartyNumber"] == "Q1" and update.fields["PartyNumber"] == "Q2"
    assert update.before["PartyNumber"] == "Q1"  # the pre-image
    assert int(create.source_version or 0) < int(update.source_version or 0)
    assert update.source_version == delete.source_version  # a delete's pre-image holds the last version
    assert create.row_id == update.row_id == delete.row_id


async def test_a_webhook_over_the_size_limit_arrives_in_the_reduced_form() -> None:
    world, services = await sim_world("business-event")
    services.dataverse.dispatcher.size_limit = 600  # the 256 KB limit, scaled down to these small rows
    await play_people(world, services)
    events = parsed([d for d in world.received if d[0] == "dataverse"])
    assert [e.operation for _, e, _ in events] == ["create", "update", "delete"]
    for _, event, headers in events:
        assert headers["x-ms-dynamics-msg-size-exceeded"] == "true"
        assert not event.fields and not event.before and not event.key  # no images, no Target: ids and names only
        assert event.row_id is not None
    assert len({e.row_id for _, e, _ in events}) == 1


# ----------------------------------------------------------------------------- people, the judge's view


async def test_people_write_as_people_and_get_the_services_refusals() -> None:
    world, services = await sim_world("virtual-table")
    values = {"RewardPointCurrency": "EUR", "RedeemRanking": 3, "MaximumLoyaltyRewardPoints": Decimal("12.5")}
    at = await services.person_write("dataverse", "loyalty-reward-points", "create", "R-1", values)
    assert at == FIXED
    assert services.rows("dataverse", "loyalty-reward-points")["R-1"] == {
        **{s.fo: None for s in services.dataverse.specs["loyalty-reward-points"]}, "RewardPointId": "R-1", **values}
    row = await world.dv.get_by_key(POINTS.dataverse.entity_set, {POINTS.dataverse.alternate_key[0]: "R-1"},
                                    engine_columns(POINTS))
    assert row is not None and row["_createdby_value"] == seed.AGENT_USER.systemuserid
    refusals = [
        ("dataverse", "create", "R-1", 412),
        ("fo", "update", "R-404", 404),
        ("fo", "delete", "R-404", 404),
        ("dataverse", "update", "R-404", 404),
        ("dataverse", "delete", "R-404", 404),
    ]
    for side, kind, key, status in refusals:
        with pytest.raises(TargetError) as raised:
            await services.person_write(side, "loyalty-reward-points", kind, key, {})  # type: ignore[arg-type]
        assert raised.value.status == status, (side, kind)
    await services.person_write("fo", "loyalty-reward-points", "create", "R-2", {})
    with pytest.raises(TargetError) as duplicate:
        await services.person_write("fo", "loyalty-reward-points", "create", "R-2", {})
    assert duplicate.value.status == 500 and "already exists" in duplicate.value.message
    assert services.creates("dataverse", "loyalty-reward-points") == {"R-1": 1}
    assert services.creates("fo", "loyalty-reward-points") == {"R-2": 1}


async def test_a_person_sees_faults_and_their_write_is_timed_by_the_services_clock() -> None:
    script = Script({("fo", "update", "before"): ["throttled"], ("dataverse", "create", "after"): ["timeout"]})
    clock = [FIXED]
    received: list[Delivery] = []
    services = await sim.build(TEMPLATES, fo_clock=lambda: clock[0],
                               dataverse_clock=lambda: clock[0] + timedelta(seconds=3),
                               rng=random.Random(1), hooks=script, deliver=lambda *d: received.append(d))
    assert await services.person_write("fo", "loyalty-cards", "create", "T-1", {"PartyNumber": "A"}) == FIXED
    with pytest.raises(TargetError) as throttled:
        await services.person_write("fo", "loyalty-cards", "update", "T-1", {"PartyNumber": "B"})
    assert throttled.value.status == 429 and throttled.value.retry_after == 1.0
    clock[0] = FIXED + timedelta(minutes=1)
    assert await services.person_write("fo", "loyalty-cards", "update", "T-1", {"PartyNumber": "C"}) == clock[0]
    with pytest.raises(TargetError) as lost:  # applied, but the answer never came
        await services.person_write("dataverse", "loyalty-cards", "create", "T-1", {"PartyNumber": "C"})
    assert lost.value.status == 0 and lost.value.transient
    assert services.rows("fo", "loyalty-cards")["T-1"]["PartyNumber"] == "C"
    assert services.rows("dataverse", "loyalty-cards")["T-1"]["PartyNumber"] == "C"
    dv_row = services.dataverse.org.tables[CARDS.dataverse.table].find("msdyn_cardnumber", ("T-1",))
    assert dv_row is not None and dv_row["modifiedon"] == "2026-03-01T12:31:08Z"  # Dataverse's own (skewed) clock


async def test_the_end_state_reads_in_fo_terms_on_both_sides() -> None:
    _, services = await sim_world("business-event")
    values = {"PartyNumber": "P1", "CardTenderType": "NoTender", "LoyaltyEnrollmentDate": FIXED - timedelta(days=3)}
    for side in ("fo", "dataverse"):
        await services.person_write(side, "loyalty-cards", "create", "E-1", values)
    fo_rows, dv_rows = services.rows("fo", "loyalty-cards"), services.rows("dataverse", "loyalty-cards")
    assert fo_rows == dv_rows
    assert fo_rows["E-1"]["CardTenderType"] == "NoTender"
    assert fo_rows["E-1"]["LoyaltyEnrollmentDate"] == FIXED - timedelta(days=3)
    assert fo_rows["E-1"]["ReplacementCardNumber"] is None
    assert services.creates("fo", "loyalty-cards") == services.creates("dataverse", "loyalty-cards") == {"E-1": 1}


async def test_the_same_seed_gives_the_same_world_and_another_seed_other_ids() -> None:
    async def play(seed_: int) -> tuple[list[Delivery], dict[str, Any]]:
        world, services = await sim_world("virtual-table", seed_=seed_)
        await play_people(world, services)
        await _card(world)
        rows = {side: services.rows(side, "loyalty-cards") for side in ("fo", "dataverse")}
        return world.received, rows

    first, again, other = await play(11), await play(11), await play(12)
    assert first == again
    assert [d[2] for d in first[0]] == [d[2] for d in again[0]]
    assert [d[2] for d in first[0]] != [d[2] for d in other[0]]
    assert first[1] == other[1]  # the values do not depend on the seed, only ids do


# ----------------------------------------------------------------------------- with the real engine


async def test_the_real_engine_syncs_both_ways_through_the_simulated_clients() -> None:
    world, services = await sim_world("virtual-table")
    state = MemoryStateStore()
    engine = Engine(TEMPLATES, world.fo, world.dv, LookupCache(world.dv), state,
                    integration_users=frozenset({seed.INTEGRATION_USER.systemuserid}))

    async def drain() -> list[str]:
        reasons = []
        while world.received:
            for _, event, _ in parsed([world.received.pop(0)]):
                reasons.append((await engine.process(event)).reason)
        return reasons

    card = {"PartyNumber": "P1", "CardTenderType": "NoTender"}
    await services.person_write("fo", "loyalty-cards", "create", "S-1", card)
    assert await drain() == ["created", "echo"]  # the Dataverse webhook of the sync's own create is its echo
    assert services.rows("dataverse", "loyalty-cards")["S-1"] == services.rows("fo", "loyalty-cards")["S-1"]
    assert services.creates("dataverse", "loyalty-cards") == {"S-1": 1}
    row = await world.dv.get_by_key(CARDS.dataverse.entity_set, {"msdyn_cardnumber": "S-1"}, engine_columns(CARDS))
    assert row is not None and row["_createdby_value"] == seed.INTEGRATION_USER.systemuserid
    await services.person_write("dataverse", "loyalty-cards", "update", "S-1", {"PartyNumber": "P2"})
    assert await drain() == ["changed", "no-change"]
    assert services.rows("fo", "loyalty-cards")["S-1"]["PartyNumber"] == "P2"
    await services.person_write("dataverse", "loyalty-cards", "delete", "S-1", {})
    assert await drain() == ["deleted", "both-missing"]
    assert "S-1" not in services.rows("fo", "loyalty-cards")
    assert services.creates("fo", "loyalty-cards") == {"S-1": 1}
