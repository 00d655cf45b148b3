"""The documentation keeps its promises: every setting documented, every cited section there, the README short.

The README is the user's path; the rest lives in docs/, one topic a file. These checks keep the two
from drifting apart as settings, docs and code citations change.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from loyaltysync.settings import Settings, _alias_of

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text(encoding="utf-8")
CONFIGURATION = (DOCS / "configuration.md").read_text(encoding="utf-8")
WIRE_FORMATS = (ROOT / "docs/wire-formats.md").read_text(encoding="utf-8")
SKIP_DIRS = {".venv", "node_modules", ".git", ".mypy_cache", ".ruff_cache", ".pytest_cache", "__pycache__"}


def _python_files() -> list[Path]:
    return [p for p in ROOT.rglob("*.py") if not SKIP_DIRS.intersection(p.relative_to(ROOT).parts)]


def _table_settings(text: str) -> set[str]:
    """Every backticked name in the first column of the markdown tables of `text`."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("| `"):
            names.update(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return names


def test_configuration_documents_every_setting_the_app_reads() -> None:
    documented = _table_settings(CONFIGURATION)
    sample = json.loads((ROOT / "local.settings.sample.json").read_text(encoding="utf-8"))["Values"]
    read = {_alias_of(name) for name in Settings.model_fields}
    missing = sorted((read | set(sample)) - documented)
    assert not missing, f"docs/configuration.md has no row for {missing}"


def test_configuration_documents_no_setting_that_does_not_exist() -> None:
    sample = json.loads((ROOT / "local.settings.sample.json").read_text(encoding="utf-8"))["Values"]
    known = {_alias_of(name) for name in Settings.model_fields} | set(sample)
    # Settings the Functions host or the OpenTelemetry distro read, not the app's model.
    platform = {n for n in _table_settings(CONFIGURATION) if n.startswith(("OTEL_", "FUNCTIONS_"))}
    unknown = sorted(_table_settings(CONFIGURATION) - known - platform)
    assert not unknown, f"docs/configuration.md documents settings nothing reads: {unknown}"


def test_every_cited_wire_format_section_exists() -> None:
    sections = set(re.findall(r"^### (\d+\.\d+) ", WIRE_FORMATS, flags=re.MULTILINE))
    parts = set(re.findall(r"^# Part ([A-D])\.", WIRE_FORMATS, flags=re.MULTILINE))
    cited: dict[str, set[str]] = {}
    for path in _python_files():
        text = path.read_text(encoding="utf-8")
        for citation in re.findall(r"docs/wire-formats\.md[^\n]*", text):
            for number in re.findall(r"§?(\d+\.\d+)", citation):
                cited.setdefault(number, set()).add(str(path.relative_to(ROOT)))
            for part in re.findall(r"\bpart ([A-D])\b", citation):
                assert part in parts, f"{path}: docs/wire-formats.md has no part {part}"
    assert cited, "no code cites docs/wire-formats.md: the citations were lost"
    missing = {number: sorted(paths) for number, paths in cited.items() if number not in sections}
    assert not missing, f"docs/wire-formats.md has no section for {missing}"


def test_code_cites_the_wire_formats_in_the_repository() -> None:
    outside = [
        str(path.relative_to(ROOT))
        for path in _python_files()
        if re.search(r"(?<![/\w])wire-formats\.md", path.read_text(encoding="utf-8"))
    ]
    assert not outside, f"cite docs/wire-formats.md, the copy in the repository: {outside}"


def test_readme_is_the_short_path_and_links_every_doc() -> None:
    assert len(README.splitlines()) <= 250, "the README is the user's path; details go to docs/"
    assert "make demo" in README and "make test" in README
    unlinked = sorted(p.name for p in DOCS.glob("*.md") if f"docs/{p.name}" not in README)
    assert not unlinked, f"README.md does not link {unlinked}"


def test_readme_names_the_settings_a_user_must_set() -> None:
    for setting in (
        "FNO_URL",
        "DATAVERSE_URL",
        "AzureWebJobsStorage",
        "AzureWebJobsStorage__accountName",
        "LOYALTYSYNC_CREDENTIAL",
        "INTEGRATION_USER_IDS",
        "APPLICATIONINSIGHTS_CONNECTION_STRING",
    ):
        assert f"`{setting}`" in README, setting
    assert "docs/configuration.md" in README
