"""Contract test of `/data/$metadata`: CSDL as F&O serves it, template-derived entities included."""

from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree as ET

import httpx

from devkit.sandbox.fno import create_app
from loyaltysync.templates import default_mappings_dir, load_templates, parse_template

TOKEN = "fno-test-token"
EDMX = "{http://docs.oasis-open.org/odata/ns/edmx}"
EDM = "{http://docs.oasis-open.org/odata/ns/edm}"
NS = "Microsoft.Dynamics.DataEntities"
FIXTURES = Path(__file__).parent.parent / "fixtures" / "templates"


async def fetch_metadata() -> ET.Element:
    templates = dict(load_templates(default_mappings_dir()))
    for name in ("company-customers.json", "every-map.json"):
        template = parse_template((FIXTURES / name).read_text(), name)
        templates[template.name] = template
    app = create_app(token=TOKEN, templates=templates)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fno") as client:
        response = await client.get("/data/$metadata", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/xml")
    return ET.fromstring(response.content)  # noqa: S314 - our own emulator's answer


def entity_types(schema: ET.Element) -> dict[str, ET.Element]:
    return {e.get("Name", ""): e for e in schema.findall(f"{EDM}EntityType")}


def props(entity: ET.Element) -> dict[str, dict[str, str]]:
    return {p.get("Name", ""): dict(p.attrib) for p in entity.findall(f"{EDM}Property")}


def keys(entity: ET.Element) -> list[str]:
    return [r.get("Name", "") for r in entity.findall(f"{EDM}Key/{EDM}PropertyRef")]


async def test_metadata_declares_the_loyalty_entities_with_fo_types() -> None:
    root = await fetch_metadata()
    assert root.tag == f"{EDMX}Edmx" and root.get("Version") == "4.0"
    schema = root.find(f"{EDMX}DataServices/{EDM}Schema")
    assert schema is not None and schema.get("Namespace") == NS
    enums = {e.get("Name"): [(m.get("Name"), m.get("Value")) for m in e.findall(f"{EDM}Member")]
             for e in schema.findall(f"{EDM}EnumType")}
    assert enums["RetailLoyaltyTenderTypeBase"] == [
        ("AsCardTender", "0"), ("AsContactTender", "1"), ("NoTender", "2"), ("Blocked", "3")]
    assert enums["NoYes"] == [("No", "0"), ("Yes", "1")]
    assert enums["RetailLoyaltyRewardPointType"] == [("Quantity", "0"), ("Amount", "1")]
    assert [m for m, _ in enums["RetailLoyaltyRewardPointTimeUnit"]] == ["Day", "Month", "Year"]

    types = entity_types(schema)
    card = types["RetailLoyaltyCard"]
    assert keys(card) == ["CardNumber"]
    card_props = props(card)
    assert card_props["CardNumber"] == {"Name": "CardNumber", "Type": "Edm.String", "Nullable": "false",
                                        "MaxLength": "30"}
    assert card_props["CardTenderType"]["Type"] == f"{NS}.RetailLoyaltyTenderTypeBase"
    for name in ("PartyNumber", "ReplacementCardNumber", "OmOperatingUnitNumber"):
        assert card_props[name]["Type"] == "Edm.String" and "Nullable" not in card_props[name]
    for name in ("LoyaltyEnrollmentDate", "LoyaltyEnrollmentDateLocal"):
        assert card_props[name]["Type"] == "Edm.DateTimeOffset"
    for name in ("LoyaltyEnrollmentTime", "LoyaltyEnrollmentTimeLocal"):
        assert card_props[name]["Type"] == "Edm.Int32"
    assert "dataAreaId" not in card_props

    level = types["LoyaltyLevel"]
    assert keys(level) == ["LevelPhrase"] and set(props(level)) == {"LevelPhrase", "LevelDescription"}

    point = props(types["RetailLoyaltyRewardPoint"])
    assert keys(types["RetailLoyaltyRewardPoint"]) == ["RewardPointId"]
    assert point["RewardPointType"]["Type"] == f"{NS}.RetailLoyaltyRewardPointType"
    assert point["Redeemable"]["Type"] == f"{NS}.NoYes"
    assert point["RedeemRanking"]["Type"] == "Edm.Int32"
    assert point["RewardPointCurrency"]["MaxLength"] == "3"
    assert point["MaximumLoyaltyRewardPoints"]["Type"] == "Edm.Decimal"
    assert point["ExpirationTimeUnit"]["Type"] == point["VestingTimeUnit"]["Type"] == (
        f"{NS}.RetailLoyaltyRewardPointTimeUnit")
    assert point["ExpirationTimeValue"]["Type"] == point["VestingTimeValue"]["Type"] == "Edm.Int32"

    container = schema.find(f"{EDM}EntityContainer")
    assert container is not None
    sets = {s.get("Name"): s.get("EntityType") for s in container.findall(f"{EDM}EntitySet")}
    assert sets["RetailLoyaltyCards"] == f"{NS}.RetailLoyaltyCard"
    assert sets["LoyaltyLevels"] == f"{NS}.LoyaltyLevel"
    assert sets["RetailLoyaltyRewardPoints"] == f"{NS}.RetailLoyaltyRewardPoint"
    # Every entity set's type is declared.
    assert {t.removeprefix(f"{NS}.") for t in sets.values() if t} <= set(types)


async def test_metadata_includes_template_derived_entities() -> None:
    root = await fetch_metadata()
    schema = root.find(f"{EDMX}DataServices/{EDM}Schema")
    assert schema is not None
    types = entity_types(schema)
    customer = types["CustomerV3"]
    assert keys(customer) == ["dataAreaId", "CustomerAccount"]  # company-specific: dataAreaId in the key
    customer_props = props(customer)
    assert customer_props["dataAreaId"]["MaxLength"] == "4"
    assert customer_props["CustomerAccount"]["MaxLength"] == "20"
    assert customer_props["CreditLimit"]["Type"] == "Edm.Decimal"
    assert customer_props["CreditLimitIsMandatory"]["Type"] == "Edm.Boolean"
    container = schema.find(f"{EDM}EntityContainer")
    assert container is not None
    sets = {s.get("Name"): s.get("EntityType") for s in container.findall(f"{EDM}EntitySet")}
    assert sets["CustomersV3"] == f"{NS}.CustomerV3"
    enums = {e.get("Name"): [m.get("Name") for m in e.findall(f"{EDM}Member")]
             for e in schema.findall(f"{EDM}EnumType")}
    widget = props(types["TestWidget"])  # entity_type TestWidgetEntity -> OData type TestWidget
    assert keys(types["TestWidget"]) == ["WidgetId"]
    assert enums[widget["Status"]["Type"].removeprefix(f"{NS}.")] == ["Active", "Paused", "Retired"]
    assert widget["Enabled"]["Type"] == f"{NS}.NoYes"  # a Yes/No value map is F&O's NoYes
    assert widget["ShipDate"]["Type"] == widget["Launched"]["Type"] == "Edm.DateTimeOffset"
    assert widget["Quantity"]["Type"] == "Edm.Int32" and widget["WidgetId"]["MaxLength"] == "10"
    assert "Source" not in widget  # a Dataverse-only field has no F&O property
    declared_enums = set(enums)
    for entity in types.values():
        for prop in props(entity).values():
            if prop["Type"].startswith(NS):
                assert prop["Type"].removeprefix(f"{NS}.") in declared_enums
