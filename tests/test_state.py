"""Behaviour of the sync-state, dead-letter and control stores.

Every test here runs twice: against the in-memory stores and against Table
Storage in Azurite (real HTTP), so the in-memory fake is held to the same
contract as production.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest

from devkit.azurite import Azurite
from loyaltysync.errors import ConcurrencyError
from loyaltysync.intent import Intent, SideIntent
from loyaltysync.state import (
    MAX_PAYLOAD_UNITS,
    MAX_PROPERTY_UNITS,
    ControlStore,
    DeadLetterStore,
    FoWrite,
    MemoryControlStore,
    MemoryDeadLetterStore,
    MemoryStateStore,
    StateSizeError,
    StateStore,
    SyncRecord,
    dead_letter_id,
    decode_record,
)
from loyaltysync.state_tables import TableStorage

ROW_ID = "5f1c8a2e-0d4b-4f7e-9a51-3c2b1d0e9f88"
OTHER_ROW_ID = "0b6f2d1a-7c3e-4e59-8d21-6a4f9e8c7b10"

HOSTILE_KEYS = [
    "O'Brien",
    "''",
    'quote"d',
    "a/b",
    "a\\b",
    "#1",
    "what?",
    "100%",
    "%41",
    "~41",
    "~~",
    "key_x",
    "rowid_x",
    "usrt|C-1001",
    "tab\there",
    "line\nbreak",
    "\x00nul",
    "\x7fdel\x9f",
    "space +&=:;,!*()$@[]{}<>^`",
    "ünïcödé Grüße",
    "日本語カード",
    "emoji 😀",
    "\u200bzero width\u00a0nbsp",
    "lone \ud800 surrogate",
    "x" * 500,
    "é" * 500,
    "/" * 500,
    "k" * 5000,
]


class StepClock:
    """A clock that moves one second per reading, so every write has its own time."""

    def __init__(self) -> None:
        self.now = datetime(2025, 1, 1, tzinfo=UTC)

    def __call__(self) -> str:
        self.now += timedelta(seconds=1)
        return self.now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Stores:
    state: StateStore
    dead_letters: DeadLetterStore
    control: ControlStore
    clock: StepClock


@pytest.fixture(params=["memory", "tables"])
async def stores(request: pytest.FixtureRequest, azurite: Azurite, unique_name: str) -> AsyncIterator[Stores]:
    clock = StepClock()
    if request.param == "memory":
        yield Stores(MemoryStateStore(clock), MemoryDeadLetterStore(clock), MemoryControlStore(), clock)
        return
    storage = TableStorage.from_connection_string(azurite.connection_string, table_prefix=unique_name, clock=clock)
    try:
        yield Stores(storage.state, storage.dead_letters, storage.control, clock)
    finally:
        await storage.close()


def card(key: str = "C-1001", **changes: object) -> SyncRecord:
    record = SyncRecord(
        template="loyalty-cards",
        key=key,
        values={"CardNumber": key, "Points": 120, "Rate": 0.125, "Blocked": False, "Tender": None, "Name": "Zoë"},
        versions={"fo": "5637144576", "dataverse": None},
        modified={"fo": "2025-01-01T10:00:00Z", "dataverse": None},
    )
    return replace(record, **changes)  # type: ignore[arg-type]


# --- sync state ------------------------------------------------------------------------------


async def test_put_then_get_round_trips_every_field(stores: Stores) -> None:
    saved = await stores.state.put(card(row_id=ROW_ID))
    loaded = await stores.state.get("loyalty-cards", "C-1001")

    assert saved.etag is not None
    assert loaded == saved
    assert loaded.values == card().values
    assert loaded.versions == {"fo": "5637144576", "dataverse": None}
    assert loaded.modified == {"fo": "2025-01-01T10:00:00Z", "dataverse": None}
    assert (loaded.row_id, loaded.deleted) == (ROW_ID, False)
    assert loaded.updated_at == stores.clock.now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def test_pending_writes_round_trip_and_a_replace_without_them_clears_them(stores: Stores) -> None:
    pending = Intent(
        {
            "dataverse": SideIntent("write", {"PartyNumber": "P-2", "Points": 3, "Blocked": None}, version="41"),
            "fo": SideIntent("create", {"CardNumber": "C-1001"}),
        },
        at="2025-01-01T10:00:00.000000Z",
        by="instance-1",
    )
    saved = await stores.state.put(card(intent=pending))
    assert (await stores.state.get("loyalty-cards", "C-1001")).intent == pending
    await stores.state.put(replace(saved, intent=None))
    assert (await stores.state.get("loyalty-cards", "C-1001")).intent is None
    with pytest.raises(TypeError, match="intent"):
        await stores.state.put(
            card(key="C-1002", intent=Intent({"fo": SideIntent("write", {"PartyNumber": ["not", "a", "scalar"]})}))
        )


async def test_the_bookkeeping_of_dataverse_writes_and_fo_field_times_round_trips(stores: Stores) -> None:
    saved = await stores.state.put(
        card(written_since_read=True, dataverse_written_at="2025-01-01T10:00:01.5Z",
             fo_field_times={"Points": "2025-01-01T09:59:00Z"},
             fo_written=FoWrite("2025-01-01T10:00:00Z", "2025-01-01T10:00:01Z", {"CardTenderType": "Blocked"}))
    )
    loaded = await stores.state.get("loyalty-cards", "C-1001")
    assert loaded == saved
    assert loaded is not None and loaded.fo_written == saved.fo_written
    assert (loaded.written_since_read, loaded.dataverse_written_at, loaded.fo_field_times) == (
        True, "2025-01-01T10:00:01.5Z", {"Points": "2025-01-01T09:59:00Z"}
    )
    await stores.state.put(replace(saved, written_since_read=False, dataverse_written_at=None, fo_field_times={},
                                   fo_written=None))
    cleared = await stores.state.get("loyalty-cards", "C-1001")
    assert (cleared.written_since_read, cleared.dataverse_written_at, cleared.fo_field_times, cleared.fo_written) == (
        False, None, {}, None)


def test_state_stored_by_an_earlier_version_reads_into_the_typed_fields() -> None:
    """Magic keys in the stored intent, `versions` and `modified` (as a deployed app's state holds them)."""
    legacy_intent = {
        "fo": {"LevelDescription": "b", "@version": "7"},
        "dataverse": {"@delete": True, "@row_id": "row-1", "@version": "1137"},
        "@": {"at": "2025-01-01T10:00:00.000000Z", "by": "old-instance"},
    }
    fields = decode_record({
        "values": '{"LevelPhrase":"L-1"}',
        "versions": '{"dataverse":"1137","dataverse:written":"1130","fo":null}',
        "modified": '{"dataverse":"2025-01-01T09:00:00Z","dataverse:written-at":"2025-01-01T09:30:00Z",'
                    '"fo":"2025-01-01T08:00:00Z","fo:LevelDescription":"2025-01-01T08:30:00Z","fo:Other":null}',
        "intent": json.dumps(legacy_intent),
    })
    assert fields["intent"] == Intent(
        {
            "fo": SideIntent("write", {"LevelDescription": "b"}, version="7"),
            "dataverse": SideIntent("delete", version="1137", row_id="row-1"),
        },
        at="2025-01-01T10:00:00.000000Z",
        by="old-instance",
    )
    assert fields["versions"] == {"dataverse": "1137", "fo": None}
    assert fields["modified"] == {"dataverse": "2025-01-01T09:00:00Z", "fo": "2025-01-01T08:00:00Z"}
    assert fields["written_since_read"] is True
    assert fields["dataverse_written_at"] == "2025-01-01T09:30:00Z"
    assert fields["fo_field_times"] == {"LevelDescription": "2025-01-01T08:30:00Z"}
    legacy_create = {"dataverse": {"@create": True, "LevelPhrase": "L-1"}}  # stored without "@": no time, no owner
    assert Intent.from_dict(legacy_create) == Intent({"dataverse": SideIntent("create", {"LevelPhrase": "L-1"})})
    assert decode_record({"values": "{}", "versions": "{}", "modified": "{}", "intent": "{}"})["intent"] is None


async def test_get_unknown_key_or_template_is_none(stores: Stores) -> None:
    await stores.state.put(card())
    assert await stores.state.get("loyalty-cards", "C-9999") is None
    assert await stores.state.get("loyalty-levels", "C-1001") is None


async def test_replace_with_current_etag_gives_new_etag_and_stamps_time(stores: Stores) -> None:
    first = await stores.state.put(card())
    second = await stores.state.put(replace(first, values={"Points": 130}, deleted=True))

    assert second.etag not in (None, first.etag)
    assert second.updated_at > first.updated_at
    loaded = await stores.state.get("loyalty-cards", "C-1001")
    assert loaded is not None
    assert (loaded.values, loaded.deleted, loaded.etag) == ({"Points": 130}, True, second.etag)


async def test_replace_with_stale_etag_is_refused_and_keeps_the_winner(stores: Stores) -> None:
    first = await stores.state.put(card())
    await stores.state.put(replace(first, values={"Points": 1}))

    with pytest.raises(ConcurrencyError):
        await stores.state.put(replace(first, values={"Points": 2}))
    loaded = await stores.state.get("loyalty-cards", "C-1001")
    assert loaded is not None and loaded.values == {"Points": 1}


async def test_insert_over_existing_key_is_refused(stores: Stores) -> None:
    await stores.state.put(card())
    with pytest.raises(ConcurrencyError):
        await stores.state.put(card(values={"Points": 999}))
    with pytest.raises(ConcurrencyError):
        await stores.state.put(card(values={"Points": 999}, row_id=ROW_ID))
    loaded = await stores.state.get("loyalty-cards", "C-1001")
    assert loaded is not None and loaded.values["Points"] == 120


@pytest.mark.parametrize("row_id", [None, ROW_ID])
async def test_replace_of_a_vanished_record_is_refused(stores: Stores, row_id: str | None) -> None:
    saved = await stores.state.put(card(row_id=row_id))
    await stores.state.delete(saved)
    with pytest.raises(ConcurrencyError):
        await stores.state.put(replace(saved, values={"Points": 1}))
    assert await stores.state.get("loyalty-cards", "C-1001") is None


@pytest.mark.parametrize("row_id", [None, ROW_ID])
async def test_concurrent_writers_from_the_same_version_exactly_one_wins(
    stores: Stores, row_id: str | None
) -> None:
    await stores.state.put(card(row_id=row_id, values={"Points": 0}))
    for round_ in range(20):
        read = await stores.state.get("loyalty-cards", "C-1001")
        assert read is not None
        writers = [replace(read, values={"Points": round_ * 10 + n}) for n in range(3)]
        results = await asyncio.gather(*(stores.state.put(w) for w in writers), return_exceptions=True)

        winners = [r for r in results if isinstance(r, SyncRecord)]
        assert len(winners) == 1, results
        assert all(isinstance(r, ConcurrencyError) for r in results if r is not winners[0])
        stored = await stores.state.get("loyalty-cards", "C-1001")
        assert stored is not None
        assert (stored.values, stored.etag) == (winners[0].values, winners[0].etag)


@pytest.mark.parametrize("row_id", [None, ROW_ID])
async def test_concurrent_inserts_of_a_new_key_exactly_one_wins(stores: Stores, row_id: str | None) -> None:
    for round_ in range(15):
        key = f"C-{round_}"
        results = await asyncio.gather(
            *(stores.state.put(card(key, row_id=row_id, values={"n": n})) for n in range(3)),
            return_exceptions=True,
        )
        winners = [r for r in results if isinstance(r, SyncRecord)]
        assert len(winners) == 1, results
        assert sum(isinstance(r, ConcurrencyError) for r in results) == 2
        stored = await stores.state.get("loyalty-cards", key)
        assert stored is not None and stored.values == winners[0].values


async def test_delete_checks_the_etag(stores: Stores) -> None:
    first = await stores.state.put(card(row_id=ROW_ID))
    second = await stores.state.put(replace(first, values={"Points": 7}))

    with pytest.raises(ConcurrencyError):
        await stores.state.delete(first)
    assert await stores.state.get("loyalty-cards", "C-1001") is not None

    await stores.state.delete(second)
    assert await stores.state.get("loyalty-cards", "C-1001") is None
    assert await stores.state.find_by_row_id("loyalty-cards", ROW_ID) is None
    await stores.state.delete(second)  # already gone: the caller's intent holds, no error
    with pytest.raises(ValueError, match="never stored"):
        await stores.state.delete(card())


async def test_replacing_a_record_many_times_keeps_its_row_id_lookup(stores: Stores) -> None:
    """Most writes keep the row id (the table store then skips rewriting the index row)."""
    record = await stores.state.put(card("C-1", row_id=ROW_ID))
    for points in range(3):
        record = await stores.state.put(replace(record, values={**record.values, "Points": points}))
        found = await stores.state.find_by_row_id("loyalty-cards", ROW_ID)
        assert found is not None and found.values["Points"] == points and found.etag == record.etag
    loaded = await stores.state.get("loyalty-cards", "C-1")  # a version read back, then replaced
    assert loaded is not None
    await stores.state.put(replace(loaded, row_id=OTHER_ROW_ID))
    assert await stores.state.find_by_row_id("loyalty-cards", ROW_ID) is None
    moved = await stores.state.find_by_row_id("loyalty-cards", OTHER_ROW_ID)
    assert moved is not None and moved.key == "C-1"


async def test_find_by_row_id_follows_the_current_row_id(stores: Stores) -> None:
    await stores.state.put(card("C-1", row_id=ROW_ID))
    await stores.state.put(card("C-2"))

    found = await stores.state.find_by_row_id("loyalty-cards", ROW_ID)
    assert found is not None and found.key == "C-1"
    assert found == await stores.state.get("loyalty-cards", "C-1")
    assert await stores.state.find_by_row_id("loyalty-cards", OTHER_ROW_ID) is None
    assert await stores.state.find_by_row_id("loyalty-levels", ROW_ID) is None

    # The record gets a new row id (re-created in Dataverse): the old id no longer finds it.
    assert found.etag is not None
    await stores.state.put(replace(found, row_id=OTHER_ROW_ID))
    assert await stores.state.find_by_row_id("loyalty-cards", ROW_ID) is None
    moved = await stores.state.find_by_row_id("loyalty-cards", OTHER_ROW_ID)
    assert moved is not None and moved.key == "C-1"

    # The Dataverse row's alternate key is edited: the same row id now belongs to C-3.
    await stores.state.put(card("C-3", row_id=OTHER_ROW_ID))
    renamed = await stores.state.find_by_row_id("loyalty-cards", OTHER_ROW_ID)
    assert renamed is not None and renamed.key == "C-3"

    # Deleting the older claimant must not break the newer one's lookup.
    old = await stores.state.get("loyalty-cards", "C-1")
    assert old is not None
    await stores.state.delete(old)
    still = await stores.state.find_by_row_id("loyalty-cards", OTHER_ROW_ID)
    assert still is not None and still.key == "C-3"


async def test_list_and_count_cover_one_template_including_tombstones(stores: Stores) -> None:
    for n in range(7):
        await stores.state.put(card(f"C-{n}", row_id=f"row-{n}", deleted=n % 3 == 0))
    await stores.state.put(replace(card("L-1"), template="loyalty-levels"))

    listed = [r async for r in stores.state.list("loyalty-cards")]
    assert sorted(r.key for r in listed) == [f"C-{n}" for n in range(7)]
    assert {r.key for r in listed if r.deleted} == {"C-0", "C-3", "C-6"}
    assert all(r.etag is not None for r in listed)
    assert await stores.state.count("loyalty-cards") == 7  # row-id index rows are not records
    assert await stores.state.count("loyalty-levels") == 1
    assert await stores.state.count("loyalty-reward-points") == 0
    assert [r async for r in stores.state.list("loyalty-reward-points")] == []


async def test_listed_etag_is_usable_for_the_next_write(stores: Stores) -> None:
    await stores.state.put(card(row_id=ROW_ID))
    [listed] = [r async for r in stores.state.list("loyalty-cards")]
    updated = await stores.state.put(replace(listed, values={"Points": 5}))
    assert updated.values == {"Points": 5}


async def test_hostile_keys_round_trip_and_list_back_exactly(stores: Stores) -> None:
    for n, key in enumerate(HOSTILE_KEYS):
        saved = await stores.state.put(card(key, row_id=f"{key}|row{n}"))
        assert saved.key == key
    for n, key in enumerate(HOSTILE_KEYS):
        loaded = await stores.state.get("loyalty-cards", key)
        assert loaded is not None and loaded.key == key and loaded.values["CardNumber"] == key
        by_row = await stores.state.find_by_row_id("loyalty-cards", f"{key}|row{n}")
        assert by_row is not None and by_row.key == key
        await stores.state.put(replace(loaded, values={"CardNumber": key, "seen": True}))
    listed = [r async for r in stores.state.list("loyalty-cards")]
    assert sorted(r.key for r in listed) == sorted(HOSTILE_KEYS)
    assert await stores.state.count("loyalty-cards") == len(HOSTILE_KEYS)


@pytest.mark.parametrize("template", ["a/b#c?d", "it's 100%", "日本", "t" * 600])
async def test_hostile_template_names_keep_partitions_apart(stores: Stores, template: str) -> None:
    await stores.state.put(replace(card(), template=template, row_id=ROW_ID))
    await stores.state.put(card("other"))
    loaded = await stores.state.get(template, "C-1001")
    assert loaded is not None and loaded.template == template
    assert [r.key async for r in stores.state.list(template)] == ["C-1001"]
    found = await stores.state.find_by_row_id(template, ROW_ID)
    assert found is not None and found.template == template


async def test_values_must_be_json_scalars_and_finite(stores: Stores) -> None:
    with pytest.raises(TypeError, match="Points"):
        await stores.state.put(card(values={"Points": [1, 2]}))
    with pytest.raises(ValueError):
        await stores.state.put(card(values={"Rate": math.nan}))
    assert await stores.state.get("loyalty-cards", "C-1001") is None


async def test_oversized_state_is_refused_with_a_clear_error(stores: Stores) -> None:
    # Just fits: one property of 32 Ki UTF-16 units, as JSON ({"Note":"..."} adds 11 characters).
    fits = card(values={"Note": "n" * (MAX_PROPERTY_UNITS - 11)})
    saved = await stores.state.put(fits)
    assert saved.values == fits.values

    too_big = card("C-2", values={"Note": "n" * (MAX_PROPERTY_UNITS - 10)})
    with pytest.raises(StateSizeError, match="values") as raised:
        await stores.state.put(too_big)
    assert raised.value.limit == MAX_PROPERTY_UNITS
    assert await stores.state.get("loyalty-cards", "C-2") is None


async def test_records_returned_are_copies(stores: Stores) -> None:
    saved = await stores.state.put(card())
    saved.values["Points"] = -1
    loaded = await stores.state.get("loyalty-cards", "C-1001")
    assert loaded is not None
    loaded.versions["fo"] = "tampered"
    again = await stores.state.get("loyalty-cards", "C-1001")
    assert again is not None
    assert (again.values["Points"], again.versions["fo"]) == (120, "5637144576")


# --- dead letters ----------------------------------------------------------------------------


async def test_parking_twice_counts_attempts_and_keeps_first_seen(stores: Stores) -> None:
    first = await stores.dead_letters.park(
        "loyalty-cards", "fo", "C-1001", "lookup failed", "MappingError", '{"n":1}', "ev-1"
    )
    second = await stores.dead_letters.park(
        "loyalty-cards", "fo", "C-1001", "Dataverse answered 400", "0x80040237", '{"n":2}', "ev-2"
    )

    assert first.id == second.id == dead_letter_id("loyalty-cards", "fo", "C-1001")
    assert (first.attempts, second.attempts) == (1, 2)
    assert second.first_seen == first.first_seen == first.last_seen
    assert second.last_seen > first.last_seen
    stored = await stores.dead_letters.get(first.id)
    assert stored == second
    assert (stored.reason, stored.error_code, stored.payload, stored.event_id) == (
        "Dataverse answered 400",
        "0x80040237",
        '{"n":2}',
        "ev-2",
    )


async def test_each_side_and_key_has_its_own_entry(stores: Stores) -> None:
    a = await stores.dead_letters.park("loyalty-cards", "fo", "C-1", "r", "c", "{}", "e1")
    b = await stores.dead_letters.park("loyalty-cards", "dataverse", "C-1", "r", "c", "{}", "e2")
    c = await stores.dead_letters.park("loyalty-cards", "fo", "C-2", "r", "c", "{}", "e3")
    d = await stores.dead_letters.park("loyalty-levels", "fo", "C-1", "r", "c", "{}", "e4")
    assert len({a.id, b.id, c.id, d.id}) == 4
    assert (a.attempts, b.attempts, c.attempts, d.attempts) == (1, 1, 1, 1)


async def test_dead_letter_list_get_count_remove(stores: Stores) -> None:
    older = await stores.dead_letters.park("loyalty-cards", "fo", "C-1", "r1", "c", "{}", "e1")
    newer = await stores.dead_letters.park("loyalty-cards", "dataverse", "C-2", "r2", "c", "{}", "e2")
    level = await stores.dead_letters.park("loyalty-levels", "fo", "GOLD", "r3", "c", "{}", "e3")

    assert [e.id for e in await stores.dead_letters.list("loyalty-cards")] == [older.id, newer.id]
    assert [e.id for e in await stores.dead_letters.list()] == [older.id, newer.id, level.id]
    assert await stores.dead_letters.list("loyalty-reward-points") == []
    assert await stores.dead_letters.count() == 3
    assert await stores.dead_letters.count("loyalty-levels") == 1
    assert await stores.dead_letters.get(level.id) == level
    assert await stores.dead_letters.get("0" * 32) is None

    assert await stores.dead_letters.remove(newer.id) is True
    assert await stores.dead_letters.remove(newer.id) is False
    assert await stores.dead_letters.get(newer.id) is None
    assert await stores.dead_letters.count("loyalty-cards") == 1
    again = await stores.dead_letters.park("loyalty-cards", "dataverse", "C-2", "r2", "c", "{}", "e5")
    assert (again.id, again.attempts) == (newer.id, 1)  # a removed entry starts over


async def test_concurrent_parks_of_one_record_lose_no_attempt(stores: Stores) -> None:
    parks = [
        stores.dead_letters.park("loyalty-cards", "fo", "C-1", f"try {n}", "c", "{}", f"e{n}") for n in range(6)
    ]
    await asyncio.gather(*parks)
    [entry] = await stores.dead_letters.list()
    assert entry.attempts == 6


async def test_large_payload_survives_and_an_absurd_one_is_cut(stores: Stores) -> None:
    # Bigger than one Table Storage property, as a 64 KiB queue message can be once decoded.
    payload = '{"fields":"' + "é😀x" * 20000 + '"}'
    entry = await stores.dead_letters.park("loyalty-cards", "fo", "C-1", "r" * 20000, "c", payload, "e1")
    stored = await stores.dead_letters.get(entry.id)
    assert stored is not None
    assert stored.payload == payload
    assert stored.reason == entry.reason and len(stored.reason) < 20000

    absurd = "y" * (MAX_PAYLOAD_UNITS + 10)
    cut = await stores.dead_letters.park("loyalty-cards", "fo", "C-2", "r", "c", absurd, "e2")
    stored_cut = await stores.dead_letters.get(cut.id)
    assert stored_cut is not None and stored_cut.payload == "y" * MAX_PAYLOAD_UNITS


async def test_dead_letters_for_hostile_keys(stores: Stores) -> None:
    for key in HOSTILE_KEYS:
        await stores.dead_letters.park("it's/a#template?", "dataverse", key, "r", "c", "{}", "e")
    entries = await stores.dead_letters.list("it's/a#template?")
    assert sorted(e.key for e in entries) == sorted(HOSTILE_KEYS)
    for entry in entries:
        assert await stores.dead_letters.get(entry.id) == entry


# --- control documents -----------------------------------------------------------------------


async def test_control_documents_round_trip_overwrite_and_list_by_scope(stores: Stores) -> None:
    assert await stores.control.get("pause", "loyalty-cards") is None
    watermark = {"fo": "2025-01-01T00:00:00Z", "dataverse": None, "page": 3, "done": False, "keys": ["a", "b"]}
    await stores.control.set("watermark", "loyalty-cards", watermark)
    await stores.control.set("watermark", "loyalty-levels", {"fo": None})
    await stores.control.set("pause", "loyalty-cards", {"paused": True, "by": "ops"})
    await stores.control.set("pause", "loyalty-cards", {"paused": False})

    assert await stores.control.get("watermark", "loyalty-cards") == watermark
    assert await stores.control.get("pause", "loyalty-cards") == {"paused": False}
    assert await stores.control.list("watermark") == {
        "loyalty-cards": watermark,
        "loyalty-levels": {"fo": None},
    }
    assert await stores.control.list("checkpoint") == {}


async def test_control_documents_with_hostile_names(stores: Stores) -> None:
    names = ["last-success/fo→dataverse", "it's #1?", "a\\b", "x" * 700]
    for n, name in enumerate(names):
        await stores.control.set("scope/with?odd#chars", name, {"n": n})
    assert await stores.control.list("scope/with?odd#chars") == {name: {"n": n} for n, name in enumerate(names)}


async def test_control_documents_must_be_small_json_objects(stores: Stores) -> None:
    with pytest.raises(TypeError):
        await stores.control.set("pause", "x", ["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(StateSizeError):
        await stores.control.set("checkpoint", "x", {"keys": "k" * MAX_PROPERTY_UNITS})
    assert await stores.control.list("checkpoint") == {}
