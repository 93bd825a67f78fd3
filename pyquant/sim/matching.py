"""Order matching of the simulated venue: normal orders from request to fill, and their events.

Validates ``/fapi/v1/order`` requests into Binance's codes, accepts them, fills MARKET and
crossing LIMIT orders against the mark (taker) and resting LIMIT orders when the mark crosses
them (maker), applies each fill to the position leg and the wallet, books trades and income,
expires what no longer fits (IOC remainders, reduce-only orders beyond the position, GTD orders)
and emits ``ORDER_TRADE_UPDATE``, ``TRADE_LITE`` and ``ACCOUNT_UPDATE``. Rules in
:mod:`pyquant.sim.exchange`. It may not touch algo orders beyond looking up their client ids:
the algo layer (:mod:`pyquant.sim.algo_orders`) extends the two hooks ``_child_done`` and
``_after_position_change``; funding and liquidation live in :mod:`pyquant.sim.liquidation`.
"""

from __future__ import annotations

import secrets
from decimal import Decimal
from typing import Any

from pyquant.sim.margin import AccountMargin
from pyquant.sim.state import ZERO, Fill, Order, Trade, order_log
from pyquant.sim.validation import (
    BinanceError,
    SymbolRules,
    check_client_id,
    fmt_decimal,
    parse_bool,
    parse_decimal,
    parse_required,
    plain,
)

__all__ = ["CONDITIONAL_TYPES", "ORDER_TYPES", "TIME_IN_FORCE", "Matching", "TestOnly"]

CONDITIONAL_TYPES = frozenset(
    {"STOP", "STOP_MARKET", "TAKE_PROFIT", "TAKE_PROFIT_MARKET", "TRAILING_STOP_MARKET"}
)
ORDER_TYPES = frozenset({"LIMIT", "MARKET"}) | CONDITIONAL_TYPES
TIME_IN_FORCE = frozenset({"GTC", "IOC", "FOK", "GTX", "GTD"})


class TestOnly(Exception):
    """Raised by :meth:`Matching.new_order` with ``test=True`` once every check passed."""


class Matching(AccountMargin):
    """Normal orders: lookup, cancel, new order checks, fills, expiry and their events."""

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
            raise TestOnly
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
        self._record("order", **order_log(order))
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

    def _match_resting(self, symbol: str, mark: Decimal) -> None:
        """Expire due GTD orders of ``symbol``, fill the resting LIMIT orders ``mark`` crossed."""
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
        now = self.now_ms()
        fee = price * qty * (self.maker_fee if maker else self.taker_fee)
        self._fill(order, price, qty, fee, now, maker=maker, exec_type="TRADE")

    def _fill(
        self,
        order: Order,
        price: Decimal,
        qty: Decimal,
        fee: Decimal,
        now: int,
        *,
        maker: bool,
        exec_type: str,
    ) -> None:
        """Book one fill of ``order`` and report it: legs and wallet, order totals, trade, events.

        ``exec_type`` is ``TRADE`` for a match (with its ``TRADE_LITE``) or ``CALCULATED`` for a
        liquidation's fill (Binance sends no ``TRADE_LITE`` for those).
        """
        rules = self.rules[order.symbol]
        realized = self._apply_fill(order, price, qty, fee, now)
        order.executed_qty += qty
        order.cum_quote += price * qty
        order.update_time = now
        order.status = "FILLED" if order.remaining == 0 else "PARTIALLY_FILLED"
        trade = self._book_trade(order, price, qty, fee, realized, now, maker=maker)
        if exec_type == "TRADE":
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
            exec_type,
            fill=Fill(price, qty, maker),
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
        """Expire reduce-only orders that no longer fit the position.

        The algo layer extends this hook (``GTE_GTC`` algo orders of flat legs).
        """
        for order in self.open_orders(symbol):
            if not order.reduce_only:
                continue
            reducing, reducible = self._reducing(symbol, order.side, order.position_side)
            if not reducing or reducible <= 0 or order.remaining > reducible:
                self._finish(order, "EXPIRED", "EXPIRED", reason=4)

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
        """Hook called whenever an order fills or becomes final.

        The algo layer ends the parent algo order of a triggered child here; normal orders
        have no parent, so matching alone has nothing to do.
        """

    # --- events ---------------------------------------------------------------------------

    def _order_event(
        self,
        order: Order,
        exec_type: str,
        *,
        fill: Fill | None = None,
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
