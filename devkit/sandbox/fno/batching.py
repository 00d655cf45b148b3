"""`POST /data/$batch`: OData v4 batches with change sets, up to 5000 operations.

The shared batch machinery parses the multipart body and runs every part as
a sub-request through the whole app; a change set runs inside
`FnoData.change_set()`, so its writes roll back together and its events go
out only when it commits. Without `Prefer: odata.continue-on-error` the
batch stops at the first failure and answers 200 with the responses so far,
the failing one last (OData v4, as F&O's ASP.NET batch handler does).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

from devkit.sandbox.batch import BatchLimitError, BatchSyntaxError, execute_batch, parse_batch, render_batch
from devkit.sandbox.fno.dataset import FnoData
from devkit.sandbox.fno.errors import ODATA_HEADERS, FnoError, bad_payload, service_error

MAX_OPERATIONS = 5000


class BatchRunner:
    """Runs `$batch` requests against the app that received them."""

    def __init__(self, data: FnoData, max_operations: int = MAX_OPERATIONS) -> None:
        self.data = data
        self.max_operations = max_operations

    async def handle(self, request: Request, service_root: str) -> Response:
        """Parse, run and render one batch; raises FnoError for a malformed or oversized batch."""
        try:
            items = parse_batch(
                await request.body(), request.headers.get("content-type", ""), max_parts=self.max_operations
            )
        except BatchLimitError:
            raise FnoError(
                400,
                "The current batch message contains too many parts. Only batch messages with a maximum number "
                f"of '{self.max_operations}' query operations and change sets are allowed.",
            ) from None
        except BatchSyntaxError as exc:
            raise bad_payload(exc.message) from None
        root = urlsplit(service_root)
        prefer = request.headers.get("prefer", "").replace(" ", "").lower()
        status, responses = await execute_batch(
            request.app,
            items,
            base_path="/data",
            auth_header=request.headers.get("authorization", ""),
            extra_headers=dict(request.headers),
            continue_on_error="odata.continue-on-error" in prefer,
            transaction=self.data.change_set,
            error=service_error,
            origin=f"{root.scheme}://{root.netloc}",
            partial_on_stop=True,
        )
        body, content_type = render_batch(responses)
        return Response(body, status_code=status, media_type=content_type, headers=ODATA_HEADERS)
