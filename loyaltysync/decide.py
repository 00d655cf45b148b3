"""The sync decision: what to write where, given both sides and the agreed state. Pure.

The decision is symmetric: it looks at the F&O record, the Dataverse record
and the last values both sides agreed on (the sync state), and answers with the
writes that bring the two sides together. Which side's event triggered it only
matters for staleness and for labelling echoes; so the same pair of records
always resolves the same way, whichever event comes first, and a late or
duplicated event can never undo a newer change.

Per field, against the agreed value `a`:
- equal on both sides: nothing to do;
- changed on one side only: copy it to the other (if the field flows that way);
- changed on both (a conflict): the template's policy picks the winner
  (`fo-wins`, `dataverse-wins`, or `last-writer-wins` by source modified time);
- one-way fields (`>`, `>>`, `<`, `<<`): the source side is authoritative.

Records present on one side only: created on the other, unless the two sides
had agreed it existed (then it was deleted, and the delete propagates when the
template allows it; otherwise it is re-created).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from loyaltysync.mapping import parse_datetime
from loyaltysync.templates import FieldMap, Side, Template, other_side

Canonical = dict[str, Any]
Reason = Literal[
    "changed",
    "created",
    "deleted",
    "echo",
    "stale",
    "no-change",
    "conflict-deferred",
    "both-missing",
    "deletes-disabled",
]


@dataclass(frozen=True, slots=True)
class SideRecord:
    """One side's current record: `values` None when the record is not there.

    `time_is_floor`: `modified_on` is not the record's own modified time but the latest
    event time seen for it (F&O rows carry none), so its current values may be newer.
    `field_times`: per field, the latest time of an event that changed that field (F&O's
    update events name the fields they submitted); a field's time is the later of the two.
    """

    values: Canonical | None
    modified_on: str | None = None
    version: str | None = None
    row_id: str | None = None
    created_by: str | None = None  # Dataverse: the user who created the row (`_createdby_value`)
    time_is_floor: bool = False
    field_times: Mapping[str, str] = field(default_factory=dict)

    @property
    def exists(self) -> bool:
        return self.values is not None

    def time_of(self, name: str) -> str | None:
        """When the field's current value was written, as far as known."""
        return latest(self.modified_on, self.field_times.get(name))


MISSING = SideRecord(values=None)


@dataclass(frozen=True, slots=True)
class Agreed:
    """What the sync state knows: the values both sides last agreed on."""

    values: Canonical
    exists: bool  # False for a tombstone (both sides deleted) or no state at all


NO_STATE = Agreed(values={}, exists=False)


@dataclass(frozen=True, slots=True)
class Conflict:
    """The same field changed on both sides since they last agreed."""

    field: str
    fo_value: Any
    dataverse_value: Any
    winner: Side | None  # None: deferred until the other side's own event tells its time
    rule: str


@dataclass(slots=True)
class Decision:
    """What to do. `writes[side]` holds canonical values to write to that side."""

    reason: Reason
    writes: dict[Side, Canonical] = field(default_factory=dict)
    create: Side | None = None
    delete: Side | None = None
    conflicts: list[Conflict] = field(default_factory=list)
    agreed: Canonical = field(default_factory=dict)
    exists_after: bool = True

    @property
    def acts(self) -> bool:
        """True when anything is written or deleted."""
        return bool(self.writes) or self.create is not None or self.delete is not None


def is_newer(version: str | None, than: str | None) -> bool:
    """Compare source versions: numbers numerically (ControlNumber, versionnumber), else as text."""
    if version is None or than is None:
        return True
    if version.isdigit() and than.isdigit():
        return int(version) > int(than)
    moments = instant(version), instant(than)
    if moments[0] is not None and moments[1] is not None:
        return moments[0] > moments[1]  # times with and without fractions or offsets do not sort as text
    return version > than


def latest(*moments: str | None) -> str | None:
    """The latest of some times (or versions), None when none is known."""
    known = [moment for moment in moments if moment]
    if not known:
        return None
    found = known[0]
    for moment in known[1:]:
        if is_newer(moment, found):
            found = moment
    return found


def instant(text: str) -> datetime | None:
    """The moment an ISO-8601 or WCF /Date()/ string names, or None when it is not a time."""
    try:
        return parse_datetime(text)
    except ValueError:
        return None


def is_stale(event_version: str | None, seen_version: str | None, operation: str = "update") -> bool:
    """Whether an event is older than what was already applied from its side, so it changes nothing.

    A create or update carries the version its change *produced*: not newer than the version seen
    means already reflected (a duplicate, or a late delivery). A delete carries the version of the
    row it *removed* (the pre-image's: the row's last change, the number that change's own event
    carried); the delete itself comes after it. So a delete is stale only when a strictly newer
    version has been seen (the key lives on in a later row, e.g. re-created since); equal is live.
    """
    if event_version is None or seen_version is None:
        return False
    if operation == "delete":
        return is_newer(seen_version, event_version)
    return not is_newer(event_version, seen_version)


def decide(
    template: Template,
    fo: SideRecord,
    dataverse: SideRecord,
    agreed: Agreed,
    *,
    trigger: Side,
    live: bool = True,
    from_integration_user: bool = False,
) -> Decision:
    """Resolve one record pair into writes.

    `trigger` is the side whose event caused this (kept for tracing); `live` is False for
    reconciliation passes (then an unknown modified time counts as older instead
    of deferring to an event that may never come).
    """
    records: dict[Side, SideRecord] = {"fo": fo, "dataverse": dataverse}
    if not fo.exists and not dataverse.exists:
        # Typically the webhook of our own delete: nothing left to do on either side.
        return Decision(reason="echo" if from_integration_user else "both-missing", exists_after=False)
    if not fo.exists or not dataverse.exists:
        return _one_side_missing(template, records, agreed)

    fo_values = fo.values or {}
    dv_values = dataverse.values or {}
    writes: dict[Side, Canonical] = {"fo": {}, "dataverse": {}}
    new_agreed: Canonical = dict(agreed.values)
    conflicts: list[Conflict] = []
    for f in template.all_fields:
        if f.fo is None or f.dataverse is None:
            continue
        x, y = fo_values.get(f.key), dv_values.get(f.key)
        if x == y:
            new_agreed[f.key] = x
            continue
        source = _authoritative(f, x, y, agreed)
        if source is None:
            conflict = _settle(template, f, x, y, records, live=live)
            conflicts.append(conflict)
            source = conflict.winner
        if source is None:
            continue  # deferred: agreed value stays, so the other side's event still sees a conflict
        value = x if source == "fo" else y
        target = other_side(source)
        if value is None and target == "fo" and f.type == "enum":
            # F&O enums always hold a member, so an emptied Dataverse choice cannot be written there:
            # a two-way field puts F&O's member back into Dataverse; a '<' field has nothing to write.
            if not f.flows_to("dataverse"):
                continue
            source, value, target = "fo", x, "dataverse"
        if f.flows_to(target):
            writes[target][f.key] = value
            new_agreed[f.key] = value
    effective = {side: values for side, values in writes.items() if values}
    if effective:
        reason: Reason = "changed"
    elif any(c.winner is None for c in conflicts):
        reason = "conflict-deferred"
    else:
        reason = "echo" if from_integration_user else "no-change"
    return Decision(reason=reason, writes=effective, conflicts=conflicts, agreed=new_agreed)


def _authoritative(f: FieldMap, x: Any, y: Any, agreed: Agreed) -> Side | None:
    """The side whose value should win without a conflict, or None for a real conflict."""
    to_dv, to_fo = f.flows_to("dataverse"), f.flows_to("fo")
    if to_dv and not to_fo:
        return "fo"
    if to_fo and not to_dv:
        return "dataverse"
    if not agreed.exists or f.key not in agreed.values:
        return None  # nothing known to compare with: a conflict for the policy
    a = agreed.values[f.key]
    if x != a and y == a:
        return "fo"
    if y != a and x == a:
        return "dataverse"
    return None


def _settle(
    template: Template, f: FieldMap, x: Any, y: Any, records: dict[Side, SideRecord], *, live: bool
) -> Conflict:
    policy = template.conflict_policy
    if policy == "fo-wins":
        return Conflict(f.key, x, y, "fo", policy)
    if policy == "dataverse-wins":
        return Conflict(f.key, x, y, "dataverse", policy)
    fo_time, dv_time = records["fo"].time_of(f.key), records["dataverse"].time_of(f.key)
    if fo_time is None or dv_time is None:
        if live:
            # The side with no known time has an event on its way that will carry it.
            return Conflict(f.key, x, y, None, "last-writer-wins: waiting for the other side's event time")
        if fo_time is None and dv_time is None:
            return Conflict(f.key, x, y, "fo", "last-writer-wins: no times known, F&O is the record of origin")
        known: Side = "dataverse" if fo_time is None else "fo"
        return Conflict(f.key, x, y, known, "last-writer-wins: the side with a known time is newer")
    winner: Side = "dataverse" if is_newer(dv_time, fo_time) else "fo"
    loser = other_side(winner)
    if live and records[loser].time_is_floor:
        # The loser's time is only a lower bound (an event's time, perhaps a late one): a later
        # change on that side may still be on its way. Its event, or the re-check after the
        # grace period (then not live), decides.
        rule = f"last-writer-wins: waiting for {loser}'s events after {records[loser].time_of(f.key)}"
        return Conflict(f.key, x, y, None, rule)
    if winner == "dataverse":
        return Conflict(f.key, x, y, "dataverse", f"last-writer-wins: {dv_time} > {fo_time}")
    return Conflict(f.key, x, y, "fo", f"last-writer-wins: {fo_time} >= {dv_time}")


def _one_side_missing(template: Template, records: dict[Side, SideRecord], agreed: Agreed) -> Decision:
    present: Side = "fo" if records["fo"].exists else "dataverse"
    missing = other_side(present)
    values = records[present].values or {}
    if agreed.exists:
        # Both sides had the record: the missing side deleted it.
        if template.deletes_to(present):
            return Decision(reason="deleted", delete=present, agreed={}, exists_after=False)
        if not template.fields_to(missing):
            return Decision(reason="deletes-disabled", agreed=dict(agreed.values))
    if not template.fields_to(missing):
        return Decision(reason="no-change", agreed=dict(agreed.values), exists_after=False)
    written = {f.key: values.get(f.key) for f in template.fields_to(missing) if f.key in values}
    for f in template.key_fields:
        written[f.key] = values.get(f.key)
    reason: Reason = "created" if not agreed.exists else "deletes-disabled"
    return Decision(reason=reason, writes={missing: written}, create=missing, agreed=dict(written))


def agreed_from_state(values: Canonical | None, deleted: bool) -> Agreed:
    """Build the `Agreed` view of a stored sync state (None or empty when both sides never agreed)."""
    if not values:
        return NO_STATE
    return Agreed(values=dict(values), exists=not deleted)


__all__ = [
    "MISSING",
    "NO_STATE",
    "Agreed",
    "Conflict",
    "Decision",
    "SideRecord",
    "agreed_from_state",
    "decide",
    "is_newer",
    "is_stale",
    "latest",
]
