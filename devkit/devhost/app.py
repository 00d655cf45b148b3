"""Function discovery, the way the Python worker indexes a v2 app.

The worker imports the script module, requires exactly one top-level
`FunctionRegister` (FunctionApp, AsgiFunctionApp, ...), calls `get_functions()`
once and sends each function's JSON metadata to the host; the host resolves
`%SETTING%` expressions and skips functions disabled by app setting. Everything
below works from that same metadata, so any app the worker accepts is served.
Before that, every function goes through the worker's own checks
(`devkit.devhost.worker_rules`): one refused function stops the start, because
in Azure it makes the worker index no function at all.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import azure.functions as func

from devkit.devhost import worker_rules
from devkit.devhost.settings import is_disabled, resolve_expressions
from devkit.devhost.worker_rules import AppIndexError, FunctionLoadError, IndexedFunction
from loyaltysync.errors import LoyaltySyncError

RUN_TRIGGERS = frozenset({"httpTrigger", "queueTrigger", "timerTrigger"})
RUN_OUTPUTS = frozenset({"http", "queue"})
RETURN = worker_rules.RETURN
# Binding properties that are names, not values the host resolves `%SETTING%` in.
_LITERAL_PROPERTIES = frozenset({"name", "type", "direction"})


class DevHostError(LoyaltySyncError):
    """The app cannot be indexed (import error, no app, bad function signature). Says what to fix.

    For a signature the worker refuses, `function_name`, `parameter` and `reason` name it.
    """

    def __init__(
        self, message: str, *, function_name: str | None = None, parameter: str | None = None, reason: str = ""
    ) -> None:
        super().__init__(message)
        self.function_name = function_name
        self.parameter = parameter
        self.reason = reason or message


@dataclass(frozen=True)
class FunctionSpec:
    """One indexed function: its resolved bindings, its Python callable and whether the dev host runs it."""

    name: str
    trigger: Mapping[str, Any]
    outputs: tuple[Mapping[str, Any], ...]
    indexed: IndexedFunction  # what the worker registered: context, parameter converters, return binding
    disabled: bool
    not_run: str | None  # why the dev host does not run it; None when it does

    @property
    def trigger_type(self) -> str:
        """The trigger binding type, e.g. `httpTrigger`."""
        return str(self.trigger["type"])

    @property
    def trigger_name(self) -> str:
        """The parameter name the trigger value is passed as."""
        return str(self.trigger["name"])

    @property
    def runs(self) -> bool:
        """True when the dev host starts this function's trigger."""
        return not self.disabled and self.not_run is None

    @property
    def user_function(self) -> Callable[..., Any]:
        """The Python function the worker calls."""
        return self.indexed.user_function

    @property
    def wants_context(self) -> bool:
        """True when the function takes a `context` parameter that is not a binding."""
        return self.indexed.requires_context

    @property
    def is_async(self) -> bool:
        """True for `async def` functions (run on the event loop, not in the thread pool)."""
        return self.indexed.is_async

    @property
    def return_binding(self) -> Mapping[str, Any] | None:
        """The output binding fed by the return value, if any."""
        return next((binding for binding in self.outputs if binding["name"] == RETURN), None)


def load_app_module(module_name: str) -> ModuleType:
    """Import the app module from the current directory (as the worker imports `function_app.py`).

    Raises DevHostError carrying the import error: on Azure the same error means "0 functions".
    """
    name = module_name.removesuffix(".py")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    except Exception as exc:
        raise DevHostError(f"cannot import the function app module {name!r}: {type(exc).__name__}: {exc}") from exc


def find_app(module: ModuleType) -> func.FunctionRegister:
    """The module's one top-level FunctionRegister. Zero or several raise DevHostError, as in the worker."""
    try:
        return worker_rules.find_app(module)
    except AppIndexError as exc:
        raise DevHostError(str(exc)) from exc


def index_functions(app: func.FunctionRegister, environ: Mapping[str, str]) -> list[FunctionSpec]:
    """Call `app.get_functions()` once, check every function as the worker does, and build the FunctionSpecs.

    Raises DevHostError naming the function, the parameter and the worker's reason for the first
    signature the worker would refuse (the worker then indexes nothing), and ConfigError for a
    `%SETTING%` that is not set in a function the dev host runs.
    """
    # get_functions() refuses to run twice on one app (1.26 keeps the names it has seen);
    # forget them so a second dev host in the same process indexes the same app again.
    app.functions_bindings = None
    try:
        functions = app.get_functions()
    except ValueError as exc:  # duplicate function names: the library's own check, as under the worker
        raise DevHostError(f"the worker cannot index the app: {exc}") from exc
    checked = [_worker_checks(function) for function in functions]  # the worker, before the host reads settings
    return [_spec(function, indexed, environ) for function, indexed in zip(functions, checked, strict=True)]


def _worker_checks(function: func.Function) -> IndexedFunction:
    try:
        return worker_rules.index_function(function)
    except FunctionLoadError as exc:
        where = f" (parameter {exc.parameter!r})" if exc.parameter else ""
        raise DevHostError(
            f"the Python worker refuses function {exc.function_name!r}{where}: {exc}. "
            "In Azure this fails the indexing of the whole app: no function would run.",
            function_name=exc.function_name,
            parameter=exc.parameter,
            reason=exc.reason,
        ) from exc


def _spec(function: func.Function, indexed: IndexedFunction, environ: Mapping[str, str]) -> FunctionSpec:
    name = indexed.name
    bindings: list[dict[str, Any]] = json.loads(function.get_function_json())["bindings"]
    trigger = next((binding for binding in bindings if str(binding["type"]).endswith("Trigger")), None)
    if trigger is None:
        raise DevHostError(f"function {name!r} has no trigger binding")
    disabled = is_disabled(name, environ)
    not_run = _not_run_reason(trigger, bindings)
    if not disabled and not_run is None:
        bindings = [_resolve(binding, environ, name) for binding in bindings]
        trigger = next(binding for binding in bindings if binding["name"] == trigger["name"])
        if trigger["type"] == "httpTrigger" and not trigger.get("route"):
            trigger["route"] = name
    outputs = tuple(binding for binding in bindings if str(binding.get("direction", "")).upper() == "OUT")
    return FunctionSpec(
        name=name,
        trigger=trigger,
        outputs=outputs,
        indexed=indexed,
        disabled=disabled,
        not_run=not_run,
    )


def _not_run_reason(trigger: Mapping[str, Any], bindings: list[dict[str, Any]]) -> str | None:
    if trigger["type"] not in RUN_TRIGGERS:
        return f"{trigger['type']} is not run by the dev host"
    for binding in bindings:
        if binding is trigger:
            continue
        if str(binding.get("direction", "")).upper() != "OUT" or binding["type"] not in RUN_OUTPUTS:
            return f"{binding['type']} binding {binding['name']!r} is not supported by the dev host"
    return None


def _resolve(binding: Mapping[str, Any], environ: Mapping[str, str], function_name: str) -> dict[str, Any]:
    resolved: dict[str, Any] = {}
    for key, value in binding.items():
        if isinstance(value, str) and key not in _LITERAL_PROPERTIES:
            where = f"function {function_name!r} ({binding['type']} {key})"
            value = resolve_expressions(value, environ, where=where)
        resolved[key] = value
    return resolved
