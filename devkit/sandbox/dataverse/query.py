"""Collection queries: `$select`, `$filter`, `$orderby`, `$top`, `$count`, `$expand` and server paging.

Pages follow [D7]: at most 5000 rows (or `Prefer: odata.maxpagesize`), and an
`@odata.nextLink` that repeats the query with a `$skiptoken` paging cookie.
The cookie names a snapshot of the matching ids taken on the first page, so
following a nextLink (or retrying it) gives a stable sequence; when the
snapshot has been evicted the query is re-run and the page number used.
`$skip` is refused, as Dataverse does.
"""

from __future__ import annotations

import re
import secrets
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from devkit.sandbox.dataverse.errors import ODATA, DataverseError, bad_request, unknown_property
from devkit.sandbox.dataverse.org import Organization
from devkit.sandbox.dataverse.predicates import compile_filter
from devkit.sandbox.dataverse.prefer import MAX_PAGE_SIZE, Preferences
from devkit.sandbox.dataverse.rows import Expand, context_url, render_row, select_columns
from devkit.sandbox.dataverse.schema import STRING_TYPES, TableDef
from devkit.sandbox.odata import (
    Expr,
    ODataSyntaxError,
    evaluate,
    parse_filter,
    parse_orderby,
    parse_select,
    properties,
)

COUNT_CAP = 5000
SNAPSHOTS = 32
UNSUPPORTED = ("$skip", "$search", "$format")
# Real query forms the sandbox does not implement: refused, so a client never takes an unfiltered answer for theirs.
NOT_EMULATED = ("fetchXml", "sql", "savedQuery", "userQuery")
TOTAL = "Microsoft.Dynamics.CRM.totalrecordcount"
TOTAL_EXCEEDED = "Microsoft.Dynamics.CRM.totalrecordcountlimitexceeded"
_COOKIE = re.compile(r'pagenumber="(\d+)".*snapshot="([0-9a-f]+)"', re.DOTALL)


@dataclass
class Query:
    """A parsed collection query."""

    select: list[str] | None
    filter: Expr | None
    orderby: list[tuple[str, bool]]
    top: int | None
    count: bool
    expand: list[Expand]
    skiptoken: str | None


def _syntax(exc: ODataSyntaxError) -> DataverseError:
    return DataverseError(400, ODATA, exc.message)


def split_top_level(text: str, separator: str) -> list[str]:
    items: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        depth += (char == "(") - (char == ")")
        if char == separator and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    items.append("".join(current))
    return [i.strip() for i in items if i.strip()]


def parse_expand(definition: TableDef, text: str) -> list[Expand]:
    """`nav($select=a,b),nav2` for single-valued navigation properties (lookups)."""
    expands = []
    for item in split_top_level(text, ","):
        name, _, options = item.partition("(")
        column = definition.navigation.get(name.strip())
        if column is None:
            raise unknown_property(name.strip(), definition.logical_name)
        select = None
        for option in split_top_level(options.rstrip(")"), ";"):
            key, _, value = option.partition("=")
            if key.strip() != "$select":
                raise bad_request(f"The query option '{key.strip()}' is not supported inside $expand by the sandbox.")
            try:
                select = parse_select(value)
            except ODataSyntaxError as exc:
                raise _syntax(exc) from exc
        expands.append(Expand(column, select))
    if len(expands) > 15:
        raise bad_request("The number of $expand items exceeds the limit of 15.")
    return expands


def parse_query(definition: TableDef, params: Mapping[str, str]) -> Query:
    """Read and check the query options; unknown columns and refused options are 400s."""
    for option in UNSUPPORTED:
        if option in params:
            raise bad_request(f"The query parameter {option} is not supported")
    for option in NOT_EMULATED:
        if option in params:
            raise bad_request(f"The sandbox does not emulate '{option}' queries; use $select/$filter/$orderby.")
    try:
        select = parse_select(params["$select"]) if params.get("$select") else None
        expr = parse_filter(params["$filter"]) if params.get("$filter") else None
        orderby = parse_orderby(params["$orderby"]) if params.get("$orderby") else []
    except ODataSyntaxError as exc:
        raise _syntax(exc) from exc
    if select is not None:
        select_columns(definition, select)
    for name in sorted(properties(expr) if expr is not None else ()):
        if name not in definition.readable and name not in definition.navigation:
            raise unknown_property(name, definition.logical_name)
    for name, _ in orderby:
        if name not in definition.readable:
            raise unknown_property(name, definition.logical_name)
    top = params.get("$top")
    if top is not None and (not top.isdigit()):
        raise bad_request(
            f"Invalid value '{top}' for $top query option found. The $top query option requires a "
            "non-negative integer value."
        )
    count = params.get("$count", "false").lower()
    if count not in ("true", "false"):
        raise bad_request(f"'{count}' is not a valid count option.")
    expand = parse_expand(definition, params["$expand"]) if params.get("$expand") else []
    return Query(
        select, expr, orderby, int(top) if top is not None else None, count == "true", expand, params.get("$skiptoken")
    )


class Snapshots:
    """Recently computed result id lists, by cookie id (least recently used evicted)."""

    def __init__(self, size: int = SNAPSHOTS, new_key: Callable[[], str] = lambda: secrets.token_hex(8)) -> None:
        """`new_key` names a snapshot (hex digits; random by default, seeded in the simulator)."""
        self._items: OrderedDict[str, list[str]] = OrderedDict()
        self._size = size
        self._new_key = new_key

    def put(self, ids: list[str]) -> str:
        key = self._new_key()
        self._items[key] = ids
        while len(self._items) > self._size:
            self._items.popitem(last=False)
        return key

    def get(self, key: str) -> list[str] | None:
        ids = self._items.get(key)
        if ids is not None:
            self._items.move_to_end(key)
        return ids


def _resolver(org: Organization, definition: TableDef) -> Callable[[Mapping[str, Any], list[str]], Any]:
    def resolve(row: Mapping[str, Any], path: list[str]) -> Any:
        current_def = definition
        current: Mapping[str, Any] | None = row
        for i, segment in enumerate(path[:-1]):
            column = current_def.navigation.get(segment)
            if column is None or current is None:
                return None
            target_id = current.get(column.name if i else column.value_property)
            target_def = org.defs.get(column.target or "")
            if target_def is None or target_id is None:
                return None
            current_def, current = target_def, org.tables[target_def.logical_name].get(target_id)
        if current is None:
            return None
        last = current_def.readable.get(path[-1])
        return current.get(last.name) if last else None

    return resolve


def matching_ids(org: Organization, definition: TableDef, query: Query) -> list[str]:
    """Ids of the rows that pass `$filter`, in `$orderby` order (insertion order otherwise)."""
    table = org.tables[definition.logical_name]
    index = table.column_index
    id_pos = index[definition.primary_id]
    compiled = compile_filter(query.filter, definition, index) if query.filter is not None else None
    if query.filter is None:
        rows: list[tuple[Any, ...]] = list(table.scan_tuples())
    elif compiled is not None:
        rows = [row for row in table.scan_tuples() if compiled(row)]
    else:
        # Only the columns the filter reads are turned into a mapping, keyed by their Web API names.
        used = []
        for name in properties(query.filter):
            column = definition.readable.get(name) or definition.navigation.get(name)
            if column is not None:
                used.append((column.value_property, index[column.name]))
        expr, resolve = query.filter, _resolver(org, definition)
        rows = [
            row
            for row in table.scan_tuples()
            if evaluate(expr, {n: row[p] for n, p in used}, case_insensitive=True, wildcard=False, resolve=resolve)
        ]
    for name, descending in reversed(query.orderby):
        column = definition.readable[name]
        pos = index[column.name]
        fold = column.type in STRING_TYPES

        def key(row: tuple[Any, ...], pos: int = pos, fold: bool = fold) -> tuple[int, Any]:
            value = row[pos]
            # SQL Server sorts nulls first ascending; strings by a case-insensitive collation.
            return (0, "") if value is None else (1, value.casefold() if fold else value)

        rows.sort(key=key, reverse=descending)
    return [row[id_pos] for row in rows]


def _cookie(page: int, snapshot: str, first: str, last: str, id_column: str) -> str:
    inner = (
        f'<cookie page="{page - 1}" snapshot="{snapshot}"><{id_column} last="{{{last.upper()}}}" '
        f'first="{{{first.upper()}}}" /></cookie>'
    )
    return f'<cookie pagenumber="{page}" pagingcookie="{quote(inner, safe="")}" istracking="False" />'


def _next_link(org: Organization, definition: TableDef, params: Mapping[str, str], cookie: str) -> str:
    items = [f"{k}={quote(v, safe=chr(36) + ',()=/:@')}" for k, v in params.items() if k != "$skiptoken"]
    items.append(f"$skiptoken={quote(cookie, safe='')}")
    return f"{org.base_url}/{definition.entity_set}?{'&'.join(items)}"


def run(
    org: Organization,
    snapshots: Snapshots,
    definition: TableDef,
    params: Mapping[str, str],
    prefs: Preferences,
) -> tuple[dict[str, Any], int]:
    """Answer a collection GET: (JSON body, number of rows returned)."""
    query = parse_query(definition, params)
    page_size = prefs.max_page_size or MAX_PAGE_SIZE
    page = 1
    ids: list[str] | None = None
    snapshot = None
    if query.skiptoken:
        match = _COOKIE.search(unquote(unquote(query.skiptoken)))
        if match is None:
            raise bad_request("The $skiptoken is not a paging cookie this service issued.")
        page, snapshot = int(match.group(1)), match.group(2)
        ids = snapshots.get(snapshot)
    if ids is None:
        ids = matching_ids(org, definition, query)
        snapshot = None
    total = len(ids)
    if query.top is not None and prefs.max_page_size is None:
        ids = ids[: min(query.top, MAX_PAGE_SIZE)]
    start = (page - 1) * page_size
    chunk = ids[start : start + page_size]
    table = org.tables[definition.logical_name]
    columns = select_columns(definition, query.select)
    value = []
    for row_id in chunk:
        row = table.get(row_id)
        if row is not None:
            value.append(render_row(org, definition, row, columns, prefs, query.expand))
    body: dict[str, Any] = {"@odata.context": context_url(org, definition, query.select, entity=False)}
    if prefs.wants(TOTAL):
        body[f"@{TOTAL}"] = min(total, COUNT_CAP) if query.count else -1
    if prefs.wants(TOTAL_EXCEEDED):
        body[f"@{TOTAL_EXCEEDED}"] = total > COUNT_CAP
    if query.count:
        body["@odata.count"] = min(total, COUNT_CAP)
    body["value"] = value
    if start + page_size < len(ids):
        if snapshot is None:
            snapshot = snapshots.put(ids)
        cookie = _cookie(page + 1, snapshot, chunk[0], chunk[-1], definition.primary_id)
        body["@odata.nextLink"] = _next_link(org, definition, params, cookie)
    return body, len(value)


def count(org: Organization, definition: TableDef, params: Mapping[str, str]) -> int:
    """`GET <set>/$count`: the number of matching rows, capped at 5000 like `$count=true`."""
    query = parse_query(definition, params)
    return min(len(matching_ids(org, definition, query)), COUNT_CAP)
