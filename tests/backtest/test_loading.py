"""Klines and intents loading: schema, file names, and the errors a user sees."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from pyquant import backtest as bt
from pyquant.errors import ConfigError

MARKET = Path(__file__).parents[1] / "data" / "market"
MINUTE = 60_000


def _bars(n: int = 5, start: int = 1_700_000_040_000, step: int = MINUTE) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "open_time": [start + i * step for i in range(n)],
            "open": [100.0 + i for i in range(n)],
            "high": [101.0 + i for i in range(n)],
            "low": [99.0 + i for i in range(n)],
            "close": [100.5 + i for i in range(n)],
            "volume": [1.0] * n,
        }
    )


def test_real_parquet_loads_in_the_canonical_schema():
    [frame] = bt.load_klines(MARKET / "BCHUSDT_1m_last.parquet")
    assert frame.schema == {
        "open_time": pl.Int64,
        "open": pl.Float64,
        "high": pl.Float64,
        "low": pl.Float64,
        "close": pl.Float64,
        "volume": pl.Float64,
        "symbol": pl.String,
        "interval": pl.String,
    }
    assert frame["symbol"].unique().to_list() == ["BCHUSDT"]
    assert frame.height == 43199


def test_symbol_and_interval_come_from_the_file_name(tmp_path):
    path = tmp_path / "ETHUSDT_5m_last.csv"
    _bars(step=5 * MINUTE).write_csv(path)
    [frame] = bt.load_klines(path)
    assert frame["symbol"][0] == "ETHUSDT"
    assert frame["interval"][0] == "5m"


def test_no_symbol_anywhere_is_a_clear_error(tmp_path):
    path = tmp_path / "bars.csv"
    _bars().write_csv(path)
    with pytest.raises(bt.KlinesError, match="no 'symbol' column and none in the file name"):
        bt.load_klines(path)


def test_missing_column_names_it(tmp_path):
    path = tmp_path / "BTCUSDT_1m.parquet"
    _bars().drop("low").write_parquet(path)
    with pytest.raises(bt.KlinesError, match="missing column 'low'"):
        bt.load_klines(path)


def test_unsorted_timestamps_are_refused(tmp_path):
    frame = _bars()
    frame = pl.concat([frame[2:3], frame[0:2], frame[3:]])
    path = tmp_path / "BTCUSDT_1m.parquet"
    frame.write_parquet(path)
    with pytest.raises(bt.KlinesError, match="not sorted ascending: row 1"):
        bt.load_klines(path)


def test_duplicated_timestamps_are_refused(tmp_path):
    frame = _bars()
    frame = pl.concat([frame[:3], frame[2:]])
    path = tmp_path / "BTCUSDT_1m.parquet"
    frame.write_parquet(path)
    with pytest.raises(bt.KlinesError, match=r"duplicated open_time 1700000160000 .* rows 2 and 3"):
        bt.load_klines(path)


def test_off_grid_step_is_refused(tmp_path):
    frame = _bars().with_columns(
        pl.when(pl.int_range(pl.len()) == 3)
        .then(pl.col("open_time") + 30_000)
        .otherwise(pl.col("open_time"))
        .alias("open_time")
    )
    path = tmp_path / "BTCUSDT_1m.parquet"
    frame.write_parquet(path)
    with pytest.raises(bt.KlinesError, match="not a whole number of 1m intervals"):
        bt.load_klines(path)


def test_gaps_are_kept_not_filled(tmp_path):
    frame = pl.concat([_bars(3), _bars(3, start=1_700_000_040_000 + 10 * MINUTE)])
    path = tmp_path / "BTCUSDT_1m.parquet"
    frame.write_parquet(path)
    [loaded] = bt.load_klines(path)
    assert loaded.height == 6
    assert loaded["open_time"].diff().max() == 8 * MINUTE


def test_invalid_bar_is_refused(tmp_path):
    frame = _bars().with_columns(pl.lit(50.0).alias("high"))
    path = tmp_path / "BTCUSDT_1m.parquet"
    frame.write_parquet(path)
    with pytest.raises(bt.KlinesError, match=r"row 0 .* is not a valid bar"):
        bt.load_klines(path)


def test_nonpositive_price_is_refused(tmp_path):
    frame = _bars().with_columns(pl.lit(0.0).alias("low"))
    path = tmp_path / "BTCUSDT_1m.parquet"
    frame.write_parquet(path)
    with pytest.raises(bt.KlinesError, match="not a positive finite number"):
        bt.load_klines(path)


def test_interval_column_and_name_must_agree(tmp_path):
    path = tmp_path / "BTCUSDT_5m.parquet"
    _bars().with_columns(pl.lit("1m").alias("interval")).write_parquet(path)
    with pytest.raises(bt.KlinesError, match="column 'interval' says '1m'"):
        bt.load_klines(path)


def test_intents_jsonl(tmp_path):
    path = tmp_path / "intents.jsonl"
    lines = [
        {"time": 1_700_000_100_000, "symbol": "btcusdt", "side": "LONG", "confidence": 0.7},
        {
            "time": 1_700_000_000,
            "symbol": "ETHUSDT",
            "side": "SELL",
            "confidence": 0.6,
            "size_usd": 250,
        },
    ]
    path.write_text("# comment\n" + "\n".join(json.dumps(x) for x in lines) + "\n\n")
    frame = bt.load_intents(path)
    assert frame.to_dicts() == [
        {
            "intent_id": "line-3",
            "time_ms": 1_700_000_000_000,
            "symbol": "ETHUSDT",
            "side": "SELL",
            "confidence": 0.6,
            "size_usd": "250",
            "leverage": None,
        },
        {
            "intent_id": "line-2",
            "time_ms": 1_700_000_100_000,
            "symbol": "BTCUSDT",
            "side": "BUY",
            "confidence": 0.7,
            "size_usd": None,
            "leverage": None,
        },
    ]


def test_bad_intent_names_line_and_field(tmp_path):
    path = tmp_path / "intents.jsonl"
    path.write_text('{"time": 1700000000000, "symbol": "BTCUSDT", "side": "UP"}\n')
    with pytest.raises(bt.KlinesError, match=r"intents.jsonl:1: intent field 'side' was 'UP'"):
        bt.load_intents(path)
    path.write_text('{"symbol": "BTCUSDT", "side": "BUY"}\n')
    with pytest.raises(bt.KlinesError, match="'time' is required"):
        bt.load_intents(path)


def test_momentum24h_signals_follow_the_rule():
    day = 1440
    closes = [100.0] * day + [100.5, 101.5, 98.0, 140.0]
    n = len(closes)
    frame = pl.DataFrame(
        {
            "open_time": [i * MINUTE for i in range(n)],
            "open": closes,
            "high": [c + 1 for c in closes],
            "low": [c - 1 for c in closes],
            "close": closes,
            "volume": [1.0] * n,
            "symbol": ["BTCUSDT"] * n,
            "interval": ["1m"] * n,
        }
    )
    signals = bt.momentum24h(bt.validate_klines(frame))
    assert signals["side"].to_list() == ["BUY", "SELL", "BUY"]
    # entry at the next bar's open: the signal bar's open time + 1 interval
    assert signals["time_ms"].to_list() == [
        (day + 2) * MINUTE,
        (day + 3) * MINUTE,
        (day + 4) * MINUTE,
    ]
    assert signals["confidence"].to_list() == pytest.approx([0.515, 0.52, 0.8])


def test_momentum24h_gives_no_signal_across_a_gap():
    day = 1440
    times = [i * MINUTE for i in range(10)] + [(day + 5 + i) * MINUTE for i in range(10)]
    closes = [100.0] * 10 + [150.0] * 10
    frame = pl.DataFrame(
        {
            "open_time": times,
            "open": closes,
            "high": closes,
            "low": closes,
            "close": closes,
            "volume": [1.0] * 20,
            "symbol": ["BTCUSDT"] * 20,
            "interval": ["1m"] * 20,
        }
    )
    # only bars whose exact 24h-earlier bar exists give a signal: day+5..day+9
    signals = bt.momentum24h(bt.validate_klines(frame))
    assert signals["time_ms"].to_list() == [(day + 6 + i) * MINUTE for i in range(5)]


def test_parse_grid():
    grid = bt.parse_grid(["stop_atr=1.5,2,3", "time_stop_ms=none,3600000"])
    assert grid == {"stop_atr": [1.5, 2, 3], "time_stop_ms": [None, 3600000]}
    with pytest.raises(ConfigError, match="must look like name=v1,v2"):
        bt.parse_grid(["stop_atr"])
    with pytest.raises(ConfigError, match="given twice"):
        bt.parse_grid(["a=1", "a=2"])
