"""Dataverse webhook -> ChangeEvent(side="dataverse")."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from loyaltysync.errors import EventError
from loyaltysync.events import Parsed, parse_inbound
from loyaltysync.events.model import ChangeEvent
from loyaltysync.templates import Template, default_mappings_dir, load_templates, parse_template

FIXTURES = Path(__file__).parent / "fixtures" / "events"
TEMPLATES = load_templates(default_mappings_dir())
CARD_ID = "6d81597f-0f9f-e711-8122-000d3aa2331c"
CONTRACTS = "http://schemas.microsoft.com/xrm/2011/Contracts"


def load(name: str) -> dict[str, Any]:
    data = json.loads((FIXTURES / name).read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def parse(
    payload: dict[str, Any] | bytes,
    headers: dict[str, str] | None = None,
    template: Template | None = None,
    templates: dict[str, Template] | None = None,
) -> ChangeEvent:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    result = parse_inbound("dataverse", body, headers or {}, templates=templates or TEMPLATES, template=template)
    assert isinstance(result, Parsed)
    assert len(result.events) == 1
    return result.events[0]


def attributes(entity: dict[str, Any]) -> dict[str, Any]:
    return {pair["key"]: pair["value"] for pair in entity["Attributes"]}


def set_attribute(entity: dict[str, Any], name: str, value: Any) -> None:
    entity["Attributes"] = [p for p in entity["Attributes"] if p["key"] != name] + [{"key": name, "value": value}]


def target(data: dict[str, Any]) -> dict[str, Any]:
    entity = next(p["value"] for p in data["InputParameters"] if p["key"] == "Target")
    assert isinstance(entity, dict)
    return entity


def image(data: dict[str, Any], collection: str, alias: str) -> dict[str, Any]:
    entity = next(p["value"] for p in data[collection] if p["key"] == alias)
    assert isinstance(entity, dict)
    return entity


def test_create_with_post_image_is_complete() -> None:
    event = parse((FIXTURES / "dataverse-loyaltycard-create.json").read_bytes())

    assert event.template == "loyalty-cards"
    assert event.side == "dataverse"
    assert event.operation == "create"
    assert event.key == {"CardNumber": "C-1001"}
    assert event.complete
    assert event.fields == {
        "CardNumber": "C-1001",
        "CardTenderType": "AsCardTender",
        "PartyNumber": "004011",
        "ReplacementCardNumber": None,
        "OmOperatingUnitNumber": "012",
        "LoyaltyEnrollmentDate": "2026-01-01T00:00:00Z",
        "LoyaltyEnrollmentDateLocal": "2026-01-01T01:00:00Z",
    }
    assert event.row_id == CARD_ID
    assert event.source_version == "1204511"
    assert event.modified_on == "2026-01-01T00:00:05Z"
    assert event.event_id == "4af10637-4ea2-e711-8122-000d3aa2331c"
    assert event.correlation_id == "b374239d-4233-41a9-8b17-a86cb4f737b5"
    assert event.initiating_user == "75c2dd85-e89e-e711-8122-000d3aa2331c"
    assert event.wire_format == "dataverse-webhook"


def test_update_merges_target_over_post_image_and_target_wins() -> None:
    data = load("dataverse-loyaltycard-update.json")
    # Make the image disagree with what was submitted: the submitted value must win.
    set_attribute(image(data, "PostEntityImages", "PostImage"), "msdyn_cardtendertype",
                  {"__type": f"OptionSetValue:{CONTRACTS}", "Value": 806380001})
    event = parse(data)

    assert event.operation == "update"
    assert event.fields["CardTenderType"] == "Blocked"
    assert event.fields["PartyNumber"] == "004011"  # only in the image
    assert event.complete
    assert event.key == {"CardNumber": "C-1001"}
    assert event.modified_on == "2026-07-15T10:00:00Z"
    assert event.source_version == "1298876"


def test_update_without_image_is_partial_and_keyed_by_row_id() -> None:
    event = parse(load("dataverse-loyaltycard-update-target-only.json"))

    assert event.fields == {"PartyNumber": "004012"}
    assert not event.complete
    assert event.key == {}
    assert event.row_id == CARD_ID
    assert event.source_version is None


def test_delete_takes_key_from_pre_image_and_time_from_operation() -> None:
    event = parse(load("dataverse-loyaltycard-delete.json"))

    assert event.operation == "delete"
    assert event.key == {"CardNumber": "C-1001"}
    assert event.row_id == CARD_ID
    # The pre-image's modifiedon is the last edit, not the delete.
    assert event.modified_on == "2026-07-15T11:00:00Z"


def test_delete_without_pre_image_has_only_the_row_id() -> None:
    data = load("dataverse-loyaltycard-delete.json")
    data["PreEntityImages"] = []
    event = parse(data)

    assert event.operation == "delete"
    assert event.key == {}
    assert event.fields == {}
    assert event.row_id == CARD_ID
    assert not event.complete


@pytest.mark.parametrize("header", ["x-ms-dynamics-msg-size-exceeded", "X-MS-Dynamics-Msg-Size-Exceeded"])
def test_size_exceeded_header_means_reread(header: str) -> None:
    # Even if something was left in the body, the header says it is not the whole story.
    event = parse(load("dataverse-loyaltycard-update.json"), headers={header: "true"})

    assert not event.complete
    assert event.fields == {}
    assert event.lookup_ids == {}
    assert event.key == {}
    assert event.row_id == CARD_ID
    assert event.modified_on == "2026-07-15T10:00:01Z"


def test_reduced_body_without_input_parameters() -> None:
    event = parse(load("dataverse-loyaltycard-reduced.json"))

    assert event.operation == "update"
    assert not event.complete
    assert event.fields == {}
    assert event.row_id == CARD_ID
    assert event.event_id == "8ef10637-4ea2-e711-8122-000d3aa2331c"


def test_reward_point_typed_values_and_lookup() -> None:
    event = parse(load("dataverse-loyaltyrewardpoint-update.json"))

    assert event.template == "loyalty-reward-points"
    assert event.key == {"RewardPointId": "RP-STAR"}
    assert event.fields == {
        "RewardPointId": "RP-STAR",
        "RewardPointType": "Amount",
        "Redeemable": "Yes",
        "RedeemRanking": 2,
        "MaximumLoyaltyRewardPoints": "1500.5",
        "ExpirationTimeUnit": "Month",
        "ExpirationTimeValue": 12,
        "VestingTimeUnit": "Day",
        "VestingTimeValue": 0,
    }
    # The EntityReference id arrived upper case; lookups stay ids until the worker resolves them.
    assert event.lookup_ids == {"RewardPointCurrency": "7a1c6b2e-89a0-e711-8122-000d3aa2331c"}
    assert event.complete


def test_money_value_reaches_a_decimal_field() -> None:
    data = load("dataverse-loyaltyrewardpoint-update.json")
    set_attribute(target(data), "msdyn_maximumloyaltyrewardpoints", {"__type": f"Money:{CONTRACTS}", "Value": 20.75})
    assert parse(data).fields["MaximumLoyaltyRewardPoints"] == "20.75"


def test_cleared_lookup_is_a_null_lookup_id() -> None:
    data = load("dataverse-loyaltyrewardpoint-update.json")
    set_attribute(target(data), "msdyn_rewardpointcurrency", None)
    event = parse(data)
    assert event.lookup_ids == {"RewardPointCurrency": None}
    assert event.complete


def test_missing_lookup_makes_the_event_incomplete() -> None:
    data = load("dataverse-loyaltyrewardpoint-update.json")
    post = image(data, "PostEntityImages", "PostImage")
    post["Attributes"] = [p for p in post["Attributes"] if p["key"] != "msdyn_rewardpointcurrency"]
    event = parse(data)
    assert "RewardPointCurrency" not in event.lookup_ids
    assert not event.complete


def test_value_the_mapping_rejects_is_dropped_not_refused() -> None:
    data = load("dataverse-loyaltycard-update.json")
    unknown = {"__type": f"OptionSetValue:{CONTRACTS}", "Value": 123}
    set_attribute(target(data), "msdyn_cardtendertype", unknown)
    event = parse(data)

    assert "CardTenderType" not in event.fields
    assert event.fields["PartyNumber"] == "004011"
    assert event.key == {"CardNumber": "C-1001"}
    assert not event.complete  # the worker re-reads and parks the record with the mapping error


def test_non_guid_lookup_value_is_dropped() -> None:
    data = load("dataverse-loyaltyrewardpoint-update.json")
    set_attribute(target(data), "_msdyn_rewardpointcurrency_value", "USD")
    post = image(data, "PostEntityImages", "PostImage")
    post["Attributes"] = [p for p in post["Attributes"] if p["key"] != "msdyn_rewardpointcurrency"]
    event = parse(data)
    assert "RewardPointCurrency" not in event.lookup_ids
    assert not event.complete


def test_version_falls_back_to_row_version() -> None:
    data = load("dataverse-loyaltycard-update.json")
    post = image(data, "PostEntityImages", "PostImage")
    post["Attributes"] = [p for p in post["Attributes"] if p["key"] != "versionnumber"]
    post["RowVersion"] = "1298877"
    assert parse(data).source_version == "1298877"


def test_event_id_falls_back_to_request_id() -> None:
    data = load("dataverse-loyaltycard-update.json")
    data["OperationId"] = None
    data["RequestId"] = "AAAAAAAA-0000-4000-8000-000000000001"
    assert parse(data).event_id == "aaaaaaaa-0000-4000-8000-000000000001"


@pytest.mark.parametrize("message", ["Assign", "SetState", "Associate"])
def test_other_messages_are_422_naming_the_message(message: str) -> None:
    data = load("dataverse-loyaltycard-update.json")
    data["MessageName"] = message
    with pytest.raises(EventError) as caught:
        parse(data)
    assert caught.value.status == 422
    assert message in caught.value.reason


def test_data_event_on_the_dataverse_route_is_422() -> None:
    with pytest.raises(EventError) as caught:
        parse(load("fo-dataevent-loyaltycard-created.json"))
    assert caught.value.status == 422
    assert "F&O" in caught.value.reason


def test_unknown_table_is_422() -> None:
    data = load("dataverse-loyaltycard-update.json")
    data["PrimaryEntityName"] = "contact"
    with pytest.raises(EventError) as caught:
        parse(data)
    assert caught.value.status == 422
    assert "contact" in caught.value.reason


def test_route_template_must_match_the_table() -> None:
    with pytest.raises(EventError) as caught:
        parse(load("dataverse-loyaltycard-update.json"), template=TEMPLATES["loyalty-reward-points"])
    assert caught.value.status == 422
    assert "msdyn_loyaltycard" in caught.value.reason
    assert "loyalty-reward-points" in caught.value.reason

    event = parse(load("dataverse-loyaltycard-update.json"), template=TEMPLATES["loyalty-cards"])
    assert event.template == "loyalty-cards"


def test_no_key_and_no_row_id_is_422() -> None:
    data = load("dataverse-loyaltycard-update-target-only.json")
    data["PrimaryEntityId"] = None
    entity = target(data)
    entity["Id"] = "00000000-0000-0000-0000-000000000000"
    entity["Attributes"] = [p for p in entity["Attributes"] if p["key"] != "msdyn_loyaltycardid"]
    with pytest.raises(EventError) as caught:
        parse(data)
    assert caught.value.status == 422


COMPANY_LOOKUP_TEMPLATE = parse_template(
    json.dumps(
        {
            "name": "customer-groups",
            "fo": {"entity_set": "CustomerGroups", "entity_type": "CustCustomerGroupEntity",
                   "keys": ["CustomerGroupId"], "company_specific": True},
            "dataverse": {
                "entity_set": "msdyn_customergroups", "table": "msdyn_customergroup",
                "primary_id": "msdyn_customergroupid", "alternate_key": ["msdyn_groupid", "msdyn_company"],
                "company_column": "msdyn_company",
                "company_lookup": {"entity_set": "cdm_companies", "table": "cdm_company",
                                   "id_column": "cdm_companyid", "key_column": "cdm_companycode"},
            },
            "fields": [
                {"fo": "CustomerGroupId", "map": "=", "dataverse": "msdyn_groupid"},
                {"fo": "Description", "map": "=", "dataverse": "msdyn_description"},
            ],
        }
    ),
    "customer-groups.json",
)


def test_company_lookup_key_is_left_to_the_worker() -> None:
    group_id = "11111111-2222-4333-8444-555555555555"
    company_id = "99999999-8888-4777-8666-555555555555"
    data = load("dataverse-loyaltycard-create.json")
    data["PrimaryEntityName"] = "msdyn_customergroup"
    data["PrimaryEntityId"] = group_id
    data["PostEntityImages"] = []
    entity = target(data)
    entity["LogicalName"] = "msdyn_customergroup"
    entity["Attributes"] = [
        {"key": "msdyn_groupid", "value": "10"},
        {"key": "msdyn_description", "value": "Retail customers"},
        {"key": "msdyn_company", "value": {"__type": f"EntityReference:{CONTRACTS}", "Id": company_id,
                                           "LogicalName": "cdm_company", "Name": "USMF"}},
    ]
    event = parse(data, templates={"customer-groups": COMPANY_LOOKUP_TEMPLATE})

    assert event.fields == {"CustomerGroupId": "10", "Description": "Retail customers"}
    assert event.lookup_ids == {"dataAreaId": company_id}
    assert event.complete
    # The company part of the key is a row id here: the worker resolves it.
    assert event.key == {}
    assert event.row_id == group_id


def test_parsing_does_not_depend_on_input_order() -> None:
    data = load("dataverse-loyaltycard-update.json")
    reordered = copy.deepcopy(data)
    entity = target(reordered)
    entity["Attributes"] = list(reversed(entity["Attributes"]))
    first, second = parse(data), parse(reordered)
    assert (first.fields, first.key, first.complete) == (second.fields, second.key, second.complete)
