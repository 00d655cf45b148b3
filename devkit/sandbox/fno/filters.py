"""F&O's `$filter` dialect: what it accepts, and a fast predicate over stored rows.

On top of the shared OData parser: string comparisons are case-insensitive
(SQL Server collation) and `eq '*x*'` is a wildcard; enum properties compare
only with `eq`/`ne` against a namespace-qualified enum literal of their own
type; `has`, `in` and the string functions are rejected with a message.

`compile_filter` turns the common shapes (property eq/ne/lt/... literal,
and/or/not) into a predicate over the stored row tuples, so a filtered read
of a million rows does not build a million dicts; anything else falls back to
the shared evaluator on a dict.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from typing import Any

from devkit.sandbox.fno.errors import FnoError, bad_query
from devkit.sandbox.fno.schema import EntityDef
from devkit.sandbox.odata import (
    Arith,
    BoolOp,
    Call,
    Compare,
    Expr,
    InList,
    Literal,
    Not,
    ODataSyntaxError,
    Property,
    evaluate,
    parse_filter,
)

Row = tuple[Any, ...]
Predicate = Callable[[Row], bool]
_UNSUPPORTED_OPERATOR = re.compile(r"(has|in)\b")
_ORDERING: dict[str, Callable[[Any, Any], bool]] = {
    "gt": operator.gt, "ge": operator.ge, "lt": operator.lt, "le": operator.le,
}


def unknown_property(entity: EntityDef, name: str) -> FnoError:
    """The OData error for a property the entity type does not declare."""
    return bad_query(f"Could not find a property named '{name}' on type '{entity.full_type}'.")


def _incompatible(left: str, right: str, op: str) -> FnoError:
    kinds = {"eq": "Equal", "ne": "NotEqual", "gt": "GreaterThan", "ge": "GreaterThanOrEqual",
             "lt": "LessThan", "le": "LessThanOrEqual"}
    return bad_query(
        "A binary operator with incompatible types was detected. Found operand types "
        f"'{left}' and '{right}' for operator kind '{kinds.get(op, op)}'."
    )


def _literal_type(literal: Literal) -> str:
    if literal.kind == "enum":
        return str(literal.enum_type)
    return {"string": "Edm.String", "int": "Edm.Int32", "decimal": "Edm.Decimal", "bool": "Edm.Boolean",
            "guid": "Edm.Guid", "datetime": "Edm.DateTimeOffset", "date": "Edm.Date"}.get(literal.kind, "null")


def _check_enum_compare(entity: EntityDef, expr: Compare) -> None:
    for prop_side, other in ((expr.left, expr.right), (expr.right, expr.left)):
        if isinstance(prop_side, Property) and isinstance(other, Literal):
            prop = entity.by_name.get(prop_side.path[0])
            if prop is None:
                continue
            if prop.enum is None:
                if other.kind == "enum":
                    raise _incompatible(prop.edm_type, _literal_type(other), expr.op)
                continue
            if other.kind != "enum" or other.enum_type != prop.enum.full_name:
                raise _incompatible(prop.edm_type, _literal_type(other), expr.op)
            if expr.op not in ("eq", "ne"):
                raise bad_query(
                    f"The operator '{expr.op}' is not supported for the enum property '{prop.name}'; "
                    "only 'eq' and 'ne' are."
                )
            if other.value not in prop.enum.members:
                raise bad_query(
                    f"The string '{other.value}' is not a valid enumeration type constant of "
                    f"'{prop.enum.full_name}'."
                )


def _validate(entity: EntityDef, expr: Expr) -> None:
    """Reject what F&O rejects: unknown properties, navigation, functions, `in`, bad enum use."""
    if isinstance(expr, Property):
        if len(expr.path) > 1 or expr.path[0] not in entity.by_name:
            raise unknown_property(entity, "/".join(expr.path))
    elif isinstance(expr, InList):
        raise bad_query("An unknown function with name 'Microsoft.Dynamics.CRM.In' was found.")
    elif isinstance(expr, Call):
        raise bad_query(
            f"The function '{expr.name}' is not supported; use a wildcard instead, e.g. Name eq '*text*'."
        )
    elif isinstance(expr, Compare):
        _check_enum_compare(entity, expr)
        _validate(entity, expr.left)
        _validate(entity, expr.right)
    elif isinstance(expr, BoolOp):
        for operand in expr.operands:
            _validate(entity, operand)
    elif isinstance(expr, Arith):
        _validate(entity, expr.left)
        _validate(entity, expr.right)
    elif isinstance(expr, Not):
        _validate(entity, expr.operand)


def parse_filter_for(entity: EntityDef, text: str) -> Expr:
    """Parse and check a `$filter` for `entity`; raises FnoError with the service's message."""
    try:
        expr = parse_filter(text)
    except ODataSyntaxError as exc:
        position = exc.position if exc.position is not None else -1
        found = _UNSUPPORTED_OPERATOR.match(text, position) if position >= 0 else None
        if found:
            raise bad_query(f"The operator '{found.group(1)}' is not supported by this service.") from None
        raise bad_query(exc.message) from None
    _validate(entity, expr)
    return expr


def _simple(entity: EntityDef, expr: Compare, index: dict[str, int]) -> Predicate | None:
    """A tuple predicate for `Property op Literal` when the types are plain, else None."""
    if not isinstance(expr.left, Property) or not isinstance(expr.right, Literal):
        return None
    prop = entity.by_name[expr.left.path[0]]
    pos = index[prop.name]
    literal = expr.right
    value = literal.value
    if prop.kind == "string" and literal.kind == "string" and expr.op in ("eq", "ne") and "*" not in value:
        folded = value.casefold()
        if expr.op == "eq":
            return lambda row: bool(row[pos].casefold() == folded)
        return lambda row: bool(row[pos].casefold() != folded)
    if prop.enum is not None and literal.kind == "enum":
        return (lambda row: row[pos] == value) if expr.op == "eq" else (lambda row: row[pos] != value)
    if prop.kind in ("int32", "int64") and literal.kind == "int":
        compare = _ORDERING.get(expr.op) or (operator.eq if expr.op == "eq" else operator.ne)
        return lambda row: bool(compare(row[pos], value))
    return None


def _compile(entity: EntityDef, expr: Expr, index: dict[str, int]) -> Predicate | None:
    if isinstance(expr, Compare):
        return _simple(entity, expr, index)
    if isinstance(expr, BoolOp):
        parts = [_compile(entity, operand, index) for operand in expr.operands]
        if any(p is None for p in parts):
            return None
        checks = tuple(p for p in parts if p is not None)
        if expr.op == "and":
            return lambda row: all(check(row) for check in checks)
        return lambda row: any(check(row) for check in checks)
    if isinstance(expr, Not):
        inner = _compile(entity, expr.operand, index)
        return None if inner is None else (lambda row: not inner(row))
    return None


def compile_filter(entity: EntityDef, expr: Expr, columns: tuple[str, ...]) -> Predicate:
    """A predicate over stored row tuples (column order `columns`) equivalent to evaluating `expr`."""
    index = {name: i for i, name in enumerate(columns)}
    fast = _compile(entity, expr, index)
    if fast is not None:
        return fast
    return lambda row: evaluate(expr, dict(zip(columns, row, strict=True)), case_insensitive=True, wildcard=True)


def key_lookup(entity: EntityDef, expr: Expr | None) -> Any | None:
    """The key value when the filter is exactly `Key eq 'value'` on a one-field key (no wildcard)."""
    if (
        isinstance(expr, Compare)
        and expr.op == "eq"
        and isinstance(expr.left, Property)
        and isinstance(expr.right, Literal)
        and entity.keys == expr.left.path
        and expr.right.kind == "string"
        and entity.by_name[entity.keys[0]].kind == "string"
        and "*" not in expr.right.value
    ):
        return expr.right.value
    return None
