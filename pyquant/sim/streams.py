"""Websocket side of the simulated venue: connections, subscriptions, routes and payloads.

Served on the REST port: ``/ws/<stream>[/<stream>…]``, ``/stream?streams=a/b`` (combined, each
message wrapped as ``{"stream", "data"}``), at the root and under the ``/public``, ``/market`` and
``/private`` routes Binance split its futures websocket into (contract 1.1 and 7.1). Route rule:
``/market`` carries only regular market streams (markPrice, kline), ``/public`` only book
streams (bookTicker), ``/private`` only user data; the root carries everything (the legacy
host). A stream requested on the wrong route is refused: the handshake answers HTTP 400 with a
Binance error body, a ``SUBSCRIBE`` gets an error reply.

Control messages follow docs Live-Subscribing-Unsubscribing-to-streams: ``SUBSCRIBE``,
``UNSUBSCRIBE``, ``LIST_SUBSCRIPTIONS``, ``SET_PROPERTY``/``GET_PROPERTY`` (``combined``) with
``{"result": …, "id": …}`` replies and ``{"code": 0..3, "msg": …}`` errors. A client that sends
more than 10 messages in a second, or asks for more than 1024 streams, is disconnected (policy
violation, close code 1008), as Binance does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from pyquant.sim.replay import INTERVAL_MS
from pyquant.sim.validation import SymbolRules, fmt_decimal

__all__ = ["Connection", "StreamHub", "classify"]

logger = logging.getLogger(__name__)

MAX_STREAMS = 1024
MAX_INCOMING_PER_SECOND = 10
_QUEUE_LIMIT = 50_000
_SYMBOL_STREAM = re.compile(
    r"^([a-z0-9_\u4e00-\u9fff]+)@(markprice(@1s)?|bookticker|kline_([0-9]+[a-z]))$"
)
_ALL_MARK = re.compile(r"^!markprice@arr(@1s)?$")


@dataclass(frozen=True)
class StreamKind:
    """A parsed stream name."""

    canonical: str  # lower case, the key streams are published under
    route: str  # "market" or "public"
    symbol: str | None  # upper case, None for all-market streams


def classify(name: str, symbols: set[str]) -> StreamKind | str:
    """Parse a market stream name; returns its kind or the reason it is invalid."""
    low = name.strip().lower()
    if _ALL_MARK.match(low):
        return StreamKind(low, "market", None)
    m = _SYMBOL_STREAM.match(low)
    if not m:
        return f"unknown stream '{name}'"
    symbol = m.group(1).upper()
    if symbol not in symbols:
        return f"unknown symbol in stream '{name}'"
    kind = m.group(2)
    if kind.startswith("kline_") and m.group(4) not in INTERVAL_MS:
        return f"invalid interval in stream '{name}'"
    route = "public" if kind == "bookticker" else "market"
    return StreamKind(low, route, symbol)


@dataclass(eq=False)
class Connection:
    """One websocket client."""

    ws: web.WebSocketResponse
    route: str  # "root", "public", "market", "private"
    combined: bool
    listen_key: str | None = None
    subs: dict[str, str] = field(default_factory=dict)  # canonical -> name as requested
    queue: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    expired: bool = False
    _second: int = -1
    _count: int = 0

    def allows(self, kind: StreamKind) -> bool:
        """Route rule: does this connection's route carry streams of ``kind``."""
        return self.route == "root" or self.route == kind.route

    def send(self, payload: bytes) -> None:
        """Queue one message (drops the connection when the client does not keep up)."""
        if self.queue.qsize() > _QUEUE_LIMIT:
            logger.warning("Websocket client too slow, closing route=%s", self.route)
            self.queue.put_nowait(None)
            return
        self.queue.put_nowait(payload)

    def count_incoming(self, now_s: int) -> bool:
        """Count one client message; False when the 10 per second limit is broken."""
        if now_s != self._second:
            self._second, self._count = now_s, 0
        self._count += 1
        return self._count <= MAX_INCOMING_PER_SECOND


class StreamHub:
    """All websocket connections of one venue and the fan-out of payloads to them."""

    def __init__(self, symbols: set[str]) -> None:
        self.symbols = symbols
        self.connections: set[Connection] = set()

    # --- fan-out -----------------------------------------------------------------------------

    def wanted(self) -> set[str]:
        """Canonical names of every market stream someone subscribed to."""
        out: set[str] = set()
        for conn in self.connections:
            out.update(conn.subs)
        return out

    def publish(self, canonical: str, payload: object) -> None:
        """Send a market payload to every connection subscribed to ``canonical``."""
        raw: bytes | None = None
        for conn in self.connections:
            name = conn.subs.get(canonical)
            if name is None:
                continue
            if conn.combined:
                conn.send(orjson.dumps({"stream": name, "data": payload}))
            else:
                raw = raw or orjson.dumps(payload)
                conn.send(raw)

    def publish_user(self, listen_key: str, event: dict[str, Any]) -> None:
        """Send a user-data event to the connections of ``listen_key``."""
        raw: bytes | None = None
        for conn in self.connections:
            if conn.listen_key != listen_key or conn.expired:
                continue
            if conn.combined:
                conn.send(orjson.dumps({"stream": listen_key, "data": event}))
            else:
                raw = raw or orjson.dumps(event)
                conn.send(raw)

    def expire_user(self, listen_key: str, event_time: int) -> None:
        """Send ``listenKeyExpired`` to the key's connections; nothing more follows on them."""
        self.publish_user(
            listen_key, {"e": "listenKeyExpired", "E": str(event_time), "listenKey": listen_key}
        )
        for conn in self.connections:
            if conn.listen_key == listen_key:
                conn.expired = True

    async def drop_all(self) -> int:
        """Close every connection abruptly (fault injection); returns how many."""
        conns = list(self.connections)
        for conn in conns:
            with contextlib.suppress(Exception):
                if conn.ws._writer is not None:  # abort the transport: no close handshake
                    transport = conn.ws._writer.transport
                    transport.abort()
            conn.queue.put_nowait(None)
        return len(conns)

    # --- control messages ----------------------------------------------------------------

    def handle_control(self, conn: Connection, text: str) -> dict[str, Any]:
        """Answer one client message (SUBSCRIBE and friends), Binance's replies and errors."""
        try:
            msg = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            return {"code": 3, "msg": f"Invalid JSON: {exc}"}
        if not isinstance(msg, dict):
            return {"code": 2, "msg": "Invalid request: request must be a JSON object"}
        req_id = msg.get("id")
        if "id" in msg and not (
            req_id is None
            or (isinstance(req_id, int) and not isinstance(req_id, bool) and req_id >= 0)
            or isinstance(req_id, str)
        ):
            return {
                "code": 2,
                "msg": "Invalid request: request ID must be an unsigned integer",
                "id": None,
            }
        method = msg.get("method")
        params = msg.get("params", [])
        if not isinstance(method, str):
            return {"code": 2, "msg": "Invalid request: missing field 'method'", "id": req_id}
        if not isinstance(params, list):
            return {"code": 2, "msg": "Invalid request: params must be an array", "id": req_id}
        if method in ("SUBSCRIBE", "UNSUBSCRIBE"):
            if conn.route == "private":
                return {
                    "code": 2,
                    "msg": "Invalid request: market streams are not served on /private",
                    "id": req_id,
                }
            kinds: list[tuple[StreamKind, str]] = []
            for name in params:
                if not isinstance(name, str):
                    return {
                        "code": 2,
                        "msg": "Invalid request: stream names must be strings",
                        "id": req_id,
                    }
                kind = classify(name, self.symbols)
                if isinstance(kind, str):
                    return {"code": 2, "msg": f"Invalid request: {kind}", "id": req_id}
                if method == "SUBSCRIBE" and not conn.allows(kind):
                    return {
                        "code": 2,
                        "msg": f"Invalid request: stream '{name}' is not served on /{conn.route}",
                        "id": req_id,
                    }
                kinds.append((kind, name))
            if method == "SUBSCRIBE":
                if len(set(conn.subs) | {k.canonical for k, _ in kinds}) > MAX_STREAMS:
                    return {"code": 2, "msg": "Invalid request: too many streams", "id": req_id}
                for kind, name in kinds:
                    conn.subs[kind.canonical] = name
            else:
                for kind, _ in kinds:
                    conn.subs.pop(kind.canonical, None)
            return {"result": None, "id": req_id}
        if method == "LIST_SUBSCRIPTIONS":
            return {"result": list(conn.subs.values()), "id": req_id}
        if method == "SET_PROPERTY":
            if len(params) != 2 or params[0] != "combined":
                return {"code": 0, "msg": "Unknown property", "id": req_id}
            if not isinstance(params[1], bool):
                return {"code": 1, "msg": "Invalid value type: expected Boolean", "id": req_id}
            conn.combined = params[1]
            return {"result": None, "id": req_id}
        if method == "GET_PROPERTY":
            if params != ["combined"]:
                return {"code": 0, "msg": "Unknown property", "id": req_id}
            return {"result": conn.combined, "id": req_id}
        return {"code": 2, "msg": f"Invalid request: unknown method '{method}'", "id": req_id}


# --- market payloads (exact Binance field layouts) ---------------------------------------------


def mark_price_payload(
    symbol: str,
    mark: Decimal,
    event_time: int,
    funding_time: int,
    funding_rate: Decimal = Decimal("0.0001"),
) -> dict[str, Any]:
    """``markPriceUpdate`` (docs Mark-Price-Stream; sample ws_markPrice_docs.json)."""
    price = fmt_decimal(mark, 8)
    return {
        "e": "markPriceUpdate",
        "E": event_time,
        "s": symbol,
        "p": price,
        "i": price,
        "P": price,
        "r": fmt_decimal(funding_rate, 8),
        "T": funding_time,
    }


def kline_payload(
    symbol: str, interval: str, row: list[Any], event_time: int, closed: bool
) -> dict[str, Any]:
    """``kline`` event from a ``/fapi/v1/klines`` row (docs Kline-Candlestick-Streams)."""
    trades = int(row[8])
    return {
        "e": "kline",
        "E": event_time,
        "s": symbol,
        "k": {
            "t": row[0],
            "T": row[6],
            "s": symbol,
            "i": interval,
            "f": 1,
            "L": max(1, trades),
            "o": row[1],
            "c": row[4],
            "h": row[2],
            "l": row[3],
            "v": row[5],
            "n": trades,
            "x": closed,
            "q": row[7],
            "V": row[9],
            "Q": row[10],
            "B": "0",
        },
    }


def book_ticker_payload(
    rules: SymbolRules, mark: Decimal, update_id: int, event_time: int
) -> dict[str, Any]:
    """``bookTicker``: one tick either side of the mark (there is no book)."""
    tick = rules.tick_size if rules.tick_size > 0 else Decimal("0.00000001")
    return {
        "e": "bookTicker",
        "u": update_id,
        "E": event_time,
        "T": event_time,
        "s": rules.symbol,
        "b": rules.fmt_price(mark - tick),
        "B": rules.fmt_qty(rules.min_qty * 100 if rules.min_qty > 0 else Decimal(1)),
        "a": rules.fmt_price(mark + tick),
        "A": rules.fmt_qty(rules.min_qty * 100 if rules.min_qty > 0 else Decimal(1)),
    }


async def writer(conn: Connection) -> None:
    """Send a connection's queued messages in order until it closes."""
    while True:
        item = await conn.queue.get()
        if item is None:
            with contextlib.suppress(Exception):
                await conn.ws.close(code=1008, message=b"closed by server")
            return
        try:
            await conn.ws.send_str(item.decode())
        except (ConnectionError, RuntimeError):
            return


async def reader(hub: StreamHub, conn: Connection, clock_s: Callable[[], float]) -> None:
    """Read client messages until the socket closes; enforces the incoming rate limit."""
    async for msg in conn.ws:
        if msg.type == WSMsgType.TEXT:
            if not conn.count_incoming(int(clock_s())):
                logger.warning(
                    "Websocket client sent more than %d messages per second, closing",
                    MAX_INCOMING_PER_SECOND,
                )
                conn.queue.put_nowait(None)
                return
            reply = hub.handle_control(conn, msg.data)
            conn.send(orjson.dumps(reply))
        elif msg.type == WSMsgType.BINARY:
            conn.send(
                orjson.dumps({"code": 3, "msg": "Invalid JSON: binary frames are not accepted"})
            )
        elif msg.type in (WSMsgType.ERROR, WSMsgType.CLOSE):
            return
