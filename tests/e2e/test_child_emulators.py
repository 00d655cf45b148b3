"""`running_stack(emulators_in_child=True)`: the emulators served by a child process (what the benchmark uses).

The pipeline must work the same both ways (events, webhooks and admin endpoints are all HTTP),
and the child must be gone when the stack closes.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

import httpx
import pytest

from devkit.stack import RemoteServer

if TYPE_CHECKING:
    from tests.e2e.conftest import E2E

pytestmark = pytest.mark.e2e

CARDS, FO_CARDS = "loyalty-cards", "RetailLoyaltyCards"


async def test_the_pipeline_runs_with_the_emulators_in_a_child_process(
    separate_stack: Callable[..., AbstractAsyncContextManager[E2E]],
) -> None:
    async with separate_stack(emulators_in_child=True) as world:
        assert isinstance(world.stack.fo, RemoteServer) and isinstance(world.stack.dataverse, RemoteServer)
        key = world.key("CHD")
        await world.fo.create(FO_CARDS, {"CardNumber": key, "PartyNumber": "P-1"})
        await world.dv_has(CARDS, key, {"PartyNumber": "P-1"})
        await world.fo.update(FO_CARDS, {"CardNumber": key}, {"PartyNumber": "P-2"})
        await world.dv_has(CARDS, key, {"PartyNumber": "P-2"})
        await world.settle()
        urls = (world.stack.fo.url, world.stack.dataverse.url)
    for url in urls:  # the child process stopped with the stack
        async with httpx.AsyncClient(timeout=5) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(f"{url}/_admin/faults")
