"""Backtest: historical klines through the same Rust exit state machine as the daemon.

polars in, one coarse call into ``pyquant._core`` per chunk of work, polars out. Python
loads and validates the bars, builds the entries (an intents file or the demo rule
``momentum24h``) and turns the columnar result into DataFrames, metrics, files and charts;
every exit decision is taken by ``exit::position`` in the Rust core, the very code the daemon
runs on live mark prices.

Fill model (what the simulated fills assume; see ``rust_core/src/backtest.rs`` for the code):

* Entries are MARKET orders at the open of the first bar whose ``open_time`` is at or after the
  entry time (for ``momentum24h``: the bar after the signal bar). The size is the notional
  (``size_usd`` of the intent, else the configured default) divided by that open, floored to
  the MARKET_LOT_SIZE step; too small for minQty or MIN_NOTIONAL means the entry is skipped.
* Each bar is replayed as a mark-price path: open, then the two extremes, then close. Which
  extreme comes first is the intrabar rule: ``stop_first`` (default, the conservative one:
  the low first for a long, the high first for a short) or ``target_first``. Finer bars,
  when given, replace that guess by their own path (still open, extremes, close per fine bar).
* An exit fills at its trigger price (the stop, or the take-profit level, both already on the
  tick grid) when the path crossed it continuously; when the mark jumped over it (the bar opens
  beyond the trigger after the previous close), it fills at that open, the worse price for a
  stop and the better one for a target. A crossing carries the time of the path point the
  move started from. A time stop fills at the mark where it fired. Each action is confirmed
  at once with its full quantity (no partial fills, no rejections), and the same mark is
  looked at again, as the daemon's next update at that price would (a confirmed take-profit
  can move the stop past it).
* The daemon on the simulator takes the same decisions on the same marks (reasons, exact
  quantities, prices): ``tests/backtest/test_consistency.py`` replays real bars both ways.
* ATR is Wilder's over closed bars only; the bar being replayed never sees its own range.
* Fees: entries pay the taker fee (the maker fee with ``entry_liquidity="maker"``, a limit order
  assumed filled at the open), every exit pays the taker fee (exits are MARKET orders).
  Fees are rounded to 8 decimals, the precision of Binance's USDT commission.
* Gaps are never bridged: a step of more than ``max_gap_bars`` missing bars ends a segment;
  positions still open are closed at the last close before the gap (reason ``data_gap``), ATR
  restarts after it, and entries falling inside it are skipped. Positions still open at the
  end of the data close at the last close (reason ``end_of_data``).
* Liquidation is not modelled. With ``max_margin_loss`` the stop sits inside the liquidation
  price by construction (it caps the stop distance per leverage); without it a wide stop at a
  high leverage may lie past it, and the result says so in ``warnings`` (the command prints
  them) rather than trusting fills the exchange would never give.

The parts: ``loading`` (inputs and their validation), ``running`` (the runs), ``reporting``
(tables, metrics, files, charts) and ``cli`` (the ``pyquant backtest`` command).
"""

from __future__ import annotations

from pyquant.backtest.loading import (
    BUNDLED_EXCHANGE_INFO,
    KLINE_COLUMNS,
    Intrabar,
    KlinesError,
    ProgressCallback,
    check_symbols,
    interval_ms,
    load_data,
    load_exchange_rules,
    load_intents,
    load_klines,
    momentum24h,
    validate_klines,
)
from pyquant.backtest.reporting import (
    EXACT,
    equity_curve,
    plot_equity,
    plot_heatmap,
    plot_symbol,
    summarize,
    write_outputs,
)
from pyquant.backtest.running import (
    BacktestConfig,
    BacktestResult,
    exit_decisions_for_path,
    grid_policies,
    liquidation_warnings,
    parse_grid,
    run_backtest,
    run_grid,
)

__all__ = [
    "BUNDLED_EXCHANGE_INFO",
    "EXACT",
    "KLINE_COLUMNS",
    "BacktestConfig",
    "BacktestResult",
    "Intrabar",
    "KlinesError",
    "ProgressCallback",
    "check_symbols",
    "equity_curve",
    "exit_decisions_for_path",
    "grid_policies",
    "interval_ms",
    "liquidation_warnings",
    "load_data",
    "load_exchange_rules",
    "load_intents",
    "load_klines",
    "momentum24h",
    "parse_grid",
    "plot_equity",
    "plot_heatmap",
    "plot_symbol",
    "run_backtest",
    "run_grid",
    "summarize",
    "validate_klines",
    "write_outputs",
]
