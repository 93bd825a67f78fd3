"""RedisBus: the intent source, the event publisher and the leases of one daemon, from one URL.

URL (``pyquant run --intents URL``): every parameter of
:mod:`pyquant.scale.redis_intents`, plus

- ``daemon``: this daemon's id (default: the consumer name), unique among live daemons; it
  is also the consumer name when ``consumer`` is not given;
- ``account``: the account namespace shared by the daemons of one account (default ``default``);
- ``events``: the events stream (default ``pyquant:events``); ``events_maxlen`` (default 100000);
- ``lease_ttl_ms``: lease lifetime (default 5000); ``leases=off`` for a single daemon that
  decides every intent without leases;
- ``max_symbol_exposure_usd``: account-wide cap on one symbol's summed entry notional (the
  account-wide position and exposure caps are the guard's ``max_open_positions`` and
  ``max_total_exposure_usd``, see ``pyquant.scale.limits``).

Lifecycle: ``run()`` registers the daemon, then runs the publisher, the lease renewal and the
intent reader in one ``asyncio.TaskGroup`` until ``stop()``. A clean stop is ordered: intake
stops (the intent being decided is finished and acknowledged), then the daemon stops its exits
(``before_release``), then the leases are released so peers adopt the symbols at once, then
the events are flushed and the connection closed. Stop it with ``stop()``, not by cancelling
its task: redis-py can swallow a cancellation that lands mid-command (redis/redis-py#2028).

Two daemons on one Redis (each with its own state directory and id)::

    pyquant run --state ./a --intents 'redis://127.0.0.1:6379/0?group=pyquant&daemon=host-a'
    pyquant run --state ./b --intents 'redis://127.0.0.1:6379/0?group=pyquant&daemon=host-b'
    redis-cli XADD quantum:stream:trade.intent '*' symbol BTCUSDT side BUY confidence 0.8
    redis-cli XREAD COUNT 10 STREAMS pyquant:events 0      # follow decisions and leases

Redis Sentinel (the daemons follow a promoted replica; see :mod:`pyquant.scale.connect` for
what fail-over keeps and what it may lose)::

    pyquant run --intents 'redis+sentinel://10.0.0.1:26379,10.0.0.2:26379,10.0.0.3:26379/0?service=main&daemon=host-a'

The first daemon to read an intent for a free symbol takes its lease and decides it; intents
for that symbol read by the other daemon are moved to the owner's inbox. Kill one and the other
owns its symbols after ``lease_ttl_ms`` plus one renewal interval.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Final, Protocol

import redis.asyncio as aioredis

from pyquant.errors import ConfigError
from pyquant.scale._backoff import Backoff
from pyquant.scale.connect import close_client, redis_client
from pyquant.scale.events import DEFAULT_EVENTS_STREAM, REDIS_DOWN_ERRORS, EventPublisher
from pyquant.scale.leases import LeaseCallback, LeaseConfig, LeaseManager, validate_name
from pyquant.scale.limits import LedgerLimits
from pyquant.scale.redis_intents import (
    INTENT_URL_PARAMS,
    Decide,
    IntentStreamConfig,
    OnReject,
    RedisIntentSource,
    Rejection,
    intent_config_from_params,
    parse_int_param,
    split_redis_url,
)
from pyquant.trading.intents import Intent

logger = logging.getLogger(__name__)

BUS_URL_PARAMS: Final = INTENT_URL_PARAMS | frozenset(
    {
        "daemon",
        "account",
        "events",
        "events_maxlen",
        "lease_ttl_ms",
        "leases",
        "max_symbol_exposure_usd",
    }
)


@dataclass(frozen=True, slots=True)
class RedisBusConfig:
    """Settings of the whole Redis side of one daemon.

    Attributes:
        intents: the intent stream settings (its ``url`` is the connection URL).
        daemon_id: this daemon's id.
        account: the account namespace.
        events_stream: the events stream key.
        events_maxlen: approximate cap of the events stream.
        lease_ttl_ms: lease lifetime; None disables leases (one daemon decides everything).
        socket_timeout_s: how long one Redis call may take before it counts as an outage.
        max_symbol_exposure_usd: account-wide cap on one symbol's entry notional, or None.
    """

    intents: IntentStreamConfig
    daemon_id: str
    account: str = "default"
    events_stream: str = DEFAULT_EVENTS_STREAM
    events_maxlen: int = 100_000
    lease_ttl_ms: int | None = 5_000
    socket_timeout_s: float = 5.0
    max_symbol_exposure_usd: Decimal | None = None

    def __post_init__(self) -> None:
        validate_name("redis.daemon", self.daemon_id)
        validate_name("redis.account", self.account)
        if not self.events_stream or any(c.isspace() for c in self.events_stream):
            raise ConfigError(
                f"redis.events was {self.events_stream!r}: must be a key without spaces"
            )
        if self.events_maxlen < 1:
            raise ConfigError(f"redis.events_maxlen was {self.events_maxlen}: must be at least 1")
        if self.lease_ttl_ms is not None:
            LeaseConfig(daemon_id=self.daemon_id, account=self.account, ttl_ms=self.lease_ttl_ms)
        LedgerLimits(max_symbol_exposure_usd=self.max_symbol_exposure_usd)

    @classmethod
    def from_url(cls, url: str) -> RedisBusConfig:
        """Build the settings from ``redis://host:port/db?stream=..&group=..&...``.

        Raises:
            ConfigError: the URL or a parameter is invalid; the message names it.
        """
        base, params = split_redis_url(url, BUS_URL_PARAMS)
        if "daemon" in params and "consumer" not in params:
            # Two daemons on one host must not share the host-named consumer: each one's
            # pending entries are its own to decide first after a restart.
            params = {**params, "consumer": params["daemon"]}
        intents = intent_config_from_params(base, params)
        leases = params.get("leases", "on")
        if leases not in ("on", "off"):
            raise ConfigError(f"intents URL parameter 'leases' was {leases!r}: must be on or off")
        ttl: int | None = None
        if leases == "on":
            ttl = parse_int_param("lease_ttl_ms", params.get("lease_ttl_ms", "5000"))
        return cls(
            intents=intents,
            daemon_id=params.get("daemon", intents.consumer),
            account=params.get("account", "default"),
            events_stream=params.get("events", DEFAULT_EVENTS_STREAM),
            events_maxlen=parse_int_param("events_maxlen", params.get("events_maxlen", "100000")),
            lease_ttl_ms=ttl,
            max_symbol_exposure_usd=_amount_param(params, "max_symbol_exposure_usd"),
        )


def _amount_param(params: Mapping[str, str], name: str) -> Decimal | None:
    if name not in params:
        return None
    try:
        value = Decimal(params[name])
    except InvalidOperation as exc:
        raise ConfigError(
            f"intents URL parameter {name!r} was {params[name]!r}: must be a USDT amount"
        ) from exc
    if not value.is_finite() or value < 0:
        raise ConfigError(
            f"intents URL parameter {name!r} was {params[name]!r}: must be a USDT amount >= 0"
        )
    return value


class IntentSinkLike(Protocol):
    """The daemon's intake, as ``pyquant.trading.sources.IntentSink`` describes it."""

    async def submit(self, intent: Intent, *, payload: object = None) -> object:
        """Decide one intent and store the decision."""
        ...

    def reject_malformed(self, source: str, payload: object, error: str) -> None:
        """Record a payload that is not a valid intent."""
        ...


class RedisBus:
    """One daemon's Redis side: intents in, events out, symbol leases.

    Args:
        config: the settings.
        decide: awaited per intent this daemon owns; returns after the decision is stored.
        on_reject: awaited per malformed entry (record it) before it is acknowledged.
        on_acquire: awaited when a symbol is taken (reconcile and adopt its positions).
        on_lose: awaited when a symbol was taken by another daemon (stop running it).
        redis: a client to use; by default one is made from the URL and closed on stop.
    """

    def __init__(
        self,
        config: RedisBusConfig,
        *,
        decide: Decide,
        on_reject: OnReject | None = None,
        on_acquire: LeaseCallback | None = None,
        on_lose: LeaseCallback | None = None,
        redis: aioredis.Redis | None = None,
    ) -> None:
        self.config = config
        self._own_client = redis is None
        self.redis: aioredis.Redis = redis or redis_client(
            config.intents.url,
            socket_timeout_s=config.socket_timeout_s + config.intents.block_ms / 1e3,
            connect_timeout_s=config.socket_timeout_s,
        )
        self.events = EventPublisher(
            self.redis,
            daemon_id=config.daemon_id,
            account=config.account,
            stream=config.events_stream,
            maxlen=config.events_maxlen,
        )
        self.leases: LeaseManager | None = None
        if config.lease_ttl_ms is not None:
            self.leases = LeaseManager(
                self.redis,
                LeaseConfig(
                    daemon_id=config.daemon_id, account=config.account, ttl_ms=config.lease_ttl_ms
                ),
                on_acquire=on_acquire,
                on_lose=on_lose,
                events=self.events,
            )
        self.intents = RedisIntentSource(
            self.redis,
            config.intents,
            decide=decide,
            on_reject=on_reject,
            events=self.events,
            router=self.leases,
        )
        self._stop_requested = asyncio.Event()
        self._intents_done = asyncio.Event()
        self._registered = False
        self.ready = asyncio.Event()

    @classmethod
    def for_sink(
        cls,
        config: RedisBusConfig,
        sink: IntentSinkLike,
        *,
        on_acquire: LeaseCallback | None = None,
        on_lose: LeaseCallback | None = None,
        redis: aioredis.Redis | None = None,
    ) -> RedisBus:
        """Build a bus that delivers to an intent sink (the daemon's ``Intake``).

        ``sink.submit(intent)`` decides (and stores) each intent; ``sink.reject_malformed``
        records each refused entry with its reason. An ``intake_closed`` answer leaves the
        entry pending; an ``error`` answer counts as a failed decision.

        Args:
            config: the settings.
            sink: any object with ``submit(intent, *, payload)`` and
                ``reject_malformed(source, payload, error)`` (``pyquant.trading.sources``'s
                ``IntentSink``).
            on_acquire: see ``RedisBus``.
            on_lose: see ``RedisBus``.
            redis: see ``RedisBus``.

        Returns:
            The bus; run it with ``run()``.
        """

        async def decide(intent: Intent) -> object:
            return await sink.submit(intent, payload=None)

        async def on_reject(rejection: Rejection) -> None:
            sink.reject_malformed("redis", dict(rejection.fields), rejection.reason)

        return cls(
            config,
            decide=decide,
            on_reject=on_reject,
            on_acquire=on_acquire,
            on_lose=on_lose,
            redis=redis,
        )

    def owned(self) -> frozenset[str]:
        """Return the symbols whose exits this daemon runs (all of them without leases)."""
        return self.leases.owned() if self.leases is not None else frozenset()

    async def run(self, before_release: Callable[[], Awaitable[None]] | None = None) -> None:
        """Run until ``stop()``; see the module docstring for the stop order.

        Args:
            before_release: awaited after intake stopped and before the leases are released
                (stop the exits here).
        """
        await self.register()
        self.events.publish("daemon", symbol=None, payload={"action": "started"})
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self.events.run(), name="redis-events")
                leases_task = None
                if self.leases is not None:
                    leases_task = group.create_task(self.leases.run(), name="redis-leases")
                intents_task = group.create_task(self._run_intents(), name="redis-intents")
                self.ready.set()
                await self._stop_requested.wait()
                self.intents.stop()
                await intents_task
                self.events.publish("daemon", symbol=None, payload={"action": "stopping"})
                if before_release is not None:
                    await before_release()
                if self.leases is not None and leases_task is not None:
                    await self.leases.stop()
                    await leases_task
                self.events.publish("daemon", symbol=None, payload={"action": "stopped"})
                self.events.stop()
        finally:
            if self._own_client:
                await close_client(self.redis)

    def stop(self) -> None:
        """Ask ``run`` to stop in order and return."""
        self._stop_requested.set()

    async def _run_intents(self) -> None:
        try:
            await self.intents.run()
        finally:
            self._intents_done.set()

    async def register(self) -> None:
        """Register this daemon as a live member (once), waiting while Redis is unreachable.

        ``run`` calls it; a daemon calls it earlier to claim its symbols before reconciling.

        Raises:
            ConfigError: another live process holds this daemon id.
        """
        if self.leases is None or self._registered:
            return
        backoff = Backoff(base_ms=100, cap_ms=2_000)
        while True:
            try:
                await self.leases.register()
                self._registered = True
                return
            except REDIS_DOWN_ERRORS as exc:
                if backoff.attempt == 0:
                    logger.warning("Redis unreachable at start, retrying error=%s", exc)
                await asyncio.sleep(backoff.next_delay_s())


__all__ = ["BUS_URL_PARAMS", "IntentSinkLike", "RedisBus", "RedisBusConfig"]
