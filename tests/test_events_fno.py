"""F&O data events (virtual tables) and business events -> ChangeEvent(side="fo")."""

from __future__ import annotations

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
CONTRACTS = "http://schemas.microsoft.com/xrm/2011/Contracts"

# A company-specific entity, to see dataAreaId handled as the first key part.
GROUPS = parse_template(
    json.dumps(
        {
            "name": "customer-groups",
            "fo": {"entity_set": "CustomerGroups", "entity_type": "CustCustomerGroupEntity",
                   "keys": ["CustomerGroupId", "GroupSeq"], "company_specific": True,
                   "business_events": ["CustomerGroupChangedBusinessEvent"]},
            "dataverse": {"entity_set": "msdyn_customergroups", "table": "msdyn_customergroup",
                          "primary_id": "msdyn_customergroupid",
                          "alternate_key": ["msdyn_groupid", "msdyn_groupseq", "msdyn_company"],
                          "company_column": "msdyn_company"},
            "fields": [
                {"fo": "CustomerGroupId", "map": "=", "dataverse": "msdyn_groupid"},
                {"fo": "GroupSeq", "map": "=", "dataverse": "msdyn_groupseq", "type": "integer"},
                {"fo": "Description", "map": "=", "dataverse": "msdyn_description"},
            ],
        }
    ),
    "customer-groups.json",
)
WITH_GROUPS = {**TEMPLATES, GROUPS.name: GROUPS}


def load(name: str) -> dict[str, Any]:
    data = json.loads((FIXTURES / name).read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def parse(
    payload: dict[str, Any], template: Template | None = None, templates: dict[str, Template] | None = None
) -> ChangeEvent:
    body = json.dumps(payload).encode()
    result = parse_inbound("fo", body, {}, templates=templates or TEMPLATES, template=template)
    assert isinstance(result, Parsed)
    assert len(result.events) == 1
    return result.events[0]


def refused(payload: dict[str, Any], template: Template | None = None,
            templates: dict[str, Template] | None = None) -> EventError:
    with pytest.raises(EventError) as caught:
        parse(payload, template, templates)
    return caught.value


def target_attributes(data: dict[str, Any]) -> list[dict[str, Any]]:
    entity = next(p["value"] for p in data["InputParameters"] if p["key"] == "Target")
    attributes = entity["Attributes"]
    assert isinstance(attributes, list)
    return attributes


# ---------------------------------------------------------------- data events


@pytest.mark.parametrize(
    ("fixture", "operation", "event_id", "modified_on"),
    [
        ("fo-dataevent-loyaltycard-created.json", "create", "1b110637-4ea2-e711-8122-000d3aa2331c",
         "2026-07-15T10:00:02Z"),
        ("fo-dataevent-loyaltycard-updated.json", "update", "2c220637-4ea2-e711-8122-000d3aa2331c",
         "2026-07-15T10:00:03Z"),
        ("fo-dataevent-loyaltycard-deleted.json", "delete", "3d330637-4ea2-e711-8122-000d3aa2331c",
         "2026-07-15T10:00:04Z"),
    ],
)
def test_data_events_are_keyed_notifications(fixture: str, operation: str, event_id: str, modified_on: str) -> None:
    event = parse(load(fixture))

    assert event.template == "loyalty-cards"
    assert event.side == "fo"
    assert event.operation == operation
    assert event.key == {"CardNumber": "C-2001"}
    # Virtual-table enum integers are not stable: nothing but the key is taken.
    assert event.fields == {} and event.lookup_ids == {}
    assert not event.complete
    assert event.row_id is None
    assert event.event_id == event_id
    assert event.modified_on == modified_on
    assert event.initiating_user == "75c2dd85-e89e-e711-8122-000d3aa2331c"
    assert event.wire_format == "fo-data-event"


def test_an_update_names_the_mapped_fields_it_submitted() -> None:
    """The Target of OnExternalUpdated holds the submitted columns: they tell the sync's own write
    (fields that hold the agreed values) from a person's change (see `sync._change_time`)."""
    data = load("fo-dataevent-loyaltycard-updated.json")
    target_attributes(data).append({"key": "mserp_cardtendertype", "value": 1})

    assert parse(data).changed == ["CardTenderType", "PartyNumber"]  # the key column is not a change


def test_a_submitted_column_the_pre_image_holds_with_the_same_value_is_no_change() -> None:
    """A form saved whole submits columns it did not change: the pre-image tells them apart. Named as
    changed, the save dated an older F&O edit of such a field as new as itself (the simulator found it)."""
    data = load("fo-dataevent-loyaltycard-updated.json")
    target_attributes(data).append({"key": "mserp_cardtendertype", "value": 1})
    data["PreEntityImages"] = [{"key": "PreImage", "value": {
        "Attributes": [{"key": "mserp_cardtendertype", "value": 1}, {"key": "mserp_partynumber", "value": "003999"}],
        "EntityState": None, "FormattedValues": [], "Id": "00000a10-0000-0000-8c13-005001000000",
        "KeyAttributes": [], "LogicalName": "mserp_retailloyaltycardentity", "RelatedEntities": [], "RowVersion": None,
    }}]

    assert parse(data).changed == ["PartyNumber"]


@pytest.mark.parametrize("fixture", ["fo-dataevent-loyaltycard-created.json", "fo-dataevent-loyaltycard-deleted.json"])
def test_creates_and_deletes_name_no_changed_fields(fixture: str) -> None:
    assert parse(load(fixture)).changed == []


def test_data_event_key_from_primary_field_only() -> None:
    data = load("fo-dataevent-loyaltycard-created.json")
    attributes = target_attributes(data)
    attributes[:] = [p for p in attributes if p["key"] != "mserp_cardnumber"]
    for pair in attributes:
        if pair["key"] == "mserp_primaryfield":
            pair["value"] = "C|with|bars"  # a single-key entity: the whole primary field is the key
    assert parse(data).key == {"CardNumber": "C|with|bars"}


def test_data_event_key_columns_win_over_primary_field() -> None:
    data = load("fo-dataevent-loyaltycard-created.json")
    for pair in target_attributes(data):
        if pair["key"] == "mserp_primaryfield":
            pair["value"] = "C-TRUNCATED"
    assert parse(data).key == {"CardNumber": "C-2001"}


def group_data_event(message: str, attributes: dict[str, Any]) -> dict[str, Any]:
    data = load("fo-dataevent-loyaltycard-updated.json")
    data["MessageName"] = message
    data["PrimaryEntityName"] = "mserp_custcustomergroupentity"
    entity = next(p["value"] for p in data["InputParameters"] if p["key"] == "Target")
    entity["LogicalName"] = "mserp_custcustomergroupentity"
    entity["Attributes"] = [{"key": k, "value": v} for k, v in attributes.items()]
    return data


@pytest.mark.parametrize("message", ["OnExternalCreated", "OnExternalUpdated", "OnExternalDeleted"])
def test_company_specific_key_from_primary_field(message: str) -> None:
    data = group_data_event(message, {"mserp_primaryfield": "USMF|10|3", "mserp_description": "x"})
    event = parse(data, templates=WITH_GROUPS)
    assert event.template == "customer-groups"
    assert event.key == {"dataAreaId": "usmf", "CustomerGroupId": "10", "GroupSeq": "3"}


def test_company_specific_key_from_columns() -> None:
    data = group_data_event("OnExternalUpdated", {
        "mserp_dataareaid": "USRT", "mserp_customergroupid": "20", "mserp_groupseq": 4.0,
        "mserp_primaryfield": "usrt|20|4"})
    event = parse(data, templates=WITH_GROUPS)
    assert event.key == {"dataAreaId": "usrt", "CustomerGroupId": "20", "GroupSeq": "4"}
    assert list(event.key) == ["dataAreaId", "CustomerGroupId", "GroupSeq"]


@pytest.mark.parametrize("primary", ["USMF|10", "USMF"])
def test_primary_field_with_too_few_parts_is_422(primary: str) -> None:
    data = group_data_event("OnExternalUpdated", {"mserp_primaryfield": primary})
    error = refused(data, templates=WITH_GROUPS)
    assert error.status == 422
    assert "mserp_primaryfield" in error.reason


def test_primary_field_part_of_wrong_type_is_422() -> None:
    data = group_data_event("OnExternalUpdated", {"mserp_primaryfield": "USMF|10|three"})
    error = refused(data, templates=WITH_GROUPS)
    assert error.status == 422
    assert "GroupSeq" in error.reason


def test_data_event_without_key_is_422() -> None:
    data = load("fo-dataevent-loyaltycard-updated.json")
    attributes = target_attributes(data)
    attributes[:] = [p for p in attributes if p["key"] != "mserp_primaryfield"]
    error = refused(data)
    assert error.status == 422
    assert "mserp_cardnumber" in error.reason


def test_data_event_for_unknown_virtual_table_is_422() -> None:
    data = load("fo-dataevent-loyaltycard-updated.json")
    data["PrimaryEntityName"] = "mserp_custcustomerv3entity"
    error = refused(data)
    assert error.status == 422
    assert "mserp_custcustomerv3entity" in error.reason


def test_data_event_route_checks_the_virtual_table() -> None:
    data = load("fo-dataevent-loyaltycard-updated.json")
    error = refused(data, template=TEMPLATES["loyalty-reward-points"])
    assert error.status == 422
    assert "mserp_retailloyaltycardentity" in error.reason
    assert "loyalty-reward-points" in error.reason


def test_template_without_virtual_table_accepts_any_unclaimed_mserp_table() -> None:
    unnamed = TEMPLATES["loyalty-levels"].model_dump()
    unnamed["fo"]["entity_type"] = None  # no entity_type, hence no virtual table
    levels = Template.model_validate(unnamed)
    data = load("fo-dataevent-loyaltycard-updated.json")
    data["PrimaryEntityName"] = "mserp_retailloyaltylevelentity"
    for pair in target_attributes(data):
        if pair["key"] == "mserp_primaryfield":
            pair["value"] = "Gold"
    assert parse(data, template=levels).key == {"LevelPhrase": "Gold"}
    # ... but not the table another template owns.
    error = refused(load("fo-dataevent-loyaltycard-updated.json"), template=levels)
    assert error.status == 422
    assert "loyalty-cards" in error.reason


@pytest.mark.parametrize("message", ["Update", "OnExternalRenamed"])
def test_non_data_event_messages_are_422(message: str) -> None:
    data = load("fo-dataevent-loyaltycard-updated.json")
    data["MessageName"] = message
    error = refused(data)
    assert error.status == 422
    assert message in error.reason


# ---------------------------------------------------------------- business events


def test_business_event_without_change_type_is_an_update() -> None:
    event = parse(load("fo-businessevent-loyaltycard.json"))

    assert event.template == "loyalty-cards"
    assert event.operation == "update"
    assert event.key == {"CardNumber": "C-1001"}
    assert event.fields == {} and not event.complete
    assert event.source_version == "5637611083"
    assert event.modified_on == "2022-12-30T13:51:15Z"
    assert event.event_id == "3c47a4cd-6edc-4319-b893-3f862eed65fd"
    assert event.initiating_user == "410a2690-5ec2-42ee-9f2a-e75b4e324930"
    assert event.wire_format == "fo-business-event"


@pytest.mark.parametrize(
    ("change_type", "operation"),
    [("Created", "create"), ("Updated", "update"), ("Deleted", "delete"), ("deleted", "delete"), (None, "update")],
)
def test_change_type_gives_the_operation(change_type: str | None, operation: str) -> None:
    data = load("fo-businessevent-loyaltycard.json")
    data["ChangeType"] = change_type
    assert parse(data).operation == operation


def test_unknown_change_type_is_422() -> None:
    data = load("fo-businessevent-loyaltycard.json")
    data["ChangeType"] = "Archived"
    error = refused(data)
    assert error.status == 422 and "Archived" in error.reason


def test_template_found_by_entity_name_when_the_event_is_not_listed() -> None:
    event = parse(load("fo-businessevent-loyaltycard-deleted.json"))
    assert event.template == "loyalty-cards"
    assert event.operation == "delete"
    assert event.key == {"CardNumber": "C-1002"}


def test_key_field_names_match_case_insensitively() -> None:
    data = load("fo-businessevent-loyaltycard.json")
    data["cardnumber"] = data.pop("CardNumber")
    assert parse(data).key == {"CardNumber": "C-1001"}
    data["CARDNUMBER"] = "C-other"
    error = refused(data)
    assert error.status == 400 and "CardNumber" in error.reason


def test_missing_key_field_is_422() -> None:
    data = load("fo-businessevent-loyaltycard.json")
    del data["CardNumber"]
    error = refused(data)
    assert error.status == 422
    assert "CardNumber" in error.reason


@pytest.mark.parametrize("value", [None, "", True, {"a": 1}, [1]])
def test_unusable_key_value_is_422(value: Any) -> None:
    data = load("fo-businessevent-loyaltycard.json")
    data["CardNumber"] = value
    assert refused(data).status == 422


def test_numeric_key_value_is_that_id() -> None:
    data = load("servicebus-loyaltyrewardpoint.json")
    data["RewardPointId"] = 1001
    assert parse(data).key == {"RewardPointId": "1001"}


def test_company_from_legal_entity_or_data_area_id() -> None:
    data = {**load("fo-businessevent-loyaltycard.json"), "BusinessEventId": "CustomerGroupChangedBusinessEvent",
            "CustomerGroupId": "10", "GroupSeq": 2}
    del data["CardNumber"]
    assert parse(data, templates=WITH_GROUPS).key == {"dataAreaId": "usrt", "CustomerGroupId": "10", "GroupSeq": "2"}
    data["dataAreaId"] = "USMF"
    assert parse(data, templates=WITH_GROUPS).key["dataAreaId"] == "usmf"
    del data["BusinessEventLegalEntity"]
    data["dataAreaId"] = ""
    error = refused(data, templates=WITH_GROUPS)
    assert error.status == 422 and "dataAreaId" in error.reason


def test_empty_event_time_means_no_time() -> None:
    data = load("fo-businessevent-loyaltycard.json")
    data["EventTimeIso8601"] = None
    data["EventTime"] = "/Date(-2208988800000)/"
    assert parse(data).modified_on is None
    data["EventTime"] = "/Date(1672408275000)/"
    assert parse(data).modified_on == "2022-12-30T13:51:15Z"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"ControlNumber": "5637611083"}, "ControlNumber"),
        ({"ControlNumber": True}, "ControlNumber"),
        ({"ControlNumber": None}, "ControlNumber"),
        ({"EventId": 42}, "EventId"),
        ({"EventId": ""}, "EventId"),
        ({"BusinessEventId": ""}, "BusinessEventId"),
        ({"BusinessEventLegalEntity": 7}, "BusinessEventLegalEntity"),
        ({"EventTime": "/Date(x)/"}, "EventTime"),
        ({"EventTimeIso8601": "soon"}, "EventTimeIso8601"),
        ({"ParentContextRecordSubjects": "none"}, "ParentContextRecordSubjects"),
        ({"ChangeType": 1}, "ChangeType"),
        ({"EntityName": ["x"]}, "EntityName"),
    ],
)
def test_malformed_envelope_is_400_naming_the_field(change: dict[str, Any], field: str) -> None:
    data = {**load("fo-businessevent-loyaltycard.json"), **change}
    error = refused(data)
    assert error.status == 400
    assert field in error.reason


def test_unlisted_business_event_is_422() -> None:
    data = load("fo-businessevent-loyaltycard.json")
    data["BusinessEventId"] = "SalesOrderInvoicedBusinessEvent"
    error = refused(data)
    assert error.status == 422 and "SalesOrderInvoicedBusinessEvent" in error.reason


def test_business_event_route_checks_the_template() -> None:
    cards, points = TEMPLATES["loyalty-cards"], TEMPLATES["loyalty-reward-points"]
    assert parse(load("fo-businessevent-loyaltycard.json"), template=cards).template == "loyalty-cards"

    error = refused(load("fo-businessevent-loyaltycard.json"), template=points)
    assert error.status == 422
    assert "loyalty-cards" in error.reason and "loyalty-reward-points" in error.reason

    error = refused(load("fo-businessevent-loyaltycard-deleted.json"), template=points)
    assert error.status == 422
    assert "RetailLoyaltyCardEntity" in error.reason

    unlisted = {**load("fo-businessevent-loyaltycard.json"), "BusinessEventId": "CustomCardEvent"}
    error = refused(unlisted, template=cards)
    assert error.status == 422 and "fo.business_events" in error.reason


def test_route_template_without_listed_events_accepts_a_custom_event() -> None:
    levels = TEMPLATES["loyalty-levels"].model_copy(update={"fo": TEMPLATES["loyalty-levels"].fo.model_copy(
        update={"business_events": []})})
    data = {**load("fo-businessevent-loyaltycard.json"), "BusinessEventId": "MyLevelEvent", "LevelPhrase": "Gold"}
    event = parse(data, template=levels)
    assert event.template == "loyalty-levels"
    assert event.key == {"LevelPhrase": "Gold"}
