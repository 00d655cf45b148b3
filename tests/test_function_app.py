"""function_app.py registers what the templates say, with the right routes, keys, queues and bindings."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devkit.devhost.invocation import InvocationContext

ROOT = Path(__file__).resolve().parent.parent
ENV = {
    "FNO_URL": "https://contoso.operations.dynamics.com",
    "DATAVERSE_URL": "https://contoso.crm.dynamics.com",
    "AzureWebJobsStorage": "UseDevelopmentStorage=true",
}


def _load(monkeypatch: pytest.MonkeyPatch, **extra: str) -> Any:
    for name, value in {**ENV, **extra}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(ROOT)
    sys.modules.pop("function_app", None)
    return importlib.import_module("function_app")


@pytest.fixture
def functions(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, dict[str, Any]]]:
    module = _load(monkeypatch)
    yield {f.get_function_name(): json.loads(f.get_function_json()) for f in module.app.get_functions()}
    sys.modules.pop("function_app", None)


def _binding(spec: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(b for b in spec["bindings"] if b["type"] == kind)


def test_every_template_gets_inbound_worker_and_poison_functions(functions: dict[str, dict[str, Any]]) -> None:
    for slug, name in (
        ("loyalty_cards", "loyalty-cards"),
        ("loyalty_levels", "loyalty-levels"),
        ("loyalty_reward_points", "loyalty-reward-points"),
    ):
        for side in ("fo", "dataverse"):
            trigger = _binding(functions[f"{side}_{slug}"], "httpTrigger")
            assert trigger["route"] == f"{side}/{name}"
            assert trigger["authLevel"] == "FUNCTION"
            assert set(trigger["methods"]) == {"POST", "OPTIONS"}
            out = _binding(functions[f"{side}_{slug}"], "queue")
            assert out["direction"] == "OUT" and out["queueName"] == f"loyaltysync-{name}"
        assert _binding(functions[f"worker_{slug}"], "queueTrigger")["queueName"] == f"loyaltysync-{name}"
        assert _binding(functions[f"poison_{slug}"], "queueTrigger")["queueName"] == f"loyaltysync-{name}-poison"


def test_admin_functions_need_the_admin_key(functions: dict[str, dict[str, Any]]) -> None:
    for name in ("ops_health", "ops_status", "ops_pause", "ops_resume", "ops_replay"):
        trigger = _binding(functions[name], "httpTrigger")
        assert trigger["authLevel"] == "ADMIN"
        assert trigger["route"].startswith("ops/")


def test_reconciler_timer_uses_the_schedule_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    module = _load(monkeypatch, RECONCILE_SCHEDULE="0 */5 * * * *")
    specs = {f.get_function_name(): json.loads(f.get_function_json()) for f in module.app.get_functions()}
    assert _binding(specs["reconcile"], "timerTrigger")["schedule"] == "0 */5 * * * *"
    sys.modules.pop("function_app", None)


def test_optional_triggers_only_when_configured(
    functions: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "fo_servicebus" not in functions and "fo_eventgrid" not in functions
    module = _load(monkeypatch, SERVICEBUS_QUEUE="fo-events", EVENTGRID_ENABLED="true")
    names = {f.get_function_name() for f in module.app.get_functions()}
    assert {"fo_servicebus", "fo_eventgrid"} <= names
    sys.modules.pop("function_app", None)


def test_function_names_satisfy_the_host_rule(functions: dict[str, dict[str, Any]]) -> None:
    import re

    for name in functions:
        assert re.fullmatch(r"[a-z][a-z0-9_\-]{0,127}", name), name


def test_a_missing_setting_stops_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    from loyaltysync.errors import ConfigError

    monkeypatch.delenv("FNO_URL", raising=False)
    monkeypatch.setenv("DATAVERSE_URL", ENV["DATAVERSE_URL"])
    monkeypatch.chdir(ROOT)
    sys.modules.pop("function_app", None)
    with pytest.raises(ConfigError, match="FNO_URL"):
        importlib.import_module("function_app")
    sys.modules.pop("function_app", None)


def test_inbound_handler_queues_and_answers_202(monkeypatch: pytest.MonkeyPatch) -> None:
    import azure.functions as func

    module = _load(monkeypatch)
    handler = next(f for f in module.app.get_functions() if f.get_function_name() == "dataverse_loyalty_cards")
    body = (ROOT / "tests" / "fixtures" / "events" / "dataverse-loyaltycard-update.json").read_bytes()

    class Out:
        value: list[str] | None = None

        def set(self, value: list[str]) -> None:
            self.value = value

        def get(self) -> list[str] | None:
            return self.value

    out = Out()
    request = func.HttpRequest(
        method="POST",
        url="/api/dataverse/loyalty-cards",
        headers={"Content-Type": "application/json"},
        params={},
        body=body,
    )
    response = handler.get_user_function()(request, out, InvocationContext("i-1", "dataverse_loyalty_cards"))
    assert response.status_code == 202
    assert out.value is not None and len(out.value) == 1
    assert json.loads(out.value[0])["template"] == "loyalty-cards"
    bad = func.HttpRequest(
        method="POST",
        url="/api/dataverse/loyalty-cards",
        headers={"Content-Type": "application/json"},
        params={},
        body=b"{nope",
    )
    out2 = Out()
    refused = handler.get_user_function()(bad, out2, InvocationContext("i-2", "dataverse_loyalty_cards"))
    assert refused.status_code == 400 and out2.value is None
    assert "error" in json.loads(refused.get_body())
    sys.modules.pop("function_app", None)
