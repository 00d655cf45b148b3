"""A second function-app instance in a process of its own, killed for real at random points.

Run as `python -m tests.chaos.worker_process` with the environment of the run's
in-process dev host (FNO_URL, DATAVERSE_URL, AzureWebJobsStorage,
LOYALTYSYNC_SANDBOX_TOKEN, ... see tests/chaos/harness.py `chaos_stack`). It
starts `devkit.devhost.DevHost` for the same `function_app` on a free
port, so it consumes the same Azurite queues as the in-process host, as a
scaled-out second instance in Azure would. It only runs the host: webhooks and
F&O event subscriptions were registered once by the harness and point at the
in-process host (DevHost.start registers nothing).

In this process the crash hook of tests/chaos/faults.py is installed as `Kills`:
at the same points (on-receive, after-write, before-state, before-complete) it
calls `os._exit(137)` with probability CHAOS_KILL_RATE per invocation, so the
process dies between a target write and the state update for real, with other
invocations in flight. Settings:
- CHAOS_KILL_RATE: probability per invocation (default DEFAULT_KILL_RATE:
  under the reduced run's load the process dies every few seconds);
- CHAOS_KILL_POINTS: comma-separated points (default: all four);
- CHAOS_KILL_SEED: seeds the draws (`SecondInstance` adds the start's number;
  timing makes runs differ anyway);
- CHAOS_LEASE_SECONDS: the queue lease of this process (default 8).

SIGTERM stops the host and exits 0. Failures that are neither a retry nor a
kill are written to stderr as `chaos-unexpected: ...` lines, for the run to
judge; each kill writes `chaos-kill: <point> <event id>` just before dying, and
each invocation's outcome a `chaos-trail: ...` line (read only to explain a
failed run).

`SecondInstance` is the run's side: it starts the process, restarts it after a
short pause whenever it dies (as the Functions platform restarts a worker),
counts the kills and stops it (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from azure.core.exceptions import HttpResponseError

from devkit.devhost import queues
from devkit.stack import REPO
from loyaltysync import worker
from loyaltysync.events.model import ChangeEvent
from loyaltysync.sync import Outcome
from tests.chaos import faults

APP_MODULE = "function_app"
DEFAULT_KILL_RATE = 0.02
DEFAULT_LEASE_SECONDS = 8
RESTART_PAUSE_S = 0.5
STOP_GRACE_S = 10.0
UNEXPECTED_MARK = "chaos-unexpected:"
STALE_RECEIPT_MARK = "chaos-stale-receipt:"
TRAIL_MARK = "chaos-trail:"
QUIET_LOGGERS = ("loyaltysync", "azure", "uvicorn", "httpx")


LOST_LEASE_CODES = ("PopReceiptMismatch", "MessageNotFound")


class _PrintingWatch(faults.FailureWatch):
    """FailureWatch for a process whose findings must reach the run: one stderr line each.

    A settle refused because the lease was lost is counted apart (STALE_RECEIPT_MARK), not as
    unexpected: with the short lease here (8 s, renewed every 4 s), a renewal that comes late on a
    loaded machine lets the message become visible, another instance takes it (PopReceiptMismatch)
    and may already have completed it (MessageNotFound). The invocation is cancelled, as after a
    kill; the message is processed by the instance that holds it. With the real 10-minute lease a
    renewal must be 5 minutes late for this.
    """

    def emit(self, record: logging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpResponseError) and getattr(error, "error_code", None) in LOST_LEASE_CODES:
            print(f"{STALE_RECEIPT_MARK} {record.getMessage()[:200]}", file=sys.stderr, flush=True)
            return
        super().emit(record)

    def found(self, line: str) -> None:
        print(f"{UNEXPECTED_MARK} {line}", file=sys.stderr, flush=True)


def _quiet_logs() -> None:
    """As the run's `quiet_logs`: the expected flood of retries stays out of the log file."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    host = logging.getLogger("devkit.devhost")
    host.addHandler(_PrintingWatch())
    host.propagate = False


def _trail(event: ChangeEvent, outcome: Outcome | None, parked: str | None) -> None:
    """What this instance did per record, one log line each, to explain a failed run (as the run's LagWatch)."""
    key = outcome.key if outcome is not None else event.key_text
    what = parked if outcome is None else (
        f"{outcome.reason} writes={outcome.writes} created={outcome.created} deleted={outcome.deleted} "
        f"conflicts={outcome.conflicts}"
    )
    print(f"{TRAIL_MARK} {event.template} {key} | {time.time():.2f} {event.side} {event.operation} "
          f"{event.wire_format} v={event.source_version} t={event.modified_on}: {what} (second instance)",
          file=sys.stderr, flush=True)


def _kills_from_env() -> faults.Kills:
    points_text = os.environ.get("CHAOS_KILL_POINTS")
    points = faults.CRASH_POINTS
    if points_text:
        points = frozenset(p.strip() for p in points_text.split(",") if p.strip())
    if points - faults.CRASH_POINTS:
        raise SystemExit(f"unknown kill points {sorted(points - faults.CRASH_POINTS)}")
    rng = random.Random(os.environ.get("CHAOS_KILL_SEED", str(os.getpid())))
    return faults.Kills(rng, probability=float(os.environ.get("CHAOS_KILL_RATE", DEFAULT_KILL_RATE)), points=points)


async def main() -> None:
    """Serve every function of `function_app` until SIGTERM (or until a kill ends the process)."""
    from devkit.devhost import DevHost
    from loyaltysync.runtime import close_runtime

    _quiet_logs()
    # A message held by a dead process becomes visible again only when its lease runs out. The real
    # host leases for 10 minutes (renewed while running); 8 s here, in this process only, so a killed
    # message comes back within the run's time scale. It is renewed at half-time like the real one.
    queues.LEASE_SECONDS = int(os.environ.get("CHAOS_LEASE_SECONDS", DEFAULT_LEASE_SECONDS))
    kills = _kills_from_env()
    kills.install()
    worker.OBSERVERS.append(_trail)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    devhost = DevHost(
        APP_MODULE,
        port=0,
        storage=os.environ["AzureWebJobsStorage"],
        host_json=REPO / "host.json",
        local_settings=REPO / "local.settings.json.absent",
        out=io.StringIO(),  # the banner is noise here
    )
    await devhost.start()
    print(f"chaos worker process {os.getpid()} serving on port {devhost.port}", flush=True)
    try:
        await stop.wait()
    finally:
        await devhost.stop()
        await close_runtime()


class SecondInstance:
    """The second instance as the run sees it: started, restarted after every death, stopped at the end.

    `env` is the process's whole environment; stdout and stderr go to `log_path` (appended per start).
    """

    def __init__(
        self, env: Mapping[str, str], log_path: Path, *, restart: bool = True, pause_s: float = RESTART_PAUSE_S
    ) -> None:
        self.env = dict(env)
        self.log_path = log_path
        self.restart = restart
        self.pause_s = pause_s
        self.kills = 0
        self.starts = 0
        self.exits: list[int] = []  # every exit code, in order (137 for a kill, 0 for a stop)
        self._stopping = asyncio.Event()
        self._process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._exited = asyncio.Event()

    def start(self) -> None:
        """Start the process now, and keep restarting it until `stop()` (or once, without `restart`)."""
        self._stopping.clear()
        self._task = asyncio.create_task(self._supervise())

    async def wait_exit(self) -> int:
        """Wait for the current process to exit; its exit code."""
        await self._exited.wait()
        return self.exits[-1]

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_GRACE_S; no restart after this."""
        self._stopping.set()
        if self._process is not None:
            await _end(self._process)
        if self._task is not None:
            await self._task
            self._task = None

    def unexpected(self) -> list[str]:
        """The failures the process reported that are neither a retry nor a kill."""
        return [line.split(UNEXPECTED_MARK, 1)[1].strip() for line in self._log_lines() if UNEXPECTED_MARK in line]

    def trail(self, record: str) -> list[str]:
        """This instance's steps on one record ("<template> <key>"), oldest first."""
        mark = f"{TRAIL_MARK} {record} | "
        return [line[len(mark):] for line in self._log_lines() if line.startswith(mark)]

    def stale_receipts(self) -> int:
        """Settles refused for a stale pop receipt (see `_PrintingWatch`)."""
        return sum(1 for line in self._log_lines() if line.startswith(STALE_RECEIPT_MARK))

    def kill_points(self) -> Counter[str]:
        """Kills by point, as the process wrote them just before dying."""
        return Counter(line.split()[1] for line in self._log_lines() if line.startswith(faults.KILL_MARK))

    def bad_exits(self) -> list[int]:
        """Exit codes that are neither a kill nor a stop (the process failed by itself: see the log)."""
        return [code for code in self.exits if code not in (faults.KILL_EXIT_CODE, 0, -signal.SIGTERM)]

    def _log_lines(self) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    async def _supervise(self) -> None:
        while not self._stopping.is_set():
            with self.log_path.open("ab") as log:
                self._exited.clear()
                # Each start draws its own kills: the same seed would kill every start at the same invocation.
                seed = f"{self.env.get('CHAOS_KILL_SEED', '')}.{self.starts}"
                self._process = await _spawn({**self.env, "CHAOS_KILL_SEED": seed}, log)
                self.starts += 1
            if self._stopping.is_set():  # stop() came while it was starting
                await _end(self._process)
            code = await self._process.wait()
            self.exits.append(code)
            if code == faults.KILL_EXIT_CODE:
                self.kills += 1
            self._exited.set()
            if not self.restart:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self.pause_s)


async def _spawn(env: Mapping[str, str], log: IO[bytes]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.chaos.worker_process", cwd=str(REPO), env=dict(env), stdout=log, stderr=log
    )


async def _end(process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        await asyncio.wait_for(process.wait(), timeout=STOP_GRACE_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


def instance_env(environ: Mapping[str, str], **settings: str) -> dict[str, str]:
    """The in-process host's environment for the second instance, plus `settings` (CHAOS_KILL_RATE, ...).

    `AzureWebJobs.<function>.Disabled` settings are dropped: they are how a test keeps the in-process
    host off a queue, and the second instance runs every function.
    """
    env = {k: v for k, v in environ.items() if not (k.startswith("AzureWebJobs.") and k.endswith(".Disabled"))}
    # The start-up check reads both sides' metadata and only logs advice; the in-process host ran it
    # once, and a process restarted every few seconds would spend its CPU doing it again.
    env["PREFLIGHT_ON_START"] = "false"
    env.update(settings)
    return env


if __name__ == "__main__":
    asyncio.run(main())
