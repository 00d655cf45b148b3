"""Clients of the two systems kept in step: Dataverse (Web API) and F&O (OData).

One composable piece per concern: `auth` (credential, scope, cached bearer
token), `http` (the shared pipeline: retry, concurrency cap, error
translation, observers), `redaction` (secrets out of logs), `odata` (URL
syntax), `batch` ($batch encode/decode), then the two clients and the lookup
cache built on them. The same code runs against Azure, the emulators over
TCP, and in-process ASGI apps (pass `transport=httpx.ASGITransport(app)`).
"""

from loyaltysync.targets.auth import BearerToken, StaticTokenCredential, build_credential, scope_for
from loyaltysync.targets.batch import BatchRequest, BatchResult, ChangeSet
from loyaltysync.targets.dataverse import DataverseClient
from loyaltysync.targets.fno import FnoClient
from loyaltysync.targets.http import Attempt, RetryPolicy, TargetHttp
from loyaltysync.targets.lookups import LookupCache, LookupNotPrepared

__all__ = [
    "Attempt",
    "BatchRequest",
    "BatchResult",
    "BearerToken",
    "ChangeSet",
    "DataverseClient",
    "FnoClient",
    "LookupCache",
    "LookupNotPrepared",
    "RetryPolicy",
    "StaticTokenCredential",
    "TargetHttp",
    "build_credential",
    "scope_for",
]
