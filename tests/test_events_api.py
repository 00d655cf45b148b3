"""The public API of loyaltysync.events: format detection, template detection, round trip."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loyaltysync.errors import EventError
from loyaltysync.events import ChangeEvent, Handshake, Parsed, parse_inbound, parse_service_bus
from loyaltysync.templates import Side, default_mappings_dir, load_templates

FIXTURES = Path(__file__).parent / "fixtures" / "events"
TEMPLATES = load_templates(default_mappings_dir())

# Each fixture, the side it is sent from and the template the payload itself names.
CATALOGUE: list[tuple[str, Side, str | None]] = [
    ("dataverse-loyaltycard-create.json", "dataverse", "loyalty-cards"),
    ("dataverse-loyaltycard-update.json", "dataverse", "loyalty-cards"),
    ("dataverse-loyaltycard-update-target-only.json", "dataverse", "loyalty-cards"),
    ("dataverse-loyaltycard-delete.json", "dataverse", "loyalty-cards"),
    ("dataverse-loyaltycard-reduced.json", "dataverse", "loyalty-cards"),
    ("dataverse-loyaltyrewardpoint-update.json", "dataverse", "loyalty-reward-points"),
    ("fo-dataevent-loyaltycard-created.json", "fo", "loyalty-cards"),
    ("fo-dataevent-loyaltycard-updated.json", "fo", "loyalty-cards"),
    ("fo-dataevent-loyaltycard-deleted.json", "fo", "loyalty-cards"),
    ("fo-businessevent-loyaltycard.json", "fo", "loyalty-cards"),
    ("fo-businessevent-loyaltycard-deleted.json", "fo", "loyalty-cards"),
    ("servicebus-loyaltyrewardpoint.json", "fo", "loyalty-reward-points"),
    ("cloudevent-loyaltylevel.json", "fo", "loyalty-levels"),
    ("eventgrid-loyalty-notifications.json", "fo", None),
    ("eventgrid-validation.json", "fo", None),
    # Real-world shapes (tests/fixtures/events/README.md), each with its expected parse in expected/.
    ("dataverse-loyaltycard-update-typed-values.json", "dataverse", "loyalty-cards"),
    ("dataverse-loyaltyrewardpoint-update-typed-values.json", "dataverse", "loyalty-reward-points"),
    ("dataverse-loyaltycard-delete-rowversion.json", "dataverse", "loyalty-cards"),
    ("fo-dataevent-loyaltycard-updated-no-ids.json", "fo", "loyalty-cards"),
    ("fo-businessevent-loyaltycard-no-user.json", "fo", "loyalty-cards"),
    ("eventgrid-fo-and-blobcreated.json", "fo", None),
]


def body(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def test_catalogue_covers_every_fixture() -> None:
    assert sorted(name for name, _, _ in CATALOGUE) == sorted(p.name for p in FIXTURES.glob("*.json"))


@pytest.mark.parametrize(("name", "side", "template"), CATALOGUE)
def test_every_fixture_parses_and_finds_its_template(name: str, side: Side, template: str | None) -> None:
    result = parse_inbound(side, body(name), {}, templates=TEMPLATES)
    if name == "eventgrid-validation.json":
        assert isinstance(result, Handshake)
        return
    assert isinstance(result, Parsed)
    assert result.events
    for event in result.events:
        assert event.side == side
        assert event.template in TEMPLATES
        assert event.key or event.row_id, "an event the worker can find"
        if template is not None:
            assert event.template == template


@pytest.mark.parametrize(("name", "side", "template"), [c for c in CATALOGUE if c[2] is not None])
def test_the_right_route_accepts_and_another_refuses(name: str, side: Side, template: str) -> None:
    right = TEMPLATES[template]
    result = parse_inbound(side, body(name), {}, templates=TEMPLATES, template=right)
    assert isinstance(result, Parsed)
    assert {e.template for e in result.events} == {template}

    for other in TEMPLATES.values():
        if other.name == template:
            continue
        with pytest.raises(EventError) as caught:
            parse_inbound(side, body(name), {}, templates=TEMPLATES, template=other)
        assert caught.value.status == 422
        assert other.name in caught.value.reason


@pytest.mark.parametrize(("name", "side", "template"), [c for c in CATALOGUE if c[0] != "eventgrid-validation.json"])
def test_change_events_round_trip_through_the_queue_format(name: str, side: Side, template: str | None) -> None:
    result = parse_inbound(side, body(name), {}, templates=TEMPLATES)
    assert isinstance(result, Parsed)
    for event in result.events:
        again = ChangeEvent.from_json(event.to_json())
        assert again == event
        assert again.to_json() == event.to_json()


@pytest.mark.parametrize(
    "name",
    ["fo-businessevent-loyaltycard.json", "eventgrid-loyalty-notifications.json", "cloudevent-loyaltylevel.json"],
)
def test_fo_payloads_on_the_dataverse_route_are_refused(name: str) -> None:
    with pytest.raises(EventError) as caught:
        parse_inbound("dataverse", body(name), {}, templates=TEMPLATES)
    assert caught.value.status in (400, 422)


def test_dataverse_webhook_on_the_fo_route_is_422_naming_the_message() -> None:
    with pytest.raises(EventError) as caught:
        parse_inbound("fo", body("dataverse-loyaltycard-update.json"), {}, templates=TEMPLATES)
    assert caught.value.status == 422
    assert "'Update'" in caught.value.reason


@pytest.mark.parametrize("payload", [{"hello": "world"}, [], 3, "text", None])
def test_unrecognised_shapes_are_400(payload: Any) -> None:
    raw = json.dumps(payload).encode()
    for side in ("fo", "dataverse"):
        with pytest.raises(EventError) as caught:
            parse_inbound(side, raw, {}, templates=TEMPLATES)  # type: ignore[arg-type]
        assert caught.value.status == 400


def test_unknown_side_is_an_event_error() -> None:
    with pytest.raises(EventError):
        parse_inbound("crm", b"{}", {}, templates=TEMPLATES)  # type: ignore[arg-type]


def test_no_templates_means_422_for_a_valid_payload() -> None:
    with pytest.raises(EventError) as caught:
        parse_inbound("dataverse", body("dataverse-loyaltycard-create.json"), {}, templates={})
    assert caught.value.status == 422
    with pytest.raises(EventError) as caught:
        parse_service_bus(body("servicebus-loyaltyrewardpoint.json"), {}, templates={})
    assert caught.value.status == 422


def test_parsing_is_deterministic_apart_from_receipt_time() -> None:
    first = parse_inbound("dataverse", body("dataverse-loyaltycard-update.json"), {}, templates=TEMPLATES)
    second = parse_inbound("dataverse", body("dataverse-loyaltycard-update.json"), {}, templates=TEMPLATES)
    assert isinstance(first, Parsed) and isinstance(second, Parsed)
    a, b = first.events[0], second.events[0]
    b.received_at = a.received_at
    assert a == b
