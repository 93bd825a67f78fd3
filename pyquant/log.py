"""Logging setup: text or JSON lines, and a filter that keeps secrets out of every record.

``configure_logging`` installs one handler on the ``pyquant`` logger family (and the root,
so library warnings are formatted the same way). ``RedactingFilter`` rewrites each record's
final message before it is formatted: the API key and secret (and any other registered
secret) become ``********``, and so do ``signature=<hex>``, ``X-MBX-APIKEY`` header values,
``listenKey`` values and the query of any signed URL (``...&timestamp=...&signature=...``).
It is attached to the handler, so records from every library pass through it.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Literal, TextIO

import orjson

MASK = "********"

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(signature=)[0-9A-Fa-f]+"), rf"\g<1>{MASK}"),
    (re.compile(r"(?i)(x-mbx-apikey['\"]?\s*[:=]\s*['\"]?)[^'\"\s,}]+"), rf"\g<1>{MASK}"),
    (re.compile(r"(?i)(listenKey['\"]?\s*[:=/]\s*['\"]?)[A-Za-z0-9]{16,}"), rf"\g<1>{MASK}"),
    # A signed query string carries the account's request: keep the path, mask the rest.
    (re.compile(r"\?[^\s'\"]*timestamp=[^\s'\"]*"), f"?{MASK}"),
    (re.compile(r"(?i)(bearer\s+)[^\s'\"]+"), rf"\g<1>{MASK}"),
)


class RedactingFilter(logging.Filter):
    """Mask secrets, signatures and signed query strings in every record passing through."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets: set[str] = set()
        for secret in secrets:
            self.add_secret(secret)

    def add_secret(self, secret: str) -> None:
        """Mask this exact string from now on (ignored when shorter than 4 characters)."""
        if len(secret) >= 4:
            self._secrets.add(secret)

    def redact(self, text: str) -> str:
        """Return ``text`` with every known secret and signature masked."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        """Replace the record's message by its redacted rendering; never drops a record."""
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        redacted = self.redact(message)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        record.msg = redacted
        record.args = None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and extras passed by the caller."""

    _STANDARD = frozenset(
        vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime"}
    )

    def format(self, record: logging.LogRecord) -> str:
        """Render the record as a JSON line."""
        doc: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in self._STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_text:
            doc["exc"] = record.exc_text
        elif record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]  # generic only in stubs
    """Writes to whatever ``sys.stderr`` is at emit time.

    The dashboard (rich Live) swaps ``sys.stderr`` for a proxy that prints above the live
    display; a handler holding the original stream would scribble through the dashboard.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


_installed: list[logging.Handler] = []


def configure_logging(
    *,
    fmt: Literal["text", "json"] = "text",
    level: str = "INFO",
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
    file: str = "",
) -> RedactingFilter:
    """Install pyquant's handler(s) and return the redaction filter (to register more secrets).

    Args:
        fmt: ``text`` (human-readable) or ``json`` (one object per line).
        level: the level of the ``pyquant`` loggers.
        secrets: exact strings to mask wherever they appear.
        stream: where to write (stderr by default).
        file: also append to this file.

    Returns:
        The filter attached to every handler.
    """
    redactor = RedactingFilter(secrets)
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter()
    else:
        formatter = logging.Formatter(
            "%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"
        )
    root = logging.getLogger()
    for handler in _installed:
        root.removeHandler(handler)
        handler.close()
    _installed.clear()
    handlers: list[logging.Handler] = [
        logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    ]
    if file:
        # Owner-only (0600) whatever the umask: the log names positions, orders and intents.
        os.close(os.open(file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        os.chmod(file, 0o600)
        handlers.append(logging.FileHandler(file, encoding="utf-8"))
    for handler in handlers:
        handler.addFilter(redactor)
        handler.setFormatter(formatter)
        root.addHandler(handler)
        _installed.append(handler)
    if root.level > logging.WARNING or root.level == logging.NOTSET:
        root.setLevel(logging.WARNING)
    logging.getLogger("pyquant").setLevel(level.upper())
    return redactor


__all__ = ["MASK", "JsonFormatter", "RedactingFilter", "configure_logging"]
