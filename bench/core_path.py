"""Core path benchmark: parse + map + decide per event, no I/O (`make bench-core`).

A mix of real-shaped payloads (the documented shapes in tests/fixtures/events:
Dataverse webhooks with images, F&O data events, business events, Event Grid)
is parsed into change events; each event's record is mapped to canonical form
(Dataverse payloads directly, F&O notifications from an F&O OData row as the
worker would re-read it) and decided against an agreed state and the other
side's record. Prints `core path: <N> µs per event` (target: at most 500).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loyaltysync import mapping  # noqa: E402
from loyaltysync.decide import Agreed, SideRecord, decide  # noqa: E402
from loyaltysync.events import Parsed, parse_inbound  # noqa: E402
from loyaltysync.templates import Lookup, Side, Template, load_templates  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "events"
FO_ROWS: dict[str, dict[str, Any]] = {
    "loyalty-cards": {
        "CardNumber": "C-1001", "CardTenderType": "Blocked", "PartyNumber": "P-1", "ReplacementCardNumber": "",
        "OmOperatingUnitNumber": "S0001", "LoyaltyEnrollmentDate": "2026-01-15T00:00:00Z",
        "LoyaltyEnrollmentDateLocal": "1900-01-01T00:00:00Z",
    },
    "loyalty-levels": {"LevelPhrase": "Gold", "LevelDescription": "Top customers"},
    "loyalty-reward-points": {
        "RewardPointId": "STAR", "RewardPointType": "Quantity", "Redeemable": "Yes", "RedeemRanking": 1,
        "RewardPointCurrency": "USD", "MaximumLoyaltyRewardPoints": 10000.0, "ExpirationTimeUnit": "Year",
        "ExpirationTimeValue": 1, "VestingTimeUnit": "Day", "VestingTimeValue": 30,
    },
}


class Currencies:
    """The lookup cache as the worker has it after `prepare` (in memory)."""

    def __init__(self) -> None:
        self.ids = {"USD": "ce1a0000-0000-4000-8000-000000000840", "EUR": "ce1a0000-0000-4000-8000-000000000978"}

    def id_for(self, lookup: Lookup, key: str) -> str | None:
        return self.ids.get(key.upper())

    def key_for(self, lookup: Lookup, row_id: str) -> str | None:
        return next((k for k, v in self.ids.items() if v == row_id.lower()), "USD")


def _read_back(column: str) -> str:
    """`nav@odata.bind` as written reads back as `_nav_value` (the bound id; here the bind path)."""
    return f"_{column.split('@')[0]}_value" if column.endswith("@odata.bind") else column


def payloads() -> list[tuple[Side, bytes]]:
    mix: list[tuple[Side, bytes]] = []
    for path in sorted(FIXTURES.glob("*.json")):
        side: Side = "dataverse" if path.name.startswith("dataverse") else "fo"
        mix.append((side, path.read_bytes()))
    return mix


def one(templates: dict[str, Template], side: Side, body: bytes, resolver: Currencies) -> int:
    result = parse_inbound(side, body, {}, templates=templates)
    if not isinstance(result, Parsed):
        return 0
    for event in result.events:
        template = templates[event.template]
        fo_row = FO_ROWS[template.name]
        fo_values = mapping.fo_to_canonical(template, fo_row)
        if side == "dataverse" and event.complete:
            dv_values = dict(event.fields)
            dv_values.update(mapping.resolve_lookups(template, event.lookup_ids, resolver))
        else:
            # As the worker re-reads it: the Dataverse row in Web API JSON, mapped back.
            dv_row = mapping.canonical_to_dataverse(template, fo_values, resolver)
            dv_row = {_read_back(k): v for k, v in dv_row.items()}
            dv_values = mapping.dataverse_to_canonical(template, dv_row, resolver)
        agreed = Agreed(values=dict(fo_values), exists=True)
        decide(
            template,
            SideRecord(fo_values, modified_on="2026-11-23T10:00:00Z"),
            SideRecord(dv_values, modified_on="2026-11-23T10:00:01Z"),
            agreed,
            trigger=side,
        )
    return len(result.events)


def main() -> None:
    templates = load_templates(ROOT / "mappings")
    mix = payloads()
    resolver = Currencies()
    for side, body in mix:  # warm up
        one(templates, side, body, resolver)
    rounds = 400
    events = 0
    started = time.perf_counter()
    for _ in range(rounds):
        for side, body in mix:
            events += one(templates, side, body, resolver)
    elapsed = time.perf_counter() - started
    print(f"payload mix: {len(mix)} documented shapes, {events} events in {elapsed:.2f} s")
    print(f"core path: {elapsed / events * 1e6:.0f} µs per event")


if __name__ == "__main__":
    main()
