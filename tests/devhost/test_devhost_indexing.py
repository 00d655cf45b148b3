"""Indexing the app as the worker does, app settings, %SETTING% expressions and the start-up banner."""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from devkit.azurite import free_port
from devkit.devhost import DevHost, DevHostError, serve
from devkit.devhost.host_json import load_host_json
from loyaltysync.errors import ConfigError

StartHost = Callable[..., Awaitable[DevHost]]

NO_APP = """
import azure.functions as func

bp = func.Blueprint()  # a blueprint is not an app
"""

TWO_APPS = """
import azure.functions as func

app = func.FunctionApp()
other = func.FunctionApp()
"""

BROKEN_IMPORT = """
import azure.functions as func

SETTINGS = {}["missing"]
app = func.FunctionApp()
"""

BAD_SIGNATURE = """
import azure.functions as func

app = func.FunctionApp()

@app.route(route="x")
def handler(request: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse("never")
"""


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        (NO_APP, "no top-level function app instance"),
        (TWO_APPS, "more than one top-level function app instance"),
        (BROKEN_IMPORT, "cannot import the function app module .*KeyError: 'missing'"),
        (BAD_SIGNATURE, r"function 'handler' \(parameter 'request'\).*declared in Python but not in the function"),
    ],
)
async def test_apps_the_worker_refuses_are_refused(
    write_app: Callable[[str], str], start_host: StartHost, source: str, problem: str
) -> None:
    with pytest.raises(DevHostError, match=problem):
        await start_host(write_app(source))


SETTINGS_APP = """
import os
import azure.functions as func

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)
SEEN_AT_IMPORT = os.environ.get("DEVHOST_TEST_GREETING")

@app.route(route="%ROUTE_SEGMENT%/greet", methods=["GET"])
def greet(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse(os.environ["DEVHOST_TEST_GREETING"])

@app.queue_trigger(arg_name="msg", queue_name="%DEVHOST_TEST_QUEUE%", connection="AzureWebJobsStorage")
def drain(msg: func.QueueMessage) -> None:
    pass

@app.event_grid_trigger(arg_name="event")
def grid(event: func.EventGridEvent) -> None:
    pass

@app.function_name(name="sb")
@app.service_bus_queue_trigger(arg_name="msg", queue_name="%SB_QUEUE_NOT_SET%", connection="SB")
def service_bus(msg: func.ServiceBusMessage) -> None:
    pass
"""


async def test_settings_are_exported_resolved_and_restored(
    write_app: Callable[[str], str], start_host: StartHost, unique_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEVHOST_TEST_GREETING", "from the environment")  # the environment wins over the file
    settings = {
        "DEVHOST_TEST_GREETING": "from local.settings.json",
        "DEVHOST_TEST_QUEUE": f"drain-{unique_name}",
        "ROUTE_SEGMENT": "hello",
    }
    banner = io.StringIO()
    host = await start_host(write_app(SETTINGS_APP), settings=settings, out=banner)
    assert os.environ["DEVHOST_TEST_QUEUE"] == f"drain-{unique_name}"  # exported before the app is imported
    async with httpx.AsyncClient(base_url=host.base_url) as client:
        assert (await client.get("/api/hello/greet")).text == "from the environment"
    text = banner.getvalue()
    assert f"drain: queueTrigger (queue 'drain-{unique_name}')" in text
    assert f"greet: [GET] {host.base_url}/api/hello/greet" in text
    assert "grid: eventGridTrigger (eventGridTrigger is not run by the dev host)" in text
    assert "sb: serviceBusTrigger (serviceBusTrigger is not run by the dev host)" in text
    await host.stop()
    assert "DEVHOST_TEST_QUEUE" not in os.environ
    assert os.environ["DEVHOST_TEST_GREETING"] == "from the environment"


MISSING_SETTING_APP = """
import azure.functions as func

app = func.FunctionApp()

@app.queue_trigger(arg_name="msg", queue_name="%DEVHOST_UNSET_QUEUE%", connection="AzureWebJobsStorage")
def drain(msg: func.QueueMessage) -> None:
    pass
"""


async def test_missing_setting_is_named(write_app: Callable[[str], str], start_host: StartHost) -> None:
    with pytest.raises(ConfigError) as caught:
        await start_host(write_app(MISSING_SETTING_APP), settings={"DEVHOST_SOMETHING_ELSE": "x"})
    assert caught.value.setting == "DEVHOST_UNSET_QUEUE"
    assert "function 'drain' (queueTrigger queueName)" in str(caught.value)
    assert "DEVHOST_SOMETHING_ELSE" not in os.environ  # a failed start undoes the export


def test_host_json_defaults_overrides_and_limits(tmp_path: Path) -> None:
    missing = load_host_json(tmp_path / "absent.json", {})
    assert (missing.route_prefix, missing.queues.batch_size, missing.queues.max_dequeue_count) == ("api", 16, 5)
    assert (missing.queues.visibility_timeout, missing.queues.max_polling_interval) == (0.0, 60.0)
    assert missing.queues.new_batch_threshold == 8 * (os.cpu_count() or 1)

    path = tmp_path / "host.json"
    path.write_text(
        '{"Extensions": {"Queues": {"BatchSize": 4, "newBatchThreshold": 2, "visibilityTimeout": "00:00:30",'
        ' "maxPollingInterval": "00:00:02", "messageEncoding": "None"}, "http": {"routePrefix": "/v1/"}}}'
    )
    config = load_host_json(path, {"AzureFunctionsJobHost__extensions__queues__batchSize": "8"})
    assert config.route_prefix == "v1"
    assert config.queues.batch_size == 8  # the app setting overrides the file
    assert (config.queues.new_batch_threshold, config.queues.max_in_flight) == (2, 10)
    assert (config.queues.visibility_timeout, config.queues.max_polling_interval) == (30.0, 2.0)
    assert config.queues.message_encoding == "none"

    path.write_text('{"extensions": {"queues": {"batchSize": 64}}}')
    with pytest.raises(ConfigError, match=r"extensions\.queues\.batchsize"):
        load_host_json(path, {})
    path.write_text('{"extensions": {"queues": {"maxPollingInterval": "00:00:00.05"}}}')
    with pytest.raises(ConfigError, match="maxpollinginterval"):
        load_host_json(path, {})


SERVE_APP = """
import azure.functions as func

app = func.FunctionApp()

@app.route(route="hi", methods=["GET"])
def hi(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse("hi")
"""


async def test_serve_runs_until_cancelled(
    write_app: Callable[[str], str], app_dir: Path, storage_connection_string: str
) -> None:
    (app_dir / "local.settings.json").write_text('{"Values": {"DEV_FUNCTION_KEY": "serve-key"}}')
    port, ready = free_port(), asyncio.Event()
    task = asyncio.create_task(
        serve(
            write_app(SERVE_APP),
            port=port,
            storage=storage_connection_string,
            host_json=app_dir / "absent-host.json",
            local_settings=app_dir / "local.settings.json",
            ready=ready,
        )
    )
    await asyncio.wait_for(ready.wait(), 10)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        assert (await client.get("/api/hi", params={"code": "serve-key"})).text == "hi"
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        with pytest.raises(httpx.ConnectError):
            await client.get("/api/hi")
    assert "DEV_FUNCTION_KEY" not in os.environ
