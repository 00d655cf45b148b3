"""Server-side OData query syntax for both emulators: `$filter`, key predicates, `$select`, `$orderby`.

A hand-written tokenizer and recursive-descent parser, so every error can say
where it happened in the words the real services use (OData's own parser
messages, e.g. "There is an unterminated literal at position 17 in '...'").
Positions are zero-based character offsets into the text, as OData reports
them. Parsing never raises anything but `ODataSyntaxError`.

Both dialects are accepted by the same parser: Dataverse's `Microsoft.Dynamics.CRM.In`
and F&O's enum literals (`Microsoft.Dynamics.DataEntities.NoYes'Yes'`) and
arithmetic. What differs at evaluation time (case-insensitive strings for
Dataverse, `'*x*'` wildcards for F&O) is chosen by the caller of `evaluate`.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

__all__ = [
    "Arith",
    "BoolOp",
    "Call",
    "Compare",
    "Expr",
    "InList",
    "Literal",
    "Not",
    "ODataSyntaxError",
    "Property",
    "evaluate",
    "format_key_predicate",
    "format_literal",
    "parse_filter",
    "parse_key_predicate",
    "parse_orderby",
    "parse_select",
    "properties",
    "split_entity_path",
]

MAX_DEPTH = 100


class ODataSyntaxError(ValueError):
    """A query option or key that cannot be parsed. `message` is what the service would say."""

    def __init__(self, message: str, position: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.position = position


# --- expression tree -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Literal:
    """A constant. kind: string, int, decimal, bool, null, guid, datetime, date or enum."""

    value: Any
    kind: str
    enum_type: str | None = None


@dataclass(frozen=True, slots=True)
class Property:
    """A property, or a navigation path such as `sdkmessageid/name`."""

    path: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Compare:
    """`left op right` with op one of eq ne gt ge lt le."""

    op: str
    left: Expr
    right: Expr


@dataclass(frozen=True, slots=True)
class BoolOp:
    """`a and b and ...` / `a or b or ...`: n-ary, so a filter with a thousand `or`s stays flat."""

    op: str
    operands: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Not:
    """`not operand`."""

    operand: Expr


@dataclass(frozen=True, slots=True)
class Arith:
    """`left op right` with op one of add sub mul div divby mod (F&O)."""

    op: str
    left: Expr
    right: Expr


@dataclass(frozen=True, slots=True)
class Call:
    """A built-in function: contains, startswith, endswith (two arguments), tolower, toupper, trim."""

    name: str
    args: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class InList:
    """`Microsoft.Dynamics.CRM.In(PropertyName=...,PropertyValues=[...])` (negated: NotIn)."""

    property: str
    values: tuple[Any, ...]
    negated: bool = False


Expr = Literal | Property | Compare | BoolOp | Not | Arith | Call | InList

_COMPARISONS = frozenset({"eq", "ne", "gt", "ge", "lt", "le"})
_ADDITIVE = frozenset({"add", "sub"})
_MULTIPLICATIVE = frozenset({"mul", "div", "divby", "mod"})
_FUNCTIONS = {"contains": 2, "startswith": 2, "endswith": 2, "tolower": 1, "toupper": 1, "trim": 1}
_CRM_FUNCTIONS = {"Microsoft.Dynamics.CRM.In": False, "Microsoft.Dynamics.CRM.NotIn": True}

# --- tokenizer ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # ident string dqstring int decimal guid datetime date enum ( ) , / = [ ] end
    text: str
    pos: int
    value: Any = None


_DATETIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d{1,7})?)?(?:Z|[+-]\d{2}:\d{2})(?![\w.])")
_GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}(?![\w.-])")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}(?![\w.:-])")
_NUMBER = re.compile(r"-?\d+(?:(\.\d+)?([eE][+-]?\d+)?)(?:[mMdDfFlL])?(?![\w.])")
_IDENT = re.compile(r"[^\W\d]\w*(?:\.[^\W\d]\w*)*|\$[^\W\d]\w*")
_DQSTRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_PUNCT = frozenset("(),/=[]")


def _quote(text: str) -> str:
    return f"'{text}'"


def _error(message: str, pos: int, text: str) -> ODataSyntaxError:
    return ODataSyntaxError(f"{message} at position {pos} in {_quote(text)}.", pos)


def _read_string(text: str, start: int) -> tuple[str, int]:
    """Read a '...' literal starting at `start` (the quote); '' is an embedded quote. Returns (value, end)."""
    out: list[str] = []
    i = start + 1
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "'":
            if i + 1 < n and text[i + 1] == "'":
                out.append("'")
                i += 2
                continue
            return "".join(out), i + 1
        out.append(ch)
        i += 1
    raise ODataSyntaxError(f"There is an unterminated literal at position {n} in {_quote(text)}.", n)


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch in " \t\r\n":
            i += 1
            continue
        if ch == "'":
            value, end = _read_string(text, i)
            tokens.append(_Token("string", text[i:end], i, value))
            i = end
            continue
        if ch in _PUNCT:
            tokens.append(_Token(ch, ch, i))
            i += 1
            continue
        if ch == '"':
            m = _DQSTRING.match(text, i)
            if m is None:
                raise ODataSyntaxError(
                    f"There is an unterminated literal at position {n} in {_quote(text)}.", n
                )
            try:
                value = json.loads(m.group())
            except ValueError:
                raise _error("Syntax error", i, text) from None
            tokens.append(_Token("dqstring", m.group(), i, value))
            i = m.end()
            continue
        if ch.isdigit() or (ch == "-" and i + 1 < n and text[i + 1].isdigit()):
            token = _read_number_like(text, i)
            tokens.append(token)
            i += len(token.text)
            continue
        m = _GUID.match(text, i)
        if m is not None:
            tokens.append(_Token("guid", m.group(), i, m.group()))
            i = m.end()
            continue
        m = _IDENT.match(text, i)
        if m is not None:
            end = m.end()
            if end < n and text[end] == "'" and "." in m.group():
                # Namespace.Type'Member': an enum literal (F&O).
                member, stop = _read_string(text, end)
                tokens.append(_Token("enum", text[i:stop], i, (m.group(), member)))
                i = stop
                continue
            tokens.append(_Token("ident", m.group(), i, m.group()))
            i = end
            continue
        raise _error(f"Syntax error: character '{ch}' is not valid", i, text)
    tokens.append(_Token("end", "", n))
    return tokens


def _read_number_like(text: str, i: int) -> _Token:
    for pattern, kind in ((_DATETIME, "datetime"), (_GUID, "guid"), (_DATE, "date")):
        m = pattern.match(text, i)
        if m is not None:
            raw = m.group()
            try:
                if kind == "datetime":
                    value: Any = _parse_datetime(raw)
                elif kind == "date":
                    value = date.fromisoformat(raw)
                else:
                    value = raw
            except ValueError:
                raise ODataSyntaxError(
                    f"Unrecognized '{_EDM[kind]}' literal '{raw}' at '{i}' in {_quote(text)}.", i
                ) from None
            return _Token(kind, raw, i, value)
    m = _NUMBER.match(text, i)
    if m is None:
        raise _error("Syntax error", i, text)
    raw = m.group()
    digits = raw.rstrip("mMdDfFlL")
    try:
        if m.group(1) or m.group(2) or raw[-1] in "mMdDfF":
            return _Token("decimal", raw, i, float(digits))
        return _Token("int", raw, i, int(digits))
    except ValueError:  # more digits than Python converts
        raise ODataSyntaxError(f"Unrecognized 'Edm.Int64' literal '{raw}' at '{i}' in {_quote(text)}.", i) from None


_EDM = {"datetime": "Edm.DateTimeOffset", "date": "Edm.Date", "guid": "Edm.Guid"}


def _parse_datetime(raw: str) -> datetime:
    fraction = re.search(r"\.(\d+)", raw)
    if fraction and len(fraction.group(1)) > 6:  # OData allows 7 digits, Python 6
        raw = raw.replace(fraction.group(0), "." + fraction.group(1)[:6])
    value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    return value


# --- parser ------------------------------------------------------------------------


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0
        self.depth = 0

    @property
    def tok(self) -> _Token:
        return self.tokens[self.i]

    def advance(self) -> _Token:
        token = self.tokens[self.i]
        if token.kind != "end":
            self.i += 1
        return token

    def is_word(self, words: frozenset[str] | str) -> bool:
        tok = self.tok
        return tok.kind == "ident" and (tok.text == words if isinstance(words, str) else tok.text in words)

    def expect(self, kind: str, message: str) -> _Token:
        if self.tok.kind != kind:
            raise _error(message, self.tok.pos, self.text)
        return self.advance()

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _error(
                f"The limit of '{MAX_DEPTH}' for maximum recursion depth has been exceeded", self.tok.pos, self.text
            )

    def parse(self) -> Expr:
        if self.tok.kind == "end":
            raise _error("Expression expected", self.tok.pos, self.text)
        expr = self.parse_or()
        if self.tok.kind != "end":
            raise _error("Syntax error", self.tok.pos, self.text)
        return expr

    def parse_or(self) -> Expr:
        self.enter()
        operands = [self.parse_and()]
        while self.is_word("or"):
            self.advance()
            operands.append(self.parse_and())
        self.depth -= 1
        return operands[0] if len(operands) == 1 else BoolOp("or", tuple(operands))

    def parse_and(self) -> Expr:
        operands = [self.parse_not()]
        while self.is_word("and"):
            self.advance()
            operands.append(self.parse_not())
        return operands[0] if len(operands) == 1 else BoolOp("and", tuple(operands))

    def parse_not(self) -> Expr:
        if self.is_word("not"):
            self.enter()
            self.advance()
            operand = self.parse_not()
            self.depth -= 1
            return Not(operand)
        return self.parse_comparison()

    def parse_comparison(self) -> Expr:
        left = self.parse_additive()
        if self.is_word(_COMPARISONS):
            op = self.advance().text
            left = Compare(op, left, self.parse_additive())
        return left

    # Arithmetic trees are left-deep, so each operator counts towards the depth limit: evaluating
    # them recurses once per operator.
    def parse_additive(self) -> Expr:
        depth = self.depth
        left = self.parse_multiplicative()
        while self.is_word(_ADDITIVE):
            self.enter()
            op = self.advance().text
            left = Arith(op, left, self.parse_multiplicative())
        self.depth = depth
        return left

    def parse_multiplicative(self) -> Expr:
        depth = self.depth
        left = self.parse_primary()
        while self.is_word(_MULTIPLICATIVE):
            self.enter()
            op = self.advance().text
            left = Arith(op, left, self.parse_primary())
        self.depth = depth
        return left

    def parse_primary(self) -> Expr:
        tok = self.tok
        if tok.kind == "(":
            self.enter()
            self.advance()
            inner = self.parse_or()
            self.expect(")", "')' or operator expected")
            self.depth -= 1
            return inner
        if tok.kind in ("string", "int", "decimal", "guid", "datetime", "date"):
            self.advance()
            return Literal(tok.value, tok.kind)
        if tok.kind == "enum":
            self.advance()
            enum_type, member = tok.value
            return Literal(member, "enum", enum_type)
        if tok.kind == "ident":
            return self.parse_identifier()
        raise _error("Expression expected", tok.pos, self.text)

    def parse_identifier(self) -> Expr:
        tok = self.advance()
        name = tok.text
        if name in ("true", "false"):
            return Literal(name == "true", "bool")
        if name == "null":
            return Literal(None, "null")
        if self.tok.kind == "(":
            if name in _CRM_FUNCTIONS:
                return self.parse_crm_function(name)
            if name not in _FUNCTIONS:
                raise _error(f"An unknown function with name '{name}' was found", tok.pos, self.text)
            return self.parse_call(name)
        if name in _COMPARISONS or name in ("and", "or") or "." in name:
            raise _error("Expression expected", tok.pos, self.text)
        path = [name]
        while self.tok.kind == "/":
            self.advance()
            segment = self.expect("ident", "Expression expected")
            path.append(segment.text)
        return Property(tuple(path))

    def parse_call(self, name: str) -> Expr:
        self.enter()
        self.advance()  # (
        args: list[Expr] = []
        if self.tok.kind != ")":
            args.append(self.parse_or())
            while self.tok.kind == ",":
                self.advance()
                args.append(self.parse_or())
        self.expect(")", "')' or ',' expected")
        self.depth -= 1
        if len(args) != _FUNCTIONS[name]:
            raise _error(
                f"The function '{name}' takes {_FUNCTIONS[name]} argument(s), {len(args)} given",
                self.tok.pos,
                self.text,
            )
        return Call(name, tuple(args))

    def parse_crm_function(self, name: str) -> Expr:
        self.advance()  # (
        params: dict[str, Any] = {}
        while True:
            key = self.expect("ident", "Expression expected")
            self.expect("=", "'=' expected")
            if self.tok.kind == "[":
                params[key.text] = self.parse_array()
            elif self.tok.kind in ("string", "int", "decimal", "guid", "dqstring"):
                params[key.text] = self.advance().value
            else:
                raise _error("Expression expected", self.tok.pos, self.text)
            if self.tok.kind != ",":
                break
            self.advance()
        self.expect(")", "')' or ',' expected")
        prop, values = params.get("PropertyName"), params.get("PropertyValues")
        if not isinstance(prop, str) or not isinstance(values, list) or set(params) != {
            "PropertyName",
            "PropertyValues",
        }:
            raise _error(f"'{name}' needs PropertyName='...' and PropertyValues=[...]", self.tok.pos, self.text)
        return InList(prop, tuple(values), negated=_CRM_FUNCTIONS[name])

    def parse_array(self) -> list[Any]:
        self.advance()  # [
        items: list[Any] = []
        if self.tok.kind != "]":
            while True:
                if self.tok.kind not in ("string", "dqstring", "int", "decimal", "guid"):
                    raise _error("Expression expected", self.tok.pos, self.text)
                items.append(self.advance().value)
                if self.tok.kind != ",":
                    break
                self.advance()
        self.expect("]", "']' or ',' expected")
        return items


def parse_filter(text: str) -> Expr:
    """Parse a `$filter` value (already URL-decoded). Raises only ODataSyntaxError."""
    return _Parser(text).parse()


def properties(expr: Expr) -> set[str]:
    """The top-level property names an expression reads (first segment of navigation paths)."""
    if isinstance(expr, Property):
        return {expr.path[0]}
    if isinstance(expr, InList):
        return {expr.property}
    if isinstance(expr, Compare | Arith):
        return properties(expr.left) | properties(expr.right)
    if isinstance(expr, BoolOp):
        return set().union(*(properties(o) for o in expr.operands))
    if isinstance(expr, Not):
        return properties(expr.operand)
    if isinstance(expr, Call):
        return set().union(*(properties(a) for a in expr.args))
    return set()


# --- evaluation --------------------------------------------------------------------

Resolver = Callable[[Mapping[str, Any], list[str]], Any]


def evaluate(
    expr: Expr,
    row: Mapping[str, Any],
    *,
    case_insensitive: bool,
    wildcard: bool,
    resolve: Resolver | None = None,
) -> bool:
    """True when `row` matches. Missing properties read as null; comparing unlike types is false.

    case_insensitive: strings compare case-insensitively (Dataverse).
    wildcard: a string literal with `*` on the right of eq/ne is a pattern (F&O, `eq '*retail*'`).
    resolve(row, path) supplies navigation paths such as ["sdkmessageid", "name"]; without it,
    nested mappings in the row are followed.
    """
    return _Evaluator(row, case_insensitive, wildcard, resolve).value(expr) is True


class _Evaluator:
    def __init__(self, row: Mapping[str, Any], ci: bool, wildcard: bool, resolve: Resolver | None) -> None:
        self.row = row
        self.ci = ci
        self.wildcard = wildcard
        self.resolve = resolve

    def value(self, expr: Expr) -> Any:
        if isinstance(expr, Literal):
            return expr.value
        if isinstance(expr, Property):
            return self.lookup(expr.path)
        if isinstance(expr, Compare):
            return self.compare(expr)
        if isinstance(expr, BoolOp):
            if expr.op == "and":
                return all(self.value(o) is True for o in expr.operands)
            return any(self.value(o) is True for o in expr.operands)
        if isinstance(expr, Not):
            inner = self.value(expr.operand)
            return None if inner is None else inner is not True
        if isinstance(expr, Arith):
            return _arith(expr.op, self.value(expr.left), self.value(expr.right))
        if isinstance(expr, Call):
            return self.call(expr)
        value = self.lookup((expr.property,))
        found = any(self.equals(value, candidate) for candidate in expr.values)
        return found != expr.negated

    def lookup(self, path: tuple[str, ...]) -> Any:
        if len(path) == 1:
            return self.row.get(path[0])
        if self.resolve is not None:
            return self.resolve(self.row, list(path))
        current: Any = self.row
        for segment in path:
            if not isinstance(current, Mapping):
                return None
            current = current.get(segment)
        return current

    def fold(self, text: str) -> str:
        return text.casefold() if self.ci else text

    def compare(self, expr: Compare) -> bool:
        left, right = self.value(expr.left), self.value(expr.right)
        if expr.op in ("eq", "ne"):
            if (
                self.wildcard
                and isinstance(expr.right, Literal)
                and expr.right.kind == "string"
                and "*" in expr.right.value
            ):
                matched = isinstance(left, str) and _wildcard(expr.right.value, self.ci).fullmatch(left) is not None
            else:
                matched = self.equals(left, right)
            return matched if expr.op == "eq" else not matched
        ordered = self.order(left, right)
        if ordered is None:
            return False
        a, b = ordered
        if expr.op == "gt":
            return bool(a > b)
        if expr.op == "ge":
            return bool(a >= b)
        if expr.op == "lt":
            return bool(a < b)
        return bool(a <= b)

    def equals(self, left: Any, right: Any) -> bool:
        if left is None or right is None:
            return left is None and right is None
        pair = self.order(left, right)
        return pair is not None and pair[0] == pair[1]

    def order(self, left: Any, right: Any) -> tuple[Any, Any] | None:
        """Bring two values to one comparable type, or None when they are unlike."""
        if left is None or right is None:
            return None
        if isinstance(left, bool) or isinstance(right, bool):
            return (left, right) if isinstance(left, bool) and isinstance(right, bool) else None
        if isinstance(left, int | float) and isinstance(right, int | float):
            return left, right
        if isinstance(left, datetime | date) or isinstance(right, datetime | date):
            return _temporal_pair(left, right)
        if isinstance(left, uuid.UUID) or isinstance(right, uuid.UUID):
            return str(left).lower(), str(right).lower()
        if isinstance(left, str) and isinstance(right, str):
            if _looks_like_guid(left) and _looks_like_guid(right):
                return left.lower(), right.lower()
            return self.fold(left), self.fold(right)
        try:  # Decimal and other numeric types from the emulators' rows
            return float(left), float(right)
        except (TypeError, ValueError):
            return None

    def call(self, expr: Call) -> Any:
        args = [self.value(a) for a in expr.args]
        if expr.name in ("tolower", "toupper", "trim"):
            text = args[0]
            if not isinstance(text, str):
                return None
            return text.lower() if expr.name == "tolower" else text.upper() if expr.name == "toupper" else text.strip()
        haystack, needle = args
        if not isinstance(haystack, str) or not isinstance(needle, str):
            return False
        haystack, needle = self.fold(haystack), self.fold(needle)
        if expr.name == "contains":
            return needle in haystack
        if expr.name == "startswith":
            return haystack.startswith(needle)
        return haystack.endswith(needle)


def _wildcard(pattern: str, ci: bool) -> re.Pattern[str]:
    regex = ".*".join(re.escape(part) for part in pattern.split("*"))
    return re.compile(regex, re.IGNORECASE | re.DOTALL if ci else re.DOTALL)


def _looks_like_guid(text: str) -> bool:
    return len(text) == 36 and _GUID.fullmatch(text) is not None


def _as_temporal(value: Any) -> datetime | date | None:
    if isinstance(value, datetime | date):
        return value
    if isinstance(value, str):
        try:
            if "T" in value:
                return _parse_datetime(value)
            return date.fromisoformat(value)
        except ValueError:
            return None
    return None


def _temporal_pair(left: Any, right: Any) -> tuple[Any, Any] | None:
    a, b = _as_temporal(left), _as_temporal(right)
    if a is None or b is None:
        return None
    a_dt, b_dt = isinstance(a, datetime), isinstance(b, datetime)
    if a_dt and b_dt:
        return _aware(a), _aware(b)  # type: ignore[arg-type]
    if not a_dt and not b_dt:
        return a, b
    # Date against date-time: compare the calendar dates.
    return (a.date() if isinstance(a, datetime) else a), (b.date() if isinstance(b, datetime) else b)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _arith(op: str, left: Any, right: Any) -> Any:
    if not isinstance(left, int | float) or not isinstance(right, int | float):
        return None
    if isinstance(left, bool) or isinstance(right, bool):
        return None
    if op == "add":
        return left + right
    if op == "sub":
        return left - right
    if op == "mul":
        return left * right
    if right == 0:
        return None
    if op == "div":
        return left // right if isinstance(left, int) and isinstance(right, int) else left / right
    if op == "divby":
        return left / right
    return left % right


# --- keys, paths, $select, $orderby --------------------------------------------------

KeyValue = str | int


def parse_key_predicate(text: str) -> list[tuple[str | None, KeyValue]]:
    """Parse the text inside `set(...)`, already URL-decoded.

    "'C-1'" -> [(None, "C-1")]; "msdyn_cardnumber='O''B'" -> [("msdyn_cardnumber", "O'B")];
    a bare GUID -> [(None, "<guid>")]; "dataAreaId='usmf',CardNumber='X'" -> two pairs;
    integers are not quoted. Raises ODataSyntaxError on anything else (parameter aliases,
    mixed named and unnamed parts, repeated names, other literal types).
    """
    if not text.strip():
        raise ODataSyntaxError("Bad Request - Error in query syntax. The key predicate is empty.", 0)
    tokens = _tokenize(text)
    values = ("string", "int", "guid")
    if len(tokens) == 2 and tokens[0].kind in values:
        return [(None, tokens[0].value)]
    pairs: list[tuple[str | None, KeyValue]] = []
    i = 0
    while True:
        name, eq = tokens[i], tokens[i + 1] if i + 1 < len(tokens) else tokens[-1]
        if name.kind != "ident" or "." in name.text or eq.kind != "=":
            raise _error("Bad Request - Error in query syntax", name.pos, text)
        value = tokens[i + 2] if i + 2 < len(tokens) else tokens[-1]
        if value.kind not in values:
            raise _error("Bad Request - Error in query syntax", value.pos, text)
        if any(existing == name.text for existing, _ in pairs):
            raise _error(f"Duplicate key property '{name.text}'", name.pos, text)
        pairs.append((name.text, value.value))
        separator = tokens[i + 3] if i + 3 < len(tokens) else tokens[-1]
        if separator.kind == "end":
            return pairs
        if separator.kind != ",":
            raise _error("Bad Request - Error in query syntax", separator.pos, text)
        i += 4


def format_literal(value: str | int | bool | uuid.UUID | None) -> str:
    """An OData literal: strings quoted with '' escapes, GUIDs (uuid.UUID) bare, true/false/null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | uuid.UUID):
        return str(value)
    return "'" + value.replace("'", "''") + "'"


def format_key_predicate(pairs: Sequence[tuple[str | None, str | int | uuid.UUID]]) -> str:
    """The inverse of parse_key_predicate: "(None, 'A')" -> "'A'"; named pairs joined with commas."""
    if len(pairs) == 1 and pairs[0][0] is None:
        return format_literal(pairs[0][1])
    return ",".join(f"{name}={format_literal(value)}" for name, value in pairs)


def split_entity_path(path: str) -> tuple[str, str | None, str | None]:
    """Split "set(key)/property" into (set, key text or None, rest after the first "/" or None).

    Parentheses and slashes inside quoted key values are part of the key. "WhoAmI()"
    gives ("WhoAmI", "", None). Raises ODataSyntaxError on unbalanced parentheses or quotes.
    """
    text = path.lstrip("/")
    n = len(text)
    i = 0
    while i < n and text[i] not in "(/":
        i += 1
    name = text[:i]
    if not name:
        raise ODataSyntaxError(f"Resource not found for the segment {_quote(text)}.", 0)
    if i == n:
        return name, None, None
    if text[i] == "/":
        return name, None, text[i + 1 :]
    start = i + 1
    depth = 1
    in_quote = False
    j = start
    while j < n:
        ch = text[j]
        if ch == "'":
            in_quote = not in_quote  # '' toggles twice, so an escaped quote keeps us inside
        elif not in_quote and ch == "(":
            depth += 1
        elif not in_quote and ch == ")":
            depth -= 1
            if depth == 0:
                break
        j += 1
    if in_quote:
        raise ODataSyntaxError(f"There is an unterminated literal at position {n} in {_quote(text)}.", n)
    if j >= n:
        raise _error("')' expected", n, text)
    key = text[start:j]
    rest = text[j + 1 :]
    if not rest:
        return name, key, None
    if not rest.startswith("/"):
        raise _error("Bad Request - Error in query syntax", j + 1, text)
    return name, key, rest[1:]


_SELECT_ITEM = re.compile(r"[^\W\d]\w*(?:/[^\W\d]\w*)*|\*")


def parse_select(text: str) -> list[str]:
    """`$select=a,b` -> ["a", "b"]. Raises ODataSyntaxError on empty or malformed items."""
    items: list[str] = []
    pos = 0
    for raw in text.split(","):
        item = raw.strip()
        if not _SELECT_ITEM.fullmatch(item):
            raise _error("Syntax error", pos, text)
        items.append(item)
        pos += len(raw) + 1
    return items


def parse_orderby(text: str) -> list[tuple[str, bool]]:
    """`$orderby=name desc,createdon` -> [("name", True), ("createdon", False)] (prop, descending)."""
    result: list[tuple[str, bool]] = []
    pos = 0
    for raw in text.split(","):
        words = raw.split()
        if not words or len(words) > 2 or not _SELECT_ITEM.fullmatch(words[0]) or words[0] == "*":
            raise _error("Syntax error", pos, text)
        if len(words) == 2 and words[1] not in ("asc", "desc"):
            raise _error("Syntax error", pos + raw.index(words[1]), text)
        result.append((words[0], len(words) == 2 and words[1] == "desc"))
        pos += len(raw) + 1
    return result
