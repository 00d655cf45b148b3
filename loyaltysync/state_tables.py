"""Sync state, dead letters and control data in Azure Table Storage (Azurite locally).

Layout, one table each (names `<prefix>state`, `<prefix>deadletters`, `<prefix>control`):

- state: PartitionKey = template; RowKey = `key_` + the encoded natural key. A
  second row per record, `rowid_` + the encoded Dataverse row id, holds the key,
  so a delete webhook (row id only) is answered by two point reads. Record and
  index row are written in one entity-group transaction (same partition); a
  stale index row is harmless because the record's own row id is checked on read.
- deadletters: PartitionKey = template; RowKey = the dead letter's id.
- control: PartitionKey = scope; RowKey = name.

Keys are encoded with `encode_key`: characters Table Storage forbids (`/ \\ # ?`,
control characters) and ASCII punctuation that breaks URL-addressed operations
(`'`, `%`, `+`, `&`, `:` ... in Azure or Azurite) become `~XX` (UTF-8 bytes in hex).
A key still longer than Table Storage's 1 KiB (512 UTF-16 units) becomes a
SHA-256 digest; the full key is always kept in a property as well.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import importlib.util
import re
import string
import unicodedata
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator, Sequence
from types import TracebackType
from typing import Any, ClassVar, Self

from azure.core import MatchConditions
from azure.core.async_paging import AsyncItemPaged
from azure.core.exceptions import (
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.core.pipeline.transport import AsyncHttpTransport, AsyncioRequestsTransport
from azure.data.tables import TableEntity, TableTransactionError, UpdateMode
from azure.data.tables.aio import TableClient, TableServiceClient

from loyaltysync.errors import ConcurrencyError, ConfigError
from loyaltysync.events.model import utc_now
from loyaltysync.state import (
    MAX_PARK_TRIES,
    Clock,
    DeadLetter,
    SyncRecord,
    check_text,
    dead_letter_id,
    decode_record,
    encode_document,
    encode_record,
    load_document,
    next_dead_letter,
    utf16_units,
)
from loyaltysync.storage_connection import expand_connection_string
from loyaltysync.templates import Side

DEFAULT_TABLE_PREFIX = "loyaltysync"
MAX_KEY_UNITS = 512  # 1 KiB of UTF-16
MAX_TRANSACTION_ENTITIES = 100  # Table Storage's limit per entity-group transaction
PUT_MANY_IN_FLIGHT = 4  # transactions of one put_many sent at once
_SAFE_ASCII = frozenset(string.ascii_letters + string.digits + "-_.|")
_ESCAPED_RUN = re.compile(r"(?:~[0-9A-F]{2})+")
_TABLE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]{2,62}$")
_RECORD, _ROW_ID = "key_", "rowid_"
_PAYLOAD_CHUNK = MAX_KEY_UNITS * 32  # characters: at most 32 Ki UTF-16 units even if all are surrogate pairs


def encode_key(text: str) -> str:
    """`text` with every character unsafe in a PartitionKey/RowKey written as `~XX` (reversible)."""
    out: list[str] = []
    for char in text:
        if char in _SAFE_ASCII or (ord(char) > 0x7F and unicodedata.category(char)[0] not in "CZ"):
            out.append(char)
        else:
            out.append("".join(f"~{byte:02X}" for byte in char.encode("utf-8", "surrogatepass")))
    return "".join(out)


def decode_key(encoded: str) -> str:
    """Inverse of `encode_key`."""
    return _ESCAPED_RUN.sub(
        lambda run: bytes.fromhex(run.group(0).replace("~", "")).decode("utf-8", "surrogatepass"), encoded
    )


def table_key(text: str, prefix: str = "") -> str:
    """The PartitionKey/RowKey for `text`: `prefix` + encoded text, or a digest if that is too long.

    `~~` never occurs in an encoded key, so digests cannot collide with encoded keys.
    """
    encoded = prefix + encode_key(text)
    if utf16_units(encoded) <= MAX_KEY_UNITS:
        return encoded
    return prefix + "~~" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def async_transport() -> AsyncHttpTransport[Any, Any] | None:
    """The HTTP transport for the Azure SDK's aio clients.

    None (the SDK's default, aiohttp) when aiohttp is installed; otherwise the
    SDK's requests-on-a-thread transport, which needs nothing beyond azure-core.
    """
    if importlib.util.find_spec("aiohttp") is not None:
        return None
    transport: AsyncHttpTransport[Any, Any] = AsyncioRequestsTransport()
    return transport


def service_from_connection_string(connection_string: str) -> TableServiceClient:
    """A TableServiceClient for a connection string (`UseDevelopmentStorage=true` included)."""
    transport = async_transport()
    extra: dict[str, Any] = {} if transport is None else {"transport": transport}
    return TableServiceClient.from_connection_string(expand_connection_string(connection_string), **extra)


@contextlib.contextmanager
def _concurrency(what: str) -> Iterator[None]:
    """Turn Table Storage's "exists" / "changed" / "gone" answers into ConcurrencyError."""
    try:
        yield
    except ResourceExistsError as exc:
        raise ConcurrencyError(f"{what} already exists") from exc
    except (ResourceModifiedError, ResourceNotFoundError) as exc:
        raise ConcurrencyError(f"{what} changed or was deleted since it was read") from exc
    except TableTransactionError as exc:
        if exc.status_code in (404, 409, 412):
            raise ConcurrencyError(f"{what} changed since it was read (HTTP {exc.status_code})") from exc
        raise


class _TableStore:
    """One table on a (possibly shared) TableServiceClient, created on first use."""

    suffix: ClassVar[str]

    def __init__(
        self,
        service: TableServiceClient,
        table_name: str,
        *,
        owns_service: bool = False,
        clock: Clock = utc_now,
    ) -> None:
        if not _TABLE_NAME.match(table_name) or table_name.lower() == "tables":
            raise ConfigError("table name", f"{table_name!r} must be 3-63 letters and digits, starting with a letter")
        self.table_name = table_name
        self._service = service
        self._owns_service = owns_service
        self._clock = clock
        self._client: TableClient = service.get_table_client(table_name)
        self._indexed: OrderedDict[str, str | None] = OrderedDict()  # etag -> row id (state store only)
        self._ready = False
        self._lock = asyncio.Lock()

    @classmethod
    def from_service(
        cls,
        service: TableServiceClient,
        table_prefix: str = DEFAULT_TABLE_PREFIX,
        *,
        table_name: str | None = None,
        clock: Clock = utc_now,
    ) -> Self:
        """A store on a shared client (e.g. endpoint + managed identity); close() leaves the client open.

        The table is `table_name`, or `<table_prefix><suffix>` (e.g. `loyaltysyncstate`).
        """
        return cls(service, table_name or table_prefix + cls.suffix, clock=clock)

    @classmethod
    def from_connection_string(
        cls,
        connection_string: str,
        table_prefix: str = DEFAULT_TABLE_PREFIX,
        *,
        table_name: str | None = None,
        clock: Clock = utc_now,
    ) -> Self:
        """A store with a client of its own (close() closes it); `UseDevelopmentStorage=true` works."""
        service = service_from_connection_string(connection_string)
        return cls(service, table_name or table_prefix + cls.suffix, owns_service=True, clock=clock)

    async def _table(self) -> TableClient:
        if not self._ready:
            async with self._lock:
                if not self._ready:
                    await self._service.create_table_if_not_exists(self.table_name)
                    self._ready = True
        return self._client

    async def _get(self, partition_key: str, row_key: str) -> TableEntity | None:
        table = await self._table()
        try:
            return await table.get_entity(partition_key, row_key)
        except ResourceNotFoundError:
            return None

    async def close(self) -> None:
        """Close the client if this store created it."""
        await self._client.close()
        if self._owns_service:
            await self._service.close()


class TableStateStore(_TableStore):
    """StateStore on Azure Table Storage.

    A record with a Dataverse row id is stored together with its row-id index row, in one
    entity-group transaction. Most writes replace a record whose row id has not changed;
    their index row is already there (it was written with the version being replaced), so
    they are a plain conditional replace: the store remembers, per ETag it has seen, the
    row id that version had.
    """

    suffix = "state"
    _INDEXED_MEMORY = 50_000  # ETags remembered (about 100 bytes each)

    def _remember(self, record: SyncRecord) -> None:
        if record.etag is not None:
            self._indexed[record.etag] = record.row_id
            if len(self._indexed) > self._INDEXED_MEMORY:
                self._indexed.popitem(last=False)

    def _indexed_already(self, record: SyncRecord) -> bool:
        """True when the version being replaced had this row id, so its index row exists."""
        etag = record.etag
        return etag is not None and etag in self._indexed and self._indexed[etag] == record.row_id

    async def get(self, template: str, key: str) -> SyncRecord | None:
        """The stored record (with its etag), or None."""
        entity = await self._get(table_key(template), table_key(key, _RECORD))
        if entity is None:
            return None
        record = _record_from(entity)
        self._remember(record)
        return record

    async def put(self, record: SyncRecord) -> SyncRecord:
        """Insert (etag None) or replace (etag as read); ConcurrencyError if another writer got there first."""
        saved, entity = _record_entity(record, self._clock())
        if record.etag is None:
            operation: tuple[str, dict[str, Any], dict[str, Any]] = ("create", entity, {})
        else:
            condition = {"etag": record.etag, "match_condition": MatchConditions.IfNotModified}
            operation = ("update", entity, {"mode": UpdateMode.REPLACE, **condition})
        table = await self._table()
        with _concurrency(f"sync state {record.template}/{record.key}"):
            if record.row_id is None and record.etag is None:
                metadata = await table.create_entity(entity)
            elif record.row_id is None or self._indexed_already(record):
                metadata = await table.update_entity(entity, **operation[2])
            else:
                index = _index_entity(entity, record.row_id)
                results = await table.submit_transaction(
                    [operation, ("upsert", index, {"mode": UpdateMode.REPLACE})]
                )
                metadata = results[0]
        saved.etag = metadata["etag"]
        self._remember(saved)
        return saved

    async def put_many(self, records: Sequence[SyncRecord]) -> int:
        """Insert or replace every record without ETag checks (bulk loads); returns how many were stored.

        Records go in entity-group transactions of at most 100 entities per partition
        (template), a record always together with its row-id index row, several
        transactions in flight. Every record is checked before the first is sent.
        """
        now = self._clock()
        latest: dict[tuple[str, str], list[dict[str, Any]]] = {}
        index_owner: dict[tuple[str, str], tuple[str, str]] = {}  # one index row per row id: the last record's
        for record in records:
            _, entity = _record_entity(record, now)
            rows = [entity]
            if record.row_id is not None:
                index = _index_entity(entity, record.row_id)
                rows.append(index)
                index_owner[(index["PartitionKey"], index["RowKey"])] = (record.template, record.key)
            latest[(record.template, record.key)] = rows
        by_partition: dict[str, list[list[dict[str, Any]]]] = {}
        for where, rows in latest.items():
            kept = [rows[0], *(r for r in rows[1:] if index_owner[(r["PartitionKey"], r["RowKey"])] == where)]
            by_partition.setdefault(rows[0]["PartitionKey"], []).append(kept)
        batches: list[list[tuple[str, dict[str, Any], dict[str, Any]]]] = []
        for groups in by_partition.values():
            batch: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
            for rows in groups:
                if len(batch) + len(rows) > MAX_TRANSACTION_ENTITIES:
                    batches.append(batch)
                    batch = []
                batch += [("upsert", row, {"mode": UpdateMode.REPLACE}) for row in rows]
            if batch:
                batches.append(batch)
        table = await self._table()
        gate = asyncio.Semaphore(PUT_MANY_IN_FLIGHT)

        async def submit(batch: list[tuple[str, dict[str, Any], dict[str, Any]]]) -> None:
            async with gate:
                await table.submit_transaction(batch)

        await asyncio.gather(*(submit(batch) for batch in batches))
        return len(latest)

    async def delete(self, record: SyncRecord) -> None:
        """Remove the record if its etag still matches (ConcurrencyError if not); gone already is fine."""
        if record.etag is None:
            raise ValueError("cannot delete a sync record that was never stored (etag is None)")
        partition_key = table_key(record.template)
        table = await self._table()
        with _concurrency(f"sync state {record.template}/{record.key}"):
            await table.delete_entity(
                partition_key,
                table_key(record.key, _RECORD),
                etag=record.etag,
                match_condition=MatchConditions.IfNotModified,
            )
        if record.row_id is None:
            return
        # The index row goes too, unless it already points at another key; losing this race is
        # harmless (find_by_row_id checks the record), so a conflict here is not an error.
        index = await self._get(partition_key, table_key(record.row_id, _ROW_ID))
        if index is not None and index.get("Key") == record.key:
            with contextlib.suppress(ResourceModifiedError):
                await table.delete_entity(
                    index, etag=index.metadata["etag"], match_condition=MatchConditions.IfNotModified
                )

    async def list(self, template: str) -> AsyncIterator[SyncRecord]:
        """Every record of a template, tombstones included, in no particular order."""
        table = await self._table()
        async for entity in table.query_entities(_RECORDS_FILTER, parameters=_records_of(template)):
            yield _record_from(entity)

    async def count(self, template: str) -> int:
        """How many records (tombstones included) a template has."""
        table = await self._table()
        entities = table.query_entities(_RECORDS_FILTER, parameters=_records_of(template), select=["RowKey"])
        return sum([1 async for _ in entities])

    async def find_by_row_id(self, template: str, row_id: str) -> SyncRecord | None:
        """The record whose current Dataverse row id is `row_id` (index row, then record: two point reads)."""
        index = await self._get(table_key(template), table_key(row_id, _ROW_ID))
        if index is None:
            return None
        record = await self.get(template, str(index["Key"]))
        return record if record is not None and record.row_id == row_id else None


_RECORDS_FILTER = "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi"


def _records_of(template: str) -> dict[str, str]:
    # Every record row starts with "key_"; "key`" is the next string after all of them.
    return {"pk": table_key(template), "lo": _RECORD, "hi": _RECORD[:-1] + chr(ord(_RECORD[-1]) + 1)}


def _record_entity(record: SyncRecord, updated_at: str) -> tuple[SyncRecord, dict[str, Any]]:
    """The record as stored (values round-tripped through JSON, etag unset) and its entity."""
    texts = encode_record(record)
    saved = SyncRecord(
        template=record.template,
        key=record.key,
        row_id=record.row_id,
        deleted=record.deleted,
        updated_at=updated_at,
        **decode_record(texts),
    )
    entity: dict[str, Any] = {
        "PartitionKey": table_key(record.template),
        "RowKey": table_key(record.key, _RECORD),
        "Template": record.template,
        "Key": record.key,
        "Values": texts["values"],
        "Versions": texts["versions"],
        "Modified": texts["modified"],
        "Deleted": record.deleted,
        "UpdatedAt": updated_at,
    }
    if texts["intent"]:
        entity["Pending"] = texts["intent"]  # the property's name from before the intent had a type
    if texts["bookkeeping"]:
        entity["Bookkeeping"] = texts["bookkeeping"]
    if record.row_id is not None:
        check_text(f"sync state {record.template}/{record.key}: row id", record.row_id)
        entity["RowId"] = record.row_id
    return saved, entity


def _index_entity(record_entity: dict[str, Any], row_id: str) -> dict[str, Any]:
    """The row-id index row of a record entity (same partition, so both fit one transaction)."""
    return {
        "PartitionKey": record_entity["PartitionKey"],
        "RowKey": table_key(row_id, _ROW_ID),
        "Key": record_entity["Key"],
        "RowId": row_id,
    }


def _record_from(entity: TableEntity) -> SyncRecord:
    texts = {
        "values": entity["Values"],
        "versions": entity["Versions"],
        "modified": entity["Modified"],
        "intent": entity.get("Pending"),
        "bookkeeping": entity.get("Bookkeeping"),
    }
    return SyncRecord(
        template=str(entity["Template"]),
        key=str(entity["Key"]),
        row_id=entity.get("RowId"),
        deleted=bool(entity.get("Deleted", False)),
        updated_at=str(entity["UpdatedAt"]),
        etag=entity.metadata["etag"],
        **decode_record(texts),
    )


class TableDeadLetterStore(_TableStore):
    """DeadLetterStore on Azure Table Storage."""

    suffix = "deadletters"

    async def park(
        self, template: str, side: Side, key: str, reason: str, error_code: str, payload: str, event_id: str
    ) -> DeadLetter:
        """Create the entry, or raise its attempts and refresh last_seen, reason, payload and event id."""
        table = await self._table()
        for _ in range(MAX_PARK_TRIES):
            entity = await self._get(table_key(template), dead_letter_id(template, side, key))
            existing = None if entity is None else _dead_letter_from(entity)
            entry = next_dead_letter(
                existing, template, side, key, reason, error_code, payload, event_id, self._clock()
            )
            try:
                with _concurrency(f"dead letter {entry.id}"):
                    if entity is None:
                        await table.create_entity(_dead_letter_entity(entry))
                    else:
                        await table.update_entity(
                            _dead_letter_entity(entry),
                            mode=UpdateMode.REPLACE,
                            etag=entity.metadata["etag"],
                            match_condition=MatchConditions.IfNotModified,
                        )
            except ConcurrencyError:
                continue  # another worker parked the same record meanwhile: count on top of theirs
            return entry
        raise ConcurrencyError(f"dead letter for {template}/{side}/{key}: too many concurrent updates")

    async def list(self, template: str | None = None) -> builtins.list[DeadLetter]:
        """Entries (of one template, or all), oldest first_seen first."""
        found = [_dead_letter_from(entity) async for entity in await self._query(template)]
        return sorted(found, key=lambda entry: (entry.first_seen, entry.id))

    async def get(self, id: str) -> DeadLetter | None:
        """One entry by id, or None."""
        entity = await self._find(id)
        return None if entity is None else _dead_letter_from(entity)

    async def remove(self, id: str) -> bool:
        """Drop an entry; True if it existed."""
        entity = await self._find(id)
        if entity is None:
            return False
        table = await self._table()
        await table.delete_entity(entity["PartitionKey"], entity["RowKey"])
        return True

    async def remove_for(self, template: str, key: str, sides: Sequence[Side] = ("fo", "dataverse")) -> int:
        """Drop the record's entries on `sides`; returns how many there were.

        Called after every successful sync, so the common case (no entry) costs one query
        within the template's partition by RowKey, never a scan of the table; an entry
        found is deleted by its PartitionKey and RowKey, and one gone meanwhile is fine.
        """
        table = await self._table()
        ids = {f"id{i}": dead_letter_id(template, side, key) for i, side in enumerate(sides)}
        if not ids:
            return 0
        rows = " or ".join(f"RowKey eq @{name}" for name in ids)
        partition = table_key(template)
        found = [
            str(entity["RowKey"])
            async for entity in table.query_entities(
                f"PartitionKey eq @pk and ( {rows} )", parameters={"pk": partition, **ids}, select=["RowKey"]
            )
        ]
        for row_key in found:
            with contextlib.suppress(ResourceNotFoundError):
                await table.delete_entity(partition, row_key)
        return len(found)

    async def count(self, template: str | None = None) -> int:
        """How many entries (of one template, or all)."""
        return sum([1 async for _ in await self._query(template, select=["RowKey"])])

    async def _query(
        self, template: str | None, select: builtins.list[str] | None = None
    ) -> AsyncItemPaged[TableEntity]:
        table = await self._table()
        if template is None:
            return table.list_entities(select=select)
        return table.query_entities("PartitionKey eq @pk", parameters={"pk": table_key(template)}, select=select)

    async def _find(self, id: str) -> TableEntity | None:
        # Ids are opaque to callers (they come from a listing or a URL), so this is a query across
        # templates; the table holds one row per failing record, so it stays small.
        table = await self._table()
        async for entity in table.query_entities("RowKey eq @id", parameters={"id": id}):
            return entity
        return None


def _dead_letter_entity(entry: DeadLetter) -> dict[str, Any]:
    chunks = [entry.payload[i : i + _PAYLOAD_CHUNK] for i in range(0, len(entry.payload), _PAYLOAD_CHUNK)]
    entity: dict[str, Any] = {
        "PartitionKey": table_key(entry.template),
        "RowKey": entry.id,
        "Template": entry.template,
        "Side": entry.side,
        "Key": entry.key,
        "Reason": entry.reason,
        "ErrorCode": entry.error_code,
        "PayloadParts": len(chunks),
        "Attempts": entry.attempts,
        "FirstSeen": entry.first_seen,
        "LastSeen": entry.last_seen,
        "EventId": entry.event_id,
    }
    entity.update({f"Payload{i}": chunk for i, chunk in enumerate(chunks)})
    return entity


def _dead_letter_from(entity: TableEntity) -> DeadLetter:
    side = str(entity["Side"])
    if side not in ("fo", "dataverse"):
        raise ValueError(f"dead letter {entity['RowKey']}: unknown side {side!r}")
    return DeadLetter(
        id=str(entity["RowKey"]),
        template=str(entity["Template"]),
        side="fo" if side == "fo" else "dataverse",
        key=str(entity["Key"]),
        reason=str(entity.get("Reason", "")),
        error_code=str(entity.get("ErrorCode", "")),
        payload="".join(str(entity[f"Payload{i}"]) for i in range(int(entity.get("PayloadParts", 0)))),
        attempts=int(entity["Attempts"]),
        first_seen=str(entity["FirstSeen"]),
        last_seen=str(entity["LastSeen"]),
        event_id=str(entity.get("EventId", "")),
    )


class TableControlStore(_TableStore):
    """ControlStore on Azure Table Storage."""

    suffix = "control"

    async def get(self, scope: str, name: str) -> dict[str, Any] | None:
        """The document, or None."""
        entity = await self._get(table_key(scope), table_key(name))
        return None if entity is None else load_document(entity["Value"])

    async def set(self, scope: str, name: str, value: dict[str, Any]) -> None:
        """Create or overwrite the document (last writer wins)."""
        text = encode_document(scope, name, value)
        table = await self._table()
        entity = {
            "PartitionKey": table_key(scope),
            "RowKey": table_key(name),
            "Scope": scope,
            "Name": name,
            "Value": text,
        }
        await table.upsert_entity(entity, mode=UpdateMode.REPLACE)

    async def list(self, scope: str) -> dict[str, dict[str, Any]]:
        """Every document of a scope, by name."""
        table = await self._table()
        entities = table.query_entities("PartitionKey eq @pk", parameters={"pk": table_key(scope)})
        return {str(entity["Name"]): load_document(entity["Value"]) async for entity in entities}


class TableStorage:
    """The three stores on one shared TableServiceClient (what the function app wires up).

    Tables are `<table_prefix>state`, `<table_prefix>deadletters` and `<table_prefix>control`
    unless named explicitly (the STATE_TABLE / DEADLETTER_TABLE / CONTROL_TABLE settings).
    """

    def __init__(
        self,
        service: TableServiceClient,
        table_prefix: str = DEFAULT_TABLE_PREFIX,
        *,
        state_table: str | None = None,
        deadletter_table: str | None = None,
        control_table: str | None = None,
        owns_service: bool = False,
        clock: Clock = utc_now,
    ) -> None:
        self._service = service
        self._owns_service = owns_service
        self.state = TableStateStore.from_service(service, table_prefix, table_name=state_table, clock=clock)
        self.dead_letters = TableDeadLetterStore.from_service(
            service, table_prefix, table_name=deadletter_table, clock=clock
        )
        self.control = TableControlStore.from_service(service, table_prefix, table_name=control_table, clock=clock)

    @classmethod
    def from_connection_string(
        cls,
        connection_string: str,
        table_prefix: str = DEFAULT_TABLE_PREFIX,
        *,
        state_table: str | None = None,
        deadletter_table: str | None = None,
        control_table: str | None = None,
        clock: Clock = utc_now,
    ) -> Self:
        """All three stores on one client of their own (close() closes it)."""
        service = service_from_connection_string(connection_string)
        return cls(
            service,
            table_prefix,
            state_table=state_table,
            deadletter_table=deadletter_table,
            control_table=control_table,
            owns_service=True,
            clock=clock,
        )

    async def close(self) -> None:
        """Close the stores, and the client if this object created it."""
        for store in (self.state, self.dead_letters, self.control):
            await store.close()
        if self._owns_service:
            await self._service.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
