"""Contract tests of the F&O emulator's change events: business events (B3) and data events (B2)."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from devkit.sandbox.fno import create_app
from loyaltysync.templates import default_mappings_dir, load_templates, parse_template

TOKEN = "fno-test-token"
BASE = "https://fno.test"
CUSTOMERS = Path(__file__).parent.parent / "fixtures" / "templates" / "company-customers.json"
GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
ENVELOPE_KEYS = {
    "BusinessUnitId", "CorrelationId", "Depth", "InitiatingUserId", "InputParameters", "IsExecutingOffline",
    "IsInTransaction", "IsOfflinePlayback", "IsolationMode", "MessageName", "Mode", "OperationCreatedOn",
    "OperationId", "OrganizationId", "OrganizationName", "OutputParameters", "OwningExtension", "ParentContext",
    "PostEntityImages", "PreEntityImages", "PrimaryEntityId", "PrimaryEntityName", "RequestId",
    "SecondaryEntityName", "SharedVariables", "Stage", "UserId",
}


@dataclass
class Env:
    app: Starlette
    client: httpx.AsyncClient
    received: list[tuple[str, dict[str, str], dict[str, Any]]] = field(default_factory=list)

    async def subscribe(self, **body: Any) -> str:
        body.setdefault("url", f"http://receiver/{body.get('format', 'business-event')}")
        response = await self.client.post("/_admin/subscriptions", json=body)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    async def events(self) -> list[tuple[str, dict[str, str], dict[str, Any]]]:
        await self.app.state.sandbox.delivery.drain(5)
        out, self.received[:] = list(self.received), []
        return out


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    templates = dict(load_templates(default_mappings_dir()))
    customers = parse_template(CUSTOMERS.read_text(), str(CUSTOMERS))
    templates[customers.name] = customers
    app = create_app(token=TOKEN, seed=5, templates=templates, public_url=BASE)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE,
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        env = Env(app, client)

        async def hook(request: Request) -> Response:
            env.received.append((request.url.path, dict(request.headers), json.loads(await request.body())))
            return Response(status_code=200)

        receiver = Starlette(routes=[Route("/{name}", hook, methods=["POST"])])
        app.state.sandbox.delivery.client_factory = lambda: httpx.AsyncClient(
            transport=httpx.ASGITransport(app=receiver))
        yield env


def attributes(entity: dict[str, Any]) -> dict[str, Any]:
    return {a["key"]: a["value"] for a in entity["Attributes"]}


def parameter(collection: list[dict[str, Any]], key: str) -> dict[str, Any]:
    return next(p["value"] for p in collection if p["key"] == key)


async def test_business_events_carry_the_b3_envelope_and_the_change(env: Env) -> None:
    await env.subscribe(entity_set="RetailLoyaltyCards", format="business-event", headers={"x-hook-key": "k"})
    await env.client.post("/data/RetailLoyaltyCards", json={"CardNumber": "C-1"})
    await env.client.patch("/data/RetailLoyaltyCards('C-1')", json={"PartyNumber": "7"})
    await env.client.delete("/data/RetailLoyaltyCards('C-1')")
    received = await env.events()
    assert [body["ChangeType"] for _, _, body in received] == ["Created", "Updated", "Deleted"]
    _, headers, first = received[0]
    assert headers["content-type"] == "application/json" and headers["x-hook-key"] == "k"
    assert list(first)[:11] == [
        "BusinessEventId", "BusinessEventLegalEntity", "ContextRecordSubject", "ControlNumber", "EventId",
        "EventTime", "EventTimeIso8601", "InitiatingUserAADObjectId", "MajorVersion", "MinorVersion",
        "ParentContextRecordSubjects"]
    assert first["BusinessEventId"] == "LoyaltyCardChangedBusinessEvent"
    assert first["BusinessEventLegalEntity"] == "USRT"  # shared entity: the default company, upper case
    assert first["ContextRecordSubject"] == "" and first["ParentContextRecordSubjects"] == []
    assert first["MajorVersion"] == 1 and first["MinorVersion"] == 0
    assert re.fullmatch(r"[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}", first["EventId"])
    assert re.fullmatch(r"\{[0-9A-F-]{36}\}", first["InitiatingUserAADObjectId"])
    assert re.fullmatch(r"/Date\(\d{13}\)/", first["EventTime"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{7}Z", first["EventTimeIso8601"])
    assert first["EntityName"] == "RetailLoyaltyCards" and first["CardNumber"] == "C-1"
    numbers = [body["ControlNumber"] for _, _, body in received]
    assert numbers == sorted(numbers) and len(set(numbers)) == 3
    assert len({body["EventId"] for _, _, body in received}) == 3


async def test_default_business_event_ids_and_company_specific_legal_entity(env: Env) -> None:
    for entity_set in ("LoyaltyLevels", "RetailLoyaltyRewardPoints", "CustomersV3"):
        await env.subscribe(entity_set=entity_set)
    await env.subscribe(entity_set="LoyaltyLevels", business_event_id="CustomLevelEvent")
    await env.client.post("/data/LoyaltyLevels", json={"LevelPhrase": "Gold"})
    await env.client.post("/data/RetailLoyaltyRewardPoints", json={"RewardPointId": "P-1"})
    await env.client.post("/data/CustomersV3", json={"dataAreaId": "usmf", "CustomerAccount": "A-1"})
    ids = {(body["BusinessEventId"], body["EntityName"]): body for _, _, body in await env.events()}
    assert set(ids) == {
        ("LoyaltyLevelChangedBusinessEvent", "LoyaltyLevels"), ("CustomLevelEvent", "LoyaltyLevels"),
        ("LoyaltyRewardPointChangedBusinessEvent", "RetailLoyaltyRewardPoints"),
        ("CustomerV3ChangedBusinessEvent", "CustomersV3"),
    }
    customer = ids[("CustomerV3ChangedBusinessEvent", "CustomersV3")]
    assert customer["BusinessEventLegalEntity"] == "USMF"
    assert customer["dataAreaId"] == "usmf" and customer["CustomerAccount"] == "A-1"


async def test_data_events_are_remote_execution_contexts_of_the_virtual_table(env: Env) -> None:
    await env.subscribe(entity_set="RetailLoyaltyCards", format="data-event")
    await env.client.post("/data/RetailLoyaltyCards", json={
        "CardNumber": "C-9", "CardTenderType": "Blocked", "PartyNumber": "004021",
        "LoyaltyEnrollmentDate": "2026-07-15T10:00:00Z"})
    [(_, headers, created)] = await env.events()
    assert set(created) == ENVELOPE_KEYS
    assert created["MessageName"] == "OnExternalCreated"
    assert created["PrimaryEntityName"] == "mserp_retailloyaltycardentity"
    assert created["Stage"] == 40 and created["Mode"] == 1 and created["Depth"] == 1
    assert GUID.match(created["PrimaryEntityId"]) and GUID.match(created["CorrelationId"])
    assert created["OwningExtension"]["LogicalName"] == "sdkmessageprocessingstep"
    assert headers["x-ms-dynamics-entity-name"] == "mserp_retailloyaltycardentity"
    assert headers["x-ms-dynamics-request-name"] == "OnExternalCreated"
    assert headers["x-ms-correlation-request-id"] == created["CorrelationId"]
    assert GUID.match(headers["x-request-id"])
    target = parameter(created["InputParameters"], "Target")
    assert target["__type"].startswith("Entity:") and target["LogicalName"] == "mserp_retailloyaltycardentity"
    values = attributes(target)
    assert values["mserp_cardnumber"] == "C-9" and values["mserp_partynumber"] == "004021"
    assert values["mserp_primaryfield"] == "C-9"
    assert values["mserp_retailloyaltycardentityid"] == created["PrimaryEntityId"] == target["Id"]
    assert values["mserp_loyaltyenrollmentdate"] == "/Date(1784109600000)/"
    assert "mserp_loyaltyenrollmentdatelocal" not in values  # empty (1900-01-01) dates are dropped
    tender = values["mserp_cardtendertype"]
    assert tender["__type"].startswith("OptionSetValue:")
    # Neither F&O's enum value (3) nor the Dataverse msdyn choice (806380003): virtual-table integers differ.
    assert tender["Value"] not in (3, 806380003)
    assert tender["Value"] == 200_000_003
    assert created["PreEntityImages"] == []

    await env.client.patch("/data/RetailLoyaltyCards('C-9')", json={"CardTenderType": "NoTender"})
    [(_, headers, updated)] = await env.events()
    assert updated["MessageName"] == headers["x-ms-dynamics-request-name"] == "OnExternalUpdated"
    changed = attributes(parameter(updated["InputParameters"], "Target"))
    assert changed["mserp_cardtendertype"]["Value"] == 200_000_002
    assert "mserp_partynumber" not in changed  # Target holds the submitted columns (and the key)
    assert changed["mserp_cardnumber"] == "C-9"
    before = attributes(parameter(updated["PreEntityImages"], "PreImage"))
    assert before["mserp_cardtendertype"]["Value"] == 200_000_003 and before["mserp_partynumber"] == "004021"

    await env.client.delete("/data/RetailLoyaltyCards('C-9')")
    [(_, _, deleted)] = await env.events()
    assert deleted["MessageName"] == "OnExternalDeleted"
    reference = parameter(deleted["InputParameters"], "Target")
    assert reference["__type"].startswith("EntityReference:") and reference["Id"] == created["PrimaryEntityId"]
    assert attributes(parameter(deleted["PreEntityImages"], "PreImage"))["mserp_primaryfield"] == "C-9"


async def test_data_events_of_company_specific_entities_carry_the_company(env: Env) -> None:
    await env.subscribe(entity_set="CustomersV3", format="data-event", events=["Updated"])
    await env.client.post("/data/CustomersV3", json={"CustomerAccount": "A-1", "CreditLimit": 5})
    await env.client.patch("/data/CustomersV3(dataAreaId='usrt',CustomerAccount='A-1')", json={"CreditLimit": 7.5})
    [(_, _, updated)] = await env.events()  # the create was not subscribed to
    assert updated["PrimaryEntityName"] == "mserp_customerv3entity"
    values = attributes(parameter(updated["InputParameters"], "Target"))
    assert values["mserp_dataareaid"] == "usrt" and values["mserp_primaryfield"] == "usrt|A-1"
    assert values["mserp_creditlimit"] == 7.5


async def test_only_committed_api_writes_raise_events_and_subscriptions_can_be_removed(env: Env) -> None:
    subscription = await env.subscribe(entity_set="LoyaltyLevels")
    seeded = await env.client.post("/_admin/entities/LoyaltyLevels/rows", json={"rows": [{"LevelPhrase": "S"}]})
    assert seeded.json()["inserted"] == 1
    assert (await env.client.post("/data/LoyaltyLevels", json={"LevelPhrase": "S"})).status_code == 500
    assert (await env.client.patch("/data/LoyaltyLevels('NONE')", json={"LevelDescription": "x"})).status_code == 404
    assert await env.events() == []
    listed = (await env.client.get("/_admin/subscriptions")).json()["value"]
    assert [s["id"] for s in listed] == [subscription]
    assert listed[0]["events"] == ["Created", "Updated", "Deleted"]
    assert (await env.client.delete(f"/_admin/subscriptions/{subscription}")).status_code == 204
    assert (await env.client.delete(f"/_admin/subscriptions/{subscription}")).status_code == 404
    await env.client.post("/data/LoyaltyLevels", json={"LevelPhrase": "T"})
    assert await env.events() == []
    bad = await env.client.post("/_admin/subscriptions", json={"entity_set": "Nope", "url": "http://x/"})
    assert bad.status_code == 400
    bad_format = await env.client.post("/_admin/subscriptions", json={
        "entity_set": "LoyaltyLevels", "url": "http://x/", "format": "soap"})
    assert bad_format.status_code == 400
