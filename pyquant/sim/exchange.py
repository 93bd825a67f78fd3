"""Matching and account state of the simulated Binance USDⓈ-M futures venue (pure logic, no I/O).

Everything here is plain code over :class:`~decimal.Decimal` values, driven by an injected clock
and by price updates pushed in by the replay; nothing reads the wall clock, sleeps or touches a
socket, so every scenario replays exactly and is testable without a server.

Fill rules (contract section 9):

* **Reference price.** Each symbol has a mark price (the replayed path) and a last price (equal to
  the mark unless a test sets it apart). There is no order book.
* **MARKET** orders fill at once and completely at ``mark ± slippage_ticks x tickSize`` (BUY
  above, SELL below, rounded to a tick in the adverse direction), taker fee. A reference price
  outside ``mark x (1 ± marketTakeBound)`` is ``-4131``. ``newOrderRespType=RESULT`` answers with
  the final state; ``ACK`` answers ``NEW`` and the fill follows on the user stream.
* **LIMIT** orders that would cross on arrival (BUY limit >= reference, SELL limit <= reference)
  fill at once as taker at the better of limit and reference; ``GTX`` is rejected with ``-5022``;
  ``IOC`` expires when it cannot fill, ``FOK`` is rejected with ``-5021``. Resting orders fill
  completely at their limit price, maker fee, when the mark crosses them (BUY when mark <= limit,
  SELL when mark >= limit). ``GTD`` orders expire at ``goodTillDate``.
* **Positions.** One-way mode nets one signed ``BOTH`` position per symbol; crossing zero flips it
  and the remainder opens at the fill price. Hedge mode keeps ``LONG`` and ``SHORT`` legs;
  ``SELL+LONG``/``BUY+SHORT`` only reduce (reported as ``reduceOnly: true``), are ``-2022`` on an
  empty leg and are clipped to the leg. Entry price is the size-weighted average of opening fills;
  realized PnL on reducing fills is accumulated into the wallet, fees are charged from it.
* **reduceOnly** (one-way): ``-2022`` when the position is flat or on the order's side; a larger
  MARKET order fills up to the position and expires the rest; a resting reduce-only LIMIT that
  no longer fits the position is expired (``er`` = 4).
* **MIN_NOTIONAL** is not applied to reduce-only, closing (hedge) or ``closePosition`` orders.
* **Conditional orders** live only on the algo endpoints (``/fapi/v1/order`` answers ``-4120``).
  Each price update checks every ``NEW`` algo order against its ``workingType`` price
  (``MARK_PRICE`` mark, ``CONTRACT_PRICE`` last) with the rules of contract 3.2; on trigger it
  emits ``TRIGGERING``, places the child (MARKET for ``*_MARKET`` and trailing, LIMIT GTC at
  ``price`` for STOP/TAKE_PROFIT) whose ``ORDER_TRADE_UPDATE``s (NEW, and the fill of a MARKET
  child) come next, then ``TRIGGERED`` with ``ai`` and ``FINISHED`` once the child is final
  (contract 2.5, from live traffic). ``ALGO_UPDATE`` carries ``rm`` (why it was rejected or
  expired) and ``ia`` (trailing activated). A stop the trigger price is already through is
  ``-2021``; a second resting ``closePosition`` order of one type in one direction (the order's
  side in one-way mode, its ``positionSide`` in hedge mode) is ``-4130``, while a take-profit
  beside a stop and sized stops beside a close-all are accepted (contract 2.5).
  ``closePosition`` children close what the leg holds at trigger time; on a flat leg
  the algo order ends ``EXPIRED`` without a child. ``GTE_GTC`` algo orders expire when their
  position goes flat; other ``closePosition`` orders stay open (as on Binance).
* **Margin.** Initial margin = notional / leverage, checked (``-2019``) for the opening part of a
  new order against ``wallet + unrealized PnL - position margin - open-order margin``; no margin
  check for algo orders until they trigger. An ``ISOLATED`` leg's isolated wallet is the initial
  margin of its opening fills (``price x qty / leverage``), released pro rata by reducing fills
  and moved by its funding fees; it is what its liquidation price is computed from.
* **Liquidation price** (Binance FAQ "How to Calculate Liquidation Price of USDⓈ-M Futures
  Contracts"), per symbol::

      LP = (WB - TMM1 + UPNL1 + cumB + cumL + cumS
            - Side1BOTH x Position1BOTH x EP1BOTH - Position1LONG x EP1LONG
            + Position1SHORT x EP1SHORT)
         / (Position1BOTH x MMRB + Position1LONG x MMRL + Position1SHORT x MMRS
            - Side1BOTH x Position1BOTH - Position1LONG + Position1SHORT)

  Cross: ``WB`` is the cross wallet (wallet minus every isolated wallet), ``TMM1``/``UPNL1`` the
  maintenance margin and unrealized PnL of the other symbols' cross legs, and both hedge legs of
  the symbol enter together (they share one price). Isolated: ``WB`` is the leg's isolated
  wallet, ``TMM1 = UPNL1 = 0`` and only that leg enters. ``MMR``/``cum`` come from the bracket of
  the leg's notional at the liquidation price (the FAQ's note: recompute when the bracket at the
  liquidation price differs from the current one). A result <= 0 means no liquidation price
  (reported ``"0"``, as Binance does for a well-funded cross long).
* **Liquidation** (``liquidation=True``; off by default): after each price update, a leg whose
  mark reached its liquidation price (long: mark <= LP, short: mark >= LP) is closed: the open
  normal orders of the liquidated legs expire (``er`` = 5), an ``autoclose-…`` MARKET order
  (``ot`` ``LIQUIDATION``) fills the whole leg at the mark (rounded a tick against it) with
  the symbol's exchangeInfo ``liquidationFee`` rate as commission (the clearance fee); events
  ``ORDER_TRADE_UPDATE`` ``x=NEW``, then ``x=CALCULATED`` ``X=FILLED`` with the fill, then
  ``ACCOUNT_UPDATE`` ``m=ORDER`` (no ``TRADE_LITE``). Cross hedge legs of the symbol go together.
* **Funding** (``funding=True``; off by default): at each funding time (every 8 h, aligned to
  00/08/16 UTC, on the first price update at or after it) every open leg is charged
  ``positionAmt x mark x fundingRate`` (longs pay a positive rate); one ``ACCOUNT_UPDATE``
  ``m=FUNDING_FEE`` per leg, ``T`` = the funding time, ``B`` only for cross, ``B`` plus the leg
  for isolated (whose isolated wallet pays), and a ``funding`` order-log entry.

Simplifications: one account; the cross wallet reported (``cw``, ``crossWalletBalance``) is the
whole wallet and available balance does not set isolated margin apart; no partial liquidation,
no insurance fund (a liquidation past bankruptcy leaves the wallet short), no ADL; one generic
leverage bracket table for every symbol (:data:`BRACKETS`); one funding rate for every symbol
unless set per symbol; resting LIMIT orders fill completely (no partial fills); no self-trade
prevention (the mode is echoed); ``priceMatch`` is echoed, not applied.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from pyquant.sim.validation import (
    MSG,
    BinanceError,
    SymbolRules,
    check_client_id,
    fmt_decimal,
    parse_bool,
    parse_decimal,
    parse_required,
    plain,
)

__all__ = ["AlgoOrder", "Exchange", "Income", "Order", "Position"]

ZERO = Decimal(0)
CONDITIONAL_TYPES = frozenset(
    {"STOP", "STOP_MARKET", "TAKE_PROFIT", "TAKE_PROFIT_MARKET", "TRAILING_STOP_MARKET"}
)
ORDER_TYPES = frozenset({"LIMIT", "MARKET"}) | CONDITIONAL_TYPES
TIME_IN_FORCE = frozenset({"GTC", "IOC", "FOK", "GTX", "GTD"})
FINAL_STATUSES = frozenset({"FILLED", "CANCELED", "EXPIRED", "REJECTED", "EXPIRED_IN_MATCH"})
LISTEN_KEY_TTL_MS = 60 * 60 * 1000
FUNDING_INTERVAL_MS = 8 * 3_600_000
DEFAULT_FUNDING_RATE = Decimal("0.0001")
MAX_LEVERAGE = 125
DEFAULT_LEVERAGE = 20

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


@dataclass
class Order:
    """One order of the matching engine (normal orders and triggered algo children)."""

    order_id: int
    symbol: str
    client_order_id: str
    side: str
    position_side: str
    type: str
    orig_type: str
    time_in_force: str
    price: Decimal
    orig_qty: Decimal
    reduce_only: bool
    close_position: bool
    time: int
    update_time: int
    stop_price: Decimal = ZERO
    working_type: str = "CONTRACT_PRICE"
    price_protect: bool = False
    price_match: str = "NONE"
    stp_mode: str = "EXPIRE_MAKER"
    good_till_date: int = 0
    status: str = "NEW"
    executed_qty: Decimal = ZERO
    cum_quote: Decimal = ZERO
    expire_reason: int = 0
    algo_id: int | None = None

    @property
    def avg_price(self) -> Decimal:
        """Average fill price, 0 before any fill."""
        return self.cum_quote / self.executed_qty if self.executed_qty else ZERO

    @property
    def remaining(self) -> Decimal:
        """Quantity still open."""
        return self.orig_qty - self.executed_qty

    @property
    def is_open(self) -> bool:
        """True while the order can still fill."""
        return self.status in ("NEW", "PARTIALLY_FILLED")

    def wire(
        self, rules: SymbolRules, *, with_cum_qty: bool = True, with_time: bool = False
    ) -> dict[str, Any]:
        """Render the order object of ``/fapi/v1/order`` responses."""
        out: dict[str, Any] = {
            "orderId": self.order_id,
            "symbol": self.symbol,
            "status": self.status,
            "clientOrderId": self.client_order_id,
            "price": rules.fmt_price(self.price),
            "avgPrice": rules.fmt_price(self.avg_price) if self.executed_qty else "0.00",
            "origQty": rules.fmt_qty(self.orig_qty),
            "executedQty": rules.fmt_qty(self.executed_qty),
        }
        if with_cum_qty:
            out["cumQty"] = rules.fmt_qty(self.executed_qty)
        out.update(
            {
                "cumQuote": fmt_decimal(self.cum_quote, rules.quote_places),
                "timeInForce": self.time_in_force,
                "type": self.type,
                "reduceOnly": self.reduce_only,
                "closePosition": self.close_position,
                "side": self.side,
                "positionSide": self.position_side,
                "stopPrice": rules.fmt_price(self.stop_price),
                "workingType": self.working_type,
                "priceProtect": self.price_protect,
                "origType": self.orig_type,
                "priceMatch": self.price_match,
                "selfTradePreventionMode": self.stp_mode,
                "goodTillDate": self.good_till_date,
            }
        )
        if with_time:
            out["time"] = self.time
        out["updateTime"] = self.update_time
        return out


@dataclass
class AlgoOrder:
    """One conditional order held by the Algo Service until it triggers."""

    algo_id: int
    client_algo_id: str
    symbol: str
    side: str
    position_side: str
    order_type: str
    time_in_force: str
    quantity: Decimal
    price: Decimal
    trigger_price: Decimal
    working_type: str
    price_protect: bool
    close_position: bool
    reduce_only: bool
    create_time: int
    update_time: int
    activate_price: Decimal = ZERO
    callback_rate: Decimal = ZERO
    price_match: str = "NONE"
    stp_mode: str = "EXPIRE_MAKER"
    good_till_date: int = 0
    status: str = "NEW"
    actual_order_id: str = ""
    actual_price: Decimal = ZERO
    actual_qty: Decimal = ZERO
    trigger_time: int = 0
    # why the Algo Service rejected or expired it (ALGO_UPDATE ``rm``); empty otherwise
    reason: str = ""
    # trailing state: extreme price seen since activation (None until activated)
    extreme: Decimal | None = None

    def wire(self, rules: SymbolRules) -> dict[str, Any]:
        """Render the algo order object of ``/fapi/v1/algoOrder`` and ``openAlgoOrders``."""
        return {
            "algoId": self.algo_id,
            "clientAlgoId": self.client_algo_id,
            "algoType": "CONDITIONAL",
            "orderType": self.order_type,
            "symbol": self.symbol,
            "side": self.side,
            "positionSide": self.position_side,
            "timeInForce": self.time_in_force,
            "quantity": rules.fmt_qty(self.quantity) if not self.close_position else "0.0",
            "algoStatus": self.status,
            "actualOrderId": self.actual_order_id,
            "actualPrice": rules.fmt_price(self.actual_price),
            "triggerPrice": rules.fmt_price(self.trigger_price),
            "price": rules.fmt_price(self.price),
            "icebergQuantity": None,
            "tpTriggerPrice": "0.0000",
            "tpPrice": "0.0000",
            "slTriggerPrice": "0.0000",
            "slPrice": "0.0000",
            "tpOrderType": "",
            "selfTradePreventionMode": self.stp_mode,
            "workingType": self.working_type,
            "priceMatch": self.price_match,
            "closePosition": self.close_position,
            "priceProtect": self.price_protect,
            "reduceOnly": self.reduce_only,
            "activatePrice": rules.fmt_price(self.activate_price)
            if self.order_type == "TRAILING_STOP_MARKET"
            else "",
            "callbackRate": plain(self.callback_rate)
            if self.order_type == "TRAILING_STOP_MARKET"
            else "",
            "createTime": self.create_time,
            "updateTime": self.update_time,
            "triggerTime": self.trigger_time,
            "goodTillDate": self.good_till_date,
        }


@dataclass
class Position:
    """One position leg: ``BOTH`` (one-way) or ``LONG``/``SHORT`` (hedge)."""

    symbol: str
    side: str
    amount: Decimal = ZERO  # signed: > 0 long, < 0 short
    entry_price: Decimal = ZERO
    realized: Decimal = ZERO  # accumulated realized PnL (ACCOUNT_UPDATE 'cr')
    fees: Decimal = ZERO  # fees paid while open (break-even price)
    update_time: int = 0
    isolated_wallet: Decimal = ZERO  # ISOLATED legs only: margin set aside for the leg

    def break_even(self) -> Decimal:
        """Entry price moved by the fees paid on the open quantity."""
        if not self.amount:
            return ZERO
        return self.entry_price + self.fees / self.amount


@dataclass
class Trade:
    """One fill, as ``GET /fapi/v1/userTrades`` reports it."""

    trade_id: int
    order_id: int
    symbol: str
    side: str
    position_side: str
    price: Decimal
    qty: Decimal
    realized_pnl: Decimal
    commission: Decimal
    time: int
    maker: bool


@dataclass
class Income:
    """One account flow, as ``GET /fapi/v1/income`` reports it."""

    tran_id: int
    symbol: str
    income_type: str  # REALIZED_PNL, COMMISSION or FUNDING_FEE
    income: Decimal
    time: int
    trade_id: int | None = None


@dataclass
class ListenKey:
    """An active user-data listenKey and when it lapses."""

    key: str
    expires_at: int


@dataclass
class _Fill:
    price: Decimal
    qty: Decimal
    maker: bool


class Exchange:
    """The venue's account and matching state for one account (see the module docstring).

    Args:
        rules: Symbol rules by symbol, from the served exchangeInfo.
        now_ms: The exchange clock (event time), injected so tests and replays are exact.
        balance: Starting USDT wallet balance.
        position_mode: ``"one-way"`` or ``"hedge"``.
        maker_fee: Maker fee rate (0.0002 = 0.02 %).
        taker_fee: Taker fee rate.
        slippage_ticks: Ticks a MARKET fill moves away from the mark, against the taker.
        liquidation: Close legs whose mark reaches their liquidation price.
        funding: Charge funding fees every 8 h of exchange time.
        funding_rate: The funding rate of every symbol (``lastFundingRate``); per-symbol rates
            can be set with :meth:`set_funding_rate`.
    """

    def __init__(
        self,
        rules: dict[str, SymbolRules],
        now_ms: Callable[[], int],
        *,
        balance: Decimal = Decimal(10_000),
        position_mode: str = "one-way",
        maker_fee: Decimal = Decimal("0.0002"),
        taker_fee: Decimal = Decimal("0.0005"),
        slippage_ticks: int = 0,
        liquidation: bool = False,
        funding: bool = False,
        funding_rate: Decimal = DEFAULT_FUNDING_RATE,
    ) -> None:
        if position_mode not in ("one-way", "hedge"):
            raise ValueError(f"position_mode {position_mode!r} found: must be one-way or hedge")
        self.rules = rules
        self.now_ms = now_ms
        self.wallet = balance
        self.dual = position_mode == "hedge"
        self.maker_fee = maker_fee
        self.taker_fee = taker_fee
        self.slippage_ticks = slippage_ticks
        self.leverage: dict[str, int] = {}
        self.margin_type: dict[str, str] = {}
        self.positions: dict[tuple[str, str], Position] = {}
        self.orders: dict[int, Order] = {}
        self.algo_orders: dict[int, AlgoOrder] = {}
        self.trades: list[Trade] = []
        self.marks: dict[str, Decimal] = {}
        self.lasts: dict[str, Decimal] = {}
        self.listen_key: ListenKey | None = None
        self._order_ids = itertools.count(8_389_765_000_000)
        self._algo_ids = itertools.count(1_000_000_000_000)
        self._trade_ids = itertools.count(100_000_000)
        self._events: list[dict[str, Any]] = []
        self.log: list[dict[str, Any]] = []
        self.balance_update_time = 0
        self.liquidation = liquidation
        self.funding = funding
        self.funding_rate = funding_rate
        self.funding_rates: dict[str, Decimal] = {}
        self._next_funding = _next_funding_after(now_ms())
        self._autoclose_ids = itertools.count(1)
        self.income: list[Income] = []
        self._tran_ids = itertools.count(9_000_000_000)

    # --- plumbing -----------------------------------------------------------------------

    def drain_events(self) -> list[dict[str, Any]]:
        """Return and clear the user-data events produced since the last call."""
        out, self._events = self._events, []
        return out

    def _emit(self, event: dict[str, Any]) -> None:
        self._events.append(event)

    def _record(self, kind: str, **data: object) -> None:
        self.log.append({"kind": kind, "time": self.now_ms(), **data})

    def rule(self, symbol: str | None) -> SymbolRules:
        """Return the rules of ``symbol`` or raise ``-1121`` (``-1102`` when missing)."""
        if not symbol:
            raise BinanceError(-1102, name="symbol")
        found = self.rules.get(symbol)
        if found is None:
            raise BinanceError(-1121)
        return found

    def mark(self, symbol: str) -> Decimal:
        """Current mark price of ``symbol``."""
        return self.marks[symbol]

    def last(self, symbol: str) -> Decimal:
        """Current last (contract) price of ``symbol``."""
        return self.lasts.get(symbol, self.marks[symbol])

    def position(self, symbol: str, side: str) -> Position:
        """Return (creating if needed) the position leg ``(symbol, side)``."""
        key = (symbol, side)
        pos = self.positions.get(key)
        if pos is None:
            pos = self.positions[key] = Position(symbol, side)
        return pos

    def lev(self, symbol: str) -> int:
        """Leverage of ``symbol`` (default 20)."""
        return self.leverage.get(symbol, DEFAULT_LEVERAGE)

    def open_orders(self, symbol: str | None = None) -> list[Order]:
        """Open normal orders, optionally of one symbol, oldest first."""
        return [o for o in self.orders.values() if o.is_open and symbol in (None, o.symbol)]

    def open_algo_orders(self, symbol: str | None = None) -> list[AlgoOrder]:
        """Open (``NEW``) algo orders, optionally of one symbol."""
        return [
            a for a in self.algo_orders.values() if a.status == "NEW" and symbol in (None, a.symbol)
        ]

    def isolated(self, symbol: str) -> bool:
        """True when ``symbol`` trades with ISOLATED margin."""
        return self.margin_type.get(symbol) == "ISOLATED"

    def legs(self) -> tuple[str, ...]:
        """The position sides that exist in the current mode."""
        return ("LONG", "SHORT") if self.dual else ("BOTH",)

    # --- account figures ----------------------------------------------------------------

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

        Binance's formula (module docstring): cross legs of the symbol share one price, computed
        from the cross wallet and the other symbols' cross legs; an isolated leg's price comes
        from its isolated wallet alone. The bracket is the one of each leg's notional at the
        liquidation price, found by recomputing until it no longer changes.
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
        return _next_funding_after(self.now_ms())

    # --- configuration endpoints -------------------------------------------------------

    def set_position_mode(self, dual: bool) -> None:
        """``POST /fapi/v1/positionSide/dual`` (``-4059``/``-4068``/``-4067``)."""
        if dual == self.dual:
            raise BinanceError(-4059)
        if any(p.amount for p in self.positions.values()):
            raise BinanceError(-4068)
        if self.open_orders() or self.open_algo_orders():
            raise BinanceError(-4067)
        self.dual = dual
        self._record("config", positionMode="hedge" if dual else "one-way")

    def set_leverage(self, symbol: str, raw: str | None) -> dict[str, Any]:
        """``POST /fapi/v1/leverage``; emits ``ACCOUNT_CONFIG_UPDATE``."""
        self.rule(symbol)
        if raw is None or raw == "":
            raise BinanceError(-1102, name="leverage")
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_LEVERAGE:
            raise BinanceError(-4028, value=raw)
        value = int(raw)
        self.leverage[symbol] = value
        now = self.now_ms()
        self._emit(
            {"e": "ACCOUNT_CONFIG_UPDATE", "E": now, "T": now, "ac": {"s": symbol, "l": value}}
        )
        return {
            "leverage": value,
            "maxNotionalValue": str(max_notional_for(value)),
            "symbol": symbol,
        }

    def set_margin_type(self, symbol: str, raw: str | None) -> None:
        """``POST /fapi/v1/marginType`` (``-4046``/``-4048``/``-4047``)."""
        self.rule(symbol)
        if raw is None or raw == "":
            raise BinanceError(-1102, name="marginType")
        wanted = raw.upper()
        if wanted == "CROSS":
            wanted = "CROSSED"
        if wanted not in ("ISOLATED", "CROSSED"):
            raise BinanceError(-1130)
        if self.margin_type.get(symbol, "CROSSED") == wanted:
            raise BinanceError(-4046)
        if any(p.amount for (s, _), p in self.positions.items() if s == symbol):
            raise BinanceError(-4048)
        if self.open_orders(symbol) or self.open_algo_orders(symbol):
            raise BinanceError(-4047)
        self.margin_type[symbol] = wanted

    # --- listen keys ----------------------------------------------------------------------

    def create_listen_key(self) -> str:
        """``POST /fapi/v1/listenKey``: the active key (extended) or a new one."""
        now = self.now_ms()
        if self.listen_key is None or self.listen_key.expires_at <= now:
            self.listen_key = ListenKey(secrets.token_urlsafe(48)[:64], now + LISTEN_KEY_TTL_MS)
        else:
            self.listen_key.expires_at = now + LISTEN_KEY_TTL_MS
        return self.listen_key.key

    def keepalive_listen_key(self, key: str | None = None) -> str:
        """``PUT /fapi/v1/listenKey``: extend by 60 minutes, ``-1125`` when none is active."""
        now = self.now_ms()
        active = self.listen_key
        if active is None or active.expires_at <= now or (key and key != active.key):
            raise BinanceError(-1125)
        active.expires_at = now + LISTEN_KEY_TTL_MS
        return active.key

    def delete_listen_key(self) -> str | None:
        """``DELETE /fapi/v1/listenKey``: invalidate the active key; returns it."""
        key = self.listen_key.key if self.listen_key else None
        self.listen_key = None
        return key

    def expire_listen_key(self, force: bool = False) -> str | None:
        """Expire the active key if its time has come (or now with ``force``); returns it."""
        active = self.listen_key
        if active is None:
            return None
        if force or active.expires_at <= self.now_ms():
            self.listen_key = None
            return active.key
        return None

    def listen_key_valid(self, key: str) -> bool:
        """True when ``key`` is the active, unexpired listenKey."""
        active = self.listen_key
        return active is not None and active.key == key and active.expires_at > self.now_ms()

    # --- order lookup ---------------------------------------------------------------------

    def find_order(self, symbol: str, order_id: str | None, client_id: str | None) -> Order:
        """Find an order by id or client id (latest with that id), ``-2013`` when unknown."""
        self.rule(symbol)
        if not order_id and not client_id:
            raise BinanceError(-1102, name="orderId")
        if order_id:
            if not order_id.isdigit():
                raise BinanceError(-1102, name="orderId")
            found = self.orders.get(int(order_id))
            if found is None or found.symbol != symbol:
                raise BinanceError(-2013)
            return found
        for order in reversed(list(self.orders.values())):
            if order.symbol == symbol and order.client_order_id == client_id:
                return order
        raise BinanceError(-2013)

    def cancel_order(self, symbol: str, order_id: str | None, client_id: str | None) -> Order:
        """``DELETE /fapi/v1/order``: cancel an open order, ``-2011`` when not open."""
        try:
            order = self.find_order(symbol, order_id, client_id)
        except BinanceError as exc:
            if exc.code == -2013:
                raise BinanceError(-2011) from None
            raise
        if not order.is_open:
            raise BinanceError(-2011)
        self._finish(order, "CANCELED", "CANCELED")
        return order

    def cancel_all(self, symbol: str) -> None:
        """``DELETE /fapi/v1/allOpenOrders``: cancel every open normal order of the symbol."""
        self.rule(symbol)
        for order in self.open_orders(symbol):
            self._finish(order, "CANCELED", "CANCELED")

    # --- new orders -----------------------------------------------------------------------

    def _mode_params(self, p: dict[str, str], conditional: bool) -> tuple[str, bool]:
        position_side = (p.get("positionSide") or "").upper()
        raw_reduce = p.get("reduceOnly")
        if self.dual:
            if position_side not in ("LONG", "SHORT"):
                raise BinanceError(-4061)
            if raw_reduce is not None and raw_reduce != "":
                raise BinanceError(-1106, name="reduceonly")
            return position_side, False
        if position_side not in ("", "BOTH"):
            raise BinanceError(-4061)
        return "BOTH", parse_bool("reduceOnly", raw_reduce)

    def _client_id(self, symbol: str, raw: str | None, prefix: str) -> str:
        if raw is None or raw == "":
            return prefix + secrets.token_hex(11)
        check_client_id("newClientOrderId", raw)
        for order in self.open_orders(symbol):
            if order.client_order_id == raw:
                raise BinanceError(-4116)
        for algo in self.open_algo_orders(symbol):
            if algo.client_algo_id == raw:
                raise BinanceError(-4116)
        return raw

    def _reducing(self, symbol: str, side: str, position_side: str) -> tuple[bool, Decimal]:
        """Is an order on this leg reducing, and how much can it reduce."""
        if position_side == "LONG":
            return side == "SELL", self.position(symbol, "LONG").amount
        if position_side == "SHORT":
            return side == "BUY", -self.position(symbol, "SHORT").amount
        amount = self.position(symbol, "BOTH").amount
        reduces = (side == "SELL" and amount > 0) or (side == "BUY" and amount < 0)
        return reduces, abs(amount)

    def new_order(
        self, p: dict[str, str], *, test: bool = False
    ) -> tuple[Order, dict[str, Any], dict[str, Any]]:
        """``POST /fapi/v1/order``: validate, accept and match.

        Returns:
            The order, its response body (``ACK``: as accepted; ``RESULT``: final state of
            MARKET and IOC/FOK orders) and the order as accepted (before any fill).

        Raises:
            BinanceError: The rejection Binance gives for the same request.
        """
        symbol = p.get("symbol", "")
        rules = self.rule(symbol)
        side = p.get("side", "")
        if not side:
            raise BinanceError(-1102, name="side")
        if side not in ("BUY", "SELL"):
            raise BinanceError(-1117)
        order_type = p.get("type", "")
        if not order_type:
            raise BinanceError(-1102, name="type")
        if order_type not in ORDER_TYPES:
            raise BinanceError(-1116)
        if order_type in CONDITIONAL_TYPES:
            raise BinanceError(-4120)
        position_side, reduce_only = self._mode_params(p, conditional=False)
        if parse_bool("closePosition", p.get("closePosition")):
            raise BinanceError(-1106, name="closeposition")
        resp_type = (p.get("newOrderRespType") or "ACK").upper()
        if resp_type not in ("ACK", "RESULT"):
            raise BinanceError(-1130)
        tif = p.get("timeInForce") or ""
        if order_type == "LIMIT":
            if not tif:
                raise BinanceError(-1102, name="timeInForce")
            if tif not in TIME_IN_FORCE:
                raise BinanceError(-1115)
        else:
            tif = "GTC"
        raw_qty = p.get("quantity") or ""
        quantity = parse_required("quantity", raw_qty)
        raw_price = p.get("price") or ""
        price = ZERO
        if order_type == "LIMIT":
            parsed = parse_required("price", raw_price)
            price = parsed
        elif raw_price and parse_decimal("price", raw_price) != 0:
            raise BinanceError(-1106, name="price")
        good_till = 0
        if tif == "GTD":
            raw_gtd = p.get("goodTillDate") or ""
            if not raw_gtd.isdigit():
                raise BinanceError(-1102, name="goodTillDate")
            good_till = int(raw_gtd)
            if not self.now_ms() + 600_000 < good_till < 253402300799000:
                raise BinanceError(-5040)
        client_id = self._client_id(symbol, p.get("newClientOrderId"), "sim_")
        if order_type == "LIMIT":
            rules.check_price("price", raw_price, price)
        rules.check_quantity(raw_qty, quantity, market=order_type == "MARKET")
        mark = self.mark(symbol)
        if order_type == "LIMIT":
            rules.check_percent_price(side, price, mark)
        reducing, reducible = self._reducing(symbol, side, position_side)
        closing_leg = position_side in ("LONG", "SHORT") and reducing
        if not (reduce_only or closing_leg):
            rules.check_min_notional(price if order_type == "LIMIT" else mark, quantity)
        if order_type == "LIMIT" and len(self.open_orders(symbol)) >= rules.max_num_orders:
            raise BinanceError(-2025)
        if reduce_only and not reducing:
            raise BinanceError(-2022)
        is_close_side = (position_side == "LONG" and side == "SELL") or (
            position_side == "SHORT" and side == "BUY"
        )
        if is_close_side and reducible <= 0:
            raise BinanceError(-2022)
        ref = self._taker_price(rules, side, mark)
        if order_type == "MARKET" and rules.market_take_bound > 0:
            bound = mark * rules.market_take_bound
            if abs(ref - mark) > bound:
                raise BinanceError(-4131)
        opening = quantity if not (reducing or reduce_only) else max(ZERO, quantity - reducible)
        if reduce_only or is_close_side:
            opening = ZERO
        if opening > 0:
            cost_price = price if order_type == "LIMIT" else ref
            needed = opening * cost_price / self.lev(symbol)
            if needed > self.totals()["available"]:
                raise BinanceError(-2019)
        crosses = order_type == "MARKET" or (
            (side == "BUY" and price >= ref) or (side == "SELL" and price <= ref)
        )
        if order_type == "LIMIT" and tif == "GTX" and crosses:
            raise BinanceError(-5022)
        if order_type == "LIMIT" and tif == "FOK" and not crosses:
            raise BinanceError(-5021)
        if test:
            raise _TestOnly
        now = self.now_ms()
        order = Order(
            order_id=next(self._order_ids),
            symbol=symbol,
            client_order_id=client_id,
            side=side,
            position_side=position_side,
            type=order_type,
            orig_type=order_type,
            time_in_force=tif,
            price=price,
            orig_qty=quantity,
            reduce_only=reduce_only or is_close_side,
            close_position=False,
            time=now,
            update_time=now,
            price_match=p.get("priceMatch") or "NONE",
            stp_mode=p.get("selfTradePreventionMode") or "EXPIRE_MAKER",
            good_till_date=good_till,
        )
        self.orders[order.order_id] = order
        self._record("order", **_order_log(order))
        self._order_event(order, "NEW")
        ack = order.wire(rules)
        if crosses:
            fill_price = (
                ref
                if order_type == "MARKET"
                else (min(price, ref) if side == "BUY" else max(price, ref))
            )
            self._execute(order, fill_price, maker=False)
            if order.is_open:
                # IOC remainder, or a reduce-only MARKET larger than the position
                self._finish(order, "EXPIRED", "EXPIRED", reason=2 if tif == "IOC" else 9)
        elif tif == "IOC":
            self._finish(order, "EXPIRED", "EXPIRED", reason=2)
        return order, (order.wire(rules) if resp_type == "RESULT" else ack), ack

    def _taker_price(self, rules: SymbolRules, side: str, mark: Decimal) -> Decimal:
        slip = rules.tick_size * self.slippage_ticks
        if side == "BUY":
            return rules.round_price(mark + slip, up=True)
        return rules.round_price(mark - slip, up=False)

    # --- execution --------------------------------------------------------------------------

    def _execute(self, order: Order, price: Decimal, *, maker: bool) -> None:
        """Fill the order's remaining quantity (clipped for reducing orders) at ``price``."""
        qty = order.remaining
        reducing, reducible = self._reducing(order.symbol, order.side, order.position_side)
        if order.reduce_only:
            if not reducing or reducible <= 0:
                self._finish(order, "EXPIRED", "EXPIRED", reason=4)
                return
            qty = min(qty, reducible)
        if qty <= 0:
            return
        rules = self.rules[order.symbol]
        now = self.now_ms()
        fee = price * qty * (self.maker_fee if maker else self.taker_fee)
        realized = self._apply_fill(order, price, qty, fee, now)
        order.executed_qty += qty
        order.cum_quote += price * qty
        order.update_time = now
        order.status = "FILLED" if order.remaining == 0 else "PARTIALLY_FILLED"
        trade = self._book_trade(order, price, qty, fee, realized, now, maker=maker)
        self._emit(
            {
                "e": "TRADE_LITE",
                "E": now,
                "T": now,
                "s": order.symbol,
                "q": rules.fmt_qty(order.orig_qty),
                "p": rules.fmt_price(order.price),
                "m": maker,
                "c": order.client_order_id,
                "S": order.side,
                "L": rules.fmt_price(price),
                "l": rules.fmt_qty(qty),
                "t": trade.trade_id,
                "i": order.order_id,
            }
        )
        self._order_event(
            order,
            "TRADE",
            fill=_Fill(price, qty, maker),
            fee=fee,
            realized=realized,
            trade_id=trade.trade_id,
        )
        self._account_event(order.symbol, "ORDER", balance_change=ZERO)
        self._after_position_change(order.symbol)
        self._child_done(order)

    def _book_trade(
        self,
        order: Order,
        price: Decimal,
        qty: Decimal,
        fee: Decimal,
        realized: Decimal,
        now: int,
        *,
        maker: bool,
    ) -> Trade:
        """Record one fill of ``order``: the trade list (userTrades), income and order log."""
        trade = Trade(
            trade_id=next(self._trade_ids),
            order_id=order.order_id,
            symbol=order.symbol,
            side=order.side,
            position_side=order.position_side,
            price=price,
            qty=qty,
            realized_pnl=realized,
            commission=fee,
            time=now,
            maker=maker,
        )
        self.trades.append(trade)
        if len(self.trades) > 10_000:
            del self.trades[: len(self.trades) - 10_000]
        self._trade_income(trade)
        self._record(
            "fill",
            orderId=order.order_id,
            clientOrderId=order.client_order_id,
            symbol=order.symbol,
            side=order.side,
            positionSide=order.position_side,
            price=plain(price),
            qty=plain(qty),
            realizedPnl=plain(realized),
            commission=plain(fee),
            maker=maker,
            tradeId=trade.trade_id,
        )
        return trade

    def _apply_fill(
        self, order: Order, price: Decimal, qty: Decimal, fee: Decimal, now: int
    ) -> Decimal:
        """Update the position legs and the wallet; return the realized PnL of the fill."""
        signed = qty if order.side == "BUY" else -qty
        pos = self.position(order.symbol, order.position_side)
        realized = ZERO
        old = pos.amount
        isolated = self.isolated(order.symbol)
        if old == 0 or (old > 0) == (signed > 0):
            new_amount = old + signed
            pos.entry_price = (pos.entry_price * abs(old) + price * qty) / abs(new_amount)
            pos.amount = new_amount
            pos.fees += fee
            if isolated:
                pos.isolated_wallet += price * qty / self.lev(order.symbol)
        else:
            closed = min(abs(old), qty)
            direction = Decimal(1) if old > 0 else Decimal(-1)
            realized = (price - pos.entry_price) * closed * direction
            remainder = qty - closed
            share = closed / abs(old)
            pos.fees -= pos.fees * share
            pos.isolated_wallet -= pos.isolated_wallet * share
            pos.amount = old + signed
            if pos.amount == 0:
                pos.entry_price = ZERO
                pos.fees = ZERO
                pos.isolated_wallet = ZERO
            elif remainder > 0:
                pos.entry_price = price  # flipped: the remainder opens at the fill price
                pos.fees = fee * remainder / qty
                if isolated:
                    pos.isolated_wallet = price * remainder / self.lev(order.symbol)
        pos.realized += realized
        pos.update_time = now
        self.wallet += realized - fee
        self.balance_update_time = now
        return realized

    def _after_position_change(self, symbol: str) -> None:
        """Expire reduce-only orders that no longer fit and GTE_GTC algo orders of flat legs."""
        for order in self.open_orders(symbol):
            if not order.reduce_only:
                continue
            reducing, reducible = self._reducing(symbol, order.side, order.position_side)
            if not reducing or reducible <= 0 or order.remaining > reducible:
                self._finish(order, "EXPIRED", "EXPIRED", reason=4)
        for algo in self.open_algo_orders(symbol):
            if algo.time_in_force != "GTE_GTC":
                continue
            if not self.position(symbol, algo.position_side).amount:
                self._algo_status(algo, "EXPIRED", reason="GTE condition unsatisfied")

    def _finish(self, order: Order, status: str, exec_type: str, reason: int = 0) -> None:
        order.status = status
        order.update_time = self.now_ms()
        order.expire_reason = reason
        self._record(
            "cancel" if status == "CANCELED" else "expire",
            orderId=order.order_id,
            clientOrderId=order.client_order_id,
            symbol=order.symbol,
            status=status,
        )
        self._order_event(order, exec_type)
        self._child_done(order)

    def _child_done(self, order: Order) -> None:
        """End the algo order whose child just became final (``FINISHED``, contract 2.5).

        A child that ends while its parent is still ``TRIGGERING`` is finished by ``_trigger``
        itself, after it has emitted ``TRIGGERED``.
        """
        if order.algo_id is None or order.is_open:
            return
        algo = self.algo_orders.get(order.algo_id)
        if algo is not None and algo.status == "TRIGGERED":
            self._algo_finished(algo, order)

    # --- events ---------------------------------------------------------------------------

    def _order_event(
        self,
        order: Order,
        exec_type: str,
        *,
        fill: _Fill | None = None,
        fee: Decimal = ZERO,
        realized: Decimal = ZERO,
        trade_id: int = 0,
    ) -> None:
        rules = self.rules[order.symbol]
        now = self.now_ms()
        self._emit(
            {
                "e": "ORDER_TRADE_UPDATE",
                "E": now,
                "T": now,
                "o": {
                    "s": order.symbol,
                    "c": order.client_order_id,
                    "S": order.side,
                    "o": order.type,
                    "f": order.time_in_force,
                    "q": rules.fmt_qty(order.orig_qty),
                    "p": rules.fmt_price(order.price),
                    "ap": rules.fmt_price(order.avg_price),
                    "sp": rules.fmt_price(order.stop_price),
                    "x": exec_type,
                    "X": order.status,
                    "i": order.order_id,
                    "l": rules.fmt_qty(fill.qty if fill else ZERO),
                    "z": rules.fmt_qty(order.executed_qty),
                    "L": rules.fmt_price(fill.price if fill else ZERO),
                    "N": "USDT",
                    "n": fmt_decimal(fee, 8),
                    "T": now,
                    "t": trade_id,
                    "b": "0",
                    "a": "0",
                    "m": fill.maker if fill else False,
                    "R": order.reduce_only,
                    "wt": order.working_type,
                    "ot": order.orig_type,
                    "ps": order.position_side,
                    "cp": order.close_position,
                    "AP": "0",
                    "cr": "0",
                    "pP": order.price_protect,
                    "si": 0,
                    "ss": 0,
                    "rp": fmt_decimal(realized, 8),
                    "V": order.stp_mode,
                    "pm": order.price_match,
                    "gtd": order.good_till_date,
                    "er": str(order.expire_reason),
                },
            }
        )

    def _account_event(self, symbol: str, reason: str, balance_change: Decimal) -> None:
        now = self.now_ms()
        wallet = fmt_decimal(self.wallet, 8)
        legs = []
        for side in self.legs():
            pos = self.position(symbol, side)
            legs.append(
                {
                    "s": symbol,
                    "pa": plain(pos.amount) if pos.amount else "0",
                    "ep": plain(pos.entry_price) if pos.amount else "0",
                    "bep": plain(pos.break_even()) if pos.amount else "0",
                    "cr": fmt_decimal(pos.realized, 8),
                    "up": fmt_decimal(self.unrealized(pos), 8),
                    "mt": "isolated" if self.margin_type.get(symbol) == "ISOLATED" else "cross",
                    "iw": fmt_decimal(pos.isolated_wallet, 8) if pos.isolated_wallet else "0",
                    "ps": side,
                }
            )
        self._emit(
            {
                "e": "ACCOUNT_UPDATE",
                "E": now,
                "T": now,
                "a": {
                    "m": reason,
                    "B": [{"a": "USDT", "wb": wallet, "cw": wallet, "bc": plain(balance_change)}],
                    "P": legs,
                },
            }
        )

    # --- algo orders ----------------------------------------------------------------------

    def _trigger_value(self, algo: AlgoOrder) -> Decimal:
        return (
            self.mark(algo.symbol) if algo.working_type == "MARK_PRICE" else self.last(algo.symbol)
        )

    def _condition(self, algo: AlgoOrder, price: Decimal) -> bool:
        kind = algo.order_type
        if kind in ("STOP", "STOP_MARKET"):
            return (
                price >= algo.trigger_price if algo.side == "BUY" else price <= algo.trigger_price
            )
        if kind in ("TAKE_PROFIT", "TAKE_PROFIT_MARKET"):
            return (
                price <= algo.trigger_price if algo.side == "BUY" else price >= algo.trigger_price
            )
        # trailing stop
        if algo.extreme is None:
            activated = (
                price <= algo.activate_price if algo.side == "BUY" else price >= algo.activate_price
            )
            if not activated:
                return False
            algo.extreme = price
        rate = algo.callback_rate / 100
        if algo.side == "SELL":
            algo.extreme = max(algo.extreme, price)
            return price <= algo.extreme * (1 - rate)
        algo.extreme = min(algo.extreme, price)
        return price >= algo.extreme * (1 + rate)

    def new_algo_order(self, p: dict[str, str]) -> AlgoOrder:
        """``POST /fapi/v1/algoOrder`` with ``algoType=CONDITIONAL``."""
        algo_type = p.get("algoType") or ""
        if not algo_type:
            raise BinanceError(-1102, name="algoType")
        if algo_type != "CONDITIONAL":
            raise BinanceError(-1130)
        symbol = p.get("symbol", "")
        rules = self.rule(symbol)
        side = p.get("side", "")
        if not side:
            raise BinanceError(-1102, name="side")
        if side not in ("BUY", "SELL"):
            raise BinanceError(-1117)
        order_type = p.get("type") or p.get("orderType") or ""
        if not order_type:
            raise BinanceError(-1102, name="type")
        if order_type not in CONDITIONAL_TYPES:
            raise BinanceError(-1116)
        position_side, reduce_only = self._mode_params(p, conditional=True)
        close_position = parse_bool("closePosition", p.get("closePosition"))
        tif = p.get("timeInForce") or "GTC"
        if tif not in ("GTC", "IOC", "FOK", "GTX", "GTD", "GTE_GTC"):
            raise BinanceError(-1115)
        working_type = p.get("workingType") or "CONTRACT_PRICE"
        if working_type not in ("MARK_PRICE", "CONTRACT_PRICE"):
            raise BinanceError(-1130)
        raw_qty = p.get("quantity") or ""
        quantity = ZERO
        if close_position:
            if order_type not in ("STOP_MARKET", "TAKE_PROFIT_MARKET"):
                raise BinanceError(-1106, name="closeposition")
            if raw_qty:
                raise BinanceError(-4137)
            if p.get("reduceOnly"):
                raise BinanceError(-1106, name="reduceonly")
            if self.dual and (
                (side == "BUY" and position_side == "LONG")
                or (side == "SELL" and position_side == "SHORT")
            ):
                raise BinanceError(-4061)
        else:
            parsed = parse_required("quantity", raw_qty)
            quantity = parsed
            rules.check_quantity(raw_qty, quantity, market=order_type.endswith("MARKET"))
        price = ZERO
        if order_type in ("STOP", "TAKE_PROFIT"):
            raw_price = p.get("price") or ""
            parsed = parse_required("price", raw_price)
            price = parsed
            rules.check_price("price", raw_price, price)
        mark = self.mark(symbol)
        activate = ZERO
        rate = ZERO
        trigger = ZERO
        if order_type == "TRAILING_STOP_MARKET":
            raw_rate = p.get("callbackRate") or ""
            parsed = parse_required("callbackRate", raw_rate)
            rate = parsed
            if not Decimal("0.1") <= rate <= Decimal(10):
                raise BinanceError(-4136)
            raw_act = p.get("activatePrice") or p.get("activationPrice") or ""
            current = mark if working_type == "MARK_PRICE" else self.last(symbol)
            if raw_act:
                parsed = parse_required("activatePrice", raw_act)
                activate = parsed
                rules.check_price("activatePrice", raw_act, activate, stop=True)
                if (side == "BUY" and activate >= current) or (
                    side == "SELL" and activate <= current
                ):
                    raise BinanceError(-2021)
            else:
                activate = current
        else:
            raw_trigger = p.get("triggerPrice") or p.get("stopPrice") or ""
            if not raw_trigger:
                raise BinanceError(-1102, name="triggerPrice")
            parsed = parse_required("triggerPrice", raw_trigger)
            trigger = parsed
            rules.check_price("triggerPrice", raw_trigger, trigger, stop=True)
        if not close_position and not reduce_only and order_type != "TRAILING_STOP_MARKET":
            reducing, _ = self._reducing(symbol, side, position_side)
            closing_leg = position_side in ("LONG", "SHORT") and reducing
            if not closing_leg:
                rules.check_min_notional(price if price else trigger, quantity)
        client_id = p.get("clientAlgoId") or ""
        if client_id:
            check_client_id("clientAlgoId", client_id)
            if any(a.client_algo_id == client_id for a in self.open_algo_orders()):
                raise BinanceError(-4116)
        else:
            client_id = secrets.token_urlsafe(16)[:22]
        if close_position and any(
            a.close_position
            and a.order_type == order_type
            and a.side == side
            and a.position_side == position_side
            for a in self.open_algo_orders(symbol)
        ):
            # contract 2.5: one resting close-all of a type per direction of a position
            raise BinanceError(-4130)
        if len(self.open_algo_orders(symbol)) >= rules.max_num_algo_orders:
            raise BinanceError(-4045)
        now = self.now_ms()
        algo = AlgoOrder(
            algo_id=next(self._algo_ids),
            client_algo_id=client_id,
            symbol=symbol,
            side=side,
            position_side=position_side,
            order_type=order_type,
            time_in_force=tif,
            quantity=quantity,
            price=price,
            trigger_price=trigger,
            working_type=working_type,
            price_protect=parse_bool("priceProtect", p.get("priceProtect")),
            close_position=close_position,
            reduce_only=reduce_only,
            create_time=now,
            update_time=now,
            activate_price=activate,
            callback_rate=rate,
            price_match=p.get("priceMatch") or "NONE",
            stp_mode=p.get("selfTradePreventionMode") or "EXPIRE_MAKER",
        )
        if order_type != "TRAILING_STOP_MARKET" and self._condition(
            algo, self._trigger_value(algo)
        ):
            raise BinanceError(-2021)
        self.algo_orders[algo.algo_id] = algo
        self._record(
            "algo",
            algoId=algo.algo_id,
            clientAlgoId=client_id,
            symbol=symbol,
            side=side,
            positionSide=position_side,
            type=order_type,
            triggerPrice=plain(trigger),
            closePosition=close_position,
            quantity=plain(quantity),
            status="NEW",
        )
        self._algo_event(algo)
        return algo

    def find_algo(self, algo_id: str | None, client_id: str | None) -> AlgoOrder:
        """Find an algo order by ``algoId`` (also ``algoid``) or ``clientAlgoId``."""
        if algo_id:
            if not algo_id.isdigit():
                raise BinanceError(-1102, name="algoId")
            found = self.algo_orders.get(int(algo_id))
            if found is None:
                raise BinanceError(-2013)
            return found
        if client_id:
            for algo in reversed(list(self.algo_orders.values())):
                if algo.client_algo_id == client_id:
                    return algo
            raise BinanceError(-2013)
        raise BinanceError(-1102, name="algoId")

    def cancel_algo(self, algo_id: str | None, client_id: str | None) -> AlgoOrder:
        """``DELETE /fapi/v1/algoOrder``: cancel an open algo order, ``-2011`` otherwise."""
        try:
            algo = self.find_algo(algo_id, client_id)
        except BinanceError as exc:
            if exc.code == -2013:
                raise BinanceError(-2011) from None
            raise
        if algo.status != "NEW":
            raise BinanceError(-2011)
        self._algo_status(algo, "CANCELED")
        return algo

    def cancel_all_algo(self, symbol: str) -> None:
        """``DELETE /fapi/v1/algoOpenOrders``: cancel every open algo order of the symbol."""
        self.rule(symbol)
        for algo in self.open_algo_orders(symbol):
            self._algo_status(algo, "CANCELED")

    def _algo_status(self, algo: AlgoOrder, status: str, reason: str = "") -> None:
        algo.status = status
        if reason:
            algo.reason = reason
        algo.update_time = self.now_ms()
        self._record(
            "algo",
            algoId=algo.algo_id,
            clientAlgoId=algo.client_algo_id,
            symbol=algo.symbol,
            status=status,
        )
        self._algo_event(algo)

    def _algo_event(self, algo: AlgoOrder) -> None:
        rules = self.rules[algo.symbol]
        now = self.now_ms()
        body: dict[str, Any] = {
            "caid": algo.client_algo_id,
            "aid": algo.algo_id,
            "at": "CONDITIONAL",
            "o": algo.order_type,
            "s": algo.symbol,
            "S": algo.side,
            "ps": algo.position_side,
            "f": algo.time_in_force,
            "q": rules.fmt_qty(algo.quantity) if not algo.close_position else "0",
            "X": algo.status,
        }
        if algo.status in ("TRIGGERING", "TRIGGERED", "FINISHED"):
            body["ai"] = algo.actual_order_id
        if algo.status in ("TRIGGERED", "FINISHED"):
            body["ap"] = rules.fmt_price(algo.actual_price) if algo.actual_qty else "0"
            body["aq"] = rules.fmt_qty(algo.actual_qty) if algo.actual_qty else "0"
            body["act"] = "MARKET" if algo.order_type.endswith("MARKET") else "LIMIT"
        body.update(
            {
                "tp": rules.fmt_price(algo.trigger_price),
                "p": rules.fmt_price(algo.price) if algo.price else "0",
                "V": algo.stp_mode,
                "wt": algo.working_type,
                "pm": algo.price_match,
                "cp": algo.close_position,
                "pP": algo.price_protect,
                "R": algo.reduce_only,
                "tt": algo.trigger_time,
                "gtd": algo.good_till_date,
                # contract 2.5: failure reason ("" when none) and trailing-activated flag
                "rm": algo.reason,
                "ia": algo.extreme is not None,
            }
        )
        self._emit({"e": "ALGO_UPDATE", "T": now, "E": now, "o": body})

    def _trigger(self, algo: AlgoOrder) -> None:
        now = self.now_ms()
        algo.trigger_time = now
        self._algo_status(algo, "TRIGGERING")
        rules = self.rules[algo.symbol]
        quantity = algo.quantity
        if algo.close_position:
            reducing, reducible = self._reducing(algo.symbol, algo.side, algo.position_side)
            quantity = reducible if reducing else ZERO
            if quantity <= 0:
                self._algo_status(algo, "EXPIRED", reason="No position to close.")
                return
        child_type = "MARKET" if algo.order_type.endswith("MARKET") else "LIMIT"
        mark = self.mark(algo.symbol)
        reducing, reducible = self._reducing(algo.symbol, algo.side, algo.position_side)
        is_close_side = algo.position_side != "BOTH" and reducing
        if (algo.reduce_only or is_close_side) and (not reducing or reducible <= 0):
            self._algo_status(algo, "REJECTED", reason=MSG[-2022])
            return
        if (
            algo.position_side != "BOTH"
            and not reducing
            and (
                (algo.position_side == "LONG" and algo.side == "SELL")
                or (algo.position_side == "SHORT" and algo.side == "BUY")
            )
        ):
            self._algo_status(algo, "REJECTED", reason=MSG[-2022])
            return
        opening = (
            ZERO
            if (algo.reduce_only or algo.close_position or is_close_side)
            else (max(ZERO, quantity - reducible) if reducing else quantity)
        )
        if opening > 0:
            needed = opening * mark / self.lev(algo.symbol)
            if needed > self.totals()["available"]:
                self._algo_status(algo, "REJECTED", reason=MSG[-2019])
                return
        order = Order(
            order_id=next(self._order_ids),
            symbol=algo.symbol,
            client_order_id=algo.client_algo_id,
            side=algo.side,
            position_side=algo.position_side,
            type=child_type,
            orig_type=algo.order_type,
            time_in_force="GTC" if child_type == "LIMIT" else algo.time_in_force,
            price=algo.price,
            orig_qty=quantity,
            reduce_only=algo.reduce_only or algo.close_position or is_close_side,
            close_position=algo.close_position,
            time=now,
            update_time=now,
            stop_price=algo.trigger_price,
            working_type=algo.working_type,
            price_protect=algo.price_protect,
            price_match=algo.price_match,
            stp_mode=algo.stp_mode,
            algo_id=algo.algo_id,
        )
        self.orders[order.order_id] = order
        algo.actual_order_id = str(order.order_id)
        self._record("order", **_order_log(order))
        # Contract 2.5 (live traffic): the child's ORDER_TRADE_UPDATEs (NEW, then the fill of a
        # MARKET child) come first, then ALGO_UPDATE TRIGGERED (still ap/aq "0", as in the real
        # capture) and, once the child is final, FINISHED.
        self._order_event(order, "NEW")
        ref = self._taker_price(rules, algo.side, mark)
        if child_type == "MARKET":
            self._execute(order, ref, maker=False)
            if order.is_open:
                self._finish(order, "EXPIRED", "EXPIRED", reason=9)
        elif (algo.side == "BUY" and algo.price >= ref) or (
            algo.side == "SELL" and algo.price <= ref
        ):
            self._execute(
                order,
                min(algo.price, ref) if algo.side == "BUY" else max(algo.price, ref),
                maker=False,
            )
        self._algo_status(algo, "TRIGGERED")
        if not order.is_open:
            self._algo_finished(algo, order)

    def _algo_finished(self, algo: AlgoOrder, order: Order) -> None:
        algo.actual_price = order.avg_price
        algo.actual_qty = order.executed_qty
        self._algo_status(algo, "FINISHED")

    # --- price updates ----------------------------------------------------------------------

    def set_price(self, symbol: str, mark: Decimal, last: Decimal | None = None) -> None:
        """Apply a price update: funding, LIMIT fills, algo triggers, GTD expiry, liquidation.

        Due funding is settled first (when enabled), liquidation is checked last (when enabled).
        """
        self.marks[symbol] = mark
        self.lasts[symbol] = last if last is not None else mark
        self._settle_funding()
        now = self.now_ms()
        for order in self.open_orders(symbol):
            if order.good_till_date and now >= order.good_till_date:
                self._finish(order, "EXPIRED", "EXPIRED")
                continue
            if order.type != "LIMIT":
                continue
            if (order.side == "BUY" and mark <= order.price) or (
                order.side == "SELL" and mark >= order.price
            ):
                self._execute(order, order.price, maker=True)
        for algo in self.open_algo_orders(symbol):
            if algo.status != "NEW":
                continue
            price = self._trigger_value(algo)
            if algo.price_protect and self.rules[symbol].trigger_protect > 0 and mark:
                gap = abs(mark - self.last(symbol)) / mark
                if gap > self.rules[symbol].trigger_protect:
                    continue
            if self._condition(algo, price):
                self._trigger(algo)
        if self.liquidation:
            self._liquidate_crossed()

    # --- funding and liquidation ---------------------------------------------------------------

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
        self._record("order", **_order_log(order))
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
        realized = self._apply_fill(order, price, qty, fee, now)
        order.executed_qty = qty
        order.cum_quote = price * qty
        order.status = "FILLED"
        trade = self._book_trade(order, price, qty, fee, realized, now, maker=False)
        self._order_event(
            order,
            "CALCULATED",
            fill=_Fill(price, qty, False),
            fee=fee,
            realized=realized,
            trade_id=trade.trade_id,
        )
        self._account_event(order.symbol, "ORDER", balance_change=ZERO)
        self._after_position_change(order.symbol)

    # --- reports ---------------------------------------------------------------------------

    def user_trades(
        self,
        symbol: str,
        limit: int = 500,
        from_id: int | None = None,
        start: int | None = None,
        end: int | None = None,
    ) -> list[Trade]:
        """Fills of ``symbol``, oldest first, filtered as ``GET /fapi/v1/userTrades``."""
        self.rule(symbol)
        out = [t for t in self.trades if t.symbol == symbol]
        if from_id is not None:
            out = [t for t in out if t.trade_id >= from_id]
        if start is not None:
            out = [t for t in out if t.time >= start]
        if end is not None:
            out = [t for t in out if t.time <= end]
        return out[-limit:] if from_id is None else out[:limit]

    def served_positions(self, symbols: Iterable[str]) -> list[Position]:
        """Position legs of the current mode for the given symbols."""
        return [self.position(s, side) for s in symbols for side in self.legs()]


class _TestOnly(Exception):
    """Raised by :meth:`Exchange.new_order` with ``test=True`` once every check passed."""


TestOnly = _TestOnly


def _next_funding_after(now_ms: int) -> int:
    """The first funding time (00/08/16 UTC) strictly after ``now_ms``."""
    return now_ms - now_ms % FUNDING_INTERVAL_MS + FUNDING_INTERVAL_MS


def _order_log(order: Order) -> dict[str, Any]:
    return {
        "orderId": order.order_id,
        "clientOrderId": order.client_order_id,
        "symbol": order.symbol,
        "side": order.side,
        "positionSide": order.position_side,
        "type": order.type,
        "origType": order.orig_type,
        "timeInForce": order.time_in_force,
        "price": plain(order.price),
        "quantity": plain(order.orig_qty),
        "reduceOnly": order.reduce_only,
        "closePosition": order.close_position,
        "algoId": order.algo_id,
    }
