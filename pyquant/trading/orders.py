"""What an order is: client ids, exact wire params, the order state machine, outcomes.

Pure functions and data, no I/O: the deterministic client order id of each request attempt
(``client_order_id``), the params of entries, exits and backstops in either position mode
(``entry_params``, ``exit_params``, ``backstop_params``; contract sections 2.4, 2.5, 3.3,
3.4), the one ``match`` over (state, event) that moves an order's journal row
(``next_state``), what became of an order (``OrderOutcome``), and the readers of the venue's
order and position documents the router and its backstops share. It may not send anything,
hold state or touch the journal; ``pyquant.trading.router`` and
``pyquant.trading.backstops`` do that with what it returns.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any, Literal

from pyquant.errors import ExchangeError, PyquantError
from pyquant.trading.journal import OrderRow

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


def closing_side(leg: str) -> str:
    """Return the order side that reduces ``leg``."""
    return "SELL" if leg == "LONG" else "BUY"


def opening_side(leg: str) -> str:
    """Return the order side that opens or grows ``leg``."""
    return "BUY" if leg == "LONG" else "SELL"


def entry_params(
    mode: PositionMode, symbol: str, leg: str, quantity: str, client_id: str
) -> dict[str, str]:
    """Return the exact params of a MARKET entry opening ``leg``."""
    return {
        "symbol": symbol,
        "side": opening_side(leg),
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
        "side": closing_side(leg),
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
        "side": closing_side(leg),
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


def decimal_or(value: object, default: Decimal | None = None) -> Decimal | None:
    """Return ``value`` as a Decimal, or ``default`` when it is empty or not a number."""
    if value is None or value == "":
        return default
    try:
        return Decimal(str(value))
    except InvalidOperation:
        return default


def order_state(status: object) -> OrderState:
    """Return the state of an order document's ``status`` (unknown ones read as NEW)."""
    text = str(status)
    if text in ("EXPIRED_IN_MATCH",):
        return OrderState.EXPIRED
    try:
        return OrderState(text)
    except ValueError:
        return OrderState.NEW


ALGO_STATES = {
    "NEW": OrderState.NEW,
    "TRIGGERING": OrderState.TRIGGERED,
    "TRIGGERED": OrderState.TRIGGERED,
    "FINISHED": OrderState.FILLED,
    "CANCELED": OrderState.CANCELED,
    "CANCELLED": OrderState.CANCELED,
    "REJECTED": OrderState.REJECTED,
    "EXPIRED": OrderState.EXPIRED,
}


def is_ours(client_id: str, tag: str, *, peers: bool) -> bool:
    """Return True for our client ids (``pq<tag>-``); with ``peers``, any pyquant daemon's."""
    if peers:
        return client_id.startswith("pq") and "-" in client_id
    return client_id.startswith(f"pq{tag}-")


def is_close_all(order: Mapping[str, Any]) -> bool:
    """Return True when an algo order is a closePosition stop."""
    value = order.get("closePosition")
    return value is True or str(value).lower() == "true"


def order_leg(order: Mapping[str, Any]) -> str:
    """Return the leg an order reduces (one-way BOTH: SELL reduces LONG)."""
    leg = str(order.get("positionSide", "BOTH"))
    if leg == "BOTH":
        return "LONG" if order.get("side") == "SELL" else "SHORT"
    return leg


def venue_legs(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], Decimal]:
    """Return (symbol, leg) -> absolute quantity of every non-zero leg in positionRisk rows."""
    legs: dict[tuple[str, str], Decimal] = {}
    for row in rows:
        amount = decimal_or(row.get("positionAmt"), Decimal(0)) or Decimal(0)
        if amount == 0:
            continue
        leg = str(row.get("positionSide", "BOTH"))
        if leg == "BOTH":
            leg = "LONG" if amount > 0 else "SHORT"
        legs[(str(row.get("symbol")), leg)] = abs(amount)
    return legs


def rest_answer(reply: Mapping[str, Any]) -> RestAnswer:
    """Return the state machine event of a REST order document (reply or lookup)."""
    return RestAnswer(
        status=order_state(reply.get("status", "NEW")),
        executed_qty=str(reply.get("executedQty", "0") or "0"),
        avg_price=nonzero_text(reply.get("avgPrice")),
        exchange_order_id=None if reply.get("orderId") is None else str(reply["orderId"]),
        time_ms=int(reply.get("updateTime") or 0),
    )


def nonzero_text(value: object) -> str | None:
    """Return ``value`` as sent when it is a non-zero number, else None."""
    number = decimal_or(value)
    return None if number is None or number == 0 else str(value)


def is_mode_error(exc: ExchangeError) -> bool:
    """Return True when the venue refused the order for its position mode."""
    return exc.code in MODE_ERROR_CODES or (
        exc.code == -1106 and "reduceonly" in exc.msg.lower().replace(" ", "")
    )


def backoff_s(exc: ExchangeError, default: float) -> float:
    """Return the pause after a retryable error: the venue's Retry-After, else ``default``."""
    retry_after = getattr(exc, "retry_after_s", None)
    if isinstance(retry_after, int | float) and retry_after > 0:
        return float(min(retry_after, 120.0))
    return default


def sequence_of(client_id: str) -> int:
    """Return the sequence number in a client order id (0 when it has none)."""
    try:
        return int(client_id.rsplit("-", 2)[1][1:])
    except (IndexError, ValueError):
        return 0
