"""Shared fixtures: paths to the real data under tests/data and objects built from it.

Other suites may append their own fixtures below.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import pyquant

DATA_DIR = Path(__file__).parent / "data"
BINANCE_DIR = DATA_DIR / "binance"
MARKET_DIR = DATA_DIR / "market"
EXCHANGE_INFO_PATH = BINANCE_DIR / "exchangeInfo_fapi_full_2025-11-26.json"
MARKET_SERIES = sorted(MARKET_DIR.glob("*_1m_last.parquet"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Root of the copied real data (tests/data)."""
    return DATA_DIR


@pytest.fixture(scope="session")
def binance_dir() -> Path:
    """Real and documented Binance payloads (tests/data/binance)."""
    return BINANCE_DIR


@pytest.fixture(scope="session")
def market_dir() -> Path:
    """Real 1m Parquet series (tests/data/market)."""
    return MARKET_DIR


@pytest.fixture(scope="session")
def exchange_info_bytes() -> bytes:
    """The real futures exchangeInfo document (647 symbols, 2025-11-26)."""
    return EXCHANGE_INFO_PATH.read_bytes()


@pytest.fixture(scope="session")
def exchange_rules(exchange_info_bytes: bytes) -> pyquant.ExchangeRules:
    """ExchangeRules parsed from the real exchangeInfo."""
    return pyquant.ExchangeRules.from_exchange_info(exchange_info_bytes)
