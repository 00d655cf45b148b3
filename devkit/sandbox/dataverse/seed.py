"""Rows every emulated organization starts with, under fixed GUIDs that tests and the demo rely on.

- The integration application user (the bearer token is this user), and two
  people: "Alex Agent" and "Sam Supervisor", reachable with the documented
  `CallerObjectId: <azureactivedirectoryobjectid>` impersonation header.
- Eight currencies; each id ends in the currency's ISO 4217 numeric code.
- The sdkmessages Create, Update, Delete, CreateMultiple, UpdateMultiple,
  UpsertMultiple, and one sdkmessagefilter per message and table (bulk messages
  only where the table supports them), with ids derived from the names.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

ORGANIZATION_ID = "6f1d5c2a-8b3e-4a71-9d20-5a7e3c9b1001"
BUSINESS_UNIT_ID = "6f1d5c2a-8b3e-4a71-9d20-5a7e3c9b1002"
ORGANIZATION_NAME = "loyaltysandbox"


@dataclass(frozen=True)
class SeedUser:
    """A systemuser the organization starts with."""

    systemuserid: str
    fullname: str
    azureactivedirectoryobjectid: str
    applicationid: str | None = None
    domainname: str | None = None


INTEGRATION_USER = SeedUser(
    systemuserid="a7c4f2d1-6b1e-4f0a-9c3d-000000000001",
    fullname="# loyaltysync integration",
    azureactivedirectoryobjectid="a7c4f2d1-6b1e-4f0a-9c3d-0000000000b1",
    applicationid="a7c4f2d1-6b1e-4f0a-9c3d-0000000000a1",
)
AGENT_USER = SeedUser(
    systemuserid="a7c4f2d1-6b1e-4f0a-9c3d-000000000002",
    fullname="Alex Agent",
    azureactivedirectoryobjectid="a7c4f2d1-6b1e-4f0a-9c3d-0000000000b2",
    domainname="alex.agent@contoso.example",
)
SUPERVISOR_USER = SeedUser(
    systemuserid="a7c4f2d1-6b1e-4f0a-9c3d-000000000003",
    fullname="Sam Supervisor",
    azureactivedirectoryobjectid="a7c4f2d1-6b1e-4f0a-9c3d-0000000000b3",
    domainname="sam.supervisor@contoso.example",
)
USERS = (INTEGRATION_USER, AGENT_USER, SUPERVISOR_USER)


@dataclass(frozen=True)
class SeedCurrency:
    """A transactioncurrency row."""

    transactioncurrencyid: str
    isocurrencycode: str
    currencyname: str
    currencysymbol: str
    exchangerate: float
    currencyprecision: int


def _currency(iso: str, numeric: int, name: str, symbol: str, rate: float, precision: int = 2) -> SeedCurrency:
    return SeedCurrency(f"ce1a0000-0000-4000-8000-000000000{numeric:03d}", iso, name, symbol, rate, precision)


CURRENCIES = (
    _currency("USD", 840, "US Dollar", "$", 1.0),
    _currency("EUR", 978, "Euro", "€", 0.92),
    _currency("GBP", 826, "Pound Sterling", "£", 0.79),
    _currency("JPY", 392, "Yen", "¥", 151.0, 0),
    _currency("CAD", 124, "Canadian Dollar", "CA$", 1.36),
    _currency("DKK", 208, "Danish Krone", "kr.", 6.87),
    _currency("CHF", 756, "Swiss Franc", "CHF", 0.88),
    _currency("SEK", 752, "Swedish Krona", "kr", 10.5),
)
CURRENCY_IDS = {c.isocurrencycode: c.transactioncurrencyid for c in CURRENCIES}

_NAMESPACE = uuid.UUID("6f1d5c2a-8b3e-4a71-9d20-5a7e3c9b10ff")


def message_id(name: str) -> str:
    """The fixed sdkmessageid of a message (Create, Update, ...)."""
    return str(uuid.uuid5(_NAMESPACE, f"sdkmessage:{name}"))


def filter_id(message: str, table: str) -> str:
    """The fixed sdkmessagefilterid of a message on a table."""
    return str(uuid.uuid5(_NAMESPACE, f"sdkmessagefilter:{message}:{table}"))
