"""Backtest speed: bar x position evaluations per second, Rust core vs a plain Python loop.

Both run the same logic (``backtest_baseline.py`` is a port of the driver and of the exit
state machine) on the real 1m klines of tests/data/market with the ``momentum24h`` entries;
their fills must agree exactly, and that is checked before anything is timed. A second
benchmark times a 100-combination parameter grid over every 1m symbol.

With ``--benchmark-disable`` (the default suite) each case runs once on a few thousand bars;
``make bench`` enables the full sizes.
"""

from __future__ import annotations

import json
import sys
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest

from pyquant import _core
from pyquant import backtest as bt
from pyquant.backtest import running as bt_running

sys.path.insert(0, str(Path(__file__).parent))
import backtest_baseline as baseline

sys.path.insert(0, str(Path(__file__).parents[1] / "backtest"))
from backtest_helpers import DATA, EXAMPLE_POLICY, INFO

MARKET = DATA / "market"

# The worked example of exit-rules.md (fees charged by the backtest's config here) plus a
# time stop and a confidence-stretched ladder: every rule of the state machine is exercised.
POLICY = {
    **{key: value for key, value in EXAMPLE_POLICY.items() if key != "taker_fee"},
    "max_hold_ms": 4 * 3_600_000,
    "confidence_scale": 1.0,
    "m_min": 0.5,
    "m_max": 1.5,
}
CONFIG = bt.BacktestConfig(notional_usd=Decimal(1000), taker_fee=Decimal("0.0005"), leverage=10)


@pytest.fixture(scope="module")
def info() -> bytes:
    return INFO.read_bytes()


@pytest.fixture(scope="module")
def rules(info):
    return _core.ExchangeRules.from_exchange_info(info)


def _klines(symbol: str, rows: int | None) -> pl.DataFrame:
    [frame] = bt.load_klines(MARKET / f"{symbol}_1m_last.parquet")
    return frame if rows is None else frame.head(rows)


def _python_run(frame: pl.DataFrame, info: dict, policy) -> tuple[list, int]:
    symbol = str(frame["symbol"][0])
    entries = [
        (t, 1 if side == "BUY" else -1, conf)
        for t, side, conf in bt.momentum24h(frame)
        .select("time_ms", "side", "confidence")
        .iter_rows()
    ]
    bars = {c: frame[c].to_list() for c in ("open_time", "open", "high", "low", "close")}
    return baseline.run_series(
        bars,
        60_000,
        entries,
        baseline.Rules.from_exchange_info(info, symbol),
        baseline.Policy(policy.to_dict()),
        notional=CONFIG.notional_usd,
        taker_fee=CONFIG.taker_fee,
        leverage=CONFIG.leverage,
    )


def _core_inputs(frames: list[pl.DataFrame]) -> tuple[list[dict], dict]:
    intents, one_per_symbol = bt_running._entries_for(frames, None, None)
    series = [bt_running._prepare_series(f, intents, None).arrays for f in frames]
    return series, bt_running._core_options(CONFIG, one_per_symbol, detail=False)


SYMBOLS = ("ETHUSDT", "BTCUSDT", "SOLUSDT", "XRPUSDT")


@pytest.mark.parametrize("impl", ["rust", "python"])
def test_bench_bar_position_evaluations(benchmark, impl, rules, info):
    # Same work for both: momentum24h entries and the same policy over the same bars.
    # Full size: 40k bars of each of 4 symbols; smoke run: 3k bars of 2.
    rows, symbols = (3_000, SYMBOLS[:2]) if benchmark.disabled else (40_000, SYMBOLS)
    frames = [_klines(s, rows) for s in symbols]
    policy = _core.ExitPolicy(**POLICY)
    document = json.loads(info)
    series, options = _core_inputs(frames)

    # The outputs must agree before anything is timed: same fills, same evaluations.
    python = [_python_run(f, document, policy) for f in frames]
    rust = bt.run_backtest(frames, policy, rules, config=CONFIG)
    expected = sorted(
        (sym, a, b, c, d.normalize(), e.normalize())
        for sym, (fills, _) in zip(symbols, python, strict=True)
        for a, b, c, d, e in fills
    )
    got = sorted(
        (
            r["symbol"],
            int(r["trade"]),
            r["reason"],
            int(r["time_ms"]),
            Decimal(r["price"]).normalize(),
            Decimal(r["quantity"]).normalize(),
        )
        for r in rust.fills.select(
            "symbol", "trade", "reason", "time_ms", pl.col("price", "quantity").cast(pl.String)
        ).iter_rows(named=True)
    )
    assert got == expected
    evaluations = sum(n for _, n in python)
    assert rust.evaluations == evaluations > 0

    benchmark.group = "backtest: bar x position evaluations (1m, momentum24h)"
    benchmark.extra_info.update(
        symbols=list(symbols),
        bars=sum(f.height for f in frames),
        evaluations=evaluations,
        fills=len(expected),
        outputs_agree=True,
    )
    if impl == "rust":
        run = lambda: _core.backtest_run(series, [policy], rules, **options)  # noqa: E731
    else:
        run = lambda: [_python_run(f, document, policy) for f in frames]  # noqa: E731
    benchmark.pedantic(
        run, rounds=1 if benchmark.disabled else (7 if impl == "rust" else 2), iterations=1
    )
    if not benchmark.disabled:
        benchmark.extra_info["evaluations_per_s"] = evaluations / benchmark.stats.stats.mean


def test_bench_grid_100_combinations_all_1m_symbols(benchmark, rules):
    files = sorted(MARKET.glob("*_1m_*.parquet"))
    if benchmark.disabled:
        klines = [_klines(f.name.split("_")[0], 3_000) for f in files[:2]]
        grid = {"stop_atr": [1.5, 3.0], "trail_atr": [1.0, 2.0]}
    else:
        # MATICUSDT is delisted: the 2025 exchangeInfo has no rules for it, so it is left out.
        known = set(rules.symbols())
        klines = [
            frame for f in files for frame in bt.load_klines(f) if frame["symbol"][0] in known
        ]
        grid = {
            "stop_atr": [1.0, 1.5, 2.0, 2.5, 3.0],
            "trail_atr": [1.0, 1.5, 2.0, 3.0],
            "trail_activate_r": [1.0, 1.5, 2.0, 3.0, 4.0],
        }
    base = {k: v for k, v in POLICY.items() if k not in grid}
    combos = 1
    for values in grid.values():
        combos *= len(values)

    def run():
        return bt.run_grid(klines, base, grid, rules, config=CONFIG, sort_by="expectancy_r")

    table = benchmark.pedantic(run, rounds=1 if benchmark.disabled else 3, iterations=1)
    assert table.height == combos
    assert set(grid) <= set(table.columns)
    benchmark.group = "backtest: parameter grid"
    benchmark.extra_info.update(
        combinations=combos,
        symbols=len(klines),
        bars=sum(k.height for k in klines),
        evaluations=int(table["evaluations_total"][0]),
    )
