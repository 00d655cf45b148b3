"""What `func azure functionapp publish` ships, and whether Azure's Python worker can index it.

Three steps, each a stand-in for the real thing:

1. The deployed file set, as Azure Functions Core Tools computes it (azure-functions-core-tools,
   `FileSystemHelpers.GetLocalFiles` and `Common/GitIgnoreParser.cs`): every file on disk under the
   app folder except the `.git` and `.vscode` folders and the files `.funcignore`, `.gitignore`,
   `local.settings.json` and `project.lock.json`, that `.funcignore` accepts. Core Tools' parser is
   not git's: each pattern is a regular expression anchored at the start of the path relative to
   the app folder (a leading "/" is dropped, `*` is "one or more characters but /", `**` is "one or
   more characters", `?` and `[...]` are literal), with no anchor at the end, and a `!pattern` match
   wins over every other line. So `*.pyc` or `__pycache__/` alone only match at the top level.
2. A virtual environment built from `requirements.txt` only (as Azure's remote build installs it),
   cached in `.venv-deploy/` and rebuilt when the file's SHA-256 changes.
3. In that environment, with only PATH, HOME and the required settings, in a copy of the deployed
   set: the worker's indexing checks (`devkit/devhost/worker_rules.py`, copied in beside it, never
   deployed) on every function, then an import of every module of the set.

`python -m devkit.deploy_check` runs all three and exits 1 on any finding.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEPLOY_VENV = ".venv-deploy"
STAMP = "requirements.sha256"
# What Core Tools never packs, whatever .funcignore says.
SKIPPED_DIRECTORIES = frozenset({".git", ".vscode"})
SKIPPED_FILES = frozenset({".funcignore", ".gitignore", "local.settings.json", "project.lock.json"})
# The settings function_app.py needs to import (values are placeholders; nothing is called).
REQUIRED_SETTINGS = {
    "FNO_URL": "https://contoso.operations.dynamics.com",
    "DATAVERSE_URL": "https://contoso.crm.dynamics.com",
    "AzureWebJobsStorage": "UseDevelopmentStorage=true",
}
WORKER_RULES = Path(__file__).resolve().parent / "devhost" / "worker_rules.py"
_REGEX_SPECIALS = re.compile(r"[\-\[\]/{}()+?.\\^$|]")


class FuncIgnore:
    """`.funcignore` matching exactly as Core Tools' GitIgnoreParser does it (see the module docstring)."""

    def __init__(self, text: str) -> None:
        positive: list[str] = []
        negative: list[str] = []
        for raw in text.split("\n"):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            target = positive
            if line.startswith("!"):
                target, line = negative, line[1:]
            target.append(_pattern(line.removeprefix("/")))
        self.positive = _union(sorted(positive))
        self.negative = _union(sorted(negative))
        self.has_negations = bool(negative)

    def accepts(self, path: str) -> bool:
        """True when the file at `path` (relative, "/"-separated) is deployed."""
        return bool(self.negative.match(path)) or not self.positive.match(path)

    def denies(self, path: str) -> bool:
        """True when the file at `path` is left out."""
        return not self.accepts(path)


def _pattern(line: str) -> str:
    escaped = _REGEX_SPECIALS.sub(lambda found: "\\" + found.group(0), line)
    return escaped.replace("**", "(.+)").replace("*", "([^/]+)")


def _union(patterns: list[str]) -> re.Pattern[str]:
    if not patterns:
        return re.compile("$^")  # matches nothing
    return re.compile("^((" + ")|(".join(patterns) + "))")


def deployed_files(root: Path) -> list[str]:
    """The files `func azure functionapp publish` packs from `root`, relative and "/"-separated, sorted."""
    ignore_file = root / ".funcignore"
    funcignore = FuncIgnore(ignore_file.read_text(encoding="utf-8")) if ignore_file.is_file() else FuncIgnore("")
    return sorted(_walk(root, root, funcignore))


def _walk(root: Path, folder: Path, funcignore: FuncIgnore) -> Iterator[str]:
    for entry in sorted(os.scandir(folder), key=lambda item: item.name):
        relative = Path(entry.path).relative_to(root).as_posix()
        if entry.is_dir(follow_symlinks=False):
            # Pruning is exact: the patterns are prefixes, so a denied "dir/" denies all below it.
            pruned = not funcignore.has_negations and funcignore.denies(relative + "/")
            if entry.name in SKIPPED_DIRECTORIES or pruned:
                continue
            yield from _walk(root, Path(entry.path), funcignore)
        elif entry.name not in SKIPPED_FILES and funcignore.accepts(relative):
            yield relative


def total_size(root: Path, files: Iterable[str]) -> int:
    """The bytes of the given files under `root`."""
    return sum((root / name).stat().st_size for name in files)


def module_names(files: Iterable[str]) -> list[str]:
    """Importable module names of the .py files in a file set (`__main__` modules run a program: left out)."""
    names = []
    for name in files:
        if not name.endswith(".py"):
            continue
        parts = name.removesuffix(".py").split("/")
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return sorted(names)


def requirements_digest(root: Path) -> str:
    """SHA-256 of requirements.txt: the deployment venv's cache key."""
    return hashlib.sha256((root / "requirements.txt").read_bytes()).hexdigest()


def deploy_python(venv: Path) -> Path:
    """The interpreter of a venv."""
    return venv / "bin" / "python"


def ensure_deploy_venv(root: Path, *, log: bool = True) -> Path:
    """The cached venv with requirements.txt installed and nothing else; (re)built when the file changed.

    The venv comes from the base interpreter (never the dev venv's packages); pip needs the package
    index the first time. Returns the venv folder. Raises subprocess.CalledProcessError if pip fails.
    """
    venv = root / DEPLOY_VENV
    digest = requirements_digest(root)
    stamp = venv / STAMP
    if deploy_python(venv).exists() and stamp.is_file() and stamp.read_text(encoding="utf-8").strip() == digest:
        return venv
    if log:
        print(f"building {DEPLOY_VENV} from requirements.txt (once per change of the file)", file=sys.stderr)
    shutil.rmtree(venv, ignore_errors=True)
    build_env = {name: value for name, value in os.environ.items() if name not in {"PYTHONPATH", "PYTHONHOME"}}
    build_env.pop("VIRTUAL_ENV", None)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=build_env)  # noqa: S603
    pip = [str(deploy_python(venv)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(root / "requirements.txt")], check=True, env=build_env)  # noqa: S603
    stamp.write_text(digest + "\n", encoding="utf-8")  # last: an interrupted build is redone next time
    return venv


def installed_versions(venv: Path) -> dict[str, str]:
    """`pip freeze` of the deployment venv, as {distribution name (lower case): version}."""
    done = subprocess.run(  # noqa: S603
        [str(deploy_python(venv)), "-m", "pip", "freeze", "--disable-pip-version-check"],
        check=True,
        capture_output=True,
        text=True,
    )
    pins = (line.split("==", 1) for line in done.stdout.splitlines() if "==" in line)
    return {name.lower().replace("_", "-"): version for name, version in pins}


@dataclass
class CheckReport:
    """What the check found in the deployment venv."""

    functions: list[dict[str, object]] = field(default_factory=list)  # worker_rules' JSON, one per function
    indexing_error: str = ""
    import_errors: dict[str, str] = field(default_factory=dict)
    leaked: list[str] = field(default_factory=list)  # dev-only packages importable there (must be none)

    @property
    def ok(self) -> bool:
        """True when every function indexes, every module imports and nothing of the dev venv leaked in."""
        return not self.indexing_error and not self.import_errors and not self.leaked


# Runs inside the deployment venv (standard library only): import each module, report failures as JSON.
_IMPORT_PROBE = """
import importlib, importlib.util, json, os, sys, traceback
sys.path.insert(0, os.getcwd())
errors = {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except BaseException as exc:
        errors[name] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
leaked = [name for name in ("devkit", "pytest", "starlette", "uvicorn") if importlib.util.find_spec(name)]
print(json.dumps({"errors": errors, "leaked": leaked}))
"""


def bare_environment(home: Path, settings: Mapping[str, str] | None = None) -> dict[str, str]:
    """PATH, HOME and the required app settings: nothing of the developer's environment."""
    return {"PATH": os.defpath, "HOME": str(home), **REQUIRED_SETTINGS, **(settings or {})}


def run_check(root: Path, venv: Path, settings: Mapping[str, str] | None = None) -> CheckReport:
    """Copy the deployed set, index it with the worker's rules and import every module, in `venv`."""
    files = deployed_files(root)
    python = str(deploy_python(venv))
    report = CheckReport()
    with tempfile.TemporaryDirectory(prefix="deploy-check-") as scratch:
        app, rules, home = Path(scratch, "app"), Path(scratch, "rules"), Path(scratch, "home")
        for name in files:
            (app / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, app / name)
        rules.mkdir()
        home.mkdir()
        shutil.copy2(WORKER_RULES, rules / WORKER_RULES.name)
        env = bare_environment(home, settings)
        # -I: no PYTHON* variables, no user site, and the script's folder stays off sys.path.
        indexed = subprocess.run(  # noqa: S603
            [python, "-I", str(rules / WORKER_RULES.name), "function_app"],
            cwd=app,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if indexed.returncode == 0:
            report.functions = json.loads(indexed.stdout)
        else:
            report.indexing_error = indexed.stderr.strip() or f"exit status {indexed.returncode}"
        imported = subprocess.run(  # noqa: S603
            [python, "-I", "-c", _IMPORT_PROBE, *module_names(files)],
            cwd=app,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if imported.returncode != 0:
            report.import_errors["(probe)"] = imported.stderr.strip()
        else:
            probe = json.loads(imported.stdout.strip().splitlines()[-1])
            report.import_errors.update(probe["errors"])
            report.leaked = list(probe["leaked"])
    return report


def main() -> int:
    """Build (or reuse) the deployment venv, run the check on this checkout and print what it found."""
    root = Path.cwd()
    files = deployed_files(root)
    size = total_size(root, files)
    print(f"deployed file set: {len(files)} files, {size / 1024:.0f} KiB")
    venv = ensure_deploy_venv(root)
    report = run_check(root, venv)
    for function in report.functions:
        print(f"  indexed {function['name']}")
    for problem in ([report.indexing_error] if report.indexing_error else []) + [
        f"import {name}: {error}" for name, error in report.import_errors.items()
    ] + [f"dev-only package importable in the deployment venv: {name}" for name in report.leaked]:
        print(f"FAILED {problem}", file=sys.stderr)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
