"""Azurite as a child process: connection strings, start, stop and clear failures."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
from azure.data.tables.aio import TableServiceClient

from devkit.azurite import (
    ACCOUNT_KEY,
    ACCOUNT_NAME,
    Azurite,
    AzuriteError,
    development_connection_string,
    expand_connection_string,
    free_port,
)
from loyaltysync.state_tables import service_from_connection_string


def settings(connection_string: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in connection_string.split(";") if part)


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize(
    "shorthand", ["UseDevelopmentStorage=true", "UseDevelopmentStorage=True;", " usedevelopmentstorage = TRUE "]
)
def test_development_storage_shorthand_expands_to_the_default_ports(shorthand: str) -> None:
    assert settings(expand_connection_string(shorthand)) == {
        "DefaultEndpointsProtocol": "http",
        "AccountName": ACCOUNT_NAME,
        "AccountKey": ACCOUNT_KEY,
        "BlobEndpoint": "http://127.0.0.1:10000/devstoreaccount1",
        "QueueEndpoint": "http://127.0.0.1:10001/devstoreaccount1",
        "TableEndpoint": "http://127.0.0.1:10002/devstoreaccount1",
    }


@pytest.mark.parametrize(
    "other",
    [
        "DefaultEndpointsProtocol=https;AccountName=prod;AccountKey=abc==;EndpointSuffix=core.windows.net",
        "UseDevelopmentStorage=false",
        development_connection_string(1, 2, 3),
    ],
)
def test_other_connection_strings_are_left_alone(other: str) -> None:
    assert expand_connection_string(other) == other


async def test_session_azurite_serves_tables_on_its_own_ports(azurite: Azurite, unique_name: str) -> None:
    parts = settings(azurite.connection_string)
    assert parts["TableEndpoint"] == f"http://127.0.0.1:{azurite.table_port}/devstoreaccount1"
    assert parts["QueueEndpoint"] == f"http://127.0.0.1:{azurite.queue_port}/devstoreaccount1"
    assert parts["BlobEndpoint"] == f"http://127.0.0.1:{azurite.blob_port}/devstoreaccount1"
    assert len({azurite.blob_port, azurite.queue_port, azurite.table_port}) == 3
    assert azurite.running
    client: TableServiceClient = service_from_connection_string(azurite.connection_string)
    async with client:
        await client.create_table(unique_name)
        assert unique_name in [t.name async for t in client.list_tables()]


async def test_start_on_given_ports_then_stop_frees_them() -> None:
    ports = free_port(), free_port(), free_port()
    instance = Azurite(blob_port=ports[0], queue_port=ports[1], table_port=ports[2])
    await instance.start()
    try:
        assert (instance.blob_port, instance.queue_port, instance.table_port) == ports
        assert all(listening(port) for port in ports)
        with pytest.raises(AzuriteError, match="already started"):
            await instance.start()
    finally:
        await instance.stop()
    assert not instance.running
    assert not any(listening(port) for port in ports)
    await instance.stop()  # twice is harmless
    with pytest.raises(AzuriteError, match="not started"):
        _ = instance.connection_string


async def test_missing_node_modules_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(AzuriteError, match=r"run `make test` or `npm install` first"):
        await Azurite(executable=tmp_path / "node_modules" / ".bin" / "azurite").start()


def fake_azurite(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "azurite"
    script.write_text(f"#!{sys.executable}\nimport sys, time\n{body}\n")
    script.chmod(0o755)
    return script


async def test_a_crash_at_start_reports_azurite_stderr(tmp_path: Path) -> None:
    script = fake_azurite(tmp_path, "sys.stderr.write('Exit due to unhandled error: boom\\n'); sys.exit(3)")
    with pytest.raises(AzuriteError, match=r"exited with code 3(.|\n)*boom"):
        await Azurite(executable=script).start()


async def test_not_listening_in_time_is_reported_and_the_process_is_stopped(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    script = fake_azurite(
        tmp_path,
        f"import os\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "print('hung', file=sys.stderr, flush=True)\ntime.sleep(60)",
    )
    instance = Azurite(executable=script, startup_timeout=0.5)
    with pytest.raises(AzuriteError, match=r"did not listen(.|\n)*hung"):
        await instance.start()
    assert not instance.running
    with pytest.raises(ProcessLookupError):  # terminated and reaped, not left running
        os.kill(int(pid_file.read_text()), 0)
