"""Storage connection strings: Azurite's development account and the `UseDevelopmentStorage=true` shorthand.

The product needs only this part of Azurite's facts (to expand the shorthand that
`local.settings.json` uses); starting Azurite is the dev kit's job (`devkit/azurite.py`).
The account name and key below are Azurite's documented development account (public, not a secret).
"""

from __future__ import annotations

ACCOUNT_NAME = "devstoreaccount1"
# Azurite's well-known development key, published in its README and the Azure docs.
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
DEFAULT_PORTS = (10000, 10001, 10002)
LOOPBACK = "127.0.0.1"


def development_connection_string(
    blob_port: int = DEFAULT_PORTS[0],
    queue_port: int = DEFAULT_PORTS[1],
    table_port: int = DEFAULT_PORTS[2],
    host: str = LOOPBACK,
) -> str:
    """The full connection string of the Azurite development account on the given ports."""
    return (
        "DefaultEndpointsProtocol=http;"
        f"AccountName={ACCOUNT_NAME};"
        f"AccountKey={ACCOUNT_KEY};"
        f"BlobEndpoint=http://{host}:{blob_port}/{ACCOUNT_NAME};"
        f"QueueEndpoint=http://{host}:{queue_port}/{ACCOUNT_NAME};"
        f"TableEndpoint=http://{host}:{table_port}/{ACCOUNT_NAME};"
    )


def expand_connection_string(value: str) -> str:
    """Turn `UseDevelopmentStorage=true` into the full Azurite connection string.

    The Azure SDK clients for tables do not understand the shorthand that
    `local.settings.json` uses; any other connection string is returned unchanged.
    """
    parts = {}
    for part in value.split(";"):
        name, sep, setting = part.partition("=")
        if sep:
            parts[name.strip().lower()] = setting.strip()
    if parts.get("usedevelopmentstorage", "").lower() == "true":
        return development_connection_string()
    return value
