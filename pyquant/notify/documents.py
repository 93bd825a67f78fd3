"""Events-stream documents from the desk's notes and the router's order changes.

The generic webhook receives these documents exactly as a Redis events-stream reader would
(``pyquant/scale/events.schema.json``, version 1), whether or not the daemon uses Redis; the
mapping from notes follows ``pyquant.scale.membership``. Each document is also classified into
the notification it is (``NOTIFY_EVENTS`` of ``pyquant.config``), or None for the many
events nobody's phone needs (order acknowledgements, lease renewals ...).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

Document = dict[str, Any]
# pyquant.scale.events.SCHEMA_VERSION, repeated: importing pyquant.scale needs redis-py, an
# extra a daemon without Redis does not have (a test keeps the two equal).
SCHEMA_VERSION = 1

_FILL_KEYS = (
    "client_order_id",
    "side",
    "position_side",
    "price",
    "quantity",
    "commission",
    "realized_pnl",
    "trade_id",
)
_REFUSED = frozenset({"REJECTED", "EXPIRED", "NOT_FOUND"})


def _plain(value: object) -> object:
    if isinstance(value, Decimal):
        return format(value, "f")
    return value


def _pick(note: Mapping[str, object], keys: tuple[str, ...]) -> dict[str, object]:
    return {k: _plain(note[k]) for k in keys if note.get(k) is not None}


class DocumentMaker:
    """Number and stamp documents like ``EventPublisher.publish`` does.

    Args:
        daemon_id: the daemon, written in every document.
        account: the account namespace.
        clock_ms: wall clock for ``ts_ms``.
    """

    def __init__(
        self,
        daemon_id: str,
        account: str = "default",
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self.daemon_id = daemon_id
        self.account = account
        self._clock_ms = clock_ms
        self._seq = 0

    def make(self, event_type: str, symbol: str | None, payload: Mapping[str, Any]) -> Document:
        """Return one document of the events-stream schema."""
        self._seq += 1
        return {
            "version": SCHEMA_VERSION,
            "type": event_type,
            "ts_ms": self._clock_ms(),
            "daemon_id": self.daemon_id,
            "account": self.account,
            "seq": self._seq,
            "symbol": symbol,
            "payload": {k: _plain(v) for k, v in payload.items()},
        }

    def from_note(self, note: Mapping[str, object]) -> Document | None:
        """The document of one desk note, or None for notes the stream does not carry."""
        kind = note.get("kind")
        symbol = note.get("symbol")
        sym = symbol if isinstance(symbol, str) and symbol else None
        intent = note.get("intent")
        if kind in ("accepted", "rejection") and intent is not None:
            side = getattr(intent, "side", None)
            payload = {
                "intent_id": str(getattr(intent, "intent_id", note.get("intent_id", ""))),
                "side": side,
                "accepted": kind == "accepted",
                "reason": None if kind == "accepted" else _str(note.get("reason")),
                "source": str(getattr(intent, "source", "")),
                "confidence": getattr(intent, "confidence", None),
                "size_usd": _plain(getattr(intent, "size_usd", None)),
                "leverage": getattr(intent, "leverage", None),
            }
            if kind == "rejection" and note.get("detail"):
                payload["detail"] = str(note["detail"])
            return self.make("decision", sym or str(getattr(intent, "symbol", "")), payload)
        if kind == "rejection":
            reason = str(note.get("detail") or note.get("reason") or "invalid")
            payload = {
                "stream": str(note.get("source", "")),
                "stream_id": "",
                "reason": reason,
                "field": None,
            }
            return self.make("rejection", None, payload)
        if kind == "fill" and sym:
            return self.make("fill", sym, _pick(note, _FILL_KEYS))
        if kind == "exit" and sym:
            payload = _pick(note, ("position_id", "position_side", "reason", "quantity"))
            payload.setdefault("quantity", "0")
            return self.make("exit", sym, payload)
        if kind in ("entry", "adopted", "handed_over", "closed") and sym:
            position: dict[str, object] = {
                "action": {"entry": "opened"}.get(str(kind), str(kind)),
                "position_id": note.get("position_id"),
                "position_side": note.get("position_side") or note.get("side"),
                "quantity": _plain(note.get("quantity") or "0"),
            }
            for key in ("reason", "owner"):
                if note.get(key):
                    position[key] = note[key]
            if note.get("price"):
                position["entry_price"] = _plain(note["price"])
            return self.make("position", sym, position)
        return None

    def from_order(self, row: Any) -> Document:  # noqa: ANN401 - pyquant.trading.journal.OrderRow
        """The document of one order change (``TradingDesk.router.on_order_change``)."""
        return self.make("order", row.symbol, order_payload(row))


def order_payload(row: Any) -> dict[str, object]:  # noqa: ANN401 - pyquant.trading.journal.OrderRow
    """The ``order`` payload of the events stream for one stored order change.

    The one mapping from an order row to its event: the Redis events stream
    (``pyquant.scale.membership``) and the notifiers both use it.
    """
    params: Mapping[str, str] = row.params
    payload: dict[str, object] = {
        "client_order_id": row.client_order_id,
        "side": row.side,
        "position_side": params.get("positionSide", row.position_side),
        "order_type": params.get("type", ""),
        "quantity": params.get("quantity", "0"),
        "status": row.status,
        "reason": row.reason,
        "kind": row.kind,
        "executed_qty": row.executed_qty,
    }
    if params.get("price"):
        payload["price"] = params["price"]
    trigger = params.get("triggerPrice") or params.get("stopPrice")
    if trigger:
        payload["stop_price"] = trigger
    if params.get("closePosition") == "true":
        payload["close_position"] = True
    if row.error_code is not None:
        payload["error_code"] = row.error_code
        payload["error_msg"] = row.error_msg
    return payload


def _str(value: object) -> str | None:
    return None if value is None else str(value)


def classify(document: Mapping[str, Any]) -> str | None:
    """The notification a document is (a name of ``NOTIFY_EVENTS``), or None.

    A fill belongs to the entry or exit it completes: it is sent with it (its realized PnL
    goes into the exit's message) and is classified ``exit_filled`` when it realizes PnL.
    """
    kind = document.get("type")
    payload: Mapping[str, Any] = document.get("payload") or {}
    if kind == "position" and payload.get("action") in ("opened", "adopted"):
        return "entry_filled"
    if kind == "position" and payload.get("reason") == "flatten":
        return "flatten"
    if kind == "exit":
        return "exit_filled"
    if kind == "fill":
        pnl = payload.get("realized_pnl")
        return "exit_filled" if pnl not in (None, "0", "0.0") and _nonzero(pnl) else None
    if kind == "decision" and payload.get("accepted") is False:
        return "intent_rejected"
    if kind == "rejection":
        return "intent_rejected"
    if kind == "order":
        order_kind = payload.get("kind")
        refused = payload.get("error_code") is not None or payload.get("status") in _REFUSED
        if order_kind == "flatten" and not refused:
            return "flatten"
        if refused and order_kind == "backstop":
            return "no_exchange_stop"
        if refused and payload.get("error_code") is not None:
            return "order_refused"
        return None
    if kind == "daemon":
        action = payload.get("action")
        if action in ("feed_down", "feed_restored"):
            return "feed_down"
        if action == "daily_summary":
            return "daily_summary"
        if action == "unprotected_leg":
            return "no_exchange_stop"
        if action == "flatten":
            return "flatten"
        if action == "test":
            return None  # sent directly by ``pyquant notify test``, never queued
        return "daemon"
    return None


def _nonzero(value: object) -> bool:
    try:
        return Decimal(str(value)) != 0
    except ArithmeticError:
        return False
