"""Fixtures of the backtest tests: the real exchange rules and the worked-example policy."""

from __future__ import annotations

import pytest
from backtest_helpers import EXAMPLE_POLICY, INFO

from pyquant import _core


@pytest.fixture(scope="session")
def rules():
    return _core.ExchangeRules.from_exchange_info(INFO.read_bytes())


@pytest.fixture
def example_policy():
    return _core.ExitPolicy(**EXAMPLE_POLICY)
