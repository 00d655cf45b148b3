"""The Azure Functions Python worker's indexing and binding rules, applied without the worker.

The worker (Azure/azure-functions-python-worker 4.40, `workers/azure_functions_worker/functions.py`,
`Registry.add_indexed_function`, and `bindings/meta.py`) checks every function's Python signature
against its bindings when it indexes the app. One function that fails fails the whole indexing, and the
portal then shows no functions at all. This module applies the same rules through the same azure-functions
converters (`azure.functions.meta` registry: `check_input_type_annotation`, `check_output_type_annotation`,
`decode`, `encode`), so the dev host and the deploy check refuse what Azure refuses:

- a parameter named `context` that is not a binding must be annotated with a class named `Context`
  (annotations are resolved with `typing.get_type_hints`, as the worker does: `func.Context | None`
  is a union, not a class, and is refused);
- every parameter is a binding and every binding (except `$return`) is a parameter;
- an `out` binding's annotation is `func.Out[T]`, an `in` binding's is not; `T` and every other annotation
  must be a class or a `typing` generic (`typing.List[str]`; the builtin `list[str]` is neither);
- each annotation must pass the binding's converter check (`str`/`bytes` go to the worker's "generic"
  binding unless the binding has an implicit output);
- the `$return` binding is `out`, and its return annotation passes the converter's output check.

Only the standard library and azure-functions are used: the deploy check runs this file inside a venv
built from requirements.txt alone. From an app's folder: `python worker_rules.py [function_app]`.
"""

from __future__ import annotations

import argparse
import collections.abc
import importlib
import inspect
import json
import os
import sys
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import azure.functions as func
from azure.functions.meta import Datum

RETURN = "$return"
CONTEXT = "context"
GENERIC = "generic"
_IN, _OUT, _INOUT = 0, 1, 2  # the worker's BindingInfo.Direction values (the library uses the same numbers)
_NO_IMPLICIT_OUTPUT = frozenset({"durableClient"})  # the worker's exemption for unknown binding types


class FunctionLoadError(Exception):
    """The worker refuses a function; the message is the worker's ("cannot load the X function: ...")."""

    def __init__(self, function_name: str, reason: str, parameter: str | None = None) -> None:
        super().__init__(f"cannot load the {function_name} function: {reason}")
        self.function_name = function_name
        self.parameter = parameter
        self.reason = reason


class AppIndexError(ValueError):
    """The module holds no function app, or more than one (the worker indexes exactly one)."""


@dataclass(frozen=True)
class ParamType:
    """How the worker converts one parameter: the converter's binding name and the annotation (None if absent)."""

    binding_type: str
    pytype: Any


@dataclass(frozen=True)
class IndexedFunction:
    """One function as the worker registers it after its checks passed."""

    name: str
    user_function: Callable[..., Any]
    requires_context: bool
    is_async: bool
    has_return: bool
    inputs: Mapping[str, ParamType]
    outputs: Mapping[str, ParamType]
    return_type: ParamType | None


# --- the worker's view of typing (its vendored typing_inspect): typing generics count, builtin ones do not.

_ALIAS_TYPES = tuple(getattr(typing, name) for name in ("_GenericAlias", "_SpecialGenericAlias"))
_NOT_GENERIC_ORIGINS = (typing.Union, tuple, typing.ClassVar, collections.abc.Callable)


def _is_generic(tp: Any) -> bool:
    if isinstance(tp, type) and issubclass(tp, typing.Generic):
        return True
    return isinstance(tp, _ALIAS_TYPES) and tp.__origin__ not in _NOT_GENERIC_ORIGINS


def _origin(tp: Any) -> Any:
    if isinstance(tp, _ALIAS_TYPES[0]):
        return None if tp.__origin__ is typing.ClassVar else tp.__origin__
    return typing.Generic if tp is typing.Generic else None


def _args(tp: Any) -> tuple[Any, ...]:
    return tuple(tp.__args__) if isinstance(tp, _ALIAS_TYPES[0]) else ()


def _is_out(annotation: Any) -> bool:
    """True for `func.Out[T]` (and bare `func.Out`): the worker compares the class name, not the class."""
    candidate = _origin(annotation) if _is_generic(annotation) and _origin(annotation) is not None else annotation
    return isinstance(candidate, type) and candidate.__name__ == "Out"


def _name_of(tp: Any) -> str:
    return str(getattr(tp, "__name__", tp))


# --- converters: the library's registry, else the worker's own "generic" binding.


class GenericBinding:
    """The worker's fallback for binding types without a library converter (and for str/bytes parameters)."""

    @classmethod
    def check_input_type_annotation(cls, pytype: Any) -> bool:
        return issubclass(pytype, str | bytes)

    @classmethod
    def check_output_type_annotation(cls, pytype: Any) -> bool:
        return issubclass(pytype, str | bytes | bytearray)

    @classmethod
    def decode(cls, data: Datum | None, *, trigger_metadata: Mapping[str, Datum] | None) -> Any:
        if data is None or data.type is None:
            return None
        if data.type in ("string", "bytes", "json"):
            return data.value
        raise ValueError(f'unexpected type of data received for the "generic" binding : {data.type!r}')

    @classmethod
    def encode(cls, obj: Any, *, expected_type: Any) -> Datum:
        if isinstance(obj, str):
            return Datum(obj, "string")
        if isinstance(obj, bytes | bytearray):
            return Datum(bytes(obj), "bytes")
        if obj is None:
            return Datum(None, None)
        if isinstance(obj, dict | list):
            return Datum(json.dumps(obj), "json")
        if isinstance(obj, int):
            return Datum(obj, "int")
        if isinstance(obj, float):
            return Datum(obj, "double")
        raise NotImplementedError


def _registered(binding_type: str) -> Any:
    registry: Any = func.get_binding_registry()  # type: ignore[no-untyped-call]
    return registry.get(binding_type)


def converter(binding_type: str) -> Any:
    """The converter the worker uses for a binding type: the library's, else the generic binding."""
    found = _registered(binding_type)
    return found if found is not None else GenericBinding


def has_implicit_output(binding_type: str) -> bool:
    """The worker's rule: unknown binding types count as having an implicit output (durableClient excepted)."""
    found = _registered(binding_type)
    if found is None:
        return binding_type not in _NO_IMPLICIT_OUTPUT
    return bool(getattr(found, "has_implicit_output", lambda: False)())


def decode_argument(param: ParamType, data: Datum, trigger_metadata: Mapping[str, Datum] | None) -> Any:
    """The argument the worker passes for incoming data, through the parameter's converter."""
    handler = converter(param.binding_type)
    is_trigger = handler is not GenericBinding and handler.has_trigger_support()
    try:
        return handler.decode(data, trigger_metadata=dict(trigger_metadata or {}) if is_trigger else {})
    except NotImplementedError:
        raise TypeError(
            f"unable to decode incoming TypedData: unsupported combination of TypedData field {data.type!r} "
            f"and expected binding type {param.binding_type}"
        ) from None


def encode_value(param: ParamType, value: Any) -> Datum:
    """The data the worker sends the host for an output or return value, through the converter."""
    try:
        datum: Datum = converter(param.binding_type).encode(value, expected_type=param.pytype)
    except NotImplementedError:
        raise TypeError(
            f'unable to encode outgoing TypedData: unsupported type "{param.binding_type}" '
            f'for Python type "{type(value).__name__}"'
        ) from None
    return datum


# --- indexing


def find_app(module: ModuleType) -> func.FunctionRegister:
    """The module's one top-level FunctionRegister (FunctionApp, AsgiFunctionApp, ...). Raises AppIndexError."""
    apps = [value for name in dir(module) if isinstance(value := getattr(module, name, None), func.FunctionRegister)]
    if not apps:
        raise AppIndexError(f"no top-level function app instance (func.FunctionApp) in {module.__name__}")
    if len(apps) > 1:
        raise AppIndexError(
            f"more than one top-level function app instance in {module.__name__}: the worker indexes exactly one"
        )
    return apps[0]


def index_app(app: func.FunctionRegister) -> list[IndexedFunction]:
    """`app.get_functions()` and the worker's checks on each, in order. The first refusal raises FunctionLoadError.

    Duplicate function names raise the library's ValueError, as they do under the worker.
    """
    return [index_function(function) for function in app.get_functions()]


def index_function(function: func.Function) -> IndexedFunction:
    """The worker's `Registry.add_indexed_function` checks for one function. Raises FunctionLoadError."""
    name = str(function.get_function_name())
    user_function = function.get_user_function()
    params = dict(inspect.signature(user_function).parameters)
    try:
        annotations = typing.get_type_hints(user_function)
    except Exception as exc:  # the worker fails the indexing with this very exception
        raise FunctionLoadError(
            name, f"its annotations cannot be resolved by typing.get_type_hints: {type(exc).__name__}: {exc}"
        ) from exc

    bound: dict[str, Any] = {}
    explicit_return = implicit_return = False
    return_binding: str | None = None
    for binding in function.get_bindings():
        if binding.direction == _INOUT:
            raise FunctionLoadError(name, '"inout" bindings are not supported', binding.name)
        if binding.name == RETURN:
            if binding.direction != _OUT:
                raise FunctionLoadError(name, '"$return" binding must have direction set to "out"', RETURN)
            if not explicit_return:
                return_binding = binding.type
            explicit_return = True
            continue
        if has_implicit_output(str(binding.type)):
            implicit_return = True
            if not explicit_return:
                return_binding = binding.type
        bound[binding.name] = binding

    requires_context = _check_context(name, params, bound, annotations)
    inputs, outputs = _check_parameters(name, params, bound, annotations)
    return_type = _check_return(name, annotations, explicit_return, implicit_return, return_binding)
    return IndexedFunction(
        name=name,
        user_function=user_function,
        requires_context=requires_context,
        is_async=inspect.iscoroutinefunction(user_function),
        has_return=explicit_return or implicit_return,
        inputs=inputs,
        outputs=outputs,
        return_type=return_type,
    )


def _check_context(
    name: str, params: dict[str, inspect.Parameter], bound: dict[str, Any], annotations: dict[str, Any]
) -> bool:
    if CONTEXT not in params or CONTEXT in bound:
        return False
    params.pop(CONTEXT)
    if CONTEXT in annotations:
        annotation = annotations[CONTEXT]
        if not (isinstance(annotation, type) and annotation.__name__ == "Context"):
            raise FunctionLoadError(
                name,
                f'the "context" parameter is expected to be of type azure.functions.Context, got {annotation!r}',
                CONTEXT,
            )
    return True


def _names(names: set[str]) -> str:
    return "{" + ", ".join(repr(item) for item in sorted(names)) + "}"


def _check_parameters(
    name: str, params: dict[str, inspect.Parameter], bound: dict[str, Any], annotations: dict[str, Any]
) -> tuple[dict[str, ParamType], dict[str, ParamType]]:
    unbound = set(params) - set(bound)
    if unbound:
        raise FunctionLoadError(
            name,
            "the following parameters are declared in Python but not in the function definition "
            f"(function.json or function decorators): {_names(unbound)}",
            sorted(unbound)[0],
        )
    missing = set(bound) - set(params)
    if missing:
        raise FunctionLoadError(
            name,
            "the following parameters are declared in the function definition (function.json or function "
            f"decorators) but not in Python: {_names(missing)}",
            sorted(missing)[0],
        )
    inputs: dict[str, ParamType] = {}
    outputs: dict[str, ParamType] = {}
    for param in params:
        binding = bound[param]
        is_binding_out = binding.direction == _OUT
        param_type = _check_parameter(name, param, binding, annotations, is_binding_out)
        (outputs if is_binding_out else inputs)[param] = param_type
    return inputs, outputs


def _check_parameter(
    name: str, param: str, binding: Any, annotations: dict[str, Any], is_binding_out: bool
) -> ParamType:
    if param not in annotations:
        return ParamType(str(binding.type), None)  # unannotated: the worker checks nothing
    annotation = annotations[param]
    is_param_out = _is_out(annotation)
    pytype = annotation
    if is_param_out:
        args = _args(annotation)
        if len(args) != 1:
            raise FunctionLoadError(name, f"binding {param} has invalid Out annotation {annotation!r}", param)
        pytype = args[0]
    if not isinstance(pytype, type) and not _is_generic(pytype):
        raise FunctionLoadError(name, f"binding {param} has invalid non-type annotation {annotation!r}", param)
    if is_binding_out and not is_param_out:
        raise FunctionLoadError(
            name,
            f'binding {param} is declared to have the "out" direction, but its annotation in Python is not '
            "a subclass of azure.functions.Out",
            param,
        )
    if not is_binding_out and is_param_out:
        raise FunctionLoadError(
            name,
            f'binding {param} is declared to have the "in" direction in the function definition (function.json '
            "or function decorators), but its annotation is azure.functions.Out in Python",
            param,
        )
    binding_type = str(binding.type)
    if pytype in (str, bytes) and not has_implicit_output(binding_type):
        binding_type = GENERIC
    handler = converter(binding_type)
    check_name = "check_output_type_annotation" if is_param_out else "check_input_type_annotation"
    try:
        accepted = bool(getattr(handler, check_name)(pytype))
    except (AttributeError, TypeError) as exc:  # the worker's indexing dies on the same exception
        reason = f"binding {param}: the {binding.type!r} converter's {check_name} failed on {annotation!r}: {exc}"
        raise FunctionLoadError(name, reason, param) from exc
    if not accepted:
        data_type = getattr(binding, "data_type", None)
        shown = f' and dataType "{data_type}"' if data_type is not None else ""
        raise FunctionLoadError(
            name,
            f'{param!r} binding type "{binding.type}"{shown} in function definition (function.json or function '
            f"decorators) do not match the corresponding function parameter's Python type annotation "
            f'"{_name_of(pytype)}"',
            param,
        )
    return ParamType(binding_type, pytype)


def _check_return(
    name: str, annotations: dict[str, Any], explicit: bool, implicit: bool, binding_type: str | None
) -> ParamType | None:
    pytype = None
    if explicit and "return" in annotations:
        annotation = annotations["return"]
        if _is_generic(annotation) and _name_of(_origin(annotation)) == "Out":
            raise FunctionLoadError(name, "return annotation should not be azure.functions.Out", RETURN)
        if not isinstance(annotation, type):
            raise FunctionLoadError(name, f"has invalid non-type return annotation {annotation!r}", RETURN)
        # The worker's "generic" switch for str/bytes never fires for return values (it compares with `is`).
        if not converter(str(binding_type)).check_output_type_annotation(annotation):
            raise FunctionLoadError(
                name,
                f'Python return annotation "{annotation.__name__}" does not match binding type "{binding_type}"',
                RETURN,
            )
        pytype = annotation
    if implicit and "return" in annotations:
        pytype = annotations["return"]
    if not (explicit or implicit):
        return None
    return ParamType(str(binding_type), pytype)


# --- command line: what the deploy check runs inside the deployment venv.


def main(argv: list[str] | None = None) -> int:
    """Import the app module from the current folder, index it as the worker does and print the functions as JSON.

    Exit status 1, with the worker's reason on stderr, when the app cannot be indexed.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("module", nargs="?", default="function_app", help="the app module (default function_app)")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(args.module.removesuffix(".py"))
        functions = index_app(find_app(module))
    except (FunctionLoadError, AppIndexError, ValueError) as exc:
        print(f"worker indexing failed: {exc}", file=sys.stderr)
        return 1
    report = [
        {
            "name": function.name,
            "inputs": {param: kind.binding_type for param, kind in function.inputs.items()},
            "outputs": {param: kind.binding_type for param, kind in function.outputs.items()},
            "return": function.return_type.binding_type if function.return_type else None,
            "context": function.requires_context,
        }
        for function in functions
    ]
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
