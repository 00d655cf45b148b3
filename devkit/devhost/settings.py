"""App settings as the Functions host sees them: local.settings.json, the environment, `%SETTING%` expressions.

Core Tools exports the `Values` of local.settings.json as environment variables
(a variable that is already set wins) before the worker imports the app, then
resolves `%NAME%` in binding properties and storage connection names against
those settings. The dev host does the same, in the same order.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, MutableMapping
from pathlib import Path

from devkit.azurite import expand_connection_string
from loyaltysync.errors import ConfigError

log = logging.getLogger("devkit.devhost")

DEFAULT_CONNECTION = "AzureWebJobsStorage"
_EXPRESSION = re.compile(r"%([^%]+)%")


def read_local_settings(path: Path) -> dict[str, str]:
    """The `Values` of a local.settings.json file; {} when the file does not exist.

    Raises ConfigError when the file is not JSON, is encrypted (`IsEncrypted: true`,
    which only Core Tools can decrypt) or has a non-string value.
    """
    if not path.is_file():
        return {}
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(str(path), f"is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise ConfigError(str(path), "must be a JSON object with a 'Values' object")
    if document.get("IsEncrypted") is True:
        raise ConfigError(str(path), "is encrypted; run `func settings decrypt` first")
    values = document.get("Values", {})
    if not isinstance(values, dict):
        raise ConfigError(str(path), "'Values' must be an object of strings")
    bad = sorted(name for name, value in values.items() if not isinstance(value, str))
    if bad:
        raise ConfigError(str(path), f"Values must be strings (as app settings are); not: {', '.join(bad)}")
    return dict(values)


def export_settings(values: Mapping[str, str], environ: MutableMapping[str, str]) -> list[str]:
    """Copy settings into `environ` where not already set, as Core Tools does; return the names added.

    A variable already in the environment wins, and the skip is logged like Core Tools logs it.
    """
    added: list[str] = []
    for name, value in values.items():
        if name in environ:
            log.info("Skipping '%s' from local.settings.json as it's already defined in the environment", name)
            continue
        environ[name] = value
        added.append(name)
    return added


def resolve_expressions(text: str, environ: Mapping[str, str], *, where: str) -> str:
    """Replace every `%NAME%` in `text` with the app setting NAME.

    Raises ConfigError naming the setting (and `where` it is used) when it is not set,
    which is when the host refuses to index the function.
    """

    def setting(match: re.Match[str]) -> str:
        name = match.group(1)
        value = environ.get(name)
        if value is None:
            raise ConfigError(name, f"is not set, but {where} uses '%{name}%'")
        return value

    return _EXPRESSION.sub(setting, text)


def is_disabled(function_name: str, environ: Mapping[str, str]) -> bool:
    """True when the app setting `AzureWebJobs.<name>.Disabled` is true (Linux spells the dots as underscores)."""
    for name in (f"AzureWebJobs.{function_name}.Disabled", f"AzureWebJobs_{function_name}_Disabled"):
        value = environ.get(name, "").strip().lower()
        if value in ("true", "1"):
            return True
    return False


def storage_connection_string(setting: str | None, environ: Mapping[str, str]) -> str:
    """The connection string a storage binding's `connection` names (AzureWebJobsStorage when empty).

    Looks the name up as the host does (`<name>`, then `AzureWebJobs<name>`) and expands
    `UseDevelopmentStorage=true` to Azurite's default endpoints. Raises ConfigError when unset.
    """
    name = setting or DEFAULT_CONNECTION
    for candidate in (name, f"AzureWebJobs{name}"):
        value = environ.get(candidate)
        if value:
            return expand_connection_string(value)
    if any(key.startswith(f"{name}__") for key in environ):
        raise ConfigError(name, "identity-based connections (`__queueServiceUri`) are not supported by the dev host")
    raise ConfigError(name, "is not set: it must hold a storage connection string (UseDevelopmentStorage=true locally)")
