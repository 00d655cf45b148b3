"""Faults longer than the queue's own retry ever reached: an F&O outage, a Dataverse throttling window.

Before the worker's back-off (docs/retries.md), a failed change had host.json's maxDequeueCount (5)
deliveries, each after the HTTP client's own retries (up to 4 waits) and a 5 s visibilityTimeout: the
last one ended about a minute after the first failure, and a longer fault parked the change. Here the
fault lasts FAULT_S = 75 s while the other side keeps changing, and nothing may be parked.

The stack runs the real worker, dev host and Azurite with the back-off scaled down (RETRY_BASE_SECONDS=1,
RETRY_MAX_SECONDS=8: waits of 1, 2, 4, 8, 8, ... s) so a test takes a minute and a half, not the 5 minutes
of a real outage; tests/test_retries.py shows the default schedule outlasts 5 minutes, and
tests/devhost/test_devhost_queues.py that a message put back with a visibility timeout waits for it.

The real thing, outside `make test` (about 7 minutes per fault, the default schedule):
`LONG_FAULT_SECONDS=300 LONG_FAULT_DEFAULT_RETRIES=1 .venv/bin/python -m pytest tests/e2e/test_long_faults.py`
(docs/retries.md records a run).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.e2e.conftest import E2E

pytestmark = pytest.mark.e2e

CARDS = "loyalty-cards"
FO_CARDS, DV_CARDS = "RetailLoyaltyCards", "msdyn_loyaltycards"
FAULT_S = float(os.environ.get("LONG_FAULT_SECONDS", "75"))
DEFAULT_RETRIES = os.environ.get("LONG_FAULT_DEFAULT_RETRIES") == "1"  # the product's schedule, not a scaled one
SCALED_RETRIES = {"RETRY_BASE_SECONDS": "1", "RETRY_MAX_SECONDS": "8", "RETRY_BUDGET_SECONDS": "600"}
# After the fault the next attempt is one back-off away: at most RETRY_MAX_SECONDS plus 20 % jitter.
LANDS_WITHIN_S = 60.0 if not DEFAULT_RETRIES else 300 * 1.2 + 60


async def _change(e2e: E2E, side: str, key: str, party: str, *, create: bool = False) -> None:
    """A person's change on one side: a new card, or a new party number."""
    if side == "fo":
        if create:
            await e2e.fo.create(FO_CARDS, {"CardNumber": key, "PartyNumber": party})
        else:
            await e2e.fo.update(FO_CARDS, {"CardNumber": key}, {"PartyNumber": party})
    elif create:
        await e2e.agent.create(DV_CARDS, e2e.dv_body(CARDS, {"CardNumber": key, "PartyNumber": party}))
    else:
        await e2e.agent.upsert(DV_CARDS, {"msdyn_cardnumber": key}, {"msdyn_partynumber": party}, mode="update")


async def _lands(e2e: E2E, side: str, key: str, party: str) -> None:
    """The change reached `side` (the next attempt after the fault is at most one back-off away)."""
    if side == "fo":
        await e2e.fo_has(CARDS, key, {"PartyNumber": party}, seconds=LANDS_WITHIN_S)
    else:
        await e2e.dv_has(CARDS, key, {"PartyNumber": party}, seconds=LANDS_WITHIN_S)


FAULTS = {
    "fo-outage": ("fo", {"outage": True}),  # every F&O request answers 503
    "dataverse-throttling": ("dataverse", {"throttle_rate": 1.0, "throttle_retry_after_s": 2.0}),  # 429 + Retry-After
}
if DEFAULT_RETRIES:  # the long run plays the third kind too (make test keeps to one outage and one throttling)
    FAULTS["dataverse-outage"] = ("dataverse", {"outage": True})


@pytest.mark.parametrize(("faulty", "fault"), list(FAULTS.values()), ids=list(FAULTS))
@pytest.mark.timeout(int(FAULT_S + 3 * LANDS_WITHIN_S + 300))
async def test_a_fault_longer_than_the_queue_retry_parks_nothing_and_every_change_lands_after_it(
    separate_stack: Callable[..., AbstractAsyncContextManager[E2E]], faulty: str, fault: dict[str, Any]
) -> None:
    changing = "dataverse" if faulty == "fo" else "fo"
    async with separate_stack(extra_env={} if DEFAULT_RETRIES else SCALED_RETRIES) as e2e:
        server = e2e.stack.fo if faulty == "fo" else e2e.stack.dataverse
        keys = [e2e.key("LONG") for _ in range(3)]
        for key in keys:
            await _change(e2e, "fo", key, "P-0", create=True)
        await asyncio.gather(*(e2e.dv_has(CARDS, key, {"PartyNumber": "P-0"}) for key in keys))
        await e2e.settle()
        created = e2e.key("LONG")
        await e2e.reset_counters()

        started = time.monotonic()
        await e2e.set_faults(server, **fault)
        try:
            for key in keys:
                await _change(e2e, changing, key, "P-DURING")
            await _change(e2e, changing, created, "P-NEW", create=True)
            await asyncio.sleep(FAULT_S / 2)
            await _change(e2e, changing, keys[0], "P-LATE")
            await asyncio.sleep(max(0.0, FAULT_S - (time.monotonic() - started)))
            during = (await e2e.counters())[faulty]
            assert during["writes"] == 0
            assert during["errors_injected"] > 0, "the worker should have hit the fault"
        finally:
            await e2e.clear_faults()

        await asyncio.gather(
            *(_lands(e2e, faulty, key, "P-DURING") for key in keys[1:]),
            _lands(e2e, faulty, keys[0], "P-LATE"),
            _lands(e2e, faulty, created, "P-NEW"),
        )
        await e2e.settle()
        for key in (*keys, created):
            assert await e2e.fo_values(CARDS, key) == await e2e.dv_values(CARDS, key)
        assert await e2e.runtime.dead_letters.list(CARDS) == []
        status = (await e2e.ops_status())["templates"][CARDS]
        assert status["poison_backlog"] == 0
        assert status["backlog"] == 0
