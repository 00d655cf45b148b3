"""Who hears about changes: the emulator's stand-in for the business-event and data-event catalogs.

A subscription names an entity set, the change types it wants and an
endpoint URL, and whether the endpoint gets business events (wire-formats B3)
or data events (the RemoteExecutionContext of B2). Every committed change
through the API is turned into one delivery per matching subscription and
handed to the shared delivery queue, which retries like F&O does (one try and
three retries a second apart, then the error log with manual resend).
"""

from __future__ import annotations

import dataclasses
import json
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from devkit.sandbox.delivery import FNO_EVENT_RETRY, Outgoing
from devkit.sandbox.fno.events import CHANGE_TYPES, Change, ChangeType, EventFactory
from devkit.sandbox.fno.schema import Catalog

EventFormat = Literal["business-event", "data-event"]


class SubscriptionRequest(BaseModel):
    """Body of `POST /_admin/subscriptions`."""

    model_config = ConfigDict(extra="forbid")

    entity_set: str
    url: str = Field(pattern=r"^https?://")
    events: list[ChangeType] = Field(default_factory=lambda: list(CHANGE_TYPES), min_length=1)
    format: EventFormat = "business-event"
    headers: dict[str, str] = Field(default_factory=dict)
    business_event_id: str | None = None

    @field_validator("events")
    @classmethod
    def _distinct(cls, value: list[ChangeType]) -> list[ChangeType]:
        return list(dict.fromkeys(value))


@dataclass(frozen=True)
class Subscription:
    """An active subscription, as `GET /_admin/subscriptions` lists it."""

    id: str
    entity_set: str
    url: str
    events: tuple[ChangeType, ...]
    format: EventFormat
    headers: dict[str, str]
    business_event_id: str

    def as_json(self) -> dict[str, object]:
        return {**dataclasses.asdict(self), "events": list(self.events)}


class Publisher:
    """Holds the subscriptions and turns committed changes into deliveries."""

    def __init__(
        self,
        catalog: Catalog,
        submit: Callable[[Outgoing], None],
        rng: random.Random,
        default_company: str,
        retry_pause_s: float = FNO_EVENT_RETRY.pause_s,
    ) -> None:
        self._catalog = catalog
        self._submit = submit
        self._rng = rng
        self.factory = EventFactory(rng)
        self.default_company = default_company
        self.retry_pause_s = retry_pause_s
        self._subscriptions: dict[str, Subscription] = {}

    def add(self, request: SubscriptionRequest) -> Subscription:
        """Register a subscription; ValueError when the entity set is unknown."""
        entity = self._catalog.entities.get(request.entity_set)
        if entity is None:
            raise ValueError(f"unknown entity set {request.entity_set!r}")
        subscription = Subscription(
            id=str(uuid.UUID(int=self._rng.getrandbits(128), version=4)),
            entity_set=request.entity_set,
            url=request.url,
            events=tuple(request.events),
            format=request.format,
            headers=dict(request.headers),
            business_event_id=request.business_event_id or entity.business_event_id,
        )
        self._subscriptions[subscription.id] = subscription
        return subscription

    def active(self) -> list[Subscription]:
        """Every subscription, oldest first."""
        return list(self._subscriptions.values())

    def remove(self, subscription_id: str) -> bool:
        return self._subscriptions.pop(subscription_id, None) is not None

    def publish(self, change: Change) -> None:
        """Queue one delivery per subscription that wants this change; never waits."""
        wanted = [
            s
            for s in self._subscriptions.values()
            if s.entity_set == change.entity.entity_set and change.change_type in s.events
        ]
        if not wanted:
            return
        policy = dataclasses.replace(FNO_EVENT_RETRY, pause_s=self.retry_pause_s)
        # One business event per change and event id: every endpoint sees the same EventId/ControlNumber.
        business: dict[str, bytes] = {}
        for s in wanted:
            headers = {"Content-Type": "application/json"}
            if s.format == "business-event":
                if s.business_event_id not in business:
                    event = self.factory.business_event(change, s.business_event_id, self.default_company)
                    business[s.business_event_id] = json.dumps(event).encode()
                body = business[s.business_event_id]
            else:
                _, extra, body = self.factory.encoded_data_event(change, step_id=s.id)
                headers.update(extra)
            headers.update(s.headers)
            description = f"{s.format} {change.change_type} {change.entity.entity_set} -> {s.url}"
            item_id = str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
            self._submit(Outgoing(id=item_id, url=s.url, headers=headers, body=body, policy=policy,
                                  description=description))
