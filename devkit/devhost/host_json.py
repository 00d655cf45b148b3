"""The parts of host.json the dev host obeys: the HTTP route prefix and the storage queue options.

Keys are case-insensitive (the host binds configuration that way), app settings
`AzureFunctionsJobHost__path__to__key` override the file, and the defaults and
limits are those of the storage queues extension 5.x.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from loyaltysync.errors import ConfigError

_OVERRIDE_PREFIX = "azurefunctionsjobhost__"
_TIMESPAN = re.compile(
    r"^(?:(?P<days>\d+)\.)?(?P<hours>\d{1,2}):(?P<minutes>\d{1,2})(?::(?P<seconds>\d{1,2}(?:\.\d+)?))?$"
)
MIN_POLLING_INTERVAL = 0.1  # the extension refuses anything shorter than 100 ms


def parse_timespan(value: str) -> float:
    """Seconds in a .NET TimeSpan string such as `00:00:30` or `1.02:00:00`. Raises ValueError otherwise."""
    match = _TIMESPAN.match(value.strip())
    if match is None:
        raise ValueError(f"{value!r} is not a TimeSpan like 00:00:30 ([d.]hh:mm:ss)")
    days = int(match["days"] or 0)
    return days * 86400 + int(match["hours"]) * 3600 + int(match["minutes"]) * 60 + float(match["seconds"] or 0)


class QueueOptions(BaseModel):
    """`extensions.queues`: how queue triggers poll, batch, retry and poison."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    batch_size: int = Field(default=16, ge=1, le=32, alias="batchsize")
    new_batch_threshold_setting: int = Field(default=-1, ge=-1, alias="newbatchthreshold")
    max_dequeue_count: int = Field(default=5, ge=1, alias="maxdequeuecount")
    visibility_timeout: float = Field(default=0.0, ge=0, alias="visibilitytimeout")
    max_polling_interval: float = Field(default=60.0, ge=MIN_POLLING_INTERVAL, alias="maxpollinginterval")
    message_encoding: Literal["base64", "none"] = Field(default="base64", alias="messageencoding")

    @field_validator("visibility_timeout", "max_polling_interval", mode="before")
    @classmethod
    def _timespan(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_timespan(value)
        if isinstance(value, int | float):
            raise ValueError("must be a TimeSpan string such as 00:00:02, not a number")
        return value

    @field_validator("message_encoding", mode="before")
    @classmethod
    def _encoding(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @property
    def new_batch_threshold(self) -> int:
        """The threshold in force: the setting, or batchSize/2 per processor when unset (-1), as the host computes."""
        if self.new_batch_threshold_setting >= 0:
            return self.new_batch_threshold_setting
        return self.batch_size // 2 * (os.cpu_count() or 1)

    @property
    def max_in_flight(self) -> int:
        """Most messages one queue function processes at once on one instance."""
        return self.batch_size + self.new_batch_threshold


class HostConfig(BaseModel):
    """What the dev host reads from host.json."""

    model_config = ConfigDict(frozen=True)

    route_prefix: str = "api"
    queues: QueueOptions = QueueOptions()
    function_timeout: float | None = None  # seconds; None: no limit (-1), as the host reads `functionTimeout`


def load_host_json(path: Path, environ: Mapping[str, str] | None = None) -> HostConfig:
    """Read host.json (defaults when absent) with `AzureFunctionsJobHost__...` overrides from `environ`.

    Raises ConfigError naming the file and key when a value is invalid.
    """
    document: dict[str, Any] = {}
    if path.is_file():
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(str(path), f"is not valid JSON: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(str(path), "must be a JSON object")
        document = _lower_keys(loaded)
    _apply_overrides(document, os.environ if environ is None else environ)
    extensions = document.get("extensions") or {}
    http = extensions.get("http") or {}
    prefix = http.get("routeprefix", "api")
    if not isinstance(prefix, str):
        raise ConfigError(f"{path}: extensions.http.routePrefix", "must be a string")
    try:
        queues = QueueOptions.model_validate(extensions.get("queues") or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"{path}: extensions.queues.{key}", first["msg"].removeprefix("Value error, ")) from exc
    timeout = document.get("functiontimeout")
    limit: float | None = None
    if timeout is not None and str(timeout).strip() != "-1":
        try:
            limit = parse_timespan(str(timeout))
        except ValueError as exc:
            raise ConfigError(f"{path}: functionTimeout", str(exc)) from exc
    return HostConfig(route_prefix=prefix.strip("/"), queues=queues, function_timeout=limit)


def _lower_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key).lower(): _lower_keys(item) for key, item in value.items()}
    return value


def _apply_overrides(document: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, value in environ.items():
        if not name.lower().startswith(_OVERRIDE_PREFIX):
            continue
        path = [part for part in name[len(_OVERRIDE_PREFIX) :].lower().split("__") if part]
        if not path:
            continue
        node = document
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[path[-1]] = value
