"""Backtest speed against what a user would pick instead: a plain Python loop and vectorbt.

Same bars, same entries, comparable stops, one benchmark group per workload:

* ``dense``: 1,000,000 synthetic 1m bars (a seeded log-normal walk around 30,000, BTCUSDT's
  tick and step), an entry signal at every bar, long only, one position at a time (an
  entry while one is open is dropped, as vectorbt's ``from_signals`` drops it).
* ``sparse``: the same bars, an entry signal every 240th bar (every 4 hours).
* ``dense_100x10k``: 100 symbols x 10,000 bars of the same walk, entry at every bar; the
  core runs series in parallel, so this is the one where more threads can help.

Contenders:

* ``core``: ``pyquant._core.backtest_run`` without detail (arrays in, columns out).
* ``run_backtest``: the Python API, polars in, exact Decimal tables out (the summary is
  computed when first read); ``run_backtest_summary`` reads the summary too.
* ``python_loop``: a plain float loop a user would write for the same exits (Wilder ATR over
  closed bars, a stop of 2 ATR clamped to 0.3-1 % on the tick grid, take-profits of 30/30/40 %
  at 1R/2R/3R, breakeven after the first, ratchet, 2-ATR trailing from 3R; each bar visited
  open, low, high, close).
* ``vectorbt_numba`` / ``vectorbt_rust``: ``vbt.Portfolio.from_signals`` with each engine,
  ``sl_stop`` per bar (the same clamped 2-ATR distance, in %), ``sl_trail=True`` and
  ``tp_stop`` at 3 times the stop (one take-profit leg, a trailing distance fixed at entry:
  a little less work per bar than pyquant's ladder and ATR trailing). The ATR array is built
  before timing; numba's compilation is done by a warm-up run before timing.

A last group reads 1,000,000 intent lines with ``load_intents`` beside the per-line reader it
replaced (``json.loads`` and ``parse_intent`` per line), and checks they give the same frame.

Every contender gets one untimed round and fifteen timed ones (the Python loop one). Every
row records the trades it produced in ``extra_info`` (a run that does nothing cannot win)
and ``ns_per_bar``. Threads: run once with ``RAYON_NUM_THREADS=1`` (one core) and once
without (all cores); ``make bench`` does both. vectorbt is optional (the ``bench`` extra): its
rows skip, naming the reason, when it cannot be imported. With ``--benchmark-disable`` (the
default suite) only pyquant and the Python loop run, once, on 20,000 bars: no vectorbt
import, no numba compilation.
"""

from __future__ import annotations

import math
import os
from decimal import Decimal
from typing import Any

import numpy as np
import polars as pl
import pytest

from pyquant import _core
from pyquant import backtest as bt
from pyquant.backtest import loading as bt_loading
from pyquant.backtest import running as bt_running

SYMBOL = "BTCUSDT"
NOTIONAL = 1000.0
TAKER_FEE = 0.0005
T0 = 1_600_000_020_000 - 1_600_000_020_000 % 60_000
ATR_PERIOD = 14
POLICY: dict[str, Any] = {
    "stop_atr": 2.0,
    "min_stop_pct": 0.003,
    "max_stop_pct": 0.03,
    "max_margin_loss": 0.10,  # at leverage 10: at most 1 % from the entry
    "ladder": [
        {"at": 1.0, "fraction": 0.3},
        {"at": 2.0, "fraction": 0.3},
        {"at": 3.0, "fraction": 0.4},
    ],
    "breakeven_after_level": 1,
    "ratchet_to_previous_level": True,
    "trail_atr": 2.0,
    "trail_activate_r": 3.0,
}
CONFIG = bt.BacktestConfig(
    notional_usd=Decimal(1000),
    taker_fee=Decimal("0.0005"),
    leverage=10,
    one_position_per_symbol=True,
)
MAX_STOP = min(POLICY["max_stop_pct"], POLICY["max_margin_loss"] / CONFIG.leverage)
WORKLOADS = {
    # name: (series, bars per series, entry every n bars)
    "dense": (1, 1_000_000, 1),
    "sparse": (1, 1_000_000, 240),
    "dense_100x10k": (100, 10_000, 1),
}
CONTENDERS = (
    "core",
    "run_backtest",
    "run_backtest_summary",
    "python_loop",
    "vectorbt_numba",
    "vectorbt_rust",
)


def _walk(bars: int, seed: int, tick: float) -> dict[str, np.ndarray[Any, Any]]:
    # 300,000 ticks high (BTCUSDT at 30,000.0), moves of 0.08 % a bar, on the tick grid.
    rng = np.random.default_rng(seed)
    level = 300_000 * tick

    def grid(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        return np.round(np.round(x / tick) * tick, 8)

    close = grid(level * np.exp(np.cumsum(rng.normal(0.0, 0.0008, bars))))
    open_ = np.concatenate([[level], close[:-1]])
    high = grid(np.maximum(open_, close) * (1 + np.abs(rng.normal(0, 0.0004, bars))))
    low = grid(np.minimum(open_, close) * (1 - np.abs(rng.normal(0, 0.0004, bars))))
    return {"open": open_, "high": high, "low": low, "close": close}


def _klines(walk: dict[str, np.ndarray[Any, Any]], symbol: str) -> pl.DataFrame:
    bars = walk["close"].size
    return bt.validate_klines(
        pl.DataFrame(
            {
                "open_time": T0 + 60_000 * np.arange(bars, dtype=np.int64),
                **walk,
                "volume": np.ones(bars),
                "symbol": symbol,
                "interval": "1m",
            }
        )
    )


def _entries(klines: pl.DataFrame, every: int) -> pl.DataFrame:
    times = klines["open_time"].gather_every(every)
    return pl.DataFrame(
        {
            "intent_id": times.cast(pl.String),
            "time_ms": times,
            "symbol": klines["symbol"][0],
            "side": "BUY",
            "confidence": 0.5,
        }
    )


class Workload:
    """The bars, entries and per-contender inputs of one workload, built once."""

    def __init__(self, name: str, scale: float) -> None:
        series, bars, self.every = WORKLOADS[name]
        bars = max(int(bars * scale), 2_000)
        self.rules, _ = bt.load_exchange_rules()
        self.grids = _grids(self.rules, series)
        self.symbols = [symbol for symbol, _, _ in self.grids]
        self.walks = [_walk(bars, seed, tick) for seed, (_, tick, _) in enumerate(self.grids)]
        self.klines = [_klines(w, s) for w, s in zip(self.walks, self.symbols, strict=True)]
        self.entries = pl.concat([_entries(k, self.every) for k in self.klines])
        self.bars = series * bars
        self.policy = _core.ExitPolicy(**POLICY)
        intents, one = bt_running._entries_for(self.klines, self.entries, None)
        self.series = [
            s.arrays for s in bt_running._series_inputs(self.klines, self.symbols, intents, None)
        ]
        self.options = bt_running._core_options(CONFIG, one, detail=False)


def _grids(rules: Any, count: int) -> list[tuple[str, float, float]]:
    """BTCUSDT first, then symbols whose entry of 1,000 USDT at 300,000 ticks is 10+ steps."""
    found = []
    for symbol in [SYMBOL, *(s for s in rules.symbols() if s != SYMBOL)]:
        # The decimals of the tick and step (the walk and the loop round to 10^-decimals).
        tick = 10.0 ** -len(rules.quantize_price(symbol, "1").partition(".")[2])
        step = 10.0 ** -len(rules.quantize_qty(symbol, "1").partition(".")[2])
        if NOTIONAL / (300_000 * tick) >= 10 * step and symbol.endswith("USDT"):
            found.append((symbol, tick, step))
        if len(found) == count:
            return found
    pytest.skip(f"only {len(found)} symbols fit the workload of {count} series")


_WORKLOADS: dict[tuple[str, float], Workload] = {}


def _workload(name: str, scale: float) -> Workload:
    key = (name, scale)
    if key not in _WORKLOADS:
        _WORKLOADS.clear()  # one workload in memory at a time
        _WORKLOADS[key] = Workload(name, scale)
    return _WORKLOADS[key]


def _threads() -> str:
    given = os.environ.get("RAYON_NUM_THREADS")
    return f"{given} thread(s)" if given else f"all {os.cpu_count()} cores"


# ---------------------------------------------------------------------------------------------
# The plain Python loop


def wilder_atr_before(walk: dict[str, np.ndarray[Any, Any]]) -> np.ndarray[Any, Any]:
    """ATR(14), Wilder's, over the bars closed before each bar (NaN until ready)."""
    high, low, close = walk["high"], walk["low"], walk["close"]
    prev = np.concatenate([[np.nan], close[:-1]])
    tr = np.fmax(high - low, np.fmax(np.abs(high - prev), np.abs(low - prev)))
    tr[0] = high[0] - low[0]
    atr = np.full(close.size, np.nan)
    if close.size <= ATR_PERIOD:
        return atr
    value = tr[:ATR_PERIOD].mean()
    out = [value]
    for x in tr[ATR_PERIOD:].tolist():
        value = (value * (ATR_PERIOD - 1) + x) / ATR_PERIOD
        out.append(value)
    # out[k] is the ATR after bar ATR_PERIOD - 1 + k closed: known from the next bar on.
    atr[ATR_PERIOD:] = out[:-1]
    return atr


def python_loop(walk: dict[str, np.ndarray[Any, Any]], every: int, tick: float, step: float) -> int:
    """Run the exits bar by bar in plain Python floats on the tick grid; return the trades."""
    opens, highs, lows, closes = (walk[k].tolist() for k in ("open", "high", "low", "close"))
    fractions = [f["fraction"] for f in POLICY["ladder"]]
    at_r = [f["at"] for f in POLICY["ladder"]]
    stop_atr, trail_atr, activate = POLICY["stop_atr"], POLICY["trail_atr"], 3.0
    trades = 0
    open_position = False
    entry = stop = risk = remaining = peak = 0.0
    levels: list[float] = []
    next_level = 0
    pnl = 0.0
    atr = math.nan
    prev_close = math.nan
    trs: list[float] = []
    for i, (o, h, lo, c) in enumerate(zip(opens, highs, lows, closes, strict=True)):
        if not open_position and i % every == 0:
            distance = stop_atr * atr if atr == atr else POLICY["max_stop_pct"] * o
            distance = min(max(distance, POLICY["min_stop_pct"] * o), MAX_STOP * o)
            quantity = math.floor(NOTIONAL / o / step) * step
            stop = math.floor((o - distance) / tick) * tick
            risk = o - stop
            if quantity > 0 and risk > 0:
                open_position = True
                entry, remaining, peak, next_level = o, quantity, o, 0
                levels = [round((o + r * risk) / tick) * tick for r in at_r]
                pnl = -o * quantity * TAKER_FEE
        if open_position:
            for mark in (o, lo, h, c):
                if mark <= stop:
                    price = min(mark, stop)
                    pnl += (price - entry) * remaining - price * remaining * TAKER_FEE
                    remaining = 0.0
                while remaining > 0 and next_level < len(levels) and mark >= levels[next_level]:
                    last = next_level == len(levels) - 1
                    take = remaining if last else quantity * fractions[next_level]
                    price = max(mark, levels[next_level]) if mark == o else levels[next_level]
                    pnl += (price - entry) * take - price * take * TAKER_FEE
                    remaining -= take
                    next_level += 1
                    stop = max(stop, entry if next_level == 1 else levels[next_level - 2])
                if remaining > 1e-12 and atr == atr and mark - entry >= activate * risk:
                    peak = max(peak, mark)
                    stop = max(stop, math.floor((peak - trail_atr * atr) / tick) * tick)
                if remaining <= 1e-12:
                    open_position = False
                    trades += 1
                    break
        # Wilder's ATR over closed bars: this bar counts from the next one on.
        if prev_close == prev_close:
            tr = max(h - lo, abs(h - prev_close), abs(lo - prev_close))
        else:
            tr = h - lo
        prev_close = c
        if atr == atr:
            atr = (atr * (ATR_PERIOD - 1) + tr) / ATR_PERIOD
        else:
            trs.append(tr)
            if len(trs) == ATR_PERIOD:
                atr = sum(trs) / ATR_PERIOD
    return trades + int(open_position)


# ---------------------------------------------------------------------------------------------
# vectorbt


def _vectorbt(engine: str) -> Any:
    vbt = pytest.importorskip(
        "vectorbt", reason="vectorbt is not installed (pip install 'pyquant[bench]')"
    )
    if engine == "rust":
        pytest.importorskip(
            "vectorbt_rust",
            reason="vectorbt-rust is not installed (pip install 'pyquant[bench]')",
        )
    return vbt


def _vectorbt_inputs(work: Workload) -> dict[str, Any]:
    import pandas as pd

    index = pd.date_range("2020-09-13 12:34", periods=work.walks[0]["close"].size, freq="1min")

    def frame(key: str) -> Any:
        return pd.DataFrame(
            {s: w[key] for s, w in zip(work.symbols, work.walks, strict=True)}, index=index
        )

    stop_pct = []
    for w in work.walks:
        atr = wilder_atr_before(w)
        pct = np.where(np.isnan(atr), POLICY["max_stop_pct"], POLICY["stop_atr"] * atr / w["open"])
        stop_pct.append(np.clip(pct, POLICY["min_stop_pct"], MAX_STOP))
    sl = pd.DataFrame(dict(zip(work.symbols, stop_pct, strict=True)), index=index)
    signals = np.zeros(index.size, dtype=bool)
    signals[:: work.every] = True
    entries = pd.DataFrame({s: signals for s in work.symbols}, index=index)
    return {
        "close": frame("close"),
        "entries": entries,
        "open": frame("open"),
        "high": frame("high"),
        "low": frame("low"),
        "price": frame("open"),
        "sl_stop": sl,
        "sl_trail": True,
        "tp_stop": sl * 3.0,
        "size": NOTIONAL,
        "size_type": "value",
        "fees": TAKER_FEE,
        "init_cash": 1e15,
        "freq": "1min",
    }


# ---------------------------------------------------------------------------------------------
# The benchmark


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_bench_versus(benchmark, workload, contender):
    enabled = not benchmark.disabled
    if not enabled and contender.startswith("vectorbt"):
        pytest.skip("vectorbt rows run with make bench (import and numba compilation are slow)")
    work = _workload(workload, 1.0 if enabled else 0.02 if workload != "dense_100x10k" else 0.2)
    benchmark.group = f"backtest vs others: {workload} ({_threads()})"
    # Fifteen timed rounds after one untimed (every contender's first call pays for fresh
    # pages or compilation): on a shared 2-vCPU machine a burst of noise lasts seconds, and
    # the minimum of seven rounds sometimes fell wholly inside one (the same core run
    # measured 40 ms and 70 ms minutes apart).
    rounds, warmup = (15, 1) if enabled else (1, 0)

    if contender == "core":

        def run() -> int:
            out = _core.backtest_run(work.series, [work.policy], work.rules, **work.options)
            return len(out["trades"]["trade"])

    elif contender == "run_backtest":

        def run() -> int:
            result = bt.run_backtest(
                work.klines, work.policy, work.rules, entries=work.entries, config=CONFIG
            )
            return result.trades.height

    elif contender == "run_backtest_summary":

        def run() -> int:
            result = bt.run_backtest(
                work.klines, work.policy, work.rules, entries=work.entries, config=CONFIG
            )
            assert result.summary.height > 0  # the metrics, computed when first read
            return result.trades.height

    elif contender == "python_loop":
        rounds, warmup = 1, 0  # about a second per million bars

        def run() -> int:
            return sum(
                python_loop(w, work.every, tick, step)
                for w, (_, tick, step) in zip(work.walks, work.grids, strict=True)
            )

    else:
        vbt = _vectorbt(contender.removeprefix("vectorbt_"))
        inputs = _vectorbt_inputs(work)
        engine = contender.removeprefix("vectorbt_")
        # Warm-up (numba compiles here) and the trade count, outside the timing.
        warm = vbt.Portfolio.from_signals(**inputs, engine=engine)
        counted = int(warm.trades.count().sum())

        def run() -> int:
            vbt.Portfolio.from_signals(**inputs, engine=engine)
            return counted

    trades = benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=warmup)
    assert trades > 0
    benchmark.extra_info.update(
        contender=contender,
        workload=workload,
        threads=_threads(),
        bars=work.bars,
        entries=work.entries.height,
        trades=trades,
    )
    if enabled:
        benchmark.extra_info["ns_per_bar"] = round(benchmark.stats.stats.min / work.bars * 1e9, 1)


# ---------------------------------------------------------------------------------------------
# Intents JSONL


@pytest.mark.parametrize("reader", ["load_intents", "per_line"])
def test_bench_load_intents(benchmark, tmp_path, reader):
    """1,000,000 intent lines (id, time, symbol, side, confidence), as a program writes them.

    ``load_intents`` reads them as columns; ``per_line`` is the reference it must equal:
    ``json.loads`` and ``parse_intent`` on every line (what ``load_intents`` did before).
    """
    lines = 1_000_000 if not benchmark.disabled else 2_000
    path = tmp_path / "intents.jsonl"
    times = T0 + 60_000 * np.arange(lines, dtype=np.int64)
    pl.DataFrame(
        {
            "id": pl.Series(np.arange(lines)).cast(pl.String).str.replace(r"^", "i"),
            "time": times,
            "symbol": SYMBOL,
            "side": np.where(np.arange(lines) % 3 == 0, "SELL", "BUY"),
            "confidence": np.round(np.random.default_rng(5).uniform(0.3, 0.9, lines), 4),
        }
    ).write_ndjson(path)

    def per_line() -> pl.DataFrame:
        text = path.read_text(encoding="utf-8").splitlines()
        rows = [bt_loading._intent_row(path, n, line) for n, line in enumerate(text, start=1)]
        return bt_loading._intent_frame([r for r in rows if r is not None])

    run = (lambda: bt.load_intents(path)) if reader == "load_intents" else per_line
    frame = benchmark.pedantic(run, rounds=3 if reader == "load_intents" else 1, iterations=1)
    assert frame.height == lines
    if reader == "load_intents":
        assert frame.equals(per_line())
    benchmark.group = "intents JSONL: lines read into the entries frame"
    benchmark.extra_info.update(reader=reader, lines=lines, bytes=path.stat().st_size)
