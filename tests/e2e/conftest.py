"""End-to-end fixtures: ONE running stack (Azurite, both emulators, the dev host serving function_app.py).

Every test talks to the system the way its users do: F&O through OData, Dataverse
through the Web API as an agent (`CallerObjectId`), the function app over HTTP with
its keys, and the emulators' `/_admin` endpoints for seeding, faults and counters.
Tests use unique record keys, so they share the stack without seeing each other.

Two things about ordering (see `pytest_collection_modifyitems`):
- the e2e tests run after every other test, so the session stack (which sets
  FNO_URL & co. in os.environ and keeps queue listeners polling) is torn down as
  soon as they are done and never leaks into unit tests;
- a test that needs its own stack (`separate_stack`) runs before the first one that
  uses the shared stack: the runtime is a process singleton, so two stacks cannot
  be up at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from devkit.sandbox.common import Faults
from devkit.sandbox.dataverse import AGENT_USER, CURRENCY_IDS
from devkit.stack import Server, Stack, running_stack, settle
from loyaltysync import worker
from loyaltysync.events.model import ChangeEvent
from loyaltysync.runtime import Runtime, get_runtime
from loyaltysync.sync import Outcome
from loyaltysync.targets.auth import StaticTokenCredential
from loyaltysync.targets.dataverse import DataverseClient
from loyaltysync.targets.fno import FnoClient
from loyaltysync.templates import FieldMap, Template

T = TypeVar("T")
HERE = Path(__file__).resolve().parent
APP_MODULE = "function_app"
_running: list[Stack] = []


def _is_e2e(item: pytest.Item) -> bool:
    return HERE in Path(str(item.path)).resolve().parents


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """e2e tests last; within them, tests with their own stack first (see the module docstring)."""
    others = [item for item in items if not _is_e2e(item)]
    e2e = [item for item in items if _is_e2e(item)]
    e2e.sort(key=lambda item: "separate_stack" not in getattr(item, "fixturenames", ()))
    items[:] = others + e2e


@contextlib.asynccontextmanager
async def fresh_stack(**options: Any) -> AsyncIterator[Stack]:
    """`running_stack` with function_app imported afresh, as a new worker process would.

    function_app reads its settings and templates at import time; without this a second
    stack in the session would run the first one's module.
    """
    if _running:
        raise RuntimeError("a stack is already running: the runtime is a process singleton, so one at a time")
    sys.modules.pop(APP_MODULE, None)
    try:
        async with running_stack(**options) as stack:
            _running.append(stack)
            yield stack
    finally:
        _running.clear()
        sys.modules.pop(APP_MODULE, None)


def unique(prefix: str) -> str:
    """A record key no other test uses (short enough for a 30-character card number)."""
    return f"{prefix}-{uuid.uuid4().hex[:10].upper()}"


def moment(text: str | None) -> datetime | None:
    """An OData date-time as an aware datetime, so 'Z' and '+00:00' compare equal."""
    return None if text is None else datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass
class Observed:
    """What the worker handled while a test ran: (event, outcome or None, parked reason or None)."""

    seen: list[tuple[ChangeEvent, Outcome | None, str | None]] = field(default_factory=list)

    def __call__(self, event: ChangeEvent, outcome: Outcome | None, parked: str | None) -> None:
        self.seen.append((event, outcome, parked))

    def events(self, template: str, key: str, side: str | None = None) -> list[ChangeEvent]:
        """The events handled for one record (found by key, or by the outcome's key for id-only events)."""
        found = []
        for event, outcome, _ in self.seen:
            about = event.key_text == key or (outcome is not None and outcome.key == key)
            if event.template == template and about and side in (None, event.side):
                found.append(event)
        return found

    def conflicts(self, template: str, key: str) -> list[dict[str, Any]]:
        """The conflicts the engine resolved (or deferred) for one record."""
        return [
            c for e, o, _ in self.seen if o is not None and e.template == template and o.key == key for c in o.conflicts
        ]

    def parked(self, template: str, key: str) -> list[str]:
        """The reasons the worker parked this record for."""
        return [p for e, _, p in self.seen if p is not None and e.template == template and e.key_text == key]


@dataclass
class E2E:
    """The shared stack plus the clients a test acts through."""

    stack: Stack
    runtime: Runtime
    fo: FnoClient
    dv: DataverseClient
    agent: DataverseClient  # a person in Dataverse: their changes are not the integration's own
    fo_admin: httpx.AsyncClient
    dv_admin: httpx.AsyncClient
    app: httpx.AsyncClient  # the function app, no key

    def template(self, name: str) -> Template:
        return self.stack.templates[name]

    @staticmethod
    def key(prefix: str) -> str:
        """A record key no other test uses."""
        return unique(prefix)

    # -- reading both sides in F&O terms ----------------------------------------------------------

    async def fo_row(self, template: str, key: str) -> dict[str, Any] | None:
        t = self.template(template)
        return await self.fo.get(t.fo.entity_set, {t.fo.keys[0]: key})

    async def dv_row(self, template: str, key: str) -> dict[str, Any] | None:
        t = self.template(template)
        return await self.dv.get_by_key(t.dataverse.entity_set, {t.dataverse.alternate_key[0]: key})

    async def fo_values(self, template: str, key: str) -> dict[str, Any] | None:
        """The F&O record's mapped fields, by F&O property (dates as datetimes)."""
        row = await self.fo_row(template, key)
        if row is None:
            return None
        return {f.fo: _fo_value(f, row.get(f.fo)) for f in self.template(template).fields if f.fo}

    async def dv_values(self, template: str, key: str) -> dict[str, Any] | None:
        """The Dataverse row translated to F&O terms through the template's value maps and lookups."""
        row = await self.dv_row(template, key)
        if row is None:
            return None
        return {f.fo: _dv_as_fo(f, row) for f in self.template(template).fields if f.fo and f.dataverse}

    def dv_body(self, template: str, fo_values: dict[str, Any]) -> dict[str, Any]:
        """A Dataverse Web API body holding the same values as an F&O body (choices, bound lookups)."""
        body: dict[str, Any] = {}
        for f in self.template(template).fields:
            if f.fo not in fo_values or not f.dataverse:
                continue
            value = fo_values[f.fo]
            if f.lookup is not None:
                body[f"{f.navigation_property}@odata.bind"] = f"/{f.lookup.entity_set}({CURRENCY_IDS[value]})"
            elif f.value_map is not None:
                body[f.dataverse] = f.value_map[value]
            else:
                body[f.dataverse] = value
        return body

    # -- waiting ------------------------------------------------------------------------------------

    async def eventually(
        self, fetch: Callable[[], Awaitable[T]], ok: Callable[[T], bool], what: str, seconds: float = 30
    ) -> T:
        """Poll `fetch` until `ok(value)`; fail naming `what` and the last value seen."""
        deadline = time.monotonic() + seconds
        value = await fetch()
        while not ok(value):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}; last seen: {value!r}")
            await asyncio.sleep(0.1)
            value = await fetch()
        return value

    async def fo_has(self, template: str, key: str, expected: dict[str, Any], seconds: float = 30) -> None:
        want = _comparable(expected)
        await self.eventually(
            lambda: self.fo_values(template, key),
            lambda got: got is not None and all(got.get(k) == v for k, v in want.items()),
            f"F&O {template} {key} to hold {expected}",
            seconds,
        )

    async def dv_has(self, template: str, key: str, expected: dict[str, Any], seconds: float = 30) -> None:
        want = _comparable(expected)
        await self.eventually(
            lambda: self.dv_values(template, key),
            lambda got: got is not None and all(got.get(k) == v for k, v in want.items()),
            f"Dataverse {template} {key} to hold {expected}",
            seconds,
        )

    async def settle(self, seconds: float = 60) -> None:
        """Both emulators delivered everything and every queue is empty."""
        await settle(self.stack, seconds=seconds)

    # -- counters and faults ----------------------------------------------------------------------

    async def reset_counters(self) -> None:
        for admin in (self.fo_admin, self.dv_admin):
            (await admin.post("/_admin/reset")).raise_for_status()

    async def counters(self) -> dict[str, dict[str, int]]:
        """`/_admin/stats` counters of both emulators: {"fo": {...}, "dataverse": {...}}."""
        found = {}
        for side, admin in (("fo", self.fo_admin), ("dataverse", self.dv_admin)):
            response = await admin.get("/_admin/stats")
            response.raise_for_status()
            found[side] = response.json()["counters"]
        return found

    async def writes_by(self, side: str, user: str) -> int:
        """Successful API writes one emulator logged for one caller ("application" or an object id)."""
        admin = self.fo_admin if side == "fo" else self.dv_admin
        log = (await admin.get("/_admin/requests", params={"limit": "1000"})).json()["requests"]
        return sum(
            1
            for entry in log
            if entry["method"] in ("POST", "PATCH", "PUT", "DELETE")
            and not entry["path"].startswith("/_admin")
            and not entry["path"].endswith("$batch")
            and entry["status"] is not None
            and 200 <= entry["status"] < 300
            and entry["user"] == user
        )

    async def set_faults(self, server: Server, **changes: Any) -> None:
        admin = self.fo_admin if server is self.stack.fo else self.dv_admin
        response = await admin.patch("/_admin/faults", json=changes)
        assert response.status_code == 200, response.text

    async def clear_faults(self) -> None:
        for server in (self.stack.fo, self.stack.dataverse):
            await self.set_faults(server, **Faults().as_dict())

    # -- the function app ---------------------------------------------------------------------------

    @property
    def function_key(self) -> str:
        return self.stack.function_key

    @property
    def admin_key(self) -> str:
        return self.stack.admin_key

    async def ops_status(self) -> dict[str, Any]:
        response = await self.app.get("/api/ops/status", headers={"x-functions-key": self.admin_key})
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result


def _fo_value(f: FieldMap, value: Any) -> Any:
    # F&O has no null: an empty string and 1900-01-01 (wire-formats B3) are its "no value".
    if value == "":
        return None
    if f.type == "datetime" and isinstance(value, str):
        found = moment(value)
        return None if found is None or found.year == 1900 else found
    return value


def _dv_as_fo(f: FieldMap, row: dict[str, Any]) -> Any:
    if f.lookup is not None:
        row_id = row.get(f"_{f.dataverse}_value")
        iso_of = {v: k for k, v in CURRENCY_IDS.items()}
        return iso_of.get(row_id, row_id) if isinstance(row_id, str) else row_id
    value = row.get(f.dataverse or "")
    if f.value_map is not None:
        member_of: dict[Any, str] = {v: k for k, v in f.value_map.items()}
        return member_of.get(value, value)
    if f.type == "datetime" and isinstance(value, str):
        return moment(value)
    return value


def _comparable(expected: dict[str, Any]) -> dict[str, Any]:
    return {
        k: moment(v) if isinstance(v, str) and len(v) == 20 and v.endswith("Z") and v[10] == "T" else v
        for k, v in expected.items()
    }


@contextlib.asynccontextmanager
async def e2e_for(stack: Stack) -> AsyncIterator[E2E]:
    """The clients around a running stack, closed afterwards."""
    credential = StaticTokenCredential(stack.token)
    fo = FnoClient(stack.fo.url, credential)
    dv = DataverseClient(stack.dataverse.url, credential)
    fo_admin, dv_admin = stack.admin(stack.fo), stack.admin(stack.dataverse)
    app = httpx.AsyncClient(base_url=stack.function_url, timeout=30)
    try:
        yield E2E(
            stack=stack,
            runtime=await get_runtime(),
            fo=fo,
            dv=dv,
            agent=dv.as_caller(AGENT_USER.azureactivedirectoryobjectid),
            fo_admin=fo_admin,
            dv_admin=dv_admin,
            app=app,
        )
    finally:
        for client in (fo_admin, dv_admin, app):
            await client.aclose()
        await fo.aclose()
        await dv.aclose()


@pytest.fixture(scope="session")
async def e2e() -> AsyncIterator[E2E]:
    """The one stack every e2e test shares (about 3 s to start)."""
    async with fresh_stack() as stack, e2e_for(stack) as world:
        yield world


@pytest.fixture
def separate_stack() -> Callable[..., contextlib.AbstractAsyncContextManager[E2E]]:
    """Open a stack of the test's own (`running_stack` options); such tests run before the shared one starts."""

    @contextlib.asynccontextmanager
    async def open_world(**options: Any) -> AsyncIterator[E2E]:
        async with fresh_stack(**options) as stack, e2e_for(stack) as world:
            yield world

    return open_world


@pytest.fixture
async def faults(e2e: E2E) -> AsyncIterator[E2E]:
    """The shared stack, with every emulator fault back at its default after the test, whatever happened."""
    try:
        yield e2e
    finally:
        await e2e.clear_faults()


@pytest.fixture
def observed() -> Iterator[Observed]:
    """Record what the worker handles during the test (through the worker's observer hook)."""
    recorder = Observed()
    worker.OBSERVERS.append(recorder)
    try:
        yield recorder
    finally:
        worker.OBSERVERS.remove(recorder)
