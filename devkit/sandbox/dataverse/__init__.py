"""Dataverse Web API emulator (v9.2): tables, queries, `$batch`, bulk messages, metadata, webhooks, limits.

`create_app(token=...)` builds it; `seed` holds the fixed GUIDs of the seeded
users and currencies that tests and the demo use.
"""

from devkit.sandbox.dataverse.app import create_app
from devkit.sandbox.dataverse.org import Organization
from devkit.sandbox.dataverse.protection import CostModel, ServiceProtectionLimits
from devkit.sandbox.dataverse.seed import AGENT_USER, CURRENCY_IDS, INTEGRATION_USER, SUPERVISOR_USER

__all__ = [
    "AGENT_USER",
    "CURRENCY_IDS",
    "INTEGRATION_USER",
    "SUPERVISOR_USER",
    "CostModel",
    "Organization",
    "ServiceProtectionLimits",
    "create_app",
]
