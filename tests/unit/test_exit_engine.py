"""ExitEngine bindings: real-shaped mark-price messages in, exact exit actions out.

The worked example of docs/exit-rules.md runs verbatim through ``on_mark_message``.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import orjson
import pytest
from worked_example import example_policy

import pyquant
from pyquant import ExitAction, ExitEngine, ExitPolicy

T0 = 1_764_000_000_000  # a minute boundary, ms


def mark(symbol: str, price: str, time_ms: int) -> dict[str, Any]:
    """One markPriceUpdate as Binance sends it (8-decimal strings, extra keys)."""
    return {
        "e": "markPriceUpdate",
        "E": time_ms,
        "s": symbol,
        "p": f"{Decimal(price):.8f}",
        "i": f"{Decimal(price):.8f}",
        "P": f"{Decimal(price):.8f}",
        "r": "0.00010000",
        "T": time_ms + 3_600_000,
    }


def single(symbol: str, price: str, time_ms: int) -> bytes:
    return orjson.dumps(mark(symbol, price, time_ms))


def array(prices: dict[str, str], time_ms: int) -> bytes:
    return orjson.dumps([mark(s, p, time_ms) for s, p in prices.items()])


def combined(symbol: str, price: str, time_ms: int) -> bytes:
    data = mark(symbol, price, time_ms)
    return orjson.dumps({"stream": f"{symbol.lower()}@markPrice@1s", "data": data})


def open_long(
    engine: ExitEngine, position_id: str = "p1", side: str = "LONG", entry: str = "30000.0"
) -> None:
    engine.open_position(position_id, "BTCUSDT", side, "0.010", entry, leverage=10)


def only(actions: list[ExitAction]) -> ExitAction:
    assert len(actions) == 1, actions
    return actions[0]


def test_worked_example_initial_state(engine: ExitEngine) -> None:
    open_long(engine)
    (view,) = engine.positions()
    assert view.stop_price == "29880.0"
    assert view.r_distance == "120"
    assert view.take_profit_prices == ["30120.0", "30240.0", "30360.0"]
    assert view.next_take_profit == "30120.0"
    assert view.stop_reason == "stop_loss"
    assert (view.quantity, view.original_quantity) == ("0.010", "0.010")
    assert view.atr == 60.0


def test_worked_example_jump_closes_with_one_action(engine: ExitEngine) -> None:
    open_long(engine)
    tp1 = only(engine.on_mark_message(single("BTCUSDT", "30125.0", T0)))
    assert (tp1.reason, tp1.side, tp1.quantity, tp1.position_side) == (
        "take_profit_1",
        "SELL",
        "0.003",
        "LONG",
    )
    assert (tp1.trigger_price, tp1.mark_price, tp1.sequence) == ("30120.0", "30125.0", 1)
    assert (tp1.position_id, tp1.event_time_ms, tp1.is_full_close) == ("p1", T0, False)
    assert engine.confirm(tp1) is False
    view = engine.position("p1")
    assert view is not None
    assert (view.stop_price, view.stop_reason) == ("30030.0", "breakeven_stop")
    assert engine.on_mark_message(single("BTCUSDT", "30130.0", T0 + 1000)) == []
    tp3 = only(engine.on_mark_message(combined("BTCUSDT", "30370.0", T0 + 2000)))
    assert (tp3.reason, tp3.quantity, tp3.sequence, tp3.is_full_close) == (
        "take_profit_3",
        "0.007",
        2,
        True,
    )
    assert engine.confirm(tp3) is True
    assert engine.positions() == []


def test_worked_example_ratchet_stop(engine: ExitEngine) -> None:
    open_long(engine)
    engine.confirm(only(engine.on_mark_message(single("BTCUSDT", "30125.0", T0))))
    tp2 = only(engine.on_mark_message(single("BTCUSDT", "30250.0", T0 + 1000)))
    assert (tp2.reason, tp2.quantity) == ("take_profit_2", "0.003")
    engine.confirm(tp2)
    view = engine.position("p1")
    assert view is not None
    assert (view.stop_price, view.stop_reason, view.ladder_levels_done) == (
        "30120.0",
        "ratchet_stop",
        2,
    )
    stop = only(engine.on_mark_message(single("BTCUSDT", "29990.0", T0 + 2000)))
    assert (stop.reason, stop.side, stop.quantity, stop.trigger_price, stop.mark_price) == (
        "ratchet_stop",
        "SELL",
        "0.004",
        "30120.0",
        "29990.0",
    )
    assert stop.is_full_close


def test_short_mirrors_every_rule(engine: ExitEngine) -> None:
    open_long(engine, "s1", "SHORT")
    view = engine.position("s1")
    assert view is not None
    assert (view.stop_price, view.take_profit_prices) == (
        "30120.0",
        ["29880.0", "29760.0", "29640.0"],
    )
    tp1 = only(engine.on_mark_message(single("BTCUSDT", "29875.0", T0)))
    assert (tp1.side, tp1.quantity, tp1.reason, tp1.position_side) == (
        "BUY",
        "0.003",
        "take_profit_1",
        "SHORT",
    )
    engine.confirm(tp1)
    tp2 = only(engine.on_mark_message(single("BTCUSDT", "29750.0", T0 + 1000)))
    engine.confirm(tp2)
    stop = only(engine.on_mark_message(single("BTCUSDT", "30010.0", T0 + 2000)))
    assert (stop.reason, stop.side, stop.quantity, stop.trigger_price) == (
        "ratchet_stop",
        "BUY",
        "0.004",
        "29880.0",
    )


def test_pending_action_is_never_emitted_twice(engine: ExitEngine) -> None:
    open_long(engine)
    first = only(engine.on_mark_message(single("BTCUSDT", "29000.0", T0)))
    assert first.reason == "stop_loss"
    for i in range(1, 5):
        assert engine.on_mark_message(single("BTCUSDT", "28000.0", T0 + i * 1000)) == []
    assert engine.pending_actions() == [first]
    view = engine.position("p1")
    assert view is not None
    assert (view.pending_action, view.pending_sequence) == (True, 1)


def test_reject_rearms_with_a_new_sequence(engine: ExitEngine) -> None:
    open_long(engine)
    first = only(engine.on_mark_message(single("BTCUSDT", "30125.0", T0)))
    engine.reject(first)
    with pytest.raises(pyquant.InputError, match="no pending action"):
        engine.reject(first)
    again = only(engine.on_mark_message(single("BTCUSDT", "30125.0", T0 + 1000)))
    assert (again.reason, again.quantity, again.sequence) == ("take_profit_1", "0.003", 2)
    with pytest.raises(pyquant.InputError, match="pending"):
        engine.confirm(first)


def test_partial_fill_confirms_only_the_filled_part(engine: ExitEngine) -> None:
    open_long(engine)
    tp1 = only(engine.on_mark_message(single("BTCUSDT", "30125.0", T0)))
    assert engine.confirm(tp1, filled_quantity=Decimal("0.001")) is False
    view = engine.position("p1")
    assert view is not None
    assert (view.quantity, view.ladder_levels_done, view.pending_action) == ("0.009", 0, False)
    rest = only(engine.on_mark_message(single("BTCUSDT", "30125.0", T0 + 1000)))
    assert (rest.reason, rest.quantity) == ("take_profit_1", "0.002")
    with pytest.raises(pyquant.InputError, match="filled_quantity"):
        engine.confirm(rest, filled_quantity="0.005")


def test_dust_remainder_merges_into_a_full_close(exchange_rules: pyquant.ExchangeRules) -> None:
    engine = ExitEngine(exchange_rules, example_policy())
    engine.warm_up("BTCUSDT", [30030.0] * 20, [29970.0] * 20, [30000.0] * 20)
    # TP1 of 0.004 is 0.001 and would leave 0.003 x 30120 = 90.36 < MIN_NOTIONAL 100.
    engine.open_position("d1", "BTCUSDT", "LONG", "0.004", "30000.0", leverage=10)
    action = only(engine.on_mark_message(single("BTCUSDT", "30120.0", T0)))
    assert (action.reason, action.quantity, action.is_full_close) == (
        "take_profit_1",
        "0.004",
        True,
    )
    # 0.002: TP1 floors to zero: the level is done with no order (exit-rules.md); the
    # position keeps its size and the level's breakeven applies.
    engine.open_position("d2", "BTCUSDT", "SHORT", "0.002", "30000.0", leverage=10)
    assert engine.on_mark_message(single("BTCUSDT", "29880.0", T0 + 1000)) == []
    view = engine.position("d2")
    assert view is not None
    assert (view.quantity, view.ladder_levels_done, view.sequence) == ("0.002", 1, 0)
    assert (view.stop_price, view.stop_reason) == ("29970.0", "breakeven_stop")
    # TP2 would leave 0.001 x 29760 < MIN_NOTIONAL: the whole 0.002 goes.
    action = only(engine.on_mark_message(single("BTCUSDT", "29760.0", T0 + 2000)))
    assert (action.reason, action.quantity, action.is_full_close) == (
        "take_profit_2",
        "0.002",
        True,
    )


def test_adoption_fires_passed_levels_at_once(engine: ExitEngine) -> None:
    engine.on_mark_message(single("BTCUSDT", "30100.0", T0))
    actions = engine.adopt_position(
        "a1",
        "BTCUSDT",
        "LONG",
        "0.007",
        "30000.0",
        leverage=10,
        original_quantity="0.010",
        best_price="30250.0",
    )
    action = only(actions)
    assert (action.reason, action.quantity, action.mark_price) == (
        "take_profit_2",
        "0.003",
        "30100.0",
    )
    view = engine.position("a1")
    assert view is not None
    assert (view.ladder_levels_done, view.stop_reason, view.original_quantity) == (
        1,
        "breakeven_stop",
        "0.010",
    )


def test_adopted_over_leveraged_position_is_closed(engine: ExitEngine) -> None:
    engine.on_mark_message(single("BTCUSDT", "30010.0", T0))
    plan = engine.plan_entry("BTCUSDT", "LONG", "30000", leverage=50)
    assert plan.over_leveraged
    action = only(engine.adopt_position("x1", "BTCUSDT", "LONG", "0.010", "30000.0", leverage=50))
    assert (action.reason, action.quantity, action.is_full_close) == (
        "over_leverage",
        "0.010",
        True,
    )
    assert (action.trigger_price, action.mark_price, action.event_time_ms) == (
        "30010.0",
        "30010.0",
        T0,
    )


def test_time_stop_on_event_time(exchange_rules: pyquant.ExchangeRules) -> None:
    engine = ExitEngine(exchange_rules, ExitPolicy.preset("challenge"))
    engine.on_mark_message(array({"ETHUSDT": "3000.00"}, T0))
    engine.open_position("t1", "ETHUSDT", "LONG", "1.000", "3000.00", leverage=5)
    view = engine.position("t1")
    assert view is not None
    assert view.opened_at_ms == T0  # the latest event time seen
    assert engine.on_mark_message(array({"ETHUSDT": "3001.00"}, T0 + 7_199_999)) == []
    action = only(engine.on_mark_message(array({"ETHUSDT": "3001.00"}, T0 + 7_200_000)))
    assert (action.reason, action.quantity, action.side) == ("time_stop", "1.000", "SELL")


def test_array_with_unknown_symbols_and_both_sides(engine: ExitEngine) -> None:
    open_long(engine, "long")
    open_long(engine, "short", "SHORT")
    message = array({"NOTREALUSDT": "1.0", "ETHUSDT": "3000.00", "BTCUSDT": "29870.0"}, T0)
    actions = engine.on_mark_message(message)
    assert [(a.position_id, a.reason) for a in actions] == [
        ("long", "stop_loss"),
        ("short", "take_profit_1"),
    ]


def test_malformed_message_raises_and_changes_nothing(engine: ExitEngine) -> None:
    open_long(engine)
    before = engine.snapshot()
    good = mark("BTCUSDT", "29000.0", T0)
    bad = dict(mark("ETHUSDT", "3000.0", T0), p="3e3")
    for payload in (orjson.dumps([good, bad]), b"[{", b'{"e":"markPriceUpdate"}', b""):
        with pytest.raises(pyquant.MessageError):
            engine.on_mark_message(payload)
    assert issubclass(pyquant.MessageError, ValueError)
    assert engine.snapshot() == before


def test_snapshot_restore_continues_identically(
    engine: ExitEngine, exchange_rules: pyquant.ExchangeRules
) -> None:
    open_long(engine, "p1")
    open_long(engine, "p2", "SHORT", entry="30200.0")
    engine.confirm(only(engine.on_mark_message(single("BTCUSDT", "30125.0", T0))))
    pending = engine.on_mark_message(single("BTCUSDT", "30070.0", T0 + 1000))
    assert [a.position_id for a in pending] == ["p2"]
    restored = ExitEngine.restore(engine.snapshot(), exchange_rules)
    assert restored.pending_actions() == pending
    assert restored.snapshot() == engine.snapshot()
    prices = ["29900.0", "30130.0", "30250.0", "30370.0", "30000.0", "29000.0"]
    for i, price in enumerate(prices):
        time_ms = T0 + (i + 2) * 61_000
        a = engine.on_mark_message(single("BTCUSDT", price, time_ms))
        b = restored.on_mark_message(single("BTCUSDT", price, time_ms))
        assert a == b
        for x, y in zip(a, b, strict=True):
            engine.confirm(x)
            restored.confirm(y)
        for x, y in zip(engine.pending_actions(), restored.pending_actions(), strict=True):
            engine.reject(x)
            restored.reject(y)
    assert restored.snapshot() == engine.snapshot()


def test_restore_refuses_other_versions_and_garbage(
    engine: ExitEngine, exchange_rules: pyquant.ExchangeRules
) -> None:
    data = engine.snapshot()
    newer = data.replace(b'"version":1', b'"version":99', 1)
    with pytest.raises(ValueError, match="version 99 is not supported"):
        ExitEngine.restore(newer, exchange_rules)
    with pytest.raises(ValueError, match="not a pyquant exit-engine snapshot"):
        ExitEngine.restore(b"\x00garbage", exchange_rules)


def test_position_changes(engine: ExitEngine, exchange_rules: pyquant.ExchangeRules) -> None:
    open_long(engine)
    with pytest.raises(pyquant.InputError, match="already"):
        open_long(engine)
    with pytest.raises(pyquant.InputError, match="already has an open position p1"):
        open_long(engine, "p9")
    with pytest.raises(pyquant.UnknownSymbolError):
        engine.open_position("u1", "NOTREALUSDT", "LONG", "1", "1")
    with pytest.raises(pyquant.InputError, match="position_side"):
        engine.open_position("u2", "BTCUSDT", "BOTH", "1", "1")
    assert engine.resize_position("p1", "0.008") is False
    view = engine.position("p1")
    assert view is not None
    assert (view.quantity, view.original_quantity) == ("0.008", "0.010")
    engine.set_liquidation_price("p1", Decimal("29600"))
    view = engine.position("p1")
    assert view is not None
    assert (view.stop_price, view.liquidation_price) == ("29900.0", "29600.0")
    engine.update_rules(exchange_rules)
    engine.close_position("p1")
    assert engine.position("p1") is None
    with pytest.raises(pyquant.InputError, match="not an open position"):
        engine.close_position("p1")


def test_plan_entry_gives_exact_strings(engine: ExitEngine) -> None:
    plan = engine.plan_entry("BTCUSDT", "SHORT", 30000, leverage=10)
    assert (plan.stop_price, plan.stop_distance, plan.over_leveraged) == ("30120.0", "120", False)
    assert plan.take_profit_prices == ["29880.0", "29760.0", "29640.0"]
    assert plan.atr == 60.0


def test_action_repr_and_dict(engine: ExitEngine) -> None:
    open_long(engine)
    action = only(engine.on_mark_message(single("BTCUSDT", "30125.0", T0)))
    assert "take_profit_1" in repr(action)
    assert action.to_dict()["quantity"] == "0.003"
    assert hash(action) == hash(engine.pending_actions()[0])
    assert repr(engine) == f"ExitEngine(positions=1, last_event_ms={T0})"


def test_warm_up_takes_numpy_polars_and_lists(exchange_rules: pyquant.ExchangeRules) -> None:
    import numpy as np
    import polars as pl

    high = np.full(20, 30030.0)
    low = np.full(20, 29970.0)
    close = np.full(20, 30000.0)
    for h, lo, c in [
        (high, low, close),
        (pl.Series(high), pl.Series(low), pl.Series(close)),
        (high.tolist(), low.tolist(), close.tolist()),
    ]:
        engine = ExitEngine(exchange_rules, example_policy())
        engine.warm_up("BTCUSDT", h, lo, c)
        assert engine.atr("BTCUSDT") == 60.0
    engine = ExitEngine(exchange_rules, example_policy())
    with pytest.raises(pyquant.InputError, match="as many values"):
        engine.warm_up("BTCUSDT", high, low, close[:5])
    with pytest.raises(pyquant.InputError, match="high >= low"):
        engine.warm_up("BTCUSDT", low, high, close)
    with pytest.raises(pyquant.UnknownSymbolError):
        engine.warm_up("NOTREALUSDT", high, low, close)


def test_warm_up_close_mark_ignores_replayed_bars(exchange_rules: pyquant.ExchangeRules) -> None:
    engine = ExitEngine(exchange_rules, example_policy())
    last_open = T0 - 60_000
    engine.warm_up(
        "BTCUSDT", [30030.0] * 20, [29970.0] * 20, [30000.0] * 20, last_open_time_ms=last_open
    )
    # Updates of the last warm-up bar are already accounted for: they change no bar.
    engine.on_mark_message(single("BTCUSDT", "35000.0", last_open + 30_000))
    engine.on_mark_message(single("BTCUSDT", "30000.0", T0 + 500))
    engine.on_mark_message(single("BTCUSDT", "30000.0", T0 + 60_500))
    atr = engine.atr("BTCUSDT")
    assert atr is not None
    assert atr < 60.0  # one quiet bar (range 0) was averaged in, not the 35000 spike


def test_text_frames_are_accepted(engine: ExitEngine) -> None:
    open_long(engine)
    action = only(engine.on_mark_message(single("BTCUSDT", "30125.0", T0).decode()))
    assert action.reason == "take_profit_1"
    with pytest.raises(TypeError, match="bytes or str"):
        engine.on_mark_message(123)  # type: ignore[arg-type]


def test_view_prices_use_the_tick_decimals(engine: ExitEngine) -> None:
    engine.open_position("v1", "BTCUSDT", "LONG", "0.010", 30000, leverage=10)
    view = engine.position("v1")
    assert view is not None
    assert (view.entry_price, view.best_price, view.stop_price) == ("30000.0", "30000.0", "29880.0")
    assert "v1 BTCUSDT LONG" in repr(view)
    plan = engine.plan_entry("BTCUSDT", "LONG", "30000.05", leverage=10)
    assert plan.entry_price == "30000.05"  # off the tick grid: shown exactly, not rounded


@pytest.mark.parametrize("ascii_only", [True, False])
def test_a_symbol_with_a_non_ascii_name_gets_its_exits(
    exchange_rules: pyquant.ExchangeRules, ascii_only: bool
) -> None:
    # Binance lists such symbols; JSON may carry them escaped (\\u5e01...) or as UTF-8.
    symbol = "币安人生USDT"
    engine = ExitEngine(exchange_rules, ExitPolicy(fallback_stop_pct=0.02, max_stop_pct=0.05))
    engine.open_position("u1", symbol, "LONG", "1000", "0.1000", leverage=1)
    data = json.dumps(mark(symbol, "0.0970", T0), ensure_ascii=ascii_only).encode()
    assert (b"\\u" in data) is ascii_only
    action = only(engine.on_mark_message(data))
    assert (action.symbol, action.reason, action.quantity) == (symbol, "stop_loss", "1000")
