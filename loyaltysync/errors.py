"""One error hierarchy, each carrying the reason a user needs to act on it.

Inbound code turns these into HTTP answers in exactly one place
(`loyaltysync.inbound.status_for`); the worker decides retry-or-park from
`TargetError.transient`.
"""

from __future__ import annotations

from typing import Any


class LoyaltySyncError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(LoyaltySyncError):
    """A setting is missing or malformed. Names the setting and what is wrong."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"setting {setting}: {problem}")
        self.setting = setting
        self.problem = problem


class TemplateError(LoyaltySyncError):
    """A mapping file cannot be used. Names the file, the field and the problem."""

    def __init__(self, file: str, field: str, problem: str) -> None:
        super().__init__(f"{file}: {field}: {problem}")
        self.file = file
        self.field = field
        self.problem = problem


class MappingError(LoyaltySyncError):
    """A record cannot be mapped. Permanent for that record: it is parked, others go on."""

    def __init__(self, template: str, field: str, value: Any, problem: str) -> None:
        super().__init__(f"template {template}, field {field}, value {value!r}: {problem}")
        self.template = template
        self.field = field
        self.value = value
        self.problem = problem


class EventError(LoyaltySyncError):
    """An inbound payload cannot be read. `status` is the HTTP status the caller gets."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class TargetError(LoyaltySyncError):
    """F&O or Dataverse refused a request, or could not be reached.

    Carries the service's own error code and message so an operator can look
    them up; `transient` says whether trying again later can help.
    """

    def __init__(
        self,
        target: str,
        status: int,
        code: str,
        message: str,
        *,
        method: str = "",
        url: str = "",
        retry_after: float | None = None,
    ) -> None:
        where = f" ({method} {url})" if method else ""
        super().__init__(f"{target} answered {status} {code}: {message}{where}")
        self.target = target
        self.status = status
        self.code = code
        self.message = message
        self.method = method
        self.url = url
        self.retry_after = retry_after

    @property
    def transient(self) -> bool:
        """True for throttling, server-side failures and unreachable services."""
        return self.status in (0, 408, 429, 500, 502, 503, 504)

    @property
    def not_found(self) -> bool:
        return self.status == 404


class ConcurrencyError(LoyaltySyncError):
    """Another worker changed the same sync state first (ETag mismatch). Retry from fresh state."""
