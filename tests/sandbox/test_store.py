"""The in-memory tables: keys, unique indexes, rollback and order."""

from __future__ import annotations

import asyncio

import pytest

from devkit.sandbox.store import DuplicateKey, MissingKey, RowNotFound, Store, Table, UnknownColumn


def cards(casefold: bool = False) -> Table:
    return Table(
        "cards",
        ["id", "dataAreaId", "number", "points"],
        unique_keys=[["dataAreaId", "number"]],
        casefold_keys=casefold,
    )


def test_insert_get_find_and_copy_semantics() -> None:
    table = cards()
    row = table.insert({"id": "a", "dataAreaId": "usmf", "number": "C-1"})
    assert row == {"id": "a", "dataAreaId": "usmf", "number": "C-1", "points": None}
    row["points"] = 99  # a returned dict is a copy
    assert table.get("a") == {"id": "a", "dataAreaId": "usmf", "number": "C-1", "points": None}
    assert table.find("dataAreaId,number", ("usmf", "C-1")) == table.get("a")
    assert table.find("id", ("a",)) == table.get("a")
    assert table.find("dataAreaId,number", ("usrt", "C-1")) is None
    assert table.get("zz") is None
    assert len(table) == 1


def test_duplicate_primary_and_unique_keys_are_refused() -> None:
    table = cards()
    table.insert({"id": "a", "dataAreaId": "usmf", "number": "C-1"})
    with pytest.raises(DuplicateKey) as primary:
        table.insert({"id": "a", "dataAreaId": "usmf", "number": "C-2"})
    assert primary.value.key_name == "id"
    with pytest.raises(DuplicateKey) as unique:
        table.insert({"id": "b", "dataAreaId": "usmf", "number": "C-1"})
    assert unique.value.key_name == "dataAreaId,number"
    assert unique.value.values == ("usmf", "C-1")
    assert len(table) == 1


def test_casefold_keys_match_regardless_of_case() -> None:
    table = cards(casefold=True)
    table.insert({"id": "ABC", "dataAreaId": "USMF", "number": "c-1"})
    assert table.get("abc") is not None
    assert table.find("dataAreaId,number", ("usmf", "C-1")) is not None
    with pytest.raises(DuplicateKey):
        table.insert({"id": "x", "dataAreaId": "usmf", "number": "C-1"})
    assert cards().insert({"id": "ABC", "dataAreaId": "USMF", "number": "c-1"})["id"] == "ABC"


def test_unique_key_with_null_is_not_indexed() -> None:
    table = cards()
    table.insert({"id": "a", "dataAreaId": "usmf"})
    table.insert({"id": "b", "dataAreaId": "usmf"})  # two null numbers do not collide
    assert table.find("dataAreaId,number", ("usmf", None)) is None
    assert len(table) == 2


def test_update_moves_unique_key_and_checks_collisions() -> None:
    table = cards()
    table.insert({"id": "a", "dataAreaId": "usmf", "number": "C-1"})
    table.insert({"id": "b", "dataAreaId": "usmf", "number": "C-2"})
    assert table.update("a", {"number": "C-9", "points": 5})["points"] == 5
    assert table.find("dataAreaId,number", ("usmf", "C-1")) is None
    assert table.find("dataAreaId,number", ("usmf", "C-9"))["id"] == "a"  # type: ignore[index]
    with pytest.raises(DuplicateKey):
        table.update("a", {"number": "C-2"})
    assert table.get("a")["number"] == "C-9"  # type: ignore[index]
    with pytest.raises(UnknownColumn):
        table.update("a", {"nope": 1})
    with pytest.raises(RowNotFound):
        table.update("zz", {"points": 1})
    with pytest.raises(MissingKey):
        table.update("a", {"id": None})


def test_update_can_change_the_primary_key() -> None:
    table = cards()
    table.insert({"id": "a", "dataAreaId": "usmf", "number": "C-1"})
    table.update("a", {"id": "z"})
    assert table.get("a") is None
    assert table.get("z")["number"] == "C-1"  # type: ignore[index]


def test_insert_validation() -> None:
    table = cards()
    with pytest.raises(UnknownColumn):
        table.insert({"id": "a", "colour": "red"})
    with pytest.raises(MissingKey):
        table.insert({"number": "C-1"})
    with pytest.raises(ValueError, match="not columns"):
        Table("t", ["a"], unique_keys=[["b"]])


def test_composite_primary_key() -> None:
    table = Table("fo", ["dataAreaId", "CardNumber", "Points"], key_columns=["dataAreaId", "CardNumber"])
    table.insert({"dataAreaId": "usmf", "CardNumber": "1", "Points": 3})
    table.insert({"dataAreaId": "usrt", "CardNumber": "1", "Points": 4})
    assert table.get(("usrt", "1"))["Points"] == 4  # type: ignore[index]
    assert table.key_name_for(["CardNumber", "dataAreaId"]) == "dataAreaId,CardNumber"
    assert table.key_name_for(["CardNumber"]) is None
    assert table.row_id({"dataAreaId": "usmf", "CardNumber": "1"}) == ("usmf", "1")
    assert table.delete(("usmf", "1"))["Points"] == 3
    assert [r["dataAreaId"] for r in table.scan()] == ["usrt"]


def test_scan_keeps_insertion_order_through_deletes_and_compaction() -> None:
    table = Table("t", ["id", "v"])
    for i in range(3000):
        table.insert({"id": i, "v": i * 2})
    for i in range(0, 3000, 3):
        table.delete(i)
    for i in range(1, 3000, 3):
        table.delete(i)  # crosses the compaction threshold
    expected = list(range(2, 3000, 3))
    assert [r["id"] for r in table.scan()] == expected
    assert [t[0] for t in table.scan_tuples()] == expected
    assert len(table) == len(expected)
    assert table.get(2999) == {"id": 2999, "v": 5998}
    with pytest.raises(RowNotFound):
        table.delete(0)


def test_transaction_rolls_back_inserts_updates_and_deletes_in_place() -> None:
    store = Store()
    table = store.add(cards())
    other = store.add(Table("log", ["id"]))
    for i in range(5):
        table.insert({"id": i, "dataAreaId": "usmf", "number": f"C-{i}", "points": 0})
    before = list(table.scan())
    with pytest.raises(RuntimeError), store.transaction():
        table.update(1, {"points": 10, "number": "C-new"})
        table.delete(2)
        table.insert({"id": 9, "dataAreaId": "usmf", "number": "C-2"})  # reuses the deleted unique key
        table.delete(9)
        other.insert({"id": "x"})
        raise RuntimeError("part 3 failed")
    assert list(table.scan()) == before  # same rows, same order
    assert table.find("dataAreaId,number", ("usmf", "C-2"))["id"] == 2  # type: ignore[index]
    assert table.find("dataAreaId,number", ("usmf", "C-new")) is None
    assert len(other) == 0
    assert len(table) == 5


def test_transaction_commits_and_nested_block_rolls_back_alone() -> None:
    store = Store()
    table = store.add(Table("t", ["id", "v"]))
    with store.transaction():
        table.insert({"id": 1, "v": "kept"})
        with pytest.raises(ValueError), store.transaction():
            table.insert({"id": 2, "v": "undone"})
            raise ValueError("inner")
        table.insert({"id": 3, "v": "kept"})
    assert [r["id"] for r in table.scan()] == [1, 3]
    with pytest.raises(ValueError, match="already exists"):
        store.add(Table("t", ["id"]))


async def test_transaction_only_undoes_its_own_task() -> None:
    store = Store()
    table = store.add(Table("t", ["id"]))
    started = asyncio.Event()
    proceed = asyncio.Event()

    async def change_set() -> None:
        with store.transaction():
            table.insert({"id": "mine"})
            started.set()
            await proceed.wait()
            raise RuntimeError("fail")

    async def concurrent_writer() -> None:
        await started.wait()
        table.insert({"id": "theirs"})
        proceed.set()

    results = await asyncio.gather(change_set(), concurrent_writer(), return_exceptions=True)
    assert isinstance(results[0], RuntimeError)
    assert [r["id"] for r in table.scan()] == ["theirs"]


def test_add_column() -> None:
    table = Table("t", ["id"])
    table.insert({"id": 1})
    table.add_column("extra", default="d")
    assert table.get(1) == {"id": 1, "extra": "d"}
    table.insert({"id": 2, "extra": "x"})
    assert table.column_index["extra"] == 1
