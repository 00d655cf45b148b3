"""`make bench`: every benchmark in turn, each in its own process, then the five summary lines.

1. core path (bench/core_path.py): µs per event for parse + map + decide, no I/O;
2. live pipeline (bench/live_pipeline.py): the whole system at a steady rate, then a burst;
3. initial sync (bench/initial_sync.py): ours vs a naive client vs the budget's ceiling;
4. memory (bench/memory.py): peak RSS of the initial sync at two sizes.

The details of each run are printed as they come; the run ends with exactly these lines, so
results can be compared run to run:

    core path: <N> µs per event
    live: <N> events/s, p50 <N> ms, p99 <N> ms (emulator latency <N> ms)
    initial-sync: ours <N> rows/s, naive <N> rows/s, ceiling <N> rows/s
    initial-sync: ours/naive = <X>, ours/ceiling = <Y>, throttled = <Z>%
    memory: peak RSS <N> MB at 100000 records, <N> MB at 1000000 records

Run: .venv/bin/python bench/run_all.py [--quick]   (--quick: smaller sizes, for a smoke test)
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
FULL = {
    "live": ["20", "50", "10", "500"],  # emulator latency ms, events/s offered, seconds, burst
    "initial": ["100000", "50", "500"],  # cards, emulator latency ms, naive sample
    "memory": ["100000", "1000000"],
}
QUICK = {"live": ["20", "20", "5", "200"], "initial": ["20000", "50", "100"], "memory": ["20000", "100000"]}


def run(script: str, args: list[str]) -> list[str]:
    """Run one benchmark, echoing its output; returns its lines."""
    print(f"\n=== {script} {' '.join(args)}", flush=True)
    child = subprocess.Popen(  # noqa: S603 - our own scripts with our own arguments
        [sys.executable, str(BENCH / script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert child.stdout is not None
    lines = []
    for line in child.stdout:
        lines.append(line.rstrip("\n"))
        if not line.startswith("RESULT "):
            print(line, end="", flush=True)
    if child.wait() != 0:
        raise SystemExit(f"{script} failed (exit {child.returncode})")
    return lines


def result(lines: list[str]) -> dict[str, Any]:
    found = [line for line in lines if line.startswith("RESULT ")]
    if not found:
        raise SystemExit("a benchmark printed no RESULT line")
    value: dict[str, Any] = json.loads(found[-1].removeprefix("RESULT "))
    return value


def main() -> None:
    sizes = QUICK if "--quick" in sys.argv[1:] else FULL
    core_lines = run("core_path.py", [])
    core = next(
        float(m.group(1)) for line in core_lines if (m := re.match(r"core path: (\d+(?:\.\d+)?) µs per event", line))
    )
    live = result(run("live_pipeline.py", sizes["live"]))
    initial = result(run("initial_sync.py", sizes["initial"]))
    memory = result(run("memory.py", sizes["memory"]))

    print()
    print(f"core path: {core:.0f} µs per event")
    print(
        f"live: {live['events_per_s']:.0f} events/s, p50 {live['p50_ms']:.0f} ms, p99 {live['p99_ms']:.0f} ms "
        f"(emulator latency {live['latency_ms']:.0f} ms)"
    )
    ours, naive, ceiling = initial["ours_rows_per_s"], initial["naive_rows_per_s"], initial["ceiling_rows_per_s"]
    print(f"initial-sync: ours {ours:.0f} rows/s, naive {naive:.0f} rows/s, ceiling {ceiling:.0f} rows/s")
    print(
        f"initial-sync: ours/naive = {ours / naive:.1f}, ours/ceiling = {ours / ceiling:.2f}, "
        f"throttled = {initial['throttled_share'] * 100:.2f}%"
    )
    small, large = memory["small"], memory["large"]
    print(
        f"memory: peak RSS {small['peak_rss_mb']:.0f} MB at {small['rows']} records, "
        f"{large['peak_rss_mb']:.0f} MB at {large['rows']} records"
    )


if __name__ == "__main__":
    main()
