"""Trade intents: the one shape every source (API, JSONL, stdin, HTTP, Redis) produces.

A source turns its payload into an ``Intent`` with ``parse_intent``; anything that does not
fit raises ``IntentError`` naming the field, the value found and the rule, and the caller
records that rejection with its reason instead of deciding it.

Every number is bounded before it reaches the journal (SQLite integers are 64-bit) and only
plain ASCII decimal text is a number: ``"300"``, ``"1.5e2"``, never full-width digits,
``3_0_0``, ``NaN`` or ``Infinity`` (Python's ``int``/``float``/``Decimal`` accept all of those).
Ids and symbols match their pattern in full (a trailing newline is not part of an id).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal, InvalidOperation
from typing import Any, Literal

from pyquant.errors import PyquantError

Side = Literal["BUY", "SELL"]

_SYMBOL = re.compile(r"[A-Z0-9]{2,30}", re.ASCII)
_INTENT_ID = re.compile(r"[A-Za-z0-9._:\-]{1,64}", re.ASCII)
# Plain decimal text: ASCII digits, one optional point, an optional exponent of up to 4 digits.
_DECIMAL_TEXT = re.compile(
    r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,4})?", re.ASCII
)
# Longest number text accepted (a 5000-digit integer is not a size, a time or a leverage).
MAX_NUMBER_CHARS = 64
# created_at_ms: at most the last millisecond of the year 9999 (and far inside SQLite's int64).
MAX_TIME_MS = 253_402_300_799_999
# size_usd: one entry's notional, at most a billion USDT, kept to 8 decimal places.
MAX_SIZE_USD = Decimal(1_000_000_000)
SIZE_QUANTUM = Decimal("0.00000001")


class IntentError(PyquantError, ValueError):
    """An intent payload is malformed: names the field, the value found and the rule."""

    def __init__(self, field: str, value: object, rule: str) -> None:
        super().__init__(f"intent field {field!r} was {value!r}: {rule}")
        self.field = field
        self.value = value
        self.rule = rule


@dataclass(frozen=True, slots=True)
class Intent:
    """A request to open a position, before the position guard has decided it.

    Attributes:
        intent_id: unique id; a second intent with the same id is rejected as a duplicate.
        symbol: exchange symbol, upper case (``BTCUSDT``).
        side: ``BUY`` opens a long, ``SELL`` a short.
        confidence: the signal's confidence in [0, 1]; may stretch the take-profit ladder.
        created_at_ms: when the signal was made (ms since the epoch); stale intents are refused.
        source: where it came from (``api``, ``jsonl``, ``http``, ``redis`` ...).
        size_usd: optional fixed notional in USDT; None means size by risk.
        leverage: optional leverage; None means the configured default.
    """

    intent_id: str
    symbol: str
    side: Side
    confidence: float
    created_at_ms: int
    source: str
    size_usd: Decimal | None = None
    leverage: int | None = None

    @property
    def position_side(self) -> Literal["LONG", "SHORT"]:
        """Return the hedge-mode leg this intent opens."""
        return "LONG" if self.side == "BUY" else "SHORT"


def _require(payload: Mapping[str, Any], *names: str) -> tuple[str, Any]:
    for name in names:
        if name in payload and payload[name] is not None:
            return name, payload[name]
    raise IntentError(names[0], None, "is required")


def _optional(payload: Mapping[str, Any], *names: str) -> tuple[str, Any] | None:
    for name in names:
        if name in payload and payload[name] not in (None, ""):
            return name, payload[name]
    return None


def parse_intent(payload: Mapping[str, Any], *, source: str, now_ms: int) -> Intent:
    """Build an Intent from pyquant's format or the original system's payload.

    pyquant's format: ``id, symbol, side, confidence, created_at_ms, size_usd, leverage``.
    The original system's payload uses ``position_size_usd`` for the size and may carry
    ``timestamp`` (ms or s) and ``source``; side may be ``BUY``/``SELL`` or ``LONG``/``SHORT``.

    Args:
        payload: the decoded payload.
        source: the name of the source, recorded when the payload has none.
        now_ms: the clock used when the payload carries no creation time.

    Returns:
        The validated intent.

    Raises:
        IntentError: a field is missing or invalid.
    """
    if not isinstance(payload, Mapping):
        raise IntentError("<payload>", payload, "must be a JSON object")

    _, raw_id = _require(payload, "id", "intent_id")
    intent_id = raw_id if isinstance(raw_id, str) else ""
    if isinstance(raw_id, int) and not isinstance(raw_id, bool) and 0 <= raw_id < 10**64:
        intent_id = str(raw_id)  # a numeric id, as some producers send it
    raw_id = _shown(raw_id)
    if not _INTENT_ID.fullmatch(intent_id):
        raise IntentError("id", raw_id, "must be 1-64 characters of [A-Za-z0-9._:-]")

    _, raw_symbol = _require(payload, "symbol")
    symbol = raw_symbol.upper() if isinstance(raw_symbol, str) else ""
    if not _SYMBOL.fullmatch(symbol):
        raise IntentError("symbol", raw_symbol, "must be an exchange symbol such as BTCUSDT")

    _, raw_side = _require(payload, "side")
    side_text = raw_side.upper() if isinstance(raw_side, str) else ""
    side: Side
    if side_text in ("BUY", "LONG"):
        side = "BUY"
    elif side_text in ("SELL", "SHORT"):
        side = "SELL"
    else:
        raise IntentError("side", raw_side, "must be BUY or SELL (LONG or SHORT)")

    confidence = 0.5
    found = _optional(payload, "confidence")
    if found is not None:
        confidence = _finite_float("confidence", found[1])
        if not 0.0 <= confidence <= 1.0:
            raise IntentError("confidence", found[1], "must be between 0 and 1")

    created_at_ms = now_ms
    found = _optional(payload, "created_at_ms", "timestamp", "ts")
    if found is not None:
        name, value = found
        stamp = _finite_float(name, value)
        # The original system stamps seconds; anything below 1e11 cannot be milliseconds.
        if not 0 < stamp <= MAX_TIME_MS:
            raise IntentError(
                name, value, f"must be a positive time in ms (or s) up to {MAX_TIME_MS}"
            )
        created_at_ms = int(stamp * 1000) if stamp < 1e11 else int(stamp)
        if created_at_ms <= 0:
            raise IntentError(name, value, "must be a positive time")

    size_usd: Decimal | None = None
    found = _optional(payload, "size_usd", "position_size_usd", "notional_usd")
    if found is not None:
        name, value = found
        amount = _decimal(name, value)
        if not 0 < amount <= MAX_SIZE_USD:
            raise IntentError(name, value, f"must be a positive USDT amount up to {MAX_SIZE_USD}")
        size_usd = amount.quantize(SIZE_QUANTUM, rounding=ROUND_DOWN).normalize()
        if size_usd <= 0:
            raise IntentError(name, value, f"must be at least {SIZE_QUANTUM} USDT")
        if size_usd == size_usd.to_integral_value():
            size_usd = size_usd.quantize(Decimal(1))

    leverage: int | None = None
    found = _optional(payload, "leverage")
    if found is not None:
        value = found[1]
        number = _finite_float("leverage", value)
        if number != int(number) or not 1 <= number <= 125:
            raise IntentError("leverage", value, "must be a whole number from 1 to 125")
        leverage = int(number)

    found = _optional(payload, "source")
    origin = found[1] if found is not None and isinstance(found[1], str) else source
    return Intent(
        intent_id=intent_id,
        symbol=symbol,
        side=side,
        confidence=confidence,
        created_at_ms=created_at_ms,
        source=origin[:64],
        size_usd=size_usd,
        leverage=leverage,
    )


def _shown(value: object) -> object:
    # An error message quotes the value; a huge one is cut (and never converted to text
    # whole: str() of a 5000-digit int raises ValueError).
    if isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > 200:
            return f"<integer of {value.bit_length()} bits>"
        return value
    if isinstance(value, str) and len(value) > MAX_NUMBER_CHARS:
        return value[:MAX_NUMBER_CHARS] + "..."
    return value


def _decimal(field: str, value: object) -> Decimal:
    """Return a finite Decimal from a JSON number or plain ASCII decimal text."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise IntentError(field, _shown(value), "must be a number")
    if isinstance(value, int):
        if value.bit_length() > 200:
            raise IntentError(field, _shown(value), "is out of range")
        return Decimal(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise IntentError(field, value, "must be a finite number")
        return Decimal(repr(value))
    text = value.strip()
    if text.lstrip("+-").lower() in ("nan", "inf", "infinity", "snan"):
        raise IntentError(field, value, "must be a finite number")
    if len(text) > MAX_NUMBER_CHARS or not _DECIMAL_TEXT.fullmatch(text):
        raise IntentError(
            field, _shown(value), "must be a plain decimal number (ASCII digits, one '.')"
        )
    try:
        return Decimal(text)
    except InvalidOperation as exc:  # pragma: no cover - the pattern admits only valid text
        raise IntentError(field, _shown(value), "must be a number") from exc


def _finite_float(field: str, value: object) -> float:
    number = _decimal(field, value)
    try:
        result = float(number)
    except OverflowError as exc:  # pragma: no cover - float(Decimal) gives inf, not an error
        raise IntentError(field, _shown(value), "is out of range") from exc
    if not math.isfinite(result):
        raise IntentError(field, _shown(value), "is out of range")
    return result
