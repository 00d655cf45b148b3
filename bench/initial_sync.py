"""Benchmark 3: initial sync of loyalty cards F&O -> Dataverse against the emulators' service protection.

The emulators run in a child process (their own CPU) with Dataverse's documented default
service-protection limits per user and web server (6000 requests / 1,200,000 ms of
execution / 52 concurrent per 300 s, execution charged by the emulator's cost model) and a
fixed per-request latency. Three measurements in the same run:

- ours, fresh window: the whole `initial_sync` pipeline (page reads, mapping, UpsertMultiple
  under the rate controller, state, checkpoints) on a Dataverse whose window is empty. With
  the default cost model N cards cost about N x 12 ms of execution: 100,000 cards fit one
  window's budget, so this run is bounded by the emulator's speed, not by the budget.
- ours, budget-bound: the same copy run again at once (a re-run), on a window the first run
  filled: every row now has to wait for budget, as in any run longer than one window. This
  is the number compared with the ceiling, and the one the summary prints as "ours".
- naive: one PATCH upsert per record, sequentially, on a second Dataverse emulator with a
  fresh window (a sample of records: at ~20 rows/s the whole table would take hours).
- ceiling: the rows/s the budget allows over any window, from the limits and the cost model:
  min(requests x batch, execution budget / cost per row) per window.

The sync state goes to a stand-in that only counts (see docs/benchmarks.md: Azurite's table
emulation costs O(n) per insert within a partition, so at this size it would measure Azurite).

Run: .venv/bin/python bench/initial_sync.py [cards] [latency_ms] [naive_sample]
Prints details, then one line `RESULT {...}` for bench/run_all.py.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import emulators  # noqa: E402

from devkit.sandbox.dataverse import AGENT_USER, ServiceProtectionLimits  # noqa: E402
from loyaltysync import mapping  # noqa: E402
from loyaltysync.bulk import SyncOptions, controller_for, initial_sync  # noqa: E402
from loyaltysync.runtime import Runtime, build_runtime  # noqa: E402
from loyaltysync.settings import load_settings  # noqa: E402
from loyaltysync.state import MemoryControlStore, MemoryDeadLetterStore, SyncRecord  # noqa: E402
from loyaltysync.targets.auth import StaticTokenCredential  # noqa: E402
from loyaltysync.targets.dataverse import DataverseClient  # noqa: E402
from loyaltysync.templates import default_mappings_dir, load_templates  # noqa: E402

BATCH = 1000
PAGE = 5000


class CountingState:
    """A StateStore stand-in that keeps nothing: put_many counts, reads find nothing."""

    def __init__(self) -> None:
        self.stored = 0

    async def put_many(self, records: Sequence[SyncRecord]) -> int:
        self.stored += len(records)
        return len(records)

    async def get(self, template: str, key: str) -> SyncRecord | None:
        return None

    async def count(self, template: str) -> int:
        return self.stored

    async def list(self, template: str) -> AsyncIterator[SyncRecord]:
        for _ in ():
            yield _

    async def close(self) -> None:
        return None


def bench_runtime(fo_url: str, dataverse_url: str) -> Runtime:
    """The app's runtime against the emulators over loopback HTTP, with in-memory control and dead letters."""
    settings = load_settings(
        {
            "FNO_URL": fo_url,
            "DATAVERSE_URL": dataverse_url,
            "LOYALTYSYNC_SANDBOX_TOKEN": emulators.TOKEN,
            "AzureWebJobsStorage": "UseDevelopmentStorage=true",  # never contacted: stores replaced below
            "HTTP_TIMEOUT_SECONDS": "120",
        }
    )
    runtime = build_runtime(settings, load_templates(default_mappings_dir()))
    runtime.state = CountingState()  # type: ignore[assignment]
    runtime.control = MemoryControlStore()
    runtime.dead_letters = MemoryDeadLetterStore()
    return runtime


def ceiling(limits: ServiceProtectionLimits, batch: int, latency_ms: float) -> dict[str, float]:
    """Rows/s each service-protection limit allows in steady state, and the lowest of them."""
    per_request_ms = limits.costs.bulk_ms + limits.costs.bulk_record_ms * batch
    by_execution = limits.execution_ms / per_request_ms * batch / limits.window_s
    by_requests = limits.requests * batch / limits.window_s
    by_concurrency = limits.concurrent * batch / max(latency_ms / 1000, 1e-3)
    return {
        "execution": by_execution,
        "requests": by_requests,
        "concurrency": by_concurrency,
        "ceiling": min(by_execution, by_requests, by_concurrency),
    }


async def naive(fo_url: str, dataverse_url: str, sample: int) -> float:
    """One request per record, one at a time: read a page of cards, PATCH each to Dataverse by key."""
    runtime = bench_runtime(fo_url, dataverse_url)
    template = runtime.templates["loyalty-cards"]
    rows: list[dict[str, Any]] = []
    async for page in runtime.fno.query(
        template.fo.entity_set, select=mapping.fo_select(template), page_size=sample
    ):
        rows = page
        break
    client = DataverseClient(dataverse_url, StaticTokenCredential(emulators.TOKEN))
    started = time.perf_counter()
    for row in rows[:sample]:
        values = mapping.fo_to_canonical(template, row)
        key = mapping.natural_key(template, values)
        body = mapping.canonical_to_dataverse(template, values, runtime.engine.lookups, create=True)
        await client.upsert(template.dataverse.entity_set, mapping.dataverse_key(template, key), body)
    elapsed = time.perf_counter() - started
    await client.aclose()
    await runtime.aclose()
    return len(rows[:sample]) / elapsed


async def count_rows(dataverse_url: str) -> int:
    """The cards in Dataverse, read as another user (budgets are per user: the sync's is spent)."""
    client = DataverseClient(dataverse_url, StaticTokenCredential(emulators.TOKEN)).as_caller(
        AGENT_USER.azureactivedirectoryobjectid
    )
    total = 0
    async for page in client.query("msdyn_loyaltycards", select=["msdyn_loyaltycardid"]):
        total += len(page)
    await client.http.aclose()
    return total


async def run(cards: int, latency_ms: float, sample: int) -> dict[str, Any]:
    limits = ServiceProtectionLimits()
    with emulators.running(cards, dataverse=2, latency_ms=latency_ms) as urls:
        runtime = bench_runtime(urls["fo"], urls["dataverse"][0])
        template = runtime.templates["loyalty-cards"]
        controller = controller_for(runtime, "fo-to-dataverse")
        options = SyncOptions(page_size=PAGE, batch_size=BATCH)
        fresh = await initial_sync(runtime, template, "fo-to-dataverse", options, controller=controller)
        print(f"fresh window : {fresh.summary()}", flush=True)
        bound = await initial_sync(runtime, template, "fo-to-dataverse", options, controller=controller)
        print(f"budget-bound : {bound.summary()}", flush=True)
        print(f"controller   : {controller.describe()}", flush=True)
        copied = await count_rows(urls["dataverse"][0])
        await runtime.aclose()
        naive_rate = await naive(urls["fo"], urls["dataverse"][1], sample)
        print(f"naive        : {sample} records one PATCH at a time: {naive_rate:,.1f} rows/s", flush=True)
    limit = ceiling(limits, BATCH, latency_ms)
    print(
        f"ceiling      : {limit['ceiling']:,.0f} rows/s (execution budget {limit['execution']:,.0f}, "
        f"request budget {limit['requests']:,.0f}, concurrency {limit['concurrency']:,.0f})"
    )
    if copied != cards or fresh.failed or bound.failed or not (fresh.complete and bound.complete):
        raise SystemExit(f"the copy is incomplete: {copied} of {cards} rows in Dataverse")
    requests = fresh.requests + bound.requests
    throttled = fresh.throttled + bound.throttled
    return {
        "cards": cards,
        "latency_ms": latency_ms,
        "fresh_rows_per_s": fresh.rows_per_second,
        "ours_rows_per_s": bound.rows_per_second,
        "naive_rows_per_s": naive_rate,
        "ceiling_rows_per_s": limit["ceiling"],
        "requests": requests,
        "throttled": throttled,
        "throttled_share": throttled / requests if requests else 0.0,
    }


def main() -> None:
    args = [float(a.replace("_", "")) for a in sys.argv[1:4]]
    cards, latency_ms, sample = (args + [100_000, 50, 500][len(args) :])[:3]
    result = asyncio.run(run(int(cards), latency_ms, int(sample)))
    print(
        f"initial-sync: ours {result['ours_rows_per_s']:,.0f} rows/s (fresh window {result['fresh_rows_per_s']:,.0f}), "
        f"naive {result['naive_rows_per_s']:,.1f} rows/s, ceiling {result['ceiling_rows_per_s']:,.0f} rows/s, "
        f"throttled {result['throttled']} of {result['requests']} requests"
    )
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
