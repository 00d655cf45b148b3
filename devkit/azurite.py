"""Azurite, the local Azure Storage emulator, as a child process.

The demo, the dev host and the tests all get their queues and tables from
here: `Azurite` starts `node_modules/.bin/azurite` in memory on loopback ports,
waits until blob, queue and table ports accept connections and hands out the
connection string. The account name and key below are Azurite's documented
development account (public, not a secret).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from loyaltysync.storage_connection import (
    ACCOUNT_KEY,
    ACCOUNT_NAME,
    DEFAULT_PORTS,
    LOOPBACK,
    development_connection_string,
    expand_connection_string,
)

__all__ = [
    "ACCOUNT_KEY",
    "ACCOUNT_NAME",
    "DEFAULT_PORTS",
    "LOOPBACK",
    "Azurite",
    "AzuriteError",
    "development_connection_string",
    "expand_connection_string",
    "free_port",
    "repo_root",
]
STARTUP_TIMEOUT = 20.0
_STOP_GRACE = 5.0
_PORT_RETRIES = 3  # free ports are picked before Azurite binds them; another process may win the race


def repo_root() -> Path:
    """The repository root (where package.json and node_modules live)."""
    return Path(__file__).resolve().parent.parent


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on `host` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class AzuriteError(RuntimeError):
    """Azurite is not installed, or did not start. The message says what to do."""


class Azurite:
    """One Azurite process: blob, queue and table services, in memory.

    Use as `async with Azurite() as azurite:` or call `start()` / `stop()`.
    Ports not given are picked free on 127.0.0.1.
    """

    def __init__(
        self,
        *,
        blob_port: int | None = None,
        queue_port: int | None = None,
        table_port: int | None = None,
        executable: Path | None = None,
        startup_timeout: float = STARTUP_TIMEOUT,
    ) -> None:
        self._requested = (blob_port, queue_port, table_port)
        self.executable = executable or repo_root() / "node_modules" / ".bin" / "azurite"
        self.startup_timeout = startup_timeout
        self.host = LOOPBACK
        self.blob_port, self.queue_port, self.table_port = 0, 0, 0
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._stderr: IO[bytes] | None = None

    @property
    def running(self) -> bool:
        """True while the Azurite process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def connection_string(self) -> str:
        """Connection string for the development account on this instance's ports."""
        if self._process is None:
            raise AzuriteError("Azurite is not started")
        return development_connection_string(self.blob_port, self.queue_port, self.table_port, self.host)

    @property
    def table_endpoint(self) -> str:
        return f"http://{self.host}:{self.table_port}/{ACCOUNT_NAME}"

    @property
    def queue_endpoint(self) -> str:
        return f"http://{self.host}:{self.queue_port}/{ACCOUNT_NAME}"

    @property
    def blob_endpoint(self) -> str:
        return f"http://{self.host}:{self.blob_port}/{ACCOUNT_NAME}"

    async def start(self) -> Self:
        """Start Azurite and wait until its three ports accept connections.

        Raises AzuriteError when node_modules is missing, or with Azurite's
        stderr when it exits or is not listening within `startup_timeout`.
        """
        if self._process is not None:
            raise AzuriteError("Azurite is already started")
        if not self.executable.exists():
            raise AzuriteError(
                f"Azurite is not installed ({self.executable} is missing): run `make test` or `npm install` first"
            )
        explicit = all(port is not None for port in self._requested)
        for attempt in range(1 if explicit else _PORT_RETRIES):
            self._spawn()
            try:
                await self._wait_until_listening()
                return self
            except AzuriteError:
                port_clash = "EADDRINUSE" in self._stderr_text()
                await self.stop()
                if explicit or not port_clash or attempt == _PORT_RETRIES - 1:
                    raise
            except BaseException:
                await self.stop()  # never leave a half-started process behind (e.g. on cancellation)
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def stop(self) -> None:
        """Stop the process (terminate, then kill) and remove its work folder. Safe to call twice."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                await asyncio.to_thread(process.wait, _STOP_GRACE)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _spawn(self) -> None:
        blob, queue, table = self._requested
        self.blob_port = blob if blob is not None else free_port(self.host)
        self.queue_port = queue if queue is not None else free_port(self.host)
        self.table_port = table if table is not None else free_port(self.host)
        self._workdir = Path(tempfile.mkdtemp(prefix="azurite-"))
        # Azurite refuses --location together with --inMemoryPersistence; the work folder is its cwd
        # instead, so anything it does write lands there and is removed on stop.
        # stderr goes to a file, not a pipe: nobody reads it while Azurite runs, and a full pipe blocks it.
        self._stderr = (self._workdir / "stderr.log").open("w+b")
        command = [
            str(self.executable),
            "--inMemoryPersistence",
            "--skipApiVersionCheck",
            "--disableTelemetry",
            "--silent",
            "--blobHost", self.host, "--blobPort", str(self.blob_port),
            "--queueHost", self.host, "--queuePort", str(self.queue_port),
            "--tableHost", self.host, "--tablePort", str(self.table_port),
        ]  # fmt: skip
        self._process = subprocess.Popen(  # noqa: S603 - fixed executable and arguments, no shell
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            cwd=self._workdir,
        )

    async def _wait_until_listening(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        pending = {self.blob_port, self.queue_port, self.table_port}
        while pending:
            process = self._process
            if process is None or process.poll() is not None:
                code = None if process is None else process.returncode
                raise AzuriteError(f"Azurite exited with code {code} while starting:\n{self._stderr_text()}")
            if time.monotonic() > deadline:
                raise AzuriteError(
                    f"Azurite did not listen on ports {sorted(pending)} within {self.startup_timeout:g} s:\n"
                    f"{self._stderr_text()}"
                )
            for port in sorted(pending):
                if await _accepts(self.host, port):
                    pending.discard(port)
            if pending:
                await asyncio.sleep(0.05)

    def _stderr_text(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.flush()
        self._stderr.seek(0)
        text = self._stderr.read().decode("utf-8", "replace").strip()
        return text[-4000:] or "(no output on stderr)"


async def _accepts(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout=1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
