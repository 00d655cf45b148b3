"""The operator's commands that need no running services: mappings and inspect-event."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from loyaltysync.cli import main

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "events"


def test_mappings_validate_lists_every_template(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mappings", "validate"]) == 0
    out = capsys.readouterr().out
    for name in ("loyalty-cards", "loyalty-levels", "loyalty-reward-points"):
        assert f"ok  {name}:" in out


def test_mappings_validate_names_file_field_and_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = json.loads((ROOT / "mappings" / "loyalty-cards.json").read_text())
    del broken["fields"][1]["value_map"]
    (tmp_path / "loyalty-cards.json").write_text(json.dumps(broken))
    assert main(["--mappings", str(tmp_path), "mappings", "validate"]) == 1
    err = capsys.readouterr().err
    assert "loyalty-cards.json" in err
    assert "CardTenderType" in err
    assert "value_map" in err


def test_mappings_show_json_is_the_templates_md_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mappings", "show", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    cards = {row["fo"]: row for row in shown["loyalty-cards"]["fields"]}
    assert cards["CardTenderType"]["map"] == "><"
    assert cards["CardTenderType"]["value_map"] == {
        "AsCardTender": 806380000,
        "AsContactTender": 806380001,
        "NoTender": 806380002,
        "Blocked": 806380003,
    }
    assert cards["ReplacementCardNumber"]["map"] == ">"
    assert cards["LoyaltyEnrollmentDateLocal"]["dataverse"] == "msdyn_effectivedate"
    points = {row["fo"]: row for row in shown["loyalty-reward-points"]["fields"]}
    assert points["RewardPointCurrency"]["dataverse"] == "msdyn_rewardpointcurrency.isocurrencycode"
    assert points["Redeemable"]["value_map"] == {"Yes": True, "No": False}
    assert shown["loyalty-levels"]["dataverse"]["alternate_key"] == ["msdyn_levelphrase"]
    assert shown["loyalty-reward-points"]["fo"]["entity_set"] == "RetailLoyaltyRewardPoints"


def test_mappings_show_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mappings", "show"]) == 0
    out = capsys.readouterr().out
    assert "RewardPointCurrency" in out and "lookup transactioncurrencies by isocurrencycode" in out


def test_mappings_schema_is_the_published_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mappings", "schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((ROOT / "mappings" / "template.schema.json").read_text())


def test_inspect_event_prints_the_normalized_event(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect-event", str(FIXTURES / "dataverse-loyaltycard-update.json"), "--side", "dataverse"]) == 0
    events = json.loads(capsys.readouterr().out)
    assert events[0]["template"] == "loyalty-cards"
    assert events[0]["side"] == "dataverse"
    assert events[0]["operation"] == "update"
    assert events[0]["key"] == {"CardNumber": events[0]["key"]["CardNumber"]}


def test_inspect_event_detects_the_side(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect-event", str(FIXTURES / "eventgrid-validation.json")]) == 0
    assert "validationResponse" in capsys.readouterr().out


def test_inspect_event_exits_2_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"MessageName": "Create"')
    assert main(["inspect-event", str(bad), "--side", "dataverse"]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_a_fourth_template_needs_no_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for path in (ROOT / "mappings").glob("*.json"):
        shutil.copy(path, tmp_path / path.name)
    extra = json.loads((ROOT / "mappings" / "loyalty-levels.json").read_text())
    extra["name"] = "loyalty-tiers"
    extra["fo"]["entity_set"] = "LoyaltyTiers"
    extra["fo"]["business_events"] = []
    extra["dataverse"].update(entity_set="new_loyaltytiers", table="new_loyaltytier", primary_id="new_loyaltytierid")
    (tmp_path / "loyalty-tiers.json").write_text(json.dumps(extra))
    assert main(["--mappings", str(tmp_path), "mappings", "validate"]) == 0
    assert "ok  loyalty-tiers:" in capsys.readouterr().out
