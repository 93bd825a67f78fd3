"""The order router: the one place that records and sends every order.

Its job is sending: mode-aware submission of entries, exits and the flatten, write-ahead in
the journal, lookups of unknown outcomes, retries and the user stream's order updates. What an
order is (client ids, wire params, the state machine) is ``pyquant.trading.orders``; the
exchange-side backstops are ``pyquant.trading.backstops`` (``router.backstops``), which send
through this router. It may not decide what to trade (the desk and the guard do) nor change a
leg's state (``pyquant.trading.legs``).

Rules it keeps (architecture.md, "Rules the whole system keeps"; contract sections 3 and 5):

* Position mode is read from the venue (``venue.is_hedge_mode``) at start and after every
  ``-4061`` (or ``-1106`` naming reduceOnly); params are then rebuilt and sent once more.
* Hedge mode: ``positionSide`` LONG/SHORT, never ``reduceOnly``. One-way: ``positionSide``
  BOTH, and ``reduceOnly="true"`` on every exit. Exits are MARKET orders for the engine's
  quantity, clipped to the live position, never more.
* Every request has a deterministic client id ``pq<tag>-<position>-<kind><sequence>-<attempt>``
  (``client_order_id``), written to the store (status ``SENT``) before the request goes out.
* Timeout, 5xx, ``-1000``/``-1006``/``-1007`` arrive as ``OrderStatusUnknown``: the order is
  looked up by client id (bounded retries) before anything else is sent for that action.
* ``RetryableError`` (429, ``-1003``, ``-1015``): nothing was accepted; back off as told and
  resend under the next attempt id. ``-2022`` on an exit: the leg is already flat.
  Filter errors (``-1111``, ``-4164``, ...): the rules are stale (``on_rules_stale``).
* One close at a time per position (``position_lock``).
* Exchange-side backstop (``backstops.py``): a closePosition STOP_MARKET algo order on
  MARK_PRICE, a configured distance beyond the engine's stop; moved only to tighten,
  throttled, new before old is cancelled (algo orders cannot be modified); cancelled when the
  position closes.
* Order states change in one ``match`` over (state, event) (``orders.next_state``); an order leaves
  the live set only when both the REST reply and the user stream said it is final.

Usage::

    router = OrderRouter(venue, store, rules, RouterConfig())
    await router.refresh_mode()
    await router.prepare_symbol("BTCUSDT", leverage=10, margin_type="CROSSED")
    outcome = await router.send_entry("1a", "BTCUSDT", "LONG", "0.010")
    outcome = await router.send_exit("1a", "BTCUSDT", "LONG", "0.003", sequence=1,
                                     reason="take_profit_1", live_quantity=Decimal("0.010"))
    await router.backstops.update_backstop("1a", "BTCUSDT", "LONG", stop_price="29880.0")
    router.on_order_update(event["o"], event["E"])   # ORDER_TRADE_UPDATE
    router.on_algo_update(event["o"], event["E"])    # ALGO_UPDATE
    steps = await router.flatten()
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

from pyquant.errors import ExchangeError, OrderRejected, OrderStatusUnknown, RetryableError
from pyquant.exchange.venue import JsonObject, Venue
from pyquant.trading.backstops import Backstops, StopWouldTrigger
from pyquant.trading.journal import OrderRecord, OrderRow, Store
from pyquant.trading.legs import TaskLock
from pyquant.trading.orders import (
    ALGO_STATES,
    CLIENT_ORDER_ID,
    FILTER_ERROR_CODES,
    FINAL_STATES,
    LookupMissing,
    OrderEvent,
    OrderKind,
    OrderOutcome,
    OrderState,
    PositionMode,
    RestAnswer,
    RestRejected,
    RestUnknown,
    RouterError,
    StreamUpdate,
    backoff_s,
    backstop_params,
    client_order_id,
    closing_side,
    decimal_or,
    entry_params,
    exit_params,
    is_mode_error,
    is_ours,
    next_state,
    nonzero_text,
    opening_side,
    order_state,
    rest_answer,
    venue_legs,
)

logger = logging.getLogger(__name__)


class RulesLike(Protocol):
    """What the router needs from ``pyquant.ExchangeRules``."""

    def quantize_price(self, symbol: str, price: str, rounding: str = "down") -> str:
        """Return ``price`` on the symbol's tick grid as a wire string."""
        ...

    def quantize_qty(self, symbol: str, qty: str, market: bool = True) -> str:
        """Return ``qty`` floored to the symbol's step as a wire string."""
        ...


@dataclass(frozen=True, slots=True)
class FlattenStep:
    """One reported step of the kill switch."""

    step: str  # "close", "cancel_order", "cancel_backstop", "verify" (a leg still open)
    symbol: str
    position_side: str
    client_order_id: str
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """Router settings.

    Attributes:
        backstop_enabled: place the exchange-side closePosition stop.
        backstop_distance_pct: how far beyond the engine's stop it triggers (0.005 = 0.5 %).
        backstop_min_interval_ms: move it at most this often per position.
        lookup_delays_s: pauses between lookups after an unknown outcome.
        retry_limit: resends after ``RetryableError`` before giving up.
        default_backoff_s: pause after a retryable error that names no wait.
        margin_type: ``CROSSED`` or ``ISOLATED``, set per symbol before its first entry.
    """

    backstop_enabled: bool = True
    backstop_distance_pct: Decimal = Decimal("0.005")
    backstop_min_interval_ms: int = 5_000
    lookup_delays_s: tuple[float, ...] = (0.2, 1.0, 3.0)
    retry_limit: int = 2
    default_backoff_s: float = 1.0
    margin_type: str = "CROSSED"


@dataclass(slots=True)
class RouterStats:
    """Counters the dashboard shows (the store keeps the durable ones)."""

    sent: int = 0
    unknown: int = 0
    resolved_by_lookup: int = 0
    mode_refreshes: int = 0
    rules_refreshes: int = 0
    backstops_moved: int = 0
    last_error: str = ""
    rejections: dict[int, int] = field(default_factory=dict)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class OrderRouter:
    """Builds, records and sends every order; see the module docstring."""

    def __init__(
        self,
        venue: Venue,
        store: Store,
        rules: RulesLike,
        config: RouterConfig | None = None,
        *,
        clock: Callable[[], int] = _now_ms,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_rules_stale: Callable[[str, int], Awaitable[object]] | None = None,
    ) -> None:
        self.venue = venue
        self.store = store
        self.rules = rules
        self.config = config or RouterConfig()
        self.mode: PositionMode | None = None
        self.stats = RouterStats()
        self._clock = clock
        self._sleep = sleep
        self._on_rules_stale = on_rules_stale
        self._tag = store.instance_tag
        self._locks: dict[str, TaskLock] = {}
        self._prepared: dict[str, int] = {}
        self._mode_lock = asyncio.Lock()
        self._in_flight: set[str] = set()
        # Told every stored order change (status, fills): the daemon publishes them as events.
        self.on_order_change: Callable[[OrderRow], None] | None = None
        # Fence of a shared account (pyquant.scale.membership): False = send nothing for it.
        self.send_gate: Callable[[str], bool] | None = None
        # The exchange-side stops of every position (pyquant.trading.backstops).
        self.backstops = Backstops(self)
        self.backstops.load()

    # ---- mode and symbol setup --------------------------------------------------------------

    async def refresh_mode(self) -> PositionMode:
        """Read the position mode from the venue (start, and after ``-4061``)."""
        async with self._mode_lock:
            hedge = await self.venue.is_hedge_mode()
            mode: PositionMode = "hedge" if hedge else "one-way"
            if self.mode is not None and mode != self.mode:
                logger.warning("Position mode changed old=%s new=%s", self.mode, mode)
            self.mode = mode
            self.stats.mode_refreshes += 1
            self.store.set_meta("position_mode", mode)
            return mode

    async def current_mode(self) -> PositionMode:
        """Return the known position mode, reading it from the venue the first time."""
        return self.mode if self.mode is not None else await self.refresh_mode()

    async def prepare_symbol(self, symbol: str, leverage: int) -> None:
        """Set and confirm the symbol's leverage and margin type before its first entry.

        Raises:
            RouterError: the venue did not confirm them (the entry must fail closed).
        """
        if self._prepared.get(symbol) == leverage:
            return
        try:
            await self.venue.set_margin_type(symbol, self.config.margin_type)
            answer = await self.venue.set_leverage(symbol, leverage)
        except ExchangeError as exc:
            raise RouterError(
                f"leverage {leverage} / margin type {self.config.margin_type} for {symbol} "
                f"was not confirmed: {exc}"
            ) from exc
        confirmed = answer.get("leverage")
        if confirmed is None or int(confirmed) != leverage:
            raise RouterError(
                f"leverage for {symbol} was confirmed as {confirmed!r}, expected {leverage}"
            )
        self._prepared[symbol] = leverage

    def position_lock(self, position_id: str) -> TaskLock:
        """Return the lock that serializes closes of one position (re-entrant per task)."""
        lock = self._locks.get(position_id)
        if lock is None:
            lock = self._locks[position_id] = TaskLock()
        return lock

    # ---- state machine application ----------------------------------------------------------

    def apply_event(self, client_id: str, event: OrderEvent) -> OrderRow | None:
        """Move an order's journal row through ``next_state``; None when it is not ours."""
        row = self.store.get_order(client_id)
        if row is None:
            return None
        transition = next_state(row, event)
        if transition.note:
            logger.debug(
                "Order update dropped client_order_id=%s note=%s", client_id, transition.note
            )
        if transition.changes:
            self.store.update_order(client_id, **transition.changes)
            updated = self.store.get_order(client_id)
            if updated is not None and self.on_order_change is not None:
                try:
                    self.on_order_change(updated)
                except Exception:  # an observer's bug must not break the order's bookkeeping
                    logger.exception("Order change observer failed client_order_id=%s", client_id)
            return updated
        return row

    def _outcome(self, row: OrderRow, *, flat: bool = False) -> OrderOutcome:
        return OrderOutcome(
            client_order_id=row.client_order_id,
            state=OrderState(row.status),
            executed_qty=decimal_or(row.executed_qty, Decimal(0)) or Decimal(0),
            avg_price=decimal_or(row.avg_price),
            error_code=row.error_code,
            error_msg=row.error_msg,
            flat=flat,
            time_ms=row.exchange_time_ms,
        )

    def is_in_flight(self, client_id: str) -> bool:
        """Return True while this process awaits the venue's answer to the request."""
        return client_id in self._in_flight

    def live_orders(self, position_id: str | None = None) -> list[OrderRow]:
        """Return orders not yet final on both the REST and the stream side."""
        rows = self.store.orders(position_id=position_id)
        return [row for row in rows if not (row.rest_final and row.stream_final)]

    # ---- sending ----------------------------------------------------------------------------

    async def send_entry(
        self, position_id: str, symbol: str, leg: str, quantity: str
    ) -> OrderOutcome:
        """Send the MARKET entry of a new position (sequence 0)."""
        return await self._send(
            "entry", position_id, symbol, leg, 0, "entry", quantity, entry_params
        )

    async def send_exit(
        self,
        position_id: str,
        symbol: str,
        leg: str,
        quantity: str,
        *,
        sequence: int,
        reason: str,
        live_quantity: Decimal | Callable[[], Decimal] | None = None,
        kind: OrderKind = "exit",
    ) -> OrderOutcome:
        """Send a MARKET exit for the engine's quantity, never more than ``live_quantity``.

        ``live_quantity`` may be a callable, read once the position's lock is held.

        The caller holds no lock; this takes the position's lock, so two closes of one
        position are never in flight together.
        """
        async with self.position_lock(position_id).hold():
            # A callable is read under the lock, after any earlier close of this position.
            if callable(live_quantity):
                live_quantity = live_quantity()
            wanted = Decimal(quantity)
            if live_quantity is not None and wanted > live_quantity:
                clipped = self.rules.quantize_qty(symbol, str(live_quantity), True)
                logger.warning(
                    "Exit clipped to live position position_id=%s quantity=%s live=%s sent=%s",
                    position_id,
                    quantity,
                    live_quantity,
                    clipped,
                )
                quantity = clipped
            max_qty = self.market_max_qty(symbol)
            if kind == "exit" and max_qty is not None and Decimal(quantity) > max_qty:
                # One MARKET order may not exceed MARKET_LOT_SIZE maxQty (-4005). The engine
                # takes the fill as partial and emits the rest on the next update.
                capped = self.rules.quantize_qty(symbol, str(max_qty), True)
                logger.warning(
                    "Exit above MARKET_LOT_SIZE maxQty position_id=%s quantity=%s sent=%s",
                    position_id,
                    quantity,
                    capped,
                )
                quantity = capped
            if Decimal(quantity) <= 0:
                return OrderOutcome("", OrderState.REJECTED, flat=True, skipped=True)
            return await self._send(
                kind, position_id, symbol, leg, sequence, reason, quantity, exit_params
            )

    async def _send(
        self,
        kind: OrderKind,
        position_id: str,
        symbol: str,
        leg: str,
        sequence: int,
        reason: str,
        quantity: str,
        build: Callable[[PositionMode, str, str, str, str], dict[str, str]],
    ) -> OrderOutcome:
        previous = self.store.max_attempt(position_id, kind, sequence)
        attempt = 0 if previous is None else previous + 1
        rebuilt = False
        retries = 0
        side = closing_side(leg) if kind in ("exit", "flatten") else opening_side(leg)
        while True:
            if self.send_gate is not None and not self.send_gate(symbol):
                logger.warning("Order not sent, lease fenced symbol=%s reason=%s", symbol, reason)
                return OrderOutcome("", OrderState.REJECTED, error_msg="lease_fenced", skipped=True)
            mode = await self.current_mode()
            cid = client_order_id(self._tag, position_id, kind, sequence, attempt)
            params = build(mode, symbol, leg, quantity, cid)
            self.store.insert_order(
                OrderRecord(
                    client_order_id=cid,
                    kind=kind,
                    position_id=position_id,
                    symbol=symbol,
                    position_side=leg,
                    side=side,
                    sequence=sequence,
                    attempt=attempt,
                    params=params,
                    status=OrderState.SENT,
                    reason=reason,
                )
            )
            self.stats.sent += 1
            logger.info(
                "Order sent client_order_id=%s symbol=%s position_side=%s side=%s quantity=%s "
                "reason=%s",
                cid,
                symbol,
                leg,
                side,
                quantity,
                reason,
            )
            self._in_flight.add(cid)
            try:
                reply = await self.venue.new_order(params)
            except OrderStatusUnknown as exc:
                self.apply_event(cid, RestUnknown(exc.code, exc.msg))
                return await self.resolve_unknown(cid)
            except RetryableError as exc:
                self.record_rejection(cid, exc)
                if retries >= self.config.retry_limit:
                    return self._outcome(self._must(cid))
                retries += 1
                attempt += 1
                await self._sleep(backoff_s(exc, self.config.default_backoff_s))
                continue
            except OrderRejected as exc:
                self.record_rejection(cid, exc)
                if is_mode_error(exc) and not rebuilt:
                    rebuilt = True
                    attempt += 1
                    await self.refresh_mode()
                    continue
                if exc.code in FILTER_ERROR_CODES and self._on_rules_stale is not None:
                    self.stats.rules_refreshes += 1
                    await self._on_rules_stale(symbol, exc.code)
                flat = exc.code == -2022 and kind in ("exit", "flatten")
                return self._outcome(self._must(cid), flat=flat)
            except ExchangeError as exc:
                # Any other exchange error after sending (-1000, -1006, 5xx) is no proof of
                # rejection: treat it as an unknown outcome.
                self.apply_event(cid, RestUnknown(exc.code, exc.msg))
                return await self.resolve_unknown(cid)
            except Exception as exc:
                # A timeout or a dropped connection after the request left: unknown outcome.
                self.apply_event(cid, RestUnknown(-1007, f"{type(exc).__name__}: {exc}"))
                return await self.resolve_unknown(cid)
            finally:
                self._in_flight.discard(cid)
            row = self.apply_event(cid, rest_answer(reply))
            return self._outcome(row or self._must(cid))

    def _must(self, cid: str) -> OrderRow:
        row = self.store.get_order(cid)
        if row is None:  # pragma: no cover - written ahead above
            raise RouterError(f"order {cid} vanished from the store")
        return row

    def record_rejection(self, cid: str, exc: ExchangeError) -> None:
        """Journal and count the venue's rejection of a request."""
        self.apply_event(cid, RestRejected(exc.code, exc.msg))
        self.store.bump("order_rejections", str(exc.code))
        self.stats.rejections[exc.code] = self.stats.rejections.get(exc.code, 0) + 1
        self.stats.last_error = f"{exc.code}: {exc.msg}"
        logger.info("Order rejected client_order_id=%s code=%s msg=%s", cid, exc.code, exc.msg)

    async def resolve_unknown(self, client_id: str, *, refresh: bool = False) -> OrderOutcome:
        """Resolve an unknown outcome by looking the order up (never by resending).

        ``-2013`` right after the unknown outcome is not proof of absence: the lookup is
        repeated with pauses (``lookup_delays_s``) and the user stream may answer meanwhile.
        With ``refresh`` an order in a known, non-final state (NEW, PARTIALLY_FILLED) is
        looked up too (restart: its stream events may have been missed).
        """
        row = self._must(client_id)
        self.stats.unknown += 1
        delays = (0.0, *self.config.lookup_delays_s)
        for delay in delays:
            if delay:
                await self._sleep(delay)
            row = self._must(client_id)
            state = OrderState(row.status)
            if state in FINAL_STATES or (
                not refresh and state not in (OrderState.SENT, OrderState.UNKNOWN)
            ):
                break  # the user stream answered
            try:
                if row.kind == "backstop":
                    found = await self._find_algo(row.symbol, client_id)
                else:
                    found = await self.venue.get_order(row.symbol, client_id)
            except ExchangeError as exc:
                logger.warning("Order lookup failed client_order_id=%s error=%s", client_id, exc)
                continue
            if found is not None:
                row = self.apply_event(client_id, rest_answer(found)) or row
                self.stats.resolved_by_lookup += 1
                break
        else:
            row = self.apply_event(client_id, LookupMissing()) or row
        logger.info("Unknown outcome resolved client_order_id=%s status=%s", client_id, row.status)
        return self._outcome(row)

    async def _find_algo(self, symbol: str, client_id: str) -> JsonObject | None:
        # GET /fapi/v1/algoOrder?clientAlgoId= finds the order whatever became of it
        # (contract 2.5); openAlgoOrders cannot tell "never placed" from "already triggered".
        lookup = getattr(self.venue, "get_algo_order", None)
        if callable(lookup):
            order = await lookup(symbol, client_id)
            if order is None:
                return None
            status = ALGO_STATES.get(str(order.get("algoStatus", "NEW")), OrderState.NEW)
            return {"status": status.value, "orderId": order.get("algoId")}
        for order in await self.venue.open_algo_orders(symbol):
            if order.get("clientAlgoId") == client_id:
                return {"status": order.get("algoStatus", "NEW"), "orderId": order.get("algoId")}
        return None

    # ---- user stream ------------------------------------------------------------------------

    def on_order_update(self, order: Mapping[str, Any], event_time_ms: int = 0) -> OrderRow | None:
        """Apply the ``o`` object of an ORDER_TRADE_UPDATE; None when it is not our order."""
        cid = str(order.get("c", ""))
        if not cid.startswith(f"pq{self._tag}-"):
            return None
        event = StreamUpdate(
            status=order_state(order.get("X")),
            executed_qty=None if order.get("z") is None else str(order["z"]),
            avg_price=nonzero_text(order.get("ap")),
            exchange_order_id=None if order.get("i") is None else str(order["i"]),
            time_ms=int(order.get("T") or event_time_ms or 0),
        )
        return self.apply_event(cid, event)

    def on_algo_update(self, order: Mapping[str, Any], event_time_ms: int = 0) -> OrderRow | None:
        """Apply the ``o`` object of an ALGO_UPDATE; None when it is not our order."""
        cid = str(order.get("caid", ""))
        if not cid.startswith(f"pq{self._tag}-"):
            return None
        status = ALGO_STATES.get(str(order.get("X")), OrderState.NEW)
        row = self.apply_event(
            cid,
            StreamUpdate(
                status=status,
                executed_qty=None,
                avg_price=None,
                exchange_order_id=None if order.get("aid") is None else str(order["aid"]),
                time_ms=int(order.get("ut") or event_time_ms or 0),
            ),
        )
        if row is not None and OrderState(row.status) in FINAL_STATES:
            current = self.backstops.live.get(row.position_id)
            if current is not None and current.client_id == cid:
                del self.backstops.live[row.position_id]
        return row

    # ---- kill switch ------------------------------------------------------------------------

    async def flatten(
        self,
        position_ids: Mapping[tuple[str, str], str] | None = None,
        *,
        symbols: frozenset[str] | None = None,
    ) -> list[FlattenStep]:
        """Close every position on the account, then cancel our orders; report each step.

        Closes come first: a leg keeps its exchange-side stop until it is flat, so a kill
        switch that dies half-way never leaves a leg open and unprotected. Each leg's close
        is sized from the quantity read under the leg's lock (an exit of ours may have just
        changed it), and the result is checked against a fresh positionRisk read: a leg still
        open is reported as a failed ``verify`` step (a -2022 alone proves nothing).

        Args:
            position_ids: (symbol, leg) -> our position id, for positions we know; legs not
                in it are closed under a position id derived from the symbol.
            symbols: only these symbols (the ones this daemon owns among several); None: all.
        """
        steps: list[FlattenStep] = []
        known = dict(position_ids or {})
        await self.refresh_mode()

        def in_scope(symbol: str) -> bool:
            return symbols is None or symbol in symbols

        legs = venue_legs(await self.venue.position_risk())
        for symbol, leg in sorted(legs):
            if not in_scope(symbol):
                continue
            position_id = known.get((symbol, leg)) or f"k{symbol.lower()[:6]}{leg[0].lower()}"
            async with self.position_lock(position_id).hold():
                left = venue_legs(await self.venue.position_risk()).get((symbol, leg), Decimal(0))
                steps += await self._close_leg(position_id, symbol, leg, left)
        for order in await self.venue.open_orders():
            cid = str(order.get("clientOrderId", ""))
            if not cid.startswith(f"pq{self._tag}-"):
                continue
            symbol = str(order.get("symbol"))
            if not in_scope(symbol):
                continue
            try:
                await self.venue.cancel_order(symbol, cid)
                self.apply_event(
                    cid,
                    RestAnswer(OrderState.CANCELED, str(order.get("executedQty", "0")), None, None),
                )
                steps.append(
                    FlattenStep(
                        "cancel_order",
                        symbol,
                        str(order.get("positionSide")),
                        cid,
                        True,
                        "cancelled",
                    )
                )
            except ExchangeError as exc:
                steps.append(
                    FlattenStep(
                        "cancel_order", symbol, str(order.get("positionSide")), cid, False, str(exc)
                    )
                )
        for order in await self.venue.open_algo_orders():
            cid = str(order.get("clientAlgoId", ""))
            symbol = str(order.get("symbol"))
            if symbols is not None:
                # Among several daemons a flatten of our symbols also takes the backstops a
                # peer left on them.
                if symbol not in symbols or not is_ours(cid, self._tag, peers=True):
                    continue
            elif not cid.startswith(f"pq{self._tag}-"):
                continue
            ok = await self.backstops.cancel_algo(symbol, cid)
            steps.append(
                FlattenStep(
                    "cancel_backstop",
                    symbol,
                    str(order.get("positionSide")),
                    cid,
                    ok,
                    "cancelled" if ok else "already gone",
                )
            )
        self.backstops.forget_flattened(symbols)
        for (symbol, leg), amount in sorted(venue_legs(await self.venue.position_risk()).items()):
            if in_scope(symbol):
                steps.append(FlattenStep("verify", symbol, leg, "", False, f"still open: {amount}"))
        return steps

    async def _close_leg(
        self, position_id: str, symbol: str, leg: str, left: Decimal
    ) -> list[FlattenStep]:
        steps: list[FlattenStep] = []
        max_qty = self.market_max_qty(symbol)
        # A leg above MARKET_LOT_SIZE maxQty closes in several orders.
        for _ in range(100):
            chunk = min(left, max_qty) if max_qty is not None else left
            quantity = self.rules.quantize_qty(symbol, str(chunk), True)
            if Decimal(quantity) <= 0:
                break
            sequence = (self.store.max_sequence(position_id, "flatten") or 0) + 1
            outcome = await self.send_exit(
                position_id,
                symbol,
                leg,
                quantity,
                sequence=sequence,
                reason="flatten",
                live_quantity=left,
                kind="flatten",
            )
            ok = outcome.flat or outcome.state == OrderState.FILLED
            detail = (
                f"{outcome.state} executed {outcome.executed_qty}"
                if outcome.error_code is None
                else f"{outcome.state} {outcome.error_code}: {outcome.error_msg}"
            )
            steps.append(FlattenStep("close", symbol, leg, outcome.client_order_id, ok, detail))
            left -= outcome.executed_qty
            if not ok or outcome.flat or left <= 0 or outcome.executed_qty <= 0:
                break
        return steps

    def market_max_qty(self, symbol: str) -> Decimal | None:
        """Return the symbol's MARKET_LOT_SIZE maxQty, or None when the rules do not say."""
        symbol_info = getattr(self.rules, "symbol_info", None)
        if not callable(symbol_info):
            return None
        try:
            info = symbol_info(symbol)
        except KeyError:
            return None
        value = info.get("market_max_qty") if isinstance(info, Mapping) else None
        number = decimal_or(value)
        return number if number is not None and number > 0 else None


# Names of the order model (pyquant.trading.orders, .backstops) stay importable from here.
__all__: Sequence[str] = (
    "CLIENT_ORDER_ID",
    "FINAL_STATES",
    "FlattenStep",
    "OrderOutcome",
    "OrderRouter",
    "OrderState",
    "RouterConfig",
    "RouterError",
    "StopWouldTrigger",
    "backstop_params",
    "client_order_id",
    "entry_params",
    "exit_params",
    "next_state",
)
