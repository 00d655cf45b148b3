"""Dataverse emulator contract: tables, seeded rows with fixed GUIDs, template tables, metadata endpoints."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from devkit.sandbox.dataverse import AGENT_USER, CURRENCY_IDS, INTEGRATION_USER, SUPERVISOR_USER, create_app
from devkit.sandbox.dataverse.org import Organization
from loyaltysync.templates import Template, default_mappings_dir, load_templates

TOKEN = "dv-meta-token"
BASE = "http://localhost/api/data/v9.2/"
DEFINITION = "EntityDefinitions(LogicalName='msdyn_loyaltyrewardpoint')"

TIERS = Template.model_validate(
    {
        "name": "loyalty-tiers",
        "fo": {"entity_set": "LoyaltyTiers", "keys": ["TierId"]},
        "dataverse": {
            "entity_set": "new_loyaltytiers",
            "table": "new_loyaltytier",
            "primary_id": "new_loyaltytierid",
            "alternate_key": ["new_tierid"],
        },
        "fields": [
            {"fo": "TierId", "map": "=", "dataverse": "new_tierid", "type": "string", "max_length": 20},
            {"fo": "Points", "map": "=", "dataverse": "new_points", "type": "integer"},
            {
                "fo": "Kind",
                "map": "><",
                "dataverse": "new_kind",
                "type": "enum",
                "value_map": {"Basic": 100, "Plus": 200},
            },
            {
                "fo": "Region",
                "map": "=",
                "dataverse": "new_region",
                "type": "string",
                "lookup": {
                    "entity_set": "new_regions",
                    "table": "new_region",
                    "id_column": "new_regionid",
                    "key_column": "new_code",
                },
            },
        ],
    }
)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    templates = {**load_templates(default_mappings_dir()), "loyalty-tiers": TIERS}
    app: Starlette = create_app(token=TOKEN, templates=templates)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        yield c


async def get(client: httpx.AsyncClient, path: str) -> Any:
    response = await client.get(path)
    assert response.status_code == 200, response.text
    return response.json()


async def test_seeded_users_have_fixed_ids_and_the_people_can_be_impersonated(client: httpx.AsyncClient) -> None:
    users = (await get(client, "systemusers?$select=fullname,applicationid,azureactivedirectoryobjectid"))["value"]
    by_id = {u["systemuserid"]: u for u in users}
    assert by_id[INTEGRATION_USER.systemuserid]["applicationid"] == INTEGRATION_USER.applicationid
    assert by_id[AGENT_USER.systemuserid]["fullname"] == "Alex Agent"
    assert by_id[SUPERVISOR_USER.systemuserid]["fullname"] == "Sam Supervisor"
    for user in (AGENT_USER, SUPERVISOR_USER):
        who = await client.get("WhoAmI", headers={"CallerObjectId": user.azureactivedirectoryobjectid})
        assert who.json()["UserId"] == user.systemuserid


async def test_currencies_are_seeded_with_fixed_ids(client: httpx.AsyncClient) -> None:
    rows = (await get(client, "transactioncurrencies?$select=isocurrencycode,currencyname"))["value"]
    assert {r["isocurrencycode"]: r["transactioncurrencyid"] for r in rows} == CURRENCY_IDS
    assert set(CURRENCY_IDS) == {"USD", "EUR", "GBP", "JPY", "CAD", "DKK", "CHF", "SEK"}
    usd = await get(client, "transactioncurrencies(isocurrencycode='usd')")
    assert usd["transactioncurrencyid"] == "ce1a0000-0000-4000-8000-000000000840"


async def test_messages_and_filters_are_registered_per_table(client: httpx.AsyncClient) -> None:
    messages = (await get(client, "sdkmessages?$select=name"))["value"]
    assert {m["name"] for m in messages} >= {
        "Create",
        "Update",
        "Delete",
        "CreateMultiple",
        "UpdateMultiple",
        "UpsertMultiple",
    }
    upsert = await get(
        client, "sdkmessagefilters?$select=primaryobjecttypecode&$filter=sdkmessageid/name eq 'UpsertMultiple'"
    )
    # The loyalty tables and template tables support the bulk messages; system tables do not.
    assert {f["primaryobjecttypecode"] for f in upsert["value"]} == {
        "msdyn_loyaltycard",
        "msdyn_loyaltylevel",
        "msdyn_loyaltyrewardpoint",
        "new_loyaltytier",
    }


async def test_a_template_table_gets_typed_columns_and_its_alternate_key(client: httpx.AsyncClient) -> None:
    await client.patch("new_regions(new_code='EU')", json={})
    response = await client.patch(
        "new_loyaltytiers(new_tierid='T1')",
        json={"new_points": 5, "new_kind": 200, "new_region@odata.bind": "/new_regions(new_code='EU')"},
        headers={"Prefer": "return=representation"},
    )
    assert response.status_code == 201, response.text
    assert response.json()["_new_region_value"]
    assert (await client.post("new_loyaltytiers", json={"new_tierid": "T2", "new_kind": 300})).status_code == 400
    assert (await client.post("new_loyaltytiers", json={"new_tierid": "X" * 21})).status_code == 400
    keys = await get(client, "EntityDefinitions(LogicalName='new_loyaltytier')/Keys?$select=KeyAttributes")
    assert keys["value"][0]["KeyAttributes"] == ["new_tierid"]


async def test_entity_definition_names(client: httpx.AsyncClient) -> None:
    body = await get(
        client,
        "EntityDefinitions(LogicalName='msdyn_loyaltycard')?$select=EntitySetName,"
        "PrimaryIdAttribute,PrimaryNameAttribute,LogicalCollectionName",
    )
    assert body["EntitySetName"] == "msdyn_loyaltycards"
    assert body["PrimaryIdAttribute"] == "msdyn_loyaltycardid"
    assert body["PrimaryNameAttribute"] == "msdyn_cardnumber"
    assert body["LogicalCollectionName"] == "msdyn_loyaltycards"
    assert "DisplayName" not in body
    missing = await client.get("EntityDefinitions(LogicalName='nope')")
    assert missing.status_code == 404


async def test_attributes_with_types_and_string_lengths(client: httpx.AsyncClient) -> None:
    base = "EntityDefinitions(LogicalName='msdyn_loyaltycard')/Attributes"
    body = await get(client, f"{base}?$select=LogicalName,AttributeType")
    attributes = {a["LogicalName"]: a for a in body["value"]}
    assert attributes["msdyn_cardnumber"]["AttributeType"] == "String"
    # MaxLength is a StringAttributeMetadata property: the untyped collection refuses it, as the service does.
    untyped = await client.get(f"{base}?$select=LogicalName,MaxLength")
    assert untyped.status_code == 400
    assert untyped.json()["error"]["message"] == (
        "Could not find a property named 'MaxLength' on type 'Microsoft.Dynamics.CRM.AttributeMetadata'."
    )
    strings = await get(client, f"{base}/Microsoft.Dynamics.CRM.StringAttributeMetadata?$select=LogicalName,MaxLength")
    lengths = {a["LogicalName"]: a["MaxLength"] for a in strings["value"]}
    assert lengths["msdyn_cardnumber"] == 30
    assert lengths["msdyn_partynumber"] == 100
    assert attributes["msdyn_cardtendertype"]["AttributeType"] == "Picklist"
    assert attributes["msdyn_enrollmentdate"]["AttributeType"] == "DateTime"
    assert attributes["msdyn_loyaltycardid"]["AttributeType"] == "Uniqueidentifier"
    points = await get(client, f"{DEFINITION}/Attributes?$select=LogicalName,AttributeType")
    types = {a["LogicalName"]: a["AttributeType"] for a in points["value"]}
    assert types["msdyn_redeemable"] == "Boolean"
    assert types["msdyn_redeemranking"] == "Integer"
    assert types["msdyn_maximumloyaltyrewardpoints"] == "Decimal"
    assert types["msdyn_rewardpointcurrency"] == "Lookup"


async def test_picklist_cast_with_expanded_option_sets(client: httpx.AsyncClient) -> None:
    body = await get(
        client,
        f"{DEFINITION}/Attributes/Microsoft.Dynamics.CRM.PicklistAttributeMetadata"
        "?$select=LogicalName&$expand=OptionSet",
    )
    options = {
        a["LogicalName"]: {o["Value"]: o["Label"]["UserLocalizedLabel"]["Label"] for o in a["OptionSet"]["Options"]}
        for a in body["value"]
    }
    assert options["msdyn_rewardpointtype"] == {192350000: "Quantity", 192350001: "Amount"}
    assert options["msdyn_expirationtimeunit"] == {806380000: "Day", 806380001: "Month", 806380002: "Year"}
    assert set(options) == {"msdyn_rewardpointtype", "msdyn_expirationtimeunit", "msdyn_vestingtimeunit"}


async def test_keys_and_many_to_one_relationships(client: httpx.AsyncClient) -> None:
    keys = await get(client, f"{DEFINITION}/Keys?$select=SchemaName,KeyAttributes")
    assert [k["KeyAttributes"] for k in keys["value"]] == [["msdyn_rewardpointid"]]
    assert keys["value"][0]["SchemaName"]
    relationships = await get(
        client,
        f"{DEFINITION}/ManyToOneRelationships?$select=ReferencingAttribute,"
        "ReferencedEntity,ReferencedAttribute,ReferencingEntityNavigationPropertyName",
    )
    currency = [r for r in relationships["value"] if r["ReferencingAttribute"] == "msdyn_rewardpointcurrency"]
    assert currency == [
        {
            "MetadataId": currency[0]["MetadataId"],
            "ReferencingAttribute": "msdyn_rewardpointcurrency",
            "ReferencedEntity": "transactioncurrency",
            "ReferencedAttribute": "transactioncurrencyid",
            "ReferencingEntityNavigationPropertyName": "msdyn_rewardpointcurrency",
        }
    ]


async def test_registration_tables_have_their_columns(client: httpx.AsyncClient) -> None:
    for logical, column in [
        ("serviceendpoint", "authtype"),
        ("sdkmessageprocessingstep", "filteringattributes"),
        ("sdkmessageprocessingstepimage", "entityalias"),
        ("sdkmessagefilter", "primaryobjecttypecode"),
    ]:
        body = await get(client, f"EntityDefinitions(LogicalName='{logical}')/Attributes?$select=LogicalName")
        assert column in {a["LogicalName"] for a in body["value"]}


def test_alternate_key_lookups_stay_constant_time_with_many_rows() -> None:
    """10,000 case-insensitive key lookups in a 50,000-row table well under a second (bench/ does a million)."""
    import time

    org = Organization()
    table = org.tables["msdyn_loyaltycard"]
    for i in range(50_000):
        org.seed_row("msdyn_loyaltycard", {"msdyn_cardnumber": f"M-{i}"})
    started = time.perf_counter()
    for i in range(0, 50_000, 5):
        assert table.find("msdyn_cardnumber", (f"m-{i}",)) is not None
    assert time.perf_counter() - started < 1.0


# -- the Web API metadata types, their property sets and the query options over them ----------------


CARD = "EntityDefinitions(LogicalName='msdyn_loyaltycard')"


async def test_every_metadata_object_carries_its_types_full_property_set(client: httpx.AsyncClient) -> None:
    from devkit.sandbox.dataverse.metadata_types import properties

    entity = await get(client, CARD)
    assert set(properties("EntityMetadata")) <= set(entity)
    assert not {"Attributes", "Keys", "OneToManyRelationships"} & set(entity)  # navigation: only when expanded
    assert entity["DisplayName"]["UserLocalizedLabel"]["Label"] == "Loyalty card"
    assert entity["Description"] == {"LocalizedLabels": [], "UserLocalizedLabel": None}
    assert set(entity["IsCustomizable"]) == {"Value", "CanBeChanged", "ManagedPropertyLogicalName"}
    assert entity["PrimaryImageAttribute"] is None and entity["TableType"] == "Standard"
    assert {p["Name"] for p in entity["Privileges"]} >= {"prvCreatemsdyn_loyaltycard", "prvReadmsdyn_loyaltycard"}
    for attribute in (await get(client, f"{CARD}/Attributes"))["value"]:
        declared = attribute["@odata.type"].removeprefix("#Microsoft.Dynamics.CRM.")
        assert set(properties(declared)) <= set(attribute), declared
    assert set(properties("EntityKeyMetadata")) <= set((await get(client, f"{CARD}/Keys"))["value"][0])
    for relationship in (await get(client, f"{DEFINITION}/ManyToOneRelationships"))["value"]:
        assert set(properties("OneToManyRelationshipMetadata")) <= set(relationship)
    types = {a["LogicalName"]: a["@odata.type"] for a in (await get(client, f"{CARD}/Attributes"))["value"]}
    assert types["msdyn_loyaltycardid"] == "#Microsoft.Dynamics.CRM.UniqueIdentifierAttributeMetadata"
    assert types["statuscode"] == "#Microsoft.Dynamics.CRM.StatusAttributeMetadata"


async def test_navigation_properties_expand_with_nested_select_and_filter(client: httpx.AsyncClient) -> None:
    picklists = "AttributeType eq Microsoft.Dynamics.CRM.AttributeTypeCode'Picklist'"
    body = await get(
        client,
        f"{CARD}?$select=LogicalName&$expand=Attributes($select=LogicalName;$filter={picklists}),"
        "Keys($select=KeyAttributes),OneToManyRelationships($select=ReferencingEntity)",
    )
    assert [a["LogicalName"] for a in body["Attributes"]] == ["msdyn_cardtendertype"]
    assert body["Attributes"][0]["@odata.type"] == "#Microsoft.Dynamics.CRM.PicklistAttributeMetadata"
    assert [k["KeyAttributes"] for k in body["Keys"]] == [["msdyn_cardnumber"]]
    assert body["OneToManyRelationships"] == []
    listed = await get(
        client,
        "EntityDefinitions?$select=LogicalName&$filter=LogicalName eq 'msdyn_loyaltyrewardpoint'"
        "&$expand=ManyToOneRelationships($select=ReferencingAttribute;"
        "$filter=ReferencedEntity eq 'transactioncurrency')",
    )
    assert [e["LogicalName"] for e in listed["value"]] == ["msdyn_loyaltyrewardpoint"]
    assert [r["ReferencingAttribute"] for r in listed["value"][0]["ManyToOneRelationships"]] == [
        "msdyn_rewardpointcurrency"
    ]
    currency = await get(client, "EntityDefinitions(LogicalName='transactioncurrency')/OneToManyRelationships"
                                 "?$select=ReferencingEntity,ReferencingAttribute")
    assert {"msdyn_loyaltyrewardpoint", "msdyn_rewardpointcurrency"} <= {
        v for r in currency["value"] for v in r.values()
    }
    # Complex-typed properties filter by their members, enum-typed ones by enum literals (the service's forms).
    custom = await get(client, "EntityDefinitions?$select=LogicalName&$filter=IsCustomizable/Value eq true and "
                               "OwnershipType eq Microsoft.Dynamics.CRM.OwnershipTypes'OrganizationOwned'")
    assert "msdyn_loyaltycard" in {e["LogicalName"] for e in custom["value"]}


async def test_option_sets_behind_casts_and_single_attributes(client: httpx.AsyncClient) -> None:
    tender = await get(
        client,
        f"{CARD}/Attributes(LogicalName='msdyn_cardtendertype')/Microsoft.Dynamics.CRM.PicklistAttributeMetadata"
        "/OptionSet?$select=Options",
    )
    assert {o["Value"]: o["Label"]["UserLocalizedLabel"]["Label"] for o in tender["Options"]}[806380002] == "No tender"
    single = await get(client, f"{CARD}/Attributes(LogicalName='msdyn_cardtendertype')"
                               "/Microsoft.Dynamics.CRM.PicklistAttributeMetadata?$select=LogicalName&$expand=OptionSet")
    assert single["OptionSet"]["OptionSetType"] == "Picklist" and single["OptionSet"]["IsGlobal"] is False
    redeemable = await get(
        client,
        f"{DEFINITION}/Attributes/Microsoft.Dynamics.CRM.BooleanAttributeMetadata"
        "?$select=LogicalName,DefaultValue&$expand=OptionSet($select=TrueOption,FalseOption)",
    )
    option_set = redeemable["value"][0]["OptionSet"]
    assert option_set["TrueOption"]["Value"] == 1 and option_set["FalseOption"]["Value"] == 0
    states = await get(client, f"{CARD}/Attributes/Microsoft.Dynamics.CRM.StateAttributeMetadata"
                               "?$select=LogicalName&$expand=OptionSet")
    active = states["value"][0]["OptionSet"]["Options"][0]
    assert active["@odata.type"] == "#Microsoft.Dynamics.CRM.StateOptionMetadata"
    assert (active["Value"], active["DefaultStatus"], active["InvariantName"]) == (0, 1, "Active")


async def test_unknown_names_are_refused_as_the_service_refuses_them(client: httpx.AsyncClient) -> None:
    def message(name: str, type_name: str) -> str:
        return f"Could not find a property named '{name}' on type 'Microsoft.Dynamics.CRM.{type_name}'."

    for path, name, type_name in [
        (f"{CARD}/Attributes?$select=LogicalName&$expand=OptionSet", "OptionSet", "AttributeMetadata"),
        (f"{CARD}/Attributes?$filter=MaxLength gt 10", "MaxLength", "AttributeMetadata"),
        (f"{CARD}?$expand=Forms", "Forms", "EntityMetadata"),
        (f"{CARD}?$expand=Attributes($select=Nope)", "Nope", "AttributeMetadata"),
        ("EntityDefinitions?$filter=Nope eq 'x'", "Nope", "EntityMetadata"),
        (f"{CARD}/Keys?$select=Columns", "Columns", "EntityKeyMetadata"),
    ]:
        response = await client.get(path)
        assert response.status_code == 400, path
        assert response.json()["error"] == {"code": "0x0", "message": message(name, type_name)}, path
    for path in (f"{CARD}/Forms", f"{CARD}/Attributes/Microsoft.Dynamics.CRM.EntityMetadata", f"{CARD}/Attributes/X"):
        response = await client.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "0x8006088a"
    assert (await client.get(f"{CARD}/Attributes(LogicalName='nope')")).status_code == 404


async def test_properties_relationship_and_global_option_set_definitions(client: httpx.AsyncClient) -> None:
    assert (await get(client, f"{CARD}/EntitySetName"))["value"] == "msdyn_loyaltycards"
    privileges = (await get(client, f"{CARD}/Privileges"))["value"]
    assert {p["PrivilegeType"] for p in privileges} >= {"Create", "Read", "Write", "Delete"}
    name = "transactioncurrency_msdyn_loyaltyrewardpoint_msdyn_rewardpointcurrency"
    relationship = await get(client, f"RelationshipDefinitions(SchemaName='{name}')")
    assert relationship["@odata.type"] == "#Microsoft.Dynamics.CRM.OneToManyRelationshipMetadata"
    assert relationship["ReferencingEntity"] == "msdyn_loyaltyrewardpoint"
    assert (await get(client, "GlobalOptionSetDefinitions?$select=Name"))["value"] == []
    assert (await client.get("GlobalOptionSetDefinitions(Name='nope')")).status_code == 404


async def test_a_table_added_to_the_organization_gets_full_metadata() -> None:
    from devkit.sandbox.dataverse.schema import choice, integer, string, table

    app = create_app(token=TOKEN)
    org: Organization = app.state.dataverse
    org.add_table(table("new_widget", "new_widgets",
                        [string("new_code", 10), choice("new_size", {1: "Small", 2: "Large"}), integer("new_count")],
                        primary_name="new_code", keys=[("new_code",)], display_name="Widget"))
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE, headers=headers) as client:
        await _widget_metadata(client)


async def _widget_metadata(client: httpx.AsyncClient) -> None:
    entity = await get(client, "EntityDefinitions(LogicalName='new_widget')?$select=EntitySetName,DisplayName")
    assert entity["EntitySetName"] == "new_widgets"
    sizes = await get(client, "EntityDefinitions(LogicalName='new_widget')/Attributes"
                              "/Microsoft.Dynamics.CRM.PicklistAttributeMetadata?$select=LogicalName&$expand=OptionSet")
    assert [o["Value"] for o in sizes["value"][0]["OptionSet"]["Options"]] == [1, 2]
    counts = await get(client, "EntityDefinitions(LogicalName='new_widget')/Attributes(LogicalName='new_count')"
                               "/Microsoft.Dynamics.CRM.IntegerAttributeMetadata?$select=MinValue,MaxValue")
    assert (counts["MinValue"], counts["MaxValue"]) == (-2_147_483_648, 2_147_483_647)
