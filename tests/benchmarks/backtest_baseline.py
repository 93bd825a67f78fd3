"""Plain-Python baseline of the backtest: the same bar x position evaluation, in loops.

A line-by-line port of ``rust_core/src/backtest.rs`` (bar path, trigger crossings, entries,
gaps, fills, fees) and of the parts of ``exit::position`` a backtest exercises (initial stop
and R, ladder with exact cumulative targets and dust merging, breakeven and ratchet,
trailing, time stop), with ``decimal.Decimal`` for prices and quantities as the core uses
exact decimals. It exists to be measured against the Rust core and to check that both take
the same decisions; it is not used by the package. Limits: no liquidation price, the ATR
interval must be the data interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Decimal
from typing import Any

ZERO = Decimal(0)
ONE = Decimal(1)


def dec(value: float) -> Decimal:
    # The core's decimal_from_f64: the shortest repr that round-trips.
    return Decimal(repr(float(value)))


@dataclass(frozen=True)
class Rules:
    min_price: Decimal
    tick: Decimal
    min_qty: Decimal
    step: Decimal
    min_notional: Decimal

    @classmethod
    def from_exchange_info(cls, info: dict[str, Any], symbol: str) -> Rules:
        entry = next(s for s in info["symbols"] if s["symbol"] == symbol)
        filters = {f["filterType"]: f for f in entry["filters"]}
        return cls(
            min_price=Decimal(filters["PRICE_FILTER"]["minPrice"]),
            tick=Decimal(filters["PRICE_FILTER"]["tickSize"]),
            min_qty=Decimal(filters["MARKET_LOT_SIZE"]["minQty"]),
            step=Decimal(filters["MARKET_LOT_SIZE"]["stepSize"]),
            min_notional=Decimal(filters.get("MIN_NOTIONAL", {}).get("notional", "0")),
        )

    def price(self, value: Decimal, up: bool) -> Decimal:
        k = ((value - self.min_price) / self.tick).to_integral_value(
            ROUND_CEILING if up else ROUND_FLOOR
        )
        return self.min_price + k * self.tick

    def price_nearest(self, value: Decimal) -> Decimal:
        k = ((value - self.min_price) / self.tick).to_integral_value(ROUND_HALF_UP)
        return self.min_price + k * self.tick

    def qty(self, value: Decimal) -> Decimal:
        if value >= self.min_qty:
            k = ((value - self.min_qty) / self.step).to_integral_value(ROUND_FLOOR)
            return self.min_qty + k * self.step
        return max((value / self.step).to_integral_value(ROUND_FLOOR) * self.step, ZERO)


class Policy:
    def __init__(self, fields: dict[str, Any]) -> None:
        self.f = fields
        self.stop_atr = fields["stop_atr"]
        self.fallback = dec(fields["fallback_stop_pct"])
        self.min_stop = dec(fields["min_stop_pct"])
        self.max_stop = dec(fields["max_stop_pct"])
        mml = fields["max_margin_loss"]
        self.max_margin_loss = None if mml is None else dec(mml)
        self.min_allowed = dec(
            fields["min_allowed_stop_pct"]
            if fields["min_allowed_stop_pct"] is not None
            else fields["min_stop_pct"]
        )
        self.ladder = [(lv["at"], dec(lv["fraction"])) for lv in fields["ladder"]]
        cum, self.cum = ZERO, []
        for _, fraction in self.ladder:
            cum += fraction
            self.cum.append(cum)
        self.unit_r = fields["ladder_unit"] == "R"
        self.breakeven_after = fields["breakeven_after_level"]
        self.breakeven_pct = dec(fields["taker_fee"]) * 2 + dec(fields["breakeven_extra_pct"])
        self.ratchet = fields["ratchet_to_previous_level"]
        self.trail_atr = fields["trail_atr"]
        self.trail_pct = None if fields["trail_pct"] is None else dec(fields["trail_pct"])
        self.trail_activate_r = fields["trail_activate_r"]
        self.trail_activate_pct = (
            None if fields["trail_activate_pct"] is None else dec(fields["trail_activate_pct"])
        )
        self.trail_after_level = fields["trail_after_level"]
        self.max_hold_ms = fields["max_hold_ms"]
        self.time_stop_unless_r = fields["time_stop_unless_r"]
        self.period = fields["atr_period"]

    def multiplier(self, confidence: float | None) -> float:
        if confidence is None:
            return 1.0
        m = 1.0 + self.f["confidence_scale"] * (confidence - 0.5)
        return min(max(m, self.f["m_min"]), self.f["m_max"])


class Atr:
    def __init__(self, period: int) -> None:
        self.period, self.prev_close, self.seeded, self.seed_sum = period, None, 0, 0.0
        self.value: float | None = None

    def update(self, high: float, low: float, close: float) -> None:
        if self.prev_close is None:
            self.prev_close = close
            return
        tr = max(high - low, abs(self.prev_close - high), abs(self.prev_close - low))
        self.prev_close = close
        if self.value is not None:
            nxt = self.value * (self.period - 1)
            nxt += tr
            self.value = nxt / self.period
            return
        self.seed_sum += tr
        self.seeded += 1
        if self.seeded >= self.period:
            self.value = self.seed_sum / self.period


@dataclass
class Position:
    sign: int
    entry: Decimal
    quantity: Decimal
    original: Decimal
    stop: Decimal
    stop_reason: str
    r: Decimal
    best: Decimal
    levels: list[Decimal]
    targets: list[Decimal]
    activate: Decimal | None
    trailing: bool
    time_below: Decimal | None
    opened: int
    over_leveraged: bool
    closed_by_ladder: Decimal = ZERO
    done: int = 0
    sequence: int = 0
    trail_cache: tuple[float, Decimal] | None = None
    trail_basis: tuple[Decimal, float] | None = field(default=None)

    def ge(self, a: Decimal, b: Decimal) -> bool:  # a at or beyond b toward profit
        return a >= b if self.sign > 0 else a <= b

    def tighter(self, new: Decimal, old: Decimal) -> bool:
        return new > old if self.sign > 0 else new < old


def open_position(
    rules: Rules,
    p: Policy,
    sign: int,
    qty: Decimal,
    entry: Decimal,
    leverage: int,
    confidence: float | None,
    now: int,
    atr: float | None,
) -> Position:
    atr_ok = atr is not None and math.isfinite(atr) and atr > 0
    base = dec(p.stop_atr) * dec(atr) if p.stop_atr is not None and atr_ok else p.fallback * entry
    distance = min(max(base, p.min_stop * entry), p.max_stop * entry)
    cap = None if p.max_margin_loss is None else p.max_margin_loss * entry / leverage
    if cap is not None:
        distance = min(distance, cap)
    stop = rules.price(entry - sign * distance, up=sign > 0)
    if not (entry > stop if sign > 0 else entry < stop):
        stop = rules.price(entry, up=sign < 0) - sign * rules.tick
    r_dist = (entry - stop) * sign
    over = (cap is not None and cap < p.min_allowed * entry) or r_dist <= 0
    r = max(r_dist, rules.tick)
    m = p.multiplier(confidence)
    levels = []
    for at, _ in p.ladder:
        d = dec(at * m) * (r if p.unit_r else entry)
        price = rules.price(entry + sign * d, up=sign < 0)
        if not (price > entry if sign > 0 else price < entry):
            price = rules.price(entry, up=sign > 0) + sign * rules.tick
        levels.append(price if price > 0 else rules.tick)
    targets = [qty if c == ONE else rules.qty(c * qty) for c in p.cum]
    activate = None
    candidates = []
    if p.trail_activate_r is not None:
        candidates.append(entry + sign * dec(p.trail_activate_r) * r)
    if p.trail_activate_pct is not None:
        candidates.append(entry + sign * p.trail_activate_pct * entry)
    for c in candidates:
        activate = c if activate is None else (min(activate, c) if sign > 0 else max(activate, c))
    trailing_on = p.trail_atr is not None or p.trail_pct is not None
    immediate = (
        trailing_on
        and p.trail_activate_r is None
        and p.trail_activate_pct is None
        and p.trail_after_level is None
    )
    below = None if p.time_stop_unless_r is None else entry + sign * dec(p.time_stop_unless_r) * r
    return Position(
        sign,
        entry,
        qty,
        qty,
        stop,
        "stop_loss",
        r_dist,
        entry,
        levels,
        targets,
        activate,
        immediate,
        below,
        now,
        over,
    )


def on_mark(pos: Position, rules: Rules, p: Policy, mark: Decimal, atr: float | None, now: int):
    sign = pos.sign
    if pos.tighter(mark, pos.best):
        pos.best = mark
    if not pos.trailing and (p.trail_atr is not None or p.trail_pct is not None):
        by_price = pos.activate is not None and pos.ge(pos.best, pos.activate)
        by_level = p.trail_after_level is not None and pos.done >= p.trail_after_level
        pos.trailing = by_price or by_level
    if pos.trailing:
        basis = (pos.best, 0.0 if atr is None else atr)
        if pos.trail_basis != basis:
            pos.trail_basis = basis
            if p.trail_pct is not None:
                distance = p.trail_pct * pos.best
            elif p.trail_atr is not None and atr is not None and math.isfinite(atr) and atr > 0:
                if pos.trail_cache is not None and pos.trail_cache[0] == atr:
                    distance = pos.trail_cache[1]
                else:
                    distance = dec(p.trail_atr * atr)
                    pos.trail_cache = (atr, distance)
            else:
                distance = p.fallback * pos.best
            candidate = rules.price(pos.best - sign * distance, up=sign > 0)
            if candidate > 0 and pos.tighter(candidate, pos.stop):
                pos.stop, pos.stop_reason = candidate, "trailing_stop"
    if pos.over_leveraged:
        return emit(pos, pos.quantity, "over_leverage", mark)
    if pos.ge(pos.stop, mark):
        return emit(pos, pos.quantity, pos.stop_reason, pos.stop)
    done = pos.done
    if done < len(pos.levels):
        crossed = done
        for price in pos.levels[done:]:
            if not pos.ge(mark, price):
                break
            crossed += 1
        if crossed > done:
            wanted = pos.targets[crossed - 1] - pos.closed_by_ladder
            live = pos.quantity
            dust = wanted <= 0 or wanted >= live or wanted < rules.min_qty
            dust = dust or live - wanted < rules.min_qty
            qty = live if dust or (live - wanted) * mark < rules.min_notional else wanted
            return emit(pos, qty, f"take_profit_{crossed}", pos.levels[crossed - 1], level=crossed)
    expired = p.max_hold_ms is not None and now - pos.opened >= p.max_hold_ms
    if expired and (pos.time_below is None or not pos.ge(pos.best, pos.time_below)):
        return emit(pos, pos.quantity, "time_stop", mark)
    return None


def emit(pos: Position, qty: Decimal, reason: str, trigger: Decimal, level: int = 0):
    pos.sequence += 1
    return (qty, reason, trigger, level)


def confirm(pos: Position, rules: Rules, p: Policy, qty: Decimal, level: int) -> bool:
    pos.quantity -= qty
    if level:
        pos.closed_by_ladder += qty
        by_target = 0
        for t in pos.targets:
            if t > pos.closed_by_ladder:
                break
            by_target += 1
        pos.done = max(pos.done, level, by_target)
    if pos.quantity <= 0:
        return True
    if p.breakeven_after is not None and pos.done >= p.breakeven_after:
        target = rules.price(pos.entry + pos.sign * p.breakeven_pct * pos.entry, up=pos.sign > 0)
        if pos.tighter(target, pos.stop):
            pos.stop, pos.stop_reason = target, "breakeven_stop"
    if p.ratchet and pos.done >= 2:
        previous = pos.levels[pos.done - 2]
        if pos.tighter(previous, pos.stop):
            pos.stop, pos.stop_reason = previous, "ratchet_stop"
    return False


def run_series(
    bars: dict[str, list[Any]],
    interval_ms: int,
    entries: list[tuple[int, int, float | None]],
    rules: Rules,
    policy: Policy,
    *,
    notional: Decimal,
    taker_fee: Decimal,
    leverage: int,
    stop_first: bool = True,
    one_per_symbol: bool = True,
) -> tuple[list[tuple[int, str, int, Decimal, Decimal]], int]:
    """Return the fills (trade, reason, time, price, quantity) and the evaluation count."""
    times, highs, lows, closes = bars["open_time"], bars["high"], bars["low"], bars["close"]
    # As the core does: the grid index of every price when all sit on the grid (within 1e-6
    # tick), the exact decimal when a bar is evaluated; else exact nearest-tick decimals.
    base_f, tick_f = float(rules.min_price), float(rules.tick)
    columns: dict[str, list[Any]] = {}
    for name in ("open", "high", "low", "close"):
        index = []
        for v in bars[name]:
            x = (v - base_f) / tick_f
            k = math.floor(x + 0.5)
            if abs(x - k) >= 1e-6:
                break
            index.append(k)
        if len(index) == len(bars[name]):
            columns[name] = index
        else:
            columns[name] = [rules.price_nearest(dec(v)) for v in bars[name]]

    def bar_price(name: str, i: int) -> Decimal:
        value = columns[name][i]
        if isinstance(value, Decimal):
            return value
        return rules.min_price + value * rules.tick

    n = len(times)
    segments, start = [], 0
    for i in range(1, n):
        if times[i] - times[i - 1] > interval_ms:
            segments.append((start, i))
            start = i
    if n:
        segments.append((start, n))
    atr_before: list[float | None] = [None] * n
    for s0, s1 in segments:
        state = Atr(policy.period)
        for i in range(s0, s1):
            atr_before[i] = state.value
            state.update(highs[i], lows[i], closes[i])
    fills: list[tuple[int, str, int, Decimal, Decimal]] = []
    pnl: dict[int, Decimal] = {}
    open_: list[tuple[int, Position]] = []
    cent = Decimal("0.00000001")

    def book(trade: int, pos: Position, reason: str, t: int, price: Decimal, qty: Decimal) -> None:
        fee = (taker_fee * price * qty).quantize(cent, ROUND_HALF_UP)
        pnl[trade] = pnl.get(trade, ZERO) + (price - pos.entry) * qty * pos.sign - fee
        fills.append((trade, reason, t, price, qty))

    evaluations, trade_id, e = 0, 0, 0

    def feed(trade: int, pos: Position, t: int, price: Decimal, atr: float | None) -> bool:
        for _ in range(64):
            action = on_mark(pos, rules, policy, price, atr, t)
            if action is None:
                return False
            qty, reason, _trigger, level = action
            qty = min(qty, pos.quantity)
            book(trade, pos, reason, t, price, qty)
            if confirm(pos, rules, policy, qty, level):
                return True
        return False

    for si, (s0, s1) in enumerate(segments):
        for i in range(s0, s1):
            t = times[i]
            while e < len(entries) and entries[e][0] <= t:
                when, sign, confidence = entries[e]
                e += 1
                if t - when >= interval_ms:
                    continue
                if any(one_per_symbol or pos.sign == sign for _, pos in open_):
                    continue
                price = bar_price("open", i)
                qty = rules.qty(notional / price)
                if qty <= 0 or qty < rules.min_qty or qty * price < rules.min_notional:
                    continue
                pos = open_position(
                    rules, policy, sign, qty, price, leverage, confidence, t, atr_before[i]
                )
                if pos.over_leveraged:
                    continue
                fee = (taker_fee * price * qty).quantize(cent, ROUND_HALF_UP)
                pnl[trade_id] = -fee
                fills.append((trade_id, "entry", t, price, qty))
                open_.append((trade_id, pos))
                trade_id += 1
            atr = atr_before[i]
            k = 0
            while k < len(open_):
                evaluations += 1
                trade, pos = open_[k]
                low_first = (pos.sign > 0) == stop_first
                o, h, lo, c = (bar_price(x, i) for x in ("open", "high", "low", "close"))
                first, second = (lo, h) if low_first else (h, lo)
                path = [
                    (t, o, True),
                    (t + interval_ms // 3, first, False),
                    (t + 2 * interval_ms // 3, second, False),
                    (t + interval_ms - 1, c, False),
                ]
                closed, prev = False, None
                for pt, price, jump in path:
                    if not jump and prev is not None:
                        a, b = prev[1], price
                        lo_, hi_ = (a, b) if a <= b else (b, a)
                        done = min(pos.done, len(pos.levels))
                        marks = [x for x in [pos.stop, *pos.levels[done:]] if lo_ < x < hi_]
                        marks.sort(reverse=a > b)
                        for mark in marks:
                            if feed(trade, pos, prev[0], mark, atr):
                                closed = True
                                break
                    if closed or feed(trade, pos, pt, price, atr):
                        closed = True
                        break
                    prev = (pt, price)
                if closed:
                    open_[k] = open_[-1]
                    open_.pop()
                    continue
                k += 1
        last = s1 - 1
        reason = "end_of_data" if si + 1 == len(segments) else "data_gap"
        for trade, pos in open_:
            book(
                trade,
                pos,
                reason,
                times[last] + interval_ms - 1,
                bar_price("close", last),
                pos.quantity,
            )
        open_ = []
    return fills, evaluations
