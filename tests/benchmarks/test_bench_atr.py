"""Batch ATR on 1,000,000 real 1m bars: pyquant.atr beside talib.ATR in one group.

The bars are every real 1m series of tests/data/market laid end to end (1.4 M rows; the
first 1,000,000 are used). Both implementations get the same contiguous float64 arrays;
outputs are checked equal (1e-9 relative, same NaN prefix) and the check is recorded in
extra_info. With ``--benchmark-disable`` (the default suite) each runs once on 20,000 bars
as a smoke test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import talib

import pyquant

MARKET_DIR = Path(__file__).parents[1] / "data" / "market"
FULL_BARS = 1_000_000
SMOKE_BARS = 20_000
PERIOD = 14


@pytest.fixture(scope="module")
def bars(request: pytest.FixtureRequest) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # --benchmark-disable is in addopts; `make bench` adds --benchmark-enable on top.
    options = request.config.option
    smoke = bool(options.benchmark_disable) and not bool(options.benchmark_enable)
    n = SMOKE_BARS if smoke else FULL_BARS
    frame = pl.concat(
        [
            pl.read_parquet(path, columns=["high", "low", "close"])
            for path in sorted(MARKET_DIR.glob("*_1m_last.parquet"))
        ]
    ).head(n)
    assert frame.height == n
    return tuple(  # type: ignore[return-value]
        np.ascontiguousarray(frame[name].to_numpy(), dtype=np.float64)
        for name in ("high", "low", "close")
    )


IMPLEMENTATIONS = {
    "pyquant.atr": lambda hi, lo, cl: pyquant.atr(hi, lo, cl, PERIOD),
    "talib.ATR": lambda hi, lo, cl: talib.ATR(hi, lo, cl, timeperiod=PERIOD),
}


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_batch_atr(benchmark, bars, name: str) -> None:  # type: ignore[no-untyped-def]
    high, low, close = bars
    benchmark.group = f"atr-batch-{len(close)}-bars"
    out = benchmark(IMPLEMENTATIONS[name], high, low, close)
    reference = talib.ATR(high, low, close, timeperiod=PERIOD)
    assert np.array_equal(np.isnan(out), np.isnan(reference))
    np.testing.assert_allclose(out, reference, rtol=1e-9, atol=0.0, equal_nan=True)
    valid = ~np.isnan(reference)
    rel = np.abs(out[valid] - reference[valid]) / np.abs(reference[valid]).clip(min=1e-300)
    benchmark.extra_info.update(
        {
            "bars": len(close),
            "period": PERIOD,
            "equal_to_talib_rtol_1e-9": True,
            "bitwise_equal_to_talib": bool(np.array_equal(out, reference, equal_nan=True)),
            "max_relative_difference": float(rel.max()) if rel.size else 0.0,
        }
    )
