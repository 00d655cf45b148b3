"""Finance & Operations OData client (`<root>/data/`), by entity key.

Keys follow wire-formats 2.1: every key field, company-specific entities with
`dataAreaId` first and `cross-company=true` on the URL so a company other than
the user's default one is reachable. F&O documents no upsert: writes are
update-only (PATCH, 404 when missing) or create-only (`create_new`: POST, which
reports a record that exists already instead of overwriting it). Token, retry,
concurrency cap and error translation live in `TargetHttp`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import httpx
from azure.core.credentials_async import AsyncTokenCredential

from loyaltysync.errors import TargetError
from loyaltysync.targets.auth import BearerToken, scope_for
from loyaltysync.targets.batch import BatchItem, BatchResult, execute
from loyaltysync.targets.http import RetryPolicy, Sleep, TargetHttp, ThrottleHook
from loyaltysync.targets.odata import (
    Key,
    check_name,
    key_predicate,
    orderby_list,
    query_string,
    select_list,
)

log = logging.getLogger("loyaltysync.targets.fno")

TARGET = "fno"
DATA_PATH = "data/"
MAX_PAGE_SIZE = 10_000
COMPANY = "dataAreaId"
BASE_HEADERS = {"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0"}
Row = dict[str, Any]


def ordered_key(key: Key) -> dict[str, Any]:
    """`key` with `dataAreaId` first, as F&O writes company-specific keys."""
    if COMPANY not in key:
        return dict(key)
    return {COMPANY: key[COMPANY], **{k: v for k, v in key.items() if k != COMPANY}}


def key_path(
    entity_set: str, key: Key, *, cross_company: bool = False, params: Mapping[str, str | None] | None = None
) -> str:
    """`Entity(dataAreaId='usmf',Key='x')?cross-company=true`: the address of one record (relative).

    `cross-company=true` is added whenever the key names a company, or on request.
    """
    ordered = ordered_key(key)
    company = cross_company or COMPANY in ordered
    query = {**(params or {}), "cross-company": "true" if company else None}
    return check_name(entity_set) + key_predicate(ordered) + query_string(query)


def lost_create_race(error: TargetError) -> bool:
    """Whether a failed POST means "the record exists now" (F&O answers 500 "...already exists")."""
    if error.status in (409, 412):
        return True
    return error.status in (400, 500) and "already exist" in error.message.lower()


class FnoClient:
    """Async client of one F&O environment's OData service; one per process, closed with `aclose()`."""

    def __init__(
        self,
        root_url: str,
        credential: AsyncTokenCredential,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        max_concurrency: int = 32,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        page_size: int = MAX_PAGE_SIZE,
        scope: str | None = None,
        sleep: Sleep = asyncio.sleep,
        on_throttle: ThrottleHook | None = None,
    ) -> None:
        self.root_url = root_url.rstrip("/")
        self.page_size = max(1, min(page_size, MAX_PAGE_SIZE))
        self.http = TargetHttp(
            TARGET,
            f"{self.root_url}/{DATA_PATH}",
            BearerToken(credential, scope or scope_for(self.root_url)),
            transport=transport,
            timeout=timeout,
            max_concurrency=max_concurrency,
            retry=retry,
            sleep=sleep,
            default_headers=BASE_HEADERS,
            on_throttle=on_throttle,
        )

    async def get(
        self,
        entity_set: str,
        key: Key,
        *,
        select: Sequence[str] | None = None,
        cross_company: bool = False,
    ) -> Row | None:
        """The record with entity key `key`, None when there is none."""
        path = key_path(entity_set, key, cross_company=cross_company, params={"$select": select_list(select)})
        response = await self.http.request("GET", path, allow={404})
        return None if response.status_code == 404 else dict(response.json())

    async def create(self, entity_set: str, body: Mapping[str, Any]) -> Row:
        """POST a new record (body with `dataAreaId` and every key field); the created record.

        Not retried after a timeout: `create_new` is the safe way to write.
        """
        response = await self.http.request(
            "POST", check_name(entity_set), json=dict(body), headers={"Prefer": "return=representation"}
        )
        return dict(response.json()) if response.content.strip() else {}

    async def update(self, entity_set: str, key: Key, body: Mapping[str, Any]) -> None:
        """PATCH the record `key`; raises `TargetError` (404, `not_found`) when it does not exist."""
        await self.http.request("PATCH", key_path(entity_set, key), json=dict(body))

    async def create_new(self, entity_set: str, key: Key, body: Mapping[str, Any]) -> bool:
        """POST the record `key` (key merged into `body`); False when it exists already.

        Retried after a timeout: F&O refuses a second record with the same key ("...already
        exists"), so a retry of a POST that did land reports False instead of creating twice.
        Never turned into an update: a record someone created meanwhile is not overwritten.
        """
        try:
            await self.http.request("POST", check_name(entity_set), json={**body, **ordered_key(key)}, idempotent=True)
        except TargetError as error:
            if lost_create_race(error):
                log.info("%s: create of a record that exists now", entity_set)
                return False
            raise
        return True

    async def delete(self, entity_set: str, key: Key, *, cross_company: bool = False) -> bool:
        """Delete the record `key`; False when there was none."""
        response = await self.http.request(
            "DELETE", key_path(entity_set, key, cross_company=cross_company), allow={404}
        )
        return response.status_code != 404

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
        """The matching records, one non-empty page at a time.

        Follows `@odata.nextLink` unchanged. Only when the service sends no nextLink but
        a full page does it page on with `$top`/`$skip` (give `orderby` for a stable order).
        """
        size = max(1, min(page_size or self.page_size, MAX_PAGE_SIZE))
        params: dict[str, str | int | None] = {
            "$select": select_list(select),
            "$filter": filter,
            "$orderby": orderby_list(orderby),
            "cross-company": "true" if cross_company else None,
        }
        base = check_name(entity_set)
        url = base + query_string(params)
        headers = {"Prefer": f"odata.maxpagesize={size}"}
        fetched = 0
        previous: list[Any] | None = None
        while True:
            response = await self.http.request("GET", url, headers=headers)
            data = response.json()
            rows = data.get("value") or []
            if previous is not None and rows and rows == previous:
                log.warning("%s: $skip paging returned the same page twice; stopping", entity_set)
                return
            if rows:
                yield [dict(r) for r in rows]
            fetched += len(rows)
            next_link = data.get("@odata.nextLink")
            if next_link:
                url, previous = next_link, None
            elif len(rows) >= size:
                url = base + query_string({**params, "$top": size, "$skip": fetched})
                previous = rows
            else:
                return

    async def batch(self, operations: Sequence[BatchItem], *, continue_on_error: bool = False) -> list[BatchResult]:
        """Send `operations` (requests and change sets) as one `/data/$batch`; a result per request."""
        prefer = {"Prefer": "odata.continue-on-error"} if continue_on_error else None
        return await execute(self.http, operations, headers=prefer)

    async def aclose(self) -> None:
        """Close the connection pool."""
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
