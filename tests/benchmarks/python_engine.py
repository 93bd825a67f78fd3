"""A plain-Python exit engine: the baseline of ``test_bench_engine.py``.

It is what a careful Python implementation of the per-message work would be: ``orjson``
to parse, ``Decimal`` for money (mark, stop, levels, quantities), floats for bars and the
Wilder ATR, dict lookups and loops over symbols and positions. Per message it does what the
Rust engine does (docs/exit-rules.md): parse the whole message first, skip unknown symbols
and stale updates, aggregate 1m bars by event time (a late-joined first bar is partial and
skipped), feed closed bars to the ATR, then per position: best mark, trailing activation and
candidate, stop, ladder (one action for every level crossed, dust merged into a full close),
time stop; confirm runs the breakeven / ratchet. Positions are opened from the Rust engine's
``PositionView`` (the stop, R and ladder prices it computed at open): opening is not on the
per-message path, and sharing it keeps the comparison about the per-message work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

import orjson

LATE_JOIN_MS = 3_000

# (position_id, reason, side, quantity, trigger_price, mark_price, sequence, full, event_time)
Action = tuple[str, str, str, str, str, str, int, bool, int]


@dataclass
class SymbolRules:
    tick: Decimal
    min_price: Decimal
    step: Decimal
    min_qty: Decimal
    min_notional: Decimal

    def round_price(self, value: Decimal, up: bool) -> Decimal:
        k = ((value - self.min_price) / self.tick).to_integral_value(
            ROUND_CEILING if up else ROUND_FLOOR
        )
        return self.min_price + k * self.tick

    def floor_qty(self, value: Decimal) -> Decimal:
        if value >= self.min_qty:
            k = ((value - self.min_qty) / self.step).to_integral_value(ROUND_FLOOR)
            return self.min_qty + k * self.step
        return (value / self.step).to_integral_value(ROUND_FLOOR) * self.step

    def price_text(self, value: Decimal) -> str:
        return str(value.quantize(self.tick.normalize()))

    def qty_text(self, value: Decimal) -> str:
        return str(value.quantize(self.step.normalize()))


def load_rules(exchange_info: dict[str, Any]) -> dict[str, SymbolRules]:
    out: dict[str, SymbolRules] = {}
    for s in exchange_info["symbols"]:
        f = {x["filterType"]: x for x in s["filters"]}
        market = f.get("MARKET_LOT_SIZE") or f["LOT_SIZE"]
        out[s["symbol"]] = SymbolRules(
            tick=Decimal(f["PRICE_FILTER"]["tickSize"]),
            min_price=Decimal(f["PRICE_FILTER"]["minPrice"]),
            step=Decimal(market["stepSize"]),
            min_qty=Decimal(market["minQty"]),
            min_notional=Decimal(f.get("MIN_NOTIONAL", {}).get("notional", "0")),
        )
    return out


@dataclass
class Atr:
    period: int
    prev_close: float | None = None
    seeded: int = 0
    seed_sum: float = 0.0
    value: float | None = None

    def update(self, high: float, low: float, close: float) -> None:
        if self.prev_close is None:
            self.prev_close = close
            return
        pc = self.prev_close
        tr = max(high - low, abs(pc - high), abs(pc - low))
        self.prev_close = close
        if self.value is not None:
            self.value = (self.value * (self.period - 1) + tr) / self.period
            return
        self.seed_sum += tr
        self.seeded += 1
        if self.seeded >= self.period:
            self.value = self.seed_sum / self.period


@dataclass
class SymbolState:
    atr: Atr
    bar_open: int | None = None
    high: float = 0.0
    low: float = 0.0
    close: float = 0.0
    close_time: int = 0
    partial_bucket: int | None = None
    last_event: int | None = None
    positions: list[Position] = field(default_factory=list)


@dataclass
class Position:
    position_id: str
    symbol: str
    long: bool
    quantity: Decimal
    original: Decimal
    entry: Decimal
    stop: Decimal
    stop_reason: str
    r: Decimal
    best: Decimal
    ladder: list[Decimal]
    targets: list[Decimal]
    trail_activate_price: Decimal | None
    time_below_price: Decimal | None
    opened_at: int
    ladder_closed: Decimal = Decimal(0)
    levels_done: int = 0
    trailing_active: bool = False
    pending: Action | None = None
    pending_quantity: Decimal = Decimal(0)
    sequence: int = 0
    trail_basis: tuple[Decimal, float | None] | None = None


class PythonExitEngine:
    """Same per-message semantics as ``pyquant.ExitEngine`` for the policies it is given."""

    def __init__(self, rules: dict[str, SymbolRules], policy: dict[str, Any]) -> None:
        self.rules = rules
        self.p = policy
        self.interval = 60_000
        self.symbols: dict[str, SymbolState] = {}
        self.by_id: dict[str, Position] = {}
        self.breakeven_pct = Decimal(repr(policy["taker_fee"])) * 2 + Decimal(
            repr(policy["breakeven_extra_pct"])
        )
        self.trail_pct = (
            Decimal(repr(policy["trail_pct"])) if policy["trail_pct"] is not None else None
        )
        self.fallback = Decimal(repr(policy["fallback_stop_pct"]))
        cum = Decimal(0)
        self.cum_fractions: list[Decimal] = []
        for level in policy["ladder"]:
            cum += Decimal(repr(level["fraction"]))
            self.cum_fractions.append(cum)

    def _state(self, symbol: str) -> SymbolState:
        state = self.symbols.get(symbol)
        if state is None:
            state = SymbolState(Atr(self.p["atr_period"]))
            self.symbols[symbol] = state
        return state

    def warm_up(self, symbol: str, high: list[float], low: list[float], close: list[float]) -> None:
        state = self._state(symbol)
        atr = state.atr = Atr(self.p["atr_period"])  # replaced, as in the Rust engine
        for h, lo, c in zip(high, low, close, strict=True):
            atr.update(h, lo, c)

    def open_from_view(self, view: Any) -> None:  # a pyquant.PositionView
        rules = self.rules[view.symbol]
        long = view.position_side == "LONG"
        entry = Decimal(view.entry_price)
        r = Decimal(view.r_distance)
        original = Decimal(view.original_quantity)
        sign = 1 if long else -1

        def beyond(k: float | None) -> Decimal | None:
            return None if k is None else entry + sign * Decimal(repr(k)) * max(r, rules.tick)

        targets = [
            original if f == 1 else rules.floor_qty(f * original) for f in self.cum_fractions
        ]
        trailing = self.p["trail_atr"] is not None or self.p["trail_pct"] is not None
        position = Position(
            position_id=view.position_id,
            symbol=view.symbol,
            long=long,
            quantity=Decimal(view.quantity),
            original=original,
            entry=entry,
            stop=Decimal(view.stop_price),
            stop_reason=view.stop_reason,
            r=r,
            best=entry,
            ladder=[Decimal(p) for p in view.take_profit_prices],
            targets=targets,
            trail_activate_price=beyond(self.p["trail_activate_r"]),
            time_below_price=beyond(self.p["time_stop_unless_r"]),
            opened_at=view.opened_at_ms,
            trailing_active=trailing
            and self.p["trail_activate_r"] is None
            and self.p["trail_activate_pct"] is None
            and self.p["trail_after_level"] is None,
        )
        self._state(view.symbol).positions.append(position)
        self.by_id[view.position_id] = position

    def on_mark_message(self, data: bytes) -> list[Action]:
        doc = orjson.loads(data)
        if isinstance(doc, dict) and "data" in doc:
            doc = doc["data"]
        items = doc if isinstance(doc, list) else [doc]
        # Parse everything first: a malformed item leaves the state untouched.
        updates = [(u["s"], Decimal(u["p"]), float(u["p"]), int(u["E"])) for u in items]
        actions: list[Action] = []
        for symbol, mark, mark_f, time_ms in updates:
            rules = self.rules.get(symbol)
            if rules is None:
                continue
            state = self._state(symbol)
            if state.last_event is not None and time_ms < state.last_event:
                continue
            self._bars(state, time_ms, mark_f)
            state.last_event = time_ms
            atr = state.atr.value
            for position in state.positions:
                action = self._on_mark(position, rules, mark, atr, time_ms)
                if action is not None:
                    actions.append(action)
        return actions

    def _bars(self, state: SymbolState, time_ms: int, price: float) -> None:
        bucket = time_ms // self.interval * self.interval
        first = state.last_event is None
        if state.bar_open is None or bucket > state.bar_open:
            if state.bar_open is not None:
                if state.partial_bucket == state.bar_open:
                    state.partial_bucket = None
                else:
                    state.atr.update(state.high, state.low, state.close)
            state.bar_open = bucket
            state.high = state.low = state.close = price
            state.close_time = time_ms
        elif bucket == state.bar_open:
            state.high = max(state.high, price)
            state.low = min(state.low, price)
            if time_ms >= state.close_time:
                state.close = price
                state.close_time = time_ms
        if first and time_ms - bucket > LATE_JOIN_MS:
            state.partial_bucket = bucket

    def _emit(
        self,
        p: Position,
        rules: SymbolRules,
        quantity: Decimal,
        reason: str,
        trigger: Decimal,
        mark: Decimal,
        time_ms: int,
    ) -> Action:
        p.sequence += 1
        action: Action = (
            p.position_id,
            reason,
            "SELL" if p.long else "BUY",
            rules.qty_text(quantity),
            rules.price_text(trigger),
            rules.price_text(mark),
            p.sequence,
            quantity >= p.quantity,
            time_ms,
        )
        p.pending = action
        p.pending_quantity = quantity
        return action

    def _on_mark(
        self, p: Position, rules: SymbolRules, mark: Decimal, atr: float | None, time_ms: int
    ) -> Action | None:
        if p.pending is not None:
            return None
        long = p.long
        if (mark > p.best) if long else (mark < p.best):
            p.best = mark
        policy = self.p
        if not p.trailing_active and (
            policy["trail_atr"] is not None or policy["trail_pct"] is not None
        ):
            by_price = p.trail_activate_price is not None and (
                p.best >= p.trail_activate_price if long else p.best <= p.trail_activate_price
            )
            after = policy["trail_after_level"]
            p.trailing_active = by_price or (after is not None and p.levels_done >= after)
        if p.trailing_active:
            basis = (p.best, atr)
            if p.trail_basis != basis:
                p.trail_basis = basis
                if self.trail_pct is not None:
                    distance = self.trail_pct * p.best
                elif atr is not None and atr > 0:
                    distance = Decimal(repr(policy["trail_atr"] * atr))
                else:
                    distance = self.fallback * p.best
                if long:
                    candidate = rules.round_price(p.best - distance, up=True)
                    if candidate > 0 and candidate > p.stop:
                        p.stop, p.stop_reason = candidate, "trailing_stop"
                else:
                    candidate = rules.round_price(p.best + distance, up=False)
                    if candidate < p.stop:
                        p.stop, p.stop_reason = candidate, "trailing_stop"
        if (mark <= p.stop) if long else (mark >= p.stop):
            return self._emit(p, rules, p.quantity, p.stop_reason, p.stop, mark, time_ms)
        done = p.levels_done
        crossed = done
        for price in p.ladder[done:]:
            if (mark >= price) if long else (mark <= price):
                crossed += 1
            else:
                break
        if crossed > done:
            wanted = p.targets[crossed - 1] - p.ladder_closed
            live = p.quantity
            quantity = wanted
            if wanted <= 0 or wanted >= live or wanted < rules.min_qty:
                quantity = live
            else:
                remainder = live - wanted
                if remainder < rules.min_qty or remainder * mark < rules.min_notional:
                    quantity = live
            return self._emit(
                p, rules, quantity, f"take_profit_{crossed}", p.ladder[crossed - 1], mark, time_ms
            )
        max_hold = policy["max_hold_ms"]
        if max_hold is not None and time_ms - p.opened_at >= max_hold:
            below = p.time_below_price is None or not (
                p.best >= p.time_below_price if long else p.best <= p.time_below_price
            )
            if below:
                return self._emit(p, rules, p.quantity, "time_stop", mark, mark, time_ms)
        return None

    def confirm(self, position_id: str, sequence: int) -> None:
        """Confirm the pending action in full (breakeven and ratchet as in the Rust engine)."""
        p = self.by_id[position_id]
        assert p.pending is not None
        assert p.pending[6] == sequence
        reason = p.pending[1]
        filled = p.pending_quantity
        p.pending = None
        p.quantity -= filled
        if reason.startswith("take_profit_"):
            p.ladder_closed += filled
            p.levels_done = max(p.levels_done, int(reason.rsplit("_", 1)[1]))
        if p.quantity <= 0:
            self.symbols[p.symbol].positions.remove(p)
            del self.by_id[position_id]
            return
        rules = self.rules[p.symbol]
        sign = 1 if p.long else -1
        after = self.p["breakeven_after_level"]
        if after is not None and p.levels_done >= after:
            target = rules.round_price(p.entry + sign * self.breakeven_pct * p.entry, up=p.long)
            if (target > p.stop) if p.long else (target < p.stop):
                p.stop, p.stop_reason = target, "breakeven_stop"
        if self.p["ratchet_to_previous_level"] and p.levels_done >= 2:
            previous = p.ladder[p.levels_done - 2]
            if (previous > p.stop) if p.long else (previous < p.stop):
                p.stop, p.stop_reason = previous, "ratchet_stop"
