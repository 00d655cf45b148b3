"""Queue triggers: the storage queue extension's listener, run against Azurite (or any storage account).

Per function, as the extension does on one instance:
- poll with exponential back-off from 100 ms up to `maxPollingInterval` while the queue is empty;
- receive up to `batchSize` messages, leased for 10 minutes and renewed while the function runs;
- fetch the next batch once no more than `newBatchThreshold` are still running, so at most
  `batchSize + newBatchThreshold` run at once;
- success deletes the message; a failure makes it visible again after `visibilityTimeout`;
- the attempt that reaches `maxDequeueCount` and fails moves the message to `<queue>-poison`
  (same text, same encoding), and a message already past the count is moved without running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from azure.functions.meta import Datum
from azure.storage.queue import QueueMessage as StoredMessage

from devkit.devhost.app import FunctionSpec
from devkit.devhost.host_json import MIN_POLLING_INTERVAL, QueueOptions
from devkit.devhost.invocation import Invoker, TriggerData
from devkit.devhost.storage import QueueStore, decode_message

log = logging.getLogger("devkit.devhost")

POISON_SUFFIX = "-poison"
LEASE_SECONDS = 600  # the extension's receive visibility; renewed at half-time while the function runs


_METADATA_FIELDS = ("Id", "DequeueCount", "PopReceipt", "InsertionTime", "ExpirationTime", "NextVisibleTime")


def queue_trigger_data(
    body: bytes,
    *,
    message_id: str,
    dequeue_count: int,
    pop_receipt: str | None = None,
    inserted: datetime | None = None,
    expires: datetime | None = None,
    next_visible: datetime | None = None,
) -> TriggerData:
    """The host's queue trigger data: the message text and its trigger metadata.

    The text is the decoded body read as UTF-8 (invalid bytes replaced, as .NET decodes). As in the host,
    the top-level properties of a JSON object body join the trigger metadata and win over the message's
    own fields of the same name, whatever their case: a body with an "id" changes `msg.id`
    (Azure/azure-functions-python-worker#1373, azure-functions-python-library#49).
    """
    metadata: dict[str, Datum] = {"Id": Datum(message_id, "string"), "DequeueCount": Datum(str(dequeue_count), "json")}
    if pop_receipt is not None:
        metadata["PopReceipt"] = Datum(pop_receipt, "string")
    for key, moment in (("InsertionTime", inserted), ("ExpirationTime", expires), ("NextVisibleTime", next_visible)):
        if moment is not None:
            metadata[key] = Datum(json.dumps(moment.isoformat()), "json")
    text = body.decode("utf-8", errors="replace")
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    if isinstance(document, dict):
        known = {key.lower(): key for key in _METADATA_FIELDS}  # the host's binding data ignores case
        for key, value in document.items():
            name = known.get(str(key).lower(), str(key))
            metadata[name] = Datum(value, "string") if isinstance(value, str) else Datum(json.dumps(value), "json")
    return TriggerData(Datum(text, "string"), metadata)


@dataclass
class _Lease:
    """A received message's current pop receipt (each lease renewal gives a new one)."""

    receipt: str


class QueueListener:
    """Runs one queue-triggered function until cancelled."""

    def __init__(self, function: FunctionSpec, invoker: Invoker, store: QueueStore, options: QueueOptions) -> None:
        self.function = function
        self._invoker = invoker
        self._store = store
        self._options = options
        connection = function.trigger.get("connection")
        self.queue_name = str(function.trigger["queueName"])
        self.poison_name = self.queue_name + POISON_SUFFIX
        self._queue = store.queue(connection, self.queue_name)
        self._poison = store.queue(connection, self.poison_name)

    async def run(self) -> None:
        """Poll, dispatch and settle messages until cancelled; running invocations are cancelled with it."""
        in_flight: set[asyncio.Task[None]] = set()
        delay = MIN_POLLING_INTERVAL
        try:
            while True:
                while len(in_flight) > self._options.new_batch_threshold:
                    await asyncio.wait(set(in_flight), return_when=asyncio.FIRST_COMPLETED)
                messages = await self._receive()
                if messages:
                    delay = MIN_POLLING_INTERVAL
                    for message in messages:
                        task = asyncio.create_task(self._settle(message))
                        in_flight.add(task)
                        task.add_done_callback(in_flight.discard)
                    continue
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._options.max_polling_interval)
        finally:
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)

    async def _receive(self) -> list[StoredMessage]:
        try:
            await self._store.ensure_queue(self._queue)
            pages = self._queue.receive_messages(
                messages_per_page=self._options.batch_size,
                max_messages=self._options.batch_size,
                visibility_timeout=LEASE_SECONDS,
            )
            return [message async for message in pages]
        except Exception as exc:  # storage down or throttling: keep polling with back-off, as the host
            log.warning("Polling queue '%s' for function '%s' failed: %s", self.queue_name, self.function.name, exc)
            return []

    async def _settle(self, message: StoredMessage) -> None:
        try:
            await self._process(message)
        except Exception:  # storage failed while settling: the lease runs out and the message comes back
            log.exception("Settling message '%s' on queue '%s' failed", message.id, self.queue_name)

    async def _process(self, message: StoredMessage) -> None:
        dequeue_count = int(message.dequeue_count or 1)
        if dequeue_count > self._options.max_dequeue_count:
            await self._to_poison(message, str(message.pop_receipt))
            return
        lease = _Lease(str(message.pop_receipt))
        try:
            trigger = self._trigger_message(message, dequeue_count)
            await self._invoke_leased(trigger, message.id, lease)
        except Exception:  # the invoker logged it; the dequeue count decides what happens next
            # The receipt of the last lease renewal: a long invocation's first receipt is stale.
            if dequeue_count >= self._options.max_dequeue_count:
                await self._to_poison(message, lease.receipt)
            else:
                await self._release(message.id, lease.receipt)
            return
        await self._queue.delete_message(message.id, lease.receipt)

    def _trigger_message(self, message: StoredMessage, dequeue_count: int) -> TriggerData:
        try:
            body = decode_message(str(message.content or ""), self._options.message_encoding)
        except ValueError:
            log.exception(
                "Message '%s' on queue '%s' cannot be decoded for function '%s'",
                message.id,
                self.queue_name,
                self.function.name,
            )
            raise
        return queue_trigger_data(
            body,
            message_id=message.id,
            dequeue_count=dequeue_count,
            pop_receipt=message.pop_receipt,
            inserted=message.inserted_on,
            expires=message.expires_on,
            next_visible=message.next_visible_on,
        )

    async def _invoke_leased(self, trigger: TriggerData, message_id: str, lease: _Lease) -> None:
        """Invoke, renewing the message's lease while the function runs; `lease` keeps the latest pop receipt."""
        task: asyncio.Task[Any] = asyncio.create_task(self._invoker.invoke(self.function, trigger))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=LEASE_SECONDS / 2)
                if done:
                    break
                renewed = await self._queue.update_message(message_id, lease.receipt, visibility_timeout=LEASE_SECONDS)
                lease.receipt = str(renewed.pop_receipt)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        task.result()

    async def _release(self, message_id: str, receipt: str) -> None:
        """Make a failed message visible again after host.json `visibilityTimeout`, for the next attempt."""
        visibility = math.ceil(self._options.visibility_timeout)
        await self._queue.update_message(message_id, receipt, visibility_timeout=visibility)

    async def _to_poison(self, message: StoredMessage, receipt: str) -> None:
        log.warning(
            "Message has reached MaxDequeueCount of %d. Moving message to queue '%s'.",
            self._options.max_dequeue_count,
            self.poison_name,
        )
        await self._store.ensure_queue(self._poison)
        await self._poison.send_message(message.content)
        await self._queue.delete_message(message.id, receipt)
