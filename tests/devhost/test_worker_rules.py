"""The Python worker's indexing rules (devkit/devhost/worker_rules.py), alone and at dev host start-up.

Each refused signature is one the real worker refuses (Azure/azure-functions-python-worker,
functions.py `Registry.add_indexed_function`); in Azure one refused function fails the whole indexing.
"""

from __future__ import annotations

import base64
import importlib
import json
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, List  # noqa: UP035  (the queue output converter accepts typing.List, not list)

import azure.functions as func
import httpx
import pytest
from azure.functions.meta import Datum

from devkit.devhost import DevHost, DevHostError
from devkit.devhost import worker_rules as rules
from devkit.devhost.http import http_trigger_data
from devkit.devhost.invocation import queue_messages
from devkit.devhost.queues import queue_trigger_data

StartHost = Callable[..., Awaitable[DevHost]]
STR_LIST = List[str]  # noqa: UP006  (the form the worker accepts for a queue output list)
ROOT = Path(__file__).resolve().parents[2]
APP_SETTINGS = {
    "FNO_URL": "https://contoso.operations.dynamics.com",
    "DATAVERSE_URL": "https://contoso.crm.dynamics.com",
    "AzureWebJobsStorage": "UseDevelopmentStorage=true",
    "SERVICEBUS_QUEUE": "fo-events",  # every optional function on: all of them must pass
    "EVENTGRID_ENABLED": "true",
}

HEADER = """
from __future__ import annotations
from typing import List, Optional
import azure.functions as func

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)
"""

# The two signatures function_app.py had while every dev host test passed and Azure indexed nothing.
OLD_CONTEXT = """
@app.route(route="hook")
def hook(req: func.HttpRequest, context: func.Context | None = None) -> func.HttpResponse:
    return func.HttpResponse("ok")
"""
OLD_OPTIONAL_CONTEXT = """
@app.route(route="hook")
def hook(req: func.HttpRequest, context: Optional[func.Context] = None) -> func.HttpResponse:
    return func.HttpResponse("ok")
"""
OLD_OUT_LIST = """
@app.route(route="hook")
@app.queue_output(arg_name="out", queue_name="work", connection="AzureWebJobsStorage")
def hook(req: func.HttpRequest, out: func.Out[list[str]]) -> func.HttpResponse:
    return func.HttpResponse("ok")
"""
FIXED = """
@app.route(route="hook", methods=["POST"])
@app.queue_output(arg_name="out", queue_name="work", connection="AzureWebJobsStorage")
def hook(req: func.HttpRequest, out: func.Out[List[str]], context: func.Context) -> func.HttpResponse:
    out.set([req.get_body().decode(), context.function_name])
    return func.HttpResponse("queued", status_code=202)
"""


@pytest.fixture
def load(write_app: Callable[[str], str]) -> Callable[[str], Any]:
    """Write an app module (HEADER + source), import it and return it."""

    def load_app(source: str) -> Any:
        return importlib.import_module(write_app(HEADER + source))

    return load_app


def _refusal(module: Any) -> rules.FunctionLoadError:
    with pytest.raises(rules.FunctionLoadError) as caught:
        rules.index_app(rules.find_app(module))
    return caught.value


@pytest.mark.parametrize(
    ("source", "parameter", "reason"),
    [
        (OLD_CONTEXT, "context", 'the "context" parameter is expected to be of type azure.functions.Context, got '),
        (OLD_OPTIONAL_CONTEXT, "context", "expected to be of type azure.functions.Context, got typing.Optional"),
        (OLD_OUT_LIST, "out", "binding out has invalid non-type annotation azure.functions._abc.Out[list[str]]"),
    ],
)
def test_the_two_old_signatures_are_refused_with_the_workers_reason(
    load: Callable[[str], Any], source: str, parameter: str, reason: str
) -> None:
    error = _refusal(load(source))
    assert (error.function_name, error.parameter) == ("hook", parameter)
    assert reason in error.reason
    assert str(error).startswith("cannot load the hook function: ")


def test_the_fixed_signatures_load_with_the_workers_converters(load: Callable[[str], Any]) -> None:
    (hook,) = rules.index_app(rules.find_app(load(FIXED)))
    assert hook.requires_context is True
    assert hook.inputs["req"].binding_type == "httpTrigger"
    assert hook.outputs["out"] == rules.ParamType("queue", STR_LIST)
    assert hook.return_type is not None and hook.return_type.binding_type == "http"


@pytest.mark.parametrize(
    ("source", "parameter", "reason"),
    [
        (
            """
@app.queue_trigger(arg_name="msg", queue_name="work", connection="AzureWebJobsStorage")
def drain(msg: func.QueueMessage, retries: int) -> None:
    pass
""",
            "retries",
            "declared in Python but not in the function definition (function.json or function decorators): "
            "{'retries'}",
        ),
        (
            """
@app.route(route="x")
@app.queue_output(arg_name="out", queue_name="work", connection="AzureWebJobsStorage")
def drain(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse("x")
""",
            "out",
            "declared in the function definition (function.json or function decorators) but not in Python: {'out'}",
        ),
        (
            """
@app.queue_trigger(arg_name="msg", queue_name="work", connection="AzureWebJobsStorage")
def drain(msg: func.Out[func.QueueMessage]) -> None:
    pass
""",
            "msg",
            'binding msg is declared to have the "in" direction',
        ),
        (
            """
@app.route(route="x")
@app.queue_output(arg_name="out", queue_name="work", connection="AzureWebJobsStorage")
def drain(req: func.HttpRequest, out: str) -> func.HttpResponse:
    return func.HttpResponse("x")
""",
            "out",
            'binding out is declared to have the "out" direction, but its annotation in Python is not a subclass',
        ),
        (
            """
@app.queue_trigger(arg_name="msg", queue_name="work", connection="AzureWebJobsStorage")
def drain(msg: func.HttpRequest) -> None:
    pass
""",
            "msg",
            '\'msg\' binding type "queueTrigger" in function definition',
        ),
        (
            """
@app.timer_trigger(arg_name="timer", schedule="0 */5 * * * *")
def drain(timer: int) -> None:
    pass
""",
            "timer",
            'corresponding function parameter\'s Python type annotation "int"',
        ),
        (
            """
@app.route(route="x")
def drain(req: func.HttpRequest) -> func.HttpResponse | None:
    return None
""",
            "$return",
            "has invalid non-type return annotation",
        ),
        (
            """
@app.route(route="x")
def drain(req: func.HttpRequest) -> None:
    return None
""",
            "$return",
            'Python return annotation "NoneType" does not match binding type "http"',
        ),
        (
            """
@app.queue_trigger(arg_name="msg", queue_name="work", connection="AzureWebJobsStorage")
def drain(msg: Missing) -> None:
    pass
""",
            None,
            "cannot be resolved by typing.get_type_hints: NameError",
        ),
    ],
    ids=[
        "unbound-parameter",
        "binding-without-parameter",
        "out-on-an-input-binding",
        "out-binding-not-annotated-out",
        "wrong-trigger-type",
        "int-for-a-timer",
        "optional-return",
        "none-return-on-http",
        "unresolvable-annotation",
    ],
)
def test_signatures_the_worker_refuses(
    load: Callable[[str], Any], source: str, parameter: str | None, reason: str
) -> None:
    error = _refusal(load(source))
    assert error.function_name == "drain"
    assert error.parameter == parameter
    assert reason in error.reason


def test_str_and_bytes_use_the_generic_binding_and_unannotated_parameters_are_not_checked(
    load: Callable[[str], Any],
) -> None:
    module = load(
        """
@app.queue_trigger(arg_name="msg", queue_name="a", connection="AzureWebJobsStorage")
def as_text(msg: str) -> None:
    pass

@app.queue_trigger(arg_name="msg", queue_name="b", connection="AzureWebJobsStorage")
def as_bytes(msg: bytes) -> None:
    pass

@app.queue_trigger(arg_name="msg", queue_name="c", connection="AzureWebJobsStorage")
def untyped(msg):
    pass
"""
    )
    functions = {function.name: function for function in rules.index_app(rules.find_app(module))}
    assert functions["as_text"].inputs["msg"] == rules.ParamType(rules.GENERIC, str)
    assert functions["as_bytes"].inputs["msg"] == rules.ParamType(rules.GENERIC, bytes)
    assert functions["untyped"].inputs["msg"] == rules.ParamType("queueTrigger", None)


async def test_the_dev_host_stops_at_start_naming_function_parameter_and_reason(
    write_app: Callable[[str], str], start_host: StartHost
) -> None:
    good_then_bad = HEADER + FIXED.replace("hook", "good") + OLD_OUT_LIST
    with pytest.raises(DevHostError) as caught:
        await start_host(write_app(good_then_bad))
    error = caught.value
    assert (error.function_name, error.parameter) == ("hook", "out")
    assert "binding out has invalid non-type annotation" in error.reason
    assert "the Python worker refuses function 'hook' (parameter 'out')" in str(error)
    assert "no function would run" in str(error)


async def test_the_fixed_signature_runs_with_what_the_worker_passes(
    write_app: Callable[[str], str],
    start_host: StartHost,
    raw_queue: Callable[[str], Awaitable[Any]],
    unique_name: str,
) -> None:
    source = HEADER + FIXED.replace('queue_name="work"', 'queue_name="%WORK_QUEUE%"')
    host = await start_host(write_app(source), settings={"WORK_QUEUE": f"work-{unique_name}"})
    async with httpx.AsyncClient(base_url=host.base_url) as client:
        response = await client.post("/api/hook", content="card C-1")
    assert (response.status_code, response.text) == (202, "queued")
    assert response.headers["content-type"] == "text/plain; charset=utf-8"  # the converter's default mimetype
    queue = await raw_queue(f"work-{unique_name}")
    raw = [message.content for message in await queue.peek_messages(max_messages=32)]
    assert [base64.b64decode(text).decode() for text in raw] == ["card C-1", "hook"]  # context.function_name


def test_http_data_reaches_the_function_as_the_worker_builds_it() -> None:
    data = http_trigger_data(
        "POST",
        "http://localhost/api/hook?a=1&empty=",
        {"X-Custom": "one,two", "Content-Type": "application/json"},
        {"a": "1", "empty": ""},
        {"id": "42"},
        b'{"k": 1}',
    )
    request = rules.decode_argument(rules.ParamType("httpTrigger", func.HttpRequest), data.data, data.metadata)
    assert isinstance(request, func.HttpRequest)
    assert dict(request.params) == {"a": "1"}  # the host leaves out empty query values
    assert request.headers["x-custom"] == "one,two"
    assert request.route_params == {"id": "42"}
    assert request.get_json() == {"k": 1}


def test_queue_body_properties_override_the_message_metadata_as_in_the_host() -> None:
    body = b'{"ID": "from-the-body", "popreceipt": "also", "n": 1}'
    data = queue_trigger_data(body, message_id="real-id", dequeue_count=3)
    message = rules.decode_argument(rules.ParamType("queueTrigger", func.QueueMessage), data.data, data.metadata)
    assert (message.id, message.pop_receipt) == ("from-the-body", "also")
    assert message.dequeue_count == 3
    assert message.get_body() == body
    as_text = rules.decode_argument(rules.ParamType(rules.GENERIC, str), data.data, data.metadata)
    assert as_text == body.decode()
    plain = queue_trigger_data(b"not json", message_id="real-id", dequeue_count=1)
    assert rules.decode_argument(rules.ParamType("queueTrigger", func.QueueMessage), plain.data, plain.metadata).id == (
        "real-id"
    )


def test_outputs_go_through_the_converters_and_the_hosts_queue_rules() -> None:
    listed = rules.encode_value(rules.ParamType("queue", STR_LIST), ["a", '{"b": 1}'])
    assert queue_messages(listed) == ["a", '{"b": 1}']
    single = rules.encode_value(rules.ParamType(rules.GENERIC, str), '["x", "y"]')
    assert queue_messages(single) == ["x", "y"]  # the host splits text that is a JSON array (worker#1492)
    with pytest.raises(TypeError, match="unable to encode outgoing TypedData"):
        rules.encode_value(rules.ParamType("http", func.HttpResponse), None)
    assert queue_messages(Datum(b"raw", "bytes")) == [b"raw"]


@pytest.fixture
def app_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name, value in APP_SETTINGS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(ROOT)
    sys.modules.pop("function_app", None)
    yield
    sys.modules.pop("function_app", None)


@pytest.mark.usefixtures("app_env")
def test_the_real_function_app_passes_every_worker_check() -> None:
    module = importlib.import_module("function_app")
    module.app.functions_bindings = None
    indexed = rules.index_app(rules.find_app(module))
    names = {function.name for function in indexed}
    assert {"reconcile", "monitor", "ops_health", "fo_servicebus", "fo_eventgrid"} <= names
    inbound = [function for function in indexed if function.outputs]
    assert inbound, "the inbound webhooks write to their queue"
    for function in inbound:
        assert function.outputs["out"].binding_type == "queue"
        assert function.requires_context


def test_the_command_line_reports_the_real_app_and_fails_on_a_refused_one(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **APP_SETTINGS}
    script = ROOT / "devkit" / "devhost" / "worker_rules.py"
    # Run as `-m` from the repository: the script's own folder would shadow the stdlib `http` module.
    done = subprocess.run(
        [sys.executable, "-m", "devkit.devhost.worker_rules"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert {entry["name"] for entry in report} >= {"reconcile", "fo_eventgrid"}

    (tmp_path / "bad_app.py").write_text(HEADER + OLD_CONTEXT, encoding="utf-8")
    copy = tmp_path / "rules"
    copy.mkdir()
    (copy / "worker_rules.py").write_text(script.read_text(encoding="utf-8"), encoding="utf-8")
    command = [sys.executable, str(copy / "worker_rules.py"), "bad_app"]
    failed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)  # noqa: S603
    assert failed.returncode == 1
    assert 'cannot load the hook function: the "context" parameter' in failed.stderr
