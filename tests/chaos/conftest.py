"""Options of the chaos run. `make test` plays the reduced run (2,000 operations); `make chaos` plays
20,000 through tests/chaos/run.py. Through pytest: `--chaos-operations N` (or CHAOS_OPERATIONS=N);
CHAOS_CRASH_POINTS and CHAOS_CONFLICTS take the same comma-separated lists as run.py's
`--crash-points` and `--conflicts`; CHAOS_KILL_RATE is run.py's `--kill-rate`, CHAOS_SEED its `--seed`.

Inside `make test` the run plays in-process crashes only (kill rate 0): a run with real process kills is
timing-dependent, and a gate that can fail by chance blocks every submission. The real-kill run is the
cross-check `make chaos OPS=<n> SEED=<s>`; a failure there is a bug to fix, never to retry.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from tests.chaos.run import DEFAULT_SEED, REDUCED, parse_options


@dataclass(frozen=True)
class ChaosOptions:
    operations: int
    crash_points: frozenset[str]
    conflicts: tuple[str, ...]
    kill_rate: float
    seed: int


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--chaos-operations", type=int, default=None, help="operations the chaos run plays")


@pytest.fixture
def chaos_options(request: pytest.FixtureRequest) -> ChaosOptions:
    """The option, else the environment, else the reduced run with every fault."""
    option = request.config.getoption("--chaos-operations", default=None)
    operations = int(option) if option else int(os.environ.get("CHAOS_OPERATIONS", REDUCED))
    points, conflicts = parse_options(os.environ.get("CHAOS_CRASH_POINTS"), os.environ.get("CHAOS_CONFLICTS"))
    kill_rate = float(os.environ.get("CHAOS_KILL_RATE", "0"))
    seed = int(os.environ.get("CHAOS_SEED", DEFAULT_SEED))
    return ChaosOptions(operations, points, conflicts, kill_rate, seed)
