"""Keep secrets out of logs and exception text, in one place.

Like azure-core's sensitive-header cleanup policy: nothing else in the
targets package needs to remember which strings are secret. Bearer tokens,
`Authorization` header values, `code=` (function keys) and other credential
query values are masked by pattern; exact secret values (the tokens we
obtained, client secrets we were given) are masked wherever they appear,
even inside a service's error message that echoes them.
"""

from __future__ import annotations

import logging
import re
import threading

MASK = "***"
_MIN_SECRET_LENGTH = 6
_MAX_REGISTERED = 256

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # "Bearer eyJ..." anywhere (header dumps, repr of dicts, echoed messages).
    (re.compile(r"(?i)\b(bearer)\s+[^\s'\",;}\]]+"), rf"\1 {MASK}"),
    # "Authorization: <value>" / "'authorization': '<value>'" with another scheme or none.
    (
        re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)(?!bearer\s)(?!\*\*\*)(?:[A-Za-z]+\s+)?[^\s'\",;}\]]+"),
        rf"\1{MASK}",
    ),
    # Credential-like query or form values: ?code=..., &client_secret=..., sig=...
    (
        re.compile(
            r"(?i)(?<![A-Za-z0-9_])(code|client_secret|access_token|refresh_token|sig|x-functions-key)"
            r"=[^&\s#'\"]+"
        ),
        rf"\1={MASK}",
    ),
    # JSON-ish "client_secret": "..." / "authvalue": "..."
    (re.compile(r"(?i)([\"']?(?:client_secret|authvalue)[\"']?\s*:\s*[\"'])[^\"']+"), rf"\1{MASK}"),
)

_lock = threading.Lock()
_secrets: dict[str, None] = {}


def register_secret(value: str | None) -> None:
    """Mask `value` wherever it later appears in our logs or in TargetError text.

    Short strings are ignored (masking "abc" everywhere would mangle logs).
    The registry keeps the most recent few hundred values, enough for rotating tokens.
    """
    if not value or len(value) < _MIN_SECRET_LENGTH:
        return
    with _lock:
        _secrets.pop(value, None)
        _secrets[value] = None
        while len(_secrets) > _MAX_REGISTERED:
            del _secrets[next(iter(_secrets))]


def redact(text: str) -> str:
    """`text` with every known secret and credential-looking value replaced by ***."""
    with _lock:
        known = list(_secrets)
    # Longest first so a secret that contains another is masked whole.
    for secret in sorted(known, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    """A logging filter that rewrites each record's message (and traceback) through `redact`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed record: let logging report it as usual
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg = cleaned
            record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


_FILTER = RedactingFilter()


def install_log_redaction(*logger_names: str) -> None:
    """Attach the redacting filter to the named loggers (idempotent).

    Logger filters only see records logged on that very logger, so every
    logger that may carry request details is named: ours and httpx's.
    """
    for name in logger_names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
