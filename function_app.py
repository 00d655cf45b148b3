"""Azure Functions entry point (Python v2 model). A thin adapter: no sync logic lives here.

For every template in mappings/ (a new file adds functions, no code change):
  POST /api/fo/<template>         fo_<template>          F&O data / business events, Event Grid
  POST /api/dataverse/<template>  dataverse_<template>   Dataverse webhooks
  queue <prefix>-<template>       worker_<template>      applies changes
  queue <prefix>-<template>-poison poison_<template>     parks what the queue gave up on
plus the reconciler timer and the admin endpoints under /api/ops/ (admin key).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import List  # noqa: UP035  (the queue output converter accepts typing.List only)

import azure.functions as func

from loyaltysync import inbound, operations, preflight, telemetry, worker
from loyaltysync.events import parse_service_bus
from loyaltysync.reconcile import reconcile_all
from loyaltysync.runtime import Runtime, get_runtime
from loyaltysync.settings import load_local_settings, load_settings
from loyaltysync.templates import SIDES, Side, Template, function_safe, load_templates
from loyaltysync.worker import max_dequeue_count

load_local_settings()  # no-op under the Functions host, which already exported them
SETTINGS = load_settings()
TEMPLATES = load_templates(SETTINGS.mappings_dir)
MAX_DEQUEUE = max_dequeue_count()
log = logging.getLogger("loyaltysync")
TELEMETRY = telemetry.configure(SETTINGS)  # once per process; never twice next to the worker's own (docs/monitoring.md)
log.info("telemetry: %s", TELEMETRY)
_background: set[asyncio.Task[object]] = set()
_prepared: Runtime | None = None  # the runtime whose first use started tracing and the preflight check

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)


async def _runtime() -> Runtime:
    """The process's runtime; on first use its target calls are traced and the preflight check starts.

    The check runs in the background (PREFLIGHT_ON_START): it only logs, and never delays an invocation.
    """
    global _prepared
    runtime = await get_runtime()
    if runtime is not _prepared:
        _prepared = runtime
        telemetry.instrument_runtime(runtime)
        if SETTINGS.preflight_on_start:
            task = asyncio.create_task(preflight.log_startup_check(runtime), name="preflight")
            _background.add(task)
            task.add_done_callback(_background.discard)
    return runtime


def _host_traceparent(context: func.Context | None) -> str | None:
    """The host's W3C trace context of this invocation, when it gives one."""
    trace_context = getattr(context, "trace_context", None)
    return getattr(trace_context, "trace_parent", None) or None


def _response(reply: inbound.Reply) -> func.HttpResponse:
    return func.HttpResponse(
        body=reply.body_bytes(), status_code=reply.status, headers=reply.headers, mimetype="application/json"
    )


def _json(status: int, body: object) -> func.HttpResponse:
    return func.HttpResponse(body=json.dumps(body, default=str), status_code=status, mimetype="application/json")


def _inbound_function(side: Side, template: Template):  # type: ignore[no-untyped-def]
    # The worker's indexing checks annotations through the library's converters: the queue output
    # accepts typing.List[str] (not list[str]), and an unbound `context` must be exactly func.Context.
    def handler(req: func.HttpRequest, out: func.Out[List[str]], context: func.Context) -> func.HttpResponse:  # noqa: UP006
        if req.method == "OPTIONS":
            return _response(inbound.handle_options(req.headers))
        reply = inbound.handle_inbound(
            side,
            template,
            TEMPLATES,
            req.get_body(),
            req.headers,
            max_body_bytes=SETTINGS.max_body_bytes,
            secret=SETTINGS.webhook_secret,
            secret_header=SETTINGS.webhook_secret_header,
            host_traceparent=_host_traceparent(context),
        )
        if reply.messages:
            out.set(reply.messages)
        return _response(reply)

    return handler


def _worker_function(template: Template):  # type: ignore[no-untyped-def]
    async def handler(msg: func.QueueMessage, context: func.Context) -> None:
        runtime = await _runtime()
        await worker.handle_change(
            runtime,
            msg.get_body().decode("utf-8"),
            dequeue_count=msg.dequeue_count or 1,
            max_dequeue=MAX_DEQUEUE,
            host_traceparent=_host_traceparent(context),
        )

    return handler


def _poison_function(template: Template):  # type: ignore[no-untyped-def]
    async def handler(msg: func.QueueMessage) -> None:
        await worker.drain_poison(
            await _runtime(), msg.get_body().decode("utf-8"), dequeue_count=msg.dequeue_count or 1,
            max_dequeue=MAX_DEQUEUE,
        )

    return handler


for _template in TEMPLATES.values():
    _queue = SETTINGS.queue_name(_template.name)
    for _side in SIDES:
        _name = function_safe(f"{_side}_{_template.slug}")
        app.function_name(name=_name)(
            app.route(route=f"{_side}/{_template.name}", methods=["POST", "OPTIONS"])(
                app.queue_output(arg_name="out", queue_name=_queue, connection="AzureWebJobsStorage")(
                    _inbound_function(_side, _template)
                )
            )
        )
    app.function_name(name=function_safe(f"worker_{_template.slug}"))(
        app.queue_trigger(arg_name="msg", queue_name=_queue, connection="AzureWebJobsStorage")(
            _worker_function(_template)
        )
    )
    app.function_name(name=function_safe(f"poison_{_template.slug}"))(
        app.queue_trigger(arg_name="msg", queue_name=f"{_queue}-poison", connection="AzureWebJobsStorage")(
            _poison_function(_template)
        )
    )


@app.function_name(name="reconcile")
@app.timer_trigger(arg_name="timer", schedule=SETTINGS.reconcile_schedule, run_on_startup=False, use_monitor=True)
async def reconcile_timer(timer: func.TimerRequest) -> None:
    """Find records whose two sides differ (missed events, outages, drift) and queue them."""
    reports = await reconcile_all(await _runtime(), full=False)
    for report in reports:
        log.info("reconcile %s", report.summary())


@app.function_name(name="monitor")
@app.timer_trigger(arg_name="timer", schedule=SETTINGS.monitor_schedule, run_on_startup=False, use_monitor=False)
async def monitor_timer(timer: func.TimerRequest) -> None:
    """Queue backlog, oldest age, poison and dead letters per template, for the gauges and alerts."""
    await telemetry.refresh_backlog(await _runtime())


@app.function_name(name="ops_health")
@app.route(route="ops/health", methods=["GET"], auth_level=func.AuthLevel.ADMIN)
async def ops_health(req: func.HttpRequest) -> func.HttpResponse:
    ok, detail = await operations.health(await _runtime())
    return _json(200 if ok else 503, {"ok": ok, **detail})


@app.function_name(name="ops_status")
@app.route(route="ops/status", methods=["GET"], auth_level=func.AuthLevel.ADMIN)
async def ops_status(req: func.HttpRequest) -> func.HttpResponse:
    return _json(200, await operations.status(await _runtime()))


@app.function_name(name="ops_pause")
@app.route(route="ops/pause/{template}", methods=["POST"], auth_level=func.AuthLevel.ADMIN)
async def ops_pause(req: func.HttpRequest) -> func.HttpResponse:
    return await _set_paused(req, True)


@app.function_name(name="ops_resume")
@app.route(route="ops/resume/{template}", methods=["POST"], auth_level=func.AuthLevel.ADMIN)
async def ops_resume(req: func.HttpRequest) -> func.HttpResponse:
    return await _set_paused(req, False)


async def _set_paused(req: func.HttpRequest, paused: bool) -> func.HttpResponse:
    name = req.route_params.get("template", "")
    if name not in TEMPLATES:
        return _json(404, {"error": f"no template named {name!r}", "templates": sorted(TEMPLATES)})
    await (await _runtime()).set_paused(name, paused, req.params.get("reason", ""))
    return _json(200, {"template": name, "paused": paused})


@app.function_name(name="ops_replay")
@app.route(route="ops/replay", methods=["POST"], auth_level=func.AuthLevel.ADMIN)
async def ops_replay(req: func.HttpRequest) -> func.HttpResponse:
    template = req.params.get("template") or None
    if template is not None and template not in TEMPLATES:
        return _json(404, {"error": f"no template named {template!r}"})
    count = await worker.replay(await _runtime(), template=template, key=req.params.get("key") or None)
    return _json(200, {"replayed": count})


if SETTINGS.servicebus_queue:

    @app.function_name(name="fo_servicebus")
    @app.service_bus_queue_trigger(arg_name="msg", queue_name=SETTINGS.servicebus_queue, connection="SERVICEBUS")
    async def fo_servicebus(msg: func.ServiceBusMessage) -> None:
        """F&O business events through a Service Bus queue endpoint (redelivered, then dead-lettered)."""
        runtime = await _runtime()
        recorder = telemetry.current()
        with recorder.inbound_span("fo", None):
            parsed = parse_service_bus(msg.get_body(), dict(msg.application_properties or {}), templates=TEMPLATES)
            for event in parsed.events:
                await runtime.enqueue(event.template, recorder.stamp(event).to_json())


if SETTINGS.eventgrid_enabled:

    @app.function_name(name="fo_eventgrid")
    @app.event_grid_trigger(arg_name="event")
    async def fo_eventgrid(event: func.EventGridEvent) -> None:
        """F&O business events through an Event Grid subscription (the extension does the handshake).

        Another publisher's event on the topic is logged and counted as skipped, and the invocation
        succeeds: raising would only make Event Grid retry, then dead-letter, an event that is not ours.
        """
        body = json.dumps(
            [
                {
                    "id": event.id,
                    "eventType": event.event_type,
                    "subject": event.subject,
                    "data": event.get_json(),
                    "dataVersion": event.data_version,
                    "eventTime": str(event.event_time),
                    "topic": event.topic,
                }
            ]
        ).encode()
        reply = inbound.handle_inbound(
            "fo", None, TEMPLATES, body, {"content-type": "application/json"}, max_body_bytes=SETTINGS.max_body_bytes
        )
        if reply.status >= 400:
            raise ValueError(f"Event Grid event {event.id} refused: {reply.body}")
        if not reply.messages:
            return  # not an F&O event: handle_inbound logged and counted it
        runtime = await _runtime()
        for message in reply.messages:
            await runtime.enqueue(json.loads(message)["template"], message)
