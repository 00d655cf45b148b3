"""RemoteExecutionContext -> typed object with attributes in Dataverse Web API shape."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loyaltysync.errors import EventError
from loyaltysync.events.remote_context import read_datetime, read_remote_context, web_api_attribute

FIXTURES = Path(__file__).parent / "fixtures" / "events"
CONTRACTS = "http://schemas.microsoft.com/xrm/2011/Contracts"


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def test_reads_the_documented_update_shape() -> None:
    context = read_remote_context(load("dataverse-loyaltycard-update.json"))

    assert context.message_name == "Update"
    assert context.primary_entity_name == "msdyn_loyaltycard"
    assert context.primary_entity_id == "6d81597f-0f9f-e711-8122-000d3aa2331c"
    assert context.has_input_parameters
    assert context.target_kind == "Entity"
    assert context.target is not None
    assert context.target.attributes == {
        "msdyn_cardtendertype": 806380003,
        "msdyn_loyaltycardid": "6d81597f-0f9f-e711-8122-000d3aa2331c",
        "modifiedon": "2026-07-15T10:00:00Z",
        "_modifiedby_value": "75c2dd85-e89e-e711-8122-000d3aa2331c",
        "modifiedonbehalfby": None,
    }
    assert context.target.formatted_values == {"msdyn_cardtendertype": "Blocked"}
    assert set(context.pre_images) == {"PreImage"}
    assert context.pre_images["PreImage"].attributes["msdyn_cardtendertype"] == 806380000
    assert context.post_images["PostImage"].attributes["versionnumber"] == 1298876
    assert context.initiating_user_id == "75c2dd85-e89e-e711-8122-000d3aa2331c"
    assert context.user_id == "75c2dd85-e89e-e711-8122-000d3aa2331c"
    assert context.correlation_id == "c474239d-4233-41a9-8b17-a86cb4f737b5"
    assert context.operation_id == "5bf10637-4ea2-e711-8122-000d3aa2331c"
    assert context.request_id is None
    assert (context.depth, context.stage, context.mode) == (1, 40, 1)
    # /Date(ms-0700)/: the offset is informational, ms is UTC.
    assert context.operation_created_on == "2026-07-15T10:00:01Z"


def test_delete_target_is_an_entity_reference() -> None:
    context = read_remote_context(load("dataverse-loyaltycard-delete.json"))

    assert context.target_kind == "EntityReference"
    assert context.target is not None
    assert context.target.id == "6d81597f-0f9f-e711-8122-000d3aa2331c"
    assert context.target.logical_name == "msdyn_loyaltycard"
    assert context.target.attributes == {}


def test_reduced_form_has_no_input_parameters() -> None:
    context = read_remote_context(load("dataverse-loyaltycard-reduced.json"))

    assert not context.has_input_parameters
    assert context.target is None
    assert context.pre_images == {} and context.post_images == {}
    assert context.primary_entity_id == "6d81597f-0f9f-e711-8122-000d3aa2331c"


def test_entity_valued_input_parameters_other_than_target_are_kept() -> None:
    context = read_remote_context(load("fo-dataevent-loyaltycard-deleted.json"))

    assert context.target_kind == "EntityReference"
    assert context.input_images["PreImage"].attributes["mserp_cardnumber"] == "C-2001"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"__type": f"OptionSetValue:{CONTRACTS}", "Value": 806380001}, ("x", 806380001)),
        ({"__type": f"Money:{CONTRACTS}", "Value": 12.5}, ("x", 12.5)),
        ({"Value": 7}, ("x", 7)),
        (
            {"__type": f"EntityReference:{CONTRACTS}", "Id": "7A1C6B2E-89A0-E711-8122-000D3AA2331C",
             "LogicalName": "transactioncurrency", "Name": "US Dollar"},
            ("_x_value", "7a1c6b2e-89a0-e711-8122-000d3aa2331c"),
        ),
        ({"Id": "{7a1c6b2e-89a0-e711-8122-000d3aa2331c}", "LogicalName": "account"},
         ("_x_value", "7a1c6b2e-89a0-e711-8122-000d3aa2331c")),
        ("/Date(1506384247000)/", ("x", "2017-09-26T00:04:07Z")),
        ("/Date(1506409448000-0700)/", ("x", "2017-09-26T07:04:08Z")),
        ("/Date(1506409448000+0200)/", ("x", "2017-09-26T07:04:08Z")),
        ("\\/Date(1506384247000)\\/", ("x", "2017-09-26T00:04:07Z")),
        ("/Date(-2208988800000)/", ("x", "1900-01-01T00:00:00Z")),
        ("plain text", ("x", "plain text")),
        (True, ("x", True)),
        (None, ("x", None)),
        (3, ("x", 3)),
        (2.25, ("x", 2.25)),
        (
            [{"__type": f"OptionSetValue:{CONTRACTS}", "Value": 1},
             {"__type": f"OptionSetValue:{CONTRACTS}", "Value": 3}],
            ("x", "1,3"),
        ),
    ],
)
def test_attribute_values_become_web_api_json(raw: Any, expected: tuple[str, Any]) -> None:
    assert web_api_attribute("x", raw, "x") == expected


def test_escaped_slashes_in_the_wire_text_decode_to_a_date() -> None:
    # DataContract JSON writes "\/Date(...)\/"; after JSON decoding that is "/Date(...)/".
    body = '{"key": "modifiedon", "value": "\\/Date(1506384247000)\\/"}'
    pair = json.loads(body)
    assert web_api_attribute(pair["key"], pair["value"], "v") == ("modifiedon", "2017-09-26T00:04:07Z")


@pytest.mark.parametrize(
    "raw",
    [
        {"__type": f"OptionSetValue:{CONTRACTS}", "Value": "one"},
        {"__type": f"Money:{CONTRACTS}", "Value": True},
        {"__type": f"EntityReference:{CONTRACTS}", "Id": "not-a-guid", "LogicalName": "account"},
        {"__type": f"EntityReference:{CONTRACTS}", "Id": 5, "LogicalName": "account"},
        "/Date(999999999999999999)/",
    ],
)
def test_malformed_typed_values_are_400(raw: Any) -> None:
    with pytest.raises(EventError) as caught:
        web_api_attribute("x", raw, "x")
    assert caught.value.status == 400


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"MessageName": None}, "MessageName"),
        ({"PrimaryEntityName": 3}, "PrimaryEntityName"),
        ({"InputParameters": {"Target": {}}}, "InputParameters"),
        ({"InputParameters": [{"value": 1}]}, "InputParameters"),
        ({"InputParameters": [{"key": "Target", "value": "text"}]}, "Target"),
        ({"PostEntityImages": [{"key": "PostImage", "value": []}]}, "PostEntityImages.PostImage"),
        ({"PrimaryEntityId": "xyz"}, "PrimaryEntityId"),
        ({"Depth": "1"}, "Depth"),
        ({"Stage": True}, "Stage"),
        ({"OperationCreatedOn": "yesterday"}, "OperationCreatedOn"),
        ({"OperationCreatedOn": "/Date(abc)/"}, "OperationCreatedOn"),
        ({"InitiatingUserId": ["a"]}, "InitiatingUserId"),
    ],
)
def test_wrong_shapes_name_the_part(change: dict[str, Any], fragment: str) -> None:
    data = load("dataverse-loyaltycard-update.json")
    data.update(change)
    with pytest.raises(EventError) as caught:
        read_remote_context(data)
    assert caught.value.status == 400
    assert fragment in caught.value.reason


def test_not_an_object_is_400() -> None:
    with pytest.raises(EventError):
        read_remote_context([1, 2])


def test_empty_guids_and_nulls_are_absent() -> None:
    data = load("dataverse-loyaltycard-update.json")
    data["RequestId"] = "00000000-0000-0000-0000-000000000000"
    data["PostEntityImages"] = [{"key": "PostImage", "value": None}]
    context = read_remote_context(data)
    assert context.request_id is None
    assert context.post_images == {}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/Date(1672408275000)/", "2022-12-30T13:51:15Z"),
        ("2022-12-30T13:51:15.2942742Z", "2022-12-30T13:51:15Z"),
        ("2022-12-30T14:51:15+01:00", "2022-12-30T13:51:15Z"),
        ("", None),
        (None, None),
    ],
)
def test_read_datetime(value: Any, expected: str | None) -> None:
    assert read_datetime(value, "t") == expected
