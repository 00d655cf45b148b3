"""The process-wide objects the functions share: settings, templates, one client per target, stores.

Built once per worker process on first use (Functions reuses processes, so the
HTTP connection pools and token caches live across invocations) and closed by
the dev host and tests. What the runtime remembers between invocations to save
Storage calls on every event: which queues exist, the pause flags (for
`PAUSE_CACHE_SECONDS`) and the latest "last success" per direction (written at
most once per `LAST_SUCCESS_WRITE_SECONDS`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.core.pipeline.transport import AioHttpTransport
from azure.data.tables.aio import TableServiceClient
from azure.storage.queue import BinaryBase64DecodePolicy, BinaryBase64EncodePolicy

# The async clients' own retry policy; the package exports only the sync one (which an async pipeline cannot
# await). Private, so requirements.txt holds azure-storage-queue to one minor version.
from azure.storage.queue._shared.policies_async import ExponentialRetry
from azure.storage.queue.aio import QueueClient, QueueServiceClient

from loyaltysync import host_limits, timesource
from loyaltysync.host_limits import function_timeout_seconds, intent_horizon_seconds
from loyaltysync.lag import LagWindow
from loyaltysync.settings import CredentialKind, Settings, load_settings
from loyaltysync.state import ControlStore, DeadLetterStore, StateStore
from loyaltysync.state_tables import TableStorage, async_transport
from loyaltysync.storage_connection import expand_connection_string
from loyaltysync.sync import Engine
from loyaltysync.targets.auth import build_credential
from loyaltysync.targets.dataverse import DataverseClient
from loyaltysync.targets.fno import FnoClient
from loyaltysync.targets.lookups import LookupCache
from loyaltysync.templates import Template, load_templates

log = logging.getLogger("loyaltysync.runtime")

PAUSE_SCOPE = "pause"
SUCCESS_SCOPE = "last-success"
_PROXY_VARIABLES = frozenset({"http_proxy", "https_proxy", "all_proxy", "no_proxy", "ws_proxy", "wss_proxy"})


class LatestDocuments:
    """Control documents of one scope written at most once per `interval` seconds per name.

    `put` writes at once when the name's interval has passed; otherwise it keeps the
    document in memory and one delayed write per name sends the latest when the
    interval ends. `pending()` is what this process has not written yet (ops status
    merges it); `flush()` writes it now (at shutdown). Used for "last success": one
    table write per direction every few seconds instead of one per event.
    """

    def __init__(
        self,
        control: ControlStore,
        scope: str,
        interval: float,
        clock: Callable[[], float] = timesource.monotonic,
    ) -> None:
        self._control = control
        self._scope = scope
        self._interval = interval
        self._clock = clock
        self._due: dict[str, float] = {}  # name -> when the next write may go out
        self._pending: dict[str, dict[str, Any]] = {}
        self._timers: dict[str, asyncio.Task[None]] = {}

    async def put(self, name: str, document: dict[str, Any]) -> None:
        """Write `document` now if due, else keep it as the latest for the delayed write."""
        now = self._clock()
        due = self._due.get(name, now)
        if now >= due:
            self._pending.pop(name, None)
            self._due[name] = now + self._interval
            await self._control.set(self._scope, name, document)
            return
        self._pending[name] = document
        if name not in self._timers:
            timer = asyncio.create_task(self._write_later(name, due - now), name=f"{self._scope}:{name}")
            self._timers[name] = timer

    def pending(self) -> dict[str, dict[str, Any]]:
        """Documents kept in memory and not written yet, by name."""
        return dict(self._pending)

    async def flush(self) -> None:
        """Cancel the delayed writes and write every pending document now."""
        timers, self._timers = list(self._timers.values()), {}
        for timer in timers:
            timer.cancel()
        await asyncio.gather(*timers, return_exceptions=True)
        pending, self._pending = self._pending, {}
        for name, document in pending.items():
            await self._control.set(self._scope, name, document)

    async def _write_later(self, name: str, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
            self._timers.pop(name, None)
            document = self._pending.pop(name, None)
            if document is not None:
                self._due[name] = self._clock() + self._interval
                await self._control.set(self._scope, name, document)
        except asyncio.CancelledError:
            raise
        except Exception:  # only a status document: the next put or flush writes a newer one
            log.warning("writing %s/%s failed", self._scope, name, exc_info=True)


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
    clock: Callable[[], float] = field(default_factory=lambda: timesource.monotonic)  # ages the pause cache
    _queues_ready: set[str] = field(default_factory=set)
    _pause_cache: dict[str, tuple[bool, float]] = field(default_factory=dict)
    _successes: LatestDocuments | None = None
    lag: LagWindow = field(default_factory=LagWindow)  # how far behind each template's queue runs (lag.py)
    # host.json's functionTimeout: each change's step keeps inside it (host_limits.invocation_deadline).
    function_timeout_s: float | None = None

    @property
    def successes(self) -> LatestDocuments:
        """The "last success" documents, written at most once per LAST_SUCCESS_WRITE_SECONDS per direction."""
        if self._successes is None:
            self._successes = LatestDocuments(self.control, SUCCESS_SCOPE, self.settings.last_success_write_seconds)
        return self._successes

    def queue(self, template: str, *, poison: bool = False) -> QueueClient:
        """The template's Storage queue client, base64 like the Functions queue binding."""
        name = self.settings.queue_name(template) + ("-poison" if poison else "")
        return self.queues.get_queue_client(
            name,
            message_encode_policy=BinaryBase64EncodePolicy(),
            message_decode_policy=BinaryBase64DecodePolicy(),
        )

    async def enqueue(self, template: str, message: str, *, delay_s: int = 0) -> None:
        """Put a ChangeEvent JSON on the template's queue (never expires: pauses have no time limit).

        The queue is created once per process; if it was deleted since, the send's
        QueueNotFound creates it again and the send is retried once.
        """
        client = self.queue(template)
        if client.queue_name not in self._queues_ready:
            await self._create_queue(client)
        body = message.encode()
        try:
            await client.send_message(body, visibility_timeout=delay_s or None, time_to_live=-1)
        except ResourceNotFoundError:
            self._queues_ready.discard(client.queue_name)
            await self._create_queue(client)
            await client.send_message(body, visibility_timeout=delay_s or None, time_to_live=-1)

    async def _create_queue(self, client: QueueClient) -> None:
        try:
            await client.create_queue()
        except ResourceExistsError:
            pass  # another instance (or the host) created it
        self._queues_ready.add(client.queue_name)

    async def paused(self, template: str, *, fresh: bool = False) -> bool:
        """Whether the template is paused, as read at most PAUSE_CACHE_SECONDS ago (`fresh`: read now).

        `set_paused` in this process updates the cache at once; a pause set by another
        instance (or the CLI) takes effect here within PAUSE_CACHE_SECONDS.
        """
        now = self.clock()
        cached = self._pause_cache.get(template)
        if not fresh and cached is not None and now - cached[1] < self.settings.pause_cache_seconds:
            return cached[0]
        doc = await self.control.get(PAUSE_SCOPE, template)
        paused = bool(doc and doc.get("paused"))
        self._pause_cache[template] = (paused, now)
        return paused

    async def set_paused(self, template: str, paused: bool, reason: str = "") -> None:
        await self.control.set(
            PAUSE_SCOPE, template, {"paused": paused, "reason": reason, "at": timesource.utc().isoformat()}
        )
        self._pause_cache[template] = (paused, self.clock())

    async def last_successes(self) -> dict[str, dict[str, Any]]:
        """The "last success" document per direction: the stored one, or this process's newer unwritten one."""
        stored = await self.control.list(SUCCESS_SCOPE)
        for name, document in self.successes.pending().items():
            if str(document.get("at", "")) >= str(stored.get(name, {}).get("at", "")):
                stored[name] = document
        return stored

    async def aclose(self) -> None:
        """Write what is still pending, then close clients, stores and credentials."""
        if self._successes is not None:
            try:
                await self._successes.flush()
            except Exception:  # storage already gone: closing must still release everything
                log.warning("writing the last success documents at shutdown failed", exc_info=True)
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
    function_timeout_s = function_timeout_seconds(override=settings.function_timeout_override)
    engine = Engine(
        templates,
        fno,
        dataverse,
        LookupCache(dataverse),
        storage.state,
        integration_users=settings.integration_users,
        writing_elsewhere_s=intent_horizon_seconds(function_timeout_s),
        events_held_s=settings.conflict_grace_seconds + settings.queue_lease_seconds,
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
        function_timeout_s=function_timeout_s,
    )


def _storage_clients(settings: Settings) -> tuple[TableStorage, QueueServiceClient, list[AsyncTokenCredential]]:
    """Tables and queues from `AzureWebJobsStorage` (a connection string), or from the identity-based
    `AzureWebJobsStorage__*` endpoints with the app's identity, as the Functions host connects."""
    names = (settings.state_table, settings.deadletter_table, settings.control_table)
    endpoints = settings.storage_endpoints
    credentials: list[AsyncTokenCredential] = []
    if endpoints is None:
        connection = expand_connection_string(settings.storage)
        service = TableServiceClient.from_connection_string(connection, **storage_transport(), **TABLES_RETRY)
        queues = QueueServiceClient.from_connection_string(
            connection, **storage_transport(), retry_policy=QueueRetry()
        )
    else:
        kind: CredentialKind = "managed-identity" if endpoints.managed_identity else "default"
        credential = build_credential(kind, client_id=endpoints.client_id)
        credentials.append(credential)
        service = TableServiceClient(
            endpoint=endpoints.table, credential=credential, **storage_transport(), **TABLES_RETRY
        )
        queues = QueueServiceClient(
            account_url=endpoints.queue, credential=credential, **storage_transport(), retry_policy=QueueRetry()
        )
    storage = TableStorage(
        service, state_table=names[0], deadletter_table=names[1], control_table=names[2], owns_service=True
    )
    return storage, queues, credentials


# Storage's own retries stay short: a change whose step cannot reach Storage is tried again from its queue
# (docs/retries.md), and an invocation must end before functionTimeout. Tables: waits of 0, 1 and 2 s
# (azure-core's back-off; the SDK's default is 10 retries up to 2 minutes apart).
TABLES_RETRY: dict[str, Any] = {"retry_total": 3, "retry_backoff_factor": 0.5, "retry_backoff_max": 4}


class QueueRetry(ExponentialRetry):
    """Storage queues' retry: waits of about 2, 4 and 8 s (the SDK's default: 18, 24 and 42 s), and none that
    would outlast the invocation: a change put back at the end of its step (a retry, a re-check) must be on
    the queue before the host ends the invocation at functionTimeout."""

    def __init__(self) -> None:
        super().__init__(initial_backoff=0, increment_base=2, retry_total=3, random_jitter_range=1)

    def increment(
        self, settings: dict[str, Any], request: Any, response: Any = None, error: Any = None
    ) -> bool:
        if not super().increment(settings, request, response=response, error=error):
            return False
        left = host_limits.seconds_to_timeout()
        count = settings["count"]
        longest = self.initial_backoff + (self.increment_base**count if count else 0) + self.random_jitter_range
        return left is None or longest < left


def storage_transport(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The `transport` keyword for a Storage client: proxy settings read once, not on every request.

    The SDK's aiohttp transport trusts the environment by default, so aiohttp looks up
    the proxy variables (scanning the whole environment, in a thread) and ~/.netrc for
    every request: measured at about a fifth of the function app's CPU per event. When
    no proxy variable is set at start, the transport skips that; when one is, the
    default is kept so the proxy is used. Without aiohttp, the requests transport.
    """
    fallback = async_transport()
    if fallback is not None:
        return {"transport": fallback}
    names = os.environ if environ is None else environ
    if any(name.lower() in _PROXY_VARIABLES for name in names):
        return {}
    return {"transport": AioHttpTransport(use_env_settings=False)}


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
