"""Dataverse Web API client (`<root>/api/data/v9.2/`), by alternate key.

Rows are addressed by natural key (`msdyn_loyaltycards(msdyn_cardnumber='C-1')`,
wire-formats 1.2). A key value holding a character alternate keys cannot
carry (`/ < > * % & : \\ ? +`) is looked up with `$filter` instead and the row
written by id (part C). Every request goes through `TargetHttp`: token,
retry, concurrency cap and error translation live there, not here.
"""

from __future__ import annotations

import asyncio
import copy
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, Self

import httpx
from azure.core.credentials_async import AsyncTokenCredential

from loyaltysync.errors import TargetError
from loyaltysync.targets.auth import BearerToken, scope_for
from loyaltysync.targets.batch import BatchItem, BatchResult, execute
from loyaltysync.targets.http import RetryPolicy, Sleep, TargetHttp, ThrottleHook, error_from_response
from loyaltysync.targets.odata import (
    Key,
    check_name,
    eq_filter,
    id_predicate,
    key_predicate,
    orderby_list,
    query_string,
    select_list,
)

TARGET = "dataverse"
API_PATH = "api/data/v9.2/"
MAX_PAGE_SIZE = 5000
UNSUPPORTED_KEY_CHARACTERS = frozenset("/<>*%&:\\?+")
UpsertMode = Literal["upsert", "create", "update"]
Row = dict[str, Any]

BASE_HEADERS = {"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0"}
_SEGMENT_NOT_FOUND = "0x8006088a"  # wrong entity set: a configuration error, never "no such row"
_ENTITY_ID = re.compile(
    r"\((?:[A-Za-z_][A-Za-z0-9_]*=)?([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})\)"
    r"\s*$"
)


def needs_filter(key: Key) -> bool:
    """Whether a key holds a character an alternate-key URL cannot carry (write by id after a $filter)."""
    return any(isinstance(v, str) and not UNSUPPORTED_KEY_CHARACTERS.isdisjoint(v) for v in key.values())


def key_path(entity_set: str, key: Key) -> str:
    """`<entity_set>(<column>='<value>',...)`, the alternate-key address of a row (relative to the base)."""
    return check_name(entity_set) + key_predicate(key)


def entity_id(response: httpx.Response) -> str | None:
    """The row id from an `OData-EntityId` header, None when absent or not in GUID form."""
    found = _ENTITY_ID.search(response.headers.get("OData-EntityId", ""))
    return found.group(1).lower() if found else None


def _describe(key: Key) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in key.items())


class DataverseClient:
    """Async client of one Dataverse environment; one instance per process, closed with `aclose()`."""

    def __init__(
        self,
        root_url: str,
        credential: AsyncTokenCredential,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        max_concurrency: int = 52,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        page_size: int = MAX_PAGE_SIZE,
        caller_object_id: str | None = None,
        scope: str | None = None,
        sleep: Sleep = asyncio.sleep,
        on_throttle: ThrottleHook | None = None,
    ) -> None:
        self.root_url = root_url.rstrip("/")
        self.page_size = max(1, min(page_size, MAX_PAGE_SIZE))
        self.caller_object_id = caller_object_id
        self.http = TargetHttp(
            TARGET,
            f"{self.root_url}/{API_PATH}",
            BearerToken(credential, scope or scope_for(self.root_url)),
            transport=transport,
            timeout=timeout,
            max_concurrency=max_concurrency,
            retry=retry,
            sleep=sleep,
            default_headers=BASE_HEADERS,
            on_throttle=on_throttle,
        )
        self._owns_http = True

    def as_caller(self, object_id: str | None) -> DataverseClient:
        """A view of this client that acts as another user (`CallerObjectId`), sharing its connections.

        Only the original client closes the connections; closing a view does nothing.
        """
        view = copy.copy(self)
        view.caller_object_id = object_id
        view._owns_http = False
        return view

    def _headers(self, extra: Mapping[str, str] | None = None, *, read: bool = False) -> dict[str, str]:
        headers = {"If-None-Match": "null"} if read else {}
        if self.caller_object_id:
            headers["CallerObjectId"] = self.caller_object_id
        headers.update(extra or {})
        return headers

    def _missing(self, response: httpx.Response) -> bool:
        """True for a 404 that means "no such row"; a 404 for an unknown entity set is raised."""
        if response.status_code != 404:
            return False
        error = error_from_response(TARGET, response)
        if error.code.lower() == _SEGMENT_NOT_FOUND:
            raise error
        return True

    # Reads -------------------------------------------------------------------------------------

    async def get_by_key(self, entity_set: str, key: Key, select: Sequence[str] | None = None) -> Row | None:
        """The row with alternate key `key` (only `select` columns when given), None when there is none."""
        if needs_filter(key):
            return await self._first(entity_set, key, select)
        path = key_path(entity_set, key) + query_string({"$select": select_list(select)})
        response = await self.http.request("GET", path, headers=self._headers(read=True), allow={404})
        return None if self._missing(response) else dict(response.json())

    async def get_by_id(self, entity_set: str, row_id: str, select: Sequence[str] | None = None) -> Row | None:
        """The row with primary key `row_id`, None when there is none."""
        path = check_name(entity_set) + id_predicate(row_id) + query_string({"$select": select_list(select)})
        response = await self.http.request("GET", path, headers=self._headers(read=True), allow={404})
        return None if self._missing(response) else dict(response.json())

    async def find_id(self, entity_set: str, id_column: str, key: Key) -> str | None:
        """The id of the row whose columns equal `key`, found with `$filter` (works for any key value)."""
        row = await self._first(entity_set, key, [id_column])
        if row is None:
            return None
        value = row.get(id_column)
        if not isinstance(value, str):
            raise TargetError(TARGET, 200, "", f"{entity_set}: the answer has no {id_column} column")
        return value.lower()

    async def _first(self, entity_set: str, key: Key, select: Sequence[str] | None) -> Row | None:
        params = {"$select": select_list(select), "$filter": eq_filter(key), "$top": "1"}
        response = await self.http.request(
            "GET", check_name(entity_set) + query_string(params), headers=self._headers(read=True)
        )
        rows = response.json().get("value") or []
        return dict(rows[0]) if rows else None

    async def query(
        self,
        entity_set: str,
        *,
        select: Sequence[str],
        filter: str | None = None,
        orderby: str | Sequence[str] | None = None,
        page_size: int | None = None,
    ) -> AsyncIterator[list[Row]]:
        """The matching rows, one non-empty page at a time, following `@odata.nextLink` until there is none.

        `filter` is an OData expression (build literals with `loyaltysync.targets.odata.literal`).
        Dataverse has no `$skip`: paging is by nextLink only, sized with `Prefer: odata.maxpagesize`.
        """
        size = max(1, min(page_size or self.page_size, MAX_PAGE_SIZE))
        params = {"$select": select_list(select), "$filter": filter, "$orderby": orderby_list(orderby)}
        url: str | None = check_name(entity_set) + query_string(params)
        headers = self._headers({"Prefer": f"odata.maxpagesize={size}"}, read=True)
        while url:
            response = await self.http.request("GET", url, headers=headers)
            data = response.json()
            rows = data.get("value") or []
            if rows:
                yield [dict(r) for r in rows]
            url = data.get("@odata.nextLink")

    async def who_am_i(self) -> Row:
        """`WhoAmI`: the caller's UserId, BusinessUnitId and OrganizationId."""
        response = await self.http.request("GET", "WhoAmI", headers=self._headers(read=True))
        return dict(response.json())

    # Writes ------------------------------------------------------------------------------------

    async def upsert(
        self,
        entity_set: str,
        key: Key,
        body: Mapping[str, Any],
        *,
        mode: UpsertMode = "upsert",
        id_column: str | None = None,
    ) -> str | None:
        """Write `body` to the row with alternate key `key`; the row id when the service tells it.

        `upsert` creates or updates (PATCH, 204 either way); `create` fails with 412 when the row
        exists (`If-None-Match: *`); `update` fails with 404 when it does not (`If-Match: *`).
        Keys the URL cannot carry need `id_column`: the row is found with `$filter`, then
        patched by id or created with POST.
        """
        if needs_filter(key):
            return await self._write_by_filter(entity_set, key, body, mode, self._need_id_column(id_column, key))
        condition = {"create": {"If-None-Match": "*"}, "update": {"If-Match": "*"}}.get(mode)
        response = await self.http.request(
            "PATCH", key_path(entity_set, key), headers=self._headers(condition), json=dict(body)
        )
        return entity_id(response)

    async def _write_by_filter(
        self, entity_set: str, key: Key, body: Mapping[str, Any], mode: UpsertMode, id_column: str
    ) -> str | None:
        row_id = await self.find_id(entity_set, id_column, key)
        if row_id is None:
            if mode == "update":
                raise TargetError(
                    TARGET, 404, "", f"{entity_set}: no row with {_describe(key)}", method="PATCH", url=entity_set
                )
            return await self.create(entity_set, {**body, **key})
        if mode == "create":
            raise TargetError(
                TARGET,
                412,
                "",
                f"A record with matching key values already exists ({_describe(key)}).",
                method="POST",
                url=entity_set,
            )
        await self.update_by_id(entity_set, row_id, body)
        return row_id

    @staticmethod
    def _need_id_column(id_column: str | None, key: Key) -> str:
        if id_column is None:
            raise ValueError(
                f"key {_describe(key)} holds a character alternate keys cannot carry; pass id_column= so the "
                "row can be found with $filter and written by id"
            )
        return id_column

    async def create(self, entity_set: str, body: Mapping[str, Any]) -> str | None:
        """POST a new row; its id (from `OData-EntityId`). Never retried after a timeout (no duplicates)."""
        response = await self.http.request("POST", check_name(entity_set), headers=self._headers(), json=dict(body))
        return entity_id(response)

    async def update_by_id(
        self, entity_set: str, row_id: str, body: Mapping[str, Any], *, if_match: str | None = "*"
    ) -> None:
        """PATCH the row `row_id`; `if_match` `*` (default) fails with 404 instead of creating, an ETag with 412."""
        headers = self._headers({"If-Match": if_match} if if_match else None)
        await self.http.request(
            "PATCH", check_name(entity_set) + id_predicate(row_id), headers=headers, json=dict(body)
        )

    async def delete_by_key(self, entity_set: str, key: Key, *, id_column: str | None = None) -> bool:
        """Delete the row with alternate key `key`; False when there was none."""
        if needs_filter(key):
            row_id = await self.find_id(entity_set, self._need_id_column(id_column, key), key)
            return False if row_id is None else await self.delete_by_id(entity_set, row_id)
        response = await self.http.request("DELETE", key_path(entity_set, key), headers=self._headers(), allow={404})
        return not self._missing(response)

    async def delete_by_id(self, entity_set: str, row_id: str) -> bool:
        """Delete the row `row_id`; False when there was none."""
        response = await self.http.request(
            "DELETE", check_name(entity_set) + id_predicate(row_id), headers=self._headers(), allow={404}
        )
        return not self._missing(response)

    # Bulk --------------------------------------------------------------------------------------

    async def batch(self, operations: Sequence[BatchItem], *, continue_on_error: bool = False) -> list[BatchResult]:
        """Send `operations` (requests and change sets) as one `$batch`; a result per request, in order."""
        prefer = {"Prefer": "odata.continue-on-error"} if continue_on_error else None
        return await execute(self.http, operations, headers=self._headers(prefer))

    async def upsert_multiple(
        self,
        entity_set: str,
        table_logical_name: str,
        rows: Sequence[tuple[Key, Mapping[str, Any]]],
        *,
        id_column: str | None = None,
        chunk_size: int = 1000,
    ) -> None:
        """Upsert many rows by alternate key with `UpsertMultiple`, `chunk_size` per request.

        On standard tables one failing row fails its whole request. Rows whose key the URL
        cannot carry are upserted one by one through `$filter` (they need `id_column`).
        """
        odd = [(k, b) for k, b in rows if needs_filter(k)]
        if odd:
            self._need_id_column(id_column, odd[0][0])
        plain = [(k, b) for k, b in rows if not needs_filter(k)]
        odata_type = f"Microsoft.Dynamics.CRM.{check_name(table_logical_name)}"
        action = f"{check_name(entity_set)}/Microsoft.Dynamics.CRM.UpsertMultiple"
        for start in range(0, len(plain), max(1, chunk_size)):
            targets = [
                {**body, **key, "@odata.type": odata_type, "@odata.id": key_path(entity_set, key)}
                for key, body in plain[start : start + chunk_size]
            ]
            await self.http.request("POST", action, headers=self._headers(), json={"Targets": targets}, idempotent=True)
        for key, body in odd:
            await self.upsert(entity_set, key, body, id_column=id_column)

    async def create_multiple(
        self, entity_set: str, table_logical_name: str, rows: Sequence[Mapping[str, Any]]
    ) -> list[str]:
        """Create `rows` in one `CreateMultiple` request (all or nothing); their ids in order."""
        if not rows:
            return []
        odata_type = f"Microsoft.Dynamics.CRM.{check_name(table_logical_name)}"
        response = await self.http.request(
            "POST",
            f"{check_name(entity_set)}/Microsoft.Dynamics.CRM.CreateMultiple",
            headers=self._headers(),
            json={"Targets": [{**row, "@odata.type": odata_type} for row in rows]},
        )
        return [str(i).lower() for i in response.json().get("Ids", [])]

    # Lifetime ----------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the connection pool (a view from `as_caller` leaves it to its owner)."""
        if self._owns_http:
            await self.http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
