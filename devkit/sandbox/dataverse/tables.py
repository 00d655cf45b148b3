"""The tables the emulated organization has: loyalty, currencies, users, and webhook registration.

Loyalty columns follow templates.md and the msdyn_ tables' metadata; the
registration tables (serviceendpoint, sdkmessage, sdkmessagefilter,
sdkmessageprocessingstep, sdkmessageprocessingstepimage) follow the entity
reference pages docs/wire-formats.md §1.11 cites. A template whose entity set is not
built in gets a table derived from its field list.
"""

from __future__ import annotations

from collections.abc import Iterable

from devkit.sandbox.dataverse.schema import (
    Column,
    TableDef,
    boolean,
    choice,
    decimal,
    integer,
    lookup,
    memo,
    string,
    table,
)
from loyaltysync.templates import FieldMap, Template

TENDER_TYPES = {
    806380000: "As card tender",
    806380001: "As contact tender",
    806380002: "No tender",
    806380003: "Blocked",
}
REWARD_POINT_TYPES = {192350000: "Quantity", 192350001: "Amount"}
TIME_UNITS = {806380000: "Day", 806380001: "Month", 806380002: "Year"}
CONTRACTS = {
    1: "OneWay",
    2: "Queue",
    3: "Rest",
    4: "TwoWay",
    5: "Topic",
    6: "Queue (Persistent)",
    7: "Event Hub",
    8: "Webhook",
    9: "Event Grid",
    10: "Managed Data Lake",
}
AUTH_TYPES = {
    1: "ACS",
    2: "SAS Key",
    3: "SAS Token",
    4: "Webhook Key",
    5: "Http Header",
    6: "Http Query String",
    7: "Connection String",
    8: "Access Key",
    9: "Managed Identity",
}
MESSAGE_FORMATS = {1: "Binary XML", 2: "Json", 3: "Text XML"}
STEP_MODES = {0: "Synchronous", 1: "Asynchronous"}
STEP_STAGES = {
    5: "Initial Pre-operation (For internal use only)",
    10: "Pre-validation",
    15: "Internal Pre-operation Before External Plugins (For internal use only)",
    20: "Pre-operation",
    25: "Internal Pre-operation After External Plugins (For internal use only)",
    30: "Main Operation (For internal use only)",
    35: "Internal Post-operation Before External Plugins (For internal use only)",
    40: "Post-operation",
    45: "Internal Post-operation After External Plugins (For internal use only)",
    50: "Post-operation (Deprecated)",
    55: "Final Post-operation (For internal use only)",
}
IMAGE_TYPES = {0: "PreImage", 1: "PostImage", 2: "Both"}
STEP_STATE = {0: "Enabled", 1: "Disabled"}
STEP_STATUS = {1: "Enabled", 2: "Disabled"}
BULK_MESSAGES = ("CreateMultiple", "UpdateMultiple", "UpsertMultiple")
MESSAGES = ("Create", "Update", "Delete", *BULK_MESSAGES)
# Collection-valued navigation properties: (table, name) -> (related table, its lookup column).
ONE_TO_MANY = {
    ("serviceendpoint", "serviceendpoint_sdkmessageprocessingstep"): ("sdkmessageprocessingstep", "eventhandler"),
    ("sdkmessageprocessingstep", "sdkmessageprocessingstepid_sdkmessageprocessingstepimage"): (
        "sdkmessageprocessingstepimage",
        "sdkmessageprocessingstepid",
    ),
}


def builtin_tables() -> list[TableDef]:
    """Every table the organization starts with, loyalty tables first."""
    return [
        table(
            "msdyn_loyaltycard",
            "msdyn_loyaltycards",
            [
                string("msdyn_cardnumber", 30, "Card number"),
                choice("msdyn_cardtendertype", TENDER_TYPES, "Card tender type"),
                string("msdyn_partynumber", 100, "Party number"),
                string("msdyn_replacementcardnumber", 30, "Replacement card number"),
                string("msdyn_operatingunitnumber", 100, "Operating unit number"),
                Column("msdyn_enrollmentdate", "DateTime", label="Enrollment date"),
                Column("msdyn_effectivedate", "DateTime", label="Effective date"),
            ],
            primary_name="msdyn_cardnumber",
            keys=[("msdyn_cardnumber",)],
            display_name="Loyalty card",
            bulk=True,
        ),
        table(
            "msdyn_loyaltylevel",
            "msdyn_loyaltylevels",
            [
                string("msdyn_levelphrase", 100, "Level phrase"),
                string("msdyn_description", 2000, "Description"),
            ],
            primary_name="msdyn_levelphrase",
            keys=[("msdyn_levelphrase",)],
            display_name="Loyalty level",
            bulk=True,
        ),
        table(
            "msdyn_loyaltyrewardpoint",
            "msdyn_loyaltyrewardpoints",
            [
                string("msdyn_rewardpointid", 100, "Reward point ID"),
                choice("msdyn_rewardpointtype", REWARD_POINT_TYPES, "Reward point type"),
                boolean("msdyn_redeemable"),
                integer("msdyn_redeemranking"),
                lookup("msdyn_rewardpointcurrency", "transactioncurrency"),
                decimal("msdyn_maximumloyaltyrewardpoints", 2),
                choice("msdyn_expirationtimeunit", TIME_UNITS, "Expiration time unit"),
                integer("msdyn_expirationtimevalue"),
                choice("msdyn_vestingtimeunit", TIME_UNITS, "Vesting time unit"),
                integer("msdyn_vestingtimevalue"),
            ],
            primary_name="msdyn_rewardpointid",
            keys=[("msdyn_rewardpointid",)],
            display_name="Loyalty reward point",
            bulk=True,
        ),
        table(
            "transactioncurrency",
            "transactioncurrencies",
            [
                string("isocurrencycode", 5, "Currency Code"),
                string("currencyname", 100, "Currency Name"),
                string("currencysymbol", 10, "Currency Symbol"),
                decimal("exchangerate", 10),
                integer("currencyprecision", 0, 4),
            ],
            primary_name="currencyname",
            keys=[("isocurrencycode",)],
            display_name="Currency",
        ),
        table(
            "systemuser",
            "systemusers",
            [
                string("fullname", 200, "Full Name"),
                string("firstname", 64),
                string("lastname", 64),
                string("domainname", 1024, "User Name"),
                string("internalemailaddress", 100, "Primary Email"),
                Column("applicationid", "Uniqueidentifier"),
                Column("azureactivedirectoryobjectid", "Uniqueidentifier"),
                boolean("isdisabled", "Disabled", "Enabled"),
                choice(
                    "accessmode",
                    {
                        0: "Read-Write",
                        1: "Administrative",
                        2: "Read",
                        3: "Support User",
                        4: "Non-interactive",
                        5: "Delegated Admin",
                    },
                ),
            ],
            primary_name="fullname",
            display_name="User",
        ),
        table(
            "serviceendpoint",
            "serviceendpoints",
            [
                string("name", 256, "Name"),
                string("url", 2000, "Url"),
                choice("contract", CONTRACTS),
                choice("authtype", AUTH_TYPES),
                Column("authvalue", "String", max_length=2048, readable=False),
                choice("messageformat", MESSAGE_FORMATS),
                choice("userclaim", {1: "None", 2: "UserId", 3: "UserInfo"}),
                choice("connectionmode", {1: "Normal", 2: "Federated"}),
                string("namespaceaddress", 255),
                string("path", 160),
                string("solutionnamespace", 160),
                memo("description", 2000),
            ],
            primary_name="name",
            display_name="Service Endpoint",
        ),
        table(
            "sdkmessage", "sdkmessages", [string("name", 256, "Name")], primary_name="name", display_name="Sdk Message"
        ),
        table(
            "sdkmessagefilter",
            "sdkmessagefilters",
            [
                lookup("sdkmessageid", "sdkmessage"),
                string("primaryobjecttypecode", 100),
                string("secondaryobjecttypecode", 100),
                boolean("iscustomprocessingstepallowed"),
            ],
            primary_name=None,
            display_name="Sdk Message Filter",
        ),
        table(
            "sdkmessageprocessingstep",
            "sdkmessageprocessingsteps",
            [
                string("name", 256, "Name"),
                string("description", 256),
                choice("mode", STEP_MODES),
                choice("stage", STEP_STAGES),
                integer("rank"),
                choice("supporteddeployment", {0: "Server Only", 1: "Client Only", 2: "Both"}),
                boolean("asyncautodelete"),
                memo("filteringattributes", 100_000),
                memo("configuration", 1_073_741_823),
                lookup("sdkmessageid", "sdkmessage"),
                lookup("sdkmessagefilterid", "sdkmessagefilter"),
                lookup("eventhandler", "serviceendpoint", "eventhandler_serviceendpoint"),
            ],
            primary_name="name",
            display_name="Sdk Message Processing Step",
            state=STEP_STATE,
            status=STEP_STATUS,
        ),
        table(
            "sdkmessageprocessingstepimage",
            "sdkmessageprocessingstepimages",
            [
                string("name", 256, "Name"),
                string("entityalias", 256),
                choice("imagetype", IMAGE_TYPES),
                string("messagepropertyname", 256),
                memo("attributes", 100_000),
                string("description", 256),
                lookup("sdkmessageprocessingstepid", "sdkmessageprocessingstep"),
            ],
            primary_name="name",
            display_name="Sdk Message Processing Step Image",
        ),
    ]


def _column_for(f: FieldMap) -> Column:
    """The Dataverse column a template field describes (lookups handled by the caller)."""
    name = f.dataverse or ""
    if f.type == "string":
        return string(name, f.max_length or 4000)
    if f.type == "integer":
        return integer(name)
    if f.type == "decimal":
        return decimal(name, 10)
    if f.type == "boolean":
        return boolean(name)
    if f.type in ("datetime", "date"):
        return Column(name, "DateTime")
    targets = list((f.value_map or {}).values())
    if targets and all(isinstance(v, bool) for v in targets):
        return boolean(name)
    if targets and all(isinstance(v, int) for v in targets):
        labels = {v: k for k, v in (f.value_map or {}).items() if isinstance(v, int)}
        return choice(name, labels)
    return string(name, 4000)


def tables_for_templates(templates: Iterable[Template], known: set[str]) -> list[TableDef]:
    """Tables for templates whose Dataverse entity set is not in `known`, plus unknown lookup targets."""
    made: list[TableDef] = []
    for template in templates:
        dv = template.dataverse
        if dv.entity_set in known:
            continue
        columns: list[Column] = []
        for f in template.all_fields:
            if not f.dataverse:
                continue
            if f.lookup is not None:
                lk = f.lookup
                columns.append(lookup(f.dataverse, lk.table, lk.navigation_property or f.dataverse))
                if lk.entity_set not in known:
                    target = table(
                        lk.table,
                        lk.entity_set,
                        [string(lk.key_column, 100)],
                        primary_name=lk.key_column,
                        keys=[(lk.key_column,)],
                    )
                    _rename_primary(target, lk.id_column)
                    made.append(target)
                    known.add(lk.entity_set)
            else:
                columns.append(_column_for(f))
        key_strings = [c.name for c in columns if c.name in dv.alternate_key and c.type == "String"]
        made_table = table(
            dv.table,
            dv.entity_set,
            columns,
            primary_name=key_strings[0] if key_strings else None,
            keys=[tuple(dv.alternate_key)],
            display_name=template.name,
            bulk=True,
        )
        _rename_primary(made_table, dv.primary_id)
        made.append(made_table)
        known.add(dv.entity_set)
    return made


def _rename_primary(definition: TableDef, primary_id: str) -> None:
    """Give a derived table the primary id column name its template declares."""
    if definition.primary_id == primary_id:
        return
    old = definition.primary_id
    definition.columns = {
        (primary_id if name == old else name): (Column(primary_id, "Uniqueidentifier") if name == old else col)
        for name, col in definition.columns.items()
    }
    definition.primary_id = primary_id
    definition.__post_init__()
