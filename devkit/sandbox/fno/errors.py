"""F&O-shaped error answers.

Write failures look like the real service's: a bland top-level "An error has
occurred." with the infolog text in `innererror.message` and the
`AxODataWriteException` type. URL and query problems carry the OData
library's message. Everything a handler rejects is raised as `FnoError` and
turned into a response in one place (`FnoError.response`).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response

WRITE_EXCEPTION = "Microsoft.Dynamics.Platform.Integration.Services.OData.AxODataWriteException"
ODATA_EXCEPTION = "Microsoft.OData.ODataException"
GENERIC_MESSAGE = "An error has occurred."
THROTTLED_MESSAGE = (
    "This request could not be processed at this time due to system experiencing high resource utilization."
)
JSON_TYPE = "application/json; odata.metadata=minimal; odata.streaming=true; IEEE754Compatible=false"
ODATA_HEADERS = {"OData-Version": "4.0"}


class FnoError(Exception):
    """A request the emulator refuses, with the status and body F&O would answer."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        inner: str | None = None,
        inner_type: str = ODATA_EXCEPTION,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(inner or message)
        self.status = status
        self.message = message
        self.inner = inner
        self.inner_type = inner_type
        self.headers = headers or {}

    def with_row(self, index: int) -> FnoError:
        """The same error, naming the position of the offending row in a bulk request."""
        inner = f"row {index}: {self.inner or self.message}"
        return FnoError(self.status, self.message, inner=inner, inner_type=self.inner_type, headers=self.headers)

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": "", "message": self.message}
        if self.inner is not None:
            error["innererror"] = {"message": self.inner, "type": self.inner_type, "stacktrace": ""}
        return {"error": error}

    def response(self) -> Response:
        return Response(
            json.dumps(self.body()),
            status_code=self.status,
            media_type=JSON_TYPE,
            headers={**ODATA_HEADERS, **self.headers},
        )


def write_failed(data_entity: str, infolog: str, status: int = 400) -> FnoError:
    """A failed insert/update/delete: the infolog text inside an AxODataWriteException."""
    inner = f"Write failed for table row of type '{data_entity}'. Infolog: Error: {infolog}"
    return FnoError(status, GENERIC_MESSAGE, inner=inner, inner_type=WRITE_EXCEPTION)


def bad_payload(message: str) -> FnoError:
    """A request body the OData reader rejects (unknown property, wrong type, bad enum member)."""
    return FnoError(400, GENERIC_MESSAGE, inner=message)


def bad_query(message: str) -> FnoError:
    """A URL or query option the OData parser rejects."""
    return FnoError(400, f"The query specified in the URI is not valid. {message}", inner=message)


def no_resource(url: str) -> FnoError:
    """The URL names no entity set (or an unsupported path)."""
    return FnoError(404, f"No HTTP resource was found that matches the request URI '{url}'.")


def not_found(entity_set: str) -> FnoError:
    """The key addresses no row (or a row of another company without cross-company=true)."""
    return FnoError(404, f"Resource not found for the segment '{entity_set}'.")


def throttled(retry_after_s: float) -> FnoError:
    """Resource-based (priority) throttling: 429 with Retry-After in whole seconds."""
    seconds = max(1, round(retry_after_s))
    return FnoError(429, THROTTLED_MESSAGE, headers={"Retry-After": str(seconds)})


def service_error(status: int, message: str) -> Response:
    """Body for statuses the shared fault injection answers on the emulator's behalf."""
    if status == 429:
        return FnoError(429, THROTTLED_MESSAGE).response()
    return FnoError(status, message or GENERIC_MESSAGE).response()


def unauthorized() -> Response:
    """F&O answers a missing or wrong token with an empty 401 and a Bearer challenge."""
    return Response(b"", status_code=401, headers={"WWW-Authenticate": "Bearer"})
