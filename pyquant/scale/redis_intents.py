"""Intents from a Redis stream, read through a consumer group and acknowledged after the decision.

URL form (``pyquant run --intents URL``)::

    redis://[:password@]host:port/db?stream=NAME&group=NAME[&consumer=NAME][&start=$|0]
        [&batch=N][&block_ms=N][&claim_idle_ms=N]

``stream`` defaults to ``quantum:stream:trade.intent`` (the original system's stream), ``group``
to ``pyquant`` and ``consumer`` to the host name. The consumer name must stay the same across
restarts of one daemon: its own pending entries are found by that name. ``start`` says where a
newly created group begins: ``$`` (default: only entries added from now on) or ``0`` (the whole
stream). ``rediss://`` works the same over TLS. A master found through Redis Sentinel:
``redis+sentinel://[:password@]h1:p1,h2:p2,h3:p3/db?service=NAME&...``
(:mod:`pyquant.scale.connect`).

Entry shapes (both accepted):

- one field holding a JSON object: ``data``, ``payload``, ``intent``, ``json`` or ``message``
  (the first present wins; other fields are ignored);
- flat fields, one per intent field (``symbol``, ``side``, ``confidence``, ...), values as text.

The object is pyquant's intent format or the original system's payload (``symbol``, ``side``
BUY/SELL, ``confidence``, ``leverage``, ``position_size_usd``, ``source``), parsed by
:func:`pyquant.trading.intents.parse_intent`. An entry without ``id``/``intent_id`` gets the
stream entry id as its intent id (stable across redeliveries), and one without a timestamp is
stamped with the entry id's time, so staleness counts from when it was added, not when read.

Delivery guarantees:

- An entry is acknowledged (``XACK``) only after ``decide`` returned, that is after the decision
  is stored. A crash in between redelivers the entry; deciding it again is prevented by the
  position guard, which refuses a second intent with the same id. This source does not
  deduplicate: idempotence by intent id is the guard's job.
- On start, this consumer's own pending entries are processed first (``XREADGROUP`` from id 0),
  then new ones (``>``). Every ``claim_interval_ms``, entries idle longer than
  ``claim_idle_ms`` in other consumers' pending lists (dead consumers) are reclaimed with
  ``XAUTOCLAIM`` and processed here.
- A malformed entry is rejected with its reason (``on_reject``, then a ``rejection`` event),
  acknowledged, and the source goes on with the next entry. Refused before any lease is taken
  or anything is asked of the exchange: more than 256 fields or 64 KiB, a field name or value
  that is not UTF-8, a symbol that is not ASCII (``ß`` would upper-case to ``SS``), a symbol
  the daemon's exchangeInfo does not list (``symbol_check``), a creation time more than a day
  ahead of this daemon's clock.
- An entry whose handling fails in any other way (a bug, a script error) is retried like a
  failed ``decide`` and rejected after ``max_deliveries`` attempts, so no entry can stop the
  intake or crash a restart. A deleted stream or inbox (``NOGROUP``, ``UNBLOCKED``) is created
  again.
- ``decide`` raising keeps the entry pending (retried after ``retry_ms``); after
  ``max_deliveries`` failures in this process it is rejected with the error as its reason.
- Redis errors are retried with capped, jittered backoff, resuming from the own pending list.

Several daemons (``router`` given, a :class:`pyquant.scale.leases.LeaseManager`): an intent is
decided only by the owner of its symbol's lease. The reader of an entry for a symbol owned by
another live daemon moves it to that daemon's inbox stream (``{prefix}:{account}:inbox:{id}``)
and acknowledges the original in one Lua script, so it is neither lost nor doubled. Intents
whose ownership cannot be confirmed (Redis lease unconfirmed, adoption running) stay pending and
are retried. The inboxes of dead daemons are drained by the survivors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from pyquant.errors import ConfigError
from pyquant.scale._backoff import Backoff
from pyquant.scale.connect import PLAIN_SCHEMES, SENTINEL_SCHEMES, sentinel_hosts
from pyquant.scale.events import REDIS_DOWN_ERRORS, EventPublisher
from pyquant.scale.leases import LeaseManager, Route, validate_name
from pyquant.trading.intents import Intent, IntentError, parse_intent

logger = logging.getLogger(__name__)

DEFAULT_INTENT_STREAM: Final = "quantum:stream:trade.intent"
DEFAULT_GROUP: Final = "pyquant"
PAYLOAD_FIELDS: Final = ("data", "payload", "intent", "json", "message")
INTENT_URL_PARAMS: Final = frozenset(
    {"stream", "group", "consumer", "start", "batch", "block_ms", "claim_idle_ms", "service"}
)
_MAX_FIELD_CHARS: Final = 200
# An intent needs a dozen fields; the caps keep an entry within what a Lua script can unpack
# (8000 values) when it is forwarded, and within reason for memory and logs.
MAX_ENTRY_FIELDS: Final = 256
MAX_ENTRY_BYTES: Final = 65_536
# How far ahead of this daemon's clock an intent's creation time may lie before it is refused
# as nonsense (the guard's own future tolerance, a few seconds, applies after this).
MAX_FUTURE_MS: Final = 86_400_000
_TIME_FIELDS: Final = ("created_at_ms", "timestamp", "ts")

# Moves an entry to the owner's inbox and acknowledges it at its source, atomically.
# KEYS: lease key, owner's member key, owner's inbox, source stream.
# ARGV: owner, group, source entry id, delete source (1/0), then field/value pairs.
# Returns 1 moved, 0 the lease has another owner now, -1 the owner is not alive.
_FORWARD: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
redis.call('XADD', KEYS[3], '*', unpack(ARGV, 5))
redis.call('XACK', KEYS[4], ARGV[2], ARGV[3])
if ARGV[4] == '1' then redis.call('XDEL', KEYS[4], ARGV[3]) end
return 1
"""

# Deletes a dead daemon's inbox once it is empty. KEYS: member key, inbox, daemons set.
# ARGV: daemon id.
_DROP_INBOX: Final = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 and redis.call('XLEN', KEYS[2]) > 0 then return 0 end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return 1
"""


class DecisionLike(Protocol):
    """What ``decide`` returns: the guard's verdict, after it is stored."""

    @property
    def accepted(self) -> bool:
        """Whether the intent was let through."""
        ...

    @property
    def reason(self) -> str | None:
        """Why it was refused, or None."""
        ...


Decide = Callable[[Intent], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Rejection:
    """A stream entry refused before any decision.

    Attributes:
        stream: the stream key it was read from.
        stream_id: its entry id.
        reason: the full reason (field, value, rule).
        field: the offending field, when one is known.
        symbol: its symbol, when it had a readable one.
        fields: the entry's fields as text (each cut to 200 characters), for the record.
    """

    stream: str
    stream_id: str
    reason: str
    field: str | None
    symbol: str | None
    fields: Mapping[str, str]


OnReject = Callable[[Rejection], Awaitable[None]]
# Returns why a symbol cannot be traded here (not in the exchangeInfo), or None.
SymbolCheck = Callable[[str], str | None]


@dataclass(frozen=True, slots=True)
class IntentStreamConfig:
    """Where and how to read intents.

    Attributes:
        url: the Redis URL without pyquant's query parameters.
        stream: the intent stream key.
        group: the consumer group; all daemons of one account share it.
        consumer: this daemon's consumer name; keep it stable across restarts.
        start_id: where a new group starts: ``$`` (new entries only) or ``0`` (all).
        batch_size: entries per read.
        block_ms: how long one read waits for new entries.
        claim_idle_ms: idle time after which another consumer's pending entry is reclaimed.
        claim_interval_ms: how often dead consumers' entries are looked for.
        retry_ms: how long a deferred or failed entry waits before it is tried again.
        max_deliveries: failed ``decide`` calls before an entry is rejected.
        retry_reasons: decision reasons that mean "not decided, try later" (the daemon's intake
            is closing): such an entry is left pending, not acknowledged.
        failure_reasons: decision reasons that mean deciding failed (``Daemon.submit`` turns an
            exception into ``error``): counted like a raised exception, then rejected.
    """

    url: str = "redis://127.0.0.1:6379/0"
    stream: str = DEFAULT_INTENT_STREAM
    group: str = DEFAULT_GROUP
    consumer: str = field(default_factory=lambda: _default_consumer())
    start_id: str = "$"
    batch_size: int = 64
    block_ms: int = 1_000
    claim_idle_ms: int = 30_000
    claim_interval_ms: int = 5_000
    retry_ms: int = 500
    max_deliveries: int = 5
    retry_reasons: frozenset[str] = frozenset({"intake_closed"})
    failure_reasons: frozenset[str] = frozenset({"error"})

    def __post_init__(self) -> None:
        if not self.stream or len(self.stream) > 200 or any(c.isspace() for c in self.stream):
            raise ConfigError(
                f"intents.stream was {self.stream!r}: must be 1-200 characters without spaces"
            )
        validate_name("intents.group", self.group)
        validate_name("intents.consumer", self.consumer)
        if self.start_id not in ("$", "0"):
            raise ConfigError(f"intents.start was {self.start_id!r}: must be $ or 0")
        for name, value, low, high in (
            ("batch", self.batch_size, 1, 10_000),
            ("block_ms", self.block_ms, 1, 60_000),
            ("claim_idle_ms", self.claim_idle_ms, 0, 86_400_000),
            ("claim_interval_ms", self.claim_interval_ms, 10, 3_600_000),
            ("retry_ms", self.retry_ms, 1, 600_000),
            ("max_deliveries", self.max_deliveries, 1, 1_000),
        ):
            if not low <= value <= high:
                raise ConfigError(f"intents.{name} was {value}: must be from {low} to {high}")


def _default_consumer() -> str:
    host = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())
    return (host or "pyquant")[:64]


def split_redis_url(url: str, allowed: frozenset[str]) -> tuple[str, dict[str, str]]:
    """Split a ``redis://`` URL into the connection URL and pyquant's query parameters.

    Args:
        url: ``redis://`` or ``rediss://`` URL with optional query parameters.
        allowed: the parameter names the caller understands.

    Returns:
        The URL without its query, and the parameters.

    Raises:
        ConfigError: wrong scheme, no host, a repeated or unknown parameter.
    """
    parts = urlsplit(url)
    shown = _redact(url)
    sentinel = parts.scheme in SENTINEL_SCHEMES
    if parts.scheme not in PLAIN_SCHEMES and not sentinel:
        raise ConfigError(
            f"intents URL {shown!r}: scheme must be redis:// or rediss:// (or redis+sentinel://, "
            "rediss+sentinel:// for a master found through Redis Sentinel)"
        )
    if sentinel:
        sentinel_hosts(parts.netloc, shown)
    elif not parts.hostname:
        raise ConfigError(f"intents URL {shown!r}: needs a host, e.g. redis://127.0.0.1:6379/0")
    else:
        try:
            _ = parts.port
        except ValueError as exc:
            raise ConfigError(f"intents URL {shown!r}: port {exc}") from exc
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ConfigError(f"intents URL {shown!r}: database {path!r} must be a number")
    params: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if key not in allowed:
            raise ConfigError(
                f"intents URL parameter {key!r} is unknown: use {', '.join(sorted(allowed))}"
            )
        if key in params:
            raise ConfigError(f"intents URL parameter {key!r} is given twice")
        if not value:
            raise ConfigError(f"intents URL parameter {key!r} is empty")
        params[key] = value
    query = ""
    if sentinel:
        service = params.get("service")
        if service is None:
            raise ConfigError(
                f"intents URL {shown!r}: a redis+sentinel:// URL needs ?service=<master name>"
            )
        validate_name("intents URL parameter 'service'", service)
        query = f"service={service}"
    elif "service" in params:
        raise ConfigError(f"intents URL {shown!r}: 'service' is only for redis+sentinel:// URLs")
    base = urlunsplit((parts.scheme, parts.netloc, parts.path or "/0", query, ""))
    return base, params


def parse_intent_url(url: str) -> IntentStreamConfig:
    """Build the intent stream settings from ``redis://...?stream=..&group=..[&consumer=..]``.

    Args:
        url: the URL (see the module docstring for every parameter).

    Returns:
        The settings.

    Raises:
        ConfigError: the URL or a parameter is invalid; the message names it and the rule.
    """
    base, params = split_redis_url(url, INTENT_URL_PARAMS)
    return intent_config_from_params(base, params)


def intent_config_from_params(base: str, params: Mapping[str, str]) -> IntentStreamConfig:
    """Build the intent stream settings from an already split URL.

    Args:
        base: the connection URL.
        params: query parameters; those not about intents are ignored.

    Returns:
        The settings.

    Raises:
        ConfigError: a parameter is invalid.
    """
    kwargs: dict[str, Any] = {"url": base}
    for key, attr in (("stream", "stream"), ("group", "group"), ("consumer", "consumer")):
        if key in params:
            kwargs[attr] = params[key]
    if "start" in params:
        kwargs["start_id"] = params["start"]
    for key, attr in (
        ("batch", "batch_size"),
        ("block_ms", "block_ms"),
        ("claim_idle_ms", "claim_idle_ms"),
    ):
        if key in params:
            kwargs[attr] = parse_int_param(key, params[key])
    return IntentStreamConfig(**kwargs)


def parse_int_param(name: str, value: str) -> int:
    """Return a URL parameter as an integer.

    Raises:
        ConfigError: it is not a whole number.
    """
    try:
        return int(value)
    except ValueError as exc:
        raise ConfigError(
            f"intents URL parameter {name!r} was {value!r}: must be an integer"
        ) from exc


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def entry_payload(entry_id: str, fields: Mapping[Any, Any]) -> dict[str, Any]:
    """Turn one stream entry's fields into an intent payload.

    Args:
        entry_id: the entry id, used as the default intent id and creation time.
        fields: the raw fields (bytes or text).

    Returns:
        The payload for ``parse_intent``, with ``id`` and ``created_at_ms`` filled in when
        the entry carried none.

    Raises:
        IntentError: too many fields or bytes, not UTF-8, not a JSON object, or empty.
    """
    check_entry_size(fields)
    text = decode_fields(fields)
    if not text:
        raise IntentError("<entry>", {}, "has no fields")
    payload: dict[str, Any]
    for name in PAYLOAD_FIELDS:
        if name in text:
            try:
                decoded = orjson.loads(text[name])
            except orjson.JSONDecodeError as exc:
                raise IntentError(name, _cut(text[name]), f"must be a JSON object ({exc})") from exc
            if not isinstance(decoded, dict):
                raise IntentError(name, _cut(text[name]), "must be a JSON object")
            payload = decoded
            break
    else:
        payload = {k: v for k, v in text.items() if not k.startswith("_")}
    if payload.get("id") in (None, "") and payload.get("intent_id") in (None, ""):
        payload["id"] = text.get("_origin_id") or entry_id
    if not any(payload.get(k) not in (None, "") for k in ("created_at_ms", "timestamp", "ts")):
        payload["created_at_ms"] = _entry_ms(text.get("_origin_id") or entry_id)
    return payload


def check_entry_size(fields: Mapping[Any, Any]) -> None:
    """Refuse an entry with more fields or bytes than any intent needs.

    Raises:
        IntentError: more than ``MAX_ENTRY_FIELDS`` fields or ``MAX_ENTRY_BYTES`` bytes.
    """
    count = len(fields)
    if count > MAX_ENTRY_FIELDS:
        raise IntentError("<entry>", f"{count} fields", f"must have at most {MAX_ENTRY_FIELDS}")
    size = sum(_size(k) + _size(v) for k, v in fields.items())
    if size > MAX_ENTRY_BYTES:
        raise IntentError("<entry>", f"{size} bytes", f"must have at most {MAX_ENTRY_BYTES}")


def _size(value: object) -> int:
    if isinstance(value, bytes | bytearray):
        return len(value)
    return len(str(value).encode("utf-8", errors="replace"))


def check_parsed(payload: Mapping[str, Any], intent: Intent, now_ms: int) -> None:
    """Refuse what ``parse_intent`` lets through but no daemon can act on.

    Args:
        payload: the payload the intent was parsed from.
        intent: the parsed intent.
        now_ms: this daemon's clock.

    Raises:
        IntentError: a symbol that is not ASCII (``ß`` upper-cases to ``SS``), or a creation
            time more than ``MAX_FUTURE_MS`` ahead of ``now_ms``.
    """
    raw_symbol = payload.get("symbol")
    if isinstance(raw_symbol, str) and not raw_symbol.isascii():
        raise IntentError("symbol", raw_symbol, "must be ASCII letters and digits such as BTCUSDT")
    if intent.created_at_ms > now_ms + MAX_FUTURE_MS:
        name = next((k for k in _TIME_FIELDS if payload.get(k) not in (None, "")), "created_at_ms")
        raise IntentError(
            name,
            _cut(str(payload.get(name))),
            f"must be a time (ms or s since the epoch) at most {MAX_FUTURE_MS // 3_600_000} h "
            "ahead of this daemon's clock",
        )


def decode_fields(fields: Mapping[Any, Any]) -> dict[str, str]:
    """Decode an entry's field names and values as UTF-8.

    Raises:
        IntentError: a name or value is not UTF-8.
    """
    text: dict[str, str] = {}
    for raw_key, raw_value in fields.items():
        key = _utf8("<field name>", raw_key)
        text[key] = _utf8(key, raw_value)
    return text


def _utf8(name: str, value: object) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise IntentError(name, value[:40], "must be UTF-8 text") from exc
    return str(value)


def _cut(value: str) -> str:
    return value if len(value) <= _MAX_FIELD_CHARS else value[:_MAX_FIELD_CHARS] + "..."


def _entry_ms(entry_id: str) -> int:
    head = entry_id.split("-", 1)[0]
    return int(head) if head.isdigit() else int(time.time() * 1000)


def _id_text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entries(reply: object) -> list[tuple[str, list[tuple[str, Mapping[Any, Any] | None]]]]:
    # XREADGROUP answers a list of [stream, entries] under RESP2 and a dict under RESP3.
    if not reply:
        return []
    pairs: Any = reply.items() if isinstance(reply, dict) else reply
    out: list[tuple[str, list[tuple[str, Mapping[Any, Any] | None]]]] = []
    for stream, entries in pairs:
        if isinstance(entries, list) and len(entries) == 1 and isinstance(entries[0], list):
            entries = entries[0]
        out.append((_id_text(stream), [(_id_text(i), f) for i, f in entries]))
    return out


@dataclass(slots=True)
class IntentSourceStats:
    """Counters of one RedisIntentSource."""

    read: int = 0
    decided: int = 0
    rejected: int = 0
    forwarded: int = 0
    deferred: int = 0
    reclaimed: int = 0
    decide_failures: int = 0
    redis_errors: int = 0


class RedisIntentSource:
    """Read intents from a Redis stream group, decide them, then acknowledge them.

    Args:
        redis: a ``redis.asyncio`` client (``decode_responses`` off: entries stay bytes until
            decoded here, so a non-UTF-8 entry is rejected alone).
        config: the stream settings.
        decide: awaited with each intent; returns after the decision is stored. A result with
            ``accepted`` and ``reason`` attributes (``DecisionLike``) is published as-is;
            otherwise its truthiness is the verdict.
        on_reject: awaited with each rejected entry (record it), before it is acknowledged.
        events: where ``decision`` and ``rejection`` events go.
        router: the lease manager when several daemons share the account.
        symbol_check: says why a symbol cannot be traded (not in the exchangeInfo), or None;
            such an entry is rejected before any lease or exchange call. Settable later
            (``source.symbol_check``): the daemon's rules load after the source is built.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        config: IntentStreamConfig,
        *,
        decide: Decide,
        on_reject: OnReject | None = None,
        events: EventPublisher | None = None,
        router: LeaseManager | None = None,
        symbol_check: SymbolCheck | None = None,
    ) -> None:
        self._redis = redis
        self.config = config
        self._decide = decide
        self._on_reject = on_reject
        self._events = events
        self._router = router
        self.symbol_check = symbol_check
        self._inbox = router.keys.inbox(router.daemon_id) if router is not None else None
        self._forward_script = redis.register_script(_FORWARD)
        self._drop_inbox_script = redis.register_script(_DROP_INBOX)
        self._failures: dict[tuple[str, str], int] = {}
        self._stopping = asyncio.Event()
        self._rescan = True
        self._rescan_at = 0.0
        self._next_claim = 0.0
        self._groups_ready = False
        self.ready = asyncio.Event()
        self.stats = IntentSourceStats()

    def stop(self) -> None:
        """Stop reading; the entry being decided is finished and acknowledged first."""
        self._stopping.set()

    async def run(self) -> None:
        """Process own pending entries, then new ones, reclaiming dead consumers', until stopped."""
        backoff = Backoff(base_ms=50, cap_ms=2_000)
        logger.info(
            "Intent source started stream=%s group=%s consumer=%s",
            self.config.stream,
            self.config.group,
            self.config.consumer,
        )
        while not self._stopping.is_set():
            try:
                await self._step()
            except REDIS_DOWN_ERRORS as exc:
                self.stats.redis_errors += 1
                if backoff.attempt == 0:
                    logger.warning(
                        "Intent stream unreachable stream=%s error=%s", self.config.stream, exc
                    )
                self._rescan = True
                await self._sleep(backoff.next_delay_s())
                continue
            except ResponseError as exc:
                if not _stream_gone(exc):
                    raise
                # The stream or group vanished (Redis restarted without persistence, or a
                # peer's clean-up deleted this daemon's inbox while it was blocked reading
                # it): create it again and carry on.
                logger.warning("Intent group missing, creating it again error=%s", exc)
                self._groups_ready = False
                self._rescan = True
                continue
            if backoff.attempt:
                logger.info("Intent stream reachable again stream=%s", self.config.stream)
            backoff.reset()
        logger.info("Intent source stopped stats=%s", self.stats)

    # ------------------------------------------------------------------ one step

    async def _step(self) -> None:
        if not self._groups_ready:
            await self._create_groups()
        now = time.monotonic()
        if self._rescan and now >= self._rescan_at:
            self._rescan = False
            await self._drain_own_pending()
            return
        if now >= self._next_claim:
            self._next_claim = now + self.config.claim_interval_ms / 1e3
            await self._reclaim()
        block_ms = self.config.block_ms
        if self._rescan:
            block_ms = max(1, min(block_ms, int((self._rescan_at - now) * 1000) + 1))
        streams = {self.config.stream: ">"}
        if self._inbox is not None:
            streams[self._inbox] = ">"
        reply = await self._read(streams, block_ms)
        for stream, entries in _entries(reply):
            for entry_id, fields in entries:
                if self._stopping.is_set():
                    return
                await self._handle(stream, entry_id, fields)

    async def _read(self, streams: dict[str, str], block_ms: int | None) -> object:
        # Not raced against stop() and cancelled: redis-py can swallow a cancellation that
        # lands mid-command (redis/redis-py#2028, #2551), so a stop waits out one block_ms.
        return await self._redis.xreadgroup(
            self.config.group,
            self.config.consumer,
            streams,  # type: ignore[arg-type]  # redis-py types the id map invariantly
            count=self.config.batch_size,
            block=block_ms,
        )

    async def _create_groups(self) -> None:
        targets = [(self.config.stream, self.config.start_id)]
        if self._inbox is not None:
            targets.append((self._inbox, "0"))
        for stream, start in targets:
            try:
                await self._redis.xgroup_create(stream, self.config.group, id=start, mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._groups_ready = True
        self.ready.set()

    async def _drain_own_pending(self) -> None:
        # Read this consumer's pending list from the start, each entry once per pass: the
        # deferred ones stay pending and come back on the next pass.
        streams = [self.config.stream] + ([self._inbox] if self._inbox else [])
        for stream in streams:
            cursor = "0"
            while not self._stopping.is_set():
                reply = await self._redis.xreadgroup(
                    self.config.group,
                    self.config.consumer,
                    {stream: cursor},
                    count=self.config.batch_size,
                )
                batch = [e for _, entries in _entries(reply) for e in entries]
                if not batch:
                    break
                for entry_id, fields in batch:
                    if self._stopping.is_set():
                        return
                    await self._handle(stream, entry_id, fields)
                cursor = batch[-1][0]

    async def _reclaim(self) -> None:
        claimed = await self._autoclaim(self.config.stream, self.config.claim_idle_ms)
        for entry_id, fields in claimed:
            if self._stopping.is_set():
                return
            await self._handle(self.config.stream, entry_id, fields)
        if self._router is not None:
            await self._drain_dead_inboxes(self._router)

    async def _autoclaim(
        self, stream: str, min_idle_ms: int
    ) -> list[tuple[str, Mapping[Any, Any] | None]]:
        out: list[tuple[str, Mapping[Any, Any] | None]] = []
        cursor: str = "0-0"
        for _ in range(100):  # bounded per pass; the rest waits for the next one
            reply = await self._redis.xautoclaim(
                stream,
                self.config.group,
                self.config.consumer,
                min_idle_time=min_idle_ms,
                start_id=cursor,
                count=self.config.batch_size,
            )
            cursor = _id_text(reply[0])
            entries = [(_id_text(i), f) for i, f in reply[1]]
            out.extend(entries)
            if cursor == "0-0" or len(out) >= self.config.batch_size * 4:
                break
        if out:
            self.stats.reclaimed += len(out)
            logger.info(
                "Reclaimed pending intents of dead consumers stream=%s count=%d", stream, len(out)
            )
        return out

    async def _drain_dead_inboxes(self, router: LeaseManager) -> None:
        keys = router.keys
        daemons = sorted(_id_text(d) for d in await self._redis.smembers(keys.daemons))
        for daemon in daemons:
            if daemon == router.daemon_id or await self._redis.exists(keys.member(daemon)):
                continue
            inbox = keys.inbox(daemon)
            if await self._redis.exists(inbox):
                try:
                    await self._redis.xgroup_create(inbox, self.config.group, id="0")
                except ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise
                entries = await self._autoclaim(inbox, 0)
                reply = await self._redis.xreadgroup(
                    self.config.group,
                    self.config.consumer,
                    {inbox: ">"},
                    count=self.config.batch_size * 4,
                )
                entries += [e for _, batch in _entries(reply) for e in batch]
                for entry_id, fields in entries:
                    if self._stopping.is_set():
                        return
                    await self._handle(inbox, entry_id, fields)
            await self._drop_inbox_script(
                keys=[keys.member(daemon), inbox, keys.daemons], args=[daemon]
            )

    # ------------------------------------------------------------------ one entry

    async def _handle(self, stream: str, entry_id: str, fields: Mapping[Any, Any] | None) -> None:
        try:
            await self._handle_entry(stream, entry_id, fields)
        except REDIS_DOWN_ERRORS:
            raise
        except ResponseError as exc:
            if _stream_gone(exc):
                raise
            await self._entry_failed(stream, entry_id, fields, exc)
        except Exception as exc:
            await self._entry_failed(stream, entry_id, fields, exc)

    async def _entry_failed(
        self, stream: str, entry_id: str, fields: Mapping[Any, Any] | None, exc: Exception
    ) -> None:
        # Handling one entry failed outside ``decide`` (a bug, a Redis script error): retry it
        # like a failed decision, then refuse it, so no single entry stops the intake.
        key = (stream, entry_id)
        count = self._failures.get(key, 0) + 1
        self._failures[key] = count
        logger.exception(
            "Intent entry could not be handled stream=%s stream_id=%s attempt=%d",
            stream,
            entry_id,
            count,
        )
        if count < self.config.max_deliveries:
            self._schedule_rescan()
            return
        self._failures.pop(key, None)
        reason = (
            f"entry could not be handled {count} times, last error: {type(exc).__name__}: {exc}"
        )
        try:
            await self._reject(stream, entry_id, fields or {}, _cut(reason), None, None)
        except REDIS_DOWN_ERRORS:
            raise
        except Exception:
            # Even recording it failed: acknowledge it anyway, the log above has it.
            logger.exception("Intent entry dropped stream=%s stream_id=%s", stream, entry_id)
            await self._ack(stream, entry_id)

    async def _handle_entry(
        self, stream: str, entry_id: str, fields: Mapping[Any, Any] | None
    ) -> None:
        self.stats.read += 1
        if not fields:
            # Deleted from the stream while pending: nothing left to decide.
            await self._ack(stream, entry_id)
            return
        try:
            payload = entry_payload(entry_id, fields)
            intent = parse_intent(payload, source="redis", now_ms=_entry_ms(entry_id))
            check_parsed(payload, intent, int(time.time() * 1000))
        except IntentError as exc:
            symbol = _symbol_of(fields)
            await self._reject(stream, entry_id, fields, str(exc), exc.field, symbol)
            return
        except Exception as exc:
            # A payload that trips a parser bug is still just one bad entry: refuse it and go
            # on rather than stop the intake of every other intent.
            logger.exception("Intent entry unreadable stream=%s stream_id=%s", stream, entry_id)
            reason = f"entry could not be read: {type(exc).__name__}: {exc}"
            await self._reject(stream, entry_id, fields, reason, None, _symbol_of(fields))
            return
        # A failing check is retried (``_entry_failed``); a refusal is final.
        refused = self.symbol_check(intent.symbol) if self.symbol_check is not None else None
        if refused is not None:
            reason = str(IntentError("symbol", intent.symbol, refused))
            await self._reject(stream, entry_id, fields, reason, "symbol", intent.symbol)
            return

        if self._router is not None:
            for _ in range(3):
                route = await self._router.route(intent.symbol)
                if route.kind != "forward":
                    break
                if await self._forward(stream, entry_id, fields, intent.symbol, route):
                    return
            if route.kind != "mine":
                self._defer(stream, entry_id, intent, route)
                return

        try:
            decision = await self._decide(intent)
            accepted, note = _verdict(decision)
            if not accepted and note in self.config.failure_reasons:
                detail = getattr(decision, "detail", "") or note
                raise _DecideFailed(str(detail))
        except Exception as exc:
            key = (stream, entry_id)
            count = self._failures.get(key, 0) + 1
            self._failures[key] = count
            self.stats.decide_failures += 1
            logger.warning(
                "Decide failed intent_id=%s symbol=%s attempt=%d error=%s: %s",
                intent.intent_id,
                intent.symbol,
                count,
                type(exc).__name__,
                exc,
                exc_info=not isinstance(exc, _DecideFailed),
            )
            if count >= self.config.max_deliveries:
                self._failures.pop(key, None)
                what = (
                    str(exc) if isinstance(exc, _DecideFailed) else f"{type(exc).__name__}: {exc}"
                )
                reason = f"decide failed {count} times, last error: {what}"
                await self._reject(stream, entry_id, fields, reason, None, intent.symbol)
            else:
                self._schedule_rescan()
            return
        self._failures.pop((stream, entry_id), None)
        if not accepted and note in self.config.retry_reasons:
            # Refused without a decision (the daemon is stopping): leave it pending so this
            # daemon after its restart, or a peer after the claim idle time, decides it.
            self._defer(stream, entry_id, intent, Route("wait"))
            return
        await self._ack(stream, entry_id)
        self.stats.decided += 1
        if self._events is not None:
            self._events.decision(intent, accepted=accepted, reason=note, stream_id=entry_id)

    async def _forward(
        self, stream: str, entry_id: str, fields: Mapping[Any, Any], symbol: str, route: Route
    ) -> bool:
        assert self._router is not None  # noqa: S101  # only called with a router
        owner = route.owner or ""
        keys = self._router.keys
        text = decode_fields(fields)
        text.setdefault("_origin_id", entry_id)
        text.setdefault("_origin_stream", stream)
        text["_forwarded_by"] = self._router.daemon_id
        flat: list[str] = [x for pair in text.items() for x in pair]
        moved = int(
            await self._forward_script(
                keys=[keys.lease(symbol), keys.member(owner), keys.inbox(owner), stream],
                args=[
                    owner,
                    self.config.group,
                    entry_id,
                    "1" if stream != self.config.stream else "0",
                    *flat,
                ],
            )
        )
        if moved == 1:
            self.stats.forwarded += 1
            logger.debug(
                "Intent forwarded stream_id=%s symbol=%s owner=%s", entry_id, symbol, owner
            )
            return True
        return False

    def _defer(self, stream: str, entry_id: str, intent: Intent, route: Route) -> None:
        self.stats.deferred += 1
        logger.debug(
            "Intent waits for its symbol's lease stream=%s stream_id=%s symbol=%s route=%s",
            stream,
            entry_id,
            intent.symbol,
            route.kind,
        )
        self._schedule_rescan()

    def _schedule_rescan(self) -> None:
        if not self._rescan:
            self._rescan = True
            self._rescan_at = time.monotonic() + self.config.retry_ms / 1e3

    async def _reject(
        self,
        stream: str,
        entry_id: str,
        fields: Mapping[Any, Any],
        reason: str,
        field_name: str | None,
        symbol: str | None,
    ) -> None:
        # At most MAX_ENTRY_FIELDS of them, and names shown even when they are not UTF-8.
        shown = {
            _cut(_safe_text(k)): _cut(_safe_text(v))
            for k, v in list(fields.items())[:MAX_ENTRY_FIELDS]
        }
        rejection = Rejection(stream, entry_id, reason, field_name, symbol, shown)
        logger.warning("Intent rejected stream=%s stream_id=%s reason=%s", stream, entry_id, reason)
        if self._on_reject is not None:
            await self._on_reject(rejection)
        await self._ack(stream, entry_id)
        self.stats.rejected += 1
        if self._events is not None:
            self._events.rejection(
                stream=stream, stream_id=entry_id, reason=reason, field=field_name, symbol=symbol
            )

    async def _ack(self, stream: str, entry_id: str) -> None:
        if stream == self.config.stream:
            await self._redis.xack(stream, self.config.group, entry_id)
            return
        # Inbox entries are ours alone: delete them too so an empty inbox can be dropped.
        pipe = self._redis.pipeline(transaction=True)
        pipe.xack(stream, self.config.group, entry_id)
        pipe.xdel(stream, entry_id)
        await pipe.execute()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)


def _stream_gone(exc: ResponseError) -> bool:
    # NOGROUP: the stream or its group is missing; UNBLOCKED: deleted while we were blocked
    # reading it.
    text = str(exc)
    return "NOGROUP" in text or "UNBLOCKED" in text


class _DecideFailed(Exception):
    """``decide`` answered with a failure reason instead of raising."""


def _verdict(decision: object) -> tuple[bool, str | None]:
    accepted = getattr(decision, "accepted", None)
    if isinstance(accepted, bool):
        reason = getattr(decision, "reason", None)
        return accepted, None if reason is None else str(reason)
    return bool(decision), None


def _safe_text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    return str(value)


def _symbol_of(fields: Mapping[Any, Any]) -> str | None:
    try:
        text = decode_fields(fields)
        payload: Any = text
        for name in PAYLOAD_FIELDS:
            if name in text:
                payload = orjson.loads(text[name])
                break
        symbol = payload.get("symbol") if isinstance(payload, dict) else None
    except (IntentError, orjson.JSONDecodeError):
        return None
    if isinstance(symbol, str) and 2 <= len(symbol) <= 30 and symbol.isalnum():
        return symbol.upper()
    return None


def describe(config: IntentStreamConfig) -> Sequence[str]:
    """Return the settings as ``key=value`` lines for the start-up log (password redacted)."""
    return [
        f"url={_redact(config.url)}",
        f"stream={config.stream}",
        f"group={config.group}",
        f"consumer={config.consumer}",
        f"start={config.start_id}",
    ]


__all__ = [
    "DEFAULT_GROUP",
    "DEFAULT_INTENT_STREAM",
    "MAX_ENTRY_BYTES",
    "MAX_ENTRY_FIELDS",
    "MAX_FUTURE_MS",
    "PAYLOAD_FIELDS",
    "Decide",
    "DecisionLike",
    "IntentSourceStats",
    "IntentStreamConfig",
    "OnReject",
    "RedisIntentSource",
    "Rejection",
    "SymbolCheck",
    "check_entry_size",
    "check_parsed",
    "decode_fields",
    "describe",
    "entry_payload",
    "parse_intent_url",
    "split_redis_url",
]
