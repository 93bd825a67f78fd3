"""Hypothesis: quantization on every real symbol agrees with an exact Decimal model.

Each example draws one random position per symbol and checks all 647 symbols of the real
exchangeInfo, so every symbol is exercised in every example while max_examples stays small.
"""

from __future__ import annotations

import json
import math
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyquant

EXCHANGE_INFO = (
    Path(__file__).parents[1] / "data" / "binance" / "exchangeInfo_fapi_full_2025-11-26.json"
)


def _filters(symbol: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["filterType"]: f for f in symbol["filters"]}


SYMBOLS = json.loads(EXCHANGE_INFO.read_bytes())["symbols"]
RULES = pyquant.ExchangeRules.from_exchange_info(EXCHANGE_INFO.read_bytes())
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decimals(step: Decimal) -> int:
    exponent = step.normalize().as_tuple().exponent
    assert isinstance(exponent, int)
    return max(0, -exponent)


def _model_round(value: Decimal, base: Decimal, step: Decimal, rounding: str) -> Decimal:
    """Round onto base + k*step with Python's Decimal (the reference model)."""
    k = (value - base) / step
    if rounding == "down":
        n = k.to_integral_value(rounding=ROUND_FLOOR)
    elif rounding == "up":
        n = k.to_integral_value(rounding=ROUND_CEILING)
    else:
        lower = k.to_integral_value(rounding=ROUND_FLOOR)
        n = lower + 1 if (k - lower) * 2 >= 1 else lower
    return base + n * step


def _check_wire_string(text: str, decimals: int) -> Decimal:
    assert "e" not in text.lower(), text
    assert text.strip() == text, text
    if decimals:
        _whole, frac = text.split(".")
        assert len(frac) == decimals, (text, decimals)
    else:
        assert "." not in text, text
    return Decimal(text)


def _price_in_range(
    lo: Decimal, hi: Decimal, u: float, extra_digits: int, tick: Decimal
) -> Decimal:
    # Log-uniform between the bounds, then written with digits beyond the tick.
    # A zero lower bound (disabled) starts the log range at one step instead.
    lo_f, hi_f = float(lo or tick), float(hi)
    value = math.exp(math.log(lo_f) + u * (math.log(hi_f) - math.log(lo_f)))
    places = Decimal(1).scaleb(-(_decimals(tick) + extra_digits))
    return min(max(Decimal(repr(value)).quantize(places, rounding=ROUND_FLOOR), lo), hi)


@SETTINGS
@given(
    u=st.floats(min_value=0.0, max_value=1.0),
    extra=st.integers(min_value=0, max_value=4),
    rounding=st.sampled_from(["down", "up", "nearest"]),
    as_float=st.booleans(),
)
def test_price_quantization_matches_decimal_model(
    u: float, extra: int, rounding: str, as_float: bool
) -> None:
    for sym in SYMBOLS:
        pf = _filters(sym)["PRICE_FILTER"]
        lo, hi, tick = Decimal(pf["minPrice"]), Decimal(pf["maxPrice"]), Decimal(pf["tickSize"])
        if tick == 0:
            # Tick disabled: the grid is 10^-pricePrecision from zero.
            tick, lo = Decimal(1).scaleb(-sym["pricePrecision"]), Decimal(0)
            hi = hi or Decimal(1000)
            base = Decimal(0)
            price = _price_in_range(max(lo, tick), hi, u, extra, tick)
        else:
            base = lo
            price = _price_in_range(lo, hi, u, extra, tick)
        given_price: Decimal | float = float(price) if as_float else price
        if as_float:
            price = Decimal(repr(float(price)))
        out = RULES.quantize_price(sym["symbol"], given_price, rounding=rounding)
        value = _check_wire_string(out, _decimals(tick))
        assert value == _model_round(price, base, tick, rounding), (sym["symbol"], price, out)
        assert (value - base) % tick == 0
        assert base <= value <= hi or hi == 0, (sym["symbol"], price, out)
        if rounding == "down":
            assert price - tick < value <= price
        elif rounding == "up":
            assert price <= value < price + tick
        else:
            assert abs(value - price) * 2 <= tick


@SETTINGS
@given(
    u=st.floats(min_value=0.0, max_value=1.0),
    extra=st.integers(min_value=0, max_value=4),
    market=st.booleans(),
    as_float=st.booleans(),
)
def test_qty_quantization_floors_onto_the_lot_grid(
    u: float, extra: int, market: bool, as_float: bool
) -> None:
    for sym in SYMBOLS:
        lot = _filters(sym)["MARKET_LOT_SIZE" if market else "LOT_SIZE"]
        lo, hi, step = Decimal(lot["minQty"]), Decimal(lot["maxQty"]), Decimal(lot["stepSize"])
        qty = _price_in_range(lo, hi, u, extra, step)
        given_qty: Decimal | float = float(qty) if as_float else qty
        if as_float:
            qty = Decimal(repr(float(qty)))
        out = RULES.quantize_qty(sym["symbol"], given_qty, market=market)
        value = _check_wire_string(out, _decimals(step))
        assert value == _model_round(qty, lo, step, "down"), (sym["symbol"], qty, out)
        assert lo <= value <= hi
        assert qty - step < value <= qty
        assert (value - lo) % step == 0


@SETTINGS
@given(u=st.floats(min_value=0.0, max_value=1.0), extra=st.integers(min_value=0, max_value=3))
def test_quantized_orders_pass_the_filters(u: float, extra: int) -> None:
    """What quantize returns for in-range inputs never trips -1111, -4014 or -4023."""
    for sym in SYMBOLS:
        f = _filters(sym)
        pf, lot = f["PRICE_FILTER"], f["LOT_SIZE"]
        tick = Decimal(pf["tickSize"])
        if tick == 0:
            continue
        price = RULES.quantize_price(
            sym["symbol"],
            _price_in_range(Decimal(pf["minPrice"]), Decimal(pf["maxPrice"]), u, extra, tick),
        )
        step = Decimal(lot["stepSize"])
        qty = RULES.quantize_qty(
            sym["symbol"],
            _price_in_range(Decimal(lot["minQty"]), Decimal(lot["maxQty"]), u, extra, step),
            market=False,
        )
        reject = RULES.check_order(
            sym["symbol"],
            side="SELL",
            order_type="LIMIT",
            quantity=qty,
            price=price,
            reduce_only=True,
        )
        assert reject is None, (sym["symbol"], price, qty, reject)


@pytest.mark.parametrize("rounding", ["down", "up", "nearest"])
def test_grid_points_are_fixed_points(rounding: str) -> None:
    for sym in SYMBOLS:
        pf = _filters(sym)["PRICE_FILTER"]
        if Decimal(pf["tickSize"]) == 0:
            continue
        for text in (pf["minPrice"], pf["maxPrice"]):
            out = RULES.quantize_price(sym["symbol"], text, rounding=rounding)
            assert Decimal(out) == Decimal(text), (sym["symbol"], text, out)
