"""The integer replay (the default) decides exactly as the decimal one, on the real klines.

The default replay keeps positions in grid ticks and lot units and money in integer
mantissas, and settles a bar whose range crosses no trigger (stop, next take-profit level,
time stop, trailing activation) as one step; ``exhaustive=True`` replays the decimal way,
every mark through the daemon's exit state machine. On every symbol of tests/data/market
(every real symbol's filters that has klines), sparse (momentum24h) and dense (an entry at
every bar, both sides) entries, and policies covering every trailing kind, both runs must
give the very same fills (exact decimals), trades, stop after every bar, levels, skips and
evaluations; the integer run must not have fallen back to decimals, and must actually have
settled bars in one step.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from backtest_helpers import EXAMPLE_POLICY, INFO

from pyquant import _core
from pyquant import backtest as bt
from pyquant.backtest import running as bt_running

MARKET = Path(__file__).parents[1] / "data" / "market"
# Every symbol with klines that the exchange-info snapshot still lists (MATICUSDT is gone).
LISTED = {s["symbol"] for s in json.loads(INFO.read_bytes())["symbols"]}
SYMBOLS = sorted(
    symbol
    for symbol in (p.name.split("_")[0] for p in MARKET.glob("*_1m_last.parquet"))
    if symbol in LISTED
)
ROWS = 6_000

POLICIES = {
    "example": EXAMPLE_POLICY,
    "trail_from_open": {
        **{k: v for k, v in EXAMPLE_POLICY.items() if k != "trail_activate_r"},
        "trail_atr": 1.7,
        "max_hold_ms": 3_600_000,
        "time_stop_unless_r": 0.5,
    },
    "trail_after_level": {**EXAMPLE_POLICY, "trail_activate_r": None, "trail_after_level": 2},
    "trail_pct": {
        **{k: v for k, v in EXAMPLE_POLICY.items() if k not in ("trail_atr", "trail_activate_r")},
        "trail_pct": 0.004,
        "trail_activate_pct": 0.003,
    },
}


def _compare(fast: dict, slow: dict) -> None:
    assert fast["evaluations"] == slow["evaluations"]
    assert fast["decimal_jobs"] == 0
    assert slow["quiet_bars"] == 0
    assert slow["decimal_jobs"] == len(POLICIES)
    for table in ("fills", "trades", "stops", "levels", "skipped"):
        assert fast[table].keys() == slow[table].keys()
        for column in fast[table]:
            assert list(fast[table][column]) == list(slow[table][column]), (table, column)


@pytest.mark.parametrize("symbol", SYMBOLS)
def test_integer_replay_decides_as_the_decimal_one_on_real_klines(rules, symbol):
    [frame] = bt.load_klines(MARKET / f"{symbol}_1m_last.parquet")
    frame = frame.head(ROWS)
    intents, one = bt_running._entries_for([frame], None, None)
    sparse = bt_running._prepare_series(frame, intents, None).arrays
    times = sparse["open_time"]
    n = len(times)
    dense = {
        **sparse,
        "entry_time": times.copy(),
        "entry_side": np.where(np.arange(n) % 3 == 0, -1, 1).astype(np.int8),
        "entry_confidence": np.linspace(0.0, 1.0, n),
        "entry_notional": None,
        "entry_leverage": np.zeros(n, dtype=np.int64),
    }
    policies = [_core.ExitPolicy(**fields) for fields in POLICIES.values()]
    options = bt_running._core_options(bt.BacktestConfig(), one, detail=True)
    quiet = evaluations = 0
    for series in (sparse, dense):
        fast = _core.backtest_run([series], policies, rules, **options)
        slow = _core.backtest_run([series], policies, rules, **options, exhaustive=True)
        _compare(fast, slow)
        quiet += fast["quiet_bars"]
        evaluations += fast["evaluations"]
    # Dense entries keep a position open on most bars, and most bars trigger nothing.
    assert evaluations > ROWS
    assert quiet > evaluations // 4
