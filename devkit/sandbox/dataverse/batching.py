"""`POST $batch` [D11]: parts run through the whole app as sub-requests, change sets atomically.

Parts share the request's scope (caller, CorrelationId, execution-time bill,
committed changes). A change set runs in `change_set()`: a store transaction
that also forgets the changes its parts recorded when it rolls back, so a
rolled-back row never fires a webhook. At most 1000 requests per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from devkit.sandbox.batch import BatchLimitError, BatchSyntaxError, execute_batch, parse_batch, render_batch
from devkit.sandbox.dataverse import scope
from devkit.sandbox.dataverse.errors import ODATA, PAYLOAD, bad_request, error_response
from devkit.sandbox.dataverse.org import API_PATH, Organization
from devkit.sandbox.dataverse.prefer import parse_prefer

MAX_PARTS = 1000


@contextmanager
def change_set(org: Organization) -> Iterator[None]:
    """All writes in the block, and the changes they recorded, stand or fall together."""
    current = scope.current()
    mark = len(current.changes) if current else 0
    try:
        with org.store.transaction():
            yield
    except BaseException:
        if current is not None:
            del current.changes[mark:]
        raise


async def run(org: Organization, request: Request, transaction: Callable[[], AbstractContextManager[Any]]) -> Response:
    """Answer a `$batch` POST."""
    current = scope.current()
    if current is not None and current.in_batch:
        raise bad_request("Batch requests cannot be nested.", ODATA)
    prefs = parse_prefer(request.headers.getlist("prefer"))
    try:
        parts = parse_batch(await request.body(), request.headers.get("content-type", ""), max_parts=MAX_PARTS)
    except BatchLimitError as exc:
        raise bad_request(
            f"The number of requests in a batch ({exc.count}) exceeds the limit of {MAX_PARTS}.", ODATA
        ) from exc
    except BatchSyntaxError as exc:
        raise bad_request(exc.message, PAYLOAD) from exc
    if current is not None:
        current.in_batch = True
    try:
        status, items = await execute_batch(
            request.scope["app"],
            parts,
            base_path=API_PATH,
            auth_header=request.headers.get("authorization", ""),
            extra_headers=dict(request.headers),
            continue_on_error=prefs.continue_on_error,
            transaction=transaction,
            error=lambda status, message: error_response(status, ODATA, message),
            origin=org.public_url,
        )
    finally:
        if current is not None:
            current.in_batch = False
    body, content_type = render_batch(items)
    headers = {"OData-Version": "4.0"}
    applied = prefs.applied(batch=True)
    if applied:
        headers["Preference-Applied"] = applied
    return Response(body, status, headers=headers, media_type=content_type)
