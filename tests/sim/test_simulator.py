"""The simulator itself: determinism, virtual time, process kills, Storage queue semantics, the judge's rules."""

from __future__ import annotations

import asyncio
import contextvars
import random
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

import pytest

from devkit.sim.host import ReceiptMismatch, SimQueue
from devkit.sim.judge import G_SECONDS, Judge, Write
from devkit.sim.loop import CRASH_POINT, PROCESS, Deadlock, VirtualLoop
from devkit.sim.model import field_specs
from devkit.sim.run import Config, simulate
from loyaltysync.templates import Side, default_mappings_dir, load_templates

TEMPLATES = load_templates(default_mappings_dir())
SPECS = {name: field_specs(t) for name, t in TEMPLATES.items()}
CARDS = "loyalty-cards"


def _play(seed: int, main: Callable[[VirtualLoop], Coroutine[Any, Any, Any]], *, crash_rate: float = 0.0) -> Any:
    loop = VirtualLoop(random.Random(seed), crash_rate=crash_rate)
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(main(loop))
    finally:
        loop.shutdown()
        asyncio.set_event_loop(None)


def _in_process(loop: VirtualLoop, name: str, coroutine: Coroutine[Any, Any, Any], *, crashable: bool = False
                ) -> asyncio.Task[Any]:
    context = contextvars.copy_context()
    context.run(PROCESS.set, name)
    context.run(CRASH_POINT.set, crashable)
    if crashable:
        loop.crashable.add(name)
    return loop.create_task(coroutine, context=context)


# ----------------------------------------------------------------------------- the loop


def test_a_seed_decides_the_interleaving_and_replays_it() -> None:
    async def main(loop: VirtualLoop) -> list[str]:
        seen: list[str] = []

        async def worker(name: str) -> None:
            for step in range(4):
                seen.append(f"{name}{step}")
                await asyncio.sleep(0)

        await asyncio.gather(worker("a"), worker("b"), worker("c"))
        return seen

    runs = {seed: _play(seed, main) for seed in range(12)}
    assert _play(3, main) == runs[3]  # the same seed: the same order
    assert len({tuple(order) for order in runs.values()}) > 1  # other seeds: other orders


def test_virtual_time_jumps_to_the_next_timer() -> None:
    async def main(loop: VirtualLoop) -> tuple[float, float]:
        await asyncio.sleep(3600)
        first = loop.time()
        await asyncio.sleep(0.25)
        return first, loop.time()

    assert _play(1, main) == (3600.0, 3600.25)


def test_waiting_for_what_nothing_will_do_is_a_deadlock_not_a_hang() -> None:
    async def main(loop: VirtualLoop) -> None:
        await loop.create_future()

    with pytest.raises(Deadlock):
        _play(1, main)


def test_a_killed_process_runs_no_more_code_not_even_its_clean_up() -> None:
    ran: list[str] = []

    async def victim() -> None:
        try:
            await asyncio.sleep(10)
            ran.append("after the sleep")
        finally:
            ran.append("finally")

    async def main(loop: VirtualLoop) -> list[str]:
        _in_process(loop, "app-1", victim())
        await asyncio.sleep(1)
        loop.kill("app-1")
        await asyncio.sleep(60)
        return list(ran)

    assert _play(1, main) == []


def test_crashes_hit_only_crash_points_and_are_reported() -> None:
    async def main(loop: VirtualLoop) -> tuple[list[str], set[str]]:
        crashed: list[str] = []
        loop.on_crash = crashed.append

        async def busy() -> None:
            for _ in range(100_000):
                await asyncio.sleep(0.01)

        _in_process(loop, "idle", busy())  # no crash point: never crashes
        _in_process(loop, "worker", busy(), crashable=True)
        await asyncio.sleep(100)
        return crashed, set(loop.dead)

    crashed, dead = _play(5, main, crash_rate=0.01)
    assert crashed == ["worker"] and dead == {"worker"}


# ----------------------------------------------------------------------------- the queue


def test_a_leased_message_comes_back_after_its_lease_with_one_more_dequeue() -> None:
    now = [0.0]
    queue = SimQueue("q", lambda: now[0])
    queue.send("m")
    first = queue.receive(16, lease_s=600)
    assert [(m.body, m.dequeue_count) for m in first] == [("m", 1)]
    now[0] = 599.0
    assert queue.receive(16, lease_s=600) == []  # still leased (its process may have died)
    now[0] = 600.0
    again = queue.receive(16, lease_s=600)
    assert [(m.body, m.dequeue_count) for m in again] == [("m", 2)]
    with pytest.raises(ReceiptMismatch):
        queue.delete(first[0].id, first[0].receipt)  # the old lease's receipt no longer settles it
    queue.delete(again[0].id, again[0].receipt)
    assert len(queue) == 0


def test_a_delayed_send_and_a_released_message_stay_invisible_until_their_time() -> None:
    now = [0.0]
    queue = SimQueue("q", lambda: now[0])
    queue.send("later", delay_s=30)
    assert queue.receive(16, 600) == [] and queue.next_visible() == 30
    now[0] = 30.0
    [message] = queue.receive(16, 600)
    queue.update(message.id, message.receipt, 5)  # a failed attempt: visible again after visibilityTimeout
    now[0] = 34.0
    assert queue.receive(16, 600) == []
    now[0] = 35.0
    assert [m.dequeue_count for m in queue.receive(16, 600)] == [2]


# ----------------------------------------------------------------------------- the judge


def _write(seq: int, at: float, side: Side, actor: str, kind: str, **values: Any) -> Write:
    return Write(seq, at, side, CARDS, "C1", actor, kind, values)  # type: ignore[arg-type]


def _card(**values: Any) -> dict[str, Any]:
    base = {s.fo: None for s in SPECS[CARDS]}
    base.update({"CardNumber": "C1", "CardTenderType": "AsCardTender"})
    base.update(values)
    return base


CREATED = _write(0, 1.0, "fo", "person", "create", **_card())
COPIED = _write(1, 2.0, "dataverse", "sync", "create", **_card())


def _judge(history: list[Write], fo: dict[str, Any] | None, dv: dict[str, Any] | None) -> list[str]:
    return [f.rule for f in Judge(SPECS).record(CARDS, "C1", history, fo, dv)]


def test_the_later_of_two_edits_far_apart_must_win() -> None:
    history = [CREATED, COPIED,
               _write(2, 10.0, "fo", "person", "update", CardTenderType="Blocked"),
               _write(3, 11.0, "dataverse", "sync", "update", CardTenderType="Blocked"),
               _write(4, 20.0, "dataverse", "person", "update", CardTenderType="NoTender")]
    assert _judge(history, _card(CardTenderType="NoTender"), _card(CardTenderType="NoTender")) == []
    assert _judge(history, _card(CardTenderType="Blocked"), _card(CardTenderType="Blocked")) == ["C3", "C3"]


def test_edits_on_both_sides_closer_than_g_may_resolve_either_way_but_equal() -> None:
    history = [CREATED, COPIED,
               _write(2, 10.0, "dataverse", "person", "update", CardTenderType="NoTender"),
               _write(3, 10.0 + G_SECONDS / 2, "fo", "person", "update", CardTenderType="Blocked")]
    for value in ("NoTender", "Blocked"):
        assert _judge(history, _card(CardTenderType=value), _card(CardTenderType=value)) == []
    assert _judge(history, _card(CardTenderType="Blocked"), _card(CardTenderType="NoTender")) == ["C1"]


def test_a_later_fo_edit_loses_only_when_concurrent_with_the_dataverse_edit() -> None:
    concurrent = [CREATED, COPIED,
                  _write(2, 10.0, "dataverse", "person", "update", CardTenderType="NoTender"),
                  _write(3, 20.0, "fo", "person", "update", CardTenderType="Blocked")]
    assert _judge(concurrent, _card(CardTenderType="NoTender"), _card(CardTenderType="NoTender")) == []
    seen = [*concurrent[:3], _write(3, 12.0, "fo", "sync", "update", CardTenderType="NoTender"),
            _write(4, 20.0, "fo", "person", "update", CardTenderType="Blocked")]
    assert _judge(seen, _card(CardTenderType="NoTender"), _card(CardTenderType="NoTender")) == ["C3", "C3"]


def test_with_business_events_an_earlier_fo_edit_may_win_only_when_fo_wrote_the_record_again_later() -> None:
    # F&O's business events name no fields: the sync dates F&O's fields by the record's latest event.
    history = [CREATED, COPIED,
               _write(2, 10.0, "fo", "person", "update", CardTenderType="Blocked"),
               _write(3, 20.0, "dataverse", "person", "update", CardTenderType="NoTender"),
               _write(4, 30.0, "fo", "person", "update", PartyNumber="P9")]
    fo_wins = (_card(CardTenderType="Blocked", PartyNumber="P9"), _card(CardTenderType="Blocked", PartyNumber="P9"))
    business = Judge(SPECS, fo_events_name_fields=False)
    assert [f.rule for f in business.record(CARDS, "C1", history, *fo_wins)] == []
    assert _judge(history, *fo_wins) == ["C3", "C3"]  # events that name their fields date each field
    # Without F&O's later write, or once the sync had copied F&O's edit before Dataverse's: Dataverse's wins.
    blocked = _card(CardTenderType="Blocked")
    assert [f.rule for f in business.record(CARDS, "C1", history[:4], blocked, blocked)] == ["C3", "C3"]
    copied = [*history[:3], _write(3, 11.0, "dataverse", "sync", "update", CardTenderType="Blocked"),
              *[replace(w, seq=w.seq + 1) for w in history[3:]]]
    assert [f.rule for f in business.record(CARDS, "C1", copied, *fo_wins)] == ["C3", "C3"]


def test_a_deleted_record_must_stay_deleted_and_a_recreated_one_must_exist() -> None:
    deleted = [CREATED, COPIED, _write(2, 10.0, "dataverse", "person", "delete"),
               _write(3, 11.0, "fo", "sync", "delete")]
    assert _judge(deleted, None, None) == []
    assert _judge(deleted, _card(), _card()) == ["C2"]
    recreated = [*deleted, _write(4, 50.0, "dataverse", "person", "create", **_card(PartyNumber="P2"))]
    assert _judge(recreated, None, None) == ["C2"]
    # A create and a delete on different sides less than G apart: either outcome, both sides equal.
    close = [*recreated, _write(5, 50.0 + G_SECONDS / 2, "fo", "person", "delete")]
    assert _judge(close, None, None) == []
    assert _judge(close, _card(PartyNumber="P2"), _card(PartyNumber="P2")) == []


def test_a_delete_of_the_old_record_may_leave_the_one_created_again_on_the_other_side() -> None:
    # Dataverse deletes and re-creates the record; F&O deletes its (old) record before the sync copied either.
    raced = [CREATED, COPIED, _write(2, 10.0, "dataverse", "person", "delete"),
             _write(3, 12.0, "dataverse", "person", "create", **_card(PartyNumber="P2")),
             _write(4, 40.0, "fo", "person", "delete")]
    assert _judge(raced, None, None) == []
    assert _judge(raced, _card(PartyNumber="P2"), _card(PartyNumber="P2")) == []
    # Once the sync had copied Dataverse's delete to F&O, F&O's delete was of the new record: it must win.
    seen = [*raced[:3], _write(3, 11.0, "fo", "sync", "delete"),
            *[replace(w, seq=w.seq + 1) for w in raced[3:]]]
    assert _judge(seen, _card(PartyNumber="P2"), _card(PartyNumber="P2")) == ["C2"]


def test_a_record_created_twice_by_the_sync_is_a_duplicate() -> None:
    history = [CREATED, COPIED, _write(2, 3.0, "dataverse", "sync", "create", **_card())]
    assert _judge(history, _card(), _card()) == ["C4"]


def test_a_ping_pong_is_unbounded_writes() -> None:
    history = [CREATED, COPIED] + [
        _write(2 + i, 3.0 + i, "fo" if i % 2 else "dataverse", "sync", "update", PartyNumber=f"P{i % 2}")
        for i in range(12)
    ]
    assert "C5" in _judge(history, _card(), _card())


# ----------------------------------------------------------------------------- the whole world


def test_one_seed_replays_the_same_history_byte_for_byte() -> None:
    first = simulate(Config(seed=11, operations=120))
    second = simulate(Config(seed=11, operations=120))
    other = simulate(Config(seed=12, operations=120))
    assert first.digest == second.digest and first.history == second.history
    assert other.digest != first.digest
    people = [w for w in first.history if w.actor == "person"]
    assert first.operations == len(people) > 60  # most planned operations land; refused ones are not in it
    assert len(first.history) > 1.5 * len(people)  # and the sync copied them


def test_each_revert_of_the_experiment_changes_its_rule_and_puts_it_back() -> None:
    from devkit.sim import reverts
    from loyaltysync import intent, sync

    modules = (sync, intent, reverts.host, reverts.run)
    before = {(m.__name__, n): getattr(m, n) for m in modules for n in dir(m) if not n.startswith("__")}
    for name, revert in reverts.REVERTS.items():
        with revert():
            now = {(m.__name__, n): getattr(m, n) for m in modules for n in dir(m) if not n.startswith("__")}
            assert now != before, f"{name} changes nothing"
        after = {(m.__name__, n): getattr(m, n) for m in modules for n in dir(m) if not n.startswith("__")}
        assert after == before, f"{name} is not put back"
