"""Webhook registration in Dataverse (issue #4): read what is registered, plan the difference, apply it.

Per template: one webhook service endpoint `<endpoint_name>-<template>` that calls
`<function_url>/api/dataverse/<template>?code=<key>`, and three asynchronous
post-operation steps (Create, Update, Delete of the template's table) with one
image each (docs/wire-formats.md §1.11). F&O data events are subscribed the way the
Power Platform integration does it: a second endpoint `<endpoint_name>-<template>.fo`
that calls `<function_url>/api/fo/<template>?code=<key>`, with asynchronous
post-operation steps on the template's F&O virtual table (`mserp_<entity>`)
for OnExternalCreated, OnExternalUpdated and OnExternalDeleted; registering
those steps is what activates the data events in F&O (docs/fno-events.md).
Every step deletes its system job once it succeeded (`asyncautodelete`), so
only failed deliveries stay for an operator to see. `plan` is read-only and
idempotent: what is already right is left alone, so a second run plans nothing.

The key (`authvalue`) can never be read back, so the endpoint's `description`
carries a fingerprint of it (`sha256`, first 12 hex digits): a changed key is
seen without the secret. The description also names the group
(`endpoint_name`) and template, which is how endpoints of a removed template
are found again, without touching another deployment's endpoints that merely
share a name prefix.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from loyaltysync.errors import ConfigError, TargetError
from loyaltysync.events.fno import virtual_column
from loyaltysync.targets.dataverse import DataverseClient, Row
from loyaltysync.targets.odata import any_of_filter, literal
from loyaltysync.templates import Template

WEBHOOK, WEBHOOK_KEY, JSON_FORMAT = 8, 4, 2
ASYNCHRONOUS, POST_OPERATION = 1, 40
PRE_IMAGE, POST_IMAGE, BOTH_IMAGES = 0, 1, 2
MESSAGES = ("Create", "Update", "Delete")
# The messages of an F&O virtual table, raised when F&O announces a data event (wire-formats B2).
FO_MESSAGES = ("OnExternalCreated", "OnExternalUpdated", "OnExternalDeleted")
FO_SUFFIX = ".fo"  # template names cannot hold a '.', so `<group>-<template>.fo` is no other template's endpoint
IMAGE_EXTRA_COLUMNS = ("modifiedon", "versionnumber")  # the engine orders and dedupes changes by them
_ENDPOINT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_MARK = re.compile(r"^Managed by loyaltysync: group (\S+), template (\S+), key sha256 ([0-9a-f]{12})\.$")

Kind = Literal["create", "update", "delete"]
Side = Literal["dataverse", "fo"]
Entity = Literal["endpoint", "step", "image"]
ENTITY_SETS: dict[Entity, str] = {
    "endpoint": "serviceendpoints",
    "step": "sdkmessageprocessingsteps",
    "image": "sdkmessageprocessingstepimages",
}
# How a new row names its parent: (binding property, parent entity set).
_PARENT_BIND: dict[Entity, tuple[str, str]] = {
    "step": ("eventhandler_serviceendpoint@odata.bind", "serviceendpoints"),
    "image": ("sdkmessageprocessingstepid@odata.bind", "sdkmessageprocessingsteps"),
}
_ENDPOINT_COLUMNS = ["serviceendpointid", "name", "url", "contract", "authtype", "messageformat", "description"]
_STEP_COLUMNS = [
    "sdkmessageprocessingstepid", "name", "mode", "stage", "rank", "supporteddeployment", "asyncautodelete",
    "filteringattributes", "_sdkmessageid_value", "_sdkmessagefilterid_value", "_eventhandler_value", "statecode",
]
_IMAGE_COLUMNS = [
    "sdkmessageprocessingstepimageid", "name", "entityalias", "imagetype", "messagepropertyname", "attributes",
    "_sdkmessageprocessingstepid_value",
]


@dataclass(frozen=True)
class Secret:
    """A value sent to Dataverse but never shown: `str()` is "(set)" and `repr()` leaves it out."""

    value: str = field(repr=False)

    def __str__(self) -> str:
        return "(set)"


@dataclass(frozen=True)
class Action:
    """One write: create, update or delete of an endpoint, step or image.

    `fields` are the columns written (a `Secret` stays hidden until sent). A new
    step or image names its parent by `parent_id` (a row that exists) or
    `parent_ref` (the `ref` of a create earlier in the same plan).
    """

    kind: Kind
    entity: Entity
    name: str
    row_id: str | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)
    ref: str | None = None
    parent_id: str | None = None
    parent_ref: str | None = None
    parent_name: str = ""
    changes: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for people; a secret shows as "(set)"."""
        where = f" on {self.parent_name!r}" if self.parent_name and self.entity != "endpoint" else ""
        label = f"{self.kind} {self.entity} {self.name!r}{where}"
        if self.kind == "delete":
            return label
        if self.kind == "update":
            return f"{label}: {'; '.join(self.changes)}"
        details = [f"{_LABELS.get(k, k)}: {_show(k, v)}" for k, v in self.fields.items() if k in _SHOWN_ON_CREATE]
        return f"{label}: {', '.join(details)}" if details else label


_SHOWN_ON_CREATE = ("url", "authvalue", "filteringattributes", "imagetype", "attributes")
_LABELS = {"authvalue": "key", "filteringattributes": "filtering attributes", "imagetype": "image type"}


def _show(column: str, value: Any) -> str:
    if isinstance(value, Secret) or column in ("authvalue", "description"):
        return "(set)"
    if column == "imagetype":
        return {PRE_IMAGE: "pre-image", POST_IMAGE: "post-image", BOTH_IMAGES: "pre- and post-image"}.get(
            value, str(value)
        )
    return str(value)


@dataclass(frozen=True)
class Plan:
    """The writes that bring Dataverse to the wanted registration, in an order that can be applied as is."""

    actions: tuple[Action, ...] = ()

    @property
    def is_empty(self) -> bool:
        """True when everything is registered as wanted."""
        return not self.actions

    def describe(self) -> list[str]:
        """One human-readable line per action (for `--dry-run`); the function key never appears."""
        return [action.describe() for action in self.actions]

    def count(self, kind: Kind | None = None, entity: Entity | None = None) -> int:
        """How many actions of this kind and entity (None: any)."""
        return sum(1 for a in self.actions if kind in (None, a.kind) and entity in (None, a.entity))


# ---------------------------------------------------------------- what is wanted (pure)


@dataclass(frozen=True)
class ImageSpec:
    alias: str
    imagetype: int
    messagepropertyname: str
    attributes: tuple[str, ...]

    def columns(self) -> dict[str, Any]:
        return {
            "name": self.alias,
            "entityalias": self.alias,
            "imagetype": self.imagetype,
            "messagepropertyname": self.messagepropertyname,
            "attributes": ",".join(self.attributes),
        }


@dataclass(frozen=True)
class StepSpec:
    message: str
    name: str
    table: str
    filtering: tuple[str, ...]
    image: ImageSpec | None

    def columns(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mode": ASYNCHRONOUS,
            "stage": POST_OPERATION,
            "rank": 1,
            "supporteddeployment": 0,
            # A succeeded job is deleted; a failed one stays as a system job for an operator to see.
            "asyncautodelete": True,
            "filteringattributes": ",".join(self.filtering) or None,
        }


@dataclass(frozen=True)
class EndpointSpec:
    template: Template
    side: Side
    name: str
    url: str
    description: str
    steps: tuple[StepSpec, ...]


def key_fingerprint(function_key: str) -> str:
    """First 12 hex digits of the key's SHA-256: detects a changed key without reading it back."""
    return hashlib.sha256(function_key.encode()).hexdigest()[:12]


def mapped_columns(template: Template) -> tuple[str, ...]:
    """The template's Dataverse columns (company column included), sorted."""
    return tuple(sorted({f.dataverse for f in template.all_fields if f.dataverse}))


def wanted_steps(template: Template, endpoint_name: str) -> tuple[StepSpec, ...]:
    """Create, Update and Delete steps with their images for one template."""
    table = template.dataverse.table
    mapped = mapped_columns(template)
    post = tuple(sorted({*mapped, *IMAGE_EXTRA_COLUMNS}))
    key = sorted({*template.dataverse.alternate_key, *filter(None, [template.dataverse.company_column])})
    images = {
        "Create": ImageSpec("PostImage", POST_IMAGE, "Id", post),
        # Both: the pre-image tells which fields this update changed, where no agreed values exist yet.
        "Update": ImageSpec("Image", BOTH_IMAGES, "Target", post),
        "Delete": ImageSpec("PreImage", PRE_IMAGE, "Target", tuple(key)),
    }
    return tuple(
        StepSpec(m, f"{endpoint_name}: {m} of {table}", table, mapped if m == "Update" else (), images[m])
        for m in MESSAGES
    )


def virtual_table_columns(template: Template) -> tuple[str, ...]:
    """The template's F&O properties as virtual-table columns (`mserp_<property lower case>`), sorted."""
    return tuple(sorted({virtual_column(f) for f in template.all_fields if f.fo}))


def wanted_fo_steps(template: Template, endpoint_name: str) -> tuple[StepSpec, ...]:
    """OnExternalCreated, OnExternalUpdated and OnExternalDeleted steps on the template's virtual table.

    No images: the data event carries the row in InputParameters (Target, and a
    PreImage for updates), and the worker re-reads F&O anyway. OnExternalUpdated
    filters on the mapped columns, so a change F&O makes to unmapped fields
    costs no delivery (wire-formats B2: it supports filtering attributes).
    """
    table = template.fo.virtual_table_name
    if table is None:
        return ()
    columns = virtual_table_columns(template)
    return tuple(
        StepSpec(m, f"{endpoint_name}: {m} of {table}", table, columns if m == "OnExternalUpdated" else (), None)
        for m in FO_MESSAGES
    )


def wanted_endpoints(
    templates: Mapping[str, Template],
    *,
    function_url: str,
    function_key: str,
    endpoint_name: str,
    fo_data_events: bool = True,
) -> list[EndpointSpec]:
    """The registration every template needs; ConfigError for an unusable URL, key or endpoint name.

    With `fo_data_events`, a template whose F&O side names a virtual table
    (`fo.entity_type` or `fo.virtual_table`) also gets its data-event endpoint.
    """
    parts = urlsplit(function_url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError("function_url", f"must be an absolute http(s) base URL without query, got {function_url!r}")
    if not function_key or len(function_key) > 2048:
        raise ConfigError("function_key", "must be set and at most 2048 characters (Dataverse authvalue)")
    _check_endpoint_name(endpoint_name)
    base = function_url.rstrip("/")
    fingerprint = key_fingerprint(function_key)
    specs: list[EndpointSpec] = []
    for t in sorted(templates.values(), key=lambda t: t.name):
        description = f"Managed by loyaltysync: group {endpoint_name}, template {t.name}, key sha256 {fingerprint}."
        specs.append(EndpointSpec(t, "dataverse", f"{endpoint_name}-{t.name}", f"{base}/api/dataverse/{t.name}",
                                  description, wanted_steps(t, endpoint_name)))
        fo_steps = wanted_fo_steps(t, endpoint_name) if fo_data_events else ()
        if fo_steps:
            specs.append(EndpointSpec(t, "fo", f"{endpoint_name}-{t.name}{FO_SUFFIX}", f"{base}/api/fo/{t.name}",
                                      description, fo_steps))
    return specs


def _check_endpoint_name(endpoint_name: str) -> None:
    if not _ENDPOINT_NAME.match(endpoint_name):
        raise ConfigError("endpoint_name", f"letters, digits, '-', '_' or '.', at most 100, got {endpoint_name!r}")


def _group_of(endpoint: Row) -> str | None:
    mark = _MARK.match(str(endpoint.get("description") or ""))
    return mark.group(1) if mark else None


# ---------------------------------------------------------------- what is registered


@dataclass
class _Registered:
    """Our endpoints (by name prefix), their steps and the steps' images, as read."""

    endpoints: list[Row]
    steps: dict[str, list[Row]]
    images: dict[str, list[Row]]


async def _collect(client: DataverseClient, entity_set: str, select: list[str], where: str) -> list[Row]:
    rows: list[Row] = []
    async for page in client.query(entity_set, select=select, filter=where):
        rows.extend(page)
    return rows


def _id(row: Row, column: str) -> str:
    return str(row.get(column) or "").lower()


async def _read(client: DataverseClient, endpoint_name: str) -> _Registered:
    prefix = f"{endpoint_name}-".casefold()
    endpoints = [
        e for e in await _collect(client, "serviceendpoints", _ENDPOINT_COLUMNS, f"contract eq {WEBHOOK}")
        if str(e.get("name") or "").casefold().startswith(prefix)
    ]
    endpoint_ids = [_id(e, "serviceendpointid") for e in endpoints]
    steps = await _children(client, "sdkmessageprocessingsteps", _STEP_COLUMNS, "_eventhandler_value", endpoint_ids)
    step_ids = [_id(s, "sdkmessageprocessingstepid") for found in steps.values() for s in found]
    images = await _children(
        client, "sdkmessageprocessingstepimages", _IMAGE_COLUMNS, "_sdkmessageprocessingstepid_value", step_ids
    )
    return _Registered(endpoints, steps, images)


async def _children(
    client: DataverseClient, entity_set: str, select: list[str], parent_column: str, parent_ids: Sequence[str]
) -> dict[str, list[Row]]:
    """Rows whose lookup `parent_column` is one of `parent_ids`, grouped by parent; 50 ids per query."""
    grouped: dict[str, list[Row]] = {p: [] for p in parent_ids}
    for start in range(0, len(parent_ids), 50):
        chunk = [uuid.UUID(p) for p in parent_ids[start : start + 50]]
        for row in await _collect(client, entity_set, select, any_of_filter(parent_column, chunk)):
            grouped.setdefault(_id(row, parent_column), []).append(row)
    return grouped


async def _message_ids(client: DataverseClient, names: Sequence[str]) -> dict[str, str]:
    where = " or ".join(f"name eq {literal(m)}" for m in names)
    rows = await _collect(client, "sdkmessages", ["sdkmessageid", "name"], where)
    found = {str(r["name"]): _id(r, "sdkmessageid") for r in rows}
    missing = [m for m in MESSAGES if m in names and m not in found]
    if missing:
        raise TargetError("dataverse", 200, "", f"sdkmessages has no {', '.join(missing)} message")
    missing = [m for m in FO_MESSAGES if m in names and m not in found]
    if missing:
        raise ConfigError(
            "F&O data events",
            f"Dataverse has no {', '.join(missing)} message: enable the Power Platform integration of F&O and "
            "install the Finance and Operations virtual entity solution, or register without F&O data events",
        )
    return found


async def _filter_id(client: DataverseClient, template: Template, step: StepSpec) -> str:
    where = f"sdkmessageid/name eq {literal(step.message)} and primaryobjecttypecode eq {literal(step.table)}"
    rows = await _collect(client, "sdkmessagefilters", ["sdkmessagefilterid"], where)
    if rows:
        return _id(rows[0], "sdkmessagefilterid")
    if step.message in FO_MESSAGES:
        raise ConfigError(
            f"template {template.name}: fo.entity_type",
            f"Dataverse has no {step.message} message filter for virtual table {step.table!r}: make the F&O "
            f"entity {template.fo.entity_type or step.table!r} visible as a virtual table (Available Finance and "
            "Operations entities, Visible = Yes), or set fo.virtual_table to its name",
        )
    raise ConfigError(
        f"template {template.name}: dataverse.table",
        f"Dataverse has no {step.message} message filter for table {step.table!r} (is the table name right?)",
    )


# ---------------------------------------------------------------- the difference


def _columns_set(value: Any) -> tuple[str, ...]:
    return tuple(sorted({c.strip().lower() for c in str(value or "").split(",") if c.strip()}))


def _differences(current: Row, wanted: Mapping[str, Any], sets: Sequence[str] = ()) -> dict[str, Any]:
    """The wanted columns whose current value differs (comma-separated lists compared as sets)."""
    changed: dict[str, Any] = {}
    for column, value in wanted.items():
        now = current.get(column)
        same = _columns_set(now) == _columns_set(value) if column in sets else now == value
        if not same:
            changed[column] = value
    return changed


def _change_lines(current: Row, changed: Mapping[str, Any]) -> tuple[str, ...]:
    lines = []
    for column, value in changed.items():
        if column in ("authvalue", "description"):
            continue
        if column.endswith("@odata.bind"):
            lines.append(f"{column.removesuffix('@odata.bind')}: -> {value}")
        else:
            lines.append(f"{column}: {_show(column, current.get(column))} -> {_show(column, value)}")
    if "authvalue" in changed:
        lines.append("key: (set)")
    return tuple(lines)


def _delete_tree(registered: _Registered, endpoint: Row) -> list[Action]:
    """Deletes for an endpoint, its steps and their images, children first."""
    endpoint_id, endpoint_label = _id(endpoint, "serviceendpointid"), str(endpoint.get("name"))
    actions: list[Action] = []
    for step in registered.steps.get(endpoint_id, []):
        actions.extend(_delete_step(registered, step, endpoint_label))
    actions.append(Action("delete", "endpoint", endpoint_label, endpoint_id))
    return actions


def _delete_step(registered: _Registered, step: Row, endpoint_label: str) -> list[Action]:
    step_id, step_label = _id(step, "sdkmessageprocessingstepid"), str(step.get("name"))
    actions = [
        Action("delete", "image", str(i.get("name")), _id(i, "sdkmessageprocessingstepimageid"), parent_name=step_label)
        for i in registered.images.get(step_id, [])
    ]
    actions.append(Action("delete", "step", step_label, step_id, parent_name=endpoint_label))
    return actions


def _plan_image(
    registered: _Registered, step_id: str | None, step_ref: str, step_name: str, spec: ImageSpec | None
) -> list[Action]:
    images = registered.images.get(step_id, []) if step_id else []
    if spec is None:  # a step that wants no image: any found is not ours to keep
        return [
            Action("delete", "image", str(i.get("name")), _id(i, "sdkmessageprocessingstepimageid"),
                   parent_name=step_name)
            for i in images
        ]
    wanted = spec.columns()
    if not images:
        return [Action("create", "image", spec.alias, fields=wanted, parent_id=step_id,
                       parent_ref=None if step_id else step_ref, parent_name=step_name)]
    keep = next((i for i in images if i.get("imagetype") == spec.imagetype and i.get("entityalias") == spec.alias),
                images[0])
    actions = [
        Action("delete", "image", str(i.get("name")), _id(i, "sdkmessageprocessingstepimageid"), parent_name=step_name)
        for i in images if i is not keep
    ]
    changed = _differences(keep, wanted, sets=("attributes",))
    if changed:
        actions.append(Action("update", "image", str(keep.get("name")), _id(keep, "sdkmessageprocessingstepimageid"),
                              fields=changed, parent_name=step_name, changes=_change_lines(keep, changed)))
    return actions


def _plan_endpoint(
    registered: _Registered, spec: EndpointSpec, found: list[Row], secret: Secret,
    messages: Mapping[str, str], filters: Mapping[str, str],
) -> list[Action]:
    """Creates, updates and deletes for one template's endpoint, its steps and their images."""
    actions: list[Action] = []
    wanted = {"name": spec.name, "url": spec.url, "contract": WEBHOOK, "authtype": WEBHOOK_KEY,
              "messageformat": JSON_FORMAT, "description": spec.description}
    endpoint_id: str | None = None
    if not found:
        actions.append(Action("create", "endpoint", spec.name, fields={**wanted, "authvalue": secret},
                              ref=f"endpoint:{spec.name}"))
    else:
        keep, *duplicates = found
        for duplicate in duplicates:
            actions.extend(_delete_tree(registered, duplicate))
        endpoint_id = _id(keep, "serviceendpointid")
        changed = _differences(keep, wanted)
        if {"description", "authtype", "contract"} & changed.keys():
            changed["authvalue"] = secret  # the fingerprint (or the auth scheme) differs: send the key again
        if changed:
            actions.append(Action("update", "endpoint", spec.name, endpoint_id, fields=changed,
                                  changes=_change_lines(keep, changed)))
    wanted_messages = {messages[s.message]: s.message for s in spec.steps}
    by_message: dict[str, list[Row]] = {}
    for step in registered.steps.get(endpoint_id, []) if endpoint_id else []:
        by_message.setdefault(wanted_messages.get(_id(step, "_sdkmessageid_value"), ""), []).append(step)
    for unwanted in by_message.pop("", []):  # another message on our endpoint: not ours to keep
        actions.extend(_delete_step(registered, unwanted, spec.name))
    for step_spec in spec.steps:
        actions.extend(_plan_step(
            registered, spec, endpoint_id, step_spec, by_message.get(step_spec.message, []),
            messages[step_spec.message], filters[step_spec.message],
        ))
    return actions


def _plan_step(
    registered: _Registered, endpoint: EndpointSpec, endpoint_id: str | None, spec: StepSpec,
    found: list[Row], message_id: str, filter_id: str,
) -> list[Action]:
    filter_bind = f"/sdkmessagefilters({filter_id})"
    step_ref = f"step:{endpoint.name}:{spec.message}"
    if not found:
        create = {k: v for k, v in spec.columns().items() if v is not None}
        create.update({"sdkmessageid@odata.bind": f"/sdkmessages({message_id})",
                       "sdkmessagefilterid@odata.bind": filter_bind})
        return [
            Action("create", "step", spec.name, fields=create, ref=step_ref, parent_id=endpoint_id,
                   parent_ref=None if endpoint_id else f"endpoint:{endpoint.name}", parent_name=endpoint.name),
            *_plan_image(registered, None, step_ref, spec.name, spec.image),
        ]
    keep = next((s for s in found if s.get("name") == spec.name), found[0])
    actions: list[Action] = []
    for other in found:
        if other is not keep:
            actions.extend(_delete_step(registered, other, endpoint.name))
    step_id = _id(keep, "sdkmessageprocessingstepid")
    changed = _differences(keep, {**spec.columns(), "statecode": 0}, sets=("filteringattributes",))
    if "statecode" in changed:
        changed["statuscode"] = 1  # a disabled step is enabled again: only enabled steps deliver
    if _id(keep, "_sdkmessagefilterid_value") != filter_id:
        changed["sdkmessagefilterid@odata.bind"] = filter_bind
    if changed:
        actions.append(Action("update", "step", spec.name, step_id, fields=changed, parent_name=endpoint.name,
                              changes=_change_lines(keep, changed)))
    return [*actions, *_plan_image(registered, step_id, step_ref, spec.name, spec.image)]


def _ordered(actions: list[Action]) -> tuple[Action, ...]:
    """Deletes first (each tree already children first), then creates and updates with parents first."""
    return (*(a for a in actions if a.kind == "delete"), *(a for a in actions if a.kind != "delete"))


# ---------------------------------------------------------------- public entry points


async def plan(
    client: DataverseClient,
    templates: Mapping[str, Template],
    *,
    function_url: str,
    function_key: str,
    endpoint_name: str = "loyaltysync",
    prune: bool = True,
    fo_data_events: bool = True,
) -> Plan:
    """Read the current registration and return the writes that make it match `templates` (reads only).

    Endpoints are found by name `<endpoint_name>-<template>` (and `...<template>.fo`
    for F&O data events); with `prune`, endpoints this group created for templates
    that are no longer given (or for data events no longer wanted) are deleted too.
    Raises ConfigError for bad arguments, a table Dataverse does not know, or, with
    `fo_data_events`, an organization without the F&O virtual table a template names.
    """
    specs = wanted_endpoints(templates, function_url=function_url, function_key=function_key,
                             endpoint_name=endpoint_name, fo_data_events=fo_data_events)
    registered = await _read(client, endpoint_name)
    messages = await _message_ids(client, list(dict.fromkeys(step.message for s in specs for step in s.steps)))
    filter_ids = await asyncio.gather(*(_filter_id(client, s.template, step) for s in specs for step in s.steps))
    secret = Secret(function_key)
    by_name: dict[str, list[Row]] = {}
    for endpoint in registered.endpoints:
        by_name.setdefault(str(endpoint.get("name")).casefold(), []).append(endpoint)
    actions: list[Action] = []
    found_filters = iter(filter_ids)
    for spec in specs:
        filters = {step.message: next(found_filters) for step in spec.steps}
        found = by_name.pop(spec.name.casefold(), [])
        actions.extend(_plan_endpoint(registered, spec, found, secret, messages, filters))
    if prune:
        for leftover in (e for found in by_name.values() for e in found):
            if _group_of(leftover) == endpoint_name:
                actions.extend(_delete_tree(registered, leftover))
    return Plan(_ordered(actions))


async def plan_removal(
    client: DataverseClient, templates: Mapping[str, Template], *, endpoint_name: str = "loyaltysync"
) -> Plan:
    """The deletes that take away this group's registration: images, steps, then endpoints (reads only).

    Removed: endpoints named `<endpoint_name>-<template>` or `<endpoint_name>-<template>.fo`
    for the given templates, and any endpoint whose description marks it as this group's.
    """
    _check_endpoint_name(endpoint_name)
    names = {f"{endpoint_name}-{name}{suffix}".casefold() for name in templates for suffix in ("", FO_SUFFIX)}
    registered = await _read(client, endpoint_name)
    actions: list[Action] = []
    for endpoint in registered.endpoints:
        if str(endpoint.get("name")).casefold() in names or _group_of(endpoint) == endpoint_name:
            actions.extend(_delete_tree(registered, endpoint))
    return Plan(tuple(actions))


def _reveal(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.value if isinstance(v, Secret) else v for k, v in fields.items()}


async def apply(client: DataverseClient, plan: Plan, *, on_action: Callable[[Action], None] | None = None) -> None:
    """Carry out `plan` in order; `on_action` is told before each write. A row already gone counts as deleted.

    A failure stops at that action (TargetError); running `plan` again picks up from what exists.
    """
    created: dict[str, str] = {}
    for action in plan.actions:
        if on_action is not None:
            on_action(action)
        entity_set = ENTITY_SETS[action.entity]
        if action.kind == "delete":
            await client.delete_by_id(entity_set, _need(action.row_id, action))
        elif action.kind == "update":
            await client.update_by_id(entity_set, _need(action.row_id, action), _reveal(action.fields))
        else:
            body = _reveal(action.fields)
            if action.entity in _PARENT_BIND:
                bind, parent_set = _PARENT_BIND[action.entity]
                parent = action.parent_id or created.get(action.parent_ref or "")
                body[bind] = f"/{parent_set}({_need(parent, action)})"
            new_id = await client.create(entity_set, body)
            if new_id is None:
                raise TargetError("dataverse", 204, "", f"{entity_set}: the create answer has no OData-EntityId",
                                  method="POST", url=entity_set)
            if action.ref:
                created[action.ref] = new_id


def _need(row_id: str | None, action: Action) -> str:
    if not row_id:
        raise ValueError(f"plan action without a row to act on: {action.describe()}")
    return row_id
