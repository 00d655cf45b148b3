"""The operator surface behind the admin endpoints and CLI: health, status, pause, resume, replay."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from azure.core.exceptions import ResourceNotFoundError

from loyaltysync.errors import TargetError
from loyaltysync.runtime import Runtime


async def health(runtime: Runtime) -> tuple[bool, dict[str, Any]]:
    """Check storage and both targets; (all ok, per-part detail)."""

    async def storage() -> str:
        await runtime.control.get("health", "probe")
        return "ok"

    async def dataverse() -> str:
        who = await runtime.dataverse.who_am_i()
        return f"ok (user {who.get('UserId')})"

    async def fno() -> str:
        template = next(iter(runtime.templates.values()))
        async for _ in runtime.fno.query(template.fo.entity_set, select=list(template.fo.keys), page_size=1):
            break
        return "ok"

    checks = {"storage": storage(), "dataverse": dataverse(), "fo": fno()}
    results = await asyncio.gather(*checks.values(), return_exceptions=True)
    detail: dict[str, Any] = {}
    for name, result in zip(checks, results, strict=True):
        detail[name] = result if isinstance(result, str) else f"failed: {_describe(result)}"
    return all(isinstance(r, str) for r in results), detail


def _describe(error: BaseException) -> str:
    if isinstance(error, TargetError):
        return f"{error.status} {error.code} {error.message}".strip()
    return f"{type(error).__name__}: {error}"


async def status(runtime: Runtime) -> dict[str, Any]:
    """Per template: backlog and oldest age, poison backlog, dead letters, last success per side, paused.

    Last success includes what this process has not written yet (it writes it at most once per
    LAST_SUCCESS_WRITE_SECONDS); paused is read from the table, not from the worker's cache.
    """
    successes = await runtime.last_successes()
    now = datetime.now(UTC)
    templates: dict[str, Any] = {}
    for name in runtime.templates:
        backlog, oldest = await _queue_depth(runtime, name, poison=False, now=now)
        poison, _ = await _queue_depth(runtime, name, poison=True, now=now)
        letters = await runtime.dead_letters.list(name)
        templates[name] = {
            "paused": await runtime.paused(name, fresh=True),
            "backlog": backlog,
            "oldest_age_s": oldest,
            "poison_backlog": poison,
            "dead_letters": len(letters),
            "dead_letter_reasons": [
                {"key": d.key, "side": d.side, "reason": d.reason, "attempts": d.attempts, "last_seen": d.last_seen}
                for d in letters[:20]
            ],
            "last_success": {side: successes.get(f"{name}:{side}", {}).get("at") for side in ("fo", "dataverse")},
        }
    return {"templates": templates, "at": now.isoformat()}


async def _queue_depth(runtime: Runtime, template: str, *, poison: bool, now: datetime) -> tuple[int, float | None]:
    client = runtime.queue(template, poison=poison)
    try:
        props = await client.get_queue_properties()
    except ResourceNotFoundError:  # a queue that does not exist yet is empty
        return 0, None
    count = int(props.approximate_message_count or 0)
    oldest: float | None = None
    if count:
        peeked = await client.peek_messages(max_messages=1)
        if peeked and peeked[0].inserted_on:
            oldest = round((now - peeked[0].inserted_on).total_seconds(), 1)
    return count, oldest
