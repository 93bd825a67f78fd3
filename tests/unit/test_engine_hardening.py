"""ExitEngine under hostile input (issue 16): no panic, no silenced stop, no off-grid order.

Each test reproduces one defect of the adversarial review through the Python API: a
future event time, absurd numbers, adoption before any message, impossible snapshots, a
stale action of a reused position id, an unchecked confidence, off-step quantities, and
a second thread reading positions while a message is applied.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import orjson
import pytest
from worked_example import example_policy

import pyquant
from pyquant import ExitEngine, ExitPolicy, _core

T0 = 1_764_000_000_000
HUGE = "79228162514264337593543950335"  # Decimal's largest value
EXTREMES: list[Any] = [
    HUGE,
    "-" + HUGE,
    "50000000000000000000000000000",
    "1e30",
    "1e-30",
    "0.0000000000000000000000000001",
    "0",
    "-1",
    "NaN",
    "inf",
    "-inf",
    "",
    float("nan"),
    float("inf"),
    1e300,
    -1e300,
    10**40,
    -(10**40),
    2**63,
    0,
]


def mark(symbol: str, price: str, time_ms: int) -> bytes:
    return orjson.dumps(
        {"e": "markPriceUpdate", "E": time_ms, "s": symbol, "p": price, "i": price, "T": time_ms}
    )


def open_long(engine: ExitEngine, position_id: str = "p1", quantity: str = "0.010") -> None:
    engine.open_position(position_id, "BTCUSDT", "LONG", quantity, "30000.0", leverage=10)


# --- 1. event times ----------------------------------------------------------------------


def test_a_microsecond_event_time_never_silences_the_stop(engine: ExitEngine) -> None:
    open_long(engine)
    assert engine.on_mark_message(mark("BTCUSDT", "30000.0", T0)) == []
    assert engine.on_mark_message(mark("BTCUSDT", "30000.0", T0 * 1000)) == []
    assert engine.implausible_event_times == 1
    assert engine.last_event_ms == T0
    actions = engine.on_mark_message(mark("BTCUSDT", "25000.0", T0 + 60_000))
    assert [(a.reason, a.quantity) for a in actions] == [("stop_loss", "0.010")]
    # The refused time is not in the snapshot either.
    assert str(T0 * 1000) not in engine.snapshot().decode()


def test_event_times_ahead_of_the_wall_clock_are_refused(engine: ExitEngine) -> None:
    open_long(engine)
    hour_ahead = mark("BTCUSDT", "29000.0", T0 + 3_600_000)
    assert engine.on_mark_message(hour_ahead, now_ms=T0) == []
    assert (engine.implausible_event_times, engine.clock_ms) == (1, T0)
    view = engine.position("p1")
    assert view is not None
    assert view.last_mark_price is None
    # Within ten minutes of the clock: applied, the stop fires.
    actions = engine.on_mark_message(mark("BTCUSDT", "29000.0", T0 + 600_000), now_ms=T0)
    assert [a.reason for a in actions] == ["stop_loss"]
    with pytest.raises(pyquant.InputError, match="now_ms"):
        engine.on_mark_message(mark("BTCUSDT", "29000.0", T0), now_ms=-1)


def test_time_stop_is_not_fired_by_a_future_time(exchange_rules: pyquant.ExchangeRules) -> None:
    engine = ExitEngine(exchange_rules, example_policy(max_hold_ms=3_600_000))
    engine.on_mark_message(mark("BTCUSDT", "30000.0", T0))
    open_long(engine)
    assert engine.on_mark_message(mark("BTCUSDT", "30000.0", T0 * 1000)) == []
    assert engine.on_mark_message(mark("BTCUSDT", "30000.0", T0 + 1_000)) == []


# --- 2. no panic, absurd values refused with state untouched -------------------------------


def test_an_absurd_mark_changes_nothing(engine: ExitEngine) -> None:
    open_long(engine)
    engine.on_mark_message(mark("BTCUSDT", "30000.0", T0))
    before = engine.snapshot()
    for price in ["50000000000000000000000000000", HUGE, "45297640", "0.00000000000000000001"]:
        assert engine.on_mark_message(mark("BTCUSDT", price, T0 + 1)) == []
    assert engine.implausible_marks == 4
    assert engine.snapshot() == before
    view = engine.position("p1")
    assert view is not None
    assert view.best_price == "30000.0"


def test_quantize_price_beyond_the_decimal_range_is_an_input_error() -> None:
    tick_10 = {
        "symbol": "TENUSDT",
        "status": "TRADING",
        "pricePrecision": 0,
        "quantityPrecision": 0,
        "filters": [
            {"filterType": "PRICE_FILTER", "minPrice": "10", "maxPrice": "0", "tickSize": "10"},
            {"filterType": "LOT_SIZE", "minQty": "1", "maxQty": "1000", "stepSize": "1"},
        ],
    }
    rules = pyquant.ExchangeRules.from_exchange_info({"symbols": [tick_10]})
    for rounding in ["up", "nearest"]:
        with pytest.raises(pyquant.InputError, match=r"^price "):
            rules.quantize_price("TENUSDT", HUGE, rounding=rounding)
    assert rules.quantize_price("TENUSDT", HUGE, rounding="down") == "79228162514264337593543950330"


def test_open_position_with_an_absurd_entry_is_an_input_error(engine: ExitEngine) -> None:
    with pytest.raises(pyquant.InputError, match="entry_price"):
        engine.open_position("p1", "BTCUSDT", "LONG", "0.010", HUGE, leverage=10)
    assert engine.positions() == []


def _calls(engine: ExitEngine, rules: pyquant.ExchangeRules, value: Any) -> list[Callable[[], Any]]:
    """Every exported function and method with `value` in each numeric slot."""
    action = engine.pending_actions()[0]
    snapshot = engine.snapshot()
    return [
        lambda: rules.quantize_price("BTCUSDT", value, rounding="up"),
        lambda: rules.quantize_price("BTCUSDT", value, rounding="nearest"),
        lambda: rules.quantize_price("BTCUSDT", value),
        lambda: rules.quantize_qty("BTCUSDT", value),
        lambda: rules.quantize_qty("BTCUSDT", value, market=False),
        lambda: rules.check_order(
            "BTCUSDT", side="BUY", order_type="LIMIT", quantity=value, price=value
        ),
        lambda: rules.check_order(
            "BTCUSDT",
            side="SELL",
            order_type="MARKET",
            quantity=value,
            mark_price=value,
            best_price=value,
        ),
        lambda: rules.check_order(
            "BTCUSDT", side="SELL", order_type="STOP_MARKET", quantity="1", stop_price=value
        ),
        lambda: pyquant.atr([value] * 3, [value] * 3, [value] * 3, 2),
        lambda: engine.warm_up("ETHUSDT", [value] * 3, [value] * 3, [value] * 3),
        lambda: engine.open_position("x", "BTCUSDT", "SHORT", value, "30000", leverage=10),
        lambda: engine.open_position("x", "BTCUSDT", "SHORT", "0.010", value, leverage=10),
        lambda: engine.open_position(
            "x", "BTCUSDT", "SHORT", "0.010", "30000", leverage=10, liquidation_price=value
        ),
        lambda: engine.open_position("x", "BTCUSDT", "SHORT", "0.01", "30000", confidence=value),
        lambda: engine.open_position("x", "BTCUSDT", "SHORT", "0.01", "30000", opened_at_ms=value),
        lambda: engine.adopt_position("y", "ETHUSDT", "LONG", "1", "2000", mark_price=value),
        lambda: engine.adopt_position("y", "ETHUSDT", "LONG", "1", "2000", best_price=value),
        lambda: engine.adopt_position("y", "ETHUSDT", "LONG", "1", "2000", original_quantity=value),
        lambda: engine.adopt_position("y", "ETHUSDT", "LONG", value, value, leverage=value),
        lambda: engine.on_mark_message(mark("BTCUSDT", str(value), T0 + 5)),
        lambda: engine.on_mark_message(
            orjson.dumps({"e": "markPriceUpdate", "E": value, "s": "BTCUSDT", "p": "1"})
        ),
        lambda: engine.on_mark_message(mark("BTCUSDT", "30000", T0 + 6), now_ms=value),
        lambda: engine.confirm(action, filled_quantity=value),
        lambda: engine.confirm_sequence("p1", value, value),
        lambda: engine.reject_sequence("p1", value, generation=value),
        lambda: engine.resize_position("p1", value),
        lambda: engine.set_liquidation_price("p1", value),
        lambda: engine.set_clock(value),
        lambda: engine.plan_entry("BTCUSDT", "LONG", value, leverage=10),
        lambda: engine.plan_entry("BTCUSDT", "LONG", "30000", confidence=value),
        lambda: engine.plan_entry("BTCUSDT", "SHORT", "30000", liquidation_price=value),
        lambda: ExitEngine.restore(
            snapshot.replace(b'"0.010"', json.dumps(str(value)).encode()), rules
        ),
        lambda: ExitPolicy(stop_atr=value),
        lambda: ExitPolicy(ladder=[(value, value)]),
        lambda: ExitPolicy(max_hold_ms=value),
        lambda: _core.backtest_replay_marks(
            rules, example_policy(), "BTCUSDT", "LONG", "0.010", "30000.0", [T0], [str(value)]
        ),
        lambda: _core.backtest_replay_marks(
            rules, example_policy(), "BTCUSDT", "LONG", str(value), str(value), [T0], ["30000"]
        ),
    ]


@pytest.mark.parametrize("value", EXTREMES, ids=repr)
def test_no_panic_crosses_the_boundary(
    exchange_rules: pyquant.ExchangeRules, engine: ExitEngine, value: Any
) -> None:
    """Extreme values in every numeric slot: a typed error or a result, never a panic."""
    open_long(engine, "p1")
    engine.on_mark_message(mark("BTCUSDT", "30125.0", T0))  # TP1 pending
    allowed = (pyquant.PyquantError, ValueError, TypeError, KeyError, OverflowError)
    failures: list[str] = []
    for index, call in enumerate(_calls(engine, exchange_rules, value)):
        try:
            call()
        except BaseException as exc:  # a panic is a BaseException (PanicException)
            if not isinstance(exc, allowed) or type(exc).__name__ == "PanicException":
                failures.append(f"call {index} with {value!r}: {type(exc).__name__} {exc}")
    assert failures == []


# --- 3. adoption before any message -------------------------------------------------------


def test_adopt_evaluates_its_mark_at_once(engine: ExitEngine) -> None:
    actions = engine.adopt_position(
        "a1", "BTCUSDT", "LONG", "0.010", "30000.0", leverage=10, mark_price="29000.0"
    )
    assert [(a.reason, a.quantity) for a in actions] == [("stop_loss", "0.010")]
    actions = engine.adopt_position(
        "a2",
        "BTCUSDT",
        "SHORT",
        "0.010",
        "30000.0",
        leverage=50,
        opened_at_ms=T0,
        mark_price="30010.0",
    )
    assert [(a.reason, a.event_time_ms) for a in actions] == [("over_leverage", T0)]


# --- 4. restore validation ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "bad", "field"),
    [
        ("levels_passed_at_adoption", 9, "levels_passed_at_adoption"),
        ("ladder_targets", [], "ladder_targets"),
        ("stop_price", "1e5", "stop_price"),
        ("quantity", "-1", "quantity"),
        ("quantity", "0.0105", "quantity"),
        ("levels_done", 4, "levels_done"),
        ("confidence", 7.0, "confidence"),
        ("entry_price", HUGE, "entry_price"),
        ("sequence", 2**64 - 1, "sequence"),
    ],
)
def test_restore_refuses_an_impossible_position_by_name(
    exchange_rules: pyquant.ExchangeRules, engine: ExitEngine, key: str, bad: Any, field: str
) -> None:
    open_long(engine)
    doc = json.loads(engine.snapshot())
    doc["symbols"][0][1]["long"][key] = bad
    with pytest.raises(pyquant.InputError, match=rf"position\[p1\]\.{field}"):
        ExitEngine.restore(json.dumps(doc).encode(), exchange_rules)


# --- 5. stale action of a reused id -------------------------------------------------------


def test_a_stale_action_does_not_confirm_a_new_position_with_the_same_id(
    engine: ExitEngine,
) -> None:
    open_long(engine, "p")
    (old,) = engine.on_mark_message(mark("BTCUSDT", "29000.0", T0))
    assert engine.confirm(old) is True
    open_long(engine, "p")
    (fresh,) = engine.on_mark_message(mark("BTCUSDT", "29000.0", T0 + 1))
    assert (fresh.sequence, fresh.generation) == (old.sequence, old.generation + 1)
    with pytest.raises(pyquant.InputError, match="generation"):
        engine.confirm(old)
    with pytest.raises(pyquant.InputError, match="generation"):
        engine.reject(old)
    assert engine.position("p") is not None, "the new position is still tracked"
    assert fresh.to_dict()["generation"] == fresh.generation
    assert engine.confirm(fresh) is True


# --- 6. plan_entry confidence -------------------------------------------------------------


@pytest.mark.parametrize("confidence", [7.0, -3.0, float("nan")])
def test_plan_entry_checks_confidence(engine: ExitEngine, confidence: float) -> None:
    with pytest.raises(pyquant.InputError, match=r"^confidence "):
        engine.plan_entry("BTCUSDT", "LONG", "30000", leverage=10, confidence=confidence)


# --- 7. off-step quantities ---------------------------------------------------------------


def test_off_step_quantities_are_refused(engine: ExitEngine) -> None:
    with pytest.raises(pyquant.InputError, match=r"MARKET_LOT_SIZE step 0\.001"):
        open_long(engine, "p1", quantity="0.0105")
    open_long(engine, "p1")
    (action,) = engine.on_mark_message(mark("BTCUSDT", "30125.0", T0))
    with pytest.raises(pyquant.InputError, match="filled_quantity"):
        engine.confirm(action, filled_quantity="0.0015")
    view = engine.position("p1")
    assert view is not None
    assert view.pending_sequence == action.sequence


# --- threads ------------------------------------------------------------------------------


def test_positions_from_another_thread_during_on_mark_message(
    exchange_rules: pyquant.ExchangeRules,
) -> None:
    """The GIL is released only while parsing, before the engine is borrowed."""
    engine = ExitEngine(exchange_rules, example_policy())
    open_long(engine)
    # Each symbol at ten times its minPrice: inside its plausible band, so applied.
    symbols = exchange_rules.symbols()
    prices = {
        s: str(Decimal(exchange_rules.symbol_info(s)["min_price"]) * 10 or 1) for s in symbols
    }
    big = orjson.dumps(
        [
            {"e": "markPriceUpdate", "E": T0 + k, "s": s, "p": prices[s], "i": "0", "T": 0}
            for k in range(10)
            for s in symbols
        ]
    )
    errors: list[BaseException] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            try:
                engine.positions()
                engine.snapshot()
            except BaseException as exc:
                errors.append(exc)
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(200):
            engine.on_mark_message(big)
    finally:
        done.set()
        thread.join(timeout=60)
    assert errors == []


# --- extreme exchange filters -------------------------------------------------------------

FILTER_EXTREMES = ["0", "0.0000000000000000000000000001", "1", "1000000000000000"]


def test_extreme_exchange_filters_are_refused_or_survive(
    exchange_rules: pyquant.ExchangeRules,
) -> None:
    """Filters up to 1e15 (the parse bound) never make the engine's arithmetic panic."""
    failures: list[str] = []
    for tick, min_price, step, min_qty in itertools.product(FILTER_EXTREMES, repeat=4):
        symbol = {
            "symbol": "XUSDT",
            "status": "TRADING",
            "pricePrecision": 8,
            "quantityPrecision": 8,
            "filters": [
                {
                    "filterType": "PRICE_FILTER",
                    "minPrice": min_price,
                    "maxPrice": "0",
                    "tickSize": tick,
                },
                {"filterType": "LOT_SIZE", "minQty": min_qty, "maxQty": "0", "stepSize": step},
                {"filterType": "MIN_NOTIONAL", "notional": "5"},
            ],
        }
        rules = pyquant.ExchangeRules.from_exchange_info({"symbols": [symbol]})
        engine = ExitEngine(rules, example_policy())
        for k, (quantity, entry, price) in enumerate(
            itertools.product(["1", "1000000000000"], ["1", "1000000000000000"], ["1", "999999"])
        ):
            try:
                engine.open_position("p", "XUSDT", "LONG", quantity, entry, leverage=5)
                for action in engine.on_mark_message(mark("XUSDT", price, T0 + k)):
                    engine.confirm(action)
                engine.plan_entry("XUSDT", "SHORT", entry)
                rules.quantize_price("XUSDT", price, rounding="up")
            except pyquant.PyquantError:
                pass
            except BaseException as exc:  # a panic is a BaseException (PanicException)
                failures.append(f"{symbol['filters']} {quantity} {entry} {price}: {exc!r}")
            if engine.position("p") is not None:
                engine.close_position("p")
    with pytest.raises(pyquant.InputError, match=r"PRICE_FILTER\.tickSize .* must be at most 1e15"):
        pyquant.ExchangeRules.from_exchange_info(
            {"symbols": [{**symbol, "filters": [{**symbol["filters"][0], "tickSize": HUGE}]}]}
        )
    assert failures == []
