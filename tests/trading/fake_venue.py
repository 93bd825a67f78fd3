"""In-memory Venue, exchange rules and exit engine for the trading-core unit tests.

``FakeVenue`` follows the contract where the trading core depends on it: both position modes
(-4061 for a positionSide that does not fit, -1106 for reduceOnly in hedge mode), -2022 for a
reduce on a flat leg, -4116 for a client id of an open order, MARKET fills at the mark with
``newOrderRespType=RESULT``, closePosition algo orders, and scripted faults: an order that
executes but answers "unknown" (-1007), one that does not execute and answers unknown, lookups
that miss for a while, and any rejection. Every request is recorded with the store's state at
send time so tests can check the write-ahead rule.

``FakeRules`` reads the real exchangeInfo with Decimal arithmetic (floor quantities, tick
rounding, MIN_NOTIONAL at the mark). ``FakeEngine`` is a recording stand-in for ExitEngine.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any

from pyquant.errors import OrderRejected, OrderStatusUnknown, RetryableError

DATA = Path(__file__).resolve().parents[1] / "data" / "binance"


class FakeRules:
    """Decimal model of the exchange rules for a few real symbols."""

    def __init__(self, symbols: tuple[str, ...] = ("BTCUSDT", "ETHUSDT", "EOSUSDT")) -> None:
        document = json.loads((DATA / "exchangeInfo_fapi_full_2025-11-26.json").read_text())
        self._symbols: dict[str, dict[str, Any]] = {}
        for item in document["symbols"]:
            if item["symbol"] in symbols:
                filters = {f["filterType"]: f for f in item["filters"]}
                self._symbols[item["symbol"]] = {"status": item["status"], "filters": filters}

    def symbol_info(self, symbol: str) -> dict[str, Any]:
        if symbol not in self._symbols:
            raise KeyError(f"unknown symbol {symbol}")
        market = self._symbols[symbol]["filters"]["MARKET_LOT_SIZE"]
        return {
            "symbol": symbol,
            "status": self._symbols[symbol]["status"],
            "market_max_qty": market["maxQty"],
        }

    def _filter(self, symbol: str, name: str) -> dict[str, Any]:
        return self._symbols[symbol]["filters"][name]

    def quantize_price(self, symbol: str, price: str, rounding: str = "down") -> str:
        tick = Decimal(self._filter(symbol, "PRICE_FILTER")["tickSize"])
        mode = {"down": ROUND_FLOOR, "up": ROUND_CEILING}.get(rounding, ROUND_FLOOR)
        ticks = (Decimal(price) / tick).to_integral_value(rounding=mode)
        return _plain(ticks * tick, tick)

    def quantize_qty(self, symbol: str, qty: str, market: bool = True) -> str:
        lot = self._filter(symbol, "MARKET_LOT_SIZE" if market else "LOT_SIZE")
        step = Decimal(lot["stepSize"])
        steps = (Decimal(qty) / step).to_integral_value(rounding=ROUND_FLOOR)
        return _plain(steps * step, step)

    def check_order(
        self,
        symbol: str,
        *,
        side: str,
        order_type: str,
        quantity: str,
        price: str | None = None,
        stop_price: str | None = None,
        mark_price: str | None = None,
        reduce_only: bool = False,
    ) -> Reject | None:
        lot = self._filter(symbol, "MARKET_LOT_SIZE")
        qty = Decimal(quantity)
        if qty < Decimal(lot["minQty"]):
            return Reject(-4004, f"Quantity less than minimum {lot['minQty']}")
        notional = Decimal(self._filter(symbol, "MIN_NOTIONAL")["notional"])
        reference = Decimal(price or mark_price or "0")
        if not reduce_only and qty * reference < notional:
            return Reject(-4164, f"Order's notional must be no smaller than {notional}")
        return None


@dataclass(frozen=True)
class Reject:
    code: int
    msg: str


def _plain(value: Decimal, step: Decimal) -> str:
    places = max(0, -step.normalize().as_tuple().exponent)  # type: ignore[operator]
    return f"{value:.{places}f}"


# ---- engine ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeAction:
    symbol: str
    position_side: str
    side: str
    quantity: str
    reason: str
    position_id: str
    sequence: int
    is_full_close: bool = False
    trigger_price: str = "0"
    mark_price: str = "0"


@dataclass
class FakeView:
    position_id: str
    symbol: str
    position_side: str
    quantity: str
    entry_price: str
    stop_price: str


class FakeEngine:
    """Records the calls the desk makes; stop = entry -/+ stop_pct."""

    def __init__(self, stop_pct: Decimal = Decimal("0.01"), over_leveraged: bool = False) -> None:
        self.stop_pct = stop_pct
        self.over_leveraged = over_leveraged
        self.views: dict[str, FakeView] = {}
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.opened_at: dict[str, int | None] = {}
        self.sequences: dict[str, int] = {}
        self.pending: list[FakeAction] = []

    def plan_entry(
        self, symbol: str, position_side: str, entry_price: str, leverage: int
    ) -> dict[str, Any]:
        entry = Decimal(entry_price)
        distance = entry * self.stop_pct
        stop = entry - distance if position_side == "LONG" else entry + distance
        return {
            "stop_price": str(stop),
            "stop_distance": str(distance),
            "over_leveraged": self.over_leveraged,
        }

    def _stop(self, leg: str, entry: str) -> str:
        price = Decimal(entry)
        return str(price * (1 - self.stop_pct) if leg == "LONG" else price * (1 + self.stop_pct))

    def open_position(
        self,
        position_id,
        symbol,
        position_side,
        quantity,
        entry_price,
        leverage=1,
        confidence=None,
        opened_at_ms=None,
    ):
        self.calls.append(("open", (position_id, symbol, position_side, quantity, entry_price)))
        self.opened_at[position_id] = opened_at_ms
        self.views[position_id] = FakeView(
            position_id,
            symbol,
            position_side,
            quantity,
            entry_price,
            self._stop(position_side, entry_price),
        )

    def adopt_position(
        self,
        position_id,
        symbol,
        position_side,
        quantity,
        entry_price,
        leverage=1,
        opened_at_ms=None,
    ):
        self.calls.append(("adopt", (position_id, symbol, position_side, quantity, entry_price)))
        self.views[position_id] = FakeView(
            position_id,
            symbol,
            position_side,
            quantity,
            entry_price,
            self._stop(position_side, entry_price),
        )

    def resize_position(self, position_id, quantity):
        self.calls.append(("resize", (position_id, quantity)))
        if position_id in self.views:
            self.views[position_id].quantity = quantity

    def set_liquidation_price(self, position_id, price):
        self.calls.append(("liquidation", (position_id, str(price))))

    def close_position(self, position_id):
        self.calls.append(("close", (position_id,)))
        self.views.pop(position_id, None)

    def confirm(self, action, filled_quantity=None):
        self.calls.append(("confirm", (action.position_id, action.sequence, filled_quantity)))
        view = self.views.get(action.position_id)
        if view is not None:
            left = Decimal(view.quantity) - Decimal(filled_quantity or action.quantity)
            if left <= 0:
                self.views.pop(action.position_id)
            else:
                view.quantity = str(left)

    def reject(self, action):
        self.calls.append(("reject", (action.position_id, action.sequence)))
        self.pending = [a for a in self.pending if a != action]

    def pending_actions(self) -> list[FakeAction]:
        return list(self.pending)

    def positions(self) -> list[FakeView]:
        return list(self.views.values())

    def action(self, position_id: str, quantity: str, reason: str = "take_profit_1") -> FakeAction:
        view = self.views[position_id]
        sequence = self.sequences.get(position_id, 0) + 1
        self.sequences[position_id] = sequence
        side = "SELL" if view.position_side == "LONG" else "BUY"
        full = Decimal(quantity) >= Decimal(view.quantity)
        return FakeAction(
            view.symbol, view.position_side, side, quantity, reason, position_id, sequence, full
        )

    def snapshot(self) -> bytes:
        return json.dumps({k: vars(v) for k, v in self.views.items()}, sort_keys=True).encode()

    @classmethod
    def restore(cls, data: bytes) -> FakeEngine:
        engine = cls()
        for position_id, view in json.loads(data).items():
            engine.views[position_id] = FakeView(**view)
        return engine

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


# ---- venue ----------------------------------------------------------------------------------

Fault = str | Exception


@dataclass
class Sent:
    path: str
    params: dict[str, str]
    store_row: Any = None  # the store's row for this client id at send time


@dataclass
class FakeVenue:
    """An in-memory Binance USDⓈ-M account; see the module docstring."""

    hedge: bool = False
    marks: dict[str, Decimal] = field(
        default_factory=lambda: {"BTCUSDT": Decimal("30000"), "ETHUSDT": Decimal("2000")}
    )
    balance: Decimal = Decimal("10000")
    positions: dict[tuple[str, str], tuple[Decimal, Decimal]] = field(default_factory=dict)
    orders: dict[str, dict[str, Any]] = field(default_factory=dict)
    algo_orders: dict[str, dict[str, Any]] = field(default_factory=dict)
    sent: list[Sent] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    lookup_misses: int = 0
    mode_reads: int = 0
    leverage: dict[str, int] = field(default_factory=dict)
    liquidation: dict[tuple[str, str], str] = field(default_factory=dict)
    margin_types: dict[str, str] = field(default_factory=dict)
    refuse_leverage: set[str] = field(default_factory=set)
    multi_assets: bool = False
    gate: asyncio.Event | None = None
    in_flight: int = 0
    max_in_flight: int = 0
    inspect: Callable[[str], Any] | None = None  # client id -> store row, for write-ahead checks
    _order_id: int = 1000
    _trade_id: int = 5000
    _time: int = 1_700_000_000_000

    # -- helpers --

    def _next_time(self) -> int:
        self._time += 1
        return self._time

    def position_amount(self, symbol: str, leg: str) -> Decimal:
        key = (symbol, leg if self.hedge else "BOTH")
        return self.positions.get(key, (Decimal(0), Decimal(0)))[0]

    def set_position(
        self, symbol: str, leg: str, amount: Decimal | str, entry: Decimal | str = "0"
    ) -> None:
        """Set a leg directly (``amount`` signed in one-way mode, absolute in hedge mode)."""
        self.positions[(symbol, leg)] = (Decimal(amount), Decimal(entry))

    def _record(self, path: str, params: Mapping[str, str], cid: str) -> None:
        row = None if self.inspect is None else self.inspect(cid)
        self.sent.append(Sent(path, dict(params), row))

    def _fault(self) -> Fault | None:
        return self.faults.pop(0) if self.faults else None

    # -- Venue protocol --

    async def server_time_ms(self) -> int:
        return self._time

    async def exchange_info(self) -> bytes:
        return (DATA / "exchangeInfo_fapi_full_2025-11-26.json").read_bytes()

    async def is_hedge_mode(self) -> bool:
        self.mode_reads += 1
        return self.hedge

    async def set_leverage(self, symbol: str, leverage: int) -> dict[str, Any]:
        if symbol in self.refuse_leverage:
            raise OrderRejected(
                -2027, "Exceeded the maximum allowable position at current leverage."
            )
        self.leverage[symbol] = leverage
        return {"symbol": symbol, "leverage": leverage, "maxNotionalValue": "1000000"}

    async def set_margin_type(self, symbol: str, margin_type: str) -> None:
        self.margin_types[symbol] = margin_type

    async def new_order(self, params: Mapping[str, str]) -> dict[str, Any]:
        cid = params["newClientOrderId"]
        self._record("/fapi/v1/order", params, cid)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(0)
            fault = self._fault()
            if isinstance(fault, Exception):
                raise fault
            if fault == "unknown_not_executed":
                raise OrderStatusUnknown(-1007, "Timeout waiting for response from backend server.")
            result = self._execute(params)
            if fault == "drop_after_execute":
                raise ConnectionResetError("connection reset by peer")
            if fault == "unknown_executed":
                raise OrderStatusUnknown(-1007, "Timeout waiting for response from backend server.")
            return result
        finally:
            self.in_flight -= 1

    def _check_mode(self, params: Mapping[str, str]) -> None:
        side = params.get("positionSide")
        if self.hedge:
            if side not in ("LONG", "SHORT"):
                raise OrderRejected(-4061, "Order's position side does not match user's setting.")
            if "reduceOnly" in params:
                raise OrderRejected(-1106, "Parameter 'reduceonly' sent when not required.")
        elif side not in (None, "BOTH"):
            raise OrderRejected(-4061, "Order's position side does not match user's setting.")

    def _execute(self, params: Mapping[str, str]) -> dict[str, Any]:
        self._check_mode(params)
        cid = params["newClientOrderId"]
        if cid in self.orders and self.orders[cid]["status"] in ("NEW", "PARTIALLY_FILLED"):
            raise OrderRejected(-4116, "ClientOrderId is duplicated.")
        if params.get("type") != "MARKET":
            raise OrderRejected(-1116, "Invalid orderType.")
        symbol = params["symbol"]
        side = params["side"]
        qty = Decimal(params["quantity"])
        mark = self.marks[symbol]
        reduce = False
        if self.hedge:
            leg = params["positionSide"]
            key = (symbol, leg)
            amount, entry = self.positions.get(key, (Decimal(0), Decimal(0)))
            closing = (leg == "LONG" and side == "SELL") or (leg == "SHORT" and side == "BUY")
            if closing:
                if amount <= 0:
                    raise OrderRejected(-2022, "ReduceOnly Order is rejected.")
                qty = min(qty, amount)
                amount -= qty
                reduce = True
            else:
                entry = (amount * entry + qty * mark) / (amount + qty)
                amount += qty
            self.positions[key] = (amount, entry)
        else:
            key = (symbol, "BOTH")
            amount, entry = self.positions.get(key, (Decimal(0), Decimal(0)))
            signed = qty if side == "BUY" else -qty
            if params.get("reduceOnly") == "true":
                if amount == 0 or (amount > 0) == (signed > 0):
                    raise OrderRejected(-2022, "ReduceOnly Order is rejected.")
                qty = min(qty, abs(amount))
                signed = qty if side == "BUY" else -qty
                reduce = True
            if amount == 0 or (amount > 0) == (signed > 0):
                entry = (abs(amount) * entry + qty * mark) / (abs(amount) + qty)
            amount += signed
            self.positions[key] = (amount, entry)
        self._order_id += 1
        self._trade_id += 1
        now = self._next_time()
        order = {
            "orderId": self._order_id,
            "clientOrderId": cid,
            "symbol": symbol,
            "status": "FILLED",
            "type": "MARKET",
            "side": side,
            "positionSide": params.get("positionSide", "BOTH"),
            "origQty": params["quantity"],
            "executedQty": str(qty),
            "avgPrice": str(mark),
            "reduceOnly": reduce,
            "updateTime": now,
        }
        self.orders[cid] = order
        self.events.append(
            {
                "e": "ORDER_TRADE_UPDATE",
                "E": now,
                "T": now,
                "o": {
                    "s": symbol,
                    "c": cid,
                    "S": side,
                    "o": "MARKET",
                    "q": params["quantity"],
                    "ap": str(mark),
                    "x": "TRADE",
                    "X": "FILLED",
                    "i": self._order_id,
                    "l": str(qty),
                    "z": str(qty),
                    "L": str(mark),
                    "n": "0.01",
                    "N": "USDT",
                    "T": now,
                    "t": self._trade_id,
                    "R": reduce,
                    "ps": params.get("positionSide", "BOTH"),
                    "rp": "0",
                },
            }
        )
        self.events.append(self.account_event())
        return dict(order)

    def account_event(self) -> dict[str, Any]:
        rows = [
            {
                "s": s,
                "pa": str(a if self.hedge is False or leg == "LONG" else -a),
                "ep": str(e),
                "ps": leg,
            }
            for (s, leg), (a, e) in self.positions.items()
        ]
        return {
            "e": "ACCOUNT_UPDATE",
            "E": self._next_time(),
            "a": {"m": "ORDER", "B": [], "P": rows},
        }

    async def get_order(self, symbol: str, client_order_id: str) -> dict[str, Any] | None:
        if self.lookup_misses > 0:
            self.lookup_misses -= 1
            return None
        order = self.orders.get(client_order_id)
        return None if order is None else dict(order)

    async def cancel_order(self, symbol: str, client_order_id: str) -> dict[str, Any]:
        order = self.orders.get(client_order_id)
        if order is None or order["status"] not in ("NEW", "PARTIALLY_FILLED"):
            raise OrderRejected(-2011, "Unknown order sent.")
        order["status"] = "CANCELED"
        return dict(order)

    async def open_orders(self, symbol: str | None = None) -> list[dict[str, Any]]:
        return [
            dict(o)
            for o in self.orders.values()
            if o["status"] in ("NEW", "PARTIALLY_FILLED") and symbol in (None, o["symbol"])
        ]

    async def new_algo_order(self, params: Mapping[str, str]) -> dict[str, Any]:
        cid = params["clientAlgoId"]
        self._record("/fapi/v1/algoOrder", params, cid)
        fault = self._fault()
        if isinstance(fault, Exception):
            raise fault
        self._check_mode(params)
        if params.get("closePosition") == "true" and "quantity" in params:
            raise OrderRejected(-4137, "Quantity must be zero with closePosition equals true.")
        if params.get("closePosition") == "true" and "reduceOnly" in params:
            raise OrderRejected(-1106, "Parameter 'reduceOnly' sent when not required.")
        open_for_symbol = [
            o
            for o in self.algo_orders.values()
            if o["symbol"] == params["symbol"] and o["algoStatus"] == "NEW"
        ]
        if params.get("closePosition") == "true" and any(
            o["closePosition"]
            and o["orderType"] == params["type"]
            and o["side"] == params["side"]
            and o["positionSide"] == params.get("positionSide", "BOTH")
            for o in open_for_symbol
        ):
            # contract 2.5: one closePosition stop per direction
            raise OrderRejected(
                -4130,
                "An open stop or take profit order with GTE and closePosition in the "
                "direction is existing.",
            )
        if "quantity" not in params and params.get("closePosition") != "true":
            raise OrderRejected(-1102, "Mandatory parameter 'quantity' was not sent.")
        if len(open_for_symbol) >= 10:
            raise OrderRejected(-4045, "Reach max stop order limit.")
        self._order_id += 1
        order = {
            "algoId": self._order_id,
            "clientAlgoId": cid,
            "algoType": "CONDITIONAL",
            "orderType": params["type"],
            "symbol": params["symbol"],
            "side": params["side"],
            "positionSide": params.get("positionSide", "BOTH"),
            "quantity": params.get("quantity", "0.0"),
            "reduceOnly": params.get("reduceOnly") == "true",
            "algoStatus": "NEW",
            "triggerPrice": params["triggerPrice"],
            "workingType": params.get("workingType", "CONTRACT_PRICE"),
            "closePosition": params.get("closePosition") == "true",
        }
        self.algo_orders[cid] = order
        return dict(order)

    async def cancel_algo_order(self, symbol: str, client_algo_id: str) -> dict[str, Any]:
        self.sent.append(
            Sent("DELETE /fapi/v1/algoOrder", {"symbol": symbol, "clientAlgoId": client_algo_id})
        )
        order = self.algo_orders.get(client_algo_id)
        if order is None or order["algoStatus"] != "NEW":
            raise OrderRejected(-2011, "Unknown order sent.")
        order["algoStatus"] = "CANCELED"
        return {
            "algoId": order["algoId"],
            "clientAlgoId": client_algo_id,
            "code": "200",
            "msg": "success",
        }

    async def get_algo_order(self, symbol: str, client_algo_id: str) -> dict[str, Any] | None:
        if self.lookup_misses > 0:
            self.lookup_misses -= 1
            return None
        order = self.algo_orders.get(client_algo_id)
        return None if order is None else dict(order)

    async def symbol_config(self, symbol: str | None = None) -> list[dict[str, Any]]:
        symbols = {s for s, _leg in self.positions} | set(self.leverage)
        return [
            {
                "symbol": s,
                "marginType": self.margin_types.get(s, "CROSSED"),
                "isAutoAddMargin": False,
                "leverage": self.leverage.get(s, 20),
                "maxNotionalValue": "1000000",
            }
            for s in sorted(symbols)
            if symbol in (None, s)
        ]

    async def account_config(self) -> dict[str, Any]:
        return {
            "feeTier": 0,
            "canTrade": True,
            "canDeposit": True,
            "canWithdraw": True,
            "dualSidePosition": self.hedge,
            "updateTime": 0,
            "multiAssetsMargin": self.multi_assets,
            "tradeGroupId": -1,
        }

    async def open_algo_orders(self, symbol: str | None = None) -> list[dict[str, Any]]:
        return [
            dict(o)
            for o in self.algo_orders.values()
            if o["algoStatus"] == "NEW" and symbol in (None, o["symbol"])
        ]

    async def position_risk(self) -> list[dict[str, Any]]:
        rows = []
        for (symbol, leg), (amount, entry) in self.positions.items():
            if amount == 0:
                continue
            signed = -amount if self.hedge and leg == "SHORT" else amount
            rows.append(
                {
                    "symbol": symbol,
                    "positionSide": leg,
                    "positionAmt": str(signed),
                    "entryPrice": str(entry),
                    "markPrice": str(self.marks.get(symbol, Decimal(0))),
                    "leverage": str(self.leverage.get(symbol, 20)),
                    "liquidationPrice": str(self.liquidation.get((symbol, leg), "0")),
                }
            )
        return rows

    async def account(self) -> dict[str, Any]:
        return {
            "totalWalletBalance": str(self.balance),
            "totalMarginBalance": str(self.balance),
            "availableBalance": str(self.balance),
        }

    async def mark_price_klines(self, symbol: str, interval: str, limit: int) -> list[list[Any]]:
        return []

    async def premium_index(self, symbol: str | None = None) -> list[dict[str, Any]]:
        return [
            {"symbol": s, "markPrice": str(p)} for s, p in self.marks.items() if symbol in (None, s)
        ]

    async def ticker_24hr(self) -> list[dict[str, Any]]:
        return []

    async def create_listen_key(self) -> str:
        return "listen-key"

    async def keepalive_listen_key(self) -> None:
        return None

    async def close_listen_key(self) -> None:
        return None


def retryable_429() -> RetryableError:
    error = RetryableError(
        -1003,
        "Too many requests; current limit of IP is 2400 requests per minute.",
        http_status=429,
    )
    error.retry_after_s = 0.0  # type: ignore[attr-defined]
    return error
