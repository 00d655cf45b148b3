"""The reconciler finds what events missed and queues it: against both emulators (in-process) and Azurite."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from azure.core.exceptions import ResourceNotFoundError

from devkit.sandbox import dataverse as dataverse_emulator
from devkit.sandbox import fno as fno_emulator
from loyaltysync import mapping
from loyaltysync.events.model import ChangeEvent
from loyaltysync.reconcile import WATERMARK_SCOPE, reconcile_full, reconcile_incremental
from loyaltysync.runtime import Runtime, build_runtime
from loyaltysync.settings import load_settings
from loyaltysync.state import SyncRecord
from loyaltysync.templates import default_mappings_dir, load_templates

TOKEN = "reconcile-test-token"


def card(number: str, party: str = "P-1") -> dict[str, Any]:
    return {
        "CardNumber": number,
        "CardTenderType": "AsCardTender",
        "PartyNumber": party,
        "OmOperatingUnitNumber": "S1",
        "LoyaltyEnrollmentDate": "2026-01-15T00:00:00Z",
    }


def dv_card(number: str, party: str = "P-1") -> dict[str, Any]:
    return {
        "msdyn_cardnumber": number,
        "msdyn_cardtendertype": 806380000,
        "msdyn_partynumber": party,
        "msdyn_operatingunitnumber": "S1",
        "msdyn_enrollmentdate": "2026-01-15T00:00:00Z",
    }


@pytest.fixture
async def runtime(sandbox_environ: dict[str, str]) -> AsyncIterator[Runtime]:
    templates = load_templates(default_mappings_dir())
    fo_app = fno_emulator.create_app(token=TOKEN, templates=templates, public_url="http://fo.test")
    dv_app = dataverse_emulator.create_app(token=TOKEN, templates=templates, public_url="http://dv.test")
    settings = load_settings(
        {**sandbox_environ, "LOYALTYSYNC_SANDBOX_TOKEN": TOKEN}
    )
    rt = build_runtime(
        settings,
        templates,
        fno_transport=httpx.ASGITransport(app=fo_app),
        dataverse_transport=httpx.ASGITransport(app=dv_app),
    )
    rt.fo_admin = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=fo_app),
        base_url="http://fo.test",  # type: ignore[attr-defined]
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    rt.dv_admin = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=dv_app),
        base_url="http://dv.test",  # type: ignore[attr-defined]
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    yield rt
    await rt.fo_admin.aclose()  # type: ignore[attr-defined]
    await rt.dv_admin.aclose()  # type: ignore[attr-defined]
    await rt.aclose()


async def seed(rt: Any, fo_rows: list[dict[str, Any]], dv_rows: list[dict[str, Any]]) -> None:
    if fo_rows:
        (await rt.fo_admin.post("/_admin/entities/RetailLoyaltyCards/rows", json={"rows": fo_rows})).raise_for_status()
    if dv_rows:
        (await rt.dv_admin.post("/_admin/tables/msdyn_loyaltycards/rows", json={"rows": dv_rows})).raise_for_status()


async def queued(rt: Runtime, template: str) -> list[ChangeEvent]:
    client = rt.queue(template)
    events: list[ChangeEvent] = []
    try:
        async for message in client.receive_messages(messages_per_page=32, visibility_timeout=60):
            events.append(ChangeEvent.from_json(bytes(message.content)))
    except ResourceNotFoundError:
        pass  # a queue never created holds nothing
    return events


async def agree(rt: Runtime, number: str, party: str = "P-1") -> None:
    template = rt.templates["loyalty-cards"]
    values = mapping.fo_to_canonical(template, card(number, party))
    await rt.state.put(SyncRecord(template="loyalty-cards", key=number, values=values))


async def test_full_pass_counts_and_queues_every_difference(runtime: Runtime) -> None:
    await seed(
        runtime,
        [card("A-1"), card("A-2", "P-fo"), card("A-3")],
        [dv_card("A-1"), dv_card("A-2", "P-dv"), dv_card("A-4")],
    )
    report = await reconcile_full(runtime, runtime.templates["loyalty-cards"])
    assert (report.only_fo, report.only_dataverse, report.different, report.equal) == (1, 1, 1, 1)
    events = await queued(runtime, "loyalty-cards")
    assert sorted(e.key["CardNumber"] for e in events) == ["A-2", "A-3", "A-4"]
    assert {e.wire_format for e in events} == {"reconcile"}
    assert all(not e.complete for e in events)  # the worker re-reads both sides


async def test_full_pass_without_fix_queues_nothing(runtime: Runtime) -> None:
    await seed(runtime, [card("B-1")], [])
    report = await reconcile_full(runtime, runtime.templates["loyalty-cards"], fix=False)
    assert report.only_fo == 1 and report.queued == 0
    assert await queued(runtime, "loyalty-cards") == []


async def test_incremental_pass_finds_changes_without_events_and_keeps_a_watermark(runtime: Runtime) -> None:
    # Agreed and equal on both sides: nothing to do.
    await seed(runtime, [card("C-1"), card("C-2")], [dv_card("C-1"), dv_card("C-2")])
    await agree(runtime, "C-1")
    await agree(runtime, "C-2")
    first = await reconcile_incremental(runtime, runtime.templates["loyalty-cards"])
    assert first.queued == 0 and first.equal >= 2
    mark = await runtime.control.get(WATERMARK_SCOPE, "loyalty-cards")
    assert mark is not None and mark.get("at")

    # A set-based X++ write (no event) changes C-1 in F&O; C-2 vanishes from F&O without an event.
    await runtime.fo_admin.delete("/_admin/entities/RetailLoyaltyCards/rows")  # type: ignore[attr-defined]
    await seed(runtime, [card("C-1", "P-changed")], [])
    second = await reconcile_incremental(runtime, runtime.templates["loyalty-cards"])
    keys = {(e.side, e.key["CardNumber"]) for e in await queued(runtime, "loyalty-cards")}
    assert ("fo", "C-1") in keys
    assert ("fo", "C-2") in keys  # agreed record missing in F&O: queued so the worker applies the delete
    assert second.different >= 1


async def test_paused_templates_are_skipped(runtime: Runtime) -> None:
    from loyaltysync.reconcile import reconcile_all

    await seed(runtime, [card("D-1")], [])
    await runtime.set_paused("loyalty-cards", True)
    reports = await reconcile_all(runtime, full=True)
    assert "loyalty-cards" not in {r.template for r in reports}
    assert await queued(runtime, "loyalty-cards") == []


def test_digest_ignores_one_sided_constants_and_sees_every_synced_field() -> None:
    from loyaltysync.reconcile import digest

    template = load_templates(default_mappings_dir())["loyalty-cards"]
    base = mapping.fo_to_canonical(template, card("E-1"))
    assert digest(template, base) == digest(template, json.loads(json.dumps(base)))
    for field in base:
        changed = {**base, field: "something else"}
        assert digest(template, changed) != digest(template, base), field
