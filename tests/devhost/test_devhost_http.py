"""HTTP triggers through the dev host over real loopback HTTP: routes, methods, keys, conversion, outputs."""

from __future__ import annotations

import asyncio
import base64
import importlib
import io
import json
import logging
from collections.abc import Awaitable, Callable

import httpx
import pytest
from azure.storage.queue.aio import QueueClient

from devkit.devhost import DevHost

StartHost = Callable[..., Awaitable[DevHost]]

ROUTES_APP = """
import json
import threading
import azure.functions as func

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)

def echo(req):
    return func.HttpResponse(json.dumps({
        "method": req.method, "url": req.url, "route": dict(req.route_params), "params": dict(req.params),
        "body": req.get_body().decode(), "header": req.headers.get("x-test"),
    }), mimetype="application/json")

@app.route(route="hooks/{source}", methods=["POST"])
async def hook(req: func.HttpRequest) -> func.HttpResponse:
    return echo(req)

@app.route(route="items/{id:int}", methods=["GET"])
def item(req: func.HttpRequest) -> func.HttpResponse:
    return echo(req)

@app.route(route="items/new", methods=["GET"])
def new_item(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse("the literal route wins")

@app.route(route="files/{*path}")
def files(req: func.HttpRequest) -> func.HttpResponse:
    return echo(req)

@app.route()
def ping(req: func.HttpRequest) -> str:
    return "pong from " + ("main" if threading.current_thread() is threading.main_thread() else "a worker thread")

@app.function_name(name="with_context")
@app.route(route="ctx", methods=["GET"])
def ctx_function(req: func.HttpRequest, context: func.Context) -> func.HttpResponse:
    return func.HttpResponse(f"{context.function_name} {context.invocation_id}")

@app.route(route="custom", methods=["GET"])
def custom(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse(b"<p>hi</p>", status_code=201, headers={"X-Custom": "yes"}, mimetype="text/html",
                             charset="latin-1")

@app.route(route="boom", methods=["GET"])
async def boom(req: func.HttpRequest) -> func.HttpResponse:
    raise ValueError("kaboom in the function")

@app.route(route="nothing", methods=["GET"])
def nothing(req: func.HttpRequest) -> func.HttpResponse:
    return None
"""


async def test_routes_route_params_and_methods(write_app: Callable[[str], str], start_host: StartHost) -> None:
    host = await start_host(write_app(ROUTES_APP))
    async with httpx.AsyncClient(base_url=host.base_url) as client:
        response = await client.post("/api/hooks/d365?x=1&x=2&y=z", content=b'{"a":1}', headers={"x-test": "hello"})
        assert response.status_code == 200
        echoed = response.json()
        assert echoed["method"] == "POST"
        assert echoed["route"] == {"source": "d365"}
        assert echoed["params"] == {"x": "1,2", "y": "z"}
        assert echoed["body"] == '{"a":1}'
        assert echoed["header"] == "hello"
        assert echoed["url"] == f"{host.base_url}/api/hooks/d365?x=1&x=2&y=z"

        assert (await client.get("/api/items/42")).json()["route"] == {"id": "42"}
        assert (await client.get("/API/Items/42")).status_code == 200  # literals match case-insensitively
        assert (await client.get("/api/items/new")).text == "the literal route wins"
        assert (await client.get("/api/items/abc")).status_code == 404  # {id:int} does not match
        assert (await client.get("/api/files/a/b/c.txt")).json()["route"] == {"path": "a/b/c.txt"}
        assert (await client.delete("/api/files/x")).status_code == 200  # no methods: every method
        assert (await client.get("/api/ping")).text == "pong from a worker thread"  # route defaults to the name
        name, invocation_id = (await client.get("/api/ctx")).text.split()
        assert name == "with_context" and len(invocation_id) == 36  # `context` is passed when asked for

        wrong_method = await client.get("/api/hooks/d365")
        assert wrong_method.status_code == 404  # the host answers a wrong method with 404, not 405
        assert wrong_method.content == b""
        assert (await client.post("/api/items/42")).status_code == 404
        assert (await client.get("/api/unknown")).status_code == 404
        assert (await client.post("/hooks/d365")).status_code == 404  # outside the route prefix


async def test_response_conversion_and_failures(
    write_app: Callable[[str], str], start_host: StartHost, caplog: pytest.LogCaptureFixture
) -> None:
    host = await start_host(write_app(ROUTES_APP))
    async with httpx.AsyncClient(base_url=host.base_url) as client:
        custom = await client.get("/api/custom")
        assert custom.status_code == 201
        assert custom.headers["x-custom"] == "yes"
        assert custom.headers["content-type"] == "text/html; charset=latin-1"
        assert custom.content == b"<p>hi</p>"
        assert (await client.get("/api/ping")).headers["content-type"] == "text/plain; charset=utf-8"

        with caplog.at_level(logging.INFO, logger="devkit.devhost"):
            failed = await client.get("/api/boom")
            no_response = await client.get("/api/nothing")
            await client.get("/api/ping")
    assert (failed.status_code, failed.content) == (500, b"")
    assert no_response.status_code == 500  # returning None is a failed invocation, as in the worker
    failures = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert "Executed 'Functions.boom' (httpTrigger, Failed" in failures[0].getMessage()
    assert failures[0].exc_info is not None and "kaboom in the function" in str(failures[0].exc_info[1])
    successes = [record.getMessage() for record in caplog.records if "Succeeded" in record.getMessage()]
    assert any(message.startswith("Executed 'Functions.ping' (httpTrigger, Succeeded, Id=") for message in successes)


AUTH_APP = """
import azure.functions as func

app = func.FunctionApp()  # FUNCTION is the default level

@app.route(route="guarded", methods=["GET"])
def guarded(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse("in")

@app.route(route="admin-only", methods=["GET"], auth_level=func.AuthLevel.ADMIN)
def admin_only(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse("admin in")

@app.route(route="open", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def open_route(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse("open")
"""


async def test_function_and_admin_keys(write_app: Callable[[str], str], start_host: StartHost) -> None:
    banner = io.StringIO()
    settings = {"DEV_FUNCTION_KEY": "fn-key-from-settings", "DEV_ADMIN_KEY": "admin-key-from-settings"}
    host = await start_host(write_app(AUTH_APP), settings=settings, out=banner)
    assert (host.function_key, host.admin_key) == ("fn-key-from-settings", "admin-key-from-settings")
    fn_key, admin_key = host.function_key, host.admin_key
    async with httpx.AsyncClient(base_url=host.base_url) as client:
        for path in ("/api/guarded", "/api/admin-only"):
            missing = await client.get(path)
            assert (missing.status_code, missing.content) == (401, b"")
            assert (await client.get(path, headers={"x-functions-key": "wrong"})).status_code == 401
            assert (await client.get(path, params={"code": "wrong"})).status_code == 401
        assert (await client.get("/api/guarded", headers={"x-functions-key": fn_key})).text == "in"
        assert (await client.get("/api/guarded", params={"code": fn_key})).text == "in"
        assert (await client.get("/api/guarded", params={"code": admin_key})).text == "in"  # master key works too
        assert (await client.get("/api/admin-only", params={"code": fn_key})).status_code == 401
        assert (await client.get("/api/admin-only", headers={"x-functions-key": admin_key})).text == "admin in"
        assert (await client.get("/api/open")).text == "open"
    text = banner.getvalue()
    assert "fn-key-from-settings" not in text and "admin-key-from-settings" not in text
    assert "Function key: loaded from settings (not shown)" in text


async def test_generated_keys_are_printed_and_work(write_app: Callable[[str], str], start_host: StartHost) -> None:
    banner = io.StringIO()
    host = await start_host(write_app(AUTH_APP), out=banner)
    assert host.function_key != host.admin_key and len(host.function_key) >= 32
    text = banner.getvalue()
    assert f"Function key: {host.function_key} (generated" in text
    assert f"Admin (master) key: {host.admin_key} (generated" in text
    assert f"guarded: [GET] {host.base_url}/api/guarded" in text
    async with httpx.AsyncClient(base_url=host.base_url) as client:
        assert (await client.get("/api/guarded", params={"code": host.function_key})).status_code == 200


OUTPUT_APP = """
from typing import List
import azure.functions as func

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)
RECEIVED = []

@app.route(route="park", methods=["POST"])
@app.queue_output(arg_name="out", queue_name="%PARK_QUEUE%", connection="AzureWebJobsStorage")
def park(req: func.HttpRequest, out: func.Out[List[str]]) -> func.HttpResponse:  # the worker refuses list[str]
    out.set([req.get_body().decode(), "second message"])
    return func.HttpResponse(status_code=202)

@app.route(route="forward", methods=["POST"])
@app.queue_output(arg_name="out", queue_name="%WORK_QUEUE%", connection="AzureWebJobsStorage")
async def forward(req: func.HttpRequest, out: func.Out[str]) -> func.HttpResponse:
    out.set(req.get_body().decode())
    return func.HttpResponse(status_code=202)

@app.route(route="refuse", methods=["POST"])
@app.queue_output(arg_name="out", queue_name="%PARK_QUEUE%", connection="AzureWebJobsStorage")
def refuse(req: func.HttpRequest, out: func.Out[str]) -> func.HttpResponse:
    out.set("must never be written")
    raise RuntimeError("failed after setting the output")

@app.queue_trigger(arg_name="msg", queue_name="%WORK_QUEUE%", connection="AzureWebJobsStorage")
async def work(msg: func.QueueMessage) -> None:
    RECEIVED.append((msg.get_body().decode(), msg.dequeue_count))
"""


async def test_queue_output_is_base64_and_feeds_a_queue_trigger(
    write_app: Callable[[str], str],
    start_host: StartHost,
    raw_queue: Callable[[str], Awaitable[QueueClient]],
    unique_name: str,
) -> None:
    module = write_app(OUTPUT_APP)
    settings = {"PARK_QUEUE": f"park-{unique_name}", "WORK_QUEUE": f"work-{unique_name}"}
    host_json = {"extensions": {"queues": {"maxPollingInterval": "00:00:00.2"}}}
    host = await start_host(module, settings=settings, host_json=host_json)
    async with httpx.AsyncClient(base_url=host.base_url) as client:
        assert (await client.post("/api/park", content="first message ü")).status_code == 202
        assert (await client.post("/api/refuse", content="x")).status_code == 500
        assert (await client.post("/api/forward", content='{"card": "C-1"}')).status_code == 202

    parked = await raw_queue(f"park-{unique_name}")
    raw = [message.content for message in await parked.peek_messages(max_messages=32)]
    assert raw == [base64.b64encode("first message ü".encode()).decode(), base64.b64encode(b"second message").decode()]

    app = importlib.import_module(module)
    for _ in range(100):
        if app.RECEIVED:
            break
        await asyncio.sleep(0.05)
    assert app.RECEIVED == [('{"card": "C-1"}', 1)]
    work = await raw_queue(f"work-{unique_name}")
    for _ in range(40):  # deleted once the function succeeded
        if not await work.peek_messages():
            break
        await asyncio.sleep(0.05)
    assert await work.peek_messages() == []


ADMIN_APP = """
import azure.functions as func

app = func.FunctionApp()
RUNS = []

@app.timer_trigger(arg_name="timer", schedule="0 0 0 1 1 *")
def yearly(timer: func.TimerRequest) -> None:
    RUNS.append(("yearly", timer.past_due))

@app.route(route="hello", methods=["GET"])
def hello(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse("hello")
"""


async def test_admin_apis_need_the_master_key(write_app: Callable[[str], str], start_host: StartHost) -> None:
    module = write_app(ADMIN_APP)
    host = await start_host(module)
    async with httpx.AsyncClient(base_url=host.base_url) as client:
        assert (await client.get("/admin/host/status", params={"code": host.function_key})).status_code == 401
        status = await client.get("/admin/host/status", headers={"x-functions-key": host.admin_key})
        assert status.json()["state"] == "Running"
        invoke = await client.post(
            "/admin/functions/yearly", params={"code": host.admin_key}, content=json.dumps({"input": ""})
        )
        assert invoke.status_code == 202
        assert (await client.post("/admin/functions/hello", params={"code": host.admin_key})).status_code == 404
        assert (await client.post("/admin/functions/yearly", params={"code": host.function_key})).status_code == 401
    app = importlib.import_module(module)
    for _ in range(100):
        if app.RUNS:
            break
        await asyncio.sleep(0.02)
    assert app.RUNS == [("yearly", False)]


DISABLED_APP = """
import azure.functions as func

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)

@app.route(route="visible", methods=["GET"])
def visible(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse("here")

@app.function_name(name="hidden")
@app.route(route="hidden/{x}", methods=["GET"])
@app.queue_output(arg_name="out", queue_name="%NOT_SET_ANYWHERE%", connection="AzureWebJobsStorage")
def hidden_function(req: func.HttpRequest, out: func.Out[str]) -> func.HttpResponse:
    return func.HttpResponse("should not be served")
"""


async def test_disabled_function_is_not_served(write_app: Callable[[str], str], start_host: StartHost) -> None:
    banner = io.StringIO()
    host = await start_host(write_app(DISABLED_APP), settings={"AzureWebJobs.hidden.Disabled": "true"}, out=banner)
    async with httpx.AsyncClient(base_url=host.base_url) as client:
        assert (await client.get("/api/hidden/1")).status_code == 404
        assert (await client.get("/api/visible")).text == "here"
    assert "hidden: httpTrigger (disabled by AzureWebJobs.hidden.Disabled)" in banner.getvalue()


PREFIX_APP = """
import azure.functions as func

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)

@app.route(route="orders/{id}", methods=["GET"])
def order(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse(req.route_params["id"])
"""


@pytest.mark.parametrize(("prefix", "path"), [("", "/orders/7"), ("v1/hooks", "/v1/hooks/orders/7")])
async def test_route_prefix_from_host_json(
    write_app: Callable[[str], str], start_host: StartHost, prefix: str, path: str
) -> None:
    host = await start_host(write_app(PREFIX_APP), host_json={"extensions": {"http": {"routePrefix": prefix}}})
    async with httpx.AsyncClient(base_url=host.base_url) as client:
        assert (await client.get(path)).text == "7"
        assert (await client.get("/api/orders/7")).status_code == 404
    assert host.url_for("orders/7") == f"{host.base_url}{path}"
