"""The Algo Service of the simulated venue: conditional orders from request to their child order.

Validates ``/fapi/v1/algoOrder`` requests (``algoType=CONDITIONAL``) into Binance's codes, holds
the orders until a price update meets their condition (stop, take-profit, trailing; mark or
contract price, ``priceProtect``), then places the child through the matching layer and reports
``ALGO_UPDATE`` ``TRIGGERING``/``TRIGGERED``/``FINISHED`` in the order of contract 2.5;
``GTE_GTC`` orders expire when their leg goes flat. Rules in :mod:`pyquant.sim.exchange`. It may
not fill, price or expire normal orders itself nor change positions or the wallet: every child
goes through :class:`~pyquant.sim.matching.Matching`.
"""

from __future__ import annotations

import secrets
from decimal import Decimal
from typing import Any

from pyquant.sim.matching import CONDITIONAL_TYPES, Matching
from pyquant.sim.state import ZERO, AlgoOrder, Order, order_log
from pyquant.sim.validation import (
    MSG,
    BinanceError,
    check_client_id,
    parse_bool,
    parse_required,
    plain,
)

__all__ = ["AlgoOrders"]


class AlgoOrders(Matching):
    """Conditional orders: checks, triggers, children and their ``ALGO_UPDATE`` events."""

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

    def _check_triggers(self, symbol: str, mark: Decimal) -> None:
        """Trigger the open algo orders of ``symbol`` whose condition the new prices meet."""
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
        self._record("order", **order_log(order))
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

    # --- hooks of the matching layer ----------------------------------------------------------

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

    def _after_position_change(self, symbol: str) -> None:
        """Also expire ``GTE_GTC`` algo orders whose leg went flat."""
        super()._after_position_change(symbol)
        for algo in self.open_algo_orders(symbol):
            if algo.time_in_force != "GTE_GTC":
                continue
            if not self.position(symbol, algo.position_side).amount:
                self._algo_status(algo, "EXPIRED", reason="GTE condition unsatisfied")
