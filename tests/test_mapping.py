"""Mapping: F&O record ⇄ canonical values ⇄ Dataverse record, for every map type and value type."""

from __future__ import annotations

import json
import string
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loyaltysync.errors import MappingError
from loyaltysync.mapping import (
    FO_EMPTY_DATETIME,
    canonical_to_dataverse,
    canonical_to_fo,
    dataverse_key,
    dataverse_select,
    dataverse_to_canonical,
    dataverse_values,
    differing_fields,
    fo_key,
    fo_select,
    fo_to_canonical,
    key_text,
    lookup_column,
    natural_key,
    parse_datetime,
    resolve_lookups,
)
from loyaltysync.templates import FieldMap, Lookup, Template, default_mappings_dir, load_templates, parse_template

SHIPPED = load_templates(default_mappings_dir())
FIXTURES = load_templates(Path(__file__).parent / "fixtures" / "templates")
CARDS = SHIPPED["loyalty-cards"]
LEVELS = SHIPPED["loyalty-levels"]
POINTS = SHIPPED["loyalty-reward-points"]
COMPANY = FIXTURES["company-customers"]
EVERY = FIXTURES["every-map"]
ALL_TEMPLATES = [*SHIPPED.values(), *FIXTURES.values()]

USD = "6a2f1b0c-0000-4000-8000-000000000001"
EUR = "6a2f1b0c-0000-4000-8000-000000000002"
NOK = "6a2f1b0c-0000-4000-8000-000000000003"


class FakeResolver:
    """Dict-backed LookupResolver: (entity set, natural key) ⇄ row id; records what it was asked."""

    def __init__(self, rows: Mapping[str, Mapping[str, str]]) -> None:
        self.rows = {entity_set: dict(keys) for entity_set, keys in rows.items()}
        self.asked: list[tuple[str, str]] = []

    def id_for(self, lookup: Lookup, key: str) -> str | None:
        self.asked.append(("id_for", key))
        return self.rows.get(lookup.entity_set, {}).get(key)

    def key_for(self, lookup: Lookup, row_id: str) -> str | None:
        self.asked.append(("key_for", row_id))
        for key, known in self.rows.get(lookup.entity_set, {}).items():
            if known == row_id:
                return key
        return None


def resolver() -> FakeResolver:
    return FakeResolver({"transactioncurrencies": {"USD": USD, "EUR": EUR, "NOK": NOK}})


def stored_in_dataverse(template: Template, body: Mapping[str, Any]) -> dict[str, Any]:
    """What Dataverse hands back after a write: `nav@odata.bind` becomes `_<column>_value`."""
    by_nav = {f.navigation_property: f for f in template.all_fields if f.lookup is not None}
    record: dict[str, Any] = {}
    for name, value in body.items():
        if name.endswith("@odata.bind"):
            f = by_nav[name.removesuffix("@odata.bind")]
            record[lookup_column(f)] = None if value is None else value.split("(")[1].rstrip(")")
        else:
            record[name] = value
    return record


def error_of(call: Any, *args: Any, **kwargs: Any) -> MappingError:
    with pytest.raises(MappingError) as caught:
        call(*args, **kwargs)
    return caught.value


# ----------------------------------------------------------------- loyalty cards, end to end

FO_CARD = {
    "@odata.etag": 'W/"JzAsMjI1NjU0MjExNzYn"',
    "CardNumber": "C-1001",
    "CardTenderType": "Blocked",
    "PartyNumber": "004021",
    "ReplacementCardNumber": "",
    "OmOperatingUnitNumber": "OU-7",
    "LoyaltyEnrollmentDate": "2024-05-01T10:30:45Z",
    "LoyaltyEnrollmentDateLocal": "1900-01-01T00:00:00Z",
    "LoyaltyEnrollmentTime": 37845,
}
CANONICAL_CARD = {
    "CardNumber": "C-1001",
    "CardTenderType": "Blocked",
    "PartyNumber": "004021",
    "ReplacementCardNumber": None,
    "OmOperatingUnitNumber": "OU-7",
    "LoyaltyEnrollmentDate": "2024-05-01T10:30:45Z",
    "LoyaltyEnrollmentDateLocal": None,
}


def test_card_from_fo_to_canonical_ignores_unmapped_properties() -> None:
    assert fo_to_canonical(CARDS, FO_CARD) == CANONICAL_CARD


def test_card_canonical_to_dataverse_translates_and_nulls() -> None:
    assert canonical_to_dataverse(CARDS, CANONICAL_CARD, resolver()) == {
        "msdyn_cardnumber": "C-1001",
        "msdyn_cardtendertype": 806380003,
        "msdyn_partynumber": "004021",
        "msdyn_replacementcardnumber": None,
        "msdyn_operatingunitnumber": "OU-7",
        "msdyn_enrollmentdate": "2024-05-01T10:30:45Z",
        "msdyn_effectivedate": None,
    }


def test_card_from_dataverse_to_canonical_and_to_fo() -> None:
    record = {
        "@odata.etag": 'W/"123"',
        "msdyn_loyaltycardid": "00000000-0000-0000-0000-00000000c001",
        "msdyn_cardnumber": "C-1001",
        "msdyn_cardtendertype": 806380003,
        "msdyn_partynumber": None,
        "msdyn_replacementcardnumber": "C-0999",
        "msdyn_operatingunitnumber": "OU-7",
        "msdyn_enrollmentdate": "2024-05-01T10:30:45Z",
        "msdyn_effectivedate": None,
    }
    values = dataverse_to_canonical(CARDS, record, resolver())
    assert values == {**CANONICAL_CARD, "PartyNumber": None, "ReplacementCardNumber": "C-0999"}
    # '>' ReplacementCardNumber flows F&O -> Dataverse only: never written to F&O.
    assert canonical_to_fo(CARDS, values) == {
        "CardNumber": "C-1001",
        "CardTenderType": "Blocked",
        "PartyNumber": "",
        "OmOperatingUnitNumber": "OU-7",
        "LoyaltyEnrollmentDate": "2024-05-01T10:30:45Z",
        "LoyaltyEnrollmentDateLocal": FO_EMPTY_DATETIME,
    }


# ----------------------------------------------------------------- empty values


@pytest.mark.parametrize("empty", ["1900-01-01T00:00:00Z", "1900-01-01T12:00:00Z", "1900-01-01T00:00:00.000Z", None])
def test_fo_empty_date_is_none(empty: str | None) -> None:
    values = fo_to_canonical(CARDS, {"CardNumber": "C-1", "LoyaltyEnrollmentDate": empty})
    assert values["LoyaltyEnrollmentDate"] is None


def test_none_date_is_written_as_fo_empty_date_and_dataverse_null() -> None:
    values = {"LoyaltyEnrollmentDate": None}
    assert FO_EMPTY_DATETIME == "1900-01-01T00:00:00Z"
    assert canonical_to_fo(CARDS, values) == {"LoyaltyEnrollmentDate": "1900-01-01T00:00:00Z"}
    assert canonical_to_dataverse(CARDS, values, resolver()) == {"msdyn_enrollmentdate": None}


@pytest.mark.parametrize("empty", ["", None])
def test_empty_and_null_strings_are_none_on_both_sides(empty: str | None) -> None:
    assert fo_to_canonical(CARDS, {"PartyNumber": empty}) == {"PartyNumber": None}
    assert dataverse_to_canonical(CARDS, {"msdyn_partynumber": empty}, resolver()) == {"PartyNumber": None}


def test_none_string_is_written_empty_to_fo_and_null_to_dataverse() -> None:
    assert canonical_to_fo(CARDS, {"PartyNumber": None}) == {"PartyNumber": ""}
    assert canonical_to_dataverse(CARDS, {"PartyNumber": None}, resolver()) == {"msdyn_partynumber": None}


def test_empty_numbers_and_booleans_are_none() -> None:
    fo = fo_to_canonical(EVERY, {"Quantity": "", "Price": None, "Fragile": None})
    assert fo == {"Quantity": None, "Price": None, "Fragile": None}
    assert canonical_to_dataverse(EVERY, fo, resolver()) == {"test_quantity": None, "test_price": None,
                                                             "test_fragile": None}


# ----------------------------------------------------------------- date/time normalization


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("2024-05-01T10:30:45Z", "2024-05-01T10:30:45Z"),
        ("2024-05-01T12:30:45+02:00", "2024-05-01T10:30:45Z"),
        ("2024-05-01T03:30:45-07:00", "2024-05-01T10:30:45Z"),
        ("2024-05-01T23:30:45-11:30", "2024-05-02T11:00:45Z"),
        ("2024-05-01T10:30:45.9999999Z", "2024-05-01T10:30:45Z"),
        ("2024-05-01T10:30:45.123+00:00", "2024-05-01T10:30:45Z"),
        ("2024-05-01T10:30:45", "2024-05-01T10:30:45Z"),
        ("/Date(1714559445000)/", "2024-05-01T10:30:45Z"),
        ("/Date(1714559445000-0700)/", "2024-05-01T10:30:45Z"),
        ("/Date(1714559445000+0530)/", "2024-05-01T10:30:45Z"),
        ("/Date(1714559445999)/", "2024-05-01T10:30:45Z"),
        ("/Date(-2208988800000)/", None),  # 1900-01-01T00:00:00Z
        ("", None),
    ],
)
def test_datetimes_become_utc_seconds_with_z(raw: str, canonical: str | None) -> None:
    assert fo_to_canonical(CARDS, {"LoyaltyEnrollmentDate": raw}) == {"LoyaltyEnrollmentDate": canonical}
    from_dv = dataverse_to_canonical(CARDS, {"msdyn_enrollmentdate": raw}, resolver())
    assert from_dv == {"LoyaltyEnrollmentDate": canonical}


def test_parse_datetime_is_aware_utc() -> None:
    moment = parse_datetime("2024-05-01T12:30:45+02:00")
    assert moment == datetime(2024, 5, 1, 10, 30, 45, tzinfo=UTC)
    assert moment is not None and moment.utcoffset() is not None
    assert parse_datetime(datetime(2024, 5, 1, 10, 0)) == datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
    assert parse_datetime(None) is None


@pytest.mark.parametrize("bad", ["yesterday", "2024-13-01T00:00:00Z", 20240501, True])
def test_bad_datetime_is_a_mapping_error(bad: Any) -> None:
    error = error_of(fo_to_canonical, CARDS, {"LoyaltyEnrollmentDate": bad})
    assert (error.template, error.field, error.value) == ("loyalty-cards", "LoyaltyEnrollmentDate", bad)
    assert "datetime" in error.problem


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("2024-05-01T12:00:00Z", "2024-05-01"),
        ("2024-05-01", "2024-05-01"),
        ("2024-05-01T00:00:00Z", "2024-05-01"),
        ("1900-01-01T12:00:00Z", None),
        ("1900-01-01T00:00:00Z", None),
        ("1900-01-01", None),
    ],
)
def test_date_fields(raw: str, canonical: str | None) -> None:
    assert fo_to_canonical(EVERY, {"ShipDate": raw}) == {"ShipDate": canonical}
    assert dataverse_to_canonical(EVERY, {"test_shipdate": raw}, resolver()) == {"ShipDate": canonical}


def test_date_written_as_noon_to_fo_and_plain_to_dataverse() -> None:
    assert canonical_to_fo(EVERY, {"ShipDate": "2024-05-01"}) == {"ShipDate": "2024-05-01T12:00:00Z"}
    assert canonical_to_fo(EVERY, {"ShipDate": None}) == {"ShipDate": FO_EMPTY_DATETIME}
    assert canonical_to_dataverse(EVERY, {"ShipDate": "2024-05-01"}, resolver()) == {"test_shipdate": "2024-05-01"}
    assert canonical_to_dataverse(EVERY, {"ShipDate": None}, resolver()) == {"test_shipdate": None}


# ----------------------------------------------------------------- numbers and booleans


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("100.0000", "100"),
        (100, "100"),
        (1.50, "1.5"),
        ("1.50", "1.5"),
        ("-0.000", "0"),
        (0, "0"),
        ("1E+3", "1000"),
        (1e-7, "0.0000001"),
        (12345678.123456, "12345678.123456"),
        ("-2.5", "-2.5"),
    ],
)
def test_decimals_are_normalized_strings(raw: Any, canonical: str) -> None:
    assert fo_to_canonical(POINTS, {"MaximumLoyaltyRewardPoints": raw}) == {"MaximumLoyaltyRewardPoints": canonical}
    from_dv = dataverse_to_canonical(POINTS, {"msdyn_maximumloyaltyrewardpoints": raw}, resolver())
    assert from_dv == {"MaximumLoyaltyRewardPoints": canonical}


@pytest.mark.parametrize(("canonical", "number"), [("100", 100), ("1.5", 1.5), ("0", 0), ("-2.25", -2.25)])
def test_decimals_are_written_as_json_numbers(canonical: str, number: float) -> None:
    fo = canonical_to_fo(POINTS, {"MaximumLoyaltyRewardPoints": canonical})["MaximumLoyaltyRewardPoints"]
    dv = canonical_to_dataverse(POINTS, {"MaximumLoyaltyRewardPoints": canonical}, resolver())
    for written in (fo, dv["msdyn_maximumloyaltyrewardpoints"]):
        assert written == number
        assert type(written) is type(number)
        assert json.dumps(written) == json.dumps(number)


@pytest.mark.parametrize("bad", ["abc", "NaN", "Infinity", True, [1]])
def test_bad_decimal_is_a_mapping_error(bad: Any) -> None:
    error = error_of(fo_to_canonical, POINTS, {"MaximumLoyaltyRewardPoints": bad})
    assert error.field == "MaximumLoyaltyRewardPoints"
    assert "decimal" in error.problem


@pytest.mark.parametrize(("raw", "canonical"), [(7, 7), ("42", 42), (42.0, 42), ("-3", -3), (2147483647, 2147483647)])
def test_integers(raw: Any, canonical: int) -> None:
    values = fo_to_canonical(POINTS, {"RedeemRanking": raw})
    assert values == {"RedeemRanking": canonical}
    assert type(values["RedeemRanking"]) is int


@pytest.mark.parametrize("bad", [1.5, "1.5", True, "seven"])
def test_integer_rejects_non_whole_values(bad: Any) -> None:
    for error in (
        error_of(fo_to_canonical, POINTS, {"RedeemRanking": bad}),
        error_of(dataverse_to_canonical, POINTS, {"msdyn_redeemranking": bad}, resolver()),
    ):
        assert (error.template, error.field, error.value) == ("loyalty-reward-points", "RedeemRanking", bad)
        assert "integer" in error.problem


@pytest.mark.parametrize(("raw", "canonical"), [(True, True), (False, False), ("true", True), ("False", False)])
def test_booleans(raw: Any, canonical: bool) -> None:
    assert fo_to_canonical(EVERY, {"Fragile": raw}) == {"Fragile": canonical}
    assert canonical_to_dataverse(EVERY, {"Fragile": canonical}, resolver()) == {"test_fragile": canonical}
    assert canonical_to_fo(EVERY, {"Fragile": canonical}) == {"Fragile": canonical}


@pytest.mark.parametrize("bad", [1, 0, "yes", 1.0])
def test_boolean_rejects_other_values(bad: Any) -> None:
    assert error_of(fo_to_canonical, EVERY, {"Fragile": bad}).field == "Fragile"


def test_string_rejects_a_number() -> None:
    error = error_of(dataverse_to_canonical, CARDS, {"msdyn_partynumber": 4021}, resolver())
    assert (error.field, error.value) == ("PartyNumber", 4021)


# ----------------------------------------------------------------- value maps


@pytest.mark.parametrize(
    ("template", "field", "fo_value", "dv_value"),
    [
        (POINTS, "Redeemable", "Yes", True),
        (POINTS, "Redeemable", "No", False),
        (CARDS, "CardTenderType", "AsCardTender", 806380000),
        (CARDS, "CardTenderType", "AsContactTender", 806380001),
        (CARDS, "CardTenderType", "NoTender", 806380002),
        (CARDS, "CardTenderType", "Blocked", 806380003),
        (POINTS, "RewardPointType", "Quantity", 192350000),
        (POINTS, "RewardPointType", "Amount", 192350001),
        (POINTS, "ExpirationTimeUnit", "Month", 806380001),
        (POINTS, "VestingTimeUnit", "Year", 806380002),
    ],
)
def test_value_maps_both_ways(template: Template, field: str, fo_value: str, dv_value: Any) -> None:
    f = template.field(field)
    assert f.fo is not None and f.dataverse is not None
    canonical = fo_to_canonical(template, {f.fo: fo_value})
    assert canonical == {field: fo_value}
    to_dv = canonical_to_dataverse(template, canonical, resolver())
    assert to_dv == {f.dataverse: dv_value}
    assert type(to_dv[f.dataverse]) is type(dv_value)
    assert dataverse_to_canonical(template, {f.dataverse: dv_value}, resolver()) == canonical
    assert canonical_to_fo(template, canonical) == {f.fo: fo_value}


def test_fo_value_without_value_map_entry_names_template_field_and_value() -> None:
    error = error_of(fo_to_canonical, CARDS, {"CardTenderType": "Frozen"})
    assert (error.template, error.field, error.value) == ("loyalty-cards", "CardTenderType", "Frozen")
    assert "value map" in error.problem
    assert "loyalty-cards" in str(error) and "CardTenderType" in str(error) and "'Frozen'" in str(error)


@pytest.mark.parametrize(
    ("template", "record", "field", "value"),
    [
        (CARDS, {"msdyn_cardtendertype": 806389999}, "CardTenderType", 806389999),
        (CARDS, {"msdyn_cardtendertype": True}, "CardTenderType", True),  # a boolean is not a choice
        (POINTS, {"msdyn_redeemable": 1}, "Redeemable", 1),  # a number is not a two-option boolean
        (POINTS, {"msdyn_rewardpointtype": "192350000"}, "RewardPointType", "192350000"),
    ],
)
def test_dataverse_value_without_value_map_entry(template: Template, record: dict[str, Any], field: str,
                                                 value: Any) -> None:
    error = error_of(dataverse_to_canonical, template, record, resolver())
    assert (error.template, error.field, error.value) == (template.name, field, value)
    assert repr(value) in str(error)


def test_canonical_value_without_value_map_entry_is_refused_toward_dataverse() -> None:
    error = error_of(canonical_to_dataverse, CARDS, {"CardTenderType": "Frozen"}, resolver())
    assert (error.field, error.value) == ("CardTenderType", "Frozen")


def test_canonical_value_without_value_map_entry_is_refused_toward_fo() -> None:
    # A stale state value (value map edited since) must not reach F&O unchecked either.
    error = error_of(canonical_to_fo, CARDS, {"CardTenderType": "Frozen"})
    assert (error.field, error.value) == ("CardTenderType", "Frozen")


def test_empty_enum_is_none_and_not_written_to_fo() -> None:
    assert fo_to_canonical(CARDS, {"CardTenderType": ""}) == {"CardTenderType": None}
    assert dataverse_to_canonical(CARDS, {"msdyn_cardtendertype": None}, resolver()) == {"CardTenderType": None}
    assert canonical_to_dataverse(CARDS, {"CardTenderType": None}, resolver()) == {"msdyn_cardtendertype": None}
    assert canonical_to_fo(CARDS, {"CardTenderType": None}) == {}  # F&O enums always hold a member


# ----------------------------------------------------------------- lookups


def test_lookup_binds_the_row_found_by_iso_code() -> None:
    fake = resolver()
    body = canonical_to_dataverse(POINTS, {"RewardPointCurrency": "EUR"}, fake)
    assert body == {"msdyn_rewardpointcurrency@odata.bind": f"/transactioncurrencies({EUR})"}
    assert fake.asked == [("id_for", "EUR")]


def test_lookup_uses_the_declared_navigation_property() -> None:
    body = canonical_to_dataverse(EVERY, {"Currency": "NOK"}, resolver())
    assert body == {"test_CurrencyId@odata.bind": f"/transactioncurrencies({NOK})"}


def test_lookup_value_column_reads_back_as_iso_code() -> None:
    record = {"_msdyn_rewardpointcurrency_value": USD.upper()}  # GUID case does not matter
    assert dataverse_to_canonical(POINTS, record, resolver()) == {"RewardPointCurrency": "USD"}
    values, ids = dataverse_values(POINTS, record)
    assert (values, ids) == ({}, {"RewardPointCurrency": USD})
    assert resolve_lookups(POINTS, ids, resolver()) == {"RewardPointCurrency": "USD"}


def test_lookup_plain_column_is_not_read_as_a_value() -> None:
    # Only `_<column>_value` carries the lookup; a bare column (e.g. a stray annotation target) is ignored.
    assert dataverse_to_canonical(POINTS, {"msdyn_rewardpointcurrency": "whatever"}, resolver()) == {}


def test_lookup_from_fo_is_the_iso_code_itself() -> None:
    assert fo_to_canonical(POINTS, {"RewardPointCurrency": "USD"}) == {"RewardPointCurrency": "USD"}
    assert fo_to_canonical(POINTS, {"RewardPointCurrency": ""}) == {"RewardPointCurrency": None}
    assert canonical_to_fo(POINTS, {"RewardPointCurrency": "USD"}) == {"RewardPointCurrency": "USD"}


def test_unknown_iso_code_is_a_mapping_error() -> None:
    error = error_of(canonical_to_dataverse, POINTS, {"RewardPointCurrency": "XTS"}, resolver())
    assert (error.template, error.field, error.value) == ("loyalty-reward-points", "RewardPointCurrency", "XTS")
    assert "transactioncurrency" in error.problem and "isocurrencycode" in error.problem


def test_unknown_lookup_id_is_a_mapping_error() -> None:
    stranger = "99999999-0000-4000-8000-000000000000"
    error = error_of(dataverse_to_canonical, POINTS, {"_msdyn_rewardpointcurrency_value": stranger}, resolver())
    assert (error.field, error.value) == ("RewardPointCurrency", stranger)
    assert "transactioncurrency" in error.problem


def test_none_clears_the_lookup() -> None:
    fake = resolver()
    assert canonical_to_dataverse(POINTS, {"RewardPointCurrency": None}, fake) == {
        "msdyn_rewardpointcurrency@odata.bind": None
    }
    assert fake.asked == []
    assert dataverse_to_canonical(POINTS, {"_msdyn_rewardpointcurrency_value": None}, fake) == {
        "RewardPointCurrency": None
    }


def test_resolve_lookups_refuses_a_non_lookup_field() -> None:
    error = error_of(resolve_lookups, POINTS, {"RedeemRanking": "x"}, resolver())
    assert error.field == "RedeemRanking"


# ----------------------------------------------------------------- directions and defaults


def test_one_way_fields_are_never_written_the_wrong_way() -> None:
    values = {
        "WidgetId": "W-1", "Label": "shown in CE", "Segment": "Online",
        "InternalNote": "typed in CE", "Rating": "High",
    }
    to_dv = canonical_to_dataverse(EVERY, values, resolver())
    to_fo = canonical_to_fo(EVERY, values)
    assert to_dv == {"test_code": "W-1", "test_label": "shown in CE", "test_segment": 3}
    assert to_fo == {"WidgetId": "W-1", "InternalNote": "typed in CE", "Rating": "High"}


def test_one_way_fields_are_read_from_both_sides_for_comparison() -> None:
    fo = {"WidgetId": "W-1", "Label": "L", "Segment": "Wholesale", "InternalNote": "n", "Rating": "Low", "Origin": "x"}
    assert fo_to_canonical(EVERY, fo) == {
        "WidgetId": "W-1", "Label": "L", "Segment": "Wholesale", "InternalNote": "n", "Rating": "Low",
    }  # Origin is a constant-only field: nothing to compare
    dv = {"test_code": "W-1", "test_label": "L", "test_segment": 2, "test_note": "n", "test_rating": 1,
          "test_source": 192350000}
    assert dataverse_to_canonical(EVERY, dv, resolver()) == {
        "WidgetId": "W-1", "Label": "L", "Segment": "Wholesale", "InternalNote": "n", "Rating": "Low",
    }


def test_translated_one_way_value_outside_its_map() -> None:
    assert error_of(dataverse_to_canonical, EVERY, {"test_rating": 9}, resolver()).field == "Rating"
    assert error_of(fo_to_canonical, EVERY, {"Segment": "Space"}).field == "Segment"


def test_constant_defaults_only_on_create() -> None:
    assert canonical_to_dataverse(EVERY, {"WidgetId": "W-1"}, resolver()) == {"test_code": "W-1"}
    assert canonical_to_dataverse(EVERY, {"WidgetId": "W-1"}, resolver(), create=True) == {
        "test_code": "W-1", "test_segment": 1, "test_source": 192350000,
    }
    assert canonical_to_fo(EVERY, {"WidgetId": "W-1"}) == {"WidgetId": "W-1"}
    assert canonical_to_fo(EVERY, {"WidgetId": "W-1"}, create=True) == {"WidgetId": "W-1", "Origin": "Dataverse"}


def test_a_value_beats_the_default_on_create() -> None:
    body = canonical_to_dataverse(EVERY, {"WidgetId": "W-1", "Segment": "Online"}, resolver(), create=True)
    assert body["test_segment"] == 3


def test_max_length_is_checked_toward_both_sides() -> None:
    long = "C" * 31
    for error in (
        error_of(canonical_to_fo, CARDS, {"CardNumber": long}),
        error_of(canonical_to_dataverse, CARDS, {"CardNumber": long}, resolver()),
    ):
        assert (error.template, error.field, error.value) == ("loyalty-cards", "CardNumber", long)
        assert "30" in error.problem
    assert canonical_to_fo(CARDS, {"CardNumber": "C" * 30}) == {"CardNumber": "C" * 30}


# ----------------------------------------------------------------- keys, selects, company


def test_natural_key_and_addresses() -> None:
    key = natural_key(CARDS, CANONICAL_CARD)
    assert key == {"CardNumber": "C-1001"}
    assert fo_key(CARDS, key) == {"CardNumber": "C-1001"}
    assert dataverse_key(CARDS, key) == {"msdyn_cardnumber": "C-1001"}
    assert key_text(key) == "C-1001"


@pytest.mark.parametrize("values", [{}, {"CardNumber": None}, {"CardNumber": ""}])
def test_natural_key_missing_is_a_mapping_error(values: dict[str, Any]) -> None:
    error = error_of(natural_key, CARDS, values, "dataverse")
    assert (error.template, error.field) == ("loyalty-cards", "CardNumber")
    assert "dataverse record" in error.problem


def test_company_is_lower_cased_and_leads_the_key() -> None:
    fo = {"dataAreaId": "USRT", "CustomerAccount": "US-001", "OrganizationName": "Contoso", "CreditLimit": 5000.0,
          "CreditLimitIsMandatory": False}
    values = fo_to_canonical(COMPANY, fo)
    assert values == {"dataAreaId": "usrt", "CustomerAccount": "US-001", "OrganizationName": "Contoso",
                      "CreditLimit": "5000", "CreditLimitIsMandatory": False}
    dv = {"msdyn_companycode": "UsRt", "accountnumber": "US-001"}
    assert dataverse_to_canonical(COMPANY, dv, resolver()) == {"dataAreaId": "usrt", "CustomerAccount": "US-001"}
    key = natural_key(COMPANY, values)
    assert list(key.items()) == [("dataAreaId", "usrt"), ("CustomerAccount", "US-001")]
    assert key_text(key) == "usrt|US-001"
    assert fo_key(COMPANY, key) == {"dataAreaId": "usrt", "CustomerAccount": "US-001"}
    assert dataverse_key(COMPANY, key) == {"msdyn_companycode": "usrt", "accountnumber": "US-001"}
    assert canonical_to_dataverse(COMPANY, values, resolver())["msdyn_companycode"] == "usrt"
    assert canonical_to_fo(COMPANY, values)["dataAreaId"] == "usrt"
    with pytest.raises(MappingError):
        natural_key(COMPANY, {"CustomerAccount": "US-001"})


def test_selects() -> None:
    assert dataverse_select(CARDS) == [
        "msdyn_loyaltycardid", "modifiedon", "versionnumber",
        "msdyn_cardnumber", "msdyn_cardtendertype", "msdyn_partynumber", "msdyn_replacementcardnumber",
        "msdyn_operatingunitnumber", "msdyn_enrollmentdate", "msdyn_effectivedate",
    ]
    assert fo_select(CARDS) == [
        "CardNumber", "CardTenderType", "PartyNumber", "ReplacementCardNumber", "OmOperatingUnitNumber",
        "LoyaltyEnrollmentDate", "LoyaltyEnrollmentDateLocal",
    ]
    assert "_msdyn_rewardpointcurrency_value" in dataverse_select(POINTS)
    assert "msdyn_rewardpointcurrency" not in dataverse_select(POINTS)
    assert dataverse_select(COMPANY)[:4] == ["accountid", "modifiedon", "versionnumber", "msdyn_companycode"]
    assert fo_select(COMPANY) == [
        "dataAreaId", "CustomerAccount", "OrganizationName", "CreditLimit", "CreditLimitIsMandatory",
        "ModifiedDateTime",
    ]


def test_differing_fields_counts_absent_as_none() -> None:
    left = {"CardNumber": "C-1", "PartyNumber": None}
    assert differing_fields(CARDS, left, {"CardNumber": "C-1"}) == []
    assert differing_fields(CARDS, left, {"CardNumber": "C-1", "PartyNumber": "P"}) == ["PartyNumber"]


def test_many_to_one_translation_settles() -> None:
    # A '>>' map may send two F&O members to one Dataverse value (only two-way maps must invert).
    # Whatever F&O holds, the Dataverse record it produces must read back as the same canonical
    # value, or the sync would rewrite the same record forever.
    data = json.loads((Path(__file__).parent / "fixtures" / "templates" / "every-map.json").read_text("utf-8"))
    data["fields"][10]["value_map"] = {"Retail": 1, "Wholesale": 2, "Online": 1}
    template = parse_template(json.dumps(data), "every-map.json")
    for member in ("Retail", "Wholesale", "Online"):
        from_fo = fo_to_canonical(template, {"Segment": member})
        written = canonical_to_dataverse(template, from_fo, resolver())
        assert dataverse_to_canonical(template, written, resolver()) == from_fo, member


# ----------------------------------------------------------------- round trips (property-based)

CODES = ["USD", "EUR", "NOK"]
CURRENCY_IDS = [USD, EUR, NOK]
TEXT = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40)  # no lone surrogates: not JSON
# 15 significant digits at most: what an IEEE double (a JSON number) carries exactly.
DECIMALS = st.decimals(min_value=Decimal("-999999999"), max_value=Decimal("999999999"), places=6,
                       allow_nan=False, allow_infinity=False)
MOMENTS = st.datetimes(min_value=datetime(1901, 1, 1), max_value=datetime(2100, 12, 31, 23, 59, 59)).map(
    lambda d: d.replace(microsecond=0, tzinfo=UTC)
)
DAYS = st.dates(min_value=date(1901, 1, 1), max_value=date(2100, 12, 31))


def bidirectional(template: Template) -> list[FieldMap]:
    return [f for f in template.all_fields if f.map in ("=", "><")]


def fo_value(f: FieldMap) -> st.SearchStrategy[Any]:
    """A valid F&O wire value for the field (empties included where F&O has them)."""
    if f.lookup is not None:
        return st.sampled_from(CODES)
    if f.key == "dataAreaId":
        return st.text(string.ascii_letters + string.digits, min_size=1, max_size=4)
    if f.type == "enum":
        assert f.value_map is not None
        return st.sampled_from(sorted(f.value_map))
    if f.type == "string":
        max_size = f.max_length or 40
        return st.one_of(st.just(""), TEXT.filter(lambda s: len(s) <= max_size))
    if f.type == "integer":
        return st.integers(min_value=-(2**31), max_value=2**31 - 1)
    if f.type == "decimal":
        return DECIMALS.map(lambda d: float(d) if d == d.to_integral_value() else str(d))
    if f.type == "boolean":
        return st.booleans()
    if f.type == "datetime":
        return st.one_of(st.just(FO_EMPTY_DATETIME), MOMENTS.map(lambda d: d.strftime("%Y-%m-%dT%H:%M:%SZ")))
    assert f.type == "date"
    return st.one_of(st.just("1900-01-01T12:00:00Z"), DAYS.map(lambda d: f"{d.isoformat()}T12:00:00Z"))


def dataverse_value(f: FieldMap) -> st.SearchStrategy[Any]:
    """A valid Dataverse Web API value for the field (nulls included)."""
    if f.lookup is not None:
        return st.one_of(st.none(), st.sampled_from(CURRENCY_IDS))
    if f.key == "dataAreaId":
        return st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=4)
    if f.type == "enum":
        assert f.value_map is not None
        return st.sampled_from(list(f.value_map.values()))
    if f.type == "string":
        max_size = f.max_length or 40
        return st.one_of(st.none(), TEXT.filter(lambda s: len(s) <= max_size))
    if f.type == "integer":
        return st.one_of(st.none(), st.integers(min_value=-(2**31), max_value=2**31 - 1))
    if f.type == "decimal":
        return st.one_of(st.none(), DECIMALS.map(lambda d: int(d) if d == d.to_integral_value() else float(d)))
    if f.type == "boolean":
        return st.one_of(st.none(), st.booleans())
    if f.type == "datetime":
        return st.one_of(st.none(), MOMENTS.map(lambda d: d.strftime("%Y-%m-%dT%H:%M:%SZ")))
    assert f.type == "date"
    return st.one_of(st.none(), DAYS.map(lambda d: d.isoformat()))


def record_of(template: Template, side: str) -> st.SearchStrategy[dict[str, Any]]:
    make = fo_value if side == "fo" else dataverse_value
    columns: dict[str, st.SearchStrategy[Any]] = {}
    for f in bidirectional(template):
        column = f.read_from("fo" if side == "fo" else "dataverse")
        assert column is not None
        columns[lookup_column(f) if side == "dataverse" and f.lookup else column] = make(f)
    return st.fixed_dictionaries(columns)


ROUND_TRIP = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("template", ALL_TEMPLATES, ids=[t.name for t in ALL_TEMPLATES])
@ROUND_TRIP
@given(data=st.data())
def test_fo_to_dataverse_and_back_is_identity_on_canonical(template: Template, data: st.DataObject) -> None:
    record = data.draw(record_of(template, "fo"))
    lookups = resolver()
    canonical = fo_to_canonical(template, record)
    assert set(canonical) == {f.key for f in bidirectional(template)}
    in_dataverse = stored_in_dataverse(template, canonical_to_dataverse(template, canonical, lookups))
    assert dataverse_to_canonical(template, in_dataverse, lookups) == canonical
    back_in_fo = canonical_to_fo(template, canonical)
    assert fo_to_canonical(template, back_in_fo) == canonical


@pytest.mark.parametrize("template", ALL_TEMPLATES, ids=[t.name for t in ALL_TEMPLATES])
@ROUND_TRIP
@given(data=st.data())
def test_dataverse_to_fo_and_back_is_identity_on_canonical(template: Template, data: st.DataObject) -> None:
    record = data.draw(record_of(template, "dataverse"))
    lookups = resolver()
    canonical = dataverse_to_canonical(template, record, lookups)
    assert set(canonical) == {f.key for f in bidirectional(template)}
    in_fo = canonical_to_fo(template, canonical)
    assert fo_to_canonical(template, in_fo) == canonical
    in_dataverse = stored_in_dataverse(template, canonical_to_dataverse(template, canonical, lookups))
    assert dataverse_to_canonical(template, in_dataverse, lookups) == canonical


@settings(max_examples=100, deadline=None)
@given(MOMENTS, st.integers(min_value=-14 * 60, max_value=14 * 60), st.integers(min_value=0, max_value=999999))
def test_any_offset_and_fraction_lands_on_the_same_utc_second(moment: datetime, offset_minutes: int,
                                                              micros: int) -> None:
    local = (moment + timedelta(microseconds=micros)).astimezone(timezone(timedelta(minutes=offset_minutes)))
    canonical = fo_to_canonical(CARDS, {"LoyaltyEnrollmentDate": local.isoformat()})
    assert canonical == {"LoyaltyEnrollmentDate": moment.strftime("%Y-%m-%dT%H:%M:%SZ")}
