"""Account-wide entry limits shared by every daemon of one account, kept in one Redis hash.

Each daemon's guard enforces its limits on its own journal; with several daemons on one
account that lets the account hold N times the limit. This ledger counts every leg of the
account in Redis and reserves a new entry atomically (one Lua script), so the limits hold
whatever the number of daemons and however their intents interleave.

Key ``{prefix}:{account}:ledger`` (hash). Field ``SYMBOL|LEG`` (``LEG`` is LONG or SHORT in
hedge mode, BOTH in one-way mode), value ``position_id|daemon_id|notional`` with the notional
in whole micro-USDT (rounded up, so sums are exact integers in Lua). One field per leg with an
entry in flight or a position open, on any daemon.

- ``reserve``: the leg must be free (or already this position's: a retry is idempotent), the
  legs in use below ``max_positions``, the summed notional plus this one within
  ``max_exposure_usd``, the symbol's within ``max_symbol_exposure_usd``. Refusals name the
  limit and the numbers.
- ``release``: compare-and-delete on the position id, after a refused or failed entry and when
  the position closes.
- ``settle``: the entry filled; its notional becomes the filled one.
- ``sync``: make the fields of the symbols this daemon owns match its journal (itself
  reconciled with the exchange): open positions are written, fields of positions that are
  gone are deleted, entries in flight are kept. Run at start, after each takeover and every
  second, it also rebuilds the ledger after Redis lost it (restart without persistence).

Only the owner of a symbol (``pyquant.scale.leases``) writes its fields, so a sync never
deletes a peer's reservation. Fields of a dead daemon's symbols stay until the symbol is taken
over and synced: they count against the limits meanwhile (a refusal, never an excess).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from typing import Final

import redis.asyncio as aioredis

from pyquant.errors import ConfigError

_MICRO: Final = Decimal(1_000_000)

# KEYS[1] ledger. ARGV: field, position id, daemon id, notional, max positions (-1: none),
# max exposure (-1), max symbol exposure (-1), symbol prefix ("SYMBOL|").
# Returns {1, ""} reserved, or {0, reason, number, number}.
_RESERVE: Final = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  local owner = string.match(current, '^([^|]*)|')
  if owner == ARGV[2] then return {1, ''} end
  return {0, 'leg_in_use', current, ''}
end
local values = redis.call('HGETALL', KEYS[1])
local count, total, symbol_total = 0, 0, 0
for i = 1, #values, 2 do
  count = count + 1
  local notional = tonumber(string.match(values[i + 1], '|([^|]*)$')) or 0
  total = total + notional
  if string.sub(values[i], 1, #ARGV[8]) == ARGV[8] then
    symbol_total = symbol_total + notional
  end
end
local notional = tonumber(ARGV[4])
local max_positions = tonumber(ARGV[5])
if max_positions >= 0 and count >= max_positions then
  return {0, 'max_positions', tostring(count), ARGV[5]}
end
local max_exposure = tonumber(ARGV[6])
if max_exposure >= 0 and total + notional > max_exposure then
  return {0, 'max_exposure', string.format('%.0f', total), ARGV[6]}
end
local max_symbol = tonumber(ARGV[7])
if max_symbol >= 0 and symbol_total + notional > max_symbol then
  return {0, 'max_symbol_exposure', string.format('%.0f', symbol_total), ARGV[7]}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '|' .. ARGV[3] .. '|' .. ARGV[4])
return {1, ''}
"""

# KEYS[1] ledger. ARGV: field, position id. Deletes the field if it is this position's.
_RELEASE: Final = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and string.match(current, '^([^|]*)|') == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""

# KEYS[1] ledger. ARGV: field, position id, new value. Rewrites the field if it is this
# position's.
_SETTLE: Final = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and string.match(current, '^([^|]*)|') == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0
"""

# KEYS[1] ledger. ARGV[1] number of scope symbols n, ARGV[2..n+1] "SYMBOL|" prefixes, then
# ARGV[n+2] number of kept position ids k, the ids, then field/value pairs to write.
# Deletes the scope's fields whose position id is neither kept nor written, writes the pairs.
_SYNC: Final = """
local n = tonumber(ARGV[1])
local scope = {}
for i = 2, n + 1 do scope[ARGV[i]] = true end
local k = tonumber(ARGV[n + 2])
local keep = {}
for i = n + 3, n + 2 + k do keep[ARGV[i]] = true end
local writes = {}
for i = n + 3 + k, #ARGV, 2 do writes[ARGV[i]] = ARGV[i + 1] end
local fields = redis.call('HKEYS', KEYS[1])
local deleted = 0
for _, field in ipairs(fields) do
  local prefix = string.match(field, '^([^|]*|)')
  if prefix and scope[prefix] and not writes[field] then
    local value = redis.call('HGET', KEYS[1], field)
    local owner = value and string.match(value, '^([^|]*)|')
    if not (owner and keep[owner]) then
      redis.call('HDEL', KEYS[1], field)
      deleted = deleted + 1
    end
  end
end
for field, value in pairs(writes) do redis.call('HSET', KEYS[1], field, value) end
return deleted
"""


def micro_usdt(amount: Decimal) -> int:
    """Return a USDT amount in whole micro-USDT, rounded up (limits err on the safe side)."""
    return int((abs(amount) * _MICRO).to_integral_value(rounding=ROUND_CEILING))


def leg_field(symbol: str, leg: str) -> str:
    """Return the ledger field of a leg (``LEG`` is BOTH in one-way mode)."""
    return f"{symbol}|{leg}"


@dataclass(frozen=True, slots=True)
class LedgerLimits:
    """The account's limits; None means no limit of that kind.

    Attributes:
        max_positions: legs with a position open or an entry in flight, account-wide.
        max_exposure_usd: summed entry notional of those legs, account-wide.
        max_symbol_exposure_usd: summed notional of one symbol's legs.
    """

    max_positions: int | None = None
    max_exposure_usd: Decimal | None = None
    max_symbol_exposure_usd: Decimal | None = None

    def __post_init__(self) -> None:
        if self.max_positions is not None and self.max_positions < 0:
            raise ConfigError(f"limits.max_positions was {self.max_positions}: must be >= 0")
        for name, value in (
            ("max_exposure_usd", self.max_exposure_usd),
            ("max_symbol_exposure_usd", self.max_symbol_exposure_usd),
        ):
            if value is not None and (not value.is_finite() or value < 0):
                raise ConfigError(f"limits.{name} was {value}: must be a non-negative amount")


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why the ledger refused an entry.

    Attributes:
        reason: ``leg_in_use``, ``max_positions``, ``max_exposure`` or
            ``max_symbol_exposure``.
        detail: the numbers, for the record.
    """

    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One field of the ledger as read back."""

    field: str
    position_id: str
    daemon_id: str
    notional_micro: int


class AccountLedger:
    """Reserve, settle, release and sync the account's legs; see the module docstring.

    Args:
        redis: a ``redis.asyncio`` client.
        key: the ledger hash (``{prefix}:{account}:ledger``).
        daemon_id: this daemon's id, written into its fields.
        limits: the account's limits.
    """

    def __init__(
        self, redis: aioredis.Redis, key: str, daemon_id: str, limits: LedgerLimits
    ) -> None:
        self._redis = redis
        self.key = key
        self.daemon_id = daemon_id
        self.limits = limits
        self._reserve = redis.register_script(_RESERVE)
        self._release = redis.register_script(_RELEASE)
        self._settle = redis.register_script(_SETTLE)
        self._sync = redis.register_script(_SYNC)

    def _value(self, position_id: str, notional: Decimal) -> str:
        return f"{position_id}|{self.daemon_id}|{micro_usdt(notional)}"

    async def reserve(
        self, symbol: str, leg: str, position_id: str, notional: Decimal
    ) -> Refusal | None:
        """Reserve the leg for a new entry, within the account's limits.

        Returns:
            None when reserved (or already reserved for this position), else the refusal.

        Raises:
            redis.exceptions.ConnectionError: Redis is unreachable (the caller refuses).
        """
        limits = self.limits
        result = await self._reserve(
            keys=[self.key],
            args=[
                leg_field(symbol, leg),
                position_id,
                self.daemon_id,
                micro_usdt(notional),
                -1 if limits.max_positions is None else limits.max_positions,
                -1 if limits.max_exposure_usd is None else micro_usdt(limits.max_exposure_usd),
                -1
                if limits.max_symbol_exposure_usd is None
                else micro_usdt(limits.max_symbol_exposure_usd),
                f"{symbol}|",
            ],
        )
        if int(result[0]) == 1:
            return None
        reason = _text(result[1])
        first, second = _text(result[2]), _text(result[3])
        if reason == "leg_in_use":
            held = first.split("|")
            return Refusal(
                reason,
                f"{symbol} {leg} is held by position {held[0]} of daemon {held[1]}",
            )
        if reason == "max_positions":
            return Refusal(reason, f"account-wide {first} of {second} legs in use")
        scope = "account-wide" if reason == "max_exposure" else f"{symbol}"
        return Refusal(
            reason,
            f"{scope} exposure {_usdt(int(first))} + {notional} > {_usdt(int(second))} USDT",
        )

    async def release(self, symbol: str, leg: str, position_id: str) -> bool:
        """Free the leg if this position holds it; return whether it did."""
        deleted = await self._release(keys=[self.key], args=[leg_field(symbol, leg), position_id])
        return bool(deleted)

    async def settle(self, symbol: str, leg: str, position_id: str, notional: Decimal) -> bool:
        """Record the filled notional of the position holding the leg; False if not held."""
        done = await self._settle(
            keys=[self.key],
            args=[leg_field(symbol, leg), position_id, self._value(position_id, notional)],
        )
        return bool(done)

    async def sync(
        self,
        symbols: Iterable[str],
        open_legs: Mapping[tuple[str, str], tuple[str, Decimal]],
        keep: Iterable[str],
    ) -> int:
        """Make the ledger's fields of ``symbols`` match this daemon's journal.

        Args:
            symbols: the symbols this daemon owns (confirmed leases).
            open_legs: ``(symbol, leg) -> (position id, notional)`` of the open positions.
            keep: position ids whose fields stay (entries in flight).

        Returns:
            How many stale fields were deleted.
        """
        scope = sorted({f"{s}|" for s in symbols})
        if not scope:
            return 0
        kept = sorted(set(keep))
        writes: list[str] = []
        for (symbol, leg), (position_id, notional) in sorted(open_legs.items()):
            if f"{symbol}|" in scope:
                writes += [leg_field(symbol, leg), self._value(position_id, notional)]
        deleted = await self._sync(
            keys=[self.key], args=[len(scope), *scope, len(kept), *kept, *writes]
        )
        return int(deleted)

    async def entries(self) -> list[LedgerEntry]:
        """Return every field of the ledger, sorted by field."""
        raw = await self._redis.hgetall(self.key)
        out: list[LedgerEntry] = []
        for field, value in raw.items():
            position_id, daemon_id, notional = _text(value).split("|", 2)
            out.append(LedgerEntry(_text(field), position_id, daemon_id, int(notional)))
        return sorted(out, key=lambda e: e.field)


def _usdt(micro: int) -> str:
    return format((Decimal(micro) / _MICRO).normalize(), "f")


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


__all__ = [
    "AccountLedger",
    "LedgerEntry",
    "LedgerLimits",
    "Refusal",
    "leg_field",
    "micro_usdt",
]
