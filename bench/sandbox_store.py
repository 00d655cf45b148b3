"""Benchmark: insert 1,000,000 rows into a 10-column sandbox table; print rows/s and peak RSS.

Run: .venv/bin/python bench/sandbox_store.py [rows]
"""

from __future__ import annotations

import resource
import sys
import time
import uuid

from devkit.sandbox.store import Table

COLUMNS = ["id", "dataAreaId", "number", "name", "level", "points", "currency", "active", "created", "etag"]


def main(rows: int = 1_000_000) -> None:
    table = Table("bench", COLUMNS, unique_keys=[["dataAreaId", "number"]], casefold_keys=True)
    start = time.perf_counter()
    for i in range(rows):
        table.insert(
            {
                "id": str(uuid.UUID(int=i)),
                "dataAreaId": "usmf",
                "number": f"C-{i:07d}",
                "name": f"Card holder {i}",
                "level": i % 4,
                "points": i * 10,
                "currency": "USD",
                "active": True,
                "created": "2026-01-01T00:00:00Z",
                "etag": i,
            }
        )
    elapsed = time.perf_counter() - start
    lookups = time.perf_counter()
    for i in range(0, rows, max(1, rows // 100_000)):
        assert table.find("dataAreaId,number", ("usmf", f"C-{i:07d}")) is not None
    lookup_s = time.perf_counter() - lookups
    scan = time.perf_counter()
    matched = sum(1 for row in table.scan_tuples() if row[4] == 2)
    scan_s = time.perf_counter() - scan
    # ru_maxrss is in KiB on Linux.
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"inserted {len(table):,} rows in {elapsed:.2f} s: {len(table) / elapsed:,.0f} rows/s")
    print(f"unique-key lookups: {min(rows, 100_000):,} in {lookup_s:.2f} s")
    print(f"tuple scan: {scan_s:.2f} s ({matched:,} matched)")
    print(f"peak RSS: {peak_mib:,.0f} MiB")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
