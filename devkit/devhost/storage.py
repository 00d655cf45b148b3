"""Storage queues as the Functions queue extension reads and writes them.

Clients carry raw message text (no SDK encode/decode policy); the extension's
`messageEncoding` is applied here, the same way for the trigger, the output
binding and the poison queue: `base64` (default) is base64 of the UTF-8 bytes,
`none` is the text itself.
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import os
from collections.abc import Mapping
from typing import Any, Literal

from azure.core.exceptions import ResourceExistsError
from azure.core.pipeline.transport import AioHttpTransport, AsyncioRequestsTransport
from azure.storage.queue.aio import QueueClient, QueueServiceClient

from devkit.devhost.settings import storage_connection_string

MessageEncoding = Literal["base64", "none"]


def encode_message(value: str | bytes, encoding: MessageEncoding) -> str:
    """The queue text for a message body, per `messageEncoding`."""
    data = value.encode("utf-8") if isinstance(value, str) else value
    if encoding == "base64":
        return base64.b64encode(data).decode("ascii")
    return data.decode("utf-8")


def decode_message(text: str, encoding: MessageEncoding) -> bytes:
    """The message body for queue text, per `messageEncoding`. Raises ValueError when not valid base64."""
    if encoding == "base64":
        try:
            # Strict, like .NET's Convert.FromBase64String: stray characters are an error, not skipped.
            return base64.b64decode(text, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"message is not valid base64 (host.json messageEncoding is base64): {exc}") from exc
    return text.encode("utf-8")


class QueueStore:
    """Queue clients for the connections bindings name, one service client per storage account."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        self._services: dict[str, QueueServiceClient] = {}
        self._created: set[tuple[str, str]] = set()

    def queue(self, connection: str | None, name: str) -> QueueClient:
        """A client for queue `name` in the account the app setting `connection` points at."""
        connection_string = storage_connection_string(connection, self._environ)
        service = self._services.get(connection_string)
        if service is None:
            service = QueueServiceClient.from_connection_string(connection_string, **_transport())
            self._services[connection_string] = service
        return service.get_queue_client(name)

    async def ensure_queue(self, client: QueueClient) -> None:
        """Create the queue unless this store already did (or found it)."""
        key = (client.url, client.queue_name)
        if key in self._created:
            return
        try:
            await client.create_queue()
        except ResourceExistsError:
            pass
        self._created.add(key)

    async def send(self, connection: str | None, name: str, text: str) -> None:
        """Put already-encoded `text` on queue `name`, creating the queue when missing (as the output binding)."""
        client = self.queue(connection, name)
        await self.ensure_queue(client)
        await client.send_message(text)

    async def close(self) -> None:
        """Close every service client (and its connection pool)."""
        services, self._services = list(self._services.values()), {}
        for service in services:
            await service.close()


_PROXY_VARIABLES = frozenset({"http_proxy", "https_proxy", "all_proxy", "no_proxy", "ws_proxy", "wss_proxy"})


def _transport(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The aio clients' transport: aiohttp with proxy settings read once, else requests on a thread.

    The SDK's aiohttp transport trusts the environment by default, so aiohttp scans the
    environment for proxy variables (and reads ~/.netrc) on every poll and send; when no
    proxy variable is set at start it is told not to. Without aiohttp, the SDK's
    requests-on-a-thread transport needs nothing beyond azure-core.
    """
    if importlib.util.find_spec("aiohttp") is None:
        return {"transport": AsyncioRequestsTransport()}
    names = os.environ if environ is None else environ
    if any(name.lower() in _PROXY_VARIABLES for name in names):
        return {}
    return {"transport": AioHttpTransport(use_env_settings=False)}
