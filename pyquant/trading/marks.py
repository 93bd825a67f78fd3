"""Mark prices from the market stream the daemon already has, for sizing entries.

The desk needs a symbol's mark to size each entry. Asking REST (``premiumIndex``) per intent
costs a request weight and a round trip for every line of a JSONL file read again after a
restart; the mark-price websocket delivers the same number every second. ``MarkCache``
keeps the latest mark of every symbol from those messages.

It costs the hot path (the mark-message callback, which measures tick-to-order latency)
one list append: messages are parsed only when a mark is asked for, or once the backlog
reaches ``max_pending`` messages. A mark older than ``max_age_s`` (by this process's clock)
is not returned, so the desk falls back to REST when the stream is stale.

Usage::

    marks = MarkCache(max_age_s=10)
    marks.feed(raw_message)                 # in the mark-price callback, as received
    price = marks.get("BTCUSDT")            # Decimal, or None (unknown or stale)
    desk = TradingDesk(..., mark_price=marks.get)
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

logger = logging.getLogger(__name__)


class MarkCache:
    """The latest mark price per symbol from raw mark-price stream messages.

    Args:
        max_age_s: a mark received longer ago than this is stale (``get`` returns None).
        max_pending: parse the backlog once this many messages wait (bounds memory).
        clock: seconds, monotonic (injected for tests).
    """

    def __init__(
        self,
        *,
        max_age_s: float = 10.0,
        max_pending: int = 512,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_age_s = max_age_s
        self._max_pending = max_pending
        self._clock = clock
        self._pending: list[tuple[float, bytes | str]] = []
        self._marks: dict[str, tuple[Decimal, float, int]] = {}  # price, received, event ms
        self.malformed = 0

    def feed(self, data: bytes | str) -> None:
        """Keep one raw message (``markPriceUpdate``, the ``@arr`` array or a combined wrap)."""
        self._pending.append((self._clock(), data))
        if len(self._pending) >= self._max_pending:
            self._drain()

    def get(self, symbol: str) -> Decimal | None:
        """Return the symbol's latest mark, or None when unknown or older than ``max_age_s``."""
        if self._pending:
            self._drain()
        found = self._marks.get(symbol)
        if found is None:
            return None
        price, received, _ = found
        if self._clock() - received > self.max_age_s:
            return None
        return price

    def symbols(self) -> list[str]:
        """Return the symbols with a mark (fresh or not)."""
        if self._pending:
            self._drain()
        return sorted(self._marks)

    def _drain(self) -> None:
        pending, self._pending = self._pending, []
        for received, data in pending:
            try:
                document = json.loads(data)
            except (ValueError, RecursionError):
                self.malformed += 1
                continue
            if isinstance(document, dict) and "data" in document and "stream" in document:
                document = document["data"]
            items = document if isinstance(document, list) else [document]
            for item in items:
                self._apply(item, received)

    def _apply(self, item: object, received: float) -> None:
        if not isinstance(item, dict) or item.get("e") not in (None, "markPriceUpdate"):
            return
        symbol, text, event_ms = item.get("s"), item.get("p"), item.get("E", 0)
        if not isinstance(symbol, str) or not isinstance(text, str):
            return
        try:
            price = Decimal(text)
        except InvalidOperation:
            self.malformed += 1
            return
        if not price.is_finite() or price <= 0:
            self.malformed += 1
            return
        event = event_ms if isinstance(event_ms, int) else 0
        known = self._marks.get(symbol)
        if known is not None and event and event < known[2]:
            return  # an older message arriving late (a REST poll racing the stream)
        self._marks[symbol] = (price, received, event)


__all__ = ["MarkCache"]
