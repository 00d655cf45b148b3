"""One simulated world per seed: the real engine and worker, several instances, people, faults, crashes.

`simulate(config)` builds everything from the seed alone and plays it on the virtual loop
(devkit/sim/loop.py): F&O and Dataverse in memory (devkit/sim/services.py, on the sandbox's data
layer), the network between them and the function app (webhooks and events delayed, duplicated,
reordered, dropped), the storage account (devkit/sim/host.py), several function-app instances
each running the real `loyaltysync.worker` on its queues, crashed at any await and restarted,
and people playing a plan of operations (devkit/sim/people.py). When the plan is played, the
backlog drains, one reconcile pass runs, the backlog drains again, and the judge
(devkit/sim/judge.py) reads the history. The result carries a digest of that history: the same
seed gives the same digest, byte for byte.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

from devkit.devhost.host_json import HostConfig, load_host_json
from devkit.sandbox.dataverse.scope import Change as DataverseChange
from devkit.sandbox.dataverse.seed import INTEGRATION_USER
from devkit.sandbox.fno import events as fno_events
from devkit.sim import services as sim
from devkit.sim.host import POISON_SUFFIX, FunctionHost, Latency, SimQueue, SimRuntime, Stores, build_runtime
from devkit.sim.judge import Finding, Judge, Kind, Write, by_record
from devkit.sim.loop import PROCESS, VirtualLoop
from devkit.sim.model import FieldSpec, key_spec
from devkit.sim.model import field_specs as model_specs
from devkit.sim.people import PlannedOp, plan
from loyaltysync import inbound, timesource
from loyaltysync.errors import TargetError
from loyaltysync.host_limits import DEFAULT_FUNCTION_TIMEOUT_S
from loyaltysync.reconcile import reconcile_all
from loyaltysync.settings import Settings, load_settings
from loyaltysync.state import MemoryControlStore, MemoryDeadLetterStore, MemoryStateStore
from loyaltysync.sync import Outcome
from loyaltysync.templates import SIDES, Side, Template, default_mappings_dir, load_templates

EPOCH = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
ROOT = Path(__file__).resolve().parents[2]
DRAIN_LIMIT_S = 3 * 3600.0  # the backlog must drain within this much virtual time (retry budget 1 h, leases 10 min)
ACTOR: contextvars.ContextVar[str] = contextvars.ContextVar("devkit_sim_actor", default="sync")


@dataclass(frozen=True)
class Config:
    """What one seed plays. Everything else is drawn from the seed."""

    seed: int
    operations: int
    instances: int = 3
    crash_rate: float = 1 / 4000  # per step of a function invocation
    skew_s: float = 1.0  # each clock (F&O, Dataverse, every instance) within +-skew of true time
    drop_rate: float = 0.01  # webhooks and events lost on the way (the reconciler's job)
    duplicate_rate: float = 0.03
    late_rate: float = 0.03  # delivered 5 to 90 s late
    fault_rate: float = 0.01  # a request failing with a 5xx or a timeout before it lands
    lost_answer_rate: float = 0.01  # a request landing, its answer lost (timeout / 504)
    storms: int = 2  # throttling storms (429 + Retry-After) per side
    outages: int = 1  # outages (503) per side
    keep: frozenset[int] | None = None  # play only these planned operations (shrinking)


@dataclass
class Result:
    """What one seed did and what the judge found."""

    seed: int
    operations: int
    crashes: int
    faults: int
    findings: list[str]
    digest: str
    history: list[Write] = field(default_factory=list)
    plan: list[PlannedOp] = field(default_factory=list)
    virtual_s: float = 0.0

    @property
    def violations(self) -> int:
        return len(self.findings)


@cache
def _templates() -> dict[str, Template]:
    return load_templates(default_mappings_dir())


@cache
def _host() -> HostConfig:
    return load_host_json(ROOT / "host.json", {})


@cache
def _settings() -> Settings:
    return load_settings(
        {
            "FNO_URL": sim.FO_URL,
            "DATAVERSE_URL": sim.DATAVERSE_URL,
            "AzureWebJobsStorage": "UseDevelopmentStorage=true",
            "INTEGRATION_USER_IDS": f"{INTEGRATION_USER.systemuserid},{INTEGRATION_USER.azureactivedirectoryobjectid}",
            "PREFLIGHT_ON_START": "false",
        }
    )


class VirtualTime:
    """One machine's clock: true virtual time plus its skew; ids from its own generator."""

    def __init__(self, loop: asyncio.AbstractEventLoop, skew_s: float, rng: random.Random) -> None:
        self._loop, self._skew, self._rng = loop, skew_s, rng

    def utc(self) -> datetime:
        return EPOCH + timedelta(seconds=self._loop.time() + self._skew)

    def monotonic(self) -> float:
        return self._loop.time()

    def new_id(self) -> str:
        return f"{self._rng.getrandbits(128):032x}"


@dataclass
class _Window:
    side: Side
    kind: sim.FaultKind
    start: float
    end: float
    retry_after: float = 0.0


class Faults:
    """The `Hooks` of both services: latency, throttling storms, outages, failures before and after landing."""

    def __init__(self, config: Config, rng: random.Random, loop: asyncio.AbstractEventLoop, span_s: float) -> None:
        self.config, self.rng, self.loop = config, rng, loop
        self.count = 0
        self.calm = False  # no faults once the load is over: the reconcile pass and the last drain run clean
        self.windows: list[_Window] = []
        # Per side, `storms` throttling storms and `outages` outages per 250 s of load: long enough to exhaust
        # the clients' own retries (about 8 s), so the worker's retry path runs too; about a tenth of the time.
        scale = span_s / 250.0
        for side in SIDES:
            for _ in range(round(config.storms * scale)):
                start = rng.uniform(0, span_s)
                self.windows.append(_Window(side, "throttled", start, start + rng.uniform(5, 15), rng.uniform(1, 20)))
            for _ in range(round(config.outages * scale)):
                start = rng.uniform(0, span_s)
                self.windows.append(_Window(side, "outage", start, start + rng.uniform(10, 30)))

    async def before(self, side: Side, operation: str) -> None:
        await asyncio.sleep(self.rng.uniform(0.005, 0.05))  # the request's round trip
        if self.calm:
            return
        now = self.loop.time()
        for window in self.windows:
            if window.side == side and window.start <= now < window.end:
                self.count += 1
                raise sim.fault(side, window.kind, retry_after=window.retry_after)
        if self.rng.random() < self.config.fault_rate:
            self.count += 1
            raise sim.fault(side, self.rng.choice(("unavailable", "error", "unreachable")))

    async def after(self, side: Side, operation: str, committed: bool) -> None:
        await asyncio.sleep(0)  # the answer on its way back: the caller may die here (one timed pause per call)
        if committed and not self.calm and self.rng.random() < self.config.lost_answer_rate:
            self.count += 1
            raise sim.fault(side, self.rng.choice(("timeout", "gateway-timeout", "dropped")))


class Journal:
    """Every change the services commit, in order, with who made it and when (true virtual time)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, templates: Mapping[str, Template]) -> None:
        self.loop = loop
        self.writes: list[Write] = []
        self.current: int | None = None  # the write whose notifications are being sent now
        self.specs: dict[str, list[FieldSpec]] = {name: model_specs(t) for name, t in templates.items()}
        self._dv_templates = {t.dataverse.table: t for t in templates.values()}
        self._fo_templates = {t.fo.entity_set: t for t in templates.values()}

    def watch(self, services: sim.SimServices) -> None:
        dataverse, fno = services.dataverse, services.fno
        committed, publish = dataverse.committed, fno.publisher.publish

        def dataverse_committed(change: DataverseChange) -> None:
            template = self._dv_templates.get(change.table)
            if template is None:
                committed(change)
                return
            self._sending(self._dataverse_write(dataverse, template, change), lambda: committed(change))

        def fo_published(change: fno_events.Change) -> None:
            template = self._fo_templates.get(change.entity.entity_set)
            if template is None:
                publish(change)
                return
            self._sending(self._fo_write(fno, template, change), lambda: publish(change))

        dataverse.committed = dataverse_committed  # type: ignore[method-assign]
        fno.publisher.publish = fo_published  # type: ignore[method-assign]

    def _sending(self, write: Write, send: Any) -> None:
        self.writes.append(write)
        self.current = write.seq
        try:
            send()
        finally:
            self.current = None

    def _write(self, side: Side, template: Template, kind: Kind, before: dict[str, Any] | None,
               after: dict[str, Any] | None) -> Write:
        values: dict[str, Any] = {}
        if kind == "create" and after is not None:
            values = after
        elif kind == "update" and after is not None:
            values = {name: value for name, value in after.items() if before is None or before.get(name) != value}
        reference = after if after is not None else before or {}
        key = str(reference.get(key_spec(template).fo))
        return Write(len(self.writes), round(self.loop.time(), 6), side, template.name, key, ACTOR.get(),  # type: ignore[arg-type]
                     kind, values)

    def _dataverse_write(self, dataverse: sim.SimDataverse, template: Template, change: DataverseChange) -> Write:
        def terms(row: dict[str, Any] | None) -> dict[str, Any] | None:
            return None if row is None else dataverse.terms(template.name, row)

        kind: Kind = {"Create": "create", "Update": "update", "Delete": "delete"}[change.message]  # type: ignore[assignment]
        return self._write("dataverse", template, kind, terms(change.before), terms(change.after))

    def _fo_write(self, fno: sim.SimFno, template: Template, change: fno_events.Change) -> Write:
        def terms(row: dict[str, Any] | None) -> dict[str, Any] | None:
            return None if row is None else fno.terms(template.name, row)

        kind: Kind = {"Created": "create", "Updated": "update", "Deleted": "delete"}[change.change_type]  # type: ignore[assignment]
        after = None if kind == "delete" else terms(change.row)
        if change.before is not None:
            before = terms(change.before)
        else:
            before = terms(change.row) if kind == "delete" else None
        return self._write("fo", template, kind, before, after)


class _NoRawRequests:
    """The raw request path of the real clients (`client.http`), which only the reconciler's progress count uses.

    The simulated services answer the clients' calls, not raw OData paths: a raw request fails as a request
    the service refused, and the bulk source reports progress without a total, as it does when a real
    service cannot count.
    """

    def __init__(self, target: str) -> None:
        self.target = target

    async def request(self, method: str, path: str, **_: Any) -> Any:
        raise TargetError(self.target, 501, "NotModelled", f"{method} {path}: raw requests are not simulated")


class Network:
    """Between the services and the function app: each delivery delayed, maybe late, duplicated or lost."""

    def __init__(self, config: Config, rng: random.Random, loop: asyncio.AbstractEventLoop, journal: Journal,
                 settings: Settings, templates: Mapping[str, Template], queues: Mapping[str, SimQueue]) -> None:
        self.config, self.rng, self.loop, self.journal = config, rng, loop, journal
        self.settings, self.templates, self.queues = settings, templates, queues
        self.in_flight = 0
        self.log: list[tuple[int | None, str, float]] = []  # (write, what happened, delay)
        self.refused: list[str] = []
        # Deliveries belong to the services, not to the process whose write caused them: a fresh context,
        # so a crash of that process does not drop them. The function that receives them (stateless, it
        # answers without awaiting anything) runs on a machine of its own: its clock stamps `received_at`.
        self._context = contextvars.Context()
        self._context.run(timesource.use, VirtualTime(loop, rng.uniform(-config.skew_s, config.skew_s),
                                                      random.Random(rng.getrandbits(64))))  # noqa: S311

    def deliver(self, endpoint: Side, template: str, body: bytes, headers: dict[str, str]) -> None:
        write = self.journal.current
        if self.rng.random() < self.config.drop_rate:
            self.log.append((write, "dropped", 0.0))
            return
        copies = 2 if self.rng.random() < self.config.duplicate_rate else 1
        for _ in range(copies):
            late = self.rng.random() < self.config.late_rate
            delay = self.rng.uniform(5, 90) if late else self.rng.uniform(0.05, 1.5)
            self.log.append((write, "late" if late else "sent", round(delay, 6)))
            self.in_flight += 1
            self.loop.call_later(delay, self._arrive, endpoint, template, body, headers, write, context=self._context)

    def _arrive(self, endpoint: Side, template: str, body: bytes, headers: dict[str, str], write: int | None) -> None:
        self.in_flight -= 1
        reply = inbound.handle_inbound(
            endpoint, self.templates.get(template), self.templates, body, headers,
            max_body_bytes=self.settings.max_body_bytes,
        )
        if reply.status != 202:
            self.refused.append(f"{endpoint} {template}: {reply.status} {reply.body.get('error')}")
            return
        queue = self.queues[self.settings.queue_name(template)]
        for message in reply.messages:
            queue.send(message)


class World:
    """Everything one seed runs: services, network, storage, instances, people."""

    def __init__(self, config: Config, loop: VirtualLoop) -> None:
        self.config = config
        self.loop = loop
        master = random.Random(config.seed)  # noqa: S311 - a simulation's seed, not a secret
        self.rngs = {name: random.Random(master.getrandbits(64)) for name in  # noqa: S311
                     ("people", "faults", "network", "services", "instances", "skew", "form", "latency")}
        self.templates = _templates()
        self.settings = _settings()
        self.options = _host().queues
        self.function_timeout_s = _host().function_timeout or DEFAULT_FUNCTION_TIMEOUT_S
        self.specs = {name: model_specs(t) for name, t in self.templates.items()}
        self.plan = plan(self.rngs["people"], self.specs, config.operations)
        span = self.plan[-1].at if self.plan else 1.0
        self.faults = Faults(config, self.rngs["faults"], loop, span)
        self.journal = Journal(loop, self.templates)
        queues: dict[str, SimQueue] = {}
        for template in self.templates.values():
            name = self.settings.queue_name(template.name)
            for queue in (name, name + POISON_SUFFIX, name + POISON_SUFFIX + POISON_SUFFIX):
                queues[queue] = SimQueue(queue, loop.time)
        self.stores = Stores(MemoryStateStore(), MemoryDeadLetterStore(), MemoryControlStore(), queues)
        self.network = Network(config, self.rngs["network"], loop, self.journal, self.settings, self.templates, queues)
        self.latency = Latency(self.rngs["latency"])
        self.failures: list[str] = []
        self.instances = 0
        self.crashes = 0
        self.played = 0
        self.services: sim.SimServices | None = None
        self.fo_event_form: sim.FoEventForm = "virtual-table"
        self.closed = False

    def skew(self) -> float:
        return self.rngs["skew"].uniform(-self.config.skew_s, self.config.skew_s)

    async def build(self) -> sim.SimServices:
        fo_skew, dv_skew = self.skew(), self.skew()
        loop = self.loop
        form = self.rngs["form"].choice(sim.FO_EVENT_FORMS)
        self.fo_event_form = form
        services = await sim.build(
            self.templates,
            fo_clock=lambda: EPOCH + timedelta(seconds=loop.time() + fo_skew),
            dataverse_clock=lambda: EPOCH + timedelta(seconds=loop.time() + dv_skew),
            rng=self.rngs["services"],
            hooks=self.faults,
            deliver=self.network.deliver,
            fo_events=form,
        )
        self.journal.watch(services)
        self.services = services
        return services

    def start_instance(self, *, crashable: bool = True) -> SimRuntime:
        """A new function-app instance (a process): own clock, engine, caches; shared storage."""
        assert self.services is not None  # noqa: S101
        self.instances += 1
        name = f"app-{self.instances}"
        context = contextvars.copy_context()
        context.run(PROCESS.set, name)
        clock = VirtualTime(self.loop, self.skew(), random.Random(self.rngs["instances"].getrandbits(64)))  # noqa: S311
        context.run(timesource.use, clock)
        fno = self.services.fno.client(sleep=asyncio.sleep)
        dataverse = self.services.dataverse.client(sleep=asyncio.sleep)
        fno.http = _NoRawRequests("fno")  # type: ignore[assignment]
        dataverse.http = _NoRawRequests("dataverse")  # type: ignore[assignment]
        runtime: SimRuntime = context.run(build_runtime, self.settings, self.templates, fno, dataverse, self.stores,
                                          self.latency, self.function_timeout_s)
        host = FunctionHost(runtime, self.options, self.latency, self._finished, self.function_timeout_s)
        context.run(host.start)
        if crashable:
            self.loop.crashable.add(name)
        return runtime

    def crashed(self, process: str) -> None:
        self.crashes += 1
        self.loop.call_later(self.rngs["instances"].uniform(1.0, 30.0), self.start_instance)

    def _finished(self, queue: str, body: str, outcome: Outcome | None, failure: BaseException | None,
                  at: float) -> None:
        if self.closed:
            return  # a killed process's invocation, closed at the end of the run
        if failure is not None and not isinstance(failure, TargetError):
            self.failures.append(f"{queue}: {type(failure).__name__}: {failure}")

    async def play(self) -> None:
        assert self.services is not None  # noqa: S101
        running: set[asyncio.Task[None]] = set()
        keep = self.config.keep
        for op in self.plan:
            if keep is not None and op.index not in keep:
                continue
            delay = op.at - self.loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            context = contextvars.copy_context()
            context.run(ACTOR.set, "person")
            task = self.loop.create_task(self._person(op), context=context)
            running.add(task)
            task.add_done_callback(running.discard)
        if running:
            await asyncio.wait(running)

    async def _person(self, op: PlannedOp) -> None:
        """One person's operation. People see the record: an edit or delete of a record their side does not
        show (yet) is made on the other side instead, where it does; a create of a key their side shows is
        not made."""
        assert self.services is not None  # noqa: S101
        self.played += 1
        side = op.side
        if op.kind == "create" and self.exists(side, op.template, op.key):
            return
        if op.kind != "create" and not self.exists(side, op.template, op.key):
            side = "dataverse" if side == "fo" else "fo"
            if not self.exists(side, op.template, op.key):
                return
        try:
            await self.services.person_write(side, op.template, op.kind, op.key, op.values)
        except TargetError:
            return  # refused, or a fault: the history has whatever landed

    def exists(self, side: Side, template: str, key: str) -> bool:
        """Whether `side` holds the record now (what the person sees on screen)."""
        assert self.services is not None  # noqa: S101
        t = self.templates[template]
        if side == "fo":
            entity = self.services.fno.catalog.entities[t.fo.entity_set]
            return self.services.fno.data.get(entity, (key,)) is not None
        org = self.services.dataverse.org
        table = org.tables[t.dataverse.table]
        name = table.key_name_for([key_spec(t).dataverse])
        return name is not None and table.find(name, (key,)) is not None

    async def settle(self) -> bool:
        """Wait until nothing is on its way or queued; False when that takes over DRAIN_LIMIT_S."""
        started = self.loop.time()
        while True:
            if self.network.in_flight == 0 and not any(len(q) for q in self.stores.queues.values()):
                return True
            if self.loop.time() - started > DRAIN_LIMIT_S:
                return False
            await asyncio.sleep(5.0)


async def _simulate(world: World) -> list[str]:
    problems: list[str] = []
    await world.build()
    for _ in range(world.config.instances):
        world.start_instance()
    await world.play()
    if not await world.settle():
        problems.append(f"C6 the backlog did not drain within {DRAIN_LIMIT_S:.0f} s of the load's end")
    world.loop.crash_rate = 0.0  # the reconcile pass and the last drain: the timer would run again anyway
    world.faults.calm = True
    operator = world.start_instance(crashable=False)
    operator_context = contextvars.copy_context()
    operator_context.run(PROCESS.set, f"app-{world.instances}")
    operator_context.run(timesource.use, VirtualTime(world.loop, 0.0, random.Random(0)))  # noqa: S311
    await world.loop.create_task(reconcile_all(operator, full=True), context=operator_context)
    if not await world.settle():
        problems.append(f"C6 the backlog did not drain within {DRAIN_LIMIT_S:.0f} s of the reconcile pass")
    for entry in await world.stores.dead_letters.list():
        problems.append(f"C6 parked {entry.template} {entry.key} ({entry.side}): {entry.reason[:300]}")
    return problems


def simulate(config: Config) -> Result:
    """Play one seed and judge it."""
    loop = VirtualLoop(random.Random(config.seed ^ 0x5EED), crash_rate=config.crash_rate)  # noqa: S311
    world = World(config, loop)
    loop.on_crash = world.crashed
    state = random.getstate()
    random.seed(config.seed)  # the engine's retry jitter draws from the module's generator
    asyncio.set_event_loop(loop)
    try:
        problems = loop.run_until_complete(_simulate(world))
        return _judge(world, problems)
    finally:
        world.closed = True
        loop.shutdown()
        asyncio.set_event_loop(None)
        random.setstate(state)


def _judge(world: World, problems: list[str]) -> Result:
    services = world.services
    assert services is not None  # noqa: S101
    judge = Judge(world.specs, fo_events_name_fields=world.fo_event_form != "business-event")
    findings: list[Finding] = []
    grouped = by_record(world.journal.writes)
    rows: dict[str, tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]] = {}
    for name in world.templates:
        fo, dv = services.rows("fo", name), services.rows("dataverse", name)
        rows[name] = (fo, dv)
        for key in sorted(set(fo) | set(dv) | {k for (t, k) in grouped if t == name}):
            findings.extend(judge.record(name, key, grouped.get((name, key), []), fo.get(key), dv.get(key)))
    problems.extend(str(f) for f in findings)
    problems.extend(f"C6 an exception escaped: {failure}" for failure in [*world.failures, *world.loop.failures])
    problems.extend(f"C6 a webhook was refused: {refusal}" for refusal in world.network.refused)
    return Result(
        seed=world.config.seed,
        operations=sum(1 for w in world.journal.writes if w.actor == "person"),
        crashes=world.crashes,
        faults=world.faults.count,
        findings=problems,
        digest=_digest(world, rows),
        history=world.journal.writes,
        plan=world.plan,
        virtual_s=world.loop.time(),
    )


def _digest(world: World, rows: Mapping[str, tuple[Mapping[str, Any], Mapping[str, Any]]]) -> str:
    """A digest of the run's whole history: every committed change, delivery, crash and the end state."""
    h = hashlib.sha256()
    for w in world.journal.writes:
        h.update(repr((w.seq, w.at, w.side, w.template, w.key, w.actor, w.kind, sorted(w.values.items(), key=str)))
                 .encode())
    h.update(repr(world.network.log).encode())
    h.update(repr((world.crashes, world.faults.count, world.played, world.loop.steps)).encode())
    h.update(json.dumps({k: [sorted(v[0].items()), sorted(v[1].items())] for k, v in sorted(rows.items())},
                        default=str, sort_keys=True).encode())
    return h.hexdigest()


def shrink(config: Config, budget: int = 200) -> tuple[Config, Result]:
    """The fewest planned operations that still fail (greedy: the failing records' operations, then one by one)."""
    first = simulate(config)
    if not first.violations:
        return config, first
    records = {tuple(line.split(" ")[1:3]) for line in first.findings if line[:1] == "C" and len(line.split()) > 3}
    ops = [op.index for op in first.plan if (op.template, op.key) in records] or [op.index for op in first.plan]
    best, result = replace(config, keep=frozenset(ops)), None
    trial = simulate(best)
    if not trial.violations:
        return config, first
    result = trial
    tries = 0
    changed = True
    while changed and tries < budget:
        changed = False
        for index in sorted(best.keep or ()):
            if tries >= budget:
                break
            candidate = replace(best, keep=frozenset((best.keep or frozenset()) - {index}))
            tries += 1
            attempt = simulate(candidate)
            if attempt.violations:
                best, result, changed = candidate, attempt, True
    return best, result


def kept(config: Config, result: Result) -> Sequence[PlannedOp]:
    return [op for op in result.plan if config.keep is None or op.index in config.keep]
