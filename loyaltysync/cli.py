"""`python -m loyaltysync` / `loyaltysync`: the operator's command line.

Each command is a small function; heavy imports (sandbox, dev host, clients)
happen inside the command that needs them, so `mappings validate` stays fast
and works without the dev-only packages.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from loyaltysync.errors import ConfigError, EventError, LoyaltySyncError, TemplateError
from loyaltysync.templates import Side, Template, default_mappings_dir, json_schema, load_templates, table_rows

Command = Callable[[argparse.Namespace], int]


def _templates(args: argparse.Namespace) -> dict[str, Template]:
    return load_templates(Path(args.mappings) if args.mappings else default_mappings_dir())


def cmd_mappings_validate(args: argparse.Namespace) -> int:
    """Load every template; print one line per template or the first problem."""
    templates = _templates(args)
    for template in templates.values():
        print(
            f"ok  {template.name}: {len(template.all_fields)} fields, F&O {template.fo.entity_set} "
            f"<-> Dataverse {template.dataverse.entity_set}"
        )
    return 0


def cmd_mappings_show(args: argparse.Namespace) -> int:
    """Print the effective field table of every template (or JSON with --json)."""
    templates = _templates(args)
    if args.json:
        out = {
            name: {
                "fo": t.fo.model_dump(exclude_none=True),
                "dataverse": t.dataverse.model_dump(exclude_none=True),
                "conflict_policy": t.conflict_policy,
                "deletes": t.deletes,
                "fields": [
                    {k: v for k, v in row.items() if k != "template" and v is not None} for row in table_rows([t])
                ],
            }
            for name, t in templates.items()
        }
        print(json.dumps(out, indent=2))
        return 0
    for t in templates.values():
        print(
            f"\n{t.name}  (F&O {t.fo.entity_set} <-> Dataverse {t.dataverse.entity_set}; "
            f"conflicts: {t.conflict_policy}; deletes: {t.deletes})"
        )
        rows = table_rows([t])
        width_fo = max(len(str(r["fo"] or "")) for r in rows)
        width_dv = max(len(str(r["dataverse"] or "")) for r in rows)
        for r in rows:
            values = r["value_map"] or {}
            extra = ", ".join(f"{k} <-> {json.dumps(v)}" for k, v in values.items())
            if r["default"] is not None:
                extra = f"default {json.dumps(r['default'])}" + (f"; {extra}" if extra else "")
            if r["lookup"]:
                extra = f"lookup {r['lookup']['entity_set']} by {r['lookup']['key_column']}"
            key = " key" if r["key"] else ""
            print(
                f"  {r['fo'] or '-'!s:<{width_fo}}  {r['map']:<2}  {r['dataverse'] or '-'!s:<{width_dv}}"
                f"  {r['type']}{key}{'  ' + extra if extra else ''}"
            )
    return 0


def cmd_mappings_schema(args: argparse.Namespace) -> int:
    """Print the JSON Schema of template files (mappings/template.schema.json)."""
    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_mappings_check(args: argparse.Namespace) -> int:
    """Check every template against both sides' live metadata; exit 1 listing what would fail at run time."""
    from loyaltysync import preflight

    templates = _templates(args)
    findings = _with_runtime(lambda runtime: preflight.check_runtime(runtime, templates))
    print(preflight.report(findings, templates, as_json=args.json))
    return preflight.exit_code(findings, strict=args.strict)


def cmd_inspect_event(args: argparse.Namespace) -> int:
    """Parse a payload file as the inbound functions would and print the normalized event(s)."""
    from loyaltysync.events import Handshake, parse_inbound

    templates = _templates(args)
    body = Path(args.file).read_bytes()
    template = templates.get(args.template) if args.template else None
    if args.template and template is None:
        raise EventError(f"no template named {args.template!r}", 422)
    sides: list[Side] = [args.side] if args.side else ["dataverse", "fo"]
    errors: list[str] = []
    for side in sides:
        try:
            result = parse_inbound(side, body, {}, templates=templates, template=template)
        except EventError as exc:
            errors.append(f"as {side}: {exc.reason}")
            continue
        if isinstance(result, Handshake):
            print(json.dumps({"handshake": result.response}, indent=2))
        else:
            print(json.dumps([json.loads(e.to_json()) for e in result.events], indent=2))
        return 0
    raise EventError("; ".join(errors))


DEVKIT_MISSING = (
    "`{command}` is a dev-kit command: the dev kit (sandbox, dev host, demo) is not installed here. "
    "It lives beside the product in the repository and is never deployed; from a clone, run "
    "`make demo` or `make sandbox`, or install it with `pip install -r requirements-dev.txt && pip install -e .`."
)


def _devkit(module: str, command: str) -> Any:
    """A dev-kit module, looked up by name: the product never imports the dev kit (it is not deployed);
    where it is installed (a clone after `make`), its commands work from this CLI too."""
    try:
        return importlib.import_module(f"devkit.{module}")
    except ModuleNotFoundError as error:
        if error.name is not None and (error.name == "devkit" or error.name.startswith("devkit.")):
            raise LoyaltySyncError(DEVKIT_MISSING.format(command=command)) from None
        if error.name in {"starlette", "uvicorn", "rich"}:
            missing = f" (missing package: {error.name})"
            raise LoyaltySyncError(DEVKIT_MISSING.format(command=command) + missing) from None
        raise


def cmd_sandbox(args: argparse.Namespace) -> int:
    """Run both emulators until interrupted."""
    run_sandbox = _devkit("sandbox.run", "sandbox").run_sandbox

    try:
        asyncio.run(
            run_sandbox(
                fo_port=args.fo_port,
                dataverse_port=args.dataverse_port,
                seed=args.seed,
                templates_dir=Path(args.mappings) if args.mappings else None,
            )
        )
    except KeyboardInterrupt:
        pass
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole sync, both ways, on the built-in sandbox."""
    return int(asyncio.run(_devkit("demo", "demo").run_demo()))


def cmd_dev(args: argparse.Namespace) -> int:
    """Host function_app.py like `func start` (HTTP, queue and timer triggers)."""
    import logging

    from loyaltysync.runtime import close_runtime

    serve = _devkit("devhost", "dev").serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def run() -> None:
        try:
            await serve("function_app", port=args.port)
        finally:
            await close_runtime()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    return 0


def _with_runtime(action: Callable[[Any], Awaitable[Any]]) -> Any:
    from loyaltysync.runtime import close_runtime, get_runtime
    from loyaltysync.settings import load_local_settings

    load_local_settings()

    async def run() -> Any:
        try:
            return await action(await get_runtime())
        finally:
            await close_runtime()

    return asyncio.run(run())


def cmd_status(args: argparse.Namespace) -> int:
    """Backlog, dead letters, last success and pause state per template."""
    from loyaltysync.operations import status

    print(json.dumps(_with_runtime(status), indent=2, default=str))
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    """Pause or resume applying a template's changes (events are kept while paused)."""
    paused = args.command == "pause"

    async def act(runtime: Any) -> None:
        if args.template not in runtime.templates:
            raise ConfigError("--template", f"no template named {args.template!r}")
        await runtime.set_paused(args.template, paused, args.reason or "")

    _with_runtime(act)
    print(f"{args.template}: {'paused' if paused else 'resumed'}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """Re-queue dead letters (all, one template's, or one key's)."""
    from loyaltysync.worker import replay

    count = _with_runtime(lambda runtime: replay(runtime, template=args.template, key=args.key))
    print(f"replayed {count} dead letter(s)")
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    """Compare both sides record by record; queue the corrections with --fix; list the differences with --report."""
    from loyaltysync.progress import Progress
    from loyaltysync.reconcile import reconcile_full
    from loyaltysync.reconcile_report import ReportWriter

    try:
        writer = ReportWriter(Path(args.report)) if args.report else None
    except ValueError as exc:
        raise ConfigError("--report", str(exc)) from exc
    progress = Progress()

    async def act(runtime: Any) -> list[Any]:
        names = list(runtime.templates) if args.all or not args.template else [args.template]
        unknown = [name for name in names if name not in runtime.templates]
        if unknown:
            raise ConfigError("--template", f"no template named {unknown[0]!r}")
        reports = []
        with progress, writer or contextlib.nullcontext():
            for name in names:
                report = await reconcile_full(
                    runtime, runtime.templates[name], fix=args.fix, sink=writer, progress=progress
                )
                if writer is not None:
                    writer.counts(
                        name,
                        only_fo=report.only_fo,
                        only_dataverse=report.only_dataverse,
                        different=report.different,
                        equal=report.equal,
                        queued=report.queued,
                        unmappable=report.unmappable,
                    )
                reports.append(report)
        return reports

    reports = _with_runtime(act)
    progress.summary(
        "reconcile",
        ["template", "only in F&O", "only in Dataverse", "different", "equal", "queued", "unmappable"],
        [[r.template, r.only_fo, r.only_dataverse, r.different, r.equal, r.queued, r.unmappable] for r in reports],
    )
    if writer is not None:
        print(f"{writer.written} difference(s) written to {args.report}")
    return 0


def cmd_initial_sync(args: argparse.Namespace) -> int:
    """Copy every record of one template (or all) from one side to the other in bulk; resumable."""
    from loyaltysync.bulk import SUMMARY_COLUMNS, SyncOptions, exit_code, initial_sync_many, summary_rows
    from loyaltysync.progress import Progress

    options = SyncOptions(
        dry_run=args.dry_run, resume=args.resume, page_size=args.page_size, batch_size=args.batch_size
    )
    progress = Progress()

    async def act(runtime: Any) -> list[Any]:
        names = list(runtime.templates) if args.all else [args.template]
        unknown = [name for name in names if name not in runtime.templates]
        if unknown:
            raise ConfigError("--template", f"no template named {unknown[0]!r}")
        with progress:
            return await initial_sync_many(
                runtime, [runtime.templates[n] for n in names], args.direction, options, progress=progress
            )

    reports = _with_runtime(act)
    progress.summary("initial sync", SUMMARY_COLUMNS, summary_rows(reports))
    for report in reports:
        for failure in report.failures:
            print(f"failed: {report.template} {failure.key_text}: {failure.reason}")
        if report.failed > len(report.failures):
            print(f"... and {report.failed - len(report.failures)} more parked: see `loyaltysync status`")
        if report.error:
            print(f"{report.template} stopped: {report.error}")
            print("run the same command with --resume to continue after the last committed page")
    return exit_code(reports)


def cmd_register_webhooks(args: argparse.Namespace) -> int:
    """Create, update or remove the Dataverse webhook registrations of every template, F&O data events included."""
    from loyaltysync import webhooks

    templates = _templates(args)

    async def act(runtime: Any) -> list[str]:
        if args.remove:
            plan = await webhooks.plan_removal(runtime.dataverse, templates)
        else:
            if not args.function_url or not args.function_key:
                raise ConfigError("--function-url/--function-key", "both are required to register webhooks")
            plan = await webhooks.plan(
                runtime.dataverse, templates, function_url=args.function_url, function_key=args.function_key,
                fo_data_events=not args.no_fo_data_events,
            )
        lines = plan.describe()
        if not args.dry_run:
            await webhooks.apply(runtime.dataverse, plan)
        return list(lines)

    lines = _with_runtime(act)
    print("\n".join(lines) if lines else "nothing to change")
    if args.dry_run:
        print("(dry run: nothing was changed)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and for `--help` in the README)."""
    parser = argparse.ArgumentParser(prog="loyaltysync", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mappings", help="mappings directory (default: mappings/ beside the package)")
    sub = parser.add_subparsers(dest="command", required=True)

    mappings = sub.add_parser("mappings", help="validate and show the entity templates")
    msub = mappings.add_subparsers(dest="mappings_command", required=True)
    msub.add_parser("validate", help="load every template; exit 1 naming file, field and problem").set_defaults(
        func=cmd_mappings_validate
    )
    show = msub.add_parser("show", help="the effective field table of every template")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(func=cmd_mappings_show)
    msub.add_parser("schema", help="print the JSON Schema of template files").set_defaults(func=cmd_mappings_schema)
    check = msub.add_parser(
        "check", help="check every template against F&O and Dataverse metadata; exit 1 naming what would fail"
    )
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.add_argument("--strict", action="store_true", help="warnings fail too")
    check.set_defaults(func=cmd_mappings_check)

    inspect = sub.add_parser("inspect-event", help="print the normalized change event of a payload file")
    inspect.add_argument("file")
    inspect.add_argument("--side", choices=["fo", "dataverse"], help="which side sent it (default: try both)")
    inspect.add_argument("--template", help="the template the payload was posted to (default: detect)")
    inspect.set_defaults(func=cmd_inspect_event)

    sandbox = sub.add_parser("sandbox", help="run the F&O and Dataverse emulators")
    sandbox.add_argument("--fo-port", type=int, default=7081)
    sandbox.add_argument("--dataverse-port", type=int, default=7082)
    sandbox.add_argument("--seed", type=int, default=None, help="random seed for reproducible faults")
    sandbox.set_defaults(func=cmd_sandbox)

    sub.add_parser("demo", help="the whole sync, both ways, on the built-in sandbox").set_defaults(func=cmd_demo)
    dev = sub.add_parser("dev", help="host function_app.py locally (HTTP, queue and timer triggers)")
    dev.add_argument("--port", type=int, default=7071)
    dev.set_defaults(func=cmd_dev)

    sub.add_parser("status", help="backlog, dead letters, last success, paused").set_defaults(func=cmd_status)
    for name in ("pause", "resume"):
        p = sub.add_parser(name, help=f"{name} applying one template's changes")
        p.add_argument("template")
        p.add_argument("--reason", default="")
        p.set_defaults(func=cmd_pause)
    replay = sub.add_parser("replay", help="re-queue dead letters")
    replay.add_argument("--template")
    replay.add_argument("--key")
    replay.set_defaults(func=cmd_replay)
    rec = sub.add_parser("reconcile", help="compare both sides record by record")
    rec.add_argument("--template")
    rec.add_argument("--all", action="store_true")
    rec.add_argument("--fix", action="store_true", help="queue the corrections")
    rec.add_argument("--report", help="write the differences to this file: .json or .csv")
    rec.set_defaults(func=cmd_reconcile)

    init = sub.add_parser("initial-sync", help="copy a template's records from one side to the other in bulk")
    which = init.add_mutually_exclusive_group(required=True)
    which.add_argument("--template", help="the template to copy")
    which.add_argument("--all", action="store_true", help="every template, one after the other")
    init.add_argument("--direction", required=True, choices=["fo-to-dataverse", "dataverse-to-fo"])
    init.add_argument("--dry-run", action="store_true", help="read and map everything, write nothing")
    init.add_argument("--resume", action="store_true", help="continue after the last committed page of a stopped run")
    init.add_argument("--page-size", type=int, default=5000, help="source rows per page (default 5000)")
    init.add_argument("--batch-size", type=int, default=1000, help="records per write request (default 1000)")
    init.set_defaults(func=cmd_initial_sync)

    reg = sub.add_parser(
        "register-webhooks", help="register the Dataverse webhooks and F&O data-event steps of every template"
    )
    reg.add_argument("--function-url", help="function app base URL, e.g. https://myapp.azurewebsites.net")
    reg.add_argument("--function-key", help="the function key Dataverse sends as ?code=")
    reg.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    reg.add_argument("--remove", action="store_true", help="remove every registration")
    reg.add_argument(
        "--no-fo-data-events", action="store_true",
        help="skip (and remove) the steps on the F&O virtual tables, e.g. when F&O sends business events instead",
    )
    reg.set_defaults(func=cmd_register_webhooks)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run one command; known errors print their reason and exit non-zero."""
    args = build_parser().parse_args(argv)
    func: Command = args.func
    try:
        return func(args)
    except EventError as exc:
        print(f"error: cannot read the payload: {exc.reason}", file=sys.stderr)
        return 2
    except (TemplateError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except LoyaltySyncError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
