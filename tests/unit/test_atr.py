"""pyquant.atr against TA-Lib on every real 1m series, and its input/output contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import talib
from hypothesis import given, settings
from hypothesis import strategies as st

import pyquant
from pyquant.errors import InputError

MARKET_SERIES = sorted((Path(__file__).parents[1] / "data" / "market").glob("*_1m_last.parquet"))


def _columns(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    df = pl.read_parquet(path, columns=["high", "low", "close"])
    return df["high"].to_numpy(), df["low"].to_numpy(), df["close"].to_numpy()


def _assert_same_as_talib(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.dtype == np.float64
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=0.0, equal_nan=True)


def test_every_real_series_is_covered() -> None:
    assert len(MARKET_SERIES) >= 19  # all 1m "last" series copied from shared/data/market


@pytest.mark.parametrize("path", MARKET_SERIES, ids=lambda p: p.stem)
@pytest.mark.parametrize("period", [14, 1, 50])
def test_equals_talib_on_real_series(path: Path, period: int) -> None:
    high, low, close = _columns(path)
    ours = pyquant.atr(high, low, close, period=period)
    ref = talib.ATR(high, low, close, timeperiod=period)
    _assert_same_as_talib(ours, ref)
    # Same NaN prefix: exactly `period` leading NaN values.
    assert np.isnan(ours[:period]).all()
    assert not np.isnan(ours[period:]).any()


def test_numpy_in_numpy_out_and_default_period() -> None:
    high, low, close = _columns(MARKET_SERIES[0])
    out = pyquant.atr(high, low, close)
    assert isinstance(out, np.ndarray)
    _assert_same_as_talib(out, talib.ATR(high, low, close, timeperiod=14))


def test_polars_in_polars_out() -> None:
    df = pl.read_parquet(MARKET_SERIES[0], columns=["high", "low", "close"])
    out = pyquant.atr(df["high"], df["low"], df["close"], period=14)
    assert isinstance(out, pl.Series)
    assert out.name == "atr"
    assert out.dtype == pl.Float64
    ref = talib.ATR(df["high"].to_numpy(), df["low"].to_numpy(), df["close"].to_numpy(), 14)
    _assert_same_as_talib(out.to_numpy(), ref)
    # Usable straight in a frame.
    framed = df.with_columns(pyquant.atr(df["high"], df["low"], df["close"]))
    assert framed.columns == ["high", "low", "close", "atr"]


def test_non_contiguous_and_integer_inputs_are_converted() -> None:
    high, low, close = _columns(MARKET_SERIES[0])
    strided = pyquant.atr(high[::2], low[::2], close[::2], period=14)
    _assert_same_as_talib(
        strided,
        talib.ATR(high[::2].copy(), low[::2].copy(), close[::2].copy(), timeperiod=14),
    )
    ints = pyquant.atr([3, 4, 5, 6], [1, 2, 3, 4], [2, 3, 4, 5], period=2)
    np.testing.assert_array_equal(ints[:2], [np.nan, np.nan])
    assert ints[2] == 2.0


def test_leading_nan_prefix_matches_talib() -> None:
    high, low, close = (a[:200].copy() for a in _columns(MARKET_SERIES[0]))
    high[:3] = np.nan
    close[5] = np.nan
    _assert_same_as_talib(pyquant.atr(high, low, close, 14), talib.ATR(high, low, close, 14))


def test_short_series_gives_all_nan() -> None:
    out = pyquant.atr(np.ones(14), np.ones(14), np.ones(14), period=14)
    assert np.isnan(out).all()
    assert pyquant.atr(np.array([]), np.array([]), np.array([])).shape == (0,)


def test_mismatched_lengths_raise_value_error() -> None:
    with pytest.raises(InputError, match=r"length of low 3 must equal the length of high \(4\)"):
        pyquant.atr(np.ones(4), np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="length of close"):
        pyquant.atr(np.ones(4), np.ones(4), np.ones(5))


@pytest.mark.parametrize("period", [0, -3, 100_001])
def test_bad_period_raises_value_error(period: int) -> None:
    with pytest.raises(ValueError, match=rf"period {period} must be between 1 and 100000 bars"):
        pyquant.atr(np.ones(30), np.ones(30), np.ones(30), period=period)


def test_two_dimensional_and_non_numeric_inputs_are_refused() -> None:
    with pytest.raises(InputError, match=r"shape of high \(2,2\) must be one-dimensional"):
        pyquant.atr(np.ones((2, 2)), np.ones(2), np.ones(2))
    with pytest.raises(InputError, match=r"low .* must be a 1-D float64 array"):
        pyquant.atr(np.ones(3), ["a", "b", "c"], np.ones(3))


@settings(max_examples=60, deadline=None)
@given(
    bars=st.lists(
        st.tuples(
            st.floats(min_value=1e-6, max_value=1e6),
            st.floats(min_value=0.0, max_value=0.2),
            st.floats(min_value=0.0, max_value=1.0),
        ),
        min_size=0,
        max_size=300,
    ),
    period=st.integers(min_value=1, max_value=40),
    nan_prefix=st.integers(min_value=0, max_value=5),
)
def test_random_series_equal_talib(
    bars: list[tuple[float, float, float]], period: int, nan_prefix: int
) -> None:
    # Each bar: a mid price, a relative range, and where the close sits in the range.
    mid = np.array([b[0] for b in bars], dtype=np.float64)
    spread = np.array([b[1] for b in bars], dtype=np.float64) * mid
    high, low = mid + spread / 2, mid - spread / 2
    close = low + np.array([b[2] for b in bars], dtype=np.float64) * (high - low)
    high[: min(nan_prefix, len(bars))] = np.nan
    ours = pyquant.atr(high, low, close, period=period)
    ref = talib.ATR(high, low, close, timeperiod=period)
    _assert_same_as_talib(ours, ref)
