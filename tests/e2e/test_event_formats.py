"""Every inbound wire format end to end: F&O data events (RemoteExecutionContext), business events,
Event Grid (with its validation handshake), and Dataverse's reduced over-256-KB webhook."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.e2e.conftest import E2E, Observed

pytestmark = pytest.mark.e2e

CARDS = "loyalty-cards"
FO_CARDS, DV_CARDS = "RetailLoyaltyCards", "msdyn_loyaltycards"
BUSINESS_EVENT_ID = "LoyaltyCardChangedBusinessEvent"
CARDS_VIRTUAL_TABLE = "mserp_retailloyaltycardentity"
DATA_EVENT_MESSAGES = ("OnExternalCreated", "OnExternalUpdated", "OnExternalDeleted")


async def _card_data_event_steps(e2e: E2E) -> list[dict[str, Any]]:
    """The steps `register-webhooks` put on the cards' virtual table (OnExternalCreated/Updated/Deleted)."""
    names = [f"loyaltysync: {message} of {CARDS_VIRTUAL_TABLE}" for message in DATA_EVENT_MESSAGES]
    where = " or ".join(f"name eq '{name}'" for name in names)
    steps: list[dict[str, Any]] = []
    async for page in e2e.dv.query("sdkmessageprocessingsteps", select=["sdkmessageprocessingstepid"], filter=where):
        steps.extend(page)
    return steps


async def _card_data_events_in_fo(e2e: E2E) -> list[dict[str, Any]]:
    listed = (await e2e.fo_admin.get("/_admin/subscriptions")).json()["value"]
    return [s for s in listed if s["entity_set"] == FO_CARDS and s["format"] == "data-event"]


@pytest.fixture
async def business_events_only(e2e: E2E) -> AsyncIterator[E2E]:
    """F&O card changes delivered as business events instead of data events; restored afterwards.

    As in Power Platform, disabling the steps on the cards' virtual table deactivates the
    data events in F&O; the business events then go straight to the function's HTTPS route.
    """
    steps = await _card_data_event_steps(e2e)
    assert len(steps) == 3, "register-webhooks puts three steps on every template's virtual table"
    for step in steps:
        await e2e.dv.update_by_id(
            "sdkmessageprocessingsteps", step["sdkmessageprocessingstepid"], {"statecode": 1, "statuscode": 2}
        )
    assert await _card_data_events_in_fo(e2e) == []
    added = await e2e.fo_admin.post(
        "/_admin/subscriptions",
        json={
            "entity_set": FO_CARDS,
            "url": f"{e2e.stack.function_url}/api/fo/{CARDS}?code={e2e.function_key}",
            "format": "business-event",
        },
    )
    assert added.status_code == 201, added.text
    try:
        yield e2e
    finally:
        await e2e.settle()
        await e2e.fo_admin.delete(f"/_admin/subscriptions/{added.json()['id']}")
        for step in steps:
            await e2e.dv.update_by_id(
                "sdkmessageprocessingsteps", step["sdkmessageprocessingstepid"], {"statecode": 0, "statuscode": 1}
            )
        assert [s["events"] for s in await _card_data_events_in_fo(e2e)] == [["Created", "Updated", "Deleted"]]


async def test_fo_data_events_as_remote_execution_context(e2e: E2E, observed: Observed) -> None:
    key = e2e.key("DEV")
    await e2e.fo.create(FO_CARDS, {"CardNumber": key, "PartyNumber": "P-1"})
    await e2e.dv_has(CARDS, key, {"PartyNumber": "P-1"})
    await e2e.fo.update(FO_CARDS, {"CardNumber": key}, {"PartyNumber": "P-2"})
    await e2e.dv_has(CARDS, key, {"PartyNumber": "P-2"})
    await e2e.fo.delete(FO_CARDS, {"CardNumber": key})
    await e2e.eventually(lambda: e2e.dv_row(CARDS, key), lambda row: row is None, f"{key} deleted in Dataverse")
    await e2e.settle()
    fo_events = observed.events(CARDS, key, "fo")
    assert {e.wire_format for e in fo_events} == {"fo-data-event"}
    assert {e.operation for e in fo_events} == {"create", "update", "delete"}
    # They came the Power Platform way: F&O -> the Dataverse virtual table -> the registered steps' webhooks.
    [subscription] = await _card_data_events_in_fo(e2e)
    assert subscription["url"] == f"{e2e.stack.dataverse.url}/_admin/fno/data-events"
    deliveries = (await e2e.dv_admin.get("/_admin/webhooks/log", params={"limit": "1000"})).json()["deliveries"]
    through_dataverse = {d["message"] for d in deliveries if d["table"] == CARDS_VIRTUAL_TABLE}
    assert through_dataverse == set(DATA_EVENT_MESSAGES)
    assert {d["url"] for d in deliveries if d["table"] == CARDS_VIRTUAL_TABLE} == {
        f"{e2e.stack.function_url}/api/fo/{CARDS}"
    }


async def test_fo_business_events(business_events_only: E2E, observed: Observed) -> None:
    e2e = business_events_only
    key = e2e.key("BEV")
    await e2e.fo.create(FO_CARDS, {"CardNumber": key, "PartyNumber": "P-1"})
    await e2e.dv_has(CARDS, key, {"PartyNumber": "P-1"})
    await e2e.fo.update(FO_CARDS, {"CardNumber": key}, {"PartyNumber": "P-2", "CardTenderType": "Blocked"})
    await e2e.dv_has(CARDS, key, {"PartyNumber": "P-2", "CardTenderType": "Blocked"})
    await e2e.fo.delete(FO_CARDS, {"CardNumber": key})
    await e2e.eventually(lambda: e2e.dv_row(CARDS, key), lambda row: row is None, f"{key} deleted in Dataverse")
    await e2e.settle()
    fo_events = observed.events(CARDS, key, "fo")
    assert {e.wire_format for e in fo_events} == {"fo-business-event"}
    # Business events carry F&O's ControlNumber, which the engine uses against duplicates.
    assert all(e.source_version and e.source_version.isdigit() for e in fo_events)


def _business_event(key: str, change_type: str) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "BusinessEventId": BUSINESS_EVENT_ID,
        "BusinessEventLegalEntity": "USRT",
        "ContextRecordSubject": "",
        "ControlNumber": 5637611083 + int(now.timestamp()),
        "EventId": str(uuid.uuid4()).upper(),
        "EventTime": f"/Date({int(now.timestamp() * 1000)})/",
        "EventTimeIso8601": now.isoformat().replace("+00:00", "Z"),
        "InitiatingUserAADObjectId": "{" + str(uuid.uuid4()).upper() + "}",
        "MajorVersion": 1,
        "MinorVersion": 0,
        "ParentContextRecordSubjects": [],
        "EntityName": FO_CARDS,
        "ChangeType": change_type,
        "CardNumber": key,
    }


def _event_grid(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "id": str(uuid.uuid4()),
            "eventType": data["BusinessEventId"],
            "subject": f"/{FO_CARDS}/{data['CardNumber']}",
            "data": data,
            "dataVersion": "1.0",
            "metadataVersion": "1",
            "eventTime": data["EventTimeIso8601"],
            "topic": "/subscriptions/0000/resourceGroups/rg/providers/Microsoft.EventGrid/topics/fno-loyalty",
        }
    ]


async def test_event_grid_delivery_of_a_business_event(e2e: E2E, observed: Observed) -> None:
    """A card that only Event Grid announces: seeded in F&O without any event, then posted as Event Grid."""
    key = e2e.key("EVG")
    seeded = await e2e.fo_admin.post(
        f"/_admin/entities/{FO_CARDS}/rows", json={"rows": [{"CardNumber": key, "PartyNumber": "P-EG"}]}
    )
    assert seeded.status_code == 200, seeded.text

    url = f"/api/fo/{CARDS}"
    answer = await e2e.app.post(
        url,
        params={"code": e2e.function_key},
        json=_event_grid(_business_event(key, "Created")),
        headers={"aeg-event-type": "Notification"},
    )
    assert answer.status_code == 202, answer.text
    assert answer.json()["accepted"] == 1
    await e2e.dv_has(CARDS, key, {"PartyNumber": "P-EG"})
    await e2e.settle()  # the worker reports to observers just after its write
    assert {e.wire_format for e in observed.events(CARDS, key, "fo")} == {"event-grid"}


async def test_event_grid_subscription_validation_handshake(e2e: E2E) -> None:
    code = str(uuid.uuid4())
    answer = await e2e.app.post(
        f"/api/fo/{CARDS}",
        params={"code": e2e.function_key},
        headers={"aeg-event-type": "SubscriptionValidation"},
        json=[
            {
                "id": str(uuid.uuid4()),
                "topic": "/subscriptions/0000/resourceGroups/rg/providers/Microsoft.EventGrid/topics/fno-loyalty",
                "subject": "",
                "data": {"validationCode": code, "validationUrl": "https://rp-eastus.eventgrid.azure.net/validate"},
                "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent",
                "eventTime": datetime.now(UTC).isoformat(),
                "metadataVersion": "1",
                "dataVersion": "2",
            }
        ],
    )
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"validationResponse": code}


async def test_reduced_dataverse_webhook_over_256_kb_is_re_read(e2e: E2E, observed: Observed) -> None:
    """With the size limit lowered, every webhook is the reduced form (x-ms-dynamics-msg-size-exceeded,
    no InputParameters or images): the function app must re-read the row by id."""
    dispatcher = e2e.stack.dataverse.app.state.webhooks
    limit = dispatcher.size_limit
    key = e2e.key("BIG")
    dispatcher.size_limit = 1024
    try:
        body = e2e.dv_body(CARDS, {"CardNumber": key, "PartyNumber": "P-1", "CardTenderType": "NoTender"})
        await e2e.agent.create(DV_CARDS, body)
        await e2e.fo_has(CARDS, key, {"PartyNumber": "P-1", "CardTenderType": "NoTender"})
        await e2e.settle()
        await e2e.agent.upsert(DV_CARDS, {"msdyn_cardnumber": key}, {"msdyn_partynumber": "P-2"}, mode="update")
        await e2e.fo_has(CARDS, key, {"PartyNumber": "P-2"})
        await e2e.settle()
        await e2e.agent.delete_by_key(DV_CARDS, {"msdyn_cardnumber": key})
        await e2e.eventually(lambda: e2e.fo_row(CARDS, key), lambda row: row is None, f"{key} deleted in F&O")
        await e2e.settle()
    finally:
        dispatcher.size_limit = limit
    dv_events = observed.events(CARDS, key, "dataverse")
    assert {e.operation for e in dv_events} == {"create", "update", "delete"}
    # The reduced form carries ids only: the events had no field values to go on.
    assert all(not e.complete and not e.fields for e in dv_events)
    row_ids = {e.row_id for e in dv_events}
    deliveries = (await e2e.dv_admin.get("/_admin/webhooks/log", params={"limit": "1000"})).json()["deliveries"]
    ours = [d for d in deliveries if d["row_id"] in row_ids]
    assert {d["message"] for d in ours} == {"Create", "Update", "Delete"}
    assert all(d["reduced"] for d in ours)
