"""The sync step for one change event: read, decide, write, record. The imperative shell.

Everything that decides is pure (`mapping`, `decide`); this module only does
the I/O around it, in a fixed order:

1. find the natural key (a Dataverse delete may carry only a row id);
2. skip events older than what was already applied from their side;
3. get the source record (the event payload when complete and not our own
   write, otherwise a re-read) and the target record (always read: it is needed
   for field-level writes and conflicts);
4. decide; write the changed fields to the other side by natural key
   (create-only / update-only, so a concurrent create or delete is noticed);
5. store the new agreed values with the state's ETag. A lost ETag race
   re-runs the whole step, which is idempotent.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import weakref
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from loyaltysync import mapping
from loyaltysync.decide import Agreed, Decision, SideRecord, agreed_from_state, decide, is_newer, is_stale, with_pending
from loyaltysync.errors import ConcurrencyError, MappingError, TargetError
from loyaltysync.events.model import ChangeEvent, utc_now
from loyaltysync.state import StateStore, SyncRecord
from loyaltysync.targets.dataverse import DataverseClient
from loyaltysync.targets.fno import FnoClient
from loyaltysync.targets.lookups import LookupCache
from loyaltysync.templates import Side, Template

log = logging.getLogger("loyaltysync.sync")

MAX_STATE_RACES = 5
# A step's stored intent (`SyncRecord.pending`) younger than this means another step is writing the record
# now: wait for it. Older, its step died: the intent is evidence of what may have landed. Longer than a
# step's writes take, shorter than the queue's retries last (maxDequeueCount x visibilityTimeout).
WRITING_ELSEWHERE_S = 15.0
BUSY_PAUSE_S = 0.25
A = TypeVar("A")
B = TypeVar("B")


@dataclass(slots=True)
class Outcome:
    """What one sync step did, for logs, metrics and the demo's event feed."""

    template: str
    side: Side
    key: str
    reason: str
    writes: dict[str, list[str]] = field(default_factory=dict)
    created: str | None = None
    deleted: str | None = None
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    duration_ms: float = 0.0

    @property
    def applied(self) -> bool:
        return bool(self.writes) or self.created is not None or self.deleted is not None


class _Raced(ConcurrencyError):
    """The state changed between our read and our write; carries what this attempt did."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(f"sync state of {outcome.template} {outcome.key} changed under us")
        self.outcome = outcome


class _Busy(ConcurrencyError):
    """Another step (another instance, or one that just died) stored an intent for this record moments ago."""


class Engine:
    """Runs sync steps against one F&O and one Dataverse environment."""

    def __init__(
        self,
        templates: Mapping[str, Template],
        fno: FnoClient,
        dataverse: DataverseClient,
        lookups: LookupCache,
        state: StateStore,
        *,
        integration_users: frozenset[str] = frozenset(),
        writing_elsewhere_s: float = WRITING_ELSEWHERE_S,
    ) -> None:
        self.templates = templates
        self.writing_elsewhere_s = writing_elsewhere_s
        self.instance = uuid.uuid4().hex[:12]  # marks this process's intents: its own are never "elsewhere"
        self.fno = fno
        self.dataverse = dataverse
        self.lookups = lookups
        self.state = state
        self.integration_users = integration_users
        # One step at a time per record in this process: concurrent events for one key would
        # otherwise both read the old state and both write. Across instances the state ETag decides.
        self._locks: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = weakref.WeakValueDictionary()

    def _lock(self, template: str, key: str) -> asyncio.Lock:
        lock = self._locks.get((template, key))
        if lock is None:
            lock = asyncio.Lock()
            self._locks[(template, key)] = lock
        return lock

    def template(self, name: str) -> Template:
        """The template an event names; an unknown one is a permanent MappingError."""
        template = self.templates.get(name)
        if template is None:
            raise MappingError(name, "(template)", name, "no such template in mappings/")
        return template

    async def process(self, event: ChangeEvent, *, live: bool = True) -> Outcome:
        """Bring the record an event is about in step on both sides. Idempotent.

        Raises MappingError / non-transient TargetError for records that cannot
        be synced (the caller parks them) and transient TargetError for the
        caller to retry later.
        """
        template = self.template(event.template)
        async with self._lock(template.name, event.key_text or event.row_id or ""):
            return await self._process(template, event, live=live)

    async def _process(self, template: Template, event: ChangeEvent, *, live: bool) -> Outcome:
        started = time.perf_counter()
        if event.wire_format == "replay":
            # A replay follows a fix (say, a currency added in Dataverse): cached "no such row"
            # answers are stale on whichever instance picks the replayed message up.
            self.lookups.forget()
        earlier: Outcome | None = None
        for attempt in range(1, MAX_STATE_RACES + 1):
            try:
                outcome = await self._step(template, event, live=live)
            except _Busy:
                log.info("%s %s is being written by another step; waiting", template.name, event.key_text)
                await asyncio.sleep(BUSY_PAUSE_S * attempt)
                continue
            except _Raced as raced:
                # The writes of the raced attempt happened; the re-run sees their result.
                log.info("state of %s %s changed under us; re-running", template.name, event.key_text)
                earlier = raced.outcome if raced.outcome.applied else earlier
                continue
            except ConcurrencyError:
                log.info("%s %s changed while writing; re-running", template.name, event.key_text)
                continue
            if earlier is not None and not outcome.applied:
                outcome = earlier
            outcome.duration_ms = (time.perf_counter() - started) * 1000
            return outcome
        # Transient (503): the queue tries the message again after its visibility timeout, by when the
        # other writer is done. (A 409 would be taken for a permanent refusal and parked.)
        raise TargetError("state", 503, "ConcurrencyVersionMismatch", "sync state kept changing; will retry")

    async def _step(self, template: Template, event: ChangeEvent, *, live: bool) -> Outcome:
        key = await self._natural_key(template, event)
        if key is None:
            return Outcome(template.name, event.side, event.row_id or "?", "unknown-row")
        key_text = mapping.key_text(key)
        record = await self.state.get(template.name, key_text)
        ours = (event.initiating_user or "").lower() in self.integration_users
        if record is not None and is_stale(event.source_version, record.versions.get(event.side)):
            return Outcome(template.name, event.side, key_text, "echo" if ours else "stale")
        if record is not None and _writing_elsewhere(record, self.writing_elsewhere_s, self.instance):
            # Its writes may not have landed yet: reading now could miss them, and clearing its intent
            # would lose the proof that they are the sync's own (see SyncRecord.pending).
            raise _Busy(f"{template.name} {key_text} is being written by another step")

        # A payload can predate a delete already applied (webhooks come late and out of order, and a
        # delete carries no version to make them stale): for a tombstone only a re-read says it exists.
        tombstone = record is not None and record.deleted
        use_payload = event.complete and not ours and event.operation != "delete" and not tombstone
        payload = self._payload_record(template, event) if use_payload else None
        fo, dv = await _both(
            payload if payload is not None and event.side == "fo" else self.read_fo(template, key),
            payload if payload is not None and event.side == "dataverse" else self.read_dataverse(template, key),
        )
        fo = _with_fo_time(template, fo, record, event)
        if event.wire_format == "recheck":
            fo = _changed_since_deferral(fo, event)

        agreed = agreed_from_state(record.values if record else None, record.deleted if record else False)
        if not agreed.exists and event.before and fo.exists and dv.exists and not (record and record.deleted):
            # No agreed values yet (both sides held the record before the sync did): the pre-image says
            # what this change touched, so fields it did not touch are not a conflict with the other side.
            agreed = Agreed(values=dict(event.before), exists=True)
        if record is not None and record.pending:
            records: dict[Side, SideRecord] = {"fo": fo, "dataverse": dv}
            unsure = _create_gone(record.pending, records, event) if live else None
            if unsure is not None:
                return _waiting_for_delete(template, event, key_text, unsure)
            agreed = with_pending(agreed, record.pending, records, deleted=_deleted_side(event))
        decision = decide(template, fo, dv, agreed, trigger=event.side, live=live, from_integration_user=ours)
        if decision.acts:
            record = await self._intend(template, key_text, record, agreed, decision)
        row_id = await self._apply(template, key, decision, fo, dv)
        outcome = Outcome(
            template.name,
            event.side,
            key_text,
            decision.reason,
            writes={side: sorted(values) for side, values in decision.writes.items()},
            created=decision.create,
            deleted=decision.delete,
            conflicts=[
                {"field": c.field, "fo": c.fo_value, "dataverse": c.dataverse_value, "winner": c.winner, "rule": c.rule}
                for c in decision.conflicts
            ],
        )
        try:
            await self._record(template, key_text, event, decision, record, dv, row_id)
        except ConcurrencyError as exc:
            raise _Raced(outcome) from exc
        return outcome

    # ------------------------------------------------------------ reading

    async def _natural_key(self, template: Template, event: ChangeEvent) -> dict[str, str] | None:
        if event.key:
            return dict(event.key)
        if event.row_id:
            known = await self.state.find_by_row_id(template.name, event.row_id)
            if known is not None:
                # From the agreed values, not by splitting the key text: key values may contain "|".
                return mapping.natural_key(template, known.values)
            row = await self.dataverse.get_by_id(
                template.dataverse.entity_set, event.row_id, mapping.dataverse_select(template)
            )
            if row is not None:
                values = await self._dataverse_canonical(template, row)
                return mapping.natural_key(template, values, "dataverse")
        return None

    async def read_fo(self, template: Template, key: Mapping[str, str]) -> SideRecord:
        """The F&O record by natural key, in canonical form (missing: values None)."""
        row = await self.fno.get(
            template.fo.entity_set,
            mapping.fo_key(template, key),
            select=mapping.fo_select(template),
            cross_company=template.fo.company_specific,
        )
        if row is None:
            return SideRecord(values=None)
        modified = row.get(template.fo.modified_field) if template.fo.modified_field else None
        modified = mapping.normalize_time(modified)
        return SideRecord(mapping.fo_to_canonical(template, row), modified_on=modified, version=row.get("@odata.etag"))

    async def read_dataverse(self, template: Template, key: Mapping[str, str]) -> SideRecord:
        """The Dataverse record by alternate key, in canonical form (missing: values None)."""
        row = await self.dataverse.get_by_key(
            template.dataverse.entity_set, mapping.dataverse_key(template, key), mapping.dataverse_select(template)
        )
        if row is None:
            return SideRecord(values=None)
        return await self.dataverse_side(template, row)

    async def dataverse_side(self, template: Template, row: Mapping[str, Any]) -> SideRecord:
        """A Dataverse Web API row as a SideRecord (lookups resolved to natural keys)."""
        version = row.get("versionnumber")
        return SideRecord(
            await self._dataverse_canonical(template, row),
            modified_on=mapping.normalize_time(row.get("modifiedon")),
            version=str(version) if version is not None else None,
            row_id=row.get(template.dataverse.primary_id),
        )

    async def _dataverse_canonical(self, template: Template, row: Mapping[str, Any]) -> dict[str, Any]:
        values, lookup_ids = mapping.dataverse_values(template, row)
        values.update(await self._resolve(template, lookup_ids))
        return values

    async def _resolve(self, template: Template, lookup_ids: Mapping[str, str | None]) -> dict[str, Any]:
        for name, row_id in lookup_ids.items():
            lookup = template.field(name).lookup
            if lookup is not None and row_id:
                await self.lookups.prepare(lookup, ids=[row_id])
        return mapping.resolve_lookups(template, lookup_ids, self.lookups)

    async def _payload_record(self, template: Template, event: ChangeEvent) -> SideRecord:
        values = dict(event.fields)
        values.update(await self._resolve(template, event.lookup_ids))
        return SideRecord(values, modified_on=event.modified_on, version=event.source_version, row_id=event.row_id)

    # ------------------------------------------------------------ writing

    async def _intend(
        self, template: Template, key_text: str, record: SyncRecord | None, agreed: Agreed, decision: Decision
    ) -> SyncRecord:
        """Store what is about to be written before writing it (see `SyncRecord.pending`).

        Also claims the record: another instance's step on the same record, started from the
        same state, now fails its ETag here, before writing anything, and re-runs; a step that
        reads the record meanwhile waits (`_Busy`). An earlier step's intent (a step that died)
        is replaced, so what it proved is kept as agreed values first.
        """
        base = record or SyncRecord(template=template.name, key=key_text)
        if base.pending:
            deleted = base.deleted if not agreed.values else not agreed.exists
            base = replace(base, values=dict(agreed.values), deleted=deleted)
        pending: dict[str, dict[str, Any]] = {side: dict(values) for side, values in decision.writes.items()}
        if decision.create is not None:
            pending[decision.create]["@create"] = True
        if decision.delete is not None:
            pending[decision.delete] = {"@delete": True}
        pending["@"] = {"at": utc_now(), "by": self.instance}
        return await self.state.put(replace(base, pending=pending))

    async def _apply(
        self, template: Template, key: dict[str, str], decision: Decision, fo: SideRecord, dv: SideRecord
    ) -> str | None:
        row_id = dv.row_id
        try:
            if decision.delete == "fo":
                await self.fno.delete(
                    template.fo.entity_set, mapping.fo_key(template, key), cross_company=template.fo.company_specific
                )
            elif decision.delete == "dataverse":
                await self.dataverse.delete_by_key(
                    template.dataverse.entity_set,
                    mapping.dataverse_key(template, key),
                    id_column=template.dataverse.primary_id,
                )
                row_id = None
            for side, values in decision.writes.items():
                create = decision.create == side
                if side == "fo":
                    await self.write_fo(template, key, values, create=create)
                else:
                    row_id = await self.write_dataverse(template, key, values, create=create) or row_id
        except TargetError as exc:
            # Update-only found no row (deleted meanwhile) or create-only found one (created
            # meanwhile): the record changed under us, so decide again from fresh reads.
            if exc.status in (404, 412):
                raise ConcurrencyError(str(exc)) from exc
            raise
        return row_id

    async def write_fo(
        self, template: Template, key: Mapping[str, str], values: Mapping[str, Any], *, create: bool
    ) -> None:
        """Write canonical values to F&O by natural key: create (race-safe) or update-only."""
        body = mapping.canonical_to_fo(template, values, create=create)
        fo_key = mapping.fo_key(template, key)
        if create:
            await self.fno.create_or_update(template.fo.entity_set, fo_key, {**body, **fo_key})
        else:
            await self.fno.update(template.fo.entity_set, fo_key, body)

    async def write_dataverse(
        self, template: Template, key: Mapping[str, str], values: Mapping[str, Any], *, create: bool
    ) -> str | None:
        """Write canonical values to Dataverse by alternate key: create-only or update-only."""
        for f in template.fields_to("dataverse"):
            if f.lookup is not None and values.get(f.key):
                await self.lookups.prepare(f.lookup, keys=[str(values[f.key])])
        body = mapping.canonical_to_dataverse(template, values, self.lookups, create=create)
        dv_key = mapping.dataverse_key(template, key)
        if create:
            body.update(dv_key)
        return await self.dataverse.upsert(
            template.dataverse.entity_set,
            dv_key,
            body,
            mode="create" if create else "update",
            id_column=template.dataverse.primary_id,
        )

    async def _record(
        self,
        template: Template,
        key_text: str,
        event: ChangeEvent,
        decision: Decision,
        record: SyncRecord | None,
        dv: SideRecord,
        row_id: str | None,
    ) -> None:
        versions = dict(record.versions) if record else {}
        modified = dict(record.modified) if record else {}
        if event.source_version is not None:
            versions[event.side] = event.source_version
        # Any Dataverse change after this read gets a higher versionnumber, so
        # events at or below it are already reflected in this decision.
        if dv.version is not None and is_newer(dv.version, versions.get("dataverse")):
            versions["dataverse"] = dv.version
        changed_at = event.modified_on if event.wire_format != "recheck" else None  # a re-check's is its deferral
        if changed_at and is_newer(changed_at, modified.get(event.side)):
            modified[event.side] = changed_at  # the latest: a late event's older time changes nothing
        new = SyncRecord(
            template=template.name,
            key=key_text,
            values=decision.agreed if decision.exists_after else dict(record.values) if record else {},
            versions=versions,
            modified=modified,
            row_id=row_id if decision.exists_after else None,
            deleted=not decision.exists_after,
            updated_at=utc_now(),
            etag=record.etag if record else None,
        )
        unchanged = record is not None and (
            record.values,
            record.deleted,
            record.versions,
            record.modified,
            record.row_id,
            record.pending,
        ) == (new.values, new.deleted, new.versions, new.modified, new.row_id, new.pending)
        if not unchanged:
            await self.state.put(new)


async def _both(first: Awaitable[A], second: Awaitable[B]) -> tuple[A, B]:
    """Await two independent reads at once; if one fails, the other is cancelled."""
    a, b = asyncio.ensure_future(first), asyncio.ensure_future(second)
    try:
        return await a, await b
    except BaseException:
        a.cancel()
        b.cancel()
        raise


def _with_fo_time(template: Template, fo: SideRecord, record: SyncRecord | None, event: ChangeEvent) -> SideRecord:
    """F&O's record with the best time known for it.

    When the F&O entity has a modified field, its row says. Otherwise the latest F&O
    event time seen for the record (this event's or the state's) is used, marked as a
    lower bound: F&O's current values were written at that time or later.
    """
    if fo.modified_on is not None or not fo.exists:
        return fo
    own = event.modified_on if event.side == "fo" and event.wire_format != "recheck" else None
    times = [record.modified.get("fo") if record else None, own]
    known = [moment for moment in times if moment]
    if not known:
        return fo
    latest = known[0] if len(known) == 1 or not is_newer(known[1], known[0]) else known[1]
    return replace(fo, modified_on=latest, time_is_floor=True)


def _changed_since_deferral(fo: SideRecord, recheck: ChangeEvent) -> SideRecord:
    """On a re-check: F&O's deferred fields changed since the deferral make F&O at least that recent.

    The re-check carries F&O's values of the deferred fields and the deferral's moment. A
    different value now was written after that moment, so after Dataverse's conflicting change.
    """
    if not fo.exists or not recheck.modified_on or (fo.modified_on is not None and not fo.time_is_floor):
        return fo
    values = fo.values or {}
    if all(values.get(name) == value for name, value in recheck.fields.items()):
        return fo
    if fo.modified_on is not None and not is_newer(recheck.modified_on, fo.modified_on):
        return fo
    return replace(fo, modified_on=recheck.modified_on, time_is_floor=True)


def _writing_elsewhere(record: SyncRecord, within_s: float, instance: str) -> bool:
    """Whether the record holds another instance's intent stored less than `within_s` seconds ago.

    This process's own intents are not: steps on one record run one at a time here (the
    per-key lock), so an own intent seen by a step is from one that failed or died.
    """
    meta = record.pending.get("@", {})
    if meta.get("by") == instance:
        return False
    stored = meta.get("at")
    try:
        at = mapping.parse_datetime(stored) if isinstance(stored, str) else None
    except ValueError:
        return False
    if at is None:
        return False
    return (datetime.now(UTC) - at).total_seconds() < within_s


def _deleted_side(event: ChangeEvent) -> Side | None:
    return event.side if event.operation == "delete" else None


def _create_gone(
    pending: dict[str, dict[str, Any]], records: dict[Side, SideRecord], event: ChangeEvent
) -> Side | None:
    """The side an interrupted step was creating the record on, when it is missing there now.

    Then the create never happened, or it did and a person deleted the record since: only that
    side's delete event can tell. Until it comes (or the re-check, which takes "never happened"),
    nothing is created, so a deleted record is not brought back.
    """
    for side, record in records.items():
        if (pending.get(side) or {}).get("@create") and not record.exists and _deleted_side(event) != side:
            return side
    return None


def _waiting_for_delete(template: Template, event: ChangeEvent, key_text: str, side: Side) -> Outcome:
    rule = f"an interrupted create in {side} may have landed and been deleted since: waiting for its delete event"
    conflict = {"field": "(record)", "fo": None, "dataverse": None, "winner": None, "rule": rule}
    return Outcome(template.name, event.side, key_text, "conflict-deferred", conflicts=[conflict])
