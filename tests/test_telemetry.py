"""Telemetry: one trace per change (inbound -> queue -> worker -> target calls), metrics, redaction, set-up.

The change runs through the real in-process pieces: `inbound.handle_inbound`
and `worker.handle_change` with a runtime whose clients talk to both emulators
over `httpx.ASGITransport` and whose queues and tables are the session's
Azurite. Spans and metrics are collected with the SDK's in-memory exporters.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from devkit.azurite import Azurite
from devkit.sandbox import dataverse as dataverse_emulator
from devkit.sandbox import fno as fno_emulator
from devkit.sandbox.common import Faults
from loyaltysync import inbound, telemetry, worker
from loyaltysync.events.model import ChangeEvent
from loyaltysync.retries import RetryState, with_retry
from loyaltysync.runtime import Runtime, build_runtime
from loyaltysync.settings import load_settings
from loyaltysync.targets.http import Attempt
from loyaltysync.telemetry import setup
from loyaltysync.telemetry.processors import RedactingLogRecordProcessor, RedactingSpanProcessor
from loyaltysync.telemetry.redaction import PersonalDataFilter, install_log_filter
from loyaltysync.templates import default_mappings_dir, load_templates

EVENTS = Path(__file__).parent / "fixtures" / "events"
TEMPLATES = load_templates(default_mappings_dir())
CARDS = TEMPLATES["loyalty-cards"]
TOKEN = "telemetry-test-token"
SALT = "per-deployment-salt"
CARD = "C-1001"  # the card number in the Dataverse webhook fixture
CORRELATION = "c474239d-4233-41a9-8b17-a86cb4f737b5"  # its CorrelationId
HOST_TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@dataclass
class Recorded:
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader
    recorder: telemetry.Recorder

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def named(self, prefix: str) -> list[ReadableSpan]:
        return [s for s in self.finished() if s.name.startswith(prefix)]

    def points(self, name: str) -> list[tuple[dict[str, Any], float]]:
        """(attributes, value) of every data point of metric `name`; histograms give their count."""
        out: list[tuple[dict[str, Any], float]] = []
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name != name:
                        continue
                    for point in metric.data.data_points:
                        value = getattr(point, "value", None)
                        out.append((dict(point.attributes or {}), float(point.count if value is None else value)))
        return out

    def total(self, name: str, **dims: str) -> float:
        return sum(v for attrs, v in self.points(name) if all(attrs.get(k) == d for k, d in dims.items()))


def _recorder(*, redact: bool = True) -> Recorded:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    recorder = telemetry.Recorder(
        tracer_provider=tracer_provider,
        meter_provider=MeterProvider(metric_readers=[reader]),
        redactor=telemetry.KeyRedactor(enabled=redact, salt=SALT),
    )
    return Recorded(spans, reader, recorder)


@pytest.fixture
def recorded() -> Iterator[Recorded]:
    """A recorder on in-memory exporters, installed for the test (the previous one put back after)."""
    install_log_filter()
    found = _recorder()
    previous = telemetry.install(found.recorder)
    yield found
    telemetry.install(previous)


RuntimeFactory = Callable[..., Awaitable[Runtime]]


@pytest.fixture
async def make_runtime(azurite: Azurite, unique_name: str) -> AsyncIterator[RuntimeFactory]:
    """Build runtimes on both emulators in-process (optionally with faults) and the session's Azurite."""
    built: list[Runtime] = []

    async def make(fo_faults: Faults | None = None) -> Runtime:
        settings = load_settings(
            {
                "FNO_URL": "http://fo.test",
                "DATAVERSE_URL": "http://dataverse.test",
                "LOYALTYSYNC_SANDBOX_TOKEN": TOKEN,
                "AzureWebJobsStorage": azurite.connection_string,
                "QUEUE_PREFIX": unique_name,
                "STATE_TABLE": f"{unique_name}state",
                "DEADLETTER_TABLE": f"{unique_name}dead",
                "CONTROL_TABLE": f"{unique_name}control",
            }
        )
        fo_app = fno_emulator.create_app(token=TOKEN, templates=TEMPLATES, faults=fo_faults)
        dv_app = dataverse_emulator.create_app(token=TOKEN, templates=TEMPLATES)
        runtime = build_runtime(
            settings,
            TEMPLATES,
            fno_transport=httpx.ASGITransport(app=fo_app),
            dataverse_transport=httpx.ASGITransport(app=dv_app),
        )
        telemetry.instrument_runtime(runtime)
        built.append(runtime)
        return runtime

    yield make
    for runtime in built:
        await runtime.aclose()


def _webhook(**target: Any) -> bytes:
    """The Dataverse card update webhook, with attribute values of `Target` replaced."""
    body = json.loads((EVENTS / "dataverse-loyaltycard-update.json").read_text("utf-8"))
    for parameter in body["InputParameters"]:
        if parameter["key"] == "Target":
            for attribute in parameter["value"]["Attributes"]:
                if attribute["key"] in target:
                    attribute["value"] = target[attribute["key"]]
    return json.dumps(body).encode()


def _receive(body: bytes, *, host_traceparent: str | None = None) -> inbound.Reply:
    return inbound.handle_inbound(
        "dataverse",
        CARDS,
        TEMPLATES,
        body,
        {"Content-Type": "application/json"},
        max_body_bytes=1_048_576,
        host_traceparent=host_traceparent,
    )


def _text_of(span: ReadableSpan) -> str:
    """Everything a span exports, as one string (to search for personal data)."""
    parts = [span.name, json.dumps(dict(span.attributes or {}), default=str), span.status.description or ""]
    for event in span.events:
        parts.append(json.dumps(dict(event.attributes or {}), default=str))
    return "\n".join(parts)


async def test_one_change_is_one_trace_from_inbound_request_to_target_writes(
    recorded: Recorded, make_runtime: RuntimeFactory
) -> None:
    runtime = await make_runtime()
    reply = _receive((EVENTS / "dataverse-loyaltycard-update.json").read_bytes(), host_traceparent=HOST_TRACEPARENT)
    assert reply.status == 202 and len(reply.messages) == 1
    queued = ChangeEvent.from_json(reply.messages[0])
    assert queued.traceparent is not None  # the hand-off through the queue

    outcome = await worker.handle_change(runtime, reply.messages[0])
    assert outcome is not None and outcome.applied

    (request,) = recorded.named("inbound ")
    (producer,) = recorded.named("enqueue ")
    (consumer,) = recorded.named("sync ")
    calls = [s for s in recorded.finished() if s.kind == SpanKind.CLIENT]
    trace_ids = {s.context.trace_id for s in (request, producer, consumer, *calls)}
    assert trace_ids == {int(HOST_TRACEPARENT.split("-")[1], 16)}, "one trace, continuing the host's request"
    assert request.parent is not None and request.parent.span_id == int(HOST_TRACEPARENT.split("-")[2], 16)
    assert request.kind == SpanKind.INTERNAL  # under the host's request span
    assert producer.parent is not None and producer.parent.span_id == request.context.span_id
    assert producer.kind == SpanKind.PRODUCER and consumer.kind == SpanKind.CONSUMER
    assert consumer.parent is not None and consumer.parent.span_id == producer.context.span_id
    assert queued.traceparent.split("-")[2] == format(producer.context.span_id, "016x")
    assert calls and all(c.parent is not None and c.parent.span_id == consumer.context.span_id for c in calls)

    for span in (producer, consumer):
        attributes = dict(span.attributes or {})
        assert attributes["correlation_id"] == CORRELATION
        assert attributes["template"] == "loyalty-cards" and attributes["direction"] == "dataverse-to-fo"
        assert attributes["natural_key"] == telemetry.hash_key(CARD, SALT)
    consumer_attributes = dict(consumer.attributes or {})
    assert consumer_attributes["decision"] == outcome.reason and consumer_attributes["attempt"] == 1
    assert consumer_attributes["latency_from_receipt_ms"] >= 0
    # F&O has no such card: read (404), update-only (404), then create (201), each a dependency.
    fo_calls = [(dict(c.attributes or {})["http.request.method"], dict(c.attributes or {})["http.response.status_code"])
                for c in calls if dict(c.attributes or {})["target"] == "fno"]
    assert ("POST", 201) in fo_calls and ("GET", 404) in fo_calls
    assert all(c.status.status_code != StatusCode.ERROR for c in calls), "404 answers the engine acts on are fine"

    dims = {"template": "loyalty-cards", "direction": "dataverse-to-fo"}
    assert recorded.total("loyaltysync.events.received", **dims) == 1
    assert recorded.total("loyaltysync.events.applied", **dims, decision=outcome.reason) == 1
    assert recorded.total("loyaltysync.latency.receipt_to_write", **dims) == 1
    assert recorded.total("loyaltysync.latency.event_to_write", **dims) == 1
    assert recorded.total("loyaltysync.target.requests", target="fno", status="201", **dims) == 1


async def test_card_numbers_never_reach_spans_logs_or_metrics(
    recorded: Recorded, make_runtime: RuntimeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = await make_runtime()
    caplog.set_level(logging.DEBUG)
    reply = _receive((EVENTS / "dataverse-loyaltycard-update.json").read_bytes())
    await worker.handle_change(runtime, reply.messages[0])
    await worker.handle_change(runtime, reply.messages[0])  # the same event again: skipped

    spans = recorded.finished()
    assert spans
    for span in spans:
        assert CARD not in _text_of(span), span.name
    for name in ("loyaltysync.events.applied", "loyaltysync.events.skipped", "loyaltysync.target.requests"):
        for attributes, _ in recorded.points(name):
            assert CARD not in json.dumps(attributes)
    ours = [r for r in caplog.records if r.name.startswith(("loyaltysync", "httpx"))]
    assert any(r.name == "loyaltysync.worker" for r in ours)
    for record in ours:
        assert CARD not in record.getMessage(), record.getMessage()
    outcome_line = next(r for r in ours if r.name == "loyaltysync.worker" and "->" in r.getMessage())
    assert getattr(outcome_line, "natural_key", None) == telemetry.hash_key(CARD, SALT)
    assert getattr(outcome_line, "template", None) == "loyalty-cards"
    assert getattr(outcome_line, "direction", None) == "dataverse-to-fo"
    assert getattr(outcome_line, "attempt", None) == 1
    assert recorded.total("loyaltysync.events.skipped", template="loyalty-cards", reason="stale") == 1


async def test_throttling_is_counted_and_the_failure_recorded_scrubbed(
    recorded: Recorded, make_runtime: RuntimeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = await make_runtime(Faults(throttle_rate=1.0, throttle_retry_after_s=0.0))
    caplog.set_level(logging.INFO)
    reply = _receive((EVENTS / "dataverse-loyaltycard-update.json").read_bytes())

    # Transient: the change goes back on its queue for later and the message completes.
    assert await worker.handle_change(runtime, reply.messages[0], dequeue_count=1, max_dequeue=2) is None
    dims = {"template": "loyalty-cards", "direction": "dataverse-to-fo"}
    assert recorded.total("loyaltysync.target.throttled", target="fno", **dims) == runtime.fno.http.retry.max_attempts
    assert recorded.total("loyaltysync.events.retried", **dims) == 1
    (first,) = recorded.named("sync ")
    assert dict(first.attributes or {})["decision"] == "retry"
    assert dict(first.attributes or {})["error.code"] == "429"
    assert await runtime.dead_letters.list("loyalty-cards") == []

    # Once the retry budget is spent, the next failure parks the change as a dead letter.
    spent = RetryState(7, datetime.now(UTC) - timedelta(hours=2), "fno answered 429")
    assert await worker.handle_change(runtime, with_retry(reply.messages[0], spent)) is None
    assert recorded.total("loyaltysync.dead_letters", **dims) == 1
    second = recorded.named("sync ")[-1]
    assert dict(second.attributes or {})["decision"] == "parked" and dict(second.attributes or {})["attempt"] == 8
    for span in recorded.finished():
        assert CARD not in _text_of(span)
    parked = next(r for r in caplog.records if r.getMessage().startswith("parked"))
    assert CARD not in parked.getMessage() and getattr(parked, "target_status", None) == 429
    letters = await runtime.dead_letters.list("loyalty-cards")
    assert [d.key for d in letters] == [CARD], "the dead letter itself keeps the real key for the operator"


async def test_a_paused_template_holds_the_event_and_counts_it(
    recorded: Recorded, make_runtime: RuntimeFactory
) -> None:
    runtime = await make_runtime()
    await runtime.set_paused("loyalty-cards", True)
    reply = _receive((EVENTS / "dataverse-loyaltycard-update.json").read_bytes())
    assert await worker.handle_change(runtime, reply.messages[0]) is None
    assert recorded.total("loyaltysync.events.held", template="loyalty-cards") == 1
    assert dict(recorded.named("sync ")[0].attributes or {})["decision"] == "held"


async def test_backlog_gauges_follow_the_queues(recorded: Recorded, make_runtime: RuntimeFactory) -> None:
    runtime = await make_runtime()
    reply = _receive((EVENTS / "dataverse-loyaltycard-update.json").read_bytes())
    await runtime.enqueue("loyalty-cards", reply.messages[0])
    report = await telemetry.refresh_backlog(runtime)
    assert report["templates"]["loyalty-cards"]["backlog"] == 1
    backlog = {a["template"]: v for a, v in recorded.points("loyaltysync.queue.backlog")}
    assert backlog == {"loyalty-cards": 1.0, "loyalty-levels": 0.0, "loyalty-reward-points": 0.0}
    ages = {a["template"]: v for a, v in recorded.points("loyaltysync.queue.oldest_age")}
    assert ages["loyalty-cards"] >= 0 and ages["loyalty-levels"] == 0.0
    assert {a["template"]: v for a, v in recorded.points("loyaltysync.template.paused")}["loyalty-cards"] == 0.0


def test_a_stale_backlog_snapshot_reports_nothing(recorded: Recorded) -> None:
    now = [1000.0]
    gauges = telemetry.metrics.BacklogGauges(
        MeterProvider(metric_readers=[reader := InMemoryMetricReader()]).get_meter("t"), clock=lambda: now[0]
    )
    gauges.update({"templates": {"a": {"backlog": 3, "oldest_age_s": 42.0, "paused": True}}})
    assert gauges.values("backlog") == {"a": 3.0} and gauges.values("paused") == {"a": 1.0}
    now[0] += telemetry.metrics.SNAPSHOT_MAX_AGE_S + 1
    assert gauges.values("backlog") == {}
    data = reader.get_metrics_data()
    resources = data.resource_metrics if data is not None else []
    points = [p for r in resources for s in r.scope_metrics for m in s.metrics for p in m.data.data_points]
    assert points == [], "a stale snapshot is not exported"


def test_without_redaction_keys_are_shown_as_they_are() -> None:
    found = _recorder(redact=False)
    event = ChangeEvent(template="loyalty-cards", side="fo", operation="update", key={"CardNumber": CARD})
    with found.recorder.change_span(event, attempt=3):
        assert found.recorder.log_extra(event)["natural_key"] == CARD
    (span,) = found.finished()
    attributes = dict(span.attributes or {})
    assert attributes["natural_key"] == CARD and attributes["direction"] == "fo-to-dataverse"
    assert attributes["correlation_id"] == event.event_id, "an F&O event is correlated by its EventId"


def test_target_call_span_is_a_dependency_with_the_url_shaped_and_throttling_counted() -> None:
    found = _recorder()
    event = ChangeEvent(template="loyalty-cards", side="dataverse", operation="update", key={"CardNumber": CARD})
    url = f"https://org.crm.dynamics.com/api/data/v9.2/msdyn_loyaltycards(msdyn_cardnumber='{CARD}')?$select=a"
    with found.recorder.change_span(event, attempt=1, host_traceparent=HOST_TRACEPARENT):
        found.recorder.attempt(Attempt("dataverse", "PATCH", url, 429, 0.25, 2, 3.0))
    call, change = found.finished()
    attributes = dict(call.attributes or {})
    assert call.name == "PATCH dataverse msdyn_loyaltycards(…)" and call.kind == SpanKind.CLIENT
    assert attributes["url.full"] == "https://org.crm.dynamics.com/api/data/v9.2/msdyn_loyaltycards(…)?$select=…"
    assert attributes["http.response.status_code"] == 429 and attributes["retry_after_s"] == 3.0
    assert attributes["attempt"] == 2 and call.status.status_code == StatusCode.ERROR
    assert call.end_time is not None and call.start_time is not None
    assert abs((call.end_time - call.start_time) - 250_000_000) < 5_000_000
    assert [link.context.trace_id for link in change.links] == [int(HOST_TRACEPARENT.split("-")[1], 16)]
    assert found.total("loyaltysync.target.throttled", target="dataverse", template="loyalty-cards") == 1


def test_key_scrubbing_covers_the_forms_a_key_takes_in_urls(caplog: pytest.LogCaptureFixture) -> None:
    redactor = telemetry.KeyRedactor(salt=SALT)
    key = "O'Brien 7"
    token = telemetry.hash_key(key, SALT)
    text = "GET .../cards(CardNumber='O%27%27Brien%207') for O'Brien 7 and O''Brien 7"
    assert redactor.scrub(text, [key]) == f"GET .../cards(CardNumber='{token}') for {token} and {token}"
    assert telemetry.KeyRedactor(enabled=False).scrub(text, [key]) == text

    install_log_filter()
    previous = telemetry.install(_recorder().recorder)
    try:
        caplog.set_level(logging.INFO)
        with telemetry.personal_values(CARD):
            logging.getLogger("loyaltysync.targets.http").warning("retrying %s", f"cards('{CARD}')")
        logging.getLogger("loyaltysync.targets.http").warning("outside a change: %s", CARD)
    finally:
        telemetry.install(previous)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == f"retrying cards('{telemetry.hash_key(CARD, SALT)}')"
    assert messages[1] == f"outside a change: {CARD}", "only the keys of the change in progress are known"
    assert any(isinstance(f, PersonalDataFilter) for f in logging.getLogger("httpx").filters)


def _settings(**values: str) -> Any:
    return load_settings({"FNO_URL": "https://fo.example", "DATAVERSE_URL": "https://dv.example", **values})


def test_the_mode_follows_the_settings() -> None:
    connection = "InstrumentationKey=00000000-0000-0000-0000-000000000000"
    assert setup.choose_mode(_settings()) == "off"
    assert setup.choose_mode(_settings(TELEMETRY_CONSOLE="true")) == "console"
    assert setup.choose_mode(_settings(APPLICATIONINSIGHTS_CONNECTION_STRING=connection)) == "azure-monitor"
    worker_owned = _settings(
        APPLICATIONINSIGHTS_CONNECTION_STRING=connection, PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY="true"
    )
    assert setup.choose_mode(worker_owned) == "functions-worker"


@pytest.fixture
def fresh_setup(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """`configure` as if in a new process, with the distro's entry point recorded instead of run."""
    import azure.monitor.opentelemetry as distro

    calls: list[dict[str, Any]] = []

    def fake(**kwargs: Any) -> None:
        calls.append({**kwargs, "OTEL_LOGS_EXPORTER": os.environ.get("OTEL_LOGS_EXPORTER")})

    monkeypatch.setattr(distro, "configure_azure_monitor", fake)
    monkeypatch.setattr(setup, "_mode", None)
    previous = telemetry.install(None)
    # configure() raises chatty loggers' levels and filters the exporting handlers: put them back after.
    loggers = [logging.getLogger(name) for name in (setup.HTTPX_LOGGER, setup.SDK_HTTP_LOGGER)]
    levels = [logger.level for logger in loggers]
    handlers = logging.getLogger().handlers + logging.getLogger("loyaltysync").handlers
    filters = [list(handler.filters) for handler in handlers]
    yield calls
    telemetry.install(previous)
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)
    for handler, kept in zip(handlers, filters, strict=True):
        handler.filters = kept


def test_the_distro_is_not_configured_twice_next_to_the_functions_worker(fresh_setup: list[dict[str, Any]]) -> None:
    settings = _settings(
        APPLICATIONINSIGHTS_CONNECTION_STRING="InstrumentationKey=x", PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY="true"
    )
    assert setup.configure(settings) == "functions-worker"
    assert fresh_setup == []
    assert setup.configure(_settings(APPLICATIONINSIGHTS_CONNECTION_STRING="InstrumentationKey=x")) == (
        "functions-worker"
    ), "once per process"


def test_azure_monitor_mode_keeps_url_leaking_instrumentations_and_host_logs_out(
    fresh_setup: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FUNCTIONS_WORKER_RUNTIME", "python")
    monkeypatch.delenv("OTEL_LOGS_EXPORTER", raising=False)
    settings = _settings(APPLICATIONINSIGHTS_CONNECTION_STRING="InstrumentationKey=x", TELEMETRY_HASH_SALT=SALT)
    assert setup.configure(settings) == "azure-monitor"
    (call,) = fresh_setup
    assert call["connection_string"] == "InstrumentationKey=x" and call["logger_name"] == "loyaltysync"
    disabled = {name for name, options in call["instrumentation_options"].items() if not options["enabled"]}
    assert disabled >= {"azure_sdk", "requests"}
    assert call["OTEL_LOGS_EXPORTER"] == "none", "the classic host already forwards log records"
    assert "OTEL_LOGS_EXPORTER" not in os.environ
    assert telemetry.current().redactor.key(CARD) == telemetry.hash_key(CARD, SALT)


def test_azure_monitor_mode_samples_every_trace_and_redacts_before_the_exporter(
    fresh_setup: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    assert setup.configure(_settings(APPLICATIONINSIGHTS_CONNECTION_STRING="InstrumentationKey=x")) == "azure-monitor"
    (call,) = fresh_setup
    assert call["sampling_ratio"] == 1.0, "the distro's default is 5 traces a second"
    assert {name for name, o in call["instrumentation_options"].items() if not o["enabled"]} == set(
        setup.DISTRO_INSTRUMENTATIONS
    )
    assert [type(p) for p in call["span_processors"]] == [RedactingSpanProcessor]
    assert [type(p) for p in call["log_record_processors"]] == [RedactingLogRecordProcessor]
    assert "credential" in call and call["credential"] is None, "no Entra ID asked for: the connection string only"


def test_an_explicit_sampler_setting_is_left_to_the_distro(
    fresh_setup: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The distro reads OTEL_TRACES_SAMPLER itself, but a sampling_ratio argument would override it.
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "microsoft.rate_limited")
    setup.configure(_settings(APPLICATIONINSIGHTS_CONNECTION_STRING="InstrumentationKey=x"))
    (call,) = fresh_setup
    assert "sampling_ratio" not in call


def test_every_instrumentation_the_installed_distro_knows_is_switched_off() -> None:
    from azure.monitor.opentelemetry._constants import _ALL_SUPPORTED_INSTRUMENTED_LIBRARIES

    assert set(_ALL_SUPPORTED_INSTRUMENTED_LIBRARIES) <= set(setup.DISTRO_INSTRUMENTATIONS)


def test_entra_ingestion_uses_a_managed_identity_or_the_apps_own_credential(
    fresh_setup: list[dict[str, Any]],
) -> None:
    from azure.identity import AzureCliCredential, ManagedIdentityCredential

    connection = {"APPLICATIONINSIGHTS_CONNECTION_STRING": "InstrumentationKey=x"}
    assert setup.ingestion_credential(_settings(**connection)) is None
    user_assigned = setup.ingestion_credential(
        _settings(**connection, APPLICATIONINSIGHTS_AUTHENTICATION_STRING="Authorization=AAD;ClientId=1234-abcd")
    )
    assert isinstance(user_assigned, ManagedIdentityCredential)
    system_assigned = setup.ingestion_credential(
        _settings(**connection, APPLICATIONINSIGHTS_AUTHENTICATION_STRING="Authorization=AAD",
                  LOYALTYSYNC_CREDENTIAL="managed-identity")
    )
    assert isinstance(system_assigned, ManagedIdentityCredential)
    developer = setup.ingestion_credential(
        _settings(
            **connection, APPLICATIONINSIGHTS_AUTHENTICATION_STRING="Authorization=AAD", LOYALTYSYNC_CREDENTIAL="cli"
        )
    )
    assert isinstance(developer, AzureCliCredential)
    setup.configure(
        _settings(**connection, APPLICATIONINSIGHTS_AUTHENTICATION_STRING="ClientId=1234-abcd;Authorization=AAD")
    )
    (call,) = fresh_setup
    assert isinstance(call["credential"], ManagedIdentityCredential)


def test_spans_from_any_instrumentation_lose_keys_in_urls_and_names_as_they_start() -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans := InMemorySpanExporter()))
    provider.add_span_processor(RedactingSpanProcessor())  # after the exporter: it acts as the span starts
    tracer = provider.get_tracer("some.instrumentation")
    previous = telemetry.install(_recorder().recorder)
    try:
        url = f"https://contoso.operations.dynamics.com/data/RetailLoyaltyCards(CardNumber='{CARD}')?cross-company=true"
        query = "$filter=PartyNumber eq 'P-0042'&$top=5"
        with telemetry.personal_values(CARD, "P-0042"):
            with tracer.start_as_current_span(
                f"GET {url}",
                attributes={"http.url": url, "url.query": query, "url.path": f"/cards('{CARD}')", "note": f"{CARD}!"},
            ):
                pass
        with tracer.start_as_current_span("table", attributes={"url.full": f"https://st/t(PartitionKey='x',RowKey='{CARD}')"}):
            pass
    finally:
        telemetry.install(previous)
    first, second = spans.get_finished_spans()
    shaped = "https://contoso.operations.dynamics.com/data/RetailLoyaltyCards(…)?cross-company=…"
    assert first.name == f"GET {shaped}"
    assert dict(first.attributes or {}) == {
        "http.url": shaped,
        "url.query": "$filter=…&$top=…",
        "url.path": "/cards(…)",
        "note": f"{telemetry.hash_key(CARD, SALT)}!",
    }
    assert dict(second.attributes or {}) == {"url.full": "https://st/t(…)"}, "outside a change: shaped all the same"


def test_urls_in_text_are_shaped_and_a_masked_secret_stays_visibly_masked() -> None:
    redactor = telemetry.KeyRedactor(salt=SALT)
    line = (
        "HTTP Request: POST http://h/api/dataverse/loyalty-cards?code=***&x=1 \"HTTP/1.1 202\" then "
        f"GET https://dv/api/data/v9.2/msdyn_loyaltycards(msdyn_cardnumber='{CARD}')?$filter=a eq 'b' \"HTTP/1.1 200\""
    )
    assert redactor.urls_in(line) == (
        "HTTP Request: POST http://h/api/dataverse/loyalty-cards?code=***&x=… \"HTTP/1.1 202\" then "
        "GET https://dv/api/data/v9.2/msdyn_loyaltycards(…)?$filter=… \"HTTP/1.1 200\""
    )
    assert telemetry.KeyRedactor(enabled=False).urls_in(line) == line


def test_log_records_lose_urls_keys_and_filters_before_the_exporter() -> None:
    from opentelemetry.instrumentation.logging.handler import LoggingHandler
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor

    provider = LoggerProvider()
    provider.add_log_record_processor(RedactingLogRecordProcessor())
    provider.add_log_record_processor(SimpleLogRecordProcessor(exported := InMemoryLogRecordExporter()))
    logger = logging.getLogger("loyaltysync.test.export")
    handler = LoggingHandler(logger_provider=provider)
    logger.addHandler(handler)
    previous = telemetry.install(_recorder().recorder)
    try:
        with telemetry.personal_values(CARD):
            logger.warning("card %s refused", CARD, extra={"detail": f"https://x/cards('{CARD}')?$filter=a eq 'b'"})
        logger.warning("lookup failed: https://dv/api/data/v9.2/contacts?$filter=msdyn_partynumber eq 'P-0042'")
    finally:
        telemetry.install(previous)
        logger.removeHandler(handler)
    first, second = (r.log_record for r in exported.get_finished_logs())
    assert first.body == f"card {telemetry.hash_key(CARD, SALT)} refused"
    assert dict(first.attributes or {})["detail"] == "https://x/cards(…)?$filter=…"
    assert second.body == "lookup failed: https://dv/api/data/v9.2/contacts?$filter=…", "no change known: still shaped"


def test_party_numbers_an_event_carries_are_scrubbed_from_log_text_too(caplog: pytest.LogCaptureFixture) -> None:
    install_log_filter()
    found = _recorder()
    previous = telemetry.install(found.recorder)
    event = ChangeEvent(
        template="loyalty-cards",
        side="dataverse",
        operation="update",
        key={"CardNumber": CARD},
        fields={"PartyNumber": "P-0042", "CardTenderType": "Blocked"},
    )
    try:
        caplog.set_level(logging.INFO)
        with found.recorder.change_span(event, attempt=1):
            logging.getLogger("loyaltysync.sync").warning("F&O refused party %s of %s (%s)", "P-0042", CARD, "Blocked")
    finally:
        telemetry.install(previous)
    message = caplog.records[-1].getMessage()
    assert message == (
        f"F&O refused party {telemetry.hash_key('P-0042', SALT)} of {telemetry.hash_key(CARD, SALT)} (Blocked)"
    ), "personal values hashed, other values (an enum member) left readable"
