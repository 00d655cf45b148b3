"""The difference report of `reconcile --report FILE`: JSON or CSV by the file's extension, written as found.

Each difference is one record: its template, natural key, kind (`only-fo`,
`only-dataverse`, `different`) and, for `different`, every synced field whose
canonical values differ, with both values. Rows are written while the pass
runs (nothing accumulates in memory), so a report of a million differences
costs disk, not RAM.

- JSON: `{"differences": [...], "counts": [{"template": ..., "only_fo": ..., ...}]}`.
- CSV: `template,kind,key,field,fo_value,dataverse_value`, one row per differing
  field (one row with an empty field for `only-*`). Values are canonical: text
  as is, numbers and booleans in JSON form, no value as an empty cell.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, Protocol, Self

Kind = Literal["only-fo", "only-dataverse", "different"]
CSV_COLUMNS = ("template", "kind", "key", "field", "fo_value", "dataverse_value")


@dataclass(frozen=True, slots=True)
class Difference:
    """One record whose two sides differ; `fields` maps a field to (F&O value, Dataverse value)."""

    template: str
    key: str
    kind: Kind
    fields: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "template": self.template,
            "key": self.key,
            "kind": self.kind,
            "fields": {name: {"fo": fo, "dataverse": dv} for name, (fo, dv) in self.fields.items()},
        }


class DifferenceSink(Protocol):
    """Where a reconciliation pass sends the differences it finds."""

    def add(self, difference: Difference) -> None: ...


class ReportWriter:
    """Streams differences to a JSON or CSV file (chosen by the extension); `counts()` adds a template's totals."""

    def __init__(self, path: Path) -> None:
        suffix = path.suffix.lower()
        if suffix not in (".json", ".csv"):
            raise ValueError(f"report file must end in .json or .csv, not {path.name!r}")
        self.path = path
        self.format: Literal["json", "csv"] = "json" if suffix == ".json" else "csv"
        self._file: IO[str] | None = None
        self._csv: Any = None
        self._first = True
        self._counts: list[dict[str, Any]] = []
        self.written = 0

    def __enter__(self) -> Self:
        self._file = self.path.open("w", encoding="utf-8", newline="")
        if self.format == "json":
            self._file.write('{"differences": [')
        else:
            self._csv = csv.writer(self._file)
            self._csv.writerow(CSV_COLUMNS)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._file is None:
            return
        if self.format == "json":
            self._file.write("\n], \"counts\": " + json.dumps(self._counts, indent=1) + "}\n")
        self._file.close()
        self._file = None

    def add(self, difference: Difference) -> None:
        """Write one difference now."""
        if self._file is None:
            raise RuntimeError("ReportWriter is used as a context manager")
        self.written += 1
        if self.format == "json":
            self._file.write(("\n " if self._first else ",\n ") + json.dumps(difference.as_json(), default=str))
            self._first = False
            return
        if not difference.fields:
            self._csv.writerow((difference.template, difference.kind, difference.key, "", "", ""))
        for name, (fo, dv) in difference.fields.items():
            self._csv.writerow((difference.template, difference.kind, difference.key, name, _cell(fo), _cell(dv)))

    def counts(self, template: str, **totals: int) -> None:
        """A template's totals (only in F&O, only in Dataverse, different, equal...); JSON keeps them."""
        self._counts.append({"template": template, **totals})


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value)
