"""What the sync remembers between events: sync state, dead letters and control data.

Sync state is one `SyncRecord` per (template, natural key): the canonical
values both sides last agreed on, the source versions applied per side and
the Dataverse row id. Writes are ETag-checked so two workers on the same key
cannot both win; the loser gets `ConcurrencyError` and retries from fresh state.

The stores are Protocols with two implementations: Azure Table Storage
(`loyaltysync.state_tables`) and the in-memory one here, for unit tests of the
pure logic. Both enforce the same rules (ETags, JSON-scalar values, Table
Storage's size limits), and the same behavioural tests run against both.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from loyaltysync.errors import ConcurrencyError, LoyaltySyncError
from loyaltysync.events.model import utc_now
from loyaltysync.intent import Intent
from loyaltysync.templates import Side

Clock = Callable[[], str]

# Table Storage keeps strings as UTF-16 and allows 64 KiB per property: 32 Ki code units.
MAX_PROPERTY_UNITS = 32 * 1024
# A dead-letter payload is split over this many properties (a ChangeEvent that fit a
# 64 KiB queue message always fits); anything longer is cut rather than lose the dead letter.
MAX_PAYLOAD_UNITS = 8 * MAX_PROPERTY_UNITS
MAX_REASON_CHARS = 8000
MAX_PARK_TRIES = 20  # a dead letter updated by this many parallel parks at once is not plausible


class StateSizeError(LoyaltySyncError):
    """A record is too large for Table Storage. Permanent for that record."""

    def __init__(self, what: str, units: int, limit: int) -> None:
        super().__init__(
            f"{what} is {units} UTF-16 code units long; Table Storage allows {limit} per property (64 KiB)"
        )
        self.what = what
        self.units = units
        self.limit = limit


@dataclass(frozen=True, slots=True)
class FoWrite:
    """The sync's last write to F&O: from `started` (before the request) to `ended` (after the answer), on the
    engine's clock (ISO UTC), and F&O's values after it where they differ from the agreed values (a field
    whose conflict is still open keeps F&O's own value)."""

    started: str
    ended: str
    differs: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"started": self.started, "ended": self.ended, "differs": dict(self.differs)}

    @classmethod
    def from_dict(cls, data: object) -> FoWrite | None:
        """Inverse of `as_dict`; None for anything else (bookkeeping only: a record stays readable)."""
        if not isinstance(data, dict):
            return None
        started, ended, differs = data.get("started"), data.get("ended"), data.get("differs") or {}
        if not isinstance(started, str) or not isinstance(ended, str) or not isinstance(differs, dict):
            return None
        return cls(started, ended, dict(differs))


@dataclass(slots=True)
class SyncRecord:
    """The sync state of one record.

    `values` are the canonical values both sides last agreed on (JSON scalars);
    `versions` and `modified` hold, per side ("fo" / "dataverse"), the last source
    version and source modified time (ISO UTC) applied (for F&O, whose rows carry no
    modified time, the latest event time seen: a lower bound of its current value's
    time); `fo_field_times` the same per F&O field, from update events that name their
    fields. `written_since_read` is True while the sync's last Dataverse write is newer
    than its last read there (see `sync._written_since_read`), `dataverse_written_at`
    when the sync last wrote Dataverse (its own clock); `fo_written` its last write to F&O
    (see `sync._change_time`). `deleted` marks a tombstone so a
    late event for a deleted key is recognised.
    `intent` is what a sync step is about to do (`loyaltysync.intent`): stored before its
    writes, cleared with the new agreed values after them, so a step that dies in between
    leaves proof that those values are the sync's own copy, not a person's edit.
    `etag` is None until stored; `updated_at` is set by the store on every write.
    """

    template: str
    key: str
    values: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str | None] = field(default_factory=dict)
    modified: dict[str, str | None] = field(default_factory=dict)
    row_id: str | None = None
    deleted: bool = False
    updated_at: str = field(default_factory=utc_now)
    etag: str | None = None
    intent: Intent | None = None
    written_since_read: bool = False
    dataverse_written_at: str | None = None
    fo_field_times: dict[str, str] = field(default_factory=dict)
    fo_written: FoWrite | None = None


@dataclass(slots=True)
class DeadLetter:
    """A change that could not be applied, parked with the reason.

    One entry per (template, side, key): repeated failures of the same record
    raise `attempts` and refresh `last_seen`, `reason` and `payload` (the
    ChangeEvent JSON, ready for replay).
    """

    id: str
    template: str
    side: Side
    key: str
    reason: str
    error_code: str
    payload: str
    attempts: int
    first_seen: str
    last_seen: str
    event_id: str


class StateStore(Protocol):
    """Sync state per (template, natural key), with ETag optimistic concurrency."""

    async def get(self, template: str, key: str) -> SyncRecord | None:
        """The stored record (with its etag), or None."""
        ...

    async def put(self, record: SyncRecord) -> SyncRecord:
        """Insert (etag None) or replace (etag as read) and return the record with its new etag.

        Raises ConcurrencyError when inserting a key that exists, or replacing a
        record that changed or vanished since it was read.
        """
        ...

    async def put_many(self, records: Sequence[SyncRecord]) -> int:
        """Insert or replace every record, ignoring ETags (last writer wins); returns how many were stored.

        For bulk loads (the initial sync), where the caller is the authority for these
        records at this moment. A key given twice keeps its last record. Raises
        TypeError / StateSizeError before writing anything when a record cannot be stored.
        """
        ...

    async def delete(self, record: SyncRecord) -> None:
        """Remove the record if its etag still matches (ConcurrencyError if not); gone already is fine."""
        ...

    def list(self, template: str) -> AsyncIterator[SyncRecord]:
        """Every record of a template, tombstones included, in no particular order."""
        ...

    async def count(self, template: str) -> int:
        """How many records (tombstones included) a template has."""
        ...

    async def find_by_row_id(self, template: str, row_id: str) -> SyncRecord | None:
        """The record whose current Dataverse row id is `row_id`, by point reads (no scan)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class DeadLetterStore(Protocol):
    """Parked changes, one entry per (template, side, key)."""

    async def park(
        self, template: str, side: Side, key: str, reason: str, error_code: str, payload: str, event_id: str
    ) -> DeadLetter:
        """Create the entry, or raise its attempts and refresh last_seen, reason, payload and event id."""
        ...

    async def list(self, template: str | None = None) -> builtins.list[DeadLetter]:
        """Entries (of one template, or all), oldest first_seen first."""
        ...

    async def get(self, id: str) -> DeadLetter | None:
        """One entry by id, or None."""
        ...

    async def remove(self, id: str) -> bool:
        """Drop an entry; True if it existed."""
        ...

    async def count(self, template: str | None = None) -> int:
        """How many entries (of one template, or all)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class ControlStore(Protocol):
    """Small JSON documents by (scope, name): pause flags, watermarks, last success, checkpoints."""

    async def get(self, scope: str, name: str) -> dict[str, Any] | None:
        """The document, or None."""
        ...

    async def set(self, scope: str, name: str, value: dict[str, Any]) -> None:
        """Create or overwrite the document (last writer wins)."""
        ...

    async def list(self, scope: str) -> dict[str, dict[str, Any]]:
        """Every document of a scope, by name."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


# --- rules shared by every store -------------------------------------------------------------


def utf16_units(text: str) -> int:
    """Length of `text` as Table Storage counts it (UTF-16 code units)."""
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def dump_json(value: Any, what: str, limit: int = MAX_PROPERTY_UNITS) -> str:
    """`value` as compact JSON that fits one Table Storage property, else StateSizeError.

    ASCII-only output, so any text (even a lone surrogate from a bad payload) survives HTTP.
    """
    text = json.dumps(value, ensure_ascii=True, allow_nan=False, sort_keys=True, separators=(",", ":"))
    if len(text) > limit:
        raise StateSizeError(what, len(text), limit)
    return text


def check_text(what: str, text: str, limit: int = MAX_PROPERTY_UNITS) -> None:
    """Raise StateSizeError if `text` does not fit one property, ValueError if it is empty."""
    if not text:
        raise ValueError(f"{what} must not be empty")
    units = utf16_units(text)
    if units > limit:
        raise StateSizeError(what, units, limit)


def encode_record(record: SyncRecord) -> dict[str, str]:
    """The JSON texts stored for a record (checked for size); `intent` and `bookkeeping` are "" when unset.

    Raises TypeError when a value is not a JSON scalar, StateSizeError when too large.
    """
    where = f"sync state {record.template}/{record.key}"
    check_text(f"{where}: template", record.template)
    check_text(f"{where}: key", record.key)
    sides = record.intent.sides.items() if record.intent else ()
    intended = [(f"intent {side} {name}", v) for side, wanted in sides for name, v in wanted.values.items()]
    differs = [(f"F&O after the sync's write {name}", v) for name, v in (
        record.fo_written.differs.items() if record.fo_written else ())]
    for name, value in [*record.values.items(), *intended, *differs]:
        if value is not None and not isinstance(value, str | int | float | bool):
            raise TypeError(f"{where}: value of {name} is a {type(value).__name__}, not a JSON scalar")
    bookkeeping: dict[str, Any] = {}
    if record.written_since_read:
        bookkeeping["written_since_read"] = True
    if record.dataverse_written_at:
        bookkeeping["dataverse_written_at"] = record.dataverse_written_at
    if record.fo_field_times:
        bookkeeping["fo_field_times"] = record.fo_field_times
    if record.fo_written is not None:
        bookkeeping["fo_written"] = record.fo_written.as_dict()
    return {
        "values": dump_json(record.values, f"{where}: values"),
        "versions": dump_json(record.versions, f"{where}: versions"),
        "modified": dump_json(record.modified, f"{where}: modified"),
        "intent": dump_json(record.intent.as_dict(), f"{where}: intent") if record.intent else "",
        "bookkeeping": dump_json(bookkeeping, f"{where}: bookkeeping") if bookkeeping else "",
    }


# Where the bookkeeping was kept before it had typed fields (read once, written no more).
_LEGACY_WRITTEN_SINCE_READ = "dataverse:written"  # a key of `versions`
_LEGACY_DATAVERSE_WRITTEN_AT = "dataverse:written-at"  # a key of `modified`
_LEGACY_FO_FIELD_TIME = "fo:"  # keys of `modified`: "fo:<field>"


def decode_record(texts: Mapping[str, str | None]) -> dict[str, Any]:
    """The SyncRecord fields stored as `texts` (inverse of `encode_record`).

    Also reads what an earlier version stored: the intent as magic-key JSON (see `Intent.from_dict`),
    and the bookkeeping as keys of `versions` / `modified`, which move to their typed fields.
    """
    versions: dict[str, str | None] = json.loads(texts.get("versions") or "{}")
    modified: dict[str, str | None] = json.loads(texts.get("modified") or "{}")
    bookkeeping: dict[str, Any] = json.loads(texts.get("bookkeeping") or "{}")
    written_since_read = bool(bookkeeping.get("written_since_read"))
    if _LEGACY_WRITTEN_SINCE_READ in versions:
        versions.pop(_LEGACY_WRITTEN_SINCE_READ)
        written_since_read = True
    written_at = bookkeeping.get("dataverse_written_at") or modified.pop(_LEGACY_DATAVERSE_WRITTEN_AT, None)
    modified.pop(_LEGACY_DATAVERSE_WRITTEN_AT, None)
    field_times: dict[str, str] = dict(bookkeeping.get("fo_field_times") or {})
    for name in [name for name in modified if name.startswith(_LEGACY_FO_FIELD_TIME)]:
        moment = modified.pop(name)
        if moment:
            field_times.setdefault(name[len(_LEGACY_FO_FIELD_TIME):], moment)
    intent = json.loads(texts.get("intent") or "{}")
    return {
        "values": json.loads(texts.get("values") or "{}"),
        "versions": versions,
        "modified": modified,
        "intent": Intent.from_dict(intent) if intent else None,
        "written_since_read": written_since_read,
        "dataverse_written_at": written_at,
        "fo_field_times": field_times,
        "fo_written": FoWrite.from_dict(bookkeeping.get("fo_written")),
    }


def encode_document(scope: str, name: str, value: dict[str, Any]) -> str:
    """The JSON text stored for a control document (checked for type and size)."""
    check_text("control scope", scope)
    check_text(f"control {scope}: name", name)
    if not isinstance(value, dict):
        raise TypeError(f"control {scope}/{name}: a document must be a dict, not {type(value).__name__}")
    return dump_json(value, f"control {scope}/{name}")


def load_document(text: str) -> dict[str, Any]:
    """Inverse of `encode_document`."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise TypeError(f"control document is a {type(value).__name__}, not an object")
    return value


def dead_letter_id(template: str, side: Side, key: str) -> str:
    """The stable id of the dead letter for (template, side, key): 32 hex digits, URL-safe."""
    digest = hashlib.sha256("\x1f".join((template, side, key)).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:32]


def fit_payload(payload: str) -> str:
    """The payload cut to MAX_PAYLOAD_UNITS: parking must not fail because the payload is huge."""
    if utf16_units(payload) <= MAX_PAYLOAD_UNITS:
        return payload
    cut = payload.encode("utf-16-le", "surrogatepass")[: 2 * MAX_PAYLOAD_UNITS]
    return cut.decode("utf-16-le", "ignore")  # "ignore" drops a half surrogate pair at the end


def next_dead_letter(
    existing: DeadLetter | None,
    template: str,
    side: Side,
    key: str,
    reason: str,
    error_code: str,
    payload: str,
    event_id: str,
    now: str,
) -> DeadLetter:
    """The entry after one more failure: new, or `existing` with attempts + 1 and fresh details."""
    check_text(f"dead letter {template}/{side}: key", key)
    reason, error_code, payload = reason[:MAX_REASON_CHARS], error_code[:MAX_REASON_CHARS], fit_payload(payload)
    if existing is None:
        return DeadLetter(
            id=dead_letter_id(template, side, key),
            template=template,
            side=side,
            key=key,
            reason=reason,
            error_code=error_code,
            payload=payload,
            attempts=1,
            first_seen=now,
            last_seen=now,
            event_id=event_id,
        )
    return replace(
        existing,
        reason=reason,
        error_code=error_code,
        payload=payload,
        attempts=existing.attempts + 1,
        last_seen=now,
        event_id=event_id,
    )


# --- in memory -------------------------------------------------------------------------------


class _Etags:
    def __init__(self) -> None:
        self._last = 0

    def next(self) -> str:
        self._last += 1
        return f'W/"{self._last}"'


class MemoryStateStore:
    """StateStore in a dict, for unit tests. Same ETag, size and row-id rules as Table Storage."""

    def __init__(self, clock: Clock = utc_now) -> None:
        self._clock = clock
        self._etags = _Etags()
        self._rows: dict[tuple[str, str], SyncRecord] = {}
        self._texts: dict[tuple[str, str], dict[str, str]] = {}  # what Table Storage would hold
        self._row_ids: dict[tuple[str, str], str] = {}

    def _read(self, where: tuple[str, str]) -> SyncRecord | None:
        """A fresh copy of a stored record, decoded from its stored texts as a Table Storage read is."""
        stored = self._rows.get(where)
        return None if stored is None else replace(stored, **decode_record(self._texts[where]))

    async def get(self, template: str, key: str) -> SyncRecord | None:
        await asyncio.sleep(0)  # a real store yields here; so concurrent callers interleave alike
        return self._read((template, key))

    async def put(self, record: SyncRecord) -> SyncRecord:
        texts = encode_record(record)
        await asyncio.sleep(0)
        where = (record.template, record.key)
        stored = self._rows.get(where)
        if record.etag is None and stored is not None:
            raise ConcurrencyError(f"sync state {record.template}/{record.key} already exists")
        if record.etag is not None and (stored is None or stored.etag != record.etag):
            raise ConcurrencyError(f"sync state {record.template}/{record.key} changed since it was read")
        saved = replace(record, **decode_record(texts), updated_at=self._clock(), etag=self._etags.next())
        self._rows[where] = saved
        self._texts[where] = texts
        if saved.row_id is not None:
            self._row_ids[(record.template, saved.row_id)] = record.key
        return self._read(where)  # type: ignore[return-value]

    async def put_many(self, records: Sequence[SyncRecord]) -> int:
        texts = [encode_record(record) for record in records]  # all checked before any is stored
        await asyncio.sleep(0)
        latest = {(r.template, r.key): (r, t) for r, t in zip(records, texts, strict=True)}
        for where, (record, text) in latest.items():
            saved = replace(record, **decode_record(text), updated_at=self._clock(), etag=self._etags.next())
            self._rows[where] = saved
            self._texts[where] = text
            if saved.row_id is not None:
                self._row_ids[(record.template, saved.row_id)] = record.key
        return len(latest)

    async def delete(self, record: SyncRecord) -> None:
        if record.etag is None:
            raise ValueError("cannot delete a sync record that was never stored (etag is None)")
        await asyncio.sleep(0)
        stored = self._rows.get((record.template, record.key))
        if stored is None:
            return
        if stored.etag != record.etag:
            raise ConcurrencyError(f"sync state {record.template}/{record.key} changed since it was read")
        del self._rows[(record.template, record.key)]
        del self._texts[(record.template, record.key)]
        if stored.row_id is not None and self._row_ids.get((record.template, stored.row_id)) == record.key:
            del self._row_ids[(record.template, stored.row_id)]

    async def list(self, template: str) -> AsyncIterator[SyncRecord]:
        for where in builtins.list(self._rows):
            if where[0] == template:
                found = self._read(where)
                if found is not None:
                    yield found

    async def count(self, template: str) -> int:
        await asyncio.sleep(0)
        return sum(1 for row_template, _ in self._rows if row_template == template)

    async def find_by_row_id(self, template: str, row_id: str) -> SyncRecord | None:
        await asyncio.sleep(0)
        key = self._row_ids.get((template, row_id))
        stored = None if key is None else self._rows.get((template, key))
        if stored is None or stored.row_id != row_id or key is None:
            return None
        return self._read((template, key))

    async def close(self) -> None:
        return None


class MemoryDeadLetterStore:
    """DeadLetterStore in a dict, for unit tests."""

    def __init__(self, clock: Clock = utc_now) -> None:
        self._clock = clock
        self._entries: dict[str, DeadLetter] = {}

    async def park(
        self, template: str, side: Side, key: str, reason: str, error_code: str, payload: str, event_id: str
    ) -> DeadLetter:
        await asyncio.sleep(0)
        existing = self._entries.get(dead_letter_id(template, side, key))
        entry = next_dead_letter(
            existing, template, side, key, reason, error_code, payload, event_id, self._clock()
        )
        self._entries[entry.id] = entry
        return replace(entry)

    async def list(self, template: str | None = None) -> builtins.list[DeadLetter]:
        await asyncio.sleep(0)
        found = [replace(e) for e in self._entries.values() if template is None or e.template == template]
        return sorted(found, key=lambda e: (e.first_seen, e.id))

    async def get(self, id: str) -> DeadLetter | None:
        await asyncio.sleep(0)
        entry = self._entries.get(id)
        return None if entry is None else replace(entry)

    async def remove(self, id: str) -> bool:
        await asyncio.sleep(0)
        return self._entries.pop(id, None) is not None

    async def count(self, template: str | None = None) -> int:
        return len(await self.list(template))

    async def close(self) -> None:
        return None


class MemoryControlStore:
    """ControlStore in a dict, for unit tests. Documents go through JSON, as in Table Storage."""

    def __init__(self) -> None:
        self._docs: dict[tuple[str, str], str] = {}

    async def get(self, scope: str, name: str) -> dict[str, Any] | None:
        await asyncio.sleep(0)
        text = self._docs.get((scope, name))
        return None if text is None else load_document(text)

    async def set(self, scope: str, name: str, value: dict[str, Any]) -> None:
        text = encode_document(scope, name, value)
        await asyncio.sleep(0)
        self._docs[(scope, name)] = text

    async def list(self, scope: str) -> dict[str, dict[str, Any]]:
        await asyncio.sleep(0)
        return {name: load_document(text) for (s, name), text in self._docs.items() if s == scope}

    async def close(self) -> None:
        return None

