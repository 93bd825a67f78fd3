"""The core reads a series' entries as columns: in place, checked in one pass, own sizes sparse.

``entry_time``/``entry_side``/``entry_confidence``/``entry_leverage`` are numpy arrays the
core borrows; ``entry_notional`` is None when no entry gives its own size, else a pair
(rows, decimal strings). Each broken column gets an error naming the field, the value and
the rule; the sizes given land on their own entries only, also after the per-symbol cut.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import numpy as np
import polars as pl
import pytest
from backtest_helpers import MINUTE, T0, assert_series_like_each_alone, synthetic_klines

from pyquant import _core
from pyquant import backtest as bt
from pyquant.backtest import running as bt_running
from pyquant.errors import ConfigError, InputError

FLAT = synthetic_klines([(30000.0, 30010.0, 29990.0, 30000.0)] * 10)
# 1000 USDT (the default) at 30000 is 0.033 BTC; 300 USDT is 0.010 and 250 USDT 0.008.
DEFAULT_QTY, QTY_300, QTY_250 = 0.033, 0.010, 0.008


def _series(klines: pl.DataFrame = FLAT, **entries: Any) -> dict[str, Any]:
    # A LONG at bar 20 and a SHORT at bar 21 (both stay open: the bars trigger nothing),
    # with any column replaced by ``entries``.
    columns = {
        "entry_time": np.array([T0 + 20 * MINUTE, T0 + 21 * MINUTE], dtype=np.int64),
        "entry_side": np.array([1, -1], dtype=np.int8),
        "entry_confidence": np.array([0.5, np.nan]),
        "entry_leverage": np.zeros(2, dtype=np.int64),
        "entry_notional": None,
    }
    columns.update(entries)
    return bt_running._series_arrays(klines, columns, None).arrays


def _run(rules, policy, series: dict[str, Any]) -> dict[str, Any]:
    options = bt_running._core_options(bt.BacktestConfig(), False, detail=True)
    return _core.backtest_run([series], [policy], rules, **options)


def _quantities(out: dict[str, Any]) -> list[tuple[int, float]]:
    trades = out["trades"]
    return sorted(zip(trades["side"].tolist(), trades["quantity"].tolist(), strict=True))


def test_without_own_sizes_every_entry_takes_the_default(rules, example_policy):
    out = _run(rules, example_policy, _series())
    assert _quantities(out) == [(-1, DEFAULT_QTY), (1, DEFAULT_QTY)]
    assert out["trades"]["quantity_exact"] == ["0.033", "0.033"]
    trades = out["trades"]
    confidence = dict(zip(trades["side"].tolist(), trades["confidence"], strict=True))
    assert confidence[1] == 0.5
    assert np.isnan(confidence[-1])


def test_an_own_size_lands_on_its_row_only(rules, example_policy):
    short_sized = _run(
        rules, example_policy, _series(entry_notional=(np.array([1], np.int64), ["300"]))
    )
    assert _quantities(short_sized) == [(-1, QTY_300), (1, DEFAULT_QTY)]
    both = _run(
        rules, example_policy, _series(entry_notional=(np.array([0, 1], np.int64), ["250", "300"]))
    )
    assert _quantities(both) == [(-1, QTY_300), (1, QTY_250)]


def test_strided_entry_arrays_are_read_like_contiguous_ones(rules, example_policy):
    # Every other element of twice-as-long arrays: numpy views the core cannot borrow as is.
    doubled = {
        "entry_time": np.repeat(np.array([T0 + 20 * MINUTE, T0 + 21 * MINUTE]), 2)[::2],
        "entry_side": np.array([1, 0, -1, 0], dtype=np.int8)[::2],
        "entry_confidence": np.array([0.5, 9.0, np.nan, 9.0])[::2],
        "entry_leverage": np.zeros(4, dtype=np.int64)[::2],
        "entry_notional": (np.array([1, 7], np.int64)[::2], ["300"]),
    }
    assert not doubled["entry_time"].flags.c_contiguous
    out = _run(rules, example_policy, _series(**doubled))
    assert _quantities(out) == [(-1, QTY_300), (1, DEFAULT_QTY)]


def test_a_leverage_beyond_32_bits_is_refused_not_wrapped(rules, example_policy):
    # 2**32 + 10 once wrapped to a leverage of 10; it is now out of range: over_leverage.
    leverage = np.array([2**32 + 10, 0], dtype=np.int64)
    out = _run(rules, example_policy, _series(entry_leverage=leverage))
    assert out["trades"]["side"].tolist() == [-1]
    skipped = out["skipped"]
    reasons = [out["reason_names"][code] for code in skipped["reason_code"]]
    assert list(zip(skipped["time_ms"].tolist(), reasons, strict=True)) == [
        (T0 + 20 * MINUTE, "over_leverage")
    ]


BROKEN = {
    "side": (
        {"entry_side": np.array([1, 2], dtype=np.int8)},
        "entry_side 2 for BTCUSDT must be 1 (LONG) or -1 (SHORT)",
    ),
    "unsorted": (
        {"entry_time": np.array([T0 + 21 * MINUTE, T0 + 20 * MINUTE], dtype=np.int64)},
        f"entry_time {T0 + 20 * MINUTE} for BTCUSDT must be sorted ascending",
    ),
    "length": (
        {"entry_confidence": np.array([0.5])},
        "entry_confidence 1 for BTCUSDT must have as many values as entry_time (2)",
    ),
    "notional text": (
        {"entry_notional": (np.array([0], np.int64), ["12,5"])},
        "entry_notional",
    ),
    "notional zero": (
        {"entry_notional": (np.array([0], np.int64), ["0"])},
        "entry_notional 0 for BTCUSDT must be > 0 and at most",
    ),
    "notional row repeated": (
        {"entry_notional": (np.array([1, 1], np.int64), ["300", "300"])},
        "entry_notional row 1 for BTCUSDT must be an entry row (below 2) after the previous one",
    ),
    "notional row beyond": (
        {"entry_notional": (np.array([2], np.int64), ["300"])},
        "entry_notional row 2 for BTCUSDT must be an entry row (below 2) after the previous one",
    ),
    "notional row negative": (
        {"entry_notional": (np.array([-1], np.int64), ["300"])},
        "entry_notional row -1 for BTCUSDT must be an entry row (0 or more)",
    ),
    "notional count": (
        {"entry_notional": (np.array([0, 1], np.int64), ["300"])},
        "entry_notional 1 for BTCUSDT must have as many notionals as entry rows (2)",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_entry_column_names_field_value_and_rule(rules, example_policy, case):
    entries, message = BROKEN[case]
    with pytest.raises(InputError, match=re.escape(message)):
        _run(rules, example_policy, _series(**entries))


def test_a_notional_text_is_named_in_its_error(rules, example_policy):
    series = _series(entry_notional=(np.array([0], np.int64), ["12,5"]))
    with pytest.raises(InputError, match=r"entry_notional.*12,5"):
        _run(rules, example_policy, series)


def test_a_per_entry_list_of_notionals_is_refused_with_the_expected_form(rules, example_policy):
    # The former form, one string or None per entry, is not read item by item any more.
    with pytest.raises(ValueError, match=r"entry_notional.*must be None or a pair"):
        _run(rules, example_policy, _series(entry_notional=[None, "300"]))


def test_own_sizes_follow_their_entries_through_the_per_symbol_cut(rules, example_policy):
    # Two symbols' entries interleaved, sizes on some rows of each: after the cut (rows
    # renumbered per symbol) each size still sizes its own entry.
    eth = synthetic_klines([(3000.0, 3001.0, 2999.0, 3000.0)] * 10, symbol="ETHUSDT")
    entries = pl.DataFrame(
        {
            "time_ms": [T0 + 20 * MINUTE, T0 + 20 * MINUTE, T0 + 21 * MINUTE, T0 + 21 * MINUTE],
            "symbol": ["ETHUSDT", "BTCUSDT", "BTCUSDT", "ETHUSDT"],
            "side": ["BUY", "BUY", "SELL", "SELL"],
            "confidence": [0.5] * 4,
            "size_usd": ["300", None, "250", None],
            "leverage": [None] * 4,
        },
        schema_overrides={"size_usd": pl.String, "leverage": pl.Int64},
    )
    result = bt.run_backtest([FLAT, eth], example_policy, rules, entries=entries)
    sizes = {
        (row["symbol"], row["side"]): row["quantity"]
        for row in result.trades.select("symbol", "side", "quantity").to_dicts()
    }
    # ETHUSDT steps 0.001: 300 / 3000 = 0.100, 1000 / 3000 = 0.333.
    assert sizes == {
        ("BTCUSDT", 1): Decimal("0.033"),
        ("BTCUSDT", -1): Decimal("0.008"),
        ("ETHUSDT", 1): Decimal("0.100"),
        ("ETHUSDT", -1): Decimal("0.333"),
    }


def test_an_entry_side_other_than_buy_or_sell_is_refused_not_read_as_short(rules, example_policy):
    # It once became a SHORT: any side that is not BUY counted as SELL.
    entries = pl.DataFrame(
        {
            "time_ms": [T0 + 20 * MINUTE, T0 + 21 * MINUTE],
            "symbol": ["BTCUSDT", "BTCUSDT"],
            "side": ["BUY", "LONG"],
            "confidence": [0.5, 0.5],
        }
    )
    with pytest.raises(
        ConfigError,
        match=re.escape(f"entries side was 'LONG' (intent at time_ms {T0 + 21 * MINUTE})"),
    ):
        bt.run_backtest(FLAT, example_policy, rules, entries=entries)


def _bars_replaced(**arrays: Any) -> dict[str, Any]:
    series = _series()
    series.update(arrays)
    return series


BROKEN_BARS = {
    "repeated time": (
        {"open_time": np.array([T0 + i * MINUTE for i in (0, 1, 2, 2, 4)], dtype=np.int64)},
        f"bars.open_time {T0 + 2 * MINUTE} for BTCUSDT must be strictly increasing "
        f"(row 3 follows {T0 + 2 * MINUTE})",
    ),
    "length": (
        {"high": np.array([30010.0])},
        "bars.high 1 for BTCUSDT must have as many values as bars.open_time (30)",
    ),
    "interval": ({"interval_ms": 0}, "interval_ms 0 for BTCUSDT must be positive"),
}


@pytest.mark.parametrize("case", list(BROKEN_BARS))
def test_a_broken_bar_column_names_field_value_and_rule(rules, example_policy, case):
    arrays, message = BROKEN_BARS[case]
    if "open_time" in arrays:  # the other columns as long as the broken times
        arrays = {**arrays, **{k: _series()[k][:5] for k in ("open", "high", "low", "close")}}
    with pytest.raises(InputError, match=re.escape(message)):
        _run(rules, example_policy, _bars_replaced(**arrays))


def test_a_gap_longer_than_allowed_closes_positions_at_the_last_close(rules, example_policy):
    # Bars 25.. shifted by an hour: the open positions close at the end of bar 24 (data_gap).
    series = _series()
    times = series["open_time"].copy()
    times[25:] += 3_600_000
    series["open_time"] = times
    out = _run(rules, example_policy, series)
    reasons = [out["reason_names"][code] for code in out["trades"]["reason_code"]]
    assert reasons == ["data_gap", "data_gap"]
    assert out["trades"]["exit_time_ms"].tolist() == [T0 + 25 * MINUTE - 1] * 2


def _blockwise_entries(symbols_in_file: list[str]) -> pl.DataFrame:
    # Two intents per symbol block, written in the given symbol order, a size on some.
    rows = [
        (T0 + minute * MINUTE, symbol, side, size)
        for k, symbol in enumerate(symbols_in_file)
        for minute, side, size in ((20, "BUY", None), (22 + k, "SELL", f"{300 + k}"))
    ]
    return pl.DataFrame(
        {
            "time_ms": [r[0] for r in rows],
            "symbol": [r[1] for r in rows],
            "side": [r[2] for r in rows],
            "confidence": [0.5] * len(rows),
            "size_usd": [r[3] for r in rows],
            "leverage": [None] * len(rows),
        },
        schema_overrides={"size_usd": pl.String, "leverage": pl.Int64},
    )


@pytest.mark.parametrize(
    "order",
    [
        ["ETHUSDT", "BTCUSDT"],  # blocks, not in the series' order: cut without a sort
        ["BTCUSDT", "ETHUSDT", "BTCUSDT"],  # a symbol twice: sorted
        ["ETHUSDT", "NOBARSUSDT", "BTCUSDT"],  # a symbol without bars: sorted, left out
    ],
)
def test_blockwise_intents_are_cut_like_a_filter_per_symbol(order):
    eth = synthetic_klines([(3000.0, 3001.0, 2999.0, 3000.0)] * 10, symbol="ETHUSDT")
    frames, symbols = [FLAT, eth], ["BTCUSDT", "ETHUSDT"]
    intents, _ = bt_running._entries_for(frames, _blockwise_entries(order), None)
    # The core's one pass finds each symbol's run: one block per symbol with bars (and in
    # time order) is cut without a sort.
    _, bad, runs, in_order = _core.backtest_entry_keys(*bt_running._key_columns(intents), symbols)
    assert bad is None
    assert in_order
    assert [code for code, _, _ in runs] == [
        symbols.index(s) if s in symbols else -1 for s in order
    ]
    assert [(start, stop) for _, start, stop in runs] == [
        (2 * k, 2 * k + 2) for k in range(len(order))
    ]
    together = assert_series_like_each_alone(frames, symbols, intents)
    for frame, series in zip(frames, together, strict=True):
        assert series.arrays["entry_notional"] is not None
        assert len(series.arrays["entry_time"]) == 2 * order.count(frame["symbol"][0])
