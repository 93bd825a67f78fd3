"""The demo intent producer: the original system's 24 h momentum rule.

Every ``interval_s`` it reads ``GET /fapi/v1/ticker/24hr``; a symbol whose
``priceChangePercent`` is beyond ``±threshold_pct`` gives a BUY (rising) or SELL (falling)
intent with ``confidence = min(0.5 + |change| / 100, 0.8)``. Symbols the caller reports busy
(a position open or an entry in flight) are skipped, so the guard sees one intent per
opportunity rather than a rejection every round. Intent ids are
``demo-<symbol>-<side>-<round>``: stable within a round, so a retried round is a duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from pyquant.errors import ExchangeError
from pyquant.exchange.venue import Venue
from pyquant.trading.guard import position_id_text  # base 36, the same compact ids

logger = logging.getLogger(__name__)

MAX_CONFIDENCE = Decimal("0.8")


def demo_intents(
    tickers: Iterable[Mapping[str, Any]],
    *,
    threshold_pct: Decimal,
    round_id: int | str,
    now_ms: int,
    tradable: Callable[[str], bool] = lambda _s: True,
) -> list[dict[str, Any]]:
    """Apply the momentum rule to one ticker snapshot.

    Args:
        tickers: ``ticker/24hr`` rows.
        threshold_pct: |priceChangePercent| must exceed this (percent, 1 = 1 %).
        round_id: the producer's round number, part of each intent id.
        now_ms: creation time stamped on the intents.
        tradable: filter for symbols the daemon may trade now.

    Returns:
        Intent payloads in pyquant's format, strongest move first.
    """
    out: list[tuple[Decimal, dict[str, Any]]] = []
    for row in tickers:
        symbol = row.get("symbol")
        try:
            change = Decimal(str(row.get("priceChangePercent")))
        except InvalidOperation:
            continue
        if not isinstance(symbol, str) or not change.is_finite() or abs(change) <= threshold_pct:
            continue
        if not tradable(symbol):
            continue
        side = "BUY" if change > 0 else "SELL"
        confidence = min(Decimal("0.5") + abs(change) / 100, MAX_CONFIDENCE)
        out.append(
            (
                abs(change),
                {
                    "id": f"demo-{symbol}-{side}-{round_id}",
                    "symbol": symbol,
                    "side": side,
                    "confidence": float(confidence),
                    "created_at_ms": now_ms,
                    "source": "demo",
                },
            )
        )
    out.sort(key=lambda item: item[0], reverse=True)
    return [payload for _, payload in out]


class DemoProducer:
    """Runs the momentum rule on a timer and hands each intent payload to ``submit``.

    Args:
        venue: where ``ticker/24hr`` is read.
        submit: awaited with each payload (the daemon's intake).
        interval_s: seconds between rounds.
        threshold_pct: the rule's threshold in percent.
        tradable: filter for symbols that may get an intent now.
        now_ms: clock for ``created_at_ms`` (the venue's clock in the daemon).
        run_tag: part of every intent id, unique per run (default: the start time in base
            36), so a restart with the same journal does not reuse ids the guard has seen.
    """

    def __init__(
        self,
        venue: Venue,
        submit: Callable[[dict[str, Any]], Awaitable[None]],
        *,
        interval_s: float = 5.0,
        threshold_pct: Decimal = Decimal("1"),
        tradable: Callable[[str], bool] = lambda _s: True,
        now_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        run_tag: str | None = None,
    ) -> None:
        self._venue = venue
        self._run_tag = run_tag or position_id_text(time.time_ns() // 1_000_000)
        self._submit = submit
        self._interval_s = interval_s
        self._threshold = threshold_pct
        self._tradable = tradable
        self._now_ms = now_ms
        self._stop = asyncio.Event()
        self.rounds = 0
        self.produced = 0

    def stop(self) -> None:
        """Finish after the current round."""
        self._stop.set()

    async def run_once(self) -> int:
        """Run one round; return how many intents it produced."""
        self.rounds += 1
        try:
            tickers = await self._venue.ticker_24hr()
        except ExchangeError as exc:
            logger.warning("Demo producer could not read ticker/24hr error=%s", exc)
            return 0
        payloads = demo_intents(
            tickers,
            threshold_pct=self._threshold,
            round_id=f"{self._run_tag}-{self.rounds}",
            now_ms=self._now_ms(),
            tradable=self._tradable,
        )
        for payload in payloads:
            if self._stop.is_set():
                break
            await self._submit(payload)
            self.produced += 1
        return len(payloads)

    async def run(self) -> None:
        """Produce until ``stop()`` or cancellation."""
        while not self._stop.is_set():
            await self.run_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._interval_s)


__all__ = ["DemoProducer", "demo_intents"]
