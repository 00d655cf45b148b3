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
    body = await get(
        client,
        "EntityDefinitions(LogicalName='msdyn_loyaltycard')/Attributes?$select=LogicalName,AttributeType,MaxLength",
    )
    attributes = {a["LogicalName"]: a for a in body["value"]}
    assert attributes["msdyn_cardnumber"]["AttributeType"] == "String"
    assert attributes["msdyn_cardnumber"]["MaxLength"] == 30
    assert attributes["msdyn_partynumber"]["MaxLength"] == 100
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
