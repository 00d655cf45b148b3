"""Settings from the environment (Azure app settings, or `local.settings.json` Values locally).

Every setting is documented in docs/configuration.md and listed in `local.settings.sample.json`.
A missing or malformed one stops start-up with a `ConfigError` naming it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from loyaltysync.errors import ConfigError
from loyaltysync.templates import default_mappings_dir

CredentialKind = Literal["default", "client-secret", "managed-identity", "cli"]


def _root_url(value: str, setting: str) -> str:
    parts = urlsplit(value.strip())
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise ValueError(
            f"must be an absolute http(s) URL such as https://contoso.operations.dynamics.com, got {value!r}"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"must be the environment root URL without a path (the clients add {setting}), got {value!r}")
    return f"{parts.scheme}://{parts.netloc}"


@dataclass(frozen=True, slots=True)
class StorageEndpoints:
    """Where the queues and tables are when the app reaches storage with its identity (no keys)."""

    table: str
    queue: str
    managed_identity: bool = False  # `__credential=managedidentity`: only the managed identity, not the dev tools
    client_id: str | None = None  # `__clientId`: a user-assigned identity


class Settings(BaseSettings):
    """Everything the app reads from its environment."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    fno_url: str = Field(validation_alias="FNO_URL")
    dataverse_url: str = Field(validation_alias="DATAVERSE_URL")
    storage: str = Field(
        default="UseDevelopmentStorage=true",
        validation_alias=AliasChoices("AzureWebJobsStorage", "AZUREWEBJOBSSTORAGE"),
    )
    credential: CredentialKind = Field(default="default", validation_alias="LOYALTYSYNC_CREDENTIAL")
    tenant_id: str | None = Field(default=None, validation_alias="AZURE_TENANT_ID")
    client_id: str | None = Field(default=None, validation_alias="AZURE_CLIENT_ID")
    client_secret: str | None = Field(default=None, validation_alias="AZURE_CLIENT_SECRET", repr=False)
    sandbox_token: str | None = Field(default=None, validation_alias="LOYALTYSYNC_SANDBOX_TOKEN", repr=False)
    integration_user_ids: str = Field(default="", validation_alias="INTEGRATION_USER_IDS")
    mappings_dir: Path = Field(default_factory=default_mappings_dir, validation_alias="MAPPINGS_DIR")
    queue_prefix: str = Field(
        default="loyaltysync", validation_alias="QUEUE_PREFIX", pattern=r"^[a-z0-9][a-z0-9-]{1,20}$"
    )
    state_table: str = Field(
        default="loyaltysyncstate", validation_alias="STATE_TABLE", pattern=r"^[A-Za-z][A-Za-z0-9]{2,62}$"
    )
    deadletter_table: str = Field(
        default="loyaltysyncdeadletters", validation_alias="DEADLETTER_TABLE", pattern=r"^[A-Za-z][A-Za-z0-9]{2,62}$"
    )
    control_table: str = Field(
        default="loyaltysynccontrol", validation_alias="CONTROL_TABLE", pattern=r"^[A-Za-z][A-Za-z0-9]{2,62}$"
    )
    reconcile_schedule: str = Field(default="0 */15 * * * *", validation_alias="RECONCILE_SCHEDULE")
    max_body_bytes: int = Field(default=1_048_576, ge=1024, le=104_857_600, validation_alias="MAX_BODY_BYTES")
    webhook_secret: str | None = Field(default=None, validation_alias="WEBHOOK_SHARED_SECRET", repr=False)
    webhook_secret_header: str = Field(default="x-loyaltysync-secret", validation_alias="WEBHOOK_SECRET_HEADER")
    dataverse_max_concurrency: int = Field(default=52, ge=1, le=52, validation_alias="DATAVERSE_MAX_CONCURRENCY")
    fno_max_concurrency: int = Field(default=16, ge=1, le=256, validation_alias="FNO_MAX_CONCURRENCY")
    http_timeout_seconds: float = Field(default=30.0, gt=0, le=230, validation_alias="HTTP_TIMEOUT_SECONDS")
    pause_recheck_seconds: int = Field(default=30, ge=1, le=3600, validation_alias="PAUSE_RECHECK_SECONDS")
    pause_cache_seconds: float = Field(default=5.0, ge=0, le=300, validation_alias="PAUSE_CACHE_SECONDS")
    last_success_write_seconds: float = Field(
        default=5.0, ge=0, le=3600, validation_alias="LAST_SUCCESS_WRITE_SECONDS"
    )
    conflict_grace_seconds: int = Field(default=30, ge=1, le=3600, validation_alias="CONFLICT_GRACE_SECONDS")
    # host.json's functionTimeout, overridden as the host allows: the engine's horizon for another instance's
    # intent (loyaltysync/host_limits.py). Set it only to change the host's timeout itself.
    function_timeout_override: str | None = Field(
        default=None, validation_alias="AzureFunctionsJobHost__functionTimeout"
    )
    # The queue extension's message lease (10 minutes in Azure, not configurable there): a message held by an
    # instance that died comes back only after it, so a wait for an event that may be held so waits this long.
    queue_lease_seconds: int = Field(default=600, ge=1, le=3600, validation_alias="QUEUE_LEASE_SECONDS")
    # Transient failures (docs/retries.md): back-off from RETRY_BASE_SECONDS doubling to RETRY_MAX_SECONDS,
    # parked only once RETRY_BUDGET_SECONDS have passed since the first failure. 604800 s is the queue's limit.
    retry_base_seconds: int = Field(default=5, ge=1, le=604_800, validation_alias="RETRY_BASE_SECONDS")
    retry_max_seconds: int = Field(default=300, ge=1, le=604_800, validation_alias="RETRY_MAX_SECONDS")
    retry_budget_seconds: int = Field(default=3600, ge=0, le=604_800, validation_alias="RETRY_BUDGET_SECONDS")
    servicebus_queue: str | None = Field(default=None, validation_alias="SERVICEBUS_QUEUE")
    eventgrid_enabled: bool = Field(default=False, validation_alias="EVENTGRID_ENABLED")
    redact_personal_data: bool = Field(default=True, validation_alias="REDACT_PERSONAL_DATA")
    # Identity-based storage (no connection string): the Functions host reads the same settings.
    storage_account_name: str | None = Field(
        default=None,
        validation_alias=AliasChoices("AzureWebJobsStorage__accountName", "AZUREWEBJOBSSTORAGE__ACCOUNTNAME"),
    )
    storage_table_uri: str | None = Field(
        default=None,
        validation_alias=AliasChoices("AzureWebJobsStorage__tableServiceUri", "AZUREWEBJOBSSTORAGE__TABLESERVICEURI"),
    )
    storage_queue_uri: str | None = Field(
        default=None,
        validation_alias=AliasChoices("AzureWebJobsStorage__queueServiceUri", "AZUREWEBJOBSSTORAGE__QUEUESERVICEURI"),
    )
    storage_credential: str | None = Field(
        default=None,
        validation_alias=AliasChoices("AzureWebJobsStorage__credential", "AZUREWEBJOBSSTORAGE__CREDENTIAL"),
    )
    storage_client_id: str | None = Field(
        default=None,
        validation_alias=AliasChoices("AzureWebJobsStorage__clientId", "AZUREWEBJOBSSTORAGE__CLIENTID"),
    )
    # Telemetry (docs/monitoring.md).
    appinsights_connection_string: str | None = Field(
        default=None, validation_alias="APPLICATIONINSIGHTS_CONNECTION_STRING", repr=False
    )
    # `Authorization=AAD[;ClientId=<user-assigned identity>]`: ingestion with Microsoft Entra ID (docs/monitoring.md).
    appinsights_authentication_string: str | None = Field(
        default=None, validation_alias="APPLICATIONINSIGHTS_AUTHENTICATION_STRING"
    )
    worker_telemetry: bool = Field(default=False, validation_alias="PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY")
    telemetry_logger_name: str = Field(default="loyaltysync", validation_alias="PYTHON_APPLICATIONINSIGHTS_LOGGER_NAME")
    telemetry_console: bool = Field(default=False, validation_alias="TELEMETRY_CONSOLE")
    telemetry_hash_salt: str | None = Field(default=None, validation_alias="TELEMETRY_HASH_SALT", repr=False)
    monitor_schedule: str = Field(default="0 * * * * *", validation_alias="MONITOR_SCHEDULE")
    preflight_on_start: bool = Field(default=True, validation_alias="PREFLIGHT_ON_START")

    @field_validator("fno_url")
    @classmethod
    def _fno(cls, value: str) -> str:
        return _root_url(value, "/data/")

    @field_validator("dataverse_url")
    @classmethod
    def _dataverse(cls, value: str) -> str:
        return _root_url(value, "/api/data/v9.2/")

    @field_validator("appinsights_authentication_string")
    @classmethod
    def _authentication_string(cls, value: str | None) -> str | None:
        # As strict as the Azure Monitor exporter reads it (`;`-separated `key=value`, keys in any case, the value
        # `AAD` exactly, no spaces): what it cannot parse it ignores, and ingestion then silently falls back to keys.
        if value is None or not value:
            return None
        parts: dict[str, str] = {}
        for part in value.split(";"):
            name, equals, given = part.partition("=")
            if not equals or name.lower() not in ("authorization", "clientid") or not given or part != part.strip() \
                    or "=" in given or " " in part:
                raise ValueError(f"must be 'Authorization=AAD' or 'Authorization=AAD;ClientId=<id>', got {value!r}")
            parts[name.lower()] = given
        if parts.get("authorization") != "AAD":
            raise ValueError(f"must contain Authorization=AAD (in capitals, the only kind there is), got {value!r}")
        return value

    @field_validator("reconcile_schedule", "monitor_schedule")
    @classmethod
    def _ncrontab(cls, value: str) -> str:
        if len(value.split()) != 6 and not (value.startswith("%") and value.endswith("%")):
            raise ValueError("must be a 6-field NCRONTAB expression such as '0 */15 * * * *'")
        return value

    @property
    def sandbox_mode(self) -> bool:
        """True when the clients use the sandbox's static bearer token instead of azure-identity."""
        return bool(self.sandbox_token)

    @property
    def integration_users(self) -> frozenset[str]:
        """Ids (Dataverse systemuserid, Entra object id) whose changes are our own writes."""
        return frozenset(
            part.strip().strip("{}").lower() for part in self.integration_user_ids.split(",") if part.strip()
        )

    @property
    def storage_endpoints(self) -> StorageEndpoints | None:
        """Table and queue endpoints of identity-based storage, or None when `AzureWebJobsStorage` is used.

        As the Functions host reads them: explicit `__tableServiceUri` / `__queueServiceUri` win,
        `__accountName` gives the public-cloud defaults. A connection string, when set, is used instead.
        """
        if "storage" in self.model_fields_set:
            return None
        account = (self.storage_account_name or "").strip()
        table = self.storage_table_uri or (f"https://{account}.table.core.windows.net" if account else None)
        queue = self.storage_queue_uri or (f"https://{account}.queue.core.windows.net" if account else None)
        if table is None and queue is None:
            return None
        if table is None or queue is None:
            missing = "__tableServiceUri" if table is None else "__queueServiceUri"
            raise ConfigError(
                f"AzureWebJobsStorage{missing}",
                "identity-based storage needs both the table and the queue endpoint (or __accountName)",
            )
        managed = (self.storage_credential or "").strip().lower() == "managedidentity"
        return StorageEndpoints(
            table=table.rstrip("/"), queue=queue.rstrip("/"), managed_identity=managed, client_id=self.storage_client_id
        )

    def queue_name(self, template: str) -> str:
        """The Storage queue of one template (lower case, hyphens, at most 63 characters)."""
        return f"{self.queue_prefix}-{template}"[:63]


def load_local_settings(path: Path = Path("local.settings.json"), environ: dict[str, str] | None = None) -> None:
    """Copy `Values` of local.settings.json into the environment where not already set (as `func start` does)."""
    target = os.environ if environ is None else environ
    if not path.is_file():
        return
    try:
        values = json.loads(path.read_text(encoding="utf-8")).get("Values", {})
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ConfigError(str(path), f"not valid JSON with a 'Values' object: {exc}") from exc
    for name, value in values.items():
        if isinstance(value, str):
            target.setdefault(name, value)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate settings; a problem raises ConfigError naming the setting."""
    source = dict(os.environ if environ is None else environ)
    try:
        return Settings.model_validate(source)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = first["loc"][0] if first["loc"] else "settings"
        alias = _alias_of(str(loc))
        problem = (
            "is required but not set" if first["type"] == "missing" else first["msg"].removeprefix("Value error, ")
        )
        raise ConfigError(alias, problem) from exc


def _alias_of(name: str) -> str:
    field = Settings.model_fields.get(name)
    if field is None:
        return name
    alias = field.validation_alias
    if isinstance(alias, str):
        return alias
    if isinstance(alias, AliasChoices):
        first = alias.choices[0]
        return first if isinstance(first, str) else name
    return name
