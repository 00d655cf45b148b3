"""Fast `$filter` predicates over stored row tuples, for the shapes that scans of big tables use.

`compile_filter` turns `and` / `or` / `not` trees of `column op literal`,
`column eq|ne null` and `contains|startswith|endswith(column,'text')` into
closures over tuple positions, with the same results as `odata.evaluate` with
Dataverse semantics (case-insensitive strings, null never ordered). A
comparison whose literal does not match the column's type, a navigation path
or any other construct makes it return None, and the caller evaluates the
generic way.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from devkit.sandbox.dataverse.schema import CHOICE_TYPES, STRING_TYPES, TableDef
from devkit.sandbox.odata import BoolOp, Call, Compare, Expr, Literal, Not, Property

Predicate = Callable[[tuple[Any, ...]], bool]
_ORDER = {"gt": operator.gt, "ge": operator.ge, "lt": operator.lt, "le": operator.le}
_NUMBER_TYPES = frozenset({*CHOICE_TYPES, "Integer", "BigInt", "Decimal", "Money", "Double"})


def _literal_for(kind: str, literal: Literal) -> tuple[bool, Any]:
    """(usable, comparable value) of a literal against a column type; the value is in stored form."""
    value = literal.value
    if kind in STRING_TYPES and literal.kind == "string":
        return True, value.casefold()
    if kind in _NUMBER_TYPES and literal.kind in ("int", "decimal"):
        return True, value
    if kind == "Boolean" and literal.kind == "bool":
        return True, value
    if kind in ("Uniqueidentifier", "Lookup") and literal.kind in ("guid", "string"):
        return True, str(value).lower()
    if kind == "DateTime" and literal.kind == "datetime" and isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=UTC)
        if moment.microsecond:
            return False, None  # stored values are whole seconds; leave sub-second literals to the evaluator
        return True, moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return False, None


def _compare(expr: Compare, definition: TableDef, index: dict[str, int]) -> Predicate | None:
    left, right, op = expr.left, expr.right, expr.op
    if isinstance(left, Literal) and isinstance(right, Property):
        left, right = right, left
        op = {"gt": "lt", "ge": "le", "lt": "gt", "le": "ge"}.get(op, op)
    if not isinstance(left, Property) or not isinstance(right, Literal) or len(left.path) != 1:
        return None
    column = definition.readable.get(left.path[0])
    if column is None:
        return None
    pos = index[column.name]
    if right.kind == "null":
        if op == "eq":
            return lambda row: row[pos] is None
        if op == "ne":
            return lambda row: row[pos] is not None
        return lambda row: False
    usable, wanted = _literal_for(column.type, right)
    if not usable:
        return None
    fold = column.type in STRING_TYPES or column.type in ("Uniqueidentifier", "Lookup")
    lower = column.type in ("Uniqueidentifier", "Lookup")

    def value(row: tuple[Any, ...]) -> Any:
        v = row[pos]
        if v is None or not fold:
            return v
        return v.lower() if lower else v.casefold()

    if op == "eq":
        return lambda row: value(row) == wanted
    if op == "ne":
        return lambda row: value(row) != wanted
    compare = _ORDER[op]

    def ordered(row: tuple[Any, ...]) -> bool:
        v = value(row)
        return v is not None and bool(compare(v, wanted))

    return ordered


def _call(expr: Call, definition: TableDef, index: dict[str, int]) -> Predicate | None:
    if expr.name not in ("contains", "startswith", "endswith") or len(expr.args) != 2:
        return None
    prop, literal = expr.args
    if not isinstance(prop, Property) or not isinstance(literal, Literal) or literal.kind != "string":
        return None
    column = definition.readable.get(prop.path[0]) if len(prop.path) == 1 else None
    if column is None or column.type not in STRING_TYPES:
        return None
    pos, needle, name = index[column.name], literal.value.casefold(), expr.name

    def test(row: tuple[Any, ...]) -> bool:
        v = row[pos]
        if not isinstance(v, str):
            return False
        v = v.casefold()
        if name == "contains":
            return needle in v
        return v.startswith(needle) if name == "startswith" else v.endswith(needle)

    return test


def compile_filter(expr: Expr, definition: TableDef, index: dict[str, int]) -> Predicate | None:
    """A predicate over stored tuples equivalent to `evaluate(expr, ...)`, or None when not compilable."""
    if isinstance(expr, Compare):
        return _compare(expr, definition, index)
    if isinstance(expr, Call):
        return _call(expr, definition, index)
    if isinstance(expr, Not):
        inner = compile_filter(expr.operand, definition, index)
        return None if inner is None else (lambda row: not inner(row))
    if isinstance(expr, BoolOp):
        parts = [compile_filter(operand, definition, index) for operand in expr.operands]
        if any(p is None for p in parts):
            return None
        predicates = [p for p in parts if p is not None]
        if expr.op == "and":
            return lambda row: all(p(row) for p in predicates)
        return lambda row: any(p(row) for p in predicates)
    return None
