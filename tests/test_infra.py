"""Infrastructure as code, checked without the Bicep CLI: well-formed files, parameters, and app settings
that match what the app reads; identity-based storage endpoints; the workbook and the monitoring queries."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from loyaltysync import telemetry
from loyaltysync.errors import ConfigError
from loyaltysync.runtime import build_runtime
from loyaltysync.settings import Settings, load_settings
from loyaltysync.telemetry.metrics import BacklogGauges, Instruments
from loyaltysync.templates import default_mappings_dir, load_templates

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
BICEP = (INFRA / "main.bicep").read_text("utf-8")
PARAMETERS = json.loads((INFRA / "main.parameters.json").read_text("utf-8"))
WORKBOOK = json.loads((INFRA / "workbook.json").read_text("utf-8"))
MONITORING = (ROOT / "docs" / "monitoring.md").read_text("utf-8")
# Read by the Azure Monitor distro (in the worker or called by the app) or by the Functions host, not by our settings.
PLATFORM_SETTINGS = {
    "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "SERVICEBUS__fullyQualifiedNamespace",  # the fo_servicebus trigger's identity-based connection
}
# Deprecated or moved on Flex Consumption: must not be set (azure-functions.md §6).
NOT_ON_FLEX = {"FUNCTIONS_WORKER_RUNTIME", "FUNCTIONS_EXTENSION_VERSION", "WEBSITE_RUN_FROM_PACKAGE",
               "SCM_DO_BUILD_DURING_DEPLOYMENT"}


def _code_view(source: str) -> str:
    """`source` without comments, each string literal reduced to its `${...}` interpolations.

    Bicep strings are '...' (\\' escapes, ${...} interpolation) or '''...''' (verbatim, multi-line).
    """
    out: list[str] = []
    i = 0
    while i < len(source):
        if source.startswith("//", i):
            i = source.find("\n", i)
            i = len(source) if i < 0 else i
        elif source.startswith("/*", i):
            end = source.find("*/", i + 2)
            assert end >= 0, "unterminated block comment"
            i = end + 2
        elif source.startswith("'''", i):
            end = source.find("'''", i + 3)
            assert end >= 0, "unterminated multi-line string"
            out.append("''")
            i = end + 3
        elif source[i] == "'":
            i += 1
            pieces: list[str] = []
            while True:
                assert i < len(source) and source[i] != "\n", "unterminated string"
                if source[i] == "\\":
                    i += 2
                elif source.startswith("${", i):
                    depth, start = 1, i + 2
                    i += 2
                    while depth:
                        depth += {"{": 1, "}": -1}.get(source[i], 0)
                        i += 1
                    pieces.append(" " + source[start : i - 1] + " ")
                elif source[i] == "'":
                    i += 1
                    break
                else:
                    i += 1
            out.append("'" + "".join(pieces) + "'")
        else:
            out.append(source[i])
            i += 1
    return "".join(out)


CODE = _code_view(BICEP)


def _params() -> dict[str, dict[str, Any]]:
    """Every `param`: its type, whether it has a default, whether it is @secure(), its @allowed values."""
    found: dict[str, dict[str, Any]] = {}
    decorators: list[str] = []
    lines = BICEP.splitlines()
    for index, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("@"):
            decorators.append(stripped)
            if stripped.startswith("@allowed(["):
                allowed = []
                for following in lines[index + 1 :]:
                    if following.strip().startswith("])"):
                        break
                    allowed.append(following.strip().strip("'"))
                decorators.append("allowed:" + json.dumps(allowed))
            continue
        declared = re.match(r"^param\s+(\w+)\s+(\w+)(\s*=\s*(.+))?$", stripped)
        if declared:
            allowed_values = next((json.loads(d[8:]) for d in decorators if d.startswith("allowed:")), None)
            found[declared.group(1)] = {
                "type": declared.group(2),
                "default": declared.group(3) is not None,
                "secure": "@secure()" in decorators,
                "allowed": allowed_values,
            }
            decorators = []  # decorators belong to the param that follows them
    return found


PARAMS = _params()


def _object_keys(var: str) -> dict[str, str]:
    """Keys and raw values of the object literal `var <var> = { ... }` in main.bicep."""
    found = re.search(rf"^var {var} = \{{\n(.*?)^\}}", BICEP, re.S | re.M)
    assert found, f"var {var} not found"
    entries: dict[str, str] = {}
    for line in found.group(1).splitlines():
        entry = re.match(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*:\s*(.+?)\s*(//.*)?$", line)
        if entry:
            entries[entry.group(1)] = entry.group(2)
    return entries


APP_SETTINGS = _object_keys("appSettings")
WORKER_SETTINGS = _object_keys("workerTelemetrySettings")
SERVICE_BUS_SETTINGS = _object_keys("serviceBusSettings")
EVENT_GRID_SETTINGS = _object_keys("eventGridSettings")
OPTIONAL_SETTINGS = {**WORKER_SETTINGS, **SERVICE_BUS_SETTINGS, **EVENT_GRID_SETTINGS}


def _reads() -> set[str]:
    """Every environment name `Settings` reads (all alias choices)."""
    names: set[str] = set()
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        if isinstance(alias, str):
            names.add(alias)
        elif alias is not None:
            names.update(str(choice) for choice in getattr(alias, "choices", []))
    return names


# ---------------------------------------------------------------- Bicep well-formedness


def test_brackets_braces_and_parentheses_balance_outside_strings_and_comments() -> None:
    stack: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for char in CODE:
        if char in "([{":
            stack.append(char)
        elif char in pairs:
            assert stack and stack[-1] == pairs[char], f"unbalanced {char!r}"
            stack.pop()
    assert stack == []


def test_a_bicep_parser_written_outside_the_project_reads_the_whole_file() -> None:
    """pycep-parser (Checkov's Bicep parser, a test dependency) parses main.bicep: a syntax error anywhere
    fails here. What it reads agrees with the declarations, and every `dependsOn` names a declared resource
    (the Bicep CLI, which would also check types, cannot be installed on these machines)."""
    from pycep import BicepParser

    parsed = BicepParser().parse(text=BICEP)
    assert set(parsed["parameters"]) == set(PARAMS)
    resources = parsed["resources"]
    assert set(resources) == set(re.findall(r"^resource\s+(\w+)\s+'", BICEP, re.M))
    assert {"functionAppName", "principalId"} <= set(parsed["outputs"])
    for symbol, resource in resources.items():
        assert resource["api_version"], symbol
        for dependency in resource.get("config", {}).get("dependsOn", []):
            assert dependency in resources, f"{symbol} depends on {dependency!r}, which is not declared"


def test_every_param_and_var_is_used_and_every_resource_has_an_api_version() -> None:
    assert {"fnoUrl", "dataverseUrl", "telemetryHashSalt", "alertEmail"} <= set(PARAMS)
    declarations = re.compile(r"^(param|var)\s+(\w+)", re.M)
    for kind, name in declarations.findall(CODE):
        uses = re.findall(rf"\b{name}\b", CODE)
        assert len(uses) >= 2, f"{kind} {name} is declared but never used"
    resources = re.findall(r"^resource\s+(\w+)\s+'([^']+)'", BICEP, re.M)
    assert len(resources) >= 10
    for symbol, kind in resources:
        assert re.search(r"@\d{4}-\d{2}-\d{2}(-preview)?$", kind), f"{symbol}: {kind} has no API version"
    for name in re.findall(r"loadTextContent\('([^']+)'\)", BICEP):
        assert (INFRA / name).is_file(), name


def test_the_parameters_file_matches_the_params() -> None:
    assert PARAMETERS["$schema"].endswith("deploymentParameters.json#")
    given = PARAMETERS["parameters"]
    assert set(given) <= set(PARAMS), f"not params of main.bicep: {set(given) - set(PARAMS)}"
    needed = {name for name, p in PARAMS.items() if not p["default"] and not p["secure"]}
    assert needed <= set(given), f"required params missing from the parameters file: {needed - set(given)}"
    assert not any(PARAMS[name]["secure"] for name in given), "secrets go on the command line, not in the file"
    kinds = {"string": str, "int": int, "bool": bool}
    for name, entry in given.items():
        value = entry["value"]
        assert type(value) is kinds[PARAMS[name]["type"]], name
        allowed = PARAMS[name]["allowed"]
        if allowed is not None:
            assert str(value) in allowed, (name, value, allowed)


def test_flex_consumption_with_a_system_assigned_identity_and_identity_based_storage() -> None:
    assert "name: 'FC1'" in BICEP and "tier: 'FlexConsumption'" in BICEP
    assert re.search(r"identity: \{\s*type: 'SystemAssigned'", BICEP)
    assert "type: 'SystemAssignedIdentity'" in BICEP  # the deployment package, too
    assert "allowSharedKeyAccess: false" in BICEP
    storage_roles = re.search(r"^var storageRoles = \{\n(.*?)^\}", BICEP, re.S | re.M)
    assert storage_roles
    roles = re.findall(r"'([0-9a-f-]{36})' // ", storage_roles.group(1))
    assert set(roles) == {
        "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",  # Storage Blob Data Owner
        "974c5e8b-45b9-4653-ba55-5f855dd0fb88",  # Storage Queue Data Contributor
        "8a0f0c08-91a1-4084-bc3d-661d67233fed",  # Storage Queue Data Message Processor
        "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3",  # Storage Table Data Contributor
    }
    assert "principalId: functionApp.identity.principalId" in BICEP
    assert "Microsoft.OperationalInsights/workspaces@" in BICEP and "WorkspaceResourceId: workspace.id" in BICEP


# ---------------------------------------------------------------- app settings


def test_every_setting_the_app_requires_is_set() -> None:
    required = {
        str(field.validation_alias) for field in Settings.model_fields.values() if field.is_required()
    }
    assert required == {"FNO_URL", "DATAVERSE_URL"}
    managed_identity = {"LOYALTYSYNC_CREDENTIAL", "AzureWebJobsStorage__accountName", "AzureWebJobsStorage__credential"}
    telemetry_settings = {"APPLICATIONINSIGHTS_CONNECTION_STRING", "TELEMETRY_HASH_SALT"}
    missing = (required | managed_identity | telemetry_settings) - set(APP_SETTINGS)
    assert not missing, f"main.bicep does not set {missing}"
    assert APP_SETTINGS["LOYALTYSYNC_CREDENTIAL"] == "'managed-identity'"
    assert APP_SETTINGS["AzureWebJobsStorage__credential"] == "'managedidentity'"
    assert "AzureWebJobsStorage" not in APP_SETTINGS, "no connection string: storage is reached with the identity"
    assert "AZURE_CLIENT_ID" not in APP_SETTINGS, "a client id would select a user-assigned identity"


def test_every_setting_the_template_sets_is_one_the_app_or_the_host_reads() -> None:
    unknown = (set(APP_SETTINGS) | set(OPTIONAL_SETTINGS)) - _reads() - PLATFORM_SETTINGS
    assert not unknown, f"main.bicep sets settings nothing reads: {unknown}"
    assert not (set(APP_SETTINGS) | set(OPTIONAL_SETTINGS)) & NOT_ON_FLEX
    for name in ("workerTelemetrySettings", "serviceBusSettings", "eventGridSettings"):
        assert re.search(rf"\? {name} : \{{\}}", CODE), f"{name} is never applied"


def _environment(settings: dict[str, str]) -> dict[str, str]:
    """The app settings as the app would see them: literals as written, expressions with sample values."""
    samples = {
        "fnoUrl": "https://contoso.operations.dynamics.com",
        "dataverseUrl": "https://contoso.crm.dynamics.com",
        "integrationUserIds": "",
        "storage.name": "stloyaltysync",
        "appInsights.properties.ConnectionString": "InstrumentationKey=00000000-0000-0000-0000-000000000000",
        "string(redactPersonalData)": "True",
        "telemetryHashSalt": "a-secret-salt",
        "serviceBusQueueName": "fo-business-events",
    }
    environment: dict[str, str] = {}
    for name, raw in settings.items():
        if raw.startswith("'") and raw.endswith("'"):
            environment[name] = raw[1:-1]
        else:
            assert raw in samples, f"{name}: no sample value for the expression {raw}"
            environment[name] = samples[raw]
    return environment


def test_the_app_starts_with_exactly_the_settings_the_template_gives_it() -> None:
    settings = load_settings(_environment(APP_SETTINGS))
    assert settings.credential == "managed-identity"
    endpoints = settings.storage_endpoints
    assert endpoints is not None and endpoints.managed_identity
    assert endpoints.table == "https://stloyaltysync.table.core.windows.net"
    assert endpoints.queue == "https://stloyaltysync.queue.core.windows.net"
    assert settings.redact_personal_data and settings.telemetry_hash_salt == "a-secret-salt"
    assert telemetry.choose_mode(settings) == "azure-monitor"
    worker_owned = load_settings(_environment({**APP_SETTINGS, **WORKER_SETTINGS}))
    assert telemetry.choose_mode(worker_owned) == "functions-worker"
    everything = load_settings(_environment({**APP_SETTINGS, **OPTIONAL_SETTINGS}))
    assert everything.servicebus_queue == "fo-business-events" and everything.eventgrid_enabled


# ---------------------------------------------------------------- identity-based storage


def _base(**extra: str) -> dict[str, str]:
    return {"FNO_URL": "https://fo.example", "DATAVERSE_URL": "https://dv.example", **extra}


def test_storage_endpoints_derive_from_the_account_name_or_explicit_uris() -> None:
    by_name = load_settings(_base(AzureWebJobsStorage__accountName="stapp")).storage_endpoints
    assert by_name is not None
    assert (by_name.table, by_name.queue) == ("https://stapp.table.core.windows.net", "https://stapp.queue.core.windows.net")
    assert not by_name.managed_identity and by_name.client_id is None

    sovereign = load_settings(
        _base(
            AzureWebJobsStorage__tableServiceUri="https://stapp.table.core.chinacloudapi.cn/",
            AzureWebJobsStorage__queueServiceUri="https://stapp.queue.core.chinacloudapi.cn",
            AzureWebJobsStorage__credential="managedidentity",
            AzureWebJobsStorage__clientId="11111111-2222-3333-4444-555555555555",
        )
    ).storage_endpoints
    assert sovereign is not None
    assert sovereign.table == "https://stapp.table.core.chinacloudapi.cn"
    assert sovereign.queue == "https://stapp.queue.core.chinacloudapi.cn"
    assert sovereign.managed_identity and sovereign.client_id == "11111111-2222-3333-4444-555555555555"

    explicit_wins = load_settings(
        _base(AzureWebJobsStorage__accountName="stapp", AzureWebJobsStorage__queueServiceUri="https://q.example")
    ).storage_endpoints
    assert explicit_wins is not None and explicit_wins.queue == "https://q.example"
    assert explicit_wins.table == "https://stapp.table.core.windows.net"

    connection = load_settings(
        _base(AzureWebJobsStorage="UseDevelopmentStorage=true", AzureWebJobsStorage__accountName="stapp")
    )
    assert connection.storage_endpoints is None, "a connection string, when set, is what the host uses too"
    assert load_settings(_base()).storage_endpoints is None

    with pytest.raises(ConfigError) as caught:
        _ = load_settings(_base(AzureWebJobsStorage__tableServiceUri="https://t.example")).storage_endpoints
    assert caught.value.setting == "AzureWebJobsStorage__queueServiceUri"


async def test_the_runtime_reaches_identity_based_storage_at_the_derived_endpoints() -> None:
    settings = load_settings(
        _base(
            AzureWebJobsStorage__accountName="stapp",
            AzureWebJobsStorage__credential="managedidentity",
            LOYALTYSYNC_SANDBOX_TOKEN="sandbox-token-for-the-targets",
        )
    )
    runtime = build_runtime(settings, load_templates(default_mappings_dir()))
    try:
        assert runtime.queues.url.startswith("https://stapp.queue.core.windows.net")
        assert runtime.queue("loyalty-cards").url.startswith(
            "https://stapp.queue.core.windows.net/loyaltysync-loyalty-cards"
        )
        tables = runtime._storage._service  # the one TableServiceClient the three stores share
        assert tables.url.startswith("https://stapp.table.core.windows.net")
        credential = runtime._credentials[-1]
        assert type(credential).__name__ == "ManagedIdentityCredential"
    finally:
        await runtime.aclose()


# ---------------------------------------------------------------- workbook, alerts and queries


class _NameRecorder:
    """A stand-in meter that only records the instrument names created on it."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def _create(self, name: str, *args: Any, **kwargs: Any) -> object:
        self.names.append(name)
        return object()

    create_counter = create_histogram = create_observable_gauge = _create


def _metric_names() -> set[str]:
    meter = _NameRecorder()
    Instruments.create(meter)  # type: ignore[arg-type]
    BacklogGauges(meter)  # type: ignore[arg-type]
    return set(meter.names)


# A quoted or back-quoted dotted name: metric names in queries and tables (and the one logger name the docs show).
_METRIC = re.compile(r"[\"`](loyaltysync\.[a-z_]+(?:\.[a-z_]+)*)[\"`]")
LOGGERS = {"loyaltysync.preflight"}


def test_queries_refer_only_to_metrics_the_app_records() -> None:
    recorded = _metric_names()
    assert len(recorded) >= 17, "the instruments of telemetry/metrics.py, by name"
    for where, text in (("main.bicep", BICEP), ("workbook.json", json.dumps(WORKBOOK)), ("monitoring.md", MONITORING)):
        unknown = set(_METRIC.findall(text)) - recorded - LOGGERS
        assert not unknown, f"{where} refers to metrics the app does not record: {unknown}"
    assert recorded <= set(_METRIC.findall(MONITORING)), "docs/monitoring.md lists every metric"
    alerted = set(_METRIC.findall(BICEP))
    assert {"loyaltysync.dead_letters", "loyaltysync.queue.oldest_age", "loyaltysync.target.throttled",
            "loyaltysync.events.retried"} <= alerted


def test_the_workbook_is_a_workbook_with_the_operational_views() -> None:
    assert WORKBOOK["version"] == "Notebook/1.0"
    queries = {item["name"]: item["content"] for item in WORKBOOK["items"] if item["type"] == 3}
    assert {"failures-by-reason", "latency-percentiles", "echo-rate", "backlog-age", "conflicts", "throttling"} <= set(
        queries
    )
    for name, content in queries.items():
        assert content["resourceType"] == "microsoft.insights/components", name
        assert "{TimeRange}" in content["query"], f"{name} ignores the time range parameter"
        assert not re.search(r"\b(AppMetrics|AppRequests|AppTraces|AppDependencies)\b", content["query"]), name
    parameters = next(item for item in WORKBOOK["items"] if item["type"] == 9)
    assert [p["name"] for p in parameters["content"]["parameters"]] == ["TimeRange"]


CLASSIC = ("customMetrics", "requests", "traces", "dependencies", "exceptions", "timestamp", "customDimensions")
WORKSPACE = ("AppMetrics", "AppRequests", "AppTraces", "AppDependencies", "AppExceptions", "TimeGenerated",
             "Properties")


def test_monitoring_queries_come_in_both_dialects_and_keep_to_their_own_tables() -> None:
    blocks = re.findall(r"```kusto\n(.*?)```", MONITORING, re.S)
    classic = [b for b in blocks if b.startswith("// classic")]
    workspace = [b for b in blocks if b.startswith("// workspace")]
    assert len(classic) == len(workspace) >= 10 and len(classic) + len(workspace) == len(blocks)
    for block in classic:
        assert not any(re.search(rf"\b{name}\b", block) for name in WORKSPACE), block
    for block in workspace:
        tables = re.findall(r"(?m)(?:^|\bunion\s+(?:\w+,\s*)*|\(\()(\w+)", block)
        assert not set(tables) & set(CLASSIC[:5]), block
        assert not any(re.search(rf"\b{name}\b", block) for name in CLASSIC[5:]), block
    for heading in ("Failures by reason", "Latency percentiles", "Echo rate", "Backlog age", "Conflicts"):
        assert f"### {heading}" in MONITORING


# Span tables: rows stand for `itemCount` rows when sampled. Metric tables are never sampled.
_SPAN_TABLES = {"requests", "dependencies", "traces", "exceptions", "AppRequests", "AppDependencies", "AppTraces",
                "AppExceptions"}


def _tables(query: str) -> set[str]:
    """The tables a query reads: first words of its lines, union members, sub-query sources."""
    return set(re.findall(r"(?m)(?:^|\bunion\s+(?:\w+,\s*)*|\(\()(\w+)", query)) | set(
        re.findall(r"\bunion\s+\w+,\s*(\w+)", query)
    )


def _all_queries() -> list[tuple[str, str]]:
    """(where, query) of every KQL query: docs/monitoring.md blocks, workbook tiles, alert rules."""
    found = [(f"monitoring.md #{i}", q) for i, q in enumerate(re.findall(r"```kusto\n(.*?)```", MONITORING, re.S))]
    found += [(f"workbook {item['name']}", item["content"]["query"]) for item in WORKBOOK["items"] if item["type"] == 3]
    found += [(f"alert #{i}", q) for i, q in enumerate(re.findall(r"query: '''\n(.*?)'''", BICEP, re.S))]
    return found


def test_span_rows_are_counted_with_item_count_and_inbound_read_where_the_exporter_puts_it() -> None:
    queries = _all_queries()
    assert len(queries) >= 30
    for where, query in queries:
        if not _tables(query) & _SPAN_TABLES:
            continue
        assert "count()" not in query, f"{where}: count() undercounts sampled rows; sum(itemCount)"
        assert not re.search(r"\bpercentile\(", query), f"{where}: percentiles of sampled rows need percentilew"
        # The inbound span under the host is INTERNAL: a dependency, never a request (_convert_span_to_envelope).
        assert not re.search(r"\b(requests|AppRequests)\b[^|]*\n?\|[^|]*(POST /api/|inbound )", query), where
    refused = [q for w, q in queries if "refusal" in q]
    assert len(refused) == 3, "docs (both dialects) and the workbook"
    for query in refused:
        assert re.match(r"(// \w+\n)?(dependencies|AppDependencies)\n", query), query
        assert '"InProc"' in query and "status" in query and re.search(r"sum\((itemCount|ItemCount)\)", query)
    alerts = [q for w, q in queries if w.startswith("alert")]
    assert len(alerts) == 4 and all(q.lstrip().startswith(("AppMetrics", "let paused = AppMetrics")) for q in alerts)


def test_host_json_keeps_warning_lines_out_of_adaptive_sampling() -> None:
    host = json.loads((ROOT / "host.json").read_text("utf-8"))
    sampling = host["logging"]["applicationInsights"]["samplingSettings"]
    excluded = set(sampling["excludedTypes"].split(";"))
    assert sampling["isEnabled"] is False or {"Trace", "Request", "Exception"} <= excluded


# ---------------------------------------------------------------- telemetry: Entra ID only, sampling, instrumentations


def _resource(symbol: str) -> str:
    """The body of `resource <symbol> '...' = ... { ... }` in main.bicep (up to the next top-level line)."""
    found = re.search(rf"^resource {symbol} '[^']+' = (?:if \([^)]*\) )?\{{\n(.*?)^\}}", BICEP, re.S | re.M)
    assert found, f"resource {symbol} not found"
    return found.group(1)


def test_telemetry_is_ingested_with_the_identity_only() -> None:
    assert PARAMS["entraOnlyIngestion"] == {"type": "bool", "default": True, "secure": False, "allowed": None}
    assert re.search(r"^param entraOnlyIngestion bool = true$", BICEP, re.M)
    assert "DisableLocalAuth: entraOnlyIngestion" in _resource("appInsights")
    publisher = _resource("appInsightsPublisher")
    assert "scope: appInsights" in publisher and "principalId: functionApp.identity.principalId" in publisher
    assert "roleDefinitions', monitoringMetricsPublisherRole)" in publisher
    assert "var monitoringMetricsPublisherRole = '3913510d-42f4-4e42-8a64-420c390055eb'" in BICEP
    # As the host and the exporter read it: the system-assigned identity (no ClientId), and the app agrees.
    assert APP_SETTINGS["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"] == "'Authorization=AAD'"
    settings = load_settings(_environment(APP_SETTINGS))
    from azure.identity import ManagedIdentityCredential

    assert isinstance(telemetry.setup.ingestion_credential(settings), ManagedIdentityCredential)
    # The host sends with the identity from its first start: the role is there before the settings.
    settings_resource = _resource("functionAppSettings")
    assert "appInsightsPublisher" in settings_resource.split("dependsOn", 1)[1]


def test_every_trace_is_kept_and_the_distro_instruments_nothing() -> None:
    from loyaltysync.telemetry import setup

    # Read by the distro whoever configures it (the worker or the app); without them: 5 traces a second.
    assert APP_SETTINGS["OTEL_TRACES_SAMPLER"] == "'microsoft.fixed_percentage'"
    assert APP_SETTINGS["OTEL_TRACES_SAMPLER_ARG"] == "'1.0'"
    disabled = WORKER_SETTINGS["OTEL_PYTHON_DISABLED_INSTRUMENTATIONS"].strip("'").split(",")
    assert set(disabled) == set(setup.DISTRO_INSTRUMENTATIONS)


def test_optional_service_bus_and_event_grid_are_wired_to_the_functions() -> None:
    assert PARAMS["serviceBusQueueName"]["default"] and PARAMS["eventGridTopic"]["default"]
    receiver = _resource("serviceBusReceiver")
    assert "scope: serviceBusQueue" in receiver and "roleDefinitions', serviceBusDataReceiverRole)" in receiver
    assert "var serviceBusDataReceiverRole = '4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0'" in BICEP
    assert "'Send'" in _resource("serviceBusSendRule") and "'Listen'" not in _resource("serviceBusSendRule")
    # function_app.py: the trigger's connection is "SERVICEBUS" (identity-based: SERVICEBUS__fullyQualifiedNamespace).
    function_app = (ROOT / "function_app.py").read_text("utf-8")
    assert 'connection="SERVICEBUS"' in function_app and '@app.function_name(name="fo_eventgrid")' in function_app
    assert SERVICE_BUS_SETTINGS["SERVICEBUS__fullyQualifiedNamespace"].endswith(".servicebus.windows.net'")
    subscription = _resource("eventGridSubscription")
    assert "endpointType: 'AzureFunction'" in subscription
    assert "resourceId: '${functionApp.id}/functions/fo_eventgrid'" in subscription
    assert EVENT_GRID_SETTINGS == {"EVENTGRID_ENABLED": "'true'"}
    for symbol in ("serviceBus", "serviceBusQueue", "serviceBusSendRule", "serviceBusReceiver"):
        assert re.search(rf"^resource {symbol} '[^']+' = if \(useServiceBus\)", BICEP, re.M), symbol
    for symbol in ("eventGrid", "eventGridSubscription"):
        assert re.search(rf"^resource {symbol} '[^']+' = if \(eventGridTopic\)", BICEP, re.M), symbol
