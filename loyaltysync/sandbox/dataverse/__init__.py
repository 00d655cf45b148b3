"""Dataverse Web API emulator (v9.2): tables, queries, `$batch`, bulk messages, metadata, webhooks, limits.

`create_app(token=...)` builds it; `seed` holds the fixed GUIDs of the seeded
users and currencies that tests and the demo use.
"""

from loyaltysync.sandbox.dataverse.app import create_app
from loyaltysync.sandbox.dataverse.org import Organization
from loyaltysync.sandbox.dataverse.protection import CostModel, ServiceProtectionLimits
from loyaltysync.sandbox.dataverse.seed import AGENT_USER, CURRENCY_IDS, INTEGRATION_USER, SUPERVISOR_USER

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
