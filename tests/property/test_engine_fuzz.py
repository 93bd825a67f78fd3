"""The exit engine through its Python API under hostile input (hypothesis, issue 16).

Random operation sequences mix real-looking and hostile input: arbitrary message bytes,
extreme numbers (0, negatives, 1e-30, 1e30, 28-digit integers, NaN/inf text), reordered
and duplicated event times, random confirm / reject / resize / id reuse and corrupted
snapshots. After every step:

- no panic crosses the boundary: every refusal is a ``pyquant.errors`` class (or the
  ``TypeError``/``OverflowError`` of a value Python cannot convert) and leaves the
  snapshot byte-for-byte unchanged;
- a position's stop never loosens; the ladder never closes more than the original size;
- every action closes at most the live quantity, on the MARKET_LOT_SIZE step;
- a stale action (earlier sequence or an earlier position with the same id) is refused.

The bounded CI run uses ``PYQUANT_FUZZ_EXAMPLES`` examples per property (default 40);
``make fuzz`` raises it.
"""

from __future__ import annotations

import json
import os
from decimal import Decimal
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyquant
from pyquant import ExitAction, ExitEngine, ExitPolicy

SYMBOLS = {"BTCUSDT": "30000.0", "ETHUSDT": "2000.00", "DOGEUSDT": "0.160000"}
T0 = 1_764_000_000_000
EXAMPLES = int(os.environ.get("PYQUANT_FUZZ_EXAMPLES", "40"))
REFUSALS = (pyquant.PyquantError, TypeError, OverflowError)
EXTREME_TEXT = [
    "0",
    "-1",
    "1e-30",
    "1e30",
    "0.0000000000000000000000000001",
    "79228162514264337593543950335",
    "99999999999999999999",
    "1000000000000000000000000000",
    "NaN",
    "inf",
    "-inf",
    "",
]
# The bounded run replays the same examples every time (CI must not flake); `make fuzz`
# explores afresh.
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize="PYQUANT_FUZZ_EXAMPLES" not in os.environ,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def policy() -> ExitPolicy:
    return ExitPolicy(
        stop_atr=2.0,
        min_stop_pct=0.003,
        max_stop_pct=0.03,
        max_margin_loss=0.10,
        ladder=[(1.0, 0.3), (2.0, 0.3), (3.0, 0.4)],
        breakeven_after_level=1,
        ratchet_to_previous_level=True,
        trail_atr=2.0,
        trail_activate_R=1.5,
        max_hold_ms=600_000,
    )


def mostly(sane: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Four draws in five sane (so positions open and stops fire), the rest hostile."""
    return st.integers(0, 4).flatmap(lambda k: sane if k else hostile)


def prices(symbol: str) -> st.SearchStrategy[Any]:
    base = Decimal(SYMBOLS[symbol])
    near = st.integers(min_value=-400, max_value=400).map(
        lambda bp: str((base + base * Decimal(bp) / 10_000).normalize())
    )
    hostile = st.one_of(
        st.sampled_from(EXTREME_TEXT),
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(min_value=-(10**40), max_value=10**40),
    )
    return mostly(near, hostile)


quantities = mostly(
    st.integers(min_value=1, max_value=40).map(lambda n: str(Decimal(n) / 1000)),
    st.sampled_from(["0.0105", "0.0015", "-0.001", "1000000000000", *EXTREME_TEXT]),
)
times = mostly(
    st.integers(min_value=T0, max_value=T0 + 3_600_000),
    st.sampled_from([T0, T0 - 1, T0 * 1000, -1, 0, 2**63 - 1, -(2**63), 4_102_444_800_001]),
)
# DOGEUSDT's step is 1: the quantities above are off its step (refusals); the others trade.
traded = mostly(st.sampled_from(["BTCUSDT", "ETHUSDT"]), st.just("DOGEUSDT"))


def message(symbol: str, price: Any, time_ms: int) -> bytes:
    return orjson.dumps({"e": "markPriceUpdate", "E": time_ms, "s": symbol, "p": str(price)})


@st.composite
def operations(draw: st.DrawFn) -> tuple[str, tuple[Any, ...]]:
    kind = draw(
        st.sampled_from(
            [
                *("open", "adopt", "mark", "mark", "mark", "raw", "confirm", "confirm"),
                *("reject", "stale", "resize", "liquidation", "close", "restore", "corrupt"),
            ]
        )
    )
    symbol = draw(traded)
    position_id = draw(st.sampled_from(["p0", "p1", "p2"]))
    if kind in ("open", "adopt"):
        side = draw(st.sampled_from(["LONG", "SHORT"]))
        args = (position_id, symbol, side, draw(quantities), draw(prices(symbol)))
        return kind, (
            *args,
            draw(mostly(st.integers(1, 20), st.integers(1, 125))),
            draw(prices(symbol)),
        )
    if kind == "mark":
        now = draw(mostly(st.none(), times))
        return kind, (symbol, draw(prices(symbol)), draw(times), now)
    if kind == "raw":
        return kind, (draw(st.binary(max_size=300)),)
    if kind in ("confirm", "reject", "stale"):
        filled = draw(st.one_of(st.none(), quantities))
        return kind, (draw(st.integers(0, 7)), filled)
    if kind in ("resize", "liquidation"):
        value = draw(quantities) if kind == "resize" else draw(prices(symbol))
        return kind, (position_id, value)
    if kind == "corrupt":
        value = draw(st.sampled_from([0, -1, 9, "1e5", "-1", [], None, 2**64 - 1, "0.0105"]))
        return kind, (draw(st.integers(0, 10_000)), value)
    return kind, (position_id,)


def on_step(side: str, new: Decimal, old: Decimal) -> bool:
    return new >= old if side == "LONG" else new <= old


class Run:
    def __init__(self, rules: pyquant.ExchangeRules) -> None:
        self.rules = rules
        self.engine = ExitEngine(rules, policy())
        self.engine.warm_up("BTCUSDT", [30030.0] * 20, [29970.0] * 20, [30000.0] * 20)
        self.pending: list[ExitAction] = []
        self.stale: list[ExitAction] = []
        self.stops: dict[tuple[str, int], Decimal] = {}

    def guarded(self, call: Any) -> Any:
        before = self.engine.snapshot()
        try:
            return call()
        except REFUSALS:
            assert self.engine.snapshot() == before, "a refusal changed the state"
            return None

    def check_actions(self, actions: list[ExitAction] | None) -> None:
        for action in actions or []:
            view = self.engine.position(action.position_id)
            assert view is not None
            quantity = Decimal(action.quantity)
            assert 0 < quantity <= Decimal(view.quantity), (action, view)
            step = self.rules.quantize_qty(action.symbol, action.quantity)
            assert Decimal(step) == quantity, f"off-step {action}"
            self.pending = [a for a in self.pending if a.position_id != action.position_id]
            self.pending.append(action)

    def check_positions(self) -> None:
        live = {(a.position_id, a.generation, a.sequence) for a in self.engine.pending_actions()}
        for action in list(self.pending):
            if (action.position_id, action.generation, action.sequence) not in live:
                self.pending.remove(action)
                self.stale.append(action)
        for view in self.engine.positions():
            assert Decimal(view.quantity) <= Decimal(view.original_quantity)
            key = (view.position_id, self.generation_of(view.position_id))
            stop = Decimal(view.stop_price)
            old = self.stops.get(key)
            assert old is None or on_step(view.position_side, stop, old), (view, old)
            self.stops[key] = stop

    def generation_of(self, position_id: str) -> int:
        doc = json.loads(self.engine.snapshot())
        for _, state in doc["symbols"]:
            for slot in ("long", "short"):
                if state[slot] and state[slot]["position_id"] == position_id:
                    return int(state[slot]["generation"])
        return -1

    def apply(self, kind: str, args: tuple[Any, ...]) -> None:
        engine = self.engine
        if kind == "open":
            pid, symbol, side, qty, entry, leverage, _ = args
            self.guarded(lambda: engine.open_position(pid, symbol, side, qty, entry, leverage))
        elif kind == "adopt":
            pid, symbol, side, qty, entry, leverage, mark = args
            self.check_actions(
                self.guarded(
                    lambda: engine.adopt_position(
                        pid, symbol, side, qty, entry, leverage, mark_price=mark
                    )
                )
            )
        elif kind == "mark":
            symbol, price, time_ms, now = args
            self.check_actions(
                self.guarded(lambda: engine.on_mark_message(message(symbol, price, time_ms), now))
            )
        elif kind == "raw":
            self.check_actions(self.guarded(lambda: engine.on_mark_message(args[0])))
        elif kind in ("confirm", "reject", "stale"):
            pick, filled = args
            source = self.stale if kind == "stale" else self.pending
            if not source:
                return
            action = source[pick % len(source)]
            if kind == "reject":
                result = self.guarded(lambda: engine.reject(action))
            else:
                result = self.guarded(lambda: engine.confirm(action, filled))
            if kind == "stale":
                assert result is None, f"stale {action} was accepted"
        elif kind == "resize":
            self.guarded(lambda: engine.resize_position(args[0], args[1]))
        elif kind == "liquidation":
            self.guarded(lambda: engine.set_liquidation_price(args[0], args[1]))
        elif kind == "close":
            self.guarded(lambda: engine.close_position(args[0]))
        elif kind == "restore":
            data = engine.snapshot()
            self.engine = ExitEngine.restore(data, self.rules)
            assert self.engine.snapshot() == data
        elif kind == "corrupt":
            self.corrupt(*args)
        self.check_positions()

    def corrupt(self, at: int, value: Any) -> None:
        """Replace one value of the snapshot: refused by name, or restored and run."""
        doc = json.loads(self.engine.snapshot())
        slots: list[tuple[dict[str, Any], str]] = []

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                for key, child in node.items():
                    slots.append((node, key))
                    walk(child)
            elif isinstance(node, list):
                for child in node:
                    walk(child)

        walk(doc)
        parent, key = slots[at % len(slots)]
        parent[key] = value
        try:
            restored = ExitEngine.restore(json.dumps(doc).encode(), self.rules)
        except pyquant.InputError:
            return
        for k, (symbol, price) in enumerate(SYMBOLS.items()):
            for action in restored.on_mark_message(message(symbol, price, T0 + 7_200_000 + k)):
                restored.confirm(action)


@FUZZ
@given(steps=st.lists(operations(), min_size=10, max_size=60))
def test_engine_survives_hostile_operations(
    exchange_rules: pyquant.ExchangeRules, steps: list[tuple[str, tuple[Any, ...]]]
) -> None:
    run = Run(exchange_rules)
    # Two live positions from the start, so marks have something to act on.
    run.apply("open", ("p0", "BTCUSDT", "LONG", "0.010", "30000.0", 10, None))
    run.apply("open", ("p1", "ETHUSDT", "SHORT", "0.500", "2000.00", 5, None))
    assert len(run.engine.positions()) == 2
    for kind, args in steps:
        run.apply(kind, args)


@FUZZ
@given(data=st.binary(max_size=2_000))
def test_arbitrary_bytes_are_a_message_error_or_nothing(
    exchange_rules: pyquant.ExchangeRules, data: bytes
) -> None:
    engine = ExitEngine(exchange_rules, policy())
    engine.open_position("p", "BTCUSDT", "LONG", "0.010", "30000.0", leverage=10)
    before = engine.snapshot()
    try:
        engine.on_mark_message(data)
    except pyquant.MessageError:
        assert engine.snapshot() == before
