"""Hostile input to the inbound functions, through the real function_app.py handlers.

Whatever arrives (random bytes, random JSON, real payloads mutated or sent to
the wrong route, odd content types, oversize, deeply nested or huge bodies,
unknown templates and entities), every inbound function answers without an
unhandled exception and never with a 5xx; a 4xx carries a clear JSON reason;
only a 202 puts anything on the queue (the handler's queue output binding).
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import azure.functions as func
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devkit.devhost.invocation import InvocationContext
from loyaltysync.events.model import ChangeEvent

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "events"
MAX_BODY = 262_144
ENV = {
    "FNO_URL": "https://contoso.operations.dynamics.com",
    "DATAVERSE_URL": "https://contoso.crm.dynamics.com",
    "AzureWebJobsStorage": "UseDevelopmentStorage=true",
    "MAX_BODY_BYTES": str(MAX_BODY),
}
SAMPLES = {p.name: p.read_bytes() for p in sorted(FIXTURES.glob("*.json"))}
CONTENT_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "APPLICATION/JSON",
    "application/cloudevents+json",
    "application/cloudevents-batch+json",
    "text/json",
    "",
    "text/plain",
    "application/xml",
    "multipart/form-data; boundary=x",
    "application/x-www-form-urlencoded",
]


class Captured(func.Out[Any]):
    """The queue output binding: what the handler would put on the queue."""

    def __init__(self) -> None:
        self.value: Any = None

    def set(self, val: Any) -> None:
        self.value = val

    def get(self) -> Any:
        return self.value


Handler = Callable[..., func.HttpResponse]


@pytest.fixture(scope="module")
def app_module() -> Iterator[ModuleType]:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in ENV.items():
            patch.setenv(name, value)
        patch.delenv("WEBHOOK_SHARED_SECRET", raising=False)
        patch.chdir(ROOT)
        sys.modules.pop("function_app", None)
        yield importlib.import_module("function_app")
        sys.modules.pop("function_app", None)


@pytest.fixture(scope="module")
def handlers(app_module: ModuleType) -> dict[str, Handler]:
    """Every inbound function by route (`fo/loyalty-cards`, ...)."""
    found = {}
    for function in app_module.app.get_functions():
        bindings = json.loads(function.get_function_json())["bindings"]
        trigger = next((b for b in bindings if b["type"] == "httpTrigger"), None)
        if trigger is not None and any(b["type"] == "queue" for b in bindings):
            found[trigger["route"]] = function.get_user_function()
    assert len(found) == 6  # three templates, two sides
    return found


def call(handler: Handler, body: bytes, headers: dict[str, str], method: str = "POST") -> tuple[int, Any, Any]:
    """Invoke like the host: (status, decoded JSON body, what was put on the queue)."""
    out = Captured()
    request = func.HttpRequest(method=method, url="http://localhost/api/x", headers=headers, params={}, body=body)
    response = handler(request, out, InvocationContext("hostile", "inbound"))
    text = response.get_body()
    return response.status_code, json.loads(text) if text else None, out.value


def check(route: str, status: int, answer: Any, queued: Any) -> None:
    """The contract every answer keeps."""
    assert status < 500, (route, status, answer)
    assert status in (200, 202) or 400 <= status < 500, (route, status)
    if status != 202:
        assert queued is None, f"{route} answered {status} but queued {queued!r}"
    if status >= 400:
        assert isinstance(answer, dict) and isinstance(answer.get("error"), str) and answer["error"].strip()
    if status == 202:
        assert isinstance(queued, list) and len(queued) == answer["accepted"]
        template = route.split("/", 1)[1]
        for message in queued:
            event = ChangeEvent.from_json(message)
            assert event.side == route.split("/", 1)[0]
            if event.side == "dataverse":
                assert event.template == template


# ----------------------------------------------------------------------------- fuzzing

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["/Date(1506384247000)/", "1900-01-01T00:00:00Z", "6d81597f-0f9f-e711-8122-000d3aa2331c",
                       "msdyn_loyaltycard", "mserp_retailloyaltycardentity",
                       "Microsoft.EventGrid.SubscriptionValidationEvent", "OnExternalUpdated", "Update", "Delete",
                       "Create", "RetailLoyaltyCards", "LoyaltyLevels"])
)
KEYS = st.text(max_size=12) | st.sampled_from(
    ["MessageName", "PrimaryEntityName", "PrimaryEntityId", "InputParameters", "PostEntityImages", "Target",
     "Attributes", "key", "value", "__type", "BusinessEventId", "ControlNumber", "EventId", "EntityName",
     "CardNumber", "eventType", "data", "subject", "validationCode", "validationUrl", "specversion", "type"]
)
JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(KEYS, inner, max_size=6), max_leaves=40
)


def _mutate(value: Any, path: list[int], replacement: Any) -> Any:
    """`value` with the subtree that `path` picks (indices taken modulo each container's size) replaced."""
    if not path or not isinstance(value, dict | list) or not value:
        return replacement
    if isinstance(value, dict):
        key = sorted(value)[path[0] % len(value)]
        return {**value, key: _mutate(value[key], path[1:], replacement)}
    index = path[0] % len(value)
    return [*value[:index], _mutate(value[index], path[1:], replacement), *value[index + 1 :]]


MUTATED = st.builds(
    lambda name, path, replacement: json.dumps(_mutate(json.loads(SAMPLES[name]), path, replacement)).encode(),
    st.sampled_from(sorted(SAMPLES)),
    st.lists(st.integers(min_value=0, max_value=50), max_size=6),
    JSON,
)
BODIES = st.one_of(
    st.binary(max_size=3000),
    JSON.map(lambda value: json.dumps(value).encode()),
    st.sampled_from(sorted(SAMPLES.values())),  # real payloads, often to the wrong route
    MUTATED,
    st.text(max_size=200).map(str.encode),
)
HEADERS = st.fixed_dictionaries(
    {"content-type": st.sampled_from(CONTENT_TYPES)},
    optional={
        "aeg-event-type": st.sampled_from(["SubscriptionValidation", "Notification", "Bogus", ""]),
        "x-ms-dynamics-msg-size-exceeded": st.sampled_from(["true", "false", "maybe"]),
        "webhook-request-origin": st.sampled_from(["eventgrid.azure.net", ""]),
        "traceparent": st.sampled_from(["00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "garbage"]),
    },
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(route=st.sampled_from(["fo/loyalty-cards", "dataverse/loyalty-cards", "fo/loyalty-levels",
                              "dataverse/loyalty-levels", "fo/loyalty-reward-points",
                              "dataverse/loyalty-reward-points"]),
       body=BODIES, headers=HEADERS, method=st.sampled_from(["POST", "POST", "POST", "OPTIONS"]))
def test_no_input_makes_an_inbound_function_fail_or_queue_on_refusal(
    handlers: dict[str, Handler], route: str, body: bytes, headers: dict[str, str], method: str
) -> None:
    status, answer, queued = call(handlers[route], body, headers, method)
    check(route, status, answer, queued)


# ----------------------------------------------------------------------------- named cases


def test_a_body_over_the_limit_is_refused_with_413(handlers: dict[str, Handler]) -> None:
    body = b'{"padding": "' + b"x" * MAX_BODY + b'"}'
    for route, handler in handlers.items():
        status, answer, queued = call(handler, body, {"content-type": "application/json"})
        assert status == 413 and str(MAX_BODY) in answer["error"], (route, answer)
        check(route, status, answer, queued)


def test_a_body_that_is_not_json_is_refused_with_415(handlers: dict[str, Handler]) -> None:
    body = SAMPLES["dataverse-loyaltycard-update.json"]
    for content_type in ("text/plain", "application/xml", "multipart/form-data; boundary=x"):
        status, answer, queued = call(handlers["dataverse/loyalty-cards"], body, {"content-type": content_type})
        assert status == 415 and "JSON" in answer["error"], answer
        check("dataverse/loyalty-cards", status, answer, queued)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"{not json", "json"),
        (b"", "empty"),
        (b"   ", "empty"),
        (b"\xff\xfe\x00garbage", ""),
        (b"[1, 2, 3]", ""),
        (b'"a string"', ""),
        (b"42", ""),
        (b"null", ""),
        (b"{}", ""),
    ],
)
def test_malformed_and_wrongly_shaped_bodies_get_a_reason(handlers: dict[str, Handler], body: bytes,
                                                          words: str) -> None:
    for route, handler in handlers.items():
        status, answer, queued = call(handler, body, {"content-type": "application/json"})
        assert 400 <= status < 500, (route, status, answer)
        assert words in answer["error"].lower(), (route, answer)
        check(route, status, answer, queued)


def test_deeply_nested_and_huge_bodies_are_refused_quickly(handlers: dict[str, Handler]) -> None:
    bodies = [
        b"[" * 20_000 + b"]" * 20_000,
        b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
        b"[" + b"{}," * 20_000 + b"{}]",
        json.dumps({"InputParameters": [{"key": "Target", "value": {"Attributes": [{"key": str(i), "value": i}
                                                                                  for i in range(3000)]}}]}).encode(),
    ]
    for body in bodies:
        assert len(body) <= MAX_BODY
        for route, handler in handlers.items():
            started = time.perf_counter()
            status, answer, queued = call(handler, body, {"content-type": "application/json"})
            assert time.perf_counter() - started < 2.0, route
            assert 400 <= status < 500, (route, status, answer)
            check(route, status, answer, queued)


def _with(name: str, changes: Callable[[Any], Any]) -> bytes:
    data = json.loads(SAMPLES[name])
    return json.dumps(changes(data)).encode()


def _dataverse_entity(data: dict[str, Any], entity: str) -> dict[str, Any]:
    data["PrimaryEntityName"] = entity
    for image in data.get("InputParameters", []):
        if isinstance(image.get("value"), dict):
            image["value"]["LogicalName"] = entity
    return data


def test_unknown_templates_and_entities_are_refused_and_nothing_is_queued(handlers: dict[str, Handler]) -> None:
    cases = [
        ("dataverse/loyalty-cards",
         _with("dataverse-loyaltycard-update.json", lambda d: _dataverse_entity(d, "account"))),
        ("dataverse/loyalty-levels", SAMPLES["dataverse-loyaltycard-update.json"]),  # a card sent to the levels route
        ("fo/loyalty-cards", _with("fo-businessevent-loyaltycard.json",
                                   lambda d: {**d, "BusinessEventId": "VendorInvoicePostedBusinessEvent"})),
        ("fo/loyalty-cards", _with("fo-dataevent-loyaltycard-updated.json",
                                   lambda d: {**d, "PrimaryEntityName": "mserp_custcustomerv3entity"})),
        ("fo/loyalty-levels", SAMPLES["fo-dataevent-loyaltycard-updated.json"]),  # a card event to the levels route
    ]
    for route, body in cases:
        status, answer, queued = call(handlers[route], body, {"content-type": "application/json"})
        assert 400 <= status < 500, (route, status, answer)
        check(route, status, answer, queued)


def test_real_payloads_on_their_own_route_are_accepted_and_queued(handlers: dict[str, Handler]) -> None:
    """The counterpart of the refusals: the same handlers do accept what the services really send."""
    for name, route in (
        ("dataverse-loyaltycard-update.json", "dataverse/loyalty-cards"),
        ("dataverse-loyaltyrewardpoint-update.json", "dataverse/loyalty-reward-points"),
        ("fo-dataevent-loyaltycard-updated.json", "fo/loyalty-cards"),
        ("fo-businessevent-loyaltycard.json", "fo/loyalty-cards"),
    ):
        status, answer, queued = call(handlers[route], SAMPLES[name], {"content-type": "application/json"})
        assert status == 202, (name, answer)
        check(route, status, answer, queued)
