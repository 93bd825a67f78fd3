"""Liquidation and funding of the simulated venue: the two ways the venue moves an account itself.

Funding (when enabled) charges every open leg ``positionAmt x mark x fundingRate`` at each
funding time (00/08/16 UTC) on the first price update at or after it, with its
``ACCOUNT_UPDATE`` ``m=FUNDING_FEE``; liquidation (when enabled) closes every leg whose mark
reached its liquidation price (from :mod:`pyquant.sim.margin`) with an ``autoclose-`` order
filled through the matching layer's fill and event code. Rules in :mod:`pyquant.sim.exchange`.
It may not compute margin figures or validate requests, and it does not touch algo orders:
their reaction to a position change is the algo layer's hook.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from pyquant.sim.matching import Matching
from pyquant.sim.state import (
    FUNDING_INTERVAL_MS,
    ZERO,
    Order,
    Position,
    next_funding_after,
    order_log,
)
from pyquant.sim.validation import fmt_decimal, plain

__all__ = ["FUNDING_INTERVAL_MS", "LiquidationAndFunding"]


class LiquidationAndFunding(Matching):
    """Funding rates and settlement, liquidation of crossed legs."""

    def funding_rate_of(self, symbol: str) -> Decimal:
        """The funding rate charged (and served as ``lastFundingRate``) for ``symbol``."""
        return self.funding_rates.get(symbol, self.funding_rate)

    def set_funding_rate(self, symbol: str, rate: Decimal) -> None:
        """Set ``symbol``'s funding rate (positive: longs pay shorts)."""
        self.rule(symbol)
        self.funding_rates[symbol] = rate

    def next_funding_time(self) -> int:
        """``nextFundingTime``: the next funding settlement (00/08/16 UTC), in ms."""
        if self.funding:
            return self._next_funding  # a passed time stays until the next price update settles it
        return next_funding_after(self.now_ms())

    def _settle_funding(self) -> None:
        """Charge every funding time that has passed (only the first update after it)."""
        now = self.now_ms()
        while now >= self._next_funding:
            at = self._next_funding
            self._next_funding += FUNDING_INTERVAL_MS
            if not self.funding:
                continue
            for pos in list(self.positions.values()):
                if not pos.amount or pos.symbol not in self.marks:
                    continue
                self._charge_funding(pos, at, now)

    def _charge_funding(self, pos: Position, at: int, now: int) -> None:
        mark = self.marks[pos.symbol]
        rate = self.funding_rate_of(pos.symbol)
        income = -(pos.amount * mark * rate)  # longs pay a positive rate, shorts receive it
        self.wallet += income
        self.balance_update_time = now
        isolated = self.isolated(pos.symbol)
        if isolated:
            pos.isolated_wallet += income
        self._add_income(pos.symbol, "FUNDING_FEE", income, at)
        self._record(
            "funding",
            symbol=pos.symbol,
            positionSide=pos.side,
            fundingTime=at,
            positionAmt=plain(pos.amount),
            markPrice=plain(mark),
            fundingRate=plain(rate),
            income=plain(income),
        )
        wallet = fmt_decimal(self.wallet, 8)
        legs: list[dict[str, Any]] = []
        if isolated:
            legs.append(
                {
                    "s": pos.symbol,
                    "pa": plain(pos.amount),
                    "ep": plain(pos.entry_price),
                    "bep": plain(pos.break_even()),
                    "cr": fmt_decimal(pos.realized, 8),
                    "up": fmt_decimal(self.unrealized(pos), 8),
                    "mt": "isolated",
                    "iw": fmt_decimal(pos.isolated_wallet, 8),
                    "ps": pos.side,
                }
            )
        self._emit(
            {
                "e": "ACCOUNT_UPDATE",
                "E": now,
                "T": at,
                "a": {
                    "m": "FUNDING_FEE",
                    "B": [{"a": "USDT", "wb": wallet, "cw": wallet, "bc": fmt_decimal(income, 8)}],
                    "P": legs,
                },
            }
        )

    def _liquidate_crossed(self) -> None:
        """Close every leg whose mark reached its liquidation price (cross legs move others)."""
        for _ in range(len(self.positions) + 1):
            crossed = None
            for (symbol, side), pos in self.positions.items():
                if not pos.amount or symbol not in self.marks:
                    continue
                price, direction = self._liquidation(symbol, side)
                mark = self.marks[symbol]
                if price > 0 and (mark <= price if direction < 0 else mark >= price):
                    crossed = (symbol, side, price)
                    break
            if crossed is None:
                return
            symbol, side, price = crossed
            sides = (side,) if self.isolated(symbol) else self.legs()
            for order in self.open_orders(symbol):
                if order.position_side in sides:  # an isolated hedge leg keeps the other's
                    self._finish(order, "EXPIRED", "EXPIRED", reason=5)
            for leg_side in sides:
                leg = self.positions.get((symbol, leg_side))
                if leg is not None and leg.amount:
                    self._liquidate(leg, price)

    def _liquidate(self, pos: Position, liquidation_price: Decimal) -> None:
        """Fill an ``autoclose-`` MARKET order closing ``pos`` at the mark (events and log)."""
        rules = self.rules[pos.symbol]
        now = self.now_ms()
        mark = self.marks[pos.symbol]
        side = "SELL" if pos.amount > 0 else "BUY"
        qty = abs(pos.amount)
        price = self._taker_price(rules, side, mark)
        order = Order(
            order_id=next(self._order_ids),
            symbol=pos.symbol,
            client_order_id=f"autoclose-{now}{next(self._autoclose_ids):04d}",
            side=side,
            position_side=pos.side,
            type="MARKET",
            orig_type="LIQUIDATION",
            time_in_force="GTC",
            price=ZERO,
            orig_qty=qty,
            reduce_only=False,  # as Binance's liquidation events show (sample R=false)
            close_position=False,
            time=now,
            update_time=now,
        )
        self.orders[order.order_id] = order
        self._record("order", **order_log(order))
        self._record(
            "liquidation",
            orderId=order.order_id,
            clientOrderId=order.client_order_id,
            symbol=pos.symbol,
            positionSide=pos.side,
            liquidationPrice=plain(liquidation_price),
            markPrice=plain(mark),
            qty=plain(qty),
        )
        self._order_event(order, "NEW")
        fee = price * qty * (rules.liquidation_fee or self.taker_fee)
        self._fill(order, price, qty, fee, now, maker=False, exec_type="CALCULATED")
