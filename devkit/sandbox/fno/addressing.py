"""From a `/data/...` URL to what it addresses: an entity set, maybe a row key, maybe one property.

Keys follow F&O: `Set('C-1')` or `Set(CardNumber='C-1')` for a one-field key,
`Set(dataAreaId='usmf',Key='A')` for a company-specific entity (every key
field must be given), quotes doubled inside values, URL-encoded characters
decoded before parsing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from devkit.sandbox.fno.errors import FnoError, bad_query, no_resource
from devkit.sandbox.fno.schema import EntityDef
from devkit.sandbox.odata import ODataSyntaxError, parse_key_predicate, split_entity_path

COUNT_SEGMENT = "$count"


@dataclass(frozen=True)
class Address:
    """What a resource path names."""

    entity: EntityDef
    key: tuple[Any, ...] | None  # values in `entity.keys` order
    property: str | None  # a single property of the row, or "$count" on the collection


def _key_values(entity: EntityDef, predicate: str) -> tuple[Any, ...]:
    try:
        pairs = parse_key_predicate(predicate)
    except ODataSyntaxError as exc:
        raise bad_query(f"Bad key predicate '({predicate})': {exc.message}") from None
    return key_values(entity, pairs)


def key_values(entity: EntityDef, pairs: Sequence[tuple[str | None, Any]]) -> tuple[Any, ...]:
    """The key values of a parsed key predicate in `entity.keys` order; FnoError as F&O refuses a bad key."""
    keys = entity.keys
    if len(pairs) != len(keys):
        raise bad_query(
            f"The number of keys specified in the URI does not match number of key properties for the "
            f"resource '{entity.full_type}'."
        )
    if len(pairs) == 1 and pairs[0][0] is None:
        pairs = [(keys[0], pairs[0][1])]
    values: dict[str, Any] = {}
    for name, value in pairs:
        if name is None or name not in keys or name in values:
            raise bad_query(
                f"The key in the request URI is not valid for resource '{entity.full_type}'. "
                f"Ensure that the names and number of key values match the declared keys ({', '.join(keys)})."
            )
        prop = entity.by_name[name]
        if prop.kind == "string" and not isinstance(value, str):
            raise bad_query(f"The key value for '{name}' must be a quoted string literal.")
        if prop.kind in ("int32", "int64") and (not isinstance(value, int) or isinstance(value, bool)):
            raise bad_query(f"The key value for '{name}' must be an integer literal.")
        values[name] = value
    return tuple(values[k] for k in keys)


def resolve(path: str, entities: dict[str, EntityDef], url: str) -> Address:
    """Parse the part of the path after `/data/`; raises FnoError (404 for an unknown entity set)."""
    try:
        entity_set, key_text, prop = split_entity_path(path)
    except ODataSyntaxError as exc:
        raise bad_query(exc.message) from None
    entity = entities.get(entity_set)
    if entity is None:
        raise no_resource(url)
    key = _key_values(entity, key_text) if key_text is not None else None
    if prop is not None:
        if prop == COUNT_SEGMENT and key is None:
            return Address(entity, None, prop)
        if key is None or prop not in entity.by_name:
            raise FnoError(
                400,
                f"The request URI is not valid. Could not find a property named '{prop}' on type "
                f"'{entity.full_type}'.",
            )
    return Address(entity, key, prop)


def resource_path(raw_path: bytes, root: str) -> str:
    """The URL-decoded path below the service root (`/data/`)."""
    text = unquote(raw_path.decode("latin-1"))
    if text == root.rstrip("/"):
        return ""
    return text[len(root) :] if text.startswith(root) else text
