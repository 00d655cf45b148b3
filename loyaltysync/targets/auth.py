"""Identity for the target clients: which credential, which scope, and the cached bearer token.

The clients always take an `AsyncTokenCredential`: managed identity or a
client secret in Azure, the Azure CLI on a developer machine, a static token
against the emulators. `BearerToken` is the one place that turns it into an
`Authorization` header, asking the credential again only when the token is
close to expiry.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal, Self

from azure.core.credentials import AccessToken
from azure.core.credentials_async import AsyncTokenCredential

from loyaltysync.errors import ConfigError
from loyaltysync.targets.redaction import register_secret

CredentialKind = Literal["default", "client-secret", "managed-identity", "cli", "static"]
REFRESH_MARGIN = 300.0  # seconds before expiry at which a cached token is renewed


def scope_for(root_url: str) -> str:
    """The token scope of a Dynamics environment: its root URL (no trailing slash) + `/.default`."""
    return f"{root_url.rstrip('/')}/.default"


class StaticTokenCredential:
    """An `AsyncTokenCredential` that always returns the same token (sandbox mode).

    The emulators accept the token configured in `LOYALTYSYNC_SANDBOX_TOKEN`;
    it is reported as valid for a day so callers cache it like a real one.
    """

    def __init__(self, token: str, *, lifetime: float = 86_400.0) -> None:
        if not token:
            raise ConfigError("LOYALTYSYNC_SANDBOX_TOKEN", "the static token is empty")
        register_secret(token)
        self._token = token
        self._lifetime = lifetime

    async def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        """The configured token, expiring `lifetime` seconds from now, whatever the scope."""
        return AccessToken(self._token, int(time.time() + self._lifetime))

    async def close(self) -> None:
        """Nothing to release."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:  # never show the token
        return "StaticTokenCredential(token=***)"


def build_credential(
    kind: CredentialKind,
    *,
    tenant_id: str | None = None,
    client_id: str | None = None,
    client_secret: str | None = None,
    static_token: str | None = None,
    **options: Any,
) -> AsyncTokenCredential:
    """The credential for `kind`; raises `ConfigError` naming the setting that is missing.

    - default: `DefaultAzureCredential` (managed identity `client_id` when given, else AZURE_CLIENT_ID)
    - client-secret: `ClientSecretCredential(tenant_id, client_id, client_secret)`
    - managed-identity: `ManagedIdentityCredential` (user-assigned when `client_id` is given)
    - cli: `AzureCliCredential` (in `tenant_id` when given)
    - static: `StaticTokenCredential(static_token)` for the emulators

    `options` go to the azure-identity constructor (e.g. `transport=`, `authority=`).
    azure.identity.aio talks HTTP through aiohttp unless given a `transport`.
    """
    if kind == "static":
        if not static_token:
            raise ConfigError("LOYALTYSYNC_SANDBOX_TOKEN", "required when the credential kind is 'static'")
        return StaticTokenCredential(static_token)
    try:
        return _identity_credential(kind, tenant_id, client_id, client_secret, options)
    except ImportError as exc:  # azure-core's async pipeline without aiohttp installed
        raise ConfigError("credential", f"{kind} credential cannot be built: {exc}") from exc


def _identity_credential(
    kind: CredentialKind,
    tenant_id: str | None,
    client_id: str | None,
    client_secret: str | None,
    options: dict[str, Any],
) -> AsyncTokenCredential:
    from azure.identity.aio import (
        AzureCliCredential,
        ClientSecretCredential,
        DefaultAzureCredential,
        ManagedIdentityCredential,
    )

    if kind == "client-secret":
        if not tenant_id:
            raise ConfigError("tenant_id", "required when the credential kind is 'client-secret'")
        if not client_id:
            raise ConfigError("client_id", "required when the credential kind is 'client-secret'")
        if not client_secret:
            raise ConfigError("client_secret", "required when the credential kind is 'client-secret'")
        register_secret(client_secret)
        return ClientSecretCredential(tenant_id, client_id, client_secret, **options)
    if kind == "managed-identity":
        if client_id:
            return ManagedIdentityCredential(client_id=client_id, **options)
        return ManagedIdentityCredential(**options)
    if kind == "cli":
        # The CLI credential runs `az`, no HTTP pipeline: HTTP options do not apply.
        return AzureCliCredential(tenant_id=tenant_id) if tenant_id else AzureCliCredential()
    if kind == "default":
        # Passing None explicitly would switch off the AZURE_CLIENT_ID fallback.
        if client_id:
            return DefaultAzureCredential(managed_identity_client_id=client_id, **options)
        return DefaultAzureCredential(**options)
    raise ConfigError("credential kind", f"unknown kind {kind!r}")


class BearerToken:
    """The `Authorization` header value for one scope, cached until 5 minutes before expiry.

    One per target client, shared by all its requests: concurrent callers
    wait on one refresh instead of each asking the credential.
    """

    def __init__(
        self,
        credential: AsyncTokenCredential,
        scope: str,
        *,
        refresh_margin: float = REFRESH_MARGIN,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.credential = credential
        self.scope = scope
        self._margin = refresh_margin
        self._clock = clock
        self._header: str | None = None
        self._refresh_at = 0.0
        self._lock = asyncio.Lock()

    async def header(self) -> str:
        """`Bearer <token>`, from the cache while it is fresh, else from the credential."""
        if self._header is not None and self._clock() < self._refresh_at:
            return self._header
        async with self._lock:
            now = self._clock()
            if self._header is None or now >= self._refresh_at:
                token = await self.credential.get_token(self.scope)
                register_secret(token.token)
                self._header = f"Bearer {token.token}"
                lifetime = token.expires_on - now
                # A token that is already inside the margin is still used for half its remaining life
                # rather than fetched again on every request.
                self._refresh_at = now + max(lifetime - self._margin, min(lifetime / 2, self._margin))
            return self._header

    def invalidate(self) -> None:
        """Forget the cached token (the service answered 401): the next request asks the credential."""
        self._header = None
        self._refresh_at = 0.0
