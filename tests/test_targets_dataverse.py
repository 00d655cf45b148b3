"""DataverseClient against small in-process Starlette apps: headers, keys, upsert modes, paging, bulk."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from loyaltysync.errors import TargetError
from loyaltysync.targets.auth import StaticTokenCredential
from loyaltysync.targets.dataverse import DataverseClient, needs_filter
from loyaltysync.targets.odata import key_predicate

TOKEN = "dataverse-test-token-0123456789"
ROOT = "https://org.crm.example.test"
API = "/api/data/v9.2/"
CARDS = "msdyn_loyaltycards"
ROW_ID = "7c9e6679-7425-40de-944b-e07fc1f90ae7"


@dataclass
class Seen:
    method: str
    path: str  # decoded, relative to the API root
    raw_path: str
    query: dict[str, str]
    raw_query: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeDataverse:
    """Records each request and answers through `respond` (default: 204)."""

    respond: Callable[[Seen], Awaitable[Response] | Response] = lambda seen: Response(status_code=204)
    seen: list[Seen] = field(default_factory=list)

    def app(self) -> Starlette:
        async def handler(request: Request) -> Response:
            raw = await request.body()
            seen = Seen(
                method=request.method,
                path=request.scope["path"].removeprefix(API),
                raw_path=request.scope["raw_path"].decode().removeprefix(API),
                query=dict(request.query_params),
                raw_query=request.scope["query_string"].decode(),
                headers=dict(request.headers),
                body=json.loads(raw) if raw else None,
            )
            self.seen.append(seen)
            answer = self.respond(seen)
            return answer if isinstance(answer, Response) else await answer

        return Starlette(routes=[Route(API + "{rest:path}", handler, methods=["GET", "POST", "PATCH", "DELETE"])])

    def client(self, **kwargs: Any) -> DataverseClient:
        return DataverseClient(
            ROOT, StaticTokenCredential(TOKEN), transport=httpx.ASGITransport(app=self.app()), **kwargs
        )


def error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def created(entity_set: str = CARDS, row_id: str = ROW_ID) -> Response:
    return Response(status_code=204, headers={"OData-EntityId": f"{ROOT}{API}{entity_set}({row_id})"})


_PREDICATE = re.compile(r"^(\w+)\((.*)\)$", re.S)


def parse_key(path: str) -> tuple[str, dict[str, str | int]]:
    """The test's own reading of a decoded key path: entity set and name -> value (quotes undone)."""
    found = _PREDICATE.match(path)
    assert found, path
    entity_set, inside = found.groups()
    key: dict[str, str | int] = {}
    for part in re.findall(r"(\w+)=('(?:[^']|'')*'|\d+)", inside):
        name, literal = part
        key[name] = literal[1:-1].replace("''", "'") if literal.startswith("'") else int(literal)
    rebuilt = ",".join(
        f"{k}='{v.replace(chr(39), chr(39) * 2)}'" if isinstance(v, str) else f"{k}={v}" for k, v in key.items()
    )
    assert rebuilt == inside, f"{inside!r} is not exactly a key predicate"
    return entity_set, key


# Headers ---------------------------------------------------------------------------------------


async def test_documented_headers_are_sent() -> None:
    fake = FakeDataverse(lambda seen: JSONResponse({"msdyn_cardnumber": "C-1"}) if seen.method == "GET" else created())
    client = fake.client()
    await client.get_by_key(CARDS, {"msdyn_cardnumber": "C-1"}, ["msdyn_cardnumber"])
    await client.upsert(CARDS, {"msdyn_cardnumber": "C-1"}, {"msdyn_partynumber": "P"})
    get, patch = fake.seen
    for seen in (get, patch):
        assert seen.headers["accept"] == "application/json"
        assert seen.headers["odata-maxversion"] == "4.0"
        assert seen.headers["odata-version"] == "4.0"
        assert seen.headers["authorization"] == f"Bearer {TOKEN}"
        assert "callerobjectid" not in seen.headers
    assert get.headers["if-none-match"] == "null"
    assert get.query == {"$select": "msdyn_cardnumber"}
    assert patch.headers["content-type"] == "application/json"
    assert "if-none-match" not in patch.headers and "if-match" not in patch.headers
    await client.aclose()


async def test_caller_object_id_per_client_and_per_call() -> None:
    fake = FakeDataverse(lambda seen: JSONResponse({"UserId": "u"}))
    client = fake.client(caller_object_id="11111111-1111-1111-1111-111111111111")
    await client.who_am_i()
    agent = client.as_caller("22222222-2222-2222-2222-222222222222")
    await agent.who_am_i()
    await agent.aclose()  # a view: the shared pool stays open
    await client.as_caller(None).who_am_i()
    await client.who_am_i()
    assert [s.headers.get("callerobjectid") for s in fake.seen] == [
        "11111111-1111-1111-1111-111111111111",
        "22222222-2222-2222-2222-222222222222",
        None,
        "11111111-1111-1111-1111-111111111111",
    ]
    assert all(s.path == "WhoAmI" for s in fake.seen)
    await client.aclose()


# Keys ------------------------------------------------------------------------------------------

HOSTILE = ["') or true or ('", "O'Brien", "..", "Ünïcødé €", "a b#c", "semi;colon=1,x", "'", "''", "(x)", "C-1"]


@pytest.mark.parametrize("value", HOSTILE)
async def test_hostile_key_values_arrive_exactly(value: str) -> None:
    fake = FakeDataverse(lambda seen: JSONResponse({"ok": 1}))
    client = fake.client()
    assert not needs_filter({"msdyn_cardnumber": value})
    await client.get_by_key(CARDS, {"msdyn_cardnumber": value})
    await client.upsert(CARDS, {"msdyn_cardnumber": value, "msdyn_seq": 7}, {"msdyn_partynumber": "P"})
    await client.delete_by_key(CARDS, {"msdyn_cardnumber": value})
    for seen in fake.seen:
        assert seen.query == {}
        entity_set, key = parse_key(seen.path)
        assert entity_set == CARDS
        assert key["msdyn_cardnumber"] == value
        # On the wire the value is percent-encoded: no raw space, quote inside, '#', ';' or non-ASCII.
        inside = seen.raw_path[seen.raw_path.index("='") + 2 : seen.raw_path.rindex("'")]
        inside = inside.split("',")[0]
        assert re.fullmatch(r"[A-Za-z0-9._~%-]*", inside), seen.raw_path
    assert parse_key(fake.seen[1].path)[1] == {"msdyn_cardnumber": value, "msdyn_seq": 7}
    await client.aclose()


@pytest.mark.parametrize("value", ["a/b", "%2F", "a&b", "x:y", "a+b", "c*", "back\\slash", "<tag>", "q?"])
def test_key_predicate_encodes_even_the_characters_keys_cannot_carry(value: str) -> None:
    predicate = key_predicate({"msdyn_cardnumber": value})
    assert "/" not in predicate and "&" not in predicate and "?" not in predicate
    assert unquote(predicate) == "(msdyn_cardnumber='" + value.replace("'", "''") + "')"
    assert needs_filter({"msdyn_cardnumber": value})


def test_integer_keys_are_not_quoted_and_names_are_checked() -> None:
    assert key_predicate({"firstname": "Joe", "contactnumber": 1}) == "(firstname='Joe',contactnumber=1)"
    with pytest.raises(ValueError, match="identifier"):
        key_predicate({"name') or ('x": "v"})


UNSUPPORTED = ["a/b", "%2F", "a&b", "M&M's", "x:y", "a+b", "c*", "back\\slash", "<tag>", "q?"]


@pytest.mark.parametrize("value", UNSUPPORTED)
async def test_unsupported_key_characters_read_through_filter(value: str) -> None:
    fake = FakeDataverse(lambda seen: JSONResponse({"value": [{"msdyn_cardnumber": value, "x": 1}]}))
    client = fake.client()
    row = await client.get_by_key(CARDS, {"msdyn_cardnumber": value}, ["msdyn_cardnumber", "x"])
    assert row == {"msdyn_cardnumber": value, "x": 1}
    (seen,) = fake.seen
    assert seen.path == CARDS
    literal = "'" + value.replace("'", "''") + "'"
    assert seen.query == {"$select": "msdyn_cardnumber,x", "$filter": f"msdyn_cardnumber eq {literal}", "$top": "1"}
    assert "+" not in seen.raw_query.replace("%2B", "")  # a '+' must never reach the server raw
    await client.aclose()


async def test_filter_fallback_updates_by_id_when_found() -> None:
    def respond(seen: Seen) -> Response:
        if seen.method == "GET":
            return JSONResponse({"value": [{"msdyn_loyaltycardid": ROW_ID.upper()}]})
        return Response(status_code=204)

    fake = FakeDataverse(respond)
    client = fake.client()
    key = {"msdyn_cardnumber": "A/B&C"}
    row_id = await client.upsert(CARDS, key, {"msdyn_partynumber": "P"}, id_column="msdyn_loyaltycardid")
    assert row_id == ROW_ID
    lookup, patch = fake.seen
    assert lookup.query["$filter"] == "msdyn_cardnumber eq 'A/B&C'"
    assert lookup.query["$select"] == "msdyn_loyaltycardid"
    assert (patch.method, patch.path) == ("PATCH", f"{CARDS}({ROW_ID})")
    assert patch.headers["if-match"] == "*"  # never resurrect a row deleted in between
    assert patch.body == {"msdyn_partynumber": "P"}
    await client.aclose()


async def test_filter_fallback_creates_with_post_when_missing() -> None:
    fake = FakeDataverse(lambda seen: JSONResponse({"value": []}) if seen.method == "GET" else created())
    client = fake.client()
    key = {"msdyn_cardnumber": "A/B"}
    assert await client.upsert(CARDS, key, {"msdyn_partynumber": "P"}, id_column="msdyn_loyaltycardid") == ROW_ID
    _, post = fake.seen
    assert (post.method, post.path) == ("POST", CARDS)
    assert post.body == {"msdyn_partynumber": "P", "msdyn_cardnumber": "A/B"}
    await client.aclose()


async def test_filter_fallback_respects_create_and_update_modes() -> None:
    found = FakeDataverse(lambda seen: JSONResponse({"value": [{"msdyn_loyaltycardid": ROW_ID}]}))
    client = found.client()
    with pytest.raises(TargetError) as caught:
        await client.upsert(CARDS, {"msdyn_cardnumber": "a:b"}, {}, mode="create", id_column="msdyn_loyaltycardid")
    assert caught.value.status == 412
    assert [s.method for s in found.seen] == ["GET"]

    missing = FakeDataverse(lambda seen: JSONResponse({"value": []}))
    client = missing.client()
    with pytest.raises(TargetError) as caught:
        await client.upsert(CARDS, {"msdyn_cardnumber": "a:b"}, {}, mode="update", id_column="msdyn_loyaltycardid")
    assert caught.value.not_found
    assert [s.method for s in missing.seen] == ["GET"]
    assert await client.delete_by_key(CARDS, {"msdyn_cardnumber": "a:b"}, id_column="msdyn_loyaltycardid") is False


async def test_filter_fallback_needs_the_id_column() -> None:
    fake = FakeDataverse()
    client = fake.client()
    with pytest.raises(ValueError, match="id_column"):
        await client.upsert(CARDS, {"msdyn_cardnumber": "a/b"}, {})
    with pytest.raises(ValueError, match="id_column"):
        await client.delete_by_key(CARDS, {"msdyn_cardnumber": "a/b"})
    assert fake.seen == []


async def test_find_id_and_delete_through_filter() -> None:
    def respond(seen: Seen) -> Response:
        if seen.method == "GET":
            return JSONResponse({"value": [{"msdyn_loyaltycardid": ROW_ID}]})
        return Response(status_code=204)

    fake = FakeDataverse(respond)
    client = fake.client()
    assert await client.find_id(CARDS, "msdyn_loyaltycardid", {"msdyn_cardnumber": "O'Brien"}) == ROW_ID
    assert fake.seen[0].query["$filter"] == "msdyn_cardnumber eq 'O''Brien'"
    assert await client.delete_by_key(CARDS, {"msdyn_cardnumber": "x%y"}, id_column="msdyn_loyaltycardid")
    assert (fake.seen[-1].method, fake.seen[-1].path) == ("DELETE", f"{CARDS}({ROW_ID})")


# Upsert modes ----------------------------------------------------------------------------------


async def test_upsert_modes_send_their_conditions_and_map_answers() -> None:
    def respond(seen: Seen) -> Response:
        if seen.headers.get("if-none-match") == "*":
            return error(412, "", "A record with matching key values already exists.")
        if seen.headers.get("if-match") == "*":
            return error(
                404, "0x80060891", "A record with the specified key values does not exist in msdyn_loyaltycard entity"
            )
        return created()

    fake = FakeDataverse(respond)
    client = fake.client()
    key = {"msdyn_cardnumber": "C-1"}
    assert await client.upsert(CARDS, key, {"a": 1}) == ROW_ID
    with pytest.raises(TargetError) as exists:
        await client.upsert(CARDS, key, {"a": 1}, mode="create")
    with pytest.raises(TargetError) as missing:
        await client.upsert(CARDS, key, {"a": 1}, mode="update")
    assert (exists.value.status, exists.value.message) == (412, "A record with matching key values already exists.")
    assert (missing.value.status, missing.value.code) == (404, "0x80060891")
    conditions = [(s.headers.get("if-match"), s.headers.get("if-none-match")) for s in fake.seen]
    assert conditions == [(None, None), (None, "*"), ("*", None)]
    assert all(s.method == "PATCH" and s.path == f"{CARDS}(msdyn_cardnumber='C-1')" for s in fake.seen)


async def test_upsert_without_entity_id_header_returns_none() -> None:
    fake = FakeDataverse(lambda seen: Response(status_code=204))
    client = fake.client()
    assert await client.upsert(CARDS, {"msdyn_cardnumber": "C-1"}, {"a": 1}) is None


async def test_update_by_id_with_an_etag() -> None:
    fake = FakeDataverse(
        lambda seen: error(
            412, "", "The version of the existing record doesn't match the RowVersion property provided."
        )
    )
    client = fake.client()
    with pytest.raises(TargetError) as caught:
        await client.update_by_id(CARDS, ROW_ID, {"a": 1}, if_match='W/"470867"')
    assert caught.value.status == 412
    assert fake.seen[0].headers["if-match"] == 'W/"470867"'
    with pytest.raises(ValueError, match="GUID"):
        await client.update_by_id(CARDS, "not-a-guid) or (1", {"a": 1})


# Reads and deletes -----------------------------------------------------------------------------


async def test_get_and_delete_map_404_to_none_and_false() -> None:
    fake = FakeDataverse(lambda seen: error(404, "0x80040217", "msdyn_loyaltycard With Id = x Does Not Exist"))
    client = fake.client()
    assert await client.get_by_key(CARDS, {"msdyn_cardnumber": "C-9"}) is None
    assert await client.get_by_id(CARDS, ROW_ID, ["msdyn_cardnumber"]) is None
    assert await client.delete_by_key(CARDS, {"msdyn_cardnumber": "C-9"}) is False
    assert await client.delete_by_id(CARDS, ROW_ID) is False
    assert fake.seen[1].path == f"{CARDS}({ROW_ID})"


async def test_an_unknown_entity_set_is_an_error_not_a_missing_row() -> None:
    fake = FakeDataverse(lambda seen: error(404, "0x8006088a", "Resource not found for the segment 'msdyn_cards'."))
    client = fake.client()
    with pytest.raises(TargetError) as caught:
        await client.get_by_key("msdyn_cards", {"msdyn_cardnumber": "C-1"})
    assert caught.value.code == "0x8006088a"
    with pytest.raises(TargetError):
        await client.delete_by_key("msdyn_cards", {"msdyn_cardnumber": "C-1"})


async def test_get_and_delete_found() -> None:
    fake = FakeDataverse(
        lambda seen: (
            JSONResponse({"msdyn_loyaltycardid": ROW_ID}) if seen.method == "GET" else Response(status_code=204)
        )
    )
    client = fake.client()
    assert await client.get_by_id(CARDS, ROW_ID) == {"msdyn_loyaltycardid": ROW_ID}
    assert await client.delete_by_id(CARDS, ROW_ID) is True
    assert await client.delete_by_key(CARDS, {"msdyn_cardnumber": "C-1"}) is True


# Paging ----------------------------------------------------------------------------------------


async def test_query_follows_next_link_unchanged_until_none() -> None:
    cookie = '<cookie pagenumber="2" pagingcookie="%3ccookie%20page%3d%221%22%3e" istracking="False" />'
    links: list[str] = []

    def respond(seen: Seen) -> Response:
        page = int(seen.query.get("page", "1"))
        body: dict[str, Any] = {"value": [{"msdyn_cardnumber": f"C-{page}-{i}"} for i in range(2)]}
        if page < 3:
            link = f"{ROOT}{API}{CARDS}?$select=msdyn_cardnumber&page={page + 1}&$skiptoken={quote(cookie, safe='')}"
            links.append(link)
            body["@odata.nextLink"] = link
        return JSONResponse(body)

    fake = FakeDataverse(respond)
    client = fake.client()
    pages = [
        page
        async for page in client.query(
            CARDS, select=["msdyn_cardnumber"], filter="statecode eq 0", orderby=["msdyn_cardnumber asc"], page_size=2
        )
    ]
    assert [len(p) for p in pages] == [2, 2, 2]
    assert pages[2][0] == {"msdyn_cardnumber": "C-3-0"}
    first, second, third = fake.seen
    assert first.query == {
        "$select": "msdyn_cardnumber",
        "$filter": "statecode eq 0",
        "$orderby": "msdyn_cardnumber asc",
    }
    assert second.raw_query == links[0].split("?", 1)[1]  # the link exactly as given
    assert third.raw_query == links[1].split("?", 1)[1]
    assert second.query["$skiptoken"] == cookie
    assert all(s.headers["prefer"] == "odata.maxpagesize=2" for s in fake.seen)
    assert all(s.headers["if-none-match"] == "null" for s in fake.seen)


async def test_query_page_size_is_capped_at_5000_and_empty_results_yield_nothing() -> None:
    fake = FakeDataverse(lambda seen: JSONResponse({"value": []}))
    client = fake.client(page_size=20000)
    assert [p async for p in client.query(CARDS, select=["a"])] == []
    assert fake.seen[0].headers["prefer"] == "odata.maxpagesize=5000"


async def test_a_next_link_to_another_host_is_not_followed() -> None:
    fake = FakeDataverse(lambda seen: JSONResponse({"value": [{"a": 1}], "@odata.nextLink": "https://evil.test/x"}))
    client = fake.client()
    with pytest.raises(ValueError, match="another host"):
        async for _ in client.query(CARDS, select=["a"]):
            pass
    assert len(fake.seen) == 1


# Bulk and WhoAmI -------------------------------------------------------------------------------


async def test_upsert_multiple_sends_typed_targets_by_alternate_key() -> None:
    def respond(seen: Seen) -> Response:
        if seen.method == "GET":
            return JSONResponse({"value": []})
        if seen.method == "POST" and seen.path == CARDS:
            return created()
        return Response(status_code=204)

    fake = FakeDataverse(respond)
    client = fake.client()
    rows = [({"msdyn_cardnumber": f"C-{i}"}, {"msdyn_partynumber": f"P{i}"}) for i in range(5)]
    rows.append(({"msdyn_cardnumber": "odd/one"}, {"msdyn_partynumber": "P9"}))
    await client.upsert_multiple(CARDS, "msdyn_loyaltycard", rows, id_column="msdyn_loyaltycardid", chunk_size=2)
    bulk = [s for s in fake.seen if s.path.endswith("UpsertMultiple")]
    assert [len(s.body["Targets"]) for s in bulk] == [2, 2, 1]
    assert all(s.path == f"{CARDS}/Microsoft.Dynamics.CRM.UpsertMultiple" for s in bulk)
    first = bulk[0].body["Targets"][0]
    assert first == {
        "msdyn_partynumber": "P0",
        "msdyn_cardnumber": "C-0",
        "@odata.type": "Microsoft.Dynamics.CRM.msdyn_loyaltycard",
        "@odata.id": f"{CARDS}(msdyn_cardnumber='C-0')",
    }
    # The key the URL cannot carry went through $filter and POST.
    assert [(s.method, s.path) for s in fake.seen[-2:]] == [("GET", CARDS), ("POST", CARDS)]


async def test_create_multiple_returns_ids() -> None:
    ids = [str(uuid.uuid4()) for _ in range(3)]
    fake = FakeDataverse(lambda seen: JSONResponse({"Ids": ids}))
    client = fake.client()
    assert (
        await client.create_multiple(CARDS, "msdyn_loyaltycard", [{"msdyn_cardnumber": f"C{i}"} for i in range(3)])
        == ids
    )
    (seen,) = fake.seen
    assert seen.path == f"{CARDS}/Microsoft.Dynamics.CRM.CreateMultiple"
    assert all(t["@odata.type"] == "Microsoft.Dynamics.CRM.msdyn_loyaltycard" for t in seen.body["Targets"])
    assert await client.create_multiple(CARDS, "msdyn_loyaltycard", []) == []
    assert len(fake.seen) == 1


async def test_who_am_i() -> None:
    answer = {"BusinessUnitId": "b", "UserId": "u", "OrganizationId": "o"}
    fake = FakeDataverse(lambda seen: JSONResponse(answer))
    async with fake.client() as client:
        assert await client.who_am_i() == answer
    assert (fake.seen[0].method, fake.seen[0].path) == ("GET", "WhoAmI")
