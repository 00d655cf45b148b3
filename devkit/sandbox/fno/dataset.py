"""The emulator's data: one store table per entity set, and the write rules F&O applies.

`FnoData` is what `app.state.fno` holds. Writes validate every value the way
the service does (types, enum members, lengths, mandatory keys), keep a
per-row RecId and version (for the ETag and the virtual-table row id), and
report each committed change to the publisher. Inside a `$batch` change set
the changes are held back until the change set commits, and dropped when it
rolls back.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from devkit.sandbox.fno.errors import FnoError, bad_payload, write_failed
from devkit.sandbox.fno.events import Change, ChangeType
from devkit.sandbox.fno.schema import Catalog, EntityDef
from devkit.sandbox.fno.values import to_stored
from devkit.sandbox.store import DuplicateKey, Store, Table

RECID = "_recid"
VERSION = "_version"
HIDDEN = (RECID, VERSION)
DEFAULT_MAX_PAGE_SIZE = 10_000
_FIRST_RECID = 5_637_144_576

_PENDING: ContextVar[list[Change] | None] = ContextVar("loyaltysync_fno_pending_changes", default=None)


@dataclass
class Throttling:
    """F&O's resource-based (priority) throttling, switched on by the test or the operator."""

    active: bool = False
    retry_after_s: float = 5.0
    remaining: int | None = None  # throttle only this many more requests, then switch off

    def take(self) -> bool:
        """Whether this request is throttled (counts down `remaining`)."""
        if self.active and self.remaining is not None and self.remaining <= 0:
            self.active = False
        if not self.active:
            return False
        if self.remaining is not None:
            self.remaining -= 1
            self.active = self.remaining > 0
        return True


def etag(version: int) -> str:
    """The weak ETag F&O puts on a row: base64 of `'0,<version>'`."""
    return 'W/"' + base64.b64encode(f"'0,{version}'".encode()).decode() + '"'


class FnoData:
    """Entity tables plus create / update / delete with F&O's rules."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        default_company: str,
        rng: random.Random,
        publish: Callable[[Change], None] = lambda change: None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        """`clock` dates each change (its event time): the wall clock by default, the simulator's there."""
        self.catalog = catalog
        self.clock = clock
        self.default_company = default_company.lower()
        self.store = Store()
        self.tables: dict[str, Table] = {}
        self.max_page_size = DEFAULT_MAX_PAGE_SIZE
        self.throttling = Throttling()
        self.publish = publish
        self._recid = _FIRST_RECID
        self._version = rng.randint(1_000_000_000, 9_000_000_000)
        for entity in catalog.entities.values():
            columns = [p.name for p in entity.properties] + list(HIDDEN)
            table = Table(entity.entity_set, columns, key_columns=entity.keys, casefold_keys=True)
            self.tables[entity.entity_set] = self.store.add(table)

    # -- reading ------------------------------------------------------------------

    def entity(self, entity_set: str) -> EntityDef | None:
        return self.catalog.entities.get(entity_set)

    def get(self, entity: EntityDef, key: tuple[Any, ...]) -> dict[str, Any] | None:
        """The row with this key (values in `entity.keys` order), or None."""
        return self.tables[entity.entity_set].get(key if len(key) > 1 else key[0])

    def columns(self, entity: EntityDef) -> tuple[str, ...]:
        """The column order of the stored row tuples (properties, then the hidden RecId and version)."""
        return self.tables[entity.entity_set].columns

    def tuples(self, entity: EntityDef, company: str | None, key: Any | None = None) -> Iterator[tuple[Any, ...]]:
        """Stored rows in insertion order, only `company`'s when given (company-specific entities).

        With `key` (the value of a one-field key) only that row, found through the index.
        """
        table = self.tables[entity.entity_set]
        if key is not None:
            row = table.get(key)
            return iter(() if row is None else (tuple(row[c] for c in table.columns),))
        rows = table.scan_tuples()
        if company is None or not entity.company_specific:
            return rows
        position, wanted = table.column_index["dataAreaId"], company.casefold()
        return (r for r in rows if str(r[position]).casefold() == wanted)

    def count(self, entity: EntityDef) -> int:
        return len(self.tables[entity.entity_set])

    # -- writing ------------------------------------------------------------------

    def _convert(self, entity: EntityDef, body: Mapping[str, Any]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, raw in body.items():
            if name.startswith("@") or "@" in name:
                continue  # instance annotations (@odata.etag, @odata.type) are not data
            prop = entity.by_name.get(name)
            if prop is None:
                raise bad_payload(
                    f"The property '{name}' does not exist on type '{entity.full_type}'. "
                    "Make sure to only use property names that are defined by the type."
                )
            values[name] = to_stored(entity, prop, raw)
        if entity.company_specific and "dataAreaId" in values:
            values["dataAreaId"] = str(values["dataAreaId"]).lower()
        return values

    def _stamp(self) -> int:
        self._version += 1
        return self._version

    def prepare_row(self, entity: EntityDef, body: Mapping[str, Any]) -> dict[str, Any]:
        """A full row for `body` (defaults filled in); raises FnoError as a create would."""
        values = self._convert(entity, body)
        if entity.company_specific and not values.get("dataAreaId"):
            values["dataAreaId"] = self.default_company
        for key in entity.keys:
            if values.get(key) in (None, ""):
                raise write_failed(entity.data_entity, f"Field '{key}' must be filled in.")
        row = {**entity.defaults, **values}
        self._recid += 1
        row[RECID] = self._recid
        row[VERSION] = self._stamp()
        return row

    def _duplicate(self, entity: EntityDef, row: Mapping[str, Any]) -> FnoError:
        keys = ", ".join(f"{k}: {row[k]}" for k in entity.keys)
        infolog = (
            f"Cannot create a record in {entity.label} ({entity.data_entity}). {keys}. The record already exists."
        )
        return write_failed(entity.data_entity, infolog, status=500)

    def create(self, entity: EntityDef, body: Mapping[str, Any]) -> dict[str, Any]:
        """Insert a row (F&O's POST); the change is published once committed."""
        row = self.prepare_row(entity, body)
        try:
            stored = self.tables[entity.entity_set].insert(row)
        except DuplicateKey:
            raise self._duplicate(entity, row) from None
        submitted = tuple(p.name for p in entity.properties)
        self._emit(entity, "Created", stored, None, submitted)
        return stored

    def update(self, entity: EntityDef, current: dict[str, Any], body: Mapping[str, Any]) -> dict[str, Any]:
        """Change the submitted properties of `current` (F&O's PATCH; there is no upsert)."""
        values = self._convert(entity, body)
        for key in entity.keys:
            if key in values and str(values[key]).casefold() != str(current[key]).casefold():
                raise write_failed(entity.data_entity, f"The key field '{key}' cannot be changed.")
            values.pop(key, None)
        values[VERSION] = self._stamp()
        table = self.tables[entity.entity_set]
        stored = table.update(table.row_id(current), values)
        submitted = tuple(n for n in body if n in entity.by_name and n not in entity.keys)
        self._emit(entity, "Updated", stored, current, submitted)
        return stored

    def delete(self, entity: EntityDef, current: dict[str, Any]) -> None:
        """Remove `current` (F&O's DELETE)."""
        table = self.tables[entity.entity_set]
        table.delete(table.row_id(current))
        self._emit(entity, "Deleted", current, current, ())

    def seed(self, entity: EntityDef, bodies: Iterable[Mapping[str, Any]]) -> int:
        """Insert rows without raising events (all or nothing); returns how many."""
        table = self.tables[entity.entity_set]
        count = 0
        with self.store.transaction():
            for index, body in enumerate(bodies):
                try:
                    row = self.prepare_row(entity, body)
                    table.insert(row)
                except DuplicateKey:
                    raise self._duplicate(entity, row).with_row(index) from None
                except FnoError as exc:
                    raise exc.with_row(index) from None
                count += 1
        return count

    def clear(self, entity: EntityDef) -> int:
        """Delete every row without raising events; returns how many were removed."""
        table = self.tables[entity.entity_set]
        removed = len(table)
        fresh = Table(table.name, table.columns, key_columns=table.key_columns, casefold_keys=True)
        self.store.tables[table.name] = fresh
        self.tables[entity.entity_set] = fresh
        return removed

    # -- events -------------------------------------------------------------------

    def _emit(
        self,
        entity: EntityDef,
        change_type: ChangeType,
        row: dict[str, Any],
        before: dict[str, Any] | None,
        submitted: tuple[str, ...],
    ) -> None:
        change = Change(entity, change_type, row, before, submitted, int(row[RECID]), self.clock())
        pending = _PENDING.get()
        if pending is not None:
            pending.append(change)
        else:
            self.publish(change)

    @contextmanager
    def change_set(self) -> Iterator[None]:
        """An atomic unit: writes roll back together, events go out only if it commits."""
        outer = _PENDING.get()
        pending: list[Change] = []
        token = _PENDING.set(pending)
        try:
            with self.store.transaction():
                yield
        finally:
            _PENDING.reset(token)
        if outer is not None:
            outer.extend(pending)
        else:
            for change in pending:
                self.publish(change)
