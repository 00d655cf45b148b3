"""OData query syntax: $filter parsing and evaluation, key predicates, entity paths, $select, $orderby."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devkit.sandbox.odata import (
    BoolOp,
    Compare,
    InList,
    Literal,
    ODataSyntaxError,
    Property,
    evaluate,
    format_key_predicate,
    format_literal,
    parse_filter,
    parse_key_predicate,
    parse_orderby,
    parse_select,
    properties,
    split_entity_path,
)

HOSTILE = [
    "O'Bryan",
    "') or true or ('",
    "a/b\\c",
    "''",
    "'",
    "(x)",
    "a)(b",
    "ünïcødé ✓ 中文",
    "M&M + 50% : ?",
    " leading and trailing ",
    "eq",
    "x' eq 'x",
    "",
]


def dv(text: str, row: dict[str, Any], **kw: Any) -> bool:
    return evaluate(parse_filter(text), row, case_insensitive=True, wildcard=False, **kw)


def fo(text: str, row: dict[str, Any]) -> bool:
    return evaluate(parse_filter(text), row, case_insensitive=False, wildcard=True)


# --- parsing ------------------------------------------------------------------------


def test_parse_comparisons_logic_and_grouping() -> None:
    expr = parse_filter("name eq 'O''Bryan' and (points gt 10 or not contains(name,'x'))")
    assert isinstance(expr, BoolOp) and expr.op == "and"
    assert expr.operands[0] == Compare("eq", Property(("name",)), Literal("O'Bryan", "string"))
    assert properties(expr) == {"name", "points"}


def test_parse_literals_of_every_kind() -> None:
    assert parse_filter("a eq 5").right == Literal(5, "int")  # type: ignore[union-attr]
    assert parse_filter("a eq -2.5").right == Literal(-2.5, "decimal")  # type: ignore[union-attr]
    assert parse_filter("a eq true").right == Literal(True, "bool")  # type: ignore[union-attr]
    assert parse_filter("a eq null").right == Literal(None, "null")  # type: ignore[union-attr]
    guid = "0000000a-0000-0000-0000-00000000000B"
    assert parse_filter(f"a eq {guid}").right == Literal(guid, "guid")  # type: ignore[union-attr]
    when = parse_filter("a ge 2026-01-01T10:30:00Z").right  # type: ignore[union-attr]
    assert when == Literal(datetime(2026, 1, 1, 10, 30, tzinfo=UTC), "datetime")
    enum = parse_filter("Gender eq Microsoft.Dynamics.DataEntities.Gender'Unknown'").right  # type: ignore[union-attr]
    assert enum == Literal("Unknown", "enum", "Microsoft.Dynamics.DataEntities.Gender")


def test_parse_navigation_path_and_crm_in() -> None:
    expr = parse_filter("sdkmessageid/name eq 'Update' and primaryobjecttypecode eq 'contact'")
    assert properties(expr) == {"sdkmessageid", "primaryobjecttypecode"}
    in_expr = parse_filter("Microsoft.Dynamics.CRM.In(PropertyName='name',PropertyValues=[\"a\",\"b\"])")
    assert in_expr == InList("name", ("a", "b"))
    assert properties(in_expr) == {"name"}


def test_long_or_chains_stay_flat() -> None:
    text = " or ".join(f"msdyn_cardnumber eq 'C-{i}'" for i in range(3000))
    expr = parse_filter(text)
    assert isinstance(expr, BoolOp) and len(expr.operands) == 3000
    assert dv(text, {"msdyn_cardnumber": "c-2999"})
    assert not dv(text, {"msdyn_cardnumber": "C-3000"})


@pytest.mark.parametrize(
    ("text", "message", "position"),
    [
        ("lastname eq 'O'Bryan'", "There is an unterminated literal at position 21 in 'lastname eq 'O'Bryan''.", 21),
        ("name eq 'abc", "There is an unterminated literal at position 12 in 'name eq 'abc'.", 12),
        ("", "Expression expected at position 0 in ''.", 0),
        ("name eq", "Expression expected at position 7 in 'name eq'.", 7),
        ("(a eq 1", "')' or operator expected at position 7 in '(a eq 1'.", 7),
        ("a eq 1 b", "Syntax error at position 7 in 'a eq 1 b'.", 7),
        ("a eq #", "Syntax error: character '#' is not valid at position 5 in 'a eq #'.", 5),
        ("a eq @p1", "Syntax error: character '@' is not valid at position 5 in 'a eq @p1'.", 5),
        ("foo(a) eq 1", "An unknown function with name 'foo' was found at position 0 in 'foo(a) eq 1'.", 0),
    ],
)
def test_syntax_errors_carry_position_and_service_message(text: str, message: str, position: int) -> None:
    with pytest.raises(ODataSyntaxError) as info:
        parse_filter(text)
    assert info.value.message == message
    assert info.value.position == position


def test_deep_nesting_is_a_syntax_error_not_a_crash() -> None:
    with pytest.raises(ODataSyntaxError, match="recursion depth"):
        parse_filter("(" * 5000 + "a eq 1" + ")" * 5000)
    with pytest.raises(ODataSyntaxError, match="recursion depth"):
        parse_filter("not " * 5000 + "a")
    with pytest.raises(ODataSyntaxError, match="recursion depth"):
        parse_filter("a" + " add 1" * 5000 + " eq 1")


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=60))
def test_parse_filter_raises_only_syntax_errors_on_random_text(text: str) -> None:
    try:
        parse_filter(text)
    except ODataSyntaxError as exc:
        assert exc.position is None or 0 <= exc.position <= len(text)


FILTER_ALPHABET = st.sampled_from(
    ["a", "eq", "ne", "gt", "and", "or", "not", "(", ")", "'", "''", "x", "1", "-", ".", ",", "/", " ", "[",
     "]", '"', "=", "contains", "Microsoft.Dynamics.CRM.In", "PropertyName", "2026-01-01", "T00:00:00Z",
     "Microsoft.Dynamics.DataEntities.NoYes", "null", "true", "add", "00000000-0000-0000-0000-000000000001"]
)


@settings(max_examples=600, deadline=None)
@given(st.lists(FILTER_ALPHABET, max_size=25).map("".join))
def test_parse_filter_raises_only_syntax_errors_on_near_miss_text(text: str) -> None:
    try:
        expr = parse_filter(text)
    except ODataSyntaxError:
        return
    # Whatever parses must evaluate without raising, in both dialects.
    row = {"a": "x", "x": 1}
    evaluate(expr, row, case_insensitive=True, wildcard=False)
    evaluate(expr, row, case_insensitive=False, wildcard=True)


# --- evaluation ---------------------------------------------------------------------


def test_dataverse_strings_compare_case_insensitively() -> None:
    row = {"lastname": "O'Bryan", "points": 20}
    assert dv("lastname eq 'o''bryan'", row)
    assert dv("startswith(lastname,'o''b') and endswith(lastname,'AN')", row)
    assert dv("contains(lastname,'bry')", row)
    assert not evaluate(
        parse_filter("lastname eq 'o''bryan'"), row, case_insensitive=False, wildcard=False
    )


def test_fo_wildcards_only_with_the_flag() -> None:
    row = {"Name": "Contoso retail east"}
    assert fo("Name eq '*retail*'", row)
    assert not fo("Name eq '*RETAIL*'", row)  # case follows the flag
    assert fo("Name ne '*wholesale*'", row)
    assert not dv("Name eq '*retail*'", row)
    assert fo("Name eq 'Contoso*'", row) and not fo("Name eq 'retail*'", row)
    assert fo("Name eq 'a.c*'", {"Name": "a.cb"}) and not fo("Name eq 'a.c*'", {"Name": "abcd"})


def test_nulls_numbers_and_mismatched_types() -> None:
    assert dv("missing eq null", {})
    assert not dv("missing ne null", {})
    assert not dv("points gt 5", {"points": None})
    assert dv("points ge 5 and points lt 5.5", {"points": 5})
    assert not dv("name gt 5", {"name": "abc"})  # unlike types never compare
    assert dv("active eq true and not (active eq false)", {"active": True})
    assert not dv("active eq 1", {"active": True})
    assert dv("Points add 10 eq 30 and Points mod 7 eq 6", {"Points": 20})
    assert dv("Points div 0 eq null", {"Points": 20})


def test_dates_guids_enums() -> None:
    row = {
        "modifiedon": "2026-03-01T12:00:00Z",
        "birth": "1990-05-17",
        "_owner_value": "ABCDEF00-0000-0000-0000-000000000001",
    }
    assert dv("modifiedon gt 2026-03-01T11:59:59Z and modifiedon lt 2026-03-01T13:00:01+01:00", row)
    assert not dv("modifiedon lt 2026-03-01T13:00:00+01:00", row)  # the same instant
    assert dv("birth eq 1990-05-17 and modifiedon ge 2026-03-01", row)
    assert evaluate(
        parse_filter("_owner_value eq abcdef00-0000-0000-0000-000000000001"),
        row,
        case_insensitive=False,
        wildcard=False,
    )
    assert fo("IsActive eq Microsoft.Dynamics.DataEntities.NoYes'Yes'", {"IsActive": "Yes"})
    assert not fo("IsActive eq Microsoft.Dynamics.DataEntities.NoYes'Yes'", {"IsActive": "No"})


def test_navigation_paths_use_resolver_or_nested_rows() -> None:
    text = "sdkmessageid/name eq 'Update'"
    seen: list[list[str]] = []

    def resolve(row: Any, path: list[str]) -> Any:
        seen.append(path)
        return {"m1": "Update"}.get(row["_sdkmessageid_value"])

    assert dv(text, {"_sdkmessageid_value": "m1"}, resolve=resolve)
    assert seen == [["sdkmessageid", "name"]]
    assert dv(text, {"sdkmessageid": {"name": "update"}})
    assert not dv(text, {"sdkmessageid": "not a mapping"})


def test_crm_in_and_not_in() -> None:
    text = "Microsoft.Dynamics.CRM.In(PropertyName='code',PropertyValues=[\"A\",\"b\"])"
    assert dv(text, {"code": "a"})
    assert not dv(text, {"code": "c"})
    assert dv(text.replace(".In(", ".NotIn("), {"code": "c"})
    with pytest.raises(ODataSyntaxError):
        parse_filter("Microsoft.Dynamics.CRM.In(PropertyName='code')")


# --- key predicates and paths -------------------------------------------------------


def test_key_predicate_forms() -> None:
    guid = "00000000-0000-0000-0000-000000000001"
    assert parse_key_predicate("'C-1'") == [(None, "C-1")]
    assert parse_key_predicate("msdyn_cardnumber='O''B'") == [("msdyn_cardnumber", "O'B")]
    assert parse_key_predicate(guid) == [(None, guid)]
    assert parse_key_predicate(f"accountid={guid}") == [("accountid", guid)]
    assert parse_key_predicate("dataAreaId='usmf',CardNumber='X'") == [("dataAreaId", "usmf"), ("CardNumber", "X")]
    assert parse_key_predicate("firstname='Joe',contactnumber=1") == [("firstname", "Joe"), ("contactnumber", 1)]


@pytest.mark.parametrize(
    "text",
    ["", "name=", "='x'", "name='a',", "name='a' other='b'", "name=@p1", "a='x',a='y'", "'a','b'", "name=true",
     "name='unterminated", "x.y='a'", "name=1.5"],
)
def test_bad_key_predicates_raise(text: str) -> None:
    with pytest.raises(ODataSyntaxError):
        parse_key_predicate(text)


@pytest.mark.parametrize("value", HOSTILE)
def test_key_predicate_round_trips_hostile_values(value: str) -> None:
    assert parse_key_predicate(format_key_predicate([(None, value)])) == [(None, value)]
    pairs: list[tuple[str | None, str | int | uuid.UUID]] = [("dataAreaId", value), ("CardNumber", value + "'")]
    assert parse_key_predicate(format_key_predicate(pairs)) == pairs
    name, key, prop = split_entity_path(f"msdyn_loyaltycards({format_key_predicate([('n', value)])})/msdyn_x")
    assert (name, prop) == ("msdyn_loyaltycards", "msdyn_x")
    assert parse_key_predicate(key or "") == [("n", value)]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40), st.integers(min_value=-(2**63), max_value=2**63))
def test_key_predicate_round_trips_any_text(value: str, number: int) -> None:
    pairs: list[tuple[str | None, str | int | uuid.UUID]] = [("a", value), ("b", number)]
    assert parse_key_predicate(format_key_predicate(pairs)) == pairs
    name, key, prop = split_entity_path(f"set({format_key_predicate(pairs)})")
    assert (name, prop) == ("set", None)
    assert parse_key_predicate(key or "") == pairs


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_key_predicate_and_split_raise_only_syntax_errors(text: str) -> None:
    for parse in (parse_key_predicate, split_entity_path):
        try:
            parse(text)
        except ODataSyntaxError:
            pass


def test_guid_literal_formats_bare() -> None:
    guid = uuid.UUID(int=7)
    assert format_literal(guid) == "00000000-0000-0000-0000-000000000007"
    assert format_key_predicate([(None, guid)]) == "00000000-0000-0000-0000-000000000007"
    assert format_literal(None) == "null" and format_literal(False) == "false" and format_literal(3) == "3"


def test_split_entity_path() -> None:
    assert split_entity_path("accounts") == ("accounts", None, None)
    assert split_entity_path("/accounts/$count") == ("accounts", None, "$count")
    assert split_entity_path("WhoAmI()") == ("WhoAmI", "", None)
    assert split_entity_path("serviceendpoints(x)/a/b") == ("serviceendpoints", "x", "a/b")
    assert split_entity_path("c(n='a)/(b''c')/p") == ("c", "n='a)/(b''c'", "p")
    for bad in ["c(n='a)", "c(n='a'", "(x)", "c(a)b"]:
        with pytest.raises(ODataSyntaxError):
            split_entity_path(bad)


def test_select_and_orderby() -> None:
    assert parse_select("name, msdyn_points ,_owner_value") == ["name", "msdyn_points", "_owner_value"]
    assert parse_orderby("name desc, createdon asc,points") == [("name", True), ("createdon", False), ("points", False)]
    for bad in ["", "a,,b", "a b", "a-b"]:
        with pytest.raises(ODataSyntaxError):
            parse_select(bad)
    for bad in ["", "a up", "a desc extra", ","]:
        with pytest.raises(ODataSyntaxError):
            parse_orderby(bad)
