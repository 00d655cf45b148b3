"""Events as the real services shape them, end to end: a Dataverse delete whose pre-image carries the
row's version (the sandbox sends `RowVersion` on images as Dataverse does) propagates live."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.e2e.conftest import E2E, Observed

pytestmark = pytest.mark.e2e

CARDS = "loyalty-cards"
FO_CARDS, DV_CARDS = "RetailLoyaltyCards", "msdyn_loyaltycards"


async def test_a_dataverse_delete_carrying_the_last_applied_version_deletes_in_fo(
    e2e: E2E, observed: Observed
) -> None:
    key = e2e.key("DEL")
    await e2e.agent.create(DV_CARDS, e2e.dv_body(CARDS, {"CardNumber": key, "PartyNumber": "P-1"}))
    await e2e.fo_has(CARDS, key, {"CardNumber": key, "PartyNumber": "P-1"})
    await e2e.agent.upsert(DV_CARDS, {"msdyn_cardnumber": key}, {"msdyn_partynumber": "P-2"}, mode="update")
    await e2e.fo_has(CARDS, key, {"PartyNumber": "P-2"})
    await e2e.settle()

    # The version the engine applied from Dataverse is the row's current one: the number the delete's
    # pre-image will carry.
    record = await e2e.runtime.state.get(CARDS, key)
    row = await e2e.dv_row(CARDS, key)
    assert record is not None and row is not None
    applied = record.versions.get("dataverse")
    assert applied == str(row["versionnumber"])

    await e2e.agent.delete_by_key(DV_CARDS, {"msdyn_cardnumber": key})
    await e2e.eventually(lambda: e2e.fo_row(CARDS, key), lambda found: found is None, f"{key} deleted in F&O")
    await e2e.settle()

    deletes = [(e, o) for e, o, _ in observed.seen if e.side == "dataverse" and e.operation == "delete"
               and o is not None and o.key == key]
    assert deletes, "the Dataverse delete webhook reached the worker"
    assert {e.source_version for e, _ in deletes} == {applied}  # the pre-image's RowVersion
    assert "deleted" in {o.reason for _, o in deletes} and "stale" not in {o.reason for _, o in deletes}
    assert observed.parked(CARDS, key) == []
