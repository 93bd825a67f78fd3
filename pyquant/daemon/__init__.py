"""The streaming daemon part: the process that runs the trading desk on live streams.

``app`` wires the streams, the intent sources and the trading desk into one process;
``cli`` is ``pyquant run/flatten/resume``; ``dashboard`` and ``metrics`` show what it does;
``demo`` feeds it sample intents; ``doctor`` checks an account before trading on it;
``state_lock`` keeps one process per state directory. The trading logic itself, including
the reconciliation with the exchange at start-up (``pyquant.trading.recovery``, which the
scale-out's takeovers use too), lives in ``pyquant.trading``; this part only runs it.

The names the former ``pyquant.daemon`` module exported (``from pyquant.daemon import
Daemon``) are still importable from here. They are loaded on first use, so ``pyquant
flatten`` and ``pyquant.daemon.cli`` do not import the whole daemon.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyquant.daemon.app import (
        TICK_RECEIVED_NS,
        Daemon,
        Intake,
        LatencyRecorder,
        VenueEndpoints,
        desk_config,
    )

__all__ = [
    "TICK_RECEIVED_NS",
    "Daemon",
    "Intake",
    "LatencyRecorder",
    "VenueEndpoints",
    "desk_config",
]


def __getattr__(name: str) -> Any:  # noqa: ANN401 - whatever pyquant.daemon.app defines
    if name in __all__:
        return getattr(importlib.import_module("pyquant.daemon.app"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
