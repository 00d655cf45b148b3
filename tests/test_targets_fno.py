"""FnoClient against small in-process Starlette apps: keys, company scope, create-or-update race, paging."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from loyaltysync.errors import TargetError
from loyaltysync.targets.auth import StaticTokenCredential
from loyaltysync.targets.fno import FnoClient, key_path

TOKEN = "fno-test-token-0123456789"
ROOT = "https://env.operations.example.test"
DATA = "/data/"
CARDS = "RetailLoyaltyCards"


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    raw_query: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeFno:
    """Answers with `answers` in turn (or `respond`) and records every request."""

    answers: list[Response] = field(default_factory=list)
    respond: Callable[[Seen], Response] | None = None
    seen: list[Seen] = field(default_factory=list)

    def client(self, **kwargs: Any) -> FnoClient:
        async def handler(request: Request) -> Response:
            raw = await request.body()
            seen = Seen(
                request.method,
                request.scope["path"].removeprefix(DATA),
                dict(request.query_params),
                request.scope["query_string"].decode(),
                dict(request.headers),
                json.loads(raw) if raw else None,
            )
            self.seen.append(seen)
            if self.respond is not None:
                return self.respond(seen)
            return self.answers[len(self.seen) - 1]

        app = Starlette(routes=[Route(DATA + "{rest:path}", handler, methods=["GET", "POST", "PATCH", "DELETE"])])
        return FnoClient(ROOT, StaticTokenCredential(TOKEN), transport=httpx.ASGITransport(app=app), **kwargs)


def fo_error(status: int, inner: str, message: str = "An error has occurred.") -> JSONResponse:
    body = {"error": {"code": "", "message": message, "innererror": {"message": inner, "type": "X", "stacktrace": ""}}}
    return JSONResponse(body, status_code=status)


NOT_FOUND = JSONResponse({"error": {"code": "", "message": "No resources were found."}}, status_code=404)
NO_CONTENT = Response(status_code=204)


def test_key_formatting_puts_the_company_first_and_goes_cross_company() -> None:
    assert key_path(CARDS, {"CardNumber": "C-1"}) == "RetailLoyaltyCards(CardNumber='C-1')"
    assert (
        key_path("CustomersV3", {"CustomerAccount": "US-001", "dataAreaId": "usmf"})
        == "CustomersV3(dataAreaId='usmf',CustomerAccount='US-001')?cross-company=true"
    )
    assert key_path(CARDS, {"CardNumber": "O'B/1?"}) == "RetailLoyaltyCards(CardNumber='O%27%27B%2F1%3F')"
    assert (
        key_path(CARDS, {"CardNumber": "C"}, cross_company=True)
        == "RetailLoyaltyCards(CardNumber='C')?cross-company=true"
    )


async def test_get_returns_the_record_or_none() -> None:
    fake = FakeFno([JSONResponse({"CardNumber": "O'Brien/1", "CardTenderType": "AsCardTender"}), NOT_FOUND])
    client = fake.client()
    row = await client.get(CARDS, {"CardNumber": "O'Brien/1"}, select=["CardNumber", "CardTenderType"])
    assert row == {"CardNumber": "O'Brien/1", "CardTenderType": "AsCardTender"}
    assert await client.get("CustomersV3", {"dataAreaId": "usmf", "CustomerAccount": "X"}) is None
    first, second = fake.seen
    assert first.path == "RetailLoyaltyCards(CardNumber='O''Brien/1')"
    assert first.query == {"$select": "CardNumber,CardTenderType"}
    assert second.path == "CustomersV3(dataAreaId='usmf',CustomerAccount='X')"
    assert second.query == {"cross-company": "true"}
    for seen in fake.seen:
        assert seen.headers["authorization"] == f"Bearer {TOKEN}"
        assert seen.headers["accept"] == "application/json"
        assert seen.headers["odata-version"] == "4.0"
        assert seen.headers["odata-maxversion"] == "4.0"
    await client.aclose()


async def test_create_new_posts_the_record_with_its_key() -> None:
    fake = FakeFno([JSONResponse({"CardNumber": "C-1"}, status_code=201)])
    key = {"CardNumber": "C-1", "dataAreaId": "usrt"}
    assert await fake.client().create_new("Cards", key, {"PartyNumber": "P1"}) is True
    (post,) = fake.seen
    assert (post.method, post.path) == ("POST", "Cards")
    assert post.body == {"PartyNumber": "P1", "dataAreaId": "usrt", "CardNumber": "C-1"}


async def test_create_new_of_an_existing_record_reports_it_and_writes_nothing() -> None:
    """A record created meanwhile is not overwritten (the engine decides again from fresh reads)."""
    exists = fo_error(500, "Write failed for table row of type 'RetailLoyaltyCardEntity'. The record already exists.")
    fake = FakeFno([exists])
    assert await fake.client().create_new(CARDS, {"CardNumber": "C-1"}, {"PartyNumber": "P1"}) is False
    assert [s.method for s in fake.seen] == ["POST"]


async def test_create_new_raises_other_create_failures_with_the_inner_message() -> None:
    inner = "Write failed. Infolog: The value 'Local' in field 'Customer group' is not found in the related table."
    fake = FakeFno([fo_error(500, inner)])
    with pytest.raises(TargetError) as caught:
        await fake.client().create_new(CARDS, {"CardNumber": "C-1"}, {"PartyNumber": "P1"})
    assert caught.value.status == 500
    assert caught.value.message == inner
    assert caught.value.target == "fno"


async def test_update_of_a_missing_record_raises_not_found() -> None:
    fake = FakeFno([NOT_FOUND])
    with pytest.raises(TargetError) as caught:
        await fake.client().update(CARDS, {"CardNumber": "C-1"}, {"PartyNumber": "P1"})
    assert caught.value.not_found


async def test_create_returns_the_created_record() -> None:
    fake = FakeFno([JSONResponse({"CardNumber": "C-1", "@odata.etag": 'W/"JzEn"'}, status_code=201)])
    assert (await fake.client().create(CARDS, {"CardNumber": "C-1"}))["CardNumber"] == "C-1"
    assert fake.seen[0].headers["prefer"] == "return=representation"


async def test_delete_reports_whether_there_was_a_record() -> None:
    fake = FakeFno([NO_CONTENT, NOT_FOUND])
    client = fake.client()
    assert await client.delete(CARDS, {"CardNumber": "C-1"}) is True
    assert await client.delete(CARDS, {"CardNumber": "C-2"}, cross_company=True) is False
    assert fake.seen[1].query == {"cross-company": "true"}
    assert all(s.method == "DELETE" for s in fake.seen)


async def test_query_follows_next_link() -> None:
    def respond(seen: Seen) -> Response:
        page = int(seen.query.get("page", "1"))
        body: dict[str, Any] = {"value": [{"CardNumber": f"C-{page}"}]}
        if page < 3:
            body["@odata.nextLink"] = f"{ROOT}{DATA}{CARDS}?cross-company=true&page={page + 1}&$skiptoken=abc%3D{page}"
        return JSONResponse(body)

    fake = FakeFno(respond=respond)
    pages = [
        p
        async for p in fake.client().query(
            CARDS,
            filter="CardTenderType eq Microsoft.Dynamics.DataEntities.LoyaltyTenderType'AsCardTender'",
            select=["CardNumber"],
            cross_company=True,
        )
    ]
    assert pages == [[{"CardNumber": "C-1"}], [{"CardNumber": "C-2"}], [{"CardNumber": "C-3"}]]
    assert fake.seen[0].query == {
        "$select": "CardNumber",
        "$filter": "CardTenderType eq Microsoft.Dynamics.DataEntities.LoyaltyTenderType'AsCardTender'",
        "cross-company": "true",
    }
    assert fake.seen[1].raw_query == "cross-company=true&page=2&$skiptoken=abc%3D1"
    assert all(s.headers["prefer"] == "odata.maxpagesize=10000" for s in fake.seen)


async def test_query_falls_back_to_top_and_skip_only_after_a_full_page_without_next_link() -> None:
    rows = [{"CardNumber": f"C-{i:02d}"} for i in range(7)]

    def respond(seen: Seen) -> Response:
        skip, top = int(seen.query.get("$skip", 0)), int(seen.query.get("$top", 3))
        return JSONResponse({"value": rows[skip : skip + top]})  # a service that ignores maxpagesize-less paging

    fake = FakeFno(respond=respond)
    pages = [p async for p in fake.client(page_size=3).query(CARDS, orderby="CardNumber")]
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [r for p in pages for r in p] == rows
    assert [(s.query.get("$top"), s.query.get("$skip")) for s in fake.seen] == [(None, None), ("3", "3"), ("3", "6")]
    assert all(s.query["$orderby"] == "CardNumber" for s in fake.seen)

    short = FakeFno(respond=lambda seen: JSONResponse({"value": rows[:2]}))
    assert [len(p) async for p in short.client(page_size=3).query(CARDS)] == [2]
    assert len(short.seen) == 1


async def test_query_stops_when_skip_is_ignored() -> None:
    fake = FakeFno(respond=lambda seen: JSONResponse({"value": [{"CardNumber": "C-1"}, {"CardNumber": "C-2"}]}))
    pages = [p async for p in fake.client(page_size=2).query(CARDS)]
    assert len(pages) == 1
    assert len(fake.seen) == 2
