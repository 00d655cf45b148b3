"""The last line of personal-data defence: every span and log record made safe before an exporter sees it.

The recorder's own spans already hash keys (recorder.py) and the log filter
scrubs log text (redaction.py). These two processors also hold for telemetry
that other code makes: a distro instrumentation someone switches on, the
Functions worker's own distro set-up, a library that logs a URL.

- `RedactingSpanProcessor` rewrites a span when it starts: URL attributes
  (`url.full`, `http.url`, `url.path`, `url.query`, `http.target`) lose their
  OData key predicates and query values (`cards(…)?$filter=…`), URLs inside
  the name likewise, and the personal values of the change in progress are
  hashed in the name and every string attribute. At the start is the only
  moment an SDK span can be changed, so it works wherever the processor sits
  in the pipeline; attributes an instrumentation adds when the span ends
  (azure-core does so for `http.url`) are out of its reach, which is why
  setup.py keeps those instrumentations off.
- `RedactingLogRecordProcessor` does the same to a log record's body and
  string attributes (`exception.message`, `exception.stacktrace`, extras).
  Run before the exporting processor (`configure_azure_monitor(
  log_record_processors=...)`), its changes are what gets exported.

Both follow the active `KeyRedactor`: with `REDACT_PERSONAL_DATA=false` they
change nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk._logs import LogRecordProcessor, ReadWriteLogRecord
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from loyaltysync.telemetry.redaction import active, scrub

# Attributes that hold a whole URL, or its path or query, in the old and the current HTTP conventions.
URL_ATTRIBUTES = frozenset({"url.full", "http.url", "url.original", "url.path", "http.target", "url.query"})


def redact_url(value: str, attribute: str = "url.full") -> str:
    """A URL, path or query string with key predicates and query values removed (when redacting)."""
    redactor = active()
    if not redactor.enabled or not value:
        return value
    if attribute == "url.query":
        return redactor.url("?" + value.lstrip("?")).lstrip("?")
    return redactor.url(value)


def redact_text(text: str) -> str:
    """Free text with URLs shaped and the current change's personal values hashed (when redacting)."""
    redactor = active()
    if not redactor.enabled or not text:
        return text
    return scrub(redactor.urls_in(text))


def redact_attribute(key: str, value: Any) -> Any:
    """An attribute value as telemetry may show it: URLs shaped, personal values hashed, non-strings as they are."""
    if isinstance(value, str):
        if key in URL_ATTRIBUTES:
            return scrub(redact_url(value, key))
        return redact_text(value)
    if isinstance(value, tuple | list) and all(isinstance(item, str) for item in value):
        return tuple(redact_text(item) for item in value)
    return value


def _changes(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    changed: dict[str, Any] = {}
    for key, value in (attributes or {}).items():
        clean = redact_attribute(key, value)
        if clean != value:
            changed[key] = clean
    return changed


class RedactingSpanProcessor(SpanProcessor):
    """Shapes URLs and hashes personal values in every span as it starts (see the module docstring)."""

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        if not active().enabled:
            return
        name = redact_text(span.name)
        if name != span.name:
            span.update_name(name)
        changed = _changes(span.attributes)
        if changed:
            span.set_attributes(changed)

    def on_end(self, span: ReadableSpan) -> None:
        return None

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


class RedactingLogRecordProcessor(LogRecordProcessor):
    """Shapes URLs and hashes personal values in every log record's body and string attributes."""

    def on_emit(self, log_record: ReadWriteLogRecord) -> None:
        if not active().enabled:
            return
        record = log_record.log_record
        if isinstance(record.body, str):
            record.body = redact_text(record.body)
        attributes = record.attributes
        if attributes is not None:
            for key, value in _changes(attributes).items():
                attributes[key] = value  # type: ignore[index]  # the SDK's attributes are mutable until exported

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True
