"""Both emulators in a process of their own for the chaos run, counting every record they create.

Run as `python -m tests.chaos.emulators` with LOYALTYSYNC_SANDBOX_TOKEN (and
optionally CHAOS_SEED) in the environment. It prints one JSON line
`{"fo": <port>, "dataverse": <port>}` once both serve on loopback, and runs
until SIGTERM or SIGINT.

Why a process of its own: the function app, its queue workers and the
emulators are all CPU-bound Python; on a small machine one event loop for
everything halves the operations per second the run can play. Faults, counters
and seeding stay reachable over the emulators' own `/_admin` endpoints.

What differs from `python -m loyaltysync sandbox`:
- Dataverse service protection budgets (6,000 requests and 1,200 s per 5
  minutes) are raised: a run plays thousands of operations a minute through
  one application user; throttling is injected as storms instead (faults).
- `GET /_chaos/creates` (same bearer token) answers how many times each record
  was created, by side and key: `{"fo": {"<entity set>|<key>": n}, "dataverse": {...}}`.
  That is how the run proves nothing was created twice without trusting the
  engine's own account.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections import Counter
from collections.abc import Iterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from devkit.azurite import free_port
from devkit.sandbox import dataverse, fno
from devkit.sandbox.common import bearer_matches, drop_aware
from devkit.sandbox.dataverse.protection import ServiceProtectionLimits
from loyaltysync.templates import Template, default_mappings_dir, load_templates

TALLY_PATH = "/_chaos/creates"
CHAOS_LIMITS = ServiceProtectionLimits(requests=10**9, execution_ms=1e15)


class _Server(uvicorn.Server):
    """Signals belong to main(), which stops both servers together."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class CreateTally:
    """Counts creates per record as the emulators commit them (seeding through /_admin is not counted)."""

    def __init__(self) -> None:
        self.fo: Counter[str] = Counter()
        self.dataverse: Counter[str] = Counter()

    def watch_fo(self, app: Starlette) -> None:
        data = app.state.fno
        publish = data.publish

        def counting(change: Any) -> None:
            if change.change_type == "Created":
                key = "|".join(str(change.row[k]) for k in change.entity.keys)
                self.fo[f"{change.entity.entity_set}|{key}"] += 1
            publish(change)

        data.publish = counting

    def watch_dataverse(self, app: Starlette, templates: dict[str, Template]) -> None:
        dispatcher = app.state.webhooks
        dispatch = dispatcher.dispatch
        keys = {t.dataverse.table: (t.dataverse.entity_set, t.dataverse.alternate_key[0]) for t in templates.values()}

        def counting(changes: Any, correlation_id: str) -> int:
            changes = list(changes)
            for change in changes:
                if change.message == "Create" and change.table in keys and change.after is not None:
                    entity_set, column = keys[change.table]
                    self.dataverse[f"{entity_set}|{change.after.get(column)}"] += 1
            result: int = dispatch(changes, correlation_id)
            return result

        dispatcher.dispatch = counting

    def as_json(self) -> dict[str, dict[str, int]]:
        return {"fo": dict(self.fo), "dataverse": dict(self.dataverse)}


def with_tally(app: Any, tally: CreateTally, token: str) -> Any:
    """The served app, answering TALLY_PATH itself and passing everything else on."""

    async def serve(scope: Scope, receive: Receive, send: Send) -> Any:
        if scope["type"] == "http" and scope["path"] == TALLY_PATH:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            if not bearer_matches(headers.get("authorization"), token):
                await JSONResponse({"error": "unauthorized"}, status_code=401)(scope, receive, send)
            else:
                await JSONResponse(tally.as_json())(scope, receive, send)
            return None
        return await app(scope, receive, send)

    return serve


async def main() -> None:
    token = os.environ["LOYALTYSYNC_SANDBOX_TOKEN"]
    seed = int(os.environ.get("CHAOS_SEED", "7"))
    templates = load_templates(default_mappings_dir())
    fo_port, dv_port = free_port(), free_port()
    fo_app = fno.create_app(token=token, seed=seed, templates=templates, public_url=f"http://127.0.0.1:{fo_port}")
    dv_app = dataverse.create_app(
        token=token, seed=seed, templates=templates, public_url=f"http://127.0.0.1:{dv_port}", limits=CHAOS_LIMITS,
        fno_url=f"http://127.0.0.1:{fo_port}",  # F&O data events reach the function through the virtual tables
    )
    tally = CreateTally()
    tally.watch_fo(fo_app)
    tally.watch_dataverse(dv_app, templates)
    servers = [
        _Server(
            uvicorn.Config(
                with_tally(drop_aware(app), tally, token),
                host="127.0.0.1",
                port=port,
                log_level="critical",  # a dropped connection logs one error line each; thousands of them
                lifespan="on",
            )
        )
        for app, port in ((fo_app, fo_port), (dv_app, dv_port))
    ]
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for server in servers:
            server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    tasks = [asyncio.create_task(server.serve()) for server in servers]
    while not all(server.started for server in servers):
        if any(task.done() for task in tasks):
            await asyncio.gather(*tasks)
            return
        await asyncio.sleep(0.02)
    print(json.dumps({"fo": fo_port, "dataverse": dv_port}), flush=True)
    await asyncio.gather(*tasks)


if __name__ == "__main__":
    asyncio.run(main())
