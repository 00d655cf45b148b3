"""The host's invocation lifetime (host.json functionTimeout) bounds how long an intent is "in flight"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loyaltysync.host_limits import (
    DEFAULT_FUNCTION_TIMEOUT_S,
    function_timeout_seconds,
    intent_horizon_seconds,
    parse_timespan,
    step_budget_seconds,
)
from loyaltysync.runtime import build_runtime
from loyaltysync.settings import load_settings
from loyaltysync.targets.http import RetryPolicy

ROOT = Path(__file__).resolve().parents[1]


def test_the_repository_host_json_gives_ten_minutes_and_the_engine_waits_past_them() -> None:
    assert function_timeout_seconds(ROOT / "host.json") == 600
    runtime = build_runtime(load_settings({"FNO_URL": "http://fo", "DATAVERSE_URL": "http://dv",
                                           "AzureWebJobsStorage": "UseDevelopmentStorage=true"}))
    assert runtime.engine.writing_elsewhere_s == intent_horizon_seconds(600) > 600


def test_a_step_retrying_as_long_as_the_clients_allow_is_still_inside_the_horizon() -> None:
    # The clients' longest retry loop for one request: every wait plus every attempt's 30 s timeout.
    policy = RetryPolicy()
    one_request = policy.max_total_wait + policy.max_attempts * 30
    assert 2 * one_request < intent_horizon_seconds(function_timeout_seconds(ROOT / "host.json"))


@pytest.mark.parametrize(
    ("document", "override", "expected"),
    [
        ({"functionTimeout": "00:05:00"}, None, 300),
        ({"FunctionTimeout": "01:00:00"}, None, 3600),
        ({"functionTimeout": "00:05:00"}, "00:00:40", 40),
        ({"functionTimeout": "-1"}, None, DEFAULT_FUNCTION_TIMEOUT_S),  # unbounded: the longest plan default
        ({}, None, DEFAULT_FUNCTION_TIMEOUT_S),
        ({"functionTimeout": "ten minutes"}, None, DEFAULT_FUNCTION_TIMEOUT_S),
    ],
)
def test_function_timeout_as_the_host_reads_it(
    tmp_path: Path, document: dict[str, str], override: str | None, expected: float
) -> None:
    host_json = tmp_path / "host.json"
    host_json.write_text(json.dumps(document), encoding="utf-8")
    assert function_timeout_seconds(host_json, override) == expected


def test_timespans() -> None:
    assert parse_timespan("1.02:03:04.5") == 86400 + 2 * 3600 + 3 * 60 + 4.5
    with pytest.raises(ValueError, match="TimeSpan"):
        parse_timespan("600")


@pytest.mark.parametrize(("timeout", "budget"), [(20, 15), (100, 80), (300, 240), (600, 540), (1800, 1740), (6, 3)])
def test_an_invocation_keeps_a_fifth_of_its_time_between_5_s_and_a_minute_at_most_half_to_hand_its_change_back(
    timeout: float, budget: float
) -> None:
    assert step_budget_seconds(timeout) == budget
