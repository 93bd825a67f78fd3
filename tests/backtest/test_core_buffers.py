"""The core keeps a run's large buffers for the next run; no row of one run reaches another.

Bar ticks, ATR values and the fill, trade and stop rows of each job are written into the
buffers an earlier run gave back (emptied, capacity kept). A run between two identical ones,
larger and with other results, must leave the second identical to the first.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa  # type: ignore[import-untyped]
from backtest_helpers import MINUTE, T0

from pyquant import _core
from pyquant import backtest as bt
from pyquant.backtest import running as bt_running


def _walk_series(bars: int, seed: int, every: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    close = np.round(30000.0 * np.exp(np.cumsum(rng.normal(0.0, 0.001, bars))), 1)
    open_ = np.concatenate([[30000.0], close[:-1]])
    spread = np.round(np.abs(rng.normal(0.0, 15.0, (2, bars))), 1)
    times = T0 + MINUTE * np.arange(bars, dtype=np.int64)
    entries = times[::every]
    return {
        "symbol": "BTCUSDT",
        "interval_ms": MINUTE,
        "open_time": times,
        "open": open_,
        "high": np.maximum(open_, close) + spread[0],
        "low": np.minimum(open_, close) - spread[1],
        "close": close,
        "entry_time": entries,
        "entry_side": np.where(np.arange(entries.size) % 2, -1, 1).astype(np.int8),
        "entry_confidence": np.full(entries.size, 0.5),
        "entry_leverage": np.zeros(entries.size, dtype=np.int64),
        "entry_notional": None,
    }


def _columns(out: dict[str, Any]) -> dict[str, list[Any]]:
    return {
        f"{table}.{name}": list(values)
        for table in ("fills", "trades", "stops", "levels", "skipped")
        for name, values in out[table].items()
    }


def test_a_run_in_between_changes_nothing_of_the_next(rules, example_policy):
    options = bt_running._core_options(bt.BacktestConfig(), False, detail=True)
    small = _walk_series(60_000, seed=1, every=7)
    large = _walk_series(200_000, seed=2, every=3)

    def run(series: dict[str, Any]) -> dict[str, list[Any]]:
        return _columns(_core.backtest_run([series], [example_policy], rules, **options))

    first = run(small)
    between = run(large)
    again = run(small)
    assert len(between["fills.price"]) > len(first["fills.price"]) > 1_000
    assert len(first["stops.stop"]) > 10_000
    assert again.keys() == first.keys()
    for name, values in first.items():
        np.testing.assert_array_equal(np.asarray(again[name]), np.asarray(values), err_msg=name)


def test_exact_columns_still_read_stay_theirs_while_other_runs_reuse_memory(rules, example_policy):
    # The exact columns' bytes go back to the pool only when nothing reads them: a table
    # kept alive (as polars and as pyarrow read it, without a copy) must read the same
    # after other runs wrote their own mantissas.
    options = {**bt_running._core_options(bt.BacktestConfig(), False, detail=False), "exact": True}

    def run(series: dict[str, Any]) -> dict[str, Any]:
        return _core.backtest_run([series], [example_policy], rules, **options)

    kept = run(_walk_series(60_000, seed=1, every=7))
    frame = pl.DataFrame(kept["tables"]["fills"])
    arrow = pa.table(kept["tables"]["fills"])
    del kept  # the frames alone keep the memory
    # Copies made of fresh memory (a clone would share the buffers it checks).
    before = frame.select(pl.all().cast(pl.String))
    pnl = arrow.column("pnl").to_pylist()
    for seed in (2, 3):
        run(_walk_series(120_000, seed=seed, every=3))  # dropped at once: memory reused
    assert frame.select(pl.all().cast(pl.String)).equals(before)
    assert arrow.column("pnl").to_pylist() == pnl
    assert frame.height > 500
    assert frame["pnl"].dtype == pl.Decimal(38, 12)


def test_result_columns_still_read_stay_theirs_while_other_runs_reuse_memory(rules, example_policy):
    # The numpy result columns are views of pooled vectors, which go back to the pool only
    # when numpy lets go: a result kept alive reads the same after other runs (dropped at
    # once) wrote theirs into the pool's memory.
    options = bt_running._core_options(bt.BacktestConfig(), False, detail=False)

    def run(series: dict[str, Any]) -> dict[str, Any]:
        return _core.backtest_run([series], [example_policy], rules, **options)

    def address(array: np.ndarray[Any, Any]) -> int:
        return int(array.__array_interface__["data"][0])

    kept = run(_walk_series(60_000, seed=1, every=7))
    before = {name: values.copy() for name, values in _columns(kept).items()}
    assert len(kept["fills"]["price"]) > 1000
    for seed in (2, 3):
        other = run(_walk_series(120_000, seed=seed, every=3))
        assert not {address(v) for v in other["fills"].values()} & {
            address(v) for v in kept["fills"].values()
        }
        del other
    for name, values in _columns(kept).items():
        np.testing.assert_array_equal(np.asarray(values), np.asarray(before[name]), err_msg=name)
