"""Personal data out of telemetry: natural keys hashed, key values scrubbed from log text and URLs.

Card numbers and party numbers identify people. With `REDACT_PERSONAL_DATA`
on (the default) every natural key that goes into a span, a log dimension or
a log message becomes `h:<16 hex>`, an HMAC-SHA256 of the key under the
deployment's `TELEMETRY_HASH_SALT`: the same key always gives the same hash, so
KQL can still join a record's events, but nobody reads a card number from
Application Insights. Keys are never metric dimensions at all (cardinality).

Log messages written elsewhere (the sync engine, the HTTP pipeline, httpx)
carry keys inside text and URLs; `PersonalDataFilter` replaces the key values
of the change being processed (held in a context variable) wherever they
appear, in plain and URL-encoded form, and shapes every URL in the text (key
predicates and query values out, a written-out `$filter` cut off), also where
no change is known (a reconcile page, a lookup).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import re
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from urllib.parse import quote, urlsplit, urlunsplit

HASH_PREFIX = "h:"
SECRET_MASK = "***"  # noqa: S105 - the mask, not a secret
# Canonical fields besides the natural key whose values identify a person; scrubbed from log text and span
# messages while a change that carries them is processed (a target's error may quote them).
PERSONAL_FIELDS = frozenset({"CardNumber", "PartyNumber", "ReplacementCardNumber"})
_MIN_SCRUB_LENGTH = 3  # shorter values would mangle ordinary words in log text
_PREDICATE = re.compile(r"\(([^()]*)\)")
_URL_IN_TEXT = re.compile(r"https?://[^\s\"<>]+")
# A `$filter` written out in text may hold spaces (`PartyNumber eq 'P-1'`): all of it, to `&`, a quote or the line end.
_FILTER_IN_TEXT = re.compile(r"(\$filter=)(?:[^&\"\n]*[^&\"\s])?")

_values: ContextVar[tuple[str, ...]] = ContextVar("loyaltysync_personal_values", default=())


def hash_key(text: str, salt: str = "") -> str:
    """`h:` + the first 16 hex digits of HMAC-SHA256(salt, text): stable, joinable, not readable."""
    digest = hmac.new(salt.encode("utf-8"), text.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
    return HASH_PREFIX + digest[:16]


class KeyRedactor:
    """Decides how natural keys appear in telemetry: hashed (default) or as they are."""

    def __init__(self, *, enabled: bool = True, salt: str = "") -> None:
        self.enabled = enabled
        self._salt = salt

    def key(self, text: str | None) -> str | None:
        """The key as telemetry may show it (None stays None)."""
        if text is None or not self.enabled:
            return text
        return hash_key(text, self._salt)

    def scrub(self, text: str, values: Iterable[str]) -> str:
        """`text` with each of `values` (raw, OData-quoted and URL-encoded forms) replaced by its hash."""
        if not self.enabled or not text:
            return text
        for value in sorted({v for v in values if v and len(v) >= _MIN_SCRUB_LENGTH}, key=len, reverse=True):
            token = hash_key(value, self._salt)
            for form in _forms(value):
                if form in text:
                    text = text.replace(form, token)
        return text

    def url(self, url: str) -> str:
        """A URL fit for a dependency span: key predicates and query values replaced by `…` when redacting.

        `.../msdyn_loyaltycards(msdyn_cardnumber='C-1')?$select=a` becomes
        `.../msdyn_loyaltycards(…)?$select=…`: the entity set and the query options
        stay readable, the values (keys, `$filter` literals) do not.
        """
        if not self.enabled:
            return url
        parts = urlsplit(url)
        path = _PREDICATE.sub("(…)", parts.path)
        query = "&".join(_shape_pair(pair) for pair in parts.query.split("&") if pair)
        return urlunsplit((parts.scheme, parts.netloc, path, query, ""))


    def urls_in(self, text: str) -> str:
        """`text` with every absolute URL in it shaped as `url` does, and `$filter` expressions removed."""
        if not self.enabled or ("://" not in text and "$filter=" not in text):
            return text
        text = _URL_IN_TEXT.sub(lambda found: self.url(found.group(0)), text)
        return _FILTER_IN_TEXT.sub(r"\1…", text)


def _shape_pair(pair: str) -> str:
    name, _, value = pair.partition("=")
    # A value the secrets filter already masked (`code=***`, targets/redaction.py) says so; leave it saying it.
    return pair if value == SECRET_MASK else f"{name}=…"


def _forms(value: str) -> tuple[str, ...]:
    quoted = value.replace("'", "''")
    return tuple(dict.fromkeys((value, quoted, quote(quoted, safe=""), quote(value, safe=""), quote(value))))


_active = KeyRedactor()


def set_active(redactor: KeyRedactor) -> None:
    """Make `redactor` the one log filtering uses (the installed recorder's)."""
    global _active
    _active = redactor


def active() -> KeyRedactor:
    """The redactor in force."""
    return _active


@contextlib.contextmanager
def personal_values(*values: str | None) -> Iterator[None]:
    """While inside, log text written in this context has `values` (keys of the current change) scrubbed."""
    token = _values.set((*_values.get(), *(v for v in values if v)))
    try:
        yield
    finally:
        _values.reset(token)


def scrub(text: str) -> str:
    """`text` with the current change's personal values replaced by their hashes."""
    return _active.scrub(text, _values.get())


class PersonalDataFilter(logging.Filter):
    """Rewrites a record's message when it shows a key value of the change being processed, or a URL.

    URLs are shaped whatever the context (a reconcile page or a lookup logs them outside any change).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not _active.enabled:
            return True
        values = _values.get()
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed record: let logging report it as usual
            return True
        cleaned = _active.urls_in(_active.scrub(message, values) if values else message)
        if cleaned != message:
            record.msg = cleaned
            record.args = None
        return True


_FILTER = PersonalDataFilter()
# Every logger that may print a key during a sync step (filters only see their own logger's records).
LOGGERS = (
    "loyaltysync",
    "loyaltysync.worker",
    "loyaltysync.sync",
    "loyaltysync.inbound",
    "loyaltysync.reconcile",
    "loyaltysync.targets.http",
    "loyaltysync.targets.fno",
    "loyaltysync.targets.dataverse",
    "loyaltysync.targets.lookups",
    "httpx",
    "azure.core.pipeline.policies.http_logging_policy",
)
# The Azure SDK logs every storage request URL at INFO; table URLs carry natural keys as RowKeys.
SDK_HTTP_LOGGER = "azure.core.pipeline.policies.http_logging_policy"


def install_log_filter(names: Iterable[str] = LOGGERS) -> None:
    """Attach the personal-data filter to the named loggers (idempotent)."""
    for name in names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def install_handler_filter(names: Iterable[str]) -> int:
    """Attach the personal-data filter to every handler of the named loggers (idempotent); returns how many.

    A logger's filter only sees records logged on that very logger; a handler's sees every record it
    emits, from child loggers too (`loyaltysync.preflight` reaching the exporting handler on `loyaltysync`).
    """
    count = 0
    for name in names:
        for handler in logging.getLogger(name).handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
            count += 1
    return count
