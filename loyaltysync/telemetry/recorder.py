"""Spans and metrics of one change's journey: inbound request -> queue -> sync step -> target calls.

One trace per change. The inbound span (a child of the Functions host's
request when the host passes its trace context) opens one PRODUCER span per
event it queues and writes that span's W3C `traceparent` into the
`ChangeEvent`; the worker's CONSUMER span continues it as parent, and every
F&O / Dataverse request attempt of the step is a CLIENT span under it. So
Application Insights shows the whole journey as one end-to-end transaction,
with the event's correlation id (Dataverse `CorrelationId`, F&O `EventId`) on
every span.

Attribute and dimension names are the same on spans, log records and metrics
(`template`, `direction`, `natural_key`, `decision`, ...) so one KQL
vocabulary serves all tables. Natural keys go through the `KeyRedactor`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from loyaltysync.telemetry.metrics import BacklogGauges, Instruments
from loyaltysync.telemetry.redaction import PERSONAL_FIELDS, KeyRedactor, personal_values, scrub, set_active
from loyaltysync.templates import Side, other_side

if TYPE_CHECKING:
    from loyaltysync.events.model import ChangeEvent
    from loyaltysync.sync import Outcome
    from loyaltysync.targets.http import Attempt

SCOPE = "loyaltysync"
_W3C = TraceContextTextMapPropagator()
_API_ROOTS = ("/api/data/v9.2/", "/data/")
_MAX_STATUS_TEXT = 500
# Template and direction of the step in progress, for the target-call metrics (HTTP knows neither).
_scope: ContextVar[tuple[tuple[str, str], ...]] = ContextVar("loyaltysync_telemetry_scope", default=())
_attempt: ContextVar[int | None] = ContextVar("loyaltysync_telemetry_attempt", default=None)


def direction(side: Side) -> str:
    """`fo-to-dataverse` for a change that came from F&O, `dataverse-to-fo` the other way."""
    return f"{side}-to-{other_side(side)}"


def correlation_id(event: ChangeEvent) -> str | None:
    """The id the source system correlates the change by: Dataverse `CorrelationId`, F&O `EventId`."""
    if event.correlation_id:
        return event.correlation_id
    return event.event_id if event.side == "fo" else None


def personal_data(event: ChangeEvent) -> list[str]:
    """The values of `event` that identify a person: its key, and card or party numbers it carries."""
    values = list(event.key.values())
    values += [str(v) for name, v in event.fields.items() if name in PERSONAL_FIELDS and isinstance(v, str)]
    return values


def _context_of(traceparent: str | None) -> Context | None:
    """The remote parent a W3C `traceparent` names, None when absent or malformed."""
    if not traceparent:
        return None
    context = _W3C.extract({"traceparent": traceparent})
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def _ms_since(moment: str | None, now: datetime) -> float | None:
    if not moment:
        return None
    try:
        then = datetime.fromisoformat(moment.replace("Z", "+00:00"))
    except ValueError:
        return None
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    return max(0.0, (now - then).total_seconds() * 1000)


def _api_path(path: str) -> str:
    for root in _API_ROOTS:
        index = path.find(root)
        if index >= 0:
            return path[index + len(root) :]
    return path.lstrip("/")


class Recorder:
    """Records the app's spans and metrics through one tracer and one meter."""

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        redactor: KeyRedactor | None = None,
    ) -> None:
        self.tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer(SCOPE)
        meter = (meter_provider or metrics.get_meter_provider()).get_meter(SCOPE)
        self.instruments = Instruments.create(meter)
        self.backlog = BacklogGauges(meter)
        self.redactor = redactor or KeyRedactor()

    # ------------------------------------------------------------ dimensions

    def dimensions(self, event: ChangeEvent) -> dict[str, str]:
        """Metric dimensions of an event: template and direction (never the key)."""
        return {"template": event.template, "direction": direction(event.side)}

    def log_extra(self, event: ChangeEvent, **more: Any) -> dict[str, Any]:
        """`extra=` for a log call about `event`: structured dimensions, key redacted."""
        extra: dict[str, Any] = {
            **self.dimensions(event),
            "natural_key": self.redactor.key(event.key_text or event.row_id or None),
            "event_id": event.event_id,
            "correlation_id": correlation_id(event),
        }
        if _attempt.get() is not None:
            extra["attempt"] = _attempt.get()
        extra.update(more)
        return extra

    def _event_attributes(self, event: ChangeEvent) -> dict[str, Any]:
        attributes = {k: v for k, v in self.log_extra(event).items() if v is not None}
        attributes["wire_format"] = event.wire_format
        attributes["operation"] = event.operation
        return attributes

    # ------------------------------------------------------------ inbound

    @contextlib.contextmanager
    def inbound_span(self, side: Side, template: str | None, *, host_traceparent: str | None = None) -> Iterator[Span]:
        """The span of one webhook delivery; a child of the host's request span when it gives one."""
        parent = _context_of(host_traceparent)
        kind = SpanKind.INTERNAL if parent is not None else SpanKind.SERVER
        name = f"inbound {side}/{template or '(by payload)'}"
        attributes = {
            "side": side,
            "template": template or "(by payload)",
            "direction": direction(side),
            # HTTP attributes make Application Insights show it as `POST /api/<side>/<template>` with a result code.
            "http.request.method": "POST",
            "http.route": f"/api/{side}/{template}" if template else f"/api/{side}",
        }
        with self.tracer.start_as_current_span(name, context=parent, kind=kind, attributes=attributes) as span:
            yield span

    def answered(self, side: Side, template: str | None, status: int, reason: str | None = None) -> None:
        """The inbound answer: on the current span, and counted as refused when 4xx/5xx."""
        span = trace.get_current_span()
        span.set_attribute("http.response.status_code", status)
        # Under the host the span is INTERNAL, a dependency whose resultCode stays "0" and whose `http.*`
        # attributes the exporter drops: `status` is the answer the queries read (customDimensions.status).
        span.set_attribute("status", status)
        if status >= 400:
            span.set_attribute("refusal", (reason or "")[:_MAX_STATUS_TEXT])
            self.instruments.refused.add(
                1, {"side": side, "template": template or "(by payload)", "status": str(status)}
            )

    def foreign_event(self, side: Side, event_type: str) -> None:
        """Count an event of a delivery that was not F&O's and was skipped (by its publisher's event type)."""
        self.instruments.foreign.add(1, {"side": side, "event_type": event_type[:120]})

    def stamp(self, event: ChangeEvent) -> ChangeEvent:
        """Open and close the PRODUCER span of queuing `event`; put its trace context into the event.

        Also counts the event as received. Returns the same event.
        """
        with personal_values(*personal_data(event)):
            with self.tracer.start_as_current_span(
                f"enqueue {event.template}", kind=SpanKind.PRODUCER, attributes=self._event_attributes(event)
            ):
                carrier: dict[str, str] = {}
                _W3C.inject(carrier)
                event.traceparent = carrier.get("traceparent")
        self.instruments.received.add(1, {**self.dimensions(event), "wire_format": event.wire_format})
        return event

    # ------------------------------------------------------------ worker

    @contextlib.contextmanager
    def change_span(
        self, event: ChangeEvent, *, attempt: int, host_traceparent: str | None = None
    ) -> Iterator[Span]:
        """The CONSUMER span of one sync step, continuing the trace the event carries.

        The host's invocation span (if any) is linked, not the parent: the parent is the
        inbound request, so the change reads as one transaction. Inside, log text has the
        event's key values scrubbed, and target calls are attributed to its template.
        An exception leaving the block is recorded (scrubbed) and re-raised.
        """
        host = _context_of(host_traceparent)
        links = [Link(trace.get_current_span(host).get_span_context())] if host is not None else []
        attributes = {**self._event_attributes(event), "attempt": attempt}
        scope = _scope.set(tuple(self.dimensions(event).items()))
        attempt_token = _attempt.set(attempt)
        try:
            with personal_values(*personal_data(event)):
                with self.tracer.start_as_current_span(
                    f"sync {event.template}",
                    context=_context_of(event.traceparent),
                    kind=SpanKind.CONSUMER,
                    links=links,
                    attributes=attributes,
                    record_exception=False,
                    set_status_on_exception=False,
                ) as span:
                    try:
                        yield span
                    except BaseException as exc:
                        self._exception(span, exc)
                        raise
        finally:
            _attempt.reset(attempt_token)
            _scope.reset(scope)

    def _exception(self, span: Span, exc: BaseException) -> None:
        message = scrub(str(exc))
        span.add_event("exception", {"exception.type": type(exc).__name__, "exception.message": message})
        span.set_status(Status(StatusCode.ERROR, message[:_MAX_STATUS_TEXT]))

    def outcome(self, event: ChangeEvent, outcome: Outcome) -> None:
        """A finished step: decision on the span; applied or skipped, conflicts and latencies as metrics."""
        span = trace.get_current_span()
        dims = self.dimensions(event)
        span.set_attributes(
            {
                "decision": outcome.reason,
                "applied": outcome.applied,
                "writes.fo": ",".join(outcome.writes.get("fo", [])),
                "writes.dataverse": ",".join(outcome.writes.get("dataverse", [])),
                "conflicts": len(outcome.conflicts),
                "duration_ms": round(outcome.duration_ms, 1),
            }
        )
        if outcome.waiting is not None:
            span.set_attribute("waiting", outcome.waiting)  # the whole record waits for an interrupted step's events
        if outcome.applied:
            self.instruments.applied.add(1, {**dims, "decision": outcome.reason})
            now = datetime.now(UTC)
            for name, moment, histogram in (
                ("latency_from_receipt_ms", event.received_at, self.instruments.latency_from_receipt),
                ("latency_from_event_ms", event.modified_on, self.instruments.latency_from_event),
            ):
                elapsed = _ms_since(moment, now)
                if elapsed is not None:
                    histogram.record(elapsed, dims)
                    span.set_attribute(name, round(elapsed, 1))
        else:
            self.instruments.skipped.add(1, {**dims, "reason": outcome.reason})
        for conflict in outcome.conflicts:
            self.instruments.conflicts.add(
                1, {**dims, "field": str(conflict.get("field")), "winner": str(conflict.get("winner"))}
            )

    def parked(self, event: ChangeEvent, reason: str, code: str) -> str:
        """A dead letter: error status on the span, counted by error code. Returns the reason, scrubbed."""
        text = scrub(reason)
        span = trace.get_current_span()
        span.set_attributes({"decision": "parked", "error.code": code or "unknown"})
        span.set_status(Status(StatusCode.ERROR, text[:_MAX_STATUS_TEXT]))
        self.instruments.dead_lettered.add(1, {**self.dimensions(event), "code": code or "unknown"})
        return text

    def retrying(self, event: ChangeEvent, code: str) -> None:
        """A transient failure the queue will retry."""
        trace.get_current_span().set_attributes({"decision": "retry", "error.code": code or "unknown"})
        self.instruments.retried.add(1, {**self.dimensions(event), "code": code or "unknown"})

    def recheck(self, reason: str) -> None:
        """The change is the re-check of a deferral (its `wire_format` stays the change's own): why it waited."""
        trace.get_current_span().set_attributes({"recheck": True, "recheck.reason": reason[:_MAX_STATUS_TEXT]})

    def held(self, event: ChangeEvent) -> None:
        """An event put back because its template is paused."""
        trace.get_current_span().set_attribute("decision", "held")
        self.instruments.held.add(1, self.dimensions(event))

    # ------------------------------------------------------------ target calls

    def attempt(self, attempt: Attempt) -> None:
        """One F&O / Dataverse request attempt (a `TargetHttp` observer): a CLIENT span and request metrics."""
        end = time.time_ns()
        start = end - int(attempt.elapsed * 1_000_000_000)
        parts = urlsplit(attempt.url)
        shaped = KeyRedactor(enabled=True).url(attempt.url)
        name = f"{attempt.method} {attempt.target} {_api_path(urlsplit(shaped).path)}"
        status = attempt.status
        attributes: dict[str, Any] = {
            "http.request.method": attempt.method,
            "url.full": self.redactor.url(attempt.url),
            "server.address": parts.hostname or "",
            "target": attempt.target,
            "attempt": attempt.attempt,
            "throttled": attempt.throttled,
            **dict(_scope.get()),
        }
        if status:
            attributes["http.response.status_code"] = status
        if attempt.retry_after is not None:
            attributes["retry_after_s"] = attempt.retry_after
        span = self.tracer.start_span(name, kind=SpanKind.CLIENT, start_time=start, attributes=attributes)
        # 404 (no such row) and 412 (create-only found a row) are answers the engine acts on, not failures.
        if status == 0 or status == 429 or status >= 500 or (400 <= status < 500 and status not in (404, 412)):
            span.set_status(Status(StatusCode.ERROR, f"{attempt.target} answered {status or 'nothing'}"))
        span.end(end_time=end)
        dims = {"target": attempt.target, **dict(_scope.get())}
        self.instruments.target_requests.add(1, {**dims, "status": str(status)})
        if attempt.throttled:
            self.instruments.target_throttled.add(1, dims)


_current: Recorder | None = None


def current() -> Recorder:
    """The process's recorder (one on the global OpenTelemetry providers until `install` says otherwise)."""
    recorder = _current
    if recorder is None:
        recorder = Recorder()
        install(recorder)
    return recorder


def install(recorder: Recorder | None) -> Recorder | None:
    """Make `recorder` the process's recorder (None: a default one on first use); returns the previous one."""
    global _current
    previous, _current = _current, recorder
    set_active(recorder.redactor if recorder is not None else KeyRedactor())
    return previous
