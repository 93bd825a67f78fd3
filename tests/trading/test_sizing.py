"""Entry sizing: risk and notional methods, quantization, min notional, margin, leverage."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from fake_venue import FakeEngine, FakeRules

from pyquant.trading.sizing import SizingConfig, size_entry


def size(config: SizingConfig | None = None, engine: FakeEngine | None = None, **overrides: Any):
    arguments: dict[str, Any] = {
        "symbol": "BTCUSDT",
        "position_side": "LONG",
        "price": Decimal("30000"),
        "leverage": 10,
        "equity": Decimal("10000"),
        "available_margin": Decimal("10000"),
        "size_usd": None,
    }
    arguments.update(overrides)
    return size_entry(FakeRules(), engine or FakeEngine(), config or SizingConfig(), **arguments)


def test_risk_sizing_uses_the_engine_stop_distance_and_floors() -> None:
    # stop distance 1 % of 30000 = 300; 10000 * 0.01 / 300 = 0.3333.. -> 0.333
    decision = size()
    assert decision.ok
    assert decision.quantity == "0.333"
    assert decision.notional == Decimal("9990.000")
    assert decision.stop_price == "29700.00"


def test_short_and_another_stop() -> None:
    decision = size(engine=FakeEngine(stop_pct=Decimal("0.02")), position_side="SHORT")
    # 100 / 600 = 0.1666.. -> 0.166
    assert decision.quantity == "0.166"
    assert decision.stop_price == "30600.00"


def test_fixed_notional_and_intent_size_override() -> None:
    config = SizingConfig(method="notional", notional_usd=Decimal("150"))
    assert size(config).quantity == "0.005"
    assert size(config, size_usd=Decimal("301")).quantity == "0.010"


def test_max_notional_caps_quantity() -> None:
    decision = size(SizingConfig(max_notional_usd=Decimal("1500")))
    assert decision.quantity == "0.050"


def test_below_min_notional_is_refused() -> None:
    decision = size(size_usd=Decimal("60"))  # 0.002 BTC = 60 USDT < 100
    assert not decision.ok
    assert decision.reason == "below_min_notional"
    assert "-4164" in decision.detail
    tiny = size(size_usd=Decimal("10"))  # floors to 0
    assert tiny.reason == "below_min_notional"


def test_insufficient_margin() -> None:
    decision = size(available_margin=Decimal("500"))  # needs 999 at 10x
    assert not decision.ok
    assert decision.reason == "insufficient_margin"
    assert "999" in decision.detail


def test_over_leveraged_is_refused() -> None:
    decision = size(engine=FakeEngine(over_leveraged=True), leverage=100)
    assert (decision.ok, decision.reason) == (False, "over_leveraged")


@pytest.mark.parametrize("price", [Decimal(0), Decimal(-1)])
def test_bad_price_is_invalid(price: Decimal) -> None:
    assert size(price=price).reason == "invalid"


def test_quantity_is_capped_at_market_max_qty() -> None:
    decision = size(
        size_usd=Decimal("60000000"), equity=Decimal("1e9"), available_margin=Decimal("1e9")
    )
    assert decision.ok
    assert decision.quantity == "1000.000"  # BTCUSDT MARKET_LOT_SIZE maxQty
