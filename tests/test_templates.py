"""Templates: the shipped files say exactly what templates.md says, and every bad file is refused clearly.

The expected tables below are copied by hand from the specification of the three templates, not derived
from the code, so a drift in either the JSON files or the loader shows up here.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from loyaltysync.errors import TemplateError
from loyaltysync.templates import (
    Template,
    default_mappings_dir,
    function_safe,
    json_schema,
    load_templates,
    other_side,
    parse_template,
    table_rows,
)

MAPPINGS = default_mappings_dir()
FIXTURES = Path(__file__).parent / "fixtures" / "templates"

# ----------------------------------------------------------------- templates.md, literally

TENDER = {"AsCardTender": 806380000, "AsContactTender": 806380001, "NoTender": 806380002, "Blocked": 806380003}
TIME_UNIT = {"Day": 806380000, "Month": 806380001, "Year": 806380002}

# (F&O property, map, Dataverse column as templates.md writes it, value map or None)
SPEC_FIELDS: dict[str, list[tuple[str, str, str, dict[str, Any] | None]]] = {
    "loyalty-cards": [
        ("CardNumber", "=", "msdyn_cardnumber", None),
        ("CardTenderType", "><", "msdyn_cardtendertype", TENDER),
        ("PartyNumber", "=", "msdyn_partynumber", None),
        ("ReplacementCardNumber", ">", "msdyn_replacementcardnumber", None),
        ("OmOperatingUnitNumber", "=", "msdyn_operatingunitnumber", None),
        ("LoyaltyEnrollmentDate", "=", "msdyn_enrollmentdate", None),
        ("LoyaltyEnrollmentDateLocal", "=", "msdyn_effectivedate", None),
    ],
    "loyalty-levels": [
        ("LevelPhrase", "=", "msdyn_levelphrase", None),
        ("LevelDescription", "=", "msdyn_description", None),
    ],
    "loyalty-reward-points": [
        ("RewardPointId", "=", "msdyn_rewardpointid", None),
        ("RewardPointType", "><", "msdyn_rewardpointtype", {"Quantity": 192350000, "Amount": 192350001}),
        ("Redeemable", "><", "msdyn_redeemable", {"Yes": True, "No": False}),
        ("RedeemRanking", "=", "msdyn_redeemranking", None),
        ("RewardPointCurrency", "=", "msdyn_rewardpointcurrency.isocurrencycode", None),
        ("MaximumLoyaltyRewardPoints", "=", "msdyn_maximumloyaltyrewardpoints", None),
        ("ExpirationTimeUnit", "><", "msdyn_expirationtimeunit", TIME_UNIT),
        ("ExpirationTimeValue", "=", "msdyn_expirationtimevalue", None),
        ("VestingTimeUnit", "><", "msdyn_vestingtimeunit", TIME_UNIT),
        ("VestingTimeValue", "=", "msdyn_vestingtimevalue", None),
    ],
}

# name: (F&O entity set, F&O keys, Dataverse entity set, table, primary id, alternate key)
SPEC_ENTITIES: dict[str, tuple[str, list[str], str, str, str, list[str]]] = {
    "loyalty-cards": (
        "RetailLoyaltyCards", ["CardNumber"],
        "msdyn_loyaltycards", "msdyn_loyaltycard", "msdyn_loyaltycardid", ["msdyn_cardnumber"],
    ),
    "loyalty-levels": (
        "LoyaltyLevels", ["LevelPhrase"],
        "msdyn_loyaltylevels", "msdyn_loyaltylevel", "msdyn_loyaltylevelid", ["msdyn_levelphrase"],
    ),
    "loyalty-reward-points": (
        "RetailLoyaltyRewardPoints", ["RewardPointId"],
        "msdyn_loyaltyrewardpoints", "msdyn_loyaltyrewardpoint", "msdyn_loyaltyrewardpointid",
        ["msdyn_rewardpointid"],
    ),
}


def typed(value_map: dict[str, Any] | None) -> dict[str, tuple[str, Any]] | None:
    """A value map with each target's type spelled out: True == 1 in Python, but not on the wire."""
    if value_map is None:
        return None
    return {k: (type(v).__name__, v) for k, v in value_map.items()}


@pytest.fixture(scope="module")
def shipped() -> dict[str, Template]:
    return load_templates(MAPPINGS)


def test_exactly_the_three_spec_templates_ship(shipped: dict[str, Template]) -> None:
    assert sorted(shipped) == ["loyalty-cards", "loyalty-levels", "loyalty-reward-points"]


@pytest.mark.parametrize("name", sorted(SPEC_FIELDS))
def test_field_table_matches_templates_md(shipped: dict[str, Template], name: str) -> None:
    template = shipped[name]
    shown = [(r["fo"], r["map"], r["dataverse"], typed(r["value_map"])) for r in table_rows([template])]
    expected = [(fo, m, dv, typed(vm)) for fo, m, dv, vm in SPEC_FIELDS[name]]
    assert shown == expected
    # The raw column names too (the lookup's natural key is shown after a dot, not stored in `dataverse`).
    assert [f.dataverse for f in template.fields] == [dv.split(".")[0] for _, _, dv, _ in SPEC_FIELDS[name]]


@pytest.mark.parametrize("name", sorted(SPEC_ENTITIES))
def test_entities_keys_and_ids_match_templates_md(shipped: dict[str, Template], name: str) -> None:
    fo_set, fo_keys, dv_set, table, primary_id, alternate_key = SPEC_ENTITIES[name]
    template = shipped[name]
    assert template.fo.entity_set == fo_set
    assert template.fo.keys == fo_keys
    assert template.fo.company_specific is False  # all three are shared across legal entities
    assert template.dataverse.entity_set == dv_set
    assert template.dataverse.table == table
    assert template.dataverse.primary_id == primary_id
    assert template.dataverse.alternate_key == alternate_key
    assert template.dataverse.company_column is None
    assert template.company_field is None
    assert template.key_names == tuple(fo_keys)


def test_typed_details_stated_in_templates_md(shipped: dict[str, Template]) -> None:
    cards = shipped["loyalty-cards"]
    assert cards.fo.entity_type == "RetailLoyaltyCardEntity"
    assert cards.field("CardNumber").type == "string"
    assert cards.field("CardNumber").max_length == 30
    assert cards.field("CardTenderType").type == "enum"
    for name in ("LoyaltyEnrollmentDate", "LoyaltyEnrollmentDateLocal"):
        assert cards.field(name).type == "datetime"  # Edm.DateTimeOffset; 1900-01-01 means empty
    for name in ("PartyNumber", "ReplacementCardNumber", "OmOperatingUnitNumber"):
        assert cards.field(name).type == "string"
    # LoyaltyEnrollmentTime(Local) exist in F&O but are not mapped.
    assert not {"LoyaltyEnrollmentTime", "LoyaltyEnrollmentTimeLocal"} & {f.fo for f in cards.fields}

    points = shipped["loyalty-reward-points"]
    assert points.fo.entity_type == "RetailLoyaltyRewardPointEntity"
    currency = points.field("RewardPointCurrency")
    assert currency.lookup is not None
    assert currency.type == "string"
    assert (currency.lookup.entity_set, currency.lookup.table, currency.lookup.key_column) == (
        "transactioncurrencies",
        "transactioncurrency",
        "isocurrencycode",
    )
    assert currency.lookup.id_column == "transactioncurrencyid"
    assert currency.navigation_property == "msdyn_rewardpointcurrency"
    for name in ("RewardPointType", "Redeemable", "ExpirationTimeUnit", "VestingTimeUnit"):
        assert points.field(name).type == "enum"


def test_every_shipped_template_points_at_the_schema() -> None:
    for path in sorted(MAPPINGS.glob("*.json")):
        if path.name.endswith(".schema.json"):
            continue
        assert json.loads(path.read_text(encoding="utf-8"))["$schema"] == "./template.schema.json", path.name


def test_published_schema_is_current() -> None:
    published = json.loads((MAPPINGS / "template.schema.json").read_text(encoding="utf-8"))
    assert published == json_schema(), (
        "mappings/template.schema.json is stale; regenerate it with "
        "`python -m loyaltysync mappings schema > mappings/template.schema.json`"
    )


def test_schema_describes_the_map_symbols_and_forbids_unknown_keys() -> None:
    schema = json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False
    assert schema["$defs"]["FieldMap"]["properties"]["map"]["enum"] == ["=", "><", ">", ">>", "<", "<<"]
    assert schema["$defs"]["FieldMap"]["additionalProperties"] is False
    assert "$schema" in schema["properties"]  # files may carry "$schema" for editors


# ----------------------------------------------------------------- model behaviour


def test_map_symbols_flow_as_dual_write_defines_them(shipped: dict[str, Template]) -> None:
    everything = load_templates(FIXTURES)["every-map"]
    flows = {f.map: (f.flows_to("dataverse"), f.flows_to("fo")) for f in everything.fields}
    assert flows == {
        "=": (True, True),
        "><": (True, True),
        ">": (True, False),
        ">>": (True, False),
        "<": (False, True),
        "<<": (False, True),
    }
    cards = shipped["loyalty-cards"]
    assert [f.key for f in cards.fields_to("fo")] == [
        "CardNumber", "CardTenderType", "PartyNumber", "OmOperatingUnitNumber",
        "LoyaltyEnrollmentDate", "LoyaltyEnrollmentDateLocal",
    ]
    assert len(cards.fields_to("dataverse")) == 7
    assert other_side("fo") == "dataverse"
    assert other_side("dataverse") == "fo"


@pytest.mark.parametrize(
    ("policy", "to_dataverse", "to_fo"),
    [("both", True, True), ("fo-to-dataverse", True, False), ("dataverse-to-fo", False, True), ("none", False, False)],
)
def test_delete_policies(shipped: dict[str, Template], policy: str, to_dataverse: bool, to_fo: bool) -> None:
    data = json.loads((MAPPINGS / "loyalty-cards.json").read_text(encoding="utf-8"))
    data["deletes"] = policy
    template = parse_template(json.dumps(data), "cards.json")
    assert (template.deletes_to("dataverse"), template.deletes_to("fo")) == (to_dataverse, to_fo)


def test_defaults_of_an_omitted_policy() -> None:
    data = json.loads((MAPPINGS / "loyalty-levels.json").read_text(encoding="utf-8"))
    del data["conflict_policy"], data["deletes"]
    template = parse_template(json.dumps(data), "levels.json")
    assert template.conflict_policy == "last-writer-wins"
    assert template.deletes == "both"


def test_company_specific_template_adds_the_company_field() -> None:
    template = load_templates(FIXTURES)["company-customers"]
    company = template.company_field
    assert company is not None
    assert (company.key, company.fo, company.map, company.dataverse) == (
        "dataAreaId", "dataAreaId", "=", "msdyn_companycode",
    )
    assert template.key_names == ("dataAreaId", "CustomerAccount")
    assert template.all_fields[0] == company
    assert template.field("dataAreaId") == company
    assert company in template.fields_to("fo")
    assert company in template.fields_to("dataverse")
    rows = table_rows([template])
    assert rows[0]["field"] == "dataAreaId"
    assert rows[0]["key"] is True
    assert [r["key"] for r in rows] == [True, True, False, False, False]


def test_names_usable_by_the_functions_host(shipped: dict[str, Template]) -> None:
    assert shipped["loyalty-reward-points"].slug == "loyalty_reward_points"
    assert function_safe("Loyalty-Cards.FO") == "loyalty_cards_fo"
    assert function_safe("x" * 200) == "x" * 127
    assert shipped["loyalty-cards"].fo.virtual_table_name == "mserp_retailloyaltycardentity"
    assert shipped["loyalty-levels"].fo.virtual_table_name == "mserp_loyaltylevelentity"
    assert shipped["loyalty-levels"].fo.model_copy(update={"entity_type": None}).virtual_table_name is None


def test_unknown_field_name_is_a_key_error(shipped: dict[str, Template]) -> None:
    with pytest.raises(KeyError):
        shipped["loyalty-cards"].field("Nope")


# ----------------------------------------------------------------- load_templates


def test_fixture_templates_load() -> None:
    assert sorted(load_templates(FIXTURES)) == ["company-customers", "every-map"]


def write(directory: Path, name: str, data: dict[str, Any] | str) -> Path:
    path = directory / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def cards_data() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((MAPPINGS / "loyalty-cards.json").read_text(encoding="utf-8"))
    return data


def test_load_skips_schema_files(tmp_path: Path) -> None:
    write(tmp_path, "cards.json", cards_data())
    write(tmp_path, "template.schema.json", "{ this is not a template")
    write(tmp_path, "other.schema.json", {"name": "not-a-template"})
    assert list(load_templates(tmp_path)) == ["loyalty-cards"]


def test_user_adds_a_fourth_template_by_dropping_a_file(tmp_path: Path) -> None:
    for path in MAPPINGS.glob("*.json"):
        write(tmp_path, path.name, path.read_text(encoding="utf-8"))
    write(tmp_path, "zz-widgets.json", (FIXTURES / "every-map.json").read_text(encoding="utf-8"))
    assert sorted(load_templates(tmp_path)) == ["every-map", "loyalty-cards", "loyalty-levels", "loyalty-reward-points"]


def test_empty_directory_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "template.schema.json", json.dumps(json_schema()))
    with pytest.raises(TemplateError) as caught:
        load_templates(tmp_path)
    assert caught.value.file == str(tmp_path)
    assert "no template files" in caught.value.problem


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TemplateError) as caught:
        load_templates(tmp_path / "nope")
    assert caught.value.file == str(tmp_path / "nope")
    assert "not found" in caught.value.problem


def test_duplicate_template_names_name_the_second_file(tmp_path: Path) -> None:
    write(tmp_path, "a.json", cards_data())
    second = write(tmp_path, "b.json", cards_data())
    with pytest.raises(TemplateError) as caught:
        load_templates(tmp_path)
    assert caught.value.file == str(second)
    assert caught.value.field == "name"
    assert "'loyalty-cards'" in caught.value.problem
    assert str(second) in str(caught.value)


def test_a_bad_file_in_the_directory_names_that_file(tmp_path: Path) -> None:
    write(tmp_path, "a.json", cards_data())
    bad = cards_data()
    bad["name"] = "other"
    bad["fields"][1].pop("value_map")
    path = write(tmp_path, "b.json", bad)
    with pytest.raises(TemplateError) as caught:
        load_templates(tmp_path)
    assert caught.value.file == str(path)
    assert str(caught.value).startswith(f"{path}: fields[1] (CardTenderType): ")


# ----------------------------------------------------------------- validation: one bad file at a time


def refuse(data: dict[str, Any] | str, file: str = "mappings/bad.json") -> TemplateError:
    text = data if isinstance(data, str) else json.dumps(data)
    with pytest.raises(TemplateError) as caught:
        parse_template(text, file)
    error = caught.value
    assert str(error) == f"{file}: {error.field}: {error.problem}"
    return error


def mutated(base: dict[str, Any], change: Any) -> dict[str, Any]:
    data = copy.deepcopy(base)
    change(data)
    return data


def every_map_data() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / "every-map.json").read_text(encoding="utf-8"))
    return data


def company_data() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / "company-customers.json").read_text(encoding="utf-8"))
    return data


def test_bad_json_names_line_and_column() -> None:
    error = refuse('{\n  "name": "x",\n  "fo": }\n')
    assert error.file == "mappings/bad.json"
    assert error.field == "line 3 column 9"
    assert error.problem.startswith("not valid JSON: ")


def test_json_that_is_not_an_object() -> None:
    error = refuse("[1, 2]")
    assert (error.field, error.problem) == ("(template)", "must be a JSON object")


# (case id, base, change, expected location, words the problem must contain)
FIELD_CASES: list[tuple[str, Any, Any, str, list[str]]] = [
    (
        "two-way-without-value-map", cards_data, lambda d: d["fields"][1].pop("value_map"),
        "fields[1] (CardTenderType)", ["'><'", "value_map"],
    ),
    (
        "non-invertible-two-way-value-map", cards_data,
        lambda d: d["fields"][1]["value_map"].update(NoTender=806380003),
        "fields[1] (CardTenderType)", ["one-to-one"],
    ),
    (
        "value-map-on-copy", cards_data,
        lambda d: d["fields"][2].update(type="enum", value_map={"A": 1}),
        "fields[2] (PartyNumber)", ["'='", "value_map"],
    ),
    (
        "value-map-on-one-way-copy", cards_data,
        lambda d: d["fields"][3].update(type="enum", value_map={"A": 1}),
        "fields[3] (ReplacementCardNumber)", ["'>'", "value_map"],
    ),
    (
        "enum-without-value-map", cards_data, lambda d: d["fields"][2].update(type="enum"),
        "fields[2] (PartyNumber)", ["enum", "value_map"],
    ),
    (
        "value-map-on-non-enum", cards_data, lambda d: d["fields"][1].update(type="string"),
        "fields[1] (CardTenderType)", ["value_map", "enum"],
    ),
    (
        "empty-value-map", cards_data, lambda d: d["fields"][1].update(value_map={}),
        "fields[1] (CardTenderType)", ["value_map", "empty"],
    ),
    (
        "value-map-target-not-a-choice", cards_data,
        lambda d: d["fields"][1]["value_map"].update(AsCardTender=1.5),
        "fields[1] (CardTenderType).value_map.AsCardTender.int", ["integer"],
    ),
    (
        "lookup-on-non-string", json.loads((MAPPINGS / "loyalty-reward-points.json").read_text(encoding="utf-8")),
        lambda d: d["fields"][4].update(type="integer"),
        "fields[4] (RewardPointCurrency)", ["lookup", "string"],
    ),
    (
        "max-length-on-non-string", every_map_data, lambda d: d["fields"][3].update(max_length=5),
        "fields[3] (Quantity)", ["max_length", "string"],
    ),
    (
        "max-length-below-one", cards_data, lambda d: d["fields"][0].update(max_length=0),
        "fields[0] (CardNumber).max_length", [],
    ),
    (
        "copy-without-dataverse", cards_data, lambda d: d["fields"][2].pop("dataverse"),
        "fields[2] (PartyNumber)", ["'='", "both"],
    ),
    (
        "one-way-without-fo", cards_data, lambda d: d["fields"][3].pop("fo"),
        "fields[3] (msdyn_replacementcardnumber)", ["'>'", "both"],
    ),
    (
        "translate-to-dataverse-without-column", every_map_data, lambda d: d["fields"][11].pop("dataverse"),
        "fields[11] (Source)", ["'>>'", "dataverse"],
    ),
    (
        "translate-to-fo-without-property", every_map_data, lambda d: d["fields"][14].update(fo=None),
        "fields[14]", ["'<<'", "fo"],
    ),
    (
        "one-sided-constant-without-default", every_map_data, lambda d: d["fields"][11].pop("default"),
        "fields[11] (Source)", ["'>>'", "default"],
    ),
    (
        "unknown-map-symbol", cards_data, lambda d: d["fields"][2].update(map="<>"),
        "fields[2] (PartyNumber).map", ["'='"],
    ),
    (
        "unknown-field-property", cards_data, lambda d: d["fields"][2].update(colour="red"),
        "fields[2] (PartyNumber).colour", ["Extra inputs are not permitted"],
    ),
    (
        "unknown-lookup-property", json.loads((MAPPINGS / "loyalty-reward-points.json").read_text(encoding="utf-8")),
        lambda d: d["fields"][4]["lookup"].update(cache=True),
        "fields[4] (RewardPointCurrency).lookup.cache", ["Extra inputs are not permitted"],
    ),
    (
        "unknown-top-level-property", cards_data, lambda d: d.update(owner="me"),
        "owner", ["Extra inputs are not permitted"],
    ),
    (
        "unknown-fo-property", cards_data, lambda d: d["fo"].update(company="usrt"),
        "fo.company", ["Extra inputs are not permitted"],
    ),
    (
        "missing-dataverse-section", cards_data, lambda d: d.pop("dataverse"),
        "dataverse", ["required"],
    ),
    (
        "no-fields", cards_data, lambda d: d.update(fields=[]),
        "fields", ["at least 1"],
    ),
    (
        "no-keys", cards_data, lambda d: d["fo"].update(keys=[]),
        "fo.keys", ["at least 1"],
    ),
    (
        "bad-name-pattern", cards_data, lambda d: d.update(name="Loyalty_Cards"),
        "name", ["pattern"],
    ),
    (
        "name-too-long", cards_data, lambda d: d.update(name="a" * 64),
        "name", ["pattern"],
    ),
    (
        "unknown-conflict-policy", cards_data, lambda d: d.update(conflict_policy="newest"),
        "conflict_policy", ["last-writer-wins"],
    ),
    (
        "unknown-delete-policy", cards_data, lambda d: d.update(deletes="sometimes"),
        "deletes", ["fo-to-dataverse"],
    ),
]


@pytest.mark.parametrize(
    ("base", "change", "location", "words"),
    [case[1:] for case in FIELD_CASES],
    ids=[case[0] for case in FIELD_CASES],
)
def test_bad_field_is_refused_with_its_location(base: Any, change: Any, location: str, words: list[str]) -> None:
    data = base() if callable(base) else base
    error = refuse(mutated(data, change))
    assert error.file == "mappings/bad.json"
    assert error.field == location
    for word in words:
        assert word in error.problem


# Template-wide rules: the location is the template, the problem names the offending field or column.
TEMPLATE_CASES: list[tuple[str, Any, Any, list[str]]] = [
    ("key-without-field", cards_data, lambda d: d["fo"].update(keys=["Nope"]), ["'Nope'", "no field"]),
    ("key-not-copied", cards_data, lambda d: d["fields"][0].update(map=">"), ["'CardNumber'", "'='"]),
    (
        "duplicate-names", cards_data,
        lambda d: d["fields"].append({"name": "PartyNumber", "fo": "Other", "map": "=", "dataverse": "msdyn_other"}),
        ["repeat", "PartyNumber"],
    ),
    (
        "duplicate-fo-property", cards_data,
        lambda d: d["fields"].append({"name": "Party2", "fo": "PartyNumber", "map": "=", "dataverse": "msdyn_p2"}),
        ["fo columns mapped twice", "PartyNumber"],
    ),
    (
        "duplicate-dataverse-column", cards_data,
        lambda d: d["fields"].append({"fo": "Party2", "map": "=", "dataverse": "msdyn_partynumber"}),
        ["dataverse columns mapped twice", "msdyn_partynumber"],
    ),
    (
        "alternate-key-mismatch", cards_data,
        lambda d: d["dataverse"].update(alternate_key=["msdyn_partynumber"]),
        ["alternate_key", "msdyn_partynumber", "msdyn_cardnumber"],
    ),
    (
        "company-specific-without-company-column", company_data,
        lambda d: (d["dataverse"].pop("company_column"), d["dataverse"].update(alternate_key=["accountnumber"])),
        ["company_specific", "company_column"],
    ),
    (
        "company-alternate-key-without-company-column", company_data,
        lambda d: d["dataverse"].update(alternate_key=["accountnumber"]),
        ["alternate_key", "company column", "msdyn_companycode"],
    ),
    (
        "company-field-listed-explicitly", company_data,
        lambda d: d["fields"].append({"fo": "dataAreaId", "map": "=", "dataverse": "msdyn_dataareaid"}),
        ["dataAreaId", "do not list"],
    ),
]


@pytest.mark.parametrize(
    ("base", "change", "words"), [case[1:] for case in TEMPLATE_CASES], ids=[case[0] for case in TEMPLATE_CASES]
)
def test_bad_template_is_refused_naming_the_problem(base: Any, change: Any, words: list[str]) -> None:
    error = refuse(mutated(base(), change))
    assert error.field == "(template)"
    for word in words:
        assert word in error.problem


def test_company_specific_without_company_column_says_so_even_with_a_company_key() -> None:
    # The user forgot dataverse.company_column but wrote the full alternate key: the message must
    # point at the missing company column, not claim the alternate key is wrong.
    data = mutated(company_data(), lambda d: d["dataverse"].pop("company_column"))
    error = refuse(data)
    assert "company_column" in error.problem


def test_schema_reference_is_allowed_and_ignored() -> None:
    data = cards_data()
    data["$schema"] = "https://example.invalid/whatever.json"
    assert parse_template(json.dumps(data), "x.json").name == "loyalty-cards"


def test_one_sided_translated_fields_with_constants_are_valid() -> None:
    template = load_templates(FIXTURES)["every-map"]
    source = template.field("Source")
    assert (source.fo, source.dataverse, source.default) == (None, "test_source", 192350000)
    origin = template.field("Origin")
    assert (origin.fo, origin.dataverse, origin.default) == ("Origin", None, "Dataverse")
    # Many-to-one value maps are allowed on one-way fields (only two-way ones must invert).
    data = mutated(every_map_data(), lambda d: d["fields"][10]["value_map"].update(Online=1))
    assert parse_template(json.dumps(data), "x.json").field("Segment").value_map == {
        "Retail": 1, "Wholesale": 2, "Online": 1,
    }


# ----------------------------------------------------------------- rules the loader misses (see report)


def test_two_way_translation_needs_a_value_map_even_with_a_default() -> None:
    # '><' translates both ways; a constant default cannot stand in for the value map ('>>'/'<<' only).
    data = mutated(cards_data(), lambda d: (d["fields"][1].pop("value_map"), d["fields"][1].update(default=1)))
    error = refuse(data)
    assert error.field == "fields[1] (CardTenderType)"
    assert "value_map" in error.problem


def test_company_column_mapped_again_by_a_field_is_refused() -> None:
    # The implicit dataAreaId field already writes the company column; a second writer would fight it.
    data = mutated(
        company_data(),
        lambda d: d["fields"].append({"fo": "CompanyCode", "map": "=", "dataverse": "msdyn_companycode"}),
    )
    error = refuse(data)
    assert "msdyn_companycode" in error.problem
