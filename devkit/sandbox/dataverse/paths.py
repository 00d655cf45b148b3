"""Resource paths: split `/api/data/v9.2/<set>(<key>)/<property>` into its parts.

The split works on the raw (still percent-encoded) path so an encoded `/`
inside a key value cannot pose as a segment separator; each part is then
percent-decoded. Splitting is quote-aware: `msdyn_loyaltycards(msdyn_cardnumber='A/(1)')`
stays one segment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from devkit.sandbox.dataverse.errors import ODATA, DataverseError

# Stands in for an encoded slash while the path is split.
_SLASH = "\x00"
# Characters an alternate-key value cannot carry inside the URL parentheses [D5].
KEY_FORBIDDEN = frozenset("/<>*%&:\\?+")
# One segment, optionally with a key of plain and quoted parts: the common shape, split without a scan.
_SIMPLE = re.compile(r"/?([A-Za-z_$][\w.$]*)(?:\(((?:[^()'/%]|'(?:[^'/%]|'')*')*)\))?")


@dataclass(frozen=True)
class Segment:
    """One path segment: its name and, when it has one, the text between its parentheses."""

    name: str
    key: str | None


def split_path(raw: str) -> list[Segment]:
    """Decoded segments of a raw resource path (leading `/` optional); raises DataverseError on bad nesting."""
    simple = _SIMPLE.fullmatch(raw)
    if simple is not None:
        return [Segment(simple.group(1), simple.group(2))]
    text = raw.replace("%2F", _SLASH).replace("%2f", _SLASH)
    text = unquote(text)
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    quoted = False
    for char in text.lstrip("/"):
        if char == "'" and depth > 0:
            quoted = not quoted
        elif not quoted and char == "(":
            depth += 1
        elif not quoted and char == ")":
            depth -= 1
        if char == "/" and depth == 0 and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    if depth != 0 or quoted:
        raise DataverseError(400, ODATA, f"Bad Request - Error in query syntax: unbalanced key in '{text}'.")
    segments = []
    for part in parts:
        if part.endswith(")") and "(" in part:
            name, _, rest = part.partition("(")
            segments.append(Segment(name, rest[:-1].replace(_SLASH, "/")))
        else:
            segments.append(Segment(part.replace(_SLASH, "/"), None))
    return segments


def entity_path(set_name: str, key: str) -> str:
    """`<set>(<key>)`: the relative address of a row."""
    return f"{set_name}({key})"


def quote_key(value: str) -> str:
    """A string key value as an OData literal (`'` doubled)."""
    return "'" + value.replace("'", "''") + "'"
