"""`/data/$metadata`: the CSDL document, in the shape F&O serves it.

One schema `Microsoft.Dynamics.DataEntities` holding the enum types, the
entity types (key first, then properties) and an entity container named
`Resources` with one entity set per entity.
"""

from __future__ import annotations

from xml.etree import ElementTree as ET

from devkit.sandbox.fno.schema import NAMESPACE, Catalog, EntityDef

EDMX_NS = "http://docs.oasis-open.org/odata/ns/edmx"
EDM_NS = "http://docs.oasis-open.org/odata/ns/edm"
CONTAINER = "Resources"


def _entity_type(parent: ET.Element, entity: EntityDef) -> None:
    node = ET.SubElement(parent, "EntityType", Name=entity.entity_type)
    key = ET.SubElement(node, "Key")
    for name in entity.keys:
        ET.SubElement(key, "PropertyRef", Name=name)
    for prop in entity.properties:
        attrs = {"Name": prop.name, "Type": prop.edm_type}
        # F&O never stores null: only strings are declared nullable, and keys never are.
        if prop.key or prop.kind != "string":
            attrs["Nullable"] = "false"
        if prop.max_length is not None:
            attrs["MaxLength"] = str(prop.max_length)
        if prop.kind == "decimal":
            attrs["Precision"] = "32"
            attrs["Scale"] = "6"
        ET.SubElement(node, "Property", attrs)


def render_metadata(catalog: Catalog) -> bytes:
    """The CSDL XML for every entity set and enum type in `catalog`."""
    ET.register_namespace("edmx", EDMX_NS)
    root = ET.Element(f"{{{EDMX_NS}}}Edmx", Version="4.0")
    services = ET.SubElement(root, f"{{{EDMX_NS}}}DataServices")
    schema = ET.SubElement(services, "Schema", Namespace=NAMESPACE, xmlns=EDM_NS)
    for enum in sorted(catalog.enums.values(), key=lambda e: e.name):
        node = ET.SubElement(schema, "EnumType", Name=enum.name)
        for value, member in enumerate(enum.members):
            ET.SubElement(node, "Member", Name=member, Value=str(value))
    for entity in catalog.entities.values():
        _entity_type(schema, entity)
    container = ET.SubElement(schema, "EntityContainer", Name=CONTAINER)
    for entity in catalog.entities.values():
        ET.SubElement(container, "EntitySet", Name=entity.entity_set, EntityType=entity.full_type)
    return b'<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode").encode()
