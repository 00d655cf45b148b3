"""Preflight: check every template against both sides' live metadata before any record fails.

`python -m loyaltysync mappings check` and the function app's start-up check
both call `check`: F&O's `/data/$metadata` and each Dataverse table's
definition are read once through the app's own clients (`metadata`), then
each template is compared field by field (`checks`, pure). The answer is a
list of `Finding`s (template, side, field, problem, severity); `errors` make
the command exit non-zero.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING

from loyaltysync.errors import LoyaltySyncError, TargetError
from loyaltysync.preflight.checks import Finding, Severity, check_template
from loyaltysync.preflight.metadata import DvTable, FoMetadata, read_fo, read_table
from loyaltysync.targets.dataverse import DataverseClient
from loyaltysync.targets.fno import FnoClient
from loyaltysync.templates import Side, Template

if TYPE_CHECKING:
    from loyaltysync.runtime import Runtime

__all__ = ["Finding", "Severity", "check", "check_runtime", "exit_code", "log_startup_check", "report"]

log = logging.getLogger("loyaltysync.preflight")
ALL = "(all templates)"


def _unreadable(side: Side, error: BaseException) -> Finding:
    detail = f"{error.status} {error.code} {error.message}".strip() if isinstance(error, TargetError) else str(error)
    return Finding(ALL, side, "(metadata)", f"cannot read the metadata: {detail or type(error).__name__}")


async def _tables(client: DataverseClient, templates: Iterable[Template]) -> dict[str, DvTable | None]:
    wanted: dict[str, tuple[set[str], bool]] = {}
    for template in templates:
        own = template.dataverse.table
        columns, _ = wanted.setdefault(own, (set(), True))
        columns.update(f.dataverse for f in template.all_fields if f.dataverse)
        wanted[own] = (columns, True)
        for f in template.all_fields:
            if f.lookup is not None and f.lookup.table not in wanted:
                wanted[f.lookup.table] = ({f.lookup.key_column}, False)
    names = list(wanted)
    found = await asyncio.gather(
        *(read_table(client, name, columns=wanted[name][0], details=wanted[name][1]) for name in names)
    )
    return dict(zip(names, found, strict=True))


async def check(templates: Mapping[str, Template], fno: FnoClient, dataverse: DataverseClient) -> list[Finding]:
    """Every finding for every template, errors first. Unreachable metadata is itself a finding, not raised."""
    fo_metadata: FoMetadata | None
    tables: dict[str, DvTable | None] | None
    findings: list[Finding] = []
    results = await asyncio.gather(read_fo(fno), _tables(dataverse, templates.values()), return_exceptions=True)
    fo_result, dv_result = results
    if isinstance(fo_result, BaseException):
        if not isinstance(fo_result, LoyaltySyncError | OSError | ValueError):
            raise fo_result
        findings.append(_unreadable("fo", fo_result))
        fo_metadata = None
    else:
        fo_metadata = fo_result
    if isinstance(dv_result, BaseException):
        if not isinstance(dv_result, LoyaltySyncError | OSError | ValueError):
            raise dv_result
        findings.append(_unreadable("dataverse", dv_result))
        tables = None
    else:
        tables = dv_result
    for template in templates.values():
        template_findings = check_template(template, fo_metadata or FoMetadata(), tables or {})
        # A side whose metadata could not be read has one finding above, not one per field.
        findings += [
            f
            for f in template_findings
            if (f.side == "fo" and fo_metadata is not None) or (f.side == "dataverse" and tables is not None)
        ]
    return sorted(findings, key=lambda f: (f.severity != "error", f.template, f.side, f.field, f.problem))


async def check_runtime(runtime: Runtime, templates: Mapping[str, Template] | None = None) -> list[Finding]:
    """`check` with a runtime's clients (and its templates unless others are given)."""
    return await check(templates if templates is not None else runtime.templates, runtime.fno, runtime.dataverse)


def report(findings: list[Finding], templates: Iterable[str] = (), *, as_json: bool = False) -> str:
    """The findings for a terminal (one line each, then a summary) or as JSON."""
    if as_json:
        return json.dumps([asdict(f) for f in findings], indent=2)
    errors = sum(1 for f in findings if f.severity == "error")
    warnings = len(findings) - errors
    lines = [f.line() for f in findings]
    flagged = {f.template for f in findings}
    lines += [f"ok       {name}" for name in templates if name not in flagged and ALL not in flagged]
    lines.append(f"{errors} error(s), {warnings} warning(s)")
    return "\n".join(lines)


def exit_code(findings: list[Finding], *, strict: bool = False) -> int:
    """1 when a finding would fail at run time (with `strict`, warnings count too), else 0."""
    failing = [f for f in findings if f.severity == "error" or strict]
    return 1 if failing else 0


async def log_startup_check(runtime: Runtime) -> list[Finding]:
    """Run the check and log the result (one line per finding); never raises, so start-up never fails on it."""
    try:
        findings = await check_runtime(runtime)
    except Exception:  # a bug here must not take the app down: the check is advice
        log.exception("preflight: the mappings check itself failed")
        return []
    errors = [f for f in findings if f.severity == "error"]
    for finding in findings:
        level = finding.severity
        log.log(
            logging.ERROR if level == "error" else logging.WARNING,
            "preflight: %s",
            finding.line(),
            extra={"template": finding.template, "side": finding.side, "field": finding.field, "severity": level},
        )
    log.info(
        "preflight: %d template(s) checked against live metadata: %d error(s), %d warning(s)",
        len(runtime.templates),
        len(errors),
        len(findings) - len(errors),
    )
    return findings
