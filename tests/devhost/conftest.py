"""Fixtures for the dev host tests: tiny function apps written as modules, and running hosts on free ports."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import ResourceExistsError
from azure.core.pipeline.transport import AsyncioRequestsTransport
from azure.storage.queue.aio import QueueClient

from devkit.devhost import DevHost


@pytest.fixture
def app_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder on sys.path for the test's function app module, host.json and local.settings.json."""
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.fixture
def write_app(app_dir: Path) -> Iterator[Callable[[str], str]]:
    """Write function app source into a uniquely named module; returns the module name."""
    written: list[str] = []

    def write(source: str) -> str:
        name = f"devhost_app_{uuid.uuid4().hex[:10]}"
        (app_dir / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


@pytest.fixture
async def start_host(app_dir: Path, storage_connection_string: str) -> AsyncIterator[Callable[..., Awaitable[DevHost]]]:
    """Start a DevHost on a free port against the session's Azurite; every host is stopped after the test."""
    hosts: list[DevHost] = []

    async def start(
        module: str,
        *,
        host_json: dict[str, Any] | None = None,
        settings: dict[str, str] | None = None,
        out: io.StringIO | None = None,
        **kwargs: Any,
    ) -> DevHost:
        (app_dir / "host.json").write_text(json.dumps({"version": "2.0", **(host_json or {})}), encoding="utf-8")
        local = {"IsEncrypted": False, "Values": {"FUNCTIONS_WORKER_RUNTIME": "python", **(settings or {})}}
        (app_dir / "local.settings.json").write_text(json.dumps(local), encoding="utf-8")
        host = DevHost(
            module,
            port=0,
            host_json=app_dir / "host.json",
            local_settings=app_dir / "local.settings.json",
            storage=storage_connection_string,
            out=out if out is not None else io.StringIO(),
            **kwargs,
        )
        hosts.append(host)
        await host.start()
        return host

    yield start
    for host in hosts:
        await host.stop()


@pytest.fixture
async def raw_queue(storage_connection_string: str) -> AsyncIterator[Callable[[str], Awaitable[QueueClient]]]:
    """Queue clients that read and write raw message text (no encoding policy), queue created."""
    clients: list[QueueClient] = []

    async def open_queue(name: str) -> QueueClient:
        client = QueueClient.from_connection_string(
            storage_connection_string, name, transport=AsyncioRequestsTransport()
        )
        clients.append(client)
        with contextlib.suppress(ResourceExistsError):  # the host may have created it already
            await client.create_queue()
        return client

    yield open_queue
    for client in clients:
        await client.close()
