"""Fixtures of the engine unit tests."""

from __future__ import annotations

import pytest
from worked_example import example_policy

import pyquant
from pyquant import ExitEngine


@pytest.fixture
def engine(exchange_rules: pyquant.ExchangeRules) -> ExitEngine:
    """The worked example's engine: BTCUSDT with ATR exactly 60.0."""
    engine = ExitEngine(exchange_rules, example_policy())
    engine.warm_up("BTCUSDT", [30030.0] * 20, [29970.0] * 20, [30000.0] * 20)
    assert engine.atr("BTCUSDT") == 60.0
    return engine
