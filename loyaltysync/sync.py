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
import weakref
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from loyaltysync import mapping, timesource
from loyaltysync.decide import (
    Agreed,
    Decision,
    SideRecord,
    agreed_from_state,
    decide,
    holds,
    is_newer,
    is_stale,
    latest,
    with_pending,
)
from loyaltysync.errors import ConcurrencyError, MappingError, TargetError
from loyaltysync.events.model import ChangeEvent, utc_now
from loyaltysync.state import StateStore, SyncRecord
from loyaltysync.targets.dataverse import DataverseClient
from loyaltysync.targets.fno import FnoClient
from loyaltysync.targets.lookups import LookupCache
from loyaltysync.templates import Side, Template, other_side

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


# The code of the transient TargetError for a record another instance is writing (see Engine._process).
RECORD_BUSY = "RecordBusy"
# In `SyncRecord.modified`: F&O's change time of one field ("fo:CardTenderType"), from update events
# that name the fields they submitted.
FO_FIELD_TIME = "fo:"
# In `SyncRecord.modified`: when the sync last wrote Dataverse (its own clock).
DATAVERSE_WRITTEN_AT = "dataverse:written-at"
# In `SyncRecord.versions`: present while the sync's last Dataverse write is newer than its last read
# there (the value is the version read before that write).
WRITTEN_SINCE_READ = "dataverse:written"
# The "field" of a deferral that waits for the event telling what an interrupted step did (see _unsure).
WHOLE_RECORD = "(record)"
# Read with every Dataverse row besides the mapped columns: who created it (see Engine._dataverse_creator).
CREATED_BY = "_createdby_value"


class _Busy(ConcurrencyError):
    """Another step (another instance, or one that just died) stored an intent for this record moments ago."""

    def __init__(self, message: str, until_s: float) -> None:
        super().__init__(message)
        self.until_s = until_s  # seconds until that intent counts as a dead step's


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
        self.instance = timesource.new_id()[:12]  # marks this process's intents: its own are never "elsewhere"
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
        busy: _Busy | None = None
        for attempt in range(1, MAX_STATE_RACES + 1):
            try:
                outcome = await self._step(template, event, live=live)
            except _Busy as exc:
                log.info("%s %s is being written by another step; waiting", template.name, event.key_text)
                busy = exc
                await asyncio.sleep(BUSY_PAUSE_S * attempt)
                continue
            except _Raced as raced:
                # The writes of the raced attempt happened; the re-run sees their result.
                log.info("state of %s %s changed under us; re-running", template.name, event.key_text)
                earlier = raced.outcome if raced.outcome.applied else earlier
                busy = None
                continue
            except ConcurrencyError:
                log.info("%s %s changed while writing; re-running", template.name, event.key_text)
                busy = None
                continue
            if earlier is not None and not outcome.applied:
                outcome = earlier
            outcome.duration_ms = (time.perf_counter() - started) * 1000
            return outcome
        if busy is not None:
            # Another instance's intent, fresh until `busy.until_s` from now (it may have died): the
            # worker puts the event back for then, not counting it as a failed attempt.
            raise TargetError("state", 503, RECORD_BUSY, str(busy), retry_after=busy.until_s)
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
        if record is not None and is_stale(event.source_version, record.versions.get(event.side), event.operation):
            return Outcome(template.name, event.side, key_text, "echo" if ours else "stale")
        fresh_s = _writing_elsewhere(record, self.writing_elsewhere_s, self.instance) if record else 0.0
        if fresh_s > 0:
            # Its writes may not have landed yet: reading now could miss them, and clearing its intent
            # would lose the proof that they are the sync's own (see SyncRecord.pending).
            raise _Busy(f"{template.name} {key_text} is being written by another step", fresh_s)

        # A payload can predate a delete already applied (webhooks come late and out of order, and not
        # every event carries a version to make them stale): for a tombstone only a re-read says it exists.
        tombstone = record is not None and record.deleted
        use_payload = (
            event.complete and not ours and event.operation != "delete" and not tombstone
            and not _written_since_read(record, event.side)
        )
        payload = self._payload_record(template, event) if use_payload else None
        fo, dv = await _both(
            payload if payload is not None and event.side == "fo" else self.read_fo(template, key),
            payload if payload is not None and event.side == "dataverse" else self.read_dataverse(template, key),
        )
        changed_at = None if ours else _change_time(event, fo, record)  # ours: the time of the sync's write
        dv = _without_own_write_time(dv, record)
        fo = _with_fo_time(fo, record, changed_at if event.side == "fo" else None, event.changed)
        if event.wire_format == "recheck":
            fo = _changed_since_deferral(fo, event)

        agreed = agreed_from_state(record.values if record else None, record.deleted if record else False)
        if not agreed.exists and event.before and fo.exists and dv.exists and not (record and record.deleted):
            # No agreed values yet (both sides held the record before the sync did): the pre-image says
            # what this change touched, so fields it did not touch are not a conflict with the other side.
            agreed = Agreed(values=dict(event.before), exists=True)
        if record is not None and record.pending:
            records: dict[Side, SideRecord] = {"fo": fo, "dataverse": dv}
            # A re-check's time is the moment of its deferral, not of a change: it dates nothing here.
            change = event.wire_format != "recheck"
            deleted = _after_intent(record.pending, event, "delete") if change else None
            creator = self._dataverse_creator(record.pending, dv)
            recreated = None if ours else (
                (_after_intent(record.pending, event, "create") if change else None)
                or ("dataverse" if creator == "person" else None)
            )
            echo = _proof_of_write(event, ours)
            unsure = _unsure(record.pending, records, deleted, recreated, echo[0] if echo else None) if live else None
            if unsure is not None:
                return _waiting_for_event(template, event, key_text, unsure)
            overwritten: tuple[Side, list[str]] | None = None
            if change and not ours and event.side == "fo" and event.changed and _after_intent(
                record.pending, event, "update"
            ):
                overwritten = ("fo", list(event.changed))  # F&O names no user: a change of ours holds the intent
            agreed = with_pending(
                agreed, record.pending, records, deleted=deleted, recreated=recreated, echo=echo,
                overwritten=overwritten, created_by_sync="dataverse" if creator == "sync" else None,
            )
        decision = decide(template, fo, dv, agreed, trigger=event.side, live=live, from_integration_user=ours)
        if decision.acts:
            record = await self._intend(template, key_text, record, agreed, decision, {"fo": fo, "dataverse": dv})
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
            dv_read = payload is None or event.side != "dataverse"
            await self._record(template, key_text, event, changed_at, decision, record, dv, dv_read, row_id)
        except ConcurrencyError as exc:
            raise _Raced(outcome) from exc
        return outcome

    def _dataverse_creator(self, pending: dict[str, dict[str, Any]], dv: SideRecord) -> str | None:
        """Who created the Dataverse row a step died creating: "sync", "person", or None (unknown, or no such step).

        Only the sync creates rows as an integration user: a row created by anyone else is not the
        step's create (which never landed, or landed and was deleted since), whatever event comes first.
        """
        intent = pending.get("dataverse") or {}
        creator = (dv.created_by or "").lower()
        if intent.get("@create") and dv.exists and creator and self.integration_users:
            return "sync" if creator in self.integration_users else "person"
        return None

    # ------------------------------------------------------------ reading

    async def _natural_key(self, template: Template, event: ChangeEvent) -> dict[str, str] | None:
        if event.key:
            return dict(event.key)
        if event.row_id:
            known = await self.state.find_by_row_id(template.name, event.row_id)
            if known is not None:
                # From the agreed values, not by splitting the key text: key values may contain "|".
                return mapping.natural_key(template, known.values)
            columns = _dataverse_columns(template)
            row = await self.dataverse.get_by_id(template.dataverse.entity_set, event.row_id, columns)
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
            template.dataverse.entity_set, mapping.dataverse_key(template, key), _dataverse_columns(template)
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
            created_by=row.get(CREATED_BY),
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
        self,
        template: Template,
        key_text: str,
        record: SyncRecord | None,
        agreed: Agreed,
        decision: Decision,
        read: dict[Side, SideRecord],
    ) -> SyncRecord:
        """Store what is about to be written before writing it (see `SyncRecord.pending`).

        Also claims the record: another instance's step on the same record, started from the
        same state, now fails its ETag here, before writing anything, and re-runs; a step that
        reads the record meanwhile waits (`_Busy`). An earlier step's intent (a step that died)
        is replaced, so what it proved is kept as agreed values first. A delete keeps the row id
        and version it read (`@row_id`, `@version`): the row there later is the same or a new one.
        """
        base = record or SyncRecord(template=template.name, key=key_text)
        if base.pending:
            deleted = base.deleted if not agreed.values else not agreed.exists
            base = replace(base, values=dict(agreed.values), deleted=deleted)
        pending: dict[str, dict[str, Any]] = {side: dict(values) for side, values in decision.writes.items()}
        if decision.create is not None:
            pending[decision.create]["@create"] = True
        for side in decision.writes:
            if side != decision.create:
                pending[side]["@version"] = read[side].version  # a row changed since: see _unsure
        if decision.delete is not None:
            was = read[decision.delete]
            pending[decision.delete] = {"@delete": True, "@row_id": was.row_id, "@version": was.version}
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
        """Write canonical values to F&O by natural key: create-only or update-only."""
        body = mapping.canonical_to_fo(template, values, create=create)
        fo_key = mapping.fo_key(template, key)
        if create:
            if not await self.fno.create_new(template.fo.entity_set, fo_key, body):
                # Created meanwhile (by a person, or by this POST before a timeout): decide again.
                raise ConcurrencyError(f"{template.fo.entity_set} {fo_key} exists now")
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
        changed_at: str | None,
        decision: Decision,
        record: SyncRecord | None,
        dv: SideRecord,
        dv_read: bool,
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
        if "dataverse" in decision.writes or decision.create == "dataverse":
            versions[WRITTEN_SINCE_READ] = dv.version  # see _written_since_read
            modified[DATAVERSE_WRITTEN_AT] = utc_now()  # see _without_own_write_time
        elif dv_read:
            versions.pop(WRITTEN_SINCE_READ, None)
        # The latest: a late event's older time changes nothing. An F&O update naming its fields
        # dates those fields only (see _with_fo_time).
        for name in _time_keys(event) if changed_at else ():
            if is_newer(changed_at, modified.get(name)):
                modified[name] = changed_at
        if dv.modified_on and is_newer(dv.modified_on, modified.get("dataverse")):
            modified["dataverse"] = dv.modified_on  # a person's change seen in the read (not the sync's write)
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


def _change_time(event: ChangeEvent, fo: SideRecord, record: SyncRecord | None) -> str | None:
    """When the event's side changed the record, as far as this event tells.

    A re-check's time is its deferral, not a change. An F&O update whose submitted fields all
    hold the agreed values now tells nothing about F&O's other values: typically it is the event
    of the sync's own write (F&O events name no user), and its time would make F&O's older edits
    look as new as that write.
    """
    if event.wire_format == "recheck":
        return None
    if event.side == "fo" and event.changed and record is not None and not record.deleted and fo.exists:
        values = fo.values or {}
        if all(values.get(name) == record.values.get(name) for name in event.changed):
            return None
    return event.modified_on


def _without_own_write_time(dv: SideRecord, record: SyncRecord | None) -> SideRecord:
    """Dataverse's record with a `modifiedon` that is not the time of the sync's own last write there.

    `modifiedon` is the row's, so after the sync writes one field it dates every field: an agent's
    older edit of another field would win a conflict with an F&O edit made between the two. When the
    row was last changed no later than the sync's last write, the latest time of a person's change
    seen before (in an event or a read) stands in for it (none known: the conflict waits for one).
    """
    written = record.modified.get(DATAVERSE_WRITTEN_AT) if record else None
    if record is None or not written or not dv.exists or not dv.modified_on:
        return dv
    if is_newer(dv.modified_on, written):
        return dv  # changed after the sync's write: that change is a person's
    return replace(dv, modified_on=record.modified.get("dataverse"))


def _time_keys(event: ChangeEvent) -> list[str]:
    """Where an event's change time is kept in `SyncRecord.modified`: its side, or per field."""
    if event.side == "fo" and event.changed:
        return [FO_FIELD_TIME + name for name in event.changed]
    return [event.side]


def _with_fo_time(
    fo: SideRecord, record: SyncRecord | None, changed_at: str | None, changed: list[str]
) -> SideRecord:
    """F&O's record with the best times known for it.

    When the F&O entity has a modified field, its row says. Otherwise the latest F&O event
    time seen, marked as a lower bound (F&O's current values were written then or later):
    per field for update events that name their fields (an F&O user's edit of one field
    says nothing about when another field changed), for the whole record otherwise.
    """
    if fo.modified_on is not None or not fo.exists:
        return fo
    kept = record.modified if record else {}
    fields = {name[len(FO_FIELD_TIME):]: t for name, t in kept.items() if name.startswith(FO_FIELD_TIME) and t}
    whole = kept.get("fo")
    if changed_at and changed:
        for name in changed:
            fields[name] = latest(fields.get(name), changed_at) or changed_at
    elif changed_at:
        whole = latest(whole, changed_at)
    if whole is None and not fields:
        return fo
    return replace(fo, modified_on=whole, field_times=fields, time_is_floor=True)


def _changed_since_deferral(fo: SideRecord, recheck: ChangeEvent) -> SideRecord:
    """On a re-check: F&O's deferred fields changed since the deferral are at least that recent.

    The re-check carries F&O's values of the deferred fields and the deferral's moment. A
    different value now was written after that moment, so after Dataverse's conflicting change.
    """
    if not fo.exists or not recheck.modified_on or (fo.modified_on is not None and not fo.time_is_floor):
        return fo
    values = fo.values or {}
    times = dict(fo.field_times)
    for name, value in recheck.fields.items():
        if values.get(name) != value:
            times[name] = latest(times.get(name), recheck.modified_on) or recheck.modified_on
    if times == fo.field_times:
        return fo
    return replace(fo, field_times=times, time_is_floor=True)


def _written_since_read(record: SyncRecord | None, side: Side) -> bool:
    """Whether the sync wrote Dataverse after its last read there (or a step that died may have written).

    A Dataverse webhook's payload is the row as of that change. A change made between a step's
    read and its write has a higher version than the read, so it is not stale, but its payload
    lacks the sync's write made after it: taken as current, it would undo that write. Until a
    step reads Dataverse again (which reflects everything up to then), payloads are not trusted.
    """
    if side != "dataverse" or record is None:
        return False
    # Any intent left by a step that died: what it did is judged from fresh reads (a payload from
    # before its delete would bring the record back).
    return WRITTEN_SINCE_READ in record.versions or bool(record.pending)


def _writing_elsewhere(record: SyncRecord, within_s: float, instance: str) -> float:
    """Seconds until another instance's intent on the record is `within_s` old (0: none, or older).

    This process's own intents are not: steps on one record run one at a time here (the
    per-key lock), so an own intent seen by a step is from one that failed or died.
    """
    meta = record.pending.get("@", {})
    if meta.get("by") == instance:
        return 0.0
    stored = meta.get("at")
    try:
        at = mapping.parse_datetime(stored) if isinstance(stored, str) else None
    except ValueError:
        return 0.0
    if at is None:
        return 0.0
    return max(0.0, within_s - (timesource.utc() - at).total_seconds())


def _after_intent(pending: dict[str, dict[str, Any]], event: ChangeEvent, operation: str) -> Side | None:
    """The event's side, when the event is an `operation` made after the intent was stored.

    Compared in whole seconds (F&O's event times have no fraction); clocks are taken to agree
    to the second. A create made then is a new record: an intent deletes only records agreed on
    both sides, created well before it. A delete made then proves an intended create landed; an
    older delete event (a late one) proves nothing about it. A delete event without a time counts.
    """
    if event.operation != operation:
        return None
    stored = pending.get("@", {}).get("at")
    try:
        made = mapping.parse_datetime(event.modified_on) if event.modified_on else None
        at = mapping.parse_datetime(stored) if isinstance(stored, str) else None
    except ValueError:
        made = at = None
    if made is None or at is None:
        return event.side if operation == "delete" else None
    return event.side if made >= at.replace(microsecond=0) else None


def _dataverse_columns(template: Template) -> list[str]:
    return [*mapping.dataverse_select(template), CREATED_BY]


def _proof_of_write(event: ChangeEvent, ours: bool) -> tuple[Side, dict[str, Any]] | None:
    """Values the event's side held at a moment after a step's write there, if the event shows them.

    The webhook of the sync's own write carries the row as written (proof it landed, even when a
    person has changed the row again since); a person's Dataverse update carries the row just before
    that change (its pre-image).
    """
    if ours and event.complete and event.operation != "delete":
        return event.side, dict(event.fields)
    if not ours and event.side == "dataverse" and event.operation == "update" and event.before:
        return event.side, dict(event.before)
    return None


def _unsure(
    pending: dict[str, dict[str, Any]],
    records: dict[Side, SideRecord],
    deleted: Side | None,
    recreated: Side | None,
    shown: Side | None = None,
) -> str | None:
    """Why what an interrupted step did cannot be told yet, when only an event still to come can tell.

    - It was creating the record on a side where it is missing now: the create never happened,
      or it did and a person deleted the record since; that side's delete event tells. (Missing on
      the other side too, it is gone either way: nothing to wait for.)
    - It was deleting the record on a side that holds a changed row now (another version; no
      row id to compare, as in F&O): the delete did not happen and a person edited the record,
      or it did and a person created the record again; that side's create event tells.
    - It was writing values to Dataverse, whose row holds others now and has changed since the
      step read it: the write never happened and a person edited the row, or it did and a person
      changed it since (perhaps back); the events of those changes tell (`shown`: this event does).
    Until then nothing is created or deleted, so a deleted record is not brought back and a
    re-created one is not deleted. The re-check (not live) takes "never happened".
    """
    for side, record in records.items():
        intent = pending.get(side) or {}
        if (
            side == "dataverse"
            and side != shown
            and intent.get("@version")
            and not intent.get("@create")
            and record.exists
            and record.version != intent.get("@version")
            and not holds(intent, record)
        ):
            return "an interrupted write in dataverse may have landed and been changed since: waiting for its events"
        if intent.get("@create") and not record.exists and side != deleted and records[other_side(side)].exists:
            return f"an interrupted create in {side} may have landed and been deleted since: waiting for its delete"
        if (
            intent.get("@delete")
            and record.exists
            and side != recreated
            and not (intent.get("@row_id") and record.row_id)
            and record.version != intent.get("@version")
        ):
            return f"an interrupted delete in {side} may have landed and the record been created again since"
    return None


def _waiting_for_event(template: Template, event: ChangeEvent, key_text: str, rule: str) -> Outcome:
    conflict = {"field": WHOLE_RECORD, "fo": None, "dataverse": None, "winner": None, "rule": rule}
    return Outcome(template.name, event.side, key_text, "conflict-deferred", conflicts=[conflict])
