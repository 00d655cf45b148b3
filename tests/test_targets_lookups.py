"""LookupCache: natural key <-> row id for template lookups, against a small currency table app."""

from __future__ import annotations

import re
import uuid

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from loyaltysync.targets.auth import StaticTokenCredential
from loyaltysync.targets.dataverse import DataverseClient
from loyaltysync.targets.lookups import LookupCache, LookupNotPrepared
from loyaltysync.templates import Lookup

CURRENCY = Lookup(
    entity_set="transactioncurrencies",
    table="transactioncurrency",
    id_column="transactioncurrencyid",
    key_column="isocurrencycode",
)
ROWS = {code: str(uuid.uuid5(uuid.NAMESPACE_DNS, code)) for code in ("USD", "EUR", "GBP", "JPY", "CHF", "O'X")}
_CLAUSE = re.compile(r"^(\w+) eq (?:'((?:[^']|'')*)'|([0-9a-f-]{36}))$")


class CurrencyTable:
    """Answers `$filter=c eq 'x' or c eq 'y'` (strings case-insensitively, like Dataverse) over ROWS."""

    def __init__(self) -> None:
        self.queries: list[dict[str, str]] = []

    def client(self) -> DataverseClient:
        async def handler(request: Request) -> Response:
            query = dict(request.query_params)
            self.queries.append(query)
            assert query["$select"] == "transactioncurrencyid,isocurrencycode"
            wanted_codes: set[str] = set()
            wanted_ids: set[str] = set()
            for clause in query["$filter"].split(" or "):
                found = _CLAUSE.match(clause)
                assert found, clause
                column, text, guid = found.groups()
                if text is not None:
                    assert column == "isocurrencycode"
                    wanted_codes.add(text.replace("''", "'").casefold())
                else:
                    assert column == "transactioncurrencyid"
                    wanted_ids.add(guid)
            rows = [
                {"transactioncurrencyid": row_id, "isocurrencycode": code}
                for code, row_id in ROWS.items()
                if code.casefold() in wanted_codes or row_id in wanted_ids
            ]
            return JSONResponse({"value": rows})

        app = Starlette(routes=[Route("/api/data/v9.2/transactioncurrencies", handler)])
        return DataverseClient(
            "https://org.example.test",
            StaticTokenCredential("lookup-token-123456"),
            transport=httpx.ASGITransport(app=app),
        )


async def test_prepare_fetches_missing_keys_in_one_query_then_answers_from_memory() -> None:
    table = CurrencyTable()
    cache = LookupCache(table.client())
    await cache.prepare(CURRENCY, keys=["USD", "eur", "XXX", "USD"])
    assert len(table.queries) == 1
    assert cache.id_for(CURRENCY, "USD") == ROWS["USD"]
    assert cache.id_for(CURRENCY, "Eur") == ROWS["EUR"]  # case-insensitive like Dataverse
    assert cache.id_for(CURRENCY, "XXX") is None  # Dataverse has no such row
    assert cache.key_for(CURRENCY, ROWS["EUR"]) == "EUR"  # learnt from the same answer, as stored
    with pytest.raises(LookupNotPrepared):
        cache.id_for(CURRENCY, "GBP")

    await cache.prepare(CURRENCY, keys=["usd", "EUR"], ids=[ROWS["USD"]])
    assert len(table.queries) == 1  # everything was cached


async def test_prepare_resolves_ids_with_unquoted_guids() -> None:
    table = CurrencyTable()
    cache = LookupCache(table.client())
    missing = str(uuid.uuid4())
    await cache.prepare(CURRENCY, ids=[ROWS["JPY"].upper(), missing, "not-a-guid') or ('1"])
    assert len(table.queries) == 1
    assert "not-a-guid" not in table.queries[0]["$filter"]
    assert cache.key_for(CURRENCY, ROWS["JPY"]) == "JPY"
    assert cache.key_for(CURRENCY, missing) is None
    assert cache.key_for(CURRENCY, "not-a-guid') or ('1") is None
    assert cache.id_for(CURRENCY, "jpy") == ROWS["JPY"]


async def test_keys_with_quotes_are_escaped() -> None:
    table = CurrencyTable()
    cache = LookupCache(table.client())
    await cache.prepare(CURRENCY, keys=["O'X"])
    assert table.queries[0]["$filter"] == "isocurrencycode eq 'O''X'"
    assert cache.id_for(CURRENCY, "o'x") == ROWS["O'X"]


async def test_many_keys_are_split_over_a_few_queries() -> None:
    table = CurrencyTable()
    cache = LookupCache(table.client(), values_per_query=2)
    await cache.prepare(CURRENCY, keys=["USD", "EUR", "GBP", "JPY", "CHF"])
    assert len(table.queries) == 3
    assert {cache.id_for(CURRENCY, c) for c in ("USD", "EUR", "GBP", "JPY", "CHF")} == {
        ROWS[c] for c in ("USD", "EUR", "GBP", "JPY", "CHF")
    }


async def test_entries_expire_after_their_ttl_and_misses_sooner() -> None:
    now = [0.0]
    table = CurrencyTable()
    cache = LookupCache(table.client(), ttl=600, negative_ttl=30, clock=lambda: now[0])
    await cache.prepare(CURRENCY, keys=["USD", "XXX"])
    now[0] = 31
    await cache.prepare(CURRENCY, keys=["USD", "XXX"])
    assert table.queries[-1]["$filter"] == "isocurrencycode eq 'XXX'"  # only the miss is asked again
    now[0] = 601
    await cache.prepare(CURRENCY, keys=["USD"])
    assert table.queries[-1]["$filter"] == "isocurrencycode eq 'USD'"
    assert len(table.queries) == 3
    cache.forget()
    with pytest.raises(LookupNotPrepared):
        cache.id_for(CURRENCY, "USD")


async def test_the_cache_is_bounded() -> None:
    table = CurrencyTable()
    cache = LookupCache(table.client(), max_entries=4)
    await cache.prepare(CURRENCY, keys=["USD", "EUR"])  # 4 entries: two keys, two ids
    await cache.prepare(CURRENCY, keys=["GBP"])  # evicts the oldest two
    assert cache.id_for(CURRENCY, "GBP") == ROWS["GBP"]
    with pytest.raises(LookupNotPrepared):
        cache.id_for(CURRENCY, "USD")
