"""The operator's bulk commands as users run them: `python -m loyaltysync initial-sync` and
`reconcile --report`, in a separate process, against the running stack (Azurite and both emulators).

The engine behind them is tested in tests/test_bulk.py and tests/test_reconcile.py; these tests
check the commands: arguments, exit codes, the summary, the report files, and that what they
say happened did happen on the emulators.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import E2E

ROOT = Path(__file__).resolve().parents[2]
LEVELS = "loyalty-levels"
FO_LEVELS, DV_LEVELS = "LoyaltyLevels", "msdyn_loyaltylevels"


async def cli(e2e: E2E, *args: str) -> tuple[int, str]:
    """Run `python -m loyaltysync ARGS` with the stack's settings; (exit code, stdout + stderr)."""
    env = {**os.environ, **e2e.stack.env, "NO_COLOR": "1", "TERM": "dumb"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "loyaltysync",
        *args,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=240)
    assert process.returncode is not None
    return process.returncode, out.decode()


async def seed_fo_levels(e2e: E2E, phrases: list[str], description: str) -> None:
    """Levels only F&O holds, written behind the sync's back (no data events)."""
    rows = [{"LevelPhrase": p, "LevelDescription": f"{description} {p}"} for p in phrases]
    (await e2e.fo_admin.post(f"/_admin/entities/{FO_LEVELS}/rows", json={"rows": rows})).raise_for_status()


async def test_initial_sync_copies_every_level_in_bulk_and_fills_the_state(e2e: E2E) -> None:
    phrases = [e2e.key("IS") for _ in range(25)]
    await seed_fo_levels(e2e, phrases, "bulk")

    code, out = await cli(e2e, "initial-sync", "--template", LEVELS, "--direction", "fo-to-dataverse")

    assert code == 0, out
    assert "initial sync" in out and LEVELS in out
    for phrase in phrases:
        row = await e2e.dv.get_by_key(DV_LEVELS, {"msdyn_levelphrase": phrase})
        assert row is not None, f"{phrase} not copied:\n{out}"
        assert row["msdyn_description"] == f"bulk {phrase}"
        state = await e2e.runtime.state.get(LEVELS, phrase)
        assert state is not None and not state.deleted
        assert state.values["LevelDescription"] == f"bulk {phrase}"


async def test_a_dry_run_writes_nothing(e2e: E2E) -> None:
    phrases = [e2e.key("DRY") for _ in range(5)]
    await seed_fo_levels(e2e, phrases, "dry")

    code, out = await cli(e2e, "initial-sync", "--template", LEVELS, "--direction", "fo-to-dataverse", "--dry-run")

    assert code == 0, out
    for phrase in phrases:
        assert await e2e.dv.get_by_key(DV_LEVELS, {"msdyn_levelphrase": phrase}) is None
        assert await e2e.runtime.state.get(LEVELS, phrase) is None


async def test_initial_sync_refuses_an_unknown_template_and_a_missing_direction(e2e: E2E) -> None:
    code, out = await cli(e2e, "initial-sync", "--template", "no-such-template", "--direction", "fo-to-dataverse")
    assert code != 0
    assert "no-such-template" in out
    code, out = await cli(e2e, "initial-sync", "--template", LEVELS)
    assert code == 2  # argparse: the option is required
    assert "--direction" in out


@pytest.mark.parametrize("suffix", ["json", "csv"])
async def test_reconcile_report_lists_each_difference_with_both_values(
    e2e: E2E, tmp_path: Path, suffix: str
) -> None:
    only_fo, different = e2e.key("RF"), e2e.key("RD")
    await seed_fo_levels(e2e, [only_fo, different], "fo")
    dv_row = {"msdyn_levelphrase": different, "msdyn_description": "changed behind our back"}
    (await e2e.dv_admin.post(f"/_admin/tables/{DV_LEVELS}/rows", json={"rows": [dv_row]})).raise_for_status()
    report = tmp_path / f"diff.{suffix}"

    code, out = await cli(e2e, "reconcile", "--template", LEVELS, "--report", str(report))

    assert code == 0, out
    assert "only in F&O" in out and "difference(s) written to" in out
    if suffix == "json":
        document = json.loads(report.read_text(encoding="utf-8"))
        found = {d["key"]: d for d in document["differences"] if d["template"] == LEVELS}
        assert found[only_fo]["kind"] == "only-fo"
        assert found[different]["kind"] == "different"
        assert found[different]["fields"]["LevelDescription"] == {
            "fo": f"fo {different}",
            "dataverse": "changed behind our back",
        }
        counts = {c["template"]: c for c in document["counts"]}
        assert counts[LEVELS]["only_fo"] >= 1 and counts[LEVELS]["different"] >= 1
    else:
        with report.open(encoding="utf-8", newline="") as file:
            rows = [r for r in csv.DictReader(file) if r["key"] in (only_fo, different)]
        assert {(r["key"], r["kind"], r["field"]) for r in rows} == {
            (only_fo, "only-fo", ""),
            (different, "different", "LevelDescription"),
        }
        changed = next(r for r in rows if r["key"] == different)
        assert (changed["fo_value"], changed["dataverse_value"]) == (f"fo {different}", "changed behind our back")
    # A report only reports: without --fix nothing was written.
    assert await e2e.dv.get_by_key(DV_LEVELS, {"msdyn_levelphrase": only_fo}) is None


async def test_reconcile_refuses_a_report_file_of_another_kind(e2e: E2E, tmp_path: Path) -> None:
    code, out = await cli(e2e, "reconcile", "--template", LEVELS, "--report", str(tmp_path / "diff.xlsx"))
    assert code != 0
    assert "--report" in out and ".json or .csv" in out
    assert not (tmp_path / "diff.xlsx").exists()
