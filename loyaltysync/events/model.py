"""The one normalized change event every inbound wire format becomes.

Like Debezium's envelope: nothing downstream of the parsers knows whether a
change came as a Dataverse webhook, an F&O data event, a business event, an
Event Grid array or a Service Bus message.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from loyaltysync import timesource
from loyaltysync.templates import Side

Operation = Literal["create", "update", "delete"]
WireFormat = Literal[
    "dataverse-webhook",
    "fo-data-event",
    "fo-business-event",
    "event-grid",
    "service-bus",
    "reconcile",
    "replay",
    "recheck",  # only in re-checks queued by an earlier version: read as a Deferral (retries.read_envelope)
]


# Names the ids derived from events (uuid5): a fixed namespace keeps them stable across releases.
_EVENT_ID_NAMESPACE = uuid.UUID("6f0c1b8e-2d47-4c55-9a43-3b7e1f0d5a21")


def derived_event_id(facts: dict[str, Any]) -> str:
    """A GUID that is the same for every delivery of one event: a hash of what the event says.

    For payloads that carry no id of their own (an F&O data event without OperationId or
    RequestId). `facts` should name the entity, key, operation, event time and values; it is
    hashed as canonical JSON (sorted keys, no spaces), so key order in the payload does not matter.
    """
    text = json.dumps(facts, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return str(uuid.uuid5(_EVENT_ID_NAMESPACE, text))


def utc_now() -> str:
    """Now, as the ISO-8601 UTC string used throughout events and state."""
    return timesource.utc().strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(slots=True)
class ChangeEvent:
    """A change on one side, normalized.

    `key` is the natural key in canonical form (template key field -> value);
    `fields` holds the canonical values the payload carried; `complete` says
    whether they are the whole mapped record (otherwise the worker re-reads the
    source). Dataverse lookups arrive as row ids: they sit in `lookup_ids`
    until the worker resolves them to natural keys (I/O the parser must not do).
    """

    template: str
    side: Side
    operation: Operation
    key: dict[str, str]
    fields: dict[str, Any] = field(default_factory=dict)
    complete: bool = False
    lookup_ids: dict[str, str | None] = field(default_factory=dict)
    row_id: str | None = None
    source_version: str | None = None
    modified_on: str | None = None
    event_id: str = field(default_factory=lambda: str(uuid.UUID(timesource.new_id())))
    correlation_id: str | None = None
    initiating_user: str | None = None
    received_at: str = field(default_factory=utc_now)
    wire_format: WireFormat = "dataverse-webhook"
    traceparent: str | None = None  # W3C trace context of the inbound request, carried through the queue
    # Dataverse updates: the canonical values before the change (from the pre-image; lookups left out),
    # which tell what this change touched when the record has no agreed values yet.
    before: dict[str, Any] = field(default_factory=dict)
    # F&O data-event updates: the mapped fields the change submitted (its Target's columns, keys left
    # out), which tell an F&O event of the sync's own write from a person's change.
    changed: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        """Serialize for the queue (plain JSON; the queue layer adds base64)."""
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> ChangeEvent:
        """Inverse of `to_json`; raises ValueError/TypeError on a foreign message."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("change event must be a JSON object")
        return cls(**data)

    @property
    def key_text(self) -> str:
        """The natural key as one readable string, e.g. `C-1001` or `usrt|C-1001`."""
        return "|".join(self.key.values())
