"""The entries' side and symbol columns are read by the core in one pass over their Arrow views.

``backtest_entry_keys`` codes each side (BUY 1, SELL -1), finds the runs of one symbol and
whether each run is in time order; ``_entry_arrays_by_symbol`` then cuts the columns at the
runs (views of the frame's chunks) or sorts them. Whatever the layout of the frame (one
chunk or many, sliced, long strings kept out of line, nulls, symbols without bars, unsorted
times), each series must get exactly the entries a plain filter and sort per symbol gives
(``_prepare_series``), and a bad side must be named with its intent's time.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import polars as pl
import pytest
from backtest_helpers import (
    EXAMPLE_POLICY,
    MINUTE,
    T0,
    assert_series_like_each_alone,
    synthetic_klines,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from pyquant import _core
from pyquant import backtest as bt
from pyquant.backtest import running as bt_running
from pyquant.errors import ConfigError, InputError

# A symbol longer than 12 bytes: Arrow keeps it out of line (a buffer and an offset), not
# inside its view.
LONG = "1000000BOBUSDTPERP"
SYMBOLS = ["BTCUSDT", "ETHUSDT", LONG]
FRAMES = [
    synthetic_klines([(30000.0, 30010.0, 29990.0, 30000.0)] * 10, symbol=symbol)
    for symbol in SYMBOLS
]


def _intents(rows: list[tuple[int, str | None, str | None]], **extra: Any) -> pl.DataFrame:
    frame = pl.DataFrame(
        {
            "time_ms": [T0 + minute * MINUTE for minute, _, _ in rows],
            "symbol": [symbol for _, symbol, _ in rows],
            "side": [side for _, _, side in rows],
            "confidence": [0.5 if k % 2 else None for k in range(len(rows))],
            **extra,
        },
        schema_overrides={"symbol": pl.String, "side": pl.String},
    )
    return bt_running._entries_for(FRAMES, frame, None)[0]


def _assert_like_a_filter_per_symbol(intents: pl.DataFrame) -> None:
    assert_series_like_each_alone(FRAMES, SYMBOLS, intents)


def _keys(intents: pl.DataFrame) -> tuple[list[int], int | None, list[tuple[int, int, int]], bool]:
    side, bad, runs, in_order = _core.backtest_entry_keys(
        *bt_running._key_columns(intents), SYMBOLS
    )
    return np.frombuffer(side, dtype=np.int8).tolist(), bad, runs, in_order


def test_sides_are_coded_and_runs_found_with_long_symbols_out_of_line():
    intents = _intents(
        [
            (20, "BTCUSDT", "BUY"),
            (21, "BTCUSDT", "SELL"),
            (20, LONG, "SELL"),
            (22, LONG, "BUY"),
            (21, "NOBARSUSDT", "BUY"),
            (20, None, "BUY"),
            (21, None, "SELL"),
            (20, "ETHUSDT", "BUY"),
        ]
    )
    assert intents["symbol"].to_arrow(compat_level=pl.CompatLevel.newest()).buffers()[2]
    side, bad, runs, in_order = _keys(intents)
    assert side == [1, -1, -1, 1, 1, 1, -1, 1]
    assert bad is None
    assert in_order
    # (series, first row, end row): a symbol without bars and the null ones are -1.
    assert runs == [(0, 0, 2), (2, 2, 4), (-1, 4, 5), (-1, 5, 7), (1, 7, 8)]
    _assert_like_a_filter_per_symbol(intents)


def test_a_run_out_of_time_order_or_a_symbol_twice_is_sorted_like_a_filter():
    out_of_order = _intents([(22, "BTCUSDT", "BUY"), (20, "BTCUSDT", "SELL")])
    assert not _keys(out_of_order)[3]
    _assert_like_a_filter_per_symbol(out_of_order)
    twice = _intents([(20, "BTCUSDT", "BUY"), (21, LONG, "SELL"), (22, "BTCUSDT", "SELL")])
    assert [code for code, _, _ in _keys(twice)[2]] == [0, 2, 0]
    _assert_like_a_filter_per_symbol(twice)


def test_chunked_and_sliced_frames_are_read_in_place():
    blocks = [
        _intents([(20, symbol, "BUY"), (21, symbol, "SELL"), (22, symbol, "BUY")])
        for symbol in SYMBOLS
    ]
    joined = pl.concat(blocks, rechunk=False)
    assert joined.select("time_ms", "symbol", "side").n_chunks("all") == [3, 3, 3]
    assert _keys(joined)[2] == [(0, 0, 3), (1, 3, 6), (2, 6, 9)]
    _assert_like_a_filter_per_symbol(joined)
    # A symbol's block in one chunk is a view of that chunk, not a copy.
    series = bt_running._series_inputs(FRAMES, SYMBOLS, joined, None)
    chunk = joined["time_ms"].get_chunks()[1].to_numpy()
    assert np.shares_memory(series[1].arrays["entry_time"], chunk)
    # Chunks that do not follow the symbols (ETHUSDT's run spans both: a copy of its two
    # pieces), and a frame sliced inside a chunk.
    mixed = pl.concat(
        [
            _intents([(20, "BTCUSDT", "BUY"), (21, "BTCUSDT", "SELL"), (20, "ETHUSDT", "BUY")]),
            _intents([(21, "ETHUSDT", "SELL"), (20, LONG, "BUY"), (21, LONG, "SELL")]),
        ],
        rechunk=False,
    )
    assert mixed.select("time_ms", "symbol", "side").n_chunks("all") == [2, 2, 2]
    assert _keys(mixed)[2] == [(0, 0, 2), (1, 2, 4), (2, 4, 6)]
    _assert_like_a_filter_per_symbol(mixed)
    _assert_like_a_filter_per_symbol(joined.slice(2, 6))
    # Columns cut into chunks differently: read in the pieces all their bounds make, each
    # inside one chunk of every column (no rechunk).
    side = joined["side"]
    ragged_side = pl.concat([side[:2], side[2:7], side[7:]], rechunk=False)
    uneven = pl.DataFrame(
        [
            joined[c].rechunk() if c == "time_ms" else ragged_side if c == "side" else joined[c]
            for c in joined.columns
        ]
    )
    assert [uneven[c].n_chunks() for c in ("time_ms", "symbol", "side")] == [1, 3, 5]
    assert _keys(uneven) == _keys(joined)
    _assert_like_a_filter_per_symbol(uneven)


def test_key_columns_of_other_lengths_are_refused():
    intents = _intents([(20, "BTCUSDT", "BUY"), (21, "BTCUSDT", "SELL")])
    side, symbol, time_ms = bt_running._key_columns(intents)
    with pytest.raises(InputError, match=r"side, symbol and time_ms must have as many rows"):
        _core.backtest_entry_keys(side, symbol, time_ms[:1], SYMBOLS)
    with pytest.raises(InputError, match=r"side .*must be a string column"):
        _core.backtest_entry_keys(time_ms, symbol, time_ms, SYMBOLS)


@pytest.mark.parametrize(
    ("side", "shown"),
    [("HOLD", "'HOLD'"), ("buy", "'buy'"), (None, "None"), ("BUYBUYBUYBUYBUY", "'BUYBUYBUY")],
)
def test_a_bad_side_is_named_with_its_time(side, shown):
    intents = _intents([(20, "BTCUSDT", "BUY"), (23, "BTCUSDT", side), (24, "BTCUSDT", "SELL")])
    with pytest.raises(ConfigError, match=rf"entries side was {re.escape(shown)}") as caught:
        bt_running._series_inputs(FRAMES, SYMBOLS, intents, None)
    assert f"intent at time_ms {T0 + 23 * MINUTE}" in str(caught.value)
    assert "must be BUY or SELL" in str(caught.value)
    with pytest.raises(ConfigError, match=rf"entries side was {re.escape(shown)}"):
        bt_running._prepare_series(FRAMES[0], intents, None)


def test_a_bad_side_of_an_entry_left_out_is_not_read():
    # Entries of a symbol without bars, or without a symbol, are left out whatever they say.
    intents = _intents([(20, "NOBARSUSDT", "HOLD"), (21, None, "UP"), (22, "BTCUSDT", "BUY")])
    assert _keys(intents)[1] is None
    _assert_like_a_filter_per_symbol(intents)


def test_a_missing_time_is_refused_by_row():
    frame = pl.DataFrame(
        {"time_ms": [T0, None], "symbol": ["BTCUSDT"] * 2, "side": ["BUY"] * 2, "confidence": 0.5}
    )
    with pytest.raises(ConfigError, match="entries time_ms is missing in row 1"):
        bt.run_backtest(FRAMES[0], _core.ExitPolicy(**EXAMPLE_POLICY), entries=frame)


def test_an_enum_or_categorical_side_runs_like_a_string_one(rules, example_policy):
    tail = [(30000.0, 30100.0, 29900.0, 30000.0)] * 5 + [(30000.0, 30600.0, 29400.0, 30000.0)] * 5
    klines = synthetic_klines(tail)
    frame = pl.DataFrame(
        {
            "time_ms": [T0 + minute * MINUTE for minute in (20, 22, 25, 27)],
            "symbol": ["BTCUSDT"] * 4,
            "side": ["BUY", "SELL", "SELL", "BUY"],
            "confidence": [0.5, None, 0.7, 0.9],
        }
    )
    results = [
        bt.run_backtest(
            klines,
            example_policy,
            rules,
            entries=frame.with_columns(pl.col("side").cast(dtype)),
            config=bt.BacktestConfig(one_position_per_symbol=False),
        )
        for dtype in (pl.String, pl.Enum(["BUY", "SELL"]), pl.Categorical)
    ]
    assert set(results[0].trades["side"].to_list()) == {-1, 1}
    for other in results[1:]:
        assert other.fills.equals(results[0].fills)
        assert other.trades.equals(results[0].trades)


_ROW = st.tuples(
    st.integers(20, 29),
    st.sampled_from([*SYMBOLS, "NOBARSUSDT", None]),
    st.sampled_from(["BUY", "SELL"]),
)


@settings(max_examples=60, deadline=None)
@given(
    parts=st.lists(st.lists(_ROW, min_size=1, max_size=6), min_size=1, max_size=4),
    start=st.integers(0, 3),
    sizes=st.booleans(),
)
def test_any_layout_gets_the_entries_of_a_filter_per_symbol(parts, start, sizes):
    frames = []
    for part in parts:
        extra = {"size_usd": [f"{200 + k}" if k % 3 == 0 else None for k in range(len(part))]}
        frames.append(_intents(part, **(extra if sizes else {})))
    joined = pl.concat(frames, rechunk=False)
    _assert_like_a_filter_per_symbol(joined.slice(min(start, joined.height - 1)))


@settings(max_examples=80, deadline=None)
@given(lengths=st.lists(st.integers(0, 4), min_size=1, max_size=5))
def test_pieces_cut_any_range_like_the_whole_column(lengths):
    # A column kept as its chunks (some maybe empty) cuts every row range like a slice of
    # the whole column: a view inside one chunk, the pieces joined across chunks.
    parts = [
        pl.Series("x", range(sum(lengths[:k]), sum(lengths[: k + 1])), dtype=pl.Int64)
        for k in range(len(lengths))
    ]
    column = parts[0]
    for part in parts[1:]:
        column = column.append(part)
    pieces = bt_running._Pieces(column, np.int64)
    whole = np.arange(sum(lengths))
    for start in range(whole.size + 1):
        for stop in range(start, whole.size + 1):
            np.testing.assert_array_equal(pieces.cut(start, stop), whole[start:stop])


@settings(max_examples=80, deadline=None)
@given(
    runs=st.lists(
        st.tuples(st.sampled_from([*SYMBOLS, "NOBARSUSDT"]), st.integers(1, 45)),
        min_size=1,
        max_size=6,
    ),
    odd_row=st.integers(0, 300),
    odd=st.sampled_from(["time", "side"]),
)
def test_long_runs_end_exactly_where_the_symbol_changes(runs, odd_row, odd):
    # Runs longer than the core's block of compared views: each must end at the very row
    # where the symbol changes, and one late out-of-order time or bad side inside a run
    # must still be seen (the blocks compare without a branch per row).
    symbols = [symbol for symbol, length in runs for _ in range(length)]
    odd_row %= len(symbols)
    minutes = list(range(len(symbols)))
    sides = ["SELL" if k % 7 == 3 else "BUY" for k in range(len(symbols))]
    if odd == "time" and odd_row:
        minutes[odd_row] = minutes[odd_row - 1] - 1
    if odd == "side":
        sides[odd_row] = "HOLD"
    intents = _intents(list(zip(minutes, symbols, sides, strict=True)))
    codes, bad, found, in_order = _keys(intents)

    expected, start = [], 0
    for k in range(1, len(symbols) + 1):
        if k == len(symbols) or symbols[k] != symbols[start]:
            code = SYMBOLS.index(symbols[start]) if symbols[start] in SYMBOLS else -1
            expected.append((code, start, k))
            start = k
    assert found == expected
    ordered = all(minutes[k - 1] <= minutes[k] for _, a, b in expected for k in range(a + 1, b))
    assert in_order == ordered
    assert codes == [{"BUY": 1, "SELL": -1}.get(side, 0) for side in sides]
    assert bad == (odd_row if odd == "side" and symbols[odd_row] in SYMBOLS else None)
