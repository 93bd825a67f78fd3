"""The trading desk: guard, sizing, router, engine and store wired into one trading core.

Its parts, each a module: ``desk_core`` (shared state and helpers), ``desk_exits`` (exit
actions, closes, backstops), ``desk_reconcile`` (account updates, adoption, hand-over,
pending actions) and this module, the desk itself: intake and entries, the user stream's
dispatch, the flatten and the clean stop. This module may not change a leg's state except
through ``LegBook`` (``next_leg_state``), nor send an order except through the router.

This is the one object the daemon talks to. It is plain code over data: it owns no socket
and no timer; the daemon feeds it intents, the exit engine's actions and user-stream events.

Life of an entry: ``submit(intent)`` reads the mark and account (async), then the guard
decides atomically (sync; decision, reservation and ``opening`` row in one transaction),
leverage and margin type are set and confirmed, the MARKET entry is sent; when it fills
(REST ``RESULT`` or the stream, whichever first) the position opens in the engine and the
store, the reservation is released and the backstop placed.

Life of an exit: ``on_actions(actions)`` schedules one task per action (the market task
never waits for REST); the router sends it under the position's lock, clipped to the live
quantity; a fill confirms the action in the engine (``engine.confirm(action,
filled_quantity)``), a rejection gives it back (``engine.reject``), ``-2022`` (already
flat) closes the position after a check with the venue.

User stream: ``on_user_event(event)`` takes decoded ORDER_TRADE_UPDATE, ALGO_UPDATE,
ACCOUNT_UPDATE and TRADE_LITE documents; fills are deduplicated on trade id, order states
advance, positions changed behind our back are resized, closed or adopted.

Several daemons on one account (``pyquant.scale``): ``ownership`` returns the symbols this
desk runs; account changes, fills and flattens on other symbols are left to their owners,
``hand_over(symbol)`` stops running a symbol another daemon took (nothing is closed), and
``adoption_hint`` lends ``adopt`` the exit state the previous owner published, so a takeover
resumes the ladder and trailing stop where they were instead of starting over.

Usage (the daemon)::

    desk = TradingDesk(venue, store, rules, engine, DeskConfig())
    report = await reconcile(desk)                # pyquant.trading.recovery, before anything else
    decision = await desk.submit(intent)          # from any intent source
    desk.on_actions(engine.on_mark_message(raw))  # market task, per websocket message
    await desk.on_user_event(event)               # user-data task, per event
    desk.on_stream_lost("user stream down")       # entries fail closed until reconcile
    desk.update_rules(new_rules)                  # after an exchangeInfo refresh
    desk.save_snapshot()                          # on a timer (e.g. every second)
    steps = await desk.flatten()                  # kill switch
    await desk.drain(); desk.summary()            # clean stop
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from pyquant.errors import ExchangeError, PyquantError
from pyquant.trading.desk_core import (
    ActionLike,
    DeskConfig,
    DeskRules,
    EngineLike,
    as_decimal,
)
from pyquant.trading.desk_reconcile import LegReconciler
from pyquant.trading.guard import GuardDecision
from pyquant.trading.intents import Intent, IntentError
from pyquant.trading.journal import Fill, PositionRow
from pyquant.trading.legs import (
    Adopted,
    EntryDecided,
    EntryFailed,
    EntryFilled,
    FlattenEnded,
    FlattenStarted,
    LegKey,
    LegState,
    WorkDone,
)
from pyquant.trading.orders import FINAL_STATES, OrderOutcome, OrderState, venue_legs
from pyquant.trading.router import FlattenStep
from pyquant.trading.sizing import (
    SizeDecision,
    SizingInputUnavailable,
    read_input,
    size_entry,
    unavailable_decision,
)

logger = logging.getLogger(__name__)


class TradingDesk(LegReconciler):
    """The trading core; see the module docstring."""

    def reject_malformed(self, source: str, payload: object, error: IntentError | str) -> None:
        """Record a payload that is not a valid intent (the source keeps running)."""
        detail = str(error)
        self.store.record_malformed_intent(source, payload, "invalid", detail)
        self._note("rejection", reason="invalid", detail=detail, source=source)
        logger.info("Intent rejected source=%s reason=invalid detail=%s", source, detail)

    async def _account_numbers(self) -> tuple[Decimal, Decimal]:
        now = self._clock()
        if self._account is None or now - self._account[0] > self.config.account_ttl_ms:
            document = await self.venue.account()
            equity = as_decimal(
                document.get("totalMarginBalance") or document.get("totalWalletBalance")
            )
            available = as_decimal(document.get("availableBalance"))
            self._account = (now, equity, available)
        return self._account[1], self._account[2]

    async def _mark(self, symbol: str) -> Decimal | None:
        """Return the symbol's mark: the stream's when fresh, else premiumIndex.

        Raises:
            SizingInputUnavailable: the venue could not be read (retried where safe).
        """
        if self._mark_price is not None:
            price = self._mark_price(symbol)
            if price is not None:
                return price
        rows = await read_input(
            "mark price", lambda: self.venue.premium_index(symbol), sleep=self._sleep
        )
        for row in rows:
            if row.get("symbol") == symbol:
                return as_decimal(row.get("markPrice")) or None
        return None

    async def submit(self, intent: Intent, *, payload: object = None) -> GuardDecision:
        """Decide one intent and, when accepted, open its position.

        Returns once the decision is recorded and the entry has an outcome (filled, failed,
        or waiting for the user stream).
        """
        early = self.guard.refuse_early(intent, payload=payload)
        if early is not None:
            # A duplicate, halted or stale intent costs no request to the venue.
            return self._refused(intent, early)
        mark: Decimal | None = None
        equity = available = Decimal(0)
        unavailable: SizingInputUnavailable | None = None
        if self.guard.state_known:
            try:
                mark = await self._mark(intent.symbol)
                equity, available = await read_input(
                    "account", self._account_numbers, sleep=self._sleep
                )
            except SizingInputUnavailable as exc:
                # An exchange failure is said as one (code and all), not as a sizing verdict.
                unavailable = exc
                logger.warning(
                    "Sizing inputs unavailable intent_id=%s error=%s", intent.intent_id, exc
                )

        def size(candidate: Intent, leverage: int) -> SizeDecision:
            if unavailable is not None:
                return unavailable_decision(unavailable)
            if mark is None:
                return SizeDecision(False, reason="invalid", detail="no mark price for the symbol")
            return size_entry(
                self.rules,
                self.engine,
                self.config.sizing,
                symbol=candidate.symbol,
                position_side=candidate.position_side,
                price=mark,
                leverage=leverage,
                equity=equity,
                available_margin=available,
                size_usd=candidate.size_usd,
            )

        decision = self.guard.decide(intent, size=size, payload=payload)
        if not decision.accepted:
            return self._refused(intent, decision)
        self._note(
            "accepted",
            intent_id=intent.intent_id,
            symbol=intent.symbol,
            quantity=decision.quantity,
            position_id=decision.position_id,
            intent=intent,
        )
        assert decision.position_id is not None  # noqa: S101 - accepted decisions carry one
        if self.entry_gate is not None:
            refused = await self.entry_gate(intent, decision)
            if refused is not None:
                self._entry_failed(decision.position_id, f"account limit {refused}")
                return decision
        key = (intent.symbol, intent.position_side)
        if self.config.shadow:
            # On paper: the position opens at the mark the sizing used and its exits run
            # (logged, confirmed in the engine), but nothing is sent.
            position = self.store.get_position(decision.position_id)
            if position is None or mark is None or not decision.quantity:
                self._entry_failed(decision.position_id, "shadow mode: no mark to open at")
            else:
                await self._open_filled(position, Decimal(decision.quantity), mark)
            return decision
        # From here to its outcome the entry is work in flight on the leg (OPENING): a live
        # reconciliation leaves it alone, whatever the exchange shows meanwhile.
        self.legs.apply(key, EntryDecided(decision.position_id))
        async with self.legs.lock(key).hold():
            try:
                await self.router.prepare_symbol(intent.symbol, decision.leverage)
            except Exception as exc:  # fail closed whatever the cause; the leg must not stay held
                self._entry_failed(decision.position_id, f"symbol setup failed: {exc}")
                return decision
            self._entry_leverage[decision.position_id] = decision.leverage
            outcome = await self.router.send_entry(
                decision.position_id, intent.symbol, intent.position_side, decision.quantity or "0"
            )
            await self._entry_outcome(decision.position_id, outcome)
        return decision

    def _refused(self, intent: Intent, decision: GuardDecision) -> GuardDecision:
        self._note(
            "rejection",
            intent_id=intent.intent_id,
            symbol=intent.symbol,
            reason=decision.reason,
            detail=decision.detail,
            intent=intent,
        )
        return decision

    def _entry_failed(self, position_id: str, detail: str) -> None:
        position = self.store.get_position(position_id)
        if position is not None:
            self.legs.apply((position.symbol, position.position_side), EntryFailed(position_id))
        self.guard.release(position_id)
        self.store.update_position(
            position_id,
            status="closed",
            closed_at_ms=self._clock(),
            close_reason=f"entry_failed: {detail}",
        )
        self.store.bump("entries_failed")
        self._note("entry_failed", position_id=position_id, detail=detail)
        logger.info("Entry failed position_id=%s detail=%s", position_id, detail)

    async def _entry_outcome(self, position_id: str, outcome: OrderOutcome) -> None:
        position = self.store.get_position(position_id)
        if position is None or position.status != "opening":
            return
        if outcome.state not in FINAL_STATES:
            return  # the user stream will finish it
        if not outcome.filled:
            code = (
                "" if outcome.error_code is None else f" {outcome.error_code}: {outcome.error_msg}"
            )
            self._entry_failed(position_id, f"entry {outcome.state}{code}")
            return
        await self._open_filled(
            position,
            outcome.executed_qty,
            outcome.avg_price,
            opened_at_ms=outcome.time_ms,
            client_order_id=outcome.client_order_id,
        )

    async def _fill_price(self, position: PositionRow, client_order_id: str) -> Decimal | None:
        # The New Order answer may carry no avgPrice (contract 2.5): ask for the order, then
        # for the leg's entry price as the exchange computes it. Never the mark.
        if client_order_id:
            try:
                order = await self.venue.get_order(position.symbol, client_order_id)
            except ExchangeError as exc:
                logger.warning("Entry order lookup failed cid=%s error=%s", client_order_id, exc)
                order = None
            price = as_decimal((order or {}).get("avgPrice"))
            if price > 0:
                return price
        try:
            rows = await self.venue.position_risk()
        except ExchangeError as exc:
            logger.warning("positionRisk failed error=%s", exc)
            return None
        for row in rows:
            if str(row.get("symbol")) != position.symbol:
                continue
            amount = as_decimal(row.get("positionAmt"))
            leg = str(row.get("positionSide", "BOTH"))
            if leg == "BOTH":
                leg = "LONG" if amount > 0 else "SHORT"
            price = as_decimal(row.get("entryPrice"))
            if leg == position.position_side and amount != 0 and price > 0:
                return price
        return None

    async def _open_filled(
        self,
        position: PositionRow,
        quantity: Decimal,
        avg_price: Decimal | None,
        *,
        opened_at_ms: int = 0,
        client_order_id: str = "",
    ) -> None:
        # The REST answer and the user stream may both report the fill: open once.
        if position.position_id in self._opened:
            return
        self._opened.add(position.position_id)
        now = self._clock()
        self._drop_stale_engine_copies(
            position.symbol, position.position_side, keep=position.position_id
        )
        price = avg_price
        if price is None and not self.config.shadow:
            price = await self._fill_price(position, client_order_id)
        if price is None:
            # Nothing on the exchange says the price (every read failed): the position must
            # still be managed; the mark is the only estimate left, and it is said loudly.
            try:
                price = await self._mark(position.symbol)
            except SizingInputUnavailable as exc:
                logger.error("Mark unavailable too error=%s", exc)
            logger.error(
                "Entry price unknown, the mark stands in position_id=%s mark=%s",
                position.position_id,
                price,
            )
            self._note("entry_price_estimated", position_id=position.position_id)
        entry = str(price if price is not None else Decimal(0))
        try:
            self.engine.open_position(
                position.position_id,
                position.symbol,
                position.position_side,
                str(quantity),
                entry,
                leverage=position.leverage,
                confidence=position.confidence,
                # The time stop counts in the exchange's event time: the fill's own time,
                # else the engine stamps the open with the latest mark it saw.
                opened_at_ms=opened_at_ms or None,
            )
        except (PyquantError, KeyError, ValueError):
            # The position exists on the exchange either way: keep it managed as adopted.
            logger.exception(
                "Engine refused the open, adopting position_id=%s", position.position_id
            )
            self.engine_call(
                "adopt_position",
                position.position_id,
                position.symbol,
                position.position_side,
                str(quantity),
                entry,
                leverage=position.leverage,
                opened_at_ms=opened_at_ms or None,
            )
        with self.store.transaction():
            self.store.update_position(
                position.position_id,
                status="open",
                quantity=str(quantity),
                entry_price=entry,
                opened_at_ms=opened_at_ms or self._engine_opened_at(position.position_id) or now,
            )
            self.store.release_reservation(position.position_id)
            self.store.bump("entries")
        key = (position.symbol, position.position_side)
        leg = self.legs.get(key)
        if leg is not None and leg.state == LegState.OPENING:
            self.legs.apply(key, EntryFilled(position.position_id))
        else:
            self.legs.apply(key, Adopted(position.position_id))
        self.save_snapshot()
        self._note(
            "entry",
            position_id=position.position_id,
            symbol=position.symbol,
            side=position.position_side,
            quantity=str(quantity),
            price=entry,
        )
        logger.info(
            "Position opened position_id=%s symbol=%s position_side=%s quantity=%s entry=%s",
            position.position_id,
            position.symbol,
            position.position_side,
            quantity,
            entry,
        )
        await self._sync_backstop(position.position_id)
        # Off the entry's path: the liquidation price only exists once the position does.
        self.spawn(self._refresh_liquidation_quietly(), "liquidation-prices")
        if not self.owns(position.symbol):
            # The symbol's lease went to another daemon while the entry was in flight: the
            # new owner adopts the position; running it here too would double its exits.
            await self.hand_over(position.symbol)

    async def on_user_event(self, event: Mapping[str, Any]) -> None:
        """Apply one decoded user-data event (unknown kinds are ignored)."""
        kind = event.get("e")
        if kind == "ORDER_TRADE_UPDATE":
            await self._on_order(event.get("o") or {}, int(event.get("E") or 0))
        elif kind == "ALGO_UPDATE":
            self.router.on_algo_update(event.get("o") or {}, int(event.get("E") or 0))
        elif kind == "ACCOUNT_UPDATE":
            await self._on_account(event.get("a") or {})
        elif kind == "TRADE_LITE":
            pass  # ORDER_TRADE_UPDATE carries the same fill; fills dedupe on trade id anyway

    async def _on_order(self, order: Mapping[str, Any], event_time_ms: int) -> None:
        cid = str(order.get("c", ""))
        before = self.store.get_order(cid)
        if before is None and not self.owns(str(order.get("s"))):
            return  # another daemon's symbol: its owner records it
        trade_id = order.get("t")
        forced = _forced_close_reason(cid)
        if forced is not None and order.get("X") == "FILLED":
            leg = str(order.get("ps", "BOTH"))
            if leg == "BOTH":
                leg = "LONG" if order.get("S") == "SELL" else "SHORT"
            self._note_forced_close(str(order.get("s")), leg, forced)
        # A liquidation's fill comes as x=CALCULATED, not TRADE: it is a fill all the same.
        if order.get("x") in ("TRADE", "CALCULATED") and trade_id not in (None, 0, "0"):
            fill = Fill(
                symbol=str(order.get("s")),
                trade_id=str(trade_id),
                client_order_id=cid or None,
                exchange_order_id=None if order.get("i") is None else str(order["i"]),
                side=str(order.get("S")),
                position_side=str(order.get("ps")),
                price=str(order.get("L", "0")),
                quantity=str(order.get("l", "0")),
                commission=str(order.get("n") or "0"),
                commission_asset=None if order.get("N") is None else str(order["N"]),
                realized_pnl=str(order.get("rp") or "0"),
                time_ms=int(order.get("T") or event_time_ms),
            )
            if self.store.add_fill(fill):
                self._note(
                    "fill",
                    symbol=fill.symbol,
                    client_order_id=fill.client_order_id,
                    side=fill.side,
                    position_side=fill.position_side,
                    price=fill.price,
                    quantity=fill.quantity,
                    commission=fill.commission,
                    realized_pnl=fill.realized_pnl,
                    trade_id=fill.trade_id,
                )
        row = self.router.on_order_update(order, event_time_ms)
        if row is None or before is None:
            return
        became_final = (
            OrderState(before.status) not in FINAL_STATES and OrderState(row.status) in FINAL_STATES
        )
        if not became_final:
            return
        outcome = OrderOutcome(
            row.client_order_id,
            OrderState(row.status),
            as_decimal(row.executed_qty),
            as_decimal(row.avg_price) or None,
            time_ms=row.exchange_time_ms,
        )
        if row.kind == "entry":
            await self._entry_outcome(row.position_id, outcome)
        elif row.kind == "exit":
            action = self._actions.pop(row.client_order_id, None)
            work = self._exit_tokens.pop(row.client_order_id, None)
            if action is not None:
                # Off the user-stream task: the leg's lock may be held by other work.
                self.spawn(self._settle_exit(row.position_id, action, outcome, work), "exit-settle")
            elif work is not None:
                self.legs.apply(work[0], WorkDone(work[1]))

    async def _settle_exit(
        self,
        position_id: str,
        action: Any,  # noqa: ANN401
        outcome: OrderOutcome,
        work: tuple[LegKey, str] | None,
    ) -> None:
        key = work[0] if work is not None else (str(action.symbol), str(action.position_side))
        try:
            async with self.legs.lock(key).hold():
                await self._exit_outcome(position_id, action, outcome)
        finally:
            if work is not None:
                self.legs.apply(work[0], WorkDone(work[1]))

    async def flatten(self) -> list[FlattenStep]:
        """Kill switch: close every position, then cancel our orders; report each step.

        Every leg is FLATTENING first (its exits and backstop moves refused from then on;
        those in flight finish), the router closes each leg from the quantity it reads under
        the leg's lock before any protection is cancelled, and a leg whose close failed
        returns to its exits. In shadow mode nothing is sent: paper positions close on paper.
        """
        self.guard.mark_state_unknown("flatten in progress")
        if self.config.shadow:
            steps = []
            for position in self.store.positions(("open",)):
                if not self.is_paper(position):
                    continue
                self.engine_call("close_position", position.position_id)
                self.store.bump("exits", "flatten")
                await self._closed(position, "flatten")
                steps.append(
                    FlattenStep(
                        "close", position.symbol, position.position_side, "", True, "on paper"
                    )
                )
            return steps
        scope = self.ownership() if self.ownership is not None else None
        known: dict[tuple[str, str], str] = {}
        flattening: list[LegKey] = []
        for position in self.store.positions(("open",)):
            if scope is not None and position.symbol not in scope:
                continue
            key = self._leg_of(position)
            known[key] = position.position_id
            self.legs.apply(key, FlattenStarted())
            flattening.append(key)
        try:
            steps = await self.router.flatten(known, symbols=scope)
            for step in steps:
                logger.info(
                    "Flatten step=%s symbol=%s position_side=%s ok=%s detail=%s",
                    step.step,
                    step.symbol,
                    step.position_side,
                    step.ok,
                    step.detail,
                )
            legs = venue_legs(await self.venue.position_risk())
            for position in self.store.positions(("open",)):
                if scope is not None and position.symbol not in scope:
                    continue
                if legs.get((position.symbol, position.position_side), Decimal(0)) == 0:
                    self.engine_call("close_position", position.position_id)
                    self.store.bump("exits", "flatten")
                    await self._closed(position, "flatten")
        finally:
            for key in flattening:
                self.legs.apply(key, FlattenEnded())
        return steps

    async def drain(self) -> None:
        """Wait for every scheduled exit to finish (clean stop: no half-sent order)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        self.save_snapshot()

    def summary(self) -> dict[str, object]:
        """Return the run summary (the keys of issue 5's ``--summary-json``)."""
        latencies = sorted(self._latencies_ms)

        def pct(p: float) -> float | None:
            if not latencies:
                return None
            return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))], 3)

        return {
            "intents_accepted": self.store.counter("intents_accepted"),
            "intents_rejected": self.store.counters("intents_rejected"),
            "entries": self.store.counter("entries"),
            "exits": self.store.counters("exits"),
            "realized_pnl": str(self.store.realized_pnl()),
            "order_rejections": self.store.counters("order_rejections"),
            "open_positions": len(self.store.positions(("open",))),
            "latency_ms": {"p50": pct(0.50), "p99": pct(0.99)},
            "position_mode": self.router.mode,
        }


def _forced_close_reason(client_order_id: str) -> str | None:
    # Binance names the orders it sends itself (contract, ORDER_TRADE_UPDATE ``c``).
    if client_order_id.startswith("autoclose-"):
        return "liquidation"
    if client_order_id.startswith("adl_autoclose"):
        return "adl"
    return None


__all__ = ["ActionLike", "DeskConfig", "DeskRules", "EngineLike", "TradingDesk"]
