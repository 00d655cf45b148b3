"""One function invocation, as the Python worker performs it, and the output bindings it feeds.

The host sends the trigger as typed data (`TriggerData`: an `azure.functions.meta.Datum` and its
trigger metadata); the worker turns it into the argument through the parameter's converter (the
library's `decode`, or its "generic" binding for `str`/`bytes` parameters), passes one `func.Out`
per output binding by parameter name (plus `context` when the function asks for it), awaits
`async def` functions on the event loop and runs plain ones in a thread pool, fails the invocation
when a function without a `$return` binding returns a value, and encodes every output and the return
value through the converters (`encode`). The host writes the outputs only when the function succeeded.
Each invocation is logged in one line, like the host's "Executed".
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import azure.functions as func
from azure.functions._abc import RetryContext, TraceContext
from azure.functions.meta import Datum

from devkit.devhost import worker_rules
from devkit.devhost.app import RETURN, FunctionSpec
from devkit.devhost.storage import MessageEncoding, QueueStore, encode_message

log = logging.getLogger("devkit.devhost")


class OutValue(func.Out[Any]):
    """What an output binding parameter is: a box the function `.set()`s."""

    def __init__(self) -> None:
        self._value: Any = None

    def set(self, val: Any) -> None:
        self._value = val

    def get(self) -> Any:
        return self._value


class _TraceContext(TraceContext):
    @property
    def trace_state(self) -> str:
        return ""

    @property
    def trace_parent(self) -> str:
        return ""

    @property
    def attributes(self) -> dict[str, str]:
        return {}


class _RetryContext(RetryContext):
    # Retry policies do not apply to the triggers the dev host runs (queues use dequeue counts).
    @property
    def retry_count(self) -> int:
        return 0

    @property
    def max_retry_count(self) -> int:
        return 0

    @property
    def exception(self) -> Any:
        return None


class InvocationContext(func.Context):
    """The `context` argument: invocation id, function name and directory."""

    def __init__(self, invocation_id: str, function_name: str) -> None:
        self._invocation_id = invocation_id
        self._function_name = function_name
        self._local = threading.local()
        self._local.invocation_id = invocation_id

    @property
    def invocation_id(self) -> str:
        return self._invocation_id

    @property
    def thread_local_storage(self) -> Any:
        return self._local

    @property
    def function_name(self) -> str:
        return self._function_name

    @property
    def function_directory(self) -> str:
        return os.getcwd()

    @property
    def trace_context(self) -> TraceContext:
        return _TraceContext()

    @property
    def retry_context(self) -> RetryContext:
        return _RetryContext()


@dataclass(frozen=True)
class TriggerData:
    """What the host sends the worker for a trigger: the data and its trigger metadata."""

    data: Datum
    metadata: Mapping[str, Datum] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """A successful invocation, as the worker hands it to the host: each value encoded by its converter.

    `result` is the encoded return value (None without a `$return` binding); `outputs` holds the
    encoded value of every output binding that was set, by name.
    """

    result: Datum | None
    outputs: Mapping[str, Datum]

    def value_of(self, binding: Mapping[str, Any]) -> Datum | None:
        """The data an output binding received (the return value for `$return`)."""
        return self.result if binding["name"] == RETURN else self.outputs.get(str(binding["name"]))


class Invoker:
    """Runs invocations and writes queue output bindings. Shared by the HTTP, queue and timer runners."""

    def __init__(
        self, queues: QueueStore, encoding: MessageEncoding, executor: ThreadPoolExecutor,
        timeout_s: float | None = None,
    ) -> None:
        self._queues = queues
        self._encoding = encoding
        self._executor = executor
        self._timeout_s = timeout_s  # host.json functionTimeout: the host ends an invocation running longer

    async def invoke(self, function: FunctionSpec, trigger: TriggerData) -> Outcome:
        """Call `function` with the trigger; on success write its queue outputs and return the Outcome.

        Any exception from decoding, the function, encoding or the outputs is logged with its
        traceback (as the host logs a failed invocation) and raised again.
        """
        indexed = function.indexed
        invocation_id = str(uuid.uuid4())
        started = time.perf_counter()
        try:
            trigger_param = indexed.inputs[function.trigger_name]
            argument = worker_rules.decode_argument(trigger_param, trigger.data, trigger.metadata)
            outs = {name: OutValue() for name in indexed.outputs}
            kwargs: dict[str, Any] = {function.trigger_name: argument, **outs}
            if indexed.requires_context:
                kwargs["context"] = InvocationContext(invocation_id, function.name)
            result = await self._call(function, kwargs)
            if result is not None and not indexed.has_return:
                raise RuntimeError(f"function {function.name!r} without a $return binding returned a non-None value")
            outputs = {
                name: worker_rules.encode_value(indexed.outputs[name], out.get())
                for name, out in outs.items()
                if out.get() is not None  # an Out that was never set writes nothing
            }
            returned = worker_rules.encode_value(indexed.return_type, result) if indexed.return_type else None
            outcome = Outcome(returned, outputs)
            await self._write_outputs(function, outcome)
        except Exception:
            log.exception(_executed(function, "Failed", invocation_id, started))
            raise
        log.info(_executed(function, "Succeeded", invocation_id, started))
        return outcome

    async def _call(self, function: FunctionSpec, kwargs: dict[str, Any]) -> Any:
        if function.is_async:
            # The host ends an invocation at functionTimeout (for Python it recycles the worker process):
            # nothing the function started may still write afterwards (the engine counts on it).
            try:
                return await asyncio.wait_for(function.user_function(**kwargs), self._timeout_s)
            except TimeoutError as exc:
                message = f"Timeout value of {self._timeout_s} s exceeded by function {function.name}"
                raise TimeoutError(message) from exc
        # contextvars travel with the call, as they do in the worker's thread pool.
        context = contextvars.copy_context()
        call = functools.partial(context.run, function.user_function, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def _write_outputs(self, function: FunctionSpec, outcome: Outcome) -> None:
        pending: list[tuple[Mapping[str, Any], list[str | bytes]]] = []
        for binding in function.outputs:
            data = outcome.value_of(binding)
            if binding["type"] == "queue" and data is not None:
                pending.append((binding, queue_messages(data)))
        for binding, messages in pending:
            for message in messages:
                text = encode_message(message, self._encoding)
                await self._queues.send(binding.get("connection"), str(binding["queueName"]), text)


def queue_messages(data: Datum) -> list[str | bytes]:
    """The messages the host's queue output binding writes for the worker's data.

    Text that is a JSON array becomes one message per element, as the host does it
    (Azure/azure-functions-python-worker#1492); a list from the worker arrives as JSON and splits the same way.
    """
    if data.type == "bytes":
        return [bytes(data.value)]
    if data.type in ("int", "double"):
        return [str(data.value)]
    if data.type not in ("string", "json"):
        raise TypeError(f"the queue output binding cannot write data of type {data.type!r}")
    text = str(data.value)
    try:
        parsed = json.loads(text)
    except ValueError:
        return [text]
    if not isinstance(parsed, list):
        if data.type == "json":
            raise TypeError("a queue message as a JSON object (func.QueueMessage) is not modelled by the dev host")
        return [text]
    messages: list[str | bytes] = []
    for item in parsed:
        if isinstance(item, dict | list):
            raise TypeError(
                "a queue message list item that is a JSON object or array (e.g. func.QueueMessage) "
                "is not modelled by the dev host; set str items"
            )
        messages.append(item if isinstance(item, str) else json.dumps(item))
    return messages


def _executed(function: FunctionSpec, status: str, invocation_id: str, started: float) -> str:
    duration = (time.perf_counter() - started) * 1000
    return (
        f"Executed 'Functions.{function.name}' ({function.trigger_type}, {status}, "
        f"Id={invocation_id}, Duration={duration:.0f}ms)"
    )
