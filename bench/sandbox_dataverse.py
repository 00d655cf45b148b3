"""Benchmark the Dataverse emulator in process: bulk upsert through UpsertMultiple, then a million rows.

Prints rows/s for UpsertMultiple requests of 1000 targets (each a full request:
bearer check, caller, service protection, validation, alternate-key lookup,
store write, version stamp), first creating then updating the same rows; the
time of an alternate-key read and of a filtered query over the full table;
and the peak RSS after the table holds `total_rows` rows.

Run: .venv/bin/python bench/sandbox_dataverse.py [upsert_rows] [total_rows]
     (defaults: 200,000 rows through UpsertMultiple, 1,000,000 rows in the table)
"""

from __future__ import annotations

import asyncio
import resource
import sys
import time
from typing import Any

import httpx

from devkit.sandbox.dataverse import ServiceProtectionLimits, create_app

TOKEN = "bench-token"  # noqa: S105 - the emulator's own test token
PER_REQUEST = 1000
CARD = "Microsoft.Dynamics.CRM.msdyn_loyaltycard"


def target(i: int, party: str) -> dict[str, Any]:
    return {
        "@odata.type": CARD,
        "@odata.id": f"msdyn_loyaltycards(msdyn_cardnumber='CARD-{i:010d}')",
        "msdyn_cardtendertype": 806380000 + i % 4,
        "msdyn_partynumber": party,
        "msdyn_operatingunitnumber": "012",
        "msdyn_enrollmentdate": f"2026-01-{1 + i % 28:02d}T08:00:00Z",
    }


async def upsert_pass(client: httpx.AsyncClient, rows: int, party: str) -> float:
    """Upsert `rows` cards in requests of PER_REQUEST targets; returns rows/s."""
    started = time.perf_counter()
    for first in range(0, rows, PER_REQUEST):
        body = {"Targets": [target(i, party) for i in range(first, min(rows, first + PER_REQUEST))]}
        response = await client.post("msdyn_loyaltycards/Microsoft.Dynamics.CRM.UpsertMultiple", json=body)
        assert response.status_code == 204, response.text
    return rows / (time.perf_counter() - started)


async def main(upsert_rows: int = 200_000, total_rows: int = 1_000_000) -> None:
    # The bench measures the emulator, not the default service-protection budget.
    limits = ServiceProtectionLimits(execution_ms=1e12, requests=10**9)
    app = create_app(token=TOKEN, limits=limits)
    org = app.state.dataverse
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport,
        base_url="http://localhost/api/data/v9.2/",
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=600,
    ) as client:
        created = await upsert_pass(client, upsert_rows, "P-1")
        print(f"UpsertMultiple, creating : {upsert_rows:>9,} rows  {created:>9,.0f} rows/s")
        updated = await upsert_pass(client, upsert_rows, "P-2")
        print(f"UpsertMultiple, updating : {upsert_rows:>9,} rows  {updated:>9,.0f} rows/s")

        started = time.perf_counter()
        for i in range(upsert_rows, total_rows):
            org.seed_row(
                "msdyn_loyaltycard",
                {
                    "msdyn_cardnumber": f"CARD-{i:010d}",
                    "msdyn_cardtendertype": 806380000 + i % 4,
                    "msdyn_partynumber": f"{i:09d}",
                    "msdyn_operatingunitnumber": "012",
                },
            )
        seeded = total_rows - upsert_rows
        if seeded > 0:
            rate = seeded / (time.perf_counter() - started)
            print(f"direct seed              : {seeded:>9,} rows  {rate:>9,.0f} rows/s")

        started = time.perf_counter()
        response = await client.get("msdyn_loyaltycards(msdyn_cardnumber='CARD-0000000007')")
        assert response.status_code == 200
        print(
            f"read by alternate key    : {(time.perf_counter() - started) * 1000:9.2f} ms "
            f"({len(org.tables['msdyn_loyaltycard']):,} rows)"
        )
        started = time.perf_counter()
        response = await client.get(
            "msdyn_loyaltycards?$select=msdyn_cardnumber"
            "&$filter=msdyn_partynumber eq 'P-2' and msdyn_cardtendertype eq 806380001",
            headers={"Prefer": "odata.maxpagesize=5000"},
        )
        assert response.status_code == 200
        print(
            f"filtered full-table query: {(time.perf_counter() - started) * 1000:9.0f} ms "
            f"(first page of {len(response.json()['value'])} rows)"
        )
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS                 : {peak_mb:9,.0f} MB")


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    asyncio.run(main(*args))
