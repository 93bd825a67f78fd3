"""Market data of the simulator: recorded klines replayed as a deterministic mark-price path.

Input is 1m klines (Parquet or CSV with ``open_time, open, high, low, close`` and optionally
``volume`` and ``symbol``; without a ``symbol`` column the symbol is the file name's first
``_``-separated part, e.g. ``BTCUSDT_1m_last.parquet``). The bundled default is two real days
of six liquid symbols (``data/SOURCES.md``).

Inside each 1m bar the mark moves once per second along a seeded path: open at second 0, the
bar's first extreme (low first for an up bar, with probability 0.7) somewhere in seconds 5-28,
the other extreme in seconds 31-54, close at second 59, straight lines between these knots plus
seeded noise clipped to ``[low, high]`` and rounded to the symbol's tick. So the path's OHLC is
exactly the recorded bar's OHLC, the served klines agree with the stream, and the same seed
gives the same path on every run, whatever order the seconds are asked in.

Times are rebased: the replay's start bar (24 h after the first bar when the data holds more
than two days, else the middle of the data) maps to the clock's start minute, so served
klines and event times look live while history before the start is available for warm-up.
Past the end of the data, and for symbols without data, prices continue as a seeded random walk
(per-minute log-return volatility estimated from the data, 0.08 % without data).
"""

from __future__ import annotations

import functools
import itertools
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

from pyquant.sim.validation import SymbolRules, fmt_decimal

__all__ = ["DEFAULT_DATA", "INTERVAL_MS", "Bar", "Replay", "SimClock", "load_klines"]

MINUTE_MS = 60_000
DAY_MS = 86_400_000
DEFAULT_DATA = Path(__file__).with_name("data") / "klines_1m_2025-05-29_2025-05-30.parquet"
INTERVAL_MS: dict[str, int] = {
    "1m": MINUTE_MS,
    "3m": 3 * MINUTE_MS,
    "5m": 5 * MINUTE_MS,
    "15m": 15 * MINUTE_MS,
    "30m": 30 * MINUTE_MS,
    "1h": 60 * MINUTE_MS,
    "2h": 120 * MINUTE_MS,
    "4h": 240 * MINUTE_MS,
    "6h": 360 * MINUTE_MS,
    "8h": 480 * MINUTE_MS,
    "12h": 720 * MINUTE_MS,
    "1d": DAY_MS,
    "3d": 3 * DAY_MS,
    "1w": 7 * DAY_MS,
}


@dataclass(frozen=True)
class Bar:
    """One 1m bar in data time (ms) with exact decimal prices."""

    open_time: int
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal


class SimClock:
    """The exchange clock: wall time times ``speed`` from a start, or manual (``speed`` 0).

    Args:
        start_ms: Clock value at creation (defaults to the wall clock, floored to the second).
        speed: Clock seconds per wall second; 0 freezes it until :meth:`advance` is called.
    """

    def __init__(self, start_ms: int | None = None, speed: float = 1.0) -> None:
        if speed < 0 or not math.isfinite(speed):
            raise ValueError(f"speed {speed!r} found: must be a finite number >= 0")
        self.start_ms = start_ms if start_ms is not None else int(time.time()) * 1000
        self.speed = speed
        self._anchor_sim = self.start_ms
        self._anchor_wall = time.monotonic()

    @property
    def manual(self) -> bool:
        """True when the clock only moves through :meth:`advance`."""
        return self.speed == 0

    def now_ms(self) -> int:
        """Current clock value in ms."""
        if self.manual:
            return self._anchor_sim
        return self._anchor_sim + int((time.monotonic() - self._anchor_wall) * 1000 * self.speed)

    def advance(self, ms: int) -> int:
        """Move the clock forward by ``ms`` (any mode); returns the new value."""
        if ms < 0:
            raise ValueError(f"advance {ms} ms found: the clock never goes back")
        self._anchor_sim = self.now_ms() + ms
        self._anchor_wall = time.monotonic()
        return self._anchor_sim


def _to_decimal(value: object) -> Decimal:
    if isinstance(value, float):
        return Decimal(repr(value))
    return Decimal(str(value))


def load_klines(paths: Sequence[str | Path]) -> dict[str, list[Bar]]:
    """Read 1m klines from Parquet or CSV files, grouped by symbol and sorted by open time.

    Raises:
        ValueError: A file lacks a required column, holds no rows, or has a bar whose high/low
            do not enclose its open/close or whose open time is not on a minute.
    """
    if list(paths) == [DEFAULT_DATA]:
        return dict(_default_klines())
    return _read_klines(paths)


@functools.lru_cache(maxsize=1)
def _default_klines() -> dict[str, list[Bar]]:
    return _read_klines([DEFAULT_DATA])


def _read_klines(paths: Sequence[str | Path]) -> dict[str, list[Bar]]:
    import polars as pl

    out: dict[str, dict[int, Bar]] = {}
    for raw in paths:
        path = Path(raw)
        frame = pl.read_csv(path) if path.suffix.lower() == ".csv" else pl.read_parquet(path)
        missing = [
            c for c in ("open_time", "open", "high", "low", "close") if c not in frame.columns
        ]
        if missing:
            raise ValueError(f"klines file {path}: missing column(s) {', '.join(missing)}")
        if frame.height == 0:
            raise ValueError(f"klines file {path}: no rows")
        default_symbol = path.stem.split("_")[0].upper()
        symbols = frame["symbol"].to_list() if "symbol" in frame.columns else None
        volumes = frame["volume"].to_list() if "volume" in frame.columns else None
        columns = [frame[c].to_list() for c in ("open_time", "open", "high", "low", "close")]
        for i, (t, o, h, lo, c) in enumerate(zip(*columns, strict=True)):
            symbol = str(symbols[i]).upper() if symbols else default_symbol
            if int(t) % MINUTE_MS:
                raise ValueError(f"klines file {path}: open_time {t} is not on a minute")
            bar = Bar(
                int(t),
                _to_decimal(o),
                _to_decimal(h),
                _to_decimal(lo),
                _to_decimal(c),
                _to_decimal(volumes[i]) if volumes else Decimal(0),
            )
            if not bar.low <= min(bar.open, bar.close) <= max(bar.open, bar.close) <= bar.high:
                raise ValueError(
                    f"klines file {path}: bar {symbol} {t} has high/low not enclosing open/close"
                )
            out.setdefault(symbol, {})[bar.open_time] = bar
    return {s: [bars[t] for t in sorted(bars)] for s, bars in out.items()}


@dataclass
class _Series:
    symbol: str
    rules: SymbolRules
    bars: dict[int, Bar]  # data time -> bar
    first: int
    last: int
    volatility: float
    walk_rng: random.Random
    raw: dict[int, Bar] = field(default_factory=dict)  # served time -> bar as loaded
    paths: dict[int, list[Decimal]] = field(default_factory=dict)


class Replay:
    """Deterministic per-second mark prices and kline history for a set of symbols.

    Args:
        klines: 1m bars by symbol (data time), e.g. from :func:`load_klines`; may be empty.
        rules: Symbol rules of every served symbol (tick size for rounding).
        start_ms: Served time of the replay's start (usually the clock's start).
        seed: Seed of the in-bar paths and the random walk.
        walk_start: Start prices of symbols without data (default: 10 000 ticks).
    """

    def __init__(
        self,
        klines: dict[str, list[Bar]],
        rules: dict[str, SymbolRules],
        start_ms: int,
        seed: int = 0,
        walk_start: dict[str, Decimal] | None = None,
    ) -> None:
        self.seed = seed
        self.series: dict[str, _Series] = {}
        starts = [bars[0].open_time for bars in klines.values() if bars]
        ends = [bars[-1].open_time for bars in klines.values() if bars]
        start_minute = start_ms - start_ms % MINUTE_MS
        if starts:
            first, last = min(starts), max(ends)
            span = last - first
            replay_start = (
                first + DAY_MS if span > 2 * DAY_MS - 2 * MINUTE_MS else first + span // 2
            )
            replay_start -= replay_start % MINUTE_MS
        else:
            replay_start = start_minute
        self.shift = start_minute - replay_start
        self.start_ms = start_minute
        for symbol, symbol_rules in rules.items():
            bars = klines.get(symbol) or []
            rng = random.Random(f"walk:{seed}:{symbol}")  # noqa: S311 - seeded simulation, not security
            if bars:
                closes = [float(b.close) for b in bars]
                rets = [math.log(b / a) for a, b in itertools.pairwise(closes) if a > 0 and b > 0]
                vol = (sum(r * r for r in rets) / len(rets)) ** 0.5 if rets else 0.0008
                # rounded to the tick lazily (see _get): most bars are never asked for
                series_bars = {b.open_time + self.shift: b for b in bars}
            else:
                start_price = (walk_start or {}).get(symbol) or self._default_start(symbol_rules)
                vol = 0.0008
                t0 = start_minute - DAY_MS
                series_bars = {
                    t0: Bar(t0, start_price, start_price, start_price, start_price, Decimal(0))
                }
            times = sorted(series_bars)
            self.series[symbol] = _Series(
                symbol, symbol_rules, {}, times[0], times[-1], max(vol, 1e-5), rng, series_bars
            )

    @staticmethod
    def _default_start(rules: SymbolRules) -> Decimal:
        price = rules.tick_size * 10_000 if rules.tick_size > 0 else Decimal(100)
        if rules.min_price > 0:
            price = max(price, rules.min_price * 100)
        return price

    def _get(self, s: _Series, t: int) -> Bar | None:
        found = s.bars.get(t)
        if found is None:
            raw = s.raw.get(t)
            if raw is None:
                return None
            found = s.bars[t] = self._round_bar(raw, s.rules, t)
        return found

    @staticmethod
    def _round_bar(bar: Bar, rules: SymbolRules, open_time: int) -> Bar:
        def r(v: Decimal) -> Decimal:
            if rules.tick_size <= 0:
                return v
            return (v / rules.tick_size).quantize(Decimal(1), ROUND_HALF_EVEN) * rules.tick_size

        o, c = r(bar.open), r(bar.close)
        high, low = max(r(bar.high), o, c), min(r(bar.low), o, c)
        return Bar(open_time, o, high, low, c, bar.volume)

    @property
    def symbols(self) -> list[str]:
        """Replayed symbols."""
        return list(self.series)

    # --- bars -------------------------------------------------------------------------------

    def _walk_to(self, s: _Series, open_time: int) -> None:
        """Extend a series with seeded random-walk bars up to ``open_time`` (served time)."""
        tick = s.rules.tick_size if s.rules.tick_size > 0 else Decimal("0.00000001")
        while s.last < open_time:
            prev = self._get(s, s.last)
            if prev is None:  # pragma: no cover - s.last always has a bar
                raise KeyError(f"{s.symbol}: no bar at {s.last}")
            t = s.last + MINUTE_MS
            ret = s.walk_rng.gauss(0.0, s.volatility)
            open_ = prev.close
            close = max(tick, _round_to(open_ * _to_decimal(math.exp(ret)), tick))
            wick = abs(s.walk_rng.gauss(0.0, s.volatility / 2))
            high = _round_to(max(open_, close) * _to_decimal(1 + wick), tick)
            low = max(tick, _round_to(min(open_, close) * _to_decimal(1 - wick), tick))
            s.bars[t] = Bar(
                t, open_, max(high, open_, close), min(low, open_, close), close, Decimal(0)
            )
            s.last = t

    def bar(self, symbol: str, open_time: int) -> Bar | None:
        """The 1m bar opening at ``open_time`` (served time), or None before the data."""
        s = self.series[symbol]
        open_time -= open_time % MINUTE_MS
        if open_time < s.first:
            return None
        if open_time > s.last:
            self._walk_to(s, open_time)
        found = self._get(s, open_time)
        if found is None:  # a gap in the data: hold the previous close flat
            prev_t = max(t for t in (*s.raw, *s.bars) if t < open_time)
            prev = self._get(s, prev_t)
            if prev is None:  # pragma: no cover - prev_t was taken from the known bars
                raise KeyError(f"{s.symbol}: no bar at {prev_t}")
            c = prev.close
            found = s.bars[open_time] = Bar(open_time, c, c, c, c, Decimal(0))
        return found

    def path(self, symbol: str, open_time: int) -> list[Decimal]:
        """The 60 per-second prices inside the bar opening at ``open_time``."""
        s = self.series[symbol]
        cached = s.paths.get(open_time)
        if cached is not None:
            return cached
        bar = self.bar(symbol, open_time)
        if bar is None:
            raise KeyError(f"{symbol}: no data at {open_time}")
        rng = random.Random(f"path:{self.seed}:{symbol}:{open_time - self.shift}")  # noqa: S311 - seeded simulation, not security
        up = bar.close >= bar.open
        low_first = rng.random() < (0.7 if up else 0.3)
        first, second = (bar.low, bar.high) if low_first else (bar.high, bar.low)
        t1, t2 = rng.randint(5, 28), rng.randint(31, 54)
        knots = [(0, bar.open), (t1, first), (t2, second), (59, bar.close)]
        tick = s.rules.tick_size if s.rules.tick_size > 0 else Decimal("0.00000001")
        span = float(bar.high - bar.low)
        out: list[Decimal] = []
        for (ta, pa), (tb, pb) in itertools.pairwise(knots):
            for t in range(ta, tb):
                if t == ta:
                    out.append(pa)
                    continue
                frac = (t - ta) / (tb - ta)
                value = float(pa) + (float(pb) - float(pa)) * frac + rng.gauss(0.0, span * 0.08)
                price = _round_to(_to_decimal(value), tick)
                out.append(min(bar.high, max(bar.low, price)))
        out.append(bar.close)
        if len(s.paths) > 20_000:
            s.paths.clear()
        s.paths[open_time] = out
        return out

    def price_at(self, symbol: str, t_ms: int) -> Decimal:
        """The mark price of ``symbol`` at served time ``t_ms``."""
        open_time = t_ms - t_ms % MINUTE_MS
        second = (t_ms - open_time) // 1000
        return self.path(symbol, open_time)[second]

    def partial_bar(self, symbol: str, open_time: int, now_ms: int) -> Bar | None:
        """The 1m bar opening at ``open_time`` as seen at ``now_ms`` (partial when still open)."""
        if open_time > now_ms:
            return None
        bar = self.bar(symbol, open_time)
        if bar is None or now_ms >= open_time + MINUTE_MS:
            return bar
        seen = self.path(symbol, open_time)[: (now_ms - open_time) // 1000 + 1]
        frac = Decimal(len(seen)) / 60
        return Bar(open_time, seen[0], max(seen), min(seen), seen[-1], (bar.volume * frac))

    def klines(
        self,
        symbol: str,
        interval: str,
        now_ms: int,
        *,
        start: int | None = None,
        end: int | None = None,
        limit: int = 500,
        mark: bool = False,
    ) -> list[list[Any]]:
        """Klines as ``GET /fapi/v1/klines`` returns them (the last one may still be open)."""
        step = INTERVAL_MS[interval]
        s = self.series[symbol]
        now_open = now_ms - now_ms % step
        first_open = s.first - s.first % step
        if start is not None:
            lo = max(first_open, start + (-start) % step)
            hi = now_open if end is None else min(now_open, end - end % step)
            chosen = list(itertools.islice(range(lo, hi + 1, step), limit))
        else:
            hi = now_open if end is None else min(now_open, end - end % step)
            lo = max(first_open, hi - (limit - 1) * step)
            chosen = list(range(lo, hi + 1, step))
        rules = s.rules
        out: list[list[Any]] = []
        for open_time in chosen:
            parts = [
                b
                for t in range(open_time, open_time + step, MINUTE_MS)
                if (b := self.partial_bar(symbol, t, now_ms)) is not None
            ]
            if not parts:
                continue
            high = max(b.high for b in parts)
            low = min(b.low for b in parts)
            volume = sum((b.volume for b in parts), Decimal(0))
            close = parts[-1].close
            quote = volume * close
            out.append(
                [
                    open_time,
                    rules.fmt_price(parts[0].open),
                    rules.fmt_price(high),
                    rules.fmt_price(low),
                    rules.fmt_price(close),
                    "0" if mark else fmt_decimal(volume, rules.quantity_precision),
                    open_time + step - 1,
                    "0" if mark else fmt_decimal(quote, 5),
                    0 if mark else len(parts) * 60,
                    "0" if mark else fmt_decimal(volume / 2, rules.quantity_precision),
                    "0" if mark else fmt_decimal(quote / 2, 5),
                    "0",
                ]
            )
        return out

    def ticker_24h(self, symbol: str, now_ms: int) -> dict[str, Any]:
        """``GET /fapi/v1/ticker/24hr`` for one symbol, from the replayed 1m bars."""
        s = self.series[symbol]
        rules = s.rules
        begin = max(s.first, now_ms - DAY_MS + MINUTE_MS - now_ms % MINUTE_MS)
        bars = [
            b
            for t in range(begin, now_ms + 1, MINUTE_MS)
            if (b := self.partial_bar(symbol, t, now_ms)) is not None
        ]
        last = self.price_at(symbol, now_ms)
        open_ = bars[0].open if bars else last
        high = max((b.high for b in bars), default=last)
        low = min((b.low for b in bars), default=last)
        volume = sum((b.volume for b in bars), Decimal(0))
        quote = sum((b.volume * (b.high + b.low + b.close) / 3 for b in bars), Decimal(0))
        change = last - open_
        pct = change / open_ * 100 if open_ else Decimal(0)
        count = len(bars) * 60
        return {
            "symbol": symbol,
            "priceChange": rules.fmt_price(change),
            "priceChangePercent": fmt_decimal(pct, 3),
            "weightedAvgPrice": rules.fmt_price(quote / volume if volume else last),
            "lastPrice": rules.fmt_price(last),
            "lastQty": rules.fmt_qty(bars[-1].volume / 60 if bars else Decimal(0)),
            "openPrice": rules.fmt_price(open_),
            "highPrice": rules.fmt_price(high),
            "lowPrice": rules.fmt_price(low),
            "volume": fmt_decimal(volume, rules.quantity_precision),
            "quoteVolume": fmt_decimal(quote, 2),
            "openTime": bars[0].open_time if bars else now_ms,
            "closeTime": now_ms,
            "firstId": 1,
            "lastId": count,
            "count": count,
        }


def _round_to(value: Decimal, tick: Decimal) -> Decimal:
    return (value / tick).quantize(Decimal(1), ROUND_HALF_EVEN) * tick
