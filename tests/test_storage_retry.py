"""Storage's own retries stay short and end before the host ends the invocation (loyaltysync/runtime.py).

The queue SDK's default waits 18, 24 and 42 s between tries: one hiccup of Storage while a step put its change
back ran the invocation into functionTimeout (the reduced chaos run met it with a 20 s timeout).
"""

from __future__ import annotations

from azure.core.exceptions import ServiceRequestError
from azure.core.pipeline import PipelineContext, PipelineRequest
from azure.core.rest import HttpRequest

from loyaltysync import host_limits
from loyaltysync.runtime import QueueRetry, build_runtime
from loyaltysync.settings import load_settings

URL = "http://127.0.0.1:1/devstoreaccount1/loyalty-cards/messages"


def _tries(policy: QueueRetry) -> list[float]:
    """The waits the policy makes for a request that never reaches Storage."""
    request = PipelineRequest(HttpRequest("POST", URL), PipelineContext(None))
    settings = policy.configure_retries(request)
    waits = []
    while policy.increment(settings, request.http_request, error=ServiceRequestError("connection refused")):
        waits.append(policy.get_backoff_time(settings))
    return waits


def test_queue_retries_wait_seconds_not_quarter_minutes() -> None:
    waits = _tries(QueueRetry())
    assert len(waits) == 3
    assert max(waits) <= 9 and sum(waits) <= 17  # the SDK's default: 18 + 24 + 42 s


def test_no_queue_retry_waits_past_the_invocations_end() -> None:
    with host_limits.invocation_deadline(4.0):  # 4 s to functionTimeout: only the first wait (2 s, +-1) fits
        assert len(_tries(QueueRetry())) == 1
    with host_limits.invocation_deadline(0.5):
        assert _tries(QueueRetry()) == []


def test_the_runtime_uses_the_short_retries() -> None:
    runtime = build_runtime(load_settings({"FNO_URL": "http://fo", "DATAVERSE_URL": "http://dv",
                                           "AzureWebJobsStorage": "UseDevelopmentStorage=true"}))
    assert isinstance(runtime.queue("loyalty-cards")._config.retry_policy, QueueRetry)
    assert runtime.function_timeout_s == 600
