"""pyquant: exits and guarded entries for Binance USDⓈ-M futures positions.

The per-tick work (exchange rules, ATR, bars, exit state) runs in the Rust extension
``pyquant._core``; this package re-exports its public API.
"""

from __future__ import annotations

from pyquant import _core
from pyquant._core import (
    EntryPlan,
    ExchangeRules,
    ExitAction,
    ExitEngine,
    ExitPolicy,
    OrderReject,
    PositionView,
    atr,
)
from pyquant.errors import (
    ConfigError,
    ExchangeError,
    InputError,
    MessageError,
    OrderRejected,
    OrderStatusUnknown,
    PolicyError,
    PyquantError,
    RetryableError,
    UnknownSymbolError,
)

__version__: str = _core.__version__

__all__ = [
    "ConfigError",
    "EntryPlan",
    "ExchangeError",
    "ExchangeRules",
    "ExitAction",
    "ExitEngine",
    "ExitPolicy",
    "InputError",
    "MessageError",
    "OrderReject",
    "OrderRejected",
    "OrderStatusUnknown",
    "PolicyError",
    "PositionView",
    "PyquantError",
    "RetryableError",
    "UnknownSymbolError",
    "__version__",
    "atr",
]

# Backtest: polars in, the same exit state machine, polars out.
from pyquant.backtest import BacktestConfig, BacktestResult, run_backtest, run_grid

__all__ += ["BacktestConfig", "BacktestResult", "run_backtest", "run_grid"]
