"""Queue triggers through the dev host against Azurite: retries, poison queue, batch concurrency, encoding."""

from __future__ import annotations

import asyncio
import base64
import importlib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from azure.storage.queue.aio import QueueClient

from devkit.devhost import DevHost, queues

StartHost = Callable[..., Awaitable[DevHost]]
QueueOpener = Callable[[str], Awaitable[QueueClient]]


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def eventually(condition: Callable[[], Awaitable[bool] | bool], within: float = 10.0) -> None:
    """Wait until `condition()` holds; fail after `within` seconds otherwise."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = condition()
        if result if isinstance(result, bool) else await result:
            return
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def fast_polling(**queues: Any) -> dict[str, Any]:
    return {"extensions": {"queues": {"maxPollingInterval": "00:00:00.2", "visibilityTimeout": "00:00:00", **queues}}}


RETRY_APP = """
import azure.functions as func

app = func.FunctionApp()
ATTEMPTS = []

@app.queue_trigger(arg_name="msg", queue_name="%JOBS%", connection="AzureWebJobsStorage")
def job(msg: func.QueueMessage) -> None:
    body = msg.get_body().decode()
    ATTEMPTS.append((body, msg.dequeue_count, msg.id))
    if body == "always fails" or (body == "fails once" and msg.dequeue_count == 1):
        raise RuntimeError(f"cannot handle {body}")
"""


async def test_failed_message_is_retried_then_poisoned(
    write_app: Callable[[str], str], start_host: StartHost, raw_queue: QueueOpener, unique_name: str
) -> None:
    module = write_app(RETRY_APP)
    jobs, poison = await raw_queue(f"jobs-{unique_name}"), await raw_queue(f"jobs-{unique_name}-poison")
    await jobs.send_message(b64("always fails"))
    await jobs.send_message(b64("fails once"))
    await start_host(module, settings={"JOBS": f"jobs-{unique_name}"}, host_json=fast_polling(maxDequeueCount=3))
    app = importlib.import_module(module)

    async def poisoned() -> bool:
        return bool(await poison.peek_messages())

    await eventually(poisoned)
    await eventually(lambda: len(app.ATTEMPTS) == 5)
    failing = [(count, message_id) for body, count, message_id in app.ATTEMPTS if body == "always fails"]
    assert [count for count, _ in failing] == [1, 2, 3]  # maxDequeueCount attempts, the first included
    assert len({message_id for _, message_id in failing}) == 1
    assert [count for body, count, _ in app.ATTEMPTS if body == "fails once"] == [1, 2]
    assert [message.content for message in await poison.peek_messages(max_messages=32)] == [b64("always fails")]
    await eventually(lambda: _empty(jobs))  # the retried message succeeded and was deleted


async def _empty(queue: QueueClient) -> bool:
    return not await queue.peek_messages()


SLOW_FAIL_APP = """
import asyncio
import azure.functions as func

app = func.FunctionApp()
ATTEMPTS = []

@app.queue_trigger(arg_name="msg", queue_name="%JOBS%", connection="AzureWebJobsStorage")
async def job(msg: func.QueueMessage) -> None:
    ATTEMPTS.append(msg.dequeue_count)
    if msg.dequeue_count < 3:
        await asyncio.sleep(1.3)  # past half the lease: the lease was renewed, with a new pop receipt
        raise RuntimeError("slow and failing")
"""


async def test_a_long_failing_invocation_is_released_and_poisoned_with_its_renewed_receipt(
    write_app: Callable[[str], str],
    start_host: StartHost,
    raw_queue: QueueOpener,
    unique_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first pop receipt is stale once the lease is renewed: releasing the message with it failed
    (PopReceiptMismatch), and on the last attempt the poison copy was sent but the original not deleted."""
    monkeypatch.setattr(queues, "LEASE_SECONDS", 2)
    module = write_app(SLOW_FAIL_APP)
    jobs, poison = await raw_queue(f"slow-{unique_name}"), await raw_queue(f"slow-{unique_name}-poison")
    await jobs.send_message(b64("slow"))
    await start_host(module, settings={"JOBS": f"slow-{unique_name}"}, host_json=fast_polling(maxDequeueCount=2))
    app = importlib.import_module(module)

    async def poisoned() -> bool:
        return bool(await poison.peek_messages())

    async def gone() -> bool:  # invisible messages count too: a stale receipt leaves the message leased
        return (await jobs.get_queue_properties()).approximate_message_count == 0

    await eventually(poisoned, within=20)
    await eventually(gone, within=20)
    await asyncio.sleep(2.5)  # past the lease: a message left behind would be back by now
    assert await gone()
    assert app.ATTEMPTS == [1, 2]  # released after the first, moved once after the second, never run again
    assert len(await poison.peek_messages(max_messages=32)) == 1


OVERDUE_APP = """
import azure.functions as func

app = func.FunctionApp()
CALLS = []

@app.queue_trigger(arg_name="msg", queue_name="%JOBS%", connection="AzureWebJobsStorage")
async def job(msg: func.QueueMessage) -> None:
    CALLS.append(msg.get_body())
"""


async def test_message_past_max_dequeue_count_goes_to_poison_without_running(
    write_app: Callable[[str], str], start_host: StartHost, raw_queue: QueueOpener, unique_name: str
) -> None:
    module = write_app(OVERDUE_APP)
    jobs, poison = await raw_queue(f"late-{unique_name}"), await raw_queue(f"late-{unique_name}-poison")
    await jobs.send_message(b64("taken before"))
    # Someone else (a crashed instance) dequeued it once already and never settled it.
    taken = [message async for message in jobs.receive_messages(visibility_timeout=1, max_messages=1)]
    assert taken[0].dequeue_count == 1
    await start_host(module, settings={"JOBS": f"late-{unique_name}"}, host_json=fast_polling(maxDequeueCount=1))

    async def poisoned() -> bool:
        return bool(await poison.peek_messages())

    await eventually(poisoned)
    assert importlib.import_module(module).CALLS == []
    assert [message.content for message in await poison.peek_messages()] == [b64("taken before")]


BATCH_APP = """
import asyncio
import azure.functions as func

app = func.FunctionApp()
STATE = {"active": 0, "peak": 0, "done": 0}

@app.queue_trigger(arg_name="msg", queue_name="%JOBS%", connection="AzureWebJobsStorage")
async def job(msg: func.QueueMessage) -> None:
    STATE["active"] += 1
    STATE["peak"] = max(STATE["peak"], STATE["active"])
    await asyncio.sleep(0.02 if msg.get_body() == b"fast" else 0.4)
    STATE["active"] -= 1
    STATE["done"] += 1
"""


async def test_batch_size_plus_new_batch_threshold_bounds_concurrency(
    write_app: Callable[[str], str], start_host: StartHost, raw_queue: QueueOpener, unique_name: str
) -> None:
    module = write_app(BATCH_APP)
    jobs = await raw_queue(f"batch-{unique_name}")
    for body in ["fast", *["slow"] * 7]:
        await jobs.send_message(b64(body))
    host_json = fast_polling(batchSize=2, newBatchThreshold=1)
    await start_host(module, settings={"JOBS": f"batch-{unique_name}"}, host_json=host_json)
    state = importlib.import_module(module).STATE
    await eventually(lambda: state["done"] == 8)
    # First batch: fast + slow; once only one runs (<= threshold 1) the next batch of 2 starts: 3 at once, never more.
    assert state["peak"] == 3


PLAIN_APP = """
import azure.functions as func

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)
SEEN = []

@app.queue_trigger(arg_name="msg", queue_name="%IN%", connection="AzureWebJobsStorage")
@app.queue_output(arg_name="out", queue_name="%OUT%", connection="AzureWebJobsStorage")
def relay(msg: func.QueueMessage, out: func.Out[str]) -> None:
    SEEN.append(msg.get_body().decode())
    out.set(msg.get_body().decode().upper())
"""


async def test_message_encoding_none_reads_and_writes_plain_text(
    write_app: Callable[[str], str], start_host: StartHost, raw_queue: QueueOpener, unique_name: str
) -> None:
    module = write_app(PLAIN_APP)
    inbound, outbound = await raw_queue(f"in-{unique_name}"), await raw_queue(f"out-{unique_name}")
    await inbound.send_message('{"plain": "text"}')
    settings = {"IN": f"in-{unique_name}", "OUT": f"out-{unique_name}"}
    await start_host(module, settings=settings, host_json=fast_polling(messageEncoding="none"))

    async def relayed() -> bool:
        return bool(await outbound.peek_messages())

    await eventually(relayed)
    assert importlib.import_module(module).SEEN == ['{"plain": "text"}']
    assert [message.content for message in await outbound.peek_messages()] == ['{"PLAIN": "TEXT"}']


DELAYED_APP = """
import azure.functions as func

app = func.FunctionApp()
CALLS = []

@app.queue_trigger(arg_name="msg", queue_name="%JOBS%", connection="AzureWebJobsStorage")
def job(msg: func.QueueMessage) -> None:
    CALLS.append((msg.get_body().decode(), msg.dequeue_count))
"""


async def test_a_message_the_sender_made_invisible_runs_only_once_its_visibility_timeout_has_passed(
    write_app: Callable[[str], str], start_host: StartHost, raw_queue: QueueOpener, unique_name: str
) -> None:
    """Put Message's `visibilitytimeout`, as Azure Storage queues keep it: the listener never sees the
    message before then (the worker's back-off depends on it), and sees it as a first delivery after."""
    module = write_app(DELAYED_APP)
    jobs = await raw_queue(f"delayed-{unique_name}")
    await jobs.send_message(b64("in an hour"), visibility_timeout=3600)
    await jobs.send_message(b64("in a second"), visibility_timeout=1)
    await jobs.send_message(b64("now"))
    await start_host(module, settings={"JOBS": f"delayed-{unique_name}"}, host_json=fast_polling())
    calls = importlib.import_module(module).CALLS

    await eventually(lambda: len(calls) == 2)
    assert sorted(calls) == [("in a second", 1), ("now", 1)]
    props = await jobs.get_queue_properties()
    assert props.approximate_message_count == 1  # "in an hour" is still there, invisible
    assert [message async for message in jobs.receive_messages(visibility_timeout=1)] == []
