"""Where telemetry goes, decided once per process from the settings.

Exactly one of (docs/monitoring.md, azure-functions.md §7):

- `functions-worker`: `PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY=true`. The
  Python worker already called `configure_azure_monitor()`; configuring again
  would duplicate every span and log, so we record into its providers (after
  undoing its URL-recording instrumentations and adding the span redactor).
- `azure-monitor`: `APPLICATIONINSIGHTS_CONNECTION_STRING` set. We call
  `configure_azure_monitor()` (traces, metrics, and logs of the
  `PYTHON_APPLICATIONINSIGHTS_LOGGER_NAME` logger). Under a Functions host in
  its classic telemetry mode the host already forwards `logging` records, so
  our log export is switched off there (`OTEL_LOGS_EXPORTER=none` for the call).
- `console`: `TELEMETRY_CONSOLE=true`: the same spans and metrics printed.
- `off`: none of these; spans and metrics go to OpenTelemetry's no-op API.

The distro's own instrumentations are all left off: the F&O and Dataverse
calls are our own CLIENT spans with shaped URLs (httpx's would duplicate them
with the key in the URL), and azure-core's storage spans show table RowKeys,
i.e. card numbers, in `http.url`, which it sets as the span ends, beyond any
processor's reach. Next to the Functions worker (which switches them on by
default) the URL-recording ones are switched off again when redacting. Every
span still passes the redacting span processor, every log record the redacting
log processor (our own set-up) or the log filter on the exporting handlers
(processors.py, redaction.py).

Traces are kept whole: `sampling_ratio=1.0` unless `OTEL_TRACES_SAMPLER` says
otherwise (the distro's default is 5 traces a second, which undercounts).
`APPLICATIONINSIGHTS_AUTHENTICATION_STRING=Authorization=AAD[;ClientId=<id>]`
makes every exporter authenticate with Microsoft Entra ID (`ingestion_credential`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

from loyaltysync.errors import ConfigError
from loyaltysync.settings import Settings
from loyaltysync.telemetry.processors import RedactingLogRecordProcessor, RedactingSpanProcessor
from loyaltysync.telemetry.recorder import Recorder, install
from loyaltysync.telemetry.redaction import (
    SDK_HTTP_LOGGER,
    KeyRedactor,
    install_handler_filter,
    install_log_filter,
)

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential

log = logging.getLogger("loyaltysync.telemetry")

Mode = Literal["functions-worker", "azure-monitor", "console", "off"]
SERVICE_NAME = "loyaltysync"
# Every instrumentation azure-monitor-opentelemetry 1.8 can switch on (its _ALL_SUPPORTED_INSTRUMENTED_LIBRARIES).
DISTRO_INSTRUMENTATIONS = (
    "azure_sdk", "django", "fastapi", "flask", "httpx", "httpx2", "psycopg2", "requests", "urllib", "urllib3",
)
# Those that record outgoing calls with their URLs (OData key predicates, storage RowKeys = natural keys).
URL_RECORDING_INSTRUMENTATIONS = ("azure_sdk", "httpx", "httpx2", "requests", "urllib", "urllib3")
# httpx logs every request URL at INFO; with keys in OData predicates.
HTTPX_LOGGER = "httpx"
SAMPLER_SETTING = "OTEL_TRACES_SAMPLER"
SAMPLING_RATIO = 1.0  # every trace: count() and sum(itemCount) agree, and no parked change loses its spans
CONSOLE_METRICS_INTERVAL_MS = 60_000

_mode: Mode | None = None


def choose_mode(settings: Settings) -> Mode:
    """The telemetry mode the settings ask for (see the module docstring)."""
    if settings.worker_telemetry:
        return "functions-worker"
    if settings.appinsights_connection_string:
        return "azure-monitor"
    if settings.telemetry_console:
        return "console"
    return "off"


def configure(settings: Settings) -> Mode:
    """Set up exporters (once per process; later calls return the first mode) and the recorder."""
    global _mode
    if _mode is not None:
        return _mode
    mode = choose_mode(settings)
    if mode == "azure-monitor":
        _azure_monitor(settings)
    elif mode == "functions-worker":
        _join_worker(settings)
    elif mode == "console":
        _console(settings)
    redactor = KeyRedactor(enabled=settings.redact_personal_data, salt=settings.telemetry_hash_salt or "")
    install(Recorder(redactor=redactor))
    install_log_filter()
    if settings.redact_personal_data and mode in ("azure-monitor", "functions-worker"):
        # The exporting handler (on the telemetry logger) and the worker's (on the root, forwarding to the host)
        # then rewrite records of every logger, child loggers without their own filter too.
        install_handler_filter(("", settings.telemetry_logger_name))
    if settings.redact_personal_data:
        # Their INFO lines show request URLs: state-table RowKeys and OData key predicates are natural keys.
        for name in (SDK_HTTP_LOGGER, HTTPX_LOGGER):
            chatty = logging.getLogger(name)
            chatty.setLevel(max(chatty.getEffectiveLevel(), logging.WARNING))
    if settings.redact_personal_data and not settings.telemetry_hash_salt and mode != "off":
        log.warning(
            "TELEMETRY_HASH_SALT is not set: hashed card and party numbers can be recovered by guessing; "
            "set a per-deployment secret salt"
        )
    _mode = mode
    return mode


@contextlib.contextmanager
def _env_default(name: str, value: str) -> Iterator[None]:
    """`name=value` in the environment for the duration, unless already set."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def _azure_monitor(settings: Settings) -> None:
    from azure.monitor.opentelemetry import configure_azure_monitor
    from opentelemetry.sdk.resources import Resource

    options: dict[str, Any] = {
        "connection_string": settings.appinsights_connection_string,
        # Always given, None included: the exporter then does not parse the environment a second time.
        "credential": ingestion_credential(settings),
        "logger_name": settings.telemetry_logger_name,
        "instrumentation_options": {name: {"enabled": False} for name in DISTRO_INSTRUMENTATIONS},
        "resource": Resource.create({"service.name": SERVICE_NAME}),
        # Run before the distro's exporting processors, on every span and log record.
        "span_processors": [RedactingSpanProcessor()],
        "log_record_processors": [RedactingLogRecordProcessor()],
        # A warning such as `parked ...` is kept even when its trace is sampled out (the distro's default, stated).
        "enable_trace_based_sampling_for_logs": False,
    }
    if not os.environ.get(SAMPLER_SETTING):
        # The distro's sampling_ratio would override an explicit OTEL_TRACES_SAMPLER: only set it without one.
        options["sampling_ratio"] = SAMPLING_RATIO
    # The Functions host (classic mode) forwards logging records itself: exporting them too doubles them.
    under_host = bool(os.environ.get("FUNCTIONS_WORKER_RUNTIME"))
    logs = _env_default("OTEL_LOGS_EXPORTER", "none") if under_host else contextlib.nullcontext()
    with logs:
        configure_azure_monitor(**options)


def _join_worker(settings: Settings) -> None:
    """Next to the worker's distro: URL-recording instrumentations off again, spans redacted as they start."""
    from opentelemetry import trace

    if not settings.redact_personal_data:
        return
    switch_off_url_instrumentations()
    provider = trace.get_tracer_provider()
    add = getattr(provider, "add_span_processor", None)
    if callable(add):
        # Appended after the worker's exporter; it rewrites spans as they start, so its place does not matter.
        add(RedactingSpanProcessor())


def switch_off_url_instrumentations() -> list[str]:
    """Undo the instrumentations that record URLs, wherever they were switched on. Returns those undone."""
    from opentelemetry.util._importlib_metadata import entry_points

    undone: list[str] = []
    for entry_point in entry_points(group="opentelemetry_instrumentor"):
        if entry_point.name not in URL_RECORDING_INSTRUMENTATIONS:
            continue
        try:
            instrumentor = entry_point.load()()  # instrumentors are singletons: this is the one in use
        except ImportError:  # its library is not installed: it was never switched on
            continue
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()
            undone.append(entry_point.name)
    from azure.core.settings import settings as azure_core_settings

    if azure_core_settings.tracing_implementation() is not None or azure_core_settings.tracing_enabled():
        undone.append("azure_sdk")
    # The distro's azure_sdk instrumentation is azure-core's tracing plug-in; native tracing has its own switch.
    azure_core_settings.tracing_implementation.unset_value()
    azure_core_settings.tracing_enabled = False
    return undone


def _authentication_options(value: str | None) -> dict[str, str]:
    """`Authorization=AAD;ClientId=<id>` as lower-case keys and their values (empty parts ignored)."""
    options: dict[str, str] = {}
    for part in (value or "").split(";"):
        name, _, given = part.partition("=")
        if name:
            options[name.lower()] = given
    return options


def ingestion_credential(settings: Settings) -> TokenCredential | None:
    """The credential the exporters authenticate with, or None when ingestion uses the connection string only.

    As the Functions host and the exporter read APPLICATIONINSIGHTS_AUTHENTICATION_STRING:
    `Authorization=AAD` asks for Microsoft Entra ID, `ClientId=<id>` names a user-assigned
    managed identity. Without a client id the app's own credential kind is used
    (LOYALTYSYNC_CREDENTIAL: the system-assigned identity in Azure, the developer's sign-in locally).
    """
    options = _authentication_options(settings.appinsights_authentication_string)
    if options.get("authorization") != "AAD":
        return None
    from azure.identity import (
        AzureCliCredential,
        ClientSecretCredential,
        DefaultAzureCredential,
        ManagedIdentityCredential,
    )

    client_id = options.get("clientid") or None
    if client_id:
        return ManagedIdentityCredential(client_id=client_id)
    if settings.credential == "managed-identity":
        return ManagedIdentityCredential(client_id=settings.client_id)  # None: the system-assigned identity
    if settings.credential == "client-secret":
        if not (settings.tenant_id and settings.client_id and settings.client_secret):
            raise ConfigError(
                "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
                "Entra ID ingestion with LOYALTYSYNC_CREDENTIAL=client-secret needs AZURE_TENANT_ID, "
                "AZURE_CLIENT_ID and AZURE_CLIENT_SECRET",
            )
        return ClientSecretCredential(settings.tenant_id, settings.client_id, settings.client_secret)
    if settings.credential == "cli":
        return AzureCliCredential(tenant_id=settings.tenant_id) if settings.tenant_id else AzureCliCredential()
    return DefaultAzureCredential()


def _console(settings: Settings) -> None:
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

    resource = Resource.create({"service.name": SERVICE_NAME})
    tracer_provider = TracerProvider(resource=resource)
    if settings.redact_personal_data:
        tracer_provider.add_span_processor(RedactingSpanProcessor())
    tracer_provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(tracer_provider)
    reader = PeriodicExportingMetricReader(ConsoleMetricExporter(), export_interval_millis=CONSOLE_METRICS_INTERVAL_MS)
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[reader]))
