"""Settings: every problem stops start-up naming the setting; values are normalized."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loyaltysync.errors import ConfigError
from loyaltysync.settings import load_local_settings, load_settings

BASE = {"FNO_URL": "https://contoso.operations.dynamics.com", "DATAVERSE_URL": "https://contoso.crm.dynamics.com"}


def test_defaults_and_root_urls() -> None:
    settings = load_settings({**BASE, "FNO_URL": "https://contoso.operations.dynamics.com/"})
    assert settings.fno_url == "https://contoso.operations.dynamics.com"
    assert settings.dataverse_url == "https://contoso.crm.dynamics.com"
    assert settings.storage == "UseDevelopmentStorage=true"
    assert settings.credential == "default"
    assert settings.queue_name("loyalty-cards") == "loyaltysync-loyalty-cards"
    assert settings.max_body_bytes == 1_048_576
    assert not settings.sandbox_mode


@pytest.mark.parametrize(
    ("environ", "setting", "fragment"),
    [
        ({"DATAVERSE_URL": BASE["DATAVERSE_URL"]}, "FNO_URL", "required"),
        ({"FNO_URL": BASE["FNO_URL"]}, "DATAVERSE_URL", "required"),
        ({**BASE, "FNO_URL": "contoso.operations.dynamics.com"}, "FNO_URL", "absolute http(s) URL"),
        ({**BASE, "FNO_URL": "https://contoso.operations.dynamics.com/data/"}, "FNO_URL", "/data/"),
        ({**BASE, "DATAVERSE_URL": "https://x.crm.dynamics.com/api/data/v9.2/"}, "DATAVERSE_URL", "/api/data/v9.2/"),
        ({**BASE, "LOYALTYSYNC_CREDENTIAL": "password"}, "LOYALTYSYNC_CREDENTIAL", "client-secret"),
        ({**BASE, "MAX_BODY_BYTES": "12"}, "MAX_BODY_BYTES", "1024"),
        ({**BASE, "MAX_BODY_BYTES": "lots"}, "MAX_BODY_BYTES", "integer"),
        ({**BASE, "DATAVERSE_MAX_CONCURRENCY": "60"}, "DATAVERSE_MAX_CONCURRENCY", "52"),
        ({**BASE, "RECONCILE_SCHEDULE": "*/5 * * * *"}, "RECONCILE_SCHEDULE", "6-field"),
        ({**BASE, "QUEUE_PREFIX": "Bad_Prefix"}, "QUEUE_PREFIX", "pattern"),
        ({**BASE, "STATE_TABLE": "no-dashes"}, "STATE_TABLE", "pattern"),
        # The exporter ignores what it cannot parse (ingestion then silently tries keys): refused at start-up.
        ({**BASE, "APPLICATIONINSIGHTS_AUTHENTICATION_STRING": "ClientId=abc"},
         "APPLICATIONINSIGHTS_AUTHENTICATION_STRING", "Authorization=AAD"),
        ({**BASE, "APPLICATIONINSIGHTS_AUTHENTICATION_STRING": "Authorization=aad"},
         "APPLICATIONINSIGHTS_AUTHENTICATION_STRING", "capitals"),
        ({**BASE, "APPLICATIONINSIGHTS_AUTHENTICATION_STRING": "Authorization=AAD; ClientId=abc"},
         "APPLICATIONINSIGHTS_AUTHENTICATION_STRING", "must be"),
        ({**BASE, "APPLICATIONINSIGHTS_AUTHENTICATION_STRING": "Authorization=AAD;"},
         "APPLICATIONINSIGHTS_AUTHENTICATION_STRING", "must be"),
    ],
)
def test_a_bad_setting_is_named(environ: dict[str, str], setting: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ)
    assert caught.value.setting == setting
    assert fragment in caught.value.problem
    assert str(caught.value).startswith(f"setting {setting}:")


def test_entra_ingestion_settings_in_the_forms_the_host_documents() -> None:
    name = "APPLICATIONINSIGHTS_AUTHENTICATION_STRING"
    for value in ("Authorization=AAD", "Authorization=AAD;ClientId=1111-2222", "ClientId=1111-2222;authorization=AAD"):
        assert load_settings({**BASE, name: value}).appinsights_authentication_string == value
    assert load_settings({**BASE, name: ""}).appinsights_authentication_string is None


def test_integration_users_are_normalized() -> None:
    settings = load_settings({**BASE, "INTEGRATION_USER_IDS": " {ABC-1}, def-2 ,, "})
    assert settings.integration_users == frozenset({"abc-1", "def-2"})


def test_sandbox_token_switches_on_sandbox_mode_and_stays_out_of_repr() -> None:
    settings = load_settings({**BASE, "LOYALTYSYNC_SANDBOX_TOKEN": "tok-123-secret", "AZURE_CLIENT_SECRET": "cs-9"})
    assert settings.sandbox_mode
    assert "tok-123-secret" not in repr(settings)
    assert "cs-9" not in repr(settings)


def test_local_settings_fill_only_what_is_unset(tmp_path: Path) -> None:
    path = tmp_path / "local.settings.json"
    path.write_text(json.dumps({"Values": {"FNO_URL": "https://from-file", "QUEUE_PREFIX": "filed"}}))
    environ = {"FNO_URL": "https://from-env"}
    load_local_settings(path, environ)
    assert environ == {"FNO_URL": "https://from-env", "QUEUE_PREFIX": "filed"}


def test_unreadable_local_settings_are_named(tmp_path: Path) -> None:
    path = tmp_path / "local.settings.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError) as caught:
        load_local_settings(path, {})
    assert caught.value.setting == str(path)


def test_sample_settings_list_every_setting() -> None:
    sample = json.loads((Path(__file__).parent.parent / "local.settings.sample.json").read_text())["Values"]
    from loyaltysync.settings import Settings, _alias_of

    for name in Settings.model_fields:
        alias = _alias_of(name)
        assert alias in sample, f"local.settings.sample.json does not list {alias}"
