"""One source page into target writes: canonical values, the target body, and the state to record.

The same rules as a live create (`decide._one_side_missing`): the target gets
the fields that flow its way plus the key, with constant defaults added; the
agreed values stored in the sync state are exactly what was written, so the
first live event for the record finds both sides agreeing (no-change / echo).
A row that cannot be mapped (no key, a value outside a value map, an unknown
currency...) becomes a `Failure` with the reason, and the rest go on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loyaltysync import mapping
from loyaltysync.errors import MappingError
from loyaltysync.state import SyncRecord
from loyaltysync.targets.lookups import LookupCache
from loyaltysync.templates import Side, Template, other_side

Row = dict[str, Any]


@dataclass(slots=True)
class Item:
    """One record to write: its natural key, the target key and body, and the sync state to store after."""

    key: dict[str, str]
    key_text: str
    target_key: dict[str, str]
    body: dict[str, Any]
    agreed: dict[str, Any]
    row_id: str | None = None
    versions: dict[str, str | None] = field(default_factory=dict)
    modified: dict[str, str | None] = field(default_factory=dict)

    def state(self, template: str) -> SyncRecord:
        """The sync state once the target acknowledged the write."""
        return SyncRecord(
            template=template,
            key=self.key_text,
            values=self.agreed,
            versions=dict(self.versions),
            modified=dict(self.modified),
            row_id=self.row_id,
        )


@dataclass(slots=True)
class Failure:
    """A record that could not be copied, and why (`code`: the target's error code or `MappingError`)."""

    key_text: str
    key: dict[str, str]
    reason: str
    code: str
    row_id: str | None = None


@dataclass(slots=True)
class Prepared:
    """A page turned into writes and failures."""

    items: list[Item]
    failures: list[Failure]


def _raw_key(template: Template, row: Row, side: Side) -> str:
    """A readable identity for a row whose key could not be mapped (its raw key columns, or its row id)."""
    if side == "dataverse":
        row_id = row.get(template.dataverse.primary_id)
        if row_id:
            return str(row_id)
    parts = []
    for f in template.key_fields:
        column = f.fo if side == "fo" else f.dataverse
        parts.append(str(row.get(column or f.key, "")))
    return "|".join(parts) or "(no key)"


class _Written:
    """Which canonical fields a create on `target` writes (computed once per page, used per row)."""

    def __init__(self, template: Template, target: Side) -> None:
        self.fields = [f.key for f in template.fields_to(target)]
        self.keys = [f.key for f in template.key_fields]

    def __call__(self, values: dict[str, Any], key: dict[str, str]) -> dict[str, Any]:
        written = {name: values[name] for name in self.fields if name in values}
        for name in self.keys:
            written[name] = values.get(name, key.get(name))
        return written


async def prepare_page(template: Template, rows: list[Row], source: Side, lookups: LookupCache) -> Prepared:
    """Map one page of source rows (OData JSON) to target writes; lookups are fetched once per page."""
    if source == "fo":
        return await _from_fo(template, rows, lookups)
    return await _from_dataverse(template, rows, lookups)


async def _from_fo(template: Template, rows: list[Row], lookups: LookupCache) -> Prepared:
    failures: list[Failure] = []
    canonical: list[tuple[dict[str, Any], dict[str, str], Row]] = []
    for row in rows:
        try:
            values = mapping.fo_to_canonical(template, row)
            canonical.append((values, mapping.natural_key(template, values, "fo"), row))
        except MappingError as exc:
            failures.append(Failure(_raw_key(template, row, "fo"), {}, str(exc), "MappingError"))
    for f in template.fields_to("dataverse"):
        if f.lookup is not None:
            wanted = {str(values[f.key]) for values, _, _ in canonical if values.get(f.key)}
            if wanted:
                await lookups.prepare(f.lookup, keys=wanted)
    items: list[Item] = []
    modified_field = template.fo.modified_field
    to_write = _Written(template, "dataverse")
    for values, key, row in canonical:
        key_text = mapping.key_text(key)
        written = to_write(values, key)
        try:
            body = mapping.canonical_to_dataverse(template, written, lookups, create=True)
        except MappingError as exc:
            failures.append(Failure(key_text, key, str(exc), "MappingError"))
            continue
        modified = mapping.normalize_time(row.get(modified_field)) if modified_field else None
        items.append(
            Item(
                key=key,
                key_text=key_text,
                target_key=mapping.dataverse_key(template, key),
                body=body,
                agreed=written,
                modified={"fo": modified} if modified else {},
            )
        )
    return Prepared(items, failures)


async def _from_dataverse(template: Template, rows: list[Row], lookups: LookupCache) -> Prepared:
    failures: list[Failure] = []
    split: list[tuple[dict[str, Any], dict[str, str | None], Row]] = []
    for row in rows:
        try:
            values, lookup_ids = mapping.dataverse_values(template, row)
            split.append((values, lookup_ids, row))
        except MappingError as exc:
            failures.append(_dataverse_failure(template, row, exc))
    for name in {n for _, ids, _ in split for n in ids}:
        lookup = template.field(name).lookup
        wanted = {row_id for _, ids, _ in split if (row_id := ids.get(name))}
        if lookup is not None and wanted:
            await lookups.prepare(lookup, ids=wanted)
    items: list[Item] = []
    to_write = _Written(template, other_side("dataverse"))
    for values, lookup_ids, row in split:
        try:
            values.update(mapping.resolve_lookups(template, lookup_ids, lookups))
            key = mapping.natural_key(template, values, "dataverse")
            written = to_write(values, key)
            body = mapping.canonical_to_fo(template, written, create=True)
        except MappingError as exc:
            failures.append(_dataverse_failure(template, row, exc))
            continue
        fo_key = mapping.fo_key(template, key)
        version = row.get("versionnumber")
        modified = mapping.normalize_time(row.get("modifiedon"))
        row_id = row.get(template.dataverse.primary_id)
        items.append(
            Item(
                key=key,
                key_text=mapping.key_text(key),
                target_key=fo_key,
                body={**body, **fo_key},
                agreed=written,
                row_id=str(row_id).lower() if row_id else None,
                # Later webhooks at or below this version are already reflected: the worker skips them.
                versions={"dataverse": str(version)} if version is not None else {},
                modified={"dataverse": modified} if modified else {},
            )
        )
    return Prepared(items, failures)


def _dataverse_failure(template: Template, row: Row, exc: MappingError) -> Failure:
    row_id = row.get(template.dataverse.primary_id)
    return Failure(_raw_key(template, row, "dataverse"), {}, str(exc), "MappingError", str(row_id) if row_id else None)
