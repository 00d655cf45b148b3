"""The emulators in a child process, for the benchmarks: the sync under test gets a CPU of its own.

`python bench/emulators.py --cards N --dataverse 2 [--latency-ms 50] [--unlimited]` seeds N
loyalty cards into F&O, serves the F&O emulator and one or more Dataverse emulators (each
with its own service-protection window) on loopback ports, prints one JSON line with their
URLs, and serves until its stdin closes. `running(...)` is the context manager the bench
scripts use. Service protection is Dataverse's documented default per user and web server
(6000 requests, 1,200,000 ms of execution, 52 concurrent, per 300 s) unless `--unlimited`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOKEN = "bench-token"  # noqa: S105 - the emulators' loopback-only token
TENDERS = ("AsCardTender", "AsContactTender", "NoTender", "Blocked")


def card(i: int) -> dict[str, Any]:
    """The i-th benchmark loyalty card, as F&O stores it."""
    return {
        "CardNumber": f"CARD-{i:010d}",
        "CardTenderType": TENDERS[i % 4],
        "PartyNumber": f"{i:09d}",
        "OmOperatingUnitNumber": "012",
        "LoyaltyEnrollmentDate": f"2026-01-{1 + i % 28:02d}T08:00:00Z",
    }


async def serve(cards: int, dataverse: int, latency_ms: float, unlimited: bool) -> None:
    from devkit.azurite import free_port
    from devkit.sandbox import dataverse as dataverse_emulator
    from devkit.sandbox import fno as fno_emulator
    from devkit.sandbox.common import Faults
    from devkit.sandbox.dataverse import ServiceProtectionLimits
    from devkit.stack import Server
    from loyaltysync.templates import default_mappings_dir, load_templates

    templates = load_templates(default_mappings_dir())
    limits = ServiceProtectionLimits(requests=10**12, execution_ms=1e15) if unlimited else ServiceProtectionLimits()
    port = free_port()
    fo = fno_emulator.create_app(
        token=TOKEN,
        seed=1,
        templates=templates,
        public_url=f"http://127.0.0.1:{port}",
        faults=Faults(latency_ms=latency_ms),
    )
    entity = fo.state.fno.catalog.entities["RetailLoyaltyCards"]
    for first in range(0, cards, 100_000):
        fo.state.fno.seed(entity, (card(i) for i in range(first, min(cards, first + 100_000))))
    servers = [Server("fo", fo, port)]
    for n in range(dataverse):
        port = free_port()
        app = dataverse_emulator.create_app(
            token=TOKEN,
            templates=templates,
            public_url=f"http://127.0.0.1:{port}",
            limits=limits,
            faults=Faults(latency_ms=latency_ms),
        )
        servers.append(Server(f"dataverse-{n}", app, port))
    for server in servers:
        await server.start()
    print(json.dumps({"fo": servers[0].url, "dataverse": [s.url for s in servers[1:]]}), flush=True)
    # Serve until the parent closes our stdin (or dies).
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for server in servers:
        await server.stop()


@contextlib.contextmanager
def running(cards: int, *, dataverse: int = 1, latency_ms: float = 0.0, unlimited: bool = False) -> Iterator[Any]:
    """Start the emulators in a child process; yields {"fo": url, "dataverse": [urls]}."""
    command = [sys.executable, str(Path(__file__)), "--cards", str(cards), "--dataverse", str(dataverse)]
    command += ["--latency-ms", str(latency_ms)] + (["--unlimited"] if unlimited else [])
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # noqa: S603
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        if not line:
            raise RuntimeError("the emulators did not start")
        yield json.loads(line)
    finally:
        if child.stdin is not None:
            child.stdin.close()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cards", type=int, default=0)
    parser.add_argument("--dataverse", type=int, default=1)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--unlimited", action="store_true")
    options = parser.parse_args()
    asyncio.run(serve(options.cards, options.dataverse, options.latency_ms, options.unlimited))
