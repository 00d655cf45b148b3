"""Crash safety: what a step was about to do, what is known now, and what it did. Pure.

A sync step stores an `Intent` (per side: write, create or delete, with the values and the
row version / row id it read) before it writes, and clears it when it records the outcome. A
step that finds an intent left behind (its step died, or is still writing on another
instance) gathers `Evidence` (both sides as read now, the event being processed) and asks
`judge`, per side, what became of it:

- `Landed`: the writes happened and show (`values` count as agreed);
- `Superseded`: they happened, and a person changed, deleted or re-created the record since;
- `NotLanded`: nothing shows they happened (a re-check after the grace takes this too);
- `Wait`: only an event still to come can tell (live steps only).

`settle` folds the verdicts into the agreed state the decision starts from. Every rule
that turns evidence into a verdict is one line in `judge`, `_judge_delete` or `_why_wait`,
and each fact they read about the event is one helper below (docs/consistency.md
lists them all).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from loyaltysync.decide import Agreed, Canonical, Decision, SideRecord
from loyaltysync.mapping import parse_datetime
from loyaltysync.templates import SIDES, Side, other_side

_CLOCKS_APART = timedelta(seconds=2)  # a service's clock and an instance's, each within a second of true time

Kind = Literal["write", "create", "delete"]


@dataclass(frozen=True, slots=True)
class SideIntent:
    """What a step is about to do on one side: `values` written (none for a delete), and what it read there.

    `version`: the row version read before a write or delete (a row with another version changed since);
    `row_id`: the Dataverse row id read before a delete (another row id there now is a new row).
    """

    kind: Kind
    values: dict[str, Any] = field(default_factory=dict)
    version: str | None = None
    row_id: str | None = None

    def held_by(self, record: SideRecord) -> bool:
        """Whether `record` holds every value this intent writes."""
        now = record.values or {}
        return all(now.get(name) == value for name, value in self.values.items())


@dataclass(frozen=True, slots=True)
class Intent:
    """What one step is about to write, per side, stored in the sync state before its writes.

    `at`: when it was stored (the step's clock, ISO UTC); `by`: the engine instance of the step.
    Both None only in an intent stored by a version that did not record them. `ended`: the step
    failed after storing it and stopped writing (its writes may still have landed): another instance
    judges it at once instead of waiting for the step.
    """

    sides: dict[Side, SideIntent]
    at: str | None = None
    by: str | None = None
    ended: bool = False

    @classmethod
    def of(cls, decision: Decision, read: Mapping[Side, SideRecord], at: str, by: str) -> Intent:
        """The intent of a decision about to be applied, with the versions and row ids it was decided on."""
        sides: dict[Side, SideIntent] = {}
        for side, values in decision.writes.items():
            if side == decision.create:
                sides[side] = SideIntent("create", dict(values))
            else:
                sides[side] = SideIntent("write", dict(values), version=read[side].version)
        if decision.delete is not None:
            was = read[decision.delete]
            sides[decision.delete] = SideIntent("delete", version=was.version, row_id=was.row_id)
        return cls(sides, at, by)

    def as_dict(self) -> dict[str, Any]:
        """The JSON object stored for the intent."""
        sides = {
            side: {"kind": s.kind, "values": dict(s.values), "version": s.version, "row_id": s.row_id}
            for side, s in self.sides.items()
        }
        stored: dict[str, Any] = {"at": self.at, "by": self.by, "sides": sides}
        if self.ended:
            stored["ended"] = True
        return stored

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Intent | None:
        """Inverse of `as_dict`; also reads the older stored form (`{"fo": {..., "@create": true}, "@": {...}}`).

        None for an empty document (no intent).
        """
        if "sides" not in data:
            return _from_legacy(data)
        sides: dict[Side, SideIntent] = {}
        for side in SIDES:
            stored = data["sides"].get(side)
            if stored is not None:
                kind = stored["kind"]
                if kind not in ("write", "create", "delete"):
                    raise ValueError(f"stored intent of {side}: unknown kind {kind!r}")
                sides[side] = SideIntent(kind, dict(stored.get("values") or {}), stored.get("version"),
                                         stored.get("row_id"))
        return cls(sides, data.get("at"), data.get("by"), bool(data.get("ended", False)))


def _from_legacy(data: Mapping[str, Any]) -> Intent | None:
    """An intent as stored before it had a type: per side the values with `@create`, `@delete`, `@version`,
    `@row_id` keys among them, and `"@": {"at", "by"}`."""
    sides: dict[Side, SideIntent] = {}
    for side in SIDES:
        stored = data.get(side)
        if not stored:
            continue
        values = {name: value for name, value in stored.items() if not name.startswith("@")}
        if stored.get("@delete"):
            sides[side] = SideIntent("delete", version=stored.get("@version"), row_id=stored.get("@row_id"))
        elif stored.get("@create"):
            sides[side] = SideIntent("create", values)
        else:
            sides[side] = SideIntent("write", values, version=stored.get("@version"))
    meta = data.get("@") or {}
    if not sides and not meta:
        return None
    return Intent(sides, meta.get("at"), meta.get("by"))


# --- evidence ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EventFacts:
    """What the event being processed says: its side and operation, when (`at`), the version its change
    made (`version`), the fields it names (`changed`, F&O updates), the row just before it (`before`,
    Dataverse's pre-image) and the row it carried (`payload`, complete events only). A re-check's event
    says only its side and operation: what else it said was applied when it was deferred."""

    side: Side
    operation: str
    at: str | None = None
    version: str | None = None
    changed: tuple[str, ...] = ()
    before: Mapping[str, Any] = field(default_factory=dict)
    payload: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Evidence:
    """Everything a step gathered that can tell what an interrupted step did.

    `fo` / `dataverse`: the records as read now (versions, row id, Dataverse's creator); `ours`: the
    event is of the integration user's own write; `recheck`: the step is a deferral's re-check (its time
    is the deferral's, not a change's); `live`: False for re-checks and reconciliation; `waited_out`: the
    intent is older than the longest an event can be held back (the conflict grace plus a crashed
    instance's queue lease). Only a step that is not live, about an intent waited out, waits for nothing:
    what is not shown to have landed did not.
    """

    fo: SideRecord
    dataverse: SideRecord
    event: EventFacts
    ours: bool = False
    recheck: bool = False
    live: bool = True
    integration_users: frozenset[str] = frozenset()
    waited_out: bool = True
    own_fo_write: tuple[str, str] | None = None  # the sync's last recorded F&O write: (started, ended), ISO

    def record(self, side: Side) -> SideRecord:
        return self.fo if side == "fo" else self.dataverse


# --- verdicts ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Landed:
    """The step's writes on the side happened and show: `values` count as agreed (`gone`: it was a delete)."""

    values: Mapping[str, Any] = field(default_factory=dict)
    gone: bool = False


@dataclass(frozen=True, slots=True)
class Superseded:
    """The step's writes happened (or no longer matter) and a person changed, deleted or re-created the
    record since: `values` count as agreed; `gone`: the record the step knew is gone, what is there is new."""

    values: Mapping[str, Any] = field(default_factory=dict)
    gone: bool = False


@dataclass(frozen=True, slots=True)
class NotLanded:
    """Nothing shows the step's writes on the side happened: the agreed state stays as it was."""


@dataclass(frozen=True, slots=True)
class Wait:
    """Only an event still to come can tell what the step did: nothing is written until it comes."""

    reason: str


Verdict = Landed | Superseded | NotLanded | Wait


def judge(intent: Intent, side: Side, evidence: Evidence) -> Verdict:
    """What became of `intent` on `side`, as far as `evidence` tells. Every rule is one line here, in
    `_judge_delete` or in `_why_wait`; the comment says why."""
    wanted = intent.sides.get(side)
    if wanted is None:
        return NotLanded()
    now = evidence.record(side)
    # W0: a re-check or reconciliation while the event telling what the step did may still be held back (a
    # crashed instance's lease) waits as a live event does: the simulator found a re-check of an older
    # conflict re-creating a record whose delete was still held.
    patient = evidence.live or not evidence.waited_out
    waiting = _why_wait(intent, side, wanted, evidence) if patient else None
    if waiting is not None:
        return Wait(waiting)
    if wanted.kind == "delete":
        return _judge_delete(intent, side, wanted, evidence)
    values: dict[str, Any] = {}
    values |= _rewritten_since(intent, side, wanted, evidence)  # J4: fields a person wrote after the intent
    values |= _proved_by_event(side, wanted, evidence)  # J5: the event shows the values as written
    landed = bool(values)
    if not now.exists:
        if wanted.kind == "create" and side == _deleted_since(intent, evidence):
            landed = True  # J6: its delete event, later than the intent: the create landed, then was deleted
        return Superseded(values) if landed else NotLanded()
    if wanted.kind == "create" and side == _recreated(intent, evidence) and not wanted.held_by(now):
        return Superseded(values, gone=True)  # J7: a person's record made after the intent: new, as after a tombstone
    if wanted.kind == "create" and _creator(side, wanted, evidence) == "sync":
        return Landed(dict(wanted.values))  # J8: the sync created the row: it had every value (changed since: a change)
    landed = landed or wanted.kind == "create"  # J9: a create's row is there: the record existed on both sides
    shown = {name: value for name, value in wanted.values.items() if (now.values or {}).get(name) == value}
    values |= shown  # J10: values the side holds now are the sync's own copy, not a person's edit
    if not (landed or shown):
        return NotLanded()
    return Landed(values) if wanted.held_by(now) else Superseded(values)


def _judge_delete(intent: Intent, side: Side, wanted: SideIntent, evidence: Evidence) -> Verdict:
    """`judge` for a delete (no values to compare: the row there now tells)."""
    now = evidence.record(side)
    if not now.exists:
        return Landed(gone=True)  # J1: the row it was deleting is gone: the sync deleted it
    if side == _recreated(intent, evidence) or _another_row(wanted, now):
        return Superseded(gone=True)  # J2: a row created after the intent (or another row id): deleted, re-made
    return NotLanded()  # J3: the row is still there (a re-check takes "never happened")


def _why_wait(intent: Intent, side: Side, wanted: SideIntent, evidence: Evidence) -> str | None:
    """Why only an event still to come can tell what the step did on `side` (None: the evidence tells)."""
    now = evidence.record(side)
    proof = _proof_of_write(evidence)
    if (
        wanted.kind == "write" and side == "dataverse" and wanted.version and (proof is None or proof[0] != side)
        and now.exists and now.version != wanted.version and not wanted.held_by(now)
    ):  # W1: landed and changed since, or never landed and a person edited: their events tell
        return "an interrupted write in dataverse may have landed and been changed since: waiting for its events"
    if (
        wanted.kind == "create" and not now.exists and side != _deleted_since(intent, evidence)
        and evidence.record(other_side(side)).exists
    ):  # W2: never created, or created and deleted since: the delete event tells
        return f"an interrupted create in {side} may have landed and been deleted since: waiting for its delete"
    if (
        wanted.kind == "delete" and now.exists and side != _recreated(intent, evidence)
        and not (wanted.row_id and now.row_id) and now.version != wanted.version
    ):  # W3: never deleted and then edited, or deleted and created again (no row id to tell): the create event tells
        return f"an interrupted delete in {side} may have landed and the record been created again since"
    return None


def settle(agreed: Agreed, intent: Intent, evidence: Evidence) -> Agreed | Wait:
    """The agreed state counting what an interrupted step did where it landed, or the first side's `Wait`.

    Values that landed were agreed; a landed write or create means the record existed on both sides
    (so a copy cannot win a conflict against the edit after it, nor a later delete look like a create);
    a landed delete, or a record made anew since, makes the record a tombstone (a create is copied, not
    taken for a delete). Nothing landed: the agreed state as stored.
    """
    verdicts = [judge(intent, side, evidence) for side in SIDES]
    for verdict in verdicts:
        if isinstance(verdict, Wait):
            return verdict
    merged = dict(agreed.values)
    landed = gone = False
    for verdict in verdicts:
        if isinstance(verdict, Landed | Superseded):
            merged.update(verdict.values)
            landed, gone = True, gone or verdict.gone
    if gone:
        return Agreed(values=merged, exists=False)
    return Agreed(values=merged, exists=True) if landed else agreed


# --- what the evidence says about the event ---------------------------------------------------


def _after_intent(intent: Intent, evidence: Evidence, operation: str) -> Side | None:
    """The event's side, when the event is an `operation` made after the intent was stored.

    Compared in whole seconds (F&O's event times have no fraction); clocks are taken to agree to the
    second. A re-check's time is its deferral's, not a change's: it dates nothing. A delete event without
    a time counts (an intent deletes only records agreed on both sides, created well before it).
    """
    event = evidence.event
    if evidence.recheck or event.operation != operation:
        return None
    try:
        made = parse_datetime(event.at) if event.at else None
        at = parse_datetime(intent.at) if intent.at else None
    except ValueError:
        made = at = None
    if made is None or at is None:
        return event.side if operation == "delete" else None
    if event.side == "fo" and _own_fo_write(made, evidence.own_fo_write):
        # F&O's events name no user: the event of the sync's own last F&O write (a delete just before the
        # intent, in the same second: the simulator found one) proves nothing about the intent.
        return None
    return event.side if made >= at.replace(microsecond=0) else None


def _own_fo_write(made: datetime, window: tuple[str, str] | None) -> bool:
    """Whether an F&O event made at `made` falls within the sync's last F&O write, give or take the clocks."""
    if window is None:
        return False
    try:
        started, ended = parse_datetime(window[0]), parse_datetime(window[1])
    except ValueError:
        return False
    if started is None or ended is None:
        return False
    return started - _CLOCKS_APART <= made <= ended + _CLOCKS_APART


def _deleted_since(intent: Intent, evidence: Evidence) -> Side | None:
    """The side whose delete event, later than the intent, is being processed (an older one proves nothing)."""
    return _after_intent(intent, evidence, "delete")


def _recreated(intent: Intent, evidence: Evidence) -> Side | None:
    """The side where a person made the record after the intent: its create event is later, or Dataverse
    says a person created the row the step was creating."""
    if evidence.ours:
        return None
    created = _after_intent(intent, evidence, "create")
    if created is not None:
        return created
    wanted = intent.sides.get("dataverse")
    if wanted is not None and _creator("dataverse", wanted, evidence) == "person":
        return "dataverse"
    return None


def _creator(side: Side, wanted: SideIntent, evidence: Evidence) -> Literal["sync", "person"] | None:
    """Who created the Dataverse row a step was creating (None: unknown, or no such step).

    Only the sync creates rows as an integration user: a row created by anyone else is not the step's.
    """
    now = evidence.record(side)
    creator = (now.created_by or "").lower()
    if side != "dataverse" or wanted.kind != "create" or not now.exists or not creator:
        return None
    if not evidence.integration_users:
        return None
    return "sync" if creator in evidence.integration_users else "person"


def _proof_of_write(evidence: Evidence) -> tuple[Side, Mapping[str, Any]] | None:
    """Values the event's side held at a moment after a step's write there, if the event shows them.

    The webhook of the sync's own write carries the row as written (proof it landed, even when a person
    has changed the row again since); a person's Dataverse update carries the row just before that change.
    """
    event = evidence.event
    if evidence.ours and event.payload is not None and event.operation != "delete":
        return event.side, event.payload
    if not evidence.ours and event.side == "dataverse" and event.operation == "update" and event.before:
        return event.side, event.before
    return None


def _proved_by_event(side: Side, wanted: SideIntent, evidence: Evidence) -> Canonical:
    """The intended values, when the event proves they were written (lookups arrive as row ids: not shown)."""
    proof = _proof_of_write(evidence)
    if proof is None or proof[0] != side:
        return {}
    shown = [name for name in wanted.values if name in proof[1]]
    if shown and all(proof[1][name] == wanted.values[name] for name in shown):
        return dict(wanted.values)
    return {}


def _rewritten_since(intent: Intent, side: Side, wanted: SideIntent, evidence: Evidence) -> Canonical:
    """The intended values of fields a person wrote on F&O after the intent (named by its update event):
    whether or not the step's write landed, the person's values are a change against them.

    F&O events name no user: an update of ours shows the intended values, which this leaves out.
    """
    event = evidence.event
    now = evidence.record(side)
    if (
        side != "fo" or evidence.ours or event.side != "fo" or not event.changed or wanted.kind != "write"
        or not now.exists or _after_intent(intent, evidence, "update") is None
    ):
        return {}
    values = now.values or {}
    return {n: wanted.values[n] for n in event.changed if n in wanted.values and values.get(n) != wanted.values[n]}


def _another_row(wanted: SideIntent, now: SideRecord) -> bool:
    """Whether the side holds another row than the one the intent was read from (row ids known)."""
    return bool(wanted.row_id and now.row_id and wanted.row_id != now.row_id)


__all__ = [
    "EventFacts",
    "Evidence",
    "Intent",
    "Landed",
    "NotLanded",
    "SideIntent",
    "Superseded",
    "Verdict",
    "Wait",
    "judge",
    "settle",
]
