"""F&O virtual tables and their data events, as the Power Platform integration gives them to Dataverse.

The chain this stands in for (docs/fno-events.md, wire-formats B2):
1. Tables: every template whose F&O side names a virtual table (`mserp_<entity>`)
   gets one in the metadata (`TableType` Virtual, `ExternalName` the F&O entity),
   with `mserp_<property>` columns, `mserp_primaryfield` and the id
   `mserp_<entity>id`, plus the sdkmessages OnExternalCreated / OnExternalUpdated /
   OnExternalDeleted and their sdkmessagefilters, so steps register against them
   as against any table. The sandbox does not serve rows of a virtual table (the
   real one reads them from F&O): its entity set answers 404.
2. Activation: registering a step on one of those messages is what activates the
   data event in F&O ("Manage business event endpoints", Dataverse endpoints).
   After every Web API request that changed a registration table,
   `DataEventLink.sync` makes the F&O emulator's data-event subscriptions
   (`/_admin/subscriptions` of `fno_url`) match the enabled webhook steps: one
   subscription per virtual table, for the change types that have a step,
   posting to this emulator's `POST /_admin/fno/data-events`.
3. Delivery: a data event arriving there is raised as its message on the virtual
   table: one webhook POST per matching step, the RemoteExecutionContext
   re-stamped as this organization's asynchronous operation of that step.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from devkit.sandbox.dataverse import seed
from devkit.sandbox.dataverse.org import Organization
from devkit.sandbox.dataverse.schema import Column, TableDef, boolean, decimal, integer, string, table
from devkit.sandbox.dataverse.webhooks import Dispatcher
from devkit.sandbox.dataverse.webhooks import Route as StepRoute
from devkit.sandbox.delivery import Outgoing
from loyaltysync.templates import FieldMap, Template

log = logging.getLogger(__name__)

# Message -> the F&O change type that raises it.
CHANGE_TYPES = {"OnExternalCreated": "Created", "OnExternalUpdated": "Updated", "OnExternalDeleted": "Deleted"}
MESSAGES = tuple(CHANGE_TYPES)
INBOUND_PATH = "/fno/data-events"  # under /_admin
PRIMARY_FIELD = "mserp_primaryfield"


@dataclass(frozen=True)
class VirtualTable:
    """One F&O entity as a Dataverse virtual table."""

    logical_name: str
    entity_set: str  # the F&O entity set it stands for (what F&O subscriptions name)
    definition: TableDef


def _column(f: FieldMap) -> Column:
    # The Finance and Operations virtual entity solution names a field's column `mserp_<field, lower case>`;
    # written here from that convention, not taken from the app's parser, so the two can disagree in a test.
    name = "mserp_" + (f.fo or f.key).lower()
    if f.type == "integer":
        return integer(name)
    if f.type == "decimal":
        return decimal(name, 10)
    if f.type == "boolean":
        return boolean(name)
    if f.type in ("datetime", "date"):
        return Column(name, "DateTime")
    if f.type == "enum":
        # Global option sets matched by external name; their integers are not stable between systems.
        return Column(name, "Picklist", options={})
    return string(name, f.max_length or 4000)


def virtual_tables(templates: Iterable[Template]) -> list[VirtualTable]:
    """The virtual table of every template whose F&O side names one (`fo.entity_type` or `fo.virtual_table`)."""
    made: dict[str, VirtualTable] = {}
    for template in templates:
        name = template.fo.virtual_table_name
        if name is None or name in made:
            continue
        columns = {c.name: c for c in (_column(f) for f in template.all_fields if f.fo)}
        columns[PRIMARY_FIELD] = string(PRIMARY_FIELD, 255, "Primary field")
        entity_set = name[:-1] + "ies" if name.endswith("y") else name + "s"
        definition = table(name, entity_set, list(columns.values()), primary_name=PRIMARY_FIELD,
                           display_name=template.fo.entity_type or name)
        definition.table_type = "Virtual"
        definition.external_name = template.fo.entity_type
        made[name] = VirtualTable(name, template.fo.entity_set, definition)
    return list(made.values())


def add_virtual_tables(org: Organization, tables: Iterable[VirtualTable]) -> None:
    """Put the tables in the metadata and their OnExternal* messages and filters in the registration tables."""
    tables = list(tables)
    if not tables:
        return
    for message in MESSAGES:
        if org.row("sdkmessage", seed.message_id(message)) is None:
            org.seed_row("sdkmessage", {"sdkmessageid": seed.message_id(message), "name": message})
    for virtual in tables:
        org.add_table(virtual.definition)
        # Rows live in F&O, which the sandbox does not proxy: the entity set is not routable.
        org.by_set.pop(virtual.definition.entity_set, None)
        for message in MESSAGES:
            org.seed_row(
                "sdkmessagefilter",
                {
                    "sdkmessagefilterid": seed.filter_id(message, virtual.logical_name),
                    "sdkmessageid": seed.message_id(message),
                    "primaryobjecttypecode": virtual.logical_name,
                    "secondaryobjecttypecode": "none",
                    "iscustomprocessingstepallowed": True,
                },
            )


class DataEventLink:
    """The F&O connection of the organization: activates data events and raises them on the virtual tables."""

    def __init__(
        self,
        org: Organization,
        dispatcher: Dispatcher,
        tables: Iterable[VirtualTable],
        *,
        token: str,
        fno_url: str | None,
        client_factory: Callable[[], httpx.AsyncClient],
    ) -> None:
        self.org = org
        self.dispatcher = dispatcher
        self.tables = {t.logical_name: t for t in tables}
        self.token = token
        self.fno_url = fno_url.rstrip("/") if fno_url else None
        self.client_factory = client_factory
        self.inbound_url = f"{org.public_url}/_admin{INBOUND_PATH}"
        self.last_error: str | None = None
        self._synced_version = -1
        self._lock = asyncio.Lock()

    def wanted(self) -> dict[str, tuple[str, ...]]:
        """F&O entity set -> the change types that have at least one enabled webhook step here."""
        wanted: dict[str, set[str]] = {}
        for logical_name, virtual in self.tables.items():
            for message, change_type in CHANGE_TYPES.items():
                if self.dispatcher.routes(message, logical_name):
                    wanted.setdefault(virtual.entity_set, set()).add(change_type)
        order = list(CHANGE_TYPES.values())
        return {k: tuple(sorted(v, key=order.index)) for k, v in wanted.items()}

    async def sync(self) -> None:
        """Make F&O's data-event subscriptions to this organization match the registered steps.

        Reads F&O's subscriptions each time (not a memory of its own), so a
        restarted emulator neither doubles nor loses one. A failure is logged and
        kept in `last_error`; the next registration change tries again.
        """
        if self.fno_url is None:
            return
        async with self._lock:
            version = self.org.registration_version
            if version == self._synced_version:
                return
            try:
                await self._sync(self.wanted())
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:  # unreachable, refused or garbled
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("activating F&O data events at %s failed", self.fno_url)
                return
            self.last_error = None
            self._synced_version = version

    async def _sync(self, wanted: Mapping[str, tuple[str, ...]]) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        base = f"{self.fno_url}/_admin/subscriptions"
        async with self.client_factory() as client:
            listed = await client.get(base, headers=headers)
            listed.raise_for_status()
            ours = [s for s in listed.json()["value"] if s["url"] == self.inbound_url and s["format"] == "data-event"]
            kept: set[str] = set()
            for subscription in ours:
                entity_set = subscription["entity_set"]
                if entity_set not in kept and tuple(subscription["events"]) == wanted.get(entity_set):
                    kept.add(entity_set)
                    continue
                gone = await client.delete(f"{base}/{subscription['id']}", headers=headers)
                if gone.status_code not in (204, 404):
                    gone.raise_for_status()
            for entity_set, events in wanted.items():
                if entity_set in kept:
                    continue
                body = {"entity_set": entity_set, "url": self.inbound_url, "events": list(events),
                        "format": "data-event", "headers": headers}
                added = await client.post(base, json=body, headers=headers)
                added.raise_for_status()

    def raise_event(self, context: Mapping[str, Any]) -> int:
        """Deliver one F&O data event to the steps on its message and virtual table; returns how many.

        Raises ValueError for a context that is not a data event of a virtual table here.
        """
        message, table_name = context.get("MessageName"), context.get("PrimaryEntityName")
        if message not in CHANGE_TYPES:
            raise ValueError(f"MessageName {message!r} is not {', '.join(MESSAGES)}")
        if not isinstance(table_name, str) or table_name not in self.tables:
            raise ValueError(f"PrimaryEntityName {table_name!r} is not a virtual table of this organization")
        submitted = 0
        changed = _target_columns(context)
        for route in self.dispatcher.routes(message, table_name):
            if message == "OnExternalUpdated" and route.filtering and not route.filtering & changed:
                continue
            self.dispatcher.submit(self._outgoing(context, message, table_name, route))
            submitted += 1
        return submitted

    def _outgoing(self, context: Mapping[str, Any], message: str, table_name: str, route: StepRoute) -> Outgoing:
        # A copy of the top level: only top-level keys are replaced below or dropped by the reduced form; the row
        # data inside is shared with the other steps' deliveries and never changed.
        payload = dict(context)
        operation_id = self.dispatcher.new_id()
        correlation_id = str(payload.get("CorrelationId") or self.dispatcher.new_id())
        # The asynchronous operation of this organization's step; the row data stays as F&O sent it.
        payload.update(
            BusinessUnitId=seed.BUSINESS_UNIT_ID,
            CorrelationId=correlation_id,
            Depth=1,
            Mode=1,
            OperationCreatedOn=f"/Date({int(self.dispatcher.clock() * 1000)}+0000)/",
            OperationId=operation_id,
            OrganizationId=seed.ORGANIZATION_ID,
            OrganizationName=seed.ORGANIZATION_NAME,
            OwningExtension={"Id": route.step_id, "KeyAttributes": [], "LogicalName": "sdkmessageprocessingstep",
                             "Name": None, "RowVersion": None},
            Stage=40,
        )
        return self.dispatcher.outgoing(
            payload, message=message, table=table_name, row_id=payload.get("PrimaryEntityId"),
            correlation_id=correlation_id, route=route,
        )

    def routes(self) -> list[BaseRoute]:
        """`POST /_admin/fno/data-events` (what F&O posts data events to) and `GET /_admin/fno/link`."""

        async def inbound(request: Request) -> Response:
            try:
                context = json.loads(await request.body())
            except ValueError as exc:
                return JSONResponse({"error": f"body is not JSON: {exc}"}, status_code=400)
            if not isinstance(context, dict):
                return JSONResponse({"error": "a data event is a RemoteExecutionContext object"}, status_code=400)
            try:
                delivered = self.raise_event(context)
            except ValueError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            return JSONResponse({"steps": delivered}, status_code=202)

        async def link(request: Request) -> Response:
            return JSONResponse({"fno_url": self.fno_url, "inbound_url": self.inbound_url,
                                 "active": self.wanted(), "last_error": self.last_error})

        return [Route(INBOUND_PATH, inbound, methods=["POST"]), Route("/fno/link", link, methods=["GET"])]


def _target_columns(context: Mapping[str, Any]) -> set[str]:
    """The attribute names of the context's Target entity (an update's submitted columns)."""
    for pair in context.get("InputParameters") or []:
        if isinstance(pair, dict) and pair.get("key") == "Target" and isinstance(pair.get("value"), dict):
            attributes = pair["value"].get("Attributes") or []
            return {a["key"] for a in attributes if isinstance(a, dict) and isinstance(a.get("key"), str)}
    return set()
