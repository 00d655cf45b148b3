"""Event Grid, CloudEvents and Service Bus envelopes, and the JSON decoding guards."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from loyaltysync.errors import EventError
from loyaltysync.events import Handshake, Parsed, parse_inbound, parse_service_bus
from loyaltysync.events.envelopes import MAX_EVENT_GRID_EVENTS, MAX_JSON_DEPTH, decode_json
from loyaltysync.templates import default_mappings_dir, load_templates

FIXTURES = Path(__file__).parent / "fixtures" / "events"
TEMPLATES = load_templates(default_mappings_dir())


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def fo(payload: Any, headers: dict[str, str] | None = None) -> Handshake | Parsed:
    return parse_inbound("fo", json.dumps(payload).encode(), headers or {}, templates=TEMPLATES)


def refused(payload: Any, headers: dict[str, str] | None = None) -> EventError:
    with pytest.raises(EventError) as caught:
        fo(payload, headers)
    return caught.value


# ---------------------------------------------------------------- Event Grid


@pytest.mark.parametrize("headers", [{}, {"aeg-event-type": "SubscriptionValidation"},
                                     {"Aeg-Event-Type": "SubscriptionValidation"}])
def test_subscription_validation_is_a_handshake(headers: dict[str, str]) -> None:
    result = fo(load("eventgrid-validation.json"), headers)
    assert result == Handshake({"validationResponse": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"})


def test_validation_header_without_validation_event_is_400() -> None:
    error = refused(load("eventgrid-loyalty-notifications.json"), {"aeg-event-type": "SubscriptionValidation"})
    assert error.status == 400


@pytest.mark.parametrize("data", [None, {}, {"validationCode": 5}, {"validationCode": ""}, "code"])
def test_validation_without_a_code_is_400(data: Any) -> None:
    events = load("eventgrid-validation.json")
    events[0]["data"] = data
    assert refused(events).status == 400


def test_notifications_carry_business_events_in_data() -> None:
    result = fo(load("eventgrid-loyalty-notifications.json"), {"aeg-event-type": "Notification"})
    assert isinstance(result, Parsed)
    assert [(e.template, e.key, e.operation) for e in result.events] == [
        ("loyalty-cards", {"CardNumber": "C-1001"}, "update"),
        ("loyalty-reward-points", {"RewardPointId": "RP-STAR"}, "create"),
    ]
    assert {e.wire_format for e in result.events} == {"event-grid"}
    assert [e.source_version for e in result.events] == ["5637611083", "5637611101"]


def test_data_as_a_json_string_is_read() -> None:
    events = load("eventgrid-loyalty-notifications.json")
    events[0]["data"] = json.dumps(events[0]["data"])
    result = fo(events)
    assert isinstance(result, Parsed)
    assert result.events[0].key == {"CardNumber": "C-1001"}


def test_data_event_inside_event_grid() -> None:
    events = load("eventgrid-loyalty-notifications.json")[:1]
    events[0]["data"] = load("fo-dataevent-loyaltycard-updated.json")
    events[0]["eventType"] = "OnExternalUpdated"
    result = fo(events)
    assert isinstance(result, Parsed)
    assert result.events[0].key == {"CardNumber": "C-2001"}
    assert result.events[0].wire_format == "event-grid"


def test_event_grid_system_notices_are_skipped() -> None:
    events = load("eventgrid-loyalty-notifications.json")
    events.append({"id": "x", "eventType": "Microsoft.EventGrid.SubscriptionDeletedEvent", "data": {},
                   "subject": "", "eventTime": "2026-07-15T10:00:00Z", "dataVersion": "1"})
    result = fo(events)
    assert isinstance(result, Parsed)
    assert len(result.events) == 2


def test_one_bad_event_refuses_the_batch() -> None:
    events = load("eventgrid-loyalty-notifications.json")
    events[1]["data"] = {"BusinessEventId": "LoyaltyRewardPointChangedBusinessEvent"}
    error = refused(events)
    assert error.status == 400
    assert "ControlNumber" in error.reason


@pytest.mark.parametrize(
    ("events", "status"),
    [
        ([], 400),
        ([1], 400),
        ([{"data": {}}], 400),
    ],
)
def test_malformed_event_grid_deliveries(events: list[Any], status: int) -> None:
    assert refused(events).status == status


@pytest.mark.parametrize("data", [[1, 2], "not json", {"hello": "world"}, None])
def test_an_event_that_is_not_fo_is_skipped_not_refused(data: Any) -> None:
    result = fo([{"id": "e-1", "eventType": "X", "data": data}])
    assert isinstance(result, Parsed)
    assert result.events == []
    assert [(s.index, s.id, s.event_type) for s in result.skipped] == [(0, "e-1", "X")]


def test_too_many_events_is_413() -> None:
    event = load("eventgrid-loyalty-notifications.json")[0]
    assert refused([event] * (MAX_EVENT_GRID_EVENTS + 1)).status == 413
    result = fo([event] * 3)
    assert isinstance(result, Parsed) and len(result.events) == 3


# ---------------------------------------------------------------- CloudEvents


def test_cloud_event_single_object() -> None:
    result = fo(load("cloudevent-loyaltylevel.json"))
    assert isinstance(result, Parsed)
    (event,) = result.events
    assert (event.template, event.key, event.wire_format) == ("loyalty-levels", {"LevelPhrase": "Gold"}, "event-grid")
    assert event.modified_on == "2026-07-15T10:02:00Z"


def test_cloud_event_batch_and_base64_data() -> None:
    cloud = load("cloudevent-loyaltylevel.json")
    encoded = {**cloud, "data_base64": base64.b64encode(json.dumps(cloud["data"]).encode()).decode()}
    del encoded["data"]
    result = fo([cloud, encoded])
    assert isinstance(result, Parsed)
    assert [e.key for e in result.events] == [{"LevelPhrase": "Gold"}] * 2


def test_a_cloud_event_without_a_type_is_400() -> None:
    assert refused({**load("cloudevent-loyaltylevel.json"), "type": None}).status == 400


@pytest.mark.parametrize("change", [{"data": None}, {"data": 5}])
def test_a_cloud_event_without_an_fo_payload_is_skipped(change: dict[str, Any]) -> None:
    result = fo({**load("cloudevent-loyaltylevel.json"), **change})
    assert isinstance(result, Parsed) and result.events == [] and len(result.skipped) == 1


def test_cloud_event_bad_base64_is_400() -> None:
    cloud = load("cloudevent-loyaltylevel.json")
    del cloud["data"]
    cloud["data_base64"] = "%%%"
    assert refused(cloud).status == 400


# ---------------------------------------------------------------- Service Bus


def test_service_bus_body_is_the_business_event() -> None:
    body = (FIXTURES / "servicebus-loyaltyrewardpoint.json").read_bytes()
    properties = {"BusinessEventId": "LoyaltyRewardPointChangedBusinessEvent", "Category": "Loyalty",
                  "LegalEntity": "USRT"}
    for props in (properties, {}):
        result = parse_service_bus(body, props, templates=TEMPLATES)
        (event,) = result.events
        assert event.template == "loyalty-reward-points"
        assert event.key == {"RewardPointId": "RP-STAR"}
        assert event.operation == "create"
        assert event.wire_format == "service-bus"
        assert event.source_version == "5637611101"


def test_service_bus_route_template_is_checked() -> None:
    body = (FIXTURES / "servicebus-loyaltyrewardpoint.json").read_bytes()
    with pytest.raises(EventError) as caught:
        parse_service_bus(body, {}, templates=TEMPLATES, template=TEMPLATES["loyalty-cards"])
    assert caught.value.status == 422


@pytest.mark.parametrize("body", [b"", b"[]", b"\xff\xfe", b"{", b'"text"'])
def test_service_bus_unreadable_bodies_are_400(body: bytes) -> None:
    with pytest.raises(EventError) as caught:
        parse_service_bus(body, {}, templates=TEMPLATES)
    assert caught.value.status == 400


# ---------------------------------------------------------------- JSON decoding guards


def test_utf8_bom_is_tolerated() -> None:
    assert decode_json(b"\xef\xbb\xbf{\"a\": 1}") == {"a": 1}


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"\xc3\x28", "UTF-8"),
        (b"   ", "empty"),
        (b"{'a': 1}", "not valid JSON"),
        (b'{"a": NaN}', "not valid JSON"),
        (b'{"a": Infinity}', "not valid JSON"),
        (b"[" * 200_000 + b"]" * 200_000, "nested"),
        (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), "nested"),
        (b'{"a": "\\ud800"}', "surrogate"),
        (b"1" * 5000, "not valid JSON"),
    ],
)
def test_unreadable_bodies_are_400_with_a_reason(body: bytes, fragment: str) -> None:
    with pytest.raises(EventError) as caught:
        decode_json(body)
    assert caught.value.status == 400
    assert fragment in caught.value.reason


def test_surrogate_pairs_are_fine() -> None:
    assert decode_json(b'{"a": "\\ud83d\\ude00"}') == {"a": "\U0001f600"}
