"""One daemon's membership of a group sharing an account through Redis.

``pyquant run --intents redis://...`` builds one ``Membership``. It joins the daemon's trading
desk to the Redis side (``pyquant.scale.bus.RedisBus``):

- Unknown symbols: an intent on a symbol the desk's exchangeInfo does not list is refused at
  the stream (``symbol_refusal``), before any lease, forward or exchange call.
- Fencing: the router asks ``may_send(symbol)`` before every order; a daemon cut off from
  Redis stops sending for a symbol before a peer can have taken its lease
  (``pyquant.scale.leases``, "Fencing").
- Ownership: the desk runs only the symbols whose lease this daemon holds
  (``TradingDesk.ownership``); account changes on other symbols are left to their owners.
- Start: before reconciling, the daemon asks for the lease of every symbol its journal holds
  a position on (``claim``): a symbol a peer took while this daemon was down is handed over
  (dropped here, nothing closed), the others are reconciled as usual.
- Takeover (``on_acquire``): the symbol is reconciled alone (``reconcile(symbols={s},
  takeover=True)``): the positions found on the exchange are adopted with the exit state the
  previous owner last published (best price, ladder progress, open time), the new backstop
  goes in, and the previous owner's backstop is cancelled only if ours is at least as tight.
  Until the reconciliation succeeds, intents for the symbol wait (``pending`` answers
  ``symbol_unreconciled``, a retry reason, so the stream entry stays pending).
- Loss (``on_lose``): another daemon holds the lease now; the desk hands the symbol over.
- Account-wide limits (``pyquant.scale.limits``): the guard's ``max_open_positions`` and
  ``max_total_exposure_usd`` (and the URL's ``max_symbol_exposure_usd``) hold for the whole
  account: an accepted entry reserves its leg in the Redis ledger (``entry_gate``, called by
  the desk before anything is sent) or fails with the limit's reason; the desk's notes
  release (entry failed, position closed) and settle (filled) it; ``sync_ledger`` rebuilds
  the owned symbols' fields from the journal every second and after each takeover.
- Exit state: every second the owner writes each open position's exit state to the hash
  ``{prefix}:{account}:exitstate`` (field ``SYMBOL|LEG``), the input of a peer's adoption.
- Events: the desk's notes and the router's order changes are published to the events stream
  (``pyquant.scale.events``), so other services follow the daemon without its SQLite.

Redis outages: the positions this daemon owns keep their exits (``owned()`` keeps them while
renewals fail); the exit-state writes and events wait in their retry and buffer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

import orjson

from pyquant.errors import ExchangeError, PyquantError
from pyquant.notify.documents import order_payload
from pyquant.scale.bus import IntentSinkLike, RedisBus, RedisBusConfig
from pyquant.scale.events import REDIS_DOWN_ERRORS, EventPublisher
from pyquant.scale.limits import AccountLedger, LedgerLimits
from pyquant.trading.desk import TradingDesk
from pyquant.trading.guard import GuardDecision
from pyquant.trading.intents import Intent
from pyquant.trading.journal import OrderRow

logger = logging.getLogger(__name__)

UNRECONCILED: Final = "symbol_unreconciled"

_EXIT_STATE_FIELDS: Final = (
    "quantity",
    "original_quantity",
    "entry_price",
    "best_price",
    "stop_price",
    "ladder_levels_done",
    "trailing_active",
)


def _field(view: object, name: str) -> Any:  # noqa: ANN401 - engine views are extension objects
    if isinstance(view, Mapping):
        return view.get(name)
    return getattr(view, name, None)


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, Decimal):
        return format(value, "f")
    return str(value)


class Membership:
    """Join one daemon's desk to the Redis group; see the module docstring.

    Args:
        config: the Redis side's settings (``RedisBusConfig.from_url``).
        intake: the daemon's intent sink (its ``Intake``).
    """

    def __init__(self, config: RedisBusConfig, intake: IntentSinkLike) -> None:
        self.config = config
        self._from_stream: set[str] = set()
        self.bus = RedisBus.for_sink(
            config,
            _StreamSink(intake, self._from_stream, self._prior_decision),
            on_acquire=self._on_acquire,
            on_lose=self._on_lose,
        )
        self.desk: TradingDesk | None = None
        self._claimed_at_start: set[str] = set()
        self._unreconciled: set[str] = set()
        self._hints: dict[tuple[str, str], dict[str, str]] = {}
        self._published_legs: set[str] = set()
        prefix = self.bus.leases.keys.prefix if self.bus.leases is not None else None
        self._exit_state_key = f"{prefix}:exitstate" if prefix else ""
        self._drop_own_state = self.bus.redis.register_script(_DROP_OWN_STATE)
        # Account-wide limits (set up by attach): position id -> (symbol, ledger leg) of the
        # reservations whose entry is in flight here.
        self.ledger: AccountLedger | None = None
        self._reserved: dict[str, tuple[str, str]] = {}
        self._ledger_lock = asyncio.Lock()
        self._ledger_tasks: set[asyncio.Task[None]] = set()
        # Symbols another daemon runs now: their exit-state entries stay for it to read.
        self._handed: set[str] = set()

    # ------------------------------------------------------------------ wiring

    @property
    def events(self) -> EventPublisher:
        """Return the events publisher."""
        return self.bus.events

    @property
    def shared(self) -> bool:
        """Return whether symbols are leased (several daemons may share the account)."""
        return self.bus.leases is not None

    def owned(self) -> frozenset[str]:
        """Return the symbols this daemon runs."""
        return self.bus.owned()

    def attach(self, desk: TradingDesk) -> None:
        """Join the desk: ownership, adoption hints and events."""
        self.desk = desk
        desk.on_note = self._publish_note
        desk.router.on_order_change = self._publish_order
        if self.shared:
            desk.ownership = self.owned
            desk.adoption_hint = self._hint
            desk.on_unowned_leg = self.adopt_if_unowned
            # An unknown symbol would cost a lease and a reconcile (REST weight) before the
            # guard refuses it: refuse it at the stream, from the local exchangeInfo.
            self.bus.intents.symbol_check = self.symbol_refusal
            # The fence: no order for a symbol whose lease a peer may hold by now.
            desk.router.send_gate = self.may_send
            # The guard's limits count this daemon's journal; the ledger counts the account.
            guard = getattr(getattr(desk, "config", None), "guard", None)
            self.ledger = AccountLedger(
                self.bus.redis,
                f"{self.bus.leases.keys.prefix}:ledger",  # type: ignore[union-attr]
                self.config.daemon_id,
                LedgerLimits(
                    max_positions=getattr(guard, "max_open_positions", None),
                    max_exposure_usd=getattr(guard, "max_total_exposure_usd", None),
                    max_symbol_exposure_usd=self.config.max_symbol_exposure_usd,
                ),
            )
            desk.entry_gate = self.entry_gate
            # Idle symbols are released, busy ones handed over with care (leases.py).
            self.bus.leases.has_position = self.has_position  # type: ignore[union-attr]

    def has_position(self, symbol: str) -> bool:
        """Return whether ``symbol`` has a position here, or an entry in flight."""
        if self.desk is None:
            return True
        if any(held[0] == symbol for held in self._reserved.values()):
            return True
        return any(p.symbol == symbol for p in self.desk.store.positions(("open", "opening")))

    def may_send(self, symbol: str) -> bool:
        """Return whether an order for ``symbol`` may be sent now (``LeaseManager.may_send``).

        Always True without leases (a single daemon owns the account).
        """
        leases = self.bus.leases
        return leases is None or leases.may_send(symbol)

    def symbol_refusal(self, symbol: str) -> str | None:
        """Return why an intent on ``symbol`` cannot be traded here, or None.

        Reads the desk's current exchange rules (refreshed rules included); no exchange call.
        """
        if self.desk is None:
            return None
        try:
            self.desk.rules.symbol_info(symbol)
        except KeyError:
            return "is not listed in this daemon's exchangeInfo"
        return None

    def pending(self, symbol: str) -> bool:
        """Return whether ``symbol`` was taken over but is not reconciled yet."""
        return symbol in self._unreconciled

    def pending_reason(self, symbol: str) -> str | None:
        """Return the refusal reason for an intent on ``symbol`` now (None: decide it)."""
        return UNRECONCILED if symbol in self._unreconciled else None

    # ------------------------------------------------------------------ account limits

    def _ledger_leg(self, leg: str) -> str:
        mode = getattr(getattr(self.desk, "guard", None), "mode", "hedge")
        return "BOTH" if mode == "one-way" else leg

    async def entry_gate(self, intent: Intent, decision: GuardDecision) -> str | None:
        """Reserve the accepted entry's leg in the account-wide ledger; a refusal or None.

        Fails closed: with Redis unreachable the entry is refused (the limits cannot be
        known).
        """
        ledger = self.ledger
        position_id = decision.position_id
        if ledger is None or position_id is None:
            return None
        leg = self._ledger_leg(intent.position_side)
        async with self._ledger_lock:
            self._reserved[position_id] = (intent.symbol, leg)
            try:
                refusal = await ledger.reserve(intent.symbol, leg, position_id, decision.notional)
            except REDIS_DOWN_ERRORS as exc:
                self._reserved.pop(position_id, None)
                return f"account_limits_unreachable: Redis did not answer ({exc})"
            if refusal is not None:
                self._reserved.pop(position_id, None)
                logger.info(
                    "Entry refused by the account limits intent_id=%s position_id=%s %s",
                    intent.intent_id,
                    position_id,
                    refusal,
                )
                return str(refusal)
        return None

    def _ledger_note(self, note: Mapping[str, object]) -> None:
        # The desk's notes say when an entry failed, filled or a position closed: release or
        # settle its ledger field. A Redis failure here is repaired by the next sync.
        ledger = self.ledger
        kind = note.get("kind")
        position_id = str(note.get("position_id") or "")
        if ledger is None or not position_id:
            return
        if kind == "entry_failed":
            held = self._reserved.pop(position_id, None)
            if held is not None:
                self._spawn(ledger.release(held[0], held[1], position_id))
        elif kind == "entry":
            self._reserved.pop(position_id, None)
            symbol, leg = str(note.get("symbol")), self._ledger_leg(str(note.get("side")))
            try:
                notional = Decimal(str(note.get("quantity"))) * Decimal(str(note.get("price")))
            except ArithmeticError:
                return
            self._spawn(ledger.settle(symbol, leg, position_id, notional))
        elif kind == "closed":
            self._reserved.pop(position_id, None)
            symbol, leg = str(note.get("symbol")), self._ledger_leg(str(note.get("position_side")))
            self._spawn(ledger.release(symbol, leg, position_id))

    def _spawn(self, call: Awaitable[object]) -> None:
        async def run() -> None:
            try:
                await call
            except REDIS_DOWN_ERRORS as exc:
                logger.debug("Ledger update deferred to the next sync error=%s", exc)

        try:
            task = asyncio.get_running_loop().create_task(run())
        except RuntimeError:  # no loop (a synchronous test): the next sync repairs it
            if asyncio.iscoroutine(call):
                call.close()
            return
        self._ledger_tasks.add(task)
        task.add_done_callback(self._ledger_tasks.discard)

    async def sync_ledger(self) -> None:
        """Make the ledger's fields of the confirmed owned symbols match the journal.

        Runs every second (with the exit state), after each takeover and at start; rebuilds
        what Redis lost. Symbols whose lease is not confirmed now are left alone.
        """
        ledger, desk, leases = self.ledger, self.desk, self.bus.leases
        if ledger is None or desk is None or leases is None:
            return
        async with self._ledger_lock:
            scope = sorted(s for s in self.owned() if leases.may_send(s))
            rows = desk.store.positions(("open", "opening"))
            open_legs: dict[tuple[str, str], tuple[str, Decimal]] = {}
            for row in rows:
                if row.status != "open" or row.symbol not in scope:
                    continue
                price = Decimal(row.entry_price) if row.entry_price else Decimal(0)
                notional = abs(Decimal(row.quantity)) * price
                open_legs[(row.symbol, self._ledger_leg(row.position_side))] = (
                    row.position_id,
                    notional,
                )
            keep = set(self._reserved) | {r.position_id for r in rows if r.status == "opening"}
            try:
                deleted = await ledger.sync(scope, open_legs, keep)
            except REDIS_DOWN_ERRORS as exc:
                logger.debug("Ledger sync deferred error=%s", exc)
                return
        if deleted:
            logger.info("Ledger synced owned=%d stale_deleted=%d", len(scope), deleted)

    # ------------------------------------------------------------------ start

    async def claim(self) -> frozenset[str]:
        """Register, then take the leases of the symbols the journal holds positions on.

        Symbols held by a live peer are handed over (their positions dropped here, nothing
        sent). Waits for Redis when it is unreachable: the daemon cannot know what it owns.

        Returns:
            The symbols this daemon owns now.
        """
        desk = self._desk()
        await self.bus.register()
        leases = self.bus.leases
        if leases is None:
            return frozenset()
        symbols = sorted({p.symbol for p in desk.store.positions(("opening", "open"))})
        # Positions on the account that no daemon runs (opened by hand, or whose daemons all
        # died and forgot them): the preferred live daemon of each symbol takes it.
        try:
            rows = await desk.venue.position_risk()
        except (ExchangeError, OSError) as exc:
            # Not fatal: such positions are claimed on their next account update.
            logger.warning("Unowned positions not scanned at start error=%s", exc)
            rows = []
        for row in rows:
            symbol = str(row.get("symbol"))
            if Decimal(str(row.get("positionAmt") or 0)) == 0 or symbol in symbols:
                continue
            free = await leases.owner_of(symbol) is None
            if free and await leases.preferred_owner(symbol) == self.config.daemon_id:
                symbols.append(symbol)
        for symbol in symbols:
            while True:
                try:
                    owner = await leases.acquire(symbol, reason="want")
                    break
                except REDIS_DOWN_ERRORS as exc:
                    logger.warning(
                        "Redis unreachable while claiming symbol=%s error=%s", symbol, exc
                    )
                    await asyncio.sleep(0.5)
            if owner == self.config.daemon_id:
                self._claimed_at_start.add(symbol)
            else:
                await desk.hand_over(symbol, owner)
        owned = self.owned()
        logger.info(
            "Symbols claimed at start owned=%s handed_over=%s",
            sorted(owned),
            sorted(set(symbols) - owned),
        )
        return owned

    # ------------------------------------------------------------------ lease callbacks

    async def _on_acquire(self, symbol: str, reason: str) -> None:
        self._handed.discard(symbol)
        if symbol in self._claimed_at_start and reason == "want":
            # Reconciled with everything else at start.
            self._claimed_at_start.discard(symbol)
            return
        self._claimed_at_start.discard(symbol)
        await self.reconcile_symbol(symbol, reason)

    async def reconcile_symbol(self, symbol: str, reason: str = "retry") -> bool:
        """Reconcile one symbol just taken; intents for it wait until this succeeds.

        Returns:
            Whether it succeeded (a failure is retried by ``retry_unreconciled``).
        """
        from pyquant.trading.recovery import reconcile

        desk = self._desk()
        self._unreconciled.add(symbol)
        try:
            await self._load_hints(symbol)
            report = await reconcile(desk, symbols=frozenset({symbol}), takeover=True)
        except (ExchangeError, PyquantError, OSError) as exc:
            logger.warning(
                "Takeover reconcile failed symbol=%s reason=%s error=%s", symbol, reason, exc
            )
            return False
        finally:
            for leg in ("LONG", "SHORT"):
                self._hints.pop((symbol, leg), None)
        self._unreconciled.discard(symbol)
        await self.sync_ledger()
        logger.info(
            "Symbol reconciled symbol=%s reason=%s adopted=%s dropped=%s retired_backstops=%s",
            symbol,
            reason,
            report.positions_adopted,
            report.positions_dropped,
            report.peer_backstops_retired,
        )
        return True

    async def adopt_if_unowned(self, symbol: str) -> None:
        """Take ``symbol`` if no daemon owns it and this one is its preferred owner.

        Called when the account shows a position on a symbol this daemon does not run (a
        position opened by hand, say): someone must run its exits.
        """
        leases = self.bus.leases
        if leases is None or symbol in self.owned():
            return
        try:
            if await leases.owner_of(symbol) is not None:
                return
            if await leases.preferred_owner(symbol) != self.config.daemon_id:
                return
            await leases.acquire(symbol, reason="unowned_position")
        except REDIS_DOWN_ERRORS as exc:
            logger.warning("Unowned position not claimed symbol=%s error=%s", symbol, exc)

    async def retry_unreconciled(self) -> None:
        """Reconcile again the symbols whose takeover reconciliation failed (on a timer)."""
        for symbol in sorted(self._unreconciled & self.owned()):
            await self.reconcile_symbol(symbol)
        self._unreconciled &= self.owned()

    async def _on_lose(self, symbol: str, reason: str) -> None:
        self._unreconciled.discard(symbol)
        self._handed.add(symbol)
        owner = ""
        if self.bus.leases is not None:
            try:
                owner = await self.bus.leases.owner_of(symbol) or ""
            except REDIS_DOWN_ERRORS:
                owner = ""
        await self._desk().hand_over(symbol, owner)

    # ------------------------------------------------------------------ exit state

    async def _load_hints(self, symbol: str) -> None:
        if not self._exit_state_key:
            return
        try:
            values = await self.bus.redis.hmget(
                self._exit_state_key, [f"{symbol}|LONG", f"{symbol}|SHORT"]
            )
        except REDIS_DOWN_ERRORS as exc:
            logger.warning(
                "Exit state of the previous owner unreadable symbol=%s error=%s", symbol, exc
            )
            return
        for leg, raw in zip(("LONG", "SHORT"), values, strict=True):
            if raw is None:
                continue
            try:
                loaded = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if isinstance(loaded, dict):
                self._hints[(symbol, leg)] = {k: _text(v) for k, v in loaded.items()}

    def _prior_decision(self, intent_id: str) -> PriorDecision | None:
        if self.desk is None:
            return None
        rows = self.desk.store.intent_decisions(intent_id)
        if not rows:
            return None
        first = rows[0]
        accepted = first.get("decision") == "accepted"
        reason = first.get("reason")
        return PriorDecision(accepted, None if accepted or reason is None else str(reason))

    def _hint(self, symbol: str, leg: str) -> Mapping[str, str] | None:
        return self._hints.get((symbol, leg))

    async def publish_exit_state(self) -> None:
        """Write the exit state of every owned open position for a peer's takeover.

        Also syncs the account-wide ledger (``sync_ledger``) on the same timer.
        """
        await self._write_exit_state()
        await self.sync_ledger()

    async def _write_exit_state(self) -> None:
        if not self._exit_state_key or self.desk is None:
            return
        owned = self.owned()
        store_rows = {p.position_id: p for p in self.desk.store.positions(("open",))}
        fields: dict[str, bytes] = {}
        for view in self.desk.engine.positions():
            symbol = str(_field(view, "symbol"))
            if symbol not in owned:
                continue
            leg = str(_field(view, "position_side"))
            row = store_rows.get(str(_field(view, "position_id")))
            state = {name: _text(_field(view, name)) for name in _EXIT_STATE_FIELDS}
            state["opened_at_ms"] = str(row.opened_at_ms if row and row.opened_at_ms else 0)
            state["daemon_id"] = self.config.daemon_id
            fields[f"{symbol}|{leg}"] = orjson.dumps(state)
        gone = {
            leg
            for leg in self._published_legs - set(fields)
            if leg.split("|")[0] not in self._handed
        }
        if not fields and not gone:
            return
        try:
            pipe = self.bus.redis.pipeline(transaction=False)
            if fields:
                pipe.hset(self._exit_state_key, mapping=fields)  # type: ignore[arg-type]
            if gone:
                # Only our own entries: the leg's new owner may have written its state already.
                mine = orjson.dumps({"daemon_id": self.config.daemon_id})[1:-1]
                await self._drop_own_state(
                    keys=[self._exit_state_key], args=[mine, *sorted(gone)], client=pipe
                )
            await pipe.execute()
        except REDIS_DOWN_ERRORS as exc:
            logger.debug("Exit state not written error=%s", exc)
            return
        self._published_legs = set(fields)

    # ------------------------------------------------------------------ events

    def _publish_order(self, row: OrderRow) -> None:
        self.events.publish("order", symbol=row.symbol, payload=order_payload(row))

    def _publish_note(self, note: dict[str, object]) -> None:
        self._ledger_note(note)
        kind = note.get("kind")
        symbol = note.get("symbol")
        sym = str(symbol) if isinstance(symbol, str) else None
        intent = note.get("intent")
        if kind in ("accepted", "rejection") and isinstance(intent, Intent):
            if intent.intent_id in self._from_stream:
                return  # the stream source publishes it, with the entry's id
            self.events.decision(
                intent,
                accepted=kind == "accepted",
                reason=None if kind == "accepted" else _str_or_none(note.get("reason")),
            )
        elif kind == "rejection":
            source = str(note.get("source", ""))
            if source == "redis":
                return  # published by the stream source with the entry's id
            self.events.publish(
                "rejection",
                symbol=None,
                payload={
                    "stream": source,
                    "stream_id": "",
                    "reason": str(note.get("detail") or note.get("reason") or "invalid"),
                    "field": None,
                },
            )
        elif kind == "fill" and sym:
            self.events.publish("fill", symbol=sym, payload=_pick(note, _FILL_KEYS))
        elif kind == "exit" and sym:
            payload = _pick(note, ("position_id", "position_side", "reason", "quantity"))
            payload.setdefault("quantity", "0")
            self.events.publish("exit", symbol=sym, payload=payload)
        elif kind in ("entry", "adopted", "handed_over", "closed") and sym:
            action = {"entry": "opened"}.get(str(kind), str(kind))
            payload = {
                "action": action,
                "position_id": note.get("position_id"),
                "position_side": note.get("position_side") or note.get("side"),
                "quantity": note.get("quantity") or "0",
            }
            for key in ("reason", "owner"):
                if note.get(key):
                    payload[key] = note[key]
            if note.get("price"):
                payload["entry_price"] = note["price"]
            self.events.publish("position", symbol=sym, payload=payload)

    def _desk(self) -> TradingDesk:
        if self.desk is None:
            raise RuntimeError("Membership.attach(desk) must be called first")
        return self.desk


@dataclass(frozen=True, slots=True)
class PriorDecision:
    """The decision stored for an intent delivered again (its acknowledgement was lost)."""

    accepted: bool
    reason: str | None


class _StreamSink:
    """The daemon's intake as the stream source sees it.

    It notes which intents came from the stream (their decision events are the source's),
    and answers a redelivered entry (decided and stored, but Redis lost the XACK: killed,
    restarted) with the decision already stored instead of deciding it a second time.
    """

    def __init__(
        self,
        intake: IntentSinkLike,
        from_stream: set[str],
        prior: Callable[[str], PriorDecision | None],
    ) -> None:
        self._intake = intake
        self._from_stream = from_stream
        self._prior = prior

    async def submit(self, intent: Intent, *, payload: object = None) -> object:
        prior = self._prior(intent.intent_id)
        if prior is not None:
            logger.info(
                "Intent redelivered, already decided intent_id=%s accepted=%s",
                intent.intent_id,
                prior.accepted,
            )
            return prior
        self._from_stream.add(intent.intent_id)
        try:
            return await self._intake.submit(intent, payload=payload)
        finally:
            self._from_stream.discard(intent.intent_id)

    def reject_malformed(self, source: str, payload: object, error: str) -> None:
        self._intake.reject_malformed(source, payload, error)


# KEYS[1] the exit-state hash; ARGV[1] the '"daemon_id":"<id>"' text of our entries, ARGV[2..]
# fields to drop if they are still ours.
_DROP_OWN_STATE: Final = """
for i = 2, #ARGV do
  local value = redis.call('HGET', KEYS[1], ARGV[i])
  if value and string.find(value, ARGV[1], 1, true) then
    redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return 0
"""

_FILL_KEYS: Final = (
    "client_order_id",
    "side",
    "position_side",
    "price",
    "quantity",
    "commission",
    "realized_pnl",
    "trade_id",
)


def _pick(note: Mapping[str, object], keys: tuple[str, ...]) -> dict[str, object]:
    return {k: note[k] for k in keys if note.get(k) is not None}


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)


__all__ = ["UNRECONCILED", "Membership", "PriorDecision"]
