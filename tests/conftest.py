"""Session fixtures shared by every test: one Azurite for the whole run, unique names per test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from devkit.azurite import Azurite
from loyaltysync.runtime import Runtime, build_runtime
from loyaltysync.settings import load_settings
from loyaltysync.templates import default_mappings_dir, load_templates

RuntimeFactory = Callable[..., Awaitable[Runtime]]


@pytest.fixture(scope="session")
async def azurite() -> AsyncIterator[Azurite]:
    """One in-memory Azurite on free loopback ports, started once per test session."""
    async with Azurite() as instance:
        yield instance


@pytest.fixture
def storage_connection_string(azurite: Azurite) -> str:
    """Connection string of the session's Azurite (tables, queues, blobs)."""
    return azurite.connection_string


@pytest.fixture
def unique_name() -> str:
    """A per-test suffix that is a valid table and queue name by itself: a letter and 12 hex digits."""
    return "u" + uuid.uuid4().hex[:12]


@pytest.fixture
def sandbox_environ(storage_connection_string: str, unique_name: str) -> dict[str, str]:
    """App settings for a runtime against in-process emulators (http://fo.test, http://dv.test) and the
    session's Azurite, with this test's own queues and tables. Add the token: `{**sandbox_environ, ...}`."""
    return {
        "FNO_URL": "http://fo.test",
        "DATAVERSE_URL": "http://dv.test",
        "AzureWebJobsStorage": storage_connection_string,
        "QUEUE_PREFIX": unique_name,
        "STATE_TABLE": f"{unique_name}s",
        "DEADLETTER_TABLE": f"{unique_name}d",
        "CONTROL_TABLE": f"{unique_name}c",
    }


@pytest.fixture
async def make_runtime(sandbox_environ: dict[str, str]) -> AsyncIterator[RuntimeFactory]:
    """Runtimes on the session's Azurite sharing this test's tables and queues (like two instances);
    the targets (http://fo.test, http://dv.test) are never reached. `await make_runtime(SETTING="v")`."""
    built: list[Runtime] = []
    templates = load_templates(default_mappings_dir())

    async def make(**settings: str) -> Runtime:
        environ = {**sandbox_environ, "LOYALTYSYNC_SANDBOX_TOKEN": "runtime-test-token", **settings}
        runtime = build_runtime(load_settings(environ), templates)
        built.append(runtime)
        return runtime

    yield make
    for runtime in built:
        await runtime.aclose()
