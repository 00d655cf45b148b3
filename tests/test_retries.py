"""The retry schedule of a change that failed for a passing reason, and how its state travels on the queue.

Pure: times are passed in. The outage simulations play the worker's loop (fail, wait the
schedule's delay, try again) against a clock, to show what a 5-minute outage or throttling
window costs with the default settings.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from loyaltysync.errors import ConfigError
from loyaltysync.events.model import ChangeEvent
from loyaltysync.retries import (
    MAX_QUEUE_DELAY_S,
    GiveUp,
    RetryLater,
    RetrySchedule,
    RetryState,
    read_message,
    with_retry,
)
from loyaltysync.settings import load_settings

T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
DEFAULT = RetrySchedule()
OLD_HOST_ATTEMPTS = 5  # host.json maxDequeueCount: what a transient failure got before
FIVE_MINUTES = 300.0


def never() -> float:
    return 0.0


def always() -> float:
    return 1.0


def test_the_default_back_off_doubles_from_5_s_to_5_min() -> None:
    assert [DEFAULT.nominal(n) for n in range(1, 10)] == [5, 10, 20, 40, 80, 160, 300, 300, 300]
    assert DEFAULT.nominal(10_000) == 300  # no overflow however long a change keeps failing


def test_the_default_settings_give_the_default_schedule() -> None:
    settings = load_settings({"FNO_URL": "https://fo.example", "DATAVERSE_URL": "https://dv.example"})
    built = RetrySchedule(settings.retry_base_seconds, settings.retry_max_seconds, settings.retry_budget_seconds)
    assert built == DEFAULT


@pytest.mark.parametrize(
    ("setting", "value"),
    [("RETRY_BASE_SECONDS", "0"), ("RETRY_MAX_SECONDS", "604801"), ("RETRY_BUDGET_SECONDS", "-1")],
)
def test_a_retry_setting_out_of_range_is_named(setting: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"FNO_URL": "https://fo.example", "DATAVERSE_URL": "https://dv.example", setting: value})
    assert caught.value.setting == setting


def test_jitter_only_lengthens_a_wait_and_by_at_most_its_fraction() -> None:
    assert DEFAULT.delay(3, None, never) == 20
    assert DEFAULT.delay(3, None, always) == 24
    assert DEFAULT.delay(20, None, always) == 360
    rng = random.Random(5)
    assert all(20 <= DEFAULT.delay(3, None, rng.random) <= 24 for _ in range(200))


def test_retry_after_is_honoured_when_longer_than_the_back_off() -> None:
    longer = DEFAULT.after_failure(None, T0, "dataverse answered 429", retry_after=42.2, rand=never)
    assert isinstance(longer, RetryLater) and longer.delay_s == 43
    shorter = DEFAULT.after_failure(None, T0, "dataverse answered 429", retry_after=1.0, rand=never)
    assert isinstance(shorter, RetryLater) and shorter.delay_s == 5
    # Beyond the cap too: the service said so, and coming back earlier only earns another 429.
    beyond = DEFAULT.after_failure(None, T0, "fo answered 429", retry_after=900.0, rand=never)
    assert isinstance(beyond, RetryLater) and beyond.delay_s == 900


def test_no_wait_is_longer_than_the_queue_allows() -> None:
    far = DEFAULT.after_failure(None, T0, "429", retry_after=30 * 24 * 3600.0)
    assert isinstance(far, RetryLater) and far.delay_s == MAX_QUEUE_DELAY_S
    assert RetrySchedule(base_s=604_800, max_s=604_800).delay(1, None, always) == MAX_QUEUE_DELAY_S


def test_a_failure_counts_the_attempt_and_keeps_the_first_failure_time() -> None:
    first = DEFAULT.after_failure(None, T0, "fo answered 503", rand=never)
    assert isinstance(first, RetryLater)
    assert first.state == RetryState(1, T0, "fo answered 503")
    later = DEFAULT.after_failure(first.state, T0 + timedelta(seconds=6), "fo answered 0 ConnectError", rand=never)
    assert isinstance(later, RetryLater) and later.delay_s == 10
    assert later.state == RetryState(2, T0, "fo answered 0 ConnectError")


def test_the_change_is_given_up_once_the_budget_has_passed_since_its_first_failure() -> None:
    state = RetryState(11, T0, "dataverse answered 503")
    just_before = DEFAULT.after_failure(state, T0 + timedelta(seconds=3599), "again")
    assert isinstance(just_before, RetryLater)
    spent = DEFAULT.after_failure(state, T0 + timedelta(seconds=3600), "still down")
    assert isinstance(spent, GiveUp)
    assert spent.state.attempts == 12 and spent.state.reason == "still down" and spent.waited_s == 3600
    assert isinstance(RetrySchedule(budget_s=0).after_failure(None, T0, "503"), GiveUp)


def test_the_default_schedule_waits_longer_than_five_minutes_before_parking() -> None:
    """Summing the shortest waits: far more than 5 minutes, in far more attempts than the host's 5."""
    waits = DEFAULT.minimum_waits()
    assert waits[:8] == [5, 10, 20, 40, 80, 160, 300, 300]
    assert sum(waits) >= DEFAULT.budget_s > FIVE_MINUTES
    assert sum(waits[:-1]) < DEFAULT.budget_s  # the last wait is the one that crosses the budget
    attempts_within_five_minutes = next(n for n in range(len(waits) + 1) if sum(waits[:n]) >= FIVE_MINUTES)
    assert attempts_within_five_minutes > OLD_HOST_ATTEMPTS


def _play(
    schedule: RetrySchedule,
    fails_until: float,
    *,
    attempt_s: float,
    retry_after: Callable[[float], float | None],
    rand: Callable[[], float],
) -> tuple[float, int]:
    """Try a change from t=0 until it lands; each try takes `attempt_s` and fails while t < `fails_until`.

    Returns (when it landed, attempts). Fails the test if the schedule gives up instead.
    """
    now, state, attempts = 0.0, None, 0
    while True:
        attempts += 1
        if now >= fails_until:
            return now, attempts
        now += attempt_s
        verdict = schedule.after_failure(state, T0 + timedelta(seconds=now), "down", retry_after(now), rand)
        assert isinstance(verdict, RetryLater), f"parked at t={now:.0f} s after {attempts} attempts"
        state = verdict.state
        now += verdict.delay_s


@pytest.mark.parametrize("rand", [never, always, random.Random(11).random], ids=["shortest", "longest", "random"])
@pytest.mark.parametrize(
    ("fault", "retry_after"),
    [
        ("outage (503, no Retry-After)", lambda now: None),
        ("throttling window (429, Retry-After: rest of the window)", lambda now: max(1.0, FIVE_MINUTES - now)),
        ("throttling (429, Retry-After: 30 s)", lambda now: 30.0),
    ],
)
def test_a_five_minute_fault_parks_nothing_and_the_change_lands_soon_after(
    fault: str, retry_after: Callable[[float], float | None], rand: Callable[[], float]
) -> None:
    """An attempt may spend up to 2 minutes in the HTTP client's own retries (its max_total_wait)."""
    for attempt_s in (0.1, 7.5, 120.0):
        landed, attempts = _play(DEFAULT, FIVE_MINUTES, attempt_s=attempt_s, retry_after=retry_after, rand=rand)
        longest_wait = DEFAULT.max_s * (1 + DEFAULT.jitter)
        assert FIVE_MINUTES <= landed <= FIVE_MINUTES + attempt_s + longest_wait, fault
        assert attempts >= 2


def test_a_fault_longer_than_the_budget_is_given_up() -> None:
    schedule = RetrySchedule(base_s=1, max_s=8, budget_s=60)
    with pytest.raises(AssertionError, match="parked at t="):
        _play(schedule, 10_000, attempt_s=0.5, retry_after=lambda now: None, rand=never)


# ------------------------------------------------------------------ on the queue


def _change() -> ChangeEvent:
    return ChangeEvent(
        template="loyalty-cards",
        side="dataverse",
        operation="update",
        key={"CardNumber": "C-1"},
        fields={"PartyNumber": "P-1"},
        complete=True,
        source_version="1234",
        correlation_id="c474239d-4233-41a9-8b17-a86cb4f737b5",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )


def test_a_retried_message_is_the_same_change_with_its_retry_state() -> None:
    change = _change()
    state = RetryState(3, T0, "dataverse answered 503 ServiceUnavailable")
    message = with_retry(change.to_json(), state)

    assert json.loads(message)["retry"] == {
        "attempts": 3,
        "first_failed_at": "2026-12-03T12:00:00Z",
        "reason": "dataverse answered 503 ServiceUnavailable",
    }
    event, read = read_message(message)
    assert event == change  # event id, correlation id, trace context and versions as they came
    assert read == state
    assert read_message(change.to_json()) == (change, None)
    assert read_message(with_retry(message, None)) == (change, None)
    again = RetryState(4, T0, "later")
    assert read_message(with_retry(message, again))[1] == again


@pytest.mark.parametrize(
    "retry",
    [
        {"attempts": 0, "first_failed_at": "2026-12-03T12:00:00Z"},
        {"attempts": True, "first_failed_at": "2026-12-03T12:00:00Z"},
        {"attempts": 2},
        {"attempts": 2, "first_failed_at": "yesterday"},
        "3",
    ],
)
def test_a_garbled_retry_state_is_not_a_change(retry: object) -> None:
    data = json.loads(_change().to_json())
    data["retry"] = retry
    with pytest.raises(ValueError):
        read_message(json.dumps(data))
