"""The default (no detail) results: exact columns from the core's integer mantissas.

``run_backtest`` without ``detail`` asks the core for no per-bar rows and no decimal text but
for each exact column's Decimal(38, 12) mantissas (``exact=True``). These tests hold it to the
tables the core's decimal text gives (``detail=True``), on every real symbol of
tests/data/market.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from backtest_helpers import EXAMPLE_POLICY, assert_series_like_each_alone

from pyquant import _core
from pyquant import backtest as bt
from pyquant.backtest import running as bt_running

MARKET = Path(__file__).parents[1] / "data" / "market"


@pytest.fixture(scope="module")
def real_klines(rules) -> list[pl.DataFrame]:
    # MATICUSDT is delisted: the 2025 exchangeInfo has no rules for it.
    known = set(rules.symbols())
    return [
        frame
        for path in sorted(MARKET.glob("*_1m_*.parquet"))
        for frame in bt.load_klines(path)
        if frame["symbol"][0] in known
    ]


class _CoreCalls:
    """Records the ``detail`` each call into the core asked for (one call per chunk)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.details: list[bool] = []
        run = _core.backtest_run

        def spy(*args: Any, **kwargs: Any) -> Any:
            self.details.append(bool(kwargs["detail"]))
            return run(*args, **kwargs)

        monkeypatch.setattr(bt_running._core, "backtest_run", spy)


def _without_detail(result: bt.BacktestResult) -> bt.BacktestResult:
    # What a detail run holds beyond the default: trigger and mark prices, stops, levels.
    result.fills = result.fills.drop("trigger_price", "mark_price")
    return result


@pytest.mark.parametrize("preset", ["standard", "challenge", None])
def test_fast_results_equal_the_decimal_text_on_every_real_symbol(
    rules, real_klines, monkeypatch, preset
):
    policy = _core.ExitPolicy.preset(preset) if preset else _core.ExitPolicy(**EXAMPLE_POLICY)
    calls = _CoreCalls(monkeypatch)
    fast = bt.run_backtest(real_klines, policy, rules)
    assert calls.details
    assert not any(calls.details)
    slow = _without_detail(bt.run_backtest(real_klines, policy, rules, detail=True))
    assert fast.fills.height > 10_000
    assert fast.fills.schema == slow.fills.schema
    assert fast.fills.equals(slow.fills)
    assert fast.trades.equals(slow.trades)
    assert fast.summary.equals(slow.summary)
    assert fast.skipped.equals(slow.skipped)
    assert fast.evaluations == slow.evaluations
    assert fast.stops.is_empty()
    assert fast.levels.is_empty()
    assert not slow.stops.is_empty()
    assert not slow.levels.is_empty()
    assert fast.fills["price"].dtype == bt.EXACT


def test_sized_intents_on_both_sides_equal_the_decimal_text(rules, real_klines, monkeypatch):
    # Intents with their own sizes (up to 5 million USDT: PnL with many digits) and leverage,
    # both sides, several symbols interleaved in one unsorted frame.
    rng = np.random.default_rng(14)
    frames = [f for f in real_klines if f["symbol"][0] in ("BTCUSDT", "DOGEUSDT", "SOLUSDT")]
    parts = []
    for frame in frames:
        times = rng.choice(frame["open_time"].to_numpy(), size=300, replace=False)
        parts.append(
            pl.DataFrame(
                {
                    "time_ms": times,
                    "symbol": frame["symbol"][0],
                    "side": rng.choice(["BUY", "SELL"], size=times.size),
                    "confidence": rng.uniform(0.3, 0.9, size=times.size),
                    "size_usd": pl.Series(
                        rng.choice(["250", "1000.5", "5000000", ""], size=times.size)
                    ).replace("", None),
                    "leverage": rng.choice([1, 5, 20], size=times.size),
                }
            )
        )
    entries = pl.concat(parts).sample(fraction=1.0, shuffle=True, seed=3)
    policy = _core.ExitPolicy(**EXAMPLE_POLICY)
    calls = _CoreCalls(monkeypatch)
    fast = bt.run_backtest(frames, policy, rules, entries=entries)
    assert calls.details
    assert not any(calls.details)
    slow = _without_detail(bt.run_backtest(frames, policy, rules, entries=entries, detail=True))
    assert fast.trades.height > 300
    assert fast.fills.equals(slow.fills)
    assert fast.trades.equals(slow.trades)
    assert fast.summary.equals(slow.summary)
    assert fast.fills["pnl"].abs().max() > Decimal(1000)


def test_a_value_beyond_the_mantissas_takes_the_decimal_text(rules, real_klines, monkeypatch):
    # A column the core could not give as 12-decimal mantissas (None): the core's text
    # decides, and the result keeps the default's shape (no trigger or mark prices, no
    # stops, no levels).
    frames = real_klines[:2]
    policy = _core.ExitPolicy(**EXAMPLE_POLICY)
    expected = _without_detail(bt.run_backtest(frames, policy, rules, detail=True))
    calls = _CoreCalls(monkeypatch)
    spied = bt_running._core.backtest_run

    def without_pnl(*args: Any, **kwargs: Any) -> Any:
        raw = spied(*args, **kwargs)
        if "tables" in raw:
            raw["tables"] = None  # what the core gives when a value has no mantissa
        return raw

    monkeypatch.setattr(bt_running._core, "backtest_run", without_pnl)
    result = bt.run_backtest(frames, policy, rules)
    assert calls.details == [False, True]
    assert result.fills.equals(expected.fills)
    assert result.trades.equals(expected.trades)
    assert result.stops.is_empty()
    assert result.levels.is_empty()


def test_exact_tables_hold_the_decimal_text(rules, real_klines):
    # Every exact value of the core's Arrow tables is, at 12 decimals, the value its
    # decimal text writes (the detail run's strings), row for row.
    [frame] = [f for f in real_klines if f["symbol"][0] == "SOLUSDT"]
    intents, one = bt_running._entries_for([frame], None, None)
    series = [bt_running._prepare_series(frame, intents, None).arrays]
    policy = _core.ExitPolicy(**EXAMPLE_POLICY)
    fast = bt_running._core_options(bt.BacktestConfig(), one, detail=False)
    raw = _core.backtest_run(series, [policy], rules, **fast, exact=True)
    slow = _core.backtest_run(
        series, [policy], rules, **bt_running._core_options(bt.BacktestConfig(), one, detail=True)
    )
    for table, names in (
        ("fills", ("price", "quantity", "fee", "pnl")),
        ("trades", ("entry_price", "quantity", "initial_stop", "risk_price", "pnl", "fees")),
    ):
        exact = pl.DataFrame(raw["tables"][table])
        assert len(raw["tables"][table]) == exact.height == len(slow[table]["trade"]) > 50
        for name in names:
            assert exact.schema[name] == pl.Decimal(38, 12)
            texts = slow[table][f"{name}_exact"]
            assert exact[name].to_list() == [Decimal(t) for t in texts]
    # Not asked for: no tables, the float columns instead.
    assert "tables" not in slow
    assert "tables" not in _core.backtest_run(series, [policy], rules, **fast)


def test_one_symbol_total_is_the_general_total(rules, real_klines):
    # With one symbol the TOTAL row is copied from the symbol's row; the general path (a
    # second policy on another symbol alongside) must give policy 0 the very same rows.
    [frame] = [f for f in real_klines if f["symbol"][0] == "ETHUSDT"]
    result = bt.run_backtest(frame, _core.ExitPolicy(**EXAMPLE_POLICY), rules)
    alone = bt.summarize(result.fills, result.trades)

    def twice(table: pl.DataFrame) -> pl.DataFrame:
        other = table.with_columns(
            pl.lit(1, dtype=pl.UInt32).alias("policy"), pl.lit("OTHERUSDT").alias("symbol")
        )
        return pl.concat([table, other])

    general = bt.summarize(twice(result.fills), twice(result.trades))
    assert alone.height == 2
    assert general.filter(pl.col("policy") == 0).equals(alone)


def test_the_summary_is_computed_once_when_first_read(rules, real_klines):
    result = bt.run_backtest(real_klines[0], _core.ExitPolicy(**EXAMPLE_POLICY), rules)
    assert result._summary is None  # not paid for by a run that only reads the tables
    summary = result.summary
    assert summary is result.summary
    assert summary.equals(bt.summarize(result.fills, result.trades))
    assert summary.filter(pl.col("symbol") == "TOTAL")["trades"][0] == result.trades.height


def test_entries_cut_per_symbol_in_one_pass_equal_a_filter_per_symbol(real_klines):
    # Two symbols' entries shuffled, with time ties, a size, a symbol without bars and one
    # without a symbol: the one-pass cut gives each series what filtering it alone gives.
    frames = real_klines[:2]
    symbols = [str(f["symbol"][0]) for f in frames]
    times = [int(f["open_time"][i]) for f in frames for i in (5, 5, 40, 90)]
    entries = pl.DataFrame(
        {
            "time_ms": [*times, times[0], times[1]],
            "symbol": [s for s in symbols for _ in range(4)] + ["NOBARSUSDT", None],
            "side": ["BUY", "SELL", "BUY", "SELL"] * 2 + ["BUY", "BUY"],
            "confidence": [0.1 * i for i in range(10)],
            "size_usd": [None, "250", None, None, None, None, "99.5", None, None, None],
            "leverage": [None, 3, None, None, 5, None, None, None, None, None],
        },
        schema_overrides={"size_usd": pl.String, "leverage": pl.Int64},
    ).sample(fraction=1.0, shuffle=True, seed=3)
    intents, _ = bt_running._entries_for(frames, entries, None)
    together = assert_series_like_each_alone(frames, symbols, intents)
    for series in together:
        assert len(series.arrays["entry_time"]) == 4


def test_long_symbol_names_and_chunked_calls_equal_the_decimal_text(
    rules, real_klines, monkeypatch
):
    # Symbols longer than 12 bytes (their text views point into the shared data buffer, not
    # inline), beside a short one, run in one call and in chunks (a progress bar): the same
    # tables as the core's decimal text.
    frames = {str(f["symbol"][0]): f for f in real_klines}
    renamed = [
        frames["BTCUSDT"],
        frames["ADAUSDT"].with_columns(pl.lit("1000FLOKIUSDT").alias("symbol")),
        frames["DOGEUSDT"].with_columns(pl.lit("1000CHEEMSUSDT").alias("symbol")),
    ]
    policy = _core.ExitPolicy(**EXAMPLE_POLICY)
    fast = bt.run_backtest(renamed, policy, rules)
    # One core call per series: each call's rows come with its own series offset.
    monkeypatch.setattr(
        bt_running,
        "_chunks",
        lambda series, policies: [(range(i, i + 1), range(policies)) for i in range(series)],
    )
    steps: list[int] = []
    chunked = bt.run_backtest(renamed, policy, rules, progress=lambda done, _: steps.append(done))
    assert steps == [1, 2, 3]
    slow = _without_detail(bt.run_backtest(renamed, policy, rules, detail=True))
    assert set(fast.trades["symbol"].unique()) == {"BTCUSDT", "1000FLOKIUSDT", "1000CHEEMSUSDT"}
    for result in (fast, chunked):
        assert result.stops.is_empty()
        assert result.stops.schema == slow.stops.schema
        assert result.levels.is_empty()
        assert result.levels.schema == slow.levels.schema
        assert result.fills.schema == slow.fills.schema
        assert result.fills.equals(slow.fills)
        assert result.trades.equals(slow.trades)
        assert result.skipped.equals(slow.skipped)
    kinds = fast.fills.group_by("kind").agg(pl.col("reason").unique())
    assert dict(zip(kinds["kind"], kinds["reason"].to_list(), strict=True))["entry"] == ["entry"]


def test_float_columns_written_while_booking_equal_those_of_the_rows(rules, real_klines):
    # Without detail the integer replay writes the core's float columns as it books each
    # fill and trade; with detail they come from its decimal rows. Bit for bit the same, on
    # every real symbol, over several jobs (two policies) and over one (one symbol).
    policies = [_core.ExitPolicy(**EXAMPLE_POLICY), _core.ExitPolicy.preset("standard")]
    symbols = [frame["symbol"][0] for frame in real_klines]
    entries = pl.concat(
        pl.DataFrame(
            {
                "time_ms": frame["open_time"].gather_every(3),
                "symbol": frame["symbol"][0],
                "side": np.where(
                    np.arange(len(frame["open_time"].gather_every(3))) % 2, "SELL", "BUY"
                ),
                "confidence": 0.6,
            }
        )
        for frame in real_klines
    )
    intents, one = bt_running._entries_for(real_klines, entries, None)
    series = [s.arrays for s in bt_running._series_inputs(real_klines, symbols, intents, None)]
    for jobs_series, jobs_policies in ((series, policies), (series[:1], policies[:1])):
        raw = {
            detail: _core.backtest_run(
                jobs_series,
                jobs_policies,
                rules,
                **bt_running._core_options(bt.BacktestConfig(), one, detail=detail),
            )
            for detail in (False, True)
        }
        for table in ("fills", "trades"):
            direct, from_rows = raw[False][table], raw[True][table]
            assert direct["trade"].size > 1_000
            for name, column in direct.items():
                expected = from_rows[name]
                assert column.dtype == expected.dtype, (table, name)
                # Floats by their bits: NaN equals NaN, and -0.0 differs from 0.0.
                as_bits = column.view(np.uint64) if column.dtype == np.float64 else column
                expected_bits = (
                    expected.view(np.uint64) if expected.dtype == np.float64 else expected
                )
                assert np.array_equal(as_bits, expected_bits), (table, name)
