"""The system under chaos: Azurite, the emulators (a process of their own) and the dev host in this process.

The same wiring as `devkit.stack.running_stack` (real HTTP, real Storage
queues and tables, webhooks registered through the Dataverse Web API, F&O data
events subscribed), with two differences: the emulators run in a child process
(tests/chaos/emulators.py) so the function app gets a core of its own, and the
dev host stays in this process so the run can install its crash hook in the
worker and read the runtime (queues, dead letters) directly. During the load
the run adds a second function-app instance on the same queues, in a process
it kills and restarts (tests/chaos/worker_process.py, started with this
stack's environment).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from azure.core.exceptions import ResourceNotFoundError

from devkit.azurite import Azurite, free_port
from devkit.stack import REPO, Server, Stack, register, sandbox_settings
from loyaltysync.runtime import Runtime
from loyaltysync.templates import default_mappings_dir, load_templates

APP_MODULE = "function_app"


async def _start_emulators(token: str, seed: int) -> tuple[asyncio.subprocess.Process, dict[str, int]]:
    env = {**os.environ, "LOYALTYSYNC_SANDBOX_TOKEN": token, "CHAOS_SEED": str(seed)}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.chaos.emulators",
        cwd=str(REPO),
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), timeout=60)
        ports: dict[str, int] = json.loads(line)
    except (TimeoutError, ValueError):
        process.terminate()
        await process.wait()
        raise RuntimeError("the chaos emulators did not start") from None
    return process, ports


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout=15)
        except TimeoutError:
            process.kill()
            await process.wait()


@contextlib.asynccontextmanager
async def chaos_stack(*, seed: int, extra_env: dict[str, str] | None = None) -> AsyncIterator[Stack]:
    """Everything running and registered; the Stack's emulator `Server`s have no in-process app."""
    from devkit.devhost import DevHost
    from loyaltysync.runtime import close_runtime

    templates = load_templates(default_mappings_dir())
    token = secrets.token_urlsafe(24)
    saved = dict(os.environ)
    process, ports = await _start_emulators(token, seed)
    fo, dv = Server("fo", None, ports["fo"]), Server("dataverse", None, ports["dataverse"])
    try:
        async with Azurite() as azurite:
            env = {
                **sandbox_settings(fo.url, dv.url, token, azurite.connection_string),
                # How long another instance may act on a stale pause flag; the conflict windows wait this out.
                "PAUSE_CACHE_SECONDS": "1",
                # Longer than an event can be held up here (delivery delays, a crashed message's
                # visibility timeout, the backlog the generator allows), shorter than the default.
                "CONFLICT_GRACE_SECONDS": "15",
                # The host ends an invocation after functionTimeout, and another instance's intent counts as
                # a dead step's only once that long has passed: a short one here, so records a crash left
                # an intent on are judged within the run (the dev host enforces it as the host does).
                "AzureFunctionsJobHost__functionTimeout": "00:00:20",
                # The second instance's queue lease (tests/chaos/worker_process.py), so the engine's waits for an
                # event a killed instance may hold last as long as that lease, not Azure's 10 minutes.
                "QUEUE_LEASE_SECONDS": "8",
                **(extra_env or {}),
            }
            os.environ.update(env)
            sys.modules.pop(APP_MODULE, None)  # function_app reads its settings at import
            devhost = DevHost(
                APP_MODULE,
                port=free_port(),
                storage=azurite.connection_string,
                host_json=REPO / "host.json",
                local_settings=REPO / "local.settings.json.absent",
                out=io.StringIO(),  # the banner is noise here
            )
            await devhost.start()
            stack = Stack(token=token, templates=templates, azurite=azurite, fo=fo, dataverse=dv, devhost=devhost,
                          env=env)
            try:
                await register(stack, fo_event_format="data-event")
                yield stack
            finally:
                await devhost.stop()
                await close_runtime()
    finally:
        sys.modules.pop(APP_MODULE, None)
        await _stop(process)
        os.environ.clear()
        os.environ.update(saved)


class Admin:
    """One long-lived client per emulator `/_admin` endpoint (a new httpx client costs an SSL context, ~40 ms)."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        headers = {"Authorization": f"Bearer {stack.token}"}
        # Idle connections are dropped before the emulators' server closes them (uvicorn: 5 s), so a
        # request is never sent on a connection the server is closing ("Server disconnected").
        limits = httpx.Limits(keepalive_expiry=2)
        self.clients = {
            side: httpx.AsyncClient(base_url=url, headers=headers, timeout=60, limits=limits)
            for side, url in (("fo", stack.fo.url), ("dataverse", stack.dataverse.url))
        }

    async def aclose(self) -> None:
        for client in self.clients.values():
            await client.aclose()

    async def faults(self, side: str, **changes: Any) -> None:
        """PATCH /_admin/faults on one emulator ("fo" or "dataverse")."""
        response = await self.clients[side].patch("/_admin/faults", json=changes)
        if response.status_code != httpx.codes.OK:
            raise RuntimeError(f"faults refused by {side}: {response.text}")

    async def counters(self) -> dict[str, dict[str, Any]]:
        """`/_admin/stats` of both emulators: counters plus `pending_deliveries`."""
        found = {}
        for side, client in self.clients.items():
            response = await client.get("/_admin/stats")
            response.raise_for_status()
            stats = response.json()
            found[side] = {**stats["counters"], "pending_deliveries": stats.get("pending_deliveries", 0)}
        return found

    async def creates(self) -> dict[str, dict[str, int]]:
        """The emulators' create tallies: {"fo": {"<entity set>|<key>": n}, "dataverse": {...}}."""
        found: dict[str, dict[str, int]] = {}
        for side, client in self.clients.items():
            response = await client.get("/_chaos/creates")
            response.raise_for_status()
            found[side] = response.json()[side]
        return found

    async def post(self, side: str, path: str, body: Any) -> None:
        response = await self.clients[side].post(path, json=body)
        response.raise_for_status()

    async def drain(self) -> None:
        """Wait until both emulators delivered every pending event."""
        for client in self.clients.values():
            await client.post("/_admin/deliveries/drain", params={"timeout_s": "60"})


async def queue_depth(runtime: Runtime, *, poison: bool = True) -> int:
    """Messages in the function app's queues (visible or not), poison queues included by default."""
    total = 0
    for name in runtime.templates:
        for is_poison in (False, True) if poison else (False,):
            try:
                props = await runtime.queue(name, poison=is_poison).get_queue_properties()
            except ResourceNotFoundError:
                continue
            total += int(props.approximate_message_count or 0)
    return total


async def settle(runtime: Runtime, admin: Admin, *, seconds: float) -> None:
    """Wait until the emulators delivered everything and every queue stayed empty for a few looks."""
    deadline = time.monotonic() + seconds
    quiet = 0
    while time.monotonic() < deadline:
        await admin.drain()
        quiet = quiet + 1 if await queue_depth(runtime) == 0 else 0
        if quiet >= 3:  # counts are approximate, and a crashed message is invisible for a while
            return
        await asyncio.sleep(0.3)
    raise TimeoutError(f"the pipeline did not settle within {seconds:.0f} s")
