"""Resolve Dataverse lookups between natural keys and row ids, with a bounded TTL cache.

Templates carry lookups as natural keys (a currency's ISO code); Dataverse
binds and returns row ids. Mapping code is pure, so the I/O happens first:
`prepare` fetches whatever is missing in a few `$filter` queries, then the
synchronous `id_for` / `key_for` answer from memory (this object is the
`LookupResolver` the mapping calls). Key matching is case-insensitive, like
Dataverse string comparison.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable

from loyaltysync import timesource
from loyaltysync.targets.dataverse import DataverseClient
from loyaltysync.targets.odata import any_of_filter, is_guid
from loyaltysync.templates import Lookup

_Slot = tuple[str, str, str, str]  # (direction, entity set, column, normalized value)


class LookupNotPrepared(LookupError):
    """`id_for`/`key_for` was asked about a value `prepare` never saw: a bug in the caller."""


def _slot_for_key(lookup: Lookup, key: str) -> _Slot:
    return ("id", lookup.entity_set, lookup.key_column, key.casefold())


def _slot_for_id(lookup: Lookup, row_id: str) -> _Slot:
    return ("key", lookup.entity_set, lookup.id_column, row_id.lower())


class LookupCache:
    """Natural key ⇄ row id for template lookups, cached for `ttl` seconds (misses for `negative_ttl`)."""

    def __init__(
        self,
        client: DataverseClient,
        *,
        ttl: float = 900.0,
        negative_ttl: float = 60.0,
        max_entries: int = 10_000,
        values_per_query: int = 50,
        clock: Callable[[], float] = timesource.monotonic,
    ) -> None:
        self._client = client
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._max_entries = max_entries
        self._per_query = max(1, values_per_query)
        self._clock = clock
        self._entries: OrderedDict[_Slot, tuple[str | None, float]] = OrderedDict()

    async def prepare(self, lookup: Lookup, *, keys: Iterable[str] = (), ids: Iterable[str] = ()) -> None:
        """Fetch from Dataverse every key and id of `lookup` that is not freshly cached."""
        now = self._clock()
        wanted_keys = {k.casefold(): k for k in keys if k and not self._fresh(_slot_for_key(lookup, k), now)}
        wanted_ids: dict[str, uuid.UUID] = {}
        for row_id in ids:
            if not row_id or self._fresh(_slot_for_id(lookup, row_id), now):
                continue
            if is_guid(row_id):
                wanted_ids[row_id.lower()] = uuid.UUID(row_id)
            else:  # not a row id: no row can have it, and it must not reach a $filter
                self._store(_slot_for_id(lookup, row_id), None)
        found = await self._fetch(lookup, lookup.key_column, list(wanted_keys.values()))
        found |= await self._fetch(lookup, lookup.id_column, list(wanted_ids.values()))
        # Whatever was asked for and not found is cached as "no such row".
        for folded in wanted_keys.keys() - found:
            self._store(("id", lookup.entity_set, lookup.key_column, folded), None)
        for lowered in wanted_ids.keys() - found:
            self._store(("key", lookup.entity_set, lookup.id_column, lowered), None)

    async def _fetch(self, lookup: Lookup, column: str, values: list[str] | list[uuid.UUID]) -> set[str]:
        """Query the rows whose `column` is one of `values`; cache both directions; return what was seen
        (keys case-folded, ids lower-cased)."""
        seen: set[str] = set()
        for start in range(0, len(values), self._per_query):
            chunk = values[start : start + self._per_query]
            pages = self._client.query(
                lookup.entity_set,
                select=[lookup.id_column, lookup.key_column],
                filter=any_of_filter(column, chunk),
            )
            async for page in pages:
                for row in page:
                    row_id, key = row.get(lookup.id_column), row.get(lookup.key_column)
                    if isinstance(row_id, str) and isinstance(key, str):
                        self._store(_slot_for_key(lookup, key), row_id.lower())
                        self._store(_slot_for_id(lookup, row_id), key)
                        seen.update((key.casefold(), row_id.lower()))
        return seen

    def id_for(self, lookup: Lookup, key: str) -> str | None:
        """The row id of the `lookup` row whose natural key is `key`; None when Dataverse has none."""
        return self._answer(_slot_for_key(lookup, key))

    def key_for(self, lookup: Lookup, row_id: str) -> str | None:
        """The natural key (as Dataverse stores it) of row `row_id`; None when there is no such row."""
        return self._answer(_slot_for_id(lookup, row_id))

    def forget(self) -> None:
        """Drop everything cached (e.g. after a reference table was edited)."""
        self._entries.clear()

    def _answer(self, slot: _Slot) -> str | None:
        entry = self._entries.get(slot)
        if entry is None:
            raise LookupNotPrepared(f"{slot[1]}.{slot[2]} = {slot[3]!r} was not prepared")
        # A stale entry still answers: prepare() just ran, and an answer a few seconds past its TTL
        # beats failing the record.
        self._entries.move_to_end(slot)
        return entry[0]

    def _fresh(self, slot: _Slot, now: float) -> bool:
        entry = self._entries.get(slot)
        return entry is not None and now < entry[1]

    def _store(self, slot: _Slot, value: str | None) -> None:
        ttl = self._ttl if value is not None else self._negative_ttl
        self._entries[slot] = (value, self._clock() + ttl)
        self._entries.move_to_end(slot)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
