"""`StateStore.put_many`, the bulk load the initial sync uses: in memory and on Table Storage (Azurite)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from devkit.azurite import Azurite
from loyaltysync.state import MemoryStateStore, StateStore, SyncRecord
from loyaltysync.state_tables import TableStorage

ROW = "0c1f5b9e-3d2a-4b8c-9e7f-{:012d}"


@pytest.fixture(params=["memory", "tables"])
async def store(request: pytest.FixtureRequest, azurite: Azurite, unique_name: str) -> AsyncIterator[StateStore]:
    if request.param == "memory":
        yield MemoryStateStore()
        return
    storage = TableStorage.from_connection_string(azurite.connection_string, table_prefix=unique_name)
    try:
        yield storage.state
    finally:
        await storage.close()


def record(i: int, *, row_id: str | None = None, party: str = "P-1") -> SyncRecord:
    return SyncRecord(
        template="loyalty-cards",
        key=f"C-{i:04d}",
        values={"CardNumber": f"C-{i:04d}", "PartyNumber": party, "Points": i},
        versions={"dataverse": str(1000 + i)},
        row_id=row_id,
    )


async def test_many_records_with_row_ids_are_stored_across_transactions(store: StateStore) -> None:
    # 260 records with index rows are 520 entities: six transactions of at most 100.
    records = [record(i, row_id=ROW.format(i)) for i in range(260)]

    assert await store.put_many(records) == 260

    assert await store.count("loyalty-cards") == 260
    loaded = await store.get("loyalty-cards", "C-0137")
    assert loaded is not None and loaded.etag is not None
    assert loaded.values == records[137].values
    assert (loaded.versions, loaded.row_id) == ({"dataverse": "1137"}, ROW.format(137))
    found = await store.find_by_row_id("loyalty-cards", ROW.format(259))
    assert found is not None and found.key == "C-0259"


async def test_put_many_replaces_whatever_is_stored_and_etags_keep_working(store: StateStore) -> None:
    first = await store.put(record(1, party="old"))
    await store.put_many([record(1, party="new"), record(2)])

    loaded = await store.get("loyalty-cards", "C-0001")
    assert loaded is not None and loaded.values["PartyNumber"] == "new" and loaded.etag != first.etag
    loaded.values["PartyNumber"] = "newer"
    await store.put(loaded)  # the etag put_many left behind is the current one
    again = await store.get("loyalty-cards", "C-0001")
    assert again is not None and again.values["PartyNumber"] == "newer"


async def test_a_key_or_row_id_given_twice_keeps_the_last(store: StateStore) -> None:
    shared = ROW.format(7)
    stored = await store.put_many([record(1, party="a"), record(1, party="b", row_id=shared), record(2, row_id=shared)])

    assert stored == 2
    one = await store.get("loyalty-cards", "C-0001")
    assert one is not None and one.values["PartyNumber"] == "b"
    owner = await store.find_by_row_id("loyalty-cards", shared)
    assert owner is not None and owner.key == "C-0002"


async def test_a_record_that_cannot_be_stored_stops_the_call_before_any_write(store: StateStore) -> None:
    bad = record(3)
    bad.values["Nested"] = {"not": "a scalar"}

    with pytest.raises(TypeError):
        await store.put_many([record(1), bad])

    assert await store.count("loyalty-cards") == 0


async def test_an_empty_call_stores_nothing(store: StateStore) -> None:
    assert await store.put_many([]) == 0
    assert await store.count("loyalty-cards") == 0
