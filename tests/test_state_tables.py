"""What is particular to the Table Storage stores: key encoding, table layout, client wiring.

Store behaviour (ETags, races, listing, dead letters, control) is in
tests/test_state.py, which runs against these stores and the in-memory ones.
"""

from __future__ import annotations

import importlib.util
import json
import re
import string
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from azure.core.pipeline.transport import AsyncioRequestsTransport
from azure.data.tables.aio import TableServiceClient
from hypothesis import given
from hypothesis import strategies as st

from devkit.azurite import Azurite
from loyaltysync.errors import ConfigError
from loyaltysync.intent import Intent, SideIntent
from loyaltysync.state import SyncRecord
from loyaltysync.state_tables import (
    MAX_KEY_UNITS,
    TableControlStore,
    TableStateStore,
    TableStorage,
    async_transport,
    decode_key,
    encode_key,
    service_from_connection_string,
    table_key,
)

# Characters Table Storage forbids in keys, and those that break URL-addressed operations.
UNSAFE = set("/\\#?%'\"+&=:;,!*()$@ ~") | {chr(c) for c in range(0x20)} | {chr(c) for c in range(0x7F, 0xA0)}
ANY_TEXT = st.text(alphabet=st.characters(blacklist_categories=()), max_size=80)


@pytest.fixture
async def service(azurite: Azurite) -> AsyncIterator[TableServiceClient]:
    client = service_from_connection_string(azurite.connection_string)
    async with client:
        yield client


@given(ANY_TEXT)
def test_key_encoding_is_reversible_and_table_safe(text: str) -> None:
    encoded = encode_key(text)
    assert decode_key(encoded) == text
    assert not UNSAFE & set(re.sub(r"~[0-9A-F]{2}", "", encoded))
    assert "~~" not in encoded


@given(ANY_TEXT, ANY_TEXT)
def test_different_keys_never_share_a_row_key(a: str, b: str) -> None:
    if a != b:
        assert table_key(a, "key_") != table_key(b, "key_")


def test_readable_keys_stay_readable() -> None:
    assert table_key("usrt|C-1001", "key_") == "key_usrt|C-1001"
    assert table_key("Zoë's card #7", "key_") == "key_Zoë~27s~20card~20~237"
    assert table_key("loyalty-cards") == "loyalty-cards"


def test_keys_over_one_kib_become_a_digest_that_fits() -> None:
    long_a, long_b = "/" * 200, "/" * 199 + "\\"  # 600 characters once escaped
    key_a, key_b = table_key(long_a, "key_"), table_key(long_b, "key_")
    assert re.fullmatch(r"key_~~[0-9a-f]{64}", key_a)
    assert key_a != key_b
    assert len(table_key("x" * (MAX_KEY_UNITS - 4), "key_")) == MAX_KEY_UNITS
    assert "~~" in table_key("x" * (MAX_KEY_UNITS - 3), "key_")
    assert "~~" in table_key("😀" * 255, "key_")  # 255 characters, 510 UTF-16 units + prefix


async def test_a_record_is_one_row_plus_one_row_id_index_row(service: TableServiceClient, unique_name: str) -> None:
    store = TableStateStore.from_service(service, unique_name)
    await store.put(SyncRecord("loyalty-cards", "usrt|C-1", {"Points": 5}, {"fo": "7"}, row_id="row-1"))
    await store.put(SyncRecord("loyalty-cards", "usrt|C-2", {"Points": 6}))

    table = service.get_table_client(f"{unique_name}state")
    rows = {e["RowKey"]: e async for e in table.list_entities()}
    assert set(rows) == {"key_usrt|C-1", "key_usrt|C-2", "rowid_row-1"}
    record = rows["key_usrt|C-1"]
    assert record["PartitionKey"] == "loyalty-cards"
    assert (record["Key"], record["Values"], record["Versions"], record["RowId"]) == (
        "usrt|C-1",
        '{"Points":5}',
        '{"fo":"7"}',
        "row-1",
    )
    assert "RowId" not in rows["key_usrt|C-2"]  # Table Storage has no null: absent means None
    assert rows["rowid_row-1"]["Key"] == "usrt|C-1"


async def test_a_stale_index_row_finds_nothing(service: TableServiceClient, unique_name: str) -> None:
    store = TableStateStore.from_service(service, unique_name)
    await store.put(SyncRecord("loyalty-cards", "C-1", row_id="row-new"))
    # As if a worker died between writes: an index row naming a record that has another row id.
    table = service.get_table_client(f"{unique_name}state")
    await table.upsert_entity({"PartitionKey": "loyalty-cards", "RowKey": "rowid_row-old", "Key": "C-1"})
    await table.upsert_entity({"PartitionKey": "loyalty-cards", "RowKey": "rowid_row-gone", "Key": "C-9"})

    assert await store.find_by_row_id("loyalty-cards", "row-old") is None
    assert await store.find_by_row_id("loyalty-cards", "row-gone") is None
    found = await store.find_by_row_id("loyalty-cards", "row-new")
    assert found is not None and found.key == "C-1"


async def test_tables_are_created_on_first_use(service: TableServiceClient, unique_name: str) -> None:
    store = TableControlStore.from_service(service, table_name=f"{unique_name}ctl")

    async def exists() -> bool:
        return any([t.name == f"{unique_name}ctl" async for t in service.list_tables()])

    assert not await exists()
    assert await store.get("pause", "loyalty-cards") is None
    assert await exists()


async def test_table_names_are_checked(service: TableServiceClient) -> None:
    for bad in ("ab", "1abc", "has-dash", "x" * 64, "tables"):
        with pytest.raises(ConfigError, match="table name"):
            TableStateStore.from_service(service, table_name=bad)
    store = TableStateStore.from_service(service)
    assert store.table_name == "loyaltysyncstate"


async def test_storage_shares_one_client_and_honours_table_names(azurite: Azurite, unique_name: str) -> None:
    storage = TableStorage.from_connection_string(
        azurite.connection_string, unique_name, control_table=f"{unique_name}settings"
    )
    async with storage:
        assert storage.state.table_name == f"{unique_name}state"
        assert storage.dead_letters.table_name == f"{unique_name}deadletters"
        assert storage.control.table_name == f"{unique_name}settings"
        await storage.control.set("pause", "loyalty-cards", {"paused": True})
        await storage.state.put(SyncRecord("loyalty-cards", "C-1"))
        await storage.dead_letters.park("loyalty-cards", "fo", "C-1", "r", "c", "{}", "e")
    async with service_from_connection_string(azurite.connection_string) as check:
        names = {t.name async for t in check.list_tables()}
    assert {f"{unique_name}state", f"{unique_name}deadletters", f"{unique_name}settings"} <= names


async def test_closing_a_store_on_a_shared_client_leaves_the_client_open(
    service: TableServiceClient, unique_name: str
) -> None:
    first = TableStateStore.from_service(service, unique_name)
    await first.put(SyncRecord("loyalty-cards", "C-1"))
    await first.close()
    second = TableStateStore.from_service(service, unique_name)
    assert await second.get("loyalty-cards", "C-1") is not None


def test_development_storage_shorthand_points_at_azurite_default_port() -> None:
    client = service_from_connection_string("UseDevelopmentStorage=true")
    assert client.url.startswith("http://127.0.0.1:10002/devstoreaccount1")
    assert client.account_name == "devstoreaccount1"


def test_transport_falls_back_to_requests_without_aiohttp(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "aiohttp" else real_find_spec(name))
    assert isinstance(async_transport(), AsyncioRequestsTransport)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert async_transport() is None  # the SDK's own default (aiohttp)


def test_safe_alphabet_is_what_the_tests_assume() -> None:
    kept = [c for c in string.printable if encode_key(c) == c]
    assert set(kept) == set(string.ascii_letters + string.digits + "-_.|")


async def test_a_record_stored_by_an_earlier_version_is_read_into_typed_fields_and_written_back_typed(
    service: TableServiceClient, unique_name: str
) -> None:
    """A deployed app's state: the intent of a step that died as magic-key JSON, bookkeeping as keys of
    Versions / Modified. Read once into the typed fields; the next write stores them in their own form."""
    store = TableStateStore.from_service(service, unique_name)
    await store.put(SyncRecord("loyalty-levels", "L-1"))  # creates the table
    table = service.get_table_client(f"{unique_name}state")
    legacy_intent = {
        "dataverse": {"LevelDescription": "copied", "@version": "1137"},
        "@": {"at": "2025-01-01T10:00:00.000000Z", "by": "old-instance"},
    }
    await table.upsert_entity({
        "PartitionKey": "loyalty-levels",
        "RowKey": "key_L-1",
        "Template": "loyalty-levels",
        "Key": "L-1",
        "Values": '{"LevelDescription":"agreed","LevelPhrase":"L-1"}',
        "Versions": '{"dataverse":"1137","dataverse:written":"1130"}',
        "Modified": '{"dataverse:written-at":"2025-01-01T09:30:00Z","fo":"2025-01-01T08:00:00Z",'
                    '"fo:LevelDescription":"2025-01-01T08:30:00Z"}',
        "Pending": json.dumps(legacy_intent),
        "Deleted": False,
        "UpdatedAt": "2025-01-01T10:00:00.000000Z",
    })

    record = await store.get("loyalty-levels", "L-1")
    assert record is not None
    assert record.intent == Intent(
        {"dataverse": SideIntent("write", {"LevelDescription": "copied"}, version="1137")},
        at="2025-01-01T10:00:00.000000Z",
        by="old-instance",
    )
    assert (record.versions, record.modified) == ({"dataverse": "1137"}, {"fo": "2025-01-01T08:00:00Z"})
    assert (record.written_since_read, record.dataverse_written_at, record.fo_field_times) == (
        True, "2025-01-01T09:30:00Z", {"LevelDescription": "2025-01-01T08:30:00Z"}
    )

    await store.put(record)
    stored = await table.get_entity("loyalty-levels", "key_L-1")
    assert (stored["Versions"], stored["Modified"]) == ('{"dataverse":"1137"}', '{"fo":"2025-01-01T08:00:00Z"}')
    assert json.loads(stored["Pending"])["sides"]["dataverse"]["kind"] == "write"
    assert json.loads(stored["Bookkeeping"]) == {
        "dataverse_written_at": "2025-01-01T09:30:00Z",
        "fo_field_times": {"LevelDescription": "2025-01-01T08:30:00Z"},
        "written_since_read": True,
    }
    assert await store.get("loyalty-levels", "L-1") == replace(record, etag=stored.metadata["etag"],
                                                              updated_at=stored["UpdatedAt"])
