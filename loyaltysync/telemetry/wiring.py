"""What connects the recorder to a running app: target-call observers and the backlog snapshot."""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any

from loyaltysync.telemetry.recorder import current

if TYPE_CHECKING:
    from loyaltysync.runtime import Runtime
    from loyaltysync.targets.http import Attempt, TargetHttp

log = logging.getLogger("loyaltysync.telemetry")

_observed: weakref.WeakSet[TargetHttp] = weakref.WeakSet()


def _observe(attempt: Attempt) -> None:
    # Looked up per call, so the recorder in force (tests swap it) gets the span.
    current().attempt(attempt)


def instrument_runtime(runtime: Runtime) -> None:
    """Record a CLIENT span and request metrics for every F&O and Dataverse attempt (idempotent)."""
    for http in (runtime.fno.http, runtime.dataverse.http):
        if http not in _observed:
            http.add_observer(_observe)
            _observed.add(http)


async def refresh_backlog(runtime: Runtime) -> dict[str, Any]:
    """Snapshot queue backlog, oldest age, poison and dead letters per template for the gauges; log it.

    Returns the `operations.status` answer it used. One log line per template
    carries the same numbers as dimensions (`backlog`, `oldest_age_s`, ...) so
    the classic Functions log pipeline can alert on them too.
    """
    from loyaltysync.operations import status

    report = await status(runtime)
    current().backlog.update(report)
    for name, values in report["templates"].items():
        log.info(
            "backlog %s: %s waiting (oldest %s s), %s poison, %s dead letters%s",
            name,
            values["backlog"],
            values["oldest_age_s"],
            values["poison_backlog"],
            values["dead_letters"],
            ", paused" if values["paused"] else "",
            extra={
                "template": name,
                "backlog": values["backlog"],
                "oldest_age_s": values["oldest_age_s"] or 0,
                "poison_backlog": values["poison_backlog"],
                "dead_letters": values["dead_letters"],
                "paused": values["paused"],
            },
        )
    return report
