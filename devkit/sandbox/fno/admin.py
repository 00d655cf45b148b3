"""The F&O emulator's own admin routes (beside the shared ones under `/_admin`).

- `GET    /_admin/entities` : every entity set with its keys and row count.
- `POST   /_admin/entities/{entity_set}/rows` : bulk seed, no events. Body: a JSON array of rows or
  `{"rows": [...]}`; all or nothing. -> `{"entity_set", "inserted", "rows"}`.
- `DELETE /_admin/entities/{entity_set}/rows` : remove every row, no events. -> `{"deleted"}`.
- `POST   /_admin/subscriptions` : `{"entity_set", "url", "events"?, "format"?, "headers"?,
  "business_event_id"?}` -> 201 with the subscription (its `id`).
- `GET    /_admin/subscriptions` -> `{"value": [...]}`; `DELETE /_admin/subscriptions/{id}` -> 204 / 404.
- `GET|PATCH /_admin/throttling` : `{"active", "retry_after_s", "remaining"}` (priority-based throttling).
- `GET|PATCH /_admin/settings` : `{"max_page_size", "event_retry_pause_s", "default_company"}`.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from devkit.sandbox.fno.dataset import FnoData
from devkit.sandbox.fno.errors import FnoError
from devkit.sandbox.fno.subscriptions import Publisher, SubscriptionRequest


class ThrottlingPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    active: bool | None = None
    retry_after_s: float | None = Field(default=None, ge=0)
    remaining: int | None = Field(default=None, ge=0)


class SettingsPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_page_size: int | None = Field(default=None, ge=1)
    event_retry_pause_s: float | None = Field(default=None, ge=0)
    default_company: str | None = Field(default=None, min_length=1, max_length=4)


def _problem(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body() or b"null")
    except ValueError:
        return None


def admin_extras(data: FnoData, publisher: Publisher) -> list[Route]:
    """The routes above, relative to `/_admin`."""

    async def list_entities(request: Request) -> Response:
        sets = {
            e.entity_set: {"entity_type": e.full_type, "keys": list(e.keys), "company_specific": e.company_specific,
                           "rows": data.count(e), "business_event_id": e.business_event_id,
                           "virtual_table": e.virtual_table}
            for e in data.catalog.entities.values()
        }
        return JSONResponse({"entity_sets": sets})

    async def rows(request: Request) -> Response:
        entity = data.entity(request.path_params["entity_set"])
        if entity is None:
            return _problem(404, f"unknown entity set {request.path_params['entity_set']!r}")
        if request.method == "DELETE":
            return JSONResponse({"deleted": data.clear(entity)})
        body = await _json_body(request)
        items = body.get("rows") if isinstance(body, dict) else body
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            return _problem(400, 'body must be a JSON array of row objects or {"rows": [...]}')
        try:
            inserted = data.seed(entity, items)
        except FnoError as exc:
            return _problem(400, exc.inner or exc.message)
        return JSONResponse({"entity_set": entity.entity_set, "inserted": inserted, "rows": data.count(entity)})

    async def subscriptions(request: Request) -> Response:
        if request.method == "GET":
            return JSONResponse({"value": [s.as_json() for s in publisher.active()]})
        try:
            wanted = SubscriptionRequest.model_validate(await _json_body(request))
            subscription = publisher.add(wanted)
        except ValidationError as exc:
            return _problem(400, str(exc.errors()[0]["loc"]) + ": " + exc.errors()[0]["msg"])
        except ValueError as exc:
            return _problem(400, str(exc))
        return JSONResponse(subscription.as_json(), status_code=201)

    async def subscription(request: Request) -> Response:
        if publisher.remove(request.path_params["subscription_id"]):
            return Response(status_code=204)
        return _problem(404, "no such subscription")

    def throttling_json() -> dict[str, Any]:
        t = data.throttling
        return {"active": t.active, "retry_after_s": t.retry_after_s, "remaining": t.remaining}

    async def throttling(request: Request) -> Response:
        if request.method == "PATCH":
            try:
                patch = ThrottlingPatch.model_validate(await _json_body(request))
            except ValidationError as exc:
                return _problem(400, str(exc.errors()[0]["loc"]) + ": " + exc.errors()[0]["msg"])
            for name, value in patch.model_dump(exclude_unset=True).items():
                setattr(data.throttling, name, value)
        return JSONResponse(throttling_json())

    def settings_json() -> dict[str, Any]:
        return {"max_page_size": data.max_page_size, "event_retry_pause_s": publisher.retry_pause_s,
                "default_company": data.default_company}

    async def settings(request: Request) -> Response:
        if request.method == "PATCH":
            try:
                patch = SettingsPatch.model_validate(await _json_body(request))
            except ValidationError as exc:
                return _problem(400, str(exc.errors()[0]["loc"]) + ": " + exc.errors()[0]["msg"])
            if patch.max_page_size is not None:
                data.max_page_size = patch.max_page_size
            if patch.event_retry_pause_s is not None:
                publisher.retry_pause_s = patch.event_retry_pause_s
            if patch.default_company is not None:
                data.default_company = patch.default_company.lower()
                publisher.default_company = data.default_company
        return JSONResponse(settings_json())

    return [
        Route("/entities", list_entities, methods=["GET"]),
        Route("/entities/{entity_set}/rows", rows, methods=["POST", "DELETE"]),
        Route("/subscriptions", subscriptions, methods=["GET", "POST"]),
        Route("/subscriptions/{subscription_id}", subscription, methods=["DELETE"]),
        Route("/throttling", throttling, methods=["GET", "PATCH"]),
        Route("/settings", settings, methods=["GET", "PATCH"]),
    ]
