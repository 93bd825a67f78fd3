"""Position legs: one owner per (symbol, side), one transition function over (state, event).

A *leg* is one side of one symbol on the account (``("BTCUSDT", "LONG")``); in one-way mode
the LONG and SHORT legs of a symbol are the two signs of its single BOTH position. Every
piece of work that can change a leg (an entry, an exit, a backstop move, a flatten, a
hand-over, an adoption, a close found on the exchange) is an event applied here, serially, by
``LegBook.apply``; the work itself runs under the leg's lock (``LegBook.lock``), so two of
them never interleave on one leg. What is in flight is part of the leg's state (``work``),
so a live reconciliation asks ``is_idle`` instead of guessing from journal rows.

States and who moves a leg between them (``next_leg_state``)::

    (no leg) --EntryDecided--> OPENING --EntryFilled--> OPEN <--WorkDone-- EXITING
        |                        |                      |  '--WorkStarted(exit:N)--^
        |                        '--EntryFailed--> (removed)
        '--Adopted------------------------------------> OPEN --FlattenStarted--> FLATTENING
    OPEN/EXITING --FoundFlat(reason or "")--> CLOSING --CloseEvidence, Closed--> (removed)
    FLATTENING --FlattenEnded--> OPEN / EXITING (the close failed: exits resume)
    any --HandedOver--> (removed; the peer's daemon owns it now)
    any --Closed(reason)--> (removed)

* ``OPENING``: the guard accepted an entry; symbol set-up, the MARKET order and its REST
  answer are in flight (sent by ``TradingDesk.submit``). A live reconciliation leaves it
  alone: the entry's own outcome opens or fails it.
* ``OPEN``: managed by the exit engine; idle unless ``work`` holds tokens.
* ``EXITING``: at least one exit is scheduled (from the moment the engine emits it, through
  any retry delay, until its order is final) or a backstop move is under way (token
  ``backstop``). A live reconciliation defers the leg.
* ``FLATTENING``: the kill switch is closing it; exits and backstop moves are refused.
* ``CLOSING``: the exchange shows the leg flat but the cause is not known yet (our exit
  answered -2022: someone else closed it). The owner waits ``close_grace_ms`` for the
  evidence (a liquidation or ADL fill, a backstop trigger) before it records the close, so
  the reason does not depend on whether REST or the user stream spoke first.

The book holds no I/O: the desk does the work and reports it as events.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from enum import StrEnum

LegKey = tuple[str, str]  # (symbol, "LONG" | "SHORT")


class LegState(StrEnum):
    """Where a leg is in its life (module docstring)."""

    OPENING = "opening"
    OPEN = "open"
    EXITING = "exiting"
    FLATTENING = "flattening"
    CLOSING = "closing"
    CLOSED = "closed"  # terminal: the leg is removed from the book


@dataclass(frozen=True, slots=True)
class Leg:
    """The owner's view of one leg.

    Attributes:
        key: (symbol, side).
        state: see ``LegState``.
        position_id: the journal's position on this leg ("" while none).
        work: tokens of work in flight (``entry``, ``exit:<sequence>``, ``backstop``,
            ``flatten``): the leg is idle only when this is empty and the state is OPEN.
        close_reason: while CLOSING, the best explanation seen so far ("" none yet).
        flat_since_ms: while CLOSING, when the exchange was first seen flat.
    """

    key: LegKey
    state: LegState
    position_id: str = ""
    work: frozenset[str] = frozenset()
    close_reason: str = ""
    flat_since_ms: int = 0


# ---- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EntryDecided:
    """The guard accepted an entry on the leg."""

    position_id: str


@dataclass(frozen=True, slots=True)
class EntryFilled:
    """The entry's order filled (REST answer, lookup or user stream): the position is open."""

    position_id: str


@dataclass(frozen=True, slots=True)
class EntryFailed:
    """The entry never executed (refused, expired, symbol set-up failed)."""

    position_id: str


@dataclass(frozen=True, slots=True)
class Adopted:
    """A position found on the exchange (or handed over by a peer) is now run here."""

    position_id: str


@dataclass(frozen=True, slots=True)
class WorkStarted:
    """Work on the leg begins (an exit scheduled, a backstop move)."""

    token: str


@dataclass(frozen=True, slots=True)
class WorkDone:
    """Work on the leg ended, whatever its outcome."""

    token: str


@dataclass(frozen=True, slots=True)
class FlattenStarted:
    """The kill switch takes the leg."""


@dataclass(frozen=True, slots=True)
class FlattenEnded:
    """The kill switch is done with the leg (it is flat, or its close failed)."""


@dataclass(frozen=True, slots=True)
class FoundFlat:
    """The exchange shows the leg flat; ``reason`` when the cause is already known."""

    reason: str
    at_ms: int


@dataclass(frozen=True, slots=True)
class CloseEvidence:
    """A fill or order update that explains why the leg went flat (liquidation, adl, ...)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Closed:
    """The close is recorded (position closed in the journal and the engine)."""

    reason: str


@dataclass(frozen=True, slots=True)
class HandedOver:
    """Another daemon owns the leg's symbol now."""

    owner: str


LegEvent = (
    EntryDecided
    | EntryFilled
    | EntryFailed
    | Adopted
    | WorkStarted
    | WorkDone
    | FlattenStarted
    | FlattenEnded
    | FoundFlat
    | CloseEvidence
    | Closed
    | HandedOver
)


@dataclass(frozen=True, slots=True)
class LegTransition:
    """The leg after an event (None: removed) and a note when the event was out of place."""

    leg: Leg | None
    note: str = ""


_FLATTEN = "flatten"
_BUSY_STATES = frozenset({LegState.OPENING, LegState.FLATTENING, LegState.CLOSING})


def next_leg_state(leg: Leg | None, key: LegKey, event: LegEvent) -> LegTransition:
    """Return the leg after ``event``; every (state, event) pair is decided here.

    Events that do not fit the state (a late WorkDone, an exit scheduled on a leg being
    flattened) leave it as it is, with a note; they never resurrect a removed leg except by
    an entry or an adoption.
    """
    match leg, event:
        case None, EntryDecided(position_id=pid):
            return LegTransition(Leg(key, LegState.OPENING, pid, frozenset({"entry"})))
        case None, Adopted(position_id=pid):
            return LegTransition(Leg(key, LegState.OPEN, pid))
        case None, _:
            return LegTransition(None, f"{type(event).__name__} on a leg with no position")
        case Leg(state=LegState.OPENING), EntryFilled(position_id=pid) if pid == leg.position_id:
            return LegTransition(
                replace(leg, state=_settled(leg.work - {"entry"}), work=leg.work - {"entry"})
            )
        case Leg(state=LegState.OPENING), EntryFailed(position_id=pid) if pid == leg.position_id:
            return LegTransition(None)
        case Leg(), EntryDecided() | EntryFilled() | EntryFailed():
            return LegTransition(leg, f"{type(event).__name__} in state {leg.state}")
        case Leg(), Adopted(position_id=pid):
            # A fresh position on the leg (the previous one was closed and a peer or the
            # exchange reopened it): the new one is run, idle.
            if leg.state in (LegState.OPENING, LegState.FLATTENING):
                return LegTransition(leg, f"adoption refused in state {leg.state}")
            return LegTransition(Leg(key, LegState.OPEN, pid))
        case Leg(state=LegState.FLATTENING), WorkStarted(token=token) if token != _FLATTEN:
            return LegTransition(leg, f"{token} refused: the leg is being flattened")
        case Leg(state=LegState.CLOSING), WorkStarted(token=token):
            return LegTransition(leg, f"{token} refused: the leg is flat")
        case Leg(), WorkStarted(token=token):
            work = leg.work | {token}
            state = leg.state if leg.state in _BUSY_STATES else LegState.EXITING
            return LegTransition(replace(leg, state=state, work=work))
        case Leg(), WorkDone(token=token):
            work = leg.work - {token}
            state = leg.state if leg.state in _BUSY_STATES else _settled(work)
            return LegTransition(replace(leg, state=state, work=work))
        case Leg(), FlattenStarted():
            return LegTransition(
                replace(leg, state=LegState.FLATTENING, work=leg.work | {"flatten"})
            )
        case Leg(state=LegState.FLATTENING), FlattenEnded():
            work = leg.work - {"flatten"}
            return LegTransition(replace(leg, state=_settled(work), work=work))
        case Leg(), FlattenEnded():
            return LegTransition(leg, f"flatten ended in state {leg.state}")
        case Leg(state=LegState.CLOSING), FoundFlat(reason=reason):
            return LegTransition(replace(leg, close_reason=leg.close_reason or reason))
        case Leg(), FoundFlat(reason=reason, at_ms=at_ms):
            return LegTransition(
                replace(leg, state=LegState.CLOSING, close_reason=reason, flat_since_ms=at_ms)
            )
        case Leg(), CloseEvidence(reason=reason):
            # The strongest explanation wins whatever order the evidence came in.
            best = max((leg.close_reason, reason), key=_evidence_rank)
            return LegTransition(replace(leg, close_reason=best))
        case Leg(), Closed() | HandedOver():
            return LegTransition(None)
    return LegTransition(leg, f"unhandled {type(event).__name__}")  # pragma: no cover


def _settled(work: frozenset[str]) -> LegState:
    return LegState.EXITING if work else LegState.OPEN


# What explains a leg found flat, weakest first: a forced close by the exchange outranks our
# own stop, which outranks "someone closed it".
_EVIDENCE = ("", "already_flat", "external", "backstop", "flatten", "adl", "liquidation")


def _evidence_rank(reason: str) -> int:
    return _EVIDENCE.index(reason) if reason in _EVIDENCE else 1


class TaskLock:
    """An asyncio lock the task holding it may take again (re-entrant per task).

    A leg's work nests (an exit that closes the leg cancels its backstop, both under the
    leg's lock); asyncio has no re-entrant lock, and a plain Lock would deadlock there.
    """

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._owner: asyncio.Task[object] | None = None
        self._depth = 0

    def locked(self) -> bool:
        """Return True while some task holds the lock."""
        return self._lock.locked()

    def held_elsewhere(self) -> bool:
        """Return True while a task other than the calling one holds the lock."""
        return self._lock.locked() and self._owner is not asyncio.current_task()

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """Hold the lock for the ``async with`` body."""
        task = asyncio.current_task()
        if task is not None and task is self._owner:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        async with self._lock:
            self._owner = task
            self._depth = 1
            try:
                yield
            finally:
                self._owner = None
                self._depth = 0


@dataclass(slots=True)
class LegBook:
    """Every leg this desk runs, with its lock; the only writer of leg state."""

    legs: dict[LegKey, Leg] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    _locks: dict[LegKey, TaskLock] = field(default_factory=dict)

    def get(self, key: LegKey) -> Leg | None:
        """Return the leg, or None when nothing of ours is on it."""
        return self.legs.get(key)

    def apply(self, key: LegKey, event: LegEvent) -> Leg | None:
        """Apply one event to the leg; return the leg after it (None: removed)."""
        transition = next_leg_state(self.legs.get(key), key, event)
        if transition.note:
            self.notes.append(f"{key[0]} {key[1]}: {transition.note}")
            del self.notes[:-100]
        if transition.leg is None:
            self.legs.pop(key, None)
        else:
            self.legs[key] = transition.leg
        return transition.leg

    def accepts(self, key: LegKey, token: str) -> bool:
        """Start work ``token`` on the leg if its state allows it; return whether it did."""
        before = self.legs.get(key)
        after = self.apply(key, WorkStarted(token))
        return after is not None and token in after.work and (before is None or before != after)

    def lock(self, key: LegKey) -> TaskLock:
        """Return the lock that serializes all work on the leg."""
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = TaskLock()
        return lock

    def is_idle(self, key: LegKey) -> bool:
        """Return True when nothing of ours is in flight on the leg (reconcile may act)."""
        leg = self.legs.get(key)
        if leg is None:
            return not self.lock(key).held_elsewhere()
        return leg.state == LegState.OPEN and not leg.work and not self.lock(key).held_elsewhere()

    def busy_keys(self) -> set[LegKey]:
        """Return the legs a live reconciliation must leave alone now."""
        return {key for key in set(self.legs) | set(self._locks) if not self.is_idle(key)}

    def closing(self) -> list[Leg]:
        """Return the legs found flat whose close is not recorded yet."""
        return [leg for leg in self.legs.values() if leg.state == LegState.CLOSING]


__all__ = [
    "Adopted",
    "CloseEvidence",
    "Closed",
    "EntryDecided",
    "EntryFailed",
    "EntryFilled",
    "FlattenEnded",
    "FlattenStarted",
    "FoundFlat",
    "HandedOver",
    "Leg",
    "LegBook",
    "LegEvent",
    "LegKey",
    "LegState",
    "LegTransition",
    "TaskLock",
    "WorkDone",
    "WorkStarted",
    "next_leg_state",
]
