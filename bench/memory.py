"""Benchmark 4: peak memory (RSS) of an initial sync of 100,000 and of 1,000,000 cards.

Each size runs in its own process (`--child`), so its peak RSS is the sync's alone; the
emulators run in another process (bench/emulators.py) and hold the tables. What must hold:
memory flat in the record count (pages stream through a bounded pipeline) and under 250 MB.
Service protection is off for this one (`--unlimited`): a million rows at the default budget
take 50 minutes by design, and pacing does not change what is held in memory; the state goes
to the counting stand-in of bench/initial_sync.py.

Run: .venv/bin/python bench/memory.py [small] [large]    (defaults 100000 1000000)
Prints details, then one line `RESULT {...}` for bench/run_all.py.
"""

from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import emulators  # noqa: E402


async def child(fo_url: str, dataverse_url: str) -> dict[str, Any]:
    """Run one initial sync in this process; report its counts and this process's peak RSS."""
    from initial_sync import bench_runtime

    from loyaltysync.bulk import SyncOptions, initial_sync

    runtime = bench_runtime(fo_url, dataverse_url)
    template = runtime.templates["loyalty-cards"]
    report = await initial_sync(runtime, template, "fo-to-dataverse", SyncOptions())
    await runtime.aclose()
    if not report.complete or report.failed:
        raise SystemExit(f"incomplete: {report.summary()}")
    # ru_maxrss is in KiB on Linux.
    return {
        "rows": report.read,
        "seconds": report.seconds,
        "rows_per_s": report.rows_per_second,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def measure(cards: int) -> dict[str, Any]:
    with emulators.running(cards, dataverse=1, unlimited=True) as urls:
        command = [sys.executable, str(Path(__file__)), "--child", urls["fo"], urls["dataverse"][0]]
        done = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
    lines = [line for line in done.stdout.splitlines() if line.startswith("CHILD ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"the {cards:,}-card run failed:\n{done.stdout}\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("CHILD "))
    print(
        f"{result['rows']:>9,} cards: peak RSS {result['peak_rss_mb']:,.0f} MB, "
        f"{result['seconds']:.0f} s ({result['rows_per_s']:,.0f} rows/s)",
        flush=True,
    )
    return result


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        print("CHILD " + json.dumps(asyncio.run(child(sys.argv[2], sys.argv[3]))), flush=True)
        return
    sizes = [int(a.replace("_", "")) for a in sys.argv[1:3]]
    small, large = (sizes + [100_000, 1_000_000][len(sizes) :])[:2]
    results = {"small": measure(small), "large": measure(large)}
    print(
        f"memory: peak RSS {results['small']['peak_rss_mb']:.0f} MB at {small} records, "
        f"{results['large']['peak_rss_mb']:.0f} MB at {large} records"
    )
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
