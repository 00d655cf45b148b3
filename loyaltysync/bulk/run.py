"""The initial sync of one template in one direction: stream pages, map, write in bulk, record, checkpoint.

The pipeline, with memory bounded by `pages_in_flight` pages whatever the table size:

    read page n+1  ─┐
    page n:  map ─> chunks of `batch_size` ─> writer (several requests in flight, rate-controlled)
                 ─> sync state of the acknowledged records (put_many) ─> dead letters for the others
    pages committed in order ─> checkpoint (control store) after each

The next page is read while earlier ones are being written; a page is
committed (checkpointed) only when it and every page before it are done, so
the checkpoint never runs ahead of what the target holds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from azure.core.exceptions import AzureError

from loyaltysync.bulk import checkpoint as checkpoints
from loyaltysync.bulk.checkpoint import Checkpoint, Direction
from loyaltysync.bulk.prepare import Failure, Item, prepare_page
from loyaltysync.bulk.source import Source, SourcePage
from loyaltysync.bulk.writers import DataverseWriter, FnoWriter, WriteAborted, Writer
from loyaltysync.errors import LoyaltySyncError, TargetError
from loyaltysync.events.model import ChangeEvent
from loyaltysync.progress import NoProgress, ProgressSink
from loyaltysync.ratecontrol import RateController, RateSettings
from loyaltysync.runtime import Runtime
from loyaltysync.templates import Side, Template

log = logging.getLogger("loyaltysync.bulk")

SAMPLE_FAILURES = 20
PARKS_IN_FLIGHT = 8


@dataclass(frozen=True, slots=True)
class SyncOptions:
    """How an initial sync runs. Batch sizes follow the services' guidance: Dataverse suggests about 1000
    records per bulk request (wire-formats 1.8); an F&O `$batch` takes up to 5000 operations (2.2)."""

    dry_run: bool = False
    resume: bool = False
    page_size: int = 5000  # rows per source page (Dataverse allows 5000, F&O 10,000)
    batch_size: int = 1000  # records per write request
    pages_in_flight: int = 3  # pages mapped and being written at once: the memory bound


@dataclass(slots=True)
class InitialSyncReport:
    """What one run did (this run's counts; `checkpoint` holds the totals across resumes)."""

    template: str
    direction: Direction
    dry_run: bool = False
    read: int = 0
    written: int = 0
    failed: int = 0
    pages: int = 0
    resumed_after_page: int = 0
    complete: bool = False
    seconds: float = 0.0
    requests: int = 0
    throttled: int = 0
    failures: list[Failure] = field(default_factory=list)
    error: str | None = None
    checkpoint: Checkpoint | None = None

    @property
    def rows_per_second(self) -> float:
        return self.read / self.seconds if self.seconds > 0 else 0.0

    @property
    def throttled_share(self) -> float:
        return self.throttled / self.requests if self.requests else 0.0

    def summary(self) -> str:
        """One line: counts, speed, throttling, and how it ended."""
        verb = "would write" if self.dry_run else "written"
        state = "complete" if self.complete else f"stopped: {self.error}" if self.error else "incomplete"
        resumed = f", resumed after page {self.resumed_after_page}" if self.resumed_after_page else ""
        return (
            f"{self.template} {self.direction}: read {self.read}, {verb} {self.written}, failed {self.failed} "
            f"in {self.seconds:.1f} s ({self.rows_per_second:,.0f} rows/s), {self.requests} requests, "
            f"{self.throttled} throttled ({self.throttled_share:.2%}){resumed}; {state}"
        )


@dataclass(slots=True)
class _PageResult:
    page: SourcePage
    written: int
    failures: list[Failure]


def source_side(direction: Direction) -> Side:
    """The side an initial sync reads from."""
    return "fo" if direction == "fo-to-dataverse" else "dataverse"


def controller_for(runtime: Runtime, direction: Direction, settings: RateSettings | None = None) -> RateController:
    """A rate controller attached to the target's HTTP pipeline (share one per target in a process)."""
    if direction == "fo-to-dataverse":
        return RateController(settings, name="Dataverse").attach(runtime.dataverse.http)
    return RateController(settings, name="F&O").attach(runtime.fno.http)


class _Run:
    def __init__(
        self,
        runtime: Runtime,
        template: Template,
        direction: Direction,
        options: SyncOptions,
        controller: RateController,
        progress: ProgressSink,
    ) -> None:
        self.runtime = runtime
        self.template = template
        self.direction = direction
        self.options = options
        self.progress = progress
        self.side = source_side(direction)
        self.source = Source(runtime, template, self.side, page_size=options.page_size)
        self.writer: Writer
        if direction == "fo-to-dataverse":
            self.writer = DataverseWriter(runtime.dataverse, template, controller)
        else:
            self.writer = FnoWriter(runtime.fno, template, controller)
        self.report = InitialSyncReport(template.name, direction, dry_run=options.dry_run)
        self._parks = asyncio.Semaphore(PARKS_IN_FLIGHT)

    async def run(self) -> InitialSyncReport:
        started = time.monotonic()
        stats = self.writer.controller.stats
        requests, throttled = stats.requests, stats.throttled
        target = self.runtime.dataverse.http if self.direction == "fo-to-dataverse" else self.runtime.fno.http
        try:
            with self.writer.controller.owning_throttling(target):
                await self._run()
        except (WriteAborted, TargetError, LoyaltySyncError, AzureError) as exc:
            # Stopped for a reason that is not one record's (a target or the storage account is down,
            # a configuration error): the checkpoint holds; `--resume` continues from it.
            self.report.error = str(exc)
            log.error("initial sync of %s stopped: %s", self.template.name, exc)
        finally:
            self.report.seconds = time.monotonic() - started
            self.report.requests = stats.requests - requests
            self.report.throttled = stats.throttled - throttled
        return self.report

    async def _run(self) -> None:
        saved = await checkpoints.load(self.runtime.control, self.template.name, self.direction)
        start: str | None = None
        if self.options.resume and saved is not None:
            if saved.status == "done":
                self.report.complete, self.report.checkpoint = True, saved
                log.info("%s %s: already complete; nothing to resume", self.template.name, self.direction)
                return
            start, self.report.resumed_after_page = saved.next, saved.pages
            current = saved
        else:
            current = Checkpoint(self.template.name, self.direction)
        self.report.checkpoint = current
        total = await self.source.count()
        self.progress.start(f"{self.template.name} {self.direction}", total)
        if current.read:
            self.progress.advance(current.read)
        if isinstance(self.writer, DataverseWriter) and not self.options.dry_run:
            await self.writer.check_support()

        in_flight: deque[asyncio.Task[_PageResult]] = deque()
        pages = self.source.pages(start, number=current.pages)
        read_error: Exception | None = None
        try:
            while True:
                # Commit, in order, every page that is done; the next read overlaps the writes in flight.
                while in_flight and in_flight[0].done():
                    await self._commit(in_flight.popleft().result(), current)
                if len(in_flight) >= self.options.pages_in_flight:
                    await asyncio.wait({in_flight[0]})
                    continue
                try:
                    page = await anext(pages)
                except StopAsyncIteration:
                    break
                except Exception as exc:  # the source failed: finish and commit what is in flight, then stop
                    read_error = exc
                    break
                in_flight.append(asyncio.create_task(self._page(page), name=f"page-{page.number}"))
            while in_flight:
                await self._commit(await in_flight.popleft(), current)
        finally:
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)
            await pages.aclose()
        if read_error is not None:
            raise read_error
        self.report.complete = current.status == "done"

    async def _page(self, page: SourcePage) -> _PageResult:
        prepared = await prepare_page(self.template, page.rows, self.side, self.runtime.engine.lookups)
        failures = list(prepared.failures)
        self.progress.advance(len(failures))
        if self.options.dry_run:
            self.progress.advance(len(prepared.items))
            return _PageResult(page, len(prepared.items), failures)
        size = max(1, self.options.batch_size)
        chunks = [prepared.items[i : i + size] for i in range(0, len(prepared.items), size)]
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._chunk(chunk)) for chunk in chunks]
        except BaseExceptionGroup as group_error:
            # The first chunk's reason is the page's (the others were cancelled with it).
            raise _first(group_error) from None
        for task in tasks:
            failures.extend(task.result())
        failed = {f.key_text for f in failures}
        acknowledged = [item for item in prepared.items if item.key_text not in failed]
        if acknowledged:
            await self.runtime.state.put_many([item.state(self.template.name) for item in acknowledged])
        await asyncio.gather(*(self._park(f) for f in failures))
        return _PageResult(page, len(acknowledged), failures)

    async def _chunk(self, chunk: list[Item]) -> list[Failure]:
        failures = await self.writer.write(chunk)
        self.progress.advance(len(chunk))
        return failures

    async def _park(self, failure: Failure) -> None:
        event = ChangeEvent(
            template=self.template.name,
            side=self.side,
            operation="update",
            key=dict(failure.key),
            row_id=failure.row_id,
            wire_format="reconcile",
        )
        async with self._parks:
            await self.runtime.dead_letters.park(
                self.template.name,
                self.side,
                failure.key_text,
                f"initial sync: {failure.reason}",
                failure.code,
                event.to_json(),
                event.event_id,
            )

    async def _commit(self, result: _PageResult, current: Checkpoint) -> None:
        report = self.report
        rows = len(result.page.rows)
        report.pages += 1
        report.read += rows
        report.written += result.written
        report.failed += len(result.failures)
        room = SAMPLE_FAILURES - len(report.failures)
        report.failures.extend(result.failures[: max(0, room)])
        current.pages = result.page.number
        current.next = result.page.next
        current.read += rows
        current.written += result.written
        current.failed += len(result.failures)
        current.status = "done" if result.page.next is None else "running"
        if not self.options.dry_run:
            await checkpoints.save(self.runtime.control, current)


SUMMARY_COLUMNS = ("template", "direction", "read", "written", "failed", "seconds", "rows/s", "requests", "throttled")


def summary_rows(reports: list[InitialSyncReport]) -> list[list[object]]:
    """One row per report for the end-of-run table (columns `SUMMARY_COLUMNS`)."""
    return [
        [
            r.template,
            r.direction + (" (dry run)" if r.dry_run else ""),
            r.read,
            r.written,
            r.failed,
            round(r.seconds, 1),
            round(r.rows_per_second),
            r.requests,
            f"{r.throttled} ({r.throttled_share:.2%})",
        ]
        for r in reports
    ]


def exit_code(reports: list[InitialSyncReport]) -> int:
    """0: everything copied; 1: a run stopped (resume it); 2: complete, but records were parked."""
    if any(r.error or not r.complete for r in reports):
        return 1
    return 2 if any(r.failed for r in reports) else 0


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


async def initial_sync(
    runtime: Runtime,
    template: Template,
    direction: Direction,
    options: SyncOptions | None = None,
    *,
    controller: RateController | None = None,
    progress: ProgressSink | None = None,
) -> InitialSyncReport:
    """Copy every record of `template` from one side to the other in bulk; resumable, never raises for
    records or for a stop mid-way (the report says what happened; `error` is set when it stopped).

    Records that fail are parked as dead letters with the reason; the sync state of the
    others is stored, so live sync afterwards sees them as agreed.
    """
    return await _Run(
        runtime,
        template,
        direction,
        options or SyncOptions(),
        controller or controller_for(runtime, direction),
        progress or NoProgress(),
    ).run()


async def initial_sync_many(
    runtime: Runtime,
    templates: list[Template],
    direction: Direction,
    options: SyncOptions | None = None,
    *,
    rate: RateSettings | None = None,
    progress: ProgressSink | None = None,
) -> list[InitialSyncReport]:
    """`initial_sync` of several templates in turn, sharing one rate controller (one budget per target).

    Stops after a template whose run stopped (the later ones would hit the same cause).
    """
    controller = controller_for(runtime, direction, rate)
    reports = []
    for template in templates:
        report = await initial_sync(runtime, template, direction, options, controller=controller, progress=progress)
        reports.append(report)
        if report.error:
            break
    return reports
