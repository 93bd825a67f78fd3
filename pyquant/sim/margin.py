"""Accounts and margin of the simulated venue: income, margin figures, brackets, liquidation price.

Reads the state of :class:`~pyquant.sim.state.VenueState` to answer what the account is worth
and what it may still open: unrealized PnL, initial and maintenance margin (one generic
leverage-bracket table, :data:`BRACKETS`), the totals of the balance and account endpoints and
the margin check, and Binance's liquidation price per leg (formula in
:mod:`pyquant.sim.exchange`). It also keeps the income history (``GET /fapi/v1/income``). It may
not place, fill or cancel orders, change a position or the wallet, or emit events: matching
(:mod:`pyquant.sim.matching`) and liquidation (:mod:`pyquant.sim.liquidation`) act on its
figures.
"""

from __future__ import annotations

from decimal import Decimal

from pyquant.sim.state import ZERO, Income, Order, Position, Trade, VenueState

__all__ = [
    "BRACKETS",
    "MAX_LEVERAGE",
    "AccountMargin",
    "bracket_of",
    "maint_margin",
    "max_notional_for",
]

MAX_LEVERAGE = 125

# One generic bracket table for every symbol: (floor, cap, max leverage, mmr, cum). The rows are
# Binance's published BTCUSDT leverage-and-margin tiers (first row = the docs' leverageBracket
# example; each cum = previous cum + floor x (mmr - previous mmr)); see pyquant/sim/SOURCES.md.
# We have no per-symbol tables, so every symbol uses these (documented simplification).
BRACKETS: tuple[tuple[int, int, int, Decimal, Decimal], ...] = (
    (0, 50_000, 125, Decimal("0.004"), Decimal(0)),
    (50_000, 600_000, 100, Decimal("0.005"), Decimal(50)),
    (600_000, 3_000_000, 75, Decimal("0.0065"), Decimal(950)),
    (3_000_000, 12_000_000, 50, Decimal("0.01"), Decimal(11450)),
    (12_000_000, 70_000_000, 25, Decimal("0.02"), Decimal(131450)),
    (70_000_000, 100_000_000, 20, Decimal("0.025"), Decimal(481450)),
    (100_000_000, 230_000_000, 10, Decimal("0.05"), Decimal(2981450)),
    (230_000_000, 480_000_000, 5, Decimal("0.1"), Decimal(14481450)),
    (480_000_000, 600_000_000, 4, Decimal("0.125"), Decimal(26481450)),
    (600_000_000, 800_000_000, 3, Decimal("0.15"), Decimal(41481450)),
    (800_000_000, 1_200_000_000, 2, Decimal("0.25"), Decimal(121481450)),
    (1_200_000_000, 1_800_000_000, 1, Decimal("0.5"), Decimal(421481450)),
)


def max_notional_for(leverage: int) -> int:
    """Return the largest notional allowed at ``leverage`` by the bracket table."""
    cap = BRACKETS[0][1]
    for _floor, bracket_cap, max_lev, _mmr, _cum in BRACKETS:
        if max_lev >= leverage:
            cap = bracket_cap
    return cap


def bracket_of(notional: Decimal) -> tuple[Decimal, Decimal]:
    """Return ``(maintMarginRatio, cum)`` of the bracket holding absolute ``notional``."""
    for floor, cap, _lev, mmr, cum in BRACKETS:
        if floor <= notional < cap:
            return mmr, cum
    return BRACKETS[-1][3], BRACKETS[-1][4]


def maint_margin(notional: Decimal) -> Decimal:
    """Return the maintenance margin of a position of absolute ``notional``."""
    mmr, cum = bracket_of(notional)
    return notional * mmr - cum


class AccountMargin(VenueState):
    """Margin figures, liquidation prices and income history of the account."""

    def unrealized(self, pos: Position) -> Decimal:
        """Unrealized PnL of one leg at the current mark."""
        if not pos.amount or pos.symbol not in self.marks:
            return ZERO
        return (self.marks[pos.symbol] - pos.entry_price) * pos.amount

    def position_margin(self, pos: Position) -> Decimal:
        """Initial margin held by one leg."""
        if not pos.amount or pos.symbol not in self.marks:
            return ZERO
        return abs(pos.amount) * self.marks[pos.symbol] / self.lev(pos.symbol)

    def order_margin(self, order: Order) -> Decimal:
        """Initial margin reserved by a resting order (reducing orders reserve nothing)."""
        if order.reduce_only or order.type != "LIMIT":
            return ZERO
        return order.price * order.remaining / self.lev(order.symbol)

    def totals(self) -> dict[str, Decimal]:
        """Account totals used by account/balance endpoints and the margin check."""
        unrealized = sum((self.unrealized(p) for p in self.positions.values()), ZERO)
        pos_margin = sum((self.position_margin(p) for p in self.positions.values()), ZERO)
        order_margin = sum((self.order_margin(o) for o in self.open_orders()), ZERO)
        maint = sum(
            (
                maint_margin(abs(p.amount) * self.marks.get(p.symbol, ZERO))
                for p in self.positions.values()
                if p.amount
            ),
            ZERO,
        )
        margin_balance = self.wallet + unrealized
        available = margin_balance - pos_margin - order_margin
        return {
            "wallet": self.wallet,
            "unrealized": unrealized,
            "margin_balance": margin_balance,
            "position_margin": pos_margin,
            "order_margin": order_margin,
            "initial_margin": pos_margin + order_margin,
            "maint_margin": maint,
            "available": available,
            "max_withdraw": max(ZERO, min(self.wallet, available)),
        }

    def liquidation_price(self, symbol: str, side: str) -> Decimal:
        """Liquidation price of the leg ``(symbol, side)``; 0 when flat or never liquidated.

        Binance's formula (in :mod:`pyquant.sim.exchange`): cross legs of the symbol share one
        price, computed from the cross wallet and the other symbols' cross legs; an isolated
        leg's price comes from its isolated wallet alone. The bracket is the one of each leg's
        notional at the liquidation price, found by recomputing until it no longer changes.
        """
        return self._liquidation(symbol, side)[0]

    def _liquidation(self, symbol: str, side: str) -> tuple[Decimal, int]:
        """Return the liquidation price and the way the mark reaches it (-1 down, +1 up)."""
        pos = self.positions.get((symbol, side))
        if pos is None or not pos.amount:
            return ZERO, 0
        if self.isolated(symbol):
            legs = [pos]
            base = pos.isolated_wallet
        else:
            legs = [
                leg
                for s in self.legs()
                if (leg := self.positions.get((symbol, s))) is not None and leg.amount
            ]
            base = self.wallet - sum((p.isolated_wallet for p in self.positions.values()), ZERO)
            for other in self.positions.values():
                if other.amount and other.symbol != symbol and not self.isolated(other.symbol):
                    mark = self.marks.get(other.symbol, other.entry_price)
                    base += self.unrealized(other) - maint_margin(abs(other.amount) * mark)
        price = self.marks.get(symbol, pos.entry_price)
        result, direction = ZERO, 0
        for _ in range(len(BRACKETS) + 1):
            # margin balance at price P is numerator - P x denominator; liquidation where it is 0
            numerator, denominator = base, ZERO
            for leg in legs:
                mmr, cum = bracket_of(abs(leg.amount) * price)
                numerator += cum - leg.amount * leg.entry_price
                denominator += abs(leg.amount) * mmr - leg.amount
            if denominator == 0:
                return ZERO, 0
            result = numerator / denominator
            direction = -1 if denominator < 0 else 1
            if result <= 0:
                return ZERO, 0
            if all(
                bracket_of(abs(leg.amount) * result) == bracket_of(abs(leg.amount) * price)
                for leg in legs
            ):
                break
            price = result
        return result, direction

    def _add_income(
        self, symbol: str, kind: str, amount: Decimal, time: int, trade_id: int | None = None
    ) -> None:
        self.income.append(Income(next(self._tran_ids), symbol, kind, amount, time, trade_id))
        if len(self.income) > 10_000:
            del self.income[: len(self.income) - 10_000]

    def _trade_income(self, trade: Trade) -> None:
        if trade.realized_pnl:
            self._add_income(
                trade.symbol, "REALIZED_PNL", trade.realized_pnl, trade.time, trade.trade_id
            )
        if trade.commission:
            self._add_income(
                trade.symbol, "COMMISSION", -trade.commission, trade.time, trade.trade_id
            )

    def income_history(
        self,
        symbol: str | None = None,
        income_type: str | None = None,
        start: int | None = None,
        end: int | None = None,
    ) -> list[Income]:
        """Account flows, oldest first, filtered as ``GET /fapi/v1/income``."""
        return [
            i
            for i in self.income
            if symbol in (None, i.symbol)
            and income_type in (None, i.income_type)
            and (start is None or i.time >= start)
            and (end is None or i.time <= end)
        ]
