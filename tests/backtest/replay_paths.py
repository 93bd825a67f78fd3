"""Real 1m bars as mark-price paths, and the simulator history that goes with them.

Shared by the daemon consistency test: the same path goes to the simulator (``set_mark``, one
mark at a time) and to ``pyquant.backtest.exit_decisions_for_path``.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

import numpy as np
import polars as pl

from pyquant import _core

MARKET = Path(__file__).parents[1] / "data" / "market"
MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000


def real_bars(symbol: str) -> pl.DataFrame:
    """The symbol's real 1m trade-price klines from tests/data/market."""
    return pl.read_parquet(MARKET / f"{symbol}_1m_last.parquet").select(
        "open_time", "open", "high", "low", "close"
    )


def on_tick(value: float, tick: Decimal) -> Decimal:
    """A float price from the files on the tick grid (half-even, as the simulator rounds)."""
    return (Decimal(repr(value)) / tick).quantize(Decimal(1), ROUND_HALF_EVEN) * tick


def bar_marks(bars: pl.DataFrame, tick: Decimal) -> list[Decimal]:
    """Expand bars into a mark path: open, the two extremes, close; repeats dropped.

    The extreme nearer in direction of the bar's body comes second (an up bar visits its
    low first, a down bar its high first), the usual open-low-high-close reading.
    """
    marks: list[Decimal] = []
    for o, h, lo, c in bars.select("open", "high", "low", "close").iter_rows():
        first, second = (lo, h) if c >= o else (h, lo)
        for value in (o, first, second, c):
            price = on_tick(value, tick)
            if not marks or marks[-1] != price:
                marks.append(price)
    return marks


def contiguous_from(bars: pl.DataFrame, start: int, before: int, after: int) -> bool:
    """True when the bars from ``start - before`` to ``start + after`` have no gap."""
    if start - before < 0 or start + after > bars.height:
        return False
    times = bars["open_time"].slice(start - before, before + after).to_numpy()
    return bool((np.diff(times) == MINUTE_MS).all())


@dataclass(frozen=True)
class History:
    """Simulator klines for one symbol and the ATR the daemon will warm up from them.

    The real bars before the path are laid out so that they end exactly at the hour ``H`` of
    the simulator's start: the closed 1h markPriceKlines the daemon fetches at start are
    then twenty whole real hours whatever minute the test runs at. Between ``H`` and the
    start minute the data has a gap (the simulator holds the last close flat; that hour is
    still open at start and not used). The path's own bars follow from the start minute, so
    the replay's start bar is the path's first bar.
    """

    frame: pl.DataFrame
    atr: float


def history(
    symbol: str,
    bars: pl.DataFrame,
    start: int,
    start_minute_ms: int,
    tick: Decimal,
    *,
    warmup_hours: int = 20,
    atr_period: int = 14,
) -> History:
    """Build the simulator's data for ``symbol`` whose path starts at bar ``start``."""
    hour = start_minute_ms - start_minute_ms % HOUR_MS
    lead = (hour - (start_minute_ms - DAY_MS)) // MINUTE_MS  # bars from first to the hour
    past = bars.slice(start - lead, lead).with_columns(
        (hour - (lead - pl.int_range(pl.len())) * MINUTE_MS).alias("open_time")
    )
    future = bars.slice(start, DAY_MS // MINUTE_MS + 1).with_columns(
        (start_minute_ms + pl.int_range(pl.len()) * MINUTE_MS).alias("open_time")
    )
    frame = pl.concat([past, future]).with_columns(pl.lit(symbol).alias("symbol"))
    # The daemon's warm-up: the last ``warmup_hours`` closed 1h bars before H, each the
    # tick-rounded extremes of its 60 minutes, then Wilder's ATR over them.
    tail = past.tail(warmup_hours * 60)
    highs, lows, closes = [], [], []
    for h in range(warmup_hours):
        chunk = tail.slice(h * 60, 60)
        highs.append(float(max(on_tick(v, tick) for v in chunk["high"])))
        lows.append(float(min(on_tick(v, tick) for v in chunk["low"])))
        closes.append(float(on_tick(chunk["close"][-1], tick)))
    atr = float(_core.atr(np.array(highs), np.array(lows), np.array(closes), atr_period)[-1])
    return History(frame, atr)


def minute_history(
    symbol: str, bars: pl.DataFrame, start: int, start_minute_ms: int
) -> pl.DataFrame:
    """The simulator's data for a path starting at bar ``start``: a day either side, contiguous.

    Bar ``start`` lands on ``start_minute_ms``, the simulator's start minute (its replay start
    is the bar one day after the first), so the daemon's 1m warm-up is the real bars before
    the path.
    """
    day = DAY_MS // MINUTE_MS
    frame = bars.slice(start - day, 2 * day + 1)
    return frame.with_columns(
        (start_minute_ms + (pl.int_range(pl.len()) - day) * MINUTE_MS).alias("open_time"),
        pl.lit(symbol).alias("symbol"),
    )


def rounded_atr(bars: pl.DataFrame, tick: Decimal, period: int) -> float:
    """Wilder's ATR of the last bar, on tick-rounded prices (what the venue serves)."""
    cols = [[float(on_tick(v, tick)) for v in bars[c]] for c in ("high", "low", "close")]
    return float(_core.atr(*(np.array(c) for c in cols), period)[-1])
