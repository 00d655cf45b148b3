"""Bulk writers: many records per request, failures isolated to the records that cause them.

Dataverse: `UpsertMultiple` by alternate key (wire-formats 1.8), one request per
chunk; on a table without the bulk messages (checked once with the documented
`sdkmessagefilters` query), a `$batch` of PATCH upserts with continue-on-error
(1.7). F&O has no upsert (2.2, part C): a `$batch` of creates, one change set
each so one bad record rolls back only itself, with continue-on-error; the
creates that find the record already there ("already exists", from an earlier
run or a resume) become updates in a second `$batch`.

Failure isolation: UpsertMultiple is all or nothing on standard tables, so a
chunk that fails for a reason of its own (4xx) is split in halves and retried
until the bad records stand alone; `$batch` answers per operation. A record
that fails alone is a `Failure` with the service's reason. Transient failures
(429, 5xx, connection) are never blamed on records: the chunk waits (the rate
controller holds every writer for `Retry-After`) and is sent again; after
`max_transient` such rounds the run stops (`WriteAborted`) and `--resume`
continues from the last checkpoint. Configuration errors (401, 403, an unknown
entity set) stop the run at once.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from loyaltysync.bulk.prepare import Failure, Item
from loyaltysync.errors import LoyaltySyncError, TargetError
from loyaltysync.ratecontrol import RateController
from loyaltysync.targets import dataverse as dv
from loyaltysync.targets import fno
from loyaltysync.targets.batch import BatchRequest, BatchResult, ChangeSet
from loyaltysync.targets.dataverse import DataverseClient
from loyaltysync.targets.fno import FnoClient
from loyaltysync.targets.odata import literal
from loyaltysync.templates import Template

log = logging.getLogger("loyaltysync.bulk")

MAX_TRANSIENT = 8  # rounds of transient failures (not throttling) one chunk may see before the run stops
ERROR_BACKOFF_S = 2.0
_FATAL = frozenset({401, 403})
_NOT_SUPPORTED = "does not support entities of type"


class WriteAborted(LoyaltySyncError):
    """A chunk could not be written for a reason that is not the records' fault; the run stops here."""

    def __init__(self, reason: str, cause: TargetError | None = None) -> None:
        super().__init__(reason)
        self.cause = cause


class Writer(Protocol):
    """Writes one chunk; returns the records that failed (the others are acknowledged)."""

    name: str
    controller: RateController

    async def write(self, items: list[Item]) -> list[Failure]: ...


def _failure(item: Item, error: TargetError) -> Failure:
    return Failure(item.key_text, item.key, error.message or str(error), error.code or str(error.status), item.row_id)


def _fatal(error: TargetError) -> bool:
    if error.status in _FATAL:
        return True
    return error.status == 404 and error.code.lower() == "0x8006088a"  # unknown entity set


class _Base(abc.ABC):
    """Retry, throttling and bisection shared by both writers; subclasses send one request."""

    name = "writer"

    def __init__(self, controller: RateController, *, max_transient: int = MAX_TRANSIENT) -> None:
        self.controller = controller
        self.max_transient = max_transient

    async def write(self, items: list[Item]) -> list[Failure]:
        failures: list[Failure] = []
        await self._isolate(items, failures)
        return failures

    async def _isolate(self, items: list[Item], failures: list[Failure]) -> None:
        """Write `items`; when the request as a whole is refused, halve until the culprits stand alone."""
        if not items:
            return
        try:
            failures.extend(await self._with_retries(items, self._send))
        except TargetError as error:
            if _fatal(error):
                raise WriteAborted(f"{self.name}: {error}", error) from error
            if len(items) == 1:
                failures.append(_failure(items[0], error))
                return
            middle = len(items) // 2
            log.info("%s: %d records refused together (%s); splitting", self.name, len(items), error.code)
            await self._isolate(items[:middle], failures)
            await self._isolate(items[middle:], failures)

    async def _with_retries(
        self, items: list[Item], send: Callable[[list[Item]], Awaitable[tuple[list[Failure], list[Item]]]]
    ) -> list[Failure]:
        """Send under the rate controller; throttled or transiently failed records go again."""
        failures: list[Failure] = []
        rounds = 0
        pending = items
        while pending:
            try:
                async with self.controller.slot():
                    done, again = await send(pending)
            except TargetError as error:
                if not error.transient:
                    raise
                done, again = [], pending
                rounds = self._after_transient(error, rounds)
            else:
                if again:
                    rounds = self._after_transient(None, rounds)
            failures.extend(done)
            pending = again
            if pending:
                await asyncio.sleep(0)
        return failures

    def _after_transient(self, error: TargetError | None, rounds: int) -> int:
        """Count a round that must be repeated; throttling waits without counting, others back off."""
        if error is not None and error.status == 429:
            self.controller.hold(error.retry_after if error.retry_after is not None else 1.0)
            return rounds
        rounds += 1
        if rounds > self.max_transient:
            raise WriteAborted(f"{self.name}: still failing after {rounds} attempts: {error}", error)
        self.controller.hold(error.retry_after if error and error.retry_after else ERROR_BACKOFF_S * rounds)
        return rounds

    @abc.abstractmethod
    async def _send(self, items: list[Item]) -> tuple[list[Failure], list[Item]]:
        """Write one request's items: (records the target refused, records to send again: throttled or transient)."""


def _split_results(items: list[Item], results: list[BatchResult]) -> tuple[list[Failure], list[Item], list[Item]]:
    """Per operation: (permanent failures, transiently failed items, items answered "already exists")."""
    failures: list[Failure] = []
    again: list[Item] = []
    exists: list[Item] = []
    for item, result in zip(items, results, strict=True):
        error = result.error
        if error is None:
            continue
        if fno.lost_create_race(error):
            exists.append(item)
        elif error.transient or error.status == 424:  # 424: not executed, never the record's fault
            again.append(item)
        elif _fatal(error):
            raise WriteAborted(f"batch operation refused: {error}", error)
        else:
            failures.append(_failure(item, error))
    return failures, again, exists


class DataverseWriter(_Base):
    """UpsertMultiple by alternate key, or `$batch` upserts where the table lacks the bulk messages."""

    def __init__(self, client: DataverseClient, template: Template, controller: RateController, **kwargs: int) -> None:
        super().__init__(controller, **kwargs)
        self.client = client
        self.template = template
        self.name = f"Dataverse {template.dataverse.entity_set}"
        self.bulk: bool | None = None  # unknown until checked
        self._checking = asyncio.Lock()

    async def check_support(self) -> bool:
        """Whether the table supports UpsertMultiple (an `sdkmessagefilters` row exists for it).

        Throttled or unavailable says nothing about the table: it waits and asks again.
        """
        rounds = 0
        while True:
            try:
                async with self.controller.slot():
                    return await self._ask_support()
            except TargetError as error:
                if not error.transient:
                    raise
                rounds = self._after_transient(error, rounds)

    async def _ask_support(self) -> bool:
        """One `sdkmessagefilters` query (transient errors raise; a refused query means "use $batch")."""
        where = (
            f"sdkmessageid/name eq {literal('UpsertMultiple')} and "
            f"primaryobjecttypecode eq {literal(self.template.dataverse.table)}"
        )
        try:
            found = False
            async for page in self.client.query("sdkmessagefilters", select=["sdkmessagefilterid"], filter=where):
                found = found or bool(page)
        except TargetError as error:
            if _fatal(error):
                raise WriteAborted(f"{self.name}: {error}", error) from error
            if error.transient:
                raise
            log.info("%s: cannot read sdkmessagefilters (%s); using $batch", self.name, error)
            found = False
        self.bulk = found
        return found

    async def _send(self, items: list[Item]) -> tuple[list[Failure], list[Item]]:
        if self.bulk is None:
            async with self._checking:  # the first chunks arrive together: one query answers them all
                if self.bulk is None:
                    await self._ask_support()  # already inside this chunk's slot
        if self.bulk:
            try:
                await self.client.upsert_multiple(
                    self.template.dataverse.entity_set,
                    self.template.dataverse.table,
                    [(item.target_key, item.body) for item in items],
                    id_column=self.template.dataverse.primary_id,
                    chunk_size=len(items),
                )
                return [], []
            except TargetError as error:
                if error.status == 400 and _NOT_SUPPORTED in error.message:
                    log.warning("%s: UpsertMultiple not supported here; using $batch", self.name)
                    self.bulk = False
                    return [], items
                raise
        return await self._batch(items)

    async def _batch(self, items: list[Item]) -> tuple[list[Failure], list[Item]]:
        entity_set = self.template.dataverse.entity_set
        plain = [item for item in items if not dv.needs_filter(item.target_key)]
        failures: list[Failure] = []
        again: list[Item] = []
        if plain:
            operations = [BatchRequest("PATCH", dv.key_path(entity_set, i.target_key), i.body) for i in plain]
            results = await self.client.batch(operations, continue_on_error=True)
            failures, again, _ = _split_results(plain, results)
        for item in items:
            if dv.needs_filter(item.target_key):  # the URL cannot carry this key: look it up, then write by id
                try:
                    await self.client.upsert(
                        entity_set, item.target_key, item.body, id_column=self.template.dataverse.primary_id
                    )
                except TargetError as error:
                    if error.transient:
                        again.append(item)
                    elif _fatal(error):
                        raise WriteAborted(f"{self.name}: {error}", error) from error
                    else:
                        failures.append(_failure(item, error))
        return failures, again


class FnoWriter(_Base):
    """`$batch` creates (a change set each), then updates for the records that already exist."""

    def __init__(self, client: FnoClient, template: Template, controller: RateController, **kwargs: int) -> None:
        super().__init__(controller, **kwargs)
        self.client = client
        self.template = template
        self.name = f"F&O {template.fo.entity_set}"

    async def _send(self, items: list[Item]) -> tuple[list[Failure], list[Item]]:
        entity_set = self.template.fo.entity_set
        creates: list[ChangeSet | BatchRequest] = [
            ChangeSet([BatchRequest("POST", entity_set, item.body)]) for item in items
        ]
        results = await self.client.batch(creates, continue_on_error=True)
        failures, again, exists = _split_results(items, results)
        if exists:
            # Still inside the caller's slot: the updates are this chunk's second request.
            update_failures, update_again = await self._updates(exists)
            failures += update_failures
            again += update_again
        return failures, again

    async def _updates(self, items: list[Item]) -> tuple[list[Failure], list[Item]]:
        entity_set = self.template.fo.entity_set
        company = self.template.fo.company_specific
        body_keys = set(self.template.fo.keys) | {fno.COMPANY}
        updates: list[ChangeSet | BatchRequest] = [
            ChangeSet(
                [
                    BatchRequest(
                        "PATCH",
                        fno.key_path(entity_set, item.target_key, cross_company=company),
                        {k: v for k, v in item.body.items() if k not in body_keys},
                    )
                ]
            )
            for item in items
        ]
        results = await self.client.batch(updates, continue_on_error=True)
        failures, again, exists = _split_results(items, results)
        # "Already exists" on an update cannot happen; should it, the record is retried, never lost.
        return failures, again + exists
