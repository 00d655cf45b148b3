"""Bulk messages: `<set>/Microsoft.Dynamics.CRM.CreateMultiple | UpdateMultiple | UpsertMultiple` [D12].

Every target needs `@odata.type`. On standard tables one failing target rolls
the whole request back (one store transaction). Each call is one request for
service protection, charged per record for execution time; each record fires
the Create or Update webhook steps, as the bulk pipeline does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from devkit.sandbox.dataverse import scope, writes
from devkit.sandbox.dataverse.errors import (
    INVALID_ARGUMENT,
    PAYLOAD,
    DataverseError,
    bad_request,
    segment_not_found,
)
from devkit.sandbox.dataverse.handlers import caller, json_response, missing, no_content, read_json
from devkit.sandbox.dataverse.org import Organization
from devkit.sandbox.dataverse.paths import split_path
from devkit.sandbox.dataverse.protection import CostModel
from devkit.sandbox.dataverse.schema import TableDef
from devkit.sandbox.dataverse.scope import Change
from devkit.sandbox.dataverse.values import coerce
from devkit.sandbox.dataverse.writes import Address

NAMESPACE = "Microsoft.Dynamics.CRM."
MESSAGES = ("CreateMultiple", "UpdateMultiple", "UpsertMultiple")


def _targets(body: Any, definition: TableDef, message: str) -> list[dict[str, Any]]:
    if not isinstance(body, dict) or not isinstance(body.get("Targets"), list):
        raise bad_request(f'{message} needs a body {{"Targets": [...]}}.', PAYLOAD)
    targets: list[dict[str, Any]] = body["Targets"]
    expected = NAMESPACE + definition.logical_name
    for i, target in enumerate(targets):
        if not isinstance(target, dict):
            raise bad_request(f"Targets[{i}] is not an entity (JSON object).", PAYLOAD)
        odata_type = target.get("@odata.type")
        if odata_type is None:
            raise bad_request(
                f"Targets[{i}]: the '@odata.type' annotation is required on every target of {message}.", PAYLOAD
            )
        if str(odata_type).lstrip("#") != expected:
            raise bad_request(
                f"Targets[{i}]: '@odata.type' is '{odata_type}'; this entity set takes '{expected}'.", PAYLOAD
            )
    return targets


def _address(org: Organization, definition: TableDef, target: dict[str, Any], i: int) -> Address:
    """Where an UpsertMultiple / UpdateMultiple target points: `@odata.id`, the primary id or key columns."""
    reference = target.get("@odata.id")
    if isinstance(reference, str):
        path = reference.split("/api/data/", 1)[1].partition("/")[2] if "/api/data/" in reference else reference
        segments = split_path(path)
        if len(segments) != 1 or segments[0].key is None or segments[0].name != definition.entity_set:
            raise bad_request(f"Targets[{i}]: '@odata.id' must address a {definition.entity_set} record.", PAYLOAD)
        return writes.locate(org, definition, segments[0].key)
    table = org.tables[definition.logical_name]
    row_id = target.get(definition.primary_id)
    if isinstance(row_id, str):
        return writes.locate(org, definition, row_id)
    for key in definition.keys:
        if all(target.get(c) is not None for c in key.columns):
            values = tuple(coerce(definition.columns[c], target[c], definition.logical_name) for c in key.columns)
            row = table.find(",".join(key.columns), values)
            return Address(
                definition,
                row,
                row[definition.primary_id] if row else None,
                dict(zip(key.columns, values, strict=True)),
            )
    raise bad_request(f"Targets[{i}] has neither '@odata.id', the primary key nor alternate key values.", PAYLOAD)


def _body(target: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in target.items() if k != "@odata.id"}


async def run(
    org: Organization,
    definition: TableDef,
    action: str,
    request: Request,
    costs: CostModel,
    transaction: Callable[[], Any],
) -> Response:
    """Answer a bulk message POST."""
    message = action.removeprefix(NAMESPACE)
    if not action.startswith(NAMESPACE) or message not in MESSAGES:
        raise segment_not_found(action)
    if not definition.bulk:
        raise DataverseError(
            400,
            INVALID_ARGUMENT,
            f"The '{message}' method does not support entities of type '{definition.logical_name}'.",
        )
    targets = _targets(await read_json(request), definition, message)
    who = caller()
    changes: list[Change] = []
    with transaction():
        for i, target in enumerate(targets):
            if message == "CreateMultiple":
                changes.append(writes.create(org, definition, writes.parse_body(org, definition, target), who))
                continue
            address = _address(org, definition, target, i)
            values = writes.parse_body(org, definition, _body(target))
            if address.row is not None:
                changes.append(writes.update(org, definition, address.row, values, who, key_values=address.key_values))
            elif message == "UpdateMultiple":
                raise missing(address)
            else:
                changes.append(
                    writes.create(
                        org,
                        definition,
                        values,
                        who,
                        key_values=address.key_values,
                        row_id=None if address.by_key else address.row_id,
                    )
                )
    scope.record(changes)
    scope.charge(costs.bulk_ms + costs.bulk_record_ms * len(targets))
    if message == "CreateMultiple":
        return json_response(
            {
                "@odata.context": f"{org.base_url}/$metadata#{NAMESPACE}CreateMultipleResponse",
                "Ids": [c.row_id for c in changes],
            }
        )
    return no_content()
