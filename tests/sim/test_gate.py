"""The simulation gate in `make test`: many seeded hostile histories through the real engine and worker.

Each seed plays people editing both sides (creates, edits, deletes, re-creates, concurrent edits of
one field), several function-app instances crashed at random awaits of their invocations, lost and
late and duplicated webhooks, throttling storms, outages and lost answers (devkit/sim/run.py).
Every run is deterministic: a failure here fails the same way on every machine and every re-run,
and `make sim SEEDS=<s>-<s> OPS=<n>` replays and shrinks it.

Asserted for every seed, as docs/consistency.md states them: C1 both sides end equal, C2 what is
deleted stays deleted (and what is created stays), C4 nothing created twice, C5 no ping-pong, C6 nothing
parked or stuck, no exception escapes, every webhook is accepted. C3 (which edit wins) is checked by the
same judge and reported here, and may not grow: `C3_AT_MOST` is what these seeds show at this version,
lowered with fixes (docs/simulation.md says which histories still break it).
"""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

from devkit.sim.run import Config, simulate

SEEDS = range(1, 101)
OPERATIONS = 400  # planned per seed
GATED = ("C1", "C2", "C4", "C5", "C6")
C3_AT_MOST = 42  # lines (a field on both sides counts twice), measured at this version; raising it needs a reason


def _play(seed: int) -> tuple[int, int, list[str]]:
    result = simulate(Config(seed=seed, operations=OPERATIONS))
    return seed, result.operations, result.findings


def test_every_seeded_history_converges_with_nothing_resurrected_duplicated_ping_ponged_or_parked() -> None:
    os.environ["PYTHONHASHSEED"] = "0"  # spawned workers iterate sets as `make sim` does
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        played = list(pool.map(_play, SEEDS))
    operations = sum(count for _, count, _ in played)
    rules = Counter(finding.split(" ", 1)[0] for _, _, findings in played for finding in findings)
    print(f"\nsimulation gate: {len(played)} seeds, {operations} operations, findings by rule {dict(rules)}")
    gated = [f"seed {seed}: {finding}" for seed, _, findings in played for finding in findings
             if finding.split(" ", 1)[0] in GATED]
    assert gated == []
    assert rules["C3"] <= C3_AT_MOST, "a change made more histories end with the earlier edit winning"
    assert operations > 100 * OPERATIONS // 2  # most planned operations land
