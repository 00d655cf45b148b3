"""Per-call cost of the simulator's in-memory clients against the real clients over ASGI to the emulators.

Prints microseconds per call (CPU time of this process, and wall time) for a read and a write on each
side, through `devkit.sim.services` and through the real `FnoClient` / `DataverseClient` over
`httpx.ASGITransport` to the sandbox apps, and their ratios, all measured in this one run.
Writes include building and handing over the notification the service sends (webhook, F&O event).

    .venv/bin/python bench/sim_services.py [calls]
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import httpx

from devkit.sandbox import dataverse, fno
from devkit.sim import services as sim
from loyaltysync import webhooks
from loyaltysync.targets.auth import StaticTokenCredential
from loyaltysync.targets.dataverse import DataverseClient
from loyaltysync.targets.fno import FnoClient
from loyaltysync.targets.http import RetryPolicy
from loyaltysync.templates import default_mappings_dir, load_templates

TEMPLATES = load_templates(default_mappings_dir())
CARDS = TEMPLATES["loyalty-cards"]
TOKEN = "bench-token-0123456789abcdef"  # noqa: S105 - the emulators' test token
NOW = datetime(2026, 3, 1, tzinfo=UTC)


async def measure(calls: int, call: Callable[[int], Awaitable[object]]) -> tuple[float, float]:
    """(CPU µs, wall µs) per call."""
    for i in range(min(50, calls)):
        await call(i)
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(calls):
        await call(i)
    return (time.process_time() - cpu) / calls * 1e6, (time.perf_counter() - wall) / calls * 1e6


async def suite(fo: FnoClient, dv: DataverseClient, calls: int) -> dict[str, tuple[float, float]]:
    fo_set, dv_set = CARDS.fo.entity_set, CARDS.dataverse.entity_set
    select_fo = [f.fo for f in CARDS.fields if f.fo]
    select_dv = [f.dataverse for f in CARDS.fields if f.dataverse]
    await fo.create_new(fo_set, {"CardNumber": "B-1"}, {"PartyNumber": "P"})
    await dv.upsert(dv_set, {"msdyn_cardnumber": "B-1"}, {"msdyn_partynumber": "P"}, mode="create")
    return {
        "F&O get": await measure(calls, lambda i: fo.get(fo_set, {"CardNumber": "B-1"}, select=select_fo)),
        "F&O update": await measure(
            calls, lambda i: fo.update(fo_set, {"CardNumber": "B-1"}, {"PartyNumber": f"P{i}"})),
        "Dataverse get": await measure(
            calls, lambda i: dv.get_by_key(dv_set, {"msdyn_cardnumber": "B-1"}, [*select_dv, "_createdby_value"])),
        "Dataverse update": await measure(calls, lambda i: dv.upsert(
            dv_set, {"msdyn_cardnumber": "B-1"}, {"msdyn_partynumber": f"P{i}"}, mode="update")),
    }


async def simulated(calls: int, form: sim.FoEventForm | None) -> dict[str, tuple[float, float]]:
    """The simulated services; `form` None: nothing registered or subscribed, so writes send no notification."""
    sent = [0]

    def deliver(endpoint: object, template: object, body: bytes, headers: object) -> None:
        sent[0] += 1

    if form is None:
        rng = random.Random(1)
        dv_service = sim.SimDataverse(TEMPLATES, clock=lambda: NOW, rng=rng, hooks=sim.NoFaults(), deliver=deliver)
        fo_service = sim.SimFno(TEMPLATES, clock=lambda: NOW, rng=rng, hooks=sim.NoFaults(), deliver=deliver,
                                events="business-event")
        return await suite(fo_service.client(), dv_service.client(), calls)
    services = await sim.build(TEMPLATES, fo_clock=lambda: NOW, dataverse_clock=lambda: NOW, rng=random.Random(1),
                               hooks=sim.NoFaults(), deliver=deliver, fo_events=form)
    return await suite(services.fno.client(), services.dataverse.client(), calls)


async def real(calls: int) -> dict[str, tuple[float, float]]:
    fo_app = fno.create_app(token=TOKEN, seed=1, templates=TEMPLATES, public_url=sim.FO_URL)
    dv_app = dataverse.create_app(token=TOKEN, seed=1, templates=TEMPLATES, public_url=sim.DATAVERSE_URL)
    sink = httpx.MockTransport(lambda request: httpx.Response(202))
    dv_app.state.sandbox.delivery.client_factory = lambda: httpx.AsyncClient(transport=sink)
    credential = StaticTokenCredential(TOKEN)
    retry = RetryPolicy(max_attempts=1)
    fo = FnoClient(sim.FO_URL, credential, transport=httpx.ASGITransport(app=fo_app), retry=retry)
    dv = DataverseClient(sim.DATAVERSE_URL, credential, transport=httpx.ASGITransport(app=dv_app), retry=retry)
    plan = await webhooks.plan(dv, TEMPLATES, function_url=sim.FUNCTION_URL, function_key=sim.FUNCTION_KEY,
                               fo_data_events=False)
    await webhooks.apply(dv, plan)
    try:
        return await suite(fo, dv, calls)
    finally:
        await dv_app.state.sandbox.delivery.drain(timeout_s=30)
        await fo.aclose()
        await dv.aclose()
        await dv_app.state.sandbox.delivery.aclose()
        await fo_app.state.sandbox.delivery.aclose()


async def main(calls: int) -> None:
    quiet = await simulated(calls, None)
    fast = {form: await simulated(calls, form) for form in sim.FO_EVENT_FORMS}
    slow = await real(max(50, calls // 10))
    print(f"{'call':<18}{'notifications':<26}{'sim CPU µs':>11}{'sim wall µs':>12}{'ASGI CPU µs':>12}"
          f"{'ASGI wall µs':>13}{'ASGI/sim CPU':>13}")
    for name in slow:
        real_cpu, real_wall = slow[name]
        rows: list[tuple[str, tuple[float, float]]] = [("none registered", quiet[name])]
        if name == "F&O update":
            rows += [(f"F&O events: {form}", results[name]) for form, results in fast.items()]
        elif name == "Dataverse update":
            rows.append(("webhook", fast["virtual-table"][name]))
        for label, (cpu, wall) in rows:
            print(f"{name:<18}{label:<26}{cpu:>11.1f}{wall:>12.1f}{real_cpu:>12.1f}{real_wall:>13.1f}"
                  f"{real_cpu / cpu:>12.0f}x")
    print("ASGI: the real clients over httpx.ASGITransport to the emulators (webhooks registered, delivered to a "
          "stub; F&O without event subscriptions).")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000))
