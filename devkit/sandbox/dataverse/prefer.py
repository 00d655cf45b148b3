"""The `Prefer` request header: return=representation, odata.maxpagesize, include-annotations, ...

Values may be combined with commas or sent in several `Prefer` headers [D8];
`odata.include-annotations` takes a quoted, comma-separated list with wildcards.
Whatever is honoured is echoed in `Preference-Applied`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field

MAX_PAGE_SIZE = 5000


def _split_outside_quotes(text: str) -> list[str]:
    items: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            items.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    items.append("".join(current).strip())
    return [item for item in items if item]


@dataclass
class Preferences:
    """The preferences a request expressed."""

    representation: bool = False
    max_page_size: int | None = None
    annotations: list[str] = field(default_factory=list)
    continue_on_error: bool = False
    raw_annotations: str | None = None

    def wants(self, annotation: str) -> bool:
        """Whether the caller asked for this annotation (e.g. OData.Community.Display.V1.FormattedValue)."""
        return any(fnmatch.fnmatchcase(annotation, pattern) for pattern in self.annotations)

    @property
    def any_annotations(self) -> bool:
        return bool(self.annotations)

    def applied(self, *, page_size: bool = False, representation: bool = False, batch: bool = False) -> str | None:
        """The `Preference-Applied` value for the preferences the handler honoured."""
        parts = []
        if representation and self.representation:
            parts.append("return=representation")
        if self.raw_annotations is not None:
            parts.append(f"odata.include-annotations={self.raw_annotations}")
        if page_size and self.max_page_size is not None:
            parts.append(f"odata.maxpagesize={self.max_page_size}")
        if batch and self.continue_on_error:
            parts.append("odata.continue-on-error")
        return ",".join(parts) or None


def parse_prefer(values: Iterable[str]) -> Preferences:
    """Read every `Prefer` header value; unknown preferences are ignored, as the service does."""
    prefs = Preferences()
    for value in values:
        for item in _split_outside_quotes(value):
            name, _, argument = item.partition("=")
            name = name.strip().lower()
            argument = argument.strip()
            if name == "return" and argument.lower() == "representation":
                prefs.representation = True
            elif name == "odata.maxpagesize":
                # The service pages at 5000 at most; a larger or unreadable size gets its default page.
                if argument.isdigit() and int(argument) > 0:
                    prefs.max_page_size = min(int(argument), MAX_PAGE_SIZE)
            elif name == "odata.include-annotations":
                prefs.raw_annotations = argument
                prefs.annotations = [a.strip() for a in argument.strip('"').split(",") if a.strip()]
            elif name == "odata.continue-on-error":
                prefs.continue_on_error = True
    return prefs
