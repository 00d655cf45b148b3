"""`reconcile --report FILE`: the differences with both values, as JSON or CSV, and the progress it reports."""

from __future__ import annotations

import csv
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devkit.sandbox import dataverse as dataverse_emulator
from devkit.sandbox import fno as fno_emulator
from loyaltysync.reconcile import reconcile_full
from loyaltysync.reconcile_report import Difference, ReportWriter
from loyaltysync.runtime import Runtime, build_runtime
from loyaltysync.settings import load_settings
from loyaltysync.templates import default_mappings_dir, load_templates

TOKEN = "reconcile-report-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


def fo_card(number: str, party: str = "P-1", tender: str = "AsCardTender") -> dict[str, Any]:
    return {
        "CardNumber": number,
        "CardTenderType": tender,
        "PartyNumber": party,
        "OmOperatingUnitNumber": "S1",
        "LoyaltyEnrollmentDate": "2026-01-15T00:00:00Z",
    }


def dv_card(
    number: str, party: str = "P-1", tender: int = 806380000, enrolled: str = "2026-01-15T00:00:00Z"
) -> dict[str, Any]:
    return {
        "msdyn_cardnumber": number,
        "msdyn_cardtendertype": tender,
        "msdyn_partynumber": party,
        "msdyn_operatingunitnumber": "S1",
        "msdyn_enrollmentdate": enrolled,
    }


@pytest.fixture
async def runtime(sandbox_environ: dict[str, str]) -> AsyncIterator[Runtime]:
    templates = load_templates(default_mappings_dir())
    fo_app = fno_emulator.create_app(token=TOKEN, templates=templates, public_url="http://fo.test")
    dv_app = dataverse_emulator.create_app(token=TOKEN, templates=templates, public_url="http://dv.test")
    fo_rows = [fo_card("SAME"), fo_card("DIFF", party="P-1", tender="Blocked"), fo_card("FO-ONLY"), fo_card("X'1")]
    dv_rows = [
        dv_card("SAME"),
        dv_card("DIFF", party="P-2", enrolled="2026-03-01T00:00:00Z", tender=806380003),
        dv_card("DV-ONLY"),
        dv_card("X'1", party="P-9"),
    ]
    fo = httpx.AsyncClient(transport=httpx.ASGITransport(app=fo_app), base_url="http://fo.test", headers=HEADERS)
    dv = httpx.AsyncClient(transport=httpx.ASGITransport(app=dv_app), base_url="http://dv.test", headers=HEADERS)
    async with fo, dv:
        (await fo.post("/_admin/entities/RetailLoyaltyCards/rows", json={"rows": fo_rows})).raise_for_status()
        (await dv.post("/_admin/tables/msdyn_loyaltycards/rows", json={"rows": dv_rows})).raise_for_status()
    settings = load_settings(
        {**sandbox_environ, "LOYALTYSYNC_SANDBOX_TOKEN": TOKEN}
    )
    rt = build_runtime(
        settings,
        templates,
        fno_transport=httpx.ASGITransport(app=fo_app),
        dataverse_transport=httpx.ASGITransport(app=dv_app),
    )
    yield rt
    await rt.aclose()


class Recorder:
    """A ProgressSink that remembers what it was told."""

    def __init__(self) -> None:
        self.phases: list[tuple[str, int | None]] = []
        self.done: list[int] = []

    def start(self, description: str, total: int | None) -> None:
        self.phases.append((description, total))
        self.done.append(0)

    def advance(self, units: int) -> None:
        self.done[-1] += units

    def total(self, total: int | None) -> None:
        self.phases[-1] = (self.phases[-1][0], total)


async def test_the_json_report_lists_each_difference_with_both_values(runtime: Runtime, tmp_path: Path) -> None:
    path = tmp_path / "diff.json"
    template = runtime.templates["loyalty-cards"]
    with ReportWriter(path) as writer:
        report = await reconcile_full(runtime, template, fix=False, sink=writer)
        writer.counts(template.name, only_fo=report.only_fo, only_dataverse=report.only_dataverse,
                      different=report.different, equal=report.equal)

    assert (report.only_fo, report.only_dataverse, report.different, report.equal) == (1, 1, 2, 1)
    assert report.queued == 0
    document = json.loads(path.read_text(encoding="utf-8"))
    found = {d["key"]: d for d in document["differences"]}
    assert set(found) == {"DIFF", "X'1", "FO-ONLY", "DV-ONLY"}
    assert found["DIFF"]["kind"] == "different"
    assert found["DIFF"]["fields"] == {
        "PartyNumber": {"fo": "P-1", "dataverse": "P-2"},
        "LoyaltyEnrollmentDate": {"fo": "2026-01-15T00:00:00Z", "dataverse": "2026-03-01T00:00:00Z"},
    }  # CardTenderType is Blocked on both sides (806380003 through the value map): not a difference
    assert found["X'1"]["fields"] == {"PartyNumber": {"fo": "P-1", "dataverse": "P-9"}}
    assert (found["FO-ONLY"]["kind"], found["DV-ONLY"]["kind"]) == ("only-fo", "only-dataverse")
    assert document["counts"] == [
        {"template": "loyalty-cards", "only_fo": 1, "only_dataverse": 1, "different": 2, "equal": 1}
    ]


async def test_the_csv_report_has_a_row_per_differing_field(runtime: Runtime, tmp_path: Path) -> None:
    path = tmp_path / "diff.csv"
    progress = Recorder()
    with ReportWriter(path) as writer:
        await reconcile_full(runtime, runtime.templates["loyalty-cards"], fix=True, sink=writer, progress=progress)

    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["template", "kind", "key", "field", "fo_value", "dataverse_value"]
    by_field = {(r["key"], r["field"]): (r["kind"], r["fo_value"], r["dataverse_value"]) for r in rows}
    assert by_field[("DIFF", "PartyNumber")] == ("different", "P-1", "P-2")
    assert by_field[("DIFF", "LoyaltyEnrollmentDate")][0] == "different"
    assert by_field[("FO-ONLY", "")] == ("only-fo", "", "")
    assert by_field[("DV-ONLY", "")] == ("only-dataverse", "", "")
    assert len(rows) == 5
    # Progress: F&O rows read, then Dataverse rows compared, each against its count.
    assert progress.phases == [("loyalty-cards: reading F&O", 4), ("loyalty-cards: comparing with Dataverse", 4)]
    assert progress.done == [4, 4]


def test_report_values_in_csv_keep_their_type_readable(tmp_path: Path) -> None:
    path = tmp_path / "types.csv"
    with ReportWriter(path) as writer:
        fields = {"Points": (10, None), "Active": (True, False), "Name": ("a", "b")}
        writer.add(Difference("t", "k", "different", fields))
    rows = list(csv.reader(path.open(encoding="utf-8", newline="")))[1:]
    assert rows == [
        ["t", "different", "k", "Points", "10", ""],
        ["t", "different", "k", "Active", "true", "false"],
        ["t", "different", "k", "Name", "a", "b"],
    ]


def test_only_json_and_csv_are_written(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.json or \.csv"):
        ReportWriter(tmp_path / "diff.xlsx")
