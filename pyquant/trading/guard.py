"""The position guard: decides each intent atomically and records the decision with its reason.

``PositionGuard.decide`` is synchronous and makes no awaits, so in the asyncio daemon no other
intent can interleave between the checks and the reservation: of two concurrent intents for
one leg exactly one is accepted. The decision, the reservation of the leg and the ``opening``
position row are written in one SQLite transaction; the store is the only state it reads, so a
restart sees exactly what was decided.

Checks, in order; the first that fails is the reason (stable machine strings):

``invalid`` (created in the future beyond the tolerance), ``duplicate_intent`` (id seen
before), ``halted`` (the kill switch's latch is set in the journal: ``pyquant resume`` clears
it), ``stale`` (older than ``max_age_ms``), ``state_unknown`` (fail closed: before
reconciliation or after a lost user stream), ``unknown_symbol`` / ``symbol_not_trading``,
``position_open`` (hedge: a position on that symbol and leg; one-way: any position on the
symbol), ``entry_in_flight`` (a reservation on it), ``cooldown`` (after an exit),
``max_positions``, ``max_exposure``, then the sizing reasons (``over_leveraged``,
``below_min_notional``, ``insufficient_margin``, ``invalid``, ``exchange_unavailable``).

The checks up to ``state_unknown`` need nothing from the exchange: ``refuse_early`` runs
only those, so a duplicate or a halted intent is refused before any REST call for a mark
or the account.

Usage::

    guard = PositionGuard(store, rules, GuardConfig(max_open_positions=5))
    guard.set_mode("hedge"); guard.mark_state_known()
    decision = guard.decide(intent, size=lambda i: size_entry(...))
    if decision.accepted:
        ...send the entry for decision.position_id / decision.quantity...
        guard.release(decision.position_id)            # on fill or reject
    guard.start_cooldown("BTCUSDT", "LONG")            # after an exit
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal, Protocol

from pyquant.trading.intents import Intent
from pyquant.trading.journal import PositionRow, Reservation, Store
from pyquant.trading.sizing import SizeDecision

logger = logging.getLogger(__name__)

REASONS = (
    "accepted",
    "invalid",
    "duplicate_intent",
    "halted",
    "stale",
    "state_unknown",
    "unknown_symbol",
    "symbol_not_trading",
    "position_open",
    "entry_in_flight",
    "cooldown",
    "max_positions",
    "max_exposure",
    "over_leveraged",
    "below_min_notional",
    "insufficient_margin",
    "exchange_unavailable",
    "entry_failed",
)


class SymbolStatusRules(Protocol):
    """What the guard needs from ``pyquant.ExchangeRules``."""

    def symbol_info(self, symbol: str) -> object:
        """Return the symbol's info (``status`` among it); KeyError when unknown."""
        ...


@dataclass(frozen=True, slots=True)
class GuardConfig:
    """Limits the guard enforces.

    Attributes:
        max_open_positions: open plus in-flight positions allowed at once.
        max_total_exposure_usd: cap on the summed notional (None: no cap).
        max_age_ms: an intent older than this is stale.
        future_tolerance_ms: how far in the future ``created_at_ms`` may lie (clock skew).
        cooldown_ms: no new entry on a leg for this long after an exit.
        default_leverage: leverage for intents that name none.
    """

    max_open_positions: int = 10
    max_total_exposure_usd: Decimal | None = None
    max_age_ms: int = 60_000
    future_tolerance_ms: int = 5_000
    cooldown_ms: int = 300_000
    default_leverage: int = 10


@dataclass(frozen=True, slots=True)
class GuardDecision:
    """The guard's decision about one intent."""

    accepted: bool
    reason: str
    detail: str = ""
    position_id: str | None = None
    quantity: str | None = None
    notional: Decimal = Decimal(0)
    leverage: int = 1
    stop_price: str | None = None


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _status_of(info: object) -> str | None:
    value = info.get("status") if isinstance(info, Mapping) else getattr(info, "status", None)
    return None if value is None else str(value)


def position_id_text(number: int) -> str:
    """Return the compact position id of a position number (base 36)."""
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    text = ""
    while True:
        number, rest = divmod(number, 36)
        text = digits[rest] + text
        if number == 0:
            return text


class PositionGuard:
    """Decides intents; see the module docstring."""

    def __init__(
        self,
        store: Store,
        rules: SymbolStatusRules,
        config: GuardConfig | None = None,
        *,
        clock: Callable[[], int] = _now_ms,
    ) -> None:
        self.store = store
        self.rules = rules
        self.config = config or GuardConfig()
        self.mode: Literal["hedge", "one-way"] | None = None
        self._clock = clock
        self._unknown_reason: str | None = "not reconciled with the exchange yet"

    # ---- state ------------------------------------------------------------------------------

    def set_mode(self, mode: Literal["hedge", "one-way"]) -> None:
        """Set the account's position mode (as read from the venue)."""
        self.mode = mode

    @property
    def state_known(self) -> bool:
        """Return True when entries may be decided (reconciled, streams up)."""
        return self._unknown_reason is None and self.mode is not None

    def mark_state_unknown(self, reason: str) -> None:
        """Fail closed: refuse every intent until ``mark_state_known``."""
        if self._unknown_reason is None:
            logger.warning("Position state unknown, entries refused reason=%s", reason)
        self._unknown_reason = reason

    def mark_state_known(self) -> None:
        """Allow entries again (after reconciliation)."""
        self._unknown_reason = None

    def release(self, position_id: str) -> None:
        """Release the entry reservation of a position (its entry filled or failed)."""
        self.store.release_reservation(position_id)

    def start_cooldown(self, symbol: str, position_side: str, now_ms: int | None = None) -> None:
        """Refuse entries on (symbol, leg) for ``cooldown_ms`` after an exit."""
        now = self._clock() if now_ms is None else now_ms
        if self.config.cooldown_ms > 0:
            self.store.set_cooldown(symbol, position_side, now + self.config.cooldown_ms)

    # ---- decision ---------------------------------------------------------------------------

    def decide(
        self,
        intent: Intent,
        *,
        size: Callable[[Intent, int], SizeDecision] | None = None,
        payload: object = None,
    ) -> GuardDecision:
        """Decide one intent and record the decision (and the reservation when accepted).

        Args:
            intent: the parsed intent.
            size: sizing callback ``(intent, leverage) -> SizeDecision``; None accepts
                ``intent.size_usd`` as is (quantity left to the caller).
            payload: the raw payload, kept with the decision.

        Returns:
            The decision; ``position_id`` is set when accepted.
        """
        now = self._clock()
        decision = self._check(intent, now, size)
        try:
            with self.store.transaction():
                if decision.accepted:
                    assert decision.position_id is not None  # noqa: S101 - set by _check
                    self.store.add_reservation(
                        Reservation(
                            symbol=intent.symbol,
                            position_side=intent.position_side,
                            intent_id=intent.intent_id,
                            position_id=decision.position_id,
                            notional=decision.notional,
                            created_at_ms=now,
                        )
                    )
                    self.store.upsert_position(
                        PositionRow(
                            position_id=decision.position_id,
                            symbol=intent.symbol,
                            position_side=intent.position_side,
                            status="opening",
                            origin="entry",
                            quantity="0",
                            entry_price=None,
                            leverage=decision.leverage,
                            confidence=intent.confidence,
                            intent_id=intent.intent_id,
                            opened_at_ms=None,
                            closed_at_ms=None,
                            close_reason=None,
                        )
                    )
                self.store.record_intent_decision(
                    intent,
                    "accepted" if decision.accepted else "rejected",
                    decision.reason,
                    decision.detail,
                    position_id=decision.position_id,
                    payload=payload,
                )
        except sqlite3.IntegrityError:
            # Only reachable when two guards share one database: the leg was just reserved.
            decision = GuardDecision(False, "entry_in_flight", "leg reserved concurrently")
            self.store.record_intent_decision(
                intent, "rejected", decision.reason, decision.detail, payload=payload
            )
        logger.info(
            "Intent decided intent_id=%s symbol=%s side=%s decision=%s reason=%s detail=%s",
            intent.intent_id,
            intent.symbol,
            intent.side,
            "accepted" if decision.accepted else "rejected",
            decision.reason,
            decision.detail,
        )
        return decision

    def refuse_early(self, intent: Intent, *, payload: object = None) -> GuardDecision | None:
        """Run the checks that need nothing from the exchange; record a refusal.

        Call it before fetching a mark or the account for sizing: a duplicate, a halted or a
        stale intent then costs no REST call (a JSONL file read again after restarts is
        mostly duplicates).

        Returns:
            The recorded refusal, or None when ``decide`` should go on to decide the intent.
        """
        now = self._clock()
        decision = self._early_check(intent, now)
        if decision is None:
            return None
        self.store.record_intent_decision(
            intent, "rejected", decision.reason, decision.detail, payload=payload
        )
        logger.info(
            "Intent decided intent_id=%s symbol=%s side=%s decision=rejected reason=%s detail=%s",
            intent.intent_id,
            intent.symbol,
            intent.side,
            decision.reason,
            decision.detail,
        )
        return decision

    def _early_check(self, intent: Intent, now: int) -> GuardDecision | None:
        config = self.config
        if intent.created_at_ms > now + config.future_tolerance_ms:
            return GuardDecision(
                False,
                "invalid",
                f"created_at_ms {intent.created_at_ms} is {intent.created_at_ms - now} ms "
                "in the future",
            )
        if self.store.intent_seen(intent.intent_id):
            return GuardDecision(False, "duplicate_intent", f"id {intent.intent_id} seen before")
        halt = self.store.halt()
        if halt is not None:
            return GuardDecision(
                False,
                "halted",
                f"halted by {halt.set_by} at {halt.set_at_ms} ({halt.reason}); "
                "'pyquant resume' clears it",
            )
        age = now - intent.created_at_ms
        if age > config.max_age_ms:
            return GuardDecision(False, "stale", f"age {age} ms > max_age {config.max_age_ms} ms")
        if not self.state_known:
            return GuardDecision(
                False, "state_unknown", self._unknown_reason or "position mode not read yet"
            )
        return None

    def _check(
        self,
        intent: Intent,
        now: int,
        size: Callable[[Intent, int], SizeDecision] | None,
    ) -> GuardDecision:
        config = self.config
        early = self._early_check(intent, now)
        if early is not None:
            return early
        try:
            status = _status_of(self.rules.symbol_info(intent.symbol))
        except KeyError:
            return GuardDecision(False, "unknown_symbol", f"{intent.symbol} is not listed")
        if status != "TRADING":
            return GuardDecision(False, "symbol_not_trading", f"{intent.symbol} status is {status}")
        leg = intent.position_side
        legs = {leg} if self.mode == "hedge" else {"LONG", "SHORT"}
        open_positions = self.store.positions(("open", "opening"))
        for position in open_positions:
            if (
                position.symbol == intent.symbol
                and position.position_side in legs
                and position.status == "open"
            ):
                return GuardDecision(
                    False,
                    "position_open",
                    f"{intent.symbol} {position.position_side} is open as {position.position_id}",
                )
        reservations = self.store.reservations()
        for reservation in reservations:
            if reservation.symbol == intent.symbol and reservation.position_side in legs:
                return GuardDecision(
                    False,
                    "entry_in_flight",
                    f"entry {reservation.position_id} for {intent.symbol} "
                    f"{reservation.position_side} is in flight",
                )
        for position in open_positions:
            # An "opening" row without a reservation is an entry whose outcome is unresolved.
            if position.symbol == intent.symbol and position.position_side in legs:
                return GuardDecision(
                    False,
                    "entry_in_flight",
                    f"entry {position.position_id} for {intent.symbol} is unresolved",
                )
        cooldowns = self.store.cooldowns(now)
        for candidate in legs:
            until = cooldowns.get((intent.symbol, candidate))
            if until is not None:
                return GuardDecision(
                    False, "cooldown", f"{intent.symbol} {candidate} cools down until {until}"
                )
        in_use = len(open_positions) + sum(
            1
            for reservation in reservations
            if reservation.position_id not in {p.position_id for p in open_positions}
        )
        if in_use >= config.max_open_positions:
            return GuardDecision(
                False, "max_positions", f"{in_use} of {config.max_open_positions} in use"
            )
        leverage = intent.leverage or config.default_leverage
        decision = SizeDecision(True, quantity="0", notional=intent.size_usd or Decimal(0))
        if size is not None:
            try:
                decision = size(intent, leverage)
            except Exception as exc:  # the decision is still recorded, with the reason
                return GuardDecision(False, "invalid", f"sizing failed: {exc}")
            if not decision.ok:
                return GuardDecision(False, decision.reason, decision.detail)
        if config.max_total_exposure_usd is not None:
            exposure = self._exposure(open_positions, reservations)
            if exposure + decision.notional > config.max_total_exposure_usd:
                return GuardDecision(
                    False,
                    "max_exposure",
                    f"exposure {exposure} + {decision.notional} > "
                    f"{config.max_total_exposure_usd} USDT",
                )
        position_id = position_id_text(self.store.next_position_number())
        return GuardDecision(
            True,
            "accepted",
            decision.detail,
            position_id=position_id,
            quantity=decision.quantity,
            notional=decision.notional,
            leverage=leverage,
            stop_price=decision.stop_price,
        )

    @staticmethod
    def _exposure(positions: list[PositionRow], reservations: list[Reservation]) -> Decimal:
        total = Decimal(0)
        for position in positions:
            if position.status == "open" and position.entry_price is not None:
                total += abs(Decimal(position.quantity)) * Decimal(position.entry_price)
        reserved = {p.position_id for p in positions if p.status == "open"}
        for reservation in reservations:
            if reservation.position_id not in reserved:
                total += reservation.notional
        return total
