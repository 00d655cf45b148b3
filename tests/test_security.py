"""Nobody gets in, nothing leaks, nothing is fetched from where a payload points.

- Every HTTP function of function_app.py, served by the dev host with the
  keys Azure enforces, answers 401 to a missing or wrong key (and ADMIN ones
  to the function key), and inbound ones to a missing or wrong shared-secret
  header when WEBHOOK_SHARED_SECRET is set; nothing is queued then.
- Only the configured F&O and Dataverse hosts are ever called: an
  `@odata.nextLink` to another host is refused before any request, and URLs
  inside payloads (Event Grid's validationUrl, links in events) are never
  followed: a trap server on loopback sees no request in a whole run.
- An end-to-end run with known token, function key, admin key and client
  secret values, logging everything at DEBUG, leaks none of them into the
  logs, the console, the emulators' request logs or the dead letters.
- local.settings.json (which holds real secrets on a developer's machine) is
  git-ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.queue import BinaryBase64DecodePolicy
from azure.storage.queue.aio import QueueClient

from devkit.azurite import Azurite, free_port
from devkit.devhost import DevHost
from devkit.sandbox.dataverse import AGENT_USER
from devkit.stack import running_stack, settle
from loyaltysync.runtime import close_runtime, get_runtime
from loyaltysync.targets.auth import StaticTokenCredential
from loyaltysync.targets.dataverse import DataverseClient
from loyaltysync.targets.fno import FnoClient

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "events"
FUNCTION_KEY = "fk-Security-7c1d2e3f4a5b6c7d8e9f"
ADMIN_KEY = "ak-Security-0a1b2c3d4e5f60718293"
SHARED_SECRET = "ss-Security-9f8e7d6c5b4a39281706"
SECRET_HEADER = "x-loyaltysync-secret"
PREFIX = "sec"


# ----------------------------------------------------------------------------- a loopback stub


class Trap:
    """A loopback TCP server that counts every connection made to it (and answers nothing useful)."""

    def __init__(self) -> None:
        self.hits = 0
        self.port = 0
        self._server: asyncio.base_events.Server | None = None

    async def __aenter__(self) -> Trap:
        async def hit(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.hits += 1
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
            await writer.drain()
            writer.close()

        self._server = await asyncio.start_server(hit, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


# ----------------------------------------------------------------------------- keys and shared secret


@pytest.fixture
async def host(azurite: Azurite) -> AsyncIterator[DevHost]:
    """function_app.py in the dev host with known keys and a shared secret; workers off so queues can be read.

    F&O and Dataverse are a loopback stub that answers 200 to anything (the admin functions reach it).
    """
    async with Trap() as stub:
        env = {
            "FNO_URL": stub.url,
            "DATAVERSE_URL": stub.url,
            "LOYALTYSYNC_SANDBOX_TOKEN": "security-test-static-token",
            "AzureWebJobsStorage": azurite.connection_string,
            "QUEUE_PREFIX": PREFIX,
            "WEBHOOK_SHARED_SECRET": SHARED_SECRET,
            "RECONCILE_SCHEDULE": "0 0 0 1 1 *",
            **{f"AzureWebJobs.worker_{slug}.Disabled": "true"
               for slug in ("loyalty_cards", "loyalty_levels", "loyalty_reward_points")},
        }
        with pytest.MonkeyPatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            patch.chdir(ROOT)
            sys.modules.pop("function_app", None)
            devhost = DevHost(
                "function_app",
                port=free_port(),
                function_key=FUNCTION_KEY,
                admin_key=ADMIN_KEY,
                storage=azurite.connection_string,
                host_json=ROOT / "host.json",
                local_settings=ROOT / "local.settings.json.absent",
                out=io.StringIO(),
            )
            await devhost.start()
            try:
                yield devhost
            finally:
                await devhost.stop()
                await close_runtime()  # the runtime was built from this host's settings
                sys.modules.pop("function_app", None)


def _http_functions(devhost: DevHost) -> list[tuple[str, str, str, str]]:
    """(name, method, path, auth level) of every HTTP function, route parameters filled in."""
    found = []
    for function in devhost.functions:
        if function.trigger_type != "httpTrigger":
            continue
        methods = [m.upper() for m in function.trigger.get("methods") or ["POST"] if m.upper() != "OPTIONS"]
        route = str(function.trigger["route"]).replace("{template}", "loyalty-cards")
        found.append((function.name, methods[0], f"/api/{route}", str(function.trigger.get("authLevel")).upper()))
    return found


async def test_every_http_function_refuses_a_missing_or_wrong_key(host: DevHost) -> None:
    functions = _http_functions(host)
    assert {name for name, *_ in functions} >= {
        "fo_loyalty_cards", "dataverse_loyalty_cards", "fo_loyalty_levels", "dataverse_loyalty_levels",
        "fo_loyalty_reward_points", "dataverse_loyalty_reward_points",
        "ops_health", "ops_status", "ops_pause", "ops_resume", "ops_replay",
    }
    body = (FIXTURES / "dataverse-loyaltycard-update.json").read_bytes()
    wrong = [
        ({}, {}),
        ({"x-functions-key": "wrong"}, {}),
        ({}, {"code": "wrong"}),
        ({"x-functions-key": FUNCTION_KEY[:-1]}, {}),
        ({"x-functions-key": ""}, {"code": ""}),
        ({"X-Functions-Key": FUNCTION_KEY.upper()}, {}),
    ]
    async with httpx.AsyncClient(base_url=host.base_url, timeout=30) as client:
        for name, method, path, level in functions:
            attempts = list(wrong)
            if level == "ADMIN":  # the function key is not enough for an admin function
                attempts += [({"x-functions-key": FUNCTION_KEY}, {}), ({}, {"code": FUNCTION_KEY})]
            for headers, params in attempts:
                response = await client.request(method, path, headers=headers, params=params, content=body)
                assert response.status_code == 401, (name, headers, params, response.status_code)
                assert response.content == b""
            good = ADMIN_KEY if level == "ADMIN" else FUNCTION_KEY
            response = await client.request(
                method, path, headers={"x-functions-key": good, SECRET_HEADER: SHARED_SECRET}, content=body
            )
            assert response.status_code != 401, name
        # The host's own admin APIs take the master key only.
        for method, path in (("GET", "/admin/host/status"), ("POST", "/admin/functions/reconcile")):
            for headers in ({}, {"x-functions-key": FUNCTION_KEY}, {"x-functions-key": "wrong"}):
                response = await client.request(method, path, headers=headers, json={"input": ""})
                assert response.status_code == 401, (path, headers)


async def _queued(azurite: Azurite, template: str) -> list[str]:
    client = QueueClient.from_connection_string(
        azurite.connection_string, f"{PREFIX}-{template}", message_decode_policy=BinaryBase64DecodePolicy()
    )
    try:
        return [bytes(m.content).decode() for m in await client.peek_messages(max_messages=32)]
    except ResourceNotFoundError:
        return []
    finally:
        await client.close()


async def test_a_missing_or_wrong_shared_secret_is_refused_and_nothing_is_queued(
    host: DevHost, azurite: Azurite
) -> None:
    body = (FIXTURES / "fo-businessevent-loyaltycard.json").read_bytes()
    before = len(await _queued(azurite, "loyalty-cards"))
    async with httpx.AsyncClient(base_url=host.base_url, timeout=30) as client:
        for secret in (None, "", "wrong", SHARED_SECRET[:-1], SHARED_SECRET + "x", SHARED_SECRET.upper()):
            headers = {"x-functions-key": FUNCTION_KEY, "content-type": "application/json"}
            if secret is not None:
                headers[SECRET_HEADER] = secret
            response = await client.post("/api/fo/loyalty-cards", headers=headers, content=body)
            assert response.status_code == 401, secret
            assert SECRET_HEADER in response.json()["error"]
        assert len(await _queued(azurite, "loyalty-cards")) == before

        headers = {"x-functions-key": FUNCTION_KEY, "content-type": "application/json", SECRET_HEADER: SHARED_SECRET}
        response = await client.post("/api/fo/loyalty-cards", headers=headers, content=body)
        assert response.status_code == 202, response.text
    queued = await _queued(azurite, "loyalty-cards")
    assert len(queued) == before + 1 and json.loads(queued[-1])["key"] == {"CardNumber": "C-1001"}


# ----------------------------------------------------------------------------- only configured hosts


@pytest.mark.parametrize(
    "next_link",
    [
        "http://evil.example/api/data/v9.2/msdyn_loyaltycards?$skiptoken=1",
        "https://dv.test/api/data/v9.2/msdyn_loyaltycards?$skiptoken=1",  # same host, other scheme
        "http://dv.test:8443/api/data/v9.2/msdyn_loyaltycards?$skiptoken=1",  # same host, other port
        "http://dv.test@evil.example/api/data/v9.2/msdyn_loyaltycards",  # userinfo trick
        "http://evil.example/x?host=dv.test",
    ],
)
async def test_a_next_link_to_another_host_is_never_followed(next_link: str) -> None:
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        if request.url.host != "dv.test" and request.url.host != "fo.test":
            return httpx.Response(500)
        return httpx.Response(200, json={"value": [{"msdyn_cardnumber": "C-1"}], "@odata.nextLink": next_link})

    transport = httpx.MockTransport(answer)
    credential = StaticTokenCredential("a-static-token-for-tests")
    async with DataverseClient("http://dv.test", credential, transport=transport) as dv:
        with pytest.raises(ValueError, match="another host"):
            async for _ in dv.query("msdyn_loyaltycards", select=["msdyn_cardnumber"]):
                pass
    fo_link = next_link.replace("dv.test", "fo.test").replace("/api/data/v9.2/msdyn_loyaltycards", "/data/X")

    def fo_answer(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, json={"value": [{"CardNumber": "C-1"}], "@odata.nextLink": fo_link})

    async with FnoClient("http://fo.test", credential, transport=httpx.MockTransport(fo_answer)) as fo:
        with pytest.raises(ValueError, match="another host"):
            async for _ in fo.query("RetailLoyaltyCards"):
                pass
    assert all(httpx.URL(url).host in ("dv.test", "fo.test") and httpx.URL(url).port is None for url in seen), seen
    assert len(seen) == 2  # one first page per client, nothing else


# ----------------------------------------------------------------------------- an end-to-end run that leaks nothing


LOGGERS = ("", "loyaltysync", "httpx", "httpcore", "azure", "azure.core.pipeline.policies.http_logging_policy",
           "uvicorn", "uvicorn.error", "uvicorn.access", "asyncio", "tests")


class Everything(logging.Handler):
    """Keeps every record, formatted as a handler would write it, traceback included."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextlib.contextmanager
def all_logs() -> Iterator[Everything]:
    handler = Everything()
    root = logging.getLogger()
    saved = {name: logging.getLogger(name).level for name in LOGGERS}
    root.addHandler(handler)
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


async def _eventually(check: Any, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_a_whole_run_leaks_no_token_key_or_secret(capsys: pytest.CaptureFixture[str]) -> None:
    client_secret = "cs-Security-1357924680abcdefXYZ"
    env = {"DEV_FUNCTION_KEY": FUNCTION_KEY, "DEV_ADMIN_KEY": ADMIN_KEY, "AZURE_CLIENT_SECRET": client_secret,
           "AZURE_TENANT_ID": "00000000-0000-0000-0000-0000000000aa",
           "AZURE_CLIENT_ID": "11111111-2222-3333-4444-555555555555"}
    sys.modules.pop("function_app", None)
    with all_logs() as logs:
        async with Trap() as trap, running_stack(extra_env=env) as stack:
            secrets = {"token": stack.token, "function key": FUNCTION_KEY, "admin key": ADMIN_KEY,
                       "client secret": client_secret}
            runtime = await get_runtime()
            credential = StaticTokenCredential(stack.token)
            fo, dv = FnoClient(stack.fo.url, credential), DataverseClient(stack.dataverse.url, credential)
            agent = dv.as_caller(AGENT_USER.azureactivedirectoryobjectid)
            app = httpx.AsyncClient(base_url=stack.function_url, timeout=30)
            admin_dv = stack.admin(stack.dataverse)
            try:
                # Changes both ways, a delete, a record that is parked, a short outage with retries.
                await fo.create("RetailLoyaltyCards", {"CardNumber": "SEC-1", "CardTenderType": "AsCardTender",
                                                       "PartyNumber": "P-1"})
                await _eventually(lambda: dv.get_by_key("msdyn_loyaltycards", {"msdyn_cardnumber": "SEC-1"}),
                                  "SEC-1 in Dataverse")
                await (await admin_dv.patch("/_admin/faults", json={"outage": True})).aclose()
                await fo.update("RetailLoyaltyCards", {"CardNumber": "SEC-1"}, {"PartyNumber": "P-2"})
                await asyncio.sleep(1.5)
                await admin_dv.patch("/_admin/faults", json={"outage": False})
                await agent.upsert("msdyn_loyaltycards", {"msdyn_cardnumber": "SEC-1"},
                                   {"msdyn_operatingunitnumber": "S-SEC"}, mode="update")
                await fo.create("RetailLoyaltyRewardPoints", {"RewardPointId": "SEC-XTS", "RewardPointType": "Amount",
                                                              "Redeemable": "Yes", "RewardPointCurrency": "XTS"})
                await _eventually(
                    lambda: fo.get("RetailLoyaltyCards", {"CardNumber": "SEC-1"}),
                    "SEC-1 in F&O",
                )
                # Payloads pointing at another host: answered or refused, never fetched.
                validation = json.loads((FIXTURES / "eventgrid-validation.json").read_text())
                validation[0]["data"]["validationUrl"] = f"{trap.url}/validate?code=x"
                for route, payload in (
                    ("fo/loyalty-cards", validation),
                    ("fo/loyalty-cards", {"BusinessEventId": "LoyaltyCardChangedBusinessEvent", "ControlNumber": 1,
                                          "EventId": "E-1", "CardNumber": "SEC-1",
                                          "ContextRecordSubject": f"{trap.url}/subject",
                                          "@odata.nextLink": f"{trap.url}/next", "url": trap.url}),
                    ("dataverse/loyalty-cards", {"MessageName": "Update", "PrimaryEntityName": "msdyn_loyaltycard",
                                                 "OrganizationName": trap.url, "@odata.id": f"{trap.url}/x"}),
                ):
                    response = await app.post(f"/api/{route}", json=payload, headers={"x-functions-key": FUNCTION_KEY})
                    assert response.status_code < 500
                response = await app.get("/api/ops/status", headers={"x-functions-key": ADMIN_KEY})
                assert response.status_code == 200
                assert (await app.get("/api/ops/status", params={"code": "not-the-key"})).status_code == 401
                await settle(stack, seconds=60)
                await agent.delete_by_key("msdyn_loyaltycards", {"msdyn_cardnumber": "SEC-1"})
                await settle(stack, seconds=60)

                assert await fo.get("RetailLoyaltyCards", {"CardNumber": "SEC-1"}) is None
                letters = await runtime.dead_letters.list()
                assert [d.key for d in letters] == ["SEC-XTS"]
                stores = [json.dumps([dataclasses.asdict(d) for d in letters])]
                for server in (stack.fo, stack.dataverse):
                    async with stack.admin(server) as admin:
                        stores.append((await admin.get("/_admin/requests", params={"limit": 1000})).text)
                        stores.append((await admin.get("/_admin/stats")).text)
                        stores.append((await admin.get("/_admin/deliveries/failed")).text)
                stores.append((await admin_dv.get("/_admin/webhooks/log", params={"limit": 1000})).text)
            finally:
                await app.aclose()
                await admin_dv.aclose()
                await fo.aclose()
                await dv.aclose()
        sys.modules.pop("function_app", None)
    printed = capsys.readouterr()
    assert trap.hits == 0, "a URL from a payload was followed"
    assert len(logs.lines) > 100  # DEBUG really was on: requests, invocations, retries, parking
    assert any("retry" in line for line in logs.lines) and any("parked" in line for line in logs.lines)
    # The deliveries that carried the function key were logged, with the key masked.
    assert any("code=***" in line for line in logs.lines)
    places = {"logs": "\n".join(logs.lines), "console": printed.out + printed.err, "stores": "\n".join(stores)}
    for what, value in secrets.items():
        for place, text in places.items():
            assert value not in text, f"the {what} appears in the {place}"


def test_local_settings_json_is_git_ignored_and_not_tracked() -> None:
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "local.settings.json"], cwd=ROOT, check=False  # noqa: S607
    )
    assert ignored.returncode == 0, "local.settings.json is not git-ignored"
    tracked = subprocess.run(
        ["git", "ls-files", "--error-unmatch", "local.settings.json"], cwd=ROOT, check=False,  # noqa: S607
        capture_output=True,
    )
    assert tracked.returncode != 0, "local.settings.json is tracked by git"
