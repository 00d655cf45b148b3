"""The simulation's judge: checks docs/consistency.md's guarantees C1-C6, against the simulation's own history.

It reads only what the simulated services recorded (every committed change, by a person or by the
sync, with the true virtual time it was made) and the final rows; never the engine's sync state.
The rules are written in docs/consistency.md ("What you are guaranteed") and nowhere else; each
check below names the rule it checks.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from devkit.sim.model import FieldSpec
from loyaltysync.templates import Side

Actor = Literal["person", "sync"]
Kind = Literal["create", "update", "delete"]
G_SECONDS = 3.0  # service clocks within +-1 s of true time, times kept to whole seconds
WRITE_FACTOR = 3
WRITE_SLACK = 3


@dataclass(frozen=True, slots=True)
class Write:
    """One change a service committed. `values`: the fields it set, in the model's form (F&O terms)."""

    seq: int
    at: float
    side: Side
    template: str
    key: str
    actor: Actor
    kind: Kind
    values: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Finding:
    rule: str
    template: str
    key: str
    detail: str

    def __str__(self) -> str:
        return f"{self.rule} {self.template} {self.key}: {self.detail}"


def _other(side: Side) -> Side:
    return "dataverse" if side == "fo" else "fo"


class Judge:
    """Checks one template's records."""

    def __init__(
        self, specs: Mapping[str, list[FieldSpec]], *, g_s: float = G_SECONDS, fo_events_name_fields: bool = True
    ) -> None:
        self.specs = specs
        self.g_s = g_s
        self.fo_events_name_fields = fo_events_name_fields  # False: F&O sends business events (no field list)

    def record(
        self,
        template: str,
        key: str,
        writes: Iterable[Write],
        fo: Mapping[str, Any] | None,
        dv: Mapping[str, Any] | None,
    ) -> list[Finding]:
        history = sorted(writes, key=lambda w: w.seq)
        found: list[Finding] = []

        def note(rule: str, detail: str) -> None:
            found.append(Finding(rule, template, key, detail))

        specs = self.specs[template]
        if (fo is None) != (dv is None):
            note("C1", f"only in {'F&O' if dv is None else 'Dataverse'}")
        elif fo is not None and dv is not None:
            differing = [s.fo for s in specs if fo.get(s.fo) != dv.get(s.fo)]
            if differing:
                note("C1", "; ".join(f"{n}: F&O {fo.get(n)!r} / Dataverse {dv.get(n)!r}" for n in differing))
        people = [w for w in history if w.actor == "person"]
        structural = [w for w in people if w.kind != "update"]
        last = structural[-1] if structural else None
        present = fo is not None or dv is not None
        close = last is not None and self._close_call(last, structural)
        if last is None or last.kind == "delete":
            if present and not close and not (last is not None and self._deleted_old_record(last, history)):
                note("C2", f"present, but its last create-or-delete was a delete ({_describe(last)})")
        elif not present and not close and not self._racing_recreate(last, history):
            note("C2", f"gone, but a person created it last ({_describe(last)})")
        elif present:
            for side, row in (("fo", fo), ("dataverse", dv)):
                if row is not None:
                    for problem in self._values(specs, last, history, row):
                        note("C3", f"in {'F&O' if side == 'fo' else 'Dataverse'}: {problem}")
        sides: tuple[Side, Side] = ("fo", "dataverse")
        for side in sides:
            made = sum(1 for w in history if w.actor == "sync" and w.kind == "create" and w.side == side)
            asked = sum(1 for w in people if w.kind == "create" and w.side == _other(side))
            if made > asked:
                note("C4", f"the sync created it {made} times in {side}, people created it {asked} times in the other")
        synced = sum(1 for w in history if w.actor == "sync")
        if synced > WRITE_FACTOR * len(people) + WRITE_SLACK:
            note("C5", f"{synced} sync writes for {len(people)} person's writes")
        return found

    def _close_call(self, last: Write, structural: list[Write]) -> bool:
        """C2: a create and a delete of the record on different sides less than G apart resolve either way."""
        return any(
            w.side != last.side and w.kind != last.kind and abs(last.at - w.at) < self.g_s
            for w in structural
        )

    @staticmethod
    def _deleted_old_record(delete: Write, history: list[Write]) -> bool:
        """C2's third exception: the delete was made after the other side deleted the record and created it
        again, before the sync copied that re-create to the delete's side: it deleted the old record."""
        for create in history:
            if create.actor != "person" or create.kind != "create" or create.side == delete.side:
                continue
            if create.at > delete.at:
                continue
            before = [w for w in history if w.actor == "person" and w.kind != "update" and w.seq < create.seq]
            if not before or before[-1].kind != "delete" or before[-1].side != create.side:
                continue
            copied = any(  # the first delete or the re-create reached the delete's side before it
                w.actor == "sync" and w.kind in ("create", "delete") and w.side == delete.side
                and before[-1].at <= w.at <= delete.at
                for w in history
            )
            if not copied:
                return True
        return False

    def _racing_recreate(self, create: Write, history: list[Write]) -> bool:
        """A re-create made before the sync deleted the record on its side after a delete on the other side."""
        for delete in history:
            if delete.actor != "person" or delete.kind != "delete" or delete.side == create.side:
                continue
            if delete.at > create.at:
                continue
            copied = any(
                w.actor == "sync" and w.kind == "delete" and w.side == create.side and delete.at <= w.at <= create.at
                for w in history
            )
            if not copied:
                return True
        return False

    def _values(
        self,
        specs: list[FieldSpec],
        create: Write,
        history: list[Write],
        row: Mapping[str, Any],
    ) -> list[str]:
        problems = []
        starts = [create, *self._merged_incarnations(create, history)]
        for spec in specs:
            if spec.is_key:
                continue
            allowed: list[Any] = []
            for start in starts:
                since = [w for w in history if w.seq >= start.seq and w.kind != "delete"]
                allowed.extend(v for v in self._allowed(spec, start, since) if v not in allowed)
            value = row.get(spec.fo)
            if value not in allowed:
                problems.append(f"{spec.fo} is {value!r}, expected {' or '.join(repr(v) for v in allowed)}")
        return problems

    def _merged_incarnations(self, create: Write, history: list[Write]) -> list[Write]:
        """Earlier creates the last one may be merged with (C2's second rule): a delete and re-create on one
        side, made before the sync copied the delete to the other side, may be taken for an edit."""
        found: list[Write] = []
        current = create
        while True:
            before = [w for w in history if w.seq < current.seq and w.actor == "person" and w.kind != "update"]
            if len(before) < 2 or before[-1].kind != "delete" or before[-1].side != current.side:
                return found
            delete = before[-1]
            copied = any(w.actor == "sync" and w.kind == "delete" and w.side != delete.side
                         and delete.at <= w.at <= current.at for w in history)
            previous = next((w for w in reversed(before[:-1]) if w.kind == "create"), None)
            if copied or previous is None:
                return found
            found.append(previous)
            current = previous

    def _allowed(self, spec: FieldSpec, create: Write, since: list[Write]) -> list[Any]:
        latest: dict[Side, Write] = {}
        for w in since:
            if w.actor == "person" and spec.fo in w.values and spec.flows_from(w.side):
                latest[w.side] = w
        if not latest:
            # Not written since the create by a side it flows from: the create's value, or empty when the
            # create was made on a side the field does not flow from.
            return [create.values.get(spec.fo) if spec.flows_from(create.side) else None]
        ordered = sorted(latest.values(), key=lambda w: (w.at, w.seq))
        winner = ordered[-1]
        allowed = [winner.values[spec.fo]]
        if len(ordered) == 2:
            loser = ordered[0]
            if (winner.at - loser.at < self.g_s or self._concurrent_fo_edit(spec, winner, loser, since)
                    or self._fo_edit_dated_later(spec, winner, loser, since)):
                allowed.append(loser.values[spec.fo])
        return allowed

    def _fo_edit_dated_later(self, spec: FieldSpec, winner: Write, loser: Write, since: list[Write]) -> bool:
        """C3's third exception: where F&O's events name no fields (business events), the earlier write is F&O's,
        the sync had not copied it to Dataverse before the Dataverse write, and F&O wrote the record again (any
        field) after the Dataverse write, less G: the sync can date F&O's fields only by the record's latest
        F&O event."""
        if self.fo_events_name_fields or winner.side != "dataverse":
            return False
        again = any(w.actor == "person" and w.side == "fo" and w.seq > loser.seq and w.at > winner.at - self.g_s
                    for w in since)
        copied = any(
            w.actor == "sync" and w.side == "dataverse" and w.values.get(spec.fo) == loser.values[spec.fo]
            and loser.at <= w.at <= winner.at
            for w in since
        )
        return again and not copied

    @staticmethod
    def _concurrent_fo_edit(spec: FieldSpec, winner: Write, loser: Write, since: list[Write]) -> bool:
        """C3's second exception: the later write is F&O's, made before the sync copied the Dataverse write
        to F&O. F&O rows carry no modified time and its events name no user: an F&O edit putting back the
        value both sides agreed on looks like the sync's own copy."""
        if winner.side != "fo":
            return False
        copied = any(
            w.actor == "sync" and w.side == "fo" and w.values.get(spec.fo) == loser.values[spec.fo]
            and loser.at <= w.at <= winner.at
            for w in since
        )
        return not copied


def _describe(write: Write | None) -> str:
    if write is None:
        return "never created"
    return f"{write.kind} in {write.side} at {write.at:.3f} s (#{write.seq})"


def by_record(writes: Iterable[Write]) -> dict[tuple[str, str], list[Write]]:
    grouped: dict[tuple[str, str], list[Write]] = defaultdict(list)
    for w in writes:
        grouped[(w.template, w.key)].append(w)
    return grouped
