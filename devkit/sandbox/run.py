"""Run both emulators (F&O and Dataverse) with uvicorn in one event loop until interrupted."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.routing import Route

from devkit.sandbox.common import drop_aware, sandbox_token
from loyaltysync.templates import default_mappings_dir, load_templates

FO_ROOT = "/data"
DATAVERSE_ROOT = "/api/data/v9.2"


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to run_sandbox: two servers cannot both own SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    """Bind before building the apps, so port 0 works and a busy port fails with a clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _public_url(host: str, sock: socket.socket) -> str:
    port = sock.getsockname()[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host  # noqa: S104 - comparing, not binding
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def _admin_paths(app: Starlette) -> list[str]:
    return sorted(
        f"{'/'.join(sorted(set(route.methods or ()) - {'HEAD'}))} {route.path}"
        for route in app.routes
        if isinstance(route, Route) and route.path.startswith("/_admin")
    )


async def run_sandbox(
    fo_port: int = 7081,
    dataverse_port: int = 7082,
    seed: int | None = None,
    host: str = "127.0.0.1",
    templates_dir: Path | None = None,
) -> None:
    """Serve the F&O emulator on `fo_port` and the Dataverse emulator on `dataverse_port` until SIGINT/SIGTERM.

    Both accept one bearer token: LOYALTYSYNC_SANDBOX_TOKEN, or a generated one that is printed.
    `seed` makes injected faults reproducible; `templates_dir` (default `mappings/`) adds tables
    for user-added templates. Port 0 picks a free port (the printed URLs show which).
    """
    from devkit.sandbox import dataverse, fno

    token, generated = sandbox_token()
    templates = load_templates(templates_dir or default_mappings_dir())
    fo_socket = _bind(host, fo_port)
    dv_socket = _bind(host, dataverse_port)
    fo_url, dv_url = _public_url(host, fo_socket), _public_url(host, dv_socket)
    fo_app = fno.create_app(token=token, seed=seed, templates=templates, public_url=fo_url)
    # The Dataverse emulator's F&O connection: steps on virtual tables activate data events there.
    dv_app = dataverse.create_app(token=token, seed=seed, templates=templates, public_url=dv_url, fno_url=fo_url)

    servers = [
        _Server(uvicorn.Config(drop_aware(fo_app), log_level="warning", lifespan="on")),
        _Server(uvicorn.Config(drop_aware(dv_app), log_level="warning", lifespan="on")),
    ]

    print(f"F&O emulator:       {fo_url}{FO_ROOT}/")
    print(f"Dataverse emulator: {dv_url}{DATAVERSE_ROOT}/")
    source = "generated; set LOYALTYSYNC_SANDBOX_TOKEN to choose one" if generated else "from LOYALTYSYNC_SANDBOX_TOKEN"
    print(f"Bearer token ({source}): {token}")
    print(f"Seed: {seed if seed is not None else 'none (faults are not reproducible)'}")
    for label, url, app in (("F&O", fo_url, fo_app), ("Dataverse", dv_url, dv_app)):
        print(f"{label} admin endpoints (same token):")
        for line in _admin_paths(app):
            method, path = line.split(" ", 1)
            print(f"  {method:<14} {url}{path}")
    print("Press Ctrl+C to stop.", flush=True)

    loop = asyncio.get_running_loop()

    def stop() -> None:
        for server in servers:
            if server.should_exit:
                server.force_exit = True  # a second Ctrl+C stops without waiting for open connections
            server.should_exit = True

    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # Windows, or not the main thread
            pass
    tasks = [
        asyncio.create_task(servers[0].serve(sockets=[fo_socket]), name="fo-emulator"),
        asyncio.create_task(servers[1].serve(sockets=[dv_socket]), name="dataverse-emulator"),
    ]
    try:
        # When one server stops (signal or failure), stop the other too.
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            task.result()
    finally:
        stop()
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sig in installed:
            loop.remove_signal_handler(sig)
        fo_socket.close()
        dv_socket.close()
