"""The sync step for one change event. The imperative shell.

Everything that decides is pure (`mapping`, `decide`, `intent`); this module only
does the I/O around it. A step (`Engine._step`) reads as its story:

1. gather: the natural key (a Dataverse delete may carry only a row id), the sync
   state (an event older than what was applied from its side stops here), both
   sides' records (the event payload when complete and trusted, otherwise a
   re-read) with the best change times known, and the `Evidence` about an
   interrupted step's `Intent` left in the state;
2. judge: what that step did (`intent.settle`): the agreed state to decide from,
   or a wait for the event that can tell;
3. decide (`decide.decide`);
4. write: store the intent, then the changed fields to the other side by natural
   key (create-only / update-only, so a concurrent create or delete is noticed);
5. record: store the new agreed values with the state's ETag, clearing the intent.
   A lost ETag race re-runs the whole step, which is idempotent.

A re-check (`retries.Deferral`) runs the same step on the event's record; the
event is then only its address.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, TypeVar

from loyaltysync import mapping, timesource
from loyaltysync.decide import (
    Agreed,
    Decision,
    SideRecord,
    agreed_from_state,
    decide,
    instant,
    is_newer,
    is_stale,
    latest,
)
from loyaltysync.errors import ConcurrencyError, LoyaltySyncError, MappingError, TargetError
from loyaltysync.events.model import ChangeEvent, utc_now
from loyaltysync.intent import EventFacts, Evidence, Intent, Wait, settle
from loyaltysync.retries import Deferral
from loyaltysync.state import FoWrite, StateStore, SyncRecord
from loyaltysync.targets.dataverse import DataverseClient
from loyaltysync.targets.fno import FnoClient
from loyaltysync.targets.lookups import LookupCache
from loyaltysync.templates import Side, Template

log = logging.getLogger("loyaltysync.sync")

MAX_STATE_RACES = 5
# A step's stored intent (`SyncRecord.intent`) younger than this means another step may still be writing
# the record: wait for it. Older, its invocation is over: the intent is evidence of what may have landed.
# The runtime sets it from host.json's functionTimeout (loyaltysync/host_limits.py): the host ends every
# invocation by then, however long the clients retry. This default is host.json's 10 minutes.
WRITING_ELSEWHERE_S = 605.0
BUSY_PAUSE_S = 0.25
# The longest an event can be held back by default: CONFLICT_GRACE_SECONDS + QUEUE_LEASE_SECONDS.
EVENTS_HELD_S = 30.0 + 600.0
# How far apart two machines' clocks may be, each within a second of the true time (NTP).
CLOCKS_AGREE_S = 2.0
A = TypeVar("A")
B = TypeVar("B")


@dataclass(slots=True)
class Outcome:
    """What one sync step did, for logs, metrics and the demo's event feed.

    `conflicts`: fields changed on both sides (`winner` None: deferred to a later event); `waiting`:
    why the whole record waits for the event telling what an interrupted step did (None: it does not).
    """

    template: str
    side: Side
    key: str
    reason: str
    writes: dict[str, list[str]] = field(default_factory=dict)
    created: str | None = None
    deleted: str | None = None
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    waiting: str | None = None
    duration_ms: float = 0.0

    @property
    def applied(self) -> bool:
        return bool(self.writes) or self.created is not None or self.deleted is not None

    @property
    def deferred(self) -> bool:
        """Whether a later event must decide part of it (a conflict's winner, or the whole record)."""
        return self.waiting is not None or any(c["winner"] is None for c in self.conflicts)


class _Raced(ConcurrencyError):
    """The state changed between our read and our write; carries what this attempt did."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(f"sync state of {outcome.template} {outcome.key} changed under us")
        self.outcome = outcome


# The code of the transient TargetError for a record another instance is writing (see Engine._process).
RECORD_BUSY = "RecordBusy"
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
        events_held_s: float = EVENTS_HELD_S,
    ) -> None:
        self.templates = templates
        self.writing_elsewhere_s = writing_elsewhere_s
        self.events_held_s = events_held_s  # the longest an event can be held back: conflict grace + queue lease
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

    async def process(self, event: ChangeEvent, *, live: bool = True, deferral: Deferral | None = None) -> Outcome:
        """Bring the record an event is about in step on both sides. Idempotent.

        `deferral`: this is the re-check of an earlier step on the event that deferred (the event
        is then only the record's address: its payload, version and time were applied before).
        Raises MappingError / non-transient TargetError for records that cannot
        be synced (the caller parks them) and transient TargetError for the
        caller to retry later.
        """
        template = self.template(event.template)
        async with self._lock(template.name, event.key_text or event.row_id or ""):
            return await self._process(template, event, live=live, deferral=deferral)

    async def _process(
        self, template: Template, event: ChangeEvent, *, live: bool, deferral: Deferral | None
    ) -> Outcome:
        started = time.perf_counter()
        if event.wire_format == "replay":
            # A replay follows a fix (say, a currency added in Dataverse): cached "no such row"
            # answers are stale on whichever instance picks the replayed message up.
            self.lookups.forget()
        earlier: Outcome | None = None
        busy: _Busy | None = None
        for attempt in range(1, MAX_STATE_RACES + 1):
            try:
                outcome = await self._step(template, event, live=live, deferral=deferral)
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

    async def _step(
        self, template: Template, event: ChangeEvent, *, live: bool, deferral: Deferral | None
    ) -> Outcome:
        """gather -> judge -> decide -> write -> record."""
        decided = await self._decided(template, event, live=live, deferral=deferral, trust_payload=True)
        if isinstance(decided, Outcome):
            return decided
        gathered, agreed, decision = decided
        if gathered.payload_used and _touches(decision, event.side):
            # The payload is its side as of the event's change: enough to copy that change to the other side,
            # not to write back to its own side, which a person may have changed since (the write would undo
            # that: the simulator found a late webhook's payload overwriting a later edit). Decided again on
            # a fresh read.
            decided = await self._decided(template, event, live=live, deferral=deferral, trust_payload=False)
            if isinstance(decided, Outcome):
                return decided
            gathered, agreed, decision = decided
        record, row_id = await self._write(gathered, agreed, decision)
        outcome = _outcome(gathered, decision)
        try:
            await self._record(gathered, decision, record, row_id)
        except ConcurrencyError as exc:
            raise _Raced(outcome) from exc
        return outcome

    async def _decided(
        self, template: Template, event: ChangeEvent, *, live: bool, deferral: Deferral | None, trust_payload: bool
    ) -> tuple[_Gathered, Agreed, Decision] | Outcome:
        """gather -> judge -> decide; or the outcome when there is nothing to do or an event to wait for."""
        gathered = await self._gather(template, event, live=live, deferral=deferral, trust_payload=trust_payload)
        if isinstance(gathered, Outcome):
            return gathered  # nothing to do: an unknown row, or an event already reflected
        agreed = _judge(gathered)
        if isinstance(agreed, Wait):
            return _waiting(gathered, agreed)
        decision = decide(
            template, gathered.fo, gathered.dv, agreed,
            trigger=event.side, live=live, from_integration_user=gathered.evidence.ours,
        )
        return gathered, agreed, decision

    async def _gather(
        self, template: Template, event: ChangeEvent, *, live: bool, deferral: Deferral | None,
        trust_payload: bool = True,
    ) -> _Gathered | Outcome:
        """The state and both sides' records, with the best times known, and the evidence about an
        interrupted step; or the outcome when the event needs nothing done."""
        key = await self._natural_key(template, event)
        if key is None:
            return Outcome(template.name, event.side, event.row_id or "?", "unknown-row")
        key_text = mapping.key_text(key)
        record = await self.state.get(template.name, key_text)
        ours = (event.initiating_user or "").lower() in self.integration_users
        facts = _event_facts(event, deferral)
        if record is not None and is_stale(facts.version, record.versions.get(event.side), event.operation):
            return Outcome(template.name, event.side, key_text, "echo" if ours else "stale")
        fresh_s = _writing_elsewhere(record, self.writing_elsewhere_s, self.instance) if record else 0.0
        if fresh_s > 0:
            # Its writes may not have landed yet: reading now could miss them, and clearing its intent
            # would lose the proof that they are the sync's own (see SyncRecord.intent).
            raise _Busy(f"{template.name} {key_text} is being written by another step", fresh_s)
        trusted = trust_payload and _payload_trusted(facts, ours, record)
        payload = self._payload_record(template, event) if trusted else None
        fo, dv = await _both(
            payload if payload is not None and event.side == "fo" else self.read_fo(template, key),
            payload if payload is not None and event.side == "dataverse" else self.read_dataverse(template, key),
        )
        changed_at = None if ours else _change_time(facts, fo, record)  # ours: the time of the sync's write
        dv = _without_own_write_time(dv, record)
        fo = _with_fo_time(fo, record, changed_at if event.side == "fo" else None, event.changed)
        if deferral is not None:
            fo = _changed_since_deferral(fo, deferral)
        evidence = Evidence(
            fo=fo,
            dataverse=dv,
            event=facts,
            ours=ours,
            recheck=deferral is not None,
            live=live,
            integration_users=self.integration_users,
            waited_out=_older_than(record.intent.at if record and record.intent else None, self.events_held_s),
            own_fo_write=(record.fo_written.started, record.fo_written.ended) if record and record.fo_written else None,
        )
        dv_read = payload is None or event.side != "dataverse"
        return _Gathered(template, event, key, key_text, record, changed_at, dv_read, evidence, payload is not None)

    async def _write(
        self, gathered: _Gathered, agreed: Agreed, decision: Decision
    ) -> tuple[SyncRecord | None, str | None]:
        """Store the intent (when anything is written), then write; the state as stored and the row id after."""
        record = gathered.record
        if decision.acts:
            record = await self._intend(gathered, agreed, decision)
        sent: set[Side] = set()
        try:
            row_id = await self._apply(gathered.template, gathered.key, decision, gathered.fo, gathered.dv, sent)
        except LoyaltySyncError:
            # A failure the step understands (a refusal, a transient error, a mapping error): it writes no more.
            # Anything else is left as a crash is: the intent counts as in flight until functionTimeout.
            if decision.acts and record is not None:
                await self._ended(record, sent)
            raise
        return record, row_id

    async def _ended(self, record: SyncRecord, sent: set[Side]) -> None:
        """This step failed and writes no more: its intent keeps only the sides it sent a request to (those may
        have landed: evidence), marked ended so another instance need not wait for it; with none sent, the
        intent goes. Best effort: the state may have moved on."""
        if record.intent is None:
            return
        sides = {side: wanted for side, wanted in record.intent.sides.items() if side in sent}
        intent = replace(record.intent, sides=sides, ended=True) if sides else None
        try:
            await self.state.put(replace(record, intent=intent))
        except Exception:  # the intent then counts as in flight until functionTimeout, as before
            log.info("could not mark the intent on %s %s ended", record.template, record.key)

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

    async def _intend(self, gathered: _Gathered, agreed: Agreed, decision: Decision) -> SyncRecord:
        """Store what is about to be written before writing it (see `SyncRecord.intent`).

        Also claims the record: another instance's step on the same record, started from the
        same state, now fails its ETag here, before writing anything, and re-runs; a step that
        reads the record meanwhile waits (`_Busy`). An earlier step's intent (a step that died)
        is replaced, so what it proved is kept as agreed values first. The intent keeps the row
        version and row id read, so the row there later tells whether it is the same one.
        """
        base = gathered.record or SyncRecord(template=gathered.template.name, key=gathered.key_text)
        if base.intent is not None:
            deleted = base.deleted if not agreed.values else not agreed.exists
            base = replace(base, values=dict(agreed.values), deleted=deleted)
        intent = Intent.of(decision, {"fo": gathered.fo, "dataverse": gathered.dv}, utc_now(), self.instance)
        return await self.state.put(replace(base, intent=intent))

    async def _apply(
        self, template: Template, key: dict[str, str], decision: Decision, fo: SideRecord, dv: SideRecord,
        sent: set[Side],
    ) -> str | None:
        """Delete, then write, as decided; `sent` collects the sides a request went to (it may have landed)."""
        row_id = dv.row_id
        try:
            if decision.delete is not None:
                sent.add(decision.delete)
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
                    await self.write_fo(template, key, values, create=create, sent=sent)
                else:
                    row_id = await self.write_dataverse(template, key, values, create=create, sent=sent) or row_id
        except TargetError as exc:
            # Update-only found no row (deleted meanwhile) or create-only found one (created
            # meanwhile): the record changed under us, so decide again from fresh reads.
            if exc.status in (404, 412):
                raise ConcurrencyError(str(exc)) from exc
            raise
        return row_id

    async def write_fo(
        self, template: Template, key: Mapping[str, str], values: Mapping[str, Any], *, create: bool,
        sent: set[Side] | None = None,
    ) -> None:
        """Write canonical values to F&O by natural key: create-only or update-only (`sent` gets "fo" once the
        request is about to go)."""
        body = mapping.canonical_to_fo(template, values, create=create)
        fo_key = mapping.fo_key(template, key)
        if sent is not None:
            sent.add("fo")
        if create:
            if not await self.fno.create_new(template.fo.entity_set, fo_key, body):
                # Created meanwhile (by a person, or by this POST before a timeout): decide again.
                raise ConcurrencyError(f"{template.fo.entity_set} {fo_key} exists now")
        else:
            await self.fno.update(template.fo.entity_set, fo_key, body)

    async def write_dataverse(
        self, template: Template, key: Mapping[str, str], values: Mapping[str, Any], *, create: bool,
        sent: set[Side] | None = None,
    ) -> str | None:
        """Write canonical values to Dataverse by alternate key: create-only or update-only (`sent` gets
        "dataverse" once the request is about to go)."""
        for f in template.fields_to("dataverse"):
            if f.lookup is not None and values.get(f.key):
                await self.lookups.prepare(f.lookup, keys=[str(values[f.key])])
        body = mapping.canonical_to_dataverse(template, values, self.lookups, create=create)
        dv_key = mapping.dataverse_key(template, key)
        if create:
            body.update(dv_key)
        if sent is not None:
            sent.add("dataverse")
        return await self.dataverse.upsert(
            template.dataverse.entity_set,
            dv_key,
            body,
            mode="create" if create else "update",
            id_column=template.dataverse.primary_id,
        )

    async def _record(
        self, gathered: _Gathered, decision: Decision, record: SyncRecord | None, row_id: str | None
    ) -> None:
        """Store the new agreed values and what was seen (versions, times), clearing the intent."""
        new = _next_state(gathered, decision, record, row_id)
        unchanged = record is not None and (
            record.values,
            record.deleted,
            record.versions,
            record.modified,
            record.row_id,
            record.intent,
            record.written_since_read,
            record.dataverse_written_at,
            record.fo_field_times,
            record.fo_written,
        ) == (
            new.values,
            new.deleted,
            new.versions,
            new.modified,
            new.row_id,
            new.intent,
            new.written_since_read,
            new.dataverse_written_at,
            new.fo_field_times,
            new.fo_written,
        )
        if not unchanged:
            await self.state.put(new)


@dataclass(frozen=True, slots=True)
class _Gathered:
    """What a step gathered before deciding (see Engine._gather)."""

    template: Template
    event: ChangeEvent
    key: dict[str, str]
    key_text: str
    record: SyncRecord | None
    changed_at: str | None  # when the event's side changed the record (None: the event dates nothing)
    dv_read: bool  # Dataverse was read, not taken from the event's payload
    evidence: Evidence  # both sides' records as the decision sees them, and what the event says
    payload_used: bool = False  # the event's side is its payload, not a read

    @property
    def fo(self) -> SideRecord:
        return self.evidence.fo

    @property
    def dv(self) -> SideRecord:
        return self.evidence.dataverse


def _older_than(at: str | None, seconds: float) -> bool:
    """Whether the moment `at` (ISO, another machine's clock) is more than `seconds` ago; True for no moment."""
    moment = instant(at) if at else None
    return moment is None or timesource.utc() - moment > timedelta(seconds=seconds)


def _touches(decision: Decision, side: Side) -> bool:
    """Whether the decision writes, creates or deletes on `side`."""
    return side in decision.writes or decision.create == side or decision.delete == side


def _judge(gathered: _Gathered) -> Agreed | Wait:
    """The agreed state the decision starts from: as stored, counting what an interrupted step did."""
    record, evidence = gathered.record, gathered.evidence
    agreed = agreed_from_state(record.values if record else None, record.deleted if record else False)
    before = evidence.event.before
    if not agreed.exists and before and gathered.fo.exists and gathered.dv.exists and not (record and record.deleted):
        # No agreed values yet (both sides held the record before the sync did): the pre-image says
        # what this change touched, so fields it did not touch are not a conflict with the other side.
        agreed = Agreed(values=dict(before), exists=True)
    if record is not None and record.intent is not None:
        settled = settle(agreed, record.intent, evidence)
        if isinstance(settled, Wait):
            return settled
        agreed = settled
    if agreed.exists and record is not None and _made_anew(record.row_id, gathered.dv, evidence.integration_users):
        # The agreed record's Dataverse row was deleted and the key created again by a person (a new row id)
        # before the sync saw the delete: the agreed values belong to the old row. The new one meets F&O's
        # record as after a tombstone: field by field, the later writer wins.
        agreed = Agreed(values=agreed.values, exists=False)
    return agreed


def _made_anew(agreed_row_id: str | None, dv: SideRecord, integration_users: frozenset[str]) -> bool:
    """Whether Dataverse holds another row for the key than the one the sync agreed on (both ids known),
    not created by the sync itself."""
    if not (agreed_row_id and dv.exists and dv.row_id and dv.row_id.lower() != agreed_row_id.lower()):
        return False
    return (dv.created_by or "").lower() not in integration_users


def _outcome(gathered: _Gathered, decision: Decision) -> Outcome:
    return Outcome(
        gathered.template.name,
        gathered.event.side,
        gathered.key_text,
        decision.reason,
        writes={side: sorted(values) for side, values in decision.writes.items()},
        created=decision.create,
        deleted=decision.delete,
        conflicts=[
            {"field": c.field, "fo": c.fo_value, "dataverse": c.dataverse_value, "winner": c.winner, "rule": c.rule}
            for c in decision.conflicts
        ],
    )


def _next_state(gathered: _Gathered, decision: Decision, record: SyncRecord | None, row_id: str | None) -> SyncRecord:
    """The sync state after a step: the new agreed values, the versions and times seen, no intent."""
    event, dv = gathered.event, gathered.dv
    versions = dict(record.versions) if record else {}
    version = gathered.evidence.event.version
    if version is not None:
        versions[event.side] = version
    # Any Dataverse change after this read gets a higher versionnumber, so
    # events at or below it are already reflected in this decision.
    if dv.version is not None and is_newer(dv.version, versions.get("dataverse")):
        versions["dataverse"] = dv.version
    written_since_read = record.written_since_read if record else False
    written_at = record.dataverse_written_at if record else None
    if "dataverse" in decision.writes or decision.create == "dataverse":
        written_since_read, written_at = True, utc_now()  # see _written_since_read, _without_own_write_time
    elif gathered.dv_read:
        written_since_read = False
    modified, field_times = _times_seen(gathered, record)
    fo_written = record.fo_written if record else None
    started = record.intent.at if record and record.intent and record.intent.at else utc_now()
    if "fo" in decision.writes and decision.exists_after:
        after = {**(gathered.fo.values or {}), **decision.writes["fo"]}
        differs = {name: value for name, value in after.items() if decision.agreed.get(name, value) != value}
        fo_written = FoWrite(started, utc_now(), differs)
    elif decision.delete == "fo":
        fo_written = FoWrite(started, utc_now())  # its event must not pass for a person's (intent._after_intent)
    return SyncRecord(
        template=gathered.template.name,
        key=gathered.key_text,
        values=decision.agreed if decision.exists_after else dict(record.values) if record else {},
        versions=versions,
        modified=modified,
        row_id=row_id if decision.exists_after else None,
        deleted=not decision.exists_after,
        updated_at=utc_now(),
        etag=record.etag if record else None,
        written_since_read=written_since_read,
        dataverse_written_at=written_at,
        fo_field_times=field_times,
        fo_written=fo_written,
    )


def _times_seen(gathered: _Gathered, record: SyncRecord | None) -> tuple[dict[str, str | None], dict[str, str]]:
    """The latest change times known per side, and per F&O field (a late event's older time changes nothing).

    An F&O update naming its fields dates those fields only (see _with_fo_time); Dataverse's read dates
    a person's change (the sync's own write is kept apart, see _without_own_write_time).
    """
    event, changed_at, dv = gathered.event, gathered.changed_at, gathered.dv
    modified = dict(record.modified) if record else {}
    field_times = dict(record.fo_field_times) if record else {}
    if changed_at and event.side == "fo" and event.changed:
        for name in event.changed:
            if is_newer(changed_at, field_times.get(name)):
                field_times[name] = changed_at
    elif changed_at and is_newer(changed_at, modified.get(event.side)):
        modified[event.side] = changed_at
    if dv.modified_on and is_newer(dv.modified_on, modified.get("dataverse")):
        modified["dataverse"] = dv.modified_on
    return modified, field_times


def _payload_trusted(facts: EventFacts, ours: bool, record: SyncRecord | None) -> bool:
    """Whether the event's payload stands for its side's record now (otherwise the side is read).

    Not for our own writes, creates or deletes; not for a tombstone (a payload can predate a delete already
    applied: webhooks come late and out of order, and not every event carries a version to make them
    stale); not while the sync's own Dataverse write is newer than its last read there.
    """
    tombstone = record is not None and record.deleted
    # Not for a create either: a record created and deleted again before the sync saw either would come
    # back from the create's payload (the simulator found it); the read costs one request per new record.
    return (
        facts.payload is not None and not ours and facts.operation == "update" and not tombstone
        and not _written_since_read(record, facts.side)
    )


def _event_facts(event: ChangeEvent, deferral: Deferral | None) -> EventFacts:
    """What the event says. A re-check's event is only its record's address: its payload, version, time
    and pre-image were applied when it was deferred, so nothing is stale, read from it or dated by it."""
    if deferral is not None:
        return EventFacts(event.side, event.operation)
    return EventFacts(
        event.side,
        event.operation,
        at=event.modified_on,
        version=event.source_version,
        changed=tuple(event.changed),
        before=dict(event.before),
        payload=dict(event.fields) if event.complete else None,
    )


async def _both(first: Awaitable[A], second: Awaitable[B]) -> tuple[A, B]:
    """Await two independent reads at once; if one fails, the other is cancelled."""
    a, b = asyncio.ensure_future(first), asyncio.ensure_future(second)
    try:
        return await a, await b
    except BaseException:
        a.cancel()
        b.cancel()
        raise


def _change_time(event: EventFacts, fo: SideRecord, record: SyncRecord | None) -> str | None:
    """When the event's side changed the record, as far as this event tells.

    An F&O update whose submitted fields all hold the agreed values now tells nothing about F&O's
    other values: typically it is the event of the sync's own write (F&O events name no user), and
    its time would make F&O's older edits look as new as that write. An F&O event that names no
    fields (a business event) is taken for the sync's own write's when it is dated within that
    write (give or take the clocks' disagreement) and F&O holds just what it held after that write:
    dated by it, F&O's older edit of a field whose conflict was still open beat a later Dataverse
    edit (the simulator found it).
    """
    if event.side != "fo" or record is None or record.deleted or not fo.exists:
        return event.at
    values = fo.values or {}
    if event.changed:
        if all(values.get(name) == record.values.get(name) for name in event.changed):
            return None
    elif record.fo_written is not None and _own_fo_write(event.at, values, record.values, record.fo_written):
        return None
    return event.at


def _own_fo_write(at: str | None, values: Mapping[str, Any], agreed: Mapping[str, Any], write: FoWrite) -> bool:
    """Whether an F&O event at `at` may be the one of the sync's `write`, F&O holding `values` now."""
    moment, started, ended = instant(at) if at else None, instant(write.started), instant(write.ended)
    if moment is None or started is None or ended is None:
        return False
    margin = timedelta(seconds=CLOCKS_AGREE_S)
    if not started - margin <= moment <= ended + margin:
        return False
    return all(value == write.differs.get(name, agreed.get(name, value)) for name, value in values.items())


def _without_own_write_time(dv: SideRecord, record: SyncRecord | None) -> SideRecord:
    """Dataverse's record with a `modifiedon` that is not the time of the sync's own last write there.

    `modifiedon` is the row's, so after the sync writes one field it dates every field: an agent's
    older edit of another field would win a conflict with an F&O edit made between the two. When the
    row was last changed no later than the sync's last write, the latest time of a person's change
    seen before (in an event or a read) stands in for it (none known: the conflict waits for one).
    """
    written = record.dataverse_written_at if record else None
    if record is None or not written or not dv.exists or not dv.modified_on:
        return dv
    if record.row_id and dv.row_id and record.row_id.lower() != dv.row_id.lower():
        return dv  # another row than the one the sync wrote: a person made it anew (T8), its time is theirs
    if is_newer(dv.modified_on, written):
        return dv  # changed after the sync's write: that change is a person's
    return replace(dv, modified_on=record.modified.get("dataverse"))


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
    fields = dict(record.fo_field_times) if record else {}
    whole = record.modified.get("fo") if record else None
    if changed_at and changed:
        for name in changed:
            fields[name] = latest(fields.get(name), changed_at) or changed_at
    elif changed_at:
        whole = latest(whole, changed_at)
    if whole is None and not fields:
        return fo
    return replace(fo, modified_on=whole, field_times=fields, time_is_floor=True)


def _changed_since_deferral(fo: SideRecord, deferral: Deferral) -> SideRecord:
    """On a re-check: F&O's deferred fields changed since the deferral are at least that recent.

    The deferral carries F&O's values of the deferred fields and its moment. A different value
    now was written after that moment, so after Dataverse's conflicting change.
    """
    if not fo.exists or not deferral.at or (fo.modified_on is not None and not fo.time_is_floor):
        return fo
    values = fo.values or {}
    times = dict(fo.field_times)
    for name, value in deferral.fields.items():
        if values.get(name) != value:
            times[name] = latest(times.get(name), deferral.at) or deferral.at
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
    return record.written_since_read or record.intent is not None


def _writing_elsewhere(record: SyncRecord, within_s: float, instance: str) -> float:
    """Seconds until another instance's intent on the record is `within_s` old (0: none, or older).

    This process's own intents are not: steps on one record run one at a time here (the
    per-key lock), so an own intent seen by a step is from one that failed or died.
    """
    intent = record.intent
    if intent is None or intent.by == instance or intent.ended:
        return 0.0
    try:
        at = mapping.parse_datetime(intent.at) if intent.at else None
    except ValueError:
        return 0.0
    if at is None:
        return 0.0
    return max(0.0, within_s - (timesource.utc() - at).total_seconds())


def _dataverse_columns(template: Template) -> list[str]:
    return [*mapping.dataverse_select(template), CREATED_BY]


def _waiting(gathered: _Gathered, wait: Wait) -> Outcome:
    """The outcome of a step that waits for the event telling what an interrupted step did."""
    return Outcome(gathered.template.name, gathered.event.side, gathered.key_text, "conflict-deferred",
                   waiting=wait.reason)
