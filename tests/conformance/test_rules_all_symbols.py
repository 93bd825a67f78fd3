"""Contract §4 on every symbol of the real exchangeInfo: filters kept exactly, bounds on
the grid, and MIN_NOTIONAL decided at the exact boundary."""

from __future__ import annotations

import json
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

import pytest

import pyquant

EXCHANGE_INFO = (
    Path(__file__).parents[1] / "data" / "binance" / "exchangeInfo_fapi_full_2025-11-26.json"
)
SYMBOLS: list[dict[str, Any]] = json.loads(EXCHANGE_INFO.read_bytes())["symbols"]


@pytest.fixture(scope="module")
def rules() -> pyquant.ExchangeRules:
    return pyquant.ExchangeRules.from_exchange_info(EXCHANGE_INFO.read_bytes())


def _filters(symbol: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["filterType"]: f for f in symbol["filters"]}


def _norm(text: str) -> str:
    value = Decimal(text).normalize()
    return format(value, "f")


def test_every_symbol_is_loaded(rules: pyquant.ExchangeRules) -> None:
    assert sorted(s["symbol"] for s in SYMBOLS) == rules.symbols()


def test_filters_are_kept_exactly(rules: pyquant.ExchangeRules) -> None:
    mismatches = []
    for sym in SYMBOLS:
        f = _filters(sym)
        info = rules.symbol_info(sym["symbol"])
        expected = {
            "status": sym["status"],
            "price_precision": str(sym["pricePrecision"]),
            "quantity_precision": str(sym["quantityPrecision"]),
            "tick_size": _norm(f["PRICE_FILTER"]["tickSize"]),
            "min_price": _norm(f["PRICE_FILTER"]["minPrice"]),
            "max_price": _norm(f["PRICE_FILTER"]["maxPrice"]),
            "step_size": _norm(f["LOT_SIZE"]["stepSize"]),
            "min_qty": _norm(f["LOT_SIZE"]["minQty"]),
            "max_qty": _norm(f["LOT_SIZE"]["maxQty"]),
            "market_step_size": _norm(f["MARKET_LOT_SIZE"]["stepSize"]),
            "market_min_qty": _norm(f["MARKET_LOT_SIZE"]["minQty"]),
            "market_max_qty": _norm(f["MARKET_LOT_SIZE"]["maxQty"]),
            "min_notional": _norm(f["MIN_NOTIONAL"]["notional"]),
            "multiplier_up": _norm(f["PERCENT_PRICE"]["multiplierUp"]),
            "multiplier_down": _norm(f["PERCENT_PRICE"]["multiplierDown"]),
            "max_num_algo_orders": str(f["MAX_NUM_ALGO_ORDERS"]["limit"]),
            "trigger_protect": _norm(sym["triggerProtect"]),
            "market_take_bound": _norm(sym["marketTakeBound"]),
        }
        got = {k: info.get(k) for k in expected}
        if got != expected:
            mismatches.append((sym["symbol"], got, expected))
    assert not mismatches, mismatches[:3]


def test_price_bounds_are_grid_points_with_allowed_decimals(rules: pyquant.ExchangeRules) -> None:
    bad = []
    for sym in SYMBOLS:
        pf = _filters(sym)["PRICE_FILTER"]
        if Decimal(pf["tickSize"]) == 0:
            continue
        for bound in (pf["minPrice"], pf["maxPrice"]):
            for rounding in ("down", "up", "nearest"):
                out = rules.quantize_price(sym["symbol"], bound, rounding=rounding)
                decimals = len(out.split(".")[1]) if "." in out else 0
                if Decimal(out) != Decimal(bound) or decimals > sym["pricePrecision"]:
                    bad.append((sym["symbol"], bound, rounding, out))
    assert not bad, bad[:5]


def test_min_notional_boundary_on_every_trading_symbol(rules: pyquant.ExchangeRules) -> None:
    """At a mid-range price, the smallest step quantity with notional >= MIN_NOTIONAL passes
    and one step less is refused with -4164 (unless reduce-only)."""
    wrong = []
    checked = 0
    for sym in SYMBOLS:
        if sym["status"] != "TRADING":
            continue
        f = _filters(sym)
        pf, lot = f["PRICE_FILTER"], f["LOT_SIZE"]
        notional = Decimal(f["MIN_NOTIONAL"]["notional"])
        step, min_qty = Decimal(lot["stepSize"]), Decimal(lot["minQty"])
        # The geometric middle of the price range: a realistic price for every symbol.
        middle = (Decimal(pf["minPrice"]) * Decimal(pf["maxPrice"])).sqrt()
        price = rules.quantize_price(sym["symbol"], middle)
        needed = (notional / Decimal(price) / step).to_integral_value(ROUND_CEILING) * step
        qty = max(needed, min_qty)
        if qty - step < min_qty or qty > Decimal(lot["maxQty"]):
            continue  # the minimum quantity alone already clears MIN_NOTIONAL here
        checked += 1
        args = {"side": "BUY", "order_type": "LIMIT", "price": price}
        ok = rules.check_order(
            sym["symbol"], **args, quantity=rules.quantize_qty(sym["symbol"], qty, market=False)
        )
        low_qty = rules.quantize_qty(sym["symbol"], qty - step, market=False)
        low = rules.check_order(sym["symbol"], **args, quantity=low_qty)
        exempt = rules.check_order(sym["symbol"], **args, quantity=low_qty, reduce_only=True)
        if ok is not None or low is None or low.code != -4164 or exempt is not None:
            wrong.append((sym["symbol"], price, str(qty), ok, low, exempt))
    assert checked > 400
    assert not wrong, wrong[:3]


def test_market_orders_use_the_market_lot(rules: pyquant.ExchangeRules) -> None:
    differing = [
        s
        for s in SYMBOLS
        if _filters(s)["MARKET_LOT_SIZE"]["maxQty"] != _filters(s)["LOT_SIZE"]["maxQty"]
    ]
    assert differing, "the real document has symbols whose market maxQty is smaller"
    for sym in differing[:50]:
        market_max = Decimal(_filters(sym)["MARKET_LOT_SIZE"]["maxQty"])
        limit_max = Decimal(_filters(sym)["LOT_SIZE"]["maxQty"])
        if limit_max <= market_max:
            continue
        step = Decimal(_filters(sym)["MARKET_LOT_SIZE"]["stepSize"])
        qty = rules.quantize_qty(sym["symbol"], market_max + step, market=True)
        market = rules.check_order(
            sym["symbol"], side="SELL", order_type="MARKET", quantity=qty, reduce_only=True
        )
        assert market is not None
        assert market.code == -4005, (sym["symbol"], qty, market)
