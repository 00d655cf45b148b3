"""Benchmark 2: the live pipeline end to end: F&O change -> data event -> function app -> queue -> worker -> Dataverse.

Runs the whole system as `make demo` does (`devkit.stack.running_stack`: Azurite, both
emulators, the dev host serving function_app.py, webhooks and event subscriptions registered),
with a fixed latency on every emulator API request. The emulators run in a child process
(`emulators_in_child`) and the F&O changes are made by another (`drive`): in production
neither F&O, Dataverse nor their users share the function app's CPU, so this process holds
only what is measured, the dev host and the function app (Azurite is a Node process of its
own). The same cards are seeded on both sides and the sync state says they agree (as after
an initial sync), then:

1. latency at a steady rate: `rate` events/s offered for `seconds`: cards are changed in F&O
   through OData at rate / 2 changes/s (each change brings two events, see below); for each
   change the worker observer (`loyaltysync.worker.OBSERVERS`) gives the time from webhook
   receipt (`ChangeEvent.received_at`, stamped by the inbound function) to the moment the
   worker has the Dataverse write acknowledged (and the state stored);
2. throughput: a burst of changes as fast as the F&O emulator takes them; events/s is the
   rate at which the worker applies them (first change to last write), with the CPU time this
   process spent per handled event (what bounds the rate on one core).

Each F&O change also comes back as a Dataverse webhook of our own write (an echo the worker
resolves to no-change): the pipeline carries two events per change, as it does in production.

Also measured first: the latency at 5 changes/s (what a change costs without queueing). Before
anything is measured, 10 changes warm the process up (connections, queues, the start-up check).

Run: .venv/bin/python bench/live_pipeline.py [latency_ms] [events/s] [seconds] [burst]
     (defaults 20 ms, 50 changes/s, 10 s, 500 changes). Prints `RESULT {...}` last.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devkit.stack import Stack, running_stack, settle  # noqa: E402
from loyaltysync import worker  # noqa: E402
from loyaltysync.bulk.prepare import prepare_page  # noqa: E402
from loyaltysync.events.model import ChangeEvent  # noqa: E402
from loyaltysync.mapping import parse_datetime  # noqa: E402
from loyaltysync.runtime import get_runtime  # noqa: E402
from loyaltysync.sync import Outcome  # noqa: E402
from loyaltysync.targets.auth import StaticTokenCredential  # noqa: E402
from loyaltysync.targets.fno import FnoClient  # noqa: E402

CARDS = "RetailLoyaltyCards"
EVENTS_PER_CHANGE = 2
UNLOADED_RATE = 5.0  # changes/s well within what one worker process handles: latency without queueing
WARM_UP = 10  # changes made and settled before anything is measured


class Applied:
    """Worker observer: when each F&O change reached Dataverse, and how long after webhook receipt."""

    def __init__(self) -> None:
        self.latencies_ms: dict[str, float] = {}
        self.applied_at: dict[str, float] = {}
        self.handled: list[float] = []  # when the worker finished each event, either side, any outcome
        self.changed = asyncio.Event()

    def __call__(self, event: ChangeEvent, outcome: Outcome | None, parked: str | None) -> None:
        self.handled.append(time.time())
        if event.side != "fo" or outcome is None or "dataverse" not in outcome.writes:
            return
        received = parse_datetime(event.received_at)
        now = time.time()
        if received is not None:
            self.latencies_ms[outcome.key] = (now - received.timestamp()) * 1000
            self.applied_at[outcome.key] = now
            self.changed.set()


def card(i: int, party: str) -> dict[str, Any]:
    return {
        "CardNumber": f"L-{i:06d}",
        "CardTenderType": "AsCardTender",
        "PartyNumber": party,
        "OmOperatingUnitNumber": "S0001",
        "LoyaltyEnrollmentDate": "2026-01-15T00:00:00Z",
    }


async def wait_for(applied: Applied, keys: list[str], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while any(k not in applied.latencies_ms for k in keys) and time.monotonic() < deadline:
        applied.changed.clear()
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await applied.changed.wait()
        except TimeoutError:
            break
    missing = [k for k in keys if k not in applied.latencies_ms]
    if missing:
        raise SystemExit(f"{len(missing)} changes never reached Dataverse (first: {missing[0]})")


async def prepare(stack: Stack, count: int, latency_ms: float) -> None:
    """Both sides hold the same cards and the state says they agree (seeded directly: no events)."""
    runtime = await get_runtime()
    template = runtime.templates["loyalty-cards"]
    rows = [card(i, "seed") for i in range(count)]
    prepared = await prepare_page(template, rows, "fo", runtime.engine.lookups)
    async with stack.admin(stack.fo) as admin:
        (await admin.post(f"/_admin/entities/{CARDS}/rows", json={"rows": rows})).raise_for_status()
    async with stack.admin(stack.dataverse) as admin:
        bodies = [item.body for item in prepared.items]
        (await admin.post("/_admin/tables/msdyn_loyaltycards/rows", json={"rows": bodies})).raise_for_status()
    await runtime.state.put_many([item.state(template.name) for item in prepared.items])
    print(f"seeded {len(prepared.items)} cards on both sides, state agreed", flush=True)
    for server in (stack.fo, stack.dataverse):
        async with stack.admin(server) as admin:
            (await admin.patch("/_admin/faults", json={"latency_ms": latency_ms})).raise_for_status()


async def make_changes(url: str, token: str, first: int, count: int, rate: float | None) -> dict[str, float]:
    """Change cards `first`.. in F&O through OData: `rate` per second, or all at once (None).

    Returns when each change was sent (time.time(), by key). Runs in the driver process.
    """
    fo = FnoClient(url, StaticTokenCredential(token), max_concurrency=64 if rate else 32)
    started = time.monotonic()
    changed_at: dict[str, float] = {}

    async def change(i: int) -> None:
        if rate:
            await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
        key = f"L-{first + i:06d}"
        changed_at[key] = time.time()
        await fo.update(CARDS, {"CardNumber": key}, {"PartyNumber": f"steady-{i}" if rate else "burst"})

    await asyncio.gather(*(change(i) for i in range(count)))
    await fo.aclose()
    return changed_at


async def drive(stack: Stack, first: int, count: int, rate: float | None) -> dict[str, float]:
    """`make_changes` in a child process: the load generator must not take the pipeline's CPU
    (in production F&O users make the changes, on other machines)."""
    config = {"url": stack.fo.url, "token": stack.token, "first": first, "count": count, "rate": rate}
    script = str(ROOT / "bench" / "live_pipeline.py")
    child = await asyncio.create_subprocess_exec(
        sys.executable, script, "--drive", json.dumps(config), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await child.communicate()
    if child.returncode != 0:
        raise SystemExit(f"the change driver failed (exit {child.returncode})")
    changed_at: dict[str, float] = json.loads(out)
    return changed_at


async def steady(
    stack: Stack, applied: Applied, first: int, rate: float, seconds: float
) -> tuple[list[float], list[float], float]:
    """Change `rate` cards per second for `seconds`. Returns the latencies from webhook receipt to write
    acknowledged, the latencies from the F&O change itself (event delivery included), and the rate at
    which the changes were applied."""
    total = int(rate * seconds)
    changed_at = await drive(stack, first, total, rate)
    keys = [f"L-{first + i:06d}" for i in range(total)]
    await wait_for(applied, keys, 900)
    end_to_end = [(applied.applied_at[k] - changed_at[k]) * 1000 for k in keys]
    achieved = total / (max(applied.applied_at[k] for k in keys) - min(changed_at.values()))
    return [applied.latencies_ms[k] for k in keys], end_to_end, achieved


async def burst(stack: Stack, applied: Applied, first: int, count: int) -> tuple[float, float, float]:
    """(events handled per second, changes applied per second, CPU ms of this process per handled event)
    while a burst of changes drains. This process runs the dev host and the function app (inbound
    functions, workers, Storage and target clients); the emulators, Azurite and the driver run in others."""
    cpu_before, handled_before = time.process_time(), len(applied.handled)
    changed_at = await drive(stack, first, count, None)
    keys = [f"L-{i:06d}" for i in range(first, first + count)]
    started = min(changed_at.values())
    await wait_for(applied, keys, 900)
    cpu_ms = (time.process_time() - cpu_before) * 1000 / max(1, len(applied.handled) - handled_before)
    ended = max(applied.applied_at[k] for k in keys)
    events = sum(1 for at in applied.handled if started <= at <= ended)
    return events / (ended - started), count / (ended - started), cpu_ms


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


async def run(latency_ms: float, rate: float, seconds: float, burst_size: int) -> dict[str, Any]:
    logging.getLogger("loyaltysync").setLevel(logging.WARNING)
    # `rate` is events/s into the function app: every F&O change brings two (its F&O event, then the
    # Dataverse webhook of our own write, resolved as an echo), so half as many changes per second.
    change_rate = rate / EVENTS_PER_CHANGE
    steady_count = int(change_rate * seconds)
    unloaded_count = int(UNLOADED_RATE * seconds)
    measured = unloaded_count + steady_count + burst_size
    async with running_stack(seed=7, emulators_in_child=True) as stack:
        await prepare(stack, measured + WARM_UP, latency_ms)
        applied = Applied()
        worker.OBSERVERS.append(applied)
        try:
            # Not measured: the process's first changes open connections, create queues and run the
            # start-up preflight check, once per worker process.
            await steady(stack, applied, measured, UNLOADED_RATE, WARM_UP / UNLOADED_RATE)
            await settle(stack, seconds=600)
            unloaded, unloaded_e2e, _ = await steady(stack, applied, 0, UNLOADED_RATE, seconds)
            await settle(stack, seconds=600)
            latencies, end_to_end, achieved = await steady(stack, applied, unloaded_count, change_rate, seconds)
            await settle(stack, seconds=600)
            throughput, changes, cpu_ms = await burst(stack, applied, unloaded_count + steady_count, burst_size)
        finally:
            worker.OBSERVERS.remove(applied)
    print(
        f"unloaded {UNLOADED_RATE:g} changes/s for {seconds:g} s: receipt to write p50 "
        f"{statistics.median(unloaded):.0f} ms, p99 {percentile(unloaded, 0.99):.0f} ms; change to write p50 "
        f"{statistics.median(unloaded_e2e):.0f} ms, p99 {percentile(unloaded_e2e, 0.99):.0f} ms",
        flush=True,
    )
    result = {
        "latency_ms": latency_ms,
        "rate": rate,
        "changes": len(latencies),
        "p50_ms": statistics.median(latencies),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": max(latencies),
        "events_per_s": throughput,
        "changes_per_s": changes,
        "steady_applied_per_s": achieved,
        "e2e_p50_ms": statistics.median(end_to_end),
        "e2e_p99_ms": percentile(end_to_end, 0.99),
        "unloaded_p50_ms": statistics.median(unloaded),
        "unloaded_p99_ms": percentile(unloaded, 0.99),
        "app_cpu_ms_per_event": cpu_ms,
    }
    print(
        f"steady {rate:g} events/s offered ({change_rate:g} changes/s and the echoes of our writes) for {seconds:g} s "
        f"({achieved:.1f} changes/s applied): receipt to write p50 "
        f"{result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms, max {result['max_ms']:.0f} ms; change to write "
        f"p50 {result['e2e_p50_ms']:.0f} ms, p99 {result['e2e_p99_ms']:.0f} ms "
        f"(emulator latency {latency_ms:g} ms per request)",
        flush=True,
    )
    print(
        f"burst of {burst_size} changes: {throughput:,.1f} events/s handled (F&O changes and the echoes of "
        f"our Dataverse writes), {changes:,.1f} changes/s applied; {cpu_ms:.1f} ms CPU per event in the "
        "function app's process",
        flush=True,
    )
    return result


def main() -> None:
    if sys.argv[1:2] == ["--drive"]:  # the change driver (see `drive`)
        config = json.loads(sys.argv[2])
        changed_at = asyncio.run(
            make_changes(config["url"], config["token"], config["first"], config["count"], config["rate"])
        )
        print(json.dumps(changed_at), flush=True)
        return
    args = [float(a) for a in sys.argv[1:5]]
    latency_ms, rate, seconds, burst_size = (args + [20, 50, 10, 500][len(args) :])[:4]
    result = asyncio.run(run(latency_ms, rate, seconds, int(burst_size)))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
