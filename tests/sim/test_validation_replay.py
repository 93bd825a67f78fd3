"""Filters with Decimal (pyquant.sim.validation) and the replay (pyquant.sim.replay)."""

from __future__ import annotations

import json
from decimal import Decimal as D
from pathlib import Path

import polars as pl
import pytest

from pyquant.sim.replay import DEFAULT_DATA, MINUTE_MS, Replay, load_klines
from pyquant.sim.server import load_exchange_info
from pyquant.sim.validation import BinanceError, SymbolRules

INFO = load_exchange_info()
BY_NAME = {s["symbol"]: s for s in INFO["symbols"]}
BTC = SymbolRules.from_exchange_info(BY_NAME["BTCUSDT"])


def err(fn, *args) -> int:
    with pytest.raises(BinanceError) as info:
        fn(*args)
    return info.value.code


def test_bundled_snapshot_is_the_real_one() -> None:
    real = json.loads(
        (
            Path(__file__).parents[1] / "data/binance/exchangeInfo_fapi_full_2025-11-26.json"
        ).read_text()
    )
    assert real == INFO
    assert len(INFO["symbols"]) == 647


def test_precision_is_checked_before_tick() -> None:
    assert BTC.price_precision == 2
    assert BTC.tick_size == D("0.10")
    assert err(BTC.check_price, "price", "12345.678", D("12345.678")) == -1111
    assert err(BTC.check_price, "price", "12345.67", D("12345.67")) == -4014
    BTC.check_price("price", "12345.60", D("12345.60"))
    assert err(BTC.check_price, "price", "0.01", D("0.01")) == -4013
    assert err(BTC.check_price, "price", "99999999", D("99999999")) == -4002


def test_quantity_bounds_use_market_lot_size_for_market_orders() -> None:
    rules = next(
        r
        for s in INFO["symbols"]
        if (r := SymbolRules.from_exchange_info(s)).market_max_qty < r.max_qty
        and r.market_max_qty > r.min_qty
    )
    big = rules.market_max_qty + rules.step_size
    rules.check_quantity(str(big), big, market=False)
    assert err(rules.check_quantity, str(big), big, True) == -4005
    assert err(BTC.check_quantity, "0.0001", D("0.0001"), False) == -1111
    assert err(BTC.check_quantity, "0", D(0), False) == -4003
    doge = SymbolRules.from_exchange_info(BY_NAME["DOGEUSDT"])
    assert err(doge.check_quantity, "0.5", D("0.5"), False) == -1111


def test_percent_price_and_min_notional_messages() -> None:
    doge = SymbolRules.from_exchange_info(BY_NAME["DOGEUSDT"])
    with pytest.raises(BinanceError) as info:
        doge.check_percent_price("BUY", D("0.30000"), D("0.20000"))
    assert info.value.code == -4016
    assert info.value.msg == "Limit price can't be higher than 0.210000."
    assert err(doge.check_percent_price, "SELL", D("0.10000"), D("0.20000")) == -4024
    with pytest.raises(BinanceError) as info:
        BTC.check_min_notional(D("60000"), D("0.001"))
    assert (
        info.value.msg
        == "Order's notional must be no smaller than 100 (unless you choose reduce only)."
    )


def replay(seed: int = 1) -> Replay:
    klines = load_klines([DEFAULT_DATA])
    rules = {s: SymbolRules.from_exchange_info(BY_NAME[s]) for s in klines}
    return Replay(klines, rules, 1_800_000_000_000, seed)


def test_path_inside_a_bar_has_exactly_the_bar_ohlc_and_is_seeded() -> None:
    r = replay()
    t = r.start_ms + 5 * MINUTE_MS
    for symbol in r.symbols:
        bar = r.bar(symbol, t)
        assert bar is not None
        path = r.path(symbol, t)
        assert len(path) == 60
        assert (path[0], max(path), min(path), path[-1]) == (bar.open, bar.high, bar.low, bar.close)
    assert replay(1).path("BTCUSDT", t) == r.path("BTCUSDT", t)
    assert replay(2).path("BTCUSDT", t) != r.path("BTCUSDT", t)


def test_replay_starts_after_a_day_of_history_with_real_24h_moves() -> None:
    r = replay()
    now = r.start_ms
    for symbol in r.symbols:
        change = abs(D(r.ticker_24h(symbol, now)["priceChangePercent"]))
        assert change > 1, symbol
    rows = r.klines("BTCUSDT", "1m", now + 30_000, limit=1500)
    assert len(rows) == 1440 + 1  # a full day of history, plus the open bar
    assert rows[-1][0] == now
    assert rows[-1][6] == now + MINUTE_MS - 1  # still open: closeTime in the future


def test_klines_aggregate_and_respect_start_time() -> None:
    r = replay()
    now = r.start_ms + 10 * MINUTE_MS + 30_000
    hourly = r.klines("ETHUSDT", "1h", now, limit=3)
    assert len(hourly) == 3
    minutes = r.klines("ETHUSDT", "1m", now, start=now - 3 * MINUTE_MS, limit=2)
    start = r.start_ms + 8 * MINUTE_MS  # startTime rounds up to the next bar
    assert [row[0] for row in minutes] == [start, start + MINUTE_MS]


def test_csv_input_symbol_from_file_name_and_random_walk(tmp_path: Path) -> None:
    frame = pl.read_parquet(DEFAULT_DATA).filter(pl.col("symbol") == "XRPUSDT").head(120)
    csv = tmp_path / "XRPUSDT_1m.csv"
    frame.drop("symbol", "volume").write_csv(csv)
    klines = load_klines([csv])
    assert list(klines) == ["XRPUSDT"]
    assert len(klines["XRPUSDT"]) == 120
    rules = {s: SymbolRules.from_exchange_info(BY_NAME[s]) for s in ("XRPUSDT", "LTCUSDT")}
    r = Replay(klines, rules, 1_800_000_000_000, seed=3)
    far = r.start_ms + 3 * 86_400_000
    assert r.price_at("XRPUSDT", far) > 0  # past the data: random walk
    assert r.price_at("LTCUSDT", far) > 0  # no data at all: random walk
    assert Replay(klines, rules, 1_800_000_000_000, seed=3).price_at("LTCUSDT", far) == r.price_at(
        "LTCUSDT", far
    )


def test_bad_kline_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "BTCUSDT.csv"
    bad.write_text("open_time,open,high,close\n0,1,2,1\n")
    with pytest.raises(ValueError, match="missing column"):
        load_klines([bad])
