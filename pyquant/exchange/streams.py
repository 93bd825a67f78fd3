"""Market and user-data websockets: reconnect, 24 h rotation, staleness, listenKey upkeep.

Market (``MarkPriceStream``)
    ``!markPrice@arr@1s`` (all symbols, one array per second) or one combined connection of
    ``<symbol>@markPrice@1s`` streams, on the ``/market`` route (contract 7.1, 7.2). Every
    message's raw bytes go to ``on_message`` unchanged: the exit engine parses them in Rust.
    The connection is re-opened with capped, jittered exponential backoff after any failure
    and proactively before Binance's 24 h limit. When no message has arrived for
    ``stale_after_s`` the feed is stale: a warning is logged and ``premiumIndex`` is polled
    over REST, each poll turned into the same ``markPriceUpdate`` array bytes the stream
    would have sent, until the stream speaks again. A gap (a reconnect or a stale period)
    longer than one bar calls ``on_gap`` so the caller can warm the ATR up again from
    ``markPriceKlines`` (``fetch_closed_bars``).

Routes (``RouteChoice``)
    Each stream takes its route base (``.../market``, ``.../private``) and, optionally, a
    fallback base (the legacy single host whose paths are ``/ws/...``). When a host refuses
    the websocket handshake with an HTTP status (a route it does not serve), the next attempt
    uses the other base, and so on alternately; the switch is logged with both URLs. Which
    routes Binance's testnet serves is unconfirmed (contract 1.1, 2.5), hence the fallback.

User data (``UserDataStream``)
    A listenKey is created (``POST /fapi/v1/listenKey``), kept alive every
    ``keepalive_interval_s`` (Binance: within 60 min), and replaced when the keepalive
    answers -1125 or the stream says ``listenKeyExpired``. Each event is decoded,
    checked for the fields pyquant uses and handed on as a ``UserEvent``; a malformed one
    is logged with its reason and counted, and the stream keeps going. ``on_connected`` is
    called after every (re)connection so the caller can reconcile whatever it missed;
    ``on_disconnected`` so it can fail closed meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus, WebSocketException

from pyquant.errors import ExchangeError, MessageError
from pyquant.exchange.venue import JsonObject, Venue

logger = logging.getLogger(__name__)

_INTERVAL_MS = {
    "1m": 60_000,
    "3m": 180_000,
    "5m": 300_000,
    "15m": 900_000,
    "30m": 1_800_000,
    "1h": 3_600_000,
    "2h": 7_200_000,
    "4h": 14_400_000,
}


def interval_ms(interval: str) -> int:
    """Return the length of a kline interval in milliseconds.

    Raises:
        ValueError: the interval is not one pyquant warms up on.
    """
    try:
        return _INTERVAL_MS[interval]
    except KeyError:
        raise ValueError(
            f"kline interval {interval!r} is not one of {sorted(_INTERVAL_MS)}"
        ) from None


@dataclass(slots=True)
class Backoff:
    """Capped exponential backoff with full jitter in [delay/2, delay].

    Attributes:
        initial_s: the first delay.
        max_s: the cap.
        attempt: failures since the last success.
    """

    initial_s: float = 0.5
    max_s: float = 30.0
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        """Return the delay before the next attempt and count the attempt."""
        ceiling = min(self.max_s, self.initial_s * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return float(ceiling / 2 + self.rng.random() * ceiling / 2)

    def reset(self) -> None:
        """Forget past failures (after a connection that worked)."""
        self.attempt = 0


@dataclass(slots=True)
class FeedHealth:
    """What the dashboard and metrics show about one stream.

    Attributes:
        connected: a websocket is open.
        stale: no stream message for longer than the threshold; REST polling is on.
        messages: messages handed on from the websocket.
        polled: synthesized messages handed on from REST polling.
        reconnects: connections opened after the first.
        last_message_at: monotonic time of the last message (websocket or poll).
        last_event_ms: event time ``E`` of the last message, when known.
        malformed: messages refused as malformed.
        connected_since: monotonic time the current connection opened.
    """

    connected: bool = False
    stale: bool = False
    messages: int = 0
    polled: int = 0
    reconnects: int = 0
    last_message_at: float = 0.0
    last_event_ms: int = 0
    malformed: int = 0
    connected_since: float = 0.0

    def age_s(self, now: float | None = None) -> float:
        """Return seconds since the last message (infinite before the first)."""
        if not self.last_message_at:
            return float("inf")
        return (time.monotonic() if now is None else now) - self.last_message_at


@dataclass(slots=True)
class RouteChoice:
    """The websocket base a stream uses now, and the one it tries after a refused handshake.

    Attributes:
        primary: the configured base (``wss://fstream.binance.com/market``).
        fallback: the other base to try (legacy ``wss://fstream.binance.com``); empty: none.
        current: the base in use.
        switches: how many times a refusal moved the stream to the other base.
    """

    primary: str
    fallback: str = ""
    current: str = field(init=False)
    switches: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.primary = self.primary.rstrip("/")
        self.fallback = self.fallback.rstrip("/")
        self.current = self.primary

    def refused(self) -> bool:
        """Move to the other base after a refused handshake; False when there is none."""
        if not self.fallback or self.fallback == self.primary:
            return False
        self.current = self.fallback if self.current == self.primary else self.primary
        self.switches += 1
        return True


def _route_refused(routes: RouteChoice, exc: BaseException, stream: str) -> None:
    """Switch ``routes`` when ``exc`` is a handshake refused as a path the host lacks.

    Only a 4xx answer other than 429 means that; a 5xx or a rate limit is retried as is.
    """
    if not isinstance(exc, InvalidStatus):
        return
    status = exc.response.status_code
    if not 400 <= status < 500 or status == 429:
        return
    before = routes.current
    if routes.refused():
        logger.warning(
            "%s websocket route refused status=%d url=%s; trying url=%s",
            stream,
            status,
            before,
            routes.current,
        )


def mark_price_url(base: str, symbols: Sequence[str]) -> str:
    """Return the websocket URL for all symbols or a combined per-symbol connection.

    Args:
        base: the market route base, e.g. ``wss://fstream.binance.com/market``.
        symbols: symbols for per-symbol streams; empty means ``!markPrice@arr@1s``.

    Returns:
        The URL to connect to.
    """
    base = base.rstrip("/")
    if not symbols:
        return f"{base}/ws/!markPrice@arr@1s"
    if len(symbols) > 1024:
        raise ValueError(f"{len(symbols)} symbols found: one connection carries at most 1024")
    streams = "/".join(f"{s.lower()}@markPrice@1s" for s in symbols)
    return f"{base}/stream?streams={streams}"


def premium_to_mark_message(rows: Sequence[JsonObject], symbols: frozenset[str] | None) -> bytes:
    """Turn ``premiumIndex`` rows into the bytes of a ``!markPrice@arr`` message.

    Args:
        rows: premiumIndex objects.
        symbols: keep only these symbols (None keeps all).

    Returns:
        A JSON array of ``markPriceUpdate`` objects, field for field as the stream sends them.
    """
    out = []
    for row in rows:
        symbol = row.get("symbol")
        mark = row.get("markPrice")
        if not isinstance(symbol, str) or not isinstance(mark, str):
            continue
        if symbols is not None and symbol not in symbols:
            continue
        out.append(
            {
                "e": "markPriceUpdate",
                "E": int(row.get("time") or time.time() * 1000),
                "s": symbol,
                "p": mark,
                "i": str(row.get("indexPrice", mark)),
                "P": str(row.get("estimatedSettlePrice", mark)),
                "r": str(row.get("lastFundingRate", "0")),
                "T": int(row.get("nextFundingTime") or 0),
            }
        )
    return orjson.dumps(out)


@dataclass(frozen=True, slots=True)
class Bars:
    """Closed klines, oldest first, as float arrays for ``engine.warm_up``.

    Attributes:
        open_time_ms: bar open times.
        high: highs.
        low: lows.
        close: closes.
    """

    open_time_ms: npt.NDArray[np.int64]
    high: npt.NDArray[np.float64]
    low: npt.NDArray[np.float64]
    close: npt.NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.close)


def closed_bars(rows: Sequence[Sequence[Any]], now_ms: int) -> Bars:
    """Keep the klines that have closed by ``now_ms`` (the last one may still be open).

    Args:
        rows: kline arrays ``[openTime, open, high, low, close, volume, closeTime, ...]``.
        now_ms: the venue's current time.

    Returns:
        The closed bars, oldest first.

    Raises:
        MessageError: a row is not a kline.
    """
    keep = []
    for index, row in enumerate(rows):
        try:
            open_time, high, low, close, close_time = (
                int(row[0]),
                float(row[2]),
                float(row[3]),
                float(row[4]),
                int(row[6]),
            )
        except (IndexError, TypeError, ValueError) as exc:
            raise MessageError(
                f"markPriceKlines row {index} was {row!r}: not a kline ({exc})"
            ) from None
        if close_time >= now_ms:
            continue
        keep.append((open_time, high, low, close))
    keep.sort(key=lambda bar: bar[0])
    return Bars(
        np.array([b[0] for b in keep], dtype=np.int64),
        np.array([b[1] for b in keep], dtype=np.float64),
        np.array([b[2] for b in keep], dtype=np.float64),
        np.array([b[3] for b in keep], dtype=np.float64),
    )


async def fetch_closed_bars(venue: Venue, symbol: str, interval: str, limit: int) -> Bars:
    """Fetch ``markPriceKlines`` and return only the closed bars.

    Args:
        venue: the REST venue.
        symbol: the symbol.
        interval: kline interval (``1m``).
        limit: how many bars to ask for (the open one, if any, is dropped).

    Returns:
        Closed bars, oldest first.
    """
    rows = await venue.mark_price_klines(symbol, interval, limit)
    now_ms = await venue.server_time_ms()
    return closed_bars(rows, now_ms)


class _ReconnectingStream:
    """What both streams share: their loops run together, the socket being read, closing.

    A subclass creates ``_ws``, ``_closed`` and ``health`` and names its loops in ``_loops``:
    the connection loop (connect, read, reconnect) and its upkeep loop (the mark stream's
    staleness watchdog, the user stream's listenKey keepalive).
    """

    _ws: ClientConnection | None
    _closed: asyncio.Event
    health: FeedHealth

    def _loops(self) -> dict[str, Coroutine[Any, Any, None]]:
        raise NotImplementedError

    async def run(self) -> None:
        """Stream until cancelled or ``close()``; a network failure only means a reconnect."""
        async with asyncio.TaskGroup() as group:
            for name, loop in self._loops().items():
                group.create_task(loop, name=name)

    async def close(self) -> None:
        """Stop streaming and close the socket."""
        self._closed.set()
        if self._ws is not None:
            await self._ws.close()

    async def force_reconnect(self) -> None:
        """Drop the current connection (the loop reconnects at once)."""
        if self._ws is not None:
            await self._ws.close()

    def _now_connected(self, first: bool) -> None:
        self.health.connected = True
        self.health.connected_since = time.monotonic()
        if not first:
            self.health.reconnects += 1

    async def _sleep_unless_closed(self, seconds: float) -> None:
        """Wait ``seconds``, or less when ``close()`` comes first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed.wait(), seconds)


class MarkPriceStream(_ReconnectingStream):
    """The mark-price websocket with reconnects, rotation and a REST fallback.

    Args:
        ws_base: market route base URL (``wss://fstream.binance.com/market``).
        venue: REST venue used for premiumIndex polling while stale.
        fallback_ws_base: base to try when ``ws_base`` refuses the handshake (the legacy
            host, ``wss://fstream.binance.com``); empty: keep retrying ``ws_base``.
        on_message: called with each message's bytes (from the websocket or synthesized).
        symbols: per-symbol streams; empty for the all-market array.
        stale_after_s: silence that makes the feed stale.
        poll_interval_s: premiumIndex polling interval while stale.
        rotate_after_s: proactive reconnect age (Binance closes at 24 h).
        backoff: reconnect delays.
        on_gap: awaited with the gap length in seconds after a reconnect or a stale period
            longer than ``gap_threshold_s``.
        gap_threshold_s: the gap that asks for a warm-up (one bar by default).
    """

    def __init__(
        self,
        ws_base: str,
        venue: Venue,
        on_message: Callable[[bytes], None],
        *,
        symbols: Sequence[str] = (),
        stale_after_s: float = 10.0,
        poll_interval_s: float = 2.0,
        rotate_after_s: float = 23.5 * 3600,
        backoff: Backoff | None = None,
        on_gap: Callable[[float], Awaitable[None]] | None = None,
        gap_threshold_s: float = 60.0,
        fallback_ws_base: str = "",
    ) -> None:
        self.routes = RouteChoice(ws_base, fallback_ws_base)
        self._stream_symbols = tuple(symbols)
        self._venue = venue
        self._on_message = on_message
        self._symbols = frozenset(symbols) if symbols else None
        self._stale_after_s = stale_after_s
        self._poll_interval_s = poll_interval_s
        self._rotate_after_s = rotate_after_s
        self._backoff = backoff or Backoff()
        self._on_gap = on_gap
        self._gap_threshold_s = gap_threshold_s
        self.health = FeedHealth()
        self._ws: ClientConnection | None = None
        self._stale_since: float | None = None
        self._last_ws_at = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()

    @property
    def url(self) -> str:
        """The URL the next connection goes to."""
        return mark_price_url(self.routes.current, self._stream_symbols)

    def _loops(self) -> dict[str, Coroutine[Any, Any, None]]:
        return {"markprice-watchdog": self._watchdog(), "markprice-ws": self._connection_loop()}

    def _deliver(self, data: bytes, *, polled: bool) -> None:
        health = self.health
        health.last_message_at = time.monotonic()
        if polled:
            health.polled += 1
        else:
            health.messages += 1
        try:
            self._on_message(data)
        except MessageError as exc:
            health.malformed += 1
            logger.warning("Mark-price message refused reason=%s bytes=%d", exc, len(data))

    async def _connection_loop(self) -> None:
        first = True
        while not self._closed.is_set():
            try:
                async with connect(
                    self.url, max_size=2**24, open_timeout=10, ping_interval=60, ping_timeout=600
                ) as ws:
                    self._ws = ws
                    if self._closed.is_set():
                        # close() ran while this connection was being made: it saw no socket
                        # to close, so this one would be read forever.
                        break
                    self._now_connected(first)
                    first = False
                    logger.info("Mark-price stream connected url=%s", self.url)
                    if await self._read(ws):
                        self._backoff.reset()
                    if time.monotonic() - self.health.connected_since >= self._rotate_after_s:
                        logger.info("Mark-price stream rotating before the 24 h limit")
                        continue
            except (OSError, TimeoutError, WebSocketException) as exc:
                if self._closed.is_set():
                    break
                logger.warning("Mark-price stream lost error=%s: %s", type(exc).__name__, exc)
                _route_refused(self.routes, exc, "Mark-price")
            finally:
                self._ws = None
                self.health.connected = False
            if self._closed.is_set():
                break
            first = False
            delay = self._backoff.next_delay()
            logger.info("Mark-price stream reconnecting in %.2f s", delay)
            await self._sleep_unless_closed(delay)

    async def _read(self, ws: ClientConnection) -> bool:
        got = False
        loop = asyncio.get_running_loop()
        # One timeout for the connection's whole life rather than one per message: the only
        # await in the loop is recv (delivery is synchronous), so nothing else is cut short.
        deadline = (
            loop.time() + self._rotate_after_s - (time.monotonic() - self.health.connected_since)
        )
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    data = await ws.recv(decode=False)
                    if isinstance(data, str):
                        data = data.encode()
                    got = True
                    now = time.monotonic()
                    if self._stale_since is not None:
                        self._stale_since = None
                        self.health.stale = False
                        logger.info("Mark-price stream back after %.1f s", now - self._last_ws_at)
                    if self._last_ws_at and now - self._last_ws_at >= self._gap_threshold_s:
                        task = loop.create_task(self._report_gap(now - self._last_ws_at))
                        self._tasks.add(task)
                        task.add_done_callback(self._tasks.discard)
                    self._last_ws_at = now
                    self._deliver(data, polled=False)
        except TimeoutError:
            return got

    async def _report_gap(self, gap_s: float) -> None:
        if self._on_gap is None:
            return
        logger.info("Mark-price gap of %.0f s: warming up again", gap_s)
        try:
            await self._on_gap(gap_s)
        except (ExchangeError, MessageError) as exc:
            logger.warning("Warm-up after a %.0f s gap failed error=%s", gap_s, exc)

    async def _watchdog(self) -> None:
        tick = min(1.0, self._stale_after_s / 4)
        started = time.monotonic()
        while not self._closed.is_set():
            await self._sleep_unless_closed(tick)
            if self._closed.is_set():
                return
            silent = time.monotonic() - (self._last_ws_at or started)
            if self._stale_since is None and silent >= self._stale_after_s:
                self._stale_since = time.monotonic()
                self.health.stale = True
                logger.warning(
                    "Mark-price feed stale silent_s=%.1f, polling premiumIndex every %.1f s",
                    silent,
                    self._poll_interval_s,
                )
            if self._stale_since is not None:
                await self._poll_once()
                await self._sleep_unless_closed(max(0.0, self._poll_interval_s - tick))

    async def _poll_once(self) -> None:
        try:
            rows = await self._venue.premium_index()
        except ExchangeError as exc:
            logger.warning("premiumIndex poll failed error=%s", exc)
            return
        if self._stale_since is None:
            return
        data = premium_to_mark_message(rows, self._symbols)
        self._deliver(data, polled=True)
        # A poll keeps the dashboard fresh but must not end the stale state by itself.
        self.health.stale = True


@dataclass(frozen=True, slots=True)
class UserEvent:
    """One user-data event, decoded.

    Attributes:
        kind: the ``e`` field (``ORDER_TRADE_UPDATE``, ``ACCOUNT_UPDATE``, ``ALGO_UPDATE``,
            ``TRADE_LITE``, ``listenKeyExpired``, ``ACCOUNT_CONFIG_UPDATE`` ...).
        event_time_ms: the ``E`` field (a string in some Binance samples; read as int).
        payload: the whole decoded event.
    """

    kind: str
    event_time_ms: int
    payload: JsonObject


# Fields pyquant reads from each event kind; an event missing one is refused as malformed.
_REQUIRED: dict[str, tuple[str, tuple[str, ...]]] = {
    "ORDER_TRADE_UPDATE": ("o", ("s", "c", "S", "X", "x", "ps")),
    "ALGO_UPDATE": ("o", ("s", "caid", "X")),
    "ACCOUNT_UPDATE": ("a", ("P",)),
}


def parse_user_event(data: bytes | str) -> UserEvent:
    """Decode one user-data message.

    Args:
        data: the raw websocket message.

    Returns:
        The event.

    Raises:
        MessageError: not JSON, not an object, or missing a field pyquant relies on.
    """
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise MessageError(f"user-data message is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise MessageError(f"user-data message was {type(doc).__name__}: must be a JSON object")
    if "stream" in doc and isinstance(doc.get("data"), dict):
        doc = doc["data"]
    kind = doc.get("e")
    if not isinstance(kind, str):
        raise MessageError(f"user-data field 'e' was {kind!r}: must be the event type")
    try:
        event_time = int(doc.get("E", 0))
    except (TypeError, ValueError):
        raise MessageError(f"{kind} field 'E' was {doc.get('E')!r}: must be a time in ms") from None
    required = _REQUIRED.get(kind)
    if required is not None:
        inner_name, names = required
        inner = doc.get(inner_name)
        if not isinstance(inner, dict):
            raise MessageError(f"{kind} field {inner_name!r} was {inner!r}: must be an object")
        missing = [name for name in names if name not in inner]
        if missing:
            raise MessageError(f"{kind} is missing field(s) {', '.join(missing)} in {inner_name!r}")
        if kind == "ACCOUNT_UPDATE" and not isinstance(inner["P"], list):
            raise MessageError(f"ACCOUNT_UPDATE field 'a.P' was {inner['P']!r}: must be a list")
    return UserEvent(kind, event_time, doc)


class UserDataStream(_ReconnectingStream):
    """The user-data websocket: listenKey lifecycle, reconnects, decoded events.

    Args:
        ws_base: user route base URL (``wss://fstream.binance.com/private``).
        venue: REST venue for the listenKey calls.
        fallback_ws_base: base to try when ``ws_base`` refuses the handshake (the legacy
            host); empty: keep retrying ``ws_base``.
        on_event: awaited with each decoded event, in arrival order.
        keepalive_interval_s: listenKey keepalive period.
        rotate_after_s: proactive reconnect age.
        backoff: reconnect delays.
        on_connected: awaited after each (re)connection, before events are read
            (reconcile what was missed here).
        on_disconnected: called when the connection is lost (fail closed here).
    """

    def __init__(
        self,
        ws_base: str,
        venue: Venue,
        on_event: Callable[[UserEvent], Awaitable[None]],
        *,
        keepalive_interval_s: float = 1800.0,
        rotate_after_s: float = 23.5 * 3600,
        backoff: Backoff | None = None,
        on_connected: Callable[[bool], Awaitable[None]] | None = None,
        on_disconnected: Callable[[], None] | None = None,
        fallback_ws_base: str = "",
    ) -> None:
        self.routes = RouteChoice(ws_base, fallback_ws_base)
        self._venue = venue
        self._on_event = on_event
        self._keepalive_interval_s = keepalive_interval_s
        self._rotate_after_s = rotate_after_s
        self._backoff = backoff or Backoff()
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected
        self.health = FeedHealth()
        self.listen_key: str | None = None
        self.listen_keys_created = 0
        self._ws: ClientConnection | None = None
        self._closed = asyncio.Event()
        self._renew = asyncio.Event()

    def _loops(self) -> dict[str, Coroutine[Any, Any, None]]:
        return {
            "listenkey-keepalive": self._keepalive_loop(),
            "userdata-ws": self._connection_loop(),
        }

    async def close(self) -> None:
        """Stop, close the socket and the listenKey."""
        await super().close()
        if self.listen_key is not None:
            with contextlib.suppress(ExchangeError):
                await self._venue.close_listen_key()

    async def _new_listen_key(self) -> str:
        key = await self._venue.create_listen_key()
        self.listen_key = key
        self.listen_keys_created += 1
        logger.info("User-data listenKey created count=%d", self.listen_keys_created)
        return key

    async def _connection_loop(self) -> None:
        first = True
        refusals = 0  # handshakes refused in a row (an expired or unknown listenKey)
        while not self._closed.is_set():
            renew_at_once = False
            try:
                if self.listen_key is None or self._renew.is_set():
                    self._renew.clear()
                    await self._new_listen_key()
                assert self.listen_key is not None  # noqa: S101 - set just above
                url = f"{self.routes.current}/ws/{self.listen_key}"
                async with connect(url, max_size=2**22, open_timeout=10, ping_interval=60) as ws:
                    self._ws = ws
                    if self._closed.is_set():
                        # close() ran while this connection was being made: it saw no socket
                        # to close, so this one would be read forever.
                        break
                    self._now_connected(first)
                    logger.info("User-data stream connected reconnect=%s", not first)
                    if self._on_connected is not None:
                        await self._on_connected(not first)
                    first = False
                    refusals = 0
                    self._backoff.reset()
                    await self._read(ws)
            except InvalidStatus as exc:
                if self._closed.is_set():
                    break
                status = exc.response.status_code
                if 400 <= status < 500 and status != 429:
                    # Either the venue refuses the key (it expired while we were away, and
                    # the keepalive loop may not run for half an hour) or it lacks the route
                    # (a testnet without /private): a new key now, and the other route when
                    # there is one; the two alternate until one connects.
                    _route_refused(self.routes, exc, "User-data")
                    refusals += 1
                    renew_at_once = refusals == 1
                    self._renew.set()
                    logger.warning(
                        "User-data stream refused status=%d: creating a new listenKey", status
                    )
                else:
                    logger.warning("User-data stream lost error=InvalidStatus: %s", exc)
            except (OSError, TimeoutError, WebSocketException, ExchangeError) as exc:
                if self._closed.is_set():
                    break
                logger.warning("User-data stream lost error=%s: %s", type(exc).__name__, exc)
                _route_refused(self.routes, exc, "User-data")
            finally:
                was_connected = self.health.connected
                self._ws = None
                self.health.connected = False
                if was_connected and self._on_disconnected is not None:
                    self._on_disconnected()
            if self._closed.is_set():
                break
            first = False
            if self._renew.is_set() and (renew_at_once or refusals == 0):
                continue  # listenKeyExpired, or the first refusal: reconnect with a new key now
            delay = self._backoff.next_delay()
            await self._sleep_unless_closed(delay)

    async def _read(self, ws: ClientConnection) -> None:
        deadline = self.health.connected_since + self._rotate_after_s
        while not self._renew.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                logger.info("User-data stream rotating before the 24 h limit")
                return
            try:
                data = await asyncio.wait_for(ws.recv(decode=False), remaining)
            except TimeoutError:
                return
            self.health.last_message_at = time.monotonic()
            try:
                event = parse_user_event(data)
            except MessageError as exc:
                self.health.malformed += 1
                logger.warning("User-data message refused reason=%s", exc)
                continue
            self.health.messages += 1
            self.health.last_event_ms = event.event_time_ms
            if event.kind == "listenKeyExpired":
                logger.warning("User-data listenKey expired; creating a new one")
                self._renew.set()
                return
            await self._on_event(event)

    async def _keepalive_loop(self) -> None:
        while not self._closed.is_set():
            await self._sleep_unless_closed(self._keepalive_interval_s)
            if self._closed.is_set() or self.listen_key is None:
                continue
            try:
                await self._venue.keepalive_listen_key()
                logger.debug("User-data listenKey kept alive")
            except ExchangeError as exc:
                if exc.code == -1125:
                    logger.warning("User-data listenKey gone (-1125); creating a new one")
                    self._renew.set()
                    await self.force_reconnect()
                else:
                    logger.warning("listenKey keepalive failed error=%s", exc)


__all__ = [
    "Backoff",
    "Bars",
    "FeedHealth",
    "MarkPriceStream",
    "UserDataStream",
    "UserEvent",
    "closed_bars",
    "fetch_closed_bars",
    "interval_ms",
    "mark_price_url",
    "parse_user_event",
    "premium_to_mark_message",
]
