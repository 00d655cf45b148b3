"""Telemetry: OpenTelemetry spans, metrics and structured logs for Application Insights.

- `setup`: where telemetry goes (Azure Monitor, the Functions worker's own
  configuration, the console, or nowhere), decided once per process.
- `recorder`: the spans of one change's journey (inbound -> queue -> sync ->
  target calls, one trace) and the metrics per template and direction.
- `metrics`: the instruments and the queue-backlog gauges.
- `redaction`: natural keys (card and party numbers) hashed in telemetry.
- `processors`: every span and log record redacted before an exporter sees it.
- `wiring`: the recorder hooked to a running app's HTTP clients and queues.

docs/monitoring.md lists every span, metric and dimension with KQL queries.
"""

from loyaltysync.telemetry.recorder import Recorder, correlation_id, current, direction, install
from loyaltysync.telemetry.redaction import KeyRedactor, hash_key, personal_values, scrub
from loyaltysync.telemetry.setup import Mode, choose_mode, configure
from loyaltysync.telemetry.wiring import instrument_runtime, refresh_backlog

__all__ = [
    "KeyRedactor",
    "Mode",
    "Recorder",
    "choose_mode",
    "configure",
    "correlation_id",
    "current",
    "direction",
    "hash_key",
    "install",
    "instrument_runtime",
    "personal_values",
    "refresh_backlog",
    "scrub",
]
