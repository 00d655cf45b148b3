"""Preflight: templates checked against the live metadata of both emulators (in-process ASGI apps).

The emulators are built from the shipped templates only, so the deliberately
broken templates in tests/fixtures/templates/preflight/ meet the metadata a
real environment would serve for the loyalty tables.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from devkit.sandbox import dataverse as dataverse_emulator
from devkit.sandbox import fno as fno_emulator
from loyaltysync import preflight
from loyaltysync.preflight.metadata import parse_csdl
from loyaltysync.targets.auth import StaticTokenCredential
from loyaltysync.targets.dataverse import DataverseClient
from loyaltysync.targets.fno import FnoClient
from loyaltysync.targets.http import RetryPolicy
from loyaltysync.templates import default_mappings_dir, load_templates

SHIPPED = load_templates(default_mappings_dir())
BROKEN = load_templates(Path(__file__).parent / "fixtures" / "templates" / "preflight")
TOKEN = "preflight-test-token"


def _fno(app: object | None = None) -> FnoClient:
    app = app or fno_emulator.create_app(token=TOKEN, templates=SHIPPED)
    return FnoClient("http://fo.test", StaticTokenCredential(TOKEN), transport=httpx.ASGITransport(app=app))


def _dataverse(app: object | None = None, token: str = TOKEN) -> DataverseClient:
    app = app or dataverse_emulator.create_app(token=TOKEN, templates=SHIPPED)
    return DataverseClient(
        "http://dataverse.test",
        StaticTokenCredential(token),
        transport=httpx.ASGITransport(app=app),
        retry=RetryPolicy(max_attempts=1),
    )


@pytest.fixture
async def clients() -> AsyncIterator[tuple[FnoClient, DataverseClient]]:
    fo, dv = _fno(), _dataverse()
    yield fo, dv
    await fo.aclose()
    await dv.aclose()


async def test_the_shipped_templates_pass_with_one_length_warning(clients: tuple[FnoClient, DataverseClient]) -> None:
    findings = await preflight.check(SHIPPED, *clients)
    assert [(f.template, f.side, f.field, f.severity) for f in findings] == [
        ("loyalty-cards", "fo", "PartyNumber", "warning")
    ]
    assert "dataverse holds up to 100 characters, fo only 40" in findings[0].problem
    assert preflight.exit_code(findings) == 0
    assert preflight.exit_code(findings, strict=True) == 1
    text = preflight.report(findings, SHIPPED)
    assert "ok       loyalty-levels" in text and text.endswith("0 error(s), 1 warning(s)")


EXPECTED = {
    # (template, side, field, severity): a phrase the problem must contain
    ("broken-entities", "fo", "(entity set)", "error"): "did you mean 'RetailLoyaltyCards'",
    ("broken-entities", "dataverse", "(table)", "error"): "no table 'msdyn_loyaltycardx'",
    ("broken-fields", "fo", "CardNumber", "error"): "max_length 50 is more than the 30",
    ("broken-fields", "dataverse", "msdyn_cardnumber", "error"): "max_length 50 is more than the 30",
    ("broken-fields", "fo", "CardTenderType", "error"): "'Suspended' is not a member",
    ("broken-fields", "dataverse", "msdyn_cardtendertype", "error"): "is not a choice value",
    ("broken-fields", "dataverse", "msdyn_cardtendertype", "warning"): "806380003 have no value-map entry",
    ("broken-fields", "fo", "PartyNum", "error"): "did you mean 'PartyNumber'",
    ("broken-fields", "dataverse", "msdyn_operatingunit", "error"): "did you mean 'msdyn_operatingunitnumber'",
    ("broken-fields", "fo", "LoyaltyEnrollmentTime", "error"): "Edm.Int32, which does not hold a datetime",
    ("broken-fields", "dataverse", "msdyn_effectivedate", "error"): "DateTime, which does not hold a string",
    ("broken-fields", "dataverse", "msdyn_replacementcardnumber", "warning"): "fo holds up to 40 characters",
    ("broken-fields", "dataverse", "createdon", "error"): "read-only",
    ("broken-keys", "fo", "(key)", "error"): "the entity key is ['RewardPointId']",
    ("broken-keys", "fo", "RewardPointType", "error"): "give type 'enum' and a value_map",
    ("broken-keys", "dataverse", "(alternate key)", "error"): "no alternate key on (msdyn_redeemranking",
    ("broken-keys", "dataverse", "(entity set)", "error"): "is 'msdyn_loyaltyrewardpoints'",
    ("broken-keys", "dataverse", "(primary id)", "error"): "is 'msdyn_loyaltyrewardpointid'",
    ("broken-keys", "dataverse", "msdyn_redeemable", "error"): "is Boolean, not a choice",
    ("broken-keys", "dataverse", "msdyn_rewardpointid", "error"): "max_length 200 is more than the 100",
    ("broken-keys", "dataverse", "msdyn_rewardpointtype", "error"): "Picklist, which does not hold a string",
}
LOOKUP_PROBLEMS = [
    "the lookup targets 'transactioncurrency', the template says 'systemuser'",
    "the navigation property is 'msdyn_rewardpointcurrency'; the template binds 'msdyn_RewardPointCurrency'",
    "systemuser has no column 'isocurrencycode'",
]


async def test_a_broken_template_gets_every_problem_named(clients: tuple[FnoClient, DataverseClient]) -> None:
    findings = await preflight.check(BROKEN, *clients)
    seen: dict[tuple[str, str, str, str], list[str]] = {}
    for f in findings:
        seen.setdefault((f.template, f.side, f.field, f.severity), []).append(f.problem)
    lookup = seen.pop(("broken-keys", "dataverse", "msdyn_rewardpointcurrency", "error"))
    assert sorted(LOOKUP_PROBLEMS) == sorted(p.split(" to look up by")[0].split("@odata.bind")[0] for p in lookup)
    assert set(seen) == set(EXPECTED)
    for where, phrase in EXPECTED.items():
        assert any(phrase in problem for problem in seen[where]), (where, seen[where])
    assert len(seen[("broken-fields", "dataverse", "msdyn_cardtendertype", "error")]) == 2  # 806389999, 806380004
    assert findings[0].severity == "error" and findings[-1].severity == "warning", "errors are listed first"
    assert preflight.exit_code(findings) == 1
    text = preflight.report(findings, BROKEN)
    assert text.endswith(f"{sum(f.severity == 'error' for f in findings)} error(s), 2 warning(s)")
    assert json.loads(preflight.report(findings, as_json=True))[0].keys() == {
        "template",
        "side",
        "field",
        "problem",
        "severity",
    }


async def test_unreadable_metadata_is_one_finding_and_the_other_side_is_still_checked() -> None:
    fo, dv = _fno(), _dataverse(token="not-the-emulators-token")
    try:
        findings = await preflight.check(BROKEN, fo, dv)
    finally:
        await fo.aclose()
        await dv.aclose()
    dataverse = [f for f in findings if f.side == "dataverse"]
    assert [(f.template, f.field) for f in dataverse] == [(preflight.ALL, "(metadata)")]
    assert "cannot read the metadata: 401" in dataverse[0].problem
    assert ("broken-fields", "PartyNum") in {(f.template, f.field) for f in findings if f.side == "fo"}


def test_csdl_with_several_schemas_is_read_by_full_type_name() -> None:
    document = b"""<?xml version="1.0" encoding="utf-8"?>
<edmx:Edmx xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx" Version="4.0"><edmx:DataServices>
<Schema Namespace="Enums" xmlns="http://docs.oasis-open.org/odata/ns/edm">
  <EnumType Name="NoYes"><Member Name="No" Value="0"/><Member Name="Yes" Value="1"/></EnumType>
</Schema>
<Schema Namespace="Microsoft.Dynamics.DataEntities" xmlns="http://docs.oasis-open.org/odata/ns/edm">
  <EntityType Name="Customer"><Key><PropertyRef Name="dataAreaId"/><PropertyRef Name="CustomerAccount"/></Key>
    <Property Name="dataAreaId" Type="Edm.String" Nullable="false" MaxLength="4"/>
    <Property Name="CustomerAccount" Type="Edm.String" MaxLength="20"/>
    <Property Name="OnHold" Type="Enums.NoYes"/>
  </EntityType>
  <EntityContainer Name="Resources">
    <EntitySet Name="CustomersV3" EntityType="Microsoft.Dynamics.DataEntities.Customer"/>
  </EntityContainer>
</Schema></edmx:DataServices></edmx:Edmx>"""
    metadata = parse_csdl(document)
    entity = metadata.entity("CustomersV3")
    assert entity is not None and entity.keys == ("dataAreaId", "CustomerAccount")
    assert entity.properties["CustomerAccount"].max_length == 20
    assert entity.properties["OnHold"].type == "Enums.NoYes" and metadata.enums["Enums.NoYes"] == ("No", "Yes")
    assert metadata.entity("Customers") is None


async def test_the_start_up_check_logs_each_finding_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="loyaltysync.preflight")
    fo, dv = _fno(), _dataverse()
    try:
        findings = await preflight.log_startup_check(SimpleNamespace(templates=BROKEN, fno=fo, dataverse=dv))
    finally:
        await fo.aclose()
        await dv.aclose()
    lines = [r for r in caplog.records if r.name == "loyaltysync.preflight"]
    assert len(lines) == len(findings) + 1
    assert sum(r.levelno == logging.ERROR for r in lines) == sum(f.severity == "error" for f in findings)
    assert all(getattr(r, "template", None) for r in lines[:-1])
    assert lines[-1].getMessage().startswith("preflight: 3 template(s) checked")

    async def explode(request: Request) -> JSONResponse:
        raise RuntimeError("a bug in the metadata reader")

    broken_app = Starlette(routes=[Route("/{path:path}", explode)])
    caplog.clear()
    fo = _fno(broken_app)
    dv = _dataverse(broken_app)
    try:
        assert await preflight.log_startup_check(SimpleNamespace(templates=SHIPPED, fno=fo, dataverse=dv)) == []
    finally:
        await fo.aclose()
        await dv.aclose()
    assert any(r.levelno == logging.ERROR and "check itself failed" in r.getMessage() for r in caplog.records)
