"""The parsers against payloads shaped like what the services really send (tests/fixtures/events/README.md).

Each sample has its expected parse in tests/fixtures/events/expected/. Around them, the
defects those payloads showed: DataContract-typed primitives, F&O data events without an
id of their own, the nil GUID as a user, and Event Grid deliveries that mix publishers.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import azure.functions as func
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from loyaltysync import inbound, telemetry
from loyaltysync.errors import EventError
from loyaltysync.events import Parsed, parse_inbound
from loyaltysync.events.remote_context import read_remote_context, unwrap
from loyaltysync.templates import default_mappings_dir, load_templates

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "events"
EXPECTED = FIXTURES / "expected"
TEMPLATES = load_templates(default_mappings_dir())
DERIVED = "(derived: the same at every parse)"


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def parse(side: str, payload: Any) -> Parsed:
    result = parse_inbound(side, json.dumps(payload).encode(), {}, templates=TEMPLATES)  # type: ignore[arg-type]
    assert isinstance(result, Parsed)
    return result


def typed(kind: str, value: Any) -> dict[str, Any]:
    return {"__type": f"{kind}:#System", "__value": value}


# ---------------------------------------------------------------- every sample, its expected parse


@pytest.mark.parametrize("name", sorted(p.name for p in EXPECTED.glob("*.json")))
def test_sample_parses_as_expected(name: str) -> None:
    expected = json.loads((EXPECTED / name).read_text(encoding="utf-8"))
    result = parse(expected["side"], load(name))
    got = []
    for event in result.events:
        fields = asdict(event)
        want = expected["events"][len(got)] if len(got) < len(expected["events"]) else {}
        got.append({k: (DERIVED if want.get(k) == DERIVED else fields[k]) for k in want})
    assert got == expected["events"]
    assert [{"index": s.index, "id": s.id, "event_type": s.event_type} for s in result.skipped] == expected["skipped"]


def test_every_sample_is_cited_in_the_readme() -> None:
    readme = (FIXTURES / "README.md").read_text(encoding="utf-8")
    for path in EXPECTED.glob("*.json"):
        assert f"`{path.name}`" in readme, f"{path.name} has no source in tests/fixtures/events/README.md"


# ---------------------------------------------------------------- 2. DataContract-typed primitives


def test_typed_modifiedon_and_a_typed_mapped_date_are_read() -> None:
    event = parse("dataverse", load("dataverse-loyaltycard-update-typed-values.json")).events[0]
    assert event.modified_on == "2026-07-16T10:00:04Z"  # from {"__type": "DateTime:#System", ...}
    assert event.fields["LoyaltyEnrollmentDate"] == "2026-03-01T09:00:00Z"
    assert event.row_id == "6d81597f-0f9f-e711-8122-000d3aa2331c"  # a typed Guid, upper case on the wire


def test_the_key_comes_from_typed_key_attributes() -> None:
    event = parse("dataverse", load("dataverse-loyaltycard-update-typed-values.json")).events[0]
    assert event.key == {"CardNumber": "C-1001"}


def test_typed_numbers_booleans_and_version_in_an_image_are_read() -> None:
    event = parse("dataverse", load("dataverse-loyaltyrewardpoint-update-typed-values.json")).events[0]
    assert event.complete
    assert event.fields["RedeemRanking"] == 3
    assert event.fields["Redeemable"] == "Yes"
    assert event.fields["ExpirationTimeValue"] == 12
    assert float(event.fields["MaximumLoyaltyRewardPoints"]) == 2500.5
    assert event.source_version == "1300107"  # versionnumber as {"__type": "Int64:#System", ...}


@pytest.mark.parametrize(
    ("wrapped", "plain"),
    [
        (typed("Boolean", True), True),
        (typed("Boolean", "false"), False),
        (typed("Byte", 7), 7),
        (typed("SByte", -7), -7),
        (typed("Int16", 12), 12),
        (typed("Int32", 2), 2),
        (typed("Int64", "9007199254740993"), 9007199254740993),
        (typed("UInt16", 5), 5),
        (typed("UInt32", 5), 5),
        (typed("UInt64", 5), 5),
        (typed("Single", 1.5), 1.5),
        (typed("Double", 123.345), 123.345),
        (typed("Decimal", "79228162514264337593543950335"), 79228162514264337593543950335),
        (typed("Decimal", 10.01), 10.01),
        (typed("String", "C-1"), "C-1"),
        (typed("Char", "x"), "x"),
        (typed("Uri", "https://contoso.example/x"), "https://contoso.example/x"),
        (typed("TimeSpan", "PT1H"), "PT1H"),
        (typed("Guid", "{EC4E2F7D-9D60-E811-A95A-000D3AF24950}"), "ec4e2f7d-9d60-e811-a95a-000d3af24950"),
        (typed("DateTime", "/Date(1527757524000)/"), "/Date(1527757524000)/"),
        (typed("DateTimeOffset", {"DateTime": "/Date(1527757524000)/", "OffsetMinutes": 60}), "/Date(1527757524000)/"),
        (typed("Int32", None), None),
        ({"__type": "OptionSetValue:http://schemas.microsoft.com/xrm/2011/Contracts", "Value": 1},
         {"__type": "OptionSetValue:http://schemas.microsoft.com/xrm/2011/Contracts", "Value": 1}),
    ],
)
def test_every_primitive_type_is_unwrapped(wrapped: Any, plain: Any) -> None:
    assert unwrap(wrapped, "x") == plain


@pytest.mark.parametrize(
    "wrapped",
    [
        typed("Guid", "not-a-guid"),
        typed("Guid", 5),
        typed("Int32", 1.5),
        typed("Int32", True),
        typed("Int64", "12a"),
        typed("Double", "NaN"),
        typed("Boolean", "yes"),
        typed("DateTime", 5),
        typed("String", 5),
    ],
)
def test_a_typed_primitive_that_contradicts_its_type_is_400(wrapped: Any) -> None:
    with pytest.raises(EventError) as caught:
        unwrap(wrapped, "Target.Attributes.x")
    assert caught.value.status == 400 and "Target.Attributes.x" in caught.value.reason


def test_typed_values_are_unwrapped_in_input_parameters_and_context_fields() -> None:
    payload = load("dataverse-loyaltycard-update-typed-values.json")
    row_id = typed("Guid", "6D81597F-0F9F-E711-8122-000D3AA2331C")
    payload["InputParameters"].append({"key": "RelatedId", "value": row_id})
    payload["PrimaryEntityId"] = row_id
    payload["OperationCreatedOn"] = typed("DateTime", "/Date(1784196005151)/")
    context = read_remote_context(payload)
    assert context.primary_entity_id == "6d81597f-0f9f-e711-8122-000d3aa2331c"
    assert context.operation_created_on == "2026-07-16T10:00:05Z"


# ---------------------------------------------------------------- 1. a delete's version


def test_a_delete_carries_the_version_of_the_row_it_removed() -> None:
    delete = parse("dataverse", load("dataverse-loyaltycard-delete-rowversion.json")).events[0]
    update = parse("dataverse", load("dataverse-loyaltycard-update.json")).events[0]
    assert delete.operation == "delete"
    assert delete.source_version == update.source_version == "1298876"  # equal: see test_decide


def test_a_targets_row_version_is_not_the_events_version() -> None:
    """A Target's RowVersion is the version the caller expected (optimistic concurrency): older than the change."""
    payload = load("dataverse-loyaltyrewardpoint-update-typed-values.json")
    payload["InputParameters"][0]["value"]["RowVersion"] = "1300101"
    event = parse("dataverse", payload).events[0]
    assert event.source_version == "1300107"
    image = payload["PostEntityImages"][0]["value"]
    image["Attributes"] = [a for a in image["Attributes"] if a["key"] != "versionnumber"]
    assert parse("dataverse", payload).events[0].source_version == "1300107"  # the image's RowVersion


# ---------------------------------------------------------------- 3. data events without an id of their own


def test_a_data_event_without_ids_gets_the_same_id_at_every_parse() -> None:
    payload = load("fo-dataevent-loyaltycard-updated-no-ids.json")
    first = parse("fo", payload).events[0]
    again = parse("fo", payload).events[0]
    reordered = parse("fo", dict(reversed(list(payload.items())))).events[0]
    assert first.event_id == again.event_id == reordered.event_id


def test_a_different_data_event_gets_a_different_id() -> None:
    payload = load("fo-dataevent-loyaltycard-updated-no-ids.json")
    first = parse("fo", payload).events[0]
    payload["InputParameters"][0]["value"]["Attributes"][1]["value"] = "004022"
    changed = parse("fo", payload).events[0]
    payload = load("fo-dataevent-loyaltycard-updated-no-ids.json")
    payload["OperationCreatedOn"] = "/Date(1784109604000-0700)/"
    later = parse("fo", payload).events[0]
    assert len({first.event_id, changed.event_id, later.event_id}) == 3


def test_the_initiating_user_falls_back_to_the_entra_object_id() -> None:
    event = parse("fo", load("fo-dataevent-loyaltycard-updated-no-ids.json")).events[0]
    assert event.initiating_user == "5e2d28cb-a456-4512-b6ab-f3455d765946"  # what INTEGRATION_USER_IDS lists
    payload = load("dataverse-loyaltycard-update.json")
    del payload["InitiatingUserId"]
    payload["InitiatingUserAzureActiveDirectoryObjectId"] = "5E2D28CB-A456-4512-B6AB-F3455D765946"
    assert parse("dataverse", payload).events[0].initiating_user == "5e2d28cb-a456-4512-b6ab-f3455d765946"


# ---------------------------------------------------------------- 4. the nil GUID is no user


@pytest.mark.parametrize(
    "nil",
    [
        "{00000000-0000-0000-0000-000000000000}",
        "00000000-0000-0000-0000-000000000000",
        "  {00000000-0000-0000-0000-000000000000} ",
        "00000000000000000000000000000000",
    ],
)
def test_the_nil_guid_is_no_user_in_a_business_event(nil: str) -> None:
    payload = load("fo-businessevent-loyaltycard-no-user.json")
    payload["InitiatingUserAADObjectId"] = nil
    assert parse("fo", payload).events[0].initiating_user is None


def test_the_nil_guid_is_no_user_in_a_dataverse_webhook_or_data_event() -> None:
    payload = load("dataverse-loyaltycard-update.json")
    payload["InitiatingUserId"] = "{00000000-0000-0000-0000-000000000000}"
    payload["InitiatingUserAzureActiveDirectoryObjectId"] = "00000000-0000-0000-0000-000000000000"
    assert parse("dataverse", payload).events[0].initiating_user is None
    data_event = load("fo-dataevent-loyaltycard-updated-no-ids.json")
    data_event["InitiatingUserAzureActiveDirectoryObjectId"] = "{00000000-0000-0000-0000-000000000000}"
    assert parse("fo", data_event).events[0].initiating_user is None


def test_a_braced_upper_case_user_is_the_same_user() -> None:
    payload = load("fo-businessevent-loyaltycard.json")
    assert parse("fo", payload).events[0].initiating_user == "410a2690-5ec2-42ee-9f2a-e75b4e324930"


# ---------------------------------------------------------------- 5. Event Grid deliveries mixing publishers


def test_a_foreign_event_in_a_batch_is_skipped_and_the_fo_event_queued(caplog: pytest.LogCaptureFixture) -> None:
    body = (FIXTURES / "eventgrid-fo-and-blobcreated.json").read_bytes()
    reader = InMemoryMetricReader()
    previous = telemetry.install(telemetry.Recorder(meter_provider=MeterProvider(metric_readers=[reader])))
    try:
        with caplog.at_level(logging.WARNING, logger="loyaltysync.inbound"):
            reply = inbound.handle_inbound(
                "fo", None, TEMPLATES, body, {"content-type": "application/json"}, max_body_bytes=1_000_000
            )
    finally:
        telemetry.install(previous)
    assert 200 <= reply.status < 300  # Event Grid redelivers nothing
    assert reply.body["accepted"] == 1 and len(reply.messages) == 1
    assert json.loads(reply.messages[0])["key"] == {"CardNumber": "C-1001"}
    assert reply.body["skipped"] == [
        {
            "index": 0,
            "id": "6f1e0c42-801e-0044-6b1a-d3e5c0060a31",
            "eventType": "Microsoft.Storage.BlobCreated",
            "reason": "its data is not an F&O business event (BusinessEventId) or data event (MessageName)",
        }
    ]
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "[0]" in logged and "6f1e0c42-801e-0044-6b1a-d3e5c0060a31" in logged
    assert "Microsoft.Storage.BlobCreated" in logged
    data = reader.get_metrics_data()
    assert data is not None
    foreign = [
        (dict(point.attributes or {}), point.value)
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "loyaltysync.events.foreign"
        for point in metric.data.data_points  # type: ignore[union-attr]
    ]
    assert foreign == [({"side": "fo", "event_type": "Microsoft.Storage.BlobCreated"}, 1)]


def test_a_bad_fo_event_in_a_batch_is_named_by_index_id_and_type() -> None:
    events = load("eventgrid-fo-and-blobcreated.json")
    del events[1]["data"]["ControlNumber"]
    with pytest.raises(EventError) as caught:
        parse("fo", events)
    reason = caught.value.reason
    assert caught.value.status == 400
    assert "[1]" in reason and events[1]["id"] in reason and "LoyaltyCardChangedBusinessEvent" in reason
    assert "ControlNumber" in reason and "Event Grid array" not in reason


def test_the_event_grid_trigger_does_not_fail_on_a_foreign_event(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import sys

    for name, value in {
        "FNO_URL": "https://contoso.operations.dynamics.com",
        "DATAVERSE_URL": "https://contoso.crm.dynamics.com",
        "AzureWebJobsStorage": "UseDevelopmentStorage=true",
        "EVENTGRID_ENABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(ROOT)
    sys.modules.pop("function_app", None)
    try:
        module = importlib.import_module("function_app")
        trigger = next(f for f in module.app.get_functions() if f.get_function_name() == "fo_eventgrid")
        blob = load("eventgrid-fo-and-blobcreated.json")[0]
        event = func.EventGridEvent(
            id=blob["id"],
            data=blob["data"],
            topic=blob["topic"],
            subject=blob["subject"],
            event_type=blob["eventType"],
            event_time=None,
            data_version=blob["dataVersion"],
        )
        assert asyncio.run(trigger.get_user_function()(event)) is None
    finally:
        sys.modules.pop("function_app", None)
