"""A generic Dataverse client written against the real service works against the sandbox unchanged.

The client is Microsoft's own Python SDK for the Web API, `PowerPlatform-Dataverse-Client`
(PyPI, requirements-dev.txt only): it knows nothing of the sandbox. It runs
in-process over `requests` through `asgi_requests` (no sockets); its requests are
the ones it sends to a real organization (`https://<org>.crm.dynamics.com`).
Covered: metadata discovery (the table, its columns with a `$filter` on an enum,
alternate keys, relationships), `sdkmessagefilters`, upsert by alternate key one
request per row, several per `UpsertMultiple` and in `$batch`, paging with
`Prefer: odata.maxpagesize`, `$filter` on a choice column and formatted values.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from azure.core.credentials import AccessToken
from PowerPlatform.Dataverse.client import DataverseClient
from PowerPlatform.Dataverse.core.errors import HttpError
from PowerPlatform.Dataverse.models import UpsertItem
from PowerPlatform.Dataverse.models.filters import col

from devkit.sandbox.dataverse import create_app
from devkit.sandbox.dataverse.org import Organization
from loyaltysync.templates import default_mappings_dir, load_templates
from tests.sandbox.asgi_requests import AsgiAdapter, sessions_through

ORG_URL = "https://sandbox.crm.dynamics.com"
TOKEN = "generic-client-token"
CARDS = "msdyn_loyaltycard"
FORMATTED = "@OData.Community.Display.V1.FormattedValue"
AS_CARD, AS_CONTACT, NO_TENDER = 806380000, 806380001, 806380002


class StaticCredential:
    """An azure-core TokenCredential handing out the sandbox's token."""

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken(TOKEN, int(time.time()) + 3600)


@pytest.fixture
def sandbox() -> Iterator[tuple[DataverseClient, Organization, AsgiAdapter]]:
    app = create_app(token=TOKEN, public_url=ORG_URL, templates=load_templates(default_mappings_dir()))
    with sessions_through(app) as adapter, DataverseClient(ORG_URL, StaticCredential()) as client:
        yield client, app.state.dataverse, adapter


def card(number: str, tender: int) -> UpsertItem:
    return UpsertItem(alternate_key={"msdyn_cardnumber": number}, record={"msdyn_cardtendertype": tender})


def stored(org: Organization, number: str) -> dict[str, Any] | None:
    return org.tables[CARDS].find("msdyn_cardnumber", (number,))


def test_discovers_the_table_its_columns_keys_and_relationships(sandbox: Any) -> None:
    client, _, adapter = sandbox
    info = client.tables.get(CARDS)
    assert info is not None
    assert (info.entity_set_name, info.primary_id_attribute, info.primary_name_attribute) == (
        "msdyn_loyaltycards",
        "msdyn_loyaltycardid",
        "msdyn_cardnumber",
    )
    columns = {c["LogicalName"]: c for c in client.tables.list_columns(CARDS)}
    # Unfiltered, each column carries its derived type's properties, as the service answers.
    assert columns["msdyn_cardnumber"]["@odata.type"] == "#Microsoft.Dynamics.CRM.StringAttributeMetadata"
    assert columns["msdyn_cardnumber"]["MaxLength"] == 30
    assert columns["msdyn_cardnumber"]["RequiredLevel"]["Value"] == "SystemRequired"
    assert columns["msdyn_enrollmentdate"]["DateTimeBehavior"] == {"Value": "UserLocal"}
    choices = client.tables.list_columns(
        CARDS,
        select=["LogicalName", "AttributeType"],
        filter="AttributeType eq Microsoft.Dynamics.CRM.AttributeTypeCode'Picklist'",
    )
    assert [c["LogicalName"] for c in choices] == ["msdyn_cardtendertype"]
    column = client.tables.get_column(CARDS, "msdyn_cardnumber")
    assert column is not None and column["IsValidForCreate"] is True
    keys = client.tables.get_alternate_keys(CARDS)
    assert [(k.key_attributes, k.status) for k in keys] == [(["msdyn_cardnumber"], "Active")]
    relationships = client.tables.list_table_relationships("msdyn_loyaltyrewardpoint")
    currency = [r for r in relationships if r.get("ReferencingAttribute") == "msdyn_rewardpointcurrency"]
    assert currency and currency[0]["ReferencedEntity"] == "transactioncurrency"
    # The client walks all three relationship collections: each is a real path segment.
    assert {url.rsplit("/", 1)[-1] for _, url in adapter.sent if url.endswith("Relationships")} == {
        "OneToManyRelationships",
        "ManyToOneRelationships",
        "ManyToManyRelationships",
    }


def test_lists_the_organizations_tables_and_relationships(sandbox: Any) -> None:
    client, _, _ = sandbox
    custom = client.tables.list(filter="IsCustomEntity eq true", select=["LogicalName", "TableType"])
    assert {"msdyn_loyaltycard", "msdyn_loyaltylevel", "msdyn_loyaltyrewardpoint"} <= {t["LogicalName"] for t in custom}
    name = "transactioncurrency_msdyn_loyaltyrewardpoint_msdyn_rewardpointcurrency"
    relationship = client.tables.get_relationship(name)
    assert relationship is not None
    assert (relationship.referenced_entity, relationship.referencing_entity) == (
        "transactioncurrency",
        "msdyn_loyaltyrewardpoint",
    )


def test_reads_which_tables_have_upsert_multiple_from_sdk_message_filters(sandbox: Any) -> None:
    client, _, _ = sandbox
    filters = client.records.list(
        "sdkmessagefilter", select=["primaryobjecttypecode"], filter="sdkmessageid/name eq 'UpsertMultiple'"
    )
    assert CARDS in {f["primaryobjecttypecode"] for f in filters}


def test_upserts_by_alternate_key_one_request_per_row(sandbox: Any) -> None:
    client, org, adapter = sandbox
    before = len(org.tables[CARDS])
    client.records.upsert(CARDS, [card("G-1", AS_CARD)])
    client.records.upsert(CARDS, [card("G-1", NO_TENDER)])
    row = stored(org, "G-1")
    assert row is not None and row["msdyn_cardtendertype"] == NO_TENDER
    assert len(org.tables[CARDS]) == before + 1
    assert ("PATCH", f"{ORG_URL}/api/data/v9.2/msdyn_loyaltycards(msdyn_cardnumber='G-1')") in adapter.sent


def test_upserts_many_rows_with_upsert_multiple_and_in_a_batch(sandbox: Any) -> None:
    client, org, adapter = sandbox
    client.records.upsert(CARDS, [card(f"M-{i}", AS_CONTACT) for i in range(4)])
    assert all((stored(org, f"M-{i}") or {}).get("msdyn_cardtendertype") == AS_CONTACT for i in range(4))
    batch = client.batch.new()
    for i in range(3):
        batch.records.upsert(CARDS, [card(f"B-{i}", NO_TENDER)])
    batch.records.upsert(CARDS, [card("M-0", NO_TENDER)])
    result = batch.execute()
    assert [r.status_code for r in result.responses] == [204, 204, 204, 204]
    assert all((stored(org, f"B-{i}") or {}).get("msdyn_cardtendertype") == NO_TENDER for i in range(3))
    assert (stored(org, "M-0") or {}).get("msdyn_cardtendertype") == NO_TENDER
    assert [m for m, u in adapter.sent if u.endswith("/$batch")] == ["POST"]


def test_pages_with_maxpagesize_and_reads_formatted_choice_labels(sandbox: Any) -> None:
    client, _, _ = sandbox
    client.records.upsert(CARDS, [card(f"P-{i}", NO_TENDER if i % 2 else AS_CARD) for i in range(7)])
    pages = list(client.records.list_pages(CARDS, select=["msdyn_cardnumber"], page_size=3))
    assert [len(p) for p in pages] == [3, 3, 1]
    assert sorted(r["msdyn_cardnumber"] for p in pages for r in p) == sorted(f"P-{i}" for i in range(7))
    rows = list(
        client.query.builder(CARDS)
        .select("msdyn_cardnumber", "msdyn_cardtendertype")
        .where(col("msdyn_cardtendertype") == NO_TENDER)
        .include_formatted_values()
        .execute()
    )
    assert sorted(r["msdyn_cardnumber"] for r in rows) == ["P-1", "P-3", "P-5"]
    assert {r[f"msdyn_cardtendertype{FORMATTED}"] for r in rows} == {"No tender"}


def test_query_forms_the_sandbox_does_not_emulate_are_refused_not_ignored(sandbox: Any) -> None:
    """`?sql=` is real Dataverse; ignoring it would hand the client every row as if they matched."""
    client, _, _ = sandbox
    client.records.upsert(CARDS, [card("S-1", AS_CARD)])
    with pytest.raises(HttpError) as refused:
        client.query.sql("SELECT msdyn_cardnumber FROM msdyn_loyaltycard WHERE msdyn_cardnumber = 'none'")
    assert refused.value.status_code == 400


async def test_the_first_requests_of_a_generic_client_are_answered() -> None:
    """The issue's requests: a property no client of ours reads, and the OneToMany segment."""
    app = create_app(token=TOKEN, templates=load_templates(default_mappings_dir()))
    transport = httpx.ASGITransport(app=app)
    base = "http://localhost/api/data/v9.2/EntityDefinitions(LogicalName='msdyn_loyaltycard')"
    async with httpx.AsyncClient(transport=transport, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        entity = await http.get(f"{base}?$select=EntitySetName,PrimaryIdAttribute,PrimaryImageAttribute")
        assert entity.status_code == 200, entity.text
        assert entity.json()["PrimaryImageAttribute"] is None
        assert set(entity.json()) == {
            "@odata.context", "EntitySetName", "PrimaryIdAttribute", "PrimaryImageAttribute", "MetadataId"
        }
        one_to_many = await http.get(f"{base}/OneToManyRelationships?$select=SchemaName,ReferencingEntity")
        assert one_to_many.status_code == 200, one_to_many.text
        unknown = await http.get(f"{base}?$select=EntitySetName,NoSuchProperty")
        assert unknown.status_code == 400
        assert unknown.json()["error"]["message"] == (
            "Could not find a property named 'NoSuchProperty' on type 'Microsoft.Dynamics.CRM.EntityMetadata'."
        )
