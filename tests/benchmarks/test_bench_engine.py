"""``ExitEngine.on_mark_message`` against a plain-Python engine and ``orjson.loads`` alone.

Scale: real-shaped ``!markPrice@arr`` messages of 600 real exchangeInfo symbols (every
``markPriceUpdate`` with its ``e E s p i P r T`` keys and 8-decimal strings), 1,000 open
positions (400 symbols with both hedge legs, 200 with a LONG), ATR warmed up on every
symbol. Each round is the next message of a seeded random walk (event time +1 s, so 1m bars
close and feed the ATR every 60 rounds); building the message is setup, not timed.

Implementations, one benchmark group:
- ``rust``: ``pyquant.ExitEngine.on_mark_message`` (parse + bars + ATR + every position);
  the messages are in Binance's layout, so the engine reads them on its AVX2 window path
  where the processor has it, the keys after the price by their known layout (the
  Rust-only figures: ``cargo bench --bench core -- engine_message_600``: the whole call,
  ``parse_600_updates`` and ``apply_batch_1000_positions`` its two parts).
- ``python``: ``python_engine.PythonExitEngine`` (orjson + Decimal + loops, same semantics).
- ``orjson_loads``: ``orjson.loads`` of the same bytes and nothing else.

Before timing, both engines run the same 120 large-move messages (stops, ladders, trailing,
breakeven and ratchet all fire; every action confirmed) and must emit identical actions;
``extra_info["outputs_agree"]`` records it. ``make bench`` runs it with
``--benchmark-enable``; the default suite runs each entry once as a smoke test.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from python_engine import Action, PythonExitEngine, load_rules

import pyquant
from pyquant import ExitEngine, ExitPolicy

DATA = Path(__file__).parents[1] / "data" / "binance"
SYMBOLS = 600
BOTH_LEGS = 400
SINGLE_LEGS = 200
T0 = 1_764_000_000_000
GROUP = "on_mark_message: 600 symbols, 1000 positions"

POLICY: dict[str, Any] = {
    "stop_atr": 2.0,
    "min_stop_pct": 0.003,
    "max_stop_pct": 0.05,
    "max_margin_loss": 0.3,
    "ladder": [(1.0, 0.3), (2.0, 0.3), (3.0, 0.4)],
    "breakeven_after_level": 1,
    "ratchet_to_previous_level": True,
    "trail_atr": 2.0,
    "trail_activate_r": 1.5,
    "max_hold_ms": 7_200_000,
    "time_stop_unless_r": 1.0,
}


def load_exchange_info() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((DATA / "exchangeInfo_fapi_full_2025-11-26.json").read_text())
    return doc


def graded(symbol: dict[str, Any]) -> bool:
    """Whether the symbol has a price tick and a MARKET step (a few delisted ones have 0)."""
    f = {x["filterType"]: x for x in symbol["filters"]}
    return (
        Decimal(f["PRICE_FILTER"]["tickSize"]) > 0 and Decimal(f["MARKET_LOT_SIZE"]["stepSize"]) > 0
    )


class Market:
    """600 real symbols with a start price each and a seeded random walk of marks."""

    def __init__(self, exchange_info: dict[str, Any]) -> None:
        chosen = [s for s in exchange_info["symbols"] if s["quoteAsset"] == "USDT" and graded(s)]
        chosen = chosen[:SYMBOLS]
        assert len(chosen) == SYMBOLS
        self.symbols = [s["symbol"] for s in chosen]
        self.ticks: dict[str, Decimal] = {}
        self.prices: dict[str, Decimal] = {}
        self.quantities: dict[str, Decimal] = {}
        for s in chosen:
            f = {x["filterType"]: x for x in s["filters"]}
            tick = Decimal(f["PRICE_FILTER"]["tickSize"])
            low = max(Decimal(f["PRICE_FILTER"]["minPrice"]), tick)
            price = (low * 40 / tick).to_integral_value() * tick
            step = Decimal(f["MARKET_LOT_SIZE"]["stepSize"])
            notional = Decimal(f.get("MIN_NOTIONAL", {}).get("notional", "5"))
            quantity = max(
                (notional * 20 / price / step).to_integral_value() * step,
                Decimal(f["MARKET_LOT_SIZE"]["minQty"]),
            )
            self.ticks[s["symbol"]] = tick
            self.prices[s["symbol"]] = price
            self.quantities[s["symbol"]] = quantity

    def legs(self) -> list[tuple[str, str, str]]:
        """(position_id, symbol, side) for the 1,000 positions."""
        legs = []
        for symbol in self.symbols[:BOTH_LEGS]:
            legs += [(f"{symbol}-L", symbol, "LONG"), (f"{symbol}-S", symbol, "SHORT")]
        legs += [(f"{s}-L", s, "LONG") for s in self.symbols[BOTH_LEGS : BOTH_LEGS + SINGLE_LEGS]]
        return legs

    def messages(self, max_move_bp: int, seed: int) -> Iterator[bytes]:
        """Yield ``!markPrice@arr`` messages, one per second of event time, forever."""
        rng = random.Random(seed)
        prices = dict(self.prices)
        time_ms = T0 + 1_000
        while True:
            items = []
            for symbol in self.symbols:
                tick = self.ticks[symbol]
                move = Decimal(rng.randint(-max_move_bp, max_move_bp)) / 10_000
                price = max(tick, (prices[symbol] * (1 + move) / tick).to_integral_value() * tick)
                prices[symbol] = price
                text = f"{price:.8f}"
                items.append(
                    {
                        "e": "markPriceUpdate",
                        "E": time_ms,
                        "s": symbol,
                        "p": text,
                        "i": text,
                        "P": text,
                        "r": "0.00010000",
                        "T": T0 + 28_800_000,
                    }
                )
            yield orjson.dumps(items)
            time_ms += 1_000


def build_engines(
    exchange_info: dict[str, Any], market: Market
) -> tuple[ExitEngine, PythonExitEngine]:
    rules = pyquant.ExchangeRules.from_exchange_info(orjson.dumps(exchange_info))
    policy = ExitPolicy(**POLICY)
    rust = ExitEngine(rules, policy)
    python = PythonExitEngine(load_rules(exchange_info), policy.to_dict())
    for symbol in market.symbols:
        p = float(market.prices[symbol])
        high, low, close = [p * 1.002] * 20, [p * 0.998] * 20, [p] * 20
        rust.warm_up(symbol, high, low, close)
        python.warm_up(symbol, high, low, close)
    for position_id, symbol, side in market.legs():
        rust.open_position(
            position_id,
            symbol,
            side,
            market.quantities[symbol],
            market.prices[symbol],
            leverage=5,
            opened_at_ms=T0,
        )
        view = rust.position(position_id)
        assert view is not None
        python.open_from_view(view)
    return rust, python


def as_tuple(action: pyquant.ExitAction) -> Action:
    return (
        action.position_id,
        action.reason,
        action.side,
        action.quantity,
        action.trigger_price,
        action.mark_price,
        action.sequence,
        action.is_full_close,
        action.event_time_ms,
    )


@pytest.fixture(scope="module")
def exchange_info() -> dict[str, Any]:
    return load_exchange_info()


@pytest.fixture(scope="module")
def agreement(exchange_info: dict[str, Any]) -> dict[str, Any]:
    """Run both engines through large moves, confirming every action; compare outputs."""
    market = Market(exchange_info)
    rust, python = build_engines(exchange_info, market)
    stream = market.messages(max_move_bp=40, seed=7)
    reasons: dict[str, int] = {}
    agree = True
    for _ in range(120):
        data = next(stream)
        ours = [as_tuple(a) for a in rust.on_mark_message(data)]
        theirs = python.on_mark_message(data)
        agree = agree and ours == theirs
        for action in theirs:
            kind = "take_profit" if action[1].startswith("take_profit") else action[1]
            reasons[kind] = reasons.get(kind, 0) + 1
        for pending in rust.pending_actions():
            rust.confirm(pending)
            python.confirm(pending.position_id, pending.sequence)
    return {"agree": agree, "reasons": reasons, "open_after": len(rust.positions())}


def test_engines_agree(agreement: dict[str, Any]) -> None:
    assert agreement["agree"]
    # The comparison is only meaningful if the rules actually fired.
    assert {"stop_loss", "take_profit", "breakeven_stop"} <= set(agreement["reasons"]), agreement


@pytest.mark.parametrize("implementation", ["rust", "python", "orjson_loads"])
def test_bench_on_mark_message(
    benchmark: Any,  # pytest-benchmark's fixture has no public type
    implementation: str,
    exchange_info: dict[str, Any],
    agreement: dict[str, Any],
) -> None:
    market = Market(exchange_info)
    rust, python = build_engines(exchange_info, market)
    stream = market.messages(max_move_bp=2, seed=11)
    target: Callable[[bytes], object] = {
        "rust": rust.on_mark_message,
        "python": python.on_mark_message,
        "orjson_loads": orjson.loads,
    }[implementation]
    benchmark.group = GROUP
    benchmark.extra_info["outputs_agree"] = agreement["agree"]
    benchmark.extra_info["message_bytes"] = len(next(market.messages(max_move_bp=2, seed=11)))
    benchmark.pedantic(target, setup=lambda: ((next(stream),), {}), rounds=300, warmup_rounds=5)
    assert agreement["agree"]
