"""The exit policy of the worked example (exit-rules.md) that the engine tests share."""

from __future__ import annotations

from typing import Any

from pyquant import ExitPolicy


def example_policy(**extra: Any) -> ExitPolicy:
    """Stop 2 ATR (0.3 %..3 %), ladder 1R/2R/3R, breakeven after 1, trail 2 ATR from 3R."""
    return ExitPolicy(
        stop_atr=2.0,
        min_stop_pct=0.003,
        max_stop_pct=0.03,
        max_margin_loss=0.10,
        ladder=[(1.0, 0.3), (2.0, 0.3), (3.0, 0.4)],
        breakeven_after_level=1,
        ratchet_to_previous_level=True,
        taker_fee=0.0005,
        trail_atr=2.0,
        trail_activate_R=3.0,
        **extra,
    )
