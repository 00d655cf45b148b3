"""The emulated organization: table definitions, their stored rows, the version counter, seeded rows.

`app.state.dataverse` is an `Organization`. Tests and the demo read rows through
`org.tables[<logical name>]` (`devkit.sandbox.store.Table`) or `org.row()`.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from devkit.sandbox.dataverse import seed
from devkit.sandbox.dataverse.errors import segment_not_found
from devkit.sandbox.dataverse.schema import TableDef
from devkit.sandbox.dataverse.tables import BULK_MESSAGES, MESSAGES, builtin_tables, tables_for_templates
from devkit.sandbox.dataverse.values import utc_now
from devkit.sandbox.store import Store, Table
from loyaltysync.templates import Template

API_PATH = "/api/data/v9.2"
REGISTRATION_TABLES = frozenset(
    {"serviceendpoint", "sdkmessage", "sdkmessagefilter", "sdkmessageprocessingstep", "sdkmessageprocessingstepimage"}
)
OBJECT_ID_KEY = "azureactivedirectoryobjectid"


class Organization:
    """Everything the Dataverse emulator stores, independent of HTTP."""

    def __init__(
        self,
        *,
        public_url: str = "http://localhost",
        templates: Iterable[Template] = (),
        now: Callable[[], str] = utc_now,
        new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
    ) -> None:
        """`now` gives the time writes stamp (stored form, `values.utc_now` by default) and `new_id` the ids
        of new rows (random GUIDs by default); the deterministic simulator passes its own."""
        self.now = now
        self.new_id = new_id
        self.public_url = public_url.rstrip("/")
        self.base_url = self.public_url + API_PATH
        self.store = Store()
        self.defs: dict[str, TableDef] = {}
        self.by_set: dict[str, TableDef] = {}
        self.tables: dict[str, Table] = {}
        self._versions = itertools.count(1_000_001)
        # Bumped on every write to a registration table so cached webhook routes are rebuilt.
        self.registration_version = 0
        definitions = builtin_tables()
        known = {d.entity_set for d in definitions}
        definitions += tables_for_templates(templates, known)
        for definition in definitions:
            self.add_table(definition)
        self._seed()

    # -- tables -------------------------------------------------------------------------------

    def add_table(self, definition: TableDef) -> Table:
        """Create the stored table for a definition (alternate keys become unique indexes)."""
        unique = [key.columns for key in definition.keys]
        if definition.logical_name == "systemuser":
            unique.append((OBJECT_ID_KEY,))
        stored = Table(
            definition.logical_name,
            definition.column_names,
            key_columns=[definition.primary_id],
            unique_keys=unique,
            casefold_keys=True,
        )
        self.store.add(stored)
        self.defs[definition.logical_name] = definition
        self.by_set[definition.entity_set] = definition
        self.tables[definition.logical_name] = stored
        return stored

    def table_def(self, entity_set: str) -> TableDef:
        """The table behind an entity set; 404 0x8006088a when there is none (names are case-sensitive)."""
        definition = self.by_set.get(entity_set)
        if definition is None:
            raise segment_not_found(entity_set)
        return definition

    def next_version(self) -> int:
        """The next row version; one counter for the whole organization, as SQL rowversion is."""
        return next(self._versions)

    # -- rows ----------------------------------------------------------------------------------

    def row(self, logical_name: str, row_id: str) -> dict[str, Any] | None:
        """A stored row by id, or None."""
        return self.tables[logical_name].get(row_id)

    def primary_name(self, logical_name: str, row_id: str | None) -> str | None:
        """The primary-name value of a row (the `Name` of an EntityReference), or None."""
        definition = self.defs.get(logical_name)
        if row_id is None or definition is None or definition.primary_name is None:
            return None
        row = self.tables[logical_name].get(row_id)
        return None if row is None else row.get(definition.primary_name)

    def system_values(self, user_id: str, on_behalf_of: str | None, *, creating: bool) -> dict[str, Any]:
        """The platform columns a write sets: timestamps, users, version."""
        now = self.now()
        values: dict[str, Any] = {
            "modifiedon": now,
            "modifiedby": user_id,
            "modifiedonbehalfby": on_behalf_of,
            "versionnumber": self.next_version(),
        }
        if creating:
            values.update(createdon=now, createdby=user_id, createdonbehalfby=on_behalf_of, statecode=0, statuscode=1)
        return values

    def seed_row(self, logical_name: str, values: Mapping[str, Any], user_id: str | None = None) -> dict[str, Any]:
        """Insert a row directly (no webhooks, no protection), filling the platform columns."""
        definition = self.defs[logical_name]
        row = {**self.system_values(user_id or seed.INTEGRATION_USER.systemuserid, None, creating=True), **values}
        row.setdefault(definition.primary_id, self.new_id())
        return self.tables[logical_name].insert(row)

    def user_by_object_id(self, object_id: str) -> dict[str, Any] | None:
        """The systemuser with this Entra object id, or None."""
        return self.tables["systemuser"].find(OBJECT_ID_KEY, (object_id,))

    def _seed(self) -> None:
        for user in seed.USERS:
            self.seed_row(
                "systemuser",
                {
                    "systemuserid": user.systemuserid,
                    "fullname": user.fullname,
                    "azureactivedirectoryobjectid": user.azureactivedirectoryobjectid,
                    "applicationid": user.applicationid,
                    "domainname": user.domainname,
                    "firstname": user.fullname.split()[0] if user.applicationid is None else None,
                    "lastname": user.fullname.split()[-1] if user.applicationid is None else user.fullname,
                    "isdisabled": False,
                    "accessmode": 4 if user.applicationid else 0,
                },
            )
        for currency in seed.CURRENCIES:
            self.seed_row(
                "transactioncurrency",
                {
                    "transactioncurrencyid": currency.transactioncurrencyid,
                    "isocurrencycode": currency.isocurrencycode,
                    "currencyname": currency.currencyname,
                    "currencysymbol": currency.currencysymbol,
                    "exchangerate": currency.exchangerate,
                    "currencyprecision": currency.currencyprecision,
                },
            )
        for message in MESSAGES:
            self.seed_row("sdkmessage", {"sdkmessageid": seed.message_id(message), "name": message})
        for definition in list(self.defs.values()):
            self.add_message_filters(definition)

    def add_message_filters(self, definition: TableDef) -> None:
        """sdkmessagefilter rows for a table: Create/Update/Delete, and the bulk messages where supported."""
        for message in MESSAGES:
            if message in BULK_MESSAGES and not definition.bulk:
                continue
            self.seed_row(
                "sdkmessagefilter",
                {
                    "sdkmessagefilterid": seed.filter_id(message, definition.logical_name),
                    "sdkmessageid": seed.message_id(message),
                    "primaryobjecttypecode": definition.logical_name,
                    "secondaryobjecttypecode": "none",
                    "iscustomprocessingstepallowed": True,
                },
            )
