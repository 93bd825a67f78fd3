"""Exit engine properties over random policies, positions and mark paths (hypothesis).

- a stop never loosens, whichever rule moved it;
- no action closes more than is open, and the ladder never closes more than the original size;
- every quantity and price string is exact on its grid;
- a snapshot restored mid-path emits exactly the actions of the uninterrupted engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import pyquant
from pyquant import ExitAction, ExitEngine, ExitPolicy

# Real symbols across the price range: tick 0.10 / step 0.001, tick 0.01, and a sub-cent one.
SYMBOLS = {"BTCUSDT": "30000.0", "ETHUSDT": "2000.00", "DOGEUSDT": "0.100000"}
T0 = 1_764_000_000_000


@st.composite
def policies(draw: st.DrawFn) -> ExitPolicy:
    levels = draw(st.integers(min_value=0, max_value=4))
    ats = sorted(
        draw(
            st.sets(
                st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0, 4.0]), min_size=levels, max_size=levels
            )
        )
    )
    fractions = draw(
        st.lists(st.sampled_from([0.1, 0.2, 0.25, 0.3, 0.4, 0.5]), min_size=levels, max_size=levels)
    )
    ladder: list[tuple[float, float]] = []
    total = Decimal(0)
    for at, fraction in zip(ats, fractions, strict=True):
        if total + Decimal(str(fraction)) > 1:
            break
        total += Decimal(str(fraction))
        ladder.append((at, fraction))
    if bool(ladder) and draw(st.booleans()):
        # Let the last level close the exact remainder.
        at, fraction = ladder[-1]
        ladder[-1] = (at, float(Decimal(str(fraction)) + 1 - total))
    fields: dict[str, Any] = {
        "stop_atr": draw(st.sampled_from([None, 1.0, 2.0, 3.0])),
        "min_stop_pct": 0.002,
        "max_stop_pct": 0.05,
        "max_margin_loss": draw(st.sampled_from([None, 0.1, 0.3])),
        "ladder": ladder,
        "ratchet_to_previous_level": draw(st.booleans()),
    }
    if bool(ladder) and draw(st.booleans()):
        fields["breakeven_after_level"] = 1
    trail = draw(st.sampled_from(["none", "atr", "pct"]))
    if trail == "atr":
        fields["trail_atr"] = draw(st.sampled_from([1.0, 2.0]))
    elif trail == "pct":
        fields["trail_pct"] = draw(st.sampled_from([0.005, 0.015]))
    if trail != "none":
        fields["trail_activate_r"] = draw(st.sampled_from([None, 1.0, 2.0]))
    if draw(st.booleans()):
        fields["max_hold_ms"] = draw(st.sampled_from([30_000, 120_000]))
    return ExitPolicy(**fields)


@dataclass
class Scenario:
    policy: ExitPolicy
    symbol: str
    side: str
    quantity_steps: int
    leverage: int
    moves: list[int]  # per-step move in basis points
    decisions: list[int]  # 0 confirm, 1 reject, 2 half fill
    restore_at: int


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    length = draw(st.integers(min_value=5, max_value=40))
    return Scenario(
        policy=draw(policies()),
        symbol=draw(st.sampled_from(sorted(SYMBOLS))),
        side=draw(st.sampled_from(["LONG", "SHORT"])),
        quantity_steps=draw(st.integers(min_value=1, max_value=5_000)),
        leverage=draw(st.integers(min_value=1, max_value=20)),
        moves=draw(
            st.lists(st.integers(min_value=-150, max_value=150), min_size=length, max_size=length)
        ),
        decisions=draw(
            st.lists(st.integers(min_value=0, max_value=2), min_size=length, max_size=length)
        ),
        restore_at=draw(st.integers(min_value=0, max_value=length - 1)),
    )


def message(symbol: str, price: Decimal, time_ms: int) -> bytes:
    return orjson.dumps({"e": "markPriceUpdate", "E": time_ms, "s": symbol, "p": str(price)})


def on_grid(rules: pyquant.ExchangeRules, symbol: str, price: str) -> bool:
    return rules.quantize_price(symbol, price, "down") == price


def qty_on_grid(rules: pyquant.ExchangeRules, symbol: str, qty: str) -> bool:
    return rules.quantize_qty(symbol, qty, market=True) == qty


def decide(
    engine: ExitEngine, action: ExitAction, decision: int, rules: pyquant.ExchangeRules
) -> Decimal:
    """Apply a decision; return the quantity confirmed."""
    if decision == 1:
        engine.reject(action)
        return Decimal(0)
    filled = Decimal(action.quantity)
    if decision == 2:
        filled = Decimal(rules.quantize_qty(action.symbol, filled / 2, market=True))
    engine.confirm(action, filled_quantity=filled)
    return filled


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=scenarios())
def test_exit_invariants_and_restore(
    scenario: Scenario, exchange_rules: pyquant.ExchangeRules
) -> None:
    rules = exchange_rules
    symbol = scenario.symbol
    entry = Decimal(SYMBOLS[symbol])
    engine = ExitEngine(rules, scenario.policy)
    base = float(entry)
    engine.warm_up(symbol, [base * 1.002] * 20, [base * 0.998] * 20, [base] * 20)
    # The MARKET_LOT_SIZE step times the drawn count.
    unit = {"BTCUSDT": Decimal("0.001"), "ETHUSDT": Decimal("0.001"), "DOGEUSDT": Decimal("1")}
    quantity = unit[symbol] * scenario.quantity_steps
    engine.open_position("p", symbol, scenario.side, quantity, entry, leverage=scenario.leverage)
    long = scenario.side == "LONG"
    price = entry
    live = quantity
    ladder_closed = Decimal(0)
    last_stop: Decimal | None = None
    shadow: ExitEngine | None = None
    shadow_actions: list[list[ExitAction]] = []
    own_actions: list[list[ExitAction]] = []
    ticks = {"BTCUSDT": Decimal("0.1"), "ETHUSDT": Decimal("0.01"), "DOGEUSDT": Decimal("0.00001")}
    tick = ticks[symbol]
    for i, (move, decision) in enumerate(zip(scenario.moves, scenario.decisions, strict=True)):
        if i == scenario.restore_at:
            shadow = ExitEngine.restore(engine.snapshot(), rules)
        price = max(tick, (price * (1 + Decimal(move) / 10_000)).quantize(tick))
        time_ms = T0 + i * 20_000
        actions = engine.on_mark_message(message(symbol, price, time_ms))
        own_actions.append(actions)
        if shadow is not None:
            shadow_actions.append(shadow.on_mark_message(message(symbol, price, time_ms)))
        view = engine.position("p")
        if view is not None:
            stop = Decimal(view.stop_price)
            assert on_grid(rules, symbol, view.stop_price)
            if last_stop is not None:
                assert (stop >= last_stop) if long else (stop <= last_stop), "stop loosened"
            last_stop = stop
        for action in actions:
            event(action.reason)
            assert qty_on_grid(rules, symbol, action.quantity), action
            assert Decimal(action.quantity) <= live, "closes more than is open"
            if action.reason not in ("time_stop", "over_leverage"):
                assert on_grid(rules, symbol, action.trigger_price), action
            filled = decide(engine, action, decision, rules)
            if shadow is not None:
                decide(shadow, action, decision, rules)
            live -= filled
            if action.reason.startswith("take_profit"):
                ladder_closed += filled
                assert ladder_closed <= quantity, "ladder closed more than the original size"
        if engine.position("p") is None:
            break
    if shadow is not None:
        tail = own_actions[scenario.restore_at :]
        assert shadow_actions == tail
        assert shadow.snapshot() == engine.snapshot()


@pytest.mark.parametrize("symbol", sorted(SYMBOLS))
def test_plan_entry_strings_are_on_grid(symbol: str, exchange_rules: pyquant.ExchangeRules) -> None:
    engine = ExitEngine(exchange_rules, ExitPolicy.preset("standard"))
    for leverage in (1, 5, 20):
        for side in ("LONG", "SHORT"):
            plan = engine.plan_entry(symbol, side, SYMBOLS[symbol], leverage=leverage)
            assert on_grid(exchange_rules, symbol, plan.stop_price)
            assert all(on_grid(exchange_rules, symbol, p) for p in plan.take_profit_prices)
