"""The events stream: every decision, order, fill, exit, rejection and lease change, in Redis.

Dashboards, notifiers and other services follow a daemon through this stream without touching
its SQLite. Each event is one stream entry (``XADD <stream> MAXLEN ~ <n> * type <type> event
<json>``): the ``type`` field repeats the event's type so a reader can filter without parsing,
and ``event`` holds one JSON document of this schema (version 1; the machine-readable copy is
``pyquant/scale/events.schema.json``, which the tests validate every published event against)::

    {
      "version": 1,                    # bumped on any incompatible change
      "type": "decision" | "order" | "fill" | "exit" | "position" | "rejection" | "lease"
              | "daemon",
      "ts_ms": 1764201600123,          # when the daemon published it, ms since the epoch
      "daemon_id": "host-a",           # the publishing daemon
      "account": "main",               # the account namespace the daemon serves
      "seq": 42,                       # per-process counter from 1: a gap means dropped events
      "symbol": "BTCUSDT" | null,      # null for daemon-wide events
      "payload": {...}                 # per type, below
    }

Payloads (required keys; more keys may appear and readers must ignore unknown ones). Prices,
quantities and USDT amounts are decimal strings, never floats:

- ``decision``: ``intent_id, side (BUY|SELL), accepted (bool), reason (str|null), source``;
  optionally ``confidence, size_usd, leverage, stream_id``.
- ``rejection``: ``stream, stream_id, reason, field (str|null)``: a stream entry that is not an
  intent, with the reason it was refused.
- ``order``: ``client_order_id, side, position_side (LONG|SHORT|BOTH), order_type, quantity,
  status``; optionally ``price, stop_price, reason``.
- ``fill``: ``client_order_id, side, position_side, price, quantity``; optionally
  ``commission, realized_pnl, trade_id``.
- ``exit``: ``position_side, reason, quantity``; optionally ``position_id, trigger_price,
  mark_price``.
- ``position``: ``action (opened|adopted|handed_over|closed), position_id, position_side,
  quantity``; optionally ``entry_price, reason, owner`` (``handed_over``: the symbol's new
  owner runs it now; ``adopted``: this daemon took it over, from a peer or the exchange).
- ``lease``: ``action (acquired|lost|released|unconfirmed|confirmed), owner``; optionally
  ``reason, ttl_ms``.
- ``daemon``: ``action (started|stopping|stopped|dropped_events|feed_down|feed_restored|
  daily_summary|test)``; optionally ``dropped``; ``down_s`` (feed); ``day, entries, exits,
  rejections, realized_pnl`` (daily summary). The feed, summary and test events are made by
  ``pyquant.notify`` for its targets (``pyquant notify test`` sends ``test``).

Delivery: publishing never blocks the trading path. ``publish`` only appends to a bounded
in-memory buffer; a background task drains it in pipelined batches. While Redis is down the
buffer keeps the newest events and drops the oldest, counting them (``stats.dropped``, and a
``daemon/dropped_events`` event once Redis is back), and the buffer is flushed on reconnect.
A batch cut by a broken connection is sent again, so delivery is at least once: readers that
must not double count use ``(daemon_id, seq)`` as the key.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, Literal

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pyquant.scale._backoff import Backoff
from pyquant.trading.intents import Intent

logger = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 1
DEFAULT_EVENTS_STREAM: Final = "pyquant:events"

EventType = Literal["decision", "order", "fill", "exit", "position", "rejection", "lease", "daemon"]
EVENT_TYPES: Final[frozenset[str]] = frozenset(
    {"decision", "order", "fill", "exit", "position", "rejection", "lease", "daemon"}
)

# Errors that mean "Redis is not reachable right now": retried, never raised to the caller.
REDIS_DOWN_ERRORS: Final = (RedisConnectionError, RedisTimeoutError, OSError)


def _json_default(value: object) -> object:
    # Money stays exact on the wire: Decimal goes out as its string, never as a float.
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"event payload value {value!r} of type {type(value).__name__} is not JSON")


@dataclass(slots=True)
class PublisherStats:
    """Counters of one EventPublisher.

    Attributes:
        published: events written to Redis.
        dropped: events dropped because the buffer was full while Redis was down.
        buffered: events waiting in the buffer now.
        failures: failed flush attempts (Redis unreachable).
    """

    published: int = 0
    dropped: int = 0
    buffered: int = 0
    failures: int = 0


class EventPublisher:
    """Publish pyquant events to a Redis stream without ever blocking the caller.

    Args:
        redis: a ``redis.asyncio`` client (bytes or decoded responses both work).
        daemon_id: this daemon's id, written in every event.
        account: the account namespace, written in every event.
        stream: the events stream key.
        maxlen: approximate cap of the stream (``MAXLEN ~``); Redis trims whole nodes.
        buffer_size: events kept in memory while Redis is down; the oldest go first.
        batch_size: events per pipelined flush.
        clock_ms: the wall clock stamped into ``ts_ms``.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        daemon_id: str,
        account: str = "default",
        stream: str = DEFAULT_EVENTS_STREAM,
        maxlen: int = 100_000,
        buffer_size: int = 10_000,
        batch_size: int = 256,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        if maxlen < 1:
            raise ValueError(f"events maxlen was {maxlen}: must be at least 1")
        if buffer_size < 1:
            raise ValueError(f"events buffer_size was {buffer_size}: must be at least 1")
        if batch_size < 1:
            raise ValueError(f"events batch_size was {batch_size}: must be at least 1")
        self._redis = redis
        self.daemon_id = daemon_id
        self.account = account
        self.stream = stream
        self.maxlen = maxlen
        self._buffer: collections.deque[tuple[str, bytes]] = collections.deque()
        self._buffer_size = buffer_size
        self._batch_size = batch_size
        self._clock_ms = clock_ms
        self._seq = 0
        self._wakeup = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._dropped_reported = 0
        self._stopping = False
        self.stats = PublisherStats()

    # ----------------------------------------------------------------- publishing (sync)

    def publish(
        self, event_type: EventType, *, symbol: str | None, payload: Mapping[str, Any]
    ) -> int:
        """Queue one event for the stream and return its ``seq``; never blocks, never raises.

        Args:
            event_type: one of ``EVENT_TYPES``.
            symbol: the exchange symbol, or None for a daemon-wide event.
            payload: the type's payload (see the module docstring); Decimals become strings.

        Returns:
            The event's sequence number in this process.

        Raises:
            ValueError: the type is unknown or the payload is not JSON (a programming error).
        """
        if event_type not in EVENT_TYPES:
            raise ValueError(f"event type {event_type!r} is not one of {sorted(EVENT_TYPES)}")
        self._seq += 1
        document = {
            "version": SCHEMA_VERSION,
            "type": event_type,
            "ts_ms": self._clock_ms(),
            "daemon_id": self.daemon_id,
            "account": self.account,
            "seq": self._seq,
            "symbol": symbol,
            "payload": dict(payload),
        }
        try:
            data = orjson.dumps(document, default=_json_default)
        except TypeError as exc:
            raise ValueError(f"{event_type} event payload is not JSON: {exc}") from exc
        self._append(event_type, data)
        return self._seq

    def decision(
        self, intent: Intent, *, accepted: bool, reason: str | None, **extra: object
    ) -> int:
        """Publish the guard's decision on one intent.

        Args:
            intent: the decided intent.
            accepted: whether the guard let it through.
            reason: why it was refused (or a note), None when accepted without remark.
            **extra: more payload keys (``stream_id`` ...).

        Returns:
            The event's sequence number.
        """
        payload: dict[str, Any] = {
            "intent_id": intent.intent_id,
            "side": intent.side,
            "accepted": accepted,
            "reason": reason,
            "source": intent.source,
            "confidence": intent.confidence,
            "size_usd": intent.size_usd,
            "leverage": intent.leverage,
        }
        payload.update(extra)
        return self.publish("decision", symbol=intent.symbol, payload=payload)

    def rejection(
        self, *, stream: str, stream_id: str, reason: str, field: str | None, symbol: str | None
    ) -> int:
        """Publish a refused stream entry with its reason.

        Args:
            stream: the stream the entry came from.
            stream_id: the entry's id.
            reason: the full reason, naming the field, value and rule.
            field: the offending field, when one is known.
            symbol: the entry's symbol if it had a valid one.

        Returns:
            The event's sequence number.
        """
        payload = {"stream": stream, "stream_id": stream_id, "reason": reason, "field": field}
        return self.publish("rejection", symbol=symbol, payload=payload)

    def lease(self, symbol: str, *, action: str, owner: str, reason: str = "") -> int:
        """Publish a lease change for one symbol.

        Args:
            symbol: the leased symbol.
            action: ``acquired``, ``lost``, ``released``, ``unconfirmed`` or ``confirmed``.
            owner: the owner after the change (this daemon, or the one that took it).
            reason: why (``intent``, ``takeover``, ``stop`` ...).

        Returns:
            The event's sequence number.
        """
        payload = {"action": action, "owner": owner, "reason": reason}
        return self.publish("lease", symbol=symbol, payload=payload)

    def _append(self, event_type: str, data: bytes) -> None:
        if len(self._buffer) >= self._buffer_size:
            self._buffer.popleft()
            self.stats.dropped += 1
        self._buffer.append((event_type, data))
        self.stats.buffered = len(self._buffer)
        self._drained.clear()
        self._wakeup.set()

    # ----------------------------------------------------------------- flushing (async)

    async def run(self) -> None:
        """Drain the buffer to Redis until cancelled or ``stop`` is called.

        Redis errors are retried with capped, jittered backoff; the buffer is kept (bounded)
        and flushed on reconnect.
        """
        backoff = Backoff(base_ms=50, cap_ms=2_000)
        while True:
            if not self._buffer:
                self._drained.set()
                if self._stopping:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                await self._flush_batch()
            except REDIS_DOWN_ERRORS as exc:
                self.stats.failures += 1
                delay = backoff.next_delay_s()
                if backoff.attempt == 1:
                    logger.warning("Events stream unreachable stream=%s error=%s", self.stream, exc)
                if self._stopping:
                    # A stop while Redis is down does not wait for it: the events are lost and
                    # counted, the daemon's own journal still has them.
                    self.stats.dropped += len(self._buffer)
                    self._buffer.clear()
                    self.stats.buffered = 0
                    self._drained.set()
                    return
                await asyncio.sleep(delay)
                continue
            if backoff.attempt:
                logger.info("Events stream reachable again stream=%s", self.stream)
            backoff.reset()
            self._report_drops()

    async def _flush_batch(self) -> None:
        batch = [self._buffer[i] for i in range(min(self._batch_size, len(self._buffer)))]
        pipe = self._redis.pipeline(transaction=False)
        for event_type, data in batch:
            # The type is repeated as its own field so readers can filter without parsing.
            pipe.xadd(
                self.stream,
                {"type": event_type, "event": data},
                maxlen=self.maxlen,
                approximate=True,
            )
        await pipe.execute()
        # Entries appended during the await sit behind the batch; entries dropped by
        # drop-oldest during the await were the batch's own, so count only what is left.
        for item in batch:
            if self._buffer and self._buffer[0] is item:
                self._buffer.popleft()
        self.stats.published += len(batch)
        self.stats.buffered = len(self._buffer)

    def _report_drops(self) -> None:
        if self.stats.dropped > self._dropped_reported:
            self._dropped_reported = self.stats.dropped
            logger.warning("Events dropped while Redis was down dropped=%d", self.stats.dropped)
            self.publish(
                "daemon",
                symbol=None,
                payload={"action": "dropped_events", "dropped": self.stats.dropped},
            )

    async def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every queued event is written, or the timeout passes.

        Args:
            timeout_s: the longest wait, in seconds.

        Returns:
            True when the buffer is empty.
        """
        try:
            await asyncio.wait_for(self._drained.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def stop(self) -> None:
        """Ask ``run`` to return once the buffer is flushed (or at once if Redis is down)."""
        self._stopping = True
        self._wakeup.set()


__all__ = [
    "DEFAULT_EVENTS_STREAM",
    "EVENT_TYPES",
    "SCHEMA_VERSION",
    "EventPublisher",
    "EventType",
    "PublisherStats",
]
