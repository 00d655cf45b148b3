"""The whole system on one machine: Azurite, both emulators, the dev host running function_app.

Used by `make demo`, the end-to-end tests and the live-pipeline benchmark, so
all three exercise the same wiring a user gets: real HTTP between the function
app and the emulators, real Storage queues and tables, webhooks registered
through the Dataverse Web API, and F&O data events the way Power Platform
delivers them: `register-webhooks` puts steps on the F&O virtual tables'
OnExternal* messages, the Dataverse emulator (given the F&O emulator's URL)
activates the data events in the F&O emulator, and each F&O change comes back
through Dataverse as a webhook of those steps to `/api/fo/<template>`.

By default everything runs in the caller's process. `emulators_in_child=True` serves
both emulators from a child process instead (the benchmark uses it): in production
F&O and Dataverse are not on the function app's CPU, so a measurement of the function
app should not pay for them either.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from devkit.azurite import Azurite, free_port
from loyaltysync.templates import Template, default_mappings_dir, load_templates

NEVER = "0 0 0 1 1 *"  # a CRON schedule for 1 January at midnight: the timer reconciler stays off

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Server:
    """One uvicorn server on a background task."""

    name: str
    app: Any
    port: int
    _server: uvicorn.Server | None = None
    _task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        from devkit.sandbox.common import drop_aware

        # drop_aware lets the emulators' "dropped connection" fault close the socket with no response.
        config = uvicorn.Config(
            drop_aware(self.app), host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(), name=f"uvicorn-{self.name}")
        for _ in range(200):
            if self._server.started:
                return
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.025)
        raise RuntimeError(f"{self.name} did not start on port {self.port}")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._task, timeout=10)


@dataclass
class RemoteServer:
    """An emulator served by the child process of `ChildEmulators`: only its address is here."""

    name: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class ChildEmulators:
    """Both emulators in a child process (`python -m devkit.stack emulators CONFIG`), until stopped."""

    def __init__(self, config: dict[str, Any]) -> None:
        self._config = config
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Spawn the child and wait for its ready line. Raises RuntimeError if it does not come."""
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "devkit.stack",
            "emulators",
            json.dumps(self._config),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=str(REPO),
        )
        assert self._process.stdout is not None  # noqa: S101 - asked for above
        try:
            async with asyncio.timeout(60):
                line = await self._process.stdout.readline()
        except TimeoutError:
            line = b""
        if not line.strip():
            await self.stop()
            raise RuntimeError("the emulators' child process did not start")

    async def stop(self) -> None:
        """Close the child's stdin (it stops its servers and exits); kill it if it does not."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            async with asyncio.timeout(30):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


def _emulator_servers(
    token: str, seed: int | None, templates: dict[str, Template], fo_port: int, dv_port: int
) -> tuple[Server, Server]:
    """The two emulator servers (not started), as `running_stack` and its child process build them."""
    from devkit.sandbox import dataverse as dataverse_emulator
    from devkit.sandbox import fno as fno_emulator

    fo = Server(
        "fo",
        fno_emulator.create_app(token=token, seed=seed, templates=templates, public_url=f"http://127.0.0.1:{fo_port}"),
        fo_port,
    )
    dv = Server(
        "dataverse",
        dataverse_emulator.create_app(
            token=token,
            seed=seed,
            templates=templates,
            public_url=f"http://127.0.0.1:{dv_port}",
            fno_url=fo.url,  # its F&O connection: where it activates data events for virtual-table steps
        ),
        dv_port,
    )
    return fo, dv


async def _serve_emulators(config: dict[str, Any]) -> None:
    """The child process: serve both emulators, print one line when ready, stop when stdin closes."""
    templates_dir = config.get("templates_dir")
    templates = load_templates(Path(templates_dir) if templates_dir else default_mappings_dir())
    fo, dv = _emulator_servers(config["token"], config["seed"], templates, config["fo_port"], config["dv_port"])
    await fo.start()
    await dv.start()
    print(json.dumps({"fo": fo.url, "dataverse": dv.url}), flush=True)
    try:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        await dv.stop()
        await fo.stop()


@dataclass
class Stack:
    """Everything running; `env` holds the settings the function app was started with."""

    token: str
    templates: dict[str, Template]
    azurite: Azurite
    fo: Server | RemoteServer
    dataverse: Server | RemoteServer
    devhost: Any
    env: dict[str, str] = field(default_factory=dict)

    def admin(self, server: Server | RemoteServer) -> httpx.AsyncClient:
        """An HTTP client for an emulator's /_admin endpoint."""
        return httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=60)

    @property
    def function_url(self) -> str:
        return str(self.devhost.base_url)

    @property
    def function_key(self) -> str:
        return str(self.devhost.function_key)

    @property
    def admin_key(self) -> str:
        return str(self.devhost.admin_key)


def sandbox_settings(fo_url: str, dv_url: str, token: str, storage: str) -> dict[str, str]:
    """The function app's settings against the sandbox emulators and an Azurite, with fresh keys.

    The timer reconciler stays off (a caller runs its passes itself) and the pause flag is
    re-checked every second.
    """
    from devkit.sandbox.dataverse import INTEGRATION_USER

    return {
        "FNO_URL": fo_url,
        "DATAVERSE_URL": dv_url,
        "LOYALTYSYNC_SANDBOX_TOKEN": token,
        "AzureWebJobsStorage": storage,
        "INTEGRATION_USER_IDS": INTEGRATION_USER.systemuserid,
        "RECONCILE_SCHEDULE": NEVER,
        "PAUSE_RECHECK_SECONDS": "1",
        "CONFLICT_GRACE_SECONDS": "3",  # the sandbox delivers events within a second
        "DEV_FUNCTION_KEY": secrets.token_urlsafe(24),
        "DEV_ADMIN_KEY": secrets.token_urlsafe(24),
    }


@contextlib.asynccontextmanager
async def running_stack(
    *,
    seed: int | None = 7,
    templates_dir: Path | None = None,
    extra_env: dict[str, str] | None = None,
    fo_event_format: str = "data-event",
    emulators_in_child: bool = False,
) -> AsyncIterator[Stack]:
    """Start Azurite, the emulators and the dev host; register webhooks and event subscriptions.

    `emulators_in_child`: serve the emulators from a child process (their `app` objects are
    then not reachable from here, only their URLs and admin endpoints).
    """
    from devkit.devhost import DevHost
    from loyaltysync.runtime import close_runtime

    templates = load_templates(templates_dir or default_mappings_dir())
    token = secrets.token_urlsafe(24)
    fo_port, dv_port = free_port(), free_port()
    fo: Server | RemoteServer
    dv: Server | RemoteServer
    child: ChildEmulators | None = None
    if emulators_in_child:
        fo, dv = RemoteServer("fo", fo_port), RemoteServer("dataverse", dv_port)
        config = {"token": token, "seed": seed, "fo_port": fo_port, "dv_port": dv_port}
        child = ChildEmulators({**config, "templates_dir": str(templates_dir) if templates_dir else None})
    else:
        fo, dv = _emulator_servers(token, seed, templates, fo_port, dv_port)
    saved = dict(os.environ)
    async with Azurite() as azurite:
        env = {
            **sandbox_settings(fo.url, dv.url, token, azurite.connection_string),
            **({"MAPPINGS_DIR": str(templates_dir)} if templates_dir else {}),
            **(extra_env or {}),
        }
        os.environ.update(env)
        devhost = DevHost(
            "function_app",
            port=free_port(),
            storage=azurite.connection_string,
            host_json=REPO / "host.json",
            local_settings=REPO / "local.settings.json.absent",
        )
        try:
            if child is not None:
                await child.start()
            elif isinstance(fo, Server) and isinstance(dv, Server):
                await fo.start()
                await dv.start()
            await devhost.start()
            stack = Stack(
                token=token, templates=templates, azurite=azurite, fo=fo, dataverse=dv, devhost=devhost, env=env
            )
            await register(stack, fo_event_format=fo_event_format)
            yield stack
        finally:
            await devhost.stop()
            await close_runtime()
            if child is not None:
                await child.stop()
            if isinstance(dv, Server):
                await dv.stop()
            if isinstance(fo, Server):
                await fo.stop()
            os.environ.clear()
            os.environ.update(saved)


async def settle(stack: Stack, *, seconds: float = 60.0) -> None:
    """Wait until both emulators delivered their events and every queue is empty."""
    from loyaltysync.operations import status
    from loyaltysync.runtime import get_runtime

    runtime = await get_runtime()
    deadline = asyncio.get_running_loop().time() + seconds
    quiet_rounds = 0
    while asyncio.get_running_loop().time() < deadline:
        for server in (stack.fo, stack.dataverse):
            async with stack.admin(server) as admin:
                await admin.post("/_admin/deliveries/drain")
        report = await status(runtime)
        busy = sum(t["backlog"] for t in report["templates"].values())
        quiet_rounds = quiet_rounds + 1 if busy == 0 else 0
        if quiet_rounds >= 3:  # queue counts are approximate and messages in flight are invisible
            return
        await asyncio.sleep(0.3)
    raise TimeoutError(f"the pipeline did not settle within {seconds:.0f} s")


async def register(stack: Stack, *, fo_event_format: str = "data-event") -> None:
    """What `register-webhooks` does, through the Dataverse Web API (the real registration path).

    "data-event": Dataverse webhooks plus the steps on the F&O virtual tables, whose
    registration activates the data events in the F&O emulator (checked here, so a
    Dataverse emulator without its F&O connection fails loudly instead of losing
    every F&O change). "business-event": Dataverse webhooks only, and F&O sends
    business events straight to `/api/fo/<template>`, as an HTTPS endpoint does.
    """
    from loyaltysync import webhooks
    from loyaltysync.targets.auth import StaticTokenCredential
    from loyaltysync.targets.dataverse import DataverseClient

    if fo_event_format not in ("data-event", "business-event"):
        raise ValueError(f"fo_event_format must be 'data-event' or 'business-event', got {fo_event_format!r}")
    data_events = fo_event_format == "data-event"
    async with DataverseClient(stack.dataverse.url, StaticTokenCredential(stack.token)) as client:
        plan = await webhooks.plan(
            client, stack.templates, function_url=stack.function_url, function_key=stack.function_key,
            fo_data_events=data_events,
        )
        await webhooks.apply(client, plan)
    if data_events:
        async with stack.admin(stack.dataverse) as admin:
            link = (await admin.get("/_admin/fno/link")).raise_for_status().json()
        missing = {t.fo.entity_set for t in stack.templates.values() if t.fo.virtual_table_name} - set(link["active"])
        if link["fno_url"] is None or link["last_error"] or missing:
            raise RuntimeError(f"the Dataverse emulator did not activate F&O data events for {sorted(missing)}: {link}")
        return
    async with stack.admin(stack.fo) as admin:
        for template in stack.templates.values():
            response = await admin.post(
                "/_admin/subscriptions",
                json={
                    "entity_set": template.fo.entity_set,
                    "url": f"{stack.function_url}/api/fo/{template.name}?code={stack.function_key}",
                    "format": "business-event",
                },
            )
            response.raise_for_status()


if __name__ == "__main__":
    if sys.argv[1:2] != ["emulators"] or len(sys.argv) != 3:
        raise SystemExit("usage: python -m devkit.stack emulators CONFIG_JSON (started by running_stack)")
    asyncio.run(_serve_emulators(json.loads(sys.argv[2])))
