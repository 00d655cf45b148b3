"""OData URL syntax shared by both clients: literals, key predicates and query strings.

Everything that puts a value into a URL goes through here, so quoting and
percent-encoding are decided once: string literals in single quotes with an
embedded `'` doubled, then every character outside the unreserved set
percent-encoded. Names (entity sets, columns, properties) are not escaped but
checked, so a value can never turn into syntax.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from urllib.parse import quote

KeyValue = str | int | uuid.UUID
Key = Mapping[str, KeyValue]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PARAM_NAME = re.compile(r"^\$?[A-Za-z_][A-Za-z0-9_-]*$")
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
# Query values keep OData punctuation readable; everything else (space, &, +, #, %, ;, ?, non-ASCII) is encoded.
_QUERY_SAFE = "$'(),/:*@=!"


def check_name(name: str) -> str:
    """`name` if it is a plain OData identifier (entity set, column, property); else ValueError."""
    if not _NAME.match(name):
        raise ValueError(f"not an OData identifier: {name!r}")
    return name


def is_guid(value: str) -> bool:
    """Whether `value` is a GUID in the 8-4-4-4-12 form Dataverse row ids use."""
    return bool(_GUID.match(value))


def literal(value: KeyValue) -> str:
    """An OData literal for `$filter`: 'text' with ' doubled, integers and GUIDs bare (not yet URL-encoded)."""
    if isinstance(value, bool):
        raise TypeError("booleans are not key values")
    if isinstance(value, int | uuid.UUID):
        return str(value)
    return "'" + value.replace("'", "''") + "'"


def _key_literal(value: KeyValue) -> str:
    """A literal for a key predicate: quoted as `literal`, the content percent-encoded."""
    if isinstance(value, str):
        return "'" + quote(value.replace("'", "''"), safe="") + "'"
    return literal(value)


def key_predicate(key: Key) -> str:
    """`(name='value',other=1)` for a key, in the mapping's order, values quoted and percent-encoded."""
    if not key:
        raise ValueError("a key needs at least one value")
    return "(" + ",".join(f"{check_name(name)}={_key_literal(value)}" for name, value in key.items()) + ")"


def id_predicate(row_id: str) -> str:
    """`(<guid>)` for a Dataverse primary key; ValueError when `row_id` is not a GUID."""
    if not is_guid(row_id):
        raise ValueError(f"not a row id (GUID): {row_id!r}")
    return f"({row_id})"


def eq_filter(key: Key) -> str:
    """`a eq 'x' and b eq 1`: a `$filter` expression that matches exactly `key`."""
    return " and ".join(f"{check_name(name)} eq {literal(value)}" for name, value in key.items())


def any_of_filter(column: str, values: Iterable[KeyValue]) -> str:
    """`c eq 'x' or c eq 'y'`: a `$filter` expression matching any of `values` in `column`."""
    check_name(column)
    return " or ".join(f"{column} eq {literal(v)}" for v in values)


def query_string(params: Mapping[str, str | int | None]) -> str:
    """`?$select=a,b&$filter=...` with values percent-encoded (`+` as %2B, space as %20); None skipped."""
    pairs = []
    for name, value in params.items():
        if value is None:
            continue
        if not _PARAM_NAME.match(name):
            raise ValueError(f"not a query option name: {name!r}")
        pairs.append(f"{name}={quote(str(value), safe=_QUERY_SAFE)}")
    return "?" + "&".join(pairs) if pairs else ""


def select_list(columns: Sequence[str] | None) -> str | None:
    """The `$select` value for `columns` (None when no selection is wanted)."""
    if not columns:
        return None
    return ",".join(check_name(c) for c in columns)


def orderby_list(orderby: str | Sequence[str] | None) -> str | None:
    """The `$orderby` value: a string as given, a sequence joined with commas."""
    if orderby is None or isinstance(orderby, str):
        return orderby
    return ",".join(orderby)
