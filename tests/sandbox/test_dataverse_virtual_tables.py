"""F&O data events through Dataverse virtual tables, in process: the F&O emulator, the Dataverse emulator
and a stand-in function app, wired by host name. Registering steps on a virtual table's OnExternal* messages
activates the data events in F&O; an F&O change then reaches `/api/fo/<template>` as a webhook of that step."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from devkit.sandbox import dataverse, fno
from devkit.sandbox.dataverse import seed
from loyaltysync import webhooks
from loyaltysync.events.model import ChangeEvent
from loyaltysync.inbound import handle_inbound
from loyaltysync.targets.auth import StaticTokenCredential
from loyaltysync.targets.dataverse import DataverseClient
from loyaltysync.templates import default_mappings_dir, load_templates

TOKEN = "virtual-tables-token-0123456789abcdef"
FO, DV, FUNCTION = "http://fno.test", "http://dataverse.test", "http://functions.test"
KEY = "function-key-virtual-Qx81"
TEMPLATES = load_templates(default_mappings_dir())
CARDS_TABLE = "mserp_retailloyaltycardentity"


class Hosts(httpx.AsyncBaseTransport):
    """Routes each request to the in-process app serving its host, as DNS would to three servers."""

    def __init__(self, apps: Mapping[str, ASGIApp]) -> None:
        self.transports = {host: httpx.ASGITransport(app=app) for host, app in apps.items()}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        transport = self.transports.get(request.url.host)
        if transport is None:
            raise httpx.ConnectError(f"no server at {request.url.host}", request=request)
        return await transport.handle_async_request(request)


@dataclass
class Function:
    """The function app's inbound routes: records each POST and answers as /api/fo/<template> does."""

    received: list[tuple[str, dict[str, str], dict[str, str], bytes]] = field(default_factory=list)
    events: list[ChangeEvent] = field(default_factory=list)

    def app(self) -> Starlette:
        async def hook(request: Request) -> Response:
            body = await request.body()
            self.received.append((request.url.path, dict(request.query_params), dict(request.headers), body))
            side, name = request.path_params["side"], request.path_params["template"]
            reply = handle_inbound(side, TEMPLATES[name], TEMPLATES, body, dict(request.headers),
                                   max_body_bytes=1024 * 1024)
            self.events.extend(ChangeEvent.from_json(m) for m in reply.messages)
            return Response(reply.body_bytes(), status_code=reply.status, media_type="application/json")

        return Starlette(routes=[Route("/api/{side}/{template}", hook, methods=["POST"])])


@dataclass
class Chain:
    fo_app: Starlette
    dv_app: Starlette
    function: Function
    fo: httpx.AsyncClient
    dv_admin: httpx.AsyncClient
    client: DataverseClient

    async def register(self, **options: Any) -> None:
        plan = await webhooks.plan(self.client, TEMPLATES, function_url=FUNCTION, function_key=KEY, **options)
        await webhooks.apply(self.client, plan)

    async def remove(self) -> None:
        await webhooks.apply(self.client, await webhooks.plan_removal(self.client, TEMPLATES))

    async def subscriptions(self) -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = (await self.fo.get("/_admin/subscriptions")).json()["value"]
        return listed

    async def settle(self) -> None:
        """F&O's deliveries to Dataverse first, then Dataverse's to the function."""
        await self.fo_app.state.sandbox.delivery.drain(timeout_s=10)
        await self.dv_app.state.sandbox.delivery.drain(timeout_s=10)


@pytest.fixture
async def chain() -> AsyncIterator[Chain]:
    fo_app = fno.create_app(token=TOKEN, seed=5, templates=TEMPLATES, public_url=FO)
    dv_app = dataverse.create_app(token=TOKEN, seed=5, templates=TEMPLATES, public_url=DV, fno_url=FO)
    function = Function()
    hosts = {"fno.test": fo_app, "dataverse.test": dv_app, "functions.test": function.app()}
    for app in (fo_app, dv_app):
        app.state.sandbox.delivery.client_factory = lambda: httpx.AsyncClient(transport=Hosts(hosts))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    fo_client = httpx.AsyncClient(base_url=FO, headers=auth, transport=httpx.ASGITransport(app=fo_app))
    dv_admin = httpx.AsyncClient(base_url=DV, headers=auth, transport=httpx.ASGITransport(app=dv_app))
    client = DataverseClient(DV, StaticTokenCredential(TOKEN), transport=httpx.ASGITransport(app=dv_app))
    assert (await fo_client.patch("/_admin/settings", json={"event_retry_pause_s": 0})).status_code == 200
    try:
        yield Chain(fo_app, dv_app, function, fo_client, dv_admin, client)
    finally:
        await client.aclose()
        await fo_client.aclose()
        await dv_admin.aclose()
        for app in (fo_app, dv_app):
            await app.state.sandbox.delivery.aclose()


async def test_the_virtual_tables_are_in_the_metadata_but_serve_no_rows(chain: Chain) -> None:
    api = "/api/data/v9.2"
    found = await chain.dv_admin.get(f"{api}/EntityDefinitions(LogicalName='{CARDS_TABLE}')")
    assert found.status_code == 200, found.text
    metadata = found.json()
    assert (metadata["TableType"], metadata["ExternalName"]) == ("Virtual", "RetailLoyaltyCardEntity")
    assert (metadata["EntitySetName"], metadata["PrimaryIdAttribute"], metadata["PrimaryNameAttribute"]) == (
        "mserp_retailloyaltycardentities", "mserp_retailloyaltycardentityid", "mserp_primaryfield"
    )
    columns = (await chain.dv_admin.get(
        f"{api}/EntityDefinitions(LogicalName='{CARDS_TABLE}')/Attributes", params={"$select": "LogicalName"}
    )).json()["value"]
    assert {"mserp_cardnumber", "mserp_partynumber", "mserp_cardtendertype"} <= {c["LogicalName"] for c in columns}
    # The real virtual table reads its rows from F&O; the sandbox does not proxy them.
    assert (await chain.dv_admin.get(f"{api}/mserp_retailloyaltycardentities")).status_code == 404
    filters = (await chain.dv_admin.get(f"{api}/sdkmessagefilters", params={
        "$filter": f"primaryobjecttypecode eq '{CARDS_TABLE}'", "$select": "_sdkmessageid_value",
    })).json()["value"]
    names = {seed.message_id(m): m for m in ("OnExternalCreated", "OnExternalUpdated", "OnExternalDeleted")}
    assert sorted(names[f["_sdkmessageid_value"]] for f in filters) == sorted(names.values())


async def test_an_fo_change_reaches_the_function_through_the_registered_virtual_table_steps(chain: Chain) -> None:
    assert await chain.subscriptions() == []  # nothing registered: F&O has no data event active
    await chain.fo.post("/data/RetailLoyaltyCards", json={"CardNumber": "VT-0"})
    await chain.settle()
    assert chain.function.received == []

    await chain.register()

    subscriptions = await chain.subscriptions()
    assert sorted(s["entity_set"] for s in subscriptions) == sorted(t.fo.entity_set for t in TEMPLATES.values())
    for subscription in subscriptions:
        assert (subscription["format"], subscription["url"]) == ("data-event", f"{DV}/_admin/fno/data-events")
        assert subscription["events"] == ["Created", "Updated", "Deleted"]

    assert (await chain.fo.post("/data/RetailLoyaltyCards", json={"CardNumber": "VT-1"})).status_code == 201
    assert (await chain.fo.patch("/data/RetailLoyaltyCards('VT-1')", json={"PartyNumber": "P-2"})).status_code == 204
    assert (await chain.fo.delete("/data/RetailLoyaltyCards('VT-1')")).status_code == 204
    await chain.settle()

    steps = {s["name"]: s["sdkmessageprocessingstepid"] for s in chain.dv_app.state.dataverse.tables[
        "sdkmessageprocessingstep"].scan()}
    messages = []
    for path, query, headers, body in chain.function.received:
        assert (path, query) == ("/api/fo/loyalty-cards", {"code": KEY})
        context = json.loads(body)
        message = context["MessageName"]
        messages.append(message)
        assert headers["x-ms-dynamics-request-name"] == message.lower()
        assert context["PrimaryEntityName"] == CARDS_TABLE
        assert context["OwningExtension"]["Id"] == steps[f"loyaltysync: {message} of {CARDS_TABLE}"]
        assert (context["OrganizationId"], context["Mode"], context["Stage"]) == (seed.ORGANIZATION_ID, 1, 40)
    assert messages == ["OnExternalCreated", "OnExternalUpdated", "OnExternalDeleted"]
    events = chain.function.events
    assert [(e.operation, e.key, e.side, e.wire_format) for e in events] == [
        (operation, {"CardNumber": "VT-1"}, "fo", "fo-data-event") for operation in ("create", "update", "delete")
    ]
    assert events[1].changed == ["PartyNumber"]
    logged = (await chain.dv_admin.get("/_admin/webhooks/log")).json()["deliveries"]
    assert [d["message"] for d in logged] == messages


async def test_disabling_and_removing_steps_deactivates_the_data_events_in_fo(chain: Chain) -> None:
    await chain.register()
    deleted_step = next(
        s for s in chain.dv_app.state.dataverse.tables["sdkmessageprocessingstep"].scan()
        if s["name"] == f"loyaltysync: OnExternalDeleted of {CARDS_TABLE}"
    )
    await chain.client.update_by_id(
        "sdkmessageprocessingsteps", deleted_step["sdkmessageprocessingstepid"], {"statecode": 1, "statuscode": 2}
    )
    cards = [s for s in await chain.subscriptions() if s["entity_set"] == "RetailLoyaltyCards"]
    assert [s["events"] for s in cards] == [["Created", "Updated"]]
    link = (await chain.dv_admin.get("/_admin/fno/link")).json()
    assert (link["fno_url"], link["last_error"]) == (FO, None)

    await chain.register()  # enables the step again
    cards = [s for s in await chain.subscriptions() if s["entity_set"] == "RetailLoyaltyCards"]
    assert [s["events"] for s in cards] == [["Created", "Updated", "Deleted"]]

    await chain.remove()
    assert await chain.subscriptions() == []
    await chain.fo.post("/data/RetailLoyaltyCards", json={"CardNumber": "VT-2"})
    await chain.settle()
    assert chain.function.received == []


async def test_only_the_fo_routes_steps_get_data_events_and_dataverse_changes_are_unaffected(chain: Chain) -> None:
    await chain.register(fo_data_events=False)
    assert await chain.subscriptions() == []
    await chain.register()
    await chain.client.create("msdyn_loyaltycards", {"msdyn_cardnumber": "DV-1"})
    await chain.settle()
    assert [(path, json.loads(body)["MessageName"]) for path, _, _, body in chain.function.received] == [
        ("/api/dataverse/loyalty-cards", "Create")
    ]


async def test_the_inbound_endpoint_takes_only_data_events_of_its_virtual_tables(chain: Chain) -> None:
    await chain.register()
    inbound = "/_admin/fno/data-events"
    not_an_event = {"MessageName": "Create", "PrimaryEntityName": "msdyn_loyaltycard"}
    answer = await chain.dv_admin.post(inbound, json=not_an_event)
    assert answer.status_code == 400
    assert "OnExternalCreated" in answer.json()["error"]
    unknown_table = {"MessageName": "OnExternalCreated", "PrimaryEntityName": "mserp_custcustomerv3entity"}
    answer = await chain.dv_admin.post(inbound, json=unknown_table)
    assert answer.status_code == 400
    assert "mserp_custcustomerv3entity" in answer.json()["error"]
    assert (await chain.dv_admin.post(inbound, content=b"[1]")).status_code == 400
    assert (await chain.dv_admin.post(inbound, json=not_an_event, headers={"Authorization": "Bearer x"})).status_code \
        == 401
    await chain.settle()
    assert chain.function.received == []


async def test_an_unreachable_fo_fails_no_registration_and_is_reported_until_a_later_change_succeeds(
    chain: Chain,
) -> None:
    link = chain.dv_app.state.fno_link
    link.fno_url = "http://fno-down.test"

    await chain.register()  # every registration write still succeeds

    reported = (await chain.dv_admin.get("/_admin/fno/link")).json()
    assert reported["last_error"] is not None and "ConnectError" in reported["last_error"]
    assert await chain.subscriptions() == []
    link.fno_url = FO
    created_step = next(
        s for s in chain.dv_app.state.dataverse.tables["sdkmessageprocessingstep"].scan()
        if s["name"] == f"loyaltysync: OnExternalCreated of {CARDS_TABLE}"
    )
    await chain.client.update_by_id(
        "sdkmessageprocessingsteps", created_step["sdkmessageprocessingstepid"], {"statecode": 1, "statuscode": 2}
    )
    assert (await chain.dv_admin.get("/_admin/fno/link")).json()["last_error"] is None
    events = {s["entity_set"]: s["events"] for s in await chain.subscriptions()}
    assert events == {"RetailLoyaltyCards": ["Updated", "Deleted"], "LoyaltyLevels": ["Created", "Updated", "Deleted"],
                      "RetailLoyaltyRewardPoints": ["Created", "Updated", "Deleted"]}
