"""Route templates (ASP.NET rules the host uses) and the key check behind authLevel."""

from __future__ import annotations

import pytest

from devkit.devhost.keys import HostKeys, authorized, load_keys, presented_key
from devkit.devhost.routes import parse_route

GUID = "6f1c2e1e-0d0a-4b8e-9c3e-2b1d4f5a6c7d"


@pytest.mark.parametrize(
    ("template", "path", "values"),
    [
        ("hooks/{source}", "hooks/d365", {"source": "d365"}),
        ("hooks/{source}", "HOOKS/D365", {"source": "D365"}),  # literal case-insensitive, value kept as sent
        ("hooks/{source}", "hooks/d365/extra", None),
        ("hooks/{source}", "hooks", None),
        ("files/{*path}", "files/a/b/c.json", {"path": "a/b/c.json"}),
        ("files/{*path}", "files", {}),  # a catch-all may be empty
        ("items/{id:int}", "items/-12", {"id": "-12"}),
        ("items/{id:int}", "items/12x", None),
        ("items/{id:int}", "items/99999999999", None),  # outside int32
        ("items/{id:long}", "items/99999999999", {"id": "99999999999"}),
        ("items/{id:guid}", f"items/{GUID}", {"id": GUID}),
        ("items/{id:guid}", "items/nope", None),
        ("items/{name:alpha:maxlength(3)}", "items/abc", {"name": "abc"}),
        ("items/{name:alpha:maxlength(3)}", "items/abcd", None),
        ("items/{n:range(1,5)}", "items/6", None),
        ("items/{id?}", "items", {}),
        ("items/{id?}", "items/7", {"id": "7"}),
        ("items/{page=1}", "items", {"page": "1"}),
        ("reports/{name}.{ext}", "reports/sales.2024.csv", {"name": "sales.2024", "ext": "csv"}),
        ("/{*route}", "anything/at/all", {"route": "anything/at/all"}),
        ("", "", {}),
    ],
)
def test_route_matching(template: str, path: str, values: dict[str, str] | None) -> None:
    assert parse_route(template).match(path) == values


def test_more_specific_routes_sort_first() -> None:
    templates = ["items/{*rest}", "items/{id}", "items/{id:int}", "items/new"]
    ordered = sorted((parse_route(template) for template in templates), key=lambda route: route.precedence)
    assert [route.template for route in ordered] == ["items/new", "items/{id:int}", "items/{id}", "items/{*rest}"]


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("a/{*rest}/b", "catch-all parameter must be the whole last segment"),
        ("a/{id?}/b", "optional parameter 'id' must be the whole last segment"),
        ("a/{id}/{id}", "appears twice"),
        ("a/{id:weird}", "unsupported route constraint 'weird'"),
        ("a//b", "empty segment"),
        ("a/{id", "unbalanced braces"),
    ],
)
def test_bad_routes_are_refused(template: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_route(template)


KEYS = HostKeys(function_key="f-key", admin_key="m-key", function_key_generated=False, admin_key_generated=False)


@pytest.mark.parametrize(
    ("level", "key", "allowed"),
    [
        ("ANONYMOUS", None, True),
        ("anonymous", "whatever", True),
        ("FUNCTION", None, False),
        ("FUNCTION", "wrong", False),
        ("FUNCTION", "f-key", True),
        ("FUNCTION", "m-key", True),
        ("ADMIN", "f-key", False),
        ("ADMIN", "m-key", True),
        ("ADMIN", None, False),
    ],
)
def test_auth_levels(level: str, key: str | None, allowed: bool) -> None:
    assert authorized(level, key, KEYS) is allowed


def test_header_key_wins_over_code_and_keys_come_from_settings() -> None:
    assert presented_key({"x-functions-key": "from-header"}, {"code": "from-query"}) == "from-header"
    assert presented_key({}, {"code": "from-query"}) == "from-query"
    assert presented_key({}, {}) is None
    loaded = load_keys({"DEV_FUNCTION_KEY": "fk", "DEV_ADMIN_KEY": "ak"})
    assert (loaded.function_key, loaded.admin_key, loaded.function_key_generated) == ("fk", "ak", False)
    given = load_keys({"DEV_FUNCTION_KEY": "fk"}, function_key="arg", admin_key=None)
    assert given.function_key == "arg" and given.admin_key_generated and len(given.admin_key) >= 32
