"""Trade intents: the one shape every source (API, JSONL, stdin, HTTP, Redis) produces.

A source turns its payload into an ``Intent`` with ``parse_intent``; anything that does not
fit raises ``IntentError`` naming the field, the value found and the rule, and the caller
records that rejection with its reason instead of deciding it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from pyquant.errors import PyquantError

Side = Literal["BUY", "SELL"]

_SYMBOL = re.compile(r"^[A-Z0-9]{2,30}$")
_INTENT_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,64}$")


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
    intent_id = str(raw_id)
    if not _INTENT_ID.match(intent_id):
        raise IntentError("id", raw_id, "must be 1-64 characters of [A-Za-z0-9._:-]")

    _, raw_symbol = _require(payload, "symbol")
    symbol = str(raw_symbol).upper()
    if not isinstance(raw_symbol, str) or not _SYMBOL.match(symbol):
        raise IntentError("symbol", raw_symbol, "must be an exchange symbol such as BTCUSDT")

    _, raw_side = _require(payload, "side")
    side_text = str(raw_side).upper()
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
        created_at_ms = int(stamp * 1000) if stamp < 1e11 else int(stamp)
        if created_at_ms <= 0:
            raise IntentError(name, value, "must be a positive time")

    size_usd: Decimal | None = None
    found = _optional(payload, "size_usd", "position_size_usd", "notional_usd")
    if found is not None:
        name, value = found
        if isinstance(value, bool):
            raise IntentError(name, value, "must be a positive USDT amount")
        try:
            size_usd = Decimal(str(value))
        except InvalidOperation as exc:
            raise IntentError(name, value, "must be a positive USDT amount") from exc
        if not size_usd.is_finite() or size_usd <= 0:
            raise IntentError(name, value, "must be a positive USDT amount")

    leverage: int | None = None
    found = _optional(payload, "leverage")
    if found is not None:
        value = found[1]
        number = _finite_float("leverage", value)
        if number != int(number) or not 1 <= number <= 125:
            raise IntentError("leverage", value, "must be a whole number from 1 to 125")
        leverage = int(number)

    found = _optional(payload, "source")
    origin = str(found[1]) if found is not None else source
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


def _finite_float(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise IntentError(field, value, "must be a number")
    try:
        number = float(value)
    except ValueError as exc:
        raise IntentError(field, value, "must be a number") from exc
    if not math.isfinite(number):
        raise IntentError(field, value, "must be a finite number")
    return number
