"""Property tests: whatever arrives, the parsers answer with events or an EventError, never a crash."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loyaltysync.errors import EventError
from loyaltysync.events import ChangeEvent, Handshake, Parsed, parse_inbound, parse_service_bus
from loyaltysync.templates import Side, default_mappings_dir, load_templates

FIXTURES = Path(__file__).parent / "fixtures" / "events"
TEMPLATES = load_templates(default_mappings_dir())
SAMPLES: list[Any] = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(FIXTURES.glob("*.json"))]
SIDES: list[Side] = ["fo", "dataverse"]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

HEADERS = st.dictionaries(
    st.sampled_from(["x-ms-dynamics-msg-size-exceeded", "aeg-event-type", "Content-Type", "X-Other"]),
    st.sampled_from(["true", "SubscriptionValidation", "Notification", "application/json", ""]),
    max_size=3,
)
# Values that look like the wire's own: type tags, dates, GUIDs, keys, envelope names.
TOKENS = st.sampled_from(
    [
        "/Date(1506384247000)/", "/Date(-2208988800000)/", "\\/Date(99999999999999999)\\/", "/Date(x)/",
        "OptionSetValue:http://schemas.microsoft.com/xrm/2011/Contracts",
        "EntityReference:http://schemas.microsoft.com/xrm/2011/Contracts",
        "Money:http://schemas.microsoft.com/xrm/2011/Contracts",
        "Entity:http://schemas.microsoft.com/xrm/2011/Contracts",
        "6d81597f-0f9f-e711-8122-000d3aa2331c", "00000000-0000-0000-0000-000000000000",
        "Create", "Update", "Delete", "OnExternalCreated", "OnExternalUpdated", "OnExternalDeleted",
        "msdyn_loyaltycard", "msdyn_loyaltyrewardpoint", "mserp_retailloyaltycardentity", "mserp_primaryfield",
        "LoyaltyCardChangedBusinessEvent", "Microsoft.EventGrid.SubscriptionValidationEvent", "Deleted",
        "a|b|c", "", "USRT", "2022-12-30T13:51:15.2942742Z", "1900-01-01T00:00:00Z", "\U0001f600",
    ]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | TOKENS
)
KEYS = st.text(max_size=10) | st.sampled_from(
    ["key", "value", "__type", "Id", "LogicalName", "Value", "Attributes", "MessageName", "PrimaryEntityName",
     "InputParameters", "Target", "BusinessEventId", "ControlNumber", "EventId", "data", "eventType",
     "specversion", "type", "CardNumber", "ChangeType", "EntityName"]
)
JSON = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=5),
    max_leaves=25,
)


def check(result: Handshake | Parsed, side: Side) -> None:
    """What a successful parse promises."""
    if isinstance(result, Handshake):
        assert isinstance(result.response.get("validationResponse"), str)
        return
    for event in result.events:
        assert event.side == side
        assert event.template in TEMPLATES
        assert event.operation in ("create", "update", "delete")
        assert all(isinstance(k, str) and isinstance(v, str) and v for k, v in event.key.items())
        assert ChangeEvent.from_json(event.to_json()) == event


def attempt(side: Side, body: bytes, headers: dict[str, str]) -> None:
    try:
        result = parse_inbound(side, body, headers, templates=TEMPLATES)
    except EventError as exc:
        assert exc.status in (400, 413, 422)
        assert exc.reason
        return
    check(result, side)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every location in a JSON value, the root included."""
    found = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            found += paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += paths(v, (*prefix, i))
    return found


def mutate(value: Any, path: tuple[Any, ...], action: str, replacement: Any) -> Any:
    if not path:
        return replacement
    parent = value
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if action == "delete":
        del parent[last]
    elif action == "wrap":
        parent[last] = [parent[last]]
    elif action == "stringify":
        parent[last] = json.dumps(parent[last])
    else:
        parent[last] = replacement
    return value


@FUZZ
@given(side=st.sampled_from(SIDES), body=st.binary(max_size=300), headers=HEADERS)
def test_arbitrary_bytes(side: Side, body: bytes, headers: dict[str, str]) -> None:
    attempt(side, body, headers)


@FUZZ
@given(side=st.sampled_from(SIDES), value=JSON, headers=HEADERS)
def test_arbitrary_json(side: Side, value: Any, headers: dict[str, str]) -> None:
    attempt(side, json.dumps(value).encode(), headers)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), side=st.sampled_from(SIDES), headers=HEADERS)
def test_mutated_valid_payloads(data: st.DataObject, side: Side, headers: dict[str, str]) -> None:
    value = json.loads(json.dumps(data.draw(st.sampled_from(SAMPLES))))
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        path = data.draw(st.sampled_from(paths(value)))
        action = data.draw(st.sampled_from(["replace", "replace", "delete", "wrap", "stringify"]))
        if action == "delete" and not path:
            action = "replace"
        value = mutate(value, path, action, data.draw(JSON))
    attempt(side, json.dumps(value).encode(), headers)


@FUZZ
@given(data=st.data())
def test_mutated_service_bus_messages(data: st.DataObject) -> None:
    value = json.loads(json.dumps(data.draw(st.sampled_from(SAMPLES))))
    path = data.draw(st.sampled_from(paths(value)))
    value = mutate(value, path, "replace", data.draw(JSON))
    properties = data.draw(st.dictionaries(st.text(max_size=5), SCALARS, max_size=3))
    try:
        result = parse_service_bus(json.dumps(value).encode(), properties, templates=TEMPLATES)
    except EventError as exc:
        assert exc.status in (400, 413, 422)
        return
    check(result, "fo")


def test_deep_nesting_inside_a_valid_payload() -> None:
    sample = json.loads((FIXTURES / "dataverse-loyaltycard-update.json").read_text(encoding="utf-8"))
    sample["SharedVariables"] = [{"key": "deep", "value": "DEEP"}]
    for levels in (150, 5000, 100_000):
        deep = "[" * levels + '"x"' + "]" * levels
        body = json.dumps(sample).replace('"DEEP"', deep).encode()
        for side in SIDES:
            try:
                parse_inbound(side, body, {}, templates=TEMPLATES)
            except EventError as exc:
                assert exc.status == 400
                assert "nested" in exc.reason
            else:
                raise AssertionError(f"{levels} levels of nesting must be refused")
