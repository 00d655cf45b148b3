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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from loyaltysync import mapping
from loyaltysync.decide import Decision, SideRecord, agreed_from_state, decide, is_newer, is_stale
from loyaltysync.errors import ConcurrencyError, MappingError, TargetError
from loyaltysync.events.model import ChangeEvent, utc_now
from loyaltysync.state import StateStore, SyncRecord
from loyaltysync.targets.dataverse import DataverseClient
from loyaltysync.targets.fno import FnoClient
from loyaltysync.targets.lookups import LookupCache
from loyaltysync.templates import Side, Template

log = logging.getLogger("loyaltysync.sync")

MAX_STATE_RACES = 5


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
    ) -> None:
        self.templates = templates
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
        for _ in range(MAX_STATE_RACES):
            try:
                outcome = await self._step(template, event, live=live)
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
        raise TargetError("state", 409, "ConcurrencyVersionMismatch", "sync state kept changing; will retry")

    async def _step(self, template: Template, event: ChangeEvent, *, live: bool) -> Outcome:
        key = await self._natural_key(template, event)
        if key is None:
            return Outcome(template.name, event.side, event.row_id or "?", "unknown-row")
        key_text = mapping.key_text(key)
        record = await self.state.get(template.name, key_text)
        ours = (event.initiating_user or "").lower() in self.integration_users
        if record is not None and is_stale(event.source_version, record.versions.get(event.side)):
            return Outcome(template.name, event.side, key_text, "echo" if ours else "stale")

        # A payload can predate a delete already applied (webhooks come late and out of order, and a
        # delete carries no version to make them stale): for a tombstone only a re-read says it exists.
        tombstone = record is not None and record.deleted
        use_payload = event.complete and not ours and event.operation != "delete" and not tombstone
        if event.side == "fo":
            fo = await self._payload_record(template, event) if use_payload else await self.read_fo(template, key)
            dv = await self.read_dataverse(template, key)
            if fo.modified_on is None and event.modified_on and live:
                fo = SideRecord(fo.values, event.modified_on, fo.version, fo.row_id)
        else:
            dv = (
                await self._payload_record(template, event) if use_payload else await self.read_dataverse(template, key)
            )
            fo = await self.read_fo(template, key)

        agreed = agreed_from_state(record.values if record else None, record.deleted if record else False)
        decision = decide(template, fo, dv, agreed, trigger=event.side, live=live, from_integration_user=ours)
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
        if event.modified_on:
            modified[event.side] = event.modified_on
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
        unchanged = record is not None and (record.values, record.deleted, record.versions, record.row_id) == (
            new.values,
            new.deleted,
            new.versions,
            new.row_id,
        )
        if not unchanged:
            await self.state.put(new)
