"""HTTP trigger route templates (`hooks/{source}`, `files/{*path}`, `items/{id:int?}`), matched like ASP.NET.

The host routes with ASP.NET Core templates: literals match case-insensitively,
`{name}` takes one segment, `{*name}` the rest of the path, `{name?}` and
`{name=default}` may be left out, and `{name:constraint}` must satisfy the
constraint or the route does not match (404). When several templates match,
the most specific one wins (literal > constrained > plain > catch-all).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

_TOKEN = re.compile(r"\{([^{}]*)\}")
_PARAMETER = re.compile(
    r"^(?P<star>\*{1,2})?(?P<name>[A-Za-z_][A-Za-z0-9_-]*)"
    r"(?P<constraints>(?::[A-Za-z]+(?:\([^)]*\))?)*)"
    r"(?:=(?P<default>[^?]*))?(?P<optional>\?)?$"
)
_CONSTRAINT = re.compile(r":([A-Za-z]+)(?:\(([^)]*)\))?")
_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)

# Segment ranks for precedence: lower is more specific.
_LITERAL, _COMPLEX, _CONSTRAINED, _PLAIN, _CATCH_ALL = 1, 2, 3, 4, 5

Check = Callable[[str], bool]


@dataclass(frozen=True)
class RouteTemplate:
    """A parsed template: `match()` returns the route values, or None when the path does not fit."""

    template: str
    pattern: re.Pattern[str]
    precedence: tuple[int, ...]
    groups: Mapping[str, str] = field(default_factory=dict)  # regex group -> parameter name
    defaults: Mapping[str, str] = field(default_factory=dict)
    checks: Mapping[str, tuple[Check, ...]] = field(default_factory=dict)

    def match(self, path: str) -> dict[str, str] | None:
        """Route values for `path` (relative to the route prefix, no leading slash), or None."""
        found = self.pattern.match(path.strip("/"))
        if found is None:
            return None
        values = dict(self.defaults)
        for group, name in self.groups.items():
            value = found.group(group)
            if value is not None and value != "":
                values[name] = value
        for name, checks in self.checks.items():
            if name in values and not all(check(values[name]) for check in checks):
                return None
        return values


def parse_route(template: str) -> RouteTemplate:
    """Parse an HTTP trigger route. Raises ValueError naming the problem (the host refuses such routes too)."""
    text = template.strip().removeprefix("~").strip("/")
    segments = text.split("/") if text else []
    pattern = ""
    precedence: list[int] = []
    groups: dict[str, str] = {}
    defaults: dict[str, str] = {}
    checks: dict[str, tuple[Check, ...]] = {}
    for index, segment in enumerate(segments):
        if not segment:
            raise ValueError(f"route {template!r} has an empty segment")
        last = index == len(segments) - 1
        regex, rank, optional = _segment(template, segment, last, groups, defaults, checks)
        separator = "/" if index else ""
        pattern += f"(?:{separator}{regex})?" if optional else f"{separator}{regex}"
        precedence.append(rank)
    return RouteTemplate(
        template=template,
        pattern=re.compile(f"^{pattern}$", re.IGNORECASE | re.DOTALL),
        precedence=tuple(precedence),
        groups=groups,
        defaults=defaults,
        checks=checks,
    )


def _segment(
    template: str,
    segment: str,
    last: bool,
    groups: dict[str, str],
    defaults: dict[str, str],
    checks: dict[str, tuple[Check, ...]],
) -> tuple[str, int, bool]:
    """Regex, precedence rank and optionality of one path segment."""
    parts = _TOKEN.split(segment)  # literal, parameter, literal, parameter, ..., literal
    literals, parameters = parts[0::2], parts[1::2]
    if any("{" in literal or "}" in literal for literal in literals):
        raise ValueError(f"route {template!r}: unbalanced braces in {segment!r}")
    if not parameters:
        return re.escape(segment), _LITERAL, False
    regex = ""
    rank = _LITERAL
    optional = False
    for position, literal in enumerate(literals):
        regex += re.escape(literal)
        if position == len(parameters):
            break
        match = _PARAMETER.match(parameters[position].strip())
        if match is None:
            raise ValueError(f"route {template!r}: bad parameter {{{parameters[position]}}}")
        name = match["name"]
        if name in groups.values():
            raise ValueError(f"route {template!r}: parameter {name!r} appears twice")
        alone = len(parameters) == 1 and not literals[0] and not literals[1]
        catch_all = bool(match["star"])
        if catch_all and not (alone and last):
            raise ValueError(f"route {template!r}: a catch-all parameter must be the whole last segment")
        may_omit = bool(match["optional"]) or match["default"] is not None or catch_all
        if may_omit and not (alone and last):
            raise ValueError(f"route {template!r}: optional parameter {name!r} must be the whole last segment")
        group = f"p{len(groups)}"
        groups[group] = name
        if match["default"] is not None:
            defaults[name] = match["default"]
        constraint_checks = tuple(
            _constraint(template, kind.lower(), argument)
            for kind, argument in _CONSTRAINT.findall(match["constraints"] or "")
        )
        if constraint_checks:
            checks[name] = constraint_checks
        regex += f"(?P<{group}>.*)" if catch_all else f"(?P<{group}>[^/]+)"  # literals split right to left
        optional = may_omit
        if alone:
            rank = _CATCH_ALL if catch_all else _CONSTRAINED if constraint_checks else _PLAIN
        else:
            rank = _COMPLEX
    return regex, rank, optional


def _constraint(template: str, kind: str, argument: str) -> Check:
    """One ASP.NET route constraint as a predicate on the raw segment value."""
    args = [part.strip() for part in argument.split(",")] if argument else []
    simple: dict[str, Check] = {
        "int": lambda value: _integer_in(value, *_INT32),
        "long": lambda value: _integer_in(value, *_INT64),
        "bool": lambda value: value.lower() in ("true", "false"),
        "alpha": lambda value: value.isascii() and value.isalpha(),
        "guid": _is_guid,
        "double": _is_number,
        "float": _is_number,
        "decimal": _is_number,
    }
    if kind in simple and not args:
        return simple[kind]
    try:
        numbers = [int(part) for part in args]
    except ValueError:
        numbers = []
    if kind == "min" and len(numbers) == 1:
        return lambda value: _integer_in(value, numbers[0], _INT64[1])
    if kind == "max" and len(numbers) == 1:
        return lambda value: _integer_in(value, _INT64[0], numbers[0])
    if kind == "range" and len(numbers) == 2:
        return lambda value: _integer_in(value, numbers[0], numbers[1])
    if kind == "minlength" and len(numbers) == 1:
        return lambda value: len(value) >= numbers[0]
    if kind == "maxlength" and len(numbers) == 1:
        return lambda value: len(value) <= numbers[0]
    if kind == "length" and len(numbers) in (1, 2):
        low, high = numbers[0], numbers[-1]
        return lambda value: low <= len(value) <= high
    if kind == "regex" and argument:
        compiled = re.compile(argument, re.IGNORECASE)
        return lambda value: compiled.search(value) is not None
    raise ValueError(f"route {template!r}: unsupported route constraint {kind!r}{f'({argument})' if argument else ''}")


def _integer_in(value: str, low: int, high: int) -> bool:
    try:
        number = int(value)
    except ValueError:
        return False
    return low <= number <= high


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return value.strip().lower() not in ("nan", "inf", "-inf", "infinity", "-infinity")


def _is_guid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
