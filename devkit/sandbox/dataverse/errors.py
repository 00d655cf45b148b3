"""Dataverse-shaped errors: `{"error":{"code":..., "message":...}}` with the service's codes.

Handlers raise `DataverseError`; one exception handler renders it. The codes and
messages are the ones docs/wire-formats.md §1.2-§1.9 documents; where the spec is
silent the emulator keeps the documented shape and says so in the docstring.
"""

from __future__ import annotations

import json

from starlette.responses import Response

ODATA_HEADERS = {"OData-Version": "4.0"}
JSON_TYPE = "application/json; odata.metadata=minimal"

# Codes the emulator answers with (docs/wire-formats.md §1.4, §1.9).
NOT_FOUND = "0x80040217"
DUPLICATE = "0x80040237"
SEGMENT_NOT_FOUND = "0x8006088a"
PAYLOAD = "0x80048d19"
STRING_LENGTH = "0x80044331"
OUT_OF_RANGE = "0x8004431A"
KEY_MISS = "0x80060891"
INVALID_ARGUMENT = "0x80040203"
PRIVILEGE = "0x80040220"
TOO_MANY_REQUESTS = "0x80072322"
EXECUTION_TIME = "0x80072321"
CONCURRENCY = "0x80072326"
ODATA = "0x0"
UNEXPECTED = "0x80040216"


class DataverseError(Exception):
    """An error answer: HTTP status, Dataverse error code and message, optional extra headers."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    """Render the documented error body with the OData headers."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return Response(body, status, headers={**ODATA_HEADERS, **(headers or {})}, media_type=JSON_TYPE)


def render(exc: DataverseError) -> Response:
    """The response for a raised `DataverseError`."""
    return error_response(exc.status, exc.code, exc.message, exc.headers)


def unauthorized() -> Response:
    """401 for a missing or wrong bearer token, as Dataverse answers it (empty body, Bearer challenge).

    Dataverse answers an unauthenticated call with 401, `WWW-Authenticate: Bearer
    authorization_uri=...` and no JSON error; the emulator adds a Dataverse-shaped
    body so a client log shows why.
    """
    return error_response(
        401,
        ODATA,
        "Authentication failed: the bearer token is missing or not valid for this organization.",
        {"WWW-Authenticate": 'Bearer authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize"'},
    )


def fault(status: int, message: str) -> Response:
    """The body of an injected fault (500, 503, 504, 429) in Dataverse's shape."""
    # 0x80040216 is the platform's generic "unexpected error"; the spec names no code for 503/504.
    code = {429: TOO_MANY_REQUESTS, 500: UNEXPECTED}.get(status, ODATA)
    return error_response(status, code, message)


def unknown_property(name: str, table: str) -> DataverseError:
    """400 0x0: a column that the table does not have."""
    return DataverseError(
        400, ODATA, f"Could not find a property named '{name}' on type 'Microsoft.Dynamics.CRM.{table}'."
    )


def segment_not_found(segment: str) -> DataverseError:
    """404 0x8006088a: an entity set, function or action that does not exist."""
    return DataverseError(404, SEGMENT_NOT_FOUND, f"Resource not found for the segment '{segment}'.")


def row_not_found(table: str, row_id: str) -> DataverseError:
    """404 0x80040217: no row with this id."""
    return DataverseError(404, NOT_FOUND, f"{table} With Id = {row_id} Does Not Exist")


def key_not_found(table: str) -> DataverseError:
    """404 0x80060891: no row with these alternate-key values (observed on PATCH with If-Match: *)."""
    return DataverseError(404, KEY_MISS, f"A record with the specified key values does not exist in {table} entity")


def bad_request(message: str, code: str = ODATA) -> DataverseError:
    """400 with a message (JSON, syntax and argument errors)."""
    return DataverseError(400, code, message)
