"""Where an initial sync stands, kept in the control store after every committed page.

Scope `initial-sync`, name `<template>:<direction>`. A page is committed when
every record of it (and of every page before it) was acknowledged by the
target or parked as a dead letter, and its sync state was stored; the
checkpoint then holds the link to the next page. A crash loses at most the
pages after the last checkpoint, and `--resume` re-sends only those: writes are
upserts (Dataverse by alternate key; F&O create, then update when it exists),
so re-sending creates no duplicates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from loyaltysync.events.model import utc_now
from loyaltysync.state import ControlStore

SCOPE = "initial-sync"
Direction = Literal["fo-to-dataverse", "dataverse-to-fo"]
Status = Literal["running", "done"]


@dataclass(slots=True)
class Checkpoint:
    """Totals since the run began (across resumes) and the next page to read (None when done)."""

    template: str
    direction: Direction
    status: Status = "running"
    next: str | None = None
    pages: int = 0
    read: int = 0
    written: int = 0
    failed: int = 0
    started_at: str = field(default_factory=utc_now)
    updated_at: str = field(default_factory=utc_now)

    @property
    def name(self) -> str:
        return f"{self.template}:{self.direction}"

    def to_document(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> Checkpoint:
        """Inverse of `to_document`; unknown keys are ignored (documents of later versions)."""
        known = {k: doc[k] for k in cls.__dataclass_fields__ if k in doc}
        return cls(**known)


async def load(control: ControlStore, template: str, direction: Direction) -> Checkpoint | None:
    """The saved checkpoint of a template and direction, or None."""
    doc = await control.get(SCOPE, f"{template}:{direction}")
    return None if doc is None else Checkpoint.from_document(doc)


async def save(control: ControlStore, checkpoint: Checkpoint) -> None:
    """Store the checkpoint (last writer wins: one run per template and direction at a time)."""
    checkpoint.updated_at = utc_now()
    await control.set(SCOPE, checkpoint.name, checkpoint.to_document())
