"""The metadata endpoints: `EntityDefinitions`, its navigation segments, casts, `$select`/`$filter`/`$expand`.

| path                                                                   | answers                     |
|------------------------------------------------------------------------|-----------------------------|
| `EntityDefinitions`, `EntityDefinitions(LogicalName='x')` or `(<id>)`  | EntityMetadata              |
| `.../<property>` (`EntitySetName`, `Privileges`, ...)                  | one property's value        |
| `.../Attributes`, `.../Attributes(LogicalName='y')` or `(<id>)`        | AttributeMetadata (typed)   |
| `.../Attributes/Microsoft.Dynamics.CRM.<T>AttributeMetadata`, or after a key | only that type        |
| `.../Attributes(LogicalName='y')/<cast>/OptionSet`                      | the option set              |
| `.../Keys`, `.../{OneToMany,ManyToOne,ManyToMany}Relationships`, each also `(<key>)` | keys, relationships |
| `RelationshipDefinitions`, `GlobalOptionSetDefinitions`                | the organization's ones     |

As the service does: `MetadataId` is always returned; `$select`, `$filter` and
`$expand` are checked against the declared type of the resource (the untyped
`Attributes` collection is `AttributeMetadata`, so `MaxLength` needs the
`StringAttributeMetadata` cast), and an unknown name is 400 "Could not find a
property named 'X' on type 'Microsoft.Dynamics.CRM.T'."; a navigation property
(`Attributes`, `OptionSet`, ...) only appears when expanded; items of a
collection of a base type carry `@odata.type`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from devkit.sandbox.dataverse import metadata
from devkit.sandbox.dataverse.errors import NOT_FOUND, ODATA, DataverseError, bad_request, segment_not_found
from devkit.sandbox.dataverse.metadata_types import NAMESPACE, TYPES, derives_from, navigation, properties
from devkit.sandbox.dataverse.org import Organization
from devkit.sandbox.dataverse.paths import Segment
from devkit.sandbox.dataverse.query import split_top_level
from devkit.sandbox.dataverse.schema import TableDef
from devkit.sandbox.odata import ODataSyntaxError, evaluate, parse_filter, parse_key_predicate, parse_select
from devkit.sandbox.odata import properties as filter_properties

ROOTS = ("EntityDefinitions", "RelationshipDefinitions", "GlobalOptionSetDefinitions")
_OPTIONS = ("$select", "$filter", "$expand")


@dataclass(frozen=True)
class Options:
    """The query options that apply to one resource (top level or inside `$expand`)."""

    select: list[str] | None
    filter: str | None
    expand: list[tuple[str, Options]]


def _unknown(name: str, type_name: str) -> DataverseError:
    return bad_request(f"Could not find a property named '{name}' on type '{NAMESPACE}{type_name}'.")


def parse_options(params: Mapping[str, str], type_name: str) -> Options:
    """Read `$select`, `$filter` and `$expand` for a resource of `type_name`; unknown names are 400s."""
    try:
        select = parse_select(params["$select"]) if params.get("$select") else None
        expr = parse_filter(params["$filter"]) if params.get("$filter") else None
    except ODataSyntaxError as exc:
        raise DataverseError(400, ODATA, exc.message) from exc
    structural, navigable = properties(type_name), navigation(type_name)
    for name in select or []:
        if name not in structural and name not in navigable:
            raise _unknown(name, type_name)
    for name in sorted(filter_properties(expr) if expr is not None else ()):
        if name not in structural:
            raise _unknown(name, type_name)
    expand = []
    for item in split_top_level(params.get("$expand", ""), ","):
        name, _, rest = item.partition("(")
        name = name.strip()
        if name not in navigable:
            raise _unknown(name, type_name)
        nested: dict[str, str] = {}
        for option in split_top_level(rest[:-1] if rest.endswith(")") else rest, ";"):
            key, _, value = option.partition("=")
            if key.strip() not in _OPTIONS:
                raise bad_request(f"The query option '{key.strip()}' is not supported inside $expand of metadata.")
            nested[key.strip()] = value
        expand.append((name, parse_options(nested, navigable[name])))
    return Options(select, params.get("$filter") or None, expand)


class _Resolver:
    """Builds metadata objects lazily for one request (relationships are computed once)."""

    def __init__(self, org: Organization) -> None:
        self.org = org
        self._relationships: list[dict[str, Any]] | None = None

    def relationships(self) -> list[dict[str, Any]]:
        if self._relationships is None:
            self._relationships = metadata.relationships(self.org)
        return self._relationships

    def navigate(self, definition: TableDef, name: str) -> list[tuple[dict[str, Any], Callable[[str], Any]]]:
        """The items behind an EntityMetadata navigation property, each with a resolver for its own navigation."""
        if name == "Attributes":
            return [
                (metadata.attribute_metadata(definition, c), self._attribute_nav(definition, c))
                for c in definition.columns.values()
            ]
        items: list[dict[str, Any]]
        if name == "Keys":
            items = metadata.entity_keys(definition)
        elif name == "OneToManyRelationships":
            items = [r for r in self.relationships() if r["ReferencedEntity"] == definition.logical_name]
        elif name == "ManyToOneRelationships":
            items = [r for r in self.relationships() if r["ReferencingEntity"] == definition.logical_name]
        else:  # ManyToManyRelationships: the sandbox's tables have none.
            items = []
        return [(item, _no_navigation) for item in items]

    def _attribute_nav(self, definition: TableDef, column: Any) -> Callable[[str], Any]:
        def nav(name: str) -> Any:
            # GlobalOptionSet: the sandbox's option sets are all local (IsGlobal false).
            return metadata.option_set(definition, column) if name == "OptionSet" else None

        return nav

    def entity(self, definition: TableDef) -> tuple[dict[str, Any], Callable[[str], Any]]:
        return metadata.entity_metadata(self.org, definition), lambda name: self.navigate(definition, name)


def _no_navigation(name: str) -> Any:
    return None


def _item_type(item: Mapping[str, Any], declared: str) -> str:
    tag = item.get("@odata.type")
    return tag.removeprefix(f"#{NAMESPACE}") if isinstance(tag, str) else declared


def shape(item: dict[str, Any], nav: Callable[[str], Any], declared: str, options: Options) -> dict[str, Any]:
    """One object as the service returns it for these options."""
    actual = _item_type(item, declared)
    out: dict[str, Any] = {}
    if actual != declared and "@odata.type" in item:
        out["@odata.type"] = item["@odata.type"]
    if options.select is None:
        out.update({k: v for k, v in item.items() if k != "@odata.type"})
    else:
        structural = properties(declared)
        out.update({k: item[k] for k in options.select if k in structural})
        out["MetadataId"] = item.get("MetadataId")
    targets = navigation(declared)
    for name, nested in options.expand:
        value = nav(name)
        if isinstance(value, list):
            out[name] = collection(value, targets[name], nested)
        else:
            out[name] = None if value is None else shape(value, _no_navigation, targets[name], nested)
    return out


def collection(
    items: Sequence[tuple[dict[str, Any], Callable[[str], Any]]], declared: str, options: Options
) -> list[dict[str, Any]]:
    """Filter, then shape, the items of a collection."""
    if options.filter is not None:
        expr = parse_filter(options.filter)
        items = [(i, n) for i, n in items if evaluate(expr, i, case_insensitive=True, wildcard=False)]
    return [shape(item, nav, declared, options) for item, nav in items]


def _find(items: Sequence[tuple[dict[str, Any], Any]], key: str, names: tuple[str, ...], what: str) -> int:
    try:
        pairs = parse_key_predicate(key)
    except ODataSyntaxError as exc:
        raise DataverseError(400, ODATA, exc.message) from exc
    if len(pairs) != 1:
        raise bad_request(f"The key '{key}' is not valid for {what}.")
    name, value = pairs[0]
    if name is not None and name not in ("MetadataId", *names):
        raise bad_request(f"The key property '{name}' is not a key of {what}.")
    for position, (item, _) in enumerate(items):
        if name in (None, "MetadataId"):
            if str(value).lower() == str(item.get("MetadataId")).lower():
                return position
        elif str(value) == str(item.get(name)):
            return position
    raise DataverseError(404, NOT_FOUND, f"Could not find {what} with key {key}.")


def _cast(segment: Segment, declared: str) -> str:
    name = segment.name.removeprefix(NAMESPACE)
    if segment.key is not None or name == segment.name or name not in TYPES or not derives_from(name, declared):
        raise segment_not_found(segment.name)
    return name


_KEYS = {
    "Attributes": ("LogicalName",),
    "Keys": ("LogicalName",),
    "OneToManyRelationships": ("SchemaName",),
    "ManyToOneRelationships": ("SchemaName",),
    "ManyToManyRelationships": ("SchemaName",),
}


def answer(org: Organization, segments: Sequence[Segment], params: Mapping[str, str]) -> dict[str, Any]:
    """The JSON body for a GET under one of the metadata roots."""
    resolver = _Resolver(org)
    head = segments[0]
    base = f"{org.base_url}/$metadata#{head.name}"
    if head.name == "GlobalOptionSetDefinitions":
        # The sandbox's choices are all local option sets: there is no global one to list or find.
        if head.key is not None:
            raise DataverseError(404, NOT_FOUND, f"Could not find optionset with key {head.key}.")
        parse_options(params, "OptionSetMetadataBase")
        return {"@odata.context": base, "value": []}
    if head.name == "RelationshipDefinitions":
        declared = "RelationshipMetadataBase"
        if len(segments) > 1:
            raise segment_not_found(segments[1].name)
        tagged: list[tuple[dict[str, Any], Callable[[str], Any]]] = [
            ({"@odata.type": f"#{NAMESPACE}OneToManyRelationshipMetadata", **r}, _no_navigation)
            for r in resolver.relationships()
        ]
        if head.key is not None:
            item, nav = tagged[_find(tagged, head.key, ("SchemaName",), "relationship")]
            return {"@odata.context": f"{base}/$entity", **shape(item, nav, declared, parse_options(params, declared))}
        return {"@odata.context": base, "value": collection(tagged, declared, parse_options(params, declared))}
    entities = [resolver.entity(d) for d in org.defs.values()]
    if head.key is None:
        if len(segments) > 1:
            raise segment_not_found(segments[1].name)
        options = parse_options(params, "EntityMetadata")
        return {"@odata.context": base, "value": collection(entities, "EntityMetadata", options)}
    found = _find(entities, head.key, ("LogicalName",), "entity")
    definition = list(org.defs.values())[found]
    entity, entity_nav = entities[found]
    if len(segments) == 1:
        options = parse_options(params, "EntityMetadata")
        return {"@odata.context": f"{base}/$entity", **shape(entity, entity_nav, "EntityMetadata", options)}
    part = segments[1]
    here = f"{base}({head.key})/{part.name}"
    targets = navigation("EntityMetadata")
    if part.name not in targets:
        if part.name in properties("EntityMetadata") and part.key is None and len(segments) == 2:
            return {"@odata.context": here, "value": entity[part.name]}
        raise segment_not_found(part.name)
    declared = targets[part.name]
    items = resolver.navigate(definition, part.name)
    rest = list(segments[2:])
    if part.key is not None:
        chosen = items[_find(items, part.key, _KEYS[part.name], part.name.lower().rstrip("s"))]
        if rest and rest[0].name.startswith(NAMESPACE):
            cast = _cast(rest.pop(0), declared)
            if not derives_from(_item_type(chosen[0], declared), cast):
                raise DataverseError(404, NOT_FOUND, f"The {part.name.lower()} {part.key} is not a {cast}.")
            declared = cast
        if rest:
            return _single_navigation(chosen, declared, rest, here, params)
        return {"@odata.context": f"{here}/$entity", **shape(*chosen, declared, parse_options(params, declared))}
    if rest and rest[0].name.startswith(NAMESPACE):
        declared = _cast(rest.pop(0), declared)
        items = [(i, n) for i, n in items if derives_from(_item_type(i, declared), declared)]
        here += f"/{NAMESPACE}{declared}"
    if rest:
        raise segment_not_found(rest[0].name)
    return {"@odata.context": here, "value": collection(items, declared, parse_options(params, declared))}


def _single_navigation(
    chosen: tuple[dict[str, Any], Callable[[str], Any]],
    declared: str,
    rest: list[Segment],
    here: str,
    params: Mapping[str, str],
) -> dict[str, Any]:
    """`Attributes(<key>)/<cast>/OptionSet`: a navigation property of one object."""
    segment = rest[0]
    targets = navigation(declared)
    if len(rest) > 1 or segment.key is not None or segment.name not in targets:
        raise segment_not_found(segment.name)
    value = chosen[1](segment.name)
    if value is None:
        raise DataverseError(404, NOT_FOUND, f"The {segment.name} of this attribute does not exist.")
    target = targets[segment.name]
    body = shape(value, _no_navigation, target, parse_options(params, target))
    return {"@odata.context": f"{here}/{segment.name}/$entity", **body}
