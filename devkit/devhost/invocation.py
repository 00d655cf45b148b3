"""One function invocation, as the Python worker performs it, and the output bindings it feeds.

The worker passes the trigger value and one `func.Out` per output binding by
parameter name (plus `context` when the function asks for it), awaits `async def`
functions on the event loop and runs plain ones in a thread pool, fails the
invocation when a function without a `$return` binding returns a value, and
hands the outputs to the host, which writes them only when the function
succeeded. Each invocation is logged in one line, like the host's "Executed".
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import azure.functions as func
from azure.functions._abc import RetryContext, TraceContext

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
class Outcome:
    """A successful invocation: the return value and each output binding's value by name."""

    result: Any
    outputs: Mapping[str, Any]

    def value_of(self, binding: Mapping[str, Any]) -> Any:
        """The value an output binding received (the return value for `$return`)."""
        return self.result if binding["name"] == RETURN else self.outputs.get(str(binding["name"]))


class Invoker:
    """Runs invocations and writes queue output bindings. Shared by the HTTP, queue and timer runners."""

    def __init__(self, queues: QueueStore, encoding: MessageEncoding, executor: ThreadPoolExecutor) -> None:
        self._queues = queues
        self._encoding = encoding
        self._executor = executor

    async def invoke(self, function: FunctionSpec, trigger_value: Any) -> Outcome:
        """Call `function` with `trigger_value`; on success write its queue outputs and return the Outcome.

        Any exception from the function or its outputs is logged with its traceback
        (as the host logs a failed invocation) and raised again.
        """
        invocation_id = str(uuid.uuid4())
        outs = {str(binding["name"]): OutValue() for binding in function.outputs if binding["name"] != RETURN}
        kwargs: dict[str, Any] = {function.trigger_name: trigger_value, **outs}
        if function.wants_context:
            kwargs["context"] = InvocationContext(invocation_id, function.name)
        started = time.perf_counter()
        try:
            result = await self._call(function, kwargs)
            if result is not None and function.return_binding is None:
                raise RuntimeError(f"function {function.name!r} without a $return binding returned a non-None value")
            outcome = Outcome(result, {name: out.get() for name, out in outs.items()})
            await self._write_outputs(function, outcome)
        except Exception:
            log.exception(_executed(function, "Failed", invocation_id, started))
            raise
        log.info(_executed(function, "Succeeded", invocation_id, started))
        return outcome

    async def _call(self, function: FunctionSpec, kwargs: dict[str, Any]) -> Any:
        if function.is_async:
            return await function.user_function(**kwargs)
        # contextvars travel with the call, as they do in the worker's thread pool.
        context = contextvars.copy_context()
        call = functools.partial(context.run, function.user_function, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def _write_outputs(self, function: FunctionSpec, outcome: Outcome) -> None:
        pending: list[tuple[Mapping[str, Any], list[str | bytes]]] = []
        for binding in function.outputs:
            value = outcome.value_of(binding)
            if binding["name"] != RETURN and value is None:
                continue  # an Out that was never set writes nothing
            if binding["type"] == "http":
                _check_http(value)
            elif binding["type"] == "queue":
                pending.append((binding, _queue_messages(value)))
        for binding, messages in pending:
            for message in messages:
                text = encode_message(message, self._encoding)
                await self._queues.send(binding.get("connection"), str(binding["queueName"]), text)


def _check_http(value: Any) -> None:
    if not isinstance(value, func.HttpResponse | str):
        raise TypeError(
            f'unable to encode outgoing TypedData: unsupported type "http" for Python type "{type(value).__name__}"'
        )


def _queue_messages(value: Any) -> list[str | bytes]:
    """The messages a queue output value stands for, with the worker's accepted types."""
    if isinstance(value, str | bytes):
        return [value]
    if isinstance(value, func.QueueMessage):
        return [value.get_body()]
    if isinstance(value, Iterable):
        messages: list[str | bytes] = []
        for item in value:
            if isinstance(item, str):
                messages.append(item)
            elif isinstance(item, func.QueueMessage):
                messages.append(item.get_body())
            else:
                raise TypeError(f"invalid data type in output queue message list: {type(item)}")
        return messages
    raise TypeError(
        f'unable to encode outgoing TypedData: unsupported type "queue" for Python type "{type(value).__name__}"'
    )


def _executed(function: FunctionSpec, status: str, invocation_id: str, started: float) -> str:
    duration = (time.perf_counter() - started) * 1000
    return (
        f"Executed 'Functions.{function.name}' ({function.trigger_type}, {status}, "
        f"Id={invocation_id}, Duration={duration:.0f}ms)"
    )
