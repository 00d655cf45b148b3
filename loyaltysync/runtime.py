"""The process-wide objects the functions share: settings, templates, one client per target, stores.

Built once per worker process on first use (Functions reuses processes, so the
HTTP connection pools and token caches live across invocations) and closed by
the dev host and tests.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import ResourceExistsError
from azure.data.tables.aio import TableServiceClient
from azure.storage.queue import BinaryBase64DecodePolicy, BinaryBase64EncodePolicy
from azure.storage.queue.aio import QueueClient, QueueServiceClient

from loyaltysync.azurite import expand_connection_string
from loyaltysync.settings import CredentialKind, Settings, load_settings
from loyaltysync.state import ControlStore, DeadLetterStore, StateStore
from loyaltysync.state_tables import TableStorage, async_transport
from loyaltysync.sync import Engine
from loyaltysync.targets.auth import build_credential
from loyaltysync.targets.dataverse import DataverseClient
from loyaltysync.targets.fno import FnoClient
from loyaltysync.targets.lookups import LookupCache
from loyaltysync.templates import Template, load_templates

PAUSE_SCOPE = "pause"
SUCCESS_SCOPE = "last-success"


@dataclass
class Runtime:
    """Everything a function needs, wired once."""

    settings: Settings
    templates: dict[str, Template]
    engine: Engine
    fno: FnoClient
    dataverse: DataverseClient
    state: StateStore
    dead_letters: DeadLetterStore
    control: ControlStore
    queues: QueueServiceClient
    _storage: TableStorage
    _credentials: list[AsyncTokenCredential]

    def queue(self, template: str, *, poison: bool = False) -> QueueClient:
        """The template's Storage queue client, base64 like the Functions queue binding."""
        name = self.settings.queue_name(template) + ("-poison" if poison else "")
        return self.queues.get_queue_client(
            name,
            message_encode_policy=BinaryBase64EncodePolicy(),
            message_decode_policy=BinaryBase64DecodePolicy(),
        )

    async def enqueue(self, template: str, message: str, *, delay_s: int = 0) -> None:
        """Put a ChangeEvent JSON on the template's queue (never expires: pauses have no time limit)."""
        client = self.queue(template)
        try:
            await client.create_queue()
        except ResourceExistsError:
            pass  # the normal case
        await client.send_message(message.encode(), visibility_timeout=delay_s or None, time_to_live=-1)

    async def paused(self, template: str) -> bool:
        doc = await self.control.get(PAUSE_SCOPE, template)
        return bool(doc and doc.get("paused"))

    async def set_paused(self, template: str, paused: bool, reason: str = "") -> None:
        await self.control.set(
            PAUSE_SCOPE, template, {"paused": paused, "reason": reason, "at": datetime.now(UTC).isoformat()}
        )

    async def aclose(self) -> None:
        """Close clients, stores and credentials."""
        await self.fno.aclose()
        await self.dataverse.aclose()
        await self._storage.close()
        await self.queues.close()
        for credential in self._credentials:
            await credential.close()


def build_runtime(
    settings: Settings,
    templates: dict[str, Template] | None = None,
    *,
    fno_transport: httpx.AsyncBaseTransport | None = None,
    dataverse_transport: httpx.AsyncBaseTransport | None = None,
) -> Runtime:
    """Wire the runtime from settings (transports only for in-process tests)."""
    templates = templates or load_templates(settings.mappings_dir)
    if settings.sandbox_mode:
        fno_credential = build_credential("static", static_token=settings.sandbox_token)
        dv_credential = build_credential("static", static_token=settings.sandbox_token)
    else:
        common = {
            "tenant_id": settings.tenant_id,
            "client_id": settings.client_id,
            "client_secret": settings.client_secret,
        }
        fno_credential = build_credential(settings.credential, **common)
        dv_credential = build_credential(settings.credential, **common)
    fno = FnoClient(
        settings.fno_url,
        fno_credential,
        transport=fno_transport,
        max_concurrency=settings.fno_max_concurrency,
        timeout=settings.http_timeout_seconds,
    )
    dataverse = DataverseClient(
        settings.dataverse_url,
        dv_credential,
        transport=dataverse_transport,
        max_concurrency=settings.dataverse_max_concurrency,
        timeout=settings.http_timeout_seconds,
    )
    storage, queues, storage_credentials = _storage_clients(settings)
    engine = Engine(
        templates,
        fno,
        dataverse,
        LookupCache(dataverse),
        storage.state,
        integration_users=settings.integration_users,
    )
    return Runtime(
        settings=settings,
        templates=templates,
        engine=engine,
        fno=fno,
        dataverse=dataverse,
        state=storage.state,
        dead_letters=storage.dead_letters,
        control=storage.control,
        queues=queues,
        _storage=storage,
        _credentials=[fno_credential, dv_credential, *storage_credentials],
    )


def _storage_clients(settings: Settings) -> tuple[TableStorage, QueueServiceClient, list[AsyncTokenCredential]]:
    """Tables and queues from `AzureWebJobsStorage` (a connection string), or from the identity-based
    `AzureWebJobsStorage__*` endpoints with the app's identity, as the Functions host connects."""
    names = (settings.state_table, settings.deadletter_table, settings.control_table)
    endpoints = settings.storage_endpoints
    if endpoints is None:
        connection = expand_connection_string(settings.storage)
        storage = TableStorage.from_connection_string(
            connection, state_table=names[0], deadletter_table=names[1], control_table=names[2]
        )
        return storage, QueueServiceClient.from_connection_string(connection), []
    kind: CredentialKind = "managed-identity" if endpoints.managed_identity else "default"
    credential = build_credential(kind, client_id=endpoints.client_id)
    transport = async_transport()
    extra: dict[str, Any] = {} if transport is None else {"transport": transport}
    service = TableServiceClient(endpoint=endpoints.table, credential=credential, **extra)
    storage = TableStorage(
        service, state_table=names[0], deadletter_table=names[1], control_table=names[2], owns_service=True
    )
    return storage, QueueServiceClient(account_url=endpoints.queue, credential=credential), [credential]


_runtime: Runtime | None = None
_lock = asyncio.Lock()


async def get_runtime() -> Runtime:
    """The process's runtime, built from the environment on first use."""
    global _runtime
    async with _lock:
        if _runtime is None:
            _runtime = build_runtime(load_settings())
        return _runtime


async def close_runtime() -> None:
    """Close and forget the process's runtime (dev host shutdown, tests)."""
    global _runtime
    async with _lock:
        if _runtime is not None:
            await _runtime.aclose()
            _runtime = None
