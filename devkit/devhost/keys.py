"""Function keys and their check, as the host enforces `authLevel` on HTTP triggers.

The dev host has one function (host) key and one admin (master) key. FUNCTION
level accepts either; ADMIN only the master key; ANONYMOUS needs none. The key
comes from the `x-functions-key` header, else the `code` query parameter.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

FUNCTION_KEY_SETTING = "DEV_FUNCTION_KEY"
ADMIN_KEY_SETTING = "DEV_ADMIN_KEY"
KEY_HEADER = "x-functions-key"
KEY_QUERY = "code"


@dataclass(frozen=True)
class HostKeys:
    """The keys in force and whether each was generated (and so may be shown) or loaded from settings."""

    function_key: str
    admin_key: str
    function_key_generated: bool
    admin_key_generated: bool


def load_keys(environ: Mapping[str, str], *, function_key: str | None = None, admin_key: str | None = None) -> HostKeys:
    """Keys from the arguments, else the settings DEV_FUNCTION_KEY / DEV_ADMIN_KEY, else freshly generated."""
    function_value = function_key or environ.get(FUNCTION_KEY_SETTING) or None
    admin_value = admin_key or environ.get(ADMIN_KEY_SETTING) or None
    return HostKeys(
        function_key=function_value or secrets.token_urlsafe(32),
        admin_key=admin_value or secrets.token_urlsafe(32),
        function_key_generated=function_value is None,
        admin_key_generated=admin_value is None,
    )


def presented_key(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """The key a request carries: the `x-functions-key` header wins over `?code=`."""
    return headers.get(KEY_HEADER) or query.get(KEY_QUERY) or None


def authorized(auth_level: str, presented: str | None, keys: HostKeys) -> bool:
    """True when `presented` satisfies `auth_level` (ANONYMOUS, FUNCTION or ADMIN)."""
    level = auth_level.upper()
    if level == "ANONYMOUS":
        return True
    if presented is None:
        return False
    if _same(presented, keys.admin_key):
        return True
    return level == "FUNCTION" and _same(presented, keys.function_key)


def _same(presented: str, key: str) -> bool:
    # Constant-time: a webhook endpoint is exactly where key guessing happens.
    return hmac.compare_digest(presented.encode(), key.encode())
