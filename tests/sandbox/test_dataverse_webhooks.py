"""Dataverse emulator contract: webhook registration and the RemoteExecutionContext it delivers (§1.11, B1).

The shape is checked against the sample the "Use webhooks" article documents
(powerapps-docs developer/data-platform/use-webhooks.md), reproduced below
with its long SharedVariables list cut to one entry.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from devkit.sandbox.dataverse import AGENT_USER, CURRENCY_IDS, INTEGRATION_USER, create_app
from devkit.sandbox.dataverse.org import Organization

TOKEN = "dv-hook-token"
BASE = "http://localhost/api/data/v9.2/"
HOOK = "https://receiver.example/api/hook"
_REF = {
    "__type": "EntityReference:http://schemas.microsoft.com/xrm/2011/Contracts",
    "Id": "75c2dd85-e89e-e711-8122-000d3aa2331c",
    "KeyAttributes": [],
    "LogicalName": "systemuser",
    "Name": None,
    "RowVersion": None,
}
_ENTITY = {
    "__type": "Entity:http://schemas.microsoft.com/xrm/2011/Contracts",
    "Attributes": [{"key": "firstname", "value": "James"}, {"key": "modifiedby", "value": _REF}],
    "EntityState": None,
    "FormattedValues": [],
    "Id": "6d81597f-0f9f-e711-8122-000d3aa2331c",
    "KeyAttributes": [],
    "LogicalName": "contact",
    "RelatedEntities": [],
    "RowVersion": None,
}
_OWNING = {
    "Id": "75417616-4ea2-e711-8122-000d3aa2331c",
    "KeyAttributes": [],
    "LogicalName": "sdkmessageprocessingstep",
    "Name": None,
    "RowVersion": None,
}
_COMMON = {
    "BusinessUnitId": "e2b9dd85-e89e-e711-8122-000d3aa2331c",
    "CorrelationId": "b374239d-4233-41a9-8b17-a86cb4f737b5",
    "Depth": 1,
    "InitiatingUserId": "75c2dd85-e89e-e711-8122-000d3aa2331c",
    "IsExecutingOffline": False,
    "IsInTransaction": False,
    "IsOfflinePlayback": False,
    "IsolationMode": 1,
    "MessageName": "Update",
    "Mode": 1,
    "OperationCreatedOn": "/Date(1506409448000-0700)/",
    "OperationId": "4af10637-4ea2-e711-8122-000d3aa2331c",
    "OrganizationId": "4ef5b371-e89e-e711-8122-000d3aa2331c",
    "OrganizationName": "OrgName",
    "OutputParameters": [],
    "OwningExtension": _OWNING,
    "PrimaryEntityId": "6d81597f-0f9f-e711-8122-000d3aa2331c",
    "PrimaryEntityName": "contact",
    "RequestId": None,
    "SecondaryEntityName": "none",
    "UserId": "75c2dd85-e89e-e711-8122-000d3aa2331c",
}
DOCUMENTED_SAMPLE: dict[str, Any] = {
    **_COMMON,
    "InputParameters": [{"key": "Target", "value": _ENTITY}],
    "ParentContext": {
        **_COMMON,
        "InputParameters": [{"key": "Target", "value": _ENTITY}, {"key": "SuppressDuplicateDetection", "value": False}],
        "ParentContext": None,
        "PostEntityImages": [],
        "PreEntityImages": [],
        "SharedVariables": [
            {
                "key": "ChangedEntityTypes",
                "value": [
                    {
                        "__type": "KeyValuePairOfstringstring:#System.Collections.Generic",
                        "key": "contact",
                        "value": "Update",
                    },
                ],
            }
        ],
        "Stage": 30,
    },
    "PostEntityImages": [
        {
            "key": "AsynchronousStepPrimaryName",
            "value": {
                "Attributes": [{"key": "fullname", "value": "James Glynn (sample)"}],
                "EntityState": None,
                "FormattedValues": [],
                "Id": "6d81597f-0f9f-e711-8122-000d3aa2331c",
                "KeyAttributes": [],
                "LogicalName": "contact",
                "RelatedEntities": [],
                "RowVersion": None,
            },
        }
    ],
    "PreEntityImages": [],
    "SharedVariables": [],
    "Stage": 40,
}


def kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "bool", int: "number", float: "number", str: "string", list: "list", dict: "object"}[type(value)]


def assert_same_shape(ours: dict[str, Any], sample: dict[str, Any], where: str) -> None:
    assert set(ours) == set(sample), f"{where}: keys differ: {set(ours) ^ set(sample)}"
    for key, value in sample.items():
        if value is None:  # null in the sample: a name or version that may be filled in
            assert kind(ours[key]) in ("null", "string"), f"{where}.{key}: {kind(ours[key])}"
            continue
        assert kind(ours[key]) == kind(value), f"{where}.{key}: {kind(ours[key])} != {kind(value)}"


@dataclass
class Receiver:
    """An in-process webhook endpoint that records what it gets and answers from `statuses` (then 200)."""

    statuses: list[int] = field(default_factory=list)
    calls: list[tuple[httpx.URL, dict[str, str], bytes]] = field(default_factory=list)
    org: Organization | None = None
    committed: list[bool] = field(default_factory=list)

    def app(self) -> Starlette:
        async def hook(request: Request) -> Response:
            body = await request.body()
            self.calls.append((httpx.URL(str(request.url)), dict(request.headers), body))
            if self.org is not None:
                payload = json.loads(body)
                table = self.org.tables[payload["PrimaryEntityName"]]
                row = table.get(payload["PrimaryEntityId"])
                self.committed.append(row is not None or payload["MessageName"] == "Delete")
            return Response(status_code=self.statuses.pop(0) if self.statuses else 200)

        return Starlette(routes=[Route("/{path:path}", hook, methods=["POST"])])

    def contexts(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, _, body in self.calls]


@pytest.fixture
def receiver() -> Receiver:
    return Receiver()


@pytest.fixture
async def dv(receiver: Receiver) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    receiving = receiver.app()
    app = create_app(
        token=TOKEN,
        client_factory=lambda: httpx.AsyncClient(transport=httpx.ASGITransport(app=receiving)),
    )
    receiver.org = app.state.dataverse
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        yield app, c
    await app.state.sandbox.delivery.aclose()


async def register(
    client: httpx.AsyncClient,
    message: str,
    table: str,
    *,
    url: str = HOOK,
    authtype: int = 4,
    authvalue: str = "k3y",
    filtering: str | None = None,
    images: Iterable[tuple[str, int, str | None]] = (),
) -> str:
    """Register a webhook the way docs/wire-formats.md §1.11 describes; returns the step id."""
    prefer = {"Prefer": "return=representation"}
    endpoint = await client.post(
        "serviceendpoints",
        headers=prefer,
        json={
            "name": f"hook {message} {table}",
            "url": url,
            "contract": 8,
            "authtype": authtype,
            "authvalue": authvalue,
            "messageformat": 2,
        },
    )
    assert endpoint.status_code == 201, endpoint.text
    message_id = (await client.get(f"sdkmessages?$filter=name eq '{message}'&$select=sdkmessageid")).json()["value"][0][
        "sdkmessageid"
    ]
    filter_id = (
        await client.get(
            f"sdkmessagefilters?$filter=sdkmessageid/name eq '{message}' and primaryobjecttypecode eq '{table}'"
            "&$select=sdkmessagefilterid"
        )
    ).json()["value"][0]["sdkmessagefilterid"]
    step: dict[str, Any] = {
        "name": f"loyaltysync: {message} of {table}",
        "mode": 1,
        "stage": 40,
        "rank": 1,
        "supporteddeployment": 0,
        "asyncautodelete": True,
        "eventhandler_serviceendpoint@odata.bind": f"/serviceendpoints({endpoint.json()['serviceendpointid']})",
        "sdkmessageid@odata.bind": f"/sdkmessages({message_id})",
        "sdkmessagefilterid@odata.bind": f"/sdkmessagefilters({filter_id})",
    }
    if filtering is not None:
        step["filteringattributes"] = filtering
    created = await client.post("sdkmessageprocessingsteps", json=step, headers=prefer)
    assert created.status_code == 201, created.text
    step_id: str = created.json()["sdkmessageprocessingstepid"]
    for alias, image_type, attributes in images:
        image = await client.post(
            "sdkmessageprocessingstepimages",
            json={
                "name": alias,
                "entityalias": alias,
                "imagetype": image_type,
                "messagepropertyname": "Id" if message == "Create" else "Target",
                "attributes": attributes,
                "sdkmessageprocessingstepid@odata.bind": f"/sdkmessageprocessingsteps({step_id})",
            },
        )
        assert image.status_code == 204, image.text
    return step_id


async def drain(app: Starlette) -> None:
    await app.state.sandbox.delivery.drain(5)


def attributes(entity: dict[str, Any]) -> dict[str, Any]:
    return {pair["key"]: pair["value"] for pair in entity["Attributes"]}


def formatted(entity: dict[str, Any]) -> dict[str, Any]:
    return {pair["key"]: pair["value"] for pair in entity["FormattedValues"]}


# -- the documented shape -------------------------------------------------------------------


async def test_update_context_has_the_documented_shape_and_only_the_submitted_columns(
    dv: tuple[Starlette, httpx.AsyncClient],
    receiver: Receiver,
) -> None:
    app, client = dv
    step_id = await register(
        client,
        "Update",
        "msdyn_loyaltycard",
        filtering="msdyn_partynumber,msdyn_cardtendertype",
        images=[("PreImage", 0, "msdyn_partynumber,msdyn_cardnumber"), ("PostImage", 1, None)],
    )
    await client.post(
        "msdyn_loyaltycards",
        json={"msdyn_cardnumber": "W-1", "msdyn_partynumber": "P-old", "msdyn_cardtendertype": 806380000},
    )
    response = await client.patch(
        "msdyn_loyaltycards(msdyn_cardnumber='W-1')",
        json={"msdyn_partynumber": "P-new"},
        headers={"CallerObjectId": AGENT_USER.azureactivedirectoryobjectid},
    )
    assert response.status_code == 204
    await drain(app)
    [context] = receiver.contexts()
    row = app.state.dataverse.tables["msdyn_loyaltycard"].find("msdyn_cardnumber", ("W-1",))

    assert_same_shape(context, DOCUMENTED_SAMPLE, "context")
    assert_same_shape(context["ParentContext"], DOCUMENTED_SAMPLE["ParentContext"], "ParentContext")
    assert_same_shape(context["OwningExtension"], _OWNING, "OwningExtension")
    target = context["InputParameters"][0]["value"]
    assert context["InputParameters"][0]["key"] == "Target"
    assert_same_shape(target, _ENTITY, "Target")
    assert (context["MessageName"], context["PrimaryEntityName"]) == ("Update", "msdyn_loyaltycard")
    assert context["PrimaryEntityId"] == target["Id"] == row["msdyn_loyaltycardid"]
    assert (context["Mode"], context["Stage"], context["Depth"]) == (1, 40, 1)
    assert context["UserId"] == context["InitiatingUserId"] == AGENT_USER.systemuserid
    assert context["OwningExtension"]["Id"] == step_id
    # Target: the submitted column, the id and the platform's modified stamp; nothing else.
    assert set(attributes(target)) == {
        "msdyn_partynumber",
        "msdyn_loyaltycardid",
        "modifiedon",
        "modifiedby",
        "modifiedonbehalfby",
    }
    assert attributes(target)["msdyn_partynumber"] == "P-new"
    assert attributes(target)["modifiedby"]["Id"] == AGENT_USER.systemuserid
    assert attributes(target)["modifiedby"]["Name"] == "Alex Agent"
    assert_same_shape(attributes(target)["modifiedby"], _REF, "EntityReference")
    assert target["KeyAttributes"] == [{"key": "msdyn_cardnumber", "value": "W-1"}]
    # Images: only their attributes (plus the id), no __type, as in the sample.
    [pre] = context["PreEntityImages"]
    [post] = context["PostEntityImages"]
    assert pre["key"] == "PreImage" and post["key"] == "PostImage"
    assert_same_shape(pre["value"], DOCUMENTED_SAMPLE["PostEntityImages"][0]["value"], "PreImage")
    assert attributes(pre["value"]) == {
        "msdyn_partynumber": "P-old",
        "msdyn_cardnumber": "W-1",
        "msdyn_loyaltycardid": row["msdyn_loyaltycardid"],
    }
    post_attributes = attributes(post["value"])
    assert post_attributes["msdyn_partynumber"] == "P-new"
    assert post_attributes["msdyn_cardtendertype"] == {
        "__type": "OptionSetValue:http://schemas.microsoft.com/xrm/2011/Contracts",
        "Value": 806380000,
    }
    assert "msdyn_replacementcardnumber" not in post_attributes  # null columns are not in an image
    assert formatted(post["value"])["msdyn_cardtendertype"] == "As card tender"
    assert post_attributes["versionnumber"] == row["versionnumber"]
    assert context["ParentContext"]["Stage"] == 30
    assert receiver.committed == [True]


async def test_delivery_headers_and_webhook_key(dv: tuple[Starlette, httpx.AsyncClient], receiver: Receiver) -> None:
    app, client = dv
    await register(client, "Create", "msdyn_loyaltylevel", authvalue="s3cr3t/+=")
    await client.post("msdyn_loyaltylevels", json={"msdyn_levelphrase": "Gold"})
    await drain(app)
    [(url, headers, body)] = receiver.calls
    assert url.path == "/api/hook"
    assert parse_qs(urlsplit(str(url)).query) == {"code": ["s3cr3t/+="]}
    context = json.loads(body)
    assert headers["x-ms-dynamics-organization"] == "localhost"
    assert headers["x-ms-dynamics-entity-name"] == "msdyn_loyaltylevel"
    assert headers["x-ms-dynamics-request-name"] == "create"
    assert headers["x-ms-correlation-request-id"] == context["CorrelationId"]
    assert headers["x-request-id"]
    assert headers["content-type"] == "application/json"
    assert "x-ms-dynamics-msg-size-exceeded" not in headers
    for value in (headers[h] for h in headers if h.startswith("x-ms-") or h == "x-request-id"):
        assert value == value.lower()


async def test_create_context_types_its_values_and_returns_the_id(
    dv: tuple[Starlette, httpx.AsyncClient],
    receiver: Receiver,
) -> None:
    app, client = dv
    await register(client, "Create", "msdyn_loyaltyrewardpoint", images=[("PostImage", 1, None)])
    await register(client, "Create", "msdyn_loyaltycard")
    await client.post(
        "msdyn_loyaltyrewardpoints",
        json={
            "msdyn_rewardpointid": "RP-1",
            "msdyn_rewardpointtype": 192350001,
            "msdyn_redeemable": False,
            "msdyn_redeemranking": 2,
            "msdyn_maximumloyaltyrewardpoints": 12.5,
            "msdyn_expirationtimeunit": None,
            "msdyn_rewardpointcurrency@odata.bind": "/transactioncurrencies(isocurrencycode='EUR')",
        },
    )
    await client.post(
        "msdyn_loyaltycards", json={"msdyn_cardnumber": "D-1", "msdyn_enrollmentdate": "2026-01-02T03:04:05Z"}
    )
    await drain(app)
    points, card = receiver.contexts()
    target = points["InputParameters"][0]["value"]
    values = attributes(target)
    assert values["msdyn_rewardpointtype"] == {
        "__type": "OptionSetValue:http://schemas.microsoft.com/xrm/2011/Contracts",
        "Value": 192350001,
    }
    assert values["msdyn_redeemable"] is False
    assert values["msdyn_redeemranking"] == 2
    assert values["msdyn_maximumloyaltyrewardpoints"] == 12.5
    assert values["msdyn_expirationtimeunit"] is None
    assert values["msdyn_rewardpointcurrency"] == {
        "__type": "EntityReference:http://schemas.microsoft.com/xrm/2011/Contracts",
        "Id": CURRENCY_IDS["EUR"],
        "KeyAttributes": [],
        "LogicalName": "transactioncurrency",
        "Name": "Euro",
        "RowVersion": None,
    }
    assert formatted(target)["msdyn_rewardpointtype"] == "Amount"
    assert formatted(target)["msdyn_redeemable"] == "No"
    assert points["OutputParameters"] == [{"key": "id", "value": target["Id"]}]
    assert points["UserId"] == INTEGRATION_USER.systemuserid
    assert points["PostEntityImages"][0]["value"]["Id"] == target["Id"]
    epoch = int(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp() * 1000)
    assert attributes(card["InputParameters"][0]["value"])["msdyn_enrollmentdate"] == f"/Date({epoch})/"
    raw = receiver.calls[1][2]
    assert f'"\\/Date({epoch})\\/"'.encode() in raw  # slashes escaped as the service's serializer does
    assert card["OperationCreatedOn"].startswith("/Date(")


async def test_delete_context_targets_an_entity_reference_with_a_pre_image(
    dv: tuple[Starlette, httpx.AsyncClient],
    receiver: Receiver,
) -> None:
    app, client = dv
    await register(client, "Delete", "msdyn_loyaltycard", images=[("PreImage", 0, "msdyn_cardnumber")])
    created = await client.post("msdyn_loyaltycards", json={"msdyn_cardnumber": "DEL-1"})
    row_id = created.headers["OData-EntityId"].rsplit("(", 1)[1].rstrip(")")
    await client.delete(f"msdyn_loyaltycards({row_id})")
    await drain(app)
    [context] = receiver.contexts()
    target = context["InputParameters"][0]["value"]
    assert target == {
        "__type": "EntityReference:http://schemas.microsoft.com/xrm/2011/Contracts",
        "Id": row_id,
        "KeyAttributes": [],
        "LogicalName": "msdyn_loyaltycard",
        "Name": None,
        "RowVersion": None,
    }
    assert attributes(context["PreEntityImages"][0]["value"])["msdyn_cardnumber"] == "DEL-1"
    assert context["PostEntityImages"] == []


async def test_images_carry_the_rows_version_and_a_deletes_is_that_of_the_last_change(
    dv: tuple[Starlette, httpx.AsyncClient],
    receiver: Receiver,
) -> None:
    """As Dataverse sends them: `RowVersion` on every image is the row's versionnumber, as a string, as it
    stood in that image; the Target's stays null (set only by a caller asking for a concurrency check)."""
    app, client = dv
    await register(client, "Update", "msdyn_loyaltycard", images=[("Image", 2, "msdyn_partynumber")])
    await register(client, "Delete", "msdyn_loyaltycard", images=[("PreImage", 0, "msdyn_cardnumber")])
    await client.post("msdyn_loyaltycards", json={"msdyn_cardnumber": "RV-1", "msdyn_partynumber": "P-1"})
    before = app.state.dataverse.tables["msdyn_loyaltycard"].find("msdyn_cardnumber", ("RV-1",))["versionnumber"]
    await client.patch("msdyn_loyaltycards(msdyn_cardnumber='RV-1')", json={"msdyn_partynumber": "P-2"})
    after = app.state.dataverse.tables["msdyn_loyaltycard"].find("msdyn_cardnumber", ("RV-1",))["versionnumber"]
    await client.delete("msdyn_loyaltycards(msdyn_cardnumber='RV-1')")
    await drain(app)
    update, delete = receiver.contexts()
    assert (update["MessageName"], delete["MessageName"]) == ("Update", "Delete")
    assert after > before
    assert update["PreEntityImages"][0]["value"]["RowVersion"] == str(before)
    assert update["PostEntityImages"][0]["value"]["RowVersion"] == str(after)
    assert update["InputParameters"][0]["value"]["RowVersion"] is None
    # The delete's pre-image: the version of the row's last change, the number the update's post-image held.
    assert delete["PreEntityImages"][0]["value"]["RowVersion"] == str(after)


# -- registration rules ---------------------------------------------------------------------


async def test_filtering_attributes_limit_update_deliveries(
    dv: tuple[Starlette, httpx.AsyncClient],
    receiver: Receiver,
) -> None:
    app, client = dv
    await register(client, "Update", "msdyn_loyaltycard", filtering="msdyn_cardtendertype")
    await client.post("msdyn_loyaltycards", json={"msdyn_cardnumber": "F-1"})
    await client.patch("msdyn_loyaltycards(msdyn_cardnumber='F-1')", json={"msdyn_partynumber": "x"})
    await client.patch("msdyn_loyaltycards(msdyn_cardnumber='F-1')", json={"msdyn_cardtendertype": 806380002})
    await drain(app)
    assert [attributes(c["InputParameters"][0]["value"]).get("msdyn_cardtendertype") for c in receiver.contexts()] == [
        {"__type": "OptionSetValue:http://schemas.microsoft.com/xrm/2011/Contracts", "Value": 806380002}
    ]


async def test_http_header_and_query_string_auth(dv: tuple[Starlette, httpx.AsyncClient], receiver: Receiver) -> None:
    app, client = dv
    await register(
        client,
        "Create",
        "msdyn_loyaltylevel",
        authtype=5,
        authvalue='<settings><setting name="X-Hook-Key" value="h1"/>'
        '<setting name="X-Other" value="a&amp;b"/></settings>',
    )
    await register(
        client,
        "Create",
        "msdyn_loyaltycard",
        url=HOOK + "?fixed=1",
        authtype=6,
        authvalue='<settings><setting name="k1" value="v 1"/><setting name="k2" value="v2"/></settings>',
    )
    await client.post("msdyn_loyaltylevels", json={"msdyn_levelphrase": "Silver"})
    await client.post("msdyn_loyaltycards", json={"msdyn_cardnumber": "QS-1"})
    await drain(app)
    (level_url, level_headers, _), (card_url, _, _) = receiver.calls
    assert (level_headers["x-hook-key"], level_headers["x-other"]) == ("h1", "a&b")
    assert "code" not in parse_qs(level_url.query.decode())
    assert parse_qs(card_url.query.decode()) == {"fixed": ["1"], "k1": ["v 1"], "k2": ["v2"]}


async def test_authvalue_is_never_readable_and_bad_registrations_are_refused(
    dv: tuple[Starlette, httpx.AsyncClient],
) -> None:
    _, client = dv
    await register(client, "Create", "msdyn_loyaltycard")
    rows = (
        await client.get("serviceendpoints?$filter=contract eq 8&$select=serviceendpointid,name,authtype,url")
    ).json()
    assert rows["value"] and all("authvalue" not in r for r in rows["value"])
    full = (await client.get("serviceendpoints")).json()["value"][0]
    assert "authvalue" not in full
    bad_xml = await client.post(
        "serviceendpoints", json={"name": "x", "url": HOOK, "contract": 8, "authtype": 5, "authvalue": "K1=V1"}
    )
    assert bad_xml.status_code == 400
    endpoint_id = full["serviceendpointid"]
    message_id = (await client.get("sdkmessages?$filter=name eq 'Update'")).json()["value"][0]["sdkmessageid"]
    for extra in ({"configuration": "{}", "mode": 1, "stage": 40}, {"mode": 0, "stage": 40}, {"mode": 1, "stage": 20}):
        step = await client.post(
            "sdkmessageprocessingsteps",
            json={
                "name": "bad",
                **extra,
                "eventhandler_serviceendpoint@odata.bind": f"/serviceendpoints({endpoint_id})",
                "sdkmessageid@odata.bind": f"/sdkmessages({message_id})",
            },
        )
        assert step.status_code == 400, extra
    create_filter = (
        await client.get(
            "sdkmessagefilters?$filter=sdkmessageid/name eq 'Create' and primaryobjecttypecode eq 'msdyn_loyaltycard'"
        )
    ).json()["value"][0]["sdkmessagefilterid"]
    mismatched = await client.post(
        "sdkmessageprocessingsteps",
        json={
            "name": "bad",
            "mode": 1,
            "stage": 40,
            "eventhandler_serviceendpoint@odata.bind": f"/serviceendpoints({endpoint_id})",
            "sdkmessageid@odata.bind": f"/sdkmessages({message_id})",
            "sdkmessagefilterid@odata.bind": f"/sdkmessagefilters({create_filter})",
        },
    )
    assert mismatched.status_code == 400


async def test_a_disabled_step_delivers_nothing(dv: tuple[Starlette, httpx.AsyncClient], receiver: Receiver) -> None:
    app, client = dv
    step_id = await register(client, "Create", "msdyn_loyaltylevel")
    await client.patch(f"sdkmessageprocessingsteps({step_id})", json={"statecode": 1, "statuscode": 2})
    await client.post("msdyn_loyaltylevels", json={"msdyn_levelphrase": "Bronze"})
    await drain(app)
    assert receiver.calls == []


# -- bulk, batch, size, retries -------------------------------------------------------------


def _batch(parts: list[str], change_set: bool) -> bytes:
    body = "--batch_A\r\n"
    if change_set:
        body += "Content-Type: multipart/mixed;boundary=changeset_B\r\n\r\n"
        body += "".join("--changeset_B\r\n" + p for p in parts) + "--changeset_B--\r\n"
    else:
        body += "--batch_A\r\n".join(parts)
    return (body + "--batch_A--\r\n").encode()


def _post_part(number: str, tender: int = 806380000) -> str:
    return (
        "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
        "POST /api/data/v9.2/msdyn_loyaltycards HTTP/1.1\r\nContent-Type: application/json;type=entry\r\n\r\n"
        + json.dumps({"msdyn_cardnumber": number, "msdyn_cardtendertype": tender})
        + "\r\n"
    )


async def test_a_batch_shares_one_correlation_id_and_a_rolled_back_change_set_fires_nothing(
    dv: tuple[Starlette, httpx.AsyncClient],
    receiver: Receiver,
) -> None:
    app, client = dv
    await register(client, "Create", "msdyn_loyaltycard")
    headers = {"Content-Type": "multipart/mixed;boundary=batch_A"}
    ok = await client.post("$batch", content=_batch([_post_part("BA-1"), _post_part("BA-2")], True), headers=headers)
    assert ok.status_code == 200
    failed = await client.post(
        "$batch", content=_batch([_post_part("BA-3"), _post_part("BA-4", 7)], True), headers=headers
    )
    assert failed.status_code == 400
    await drain(app)
    contexts = receiver.contexts()
    assert [attributes(c["InputParameters"][0]["value"])["msdyn_cardnumber"] for c in contexts] == ["BA-1", "BA-2"]
    assert contexts[0]["CorrelationId"] == contexts[1]["CorrelationId"]


async def test_upsert_multiple_fires_per_row_create_and_update(
    dv: tuple[Starlette, httpx.AsyncClient],
    receiver: Receiver,
) -> None:
    app, client = dv
    await register(client, "Create", "msdyn_loyaltycard")
    await client.post("msdyn_loyaltycards", json={"msdyn_cardnumber": "UM-1"})
    await register(client, "Update", "msdyn_loyaltycard")
    kind_ = "Microsoft.Dynamics.CRM.msdyn_loyaltycard"
    await client.post(
        "msdyn_loyaltycards/Microsoft.Dynamics.CRM.UpsertMultiple",
        json={
            "Targets": [
                {
                    "@odata.type": kind_,
                    "@odata.id": f"msdyn_loyaltycards(msdyn_cardnumber='UM-{i}')",
                    "msdyn_partynumber": "p",
                }
                for i in (1, 2, 3)
            ]
        },
    )
    await drain(app)
    seen = [
        (c["MessageName"], attributes(c["InputParameters"][0]["value"]).get("msdyn_cardnumber"))
        for c in receiver.contexts()
    ]
    assert seen == [("Create", "UM-1"), ("Update", None), ("Create", "UM-2"), ("Create", "UM-3")]
    assert len({c["CorrelationId"] for c in receiver.contexts()[1:]}) == 1


async def test_an_oversized_context_is_reduced_and_flagged(
    dv: tuple[Starlette, httpx.AsyncClient],
    receiver: Receiver,
) -> None:
    app, client = dv
    app.state.webhooks.size_limit = 1500  # the real limit is 256 KB; a loyalty row never gets near it
    await register(client, "Update", "msdyn_loyaltycard", images=[("PostImage", 1, None)])
    await client.post("msdyn_loyaltycards", json={"msdyn_cardnumber": "BIG-1"})
    await client.patch("msdyn_loyaltycards(msdyn_cardnumber='BIG-1')", json={"msdyn_partynumber": "x" * 100})
    await drain(app)
    [(_, headers, body)] = receiver.calls
    assert headers["x-ms-dynamics-msg-size-exceeded"]
    context = json.loads(body)
    assert not {"ParentContext", "InputParameters", "PreEntityImages", "PostEntityImages"} & set(context)
    assert context["PrimaryEntityName"] == "msdyn_loyaltycard" and context["PrimaryEntityId"]


async def test_one_retry_on_503_and_none_on_500(dv: tuple[Starlette, httpx.AsyncClient], receiver: Receiver) -> None:
    app, client = dv
    receiver.statuses = [503, 200, 500]
    await register(client, "Create", "msdyn_loyaltylevel")
    await client.post("msdyn_loyaltylevels", json={"msdyn_levelphrase": "L1"})
    await drain(app)
    await client.post("msdyn_loyaltylevels", json={"msdyn_levelphrase": "L2"})
    await drain(app)
    assert len(receiver.calls) == 3
    failed = app.state.sandbox.delivery.failed
    assert len(failed) == 1 and failed[0].last_error.startswith("HTTP 500")
    log = (await client.get("http://localhost/_admin/webhooks/log")).json()["deliveries"]
    assert [entry["message"] for entry in log] == ["Create", "Create"]


# -- over real loopback HTTP ----------------------------------------------------------------


@asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


async def test_webhook_over_loopback_http_reaches_a_receiver_after_the_write() -> None:
    receiver = Receiver()
    async with serve(receiver.app()) as hook_url:
        app = create_app(token=TOKEN)
        receiver.org = app.state.dataverse
        async with serve(app) as dv_url:
            async with httpx.AsyncClient(
                base_url=f"{dv_url}/api/data/v9.2/", headers={"Authorization": f"Bearer {TOKEN}"}
            ) as client:
                await register(client, "Create", "msdyn_loyaltycard", url=f"{hook_url}/hook")
                created = await client.post("msdyn_loyaltycards", json={"msdyn_cardnumber": "NET-1"})
                assert created.status_code == 204
                drained = await client.post(f"{dv_url}/_admin/deliveries/drain")
                assert drained.json()["pending"] == 0
            await app.state.sandbox.delivery.aclose()
    [(url, headers, body)] = receiver.calls
    assert url.params["code"] == "k3y"
    assert json.loads(body)["PrimaryEntityName"] == "msdyn_loyaltycard"
    assert headers["x-ms-dynamics-organization"] == "localhost"
    assert receiver.committed == [True]


async def test_steps_of_an_endpoint_and_images_of_a_step_are_listed_through_navigation(
    dv: tuple[Starlette, httpx.AsyncClient],
) -> None:
    _, client = dv
    step_id = await register(client, "Update", "msdyn_loyaltycard", images=[("PreImage", 0, "msdyn_cardnumber")])
    await register(client, "Create", "msdyn_loyaltycard")
    step = (await client.get(f"sdkmessageprocessingsteps({step_id})?$select=_eventhandler_value")).json()
    endpoint_id = step["_eventhandler_value"]
    steps = await client.get(
        f"serviceendpoints({endpoint_id})/serviceendpoint_sdkmessageprocessingstep?$select=name,filteringattributes"
    )
    assert [s["sdkmessageprocessingstepid"] for s in steps.json()["value"]] == [step_id]
    images = await client.get(
        f"sdkmessageprocessingsteps({step_id})/sdkmessageprocessingstepid_sdkmessageprocessingstepimage"
        "?$select=entityalias,imagetype"
    )
    assert [(i["entityalias"], i["imagetype"]) for i in images.json()["value"]] == [("PreImage", 0)]
