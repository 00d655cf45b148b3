"""Collection reads: `$select`, `$orderby`, `$top`, `$skip`, `$count` and server-driven paging.

(`$filter` is F&O's own dialect: see `filters.py`.) Pages hold at most
`max_page_size` rows (10,000 on the real service); the next page is an
`@odata.nextLink` carrying `$skiptoken`, the number of rows already served.
Rows stay stored tuples until the page is cut, so paging deep into a
million-row table only walks tuples.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any

from devkit.sandbox.fno.errors import bad_query
from devkit.sandbox.fno.filters import Predicate, Row, parse_filter_for, unknown_property
from devkit.sandbox.fno.schema import EntityDef
from devkit.sandbox.odata import Expr, ODataSyntaxError, parse_orderby, parse_select

SKIPTOKEN = "$skiptoken"
KNOWN_OPTIONS = frozenset({"$filter", "$select", "$orderby", "$top", "$skip", "$count", SKIPTOKEN, "$format"})
_MAXPAGESIZE = re.compile(r"odata\.maxpagesize\s*=\s*(\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class Query:
    """The parsed query options of one collection request."""

    filter: Expr | None = None
    select: tuple[str, ...] | None = None
    orderby: tuple[tuple[str, bool], ...] = ()
    top: int | None = None
    skip: int = 0
    count: bool = False
    skiptoken: int = 0
    cross_company: bool = False


@dataclass(frozen=True)
class Page:
    """One page of a collection read: stored row tuples, the total when counted, the next skiptoken."""

    rows: list[Row]
    total: int | None  # @odata.count when $count=true
    next_skiptoken: int | None  # None on the last page


def _non_negative(name: str, raw: str) -> int:
    if not raw.isdigit():
        raise bad_query(f"Invalid value '{raw}' for {name} query option found. "
                        f"The {name} query option requires a non-negative integer value.")
    return int(raw)


def parse_query(entity: EntityDef, params: Mapping[str, str]) -> Query:
    """Read the query options of a collection request; raises FnoError on anything F&O refuses."""
    for name in params:
        if name.startswith("$") and name not in KNOWN_OPTIONS:
            if name == "$expand":
                raise bad_query(f"Could not find a navigation property named '{params[name]}' on type "
                                f"'{entity.full_type}'.")
            raise bad_query(f"The query parameter '{name}' is not supported.")
    select: tuple[str, ...] | None = None
    orderby: tuple[tuple[str, bool], ...] = ()
    try:
        if "$select" in params:
            items = parse_select(params["$select"])
            for item in items:
                if item != "*" and item not in entity.by_name:
                    raise unknown_property(entity, item)
            select = None if "*" in items else tuple(items)
        if "$orderby" in params:
            orderby = tuple(parse_orderby(params["$orderby"]))
            for name, _ in orderby:
                if name not in entity.by_name:
                    raise unknown_property(entity, name)
    except ODataSyntaxError as exc:
        raise bad_query(exc.message) from None
    count_text = params.get("$count", "false").lower()
    if count_text not in ("true", "false"):
        raise bad_query(f"'{params['$count']}' is not a valid count option.")
    return Query(
        filter=parse_filter_for(entity, params["$filter"]) if "$filter" in params else None,
        select=select,
        orderby=orderby,
        top=_non_negative("$top", params["$top"]) if "$top" in params else None,
        skip=_non_negative("$skip", params["$skip"]) if "$skip" in params else 0,
        count=count_text == "true",
        skiptoken=_non_negative(SKIPTOKEN, params[SKIPTOKEN]) if SKIPTOKEN in params else 0,
        cross_company=params.get("cross-company", "").lower() == "true",
    )


def page_size(prefer: str | None, max_page_size: int) -> int:
    """The page size: `Prefer: odata.maxpagesize=N` when smaller than the service maximum."""
    found = _MAXPAGESIZE.search(prefer or "")
    if found and int(found.group(1)) > 0:
        return min(int(found.group(1)), max_page_size)
    return max_page_size


def _sort_by(position: int) -> Callable[[Row], tuple[int, Any]]:
    # Strings sort case-insensitively, like F&O's SQL collation.
    def key(row: Row) -> tuple[int, Any]:
        value = row[position]
        return (0, value.casefold()) if isinstance(value, str) else (0, value)

    return key


def run_query(rows: Iterator[Row], columns: tuple[str, ...], query: Query, accept: Predicate | None,
              size: int) -> Page:
    """Filter (with `accept`), order, count and cut one page out of `rows` (in insertion order)."""
    selected: Iterator[Row] = rows if accept is None else filter(accept, rows)
    total: int | None = None
    if query.orderby or query.count:
        materialised = list(selected)
        total = len(materialised) if query.count else None
        for name, descending in reversed(query.orderby):
            materialised.sort(key=_sort_by(columns.index(name)), reverse=descending)
        selected = iter(materialised)
    start = query.skip + query.skiptoken
    wanted = size if query.top is None else max(0, min(size, query.top - query.skiptoken))
    chunk = list(islice(selected, start, start + wanted + 1))
    has_more = len(chunk) > wanted
    chunk = chunk[:wanted]
    delivered = query.skiptoken + len(chunk)
    within_top = query.top is None or delivered < query.top
    return Page(chunk, total, delivered if has_more and within_top else None)
