"""One chaos run, start to finish, and its one-line verdict. `python -m tests.chaos.run --operations 20000`.

1. Start the system (tests/chaos/harness.py), seed F&O and copy it to Dataverse
   with a full reconcile pass, so every record starts with sync state.
2. Turn the faults on (tests/chaos/faults.py), install the worker crash hook,
   start a second function-app instance in a process of its own that is killed
   for real at random points and restarted (tests/chaos/worker_process.py),
   poison a few reward points on purpose, and play the operations
   (tests/chaos/generator.py) with storms, an outage and conflict windows.
3. Stop the load and the second instance, let the queues drain, turn the
   faults off, run one full reconcile pass (its queued records are the
   "corrections"), drain again.
4. Judge, independently of the engine: both sides equal field by field and as
   the model computes (devkit/sim/model.py); the dead letters are exactly the
   poisoned records (which then replay once their currency exists); no record
   created more often than the operations explain; sync writes within the
   bound the operations allow (no ping-pong).

The output ends with exactly one line:
`chaos: <N> operations, <N> faults, writes fo <N> dataverse <N>, corrections <N>, max lag <N> s,
lost <N>, duplicates <N>, converged: yes|no` (one line; wrapped here).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from devkit.sim.model import Model, Verdict, compare, dv_values, fo_values, key_spec
from loyaltysync import worker
from loyaltysync.events.model import ChangeEvent
from loyaltysync.mapping import parse_datetime
from loyaltysync.reconcile import reconcile_full
from loyaltysync.runtime import Runtime, get_runtime
from loyaltysync.sync import Outcome
from loyaltysync.templates import Side, other_side
from tests.chaos import faults
from tests.chaos.generator import CONFLICT_ORDERS, DEFAULT_CONFLICTS, POISON_CURRENCY, Generator
from tests.chaos.harness import Admin, chaos_stack, settle
from tests.chaos.worker_process import DEFAULT_KILL_RATE, SecondInstance, instance_env

REDUCED = 2000
FULL = 20_000
DEFAULT_SEED = 7  # the seed `make test` plays; `make chaos` picks a random one unless SEED= is given
POISON_CURRENCY_ID = "ce1a0000-0000-4000-8000-000000000963"
QUIET_LOGGERS = ("loyaltysync", "azure", "uvicorn", "httpx")
CRASH_POINTS = faults.CRASH_POINTS


@dataclass
class ChaosReport:
    """The numbers of the summary line, and what went wrong when it did."""

    operations: int = 0
    faults: int = 0
    writes_fo: int = 0
    writes_dataverse: int = 0
    corrections: int = 0
    max_lag_s: float = 0.0
    lost: int = 0
    duplicates: int = 0
    converged: bool = False
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"chaos: {self.operations} operations, {self.faults} faults, writes fo {self.writes_fo} "
            f"dataverse {self.writes_dataverse}, corrections {self.corrections}, "
            f"max lag {math.ceil(self.max_lag_s)} s, lost {self.lost}, duplicates {self.duplicates}, "
            f"converged: {'yes' if self.converged else 'no'}"
        )


class LagWatch:
    """The longest time from a change at its source to the worker having applied it (live events only).

    Also keeps what the worker did per record, to explain a failed run (never to judge it).
    """

    def __init__(self) -> None:
        self.max_s = 0.0
        self.applied = 0
        self.trail: dict[str, list[str]] = {}
        self.drain_started: float | None = None  # from then on, what the drain processed is tallied
        self.drained: Counter[str] = Counter()
        self.drain_last_s = 0.0
        self.drain_tail: list[str] = []

    def __call__(self, event: ChangeEvent, outcome: Outcome | None, parked: str | None) -> None:
        key = outcome.key if outcome is not None else event.key_text
        what = parked if outcome is None else (
            f"{outcome.reason} writes={outcome.writes} created={outcome.created} deleted={outcome.deleted} "
            f"conflicts={outcome.conflicts}"
        )
        if self.drain_started is not None:
            self.drained[f"{event.wire_format} {outcome.reason if outcome else 'parked'}"] += 1
            self.drain_last_s = time.monotonic() - self.drain_started
            since = parse_datetime(event.modified_on or event.received_at)
            age = f"{time.time() - since.timestamp():.0f} s after its time" if since is not None else "?"
            self.drain_tail = [*self.drain_tail[-4:], f"{self.drain_last_s:.0f} s: {event.wire_format} {age}"]
        self.trail.setdefault(f"{event.template} {key}", []).append(
            f"{time.time():.2f} {event.side} {event.operation} {event.wire_format} v={event.source_version} "
            f"t={event.modified_on}: {what}"
        )
        if outcome is None or not outcome.applied or event.wire_format in ("reconcile", "replay"):
            return
        self.applied += 1
        since = parse_datetime(event.modified_on or event.received_at)
        if since is not None:
            self.max_s = max(self.max_s, time.time() - since.timestamp())


@contextlib.contextmanager
def quiet_logs(watch: logging.Handler) -> Iterator[None]:
    """Keep the expected flood (retries, crashes) out of the output; `watch` still sees ERROR records."""
    saved = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    host = logging.getLogger("devkit.devhost")
    host.addHandler(watch)
    propagate, host.propagate = host.propagate, False
    try:
        yield
    finally:
        host.propagate = propagate
        host.removeHandler(watch)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def seed_sizes(operations: int) -> dict[str, int]:
    cards = max(30, min(300, operations // 40))
    return {"loyalty-cards": cards, "loyalty-levels": cards // 2, "loyalty-reward-points": cards // 2}


async def run_chaos(
    operations: int = REDUCED,
    *,
    seed: int = DEFAULT_SEED,
    actors: int = 12,
    crash_points: frozenset[str] = CRASH_POINTS,
    conflict_orders: tuple[str, ...] = DEFAULT_CONFLICTS,
    kill_rate: float = DEFAULT_KILL_RATE,
    say: Callable[[str], None] = print,
) -> ChaosReport:
    """Play `operations` operations under faults and judge the end state (see the module docstring).

    `kill_rate` is the second instance's kill probability per invocation; 0 runs no second instance.
    """
    report = ChaosReport()
    rng = random.Random(seed)
    watch = faults.FailureWatch()
    second: SecondInstance | None = None
    with quiet_logs(watch):
        async with chaos_stack(seed=seed) as stack:
            runtime = await get_runtime()
            admin = Admin(stack)
            model = Model(stack.templates)
            generator = Generator(stack, runtime, admin, model, rng, operations, conflict_orders=conflict_orders)
            crashes = faults.Crashes(random.Random(seed + 1), points=crash_points)
            if kill_rate > 0:
                second = SecondInstance(
                    instance_env(os.environ, CHAOS_KILL_RATE=str(kill_rate),
                                 CHAOS_KILL_POINTS=",".join(sorted(crash_points)), CHAOS_KILL_SEED=str(seed + 2)),
                    Path(tempfile.mkstemp(prefix="chaos-second-instance-", suffix=".log")[1]),
                )
            lag = LagWatch()
            # As the Admin clients: idle connections dropped before the dev host's server closes them (5 s).
            app = httpx.AsyncClient(base_url=stack.function_url, timeout=30, limits=httpx.Limits(keepalive_expiry=2))
            try:
                await _initial_copy(runtime, admin, generator, operations, say)
                before = await admin.counters()
                await _load(generator, crashes, second, lag, app, operations, actors, say)
                started = lag.drain_started = time.monotonic()
                await settle(runtime, admin, seconds=600)
                await faults.quiet(admin)
                crashes.uninstall()
                await settle(runtime, admin, seconds=120)
                drained = time.monotonic()
                for template in runtime.templates.values():
                    report.corrections += (await reconcile_full(runtime, template, fix=True)).queued
                await settle(runtime, admin, seconds=300)
                say(f"drained the backlog in {drained - started:.0f} s (the last step {lag.drain_last_s:.0f} s in: "
                    f"{', '.join(f'{n} {what}' for what, n in lag.drained.most_common())}); reconcile pass and its "
                    f"corrections {time.monotonic() - drained:.0f} s; the drain's last steps: "
                    f"{'; '.join(lag.drain_tail)}")
                await _judge(runtime, admin, app, generator, model, report, say)
                after = await admin.counters()
            finally:
                crashes.uninstall()
                if second is not None:
                    await second.stop()
                if lag in worker.OBSERVERS:
                    worker.OBSERVERS.remove(lag)
                await app.aclose()
                await generator.aclose()
                await admin.aclose()
    report.operations = model.operations - generator.seeded
    kills = second.kills if second is not None else 0
    report.faults = crashes.total + kills + sum(
        after[side][name] - before[side][name]
        for side in ("fo", "dataverse")
        for name in ("errors_injected", "deliveries_dropped", "deliveries_duplicated")
    )
    report.writes_fo = after["fo"]["writes"] - before["fo"]["writes"] - generator.tally.writes["fo"]
    report.writes_dataverse = (
        after["dataverse"]["writes"] - before["dataverse"]["writes"] - generator.tally.writes["dataverse"]
    )
    bound = generator.tally.write_bound + 2 * report.corrections
    if report.writes_fo + report.writes_dataverse > bound:
        report.problems.append(
            f"sync wrote {report.writes_fo + report.writes_dataverse} times; the operations explain at most {bound}"
        )
    report.max_lag_s = lag.max_s
    if watch.unexpected:
        report.problems += [f"unexpected failure: {u}" for u in watch.unexpected[:10]]
    if second is not None:
        report.problems += [f"unexpected failure in the second instance: {u}" for u in second.unexpected()[:10]]
        if second.bad_exits():
            report.problems.append(f"the second instance exited by itself with {second.bad_exits()}")
    report.converged = not report.problems and report.lost == 0 and report.duplicates == 0
    report.notes.append(
        f"crashes {dict(crashes.counts)}; process kills {kills}"
        + (f" {dict(second.kill_points())} in {second.starts} starts, settles refused for a lost lease "
           f"{second.stale_receipts()}" if second is not None else "")
        + f"; storms and outages: {'; '.join(generator.played) or 'none'}; "
        f"conflicts played {generator.tally.conflicts}; operations refused by faults {generator.tally.failed}"
    )
    if second is not None and not report.converged:
        report.notes.append(f"the second instance's log: {second.log_path}")
    elif second is not None:
        second.log_path.unlink(missing_ok=True)
    for line in report.notes + report.problems[:30]:
        say(line)
    for record in _problem_records(report.problems)[:8]:
        name, key = record.split(" ", 1)
        say(f"  {record}: operations " + "; ".join(
            f"{op.ended:.2f} {op.side} {op.kind} {op.values}" for op in model.ops(name, key)))
        steps = lag.trail.get(record, []) + (second.trail(record) if second is not None else [])
        for step in sorted(steps)[-40:]:  # each starts with its time
            say(f"    worker {step}")
    say(report.line())
    return report


def _problem_records(problems: list[str]) -> list[str]:
    found: list[str] = []
    for line in problems:
        words = line.split(":")[0].split(" ")
        at = next((i for i, word in enumerate(words[:-1]) if word.startswith("loyalty-")), None)
        if at is not None:  # "<template> <key>: ..." or "unexpected dead letter <template> <key>: ..."
            record = f"{words[at]} {words[at + 1]}"
            if record not in found:
                found.append(record)
    return found


async def _initial_copy(
    runtime: Runtime, admin: Admin, generator: Generator, operations: int, say: Callable[[str], None]
) -> None:
    started = time.monotonic()
    await generator.seed(seed_sizes(operations))
    for template in runtime.templates.values():
        await reconcile_full(runtime, template, fix=True)
    await settle(runtime, admin, seconds=600)
    say(f"seeded {generator.seeded} records and copied them to Dataverse in {time.monotonic() - started:.0f} s")


async def _load(
    generator: Generator,
    crashes: faults.Crashes,
    second: SecondInstance | None,
    lag: LagWatch,
    app: httpx.AsyncClient,
    operations: int,
    actors: int,
    say: Callable[[str], None],
) -> None:
    started = time.monotonic()
    await faults.background(generator.admin)
    crashes.install()
    if second is not None:
        second.start()
    worker.OBSERVERS.append(lag)
    poisoned = await generator.poison(3 if operations < 10_000 else 10)
    schedule = faults.Schedule.for_operations(operations)
    side_tasks = [
        asyncio.create_task(generator.conflicts(app, generator.stack.admin_key)),
        asyncio.create_task(schedule.run(generator.admin, generator.progress, generator.stop)),
        asyncio.create_task(_progress(generator, started, say)),
    ]
    for task in side_tasks:  # one that fails stops the load (its error ends the run) instead of stalling it
        task.add_done_callback(lambda done: generator.stop.set() if not done.cancelled() and done.exception() else None)
    try:
        await asyncio.gather(*(generator.actor() for _ in range(actors)))
    finally:
        generator.stop.set()
        await asyncio.gather(*side_tasks)
        if second is not None:  # the surviving instance reaches the judged end state alone
            await second.stop()
    generator.played = schedule.played
    say(
        f"played {generator.model.operations - generator.seeded} operations in {time.monotonic() - started:.0f} s "
        f"({len(poisoned)} poisoned on purpose)"
    )


async def _progress(generator: Generator, started: float, say: Callable[[str], None]) -> None:
    """A line at every tenth of the run, so a long run shows it is alive."""
    reported = 0
    while not generator.stop.is_set():
        tenth = int(generator.progress() * 10)
        if tenth > reported:
            reported = tenth
            say(f"  {tenth * 10}%: {generator.model.operations - generator.seeded} operations in "
                f"{time.monotonic() - started:.0f} s, {generator.tally.failed} refused by faults")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(generator.stop.wait(), timeout=1.0)


async def _rows(generator: Generator, template: str) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    t = generator.templates[template]
    specs = generator.model.specs[template]
    ks = key_spec(t)
    currencies = {row_id: code for code, row_id in generator.currency_ids.items()}
    fo_rows: dict[str, dict[str, Any]] = {}
    async for page in generator.fo.query(t.fo.entity_set, select=[s.fo for s in specs]):
        for row in page:
            fo_rows[str(row[ks.fo])] = fo_values(specs, row)
    dv_rows: dict[str, dict[str, Any]] = {}
    columns = [s.dataverse if s.lookup_entity_set is None else f"_{s.dataverse}_value" for s in specs]
    async for page in generator.dv.query(t.dataverse.entity_set, select=columns):
        for row in page:
            dv_rows[str(row[ks.dataverse])] = dv_values(specs, row, currencies)
    return fo_rows, dv_rows


async def _judge(
    runtime: Runtime,
    admin: Admin,
    app: httpx.AsyncClient,
    generator: Generator,
    model: Model,
    report: ChaosReport,
    say: Callable[[str], None],
) -> None:
    poisoned = sorted(model.poisoned)
    verdict = Verdict()
    for name in generator.templates:
        fo_rows, dv_rows = await _rows(generator, name)
        compare(model, name, fo_rows, dv_rows, verdict, skip=[k for t, k in poisoned if t == name])

    letters = await runtime.dead_letters.list()
    parked = {(d.template, d.key) for d in letters}
    if parked != set(poisoned):
        report.problems.append(f"dead letters {sorted(parked)} are not exactly the poisoned records {poisoned}")
        report.problems += [f"unexpected dead letter {d.template} {d.key}: {d.reason}"
                            for d in letters if (d.template, d.key) not in model.poisoned]
    for letter in letters:
        if (letter.template, letter.key) in model.poisoned and POISON_CURRENCY not in letter.reason:
            report.problems.append(f"dead letter {letter.key} does not name the unknown currency: {letter.reason}")

    # Fix the cause and replay through the admin function: the poisoned records must then sync too.
    generator.currency_ids[POISON_CURRENCY] = POISON_CURRENCY_ID
    row = {"transactioncurrencyid": POISON_CURRENCY_ID, "isocurrencycode": POISON_CURRENCY,
           "currencyname": "Testing code", "currencysymbol": "T", "exchangerate": 1.0, "currencyprecision": 2}
    await admin.post("dataverse", "/_admin/tables/transactioncurrencies/rows", {"rows": [row]})
    response = await app.post("/api/ops/replay", headers={"x-functions-key": generator.stack.admin_key})
    response.raise_for_status()
    await settle(runtime, admin, seconds=120)
    if poisoned:
        name = poisoned[0][0]
        fo_rows, dv_rows = await _rows(generator, name)
        keys = {k for _, k in poisoned}
        compare(model, name, {k: v for k, v in fo_rows.items() if k in keys},
                {k: v for k, v in dv_rows.items() if k in keys}, verdict,
                skip=set(model.keys(name)) - keys)
    remaining = await runtime.dead_letters.count()
    if remaining:
        report.problems.append(f"{remaining} dead letters left after the replay")

    tallies = await admin.creates()
    duplicates = []
    for name, t in generator.templates.items():
        for key in model.keys(name):
            pairs: tuple[tuple[Side, str], ...] = (("fo", t.fo.entity_set), ("dataverse", t.dataverse.entity_set))
            for side, entity_set in pairs:
                other = other_side(side)
                seen = tallies[side].get(f"{entity_set}|{key}", 0)
                # Seeding went through /_admin, which the emulator's tally does not count.
                by_people = model.creates(name, key, side) - (1 if side == "fo" and (name, key) in model.seeded else 0)
                by_engine = seen - by_people
                allowed = model.creates(name, key, other)
                if by_engine > allowed:
                    duplicates.append(f"{name} {key}: created in {side} {by_engine} times by the sync, "
                                      f"{allowed} create(s) in {other} explain it")
    report.duplicates = len(duplicates) + len(verdict.extra)
    report.lost = len({line.split(":")[0].split(" in ")[0] for line in verdict.lost})
    report.problems += verdict.unequal[:10] + verdict.lost[:10] + verdict.extra[:10] + duplicates[:10]
    say(f"judged {verdict.records} records across {len(generator.templates)} templates, replayed the poisoned ones")


def parse_options(crash_points: str | None, conflicts: str | None) -> tuple[frozenset[str], tuple[str, ...]]:
    """`--crash-points` and `--conflicts` (or CHAOS_CRASH_POINTS / CHAOS_CONFLICTS); None means the default."""
    points = CRASH_POINTS
    if crash_points is not None:
        points = frozenset(p.strip() for p in crash_points.split(",") if p.strip())
    if points - CRASH_POINTS:
        raise ValueError(f"unknown crash points {sorted(points - CRASH_POINTS)}; known: {sorted(CRASH_POINTS)}")
    orders = DEFAULT_CONFLICTS if conflicts is None else tuple(o.strip() for o in conflicts.split(",") if o.strip())
    if set(orders) - set(CONFLICT_ORDERS):
        raise ValueError(f"conflicts take {', '.join(CONFLICT_ORDERS)}")
    return points, orders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Chaos run: convergence under faults.")
    parser.add_argument("--operations", type=int, default=FULL)
    parser.add_argument("--seed", type=int, default=None, help="default: a random one, printed for a replay")
    parser.add_argument("--actors", type=int, default=12)
    parser.add_argument(
        "--kill-rate",
        type=float,
        default=DEFAULT_KILL_RATE,
        help="probability per invocation that the second instance's process is killed (0: no second instance)",
    )
    parser.add_argument(
        "--conflicts",
        default=",".join(DEFAULT_CONFLICTS),
        help="which same-field conflicts to play on purpose, comma-separated: dataverse-later, fo-later",
    )
    parser.add_argument(
        "--crash-points",
        default=",".join(sorted(CRASH_POINTS)),
        help=f"where the worker may be crashed, comma-separated, from: {', '.join(sorted(CRASH_POINTS))}",
    )
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 1_000_000)
    print(f"chaos: seed {args.seed} (replay: .venv/bin/python -m tests.chaos.run --operations {args.operations} "
          f"--seed {args.seed} --kill-rate {args.kill_rate})", flush=True)
    try:
        points, orders = parse_options(args.crash_points, args.conflicts)
    except ValueError as exc:
        parser.error(str(exc))
    report = asyncio.run(
        run_chaos(
            args.operations, seed=args.seed, actors=args.actors, crash_points=points, conflict_orders=orders,
            kill_rate=args.kill_rate,
        )
    )
    return 0 if report.converged else 1


if __name__ == "__main__":
    sys.exit(main())
