"""The load: random concurrent operations on both sides, through the emulators' own APIs.

People in F&O write through OData (`/data/`), agents in Dataverse through the
Web API as themselves (`CallerObjectId`), on all three templates at once:
create, update of one to three random mapped fields (one-way columns included,
from the wrong side too), delete, and re-create with the same key. A few
reward points are poisoned on purpose (a currency Dataverse does not know).

Many actors play at once, each on a record of its own (operations on one
record are played one after another, as one person would), and keep within
the rules that make the end state computable (devkit/sim/model.py):
- an edit of a field on the other side than its last edit waits until
  CROSS_GAP seconds have passed and both sides show the same value;
- a re-create waits until both sides agree the record is gone;
- `conflicts()` plays same-field conflicts on purpose: the template is paused
  (through the admin function), one side edits, 1.3 s later the other side
  edits the same field, then the template is resumed; last writer wins. The
  record is then left alone until both sides agree (record-level times would
  otherwise decide). Both orders are played (see DEFAULT_CONFLICTS).

The actors slow down while the function app's queues and the emulators'
delivery queues hold a backlog, so the run measures convergence, not how deep
a queue can grow.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from devkit.sandbox.dataverse import AGENT_USER, CURRENCY_IDS
from devkit.sim.model import FieldSpec, Model, Op, dv_values, fo_values, key_spec
from devkit.sim.values import dv_body, fo_body, fresh_value, random_value
from devkit.stack import Stack
from loyaltysync.errors import TargetError
from loyaltysync.runtime import Runtime
from loyaltysync.targets.auth import StaticTokenCredential
from loyaltysync.targets.dataverse import DataverseClient
from loyaltysync.targets.fno import FnoClient
from loyaltysync.targets.http import RetryPolicy
from loyaltysync.templates import Side, Template
from tests.chaos.harness import Admin, queue_depth

CROSS_GAP = 10.0  # > the 8 s lease of a killed process's message (5 s after a crash), plus its re-run
CONFLICT_GAP = 1.3  # > Dataverse's one-second modifiedon precision
PAUSE_TAKES_S = 1.2  # > PAUSE_CACHE_SECONDS in the chaos stack (tests/chaos/harness.py)
POISON_CURRENCY = "XTS"  # ISO 4217's code for testing: no Dataverse has it
BACKLOG_HIGH, BACKLOG_LOW = 240, 120
PREFIX = {"loyalty-cards": "CH", "loyalty-levels": "LV", "loyalty-reward-points": "RP"}
SIDES: tuple[Side, Side] = ("fo", "dataverse")
CONFLICT_ORDERS = ("dataverse-later", "fo-later")
# Both orders: F&O rows carry no modified time, so F&O's side is timed by its events (a lower bound,
# tests/chaos/test_regressions.py), and a conflict F&O's events cannot decide waits for the re-check.
DEFAULT_CONFLICTS = CONFLICT_ORDERS
RESOLVE_S = 180.0  # a conflict record is left alone until both sides agree, or retired after this long


@dataclass
class Record:
    """What the generator knows about one record: its lock and when it was last touched."""

    template: str
    key: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_end: float = 0.0
    retired: bool = False  # poisoned on purpose, or a conflict that did not resolve in time: left alone


@dataclass
class Tally:
    """Counts of what the generator did, for the summary and the write bound."""

    attempted: int = 0
    failed: int = 0
    skipped: int = 0
    conflicts: int = 0
    writes: dict[str, int] = field(default_factory=lambda: {"fo": 0, "dataverse": 0})
    write_bound: int = 0


class Generator:
    """Plays operations until `target` of them have been confirmed by the emulators."""

    def __init__(
        self,
        stack: Stack,
        runtime: Runtime,
        admin: Admin,
        model: Model,
        rng: random.Random,
        target: int,
        *,
        conflict_orders: tuple[str, ...] = DEFAULT_CONFLICTS,
    ) -> None:
        self.stack = stack
        self.admin = admin
        self.conflict_orders = conflict_orders
        self.runtime = runtime
        self.model = model
        self.rng = rng
        self.target = target
        self.tally = Tally()
        self.templates: dict[str, Template] = dict(stack.templates)
        self.records: dict[str, dict[str, Record]] = {name: {} for name in self.templates}
        self._serial = 0
        credential = StaticTokenCredential(stack.token)
        # People retry a little, then give up; a failed operation is simply not in the model.
        retry = RetryPolicy(max_attempts=4, base_delay=0.2, max_delay=2.0, max_total_wait=8.0)
        self.fo = FnoClient(stack.fo.url, credential, retry=retry, timeout=20)
        self._dv_owner = DataverseClient(stack.dataverse.url, credential, retry=retry, timeout=20)
        self.dv = self._dv_owner.as_caller(AGENT_USER.azureactivedirectoryobjectid)
        self.currency_ids = {code: row_id.lower() for code, row_id in CURRENCY_IDS.items()}
        self.stop = asyncio.Event()
        self._seeded = 0
        self.played: list[str] = []
        self._backlog = 0
        self._backlog_at = 0.0

    async def aclose(self) -> None:
        await self.fo.aclose()
        await self._dv_owner.aclose()

    # ------------------------------------------------------------------ progress

    def progress(self) -> float:
        """The fraction of the target played so far."""
        return min(1.0, (self.model.operations - self._seeded) / max(1, self.target))

    @property
    def seeded(self) -> int:
        """How many records were seeded before the run (their seed counts as a create in F&O)."""
        return self._seeded

    @property
    def done(self) -> bool:
        return self.model.operations - self._seeded >= self.target

    # ------------------------------------------------------------------ values

    def _new_key(self, template: str) -> str:
        self._serial += 1
        return f"{PREFIX.get(template, 'K')}-{self._serial:06d}"

    def _value(self, spec: FieldSpec) -> Any:
        """A random value in the model's form (devkit/sim/values.py; currencies include any added by the run)."""
        return random_value(self.rng, spec, self.currency_ids)

    def _fresh(self, spec: FieldSpec, *avoid: Any) -> Any:
        """A value that is none of `avoid` (the field must have room for one)."""
        return fresh_value(self.rng, spec, *avoid, currencies=self.currency_ids)

    def fo_body(self, template: str, values: dict[str, Any]) -> dict[str, Any]:
        return fo_body(self.model.specs[template], values)

    def dv_body(self, template: str, values: dict[str, Any]) -> dict[str, Any]:
        return dv_body(self.model.specs[template], values, self.currency_ids)

    def record_values(self, template: str, key: str) -> dict[str, Any]:
        """A whole new record: every mapped field, key included."""
        values = {s.fo: self._value(s) for s in self.model.specs[template] if not s.is_key}
        values[key_spec(self.templates[template]).fo] = key
        return values

    # ------------------------------------------------------------------ reading both sides

    async def read(self, template: str, key: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """Both sides of one record in the model's form (None where it is missing)."""
        t = self.templates[template]
        specs = self.model.specs[template]
        ks = key_spec(t)
        fo_row, dv_row = await asyncio.gather(
            self.fo.get(t.fo.entity_set, {ks.fo: key}),
            self.dv.get_by_key(t.dataverse.entity_set, {ks.dataverse: key}),
        )
        currencies = {row_id: code for code, row_id in self.currency_ids.items()}
        return (
            None if fo_row is None else fo_values(specs, fo_row),
            None if dv_row is None else dv_values(specs, dv_row, currencies),
        )

    async def look(self, template: str, key: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None] | None:
        """`read`, or None when a fault got in the way (the caller then leaves the record alone)."""
        try:
            return await self.read(template, key)
        except (TargetError, httpx.HTTPError):
            return None

    # ------------------------------------------------------------------ writing one side

    async def _write(self, side: Side, template: str, key: str, kind: str, values: dict[str, Any]) -> bool:
        """One operation against one emulator; True when it answered 2xx (and so changed something)."""
        t = self.templates[template]
        ks = key_spec(t)
        self.tally.attempted += 1
        try:
            if side == "fo":
                if kind == "create":
                    await self.fo.create(t.fo.entity_set, self.fo_body(template, values))
                elif kind == "update":
                    await self.fo.update(t.fo.entity_set, {ks.fo: key}, self.fo_body(template, values))
                elif not await self.fo.delete(t.fo.entity_set, {ks.fo: key}):
                    return self._failed()
            elif kind == "create":
                await self.dv.create(t.dataverse.entity_set, self.dv_body(template, values))
            elif kind == "update":
                body = self.dv_body(template, values)
                await self.dv.upsert(t.dataverse.entity_set, {ks.dataverse: key}, body, mode="update")
            elif not await self.dv.delete_by_key(t.dataverse.entity_set, {ks.dataverse: key}):
                return self._failed()
        except (TargetError, httpx.HTTPError):
            return self._failed()
        self.tally.writes[side] += 1
        return True

    def _failed(self) -> bool:
        self.tally.failed += 1
        return False

    async def play(self, record: Record, side: Side, kind: str, values: dict[str, Any]) -> bool:
        """Write, and on success put the operation in the model and add its bound on sync writes."""
        started = time.time()
        ok = await self._write(side, record.template, record.key, kind, values)
        ended = time.time()
        record.last_end = ended
        if ok:
            self.model.record(Op(record.template, record.key, side, kind, values, started, ended))  # type: ignore[arg-type]
            self.tally.write_bound += self._bound(record.template, side, kind, values)
        return ok

    def _bound(self, template: str, side: Side, kind: str, values: dict[str, Any]) -> int:
        """Most sync writes one operation can cause: the other side once, plus putting back a one-way column."""
        specs = {s.fo: s for s in self.model.specs[template]}
        wrong_way = any(not specs[name].flows_from(side) and values[name] is not None for name in values)
        return 1 + (1 if wrong_way else 0)

    # ------------------------------------------------------------------ seeding

    async def seed(self, per_template: dict[str, int]) -> None:
        """Records that exist in F&O before the run (F&O's admin seed, no events); the caller copies them over."""
        for name, count in per_template.items():
            t = self.templates[name]
            rows = []
            now = time.time()
            for _ in range(count):
                key = self._new_key(name)
                values = self.record_values(name, key)
                rows.append(self.fo_body(name, values))
                self.records[name][key] = Record(name, key, last_end=now)
                self.model.record(Op(name, key, "fo", "create", values, now, now))
                self.model.seeded.add((name, key))
            await self.admin.post("fo", f"/_admin/entities/{t.fo.entity_set}/rows", {"rows": rows})
        self._seeded = self.model.operations

    # ------------------------------------------------------------------ the actors

    async def _pace(self) -> None:
        """Wait while the queues hold more than BACKLOG_HIGH messages (until they are under BACKLOG_LOW)."""
        limit = BACKLOG_HIGH
        while not self.stop.is_set():
            now = time.monotonic()
            if now - self._backlog_at > 0.5:
                self._backlog_at = now
                self._backlog = await self._queue_depth()
            if self._backlog <= limit:
                return
            limit = BACKLOG_LOW
            await asyncio.sleep(0.25)

    async def _queue_depth(self) -> int:
        """Messages in the function app's queues plus events the emulators have yet to deliver."""
        stats = await self.admin.counters()
        pending = sum(int(side["pending_deliveries"]) for side in stats.values())
        return pending + await queue_depth(self.runtime, poison=False)

    def _pick(self, template: str, wanted: Callable[[Record], bool]) -> Record | None:
        candidates = [r for r in self.records[template].values() if not r.lock.locked() and not r.retired]
        self.rng.shuffle(candidates)
        for record in candidates[:40]:
            if wanted(record):
                return record
        return None

    def _exists(self, record: Record) -> bool:
        return self.model.expected(record.template, record.key).exists

    def _quiet(self, record: Record) -> bool:
        """Exists and untouched for CROSS_GAP seconds: a candidate for a conflict on purpose."""
        return self._exists(record) and time.time() - record.last_end >= CROSS_GAP

    async def actor(self) -> None:
        """Play operations until the target is reached."""
        while not self.done and not self.stop.is_set():
            await self._pace()
            template = self.rng.choice(sorted(self.templates))
            roll = self.rng.random()
            if roll < 0.10:
                await self._create(template)
            elif roll < 0.18:
                await self._delete(template)
            elif roll < 0.24:
                await self._recreate(template)
            else:
                await self._update(template)

    async def _create(self, template: str) -> None:
        key = self._new_key(template)
        record = Record(template, key)
        self.records[template][key] = record
        async with record.lock:
            await self.play(record, self.rng.choice(SIDES), "create", self.record_values(template, key))

    async def _delete(self, template: str) -> None:
        record = self._pick(template, self._exists)
        if record is None:
            self.tally.skipped += 1
            return
        async with record.lock:
            await self.play(record, self.rng.choice(SIDES), "delete", {})

    async def _recreate(self, template: str) -> None:
        now = time.time()
        record = self._pick(template, lambda r: not self._exists(r) and now - r.last_end >= CROSS_GAP)
        if record is None:
            self.tally.skipped += 1
            return
        async with record.lock:
            seen = await self.look(template, record.key)
            if seen is None or seen != (None, None):  # the delete has not reached both sides yet
                self.tally.skipped += 1
                return
            await self.play(record, self.rng.choice(SIDES), "create", self.record_values(template, record.key))

    async def _update(self, template: str) -> None:
        side = self.rng.choice(SIDES)
        record = self._pick(template, self._exists)
        if record is None:
            self.tally.skipped += 1
            return
        async with record.lock:
            specs = [s for s in self.model.specs[template] if not s.is_key]
            # Dataverse agents may edit one-way columns too: the model expects F&O's value back.
            chosen = self.rng.sample(specs, k=min(len(specs), self.rng.choice((1, 1, 2, 3))))
            values = {s.fo: self._value(s) for s in chosen}
            if not await self._cross_side_allowed(record, side, chosen, values):
                self.tally.skipped += 1
                return
            await self.play(record, side, "update", values)

    async def _cross_side_allowed(
        self, record: Record, side: Side, chosen: list[FieldSpec], values: dict[str, Any]
    ) -> bool:
        """Drop the fields whose last edit was on the other side unless that edit has settled (model rule 3)."""
        crossing = []
        for spec in chosen:
            last = self.model.last_edit(record.template, record.key, spec.fo)
            if spec.two_way and last is not None and last.side != side:
                crossing.append((spec, last))
        if not crossing:
            return True
        seen = await self.look(record.template, record.key)
        if seen is None:
            return False
        fo, dv = seen
        now = time.time()
        for spec, last in crossing:
            settled = now - last.ended >= CROSS_GAP and fo is not None and dv is not None
            if not settled or fo.get(spec.fo) != dv.get(spec.fo):  # type: ignore[union-attr]
                values.pop(spec.fo)
        return bool(values)

    # ------------------------------------------------------------------ conflicts on purpose

    async def conflicts(self, app: httpx.AsyncClient, admin_key: str, every_s: float = 20.0) -> None:
        """Now and then, same-field edits on both sides while the template is paused (model rule 3)."""
        while not self.done and not self.stop.is_set():
            try:
                await asyncio.wait_for(self.stop.wait(), timeout=every_s)
                return
            except TimeoutError:
                pass
            template = self.rng.choice(sorted(self.templates))
            picked = []
            for _ in range(4):
                record = self._pick(template, self._quiet)
                if record is None:
                    break
                await record.lock.acquire()
                picked.append(record)
            try:
                played = await self._conflict_window(app, admin_key, template, picked)
                await self._until_resolved(played)
            finally:
                for record in picked:
                    record.lock.release()

    async def _until_resolved(self, records: list[Record]) -> None:
        """Keep conflict records to themselves until both sides agree (model rule 3: nothing else may
        change the record while its conflict is open); one not resolved in time is retired from the run."""
        deadline = time.monotonic() + RESOLVE_S
        waiting = list(records)
        while waiting and time.monotonic() < deadline and not self.stop.is_set():
            await asyncio.sleep(0.5)
            still = []
            for record in waiting:
                seen = await self.look(record.template, record.key)
                if seen is None or seen[0] != seen[1]:
                    still.append(record)
            waiting = still
        for record in waiting:
            record.retired = True  # never picked again; still judged at the end

    async def _conflict_window(
        self, app: httpx.AsyncClient, admin_key: str, template: str, records: list[Record]
    ) -> list[Record]:
        settled = []
        for record in records:
            seen = await self.look(template, record.key)
            if seen is not None and seen[0] is not None and seen[0] == seen[1]:
                settled.append((record, seen[0]))
        if not settled:
            return []
        headers = {"x-functions-key": admin_key}
        plans = []
        try:
            await _operator(app, f"/api/ops/pause/{template}", headers)
            # The instance that took the call knows at once; the second instance (tests/chaos/worker_process.py)
            # within PAUSE_CACHE_SECONDS, as a scaled-out instance in Azure would.
            await asyncio.sleep(PAUSE_TAKES_S)
            # An F&O change whose event is lost has no known time: only the event carries it (see the report).
            # F&O's data events reach the app through Dataverse's virtual-table steps, so neither hop drops them.
            await self.admin.faults("fo", delivery_drop_rate=0.0)
            await self.admin.faults("dataverse", delivery_drop_rate=0.0)
            # Fields with room for two new values: an "edit" to the value a side already holds changes nothing.
            fields = [s for s in self.model.specs[template]
                      if s.two_way and not s.is_key and (s.value_map is None or len(s.value_map) >= 3)]
            for record, current in settled:
                spec = self.rng.choice(fields)
                order = self.rng.choice(self.conflict_orders)
                first: Side = "fo" if order == "dataverse-later" else "dataverse"
                v1 = self._fresh(spec, current.get(spec.fo))
                v2 = self._fresh(spec, current.get(spec.fo), v1)
                plans.append((record, spec, first, v1, v2))
            for record, spec, first, v1, _ in plans:
                await self.play(record, first, "update", {spec.fo: v1})
            await asyncio.sleep(CONFLICT_GAP)
            for record, spec, first, _, v2 in plans:
                if await self.play(record, "fo" if first == "dataverse" else "dataverse", "update", {spec.fo: v2}):
                    self.tally.conflicts += 1
        finally:
            from tests.chaos.faults import BACKGROUND

            try:
                await self.admin.faults("fo", delivery_drop_rate=BACKGROUND["delivery_drop_rate"])
                await self.admin.faults("dataverse", delivery_drop_rate=BACKGROUND["delivery_drop_rate"])
            finally:
                # Whatever failed above: a template left paused holds its events for good, and the run
                # stalls on the backlog it builds.
                await _operator(app, f"/api/ops/resume/{template}", headers)
        return [record for record, *_ in plans]

    # ------------------------------------------------------------------ poisoned records

    async def poison(self, count: int) -> list[str]:
        """Reward points created in F&O with a currency Dataverse does not have: they must be parked."""
        name = "loyalty-reward-points"
        keys = []
        currency = next(s.fo for s in self.model.specs[name] if s.lookup_entity_set is not None)
        for _ in range(count):
            key = self._new_key(name)
            record = Record(name, key, retired=True)
            self.records[name][key] = record
            values = self.record_values(name, key)
            values[currency] = POISON_CURRENCY
            async with record.lock:
                for _attempt in range(5):
                    if await self.play(record, "fo", "create", values):
                        keys.append(key)
                        self.model.poisoned.add((name, key))
                        break
        return keys



async def _operator(app: httpx.AsyncClient, path: str, headers: dict[str, str], attempts: int = 5) -> None:
    """An operator's admin call to the function app (pause, resume), tried again as a person would when
    the connection drops or the app answers 5xx (its Storage calls run under the same load)."""
    for attempt in range(1, attempts + 1):
        try:
            response = await app.post(path, headers=headers)
        except httpx.TransportError:
            if attempt == attempts:
                raise
        else:
            if response.status_code < 500 or attempt == attempts:
                response.raise_for_status()
                return
        await asyncio.sleep(0.5 * attempt)
