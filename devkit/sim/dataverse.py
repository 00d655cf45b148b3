"""Dataverse in memory: the sandbox's `Organization` with its webhooks and F&O virtual tables, and a client on it.

`SimDataverseClient` is a `DataverseClient` (the engine, the reconciler and
`LookupCache` take it as it is) whose requests call the sandbox's own write,
read, query and webhook code (`writes`, `handlers.patch` / `remove`,
`rows.render_row`, `query.run`, `Dispatcher`) instead of going through HTTP.
Client-side logic without a request of its own (`find_id`, writes by `$filter`
for keys an alternate-key URL cannot carry, `as_caller`) is inherited.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import httpx
from starlette.datastructures import Headers

from devkit.sandbox.dataverse import bulk, writes
from devkit.sandbox.dataverse import handlers as dv_handlers
from devkit.sandbox.dataverse import query as dv_query
from devkit.sandbox.dataverse.errors import DataverseError
from devkit.sandbox.dataverse.errors import render as dv_render
from devkit.sandbox.dataverse.org import Organization
from devkit.sandbox.dataverse.pipeline import identify
from devkit.sandbox.dataverse.prefer import parse_prefer
from devkit.sandbox.dataverse.rows import context_url, render_row, select_columns
from devkit.sandbox.dataverse.schema import TableDef
from devkit.sandbox.dataverse.scope import Caller, Change
from devkit.sandbox.dataverse.seed import BUSINESS_UNIT_ID, INTEGRATION_USER, ORGANIZATION_ID
from devkit.sandbox.dataverse.virtual import DataEventLink, add_virtual_tables, virtual_tables
from devkit.sandbox.dataverse.webhooks import Dispatcher
from devkit.sandbox.delivery import Outgoing
from devkit.sandbox.odata import ODataSyntaxError, parse_select
from devkit.sim import values as people
from devkit.sim.faults import Attempts, Hooks, NoFaults
from devkit.sim.model import dv_values, key_spec
from devkit.sim.model import field_specs as model_specs
from devkit.sim.wire import (
    FUNCTION_KEY,
    FUNCTION_URL,
    STORED_TIME,
    Deliver,
    Row,
    delivery_route,
    json_copy,
    lazy_address,
    seeded_id,
    sent_params,
)
from loyaltysync import webhooks as registration
from loyaltysync.errors import TargetError
from loyaltysync.targets import dataverse as dv_client
from loyaltysync.targets.batch import BatchItem, BatchResult
from loyaltysync.targets.dataverse import DataverseClient, UpsertMode, needs_filter
from loyaltysync.targets.http import RetryPolicy, Sleep, error_from_body, parse_retry_after
from loyaltysync.targets.odata import (
    Key,
    check_name,
    eq_filter,
    id_predicate,
    orderby_list,
    query_string,
    select_list,
)
from loyaltysync.templates import Template

T = TypeVar("T")
DATAVERSE_URL = "https://dataverse.sim.example"


# ----------------------------------------------------------------------------- Dataverse


class SimDataverse:
    """One Dataverse organization in memory: the sandbox's `Organization`, webhooks, the F&O virtual tables.

    `clock` dates every write (`modifiedon`, `createdon`, the webhook's operation time); `rng`
    gives row ids and operation ids. Call `await register_webhooks()` once before writing: it
    runs `loyaltysync register-webhooks`' own plan against this organization.
    """

    def __init__(
        self,
        templates: Mapping[str, Template],
        *,
        clock: Callable[[], datetime],
        rng: random.Random,
        hooks: Hooks,
        deliver: Deliver,
        public_url: str = DATAVERSE_URL,
    ) -> None:
        self.templates = dict(templates)
        self.clock = clock
        self.rng = rng
        self.hooks = hooks
        self.deliver = deliver
        new_id = seeded_id(rng)
        self.org = Organization(
            public_url=public_url,
            templates=self.templates.values(),
            now=lambda: clock().astimezone(UTC).strftime(STORED_TIME),
            new_id=new_id,
        )
        self.dispatcher = Dispatcher(self.org, self._submit, new_id=new_id, clock=lambda: clock().timestamp())
        tables = virtual_tables(self.templates.values())
        add_virtual_tables(self.org, tables)
        self.link = DataEventLink(self.org, self.dispatcher, tables, token="", fno_url=None,
                                  client_factory=httpx.AsyncClient)
        self.snapshots = dv_query.Snapshots(new_key=lambda: f"{rng.getrandbits(64):016x}")
        self.specs = {name: model_specs(t) for name, t in self.templates.items()}
        self._by_table = {t.dataverse.table: t for t in self.templates.values()}
        self._creates: dict[str, Counter[str]] = {name: Counter() for name in self.templates}
        self._columns: dict[str, Any] = {}

    async def register_webhooks(self) -> None:
        """Register the webhooks as `loyaltysync register-webhooks` does (its plan, applied here)."""
        client = SimDataverseClient(self, hooks=NoFaults())
        plan = await registration.plan(client, self.templates, function_url=FUNCTION_URL, function_key=FUNCTION_KEY)
        await registration.apply(client, plan)

    def active_fo_events(self) -> dict[str, tuple[str, ...]]:
        """F&O entity set -> change types with a registered step on its virtual table (what F&O activates)."""
        return self.link.wanted()

    def _submit(self, item: Outgoing) -> None:
        where = delivery_route(item.url)
        if where is not None:
            self.deliver(where[0], where[1], item.body, dict(item.headers))

    def committed(self, change: Change) -> None:
        """Count a committed change and send its webhooks (what the API pipeline does after answering)."""
        if change.message == "Create":
            template = self._by_table.get(change.table)
            if template is not None and change.after is not None:
                key = key_spec(template).dataverse
                self._creates[template.name][str(change.after.get(key))] += 1
        self.dispatcher.dispatch([change], self.dispatcher.new_id())

    def raise_fo_event(self, context: Mapping[str, Any]) -> None:
        """An F&O data event arriving over the F&O connection: raised on the virtual table's steps."""
        self.link.raise_event(context)

    def rows(self, template: str) -> dict[str, dict[str, Any]]:
        """The template's rows, key -> values in F&O terms (lookups as ISO codes, choices as member names)."""
        t = self.templates[template]
        key = key_spec(t).fo
        out: dict[str, dict[str, Any]] = {}
        for row in self.org.tables[t.dataverse.table].scan():
            values = self.terms(template, row)
            out[str(values[key])] = values
        return out

    def terms(self, template: str, row: Mapping[str, Any]) -> dict[str, Any]:
        """One stored row of the template's table in F&O terms, as the Web API would render it."""
        definition = self.org.defs[self.templates[template].dataverse.table]
        columns = self._columns.get(template)
        if columns is None:
            columns = self._columns[template] = select_columns(definition, None)
        return dv_values(self.specs[template], render_row(self.org, definition, dict(row), columns),
                         people.CURRENCY_CODES)

    def creates(self, template: str) -> Counter[str]:
        """Committed creates per key, by anyone."""
        return Counter(self._creates[template])

    def client(self, *, retry: RetryPolicy | None = None, sleep: Sleep = asyncio.sleep) -> SimDataverseClient:
        """A client acting as the integration user (the sync's identity)."""
        return SimDataverseClient(self, retry=retry, sleep=sleep)


class SimDataverseClient(DataverseClient):
    """`DataverseClient` on a `SimDataverse`: same calls, same answers, same errors, no HTTP."""

    def __init__(
        self,
        service: SimDataverse,
        *,
        hooks: Hooks | None = None,
        retry: RetryPolicy | None = None,
        sleep: Sleep = asyncio.sleep,
        page_size: int = dv_client.MAX_PAGE_SIZE,
        caller_object_id: str | None = None,
    ) -> None:
        # The real constructor opens an HTTP pipeline; nothing here sends requests.
        self.service = service
        self.org = service.org
        self.root_url = service.org.public_url
        self.page_size = max(1, min(page_size, dv_client.MAX_PAGE_SIZE))
        self.caller_object_id = caller_object_id
        self._owns_http = False
        self.attempts = Attempts("dataverse", hooks or service.hooks, retry or RetryPolicy(), sleep, service.rng)
        self._base = f"{self.root_url}/{dv_client.API_PATH}"
        self.last_commit: datetime | None = None  # Dataverse's time of this client's last committed write

    # -- the request layer ------------------------------------------------------------------

    def _caller(self) -> Caller:
        if not self.caller_object_id:
            return Caller(INTEGRATION_USER.systemuserid)
        return identify(self.org, Headers({"CallerObjectId": self.caller_object_id}))

    def _error(self, exc: DataverseError, method: str, path: str) -> TargetError:
        return error_from_body(
            dv_client.TARGET, exc.status, bytes(dv_render(exc).body), reason=HTTPStatus(exc.status).phrase,
            method=method, url=self._base + path, retry_after=parse_retry_after(exc.headers.get("Retry-After")),
        )

    async def _send(
        self,
        operation: str,
        method: str,
        path: Callable[[], str],
        apply: Callable[[], tuple[T, bool]],
        *,
        idempotent: bool | None = None,
    ) -> T:
        def attempt() -> tuple[T, bool]:
            try:
                return apply()
            except DataverseError as exc:
                raise self._error(exc, method, path()) from None

        return await self.attempts.send(operation, method, attempt, idempotent=idempotent)

    def _render(self, definition: TableDef, row: Mapping[str, Any], select: str | None) -> Row:
        names = _select_names(select)
        body: Row = {"@odata.context": context_url(self.org, definition, names, entity=True)}
        body.update(render_row(self.org, definition, row, select_columns(definition, names)))
        return body

    def _address(self, entity_set: str, pairs: Sequence[tuple[str | None, Any]]) -> writes.Address:
        return writes.locate_pairs(self.org, self.org.table_def(entity_set), pairs)

    def _commit(self, change: Change) -> None:
        self.last_commit = self.service.clock()
        self.service.committed(change)

    # -- reads ------------------------------------------------------------------------------

    async def get_by_key(self, entity_set: str, key: Key, select: Sequence[str] | None = None) -> Row | None:
        if needs_filter(key):
            return await self._first(entity_set, key, select)
        names = select_list(select)
        path = lazy_address(
            entity_set, key, lambda: dv_client.key_path(entity_set, key) + query_string({"$select": names})
        )

        def apply() -> tuple[Row | None, bool]:
            self._caller()
            address = self._address(entity_set, list(key.items()))
            if address.row is None:
                return None, False
            return self._render(address.definition, address.row, names), False

        return await self._send("read", "GET", path, apply)

    async def get_by_id(self, entity_set: str, row_id: str, select: Sequence[str] | None = None) -> Row | None:
        names = select_list(select)
        address = check_name(entity_set) + id_predicate(row_id) + query_string({"$select": names})
        path = lambda: address  # noqa: E731

        def apply() -> tuple[Row | None, bool]:
            self._caller()
            address = self._address(entity_set, [(None, row_id)])
            if address.row is None:
                return None, False
            return self._render(address.definition, address.row, names), False

        return await self._send("read", "GET", path, apply)

    async def _first(self, entity_set: str, key: Key, select: Sequence[str] | None) -> Row | None:
        params = sent_params({"$select": select_list(select), "$filter": eq_filter(key), "$top": "1"})
        body = await self._page(entity_set, params, None)
        rows = body.get("value") or []
        return dict(rows[0]) if rows else None

    async def _page(self, entity_set: str, params: dict[str, str], size: int | None) -> Row:
        prefs = parse_prefer([f"odata.maxpagesize={size}"] if size else [])
        check_name(entity_set)

        def apply() -> tuple[Row, bool]:
            self._caller()
            definition = self.org.table_def(entity_set)
            body, _ = dv_query.run(self.org, self.service.snapshots, definition, params, prefs)
            return body, False

        return await self._send("query", "GET", lambda: entity_set + query_string(params), apply)

    async def query(
        self,
        entity_set: str,
        *,
        select: Sequence[str],
        filter: str | None = None,
        orderby: str | Sequence[str] | None = None,
        page_size: int | None = None,
    ) -> AsyncIterator[list[Row]]:
        size = max(1, min(page_size or self.page_size, dv_client.MAX_PAGE_SIZE))
        params: dict[str, str] | None = sent_params(
            {"$select": select_list(select), "$filter": filter, "$orderby": orderby_list(orderby)}
        )
        while params is not None:
            data = await self._page(entity_set, params, size)
            rows = data.get("value") or []
            if rows:
                yield [dict(r) for r in rows]
            link = data.get("@odata.nextLink")
            params = dict(parse_qsl(urlsplit(link).query, keep_blank_values=True)) if link else None

    async def who_am_i(self) -> Row:
        def apply() -> tuple[Row, bool]:
            caller = self._caller()
            return {
                "@odata.context": f"{self.org.base_url}/$metadata#{bulk.NAMESPACE}WhoAmIResponse",
                "BusinessUnitId": BUSINESS_UNIT_ID,
                "UserId": caller.user_id,
                "OrganizationId": ORGANIZATION_ID,
            }, False

        return await self._send("read", "GET", lambda: "WhoAmI", apply)

    # -- writes -----------------------------------------------------------------------------

    def _patch(self, entity_set: str, pairs: Sequence[tuple[str | None, Any]], body: Any,
               if_match: str | None, if_none_match: str | None) -> Change:
        caller = self._caller()
        address = self._address(entity_set, pairs)
        values = writes.parse_body(self.org, address.definition, body)
        change, _ = dv_handlers.patch(self.org, address, values, caller, if_match, if_none_match)
        self._commit(change)
        return change

    async def upsert(
        self,
        entity_set: str,
        key: Key,
        body: Mapping[str, Any],
        *,
        mode: UpsertMode = "upsert",
        id_column: str | None = None,
    ) -> str | None:
        if needs_filter(key):
            return await self._write_by_filter(entity_set, key, body, mode, self._need_id_column(id_column, key))
        path = lazy_address(entity_set, key, lambda: dv_client.key_path(entity_set, key))
        if_match = "*" if mode == "update" else None
        if_none_match = "*" if mode == "create" else None
        sent = json_copy(body)

        def apply() -> tuple[str | None, bool]:
            change = self._patch(entity_set, list(key.items()), sent, if_match, if_none_match)
            return change.row_id, True

        return await self._send(_write_operation(mode), "PATCH", path, apply)

    async def create(self, entity_set: str, body: Mapping[str, Any]) -> str | None:
        return (await self._create(entity_set, body)).row_id

    async def _create(self, entity_set: str, body: Mapping[str, Any]) -> Change:
        check_name(entity_set)
        sent = json_copy(body)

        def apply() -> tuple[Change, bool]:
            caller = self._caller()
            definition = self.org.table_def(entity_set)
            values = writes.parse_body(self.org, definition, sent)
            change = writes.create(self.org, definition, values, caller)
            self._commit(change)
            return change, True

        return await self._send("create", "POST", lambda: entity_set, apply)

    async def update_by_id(
        self, entity_set: str, row_id: str, body: Mapping[str, Any], *, if_match: str | None = "*"
    ) -> None:
        address = check_name(entity_set) + id_predicate(row_id)
        path = lambda: address  # noqa: E731
        sent = json_copy(body)

        def apply() -> tuple[None, bool]:
            self._patch(entity_set, [(None, row_id)], sent, if_match, None)
            return None, True

        await self._send("update", "PATCH", path, apply)

    async def _update_by_key(self, entity_set: str, key: Key, body: Mapping[str, Any]) -> Change:
        path = lazy_address(entity_set, key, lambda: dv_client.key_path(entity_set, key))
        sent = json_copy(body)

        def apply() -> tuple[Change, bool]:
            return self._patch(entity_set, list(key.items()), sent, "*", None), True

        return await self._send("update", "PATCH", path, apply)

    def _delete(self, entity_set: str, pairs: Sequence[tuple[str | None, Any]], missing_ok: bool) -> bool:
        caller = self._caller()
        address = self._address(entity_set, pairs)
        if address.row is None and missing_ok:
            return False  # the 404 the real client allows (an unknown entity set is raised above)
        self._commit(dv_handlers.remove(self.org, address, caller, None))
        return True

    async def delete_by_key(self, entity_set: str, key: Key, *, id_column: str | None = None) -> bool:
        if needs_filter(key):
            row_id = await self.find_id(entity_set, self._need_id_column(id_column, key), key)
            return False if row_id is None else await self.delete_by_id(entity_set, row_id)
        path = lazy_address(entity_set, key, lambda: dv_client.key_path(entity_set, key))

        def apply() -> tuple[bool, bool]:
            deleted = self._delete(entity_set, list(key.items()), True)
            return deleted, deleted

        return await self._send("delete", "DELETE", path, apply)

    async def delete_by_id(self, entity_set: str, row_id: str) -> bool:
        address = check_name(entity_set) + id_predicate(row_id)
        path = lambda: address  # noqa: E731

        def apply() -> tuple[bool, bool]:
            deleted = self._delete(entity_set, [(None, row_id)], True)
            return deleted, deleted

        return await self._send("delete", "DELETE", path, apply)

    async def _delete_strict(self, entity_set: str, key: Key) -> None:
        """DELETE by key, the 404 of a missing row raised (what a person sees)."""
        path = lazy_address(entity_set, key, lambda: dv_client.key_path(entity_set, key))

        def apply() -> tuple[None, bool]:
            self._delete(entity_set, list(key.items()), False)
            return None, True

        await self._send("delete", "DELETE", path, apply)

    # -- not modelled -----------------------------------------------------------------------

    async def batch(self, operations: Sequence[BatchItem], *, continue_on_error: bool = False) -> list[BatchResult]:
        raise NotImplementedError("the simulated Dataverse does not model $batch (the engine does not use it)")

    async def upsert_multiple(
        self,
        entity_set: str,
        table_logical_name: str,
        rows: Sequence[tuple[Key, Mapping[str, Any]]],
        *,
        id_column: str | None = None,
        chunk_size: int = 1000,
    ) -> None:
        raise NotImplementedError("the simulated Dataverse does not model UpsertMultiple (bulk copy only)")

    async def create_multiple(
        self, entity_set: str, table_logical_name: str, rows: Sequence[Mapping[str, Any]]
    ) -> list[str]:
        raise NotImplementedError("the simulated Dataverse does not model CreateMultiple (bulk copy only)")

    async def aclose(self) -> None:
        return None


def _write_operation(mode: UpsertMode) -> str:
    return {"create": "create", "update": "update"}.get(mode, "upsert")


def _select_names(select: str | None) -> list[str] | None:
    if not select:
        return None
    try:
        return parse_select(select)
    except ODataSyntaxError as exc:
        raise DataverseError(400, "0x0", exc.message) from exc
