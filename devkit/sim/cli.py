"""The simulator's command line: `make sim SEEDS=<first>-<last> OPS=<per seed>`.

Prints one line, exactly:
  sim: <S> seeds, <N> operations, <N> crashes, <N> faults, violations <N>, <R> ops/s, trace <hex>
where the trace is a digest of every seed's history (the same seeds and operations give the same
trace on any machine). On a violation it also prints, per failing seed, the findings, the shrunk
history (the fewest planned operations that still fail) and the command that replays it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Sequence

from devkit.sim.run import Config, kept, shrink, simulate


def seed_range(text: str) -> range:
    first, _, last = text.partition("-")
    start, end = int(first), int(last or first)
    if end < start:
        raise argparse.ArgumentTypeError(f"{text}: the last seed is before the first")
    return range(start, end + 1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devkit.sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=seed_range, default=seed_range("1-10"), help="first-last (default 1-10)")
    parser.add_argument("--ops", type=int, default=1000, help="planned operations per seed (default 1000)")
    parser.add_argument("--keep", default=None, help="play only these planned operations (comma-separated indexes)")
    parser.add_argument("--no-shrink", action="store_true", help="report violations without shrinking them")
    args = parser.parse_args(argv)
    if os.environ.get("PYTHONHASHSEED") != "0":
        # Set iteration order of strings depends on the hash seed: fix it so a trace is the same everywhere.
        os.environ["PYTHONHASHSEED"] = "0"
        arguments = [sys.executable, "-m", "devkit.sim", *(argv if argv is not None else sys.argv[1:])]
        os.execv(sys.executable, arguments)  # noqa: S606 - this interpreter again, same arguments
    keep = frozenset(int(i) for i in args.keep.split(",")) if args.keep else None
    trace = hashlib.sha256()
    operations = crashes = faults = violations = 0
    failed = []
    started = time.perf_counter()
    for seed in args.seeds:
        result = simulate(Config(seed=seed, operations=args.ops, keep=keep))
        trace.update(bytes.fromhex(result.digest))
        operations += result.operations
        crashes += result.crashes
        faults += result.faults
        violations += result.violations
        if result.violations:
            failed.append(result)
    elapsed = time.perf_counter() - started
    rate = operations / elapsed if elapsed > 0 else 0.0
    print(f"sim: {len(args.seeds)} seeds, {operations} operations, {crashes} crashes, {faults} faults, "
          f"violations {violations}, {rate:.0f} ops/s, trace {trace.hexdigest()}", flush=True)
    for result in failed:
        print(f"\nseed {result.seed}: {result.violations} violations", flush=True)
        for line in result.findings[:20]:
            print(f"  {line}")
        if args.no_shrink:
            print(f"  replay: make sim SEEDS={result.seed}-{result.seed} OPS={args.ops}")
            continue
        config, shrunk = shrink(Config(seed=result.seed, operations=args.ops, keep=keep))
        ops = kept(config, shrunk)
        print(f"  shrunk to {len(ops)} operations, still failing with:")
        for line in shrunk.findings[:10]:
            print(f"    {line}")
        for op in ops:
            print(f"    {op.describe()}")
        indexes = ",".join(str(op.index) for op in ops)
        print(f"  replay: .venv/bin/python -m devkit.sim --seeds {result.seed} --ops {args.ops} --keep {indexes}")
    return 1 if violations else 0
