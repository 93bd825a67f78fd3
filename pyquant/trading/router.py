"""The order router: the one place that builds, records and sends every order.

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
* Exchange-side backstop: a closePosition STOP_MARKET algo order on MARK_PRICE, a configured
  distance beyond the engine's stop; moved only to tighten, throttled, new before old is
  cancelled (algo orders cannot be modified); cancelled when the position closes.
* Order states change in one ``match`` over (state, event) (``next_state``); an order leaves
  the live set only when both the REST reply and the user stream said it is final.

Usage::

    router = OrderRouter(venue, store, rules, RouterConfig())
    await router.refresh_mode()
    await router.prepare_symbol("BTCUSDT", leverage=10, margin_type="CROSSED")
    outcome = await router.send_entry("1a", "BTCUSDT", "LONG", "0.010")
    outcome = await router.send_exit("1a", "BTCUSDT", "LONG", "0.003", sequence=1,
                                     reason="take_profit_1", live_quantity=Decimal("0.010"))
    await router.update_backstop("1a", "BTCUSDT", "LONG", stop_price="29880.0")
    router.on_order_update(event["o"], event["E"])   # ORDER_TRADE_UPDATE
    router.on_algo_update(event["o"], event["E"])    # ALGO_UPDATE
    steps = await router.flatten()
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any, Literal, Protocol

from pyquant.errors import (
    ExchangeError,
    OrderRejected,
    OrderStatusUnknown,
    PyquantError,
    RetryableError,
)
from pyquant.exchange.venue import JsonObject, Venue
from pyquant.trading.journal import OrderRecord, OrderRow, Store
from pyquant.trading.legs import TaskLock

logger = logging.getLogger(__name__)

PositionMode = Literal["hedge", "one-way"]
Leg = Literal["LONG", "SHORT"]
OrderKind = Literal["entry", "exit", "backstop", "flatten"]

CLIENT_ORDER_ID = re.compile(r"^[\.A-Z\:/a-z0-9_-]{1,36}$")
_KIND_LETTER: dict[str, str] = {"entry": "e", "exit": "x", "backstop": "b", "flatten": "f"}

# Codes that mean our copy of the symbol's filters is wrong (contract section 5.1).
FILTER_ERROR_CODES = frozenset(
    {-1013, -1111, -4002, -4003, -4004, -4005, -4007, -4013, -4014, -4016, -4023, -4024, -4164}
)
MODE_ERROR_CODES = frozenset({-4061})
IMMEDIATE_TRIGGER_CODES = frozenset({-2021, -4142})


class RulesLike(Protocol):
    """What the router needs from ``pyquant.ExchangeRules``."""

    def quantize_price(self, symbol: str, price: str, rounding: str = "down") -> str:
        """Return ``price`` on the symbol's tick grid as a wire string."""
        ...

    def quantize_qty(self, symbol: str, qty: str, market: bool = True) -> str:
        """Return ``qty`` floored to the symbol's step as a wire string."""
        ...


class RouterError(PyquantError):
    """The router cannot proceed safely (mode unknown, symbol setup not confirmed)."""


class OrderState(StrEnum):
    """Life of one order request (see ``next_state``)."""

    SENT = "SENT"  # written ahead and being sent; no answer yet
    UNKNOWN = "UNKNOWN"  # sent, outcome unknown: must be looked up
    NEW = "NEW"
    PARTIALLY_FILLED = "PARTIALLY_FILLED"
    TRIGGERED = "TRIGGERED"  # algo order handed to the matching engine
    FILLED = "FILLED"
    CANCELED = "CANCELED"
    EXPIRED = "EXPIRED"
    REJECTED = "REJECTED"  # refused; nothing exists on the venue
    NOT_FOUND = "NOT_FOUND"  # unknown outcome resolved: the venue never had it


FINAL_STATES = frozenset(
    {
        OrderState.FILLED,
        OrderState.CANCELED,
        OrderState.EXPIRED,
        OrderState.REJECTED,
        OrderState.NOT_FOUND,
    }
)
LIVE_STATUSES: tuple[str, ...] = tuple(
    state.value for state in OrderState if state not in FINAL_STATES
)
_RANK = {
    OrderState.SENT: 0,
    OrderState.UNKNOWN: 0,
    OrderState.NEW: 1,
    OrderState.TRIGGERED: 2,
    OrderState.PARTIALLY_FILLED: 2,
}


# ---- events of the order state machine ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class RestAnswer:
    """The venue answered the request (or a lookup) with an order document."""

    status: OrderState
    executed_qty: str
    avg_price: str | None
    exchange_order_id: str | None
    time_ms: int = 0  # the order's updateTime (exchange clock), when the answer has one


@dataclass(frozen=True, slots=True)
class RestRejected:
    """The venue refused the request; nothing was placed."""

    code: int
    msg: str


@dataclass(frozen=True, slots=True)
class RestUnknown:
    """The request was sent but its outcome is unknown."""

    code: int
    msg: str


@dataclass(frozen=True, slots=True)
class LookupMissing:
    """Bounded lookups after an unknown outcome did not find the order."""


@dataclass(frozen=True, slots=True)
class StreamUpdate:
    """``ORDER_TRADE_UPDATE`` / ``ALGO_UPDATE`` for the order."""

    status: OrderState
    executed_qty: str | None
    avg_price: str | None
    exchange_order_id: str | None
    time_ms: int


OrderEvent = RestAnswer | RestRejected | RestUnknown | LookupMissing | StreamUpdate


@dataclass(frozen=True, slots=True)
class Transition:
    """Column changes for an order row; empty ``changes`` means nothing to write."""

    changes: dict[str, object]
    note: str = ""


def next_state(row: OrderRow, event: OrderEvent) -> Transition:
    """Return the row changes ``event`` causes for an order in its current state.

    Every (state, event) pair is handled here: stale or out-of-order updates are dropped
    with a note (a final state never goes back; a stream update older than the last one
    applied loses by exchange time).
    """
    state = OrderState(row.status)
    final = state in FINAL_STATES
    match state, event:
        case _, RestRejected(code=code, msg=msg) if not final or state == OrderState.REJECTED:
            # A refused request never reaches the user stream: final on both counts.
            return Transition(
                {
                    "status": OrderState.REJECTED,
                    "error_code": code,
                    "error_msg": msg[:500],
                    "rest_final": True,
                    "stream_final": True,
                }
            )
        case _, RestRejected():
            return Transition({}, f"rejection after final state {state} dropped")
        case ((OrderState.SENT | OrderState.UNKNOWN), RestUnknown(code=code, msg=msg)):
            return Transition(
                {"status": OrderState.UNKNOWN, "error_code": code, "error_msg": msg[:500]}
            )
        case _, RestUnknown():
            # The stream (or a lookup) already told us more than "unknown".
            return Transition({}, f"unknown outcome after {state} dropped")
        case ((OrderState.SENT | OrderState.UNKNOWN), LookupMissing()):
            return Transition(
                {"status": OrderState.NOT_FOUND, "rest_final": True, "stream_final": True}
            )
        case _, LookupMissing():
            return Transition({}, f"lookup miss after {state} dropped")
        case OrderState.NOT_FOUND, RestAnswer() | StreamUpdate():
            # NOT_FOUND was inferred from lookups, not said by the venue: a real answer wins.
            return Transition(
                {
                    "status": event.status,
                    "executed_qty": event.executed_qty or row.executed_qty,
                    "avg_price": event.avg_price or row.avg_price,
                    "exchange_order_id": event.exchange_order_id or row.exchange_order_id,
                    "rest_final": event.status in FINAL_STATES,
                    "stream_final": event.status in FINAL_STATES,
                },
                "venue answered an order inferred as never placed",
            )
        case _, RestAnswer(status=status, executed_qty=qty, avg_price=avg, exchange_order_id=oid):
            changes: dict[str, object] = {"exchange_order_id": oid or row.exchange_order_id}
            if event.time_ms > row.exchange_time_ms:
                changes["exchange_time_ms"] = event.time_ms
            if final:
                changes["rest_final"] = True
                return Transition(changes, f"REST answer after final {state}")
            if _RANK.get(status, 3) >= _RANK.get(state, 3):
                changes.update(status=status, executed_qty=qty, avg_price=avg or row.avg_price)
            changes["rest_final"] = status in FINAL_STATES
            return Transition(changes)
        case _, StreamUpdate(time_ms=when) if when < row.exchange_time_ms:
            return Transition({}, f"stale stream update at {when} < {row.exchange_time_ms}")
        case _, StreamUpdate(status=status, executed_qty=qty, avg_price=avg, exchange_order_id=oid):
            changes = {
                "exchange_time_ms": max(event.time_ms, row.exchange_time_ms),
                "exchange_order_id": oid or row.exchange_order_id,
            }
            if final:
                if status in FINAL_STATES:
                    changes["stream_final"] = True
                return Transition(changes, f"stream update after final {state}")
            if _RANK.get(status, 3) >= _RANK.get(state, 3):
                changes["status"] = status
                if qty is not None:
                    changes["executed_qty"] = qty
                if avg is not None:
                    changes["avg_price"] = avg
            changes["stream_final"] = status in FINAL_STATES
            # A stream FILLED answers the unknown outcome as well as a lookup would.
            if status in FINAL_STATES and state in (OrderState.SENT, OrderState.UNKNOWN):
                changes["rest_final"] = True
            return Transition(changes)
    return Transition({}, f"unhandled {state} / {type(event).__name__}")  # pragma: no cover


# ---- wire params ----------------------------------------------------------------------------


def client_order_id(tag: str, position_id: str, kind: str, sequence: int, attempt: int) -> str:
    """Return the deterministic client order id of one request attempt.

    Raises:
        ValueError: the id would not match Binance's client order id pattern (CLIENT_ORDER_ID).
    """
    cid = f"pq{tag}-{position_id}-{_KIND_LETTER[kind]}{sequence}-{attempt}"
    if not CLIENT_ORDER_ID.match(cid):
        raise ValueError(
            f"client order id {cid!r} does not match ^[\\.A-Z\\:/a-z0-9_-]{{1,36}}$ "
            f"(position id {position_id!r}, sequence {sequence}, attempt {attempt})"
        )
    return cid


def _closing_side(leg: str) -> str:
    return "SELL" if leg == "LONG" else "BUY"


def _opening_side(leg: str) -> str:
    return "BUY" if leg == "LONG" else "SELL"


def entry_params(
    mode: PositionMode, symbol: str, leg: str, quantity: str, client_id: str
) -> dict[str, str]:
    """Return the exact params of a MARKET entry opening ``leg``."""
    return {
        "symbol": symbol,
        "side": _opening_side(leg),
        "positionSide": leg if mode == "hedge" else "BOTH",
        "type": "MARKET",
        "quantity": quantity,
        "newClientOrderId": client_id,
        "newOrderRespType": "RESULT",
    }


def exit_params(
    mode: PositionMode, symbol: str, leg: str, quantity: str, client_id: str
) -> dict[str, str]:
    """Return the exact params of a MARKET exit reducing ``leg`` (contract section 3.4)."""
    params = {
        "symbol": symbol,
        "side": _closing_side(leg),
        "positionSide": leg if mode == "hedge" else "BOTH",
        "type": "MARKET",
        "quantity": quantity,
        "newClientOrderId": client_id,
        "newOrderRespType": "RESULT",
    }
    if mode == "one-way":
        params["reduceOnly"] = "true"
    return params


def backstop_params(
    mode: PositionMode,
    symbol: str,
    leg: str,
    trigger_price: str,
    client_id: str,
    quantity: str | None = None,
) -> dict[str, str]:
    """Return the exact params of a STOP_MARKET backstop algo order (contract 2.4, 2.5, 3.3).

    Without ``quantity``: ``closePosition=true`` (one per direction). With it, a sized stop
    for the leg: ``reduceOnly=true`` in one-way mode, ``positionSide`` alone in hedge mode.
    """
    params = {
        "algoType": "CONDITIONAL",
        "symbol": symbol,
        "side": _closing_side(leg),
        "positionSide": leg if mode == "hedge" else "BOTH",
        "type": "STOP_MARKET",
        "triggerPrice": trigger_price,
        "workingType": "MARK_PRICE",
    }
    if quantity is None:
        params["closePosition"] = "true"
    else:
        params["quantity"] = quantity
        if mode == "one-way":
            params["reduceOnly"] = "true"
    params["clientAlgoId"] = client_id
    return params


# ---- results --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OrderOutcome:
    """What became of one order.

    Attributes:
        client_order_id: the id of the last attempt.
        state: its state after the REST answer (and lookups).
        executed_qty: filled quantity so far.
        avg_price: average fill price, when known.
        error_code: the Binance code of a rejection.
        error_msg: its message.
        flat: the venue said there is nothing to reduce (``-2022``): the leg is flat.
        skipped: nothing was sent (e.g. the live position was already zero).
        time_ms: the exchange's time of the last update (0 when not known).
    """

    client_order_id: str
    state: OrderState
    executed_qty: Decimal = Decimal(0)
    avg_price: Decimal | None = None
    error_code: int | None = None
    error_msg: str | None = None
    flat: bool = False
    skipped: bool = False
    time_ms: int = 0

    @property
    def filled(self) -> bool:
        """Return True when any quantity executed."""
        return self.executed_qty > 0

    @property
    def final(self) -> bool:
        """Return True when the order can no longer change."""
        return self.state in FINAL_STATES


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
class _Backstop:
    client_id: str
    trigger_price: Decimal
    placed_at_ms: int
    close_all: bool = True
    quantity: Decimal | None = None  # a sized stop's quantity


class StopWouldTrigger(RouterError):
    """The venue refused a stop because the mark is already through it (-2021/-4142)."""

    def __init__(self, code: int, msg: str, trigger: Decimal) -> None:
        super().__init__(f"stop at {trigger} would trigger immediately ({code}: {msg})")
        self.code = code
        self.trigger = trigger


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


def _decimal(value: object, default: Decimal | None = None) -> Decimal | None:
    if value is None or value == "":
        return default
    try:
        return Decimal(str(value))
    except InvalidOperation:
        return default


def _order_state(status: object) -> OrderState:
    text = str(status)
    if text in ("EXPIRED_IN_MATCH",):
        return OrderState.EXPIRED
    try:
        return OrderState(text)
    except ValueError:
        return OrderState.NEW


_ALGO_STATES = {
    "NEW": OrderState.NEW,
    "TRIGGERING": OrderState.TRIGGERED,
    "TRIGGERED": OrderState.TRIGGERED,
    "FINISHED": OrderState.FILLED,
    "CANCELED": OrderState.CANCELED,
    "CANCELLED": OrderState.CANCELED,
    "REJECTED": OrderState.REJECTED,
    "EXPIRED": OrderState.EXPIRED,
}


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
        self._backstops: dict[str, _Backstop] = {}
        # position id -> (time of the last failed placement, failures in a row)
        self._backstop_failures: dict[str, tuple[int, int]] = {}
        self._last_backstop_code = 0
        self._cancels_due: dict[str, str] = {}  # backstop client id -> symbol
        self._mode_lock = asyncio.Lock()
        self._in_flight: set[str] = set()
        # Told every stored order change (status, fills): the daemon publishes them as events.
        self.on_order_change: Callable[[OrderRow], None] | None = None
        # Fence of a shared account (pyquant.scale.membership): False = send nothing for it.
        self.send_gate: Callable[[str], bool] | None = None
        self._load_backstops()

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

    async def _current_mode(self) -> PositionMode:
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

    def _apply(self, client_id: str, event: OrderEvent) -> OrderRow | None:
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
            executed_qty=_decimal(row.executed_qty, Decimal(0)) or Decimal(0),
            avg_price=_decimal(row.avg_price),
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
            max_qty = self._market_max_qty(symbol)
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
        side = _closing_side(leg) if kind in ("exit", "flatten") else _opening_side(leg)
        while True:
            if self.send_gate is not None and not self.send_gate(symbol):
                logger.warning("Order not sent, lease fenced symbol=%s reason=%s", symbol, reason)
                return OrderOutcome("", OrderState.REJECTED, error_msg="lease_fenced", skipped=True)
            mode = await self._current_mode()
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
                self._apply(cid, RestUnknown(exc.code, exc.msg))
                return await self.resolve_unknown(cid)
            except RetryableError as exc:
                self._record_rejection(cid, exc)
                if retries >= self.config.retry_limit:
                    return self._outcome(self._must(cid))
                retries += 1
                attempt += 1
                await self._sleep(_backoff_s(exc, self.config.default_backoff_s))
                continue
            except OrderRejected as exc:
                self._record_rejection(cid, exc)
                if _is_mode_error(exc) and not rebuilt:
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
                self._apply(cid, RestUnknown(exc.code, exc.msg))
                return await self.resolve_unknown(cid)
            except Exception as exc:
                # A timeout or a dropped connection after the request left: unknown outcome.
                self._apply(cid, RestUnknown(-1007, f"{type(exc).__name__}: {exc}"))
                return await self.resolve_unknown(cid)
            finally:
                self._in_flight.discard(cid)
            row = self._apply(cid, _rest_answer(reply))
            return self._outcome(row or self._must(cid))

    def _must(self, cid: str) -> OrderRow:
        row = self.store.get_order(cid)
        if row is None:  # pragma: no cover - written ahead above
            raise RouterError(f"order {cid} vanished from the store")
        return row

    def _record_rejection(self, cid: str, exc: ExchangeError) -> None:
        self._apply(cid, RestRejected(exc.code, exc.msg))
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
                row = self._apply(client_id, _rest_answer(found)) or row
                self.stats.resolved_by_lookup += 1
                break
        else:
            row = self._apply(client_id, LookupMissing()) or row
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
            status = _ALGO_STATES.get(str(order.get("algoStatus", "NEW")), OrderState.NEW)
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
            status=_order_state(order.get("X")),
            executed_qty=None if order.get("z") is None else str(order["z"]),
            avg_price=_nonzero(order.get("ap")),
            exchange_order_id=None if order.get("i") is None else str(order["i"]),
            time_ms=int(order.get("T") or event_time_ms or 0),
        )
        return self._apply(cid, event)

    def on_algo_update(self, order: Mapping[str, Any], event_time_ms: int = 0) -> OrderRow | None:
        """Apply the ``o`` object of an ALGO_UPDATE; None when it is not our order."""
        cid = str(order.get("caid", ""))
        if not cid.startswith(f"pq{self._tag}-"):
            return None
        status = _ALGO_STATES.get(str(order.get("X")), OrderState.NEW)
        row = self._apply(
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
            current = self._backstops.get(row.position_id)
            if current is not None and current.client_id == cid:
                del self._backstops[row.position_id]
        return row

    # ---- backstop ---------------------------------------------------------------------------

    def _load_backstops(self) -> None:
        for row in self.store.orders(kind="backstop", statuses=LIVE_STATUSES):
            trigger = _decimal(row.params.get("triggerPrice"))
            if trigger is None:
                continue
            current = self._backstops.get(row.position_id)
            if current is None or row.sequence > _sequence_of(current.client_id):
                sized = _decimal(row.params.get("quantity"))
                self._backstops[row.position_id] = _Backstop(
                    row.client_order_id, trigger, row.created_at_ms, sized is None, sized
                )

    def backstop_trigger(self, symbol: str, leg: str, stop_price: str | Decimal) -> str:
        """Return the backstop trigger for an engine stop: further out, on the tick grid."""
        stop = Decimal(str(stop_price))
        distance = self.config.backstop_distance_pct
        if leg == "LONG":
            return self.rules.quantize_price(symbol, str(stop * (1 - distance)), "down")
        return self.rules.quantize_price(symbol, str(stop * (1 + distance)), "up")

    def forget_backstop(self, position_id: str) -> None:
        """Stop tracking a position's backstop without cancelling it (handed to a peer)."""
        self._backstops.pop(position_id, None)

    def backstop_of(self, position_id: str) -> tuple[str, Decimal] | None:
        """Return (client id, trigger price) of a position's live backstop, or None."""
        current = self._backstops.get(position_id)
        return None if current is None else (current.client_id, current.trigger_price)

    async def update_backstop(
        self,
        position_id: str,
        symbol: str,
        leg: str,
        stop_price: str | Decimal,
        *,
        force: bool = False,
        quantity: str | Decimal | None = None,
    ) -> str | None:
        """Place, tighten or re-size the position's backstop; return the live client id.

        Binance holds one ``closePosition`` stop per direction (-4130, contract 2.5), and algo
        orders cannot be modified. So the replacement alternates two forms, the new one always
        placed before the old one is cancelled: a close-all stop (first placement) is replaced
        by a *sized* stop for the leg's ``quantity`` (one-way: ``reduceOnly`` + ``quantity``;
        hedge: ``positionSide`` + ``quantity``), which is replaced by a close-all one, and so
        on. A sized stop whose leg changed size (a take-profit filled) is replaced by a
        close-all one at the same or a tighter trigger. Moves only tighten, at most every
        ``backstop_min_interval_ms`` unless ``force``; failed placements back off the same way.

        A -4130 (a close-all stop already rests on the leg) is answered by reading the symbol's
        open algo orders, never by retrying blindly: our own stale one is cancelled (the sized
        stop or the current one covers the leg) and the close-all placed once more; a peer's
        (a takeover) is left for ``retire_peer_backstops`` and a sized stop goes in beside it.

        Raises:
            StopWouldTrigger: the venue refused the stop because the mark is already through
                it (-2021/-4142): the caller must close the position now.
        """
        if not self.config.backstop_enabled:
            return None
        trigger = Decimal(self.backstop_trigger(symbol, leg, stop_price))
        size = (
            None
            if quantity is None
            else _decimal(self.rules.quantize_qty(symbol, str(quantity), True))
        )
        current = self._backstops.get(position_id)
        now = self._clock()
        resize = (
            current is not None
            and not current.close_all
            and size is not None
            and size != current.quantity
        )
        if current is not None:
            tighter = (
                trigger > current.trigger_price
                if leg == "LONG"
                else trigger < current.trigger_price
            )
            if not tighter and not resize:
                return current.client_id
            if not tighter:
                trigger = current.trigger_price  # re-size only: never loosen
            if (
                not force
                and not resize
                and now - current.placed_at_ms < self.config.backstop_min_interval_ms
            ):
                return current.client_id
        if self.send_gate is not None and not self.send_gate(symbol):
            return None if current is None else current.client_id  # fenced: the old one stays
        failed = self._backstop_failures.get(position_id)
        if failed is not None and not resize:
            at_ms, count = failed
            pause = min(self.config.backstop_min_interval_ms * 2 ** (count - 1), 60_000)
            if now - at_ms < pause:
                return None if current is None else current.client_id
        close_all = current is None or not current.close_all
        if not close_all and size is None:
            try:  # the caller did not say the leg's size: the venue's is the one that counts
                live = _legs(await self.venue.position_risk()).get((symbol, leg))
            except ExchangeError as exc:
                logger.warning(
                    "Leg size unreadable for a sized stop symbol=%s error=%s", symbol, exc
                )
                live = None
            if live is not None:
                size = _decimal(self.rules.quantize_qty(symbol, str(live), True))
        if not close_all and (size is None or size <= 0 or not self._sized_fits(symbol, size)):
            # No valid size to place beside the close-all stop: it keeps covering the leg.
            logger.warning(
                "Backstop not moved: no valid size for a sized stop position_id=%s quantity=%s",
                position_id,
                quantity,
            )
            return None if current is None else current.client_id
        placed = await self._place_backstop(
            position_id, symbol, leg, trigger, None if close_all else size, now
        )
        if placed is None and close_all and self._last_backstop_code == -4130:
            placed = await self._answer_4130(position_id, symbol, leg, trigger, size, now)
        if placed is None:
            count = (failed[1] if failed is not None else 0) + 1
            self._backstop_failures[position_id] = (now, count)
            return None if current is None else current.client_id
        self._backstop_failures.pop(position_id, None)
        if current is not None and current.client_id != placed.client_id:
            await self._cancel_algo(symbol, current.client_id)
        return placed.client_id

    def _sized_fits(self, symbol: str, size: Decimal) -> bool:
        max_qty = self._market_max_qty(symbol)
        return max_qty is None or size <= max_qty

    async def _place_backstop(
        self,
        position_id: str,
        symbol: str,
        leg: str,
        trigger: Decimal,
        size: Decimal | None,
        now: int,
    ) -> _Backstop | None:
        self._last_backstop_code = 0
        mode = await self._current_mode()
        sequence = (self.store.max_sequence(position_id, "backstop") or 0) + 1
        cid = client_order_id(self._tag, position_id, "backstop", sequence, 0)
        params = backstop_params(
            mode, symbol, leg, str(trigger), cid, None if size is None else str(size)
        )
        self.store.insert_order(
            OrderRecord(
                client_order_id=cid,
                kind="backstop",
                position_id=position_id,
                symbol=symbol,
                position_side=leg,
                side=_closing_side(leg),
                sequence=sequence,
                attempt=0,
                params=params,
                status=OrderState.SENT,
                reason="backstop",
            )
        )
        self._in_flight.add(cid)
        try:
            reply = await self.venue.new_algo_order(params)
        except OrderStatusUnknown as exc:
            self._apply(cid, RestUnknown(exc.code, exc.msg))
            outcome = await self.resolve_unknown(cid)
            if outcome.state != OrderState.NEW:
                return None
        except ExchangeError as exc:
            self._last_backstop_code = exc.code
            self._record_rejection(cid, exc)
            if _is_mode_error(exc):
                await self.refresh_mode()
            if exc.code in IMMEDIATE_TRIGGER_CODES:
                raise StopWouldTrigger(exc.code, exc.msg, trigger) from exc
            return None
        except Exception as exc:
            # A timeout or dropped connection after the request left: look it up.
            self._apply(cid, RestUnknown(-1007, f"{type(exc).__name__}: {exc}"))
            outcome = await self.resolve_unknown(cid)
            if outcome.state != OrderState.NEW:
                return None
        else:
            self._apply(
                cid,
                RestAnswer(
                    _ALGO_STATES.get(str(reply.get("algoStatus", "NEW")), OrderState.NEW),
                    "0",
                    None,
                    None if reply.get("algoId") is None else str(reply["algoId"]),
                ),
            )
        finally:
            self._in_flight.discard(cid)
        placed = _Backstop(cid, trigger, now, size is None, size)
        self._backstops[position_id] = placed
        self.stats.backstops_moved += 1
        logger.info(
            "Backstop placed client_order_id=%s symbol=%s position_side=%s trigger=%s form=%s",
            cid,
            symbol,
            leg,
            trigger,
            "close_all" if size is None else f"sized {size}",
        )
        return placed

    async def _answer_4130(
        self,
        position_id: str,
        symbol: str,
        leg: str,
        trigger: Decimal,
        size: Decimal | None,
        now: int,
    ) -> _Backstop | None:
        # A close-all stop already rests on this leg. Read what is there (never a retry loop).
        try:
            resting = [
                order
                for order in await self.venue.open_algo_orders(symbol)
                if _order_leg(order) == leg
                and _is_close_all(order)
                and str(order.get("orderType", order.get("type", ""))) == "STOP_MARKET"
            ]
        except ExchangeError as exc:
            logger.warning(
                "Open algo orders unreadable after -4130 symbol=%s error=%s", symbol, exc
            )
            return None
        current = self._backstops.get(position_id)
        for order in resting:
            cid = str(order.get("clientAlgoId", ""))
            if not cid.startswith(f"pq{self._tag}-"):
                continue
            if current is not None and cid == current.client_id:
                continue
            # Our own close-all stop that a lost answer or a failed cancel left behind: the
            # current stop covers the leg meanwhile; take the stale one away and place again.
            logger.warning("Stale close-all backstop found after -4130 client_order_id=%s", cid)
            await self._cancel_algo(symbol, cid)
            return await self._place_backstop(position_id, symbol, leg, trigger, None, now)
        if resting and size is not None and size > 0 and self._sized_fits(symbol, size):
            # A peer's close-all stop (takeover): ours goes in sized beside it; the peer's is
            # retired once ours is at least as tight (retire_peer_backstops).
            return await self._place_backstop(position_id, symbol, leg, trigger, size, now)
        return None

    async def _cancel_algo(self, symbol: str, client_id: str) -> bool:
        try:
            await self.venue.cancel_algo_order(symbol, client_id)
        except OrderRejected as exc:
            # Already gone (triggered, cancelled elsewhere): final either way.
            logger.info("Backstop cancel refused client_order_id=%s error=%s", client_id, exc)
            self._apply(client_id, RestAnswer(OrderState.CANCELED, "0", None, None))
            self._cancels_due.pop(client_id, None)
            return False
        except Exception as exc:
            # Timeout, 429, dropped connection: the stop may still rest on a leg that no
            # longer needs it. Retried until the venue answers (``retry_cancels``).
            logger.warning("Backstop cancel failed client_order_id=%s error=%s", client_id, exc)
            self._cancels_due[client_id] = symbol
            return False
        self._apply(client_id, RestAnswer(OrderState.CANCELED, "0", None, None))
        self._cancels_due.pop(client_id, None)
        return True

    async def retry_cancels(self) -> list[str]:
        """Send again every backstop cancel that failed without an answer; return those done."""
        done: list[str] = []
        for client_id, symbol in list(self._cancels_due.items()):
            row = self.store.get_order(client_id)
            if row is not None and OrderState(row.status) in FINAL_STATES:
                self._cancels_due.pop(client_id, None)
                continue
            if await self._cancel_algo(symbol, client_id):
                done.append(client_id)
        return done

    async def cancel_backstops(self, position_id: str) -> list[str]:
        """Cancel every live backstop of a position (it closed); return the ids cancelled."""
        cancelled: list[str] = []
        self._backstops.pop(position_id, None)
        for row in self.store.orders(
            position_id=position_id, kind="backstop", statuses=LIVE_STATUSES
        ):
            if await self._cancel_algo(row.symbol, row.client_order_id):
                cancelled.append(row.client_order_id)
        return cancelled

    async def _open_algo_orders_of(self, symbols: frozenset[str] | None) -> list[JsonObject]:
        # One symbol costs weight 1, the whole account 40 (contract 2.4): a takeover of a few
        # symbols asks for just those, so many takeovers cannot eat the weight budget.
        if symbols is None or len(symbols) > 10:
            return list(await self.venue.open_algo_orders())
        orders: list[JsonObject] = []
        for symbol in sorted(symbols):
            orders += await self.venue.open_algo_orders(symbol)
        return orders

    async def reconcile_backstops(self, symbols: frozenset[str] | None = None) -> dict[str, str]:
        """Check every backstop the journal holds as live against the venue's open algo orders.

        One that the venue does not list (never placed before a crash, triggered, or cancelled
        elsewhere) becomes final, so the next ``update_backstop`` places a fresh one instead of
        trusting a stop that is not there. ``symbols``: only those (a takeover). Returns client
        id -> resulting state.
        """
        listed = {str(o.get("clientAlgoId")): o for o in await self._open_algo_orders_of(symbols)}
        result: dict[str, str] = {}
        for row in self.store.orders(kind="backstop", statuses=LIVE_STATUSES):
            cid = row.client_order_id
            if cid in self._in_flight or (symbols is not None and row.symbol not in symbols):
                continue
            order = listed.get(cid)
            if order is not None:
                algo_id = order.get("algoId")
                answer = RestAnswer(
                    OrderState.NEW, "0", None, None if algo_id is None else str(algo_id)
                )
                self._apply(cid, answer)
            elif OrderState(row.status) in (OrderState.SENT, OrderState.UNKNOWN):
                self._apply(cid, LookupMissing())
            else:
                self._apply(cid, RestAnswer(OrderState.EXPIRED, "0", None, None))
                self.store.update_order(cid, stream_final=True)
            updated = self.store.get_order(cid)
            result[cid] = "" if updated is None else updated.status
        self._backstops.clear()
        self._load_backstops()
        return result

    async def cleanup_orphans(
        self,
        open_legs: set[tuple[str, str]],
        *,
        symbols: frozenset[str] | None = None,
        peers: bool = False,
    ) -> list[str]:
        """Cancel our conditional orders whose (symbol, leg) has no open position.

        ``open_legs`` holds (symbol, leg) pairs with a non-zero position on the venue; in
        one-way mode the leg of a BOTH order is read from its side (SELL closes a LONG).

        Args:
            open_legs: the legs with a position.
            symbols: only look at these symbols (the ones this daemon owns); None: all.
            peers: also cancel the backstops other pyquant daemons of the account left on
                these symbols (their owner handed the symbol over, so nobody else will).
        """
        cancelled: list[str] = []
        for order in await self._open_algo_orders_of(symbols):
            cid = str(order.get("clientAlgoId", ""))
            if not _is_ours(cid, self._tag, peers=peers):
                continue
            symbol = str(order.get("symbol"))
            if symbols is not None and symbol not in symbols:
                continue
            leg = _order_leg(order)
            if (symbol, leg) in open_legs:
                continue
            if await self._cancel_algo(symbol, cid):
                cancelled.append(cid)
                logger.info("Orphan backstop cancelled client_order_id=%s symbol=%s", cid, symbol)
            row = self.store.get_order(cid)
            if row is not None:
                self._backstops.pop(row.position_id, None)
        return cancelled

    async def retire_peer_backstops(self, position_id: str, symbol: str, leg: str) -> list[str]:
        """Cancel other pyquant daemons' backstops on a leg this daemon adopted from them.

        A peer's backstop is cancelled only when our own live backstop on the leg is at least
        as tight as it: the exchange-side stop is handed over, never loosened. A tighter one
        stays until the position closes (then it is an orphan, cancelled as such).

        Returns:
            The client ids cancelled.
        """
        own = self._backstops.get(position_id)
        if own is None:
            return []
        cancelled: list[str] = []
        for order in await self.venue.open_algo_orders(symbol):
            cid = str(order.get("clientAlgoId", ""))
            if not _is_ours(cid, self._tag, peers=True) or cid == own.client_id:
                continue
            if str(order.get("symbol")) != symbol or _order_leg(order) != leg:
                continue
            if cid in self._in_flight:
                continue
            if cid.startswith(f"pq{self._tag}-"):
                # Ours, but not the leg's current stop: left by an earlier position on this
                # leg (handed over and taken back) or a lost cancel. Tighter or not, it would
                # close the wrong position: it goes.
                if await self._cancel_algo(symbol, cid):
                    cancelled.append(cid)
                    logger.info("Stale own stop retired client_order_id=%s", cid)
                continue
            trigger = _decimal(order.get("triggerPrice") or order.get("stopPrice"))
            if trigger is None:
                continue
            looser_or_same = (
                trigger <= own.trigger_price if leg == "LONG" else trigger >= own.trigger_price
            )
            if not looser_or_same:
                logger.info(
                    "Peer backstop kept, tighter than ours client_order_id=%s trigger=%s ours=%s",
                    cid,
                    trigger,
                    own.trigger_price,
                )
                continue
            if await self._cancel_algo(symbol, cid):
                cancelled.append(cid)
                logger.info(
                    "Peer backstop retired client_order_id=%s symbol=%s position_side=%s",
                    cid,
                    symbol,
                    leg,
                )
        return cancelled

    async def retire_leg_stops(self, symbol: str, leg: str) -> list[str]:
        """Cancel every pyquant conditional order left on a leg that has no position now.

        Called when a position closes (whatever closed it): a stop a previous owner or an
        earlier position left on the leg would otherwise close the next position there.
        Orders of other tools are left alone.
        """
        cancelled: list[str] = []
        for order in await self.venue.open_algo_orders(symbol):
            cid = str(order.get("clientAlgoId", ""))
            if not _is_ours(cid, self._tag, peers=True) or cid in self._in_flight:
                continue
            if str(order.get("symbol")) != symbol or _order_leg(order) != leg:
                continue
            if await self._cancel_algo(symbol, cid):
                cancelled.append(cid)
                logger.info("Leftover stop retired client_order_id=%s symbol=%s", cid, symbol)
        return cancelled

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

        legs = _legs(await self.venue.position_risk())
        for symbol, leg in sorted(legs):
            if not in_scope(symbol):
                continue
            position_id = known.get((symbol, leg)) or f"k{symbol.lower()[:6]}{leg[0].lower()}"
            async with self.position_lock(position_id).hold():
                left = _legs(await self.venue.position_risk()).get((symbol, leg), Decimal(0))
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
                self._apply(
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
                if symbol not in symbols or not _is_ours(cid, self._tag, peers=True):
                    continue
            elif not cid.startswith(f"pq{self._tag}-"):
                continue
            ok = await self._cancel_algo(symbol, cid)
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
        if symbols is None:
            self._backstops.clear()
        else:
            for position_id, backstop in list(self._backstops.items()):
                stored = self.store.get_order(backstop.client_id)
                if stored is None or stored.symbol in symbols:
                    del self._backstops[position_id]
        for (symbol, leg), amount in sorted(_legs(await self.venue.position_risk()).items()):
            if in_scope(symbol):
                steps.append(FlattenStep("verify", symbol, leg, "", False, f"still open: {amount}"))
        return steps

    async def _close_leg(
        self, position_id: str, symbol: str, leg: str, left: Decimal
    ) -> list[FlattenStep]:
        steps: list[FlattenStep] = []
        max_qty = self._market_max_qty(symbol)
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

    def _market_max_qty(self, symbol: str) -> Decimal | None:
        symbol_info = getattr(self.rules, "symbol_info", None)
        if not callable(symbol_info):
            return None
        try:
            info = symbol_info(symbol)
        except KeyError:
            return None
        value = info.get("market_max_qty") if isinstance(info, Mapping) else None
        number = _decimal(value)
        return number if number is not None and number > 0 else None


def _is_ours(client_id: str, tag: str, *, peers: bool) -> bool:
    # pyquant ids are pq<tag>-...; with peers, any pyquant daemon's order on the account.
    if peers:
        return client_id.startswith("pq") and "-" in client_id
    return client_id.startswith(f"pq{tag}-")


def _is_close_all(order: Mapping[str, Any]) -> bool:
    value = order.get("closePosition")
    return value is True or str(value).lower() == "true"


def _order_leg(order: Mapping[str, Any]) -> str:
    leg = str(order.get("positionSide", "BOTH"))
    if leg == "BOTH":
        return "LONG" if order.get("side") == "SELL" else "SHORT"
    return leg


def _legs(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], Decimal]:
    # (symbol, leg) -> absolute quantity of every non-zero leg in positionRisk rows.
    legs: dict[tuple[str, str], Decimal] = {}
    for row in rows:
        amount = _decimal(row.get("positionAmt"), Decimal(0)) or Decimal(0)
        if amount == 0:
            continue
        leg = str(row.get("positionSide", "BOTH"))
        if leg == "BOTH":
            leg = "LONG" if amount > 0 else "SHORT"
        legs[(str(row.get("symbol")), leg)] = abs(amount)
    return legs


def _rest_answer(reply: Mapping[str, Any]) -> RestAnswer:
    return RestAnswer(
        status=_order_state(reply.get("status", "NEW")),
        executed_qty=str(reply.get("executedQty", "0") or "0"),
        avg_price=_nonzero(reply.get("avgPrice")),
        exchange_order_id=None if reply.get("orderId") is None else str(reply["orderId"]),
        time_ms=int(reply.get("updateTime") or 0),
    )


def _nonzero(value: object) -> str | None:
    number = _decimal(value)
    return None if number is None or number == 0 else str(value)


def _is_mode_error(exc: ExchangeError) -> bool:
    return exc.code in MODE_ERROR_CODES or (
        exc.code == -1106 and "reduceonly" in exc.msg.lower().replace(" ", "")
    )


def _backoff_s(exc: ExchangeError, default: float) -> float:
    # The client may attach the venue's Retry-After (seconds) to the exception.
    retry_after = getattr(exc, "retry_after_s", None)
    if isinstance(retry_after, int | float) and retry_after > 0:
        return float(min(retry_after, 120.0))
    return default


def _sequence_of(client_id: str) -> int:
    try:
        return int(client_id.rsplit("-", 2)[1][1:])
    except (IndexError, ValueError):
        return 0


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
