"""Benchmark the F&O emulator in process: bulk create through `/data/$batch`, then fill a table to a million rows.

Prints rows/s for creates sent as `$batch` change sets (every part a full
sub-request: auth, validation, store insert, ETag), rows/s for admin bulk
seeding straight into the table, the time of a filtered read over the full
table, and the peak RSS.

Run: .venv/bin/python bench/sandbox_fno.py [batch_rows] [total_rows]
     (defaults: 20,000 rows through $batch, 1,000,000 rows in the table)
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import emulators

from devkit.sandbox.fno import create_app

TOKEN = "bench-token"  # noqa: S105 - in-process only
BATCH_SIZE = 1000  # operations per $batch (F&O allows 5000)


def card(i: int) -> dict[str, object]:
    """The benchmarks' i-th card (bench/emulators.py), with the entity's time-of-day column."""
    return {**emulators.card(i), "LoyaltyEnrollmentTime": i % 86_400}


def batch_body(first: int, count: int) -> tuple[str, bytes]:
    """One $batch with a single change set of `count` POSTs."""
    lines = ["--batch_bench", "Content-Type: multipart/mixed; boundary=changeset_bench", ""]
    for n, i in enumerate(range(first, first + count), start=1):
        lines += ["--changeset_bench", "Content-Type: application/http", "Content-Transfer-Encoding: binary",
                  f"Content-ID: {n}", "", "POST RetailLoyaltyCards HTTP/1.1", "Content-Type: application/json", "",
                  json.dumps(card(i))]
    lines += ["--changeset_bench--", "--batch_bench--", ""]
    return "multipart/mixed; boundary=batch_bench", "\r\n".join(lines).encode()


async def main(batch_rows: int, total_rows: int) -> None:
    app = create_app(token=TOKEN, seed=1)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fno",
                                 headers={"Authorization": f"Bearer {TOKEN}"}, timeout=600) as client:
        start = time.perf_counter()
        for first in range(0, batch_rows, BATCH_SIZE):
            content_type, body = batch_body(first, min(BATCH_SIZE, batch_rows - first))
            response = await client.post("/data/$batch", content=body, headers={"Content-Type": content_type})
            assert response.status_code == 200, response.text[:500]
        batch_s = time.perf_counter() - start
        print(f"$batch create: {batch_rows:,} rows in {batch_s:.2f} s: {batch_rows / batch_s:,.0f} rows/s")

        data = app.state.fno
        entity = data.catalog.entities["RetailLoyaltyCards"]
        start = time.perf_counter()
        chunk = 100_000
        for first in range(batch_rows, total_rows, chunk):
            data.seed(entity, (card(i) for i in range(first, min(total_rows, first + chunk))))
        seed_s = time.perf_counter() - start
        seeded = total_rows - batch_rows
        if seeded > 0:
            print(f"bulk seed: {seeded:,} rows in {seed_s:.2f} s: {seeded / seed_s:,.0f} rows/s")
        print(f"table holds {data.count(entity):,} cards")

        start = time.perf_counter()
        filter_text = "CardTenderType eq Microsoft.Dynamics.DataEntities.RetailLoyaltyTenderTypeBase'Blocked'"
        response = await client.get("/data/RetailLoyaltyCards/$count", params={"$filter": filter_text})
        print(f"filtered $count over the table: {int(response.text):,} in {time.perf_counter() - start:.2f} s")
        start = time.perf_counter()
        response = await client.get(f"/data/RetailLoyaltyCards('CARD-{total_rows - 1:010d}')")
        assert response.status_code == 200
        print(f"read by key: {(time.perf_counter() - start) * 1000:.1f} ms")
    # ru_maxrss is in KiB on Linux.
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")


if __name__ == "__main__":
    args = [int(a.replace("_", "")) for a in sys.argv[1:3]]
    asyncio.run(main(*(args + [20_000, 1_000_000][len(args):])))
