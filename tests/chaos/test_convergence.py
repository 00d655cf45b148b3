"""Convergence under faults (issue #7): the reduced chaos run inside `make test`.

See tests/chaos/run.py for what is played and judged, devkit/sim/model.py for
the rules of the expected end state, tests/chaos/faults.py for the faults.
"""

from __future__ import annotations

import pytest

from tests.chaos.conftest import ChaosOptions
from tests.chaos.run import run_chaos

# 20,000 operations (`--chaos-operations 20000`) take far longer than the suite's default limit.
pytestmark = pytest.mark.timeout(7200)


async def test_both_sides_converge_under_faults(
    chaos_options: ChaosOptions, capsys: pytest.CaptureFixture[str]
) -> None:
    lines: list[str] = []
    report = await run_chaos(
        chaos_options.operations,
        seed=chaos_options.seed,
        crash_points=chaos_options.crash_points,
        conflict_orders=chaos_options.conflicts,
        kill_rate=chaos_options.kill_rate,
        say=lines.append,
    )
    with capsys.disabled():
        print("\n" + lines[-1])  # the one summary line, in the test output
    assert lines[-1] == report.line()
    assert report.operations >= chaos_options.operations
    assert report.faults > 0
    assert report.converged, "\n".join(lines)
    assert report.lost == 0 and report.duplicates == 0
