"""In-memory F&O and Dataverse for the deterministic simulator, on the sandbox's own data layer.

The simulator (issue #15) runs the real engine and worker many thousands of
times a second on virtual time; a request through httpx and the emulators'
Starlette apps costs far too much for that. So the engine gets client objects
that call the sandbox's data layer directly: `FnoData` (F&O's write rules, row
versions and ETags, the event publisher) and the Dataverse `Organization`
(`writes`, `rows.render_row`, `query.run`, the webhook `Dispatcher`, the F&O
virtual-table `DataEventLink`). Each semantic has one implementation, the
sandbox's; what stands between it and HTTP here is only what the HTTP layer
would do: parse the key, pick the caller, turn a refusal into the error body
the real client reads (`error_from_body`, so status, code and message are the
ones the real client raises).

- `SimFnoClient` / `SimDataverseClient` subclass the real `FnoClient` /
  `DataverseClient` (the engine, the reconciler and `LookupCache` take them as
  they are) and override every method that sends a request. Client-side logic
  with no request of its own (`find_id`, writes by `$filter` for keys a URL
  cannot carry, `as_caller`) is inherited, not copied. Bulk messages
  (`upsert_multiple`, `create_multiple`, Dataverse `$batch`) are not modelled:
  they raise `NotImplementedError`. F&O `$batch` is modelled for GETs (the
  reconciler's read-back).
- Each request the real client would send is one attempt: `await hooks.before`
  (a fault raises the TargetError the client would get, and nothing is
  applied), the change applied synchronously, `await hooks.after` (raising
  there is an answer lost after the change landed). Failed attempts are retried
  exactly when `TargetHttp` retries them (`RetryPolicy`, `Retry-After`,
  idempotent methods only for lost answers), sleeping with the simulator's
  `sleep`, jitter from the service's seeded generator.
- Every committed change produces what the real service sends, handed at once
  to `deliver(endpoint, template, body, headers)`: Dataverse webhooks with the
  images `loyaltysync register-webhooks` registers (the real registration code
  runs against the in-memory organization), F&O events as the virtual-table
  chain delivers them, or as F&O posts business events or data events itself.
- Determinism: time comes from each side's `clock`, ids from its
  `random.Random`; nothing reads the wall clock or the global generator.

The pieces: `faults.py` (the hooks, the faults they raise, the request loop
with the real client's retries), `dataverse.py` and `fno.py` (each service
and its client), `wire.py` (what they share). This module puts the two
services together (`build`), plays people's writes (`SimServices.person_write`)
and shows the judge the end state (`rows`, `creates`).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from devkit.sandbox.dataverse.seed import AGENT_USER
from devkit.sim import values as people
from devkit.sim.dataverse import DATAVERSE_URL, SimDataverse, SimDataverseClient
from devkit.sim.faults import FaultKind, Hooks, NoFaults, fault, fault_answer
from devkit.sim.fno import DEFAULT_COMPANY, FO_EVENT_FORMS, FO_URL, FoEventForm, SimFno, SimFnoClient
from devkit.sim.model import key_spec
from devkit.sim.wire import FUNCTION_KEY, FUNCTION_URL, STORED_TIME, Deliver
from loyaltysync.targets.http import RetryPolicy
from loyaltysync.templates import Side, Template

__all__ = [
    "DATAVERSE_URL",
    "DEFAULT_COMPANY",
    "FO_EVENT_FORMS",
    "FO_URL",
    "FUNCTION_KEY",
    "FUNCTION_URL",
    "PEOPLE_RETRY",
    "STORED_TIME",
    "Deliver",
    "FaultKind",
    "FoEventForm",
    "Hooks",
    "NoFaults",
    "PersonKind",
    "SimDataverse",
    "SimDataverseClient",
    "SimFno",
    "SimFnoClient",
    "SimServices",
    "build",
    "fault",
    "fault_answer",
]

PersonKind = Literal["create", "update", "delete"]
# People write once and take the answer: a fault reaches them as the TargetError.
PEOPLE_RETRY = RetryPolicy(max_attempts=1)


# ----------------------------------------------------------------------------- both, and people


@dataclass
class SimServices:
    """Both services of one simulated world, plus what people do and what the judge reads."""

    fno: SimFno
    dataverse: SimDataverse
    people_retry: RetryPolicy = PEOPLE_RETRY

    async def person_write(
        self, side: Side, template: str, kind: PersonKind, key: str, values: Mapping[str, Any]
    ) -> datetime:
        """One person's create, update or delete on `side`, `values` in F&O terms; the service's time of it.

        F&O: an OData write with no user (F&O events name none), timed by F&O's clock at commit.
        Dataverse: a Web API write as the seeded agent, timed by the row's `modifiedon` (a delete:
        Dataverse's clock at commit). Faults reach the person as TargetError, and so does a refusal:
        a duplicate create, an update or delete of a record that is not there.
        """
        t = self.fno.templates[template] if side == "fo" else self.dataverse.templates[template]
        specs = self.fno.specs[template]  # the model's field specs, computed once per service
        spec = key_spec(t)
        changing = {name: value for name, value in values.items() if name != spec.fo}
        if side == "fo":
            fo = SimFnoClient(self.fno, retry=self.people_retry)
            if kind == "create":
                await fo.create(t.fo.entity_set, people.fo_body(specs, {**changing, spec.fo: key}))
            elif kind == "update":
                await fo.update(t.fo.entity_set, {spec.fo: key}, people.fo_body(specs, changing))
            else:
                await fo._delete_strict(t.fo.entity_set, {spec.fo: key})
            assert fo.last_commit is not None  # noqa: S101 - the write committed, or it raised
            return fo.last_commit
        dv = SimDataverseClient(
            self.dataverse, retry=self.people_retry, caller_object_id=AGENT_USER.azureactivedirectoryobjectid
        )
        dv_key = {spec.dataverse: key}
        if kind == "create":
            change = await dv._create(t.dataverse.entity_set, people.dv_body(specs, {**changing, spec.fo: key}))
        elif kind == "update":
            change = await dv._update_by_key(t.dataverse.entity_set, dv_key, people.dv_body(specs, changing))
        else:
            await dv._delete_strict(t.dataverse.entity_set, dv_key)
            assert dv.last_commit is not None  # noqa: S101 - the delete committed, or it raised
            return dv.last_commit
        assert change.after is not None  # noqa: S101 - create and update leave a row
        return datetime.strptime(str(change.after["modifiedon"]), STORED_TIME).replace(tzinfo=UTC)

    def rows(self, side: Side, template: str) -> dict[str, dict[str, Any]]:
        """The end state of one side: key -> values in F&O terms (devkit/sim/model.py)."""
        return self.fno.rows(template) if side == "fo" else self.dataverse.rows(template)

    def creates(self, side: Side, template: str) -> Counter[str]:
        """Committed creates of each key on `side`, by anyone, counted at commit."""
        return self.fno.creates(template) if side == "fo" else self.dataverse.creates(template)


async def build(
    templates: Mapping[str, Template],
    *,
    fo_clock: Callable[[], datetime],
    dataverse_clock: Callable[[], datetime],
    rng: random.Random,
    hooks: Hooks,
    deliver: Deliver,
    fo_events: FoEventForm = "virtual-table",
) -> SimServices:
    """Both services, the webhooks registered and the F&O events activated; ids from `rng`."""
    dataverse = SimDataverse(templates, clock=dataverse_clock, rng=random.Random(rng.getrandbits(64)),  # noqa: S311
                             hooks=hooks, deliver=deliver)
    await dataverse.register_webhooks()
    fno = SimFno(templates, clock=fo_clock, rng=random.Random(rng.getrandbits(64)),  # noqa: S311
                 hooks=hooks, deliver=deliver, events=fo_events, dataverse=dataverse)
    fno.subscribe()
    return SimServices(fno, dataverse)
