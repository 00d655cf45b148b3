"""The dev host: `func start` for machines without Core Tools, serving the same `function_app.app`.

Start-up follows the host: export local.settings.json into the environment,
read host.json, import the app and index its functions, then start the HTTP
front end, the queue listeners and the timers, and print the functions with
their URLs. `DevHost` runs in-process (tests, the demo); `serve()` is the
long-running entry point behind `python -m loyaltysync dev`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Self, TextIO

import azure.functions as func
import uvicorn

from devkit.devhost.app import FunctionSpec, find_app, index_functions, load_app_module
from devkit.devhost.host_json import HostConfig, load_host_json
from devkit.devhost.http import HttpFrontEnd, build_routes
from devkit.devhost.invocation import Invoker
from devkit.devhost.keys import ADMIN_KEY_SETTING, FUNCTION_KEY_SETTING, HostKeys, load_keys
from devkit.devhost.queues import QueueListener
from devkit.devhost.settings import DEFAULT_CONNECTION, export_settings, read_local_settings
from devkit.devhost.storage import QueueStore
from devkit.devhost.timers import TimerRunner, timer_zone

log = logging.getLogger("devkit.devhost")

DEFAULT_PORT = 7071
THREADPOOL_SETTING = "PYTHON_THREADPOOL_THREAD_COUNT"
_SDK_REQUEST_LOGGER = "azure.core.pipeline.policies.http_logging_policy"


class _Server(uvicorn.Server):
    # Ctrl+C belongs to whoever runs the event loop (it cancels serve()), not to uvicorn alone:
    # otherwise uvicorn would stop serving HTTP while queue listeners and timers kept running.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class DevHost:
    """One running dev host. `await start()`, use `base_url` and the keys, `await stop()` (or `async with`)."""

    def __init__(
        self,
        app_module: str = "function_app",
        *,
        port: int = DEFAULT_PORT,
        host: str = "127.0.0.1",
        function_key: str | None = None,
        admin_key: str | None = None,
        storage: str | None = None,
        host_json: Path = Path("host.json"),
        local_settings: Path = Path("local.settings.json"),
        out: TextIO | None = None,
    ) -> None:
        """`port=0` picks a free port. `storage`, when given, becomes the AzureWebJobsStorage setting."""
        self.app_module = app_module
        self.host = host
        self.port = port
        self._requested_keys = (function_key, admin_key)
        self._storage = storage
        self._host_json = host_json
        self._local_settings = local_settings
        self._out = out
        self._keys: HostKeys | None = None
        self.functions: list[FunctionSpec] = []
        self.config = HostConfig()
        self._restore_env: dict[str, str | None] = {}
        self._store: QueueStore | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._front: HttpFrontEnd | None = None
        self._server: _Server | None = None
        self._server_task: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def base_url(self) -> str:
        """`http://<host>:<port>` of the running host (the port actually bound when 0 was asked)."""
        return f"http://{self.host}:{self.port}"

    @property
    def function_key(self) -> str:
        """The key FUNCTION-level routes accept (the admin key is accepted too)."""
        return self._started_keys().function_key

    @property
    def admin_key(self) -> str:
        """The master key: the only key ADMIN-level routes and the admin APIs accept."""
        return self._started_keys().admin_key

    def url_for(self, route: str) -> str:
        """The URL of an HTTP route, with the route prefix (e.g. `url_for("hooks/x")`)."""
        prefix = f"/{self.config.route_prefix}" if self.config.route_prefix else ""
        return f"{self.base_url}{prefix}/{route.lstrip('/')}"

    async def start(self) -> None:
        """Index the app and start serving. Raises DevHostError or ConfigError (after undoing everything)."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        environ = os.environ
        self._export_settings()
        self.config = load_host_json(self._host_json, environ)
        self._keys = load_keys(environ, function_key=self._requested_keys[0], admin_key=self._requested_keys[1])
        self.functions = index_functions(find_app(load_app_module(self.app_module)), environ)
        routes = build_routes(self.functions)
        threads = environ.get(THREADPOOL_SETTING, "")
        self._executor = ThreadPoolExecutor(max_workers=int(threads) if threads.isdigit() else None)
        self._store = QueueStore(environ)
        invoker = Invoker(self._store, self.config.queues.message_encoding, self._executor,
                          self.config.function_timeout)
        zone = timer_zone(environ)
        # Every schedule and queue is checked before anything starts.
        runners = [TimerRunner(function, invoker, zone) for function in self._running("timerTrigger")]
        store, queues = self._store, self.config.queues
        listeners = [QueueListener(function, invoker, store, queues) for function in self._running("queueTrigger")]
        if logging.getLogger(_SDK_REQUEST_LOGGER).level == logging.NOTSET:
            logging.getLogger(_SDK_REQUEST_LOGGER).setLevel(logging.WARNING)  # one line per storage call is noise
        self._front = HttpFrontEnd(routes, self.functions, invoker, self._keys, self.config.route_prefix)
        await self._serve_http(self._front)
        self._tasks = [asyncio.create_task(listener.run()) for listener in listeners]
        self._tasks += [asyncio.create_task(runner.run()) for runner in runners]
        for task in self._tasks:
            task.add_done_callback(_report_crash)
        self._print_banner()

    async def stop(self) -> None:
        """Stop triggers and the HTTP server, close clients and restore the environment. Safe to call twice."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None and self._server_task is not None:
            self._server.should_exit = True
            await asyncio.gather(self._server_task, return_exceptions=True)
        self._server, self._server_task = None, None
        if self._front is not None:
            await self._front.aclose()
            self._front = None
        if self._store is not None:
            await self._store.close()
            self._store = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        for name, value in self._restore_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._restore_env = {}

    async def wait(self) -> None:
        """Return when the HTTP server stops (it runs until `stop()` or cancellation)."""
        if self._server_task is not None:
            await asyncio.shield(self._server_task)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def _export_settings(self) -> None:
        added = export_settings(read_local_settings(self._local_settings), os.environ)
        self._restore_env.update(dict.fromkeys(added))
        if self._storage is not None:
            self._restore_env.setdefault(DEFAULT_CONNECTION, os.environ.get(DEFAULT_CONNECTION))
            os.environ[DEFAULT_CONNECTION] = self._storage

    def _running(self, trigger_type: str) -> list[FunctionSpec]:
        return [function for function in self.functions if function.runs and function.trigger_type == trigger_type]

    def _started_keys(self) -> HostKeys:
        if self._keys is None:
            raise RuntimeError("the dev host is not started")
        return self._keys

    async def _serve_http(self, front: HttpFrontEnd) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, self.port), family=family)
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(front, log_level="warning", access_log=False, lifespan="off")
        self._server = _Server(config)
        self._server_task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._server_task.done():
                self._server_task.result()
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    def _print_banner(self) -> None:
        keys = self._started_keys()
        lines = [f"loyaltysync dev host: {self.app_module} (azure-functions {func.__version__})", "", "Functions:", ""]
        for function in self.functions:
            lines += [f"\t{function.name}: {self._describe(function)}", ""]
        for label, key, generated, setting in (
            ("Function key", keys.function_key, keys.function_key_generated, FUNCTION_KEY_SETTING),
            ("Admin (master) key", keys.admin_key, keys.admin_key_generated, ADMIN_KEY_SETTING),
        ):
            shown = f"{key} (generated; set {setting} to keep one)" if generated else "loaded from settings (not shown)"
            lines.append(f"{label}: {shown}")
        print("\n".join(lines), file=self._out or sys.stdout, flush=True)

    def _describe(self, function: FunctionSpec) -> str:
        if function.disabled:
            return f"{function.trigger_type} (disabled by AzureWebJobs.{function.name}.Disabled)"
        if function.not_run is not None:
            return f"{function.trigger_type} ({function.not_run})"
        trigger = function.trigger
        if function.trigger_type == "httpTrigger":
            methods = trigger.get("methods")
            listed = f"[{','.join(str(method).upper() for method in methods)}] " if methods else ""
            return f"{listed}{self.url_for(str(trigger['route']))}"
        if function.trigger_type == "queueTrigger":
            return f"queueTrigger (queue '{trigger['queueName']}')"
        return f"timerTrigger (schedule '{trigger['schedule']}')"


def _report_crash(task: asyncio.Task[None]) -> None:
    # Listeners and timers only end by cancellation; anything else is a dev host bug worth seeing at once.
    if not task.cancelled() and task.exception() is not None:
        log.error("A trigger runner stopped unexpectedly", exc_info=task.exception())


async def serve(
    app_module: str = "function_app",
    *,
    port: int = DEFAULT_PORT,
    host: str = "127.0.0.1",
    function_key: str | None = None,
    admin_key: str | None = None,
    storage: str | None = None,
    host_json: Path = Path("host.json"),
    local_settings: Path = Path("local.settings.json"),
    ready: asyncio.Event | None = None,
) -> None:
    """Run the dev host until cancelled (Ctrl+C in `asyncio.run`); `ready` is set once it serves.

    Raises DevHostError or ConfigError when the app cannot be indexed or a setting is wrong.
    """
    devhost = DevHost(
        app_module,
        port=port,
        host=host,
        function_key=function_key,
        admin_key=admin_key,
        storage=storage,
        host_json=host_json,
        local_settings=local_settings,
    )
    await devhost.start()
    try:
        if ready is not None:
            ready.set()
        await devhost.wait()
    finally:
        await devhost.stop()
