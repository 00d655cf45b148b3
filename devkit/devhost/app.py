"""Function discovery, the way the Python worker indexes a v2 app.

The worker imports the script module, requires exactly one top-level
`FunctionRegister` (FunctionApp, AsgiFunctionApp, ...), calls `get_functions()`
once and sends each function's JSON metadata to the host; the host resolves
`%SETTING%` expressions and skips functions disabled by app setting. Everything
below works from that same metadata, so any app the worker accepts is served.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import azure.functions as func

from devkit.devhost.settings import is_disabled, resolve_expressions
from loyaltysync.errors import LoyaltySyncError

RUN_TRIGGERS = frozenset({"httpTrigger", "queueTrigger", "timerTrigger"})
RUN_OUTPUTS = frozenset({"http", "queue"})
RETURN = "$return"
CONTEXT = "context"
# Binding properties that are names, not values the host resolves `%SETTING%` in.
_LITERAL_PROPERTIES = frozenset({"name", "type", "direction"})


class DevHostError(LoyaltySyncError):
    """The app cannot be indexed (import error, no app, bad function signature). Says what to fix."""


@dataclass(frozen=True)
class FunctionSpec:
    """One indexed function: its resolved bindings, its Python callable and whether the dev host runs it."""

    name: str
    trigger: Mapping[str, Any]
    outputs: tuple[Mapping[str, Any], ...]
    user_function: Callable[..., Any]
    wants_context: bool
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
    def is_async(self) -> bool:
        """True for `async def` functions (run on the event loop, not in the thread pool)."""
        return inspect.iscoroutinefunction(self.user_function)

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
    apps = [value for value in vars(module).values() if isinstance(value, func.FunctionRegister)]
    if not apps:
        raise DevHostError(f"no top-level function app instance (func.FunctionApp) in {module.__name__}")
    if len(apps) > 1:
        raise DevHostError(
            f"more than one top-level function app instance in {module.__name__}: the worker indexes exactly one"
        )
    return apps[0]


def index_functions(app: func.FunctionRegister, environ: Mapping[str, str]) -> list[FunctionSpec]:
    """Call `app.get_functions()` once and turn each function's metadata into a FunctionSpec.

    Raises DevHostError for a signature the worker would refuse, and ConfigError for a
    `%SETTING%` that is not set in a function the dev host runs.
    """
    # get_functions() refuses to run twice on one app (1.26 keeps the names it has seen);
    # forget them so a second dev host in the same process indexes the same app again.
    app.functions_bindings = None
    return [_spec(function, environ) for function in app.get_functions()]


def _spec(function: func.Function, environ: Mapping[str, str]) -> FunctionSpec:
    name = str(function.get_function_name())
    bindings: list[dict[str, Any]] = json.loads(function.get_function_json())["bindings"]
    user_function = function.get_user_function()
    wants_context = _check_signature(name, user_function, bindings)
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
        user_function=user_function,
        wants_context=wants_context,
        disabled=disabled,
        not_run=not_run,
    )


def _check_signature(name: str, user_function: Callable[..., Any], bindings: list[dict[str, Any]]) -> bool:
    """The worker's rule: Python parameters and binding names must match (plus an optional `context`)."""
    parameters = set(inspect.signature(user_function).parameters)
    bound = {str(binding["name"]) for binding in bindings if binding["name"] != RETURN}
    wants_context = CONTEXT in parameters and CONTEXT not in bound
    if wants_context:
        parameters.discard(CONTEXT)
    if parameters - bound:
        raise DevHostError(
            f"function {name!r}: parameters {sorted(parameters - bound)} are declared in Python "
            "but not in the function's bindings"
        )
    if bound - parameters:
        raise DevHostError(
            f"function {name!r}: bindings {sorted(bound - parameters)} are declared in the decorators "
            "but not as Python parameters"
        )
    return wants_context


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
