"""The chaos run's process kills are real (tests/chaos/worker_process.py), shown on one change.

Against the chaos stack (emulators, Azurite, the in-process dev host with its
queue workers switched off so only the second instance consumes): the second
instance, with kill rate 1.0 at "after-write", takes an F&O create, writes the
Dataverse row and dies with exit code 137 before the sync state gets the new
values. Restarted without kills, it finds the message again once its lease runs
out and converges the record without creating it a second time.
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest

from devkit.sim.model import Model
from loyaltysync.runtime import get_runtime
from loyaltysync.templates import default_mappings_dir, function_safe, load_templates
from tests.chaos import faults
from tests.chaos.generator import Generator, Record
from tests.chaos.harness import Admin, chaos_stack, settle
from tests.chaos.worker_process import SecondInstance, instance_env

TEMPLATE = "loyalty-levels"
KEY = "LV-KILL01"

pytestmark = pytest.mark.timeout(300)


def _in_process_workers_off() -> dict[str, str]:
    """AzureWebJobs.<worker>.Disabled for every template: the in-process host only receives events."""
    templates = load_templates(default_mappings_dir()).values()
    return {f"AzureWebJobs.{function_safe(f'worker_{t.slug}')}.Disabled": "true" for t in templates}


async def test_a_killed_process_dies_between_target_write_and_state_update_and_a_restart_converges(
    tmp_path: Path,
) -> None:
    async with chaos_stack(seed=11, extra_env=_in_process_workers_off()) as stack:
        runtime = await get_runtime()
        admin = Admin(stack)
        generator = Generator(stack, runtime, admin, Model(stack.templates), random.Random(11), 1)
        log = tmp_path / "second-instance.log"
        second = SecondInstance(
            instance_env(os.environ, CHAOS_KILL_RATE="1.0", CHAOS_KILL_POINTS="after-write"), log, restart=False
        )
        try:
            second.start()
            values = generator.record_values(TEMPLATE, KEY)
            assert await generator.play(Record(TEMPLATE, KEY), "fo", "create", values)

            assert await asyncio.wait_for(second.wait_exit(), timeout=120) == faults.KILL_EXIT_CODE, log.read_text()
            assert second.kill_points() == {"after-write": 1}
            fo, dv = await generator.read(TEMPLATE, KEY)
            assert fo is not None and dv == fo  # the Dataverse write happened before the process died
            state = await runtime.state.get(TEMPLATE, KEY)
            assert state is not None and state.intent is not None
            assert "dataverse" in state.intent.sides  # the intent was stored before the write
            assert state.values == {}  # ... and the agreed values never were

            second = SecondInstance(instance_env(os.environ, CHAOS_KILL_RATE="0"), log, restart=False)
            second.start()
            await settle(runtime, admin, seconds=120)  # the killed message comes back when its lease runs out

            assert await generator.read(TEMPLATE, KEY) == (fo, dv)
            state = await runtime.state.get(TEMPLATE, KEY)
            assert state is not None and state.values and state.intent is None
            entity_set = stack.templates[TEMPLATE].dataverse.entity_set
            assert (await admin.creates())["dataverse"][f"{entity_set}|{KEY}"] == 1
            assert second.unexpected() == []
        finally:
            await second.stop()
            await generator.aclose()
            await admin.aclose()
