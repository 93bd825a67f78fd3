"""pyquant.ExchangeRules on the real exchangeInfo: exact wire strings, Binance codes, errors."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

import pyquant
from pyquant.errors import InputError, PyquantError, UnknownSymbolError

BINANCE_DIR = Path(__file__).parents[1] / "data" / "binance"


@pytest.fixture(scope="module")
def rules() -> pyquant.ExchangeRules:
    return pyquant.ExchangeRules.from_exchange_info(
        (BINANCE_DIR / "exchangeInfo_fapi_full_2025-11-26.json").read_bytes()
    )


@pytest.fixture(scope="module")
def real_messages() -> dict[int, list[str]]:
    doc = json.loads((BINANCE_DIR / "errors.json").read_text())
    out: dict[int, list[str]] = {}
    for entry in doc["errors"]:
        out.setdefault(entry["body"]["code"], []).append(entry["body"]["msg"])
    return out


def test_loads_every_symbol(rules: pyquant.ExchangeRules) -> None:
    assert len(rules) == 647
    names = rules.symbols()
    assert names == sorted(names)
    assert "BTCUSDT" in rules
    assert "NOPEUSDT" not in rules
    assert repr(rules) == "<ExchangeRules: 647 symbols>"


def test_accepts_bytes_str_and_dict() -> None:
    raw = (BINANCE_DIR / "exchangeInfo_fapi_full_2025-11-26.json").read_bytes()
    from_str = pyquant.ExchangeRules.from_exchange_info(raw.decode())
    from_dict = pyquant.ExchangeRules.from_exchange_info(json.loads(raw))
    assert from_str.symbols() == from_dict.symbols()
    assert from_dict.quantize_price("ETHUSDT", "2000.017") == "2000.01"
    with pytest.raises(TypeError, match="exchange info must be bytes, str or dict, found list"):
        pyquant.ExchangeRules.from_exchange_info([])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("price", "rounding", "expected"),
    [
        ("30120.07", "down", "30120.0"),
        ("30120.07", "up", "30120.1"),
        ("30120.07", "nearest", "30120.1"),
        ("30120.05", "nearest", "30120.1"),
        ("30120.04", "nearest", "30120.0"),
        ("30120", "down", "30120.0"),
        (30120.07, "down", "30120.0"),
        (Decimal("30120.19"), "down", "30120.1"),
        (Decimal("3.012007E+4"), "up", "30120.1"),
        (30120, "up", "30120.0"),
        ("261.15", "down", "261.1"),
    ],
)
def test_btc_price_strings(
    rules: pyquant.ExchangeRules, price: object, rounding: str, expected: str
) -> None:
    assert rules.quantize_price("BTCUSDT", price, rounding=rounding) == expected  # type: ignore[arg-type]


def test_floats_do_not_leak_binary_noise(rules: pyquant.ExchangeRules) -> None:
    # 0.1 + 0.2 is 0.30000000000000004 as a float: floored to the step, never printed raw.
    assert rules.quantize_qty("XRPUSDT", 0.1 + 0.2, market=False) == "0.3"
    assert rules.quantize_qty("BTCUSDT", 1e-05 * 300) == "0.003"
    assert "e" not in rules.quantize_price("1000PEPEUSDT", 1e-05, rounding="up").lower()


def test_small_tick_symbols_print_all_their_decimals(rules: pyquant.ExchangeRules) -> None:
    info = rules.symbol_info("1000PEPEUSDT")
    tick = Decimal(info["tick_size"])
    out = rules.quantize_price("1000PEPEUSDT", "0.0045678", rounding="down")
    assert Decimal(out) % tick == 0
    assert len(out.split(".")[1]) == -tick.as_tuple().exponent


def test_qty_uses_market_or_limit_lot(rules: pyquant.ExchangeRules) -> None:
    assert rules.quantize_qty("BTCUSDT", "0.0039") == "0.003"
    assert rules.quantize_qty("BTCUSDT", "0.0039", market=False) == "0.003"
    assert rules.quantize_qty("BTCUSDT", "0.0005") == "0.000"
    assert rules.quantize_qty("DOGEUSDT", "123.9") == "123"
    assert rules.quantize_qty("BTCUSDT", 0) == "0.000"


def test_symbol_info(rules: pyquant.ExchangeRules) -> None:
    info = rules.symbol_info("BTCUSDT")
    assert info["tick_size"] == "0.1"
    assert info["step_size"] == "0.001"
    assert info["min_qty"] == "0.001"
    assert info["min_notional"] == "100"
    assert info["status"] == "TRADING"
    assert info["price_precision"] == "2"
    assert info["max_num_algo_orders"] == "10"
    assert info["multiplier_up"] == "1.05"


def _code(rules: pyquant.ExchangeRules, symbol: str = "BTCUSDT", **kw: object) -> int | None:
    reject = rules.check_order(symbol, **kw)  # type: ignore[arg-type]
    return None if reject is None else reject.code


LIMIT = {"side": "BUY", "order_type": "LIMIT"}


def test_valid_orders_pass(rules: pyquant.ExchangeRules) -> None:
    assert rules.check_order("BTCUSDT", **LIMIT, quantity="0.004", price="30120.0") is None
    assert (
        rules.check_order(
            "BTCUSDT", side="SELL", order_type="MARKET", quantity="0.004", mark_price="30000"
        )
        is None
    )


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({**LIMIT, "quantity": "0.004"}, -1102),
        ({"side": "SELL", "order_type": "STOP_MARKET", "quantity": "0.004"}, -1102),
        ({**LIMIT, "quantity": "0.0040", "price": "30120.0"}, -1111),
        ({**LIMIT, "quantity": "0.004", "price": "30120.001"}, -1111),
        ({**LIMIT, "quantity": "0.004", "price": "30120.07"}, -4014),
        ({**LIMIT, "quantity": "0.004", "price": "261.0"}, -4013),
        ({**LIMIT, "quantity": "0.004", "price": "809484.1"}, -4002),
        ({**LIMIT, "quantity": "0.004", "price": "0"}, -4001),
        ({**LIMIT, "quantity": "0", "price": "30120.0"}, -4003),
        ({**LIMIT, "quantity": "1000.001", "price": "30120.0"}, -4005),
        (
            {
                "side": "SELL",
                "order_type": "STOP_MARKET",
                "quantity": "0.004",
                "stop_price": "809484.1",
                "reduce_only": True,
            },
            -4007,
        ),
        (
            {"side": "BUY", "order_type": "LIMIT", "quantity": "0.004", "price": "31600.0"}
            | {"mark_price": "30000"},
            -4016,
        ),
        (
            {"side": "SELL", "order_type": "LIMIT", "quantity": "0.004", "price": "28400.0"}
            | {"mark_price": "30000"},
            -4024,
        ),
        (
            {"side": "BUY", "order_type": "MARKET", "quantity": "0.004"}
            | {"mark_price": "30000", "best_price": "31600"},
            -4131,
        ),
        ({**LIMIT, "quantity": "0.003", "price": "30120.0"}, -4164),
    ],
)
def test_reject_codes(rules: pyquant.ExchangeRules, kwargs: dict[str, object], code: int) -> None:
    assert _code(rules, **kwargs) == code


def test_min_qty_and_step_codes_on_real_symbols(rules: pyquant.ExchangeRules) -> None:
    reduce = {"side": "SELL", "order_type": "MARKET", "reduce_only": True}
    # ALLUSDT: minQty 10, stepSize 1 -> 9 is on the step but below the minimum.
    assert rules.symbol_info("ALLUSDT")["min_qty"] == "10"
    assert _code(rules, "ALLUSDT", **reduce, quantity="9") == -4004
    assert _code(rules, "ALLUSDT", **reduce, quantity="11") is None
    # MAVIAUSDT: stepSize 1 but quantityPrecision 1 -> 1.5 passes precision, fails the step.
    info = rules.symbol_info("MAVIAUSDT")
    assert (info["step_size"], info["quantity_precision"]) == ("1", "1")
    assert _code(rules, "MAVIAUSDT", **reduce, quantity="1.5") == -4023
    # BTCUSDT: 0.0005 has more decimals than quantityPrecision 3.
    assert _code(rules, **reduce, quantity="0.0005") == -1111


def test_reject_messages_match_binance(
    rules: pyquant.ExchangeRules, real_messages: dict[int, list[str]]
) -> None:
    reject = rules.check_order("BTCUSDT", **LIMIT, quantity="0.003", price="30120.0")
    assert reject == pyquant.OrderReject(
        -4164, "Order's notional must be no smaller than 100 (unless you choose reduce only)."
    )
    assert reject.msg in real_messages[-4164]
    reject = rules.check_order("DOGEUSDT", **LIMIT, quantity="1", price="0.1")
    assert reject is not None
    assert (
        reject.msg == "Order's notional must be no smaller than 5 (unless you choose reduce only)."
    )
    assert reject.msg in real_messages[-4164]
    reject = rules.check_order("BTCUSDT", **LIMIT, quantity="0", price="30120.0")
    assert reject is not None
    assert reject.msg in real_messages[-4003]
    reject = rules.check_order("BTCUSDT", **LIMIT, quantity="0.0040", price="30120.0")
    assert reject is not None
    assert reject.msg in real_messages[-1111]
    reject = rules.check_order(
        "BTCUSDT",
        side="BUY",
        order_type="LIMIT",
        quantity="0.004",
        price="31600.0",
        mark_price="30000.03",
    )
    assert reject == pyquant.OrderReject(-4016, "Limit price can't be higher than 31500.0")
    assert (
        repr(reject) == 'OrderReject(code=-4016, msg="Limit price can\'t be higher than 31500.0")'
    )
    assert str(reject) == "-4016: Limit price can't be higher than 31500.0"


def test_reduce_only_is_exempt_from_min_notional(rules: pyquant.ExchangeRules) -> None:
    kw = {"side": "SELL", "order_type": "MARKET", "quantity": "0.001"}
    assert _code(rules, **kw, mark_price="30000") == -4164
    assert _code(rules, **kw, mark_price="30000", reduce_only=True) is None
    assert _code(rules, **kw, reduce_only=True) is None


def test_market_order_without_mark_price_is_refused(rules: pyquant.ExchangeRules) -> None:
    with pytest.raises(InputError, match="mark_price None for BTCUSDT is required to check"):
        rules.check_order("BTCUSDT", side="BUY", order_type="MARKET", quantity="0.004")


def test_non_trading_symbol_refuses_opening_orders(rules: pyquant.ExchangeRules) -> None:
    pending = next(s for s in rules.symbols() if rules.symbol_info(s)["status"] != "TRADING")
    info = rules.symbol_info(pending)
    qty = info["max_qty"]
    price = rules.quantize_price(
        pending, Decimal(info["max_price"]) / 2 if Decimal(info["max_price"]) else "1"
    )
    kw = {"side": "BUY", "order_type": "LIMIT", "quantity": qty, "price": price}
    assert _code(rules, pending, **kw) == -4140
    assert _code(rules, pending, **kw, reduce_only=True) in (None, -4164)


def test_unknown_symbol_is_a_key_error_naming_it(rules: pyquant.ExchangeRules) -> None:
    with pytest.raises(UnknownSymbolError, match="unknown symbol NOPEUSDT") as info:
        rules.quantize_price("NOPEUSDT", "1")
    assert isinstance(info.value, KeyError)
    assert isinstance(info.value, PyquantError)
    with pytest.raises(KeyError):
        rules.check_order("NOPEUSDT", side="BUY", order_type="LIMIT", quantity="1", price="1")
    with pytest.raises(KeyError):
        rules.symbol_info("NOPEUSDT")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda r: r.quantize_price("BTCUSDT", "1e5"),
            r"price 1e5 for BTCUSDT must be a plain decimal",
        ),
        (
            lambda r: r.quantize_price("BTCUSDT", "NaN"),
            r"price NaN for BTCUSDT must be a plain decimal",
        ),
        (
            lambda r: r.quantize_price("BTCUSDT", ""),
            r'price "" for BTCUSDT must be a plain decimal',
        ),
        (
            lambda r: r.quantize_price("BTCUSDT", float("nan")),
            r"price NaN for BTCUSDT must be a finite number",
        ),
        (lambda r: r.quantize_price("BTCUSDT", Decimal("Infinity")), r"price Infinity for BTCUSDT"),
        (lambda r: r.quantize_price("BTCUSDT", "-5"), r"price -5 for BTCUSDT must be positive"),
        (
            lambda r: r.quantize_price("BTCUSDT", "5", rounding="half"),
            r"rounding half must be one of",
        ),
        (
            lambda r: r.quantize_qty("BTCUSDT", "-0.5"),
            r"quantity -0.5 for BTCUSDT must not be negative",
        ),
        (
            lambda r: r.check_order(
                "BTCUSDT", side="LONG", order_type="LIMIT", quantity="1", price="1"
            ),
            r'side LONG must be "BUY" or "SELL"',
        ),
        (
            lambda r: r.check_order("BTCUSDT", side="BUY", order_type="ICEBERG", quantity="1"),
            r"order_type ICEBERG must be one of LIMIT, MARKET",
        ),
    ],
)
def test_bad_input_names_field_value_and_rule(
    rules: pyquant.ExchangeRules, call: object, message: str
) -> None:
    with pytest.raises(InputError, match=message) as info:
        call(rules)  # type: ignore[operator]
    assert isinstance(info.value, ValueError)


def test_wrong_types_raise_type_error(rules: pyquant.ExchangeRules) -> None:
    with pytest.raises(TypeError, match="price must be a str, Decimal, int or float, found list"):
        rules.quantize_price("BTCUSDT", [1])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="found bool"):
        rules.quantize_qty("BTCUSDT", True)


def test_malformed_documents_name_symbol_and_field() -> None:
    doc = json.loads((BINANCE_DIR / "exchangeInfo_fapi_full_2025-11-26.json").read_bytes())
    btc = next(s for s in doc["symbols"] if s["symbol"] == "BTCUSDT")
    price_filter = next(f for f in btc["filters"] if f["filterType"] == "PRICE_FILTER")
    price_filter["tickSize"] = "0.1e0"
    with pytest.raises(
        InputError, match=r"PRICE_FILTER.tickSize 0.1e0 for BTCUSDT must be a plain"
    ):
        pyquant.ExchangeRules.from_exchange_info(doc)
    price_filter["tickSize"] = "0.10"
    btc["filters"] = [f for f in btc["filters"] if f["filterType"] != "LOT_SIZE"]
    with pytest.raises(
        InputError, match="LOT_SIZE missing for BTCUSDT is required in exchangeInfo"
    ):
        pyquant.ExchangeRules.from_exchange_info(doc)
    with pytest.raises(ValueError, match=r"exchangeInfo .* must be JSON"):
        pyquant.ExchangeRules.from_exchange_info(b"{not json")
    with pytest.raises(ValueError, match=r"exchangeInfo\.symbols missing must be an array"):
        pyquant.ExchangeRules.from_exchange_info({})


def test_decimals_beyond_28_places_round_in_the_asked_direction(
    rules: pyquant.ExchangeRules,
) -> None:
    # Decimal arithmetic easily yields 29+ decimals; the excess cannot flip a rounding.
    hair_above = Decimal("0.1" + "0" * 29 + "1")  # 31 decimals, kept exactly by Decimal
    assert rules.quantize_price("XRPUSDT", hair_above, rounding="up") == "0.1001"
    assert rules.quantize_price("XRPUSDT", hair_above, rounding="down") == "0.1000"
    assert rules.quantize_qty("BTCUSDT", Decimal("0.003" + "9" * 30)) == "0.003"
    with pytest.raises(InputError, match="must fit in 28 significant digits"):
        rules.quantize_price("BTCUSDT", "1" * 30)
