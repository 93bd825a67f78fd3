"""Per-(account, symbol) ownership leases in Redis: which live daemon runs which symbol.

Keys (``P`` is ``{key_prefix}:{account}``):

- ``P:lease:{symbol}``: the owner's daemon id, set with ``SET NX PX ttl`` and renewed every
  ``ttl/3`` by a Lua compare-and-extend, so only the owner extends or releases it.
- ``P:symbols``: every symbol that must have an owner (it was leased once and not forgotten).
  Live daemons scan it each renewal interval and take over symbols whose lease lapsed, so a
  symbol of a dead daemon is owned again within TTL plus one renewal interval.
- ``P:member:{daemon_id}``: the daemon's heartbeat (``{daemon_id}:{instance nonce}``, same TTL).
  Registration waits for a previous instance's heartbeat to lapse and refuses a daemon id that
  another live process holds.
- ``P:daemons``: every daemon id that registered (its inbox may hold forwarded intents).

Ownership and the daemon:

- ``on_acquire(symbol, reason)`` runs when this process takes a symbol (``intent``,
  ``takeover``, ``want``, ``reacquired``): the daemon reconciles with the exchange and adopts the
  positions before any intent for the symbol is decided (``route`` waits for it).
- ``on_lose(symbol, reason)`` runs when another daemon holds the lease now: stop deciding
  intents and stop running exits for it (the new owner adopted them).
- Callbacks run one at a time on their own task so a slow reconcile never delays renewals.
- While Redis is unreachable, ``owned()`` keeps every symbol (their exits must keep running)
  but ``confirmed()`` turns False once the last successful renewal is older than the lease
  validity (``ttl`` minus a 10 % clock-drift margin): new intents wait. Renewal retries with
  capped, jittered backoff; on reconnect a lease still ours is extended, a lapsed one that
  nobody took is re-created (and reported as ``reacquired`` when our validity had run out, so
  the daemon reconciles again), and one taken by another daemon is lost.

Rebalancing: symbols spread over the live daemons by rendezvous hashing. After a takeover the
survivor holds everything; when a daemon joins or comes back and has been alive for two TTLs,
each owner hands the symbols that now prefer it over (``P:lease`` set to the new owner in one
compare-and-set while it is alive; the new owner's next scan finds a lease in its name and
adopts it like a takeover). The old owner's fence closes before the hand-over and its desk
hands the positions over through ``on_lose`` (nothing sent; the backstop stays until the new
owner's own is in). Symbols without a position are moved freely; at most one symbol with a
position moves per renewal interval. A symbol with no position (``has_position``) and no
intent for ``idle_release_ms`` is released and forgotten.

Fencing (``may_send``): a process cut off from Redis but not from the exchange must not send
orders once a peer may have taken its symbol. A lease can lapse in Redis no earlier than
``ttl`` after the start of the last renewal that confirmed it, so ``may_send(symbol)`` is True
only while ``now < start of the last confirmed renewal + ttl - margin``, with the margin
``10 % of ttl + 2 ms`` for clock-rate drift between the processes plus ``send_margin_ms``
(default 10 % of ttl) for an order's time in flight. The router asks it before every order for
the symbol (entries, exits, backstop moves); while it is False nothing is sent, the engine's
exits are retried, and the exchange-side backstop already in place stays. It turns True again
only when a renewal confirms the lease as ours (or the symbol is taken again after a peer
released it). Client order ids do not prevent duplicates across daemons: each carries its
journal's own tag, so two daemons exiting one leg would both be accepted; the fence is what
keeps them apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

import redis.asyncio as aioredis

from pyquant.errors import ConfigError
from pyquant.scale._backoff import Backoff
from pyquant.scale.events import REDIS_DOWN_ERRORS, EventPublisher

logger = logging.getLogger(__name__)

LeaseCallback = Callable[[str, str], Awaitable[None]]

_ID_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")

# ARGV: owner, ttl_ms, symbol. Returns {status, owner}: 1 ours and extended, 2 newly set,
# 0 held by the returned owner. SET NX PX is the acquisition; the symbol joins the set of
# symbols that must always have an owner.
_ACQUIRE: Final = """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('SADD', KEYS[2], ARGV[3])
  return {1, ARGV[1]}
end
if not current then
  redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
  redis.call('SADD', KEYS[2], ARGV[3])
  return {2, ARGV[1]}
end
return {0, current}
"""

# KEYS[1] member key, KEYS[2] daemons set, KEYS[3..] lease keys. ARGV: owner, ttl_ms, member
# token. Returns {member_ok, s3, s4, ...}: per lease 1 extended, 2 re-created (it had lapsed
# and nobody took it), 0 held by someone else. Compare-and-extend: only the owner extends.
# The id goes back into the daemons set: a peer's clean-up drops it after a heartbeat lapse.
_RENEW: Final = """
local member = redis.call('GET', KEYS[1])
local member_ok = 1
if (not member) or member == ARGV[3] then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
  redis.call('SADD', KEYS[2], ARGV[1])
else
  member_ok = 0
end
local out = {member_ok}
for i = 3, #KEYS do
  local current = redis.call('GET', KEYS[i])
  if current == ARGV[1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
    out[#out + 1] = 1
  elseif not current then
    redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
    out[#out + 1] = 2
  else
    out[#out + 1] = 0
  end
end
return out
"""

# Take a free lease on behalf of a live peer (balanced placement). KEYS: lease, symbols set,
# the peer's member key. ARGV: peer id, ttl_ms, symbol. Returns the owner after the call, or
# false when the lease is free and the peer is not alive.
_ACQUIRE_FOR: Final = """
local current = redis.call('GET', KEYS[1])
if current then return current end
if redis.call('EXISTS', KEYS[3]) == 0 then return false end
redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
return ARGV[1]
"""

# Hand a lease to a live peer. KEYS: lease, the peer's member key. ARGV: our id, peer id,
# ttl_ms. Returns 1 handed over, 0 not ours, -1 the peer is not alive (the lease stays ours).
_TRANSFER: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""

# Compare-and-delete: only the owner releases. ARGV: owner.
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# Delete the heartbeat only if it is this instance's.
_UNREGISTER: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def validate_name(field_name: str, value: str) -> str:
    """Check a daemon id, account or group name used inside Redis keys.

    Args:
        field_name: the configuration path, for the message.
        value: the name.

    Returns:
        The name, unchanged.

    Raises:
        ConfigError: empty, longer than 64 characters, or outside ``[A-Za-z0-9._-]``.
    """
    if not value or len(value) > 64 or not set(value) <= _ID_CHARS:
        raise ConfigError(f"{field_name} was {value!r}: must be 1-64 characters of [A-Za-z0-9._-]")
    return value


@dataclass(frozen=True, slots=True)
class LeaseConfig:
    """Lease settings.

    Attributes:
        daemon_id: this process's id, unique among live daemons of the account.
        account: the account namespace; daemons of one account share its symbols.
        ttl_ms: lease lifetime; a dead owner's symbols are taken over after about this long.
        renew_interval_ms: renewal and takeover-scan period; None means ``ttl_ms // 3``.
        key_prefix: first part of every key.
        max_symbols: the most symbols this process takes over from dead peers; None means no
            limit. Symbols taken for an intent or a position (``route``, ``want``) are not
            limited: an intent must never wait for a symbol nobody owns.
        balance: give a free symbol to its preferred live daemon (rendezvous hashing of the
            symbol over the live daemon ids) rather than to whichever daemon read its first
            intent, so symbols spread evenly over the daemons.
        send_margin_ms: how long before the lease's validity ends orders stop (``may_send``):
            an order's time in flight to the exchange. None means 10 % of ``ttl_ms``.
        rebalance: hand symbols to the daemon they prefer once it has been alive two TTLs.
        idle_release_ms: release a symbol without a position and without an intent for this
            long; None keeps idle symbols.
    """

    daemon_id: str
    account: str = "default"
    ttl_ms: int = 5_000
    renew_interval_ms: int | None = None
    key_prefix: str = "pyquant"
    max_symbols: int | None = None
    balance: bool = True
    send_margin_ms: int | None = None
    rebalance: bool = True
    idle_release_ms: int | None = 600_000

    def __post_init__(self) -> None:
        validate_name("lease.daemon_id", self.daemon_id)
        validate_name("lease.account", self.account)
        if not 100 <= self.ttl_ms <= 600_000:
            raise ConfigError(f"lease.ttl_ms was {self.ttl_ms}: must be from 100 to 600000")
        interval = self.renew_interval_ms
        if interval is not None and not 10 <= interval <= self.ttl_ms // 2:
            raise ConfigError(
                f"lease.renew_interval_ms was {interval}: must be from 10 to half of ttl_ms "
                f"({self.ttl_ms // 2})"
            )
        margin = self.send_margin_ms
        if margin is not None and not 0 <= margin <= self.ttl_ms // 2:
            raise ConfigError(
                f"lease.send_margin_ms was {margin}: must be from 0 to half of ttl_ms "
                f"({self.ttl_ms // 2})"
            )
        idle = self.idle_release_ms
        if idle is not None and not self.ttl_ms <= idle <= 86_400_000:
            raise ConfigError(
                f"lease.idle_release_ms was {idle}: must be from ttl_ms ({self.ttl_ms}) to 86400000"
            )
        if self.max_symbols is not None and self.max_symbols < 1:
            raise ConfigError(f"lease.max_symbols was {self.max_symbols}: must be at least 1")

    @property
    def interval_ms(self) -> int:
        """Return the renewal period in milliseconds."""
        return self.renew_interval_ms or max(10, self.ttl_ms // 3)

    @property
    def send_margin_s(self) -> float:
        """Return the in-flight margin of ``may_send`` in seconds."""
        margin = self.send_margin_ms if self.send_margin_ms is not None else self.ttl_ms // 10
        return margin / 1e3


@dataclass(frozen=True, slots=True)
class LeaseKeys:
    """The Redis key names of one account."""

    prefix: str

    @classmethod
    def of(cls, key_prefix: str, account: str) -> LeaseKeys:
        """Return the keys of ``account`` under ``key_prefix``."""
        return cls(f"{key_prefix}:{account}")

    def lease(self, symbol: str) -> str:
        """Return the lease key of a symbol."""
        return f"{self.prefix}:lease:{symbol}"

    @property
    def symbols(self) -> str:
        """Return the key of the set of symbols that must have an owner."""
        return f"{self.prefix}:symbols"

    def member(self, daemon_id: str) -> str:
        """Return a daemon's heartbeat key."""
        return f"{self.prefix}:member:{daemon_id}"

    @property
    def daemons(self) -> str:
        """Return the key of the set of registered daemon ids."""
        return f"{self.prefix}:daemons"

    def inbox(self, daemon_id: str) -> str:
        """Return the stream of intents forwarded to a daemon by its peers."""
        return f"{self.prefix}:inbox:{daemon_id}"


@dataclass(frozen=True, slots=True)
class Route:
    """Who decides an intent for a symbol.

    Attributes:
        kind: ``mine`` (decide it here), ``forward`` (``owner`` holds the lease) or ``wait``
            (ownership cannot be confirmed now: Redis unreachable or adoption pending).
        owner: the owning daemon id for ``mine`` and ``forward``.
    """

    kind: Literal["mine", "forward", "wait"]
    owner: str | None = None


@dataclass(slots=True)
class LeaseStats:
    """Counters of one LeaseManager."""

    acquired: int = 0
    lost: int = 0
    released: int = 0
    handed_over: int = 0
    idle_released: int = 0
    renew_failures: int = 0
    takeovers: int = 0


@dataclass(slots=True)
class _Held:
    valid_until: float
    adopted: asyncio.Event = field(default_factory=asyncio.Event)


class LeaseManager:
    """Acquire, renew, take over and release per-symbol leases for one daemon.

    Args:
        redis: a ``redis.asyncio`` client.
        config: the lease settings.
        on_acquire: awaited (on the callback task) after a symbol is taken: reconcile and adopt.
        on_lose: awaited after a symbol was taken by another daemon: stop running it.
        events: where ``lease`` events go, if anywhere.
        clock: a monotonic clock in seconds.
        has_position: whether the daemon has a position or an entry in flight on a symbol;
            without it no symbol is released as idle. Settable later (``has_position``).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        config: LeaseConfig,
        *,
        on_acquire: LeaseCallback | None = None,
        on_lose: LeaseCallback | None = None,
        events: EventPublisher | None = None,
        clock: Callable[[], float] = time.monotonic,
        has_position: Callable[[str], bool] | None = None,
    ) -> None:
        self._redis = redis
        self.config = config
        self.keys = LeaseKeys.of(config.key_prefix, config.account)
        self.daemon_id = config.daemon_id
        self._token = f"{config.daemon_id}:{secrets.token_hex(6)}"
        self._on_acquire = on_acquire
        self._on_lose = on_lose
        self._events = events
        self._clock = clock
        self._held: dict[str, _Held] = {}
        self._orphan_scans: dict[str, int] = {}
        self.has_position = has_position
        self._last_intent: dict[str, float] = {}
        self._first_seen: dict[str, float] = {}
        self._handing: dict[str, str] = {}
        self._callbacks: asyncio.Queue[tuple[str, str, str]] = asyncio.Queue()
        self._acquire_script = redis.register_script(_ACQUIRE)
        self._acquire_for_script = redis.register_script(_ACQUIRE_FOR)
        self._renew_script = redis.register_script(_RENEW)
        self._release_script = redis.register_script(_RELEASE)
        self._transfer_script = redis.register_script(_TRANSFER)
        self._unregister_script = redis.register_script(_UNREGISTER)
        self._stopping = asyncio.Event()
        self._released = asyncio.Event()
        self._loop_exited = asyncio.Event()
        self._loop_running = False
        self._connected = True
        self._registered = False
        self.stats = LeaseStats()

    # ------------------------------------------------------------------ queries

    def owned(self) -> frozenset[str]:
        """Return the symbols whose exits this process runs (confirmed or not)."""
        return frozenset(self._held)

    def confirmed(self, symbol: str) -> bool:
        """Return whether the lease of ``symbol`` is ours and renewed within its validity."""
        held = self._held.get(symbol)
        return held is not None and self._clock() < held.valid_until

    def may_send(self, symbol: str) -> bool:
        """Return whether an order for ``symbol`` may go to the exchange now (the fence).

        True only while the lease is ours and no peer can have taken it, counting the
        in-flight margin: see "Fencing" in the module docstring.
        """
        held = self._held.get(symbol)
        return held is not None and self._clock() < held.valid_until - self.config.send_margin_s

    def confirmed_symbols(self) -> frozenset[str]:
        """Return the owned symbols whose leases are confirmed now."""
        now = self._clock()
        return frozenset(s for s, h in self._held.items() if now < h.valid_until)

    @property
    def connected(self) -> bool:
        """Return whether the last Redis call of the renewal loop succeeded."""
        return self._connected

    async def owner_of(self, symbol: str) -> str | None:
        """Return the daemon id holding the lease of ``symbol`` in Redis, or None."""
        value = await self._redis.get(self.keys.lease(symbol))
        return _text(value) if value is not None else None

    # ------------------------------------------------------------------ lifecycle

    async def register(self, wait_ms: int | None = None) -> None:
        """Register this daemon's heartbeat; wait for a previous instance's to lapse.

        Args:
            wait_ms: how long to wait for the id to be free; None means twice the TTL.

        Raises:
            ConfigError: another live process holds this daemon id.
        """
        deadline = (
            self._clock() + (wait_ms if wait_ms is not None else 2 * self.config.ttl_ms) / 1e3
        )
        member = self.keys.member(self.daemon_id)
        while True:
            ok = await self._redis.set(member, self._token, nx=True, px=self.config.ttl_ms)
            if ok:
                break
            if self._clock() >= deadline:
                holder = await self._redis.get(member)
                raise ConfigError(
                    f"lease.daemon_id was {self.daemon_id!r}: another live process holds it "
                    f"({_text(holder) if holder is not None else 'lapsed meanwhile'}); "
                    "give every daemon of an account its own id"
                )
            await asyncio.sleep(self.config.interval_ms / 1e3)
        await self._redis.sadd(self.keys.daemons, self.daemon_id)
        self._registered = True
        logger.info(
            "Lease member registered daemon_id=%s account=%s ttl_ms=%d",
            self.daemon_id,
            self.config.account,
            self.config.ttl_ms,
        )

    async def run(self) -> None:
        """Renew leases, take over lapsed symbols and run callbacks until ``stop``.

        Registers first if ``register`` was not called.
        """
        if not self._registered:
            await self.register()
        dispatcher = asyncio.create_task(self._dispatch_callbacks(), name="lease-callbacks")
        self._loop_running = True
        try:
            try:
                await self._renew_loop()
            finally:
                self._loop_exited.set()
            # stop() is releasing the leases: return once it is done, and after the queued
            # callbacks ran.
            await self._released.wait()
            await self._callbacks.join()
        finally:
            dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dispatcher

    async def stop(self) -> None:
        """Release every lease (peers take the symbols over at once) and end ``run``.

        Symbols stay in the account's set so a peer adopts their positions. The heartbeat goes
        first, so peers count one daemon less and take every released symbol in one scan.
        ``run`` returns only after the releases are done. Redis errors are logged: the leases
        then lapse after the TTL.
        """
        self._stopping.set()
        if self._loop_running:
            # A renewal in flight would write the heartbeat and leases back after we delete them.
            await self._loop_exited.wait()
        try:
            with contextlib.suppress(*REDIS_DOWN_ERRORS):
                await self._unregister_script(
                    keys=[self.keys.member(self.daemon_id)], args=[self._token]
                )
            for symbol in sorted(self._held):
                try:
                    await self.release(symbol, reason="stop")
                except REDIS_DOWN_ERRORS as exc:
                    logger.warning("Lease not released, it lapses symbol=%s error=%s", symbol, exc)
        finally:
            self._released.set()

    # ------------------------------------------------------------------ acquire / release

    async def acquire(self, symbol: str, *, reason: str = "want") -> str:
        """Take the lease of ``symbol`` if it is free (or already ours).

        Args:
            symbol: the exchange symbol.
            reason: passed to ``on_acquire`` when the lease is new to this process.

        Returns:
            The owner after the call (this daemon's id when it holds it).

        Raises:
            redis.exceptions.ConnectionError: Redis is unreachable.
        """
        if symbol in self._handing:
            return self._handing[symbol]  # being handed to this peer right now
        started = self._clock()
        result = await self._acquire_script(
            keys=[self.keys.lease(symbol), self.keys.symbols],
            args=[self.daemon_id, self.config.ttl_ms, symbol],
        )
        status, owner = int(result[0]), _text(result[1])
        if status == 0:
            if symbol in self._held:
                self._lost(symbol, owner, "taken")
            return owner
        valid_until = self._validity_from(started)
        held = self._held.get(symbol)
        if held is None:
            self._held[symbol] = _Held(valid_until)
            self._orphan_scans.pop(symbol, None)
            self.stats.acquired += 1
            logger.info("Lease acquired symbol=%s owner=%s reason=%s", symbol, owner, reason)
            self._emit(symbol, "acquired", reason)
            self._callbacks.put_nowait(("acquire", symbol, reason))
        else:
            held.valid_until = max(held.valid_until, valid_until)
        return owner

    async def want(self, symbol: str) -> bool:
        """Ask for ``symbol`` (a position exists here): acquire it now if free.

        Returns:
            Whether this process holds the lease.
        """
        return await self.acquire(symbol, reason="want") == self.daemon_id

    async def release(self, symbol: str, *, forget: bool = False, reason: str = "release") -> bool:
        """Give the lease of ``symbol`` up; only the owner's release deletes it.

        Args:
            symbol: the exchange symbol.
            forget: also drop it from the account's symbols (no position left to adopt).
            reason: for the log and the event.

        Returns:
            Whether the lease was ours and is now deleted.
        """
        held = self._held.pop(symbol, None)
        deleted = await self._release_script(keys=[self.keys.lease(symbol)], args=[self.daemon_id])
        if forget:
            await self._redis.srem(self.keys.symbols, symbol)
        if held is not None:
            self.stats.released += 1
            logger.info(
                "Lease released symbol=%s owner=%s reason=%s", symbol, self.daemon_id, reason
            )
            self._emit(symbol, "released", reason)
        return bool(deleted)

    async def route(self, symbol: str, *, adopt_timeout_s: float = 30.0) -> Route:
        """Say who decides an intent for ``symbol``, taking the lease when it is free.

        A newly taken symbol is ``mine`` only after ``on_acquire`` (the adoption) has finished.

        Args:
            symbol: the intent's symbol.
            adopt_timeout_s: how long to wait for a running adoption before answering ``wait``.

        Returns:
            The route.
        """
        self._last_intent[symbol] = self._clock()
        if symbol in self._handing:
            return Route("wait")
        held = self._held.get(symbol)
        if held is None:
            try:
                owner = await self._place(symbol)
            except REDIS_DOWN_ERRORS:
                return Route("wait")
            if owner != self.daemon_id:
                return Route("forward", owner)
            held = self._held.get(symbol)
            if held is None:
                return Route("wait")
        if not held.adopted.is_set():
            try:
                await asyncio.wait_for(held.adopted.wait(), adopt_timeout_s)
            except TimeoutError:
                return Route("wait")
        return Route("mine", self.daemon_id) if self.confirmed(symbol) else Route("wait")

    async def preferred_owner(self, symbol: str) -> str:
        """Return the live daemon a free ``symbol`` goes to (rendezvous hashing)."""
        daemons = sorted({_text(d) for d in await self._redis.smembers(self.keys.daemons)})
        alive = await self._redis.mget([self.keys.member(d) for d in daemons]) if daemons else []
        live = [d for d, a in zip(daemons, alive, strict=True) if a is not None]
        if self.daemon_id not in live:
            live.append(self.daemon_id)
        return _rendezvous(live, symbol)

    async def _place(self, symbol: str) -> str:
        # A free symbol goes to its preferred live daemon; the intent is then forwarded there
        # and that daemon adopts the lease when it reads it. Falls back to this daemon when
        # the preferred one is gone.
        if self.config.balance:
            preferred = await self.preferred_owner(symbol)
            if preferred != self.daemon_id:
                owner = await self._acquire_for_script(
                    keys=[self.keys.lease(symbol), self.keys.symbols, self.keys.member(preferred)],
                    args=[preferred, self.config.ttl_ms, symbol],
                )
                if owner is not None and _text(owner) != self.daemon_id:
                    return _text(owner)
        return await self.acquire(symbol, reason="intent")

    # ------------------------------------------------------------------ internals

    def _validity_from(self, started: float) -> float:
        # The lease may have been set at any time after `started`; count its life from there,
        # minus a drift margin, as Redlock does.
        ttl_s = self.config.ttl_ms / 1e3
        return started + ttl_s - ttl_s * 0.1 - 0.002

    def _at_capacity(self) -> bool:
        limit = self.config.max_symbols
        return limit is not None and len(self._held) >= limit

    def _emit(self, symbol: str, action: str, reason: str, owner: str | None = None) -> None:
        if self._events is not None:
            self._events.lease(symbol, action=action, owner=owner or self.daemon_id, reason=reason)

    def _lost(self, symbol: str, owner: str, reason: str) -> None:
        if self._held.pop(symbol, None) is None:
            return
        self.stats.lost += 1
        logger.warning("Lease lost symbol=%s new_owner=%s reason=%s", symbol, owner, reason)
        self._emit(symbol, "lost", reason, owner)
        self._callbacks.put_nowait(("lose", symbol, reason))

    async def _renew_loop(self) -> None:
        backoff = Backoff(base_ms=50, cap_ms=max(100, min(2_000, self.config.interval_ms)))
        interval_s = self.config.interval_ms / 1e3
        while not self._stopping.is_set():
            try:
                await self._renew_once()
                await self._scan_orphans()
                await self._rebalance()
            except REDIS_DOWN_ERRORS as exc:
                self.stats.renew_failures += 1
                if self._connected:
                    self._connected = False
                    logger.warning(
                        "Lease renewal failed, owned symbols kept unconfirmed owned=%d error=%s",
                        len(self._held),
                        exc,
                    )
                    for symbol in sorted(self._held):
                        self._emit(symbol, "unconfirmed", "redis unreachable")
                delay = backoff.next_delay_s()
            else:
                if not self._connected:
                    self._connected = True
                    logger.info("Lease renewal recovered owned=%d", len(self._held))
                    for symbol in sorted(self._held):
                        self._emit(symbol, "confirmed", "redis reachable")
                backoff.reset()
                delay = interval_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def _renew_once(self) -> None:
        symbols = sorted(self._held)
        started = self._clock()
        result = await self._renew_script(
            keys=[
                self.keys.member(self.daemon_id),
                self.keys.daemons,
                *(self.keys.lease(s) for s in symbols),
            ],
            args=[self.daemon_id, self.config.ttl_ms, self._token],
        )
        if int(result[0]) == 0:
            logger.error(
                "Another process registered daemon_id=%s; leases are still renewed by id",
                self.daemon_id,
            )
        valid_until = self._validity_from(started)
        taken: list[str] = []
        for symbol, status in zip(symbols, result[1:], strict=True):
            held = self._held.get(symbol)
            if held is None:  # released while the script ran
                continue
            code = int(status)
            if code == 1:
                held.valid_until = valid_until
            elif code == 2:
                if started >= held.valid_until:
                    # Our validity ran out before we got it back: a peer may have run the
                    # symbol meanwhile, so the daemon reconciles again.
                    logger.warning("Lease re-created after lapse symbol=%s", symbol)
                    self._emit(symbol, "acquired", "reacquired")
                    held.adopted.clear()
                    self._callbacks.put_nowait(("acquire", symbol, "reacquired"))
                held.valid_until = valid_until
            else:
                taken.append(symbol)
        for symbol in taken:
            owner = await self.owner_of(symbol)
            self._lost(symbol, owner or "<none>", "taken")

    async def _scan_orphans(self) -> None:
        if self._stopping.is_set():
            return
        wanted = await self._redis.smembers(self.keys.symbols)
        candidates = sorted(_text(s) for s in wanted if _text(s) not in self._held)
        if not candidates:
            self._orphan_scans.clear()
            return
        owners = await self._redis.mget([self.keys.lease(s) for s in candidates])
        for symbol, owner in zip(candidates, owners, strict=True):
            # Handed to us by a peer (rebalancing) or placed here for an intent: adopt it.
            if owner is not None and _text(owner) == self.daemon_id:
                if self._stopping.is_set():
                    return
                await self.acquire(symbol, reason="handed")
        free = [s for s, owner in zip(candidates, owners, strict=True) if owner is None]
        self._orphan_scans = {s: self._orphan_scans.get(s, 0) + 1 for s in free}
        if not free:
            return
        share = await self._fair_share(len(wanted))
        for symbol in free:
            if self._stopping.is_set() or self._at_capacity():
                return
            # Take up to a fair share at once; a symbol still orphaned on the next scan is
            # taken regardless, so an overloaded peer set never leaves a position unowned.
            if len(self._held) >= share and self._orphan_scans.get(symbol, 0) < 2:
                continue
            owner = await self.acquire(symbol, reason="takeover")
            if owner == self.daemon_id:
                self.stats.takeovers += 1

    async def _live_daemons(self) -> list[str]:
        daemons = sorted(_text(d) for d in await self._redis.smembers(self.keys.daemons))
        alive = await self._redis.mget([self.keys.member(d) for d in daemons]) if daemons else []
        return [d for d, a in zip(daemons, alive, strict=True) if a is not None]

    async def _rebalance(self) -> None:
        if self._stopping.is_set() or not self._held:
            return
        now = self._clock()
        await self._release_idle(now)
        if not self.config.rebalance or not self._held:
            return
        live = await self._live_daemons()
        settle_s = 2 * self.config.ttl_ms / 1e3
        self._first_seen = {d: self._first_seen.get(d, now) for d in live}
        settled = {d for d in live if now - self._first_seen[d] >= settle_s}
        settled.add(self.daemon_id)
        if len(settled) < 2:
            return
        moved_with_position = False
        for symbol in sorted(self._held):
            if self._stopping.is_set():
                return
            preferred = _rendezvous(settled, symbol)
            if preferred == self.daemon_id:
                continue
            busy = self.has_position is None or self.has_position(symbol)
            if busy and moved_with_position:
                continue  # one position hand-over per interval
            if await self._hand_over(symbol, preferred):
                moved_with_position = moved_with_position or busy

    async def _release_idle(self, now: float) -> None:
        limit = self.config.idle_release_ms
        if limit is None or self.has_position is None:
            return
        for symbol in sorted(self._held):
            last = self._last_intent.setdefault(symbol, now)
            if now - last < limit / 1e3 or self.has_position(symbol):
                continue
            held = self._held.get(symbol)
            if held is None or not held.adopted.is_set():
                continue
            await self.release(symbol, forget=True, reason="idle")
            self._last_intent.pop(symbol, None)
            self.stats.idle_released += 1

    async def _hand_over(self, symbol: str, peer: str) -> bool:
        held = self._held.get(symbol)
        if held is None or not held.adopted.is_set():
            return False  # still being adopted here: move it on a later pass
        # The fence closes first: from here on this process sends nothing for the symbol,
        # and no intent or adoption takes it back while the hand-over runs.
        self._held.pop(symbol, None)
        self._handing[symbol] = peer
        try:
            result = int(
                await self._transfer_script(
                    keys=[self.keys.lease(symbol), self.keys.member(peer)],
                    args=[self.daemon_id, peer, self.config.ttl_ms],
                )
            )
        finally:
            self._handing.pop(symbol, None)
        if result != 1:
            # Not handed over (the peer went away, or the lease is not ours): the next scan
            # adopts it again if it is still ours.
            logger.info(
                "Lease hand-over not done symbol=%s peer=%s result=%d", symbol, peer, result
            )
            self._held[symbol] = held
            return False
        self.stats.handed_over += 1
        logger.info("Lease handed over symbol=%s new_owner=%s reason=rebalance", symbol, peer)
        self._emit(symbol, "lost", "rebalance", peer)
        self._callbacks.put_nowait(("lose", symbol, "rebalance"))
        return True

    async def _fair_share(self, total: int) -> int:
        daemons = sorted(_text(d) for d in await self._redis.smembers(self.keys.daemons))
        if not daemons:
            return total
        alive = await self._redis.mget([self.keys.member(d) for d in daemons])
        live = max(1, sum(1 for a in alive if a is not None))
        return math.ceil(total / live)

    async def _dispatch_callbacks(self) -> None:
        while True:
            kind, symbol, reason = await self._callbacks.get()
            try:
                if kind == "acquire":
                    await self._run_acquire(symbol, reason)
                elif self._on_lose is not None:
                    await self._on_lose(symbol, reason)
            except Exception:
                logger.exception("Lease callback failed kind=%s symbol=%s", kind, symbol)
            finally:
                self._callbacks.task_done()

    async def _run_acquire(self, symbol: str, reason: str) -> None:
        held = self._held.get(symbol)
        if held is None:  # lost again before adoption started
            return
        try:
            if self._on_acquire is not None:
                await self._on_acquire(symbol, reason)
        finally:
            # Even a failed adoption unblocks intents: the daemon's guard refuses entries on
            # a symbol it could not reconcile, and the failure is logged above.
            held.adopted.set()

    def symbols_snapshot(self) -> Iterable[tuple[str, bool]]:
        """Return ``(symbol, confirmed)`` for every owned symbol, sorted."""
        now = self._clock()
        return [(s, now < h.valid_until) for s, h in sorted(self._held.items())]


def _rendezvous(daemons: Iterable[str], symbol: str) -> str:
    # Highest random weight: each symbol's order of preference over the daemons is fixed, so
    # a daemon joining or leaving moves only the symbols that prefer it.
    return max(daemons, key=lambda d: hashlib.blake2b(f"{d}|{symbol}".encode()).digest())


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


__all__ = [
    "LeaseCallback",
    "LeaseConfig",
    "LeaseKeys",
    "LeaseManager",
    "LeaseStats",
    "Route",
    "validate_name",
]
