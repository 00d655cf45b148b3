"""Reconciliation: find records whose two sides differ and queue them for the worker.

Catches what events miss: F&O set-based X++ writes raise no events, webhooks
can be lost, an outage can outlast retries, and people edit data by hand.

- incremental (the timer): Dataverse rows modified since the stored watermark,
  and F&O rows modified since it when the template names a modified field
  (otherwise all F&O rows, since the entity offers nothing to filter on), are
  compared with the agreed sync state; agreed records that vanished from F&O
  are found too. Differences are queued.
- full (on demand): both sides are paged completely and compared with each
  other; memory holds one 16-byte digest per F&O record, never whole tables.
  With a `DifferenceSink` (the `--report` file), each difference is sent as
  found; for records that differ, the F&O side is read back by key (one
  `$batch` per Dataverse page) so the report shows both values of every
  differing field. Progress (rows compared, rate, ETA) goes to a `ProgressSink`.

Queued events carry `wire_format="reconcile"`: the worker re-reads both sides
and decides with `live=False`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from loyaltysync import mapping, timesource
from loyaltysync.bulk.source import Source
from loyaltysync.errors import MappingError
from loyaltysync.events.model import ChangeEvent
from loyaltysync.progress import NoProgress, ProgressSink
from loyaltysync.reconcile_report import Difference, DifferenceSink
from loyaltysync.runtime import Runtime
from loyaltysync.targets import fno as fno_client
from loyaltysync.targets.batch import BatchRequest
from loyaltysync.templates import Side, Template

log = logging.getLogger("loyaltysync.reconcile")

WATERMARK_SCOPE = "reconcile-watermark"
OVERLAP = timedelta(minutes=2)  # clock skew and in-flight writes: look back a little
SAMPLE = 1000
READ_BACK_PER_BATCH = 500  # F&O reads by key per $batch when a report needs both values


@dataclass
class ReconcileReport:
    """Counts of one pass, and a bounded sample of the differences."""

    template: str
    full: bool
    only_fo: int = 0
    only_dataverse: int = 0
    different: int = 0
    equal: int = 0
    queued: int = 0
    unmappable: int = 0
    differences: list[dict[str, Any]] = field(default_factory=list)

    def note(self, kind: str, key: Mapping[str, str], detail: Any = None) -> None:
        if len(self.differences) < SAMPLE:
            self.differences.append({"kind": kind, "key": mapping.key_text(key), "detail": detail})

    def summary(self) -> str:
        return (
            f"{self.template}: only in F&O {self.only_fo}, only in Dataverse {self.only_dataverse}, "
            f"different {self.different}, equal {self.equal}, queued {self.queued}, unmappable {self.unmappable}"
        )


def digest(template: Template, values: Mapping[str, Any]) -> bytes:
    """A 16-byte fingerprint of the synced fields of a canonical record."""
    synced = {f.key: values.get(f.key) for f in template.all_fields if f.fo and f.dataverse}
    return hashlib.blake2b(json.dumps(synced, sort_keys=True).encode(), digest_size=16).digest()


async def fo_records(
    runtime: Runtime, template: Template, *, since: str | None = None
) -> AsyncIterator[dict[str, Any]]:
    """Canonical F&O records, page by page (modified since `since` when the entity can filter)."""
    flt = None
    if since and template.fo.modified_field:
        flt = f"{template.fo.modified_field} gt {since}"
    async for page in runtime.fno.query(
        template.fo.entity_set,
        filter=flt,
        select=mapping.fo_select(template),
        cross_company=template.fo.company_specific,
    ):
        for row in page:
            yield mapping.fo_to_canonical(template, row)


async def dataverse_pages(
    runtime: Runtime, template: Template, *, since: str | None = None
) -> AsyncIterator[list[dict[str, Any]]]:
    """Canonical Dataverse records with lookups resolved, one page at a time."""
    flt = f"modifiedon gt {since}" if since else None
    async for page in runtime.dataverse.query(
        template.dataverse.entity_set, select=mapping.dataverse_select(template), filter=flt
    ):
        split = [mapping.dataverse_values(template, row) for row in page]
        for name in {n for _, found in split for n in found}:
            lookup = template.field(name).lookup
            wanted = [row_id for _, found in split if (row_id := found.get(name))]
            if lookup is not None and wanted:
                await runtime.engine.lookups.prepare(lookup, ids=wanted)
        records = []
        for values, found in split:
            values.update(mapping.resolve_lookups(template, found, runtime.engine.lookups))
            records.append(values)
        yield records


async def dataverse_records(
    runtime: Runtime, template: Template, *, since: str | None = None
) -> AsyncIterator[dict[str, Any]]:
    """Canonical Dataverse records with lookups resolved, page by page."""
    async for page in dataverse_pages(runtime, template, since=since):
        for values in page:
            yield values


def synced_fields(template: Template) -> list[str]:
    """The fields both sides hold (what `digest` covers and a report compares)."""
    return [f.key for f in template.all_fields if f.fo and f.dataverse]


async def fo_values_by_key(
    runtime: Runtime, template: Template, keys: Sequence[Mapping[str, str]]
) -> list[dict[str, Any] | None]:
    """Canonical F&O records for natural keys (None where missing), read in `$batch`es of GETs."""
    found: list[dict[str, Any] | None] = []
    params = {"$select": ",".join(mapping.fo_select(template))}
    for start in range(0, len(keys), READ_BACK_PER_BATCH):
        chunk = keys[start : start + READ_BACK_PER_BATCH]
        requests = [
            BatchRequest(
                "GET",
                fno_client.key_path(
                    template.fo.entity_set,
                    mapping.fo_key(template, key),
                    cross_company=template.fo.company_specific,
                    params=params,
                ),
            )
            for key in chunk
        ]
        for result in await runtime.fno.batch(requests, continue_on_error=True):
            row = result.body if result.ok and isinstance(result.body, dict) else None
            found.append(None if row is None else mapping.fo_to_canonical(template, row))
    return found


async def _queue(
    runtime: Runtime, template: Template, key: dict[str, str], side: Side, report: ReconcileReport
) -> None:
    event = ChangeEvent(template=template.name, side=side, operation="update", key=key, wire_format="reconcile")
    await runtime.enqueue(template.name, event.to_json())
    report.queued += 1


async def reconcile_full(
    runtime: Runtime,
    template: Template,
    *,
    fix: bool = True,
    sink: DifferenceSink | None = None,
    progress: ProgressSink | None = None,
) -> ReconcileReport:
    """Compare both sides completely; queue every record that differs (when `fix`).

    Every difference also goes to `sink` (with both values of each differing field);
    memory holds one digest per F&O key whatever the table sizes.
    """
    progress = progress or NoProgress()
    report = ReconcileReport(template.name, full=True)
    fo_digests: dict[tuple[str, ...], bytes] = {}
    progress.start(f"{template.name}: reading F&O", await Source(runtime, template, "fo", page_size=1).count())
    async for values in fo_records(runtime, template):
        progress.advance(1)
        try:
            key = mapping.natural_key(template, values, "fo")
        except MappingError:
            report.unmappable += 1
            continue
        fo_digests[tuple(key.values())] = digest(template, values)
    total = await Source(runtime, template, "dataverse", page_size=1).count()
    progress.start(f"{template.name}: comparing with Dataverse", total)
    fields = synced_fields(template)
    async for page in dataverse_pages(runtime, template):
        different: list[tuple[dict[str, str], dict[str, Any]]] = []
        for values in page:
            try:
                key = mapping.natural_key(template, values, "dataverse")
            except MappingError:
                report.unmappable += 1
                continue
            theirs = fo_digests.pop(tuple(key.values()), None)
            if theirs is None:
                report.only_dataverse += 1
                report.note("only-dataverse", key)
                if sink is not None:
                    sink.add(Difference(template.name, mapping.key_text(key), "only-dataverse"))
            elif theirs != digest(template, values):
                report.different += 1
                report.note("different", key)
                different.append((key, values))
            else:
                report.equal += 1
                continue
            if fix:
                await _queue(runtime, template, key, "dataverse", report)
        if sink is not None and different:
            fo_side = await fo_values_by_key(runtime, template, [key for key, _ in different])
            for (key, dv_values), fo_values in zip(different, fo_side, strict=True):
                if fo_values is None:  # deleted in F&O since it was read
                    sink.add(Difference(template.name, mapping.key_text(key), "only-dataverse"))
                    continue
                changed = {
                    name: (fo_values.get(name), dv_values.get(name))
                    for name in fields
                    if fo_values.get(name) != dv_values.get(name)
                }
                sink.add(Difference(template.name, mapping.key_text(key), "different", changed))
        progress.advance(len(page))
    for parts in fo_digests:
        key = dict(zip(template.key_names, parts, strict=True))
        report.only_fo += 1
        report.note("only-fo", key)
        if sink is not None:
            sink.add(Difference(template.name, mapping.key_text(key), "only-fo"))
        if fix:
            await _queue(runtime, template, key, "fo", report)
    return report


async def reconcile_incremental(runtime: Runtime, template: Template) -> ReconcileReport:
    """Compare what changed since the watermark with the agreed state; queue the differences."""
    report = ReconcileReport(template.name, full=False)
    started = timesource.utc()
    mark = await runtime.control.get(WATERMARK_SCOPE, template.name)
    since = None
    if mark and mark.get("at"):
        since = (datetime.fromisoformat(mark["at"]) - OVERLAP).strftime("%Y-%m-%dT%H:%M:%SZ")

    seen_fo: set[str] = set()
    full_fo_scan = not (since and template.fo.modified_field)
    async for values in fo_records(runtime, template, since=since):
        await _compare_with_state(runtime, template, values, "fo", report, seen_fo)
    async for values in dataverse_records(runtime, template, since=since):
        await _compare_with_state(runtime, template, values, "dataverse", report, None)
    if full_fo_scan:
        # Every F&O record was listed: agreed records not among them were deleted without an event.
        async for record in runtime.state.list(template.name):
            if not record.deleted and record.key not in seen_fo:
                key = mapping.natural_key(template, record.values, "fo")
                report.only_dataverse += 1
                report.note("missing-in-fo", key)
                await _queue(runtime, template, key, "fo", report)
    await runtime.control.set(WATERMARK_SCOPE, template.name, {"at": started.isoformat()})
    return report


async def _compare_with_state(
    runtime: Runtime,
    template: Template,
    values: dict[str, Any],
    side: Side,
    report: ReconcileReport,
    seen: set[str] | None,
) -> None:
    try:
        key = mapping.natural_key(template, values, side)
    except MappingError:
        report.unmappable += 1
        return
    text = mapping.key_text(key)
    if seen is not None:
        seen.add(text)
    record = await runtime.state.get(template.name, text)
    if record is not None and not record.deleted and digest(template, record.values) == digest(template, values):
        report.equal += 1
        return
    if record is None or record.deleted:
        if side == "fo":
            report.only_fo += 1
        else:
            report.only_dataverse += 1
    else:
        report.different += 1
    report.note("changed-since-agreed", key, side)
    await _queue(runtime, template, key, side, report)


async def reconcile_all(runtime: Runtime, *, full: bool) -> list[ReconcileReport]:
    """One pass over every template that is not paused."""
    reports = []
    for template in runtime.templates.values():
        if await runtime.paused(template.name):
            continue
        report = await reconcile_full(runtime, template) if full else await reconcile_incremental(runtime, template)
        reports.append(report)
    return reports
