"""Does the simulator find real bugs? Put fixes back one at a time and count the seeds it needs.

`python -m devkit.sim.reverts --seeds 1-40 --ops 400` undoes one engine rule at a time (each a fix
an ordering once needed: the three the simulator found, and rules behind
tests/chaos/test_regressions.py), plays the seeds in order and prints, per revert, the first seed
whose findings differ from the same seed with the rule in place, and the first finding that is new.
A revert found by no seed is printed as such: the simulator does not exercise that rule yet.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from devkit.sim import host, run
from devkit.sim.cli import seed_range
from devkit.sim.run import Config, simulate
from loyaltysync import decide, intent, sync

_BASE = run._settings()


@contextlib.contextmanager
def _patched(target: Any, name: str, value: Any) -> Iterator[None]:
    saved = getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, saved)


def _never_stale_delete(event_version: str | None, seen: str | None, operation: str = "update") -> bool:
    # The delete staleness rule before its fix: a delete carrying the last applied version was stale.
    if event_version is None or seen is None:
        return False
    return not decide.is_newer(event_version, seen)


REVERTS: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
    # Found by the simulator (docs/simulation.md).
    "intent horizon of 15 s (before functionTimeout)": lambda: _patched(host, "intent_horizon_seconds", lambda s: 15.0),
    "whole-record wait without the queue lease": lambda: _patched(
        run, "_settings", lambda: _BASE.model_copy(update={"queue_lease_seconds": 0})),
    "re-created Dataverse row kept the old agreed values": lambda: _patched(sync, "_made_anew", lambda *a: False),
    "T9 the sync's own F&O business event dates F&O's record": lambda: _patched(
        sync, "_own_fo_write", lambda *a: False),
    "E1 the event of the sync's own F&O delete counts as after a later intent": lambda: _patched(
        intent, "_own_fo_write", lambda *a: False),
    "P6 a late payload decides a write back to its own side": lambda: _patched(sync, "_touches", lambda *a: False),
    "W0 a re-check never waits for an interrupted step's event": lambda: _patched(
        sync, "_older_than", lambda *a: True),
    # Behind tests/chaos/test_regressions.py and docs/consistency.md's rule list.
    "T2 the sync's own F&O echo dates F&O's fields": lambda: _patched(
        sync, "_change_time", lambda event, fo, record: event.at),
    "T3 the sync's own Dataverse write dates the row": lambda: _patched(
        sync, "_without_own_write_time", lambda dv, record: dv),
    "P4/P5 payloads trusted after the sync's own write": lambda: _patched(
        sync, "_written_since_read", lambda record, side: False),
    "S2 a delete with the last applied version is stale": lambda: _patched(sync, "is_stale", _never_stale_delete),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devkit.sim.reverts", description=__doc__)
    parser.add_argument("--seeds", type=seed_range, default=seed_range("1-40"))
    parser.add_argument("--ops", type=int, default=400)
    args = parser.parse_args(argv)
    baseline = {seed: set(simulate(Config(seed=seed, operations=args.ops)).findings) for seed in args.seeds}
    for name, revert in REVERTS.items():
        found = None
        with revert():
            for seed in args.seeds:
                new = sorted(set(simulate(Config(seed=seed, operations=args.ops)).findings) - baseline[seed])
                if new:
                    found = (seed, new[0])
                    break
        shown = f"seed {found[0]} ({found[0] - args.seeds.start + 1} seeds): {found[1][:160]}" if found else "not found"
        print(f"{name}: {shown}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
