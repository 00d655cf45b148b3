"""Progress bars with rate and ETA for long commands (initial sync, reconcile), and their end summary.

Bars are drawn with rich on a terminal and stay silent otherwise (a pipe, a
log file, CI), so redirected output holds only the summary. The commands
report through the small `ProgressSink` protocol, which keeps rich out of the
sync code and lets tests count what was reported.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Protocol, Self

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress
from rich.table import Table
from rich.text import Text


class ProgressSink(Protocol):
    """What a long command tells about its progress."""

    def start(self, description: str, total: int | None) -> None:
        """A new phase begins; `total` units when known (None: no ETA)."""
        ...

    def advance(self, units: int) -> None:
        """`units` more done in the current phase."""
        ...

    def total(self, total: int | None) -> None:
        """The current phase's total became known (or changed)."""
        ...


class NoProgress:
    """A sink that shows nothing."""

    def start(self, description: str, total: int | None) -> None:
        return None

    def advance(self, units: int) -> None:
        return None

    def total(self, total: int | None) -> None:
        return None


class RateColumn(ProgressColumn):
    """`1,234 rows/s` from rich's own speed estimate (a moving window, not the average since start)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text(f"- {self.unit}/s", style="progress.data.speed")
        return Text(f"{speed:,.0f} {self.unit}/s", style="progress.data.speed")


class Progress:
    """Rich progress bars, one per phase; disabled (silent) when the console is not a terminal.

    Use as a context manager around the work; `summary()` prints a table whatever
    the console is.
    """

    def __init__(self, *, unit: str = "rows", console: Console | None = None, enabled: bool | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.enabled = self.console.is_terminal if enabled is None else enabled
        self._bars = RichProgress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            RateColumn(unit),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.enabled,
            transient=False,
        )
        self._task: TaskID | None = None

    def __enter__(self) -> Self:
        self._bars.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._finish()
        self._bars.stop()

    def start(self, description: str, total: int | None) -> None:
        """Close the previous bar and open a new one."""
        self._finish()
        self._task = self._bars.add_task(description, total=total)

    def advance(self, units: int) -> None:
        if self._task is not None:
            self._bars.advance(self._task, units)

    def total(self, total: int | None) -> None:
        if self._task is not None:
            self._bars.update(self._task, total=total)

    def _finish(self) -> None:
        if self._task is None:
            return
        task = self._bars.tasks[self._task]
        if task.total is None or task.completed > task.total:
            self._bars.update(self._task, total=task.completed)
        self._bars.stop_task(self._task)
        self._task = None

    def summary(self, title: str, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
        """Print the end-of-run summary on stdout: a table on a terminal, aligned plain lines otherwise."""
        cells = [[_cell(value) for value in row] for row in rows]
        out = Console()
        if not out.is_terminal:
            print("\n".join(_plain(title, columns, cells)), flush=True)
            return
        table = Table(title=title, title_justify="left", show_edge=False)
        for name in columns:
            table.add_column(name, justify="left" if name == columns[0] else "right")
        for row in cells:
            table.add_row(*row)
        out.print(table)


def _plain(title: str, columns: Sequence[str], rows: list[list[str]]) -> list[str]:
    """Columns aligned with spaces, for logs and pipes (no box drawing, no truncation)."""
    widths = [max([len(name)] + [len(row[i]) for row in rows]) for i, name in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        first = values[0].ljust(widths[0])
        rest = (value.rjust(width) for value, width in zip(values[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    return [f"{title}:", line(columns), *(line(row) for row in rows)]


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
