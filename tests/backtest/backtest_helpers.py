"""Synthetic bars and entries for the backtest tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pyquant.backtest import running as bt_running

DATA = Path(__file__).parents[1] / "data"
INFO = DATA / "binance" / "exchangeInfo_fapi_full_2025-11-26.json"
MINUTE = 60_000
T0 = 1_700_000_040_000

# exit-rules.md, "Worked example"
EXAMPLE_POLICY = {
    "stop_atr": 2.0,
    "min_stop_pct": 0.003,
    "max_stop_pct": 0.03,
    "max_margin_loss": 0.10,
    "ladder": [
        {"at": 1.0, "fraction": 0.3},
        {"at": 2.0, "fraction": 0.3},
        {"at": 3.0, "fraction": 0.4},
    ],
    "breakeven_after_level": 1,
    "ratchet_to_previous_level": True,
    "taker_fee": 0.0005,
    "trail_atr": 2.0,
    "trail_activate_r": 3.0,
}


def synthetic_klines(
    tail: list[tuple[float, float, float, float]],
    *,
    symbol: str = "BTCUSDT",
    interval: str = "1m",
    step: int = MINUTE,
) -> pl.DataFrame:
    """20 bars of true range 60 around 30000 (ATR(14) = 60.0 exactly), then ``tail``."""
    rows = [(30000.0, 30030.0, 29970.0, 30000.0)] * 20 + list(tail)
    return pl.DataFrame(
        {
            "open_time": [T0 + i * step for i in range(len(rows))],
            "open": [r[0] for r in rows],
            "high": [r[1] for r in rows],
            "low": [r[2] for r in rows],
            "close": [r[3] for r in rows],
            "volume": [1.0] * len(rows),
            "symbol": [symbol] * len(rows),
            "interval": [interval] * len(rows),
        }
    )


def long_entry(time_ms: int, *, size_usd: str = "300", symbol: str = "BTCUSDT") -> pl.DataFrame:
    return pl.DataFrame(
        {
            "intent_id": ["e1"],
            "time_ms": [time_ms],
            "symbol": [symbol],
            "side": ["BUY"],
            "confidence": [0.5],
            "size_usd": [size_usd],
            "leverage": [10],
        }
    )


def assert_series_like_each_alone(
    frames: Sequence[pl.DataFrame], symbols: Sequence[str], intents: pl.DataFrame
) -> list[Any]:
    """The core inputs of every series, built together, equal those built series by series
    (the plain filter of the intents per symbol): same keys, same arrays and dtypes, same
    own sizes (rows, decimal strings). Returns the series built together."""
    together = bt_running._series_inputs(frames, symbols, intents, None)
    for frame, series in zip(frames, together, strict=True):
        alone = bt_running._prepare_series(frame, intents, None).arrays
        assert series.arrays.keys() == alone.keys()
        for key, value in alone.items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(series.arrays[key], value, err_msg=key)
                assert series.arrays[key].dtype == value.dtype, key
            elif isinstance(value, tuple):  # the own sizes: (rows, decimal strings)
                rows, texts = series.arrays[key]
                np.testing.assert_array_equal(rows, value[0], err_msg=key)
                assert texts == value[1], key
            else:
                assert series.arrays[key] == value, key
    return together
