"""Where telemetry goes, decided once per process from the settings.

Exactly one of (docs/monitoring.md, azure-functions.md §7):

- `functions-worker`: `PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY=true`. The
  Python worker already called `configure_azure_monitor()`; configuring again
  would duplicate every span and log, so we only record into its providers.
- `azure-monitor`: `APPLICATIONINSIGHTS_CONNECTION_STRING` set. We call
  `configure_azure_monitor()` (traces, metrics, and logs of the
  `PYTHON_APPLICATIONINSIGHTS_LOGGER_NAME` logger). Under a Functions host in
  its classic telemetry mode the host already forwards `logging` records, so
  our log export is switched off there (`OTEL_LOGS_EXPORTER=none` for the call).
- `console`: `TELEMETRY_CONSOLE=true`: the same spans and metrics printed.
- `off`: none of these; spans and metrics go to OpenTelemetry's no-op API.

With personal-data redaction on, the distro's Azure SDK and `requests`/`urllib`
instrumentations are left off: their dependency URLs would show storage
RowKeys, i.e. card numbers. Our own CLIENT spans cover F&O and Dataverse.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Literal

from loyaltysync.settings import Settings
from loyaltysync.telemetry.recorder import Recorder, install
from loyaltysync.telemetry.redaction import SDK_HTTP_LOGGER, KeyRedactor, install_log_filter

log = logging.getLogger("loyaltysync.telemetry")

Mode = Literal["functions-worker", "azure-monitor", "console", "off"]
SERVICE_NAME = "loyaltysync"
# Distro instrumentations whose spans carry storage URLs (PartitionKey/RowKey = natural keys).
URL_LEAKING_INSTRUMENTATIONS = ("azure_sdk", "requests", "urllib", "urllib3")
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
    elif mode == "console":
        _console()
    redactor = KeyRedactor(enabled=settings.redact_personal_data, salt=settings.telemetry_hash_salt or "")
    install(Recorder(redactor=redactor))
    install_log_filter()
    if settings.redact_personal_data:
        # Its INFO lines show state-table URLs whose RowKeys are natural keys (in an encoding scrubbing can miss).
        sdk_logger = logging.getLogger(SDK_HTTP_LOGGER)
        sdk_logger.setLevel(max(sdk_logger.getEffectiveLevel(), logging.WARNING))
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

    options = (
        {name: {"enabled": False} for name in URL_LEAKING_INSTRUMENTATIONS} if settings.redact_personal_data else {}
    )
    # The Functions host (classic mode) forwards logging records itself: exporting them too doubles them.
    under_host = bool(os.environ.get("FUNCTIONS_WORKER_RUNTIME"))
    logs = _env_default("OTEL_LOGS_EXPORTER", "none") if under_host else contextlib.nullcontext()
    with logs:
        configure_azure_monitor(
            connection_string=settings.appinsights_connection_string,
            logger_name=settings.telemetry_logger_name,
            instrumentation_options=options,
            resource=Resource.create({"service.name": SERVICE_NAME}),
        )


def _console() -> None:
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

    resource = Resource.create({"service.name": SERVICE_NAME})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(tracer_provider)
    reader = PeriodicExportingMetricReader(ConsoleMetricExporter(), export_interval_millis=CONSOLE_METRICS_INTERVAL_MS)
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[reader]))
