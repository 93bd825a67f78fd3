"""What the simulated venue holds for one account: the record types and the class that owns them.

The records (:class:`Order`, :class:`AlgoOrder`, :class:`Position`, :class:`Trade`,
:class:`Income`, :class:`ListenKey`) are plain data with their wire renderings. :class:`VenueState`
builds every collection, counter and setting of the account in one constructor and offers the
read-only lookups (rules, prices, legs, open orders, leverage, margin type), the injected clock
and the two outputs (user-data events to drain, the order log); the layers in
:mod:`pyquant.sim.margin`, :mod:`pyquant.sim.matching`, :mod:`pyquant.sim.algo_orders` and
:mod:`pyquant.sim.liquidation` act on this state and :class:`pyquant.sim.exchange.Exchange`
puts them together. This module may not change a position, a wallet or an order's status, emit
an event of its own or apply a venue rule: it only holds and looks up.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from pyquant.sim.validation import BinanceError, SymbolRules, fmt_decimal, plain

__all__ = [
    "AlgoOrder",
    "Fill",
    "Income",
    "ListenKey",
    "Order",
    "Position",
    "Trade",
    "VenueState",
    "order_log",
]

ZERO = Decimal(0)
FUNDING_INTERVAL_MS = 8 * 3_600_000
DEFAULT_FUNDING_RATE = Decimal("0.0001")
DEFAULT_LEVERAGE = 20


def next_funding_after(now_ms: int) -> int:
    """The first funding time (00/08/16 UTC) strictly after ``now_ms``."""
    return now_ms - now_ms % FUNDING_INTERVAL_MS + FUNDING_INTERVAL_MS


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
class Fill:
    """One execution of an order, as its ``ORDER_TRADE_UPDATE`` reports it."""

    price: Decimal
    qty: Decimal
    maker: bool


class VenueState:
    """The one owner of an account's state: settings, legs, orders, trades, income, clock, outputs.

    The constructor's arguments are those of :class:`pyquant.sim.exchange.Exchange` (documented
    there). :mod:`pyquant.sim.records` saves and restores the collections and id counters.
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
        self._next_funding = next_funding_after(now_ms())
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

    def _reducing(self, symbol: str, side: str, position_side: str) -> tuple[bool, Decimal]:
        """Is an order on this leg reducing, and how much can it reduce."""
        if position_side == "LONG":
            return side == "SELL", self.position(symbol, "LONG").amount
        if position_side == "SHORT":
            return side == "BUY", -self.position(symbol, "SHORT").amount
        amount = self.position(symbol, "BOTH").amount
        reduces = (side == "SELL" and amount > 0) or (side == "BUY" and amount < 0)
        return reduces, abs(amount)


def order_log(order: Order) -> dict[str, Any]:
    """The order-log entry of a new order (``kind`` ``order``)."""
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
