"""Webhook registration against the in-process Dataverse emulator, down to a delivered webhook."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from devkit.sandbox.dataverse import create_app
from devkit.sandbox.dataverse.org import Organization
from loyaltysync import webhooks
from loyaltysync.errors import ConfigError
from loyaltysync.events.dataverse import dataverse_change
from loyaltysync.events.remote_context import read_remote_context
from loyaltysync.targets.auth import StaticTokenCredential
from loyaltysync.targets.dataverse import DataverseClient
from loyaltysync.templates import Template, default_mappings_dir, load_templates

TOKEN = "webhooks-test-token-0123456789abcdef"
ROOT = "http://dataverse.test"
FUNCTION_URL = "http://functions.test"
KEY = "function-key-Zx81q0-very-secret"
TEMPLATES = load_templates(default_mappings_dir())


@dataclass
class Delivered:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: dict[str, Any]
    raw: bytes = b""


@dataclass
class Receiver:
    """The function app's side: records every webhook POST."""

    received: list[Delivered] = field(default_factory=list)

    def app(self) -> Starlette:
        async def hook(request: Request) -> Response:
            raw = await request.body()
            self.received.append(Delivered(
                request.url.path, dict(request.query_params), dict(request.headers), json.loads(raw), raw
            ))
            return Response(status_code=202)

        return Starlette(routes=[Route("/api/{side}/{template}", hook, methods=["POST"])])


@dataclass
class Sandbox:
    app: Starlette
    client: DataverseClient
    receiver: Receiver

    @property
    def org(self) -> Organization:
        org: Organization = self.app.state.dataverse
        return org

    def rows(self, table: str) -> list[dict[str, Any]]:
        return list(self.org.tables[table].scan())

    async def drain(self) -> None:
        await self.app.state.sandbox.delivery.drain(timeout_s=10)

    async def plan(self, templates: dict[str, Template] = TEMPLATES, **kwargs: Any) -> webhooks.Plan:
        options: dict[str, Any] = {"function_url": FUNCTION_URL, "function_key": KEY, **kwargs}
        return await webhooks.plan(self.client, templates, **options)

    async def register(self, templates: dict[str, Template] = TEMPLATES, **kwargs: Any) -> None:
        await webhooks.apply(self.client, await self.plan(templates, **kwargs))


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    app = create_app(token=TOKEN, templates=TEMPLATES, public_url=ROOT)
    receiver = Receiver()
    receiver_app = receiver.app()
    app.state.sandbox.delivery.client_factory = lambda: httpx.AsyncClient(
        transport=httpx.ASGITransport(app=receiver_app)
    )
    client = DataverseClient(ROOT, StaticTokenCredential(TOKEN), transport=httpx.ASGITransport(app=app))
    try:
        yield Sandbox(app, client, receiver)
    finally:
        await client.aclose()
        await app.state.sandbox.delivery.aclose()


def _no_key(plan: webhooks.Plan, key: str = KEY) -> None:
    assert all(key not in line for line in plan.describe())
    assert key not in repr(plan)
    assert key not in str(plan)


def _mapped(template: Template) -> list[str]:
    return sorted({f.dataverse for f in template.all_fields if f.dataverse})


def _without_field(template: Template, column: str) -> Template:
    data = template.model_dump()
    data["fields"] = [f for f in data["fields"] if f["dataverse"] != column]
    return Template.model_validate(data)


# ---------------------------------------------------------------- planning and applying


async def test_plan_on_an_empty_org_creates_everything(sandbox: Sandbox) -> None:
    plan = await sandbox.plan()

    n = len(TEMPLATES)
    assert not plan.is_empty
    # Per template: the Dataverse endpoint with 3 steps and their images, the F&O data-event endpoint with 3 steps.
    assert (plan.count("create", "endpoint"), plan.count("create", "step"), plan.count("create", "image")) == (
        2 * n, 6 * n, 3 * n
    )
    assert plan.count("update") == plan.count("delete") == 0
    lines = plan.describe()
    assert len(lines) == len(plan.actions)
    cards = TEMPLATES["loyalty-cards"]
    assert (
        f"create endpoint 'loyaltysync-loyalty-cards': url: {FUNCTION_URL}/api/dataverse/loyalty-cards, key: (set)"
        in lines
    )
    assert (
        f"create endpoint 'loyaltysync-loyalty-cards.fo': url: {FUNCTION_URL}/api/fo/loyalty-cards, key: (set)"
        in lines
    )
    update_step = next(line for line in lines if line.startswith("create step 'loyaltysync: Update of"))
    assert update_step.endswith("filtering attributes: " + ",".join(_mapped(cards)))
    _no_key(plan)
    assert sandbox.rows("serviceendpoint") == []  # planning only reads


async def test_apply_registers_what_the_spec_asks_and_a_second_plan_is_empty(sandbox: Sandbox) -> None:
    await sandbox.register()

    endpoints = {e["name"]: e for e in sandbox.rows("serviceendpoint")}
    assert sorted(endpoints) == sorted(f"loyaltysync-{name}{suffix}" for name in TEMPLATES for suffix in ("", ".fo"))
    cards_endpoint = endpoints["loyaltysync-loyalty-cards"]
    assert (cards_endpoint["contract"], cards_endpoint["authtype"], cards_endpoint["messageformat"]) == (8, 4, 2)
    assert cards_endpoint["url"] == f"{FUNCTION_URL}/api/dataverse/loyalty-cards"
    assert cards_endpoint["authvalue"] == KEY
    assert webhooks.key_fingerprint(KEY) in cards_endpoint["description"]

    messages = {m["sdkmessageid"]: m["name"] for m in sandbox.rows("sdkmessage")}
    filters = {f["sdkmessagefilterid"]: f for f in sandbox.rows("sdkmessagefilter")}
    steps = [s for s in sandbox.rows("sdkmessageprocessingstep") if s["eventhandler"] == cards_endpoint[
        "serviceendpointid"]]
    by_message = {messages[s["sdkmessageid"]]: s for s in steps}
    assert sorted(by_message) == ["Create", "Delete", "Update"]
    for message, step in by_message.items():
        assert step["name"] == f"loyaltysync: {message} of msdyn_loyaltycard"
        assert (step["mode"], step["stage"], step["rank"], step["supporteddeployment"]) == (1, 40, 1, 0)
        assert step["asyncautodelete"] is True
        assert filters[step["sdkmessagefilterid"]]["primaryobjecttypecode"] == "msdyn_loyaltycard"
    assert by_message["Update"]["filteringattributes"] == ",".join(_mapped(TEMPLATES["loyalty-cards"]))
    assert not by_message["Create"].get("filteringattributes")

    images = {i["sdkmessageprocessingstepid"]: i for i in sandbox.rows("sdkmessageprocessingstepimage")}
    post_columns = sorted([*_mapped(TEMPLATES["loyalty-cards"]), "modifiedon", "versionnumber"])
    for message, (alias, kind, prop, columns) in {
        "Create": ("PostImage", 1, "Id", post_columns),
        "Update": ("Image", 2, "Target", post_columns),
        "Delete": ("PreImage", 0, "Target", ["msdyn_cardnumber"]),
    }.items():
        image = images[by_message[message]["sdkmessageprocessingstepid"]]
        assert (image["entityalias"], image["imagetype"], image["messagepropertyname"]) == (alias, kind, prop)
        assert image["attributes"].split(",") == columns

    again = await sandbox.plan()
    assert again.is_empty, again.describe()
    assert again.describe() == []


async def test_a_registered_webhook_delivers_a_create_to_the_function_route(sandbox: Sandbox) -> None:
    await sandbox.register()

    card = {"msdyn_cardnumber": "C-1001", "msdyn_partynumber": "P-7", "msdyn_cardtendertype": 806380000}
    row_id = await sandbox.client.create("msdyn_loyaltycards", card)
    await sandbox.drain()

    assert len(sandbox.receiver.received) == 1
    delivered = sandbox.receiver.received[0]
    assert delivered.path == "/api/dataverse/loyalty-cards"
    assert delivered.query == {"code": KEY}
    assert delivered.headers["x-ms-dynamics-request-name"] == "create"
    context = read_remote_context(delivered.body)
    assert (context.message_name, context.primary_entity_name, context.primary_entity_id) == (
        "Create", "msdyn_loyaltycard", row_id
    )
    assert "PostImage" in context.post_images
    event = dataverse_change(context, TEMPLATES["loyalty-cards"])
    assert event.operation == "create"
    assert event.key == {"CardNumber": "C-1001"}
    assert event.fields["PartyNumber"] == "P-7"
    assert event.fields["CardTenderType"] == "AsCardTender"


async def test_an_update_webhook_carries_the_values_before_the_change(sandbox: Sandbox) -> None:
    await sandbox.register()
    row_id = await sandbox.client.create("msdyn_loyaltycards", {"msdyn_cardnumber": "C-3", "msdyn_partynumber": "P-1"})
    assert row_id is not None
    await sandbox.drain()
    sandbox.receiver.received.clear()

    await sandbox.client.update_by_id("msdyn_loyaltycards", row_id, {"msdyn_partynumber": "P-2"})
    await sandbox.drain()

    context = read_remote_context(sandbox.receiver.received[0].body)
    event = dataverse_change(context, TEMPLATES["loyalty-cards"])
    assert (event.fields["PartyNumber"], event.before["PartyNumber"]) == ("P-2", "P-1")
    assert event.before["CardNumber"] == "C-3"


async def test_updates_deliver_only_for_mapped_columns_and_deletes_carry_the_key(sandbox: Sandbox) -> None:
    await sandbox.register()
    row_id = await sandbox.client.create("msdyn_loyaltycards", {"msdyn_cardnumber": "C-2"})
    assert row_id is not None
    await sandbox.drain()
    sandbox.receiver.received.clear()

    await sandbox.client.update_by_id("msdyn_loyaltycards", row_id, {"statecode": 1, "statuscode": 2})
    await sandbox.client.update_by_id("msdyn_loyaltycards", row_id, {"msdyn_partynumber": "P-9"})
    await sandbox.client.delete_by_id("msdyn_loyaltycards", row_id)
    await sandbox.drain()

    names = [read_remote_context(d.body).message_name for d in sandbox.receiver.received]
    assert names == ["Update", "Delete"]
    deleted = dataverse_change(read_remote_context(sandbox.receiver.received[1].body), TEMPLATES["loyalty-cards"])
    assert deleted.key == {"CardNumber": "C-2"}


# ---------------------------------------------------------------- changes in place


async def test_a_changed_key_updates_only_the_endpoints(sandbox: Sandbox) -> None:
    await sandbox.register()
    ids_before = {e["name"]: e["serviceendpointid"] for e in sandbox.rows("serviceendpoint")}
    new_key = "rotated-key-Q7vP2-also-secret"

    plan = await sandbox.plan(function_key=new_key)

    assert [(a.kind, a.entity) for a in plan.actions] == [("update", "endpoint")] * 2 * len(TEMPLATES)
    assert all(line.endswith(": key: (set)") for line in plan.describe())
    _no_key(plan, new_key)
    _no_key(plan, KEY)
    await webhooks.apply(sandbox.client, plan)
    assert {e["name"]: e["serviceendpointid"] for e in sandbox.rows("serviceendpoint")} == ids_before
    assert (await sandbox.plan(function_key=new_key)).is_empty

    await sandbox.client.create("msdyn_loyaltylevels", {"msdyn_levelphrase": "Gold"})
    await sandbox.drain()
    assert [d.query for d in sandbox.receiver.received] == [{"code": new_key}]


async def test_a_changed_function_url_updates_the_urls_in_place(sandbox: Sandbox) -> None:
    await sandbox.register()
    moved = "https://loyalty-prod.azurewebsites.net/"

    plan = await sandbox.plan(function_url=moved)

    assert [(a.kind, a.entity) for a in plan.actions] == [("update", "endpoint")] * 2 * len(TEMPLATES)
    assert (
        "update endpoint 'loyaltysync-loyalty-levels': url: http://functions.test/api/dataverse/loyalty-levels -> "
        "https://loyalty-prod.azurewebsites.net/api/dataverse/loyalty-levels"
    ) in plan.describe()
    await webhooks.apply(sandbox.client, plan)
    assert {e["url"] for e in sandbox.rows("serviceendpoint")} == {
        f"https://loyalty-prod.azurewebsites.net/api/{side}/{name}"
        for name in TEMPLATES
        for side in ("dataverse", "fo")
    }
    assert (await sandbox.plan(function_url=moved)).is_empty


async def test_a_changed_column_set_updates_the_update_step_and_post_images(sandbox: Sandbox) -> None:
    await sandbox.register()
    changed = dict(TEMPLATES)
    changed["loyalty-cards"] = _without_field(TEMPLATES["loyalty-cards"], "msdyn_effectivedate")

    plan = await sandbox.plan(changed)

    assert sorted((a.kind, a.entity, a.name) for a in plan.actions) == [
        ("update", "image", "Image"),
        ("update", "image", "PostImage"),
        # The F&O side filters its updates on the mapped columns too.
        ("update", "step", "loyaltysync: OnExternalUpdated of mserp_retailloyaltycardentity"),
        ("update", "step", "loyaltysync: Update of msdyn_loyaltycard"),
    ]
    assert all("msdyn_effectivedate" not in str(a.fields) for a in plan.actions)
    await webhooks.apply(sandbox.client, plan)
    assert (await sandbox.plan(changed)).is_empty
    assert not (await sandbox.plan()).is_empty  # and back again


async def test_drift_is_repaired_a_disabled_step_a_lost_image_and_a_stray_step(sandbox: Sandbox) -> None:
    await sandbox.register()
    endpoint = next(e for e in sandbox.rows("serviceendpoint") if e["name"] == "loyaltysync-loyalty-levels")
    steps = {s["name"]: s for s in sandbox.rows("sdkmessageprocessingstep") if s["eventhandler"] == endpoint[
        "serviceendpointid"]}
    update_step = steps["loyaltysync: Update of msdyn_loyaltylevel"]
    create_step = steps["loyaltysync: Create of msdyn_loyaltylevel"]
    client = sandbox.client
    await client.update_by_id("sdkmessageprocessingsteps", update_step["sdkmessageprocessingstepid"],
                              {"statecode": 1, "statuscode": 2})
    image = next(i for i in sandbox.rows("sdkmessageprocessingstepimage")
                 if i["sdkmessageprocessingstepid"] == create_step["sdkmessageprocessingstepid"])
    await client.delete_by_id("sdkmessageprocessingstepimages", image["sdkmessageprocessingstepimageid"])
    await client.create("sdkmessageprocessingsteps", {
        "name": "hand-made duplicate", "mode": 1, "stage": 40, "rank": 2,
        "eventhandler_serviceendpoint@odata.bind": f"/serviceendpoints({endpoint['serviceendpointid']})",
        "sdkmessageid@odata.bind": f"/sdkmessages({create_step['sdkmessageid']})",
        "sdkmessagefilterid@odata.bind": f"/sdkmessagefilters({create_step['sdkmessagefilterid']})",
    })

    plan = await sandbox.plan()

    assert sorted((a.kind, a.entity, a.name) for a in plan.actions) == [
        ("create", "image", "PostImage"),
        ("delete", "step", "hand-made duplicate"),
        ("update", "step", "loyaltysync: Update of msdyn_loyaltylevel"),
    ]
    assert plan.actions[0].kind == "delete"  # deletes go first
    await webhooks.apply(sandbox.client, plan)
    assert (await sandbox.plan()).is_empty
    await client.upsert("msdyn_loyaltylevels", {"msdyn_levelphrase": "Silver"}, {"msdyn_description": "x"})
    await sandbox.drain()
    assert [read_remote_context(d.body).message_name for d in sandbox.receiver.received] == ["Create"]


# ---------------------------------------------------------------- removal and pruning


async def _foreign_endpoints(client: DataverseClient) -> None:
    """Another deployment sharing the prefix, and an unrelated webhook: neither may be touched."""
    await client.create("serviceendpoints", {
        "name": "loyaltysync-dev-loyalty-cards", "url": "https://dev.example.test/api/dataverse/loyalty-cards",
        "contract": 8, "authtype": 4, "authvalue": "dev-key", "messageformat": 2,
        "description": "Managed by loyaltysync: group loyaltysync-dev, template loyalty-cards, key sha256 "
                       "000000000000.",
    })
    await client.create("serviceendpoints", {
        "name": "crm-audit-hook", "url": "https://audit.example.test/hook", "contract": 8, "authtype": 4,
        "authvalue": "audit-key", "messageformat": 2,
    })


async def test_removal_takes_away_everything_it_created_and_nothing_else(sandbox: Sandbox) -> None:
    await _foreign_endpoints(sandbox.client)
    await sandbox.register()

    plan = await webhooks.plan_removal(sandbox.client, TEMPLATES)

    n = len(TEMPLATES)
    assert (plan.count("delete", "image"), plan.count("delete", "step"), plan.count("delete", "endpoint")) == (
        3 * n, 6 * n, 2 * n
    )
    assert plan.count() == plan.count("delete")
    position = {(a.entity, a.name): i for i, a in enumerate(plan.actions)}
    for i, action in enumerate(plan.actions):  # children first: a parent goes after each of its children
        parent = {"image": "step", "step": "endpoint"}.get(action.entity)
        if parent is not None:
            assert position[(parent, action.parent_name)] > i
    await webhooks.apply(sandbox.client, plan)
    assert sorted(e["name"] for e in sandbox.rows("serviceendpoint")) == [
        "crm-audit-hook", "loyaltysync-dev-loyalty-cards"
    ]
    assert sandbox.rows("sdkmessageprocessingstep") == []
    assert sandbox.rows("sdkmessageprocessingstepimage") == []
    assert (await webhooks.plan_removal(sandbox.client, TEMPLATES)).is_empty


async def test_removal_finds_endpoints_of_templates_no_longer_configured(sandbox: Sandbox) -> None:
    await sandbox.register()
    remaining = {"loyalty-cards": TEMPLATES["loyalty-cards"]}

    plan = await webhooks.plan_removal(sandbox.client, remaining)

    assert plan.count("delete", "endpoint") == 2 * len(TEMPLATES)


async def test_plan_prunes_a_dropped_template_unless_told_not_to(sandbox: Sandbox) -> None:
    await _foreign_endpoints(sandbox.client)
    await sandbox.register()
    fewer = {k: v for k, v in TEMPLATES.items() if k != "loyalty-levels"}

    assert (await sandbox.plan(fewer, prune=False)).is_empty
    plan = await sandbox.plan(fewer)

    assert {a.kind for a in plan.actions} == {"delete"}
    assert (plan.count("delete", "endpoint"), plan.count("delete", "step"), plan.count("delete", "image")) == (2, 6, 3)
    assert "delete endpoint 'loyaltysync-loyalty-levels'" in plan.describe()
    assert "delete endpoint 'loyaltysync-loyalty-levels.fo'" in plan.describe()
    await webhooks.apply(sandbox.client, plan)
    assert "loyaltysync-loyalty-levels" not in {e["name"] for e in sandbox.rows("serviceendpoint")}
    assert "loyaltysync-dev-loyalty-cards" in {e["name"] for e in sandbox.rows("serviceendpoint")}


async def test_endpoint_name_groups_registrations_side_by_side(sandbox: Sandbox) -> None:
    await sandbox.register()
    await sandbox.register(endpoint_name="loyaltysync-dev", function_url="http://127.0.0.1:7071")

    assert (await sandbox.plan()).is_empty
    assert (await sandbox.plan(endpoint_name="loyaltysync-dev", function_url="http://127.0.0.1:7071")).is_empty
    await webhooks.apply(sandbox.client, await webhooks.plan_removal(sandbox.client, TEMPLATES))
    assert all(e["name"].startswith("loyaltysync-dev-") for e in sandbox.rows("serviceendpoint"))
    assert len(sandbox.rows("sdkmessageprocessingstep")) == 6 * len(TEMPLATES)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("options", "setting"),
    [
        ({"function_url": "myapp.azurewebsites.net"}, "function_url"),
        ({"function_url": "https://myapp.azurewebsites.net/?code=x"}, "function_url"),
        ({"function_key": ""}, "function_key"),
        ({"endpoint_name": "loyalty sync"}, "endpoint_name"),
    ],
)
async def test_unusable_arguments_are_config_errors(sandbox: Sandbox, options: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError) as caught:
        await sandbox.plan(**options)
    assert caught.value.setting == setting


async def test_a_table_dataverse_does_not_know_is_a_config_error(sandbox: Sandbox) -> None:
    data = TEMPLATES["loyalty-levels"].model_dump()
    data.update(name="widgets")
    data["dataverse"].update(entity_set="new_widgets", table="new_widget", primary_id="new_widgetid")
    unknown = Template.model_validate(data)

    with pytest.raises(ConfigError) as caught:
        await sandbox.plan({"widgets": unknown})
    assert "new_widget" in str(caught.value)
    assert sandbox.rows("serviceendpoint") == []


def test_the_fingerprint_tells_keys_apart_without_holding_them() -> None:
    first, second = webhooks.key_fingerprint(KEY), webhooks.key_fingerprint(KEY + "x")
    assert first != second
    assert len(first) == 12
    assert KEY not in first


# ---------------------------------------------------------------- F&O data events through the virtual tables

VIRTUAL_TABLES = {
    "loyalty-cards": "mserp_retailloyaltycardentity",
    "loyalty-levels": "mserp_loyaltylevelentity",
    "loyalty-reward-points": "mserp_retailloyaltyrewardpointentity",
}


async def test_fo_data_events_are_steps_on_the_virtual_tables_calling_the_fo_route(sandbox: Sandbox) -> None:
    await sandbox.register()

    messages = {m["sdkmessageid"]: m["name"] for m in sandbox.rows("sdkmessage")}
    filters = {f["sdkmessagefilterid"]: f for f in sandbox.rows("sdkmessagefilter")}
    endpoints = {e["serviceendpointid"]: e for e in sandbox.rows("serviceendpoint")}
    on_virtual = [
        s for s in sandbox.rows("sdkmessageprocessingstep")
        if filters[s["sdkmessagefilterid"]]["primaryobjecttypecode"].startswith("mserp_")
    ]
    assert len(on_virtual) >= 9
    found = {
        (filters[s["sdkmessagefilterid"]]["primaryobjecttypecode"], messages[s["sdkmessageid"]]): s for s in on_virtual
    }
    assert set(found) == {
        (table, message) for table in VIRTUAL_TABLES.values()
        for message in ("OnExternalCreated", "OnExternalUpdated", "OnExternalDeleted")
    }
    for name, table in VIRTUAL_TABLES.items():
        for message in ("OnExternalCreated", "OnExternalUpdated", "OnExternalDeleted"):
            step = found[(table, message)]
            endpoint = endpoints[step["eventhandler"]]
            assert endpoint["url"] == f"{FUNCTION_URL}/api/fo/{name}"
            assert (endpoint["contract"], endpoint["authtype"], endpoint["authvalue"]) == (8, 4, KEY)
            assert (step["mode"], step["stage"], step["asyncautodelete"], step["statecode"]) == (1, 40, True, 0)
    updated = found[("mserp_retailloyaltycardentity", "OnExternalUpdated")]
    assert updated["filteringattributes"].split(",") == sorted(
        "mserp_" + f.fo.lower() for f in TEMPLATES["loyalty-cards"].all_fields if f.fo
    )
    assert not found[("mserp_retailloyaltycardentity", "OnExternalCreated")].get("filteringattributes")
    step_ids = {s["sdkmessageprocessingstepid"] for s in on_virtual}
    assert not [i for i in sandbox.rows("sdkmessageprocessingstepimage") if i["sdkmessageprocessingstepid"] in step_ids]
    assert (await sandbox.plan()).is_empty


async def test_a_step_without_asyncautodelete_is_corrected_in_place(sandbox: Sandbox) -> None:
    await sandbox.register()
    steps = {s["name"]: s for s in sandbox.rows("sdkmessageprocessingstep")}
    names = ("loyaltysync: Create of msdyn_loyaltycard", "loyaltysync: OnExternalDeleted of mserp_loyaltylevelentity")
    for name in names:
        await sandbox.client.update_by_id(
            "sdkmessageprocessingsteps", steps[name]["sdkmessageprocessingstepid"], {"asyncautodelete": False}
        )

    plan = await sandbox.plan()

    assert sorted((a.kind, a.entity, a.name) for a in plan.actions) == [
        ("update", "step", "loyaltysync: Create of msdyn_loyaltycard"),
        ("update", "step", "loyaltysync: OnExternalDeleted of mserp_loyaltylevelentity"),
    ]
    assert all(a.fields == {"asyncautodelete": True} for a in plan.actions)
    assert all(line.endswith("asyncautodelete: False -> True") for line in plan.describe())
    await webhooks.apply(sandbox.client, plan)
    assert all(s["asyncautodelete"] is True for s in sandbox.rows("sdkmessageprocessingstep"))
    assert {s["sdkmessageprocessingstepid"] for s in sandbox.rows("sdkmessageprocessingstep")} == {
        s["sdkmessageprocessingstepid"] for s in steps.values()
    }
    assert (await sandbox.plan()).is_empty


async def test_without_fo_data_events_only_the_virtual_table_endpoints_go(sandbox: Sandbox) -> None:
    await sandbox.register()

    plan = await sandbox.plan(fo_data_events=False)

    n = len(TEMPLATES)
    assert {a.kind for a in plan.actions} == {"delete"}
    counts = (plan.count("delete", "endpoint"), plan.count("delete", "step"), plan.count("delete", "image"))
    assert counts == (n, 3 * n, 0)
    assert all(a.name.endswith(".fo") for a in plan.actions if a.entity == "endpoint")
    await webhooks.apply(sandbox.client, plan)
    assert sorted(e["name"] for e in sandbox.rows("serviceendpoint")) == sorted(f"loyaltysync-{t}" for t in TEMPLATES)
    assert (await sandbox.plan(fo_data_events=False)).is_empty


async def test_a_virtual_table_dataverse_does_not_have_is_a_config_error(sandbox: Sandbox) -> None:
    data = TEMPLATES["loyalty-levels"].model_dump()
    data["fo"]["virtual_table"] = "mserp_nosuchentity"
    hidden = Template.model_validate(data)

    with pytest.raises(ConfigError) as caught:
        await sandbox.plan({"loyalty-levels": hidden})
    assert "mserp_nosuchentity" in str(caught.value)
    assert "OnExternalCreated" in str(caught.value)
    assert (await sandbox.plan({"loyalty-levels": hidden}, fo_data_events=False)).count("create", "endpoint") == 1
