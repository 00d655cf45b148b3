"""Lean in-memory tables for the emulators, sized for a million rows per table.

A row is a tuple in a slot list; a column-index map turns it into a dict only
when a caller asks for one. The primary key and every unique (alternate) key
are dicts from key value to slot, so lookups by key never scan. Deleting
leaves a tombstone so the slot order (= insertion order) survives a rollback;
tombstones are compacted away once they are half the table.

`Store.transaction()` keeps an undo log in a context variable, so only the
writes made by the task that opened it (a `$batch` change set and the
sub-requests it runs in the same task) are rolled back, never the writes of a
concurrent request. Isolation is not attempted: a concurrent write to the same
row during a change set that later fails is overwritten by the rollback.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

Key = Any  # a scalar for a one-column key, a tuple for a composite key


class StoreError(Exception):
    """Base of the errors a table raises on purpose."""


class DuplicateKey(StoreError):
    """A row with the same primary or unique key already exists."""

    def __init__(self, table: str, key_name: str, values: tuple[Any, ...]) -> None:
        super().__init__(f"{table}: duplicate value {values!r} for key {key_name}")
        self.table = table
        self.key_name = key_name
        self.values = values


class UnknownColumn(StoreError):
    """A write named a column the table does not have."""

    def __init__(self, table: str, column: str) -> None:
        super().__init__(f"{table}: no column named {column!r}")
        self.table = table
        self.column = column


class RowNotFound(StoreError):
    """An update or delete addressed a row that does not exist."""

    def __init__(self, table: str, row_id: Key) -> None:
        super().__init__(f"{table}: no row with id {row_id!r}")
        self.table = table
        self.row_id = row_id


class MissingKey(StoreError):
    """An insert did not give every primary-key column a value."""

    def __init__(self, table: str, column: str) -> None:
        super().__init__(f"{table}: primary-key column {column!r} has no value")
        self.table = table
        self.column = column


# Undo entries: (table, slot, row before the change or None if the slot was empty).
_UndoEntry = tuple["Table", int, tuple[Any, ...] | None]
_JOURNAL: ContextVar[list[_UndoEntry] | None] = ContextVar("loyaltysync_sandbox_journal", default=None)


class _Index:
    """One unique key: its columns, their positions and the value -> slot dict."""

    __slots__ = ("columns", "entries", "name", "positions")

    def __init__(self, name: str, columns: tuple[str, ...], positions: tuple[int, ...]) -> None:
        self.name = name
        self.columns = columns
        self.positions = positions
        self.entries: dict[Key, int] = {}


class Table:
    """One table: fixed columns, a primary key and optional unique keys.

    `key_columns` defaults to the first column. A unique key is named by its
    columns joined with "," (e.g. "dataAreaId,CardNumber"); the primary key
    is also reachable through `find` under its own name. Rows whose unique-key
    columns include a None are not indexed under that key (as SQL does with
    filtered unique indexes). With `casefold_keys=True` string key values
    are matched case-insensitively (Dataverse), both for the primary key and
    for unique keys.
    """

    def __init__(
        self,
        name: str,
        columns: Sequence[str],
        key_columns: Sequence[str] | None = None,
        unique_keys: Sequence[Sequence[str]] = (),
        *,
        casefold_keys: bool = False,
    ) -> None:
        if not columns:
            raise ValueError(f"{name}: a table needs at least one column")
        if len(set(columns)) != len(columns):
            raise ValueError(f"{name}: duplicate column names in {list(columns)!r}")
        self.name = name
        self.columns: tuple[str, ...] = tuple(columns)
        self.column_index: dict[str, int] = {c: i for i, c in enumerate(self.columns)}
        self.casefold_keys = casefold_keys
        self._slots: list[tuple[Any, ...] | None] = []
        self._dead = 0
        self.primary = self._make_index(tuple(key_columns) if key_columns else (self.columns[0],))
        self.unique: dict[str, _Index] = {}
        for cols in unique_keys:
            index = self._make_index(tuple(cols))
            self.unique[index.name] = index
        self._all_indexes = (self.primary, *self.unique.values())
        self._column_set = frozenset(self.columns)

    # -- public API -------------------------------------------------------------

    @property
    def key_columns(self) -> tuple[str, ...]:
        """The primary-key columns."""
        return self.primary.columns

    @property
    def primary_key_name(self) -> str:
        """The name `find` knows the primary key by."""
        return self.primary.name

    def key_name_for(self, columns: Iterable[str]) -> str | None:
        """The name of the primary or unique key made of exactly these columns (any order), or None."""
        wanted = set(columns)
        for index in self._all_indexes:
            if set(index.columns) == wanted:
                return index.name
        return None

    def key_columns_of(self, key_name: str) -> tuple[str, ...]:
        """The columns of the named key, in declaration order (KeyError if unknown)."""
        return self._index(key_name).columns

    def __len__(self) -> int:
        return len(self._slots) - self._dead

    def insert(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Add a row; unnamed columns are None. Raises DuplicateKey, MissingKey or UnknownColumn."""
        row = self._build(values)
        keys = self._keys(row)
        self._check_unique(row, keys, exclude_slot=None)
        slot = len(self._slots)
        self._slots.append(row)
        self._index_keys(keys, slot)
        self._journal(slot, None)
        return dict(zip(self.columns, row, strict=True))

    def get(self, row_id: Key) -> dict[str, Any] | None:
        """The row with this primary key (a scalar, or a tuple for composite keys), or None."""
        slot = self.primary.entries.get(self._normal(row_id))
        return None if slot is None else self._as_dict(self._live(slot))

    def find(self, key_name: str, values: tuple[Any, ...]) -> dict[str, Any] | None:
        """The row whose named key has these values (in the key's column order), or None."""
        index = self._index(key_name)
        if len(values) != len(index.columns):
            raise ValueError(f"{self.name}: key {key_name} has {len(index.columns)} columns, got {values!r}")
        slot = index.entries.get(self._normal(values if len(values) > 1 else values[0]))
        return None if slot is None else self._as_dict(self._live(slot))

    def row_id(self, row: Mapping[str, Any]) -> Key:
        """The primary-key value of a row dict (scalar or tuple), as `get` expects it."""
        values = tuple(row[c] for c in self.primary.columns)
        return values if len(values) > 1 else values[0]

    def update(self, row_id: Key, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Change some columns of a row, keys included. Raises RowNotFound, DuplicateKey, UnknownColumn."""
        slot = self._slot_of(row_id)
        old = self._live(slot)
        new = list(old)
        for column, value in changes.items():
            pos = self.column_index.get(column)
            if pos is None:
                raise UnknownColumn(self.name, column)
            new[pos] = value
        row = tuple(new)
        keys = self._keys(row)
        self._check_unique(row, keys, exclude_slot=slot)
        self._unindex_keys(self._keys(old))
        self._slots[slot] = row
        self._index_keys(keys, slot)
        self._journal(slot, old)
        return self._as_dict(row)

    def delete(self, row_id: Key) -> dict[str, Any]:
        """Remove a row and return it. Raises RowNotFound."""
        slot = self._slot_of(row_id)
        old = self._live(slot)
        self._unindex_keys(self._keys(old))
        self._slots[slot] = None
        self._dead += 1
        self._journal(slot, old)
        self._maybe_compact()
        return self._as_dict(old)

    def scan(self) -> Iterator[dict[str, Any]]:
        """Every row as a fresh dict, in insertion order. Do not write to the table while iterating."""
        columns = self.columns
        for row in self._slots:
            if row is not None:
                yield dict(zip(columns, row, strict=True))

    def scan_tuples(self) -> Iterator[tuple[Any, ...]]:
        """Every row as its stored tuple (positions per `column_index`), in insertion order."""
        return (row for row in self._slots if row is not None)

    def add_column(self, column: str, default: Any = None) -> None:
        """Append a column to every row (for templates added at run time). Not undone by rollback."""
        if column in self.column_index:
            raise ValueError(f"{self.name}: column {column!r} already exists")
        self.columns = (*self.columns, column)
        self.column_index[column] = len(self.columns) - 1
        self._column_set = frozenset(self.columns)
        self._slots = [None if row is None else (*row, default) for row in self._slots]

    # -- internals --------------------------------------------------------------

    def _make_index(self, columns: tuple[str, ...]) -> _Index:
        missing = [c for c in columns if c not in self.column_index]
        if missing or not columns:
            raise ValueError(f"{self.name}: key columns {missing or columns!r} are not columns of the table")
        return _Index(",".join(columns), columns, tuple(self.column_index[c] for c in columns))

    def _index(self, key_name: str) -> _Index:
        if key_name == self.primary.name:
            return self.primary
        try:
            return self.unique[key_name]
        except KeyError:
            raise KeyError(f"{self.name}: no key named {key_name!r}") from None

    def _normal(self, value: Key) -> Key:
        if not self.casefold_keys:
            return value
        if type(value) is str:
            return value.casefold()
        if type(value) is tuple:
            return tuple([v.casefold() if type(v) is str else v for v in value])
        return value

    def _key_of(self, index: _Index, row: tuple[Any, ...]) -> Key:
        """The index key of a row, or None when a key column is None (such rows are not indexed)."""
        positions = index.positions
        if len(positions) == 1:
            value = row[positions[0]]
            if self.casefold_keys and type(value) is str:
                folded = value.casefold()
                # Keep one string object when folding changes nothing (GUIDs): halves key memory.
                return value if folded == value else folded
            return value
        values = [row[p] for p in positions]
        if any(v is None for v in values):
            return None
        if self.casefold_keys:
            return tuple([v.casefold() if type(v) is str else v for v in values])
        return tuple(values)

    def _keys(self, row: tuple[Any, ...]) -> list[tuple[_Index, Key]]:
        return [(index, self._key_of(index, row)) for index in self._all_indexes]

    def _build(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        if not self._column_set.issuperset(values):
            unknown = next(c for c in values if c not in self.column_index)
            raise UnknownColumn(self.name, unknown)
        get = values.get
        return tuple([get(c) for c in self.columns])

    def _check_unique(self, row: tuple[Any, ...], keys: list[tuple[_Index, Key]], exclude_slot: int | None) -> None:
        for column, pos in zip(self.primary.columns, self.primary.positions, strict=True):
            if row[pos] is None:
                raise MissingKey(self.name, column)
        for index, key in keys:
            if key is None:
                continue
            slot = index.entries.get(key)
            if slot is not None and slot != exclude_slot:
                raise DuplicateKey(self.name, index.name, tuple(row[p] for p in index.positions))

    def _index_keys(self, keys: list[tuple[_Index, Key]], slot: int) -> None:
        for index, key in keys:
            if key is not None:
                index.entries[key] = slot

    def _unindex_keys(self, keys: list[tuple[_Index, Key]]) -> None:
        for index, key in keys:
            if key is not None:
                index.entries.pop(key, None)

    def _slot_of(self, row_id: Key) -> int:
        slot = self.primary.entries.get(self._normal(row_id))
        if slot is None:
            raise RowNotFound(self.name, row_id)
        return slot

    def _live(self, slot: int) -> tuple[Any, ...]:
        row = self._slots[slot]
        assert row is not None, "index points at a deleted slot"  # noqa: S101 - internal invariant
        return row

    def _as_dict(self, row: tuple[Any, ...]) -> dict[str, Any]:
        return dict(zip(self.columns, row, strict=True))

    def _journal(self, slot: int, before: tuple[Any, ...] | None) -> None:
        journal = _JOURNAL.get()
        if journal is not None:
            journal.append((self, slot, before))

    def _undo(self, slot: int, before: tuple[Any, ...] | None) -> None:
        current = self._slots[slot]
        if current is not None:
            self._unindex_keys(self._keys(current))
        else:
            self._dead -= 1
        self._slots[slot] = before
        if before is None:
            self._dead += 1
        else:
            self._index_keys(self._keys(before), slot)

    def _maybe_compact(self) -> None:
        # Slots must stay stable while an undo log may still point at them.
        if _JOURNAL.get() is not None or self._dead < 1024 or self._dead * 2 < len(self._slots):
            return
        live = [row for row in self._slots if row is not None]
        for index in self._all_indexes:
            index.entries.clear()
        for slot, row in enumerate(live):
            self._index_keys(self._keys(row), slot)
        self._slots = list[tuple[Any, ...] | None](live)
        self._dead = 0


class Store:
    """The tables of one emulator, and the transaction that a `$batch` change set runs in."""

    def __init__(self) -> None:
        self.tables: dict[str, Table] = {}

    def add(self, table: Table) -> Table:
        """Register a table under its name (ValueError if the name is taken) and return it."""
        if table.name in self.tables:
            raise ValueError(f"table {table.name!r} already exists")
        self.tables[table.name] = table
        return table

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Undo every write made in this context if the block raises; nests (inner blocks roll back alone).

        Writes to any table count, registered in this store or not: the log
        lives in a context variable of the current task.
        """
        outer = _JOURNAL.get()
        journal: list[_UndoEntry] = outer if outer is not None else []
        mark = len(journal)
        token = _JOURNAL.set(journal)
        try:
            yield
        except BaseException:
            while len(journal) > mark:
                table, slot, before = journal.pop()
                table._undo(slot, before)
            raise
        finally:
            _JOURNAL.reset(token)
        if outer is None:
            for table in {entry[0] for entry in journal}:
                table._maybe_compact()
