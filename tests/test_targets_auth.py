"""Credentials, scopes and the cached bearer token."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from azure.core.credentials import AccessToken
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.pipeline.transport import AsyncHttpResponse, AsyncHttpTransport
from azure.identity.aio import (
    AzureCliCredential,
    ClientSecretCredential,
    DefaultAzureCredential,
    ManagedIdentityCredential,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from loyaltysync.errors import ConfigError
from loyaltysync.targets.auth import BearerToken, StaticTokenCredential, build_credential, scope_for
from loyaltysync.targets.dataverse import DataverseClient
from loyaltysync.targets.fno import FnoClient
from loyaltysync.targets.redaction import redact


class NoNetwork(AsyncHttpTransport):
    """An azure-core transport for credentials that are built but never asked for a token."""

    async def send(self, request: object, **kwargs: object) -> AsyncHttpResponse:
        raise AssertionError("no token request expected")

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def __aexit__(self, *args: object) -> None:
        return None


class CountingCredential:
    """Hands out token-1, token-2, ... valid for `lifetime` seconds; records each call's scopes."""

    def __init__(self, lifetime: float = 3600.0, clock: list[float] | None = None) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.lifetime = lifetime
        self.clock = clock

    async def get_token(self, *scopes: str, **kwargs: object) -> AccessToken:
        self.calls.append(scopes)
        await asyncio.sleep(0)  # let concurrent callers pile up behind the refresh
        now = self.clock[0] if self.clock else time.time()
        return AccessToken(f"token-{len(self.calls)}-abcdef", int(now + self.lifetime))

    async def close(self) -> None:
        return None

    async def __aenter__(self) -> CountingCredential:
        return self

    async def __aexit__(self, *args: object) -> None:
        return None


def test_scope_is_the_root_url_plus_default() -> None:
    assert scope_for("https://org.crm.dynamics.com") == "https://org.crm.dynamics.com/.default"
    assert scope_for("https://env.operations.dynamics.com/") == "https://env.operations.dynamics.com/.default"


async def test_static_credential_is_an_async_token_credential() -> None:
    credential = StaticTokenCredential("sandbox-token-1234")
    assert isinstance(credential, AsyncTokenCredential)
    token = await credential.get_token("https://whatever/.default")
    assert token.token == "sandbox-token-1234"
    assert token.expires_on > time.time() + 3600
    assert "sandbox-token-1234" not in repr(credential)
    async with credential as same:
        assert same is credential
    with pytest.raises(ConfigError):
        StaticTokenCredential("")


async def test_build_credential_kinds() -> None:
    static = build_credential("static", static_token="sandbox-token-1234")
    assert isinstance(static, StaticTokenCredential)

    cli = build_credential("cli", tenant_id="tenant")
    assert isinstance(cli, AzureCliCredential)

    built = [
        (build_credential("default", transport=NoNetwork()), DefaultAzureCredential),
        (build_credential("default", client_id="mi-client", transport=NoNetwork()), DefaultAzureCredential),
        (build_credential("managed-identity", client_id="mi-client", transport=NoNetwork()), ManagedIdentityCredential),
        (build_credential("managed-identity", transport=NoNetwork()), ManagedIdentityCredential),
        (
            build_credential(
                "client-secret", tenant_id="t", client_id="c", client_secret="s3cret-value", transport=NoNetwork()
            ),
            ClientSecretCredential,
        ),
    ]
    for credential, kind in [*built, (cli, AzureCliCredential)]:
        assert isinstance(credential, kind)
        await credential.close()
    # The client secret is now masked wherever it would be logged.
    assert redact("secret is s3cret-value") == "secret is ***"


@pytest.mark.parametrize(
    ("kind", "kwargs", "setting"),
    [
        ("static", {}, "LOYALTYSYNC_SANDBOX_TOKEN"),
        ("client-secret", {"client_id": "c", "client_secret": "s"}, "tenant_id"),
        ("client-secret", {"tenant_id": "t", "client_secret": "s"}, "client_id"),
        ("client-secret", {"tenant_id": "t", "client_id": "c"}, "client_secret"),
    ],
)
def test_build_credential_names_the_missing_setting(kind: str, kwargs: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_credential(kind, **kwargs)  # type: ignore[arg-type]
    assert caught.value.setting == setting


async def test_bearer_token_is_cached_until_five_minutes_before_expiry() -> None:
    clock = [1_000_000.0]
    credential = CountingCredential(lifetime=3600, clock=clock)
    token = BearerToken(credential, "https://org/.default", clock=lambda: clock[0])

    headers = await asyncio.gather(*(token.header() for _ in range(50)))
    assert set(headers) == {"Bearer token-1-abcdef"}
    assert credential.calls == [("https://org/.default",)]

    clock[0] += 3600 - 301  # still more than 5 minutes left
    assert await token.header() == "Bearer token-1-abcdef"
    clock[0] += 2  # now inside the margin
    assert await token.header() == "Bearer token-2-abcdef"
    assert len(credential.calls) == 2

    token.invalidate()
    assert await token.header() == "Bearer token-3-abcdef"


async def test_a_short_lived_token_is_not_fetched_per_request() -> None:
    clock = [0.0]
    credential = CountingCredential(lifetime=120, clock=clock)  # already inside the 5-minute margin
    token = BearerToken(credential, "s", clock=lambda: clock[0])
    for _ in range(10):
        await token.header()
    assert len(credential.calls) == 1
    clock[0] += 61  # half its life gone: renew
    await token.header()
    assert len(credential.calls) == 2


def _echo_app() -> Starlette:
    async def handler(request: Request) -> Response:
        return JSONResponse({"value": [], "auth": request.headers.get("Authorization")})

    return Starlette(routes=[Route("/{rest:path}", handler, methods=["GET", "PATCH"])])


async def test_clients_ask_the_credential_once_for_many_requests() -> None:
    credential = CountingCredential()
    transport = httpx.ASGITransport(app=_echo_app())
    dataverse = DataverseClient("https://org.crm.dynamics.com/", credential, transport=transport)
    await asyncio.gather(*(dataverse.who_am_i() for _ in range(25)))
    assert credential.calls == [("https://org.crm.dynamics.com/.default",)]

    fno_credential = CountingCredential()
    fno = FnoClient("https://env.operations.dynamics.com", fno_credential, transport=transport)
    for i in range(5):
        await fno.get("RetailLoyaltyCards", {"CardNumber": f"C-{i}"})
    assert fno_credential.calls == [("https://env.operations.dynamics.com/.default",)]

    explicit = CountingCredential()
    other = DataverseClient(
        "https://org.api.crm.dynamics.com", explicit, transport=transport, scope="https://org.crm.dynamics.com/.default"
    )
    await other.who_am_i()
    assert explicit.calls == [("https://org.crm.dynamics.com/.default",)]
    for client in (dataverse, fno, other):
        await client.aclose()
