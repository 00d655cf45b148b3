"""F&O in memory: the sandbox's `FnoData` and event publisher, and an `FnoClient` on it.

`SimFnoClient` is an `FnoClient` whose requests call the emulator's own row
rules (`FnoData.create` / `update` / `delete`, `find_row`, `query_page`,
`render_row`) instead of going through HTTP. `$batch` is modelled for GETs (the
reconciler's read-back).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import datetime
from http import HTTPStatus
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl, unquote

import httpx

from devkit.sandbox.delivery import Outgoing
from devkit.sandbox.fno import events as fno_events
from devkit.sandbox.fno.addressing import key_values, resolve
from devkit.sandbox.fno.dataset import FnoData
from devkit.sandbox.fno.errors import FnoError, no_resource
from devkit.sandbox.fno.handlers import find_row, query_page
from devkit.sandbox.fno.handlers import render_row as fno_render_row
from devkit.sandbox.fno.query import SKIPTOKEN, parse_query
from devkit.sandbox.fno.query import page_size as served_page_size
from devkit.sandbox.fno.schema import Catalog, EntityDef, build_catalog
from devkit.sandbox.fno.subscriptions import Publisher, SubscriptionRequest
from devkit.sim.dataverse import SimDataverse
from devkit.sim.faults import Attempts, Hooks
from devkit.sim.model import field_specs as model_specs
from devkit.sim.model import fo_values, key_spec
from devkit.sim.wire import FUNCTION_URL, Deliver, Row, delivery_route, json_copy, lazy_address, sent_params
from loyaltysync.errors import TargetError
from loyaltysync.targets import fno as fno_client
from loyaltysync.targets.batch import BatchItem, BatchRequest, BatchResult, ChangeSet, ResponsePart, match
from loyaltysync.targets.fno import FnoClient, lost_create_race, ordered_key
from loyaltysync.targets.http import RetryPolicy, Sleep, error_from_body, parse_retry_after
from loyaltysync.targets.odata import (
    Key,
    check_name,
    orderby_list,
    query_string,
    select_list,
)
from loyaltysync.templates import Template

T = TypeVar("T")
FoEventForm = Literal["virtual-table", "business-event", "data-event"]
FO_EVENT_FORMS: tuple[FoEventForm, ...] = ("virtual-table", "business-event", "data-event")
FO_URL = "https://fo.sim.example"
DEFAULT_COMPANY = "usrt"


# ----------------------------------------------------------------------------- F&O


class SimFno:
    """One F&O environment in memory: the sandbox's `FnoData` and its event publisher.

    `events` picks how changes reach the function app: "virtual-table" (the Power Platform
    chain: the data event is raised on the virtual table's steps in `dataverse`, which must be
    given, and reaches `/api/fo/<template>` as Dataverse's webhook), "business-event" or
    "data-event" (F&O posts its business event / data event JSON to `/api/fo/<template>` itself).
    `clock` dates every change (F&O rows carry no modified time; events carry this time).
    """

    def __init__(
        self,
        templates: Mapping[str, Template],
        *,
        clock: Callable[[], datetime],
        rng: random.Random,
        hooks: Hooks,
        deliver: Deliver,
        events: FoEventForm = "virtual-table",
        dataverse: SimDataverse | None = None,
        public_url: str = FO_URL,
        default_company: str = DEFAULT_COMPANY,
    ) -> None:
        if events == "virtual-table" and dataverse is None:
            raise ValueError("F&O events through the virtual tables need the Dataverse they are raised in")
        self.templates = dict(templates)
        self.clock = clock
        self.rng = rng
        self.hooks = hooks
        self.deliver = deliver
        self.events: FoEventForm = events
        self.dataverse = dataverse
        self.public_url = public_url.rstrip("/")
        self.catalog: Catalog = build_catalog(self.templates)
        # Separate generators, as the emulator has: the number of events never shifts row versions.
        self.publisher = Publisher(self.catalog, self._submit, random.Random(rng.getrandbits(64)),  # noqa: S311
                                   default_company)
        self.data = FnoData(self.catalog, default_company=default_company,
                            rng=random.Random(rng.getrandbits(64)), publish=self._published, clock=clock)  # noqa: S311
        self.specs = {name: model_specs(t) for name, t in self.templates.items()}
        self._by_set = {t.fo.entity_set: t for t in self.templates.values()}
        self._creates: dict[str, Counter[str]] = {name: Counter() for name in self.templates}
        self._inbound = dataverse.link.inbound_url if dataverse is not None else None
        self._subscribed = False

    def subscribe(self) -> None:
        """Activate the events: what the registered virtual-table steps activate, or one subscription per template."""
        if self._subscribed:
            return
        self._subscribed = True
        if self.events == "virtual-table":
            assert self.dataverse is not None and self._inbound is not None  # noqa: S101 - checked in __init__
            for entity_set, change_types in self.dataverse.active_fo_events().items():
                self.publisher.add(SubscriptionRequest(entity_set=entity_set, url=self._inbound,
                                                       events=list(change_types), format="data-event"))
            return
        for template in self.templates.values():
            if template.fo.entity_set in self.catalog.entities:
                self.publisher.add(SubscriptionRequest(entity_set=template.fo.entity_set,
                                                       url=f"{FUNCTION_URL}/api/fo/{template.name}",
                                                       format=self.events))

    def _published(self, change: fno_events.Change) -> None:
        template = self._by_set.get(change.entity.entity_set)
        if change.change_type == "Created" and template is not None:
            self._creates[template.name][str(change.row.get(key_spec(template).fo))] += 1
        self.publisher.publish(change)

    def _submit(self, item: Outgoing) -> None:
        if item.url == self._inbound and self.dataverse is not None:
            self.dataverse.raise_fo_event(json.loads(item.body))
            return
        where = delivery_route(item.url)
        if where is not None:
            self.deliver(where[0], where[1], item.body, dict(item.headers))

    def rows(self, template: str) -> dict[str, dict[str, Any]]:
        """The template's records, key -> values in F&O terms."""
        t = self.templates[template]
        entity = self.catalog.entities[t.fo.entity_set]
        columns = self.data.columns(entity)
        key = key_spec(t).fo
        out: dict[str, dict[str, Any]] = {}
        for stored in self.data.tuples(entity, None):
            values = self.terms(template, dict(zip(columns, stored, strict=True)))
            out[str(values[key])] = values
        return out

    def terms(self, template: str, row: Mapping[str, Any]) -> dict[str, Any]:
        """One stored row of the template's entity in F&O terms, as OData would render it."""
        entity = self.catalog.entities[self.templates[template].fo.entity_set]
        return fo_values(self.specs[template], fno_render_row(entity, dict(row)))

    def creates(self, template: str) -> Counter[str]:
        """Committed creates per key, by anyone."""
        return Counter(self._creates[template])

    def client(self, *, retry: RetryPolicy | None = None, sleep: Sleep = asyncio.sleep) -> SimFnoClient:
        return SimFnoClient(self, retry=retry, sleep=sleep)


class SimFnoClient(FnoClient):
    """`FnoClient` on a `SimFno`: same calls, same answers, same errors, no HTTP."""

    def __init__(
        self,
        service: SimFno,
        *,
        hooks: Hooks | None = None,
        retry: RetryPolicy | None = None,
        sleep: Sleep = asyncio.sleep,
        page_size: int = fno_client.MAX_PAGE_SIZE,
    ) -> None:
        # The real constructor opens an HTTP pipeline; nothing here sends requests.
        self.service = service
        self.data = service.data
        self.root_url = service.public_url
        self.page_size = max(1, min(page_size, fno_client.MAX_PAGE_SIZE))
        self.attempts = Attempts("fo", hooks or service.hooks, retry or RetryPolicy(), sleep, service.rng)
        self._base = f"{self.root_url}/{fno_client.DATA_PATH}"
        self._data_root = f"{self.root_url}/data"
        self.last_commit: datetime | None = None  # F&O's time of this client's last committed write

    def _entity(self, entity_set: str, path: Callable[[], str]) -> EntityDef:
        entity = self.data.entity(entity_set)
        if entity is None:
            raise no_resource(self._base + path())
        return entity

    def _error(self, exc: FnoError, method: str, path: str) -> TargetError:
        return error_from_body(
            fno_client.TARGET, exc.status, bytes(exc.response().body), reason=HTTPStatus(exc.status).phrase,
            method=method, url=self._base + path, retry_after=parse_retry_after(exc.headers.get("Retry-After")),
        )

    async def _send(
        self, operation: str, method: str, path: Callable[[], str], apply: Callable[[], tuple[T, bool]],
        *, idempotent: bool | None = None, missing: tuple[T] | None = None,
    ) -> T:
        """One request; `missing` holds the answer for a 404, which the real client then allows."""

        def attempt() -> tuple[T, bool]:
            try:
                return apply()
            except FnoError as exc:
                if exc.status == 404 and missing is not None:
                    return missing[0], False
                raise self._error(exc, method, path()) from None

        return await self.attempts.send(operation, method, attempt, idempotent=idempotent)

    def _row(self, entity_set: str, key: Key, cross_company: bool, path: Callable[[], str]) -> tuple[EntityDef, Row]:
        entity = self._entity(entity_set, path)
        values = key_values(entity, list(ordered_key(key).items()))
        return entity, find_row(self.data, entity, values, cross_company or fno_client.COMPANY in key)

    def _render(self, entity: EntityDef, row: Mapping[str, Any], select: tuple[str, ...] | None) -> Row:
        context = f"{self._data_root}/$metadata#{entity.entity_set}/$entity"
        return {"@odata.context": context, **fno_render_row(entity, dict(row), select)}

    async def get(
        self,
        entity_set: str,
        key: Key,
        *,
        select: Sequence[str] | None = None,
        cross_company: bool = False,
    ) -> Row | None:
        names = select_list(select)
        path = lazy_address(entity_set, key, lambda: fno_client.key_path(
            entity_set, key, cross_company=cross_company, params={"$select": names}))

        def apply() -> tuple[Row | None, bool]:
            entity, row = self._row(entity_set, key, cross_company, path)
            query = parse_query(entity, {"$select": names} if names else {})
            return self._render(entity, row, query.select), False

        return await self._send("read", "GET", path, apply, missing=(None,))

    def _insert(self, entity_set: str, body: Any) -> Row:
        entity = self._entity(entity_set, lambda: entity_set)
        row = self.data.create(entity, body)
        self.last_commit = self.service.clock()
        return self._render(entity, row, None)

    async def create(self, entity_set: str, body: Mapping[str, Any]) -> Row:
        check_name(entity_set)
        sent = json_copy(body)
        return await self._send("create", "POST", lambda: entity_set, lambda: (self._insert(entity_set, sent), True))

    async def create_new(self, entity_set: str, key: Key, body: Mapping[str, Any]) -> bool:
        check_name(entity_set)
        sent = json_copy({**body, **ordered_key(key)})
        try:
            await self._send("create", "POST", lambda: entity_set, lambda: (self._insert(entity_set, sent), True),
                             idempotent=True)
        except TargetError as error:
            if lost_create_race(error):
                return False
            raise
        return True

    async def update(self, entity_set: str, key: Key, body: Mapping[str, Any]) -> None:
        path = lazy_address(entity_set, key, lambda: fno_client.key_path(entity_set, key))
        sent = json_copy(body)

        def apply() -> tuple[None, bool]:
            entity, row = self._row(entity_set, key, False, path)
            self.data.update(entity, row, sent)
            self.last_commit = self.service.clock()
            return None, True

        await self._send("update", "PATCH", path, apply)

    async def delete(self, entity_set: str, key: Key, *, cross_company: bool = False) -> bool:
        path = lazy_address(entity_set, key, lambda: fno_client.key_path(entity_set, key, cross_company=cross_company))

        def apply() -> tuple[bool, bool]:
            entity, row = self._row(entity_set, key, cross_company, path)
            self.data.delete(entity, row)
            self.last_commit = self.service.clock()
            return True, True

        return await self._send("delete", "DELETE", path, apply, missing=(False,))

    async def _delete_strict(self, entity_set: str, key: Key) -> None:
        """DELETE, the 404 of a missing row raised (what a person sees)."""
        path = lazy_address(entity_set, key, lambda: fno_client.key_path(entity_set, key))

        def apply() -> tuple[None, bool]:
            entity, row = self._row(entity_set, key, False, path)
            self.data.delete(entity, row)
            self.last_commit = self.service.clock()
            return None, True

        await self._send("delete", "DELETE", path, apply)

    async def query(
        self,
        entity_set: str,
        *,
        filter: str | None = None,
        select: Sequence[str] | None = None,
        orderby: str | Sequence[str] | None = None,
        page_size: int | None = None,
        cross_company: bool = False,
    ) -> AsyncIterator[list[Row]]:
        size = max(1, min(page_size or self.page_size, fno_client.MAX_PAGE_SIZE))
        params = sent_params({
            "$select": select_list(select),
            "$filter": filter,
            "$orderby": orderby_list(orderby),
            "cross-company": "true" if cross_company else None,
        })
        check_name(entity_set)
        current = dict(params)
        fetched = 0
        previous: list[Any] | None = None
        while True:
            asked = dict(current)

            def apply(asked: dict[str, str] = asked) -> tuple[tuple[list[Row], int | None], bool]:
                entity = self._entity(entity_set, lambda: entity_set)
                served = served_page_size(f"odata.maxpagesize={size}", self.data.max_page_size)
                _, page, rows = query_page(self.data, entity, asked, served)
                return (rows, page.next_skiptoken), False

            def where(address: str = entity_set + query_string(asked)) -> str:
                return address

            rows, next_token = await self._send("query", "GET", where, apply)
            if previous is not None and rows and rows == previous:
                return
            if rows:
                yield [dict(r) for r in rows]
            fetched += len(rows)
            if next_token is not None:
                current, previous = {**asked, SKIPTOKEN: str(next_token)}, None
            elif len(rows) >= size:
                current = {**params, "$top": str(size), "$skip": str(fetched)}
                previous = rows
            else:
                return

    async def batch(self, operations: Sequence[BatchItem], *, continue_on_error: bool = False) -> list[BatchResult]:
        """`$batch` of GETs (the reconciler's read-back); change sets and writes are not modelled."""
        for item in operations:
            if isinstance(item, ChangeSet) or item.method.upper() != "GET":
                raise NotImplementedError("the simulated F&O models $batch for GET requests only")
        requests = [item for item in operations if isinstance(item, BatchRequest)]

        def apply() -> tuple[list[ResponsePart], bool]:
            parts: list[ResponsePart] = []
            for request in requests:
                part = self._batch_get(request.url)
                parts.append(part)
                if part.status >= 400 and not continue_on_error:
                    break
            return parts, False

        parts = await self._send("batch", "POST", lambda: "$batch", apply, idempotent=True)
        return match(fno_client.TARGET, operations, parts)

    def _batch_get(self, url: str) -> ResponsePart:
        path, _, query_text = url.partition("?")
        params = dict(parse_qsl(query_text, keep_blank_values=True))
        headers = httpx.Headers({"Content-Type": "application/json"})
        try:
            address = resolve(unquote(path), self.data.catalog.entities, self._base + url)
            row = find_row(self.data, address.entity, address.key,
                           params.get("cross-company", "").lower() == "true")
            query = parse_query(address.entity, {k: v for k, v in params.items() if k == "$select"})
            body = json.dumps(self._render(address.entity, row, query.select)).encode()
            return ResponsePart(200, "OK", headers, body, None)
        except FnoError as exc:
            return ResponsePart(exc.status, HTTPStatus(exc.status).phrase, headers, bytes(exc.response().body), None)

    async def aclose(self) -> None:
        return None
