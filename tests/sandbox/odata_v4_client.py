"""A small generic OData v4 client, written from the OData v4.01 specification alone (not from the emulator).

No PyPI client fits (pyodata speaks OData v2; python-odata never sends `If-Match`),
so this one follows the spec's rules a client must follow, and nothing service-specific:

- the model comes from the CSDL XML document at `$metadata` (Part 3 CSDL XML:
  `EntityContainer/EntitySet`, `EntityType/Key/PropertyRef`, `Property Type`, `EnumType/Member`);
- keys are written as the key predicate of the type's declared key properties (Part 2 URL Conventions §4.3.1);
- a collection is read by following `@odata.nextLink` as an opaque URL until there is
  none (Part 1 Protocol §11.2.6.7 server-driven paging), with `Prefer: odata.maxpagesize` (§8.2.8.3);
- `$count=true` gives `@odata.count`, `/$count` gives a plain-text number (§11.2.6.5, §11.2.10);
- an update is PATCH with `If-Match` carrying the entity's `@odata.etag` (§11.4.3, §11.4.1.1);
- custom query options (F&O's `cross-company=true`) are passed through as the caller gives them.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

EDMX = "{http://docs.oasis-open.org/odata/ns/edmx}"
EDM = "{http://docs.oasis-open.org/odata/ns/edm}"


class ODataError(Exception):
    """A non-success answer: status and the OData error body."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"{response.status_code}: {response.text[:300]}")
        self.status = response.status_code


@dataclass
class EntityType:
    name: str
    key: list[str]
    properties: dict[str, str]  # name -> type (Edm.* or a qualified enum name)


@dataclass
class Model:
    namespace: str = ""
    entity_sets: dict[str, EntityType] = field(default_factory=dict)
    enums: dict[str, list[str]] = field(default_factory=dict)  # qualified name -> member names


def parse_csdl(text: str) -> Model:
    """The entity sets, their types and keys, and the enum types of a CSDL XML document."""
    root = ET.fromstring(text)  # noqa: S314 - the test's own emulator answers
    model = Model()
    types: dict[str, EntityType] = {}
    for schema in root.iter(f"{EDM}Schema"):
        namespace = schema.get("Namespace", "")
        model.namespace = model.namespace or namespace
        for enum in schema.findall(f"{EDM}EnumType"):
            model.enums[f"{namespace}.{enum.get('Name')}"] = [m.get("Name", "") for m in enum.findall(f"{EDM}Member")]
        for entity in schema.findall(f"{EDM}EntityType"):
            key = [ref.get("Name", "") for ref in entity.findall(f"{EDM}Key/{EDM}PropertyRef")]
            props = {p.get("Name", ""): p.get("Type", "") for p in entity.findall(f"{EDM}Property")}
            types[f"{namespace}.{entity.get('Name')}"] = EntityType(entity.get("Name", ""), key, props)
        for container in schema.findall(f"{EDM}EntityContainer"):
            for entity_set in container.findall(f"{EDM}EntitySet"):
                model.entity_sets[entity_set.get("Name", "")] = types[entity_set.get("EntityType", "")]
    return model


def literal(value: Any, edm_type: str) -> str:
    """A value as an OData URL literal of its declared type (strings quoted, quotes doubled)."""
    if edm_type in ("Edm.String", "Edm.Guid") or not edm_type.startswith("Edm."):
        text = str(value).replace("'", "''")
        return f"'{text}'" if edm_type != "Edm.Guid" else str(value)
    if edm_type == "Edm.Boolean":
        return "true" if value else "false"
    return str(value)


class ODataV4Client:
    """Reads the model once, then queries, counts, reads and updates entities by their declared keys."""

    def __init__(self, http: httpx.AsyncClient, service_root: str) -> None:
        self.http = http
        self.root = service_root.rstrip("/")
        self.model = Model()

    async def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        response = await self.http.request(method, url, **kwargs)
        if response.status_code >= 400:
            raise ODataError(response)
        return response

    async def load_metadata(self) -> Model:
        response = await self._send("GET", f"{self.root}/$metadata", headers={"Accept": "application/xml"})
        self.model = parse_csdl(response.text)
        return self.model

    def key_predicate(self, entity_set: str, values: Mapping[str, Any]) -> str:
        """`(k1=v1,k2=v2)` over the declared key (a single key property may be written bare)."""
        entity = self.model.entity_sets[entity_set]
        if len(entity.key) == 1:
            name = entity.key[0]
            return f"({quote(literal(values[name], entity.properties[name]), safe=chr(39))})"
        parts = [f"{k}={quote(literal(values[k], entity.properties[k]), safe=chr(39))}" for k in entity.key]
        return f"({','.join(parts)})"

    async def pages(
        self,
        entity_set: str,
        *,
        options: Mapping[str, str] | None = None,
        page_size: int | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Each page's JSON body, following `@odata.nextLink` unchanged until the last page."""
        headers = {"Accept": "application/json"}
        if page_size is not None:
            headers["Prefer"] = f"odata.maxpagesize={page_size}"
        url: str | None = f"{self.root}/{entity_set}"
        params: Mapping[str, str] | None = options
        while url is not None:
            body = (await self._send("GET", url, params=params, headers=headers)).json()
            yield body
            url, params = body.get("@odata.nextLink"), None

    async def count(self, entity_set: str, options: Mapping[str, str] | None = None) -> int:
        response = await self._send("GET", f"{self.root}/{entity_set}/$count", params=options)
        return int(response.text)

    async def read(
        self, entity_set: str, key: Mapping[str, Any], options: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        url = f"{self.root}/{entity_set}{self.key_predicate(entity_set, key)}"
        body: dict[str, Any] = (await self._send("GET", url, params=options)).json()
        return body

    async def update(
        self,
        entity_set: str,
        key: Mapping[str, Any],
        changes: Mapping[str, Any],
        etag: str,
        options: Mapping[str, str] | None = None,
    ) -> None:
        url = f"{self.root}/{entity_set}{self.key_predicate(entity_set, key)}"
        await self._send("PATCH", url, json=dict(changes), params=options, headers={"If-Match": etag})
