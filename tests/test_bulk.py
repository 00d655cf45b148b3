"""Initial sync against both emulators (in process) and Azurite: copy, state, failures, crash and resume."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from devkit.sandbox import dataverse as dataverse_emulator
from devkit.sandbox import fno as fno_emulator
from loyaltysync.bulk import SyncOptions, exit_code, initial_sync
from loyaltysync.bulk.checkpoint import load
from loyaltysync.events.model import ChangeEvent
from loyaltysync.runtime import Runtime, build_runtime
from loyaltysync.settings import load_settings
from loyaltysync.templates import Template, default_mappings_dir, load_templates

TOKEN = "bulk-test-token"
ADMIN_HEADERS = {"Authorization": f"Bearer {TOKEN}"}
TENDERS = ["AsCardTender", "AsContactTender", "NoTender", "Blocked"]
SMALL = SyncOptions(page_size=60, batch_size=20, pages_in_flight=3)  # 230 cards: 4 pages, 3 requests each


def card(i: int, **changes: Any) -> dict[str, Any]:
    return {
        "CardNumber": f"C-{i:05d}",
        "CardTenderType": TENDERS[i % 4],
        "PartyNumber": f"P-{i:05d}",
        "OmOperatingUnitNumber": "S0001",
        "LoyaltyEnrollmentDate": "2026-01-15T00:00:00Z",
        **changes,
    }


def dv_card(i: int) -> dict[str, Any]:
    return {
        "msdyn_cardnumber": f"D-{i:05d}",
        "msdyn_cardtendertype": 806380000 + i % 4,
        "msdyn_partynumber": f"P-{i:05d}",
        "msdyn_operatingunitnumber": "S0002",
        "msdyn_enrollmentdate": "2026-02-01T00:00:00Z",
    }


class Crash(Exception):
    """Stands for the process dying: nothing in the sync catches it."""


class CrashingTransport(httpx.AsyncBaseTransport):
    """An in-process transport that dies on the `after`+1-th request matching `when`."""

    def __init__(self, app: Starlette, when: Callable[[httpx.Request], bool], after: int) -> None:
        self.inner = httpx.ASGITransport(app=app)
        self.when = when
        self.after = after
        self.seen = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.when(request):
            self.seen += 1
            if self.seen > self.after:
                raise Crash(f"killed at request {self.seen}")
        return await self.inner.handle_async_request(request)


@dataclass
class Sandbox:
    templates: dict[str, Template]
    fo_app: Starlette
    dv_app: Starlette
    settings_env: dict[str, str]
    runtimes: list[Runtime] = field(default_factory=list)

    def runtime(
        self,
        fo_transport: httpx.AsyncBaseTransport | None = None,
        dv_transport: httpx.AsyncBaseTransport | None = None,
    ) -> Runtime:
        """A fresh runtime (a new process, as far as the sync can tell) on the same emulators and tables."""
        rt = build_runtime(
            load_settings(self.settings_env),
            self.templates,
            fno_transport=fo_transport or httpx.ASGITransport(app=self.fo_app),
            dataverse_transport=dv_transport or httpx.ASGITransport(app=self.dv_app),
        )
        self.runtimes.append(rt)
        return rt

    def fo_rows(self, entity_set: str = "RetailLoyaltyCards") -> list[dict[str, Any]]:
        return list(self.fo_app.state.fno.tables[entity_set].scan())

    def dv_rows(self) -> dict[str, dict[str, Any]]:
        return {row["msdyn_cardnumber"]: row for row in self.dv_app.state.dataverse.tables["msdyn_loyaltycard"].scan()}

    def requests(self, app: Starlette, fragment: str) -> int:
        return sum(1 for e in app.state.sandbox.log.recent() if fragment in e["path"] and not e["subrequest"])


@pytest.fixture
async def sandbox(sandbox_environ: dict[str, str]) -> AsyncIterator[Sandbox]:
    templates = load_templates(default_mappings_dir())
    box = Sandbox(
        templates,
        fno_emulator.create_app(token=TOKEN, templates=templates, public_url="http://fo.test"),
        dataverse_emulator.create_app(token=TOKEN, templates=templates, public_url="http://dv.test"),
        {**sandbox_environ, "LOYALTYSYNC_SANDBOX_TOKEN": TOKEN},
    )
    yield box
    for rt in box.runtimes:
        await rt.aclose()


async def seed_fo(box: Sandbox, rows: list[dict[str, Any]], entity_set: str = "RetailLoyaltyCards") -> None:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=box.fo_app), base_url="http://fo.test", headers=ADMIN_HEADERS
    ) as admin:
        (await admin.post(f"/_admin/entities/{entity_set}/rows", json={"rows": rows})).raise_for_status()


async def seed_dv(box: Sandbox, rows: list[dict[str, Any]]) -> None:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=box.dv_app), base_url="http://dv.test", headers=ADMIN_HEADERS
    ) as admin:
        (await admin.post("/_admin/tables/msdyn_loyaltycards/rows", json={"rows": rows})).raise_for_status()


# --- F&O -> Dataverse ----------------------------------------------------------------------------


async def test_every_card_is_copied_in_bulk_and_the_state_is_filled(sandbox: Sandbox) -> None:
    await seed_fo(sandbox, [card(i) for i in range(230)])
    rt = sandbox.runtime()

    report = await initial_sync(rt, rt.templates["loyalty-cards"], "fo-to-dataverse", SMALL)

    assert (report.read, report.written, report.failed, report.pages) == (230, 230, 0, 4)
    assert report.complete and report.error is None and exit_code([report]) == 0
    rows = sandbox.dv_rows()
    assert len(rows) == 230
    assert rows["C-00003"]["msdyn_cardtendertype"] == 806380003  # Blocked, through the value map
    assert rows["C-00003"]["msdyn_partynumber"] == "P-00003"
    # UpsertMultiple, 20 records a request: 12 requests for 230 records, not 230.
    assert sandbox.requests(sandbox.dv_app, "UpsertMultiple") == 12
    assert await rt.state.count("loyalty-cards") == 230
    state = await rt.state.get("loyalty-cards", "C-00003")
    assert state is not None and state.values["CardTenderType"] == "Blocked" and not state.deleted
    saved = await load(rt.control, "loyalty-cards", "fo-to-dataverse")
    assert saved is not None and (saved.status, saved.pages, saved.read, saved.next) == ("done", 4, 230, None)


async def test_after_the_initial_sync_live_events_find_both_sides_agreed(sandbox: Sandbox) -> None:
    await seed_fo(sandbox, [card(i) for i in range(30)])
    rt = sandbox.runtime()
    await initial_sync(rt, rt.templates["loyalty-cards"], "fo-to-dataverse", SMALL)

    for side in ("fo", "dataverse"):
        event = ChangeEvent("loyalty-cards", side, "update", {"CardNumber": "C-00007"}, wire_format="fo-business-event")
        outcome = await rt.engine.process(event)
        assert outcome.reason in ("no-change", "echo") and not outcome.applied
    assert sandbox.requests(sandbox.dv_app, "msdyn_loyaltycards(") == 2  # reads only, no write


async def test_failing_records_are_parked_with_their_reason_and_the_rest_continue(sandbox: Sandbox) -> None:
    too_long = "U" * 120  # F&O takes it; Dataverse's msdyn_operatingunitnumber holds 100 characters
    await seed_fo(sandbox, [card(i, OmOperatingUnitNumber=too_long if i == 17 else "S1") for i in range(60)])
    points = [
        {"RewardPointId": "STAR", "RewardPointType": "Quantity", "RewardPointCurrency": "USD", "Redeemable": "Yes"},
        {"RewardPointId": "ODD", "RewardPointType": "Amount", "RewardPointCurrency": "XYZ", "Redeemable": "No"},
    ]
    await seed_fo(sandbox, points, "RetailLoyaltyRewardPoints")
    rt = sandbox.runtime()

    cards_report = await initial_sync(rt, rt.templates["loyalty-cards"], "fo-to-dataverse", SMALL)
    points_report = await initial_sync(rt, rt.templates["loyalty-reward-points"], "fo-to-dataverse", SMALL)

    assert (cards_report.written, cards_report.failed, cards_report.complete) == (59, 1, True)
    assert (points_report.written, points_report.failed) == (1, 1)
    assert exit_code([cards_report, points_report]) == 2
    assert "C-00017" not in sandbox.dv_rows() and len(sandbox.dv_rows()) == 59
    parked = {d.key: d for d in await rt.dead_letters.list()}
    assert set(parked) == {"C-00017", "ODD"}
    assert "msdyn_operatingunitnumber" in parked["C-00017"].reason and parked["C-00017"].side == "fo"
    assert "XYZ" in parked["ODD"].reason and parked["ODD"].error_code == "MappingError"
    assert json.loads(parked["ODD"].payload)["key"] == {"RewardPointId": "ODD"}  # ready for `replay`
    assert await rt.state.get("loyalty-cards", "C-00017") is None
    assert await rt.state.count("loyalty-cards") == 59


async def test_a_crash_mid_way_resumes_after_the_last_checkpoint_without_redoing_pages(sandbox: Sandbox) -> None:
    await seed_fo(sandbox, [card(i) for i in range(230)])
    reads = CrashingTransport(sandbox.fo_app, lambda r: r.method == "GET" and "RetailLoyaltyCards?" in str(r.url), 2)
    crashed = sandbox.runtime(fo_transport=reads)
    template = crashed.templates["loyalty-cards"]

    with pytest.raises(Crash):
        await initial_sync(crashed, template, "fo-to-dataverse", SMALL)

    saved = await load(crashed.control, "loyalty-cards", "fo-to-dataverse")
    # The pages already read were written and committed before the failure surfaced.
    assert saved is not None and (saved.status, saved.pages, saved.read) == ("running", 2, 120) and saved.next
    committed = saved.pages
    writes_before = sandbox.requests(sandbox.dv_app, "UpsertMultiple")

    resumed = sandbox.runtime()
    report = await initial_sync(resumed, template, "fo-to-dataverse", replace(SMALL, resume=True))

    assert report.complete and report.resumed_after_page == committed
    assert report.read == 230 - 60 * committed  # only the pages after the checkpoint were read again
    assert sandbox.requests(sandbox.dv_app, "UpsertMultiple") - writes_before == 3 * (4 - committed)
    rows = sandbox.dv_rows()
    assert sorted(rows) == [f"C-{i:05d}" for i in range(230)]  # each card once: upserts by key
    saved = await load(resumed.control, "loyalty-cards", "fo-to-dataverse")
    assert saved is not None and (saved.status, saved.read, saved.written) == ("done", 230, 230)
    assert await resumed.state.count("loyalty-cards") == 230


async def test_resuming_a_finished_run_does_nothing(sandbox: Sandbox) -> None:
    await seed_fo(sandbox, [card(i) for i in range(10)])
    rt = sandbox.runtime()
    await initial_sync(rt, rt.templates["loyalty-cards"], "fo-to-dataverse", SMALL)
    writes = sandbox.requests(sandbox.dv_app, "UpsertMultiple")

    again = await initial_sync(rt, rt.templates["loyalty-cards"], "fo-to-dataverse", SyncOptions(resume=True))

    assert again.complete and again.read == 0 and sandbox.requests(sandbox.dv_app, "UpsertMultiple") == writes


async def test_a_dry_run_maps_and_counts_but_writes_nothing(sandbox: Sandbox) -> None:
    await seed_fo(sandbox, [card(i) for i in range(40)])
    rt = sandbox.runtime()

    report = await initial_sync(rt, rt.templates["loyalty-cards"], "fo-to-dataverse", SyncOptions(dry_run=True))

    assert (report.read, report.written, report.failed, report.complete) == (40, 40, 0, True)
    assert sandbox.dv_rows() == {} and await rt.state.count("loyalty-cards") == 0
    assert await load(rt.control, "loyalty-cards", "fo-to-dataverse") is None


async def test_without_upsert_multiple_the_writer_falls_back_to_batch(sandbox: Sandbox) -> None:
    org = sandbox.dv_app.state.dataverse
    filters = org.tables["sdkmessagefilter"]
    upsert_multiple = next(r["sdkmessageid"] for r in org.tables["sdkmessage"].scan() if r["name"] == "UpsertMultiple")
    for row in list(filters.scan()):
        if row["sdkmessageid"] == upsert_multiple and row["primaryobjecttypecode"] == "msdyn_loyaltycard":
            filters.delete(filters.row_id(row))
    await seed_fo(sandbox, [card(i) for i in range(45)])
    rt = sandbox.runtime()

    report = await initial_sync(rt, rt.templates["loyalty-cards"], "fo-to-dataverse", SMALL)

    assert (report.written, report.failed) == (45, 0)
    assert len(sandbox.dv_rows()) == 45
    assert sandbox.requests(sandbox.dv_app, "UpsertMultiple") == 0
    assert sandbox.requests(sandbox.dv_app, "$batch") == 3


async def test_a_configuration_error_stops_the_run_with_the_reason(sandbox: Sandbox) -> None:
    await seed_fo(sandbox, [card(i) for i in range(5)])
    sandbox.settings_env["LOYALTYSYNC_SANDBOX_TOKEN"] = "not-the-token"
    rt = sandbox.runtime(fo_transport=httpx.ASGITransport(app=sandbox.fo_app))

    report = await initial_sync(rt, rt.templates["loyalty-cards"], "fo-to-dataverse", SMALL)

    assert report.error is not None and "401" in report.error
    assert not report.complete and exit_code([report]) == 1


# --- Dataverse -> F&O ----------------------------------------------------------------------------


async def test_dataverse_to_fo_creates_then_updates_and_a_crash_resumes_without_duplicates(sandbox: Sandbox) -> None:
    await seed_dv(sandbox, [dv_card(i) for i in range(130)])
    await seed_fo(sandbox, [card(5, CardNumber="D-00005", PartyNumber="old")])  # one card exists already
    # The process dies while writing page 2: page 1 is committed, pages 2 and 3 were partly written.
    writes = CrashingTransport(sandbox.fo_app, lambda r: r.method == "POST" and "$batch" in str(r.url), 4)
    crashed = sandbox.runtime(fo_transport=writes)
    template = crashed.templates["loyalty-cards"]

    with pytest.raises(Crash):
        await initial_sync(crashed, template, "dataverse-to-fo", SMALL)
    saved = await load(crashed.control, "loyalty-cards", "dataverse-to-fo")
    assert saved is not None and saved.status == "running" and saved.pages == 1
    resumed = sandbox.runtime()
    report = await initial_sync(resumed, template, "dataverse-to-fo", replace(SMALL, resume=True))

    assert report.complete and report.failed == 0
    fo = {row["CardNumber"]: row for row in sandbox.fo_rows()}
    assert sorted(fo) == [f"D-{i:05d}" for i in range(130)]  # created once each; re-sent creates became updates
    assert fo["D-00005"]["PartyNumber"] == "P-00005"  # the existing card was updated, not duplicated
    assert fo["D-00006"]["CardTenderType"] == "NoTender"
    state = await resumed.state.get("loyalty-cards", "D-00006")
    dv_row = next(r for r in sandbox.dv_rows().values() if r["msdyn_cardnumber"] == "D-00006")
    assert state is not None and state.row_id == dv_row["msdyn_loyaltycardid"]
    assert state.versions["dataverse"] == str(dv_row["versionnumber"])  # older webhooks will be skipped as stale
    assert await resumed.state.count("loyalty-cards") == 130
