"""The deploy check: what `func azure functionapp publish` ships, and that Azure's worker can index it.

The deployed set is computed the way Core Tools computes it (devkit/deploy_check.py); the app is then
indexed with the worker's rules and every module imported, in a venv built from requirements.txt alone
(cached in .venv-deploy/, rebuilt when requirements.txt changes), with a bare environment.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from devkit.deploy_check import (
    REQUIRED_SETTINGS,
    FuncIgnore,
    bare_environment,
    deployed_files,
    ensure_deploy_venv,
    installed_versions,
    module_names,
    requirements_digest,
    run_check,
    total_size,
)

ROOT = Path(__file__).resolve().parent.parent
MAX_DEPLOYED_BYTES = 2 * 1024 * 1024
PRODUCT_TOP_LEVEL = {"function_app.py", "host.json", "requirements.txt", "loyaltysync", "mappings"}
OPTIONAL_FUNCTIONS = {"SERVICEBUS_QUEUE": "fo-events", "EVENTGRID_ENABLED": "true"}
# The first build of .venv-deploy installs requirements.txt from the package index: allow for a slow one.
BUILDS_VENV = pytest.mark.timeout(900)


def test_funcignore_matches_like_core_tools_not_like_git() -> None:
    ignore = FuncIgnore(
        "# a comment\n"
        "devkit/\n"
        "/Makefile\n"
        "*.pyc\n"
        "__pycache__/\n"
        "**/cache/\n"
        "file?.txt\n"
        "!keep.pyc\n"
        "  docs/  \n"
    )
    assert ignore.denies("devkit/devhost/app.py")
    assert ignore.accepts("tools/devkit/x.py")  # anchored at the top of the app folder
    assert ignore.denies("Makefile") and ignore.denies("Makefile.bak")  # a prefix, not a whole name
    assert ignore.denies("module.pyc")
    assert ignore.accepts("pkg/module.pyc")  # `*` never crosses "/": *.pyc is top level only
    assert ignore.denies("__pycache__/a.pyc") and ignore.accepts("pkg/__pycache__/a.cpython-311.pyc")
    assert ignore.denies("pkg/cache/x") and ignore.denies("a/b/cache/x") and ignore.accepts("cache/x")
    assert ignore.denies("file?.txt") and ignore.accepts("file1.txt")  # `?` is a literal character
    assert ignore.accepts("keep.pyc")  # a negation wins over every other line
    assert ignore.denies("docs/index.md")  # lines are trimmed
    assert ignore.accepts("# a comment")


def test_deployed_set_is_the_product_only_and_small() -> None:
    files = deployed_files(ROOT)
    assert {"function_app.py", "host.json", "requirements.txt", "loyaltysync/__init__.py"} <= set(files)
    assert any(name.startswith("mappings/") and name.endswith(".json") for name in files)
    assert {name.split("/")[0] for name in files} <= PRODUCT_TOP_LEVEL
    cached = [name for name in files if "__pycache__" in name or name.endswith((".pyc", ".pyo")) or ".egg-info" in name]
    assert cached == []
    assert not any(name.startswith(("devkit/", "tests/", "bench/", "docs/", "infra/", ".venv")) for name in files)
    assert total_size(ROOT, files) < MAX_DEPLOYED_BYTES


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_the_product_never_imports_the_dev_kit() -> None:
    product = [ROOT / "function_app.py", *sorted((ROOT / "loyaltysync").rglob("*.py"))]
    offenders = {
        str(path.relative_to(ROOT)): sorted(name for name in _imports(path) if name.split(".")[0] == "devkit")
        for path in product
    }
    assert {path: names for path, names in offenders.items() if names} == {}
    assert len(product) > 10


def test_module_names_skip_main_modules() -> None:
    files = ["function_app.py", "pkg/__init__.py", "pkg/sub/mod.py", "pkg/__main__.py", "host.json"]
    assert module_names(files) == ["function_app", "pkg", "pkg.sub.mod"]


@pytest.fixture(scope="module")
def deploy_venv() -> Path:
    """The cached deployment venv (built on first use, a few minutes at most; later runs reuse it)."""
    return ensure_deploy_venv(ROOT, log=False)


@BUILDS_VENV
def test_deploy_venv_is_keyed_on_requirements(deploy_venv: Path) -> None:
    stamp = (deploy_venv / "requirements.sha256").read_text(encoding="utf-8").strip()
    assert stamp == requirements_digest(ROOT)
    assert ensure_deploy_venv(ROOT, log=False) == deploy_venv  # a cache hit: nothing rebuilt
    versions = installed_versions(deploy_venv)
    assert "azure-functions" in versions and "pytest" not in versions and "loyaltysync" not in versions


@BUILDS_VENV
def test_deploy_venv_is_rebuilt_when_requirements_change(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text("# nothing to install\n", encoding="utf-8")
    venv = ensure_deploy_venv(tmp_path, log=False)
    marker = venv / "built-here"
    marker.write_text("x", encoding="utf-8")
    assert ensure_deploy_venv(tmp_path, log=False) == venv and marker.exists()  # same file: reused
    (tmp_path / "requirements.txt").write_text("# still nothing, but a new digest\n", encoding="utf-8")
    ensure_deploy_venv(tmp_path, log=False)
    assert not marker.exists()  # rebuilt from scratch
    assert (venv / "requirements.sha256").read_text(encoding="utf-8").strip() == requirements_digest(tmp_path)


@BUILDS_VENV
def test_the_deployed_app_indexes_and_imports_in_a_venv_from_requirements_only(
    deploy_venv: Path, tmp_path: Path
) -> None:
    report = run_check(ROOT, deploy_venv, OPTIONAL_FUNCTIONS)
    assert report.indexing_error == ""
    assert report.import_errors == {}
    assert report.leaked == []  # nothing of the dev venv (dev kit, pytest, starlette) is importable there

    # The same functions as the dev venv indexes from the checkout: nothing is lost in the deployed set.
    env = bare_environment(tmp_path, OPTIONAL_FUNCTIONS)
    here = subprocess.run(
        [sys.executable, "-m", "devkit.devhost.worker_rules"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert here.returncode == 0, here.stderr
    assert [function["name"] for function in report.functions] == [entry["name"] for entry in json.loads(here.stdout)]
    names = {str(function["name"]) for function in report.functions}
    assert {"reconcile", "monitor", "fo_servicebus", "fo_eventgrid", "worker_loyalty_cards"} <= names
    assert set(REQUIRED_SETTINGS) <= set(env)


@pytest.mark.parametrize("command", ["demo", "sandbox", "dev"])
def test_dev_kit_commands_say_how_to_get_the_dev_kit_where_only_the_product_is(
    deploy_venv: Path, tmp_path: Path, command: str
) -> None:
    """Where only the deployed set and requirements.txt are (an operator's machine, the app in Azure),
    `python -m loyaltysync demo|sandbox|dev` name the dev kit and how to get it, and fail cleanly."""
    app = tmp_path / "app"
    for name in deployed_files(ROOT):
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_bytes((ROOT / name).read_bytes())
    home = tmp_path / "home"
    home.mkdir()
    python = deploy_venv / "bin" / "python"
    ran = subprocess.run(  # noqa: S603
        [str(python), "-s", "-m", "loyaltysync", command], cwd=app, env=bare_environment(home),
        capture_output=True, text=True, timeout=120,
    )
    assert ran.returncode == 1, ran.stdout + ran.stderr
    assert "dev-kit command" in ran.stderr and "make demo" in ran.stderr
    assert "Traceback" not in ran.stderr


BROKEN_APP = """
import azure.functions as func

app = func.FunctionApp()

@app.route(route="hook")
def hook(req: func.HttpRequest, context: func.Context | None = None) -> func.HttpResponse:
    return func.HttpResponse("ok")
"""


@BUILDS_VENV
def test_the_check_reports_a_refused_signature_and_a_module_needing_the_dev_kit(
    deploy_venv: Path, tmp_path: Path
) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "function_app.py").write_text(BROKEN_APP, encoding="utf-8")
    (app / "helper.py").write_text("from devkit.devhost import DevHost\n", encoding="utf-8")
    (app / "notes.md").write_text("left out\n", encoding="utf-8")
    (app / ".funcignore").write_text("notes.md\n", encoding="utf-8")
    assert deployed_files(app) == ["function_app.py", "helper.py"]
    report = run_check(app, deploy_venv)
    assert 'cannot load the hook function: the "context" parameter' in report.indexing_error
    assert "No module named 'devkit'" in report.import_errors["helper"]
    assert not report.ok
