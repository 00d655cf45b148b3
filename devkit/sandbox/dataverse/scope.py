"""What one API request carries through the handlers: who calls, its correlation id, cost and changes.

The pipeline middleware opens a `RequestScope` per top-level request; `$batch`
parts run in the same task (through `httpx.ASGITransport`) and so share it:
one caller, one CorrelationId, one execution-time bill, and one list of
committed changes that become webhooks once the writer has its response.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

Message = Literal["Create", "Update", "Delete"]


@dataclass(frozen=True)
class Caller:
    """The systemuser a request runs as, and the authenticated user when it impersonates someone."""

    user_id: str
    on_behalf_of: str | None = None


@dataclass
class Change:
    """One committed row change, as a webhook step sees it."""

    message: Message
    table: str
    row_id: str
    submitted: dict[str, Any]
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    caller: Caller
    key_attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class RequestScope:
    """State shared by a request and the `$batch` parts it runs."""

    caller: Caller
    correlation_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    cost_ms: float = 0.0
    changes: list[Change] = field(default_factory=list)
    in_batch: bool = False


_CURRENT: ContextVar[RequestScope | None] = ContextVar("loyaltysync_dataverse_scope", default=None)


def current() -> RequestScope | None:
    """The scope of the request being served, or None outside the API pipeline."""
    return _CURRENT.get()


@contextmanager
def opened(scope: RequestScope) -> Iterator[RequestScope]:
    """Make `scope` current for the block."""
    token = _CURRENT.set(scope)
    try:
        yield scope
    finally:
        _CURRENT.reset(token)


def charge(cost_ms: float) -> None:
    """Add execution time to the current request's bill (no-op outside a request)."""
    scope = _CURRENT.get()
    if scope is not None:
        scope.cost_ms += cost_ms


def record(changes: list[Change]) -> None:
    """Remember committed changes of the current request for webhook delivery."""
    scope = _CURRENT.get()
    if scope is not None:
        scope.changes.extend(changes)
