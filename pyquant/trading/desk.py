"""The trading desk: guard, sizing, router, engine and store wired into one trading core.

This is the one object the daemon talks to. It is plain code over data: it owns no socket
and no timer; the daemon feeds it intents, the exit engine's actions and user-stream events.

Life of an entry: ``submit(intent)`` reads the mark and account (async), then the guard
decides atomically (sync; decision, reservation and ``opening`` row in one transaction),
leverage and margin type are set and confirmed, the MARKET entry is sent; when it fills
(REST ``RESULT`` or the stream, whichever first) the position opens in the engine and the
store, the reservation is released and the backstop placed.

Life of an exit: ``on_actions(actions)`` schedules one task per action (the market task
never waits for REST); the router sends it under the position's lock, clipped to the live
quantity; a fill confirms the action in the engine (``engine.confirm(action,
filled_quantity)``), a rejection gives it back (``engine.reject``), ``-2022`` (already
flat) closes the position after a check with the venue.

User stream: ``on_user_event(event)`` takes decoded ORDER_TRADE_UPDATE, ALGO_UPDATE,
ACCOUNT_UPDATE and TRADE_LITE documents; fills are deduplicated on trade id, order states
advance, positions changed behind our back are resized, closed or adopted.

Several daemons on one account (``pyquant.scale``): ``ownership`` returns the symbols this
desk runs; account changes, fills and flattens on other symbols are left to their owners,
``hand_over(symbol)`` stops running a symbol another daemon took (nothing is closed), and
``adoption_hint`` lends ``adopt`` the exit state the previous owner published, so a takeover
resumes the ladder and trailing stop where they were instead of starting over.

Usage (the daemon)::

    desk = TradingDesk(venue, store, rules, engine, DeskConfig())
    report = await reconcile(desk)                # pyquant.daemon.recovery, before anything else
    decision = await desk.submit(intent)          # from any intent source
    desk.on_actions(engine.on_mark_message(raw))  # market task, per websocket message
    await desk.on_user_event(event)               # user-data task, per event
    desk.on_stream_lost("user stream down")       # entries fail closed until reconcile
    desk.update_rules(new_rules)                  # after an exchangeInfo refresh
    desk.save_snapshot()                          # on a timer (e.g. every second)
    steps = await desk.flatten()                  # kill switch
    await desk.drain(); desk.summary()            # clean stop
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol

from pyquant.errors import ExchangeError, PyquantError
from pyquant.exchange.venue import Venue
from pyquant.trading.backstops import StopWouldTrigger
from pyquant.trading.guard import GuardConfig, GuardDecision, PositionGuard, position_id_text
from pyquant.trading.intents import Intent, IntentError
from pyquant.trading.journal import Fill, PositionRow, Store
from pyquant.trading.legs import (
    Adopted,
    Closed,
    CloseEvidence,
    EntryDecided,
    EntryFailed,
    EntryFilled,
    FlattenEnded,
    FlattenStarted,
    FoundFlat,
    HandedOver,
    LegBook,
    LegKey,
    LegState,
    WorkDone,
)
from pyquant.trading.orders import FINAL_STATES, OrderOutcome, OrderState, RouterError
from pyquant.trading.router import FlattenStep, OrderRouter, RouterConfig
from pyquant.trading.sizing import (
    SizeDecision,
    SizingConfig,
    SizingInputUnavailable,
    read_input,
    size_entry,
    unavailable_decision,
)

logger = logging.getLogger(__name__)


class ActionLike(Protocol):
    """``pyquant.ExitAction`` as the desk reads it."""

    @property
    def symbol(self) -> str: ...  # noqa: D102
    @property
    def position_side(self) -> str: ...  # noqa: D102
    @property
    def side(self) -> str: ...  # noqa: D102
    @property
    def quantity(self) -> str: ...  # noqa: D102
    @property
    def reason(self) -> str: ...  # noqa: D102
    @property
    def position_id(self) -> Any: ...  # noqa: D102, ANN401 - str or int, as the engine keeps it
    @property
    def sequence(self) -> int: ...  # noqa: D102
    @property
    def is_full_close(self) -> bool: ...  # noqa: D102


class EngineLike(Protocol):
    """What the desk needs from ``pyquant.ExitEngine`` (issue 3)."""

    def open_position(  # noqa: D102
        self,
        position_id: Any,  # noqa: ANN401
        symbol: str,
        position_side: str,
        quantity: str,
        entry_price: str,
        leverage: int = 1,
        confidence: float | None = None,
        opened_at_ms: int | None = None,
    ) -> Any: ...  # noqa: ANN401
    def adopt_position(  # noqa: D102
        self,
        position_id: Any,  # noqa: ANN401
        symbol: str,
        position_side: str,
        quantity: str,
        entry_price: str,
        leverage: int = 1,
        opened_at_ms: int | None = None,
    ) -> Any: ...  # noqa: ANN401
    def resize_position(self, position_id: Any, quantity: str) -> Any: ...  # noqa: D102, ANN401
    def close_position(self, position_id: Any) -> Any: ...  # noqa: D102, ANN401
    def confirm(self, action: Any, filled_quantity: str | None = None) -> Any: ...  # noqa: D102, ANN401
    def reject(self, action: Any) -> Any: ...  # noqa: D102, ANN401
    def positions(self) -> Sequence[Any]: ...  # noqa: D102
    def plan_entry(  # noqa: D102
        self, symbol: str, position_side: str, entry_price: str, leverage: int
    ) -> Any: ...  # noqa: ANN401
    def snapshot(self) -> bytes: ...  # noqa: D102


class DeskRules(Protocol):
    """What the desk needs from ``pyquant.ExchangeRules``."""

    def quantize_price(self, symbol: str, price: str, rounding: str = "down") -> str: ...  # noqa: D102
    def quantize_qty(self, symbol: str, qty: str, market: bool = True) -> str: ...  # noqa: D102
    def check_order(self, symbol: str, **kwargs: Any) -> object: ...  # noqa: D102, ANN401
    def symbol_info(self, symbol: str) -> object: ...  # noqa: D102


@dataclass(frozen=True, slots=True)
class DeskConfig:
    """Settings of the trading core."""

    guard: GuardConfig = field(default_factory=GuardConfig)
    sizing: SizingConfig = field(default_factory=SizingConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    shadow: bool = False  # decide and log, send nothing
    account_ttl_ms: int = 2_000
    # A leg found flat by surprise waits this long for the fill that explains it (a
    # liquidation, ADL, our backstop) before its close is recorded as "already_flat".
    close_grace_ms: int = 2_000
    # Multi-Assets mode changes margin and PnL currency; the daemon refuses it unless told.
    allow_multi_assets: bool = False


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _dec(value: object, default: Decimal = Decimal(0)) -> Decimal:
    if value is None or value == "":
        return default
    try:
        return Decimal(str(value))
    except InvalidOperation:
        return default


def _field(obj: object, name: str) -> object:
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


class TradingDesk:
    """The trading core; see the module docstring."""

    def __init__(
        self,
        venue: Venue,
        store: Store,
        rules: DeskRules,
        engine: EngineLike,
        config: DeskConfig | None = None,
        *,
        clock: Callable[[], int] = _now_ms,
        router: OrderRouter | None = None,
        mark_price: Callable[[str], Decimal | None] | None = None,
        on_rules_stale: Callable[[str, int], Awaitable[object]] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.venue = venue
        self.store = store
        self.rules = rules
        self.engine = engine
        self.config = config or DeskConfig()
        self._clock = clock
        self.guard = PositionGuard(store, rules, self.config.guard, clock=clock)
        self.router = router or OrderRouter(
            venue,
            store,
            rules,
            self.config.router,
            clock=clock,
            on_rules_stale=on_rules_stale or self.refresh_rules,
        )
        self._rules_refreshed_ms: int | None = None
        self._mark_price = mark_price
        self._account: tuple[int, Decimal, Decimal] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # The one owner of every leg's state (pyquant.trading.legs): what is in flight on a
        # leg is read there, never inferred from journal rows.
        self.legs = LegBook()
        self.task_failures = 0  # tasks of the desk that ended in an unexpected exception
        self.last_task_failure = ""
        self.deferred_symbols: set[str] = set()  # a live reconcile left them for later
        # client order id -> (pending engine action, its leg, its work token)
        self._actions: dict[str, Any] = {}
        self._exit_tokens: dict[str, tuple[LegKey, str]] = {}
        self._entry_leverage: dict[str, int] = {}
        self._opened: set[str] = set()
        self._exit_failures: dict[str, int] = {}
        # (symbol, leg) -> "liquidation" / "adl": the exchange closed it itself
        self._forced_closes: dict[tuple[str, str], str] = {}
        self._sleep = sleep
        self._latencies_ms: list[float] = []
        self.recent: list[dict[str, object]] = []  # latest actions and rejections, newest last
        # Observers and ownership, set by the daemon when several share the account.
        self.on_note: Callable[[dict[str, object]], None] | None = None
        self.ownership: Callable[[], frozenset[str]] | None = None
        self.adoption_hint: Callable[[str, str], Mapping[str, str] | None] | None = None
        # Told of a non-zero leg on a symbol this desk does not own (someone may have to).
        self.on_unowned_leg: Callable[[str], Awaitable[None]] | None = None
        # Account-wide limits of a shared account (pyquant.scale): a refusal reason or None.
        self.entry_gate: Callable[[Intent, GuardDecision], Awaitable[str | None]] | None = None

    # ---- helpers ----------------------------------------------------------------------------

    def _note(self, kind: str, **fields: object) -> None:
        note = {"kind": kind, "time_ms": self._clock(), **fields}
        self.recent.append(note)
        del self.recent[:-200]
        if self.on_note is not None:
            try:
                self.on_note(note)
            except Exception:  # publishing is a side channel: it never breaks trading
                logger.exception("Note observer failed kind=%s", kind)

    def spawn(self, work: Awaitable[None], name: str) -> asyncio.Task[None]:
        """Run ``work`` as a task the desk owns: drained at stop, a failure logged and counted."""

        async def run() -> None:
            await work

        task = asyncio.get_running_loop().create_task(run(), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self.task_failures += 1
            self.last_task_failure = f"{task.get_name()}: {type(error).__name__}: {error}"
            logger.error(
                "Desk task failed task=%s error=%s",
                task.get_name(),
                error,
                exc_info=(type(error), error, error.__traceback__),
            )
            self._note("task_failed", task=task.get_name(), error=str(error)[:300])

    def _failed(self, what: str, error: BaseException) -> None:
        self.task_failures += 1
        self.last_task_failure = f"{what}: {type(error).__name__}: {error}"
        logger.error("%s failed error=%s", what, error, exc_info=error)

    def _leg_of(self, position: PositionRow) -> LegKey:
        key = (position.symbol, position.position_side)
        leg = self.legs.get(key)
        stale = leg is None or leg.position_id != position.position_id
        if (
            position.status == "open"
            and stale
            and (leg is None or leg.state not in (LegState.OPENING, LegState.FLATTENING))
        ):
            # The journal's open position is the one the leg runs (restart, adoption).
            self.legs.apply(key, Adopted(position.position_id))
        return key

    def has_work_in_flight(self) -> bool:
        """Return True while any task or leg of the desk has work under way."""
        return bool(self._tasks) or bool(self.legs.busy_keys())

    async def check_account_config(self) -> bool | None:
        """Read the account's modes (``GET /fapi/v1/accountConfig``); return Multi-Assets.

        Raises:
            RouterError: Multi-Assets mode is on and the config does not say it is known.
        """
        read = getattr(self.venue, "account_config", None)
        if not callable(read):
            return None
        try:
            document = await read()
        except ExchangeError as exc:
            logger.warning("accountConfig unreadable error=%s", exc)
            return None
        multi = document.get("multiAssetsMargin")
        multi_assets = multi is True or str(multi).lower() == "true"
        if multi_assets and not self.config.allow_multi_assets:
            raise RouterError(
                "the account is in Multi-Assets mode (margin and PnL in several assets): "
                "pyquant's sizing and margin-loss cap assume single-asset USDT margin. Switch it "
                "off (Binance: Preferences > Asset Mode > Single-Asset Mode, or POST "
                "/fapi/v1/multiAssetsMargin multiAssetsMargin=false) or set "
                "[router] allow_multi_assets = true if you know what it changes"
            )
        return multi_assets

    async def leverage_of(self, symbol: str) -> int:
        """Return the symbol's leverage on the account (``GET /fapi/v1/symbolConfig``).

        v3 positionRisk has no leverage (contract 2.5); a wrong one makes the margin-loss cap
        and the over-leverage close wrong by that factor, so failures are said loudly.
        """
        read = getattr(self.venue, "symbol_config", None)
        if callable(read):
            try:
                for row in await read(symbol):
                    if str(row.get("symbol")) == symbol and row.get("leverage") is not None:
                        return int(row["leverage"])
            except (ExchangeError, ValueError, TypeError) as exc:
                logger.warning("symbolConfig unreadable symbol=%s error=%s", symbol, exc)
        for row in await self.venue.position_risk():
            if str(row.get("symbol")) == symbol and row.get("leverage"):
                return int(_dec(row.get("leverage"))) or 1
        logger.error("Leverage unknown, 1 assumed symbol=%s", symbol)
        return 1

    def leg_states(self) -> dict[str, str]:
        """Return ``SYMBOL SIDE -> state[+work]`` for status pages."""
        return {
            f"{key[0]} {key[1]}": leg.state.value
            + (f" ({', '.join(sorted(leg.work))})" if leg.work else "")
            for key, leg in sorted(self.legs.legs.items())
        }

    def owns(self, symbol: str) -> bool:
        """Return whether this desk runs ``symbol`` (always, unless several daemons share)."""
        return self.ownership is None or symbol in self.ownership()

    def _position_for(self, symbol: str, leg: str) -> PositionRow | None:
        for row in self.store.positions(("open",)):
            if row.symbol == symbol and row.position_side == leg and not self.is_paper(row):
                return row
        return None

    def is_paper(self, position: PositionRow) -> bool:
        """Return whether a position exists only on paper (opened by this desk in shadow mode).

        Paper positions are never reconciled against the exchange: it does not hold them.
        """
        return self.config.shadow and position.origin == "entry"

    async def _paper_exit(self, position: PositionRow, action: Any) -> None:  # noqa: ANN401
        filled = Decimal(str(action.quantity))
        self.engine_call("confirm", action, filled_quantity=str(filled))
        remaining = max(_dec(position.quantity) - filled, Decimal(0))
        with self.store.transaction():
            self.store.update_position(position.position_id, quantity=str(remaining))
            self.store.bump("exits", str(action.reason))
        self.save_snapshot()
        self._note(
            "exit",
            position_id=position.position_id,
            symbol=position.symbol,
            position_side=position.position_side,
            reason=str(action.reason),
            quantity=str(filled),
            paper=True,
        )
        if remaining == 0:
            await self._closed(position, str(action.reason))

    def engine_call(self, method: str, *args: object, **kwargs: object) -> object:
        """Call an engine method; an error is logged, never raised (the daemon keeps running).

        Returns:
            The method's result, or None when it raised.
        """
        try:
            return getattr(self.engine, method)(*args, **kwargs)
        except (PyquantError, KeyError, ValueError) as exc:
            logger.warning("Engine call failed method=%s error=%s", method, exc)
            return None

    async def refresh_rules(self, symbol: str = "", code: int = 0) -> bool:
        """Reload exchangeInfo after a filter error (at most once a minute); True if reloaded.

        The new rules are built with the same class as the current ones
        (``from_exchange_info``) and handed to every part (``update_rules``).
        """
        now = self._clock()
        if self._rules_refreshed_ms is not None and now - self._rules_refreshed_ms < 60_000:
            return False
        self._rules_refreshed_ms = now
        build = getattr(type(self.rules), "from_exchange_info", None)
        if build is None:
            return False
        try:
            rules = build(await self.venue.exchange_info())
        except Exception as exc:  # keep trading on the old rules
            logger.warning(
                "Exchange rules refresh failed symbol=%s code=%s error=%s", symbol, code, exc
            )
            return False
        self.update_rules(rules)
        logger.info("Exchange rules refreshed after symbol=%s code=%s", symbol, code)
        return True

    def update_rules(self, rules: DeskRules) -> None:
        """Use refreshed exchange rules everywhere (guard, sizing, router, engine)."""
        self.rules = rules
        self.guard.rules = rules
        self.router.rules = rules
        self.engine_call("update_rules", rules)

    @property
    def mode(self) -> str | None:
        """Return the position mode as last read from the venue."""
        return self.router.mode

    async def refresh_mode(self) -> str:
        """Read the position mode and hand it to the guard."""
        mode = await self.router.refresh_mode()
        self.guard.set_mode(mode)
        return mode

    # ---- intents ----------------------------------------------------------------------------

    def reject_malformed(self, source: str, payload: object, error: IntentError | str) -> None:
        """Record a payload that is not a valid intent (the source keeps running)."""
        detail = str(error)
        self.store.record_malformed_intent(source, payload, "invalid", detail)
        self._note("rejection", reason="invalid", detail=detail, source=source)
        logger.info("Intent rejected source=%s reason=invalid detail=%s", source, detail)

    async def _account_numbers(self) -> tuple[Decimal, Decimal]:
        now = self._clock()
        if self._account is None or now - self._account[0] > self.config.account_ttl_ms:
            document = await self.venue.account()
            equity = _dec(document.get("totalMarginBalance") or document.get("totalWalletBalance"))
            available = _dec(document.get("availableBalance"))
            self._account = (now, equity, available)
        return self._account[1], self._account[2]

    async def _mark(self, symbol: str) -> Decimal | None:
        """Return the symbol's mark: the stream's when fresh, else premiumIndex.

        Raises:
            SizingInputUnavailable: the venue could not be read (retried where safe).
        """
        if self._mark_price is not None:
            price = self._mark_price(symbol)
            if price is not None:
                return price
        rows = await read_input(
            "mark price", lambda: self.venue.premium_index(symbol), sleep=self._sleep
        )
        for row in rows:
            if row.get("symbol") == symbol:
                return _dec(row.get("markPrice")) or None
        return None

    async def submit(self, intent: Intent, *, payload: object = None) -> GuardDecision:
        """Decide one intent and, when accepted, open its position.

        Returns once the decision is recorded and the entry has an outcome (filled, failed,
        or waiting for the user stream).
        """
        early = self.guard.refuse_early(intent, payload=payload)
        if early is not None:
            # A duplicate, halted or stale intent costs no request to the venue.
            return self._refused(intent, early)
        mark: Decimal | None = None
        equity = available = Decimal(0)
        unavailable: SizingInputUnavailable | None = None
        if self.guard.state_known:
            try:
                mark = await self._mark(intent.symbol)
                equity, available = await read_input(
                    "account", self._account_numbers, sleep=self._sleep
                )
            except SizingInputUnavailable as exc:
                # An exchange failure is said as one (code and all), not as a sizing verdict.
                unavailable = exc
                logger.warning(
                    "Sizing inputs unavailable intent_id=%s error=%s", intent.intent_id, exc
                )

        def size(candidate: Intent, leverage: int) -> SizeDecision:
            if unavailable is not None:
                return unavailable_decision(unavailable)
            if mark is None:
                return SizeDecision(False, reason="invalid", detail="no mark price for the symbol")
            return size_entry(
                self.rules,
                self.engine,
                self.config.sizing,
                symbol=candidate.symbol,
                position_side=candidate.position_side,
                price=mark,
                leverage=leverage,
                equity=equity,
                available_margin=available,
                size_usd=candidate.size_usd,
            )

        decision = self.guard.decide(intent, size=size, payload=payload)
        if not decision.accepted:
            return self._refused(intent, decision)
        self._note(
            "accepted",
            intent_id=intent.intent_id,
            symbol=intent.symbol,
            quantity=decision.quantity,
            position_id=decision.position_id,
            intent=intent,
        )
        assert decision.position_id is not None  # noqa: S101 - accepted decisions carry one
        if self.entry_gate is not None:
            refused = await self.entry_gate(intent, decision)
            if refused is not None:
                self._entry_failed(decision.position_id, f"account limit {refused}")
                return decision
        key = (intent.symbol, intent.position_side)
        if self.config.shadow:
            # On paper: the position opens at the mark the sizing used and its exits run
            # (logged, confirmed in the engine), but nothing is sent.
            position = self.store.get_position(decision.position_id)
            if position is None or mark is None or not decision.quantity:
                self._entry_failed(decision.position_id, "shadow mode: no mark to open at")
            else:
                await self._open_filled(position, Decimal(decision.quantity), mark)
            return decision
        # From here to its outcome the entry is work in flight on the leg (OPENING): a live
        # reconciliation leaves it alone, whatever the exchange shows meanwhile.
        self.legs.apply(key, EntryDecided(decision.position_id))
        async with self.legs.lock(key).hold():
            try:
                await self.router.prepare_symbol(intent.symbol, decision.leverage)
            except Exception as exc:  # fail closed whatever the cause; the leg must not stay held
                self._entry_failed(decision.position_id, f"symbol setup failed: {exc}")
                return decision
            self._entry_leverage[decision.position_id] = decision.leverage
            outcome = await self.router.send_entry(
                decision.position_id, intent.symbol, intent.position_side, decision.quantity or "0"
            )
            await self._entry_outcome(decision.position_id, outcome)
        return decision

    def _refused(self, intent: Intent, decision: GuardDecision) -> GuardDecision:
        self._note(
            "rejection",
            intent_id=intent.intent_id,
            symbol=intent.symbol,
            reason=decision.reason,
            detail=decision.detail,
            intent=intent,
        )
        return decision

    def _entry_failed(self, position_id: str, detail: str) -> None:
        position = self.store.get_position(position_id)
        if position is not None:
            self.legs.apply((position.symbol, position.position_side), EntryFailed(position_id))
        self.guard.release(position_id)
        self.store.update_position(
            position_id,
            status="closed",
            closed_at_ms=self._clock(),
            close_reason=f"entry_failed: {detail}",
        )
        self.store.bump("entries_failed")
        self._note("entry_failed", position_id=position_id, detail=detail)
        logger.info("Entry failed position_id=%s detail=%s", position_id, detail)

    async def _entry_outcome(self, position_id: str, outcome: OrderOutcome) -> None:
        position = self.store.get_position(position_id)
        if position is None or position.status != "opening":
            return
        if outcome.state not in FINAL_STATES:
            return  # the user stream will finish it
        if not outcome.filled:
            code = (
                "" if outcome.error_code is None else f" {outcome.error_code}: {outcome.error_msg}"
            )
            self._entry_failed(position_id, f"entry {outcome.state}{code}")
            return
        await self._open_filled(
            position,
            outcome.executed_qty,
            outcome.avg_price,
            opened_at_ms=outcome.time_ms,
            client_order_id=outcome.client_order_id,
        )

    async def _fill_price(self, position: PositionRow, client_order_id: str) -> Decimal | None:
        # The New Order answer may carry no avgPrice (contract 2.5): ask for the order, then
        # for the leg's entry price as the exchange computes it. Never the mark.
        if client_order_id:
            try:
                order = await self.venue.get_order(position.symbol, client_order_id)
            except ExchangeError as exc:
                logger.warning("Entry order lookup failed cid=%s error=%s", client_order_id, exc)
                order = None
            price = _dec((order or {}).get("avgPrice"))
            if price > 0:
                return price
        try:
            rows = await self.venue.position_risk()
        except ExchangeError as exc:
            logger.warning("positionRisk failed error=%s", exc)
            return None
        for row in rows:
            if str(row.get("symbol")) != position.symbol:
                continue
            amount = _dec(row.get("positionAmt"))
            leg = str(row.get("positionSide", "BOTH"))
            if leg == "BOTH":
                leg = "LONG" if amount > 0 else "SHORT"
            price = _dec(row.get("entryPrice"))
            if leg == position.position_side and amount != 0 and price > 0:
                return price
        return None

    async def _open_filled(
        self,
        position: PositionRow,
        quantity: Decimal,
        avg_price: Decimal | None,
        *,
        opened_at_ms: int = 0,
        client_order_id: str = "",
    ) -> None:
        # The REST answer and the user stream may both report the fill: open once.
        if position.position_id in self._opened:
            return
        self._opened.add(position.position_id)
        now = self._clock()
        self._drop_stale_engine_copies(
            position.symbol, position.position_side, keep=position.position_id
        )
        price = avg_price
        if price is None and not self.config.shadow:
            price = await self._fill_price(position, client_order_id)
        if price is None:
            # Nothing on the exchange says the price (every read failed): the position must
            # still be managed; the mark is the only estimate left, and it is said loudly.
            try:
                price = await self._mark(position.symbol)
            except SizingInputUnavailable as exc:
                logger.error("Mark unavailable too error=%s", exc)
            logger.error(
                "Entry price unknown, the mark stands in position_id=%s mark=%s",
                position.position_id,
                price,
            )
            self._note("entry_price_estimated", position_id=position.position_id)
        entry = str(price if price is not None else Decimal(0))
        try:
            self.engine.open_position(
                position.position_id,
                position.symbol,
                position.position_side,
                str(quantity),
                entry,
                leverage=position.leverage,
                confidence=position.confidence,
                # The time stop counts in the exchange's event time: the fill's own time,
                # else the engine stamps the open with the latest mark it saw.
                opened_at_ms=opened_at_ms or None,
            )
        except (PyquantError, KeyError, ValueError):
            # The position exists on the exchange either way: keep it managed as adopted.
            logger.exception(
                "Engine refused the open, adopting position_id=%s", position.position_id
            )
            self.engine_call(
                "adopt_position",
                position.position_id,
                position.symbol,
                position.position_side,
                str(quantity),
                entry,
                leverage=position.leverage,
                opened_at_ms=opened_at_ms or None,
            )
        with self.store.transaction():
            self.store.update_position(
                position.position_id,
                status="open",
                quantity=str(quantity),
                entry_price=entry,
                opened_at_ms=opened_at_ms or self._engine_opened_at(position.position_id) or now,
            )
            self.store.release_reservation(position.position_id)
            self.store.bump("entries")
        key = (position.symbol, position.position_side)
        leg = self.legs.get(key)
        if leg is not None and leg.state == LegState.OPENING:
            self.legs.apply(key, EntryFilled(position.position_id))
        else:
            self.legs.apply(key, Adopted(position.position_id))
        self.save_snapshot()
        self._note(
            "entry",
            position_id=position.position_id,
            symbol=position.symbol,
            side=position.position_side,
            quantity=str(quantity),
            price=entry,
        )
        logger.info(
            "Position opened position_id=%s symbol=%s position_side=%s quantity=%s entry=%s",
            position.position_id,
            position.symbol,
            position.position_side,
            quantity,
            entry,
        )
        await self._sync_backstop(position.position_id)
        # Off the entry's path: the liquidation price only exists once the position does.
        self.spawn(self._refresh_liquidation_quietly(), "liquidation-prices")
        if not self.owns(position.symbol):
            # The symbol's lease went to another daemon while the entry was in flight: the
            # new owner adopts the position; running it here too would double its exits.
            await self.hand_over(position.symbol)

    def _drop_stale_engine_copies(self, symbol: str, leg: str, keep: str = "") -> None:
        # An engine position on this leg whose journal row is not open (closed by another
        # process, or a lost close) would refuse the new one or run exits for nothing.
        try:
            views = list(self.engine.positions())
        except Exception:
            logger.exception("Engine positions() failed")
            return
        for view in views:
            position_id = str(_field(view, "position_id"))
            if position_id == keep:
                continue
            if (str(_field(view, "symbol")), str(_field(view, "position_side"))) != (symbol, leg):
                continue
            row = self.store.get_position(position_id)
            if row is None or row.status != "open":
                logger.warning(
                    "Stale engine position dropped position_id=%s symbol=%s leg=%s",
                    position_id,
                    symbol,
                    leg,
                )
                self.engine_call("close_position", position_id)

    def _engine_has(self, position_id: str) -> bool:
        try:
            views = self.engine.positions()
        except Exception:
            logger.exception("Engine positions() failed")
            return True  # unknown: do not touch
        return any(str(_field(view, "position_id")) == position_id for view in views)

    async def refresh_liquidation_prices(
        self, rows: Sequence[Mapping[str, Any]] | None = None
    ) -> int:
        """Hand the exchange's liquidation prices to the engine (the stop keeps its buffer).

        Args:
            rows: positionRisk rows already read; None reads them.

        Returns:
            How many positions got a price.
        """
        if rows is None:
            try:
                rows = await self.venue.position_risk()
            except ExchangeError as exc:
                logger.warning("Liquidation prices not refreshed error=%s", exc)
                return 0
        prices: dict[tuple[str, str], Decimal] = {}
        for row in rows:
            amount = _dec(row.get("positionAmt"))
            price = _dec(row.get("liquidationPrice"))
            if amount == 0 or price <= 0:
                continue  # cross margin with enough balance reports 0: no liquidation price
            leg = str(row.get("positionSide", "BOTH"))
            if leg == "BOTH":
                leg = "LONG" if amount > 0 else "SHORT"
            mark = _dec(row.get("markPrice"))
            if mark > 0 and (price >= mark if leg == "LONG" else price <= mark):
                # On the leg's profit side: the account (hedged legs sharing one price under
                # cross margin) is liquidated by a move this leg gains from; its stop has
                # nothing to keep clear of.
                continue
            prices[(str(row.get("symbol")), leg)] = price
        applied = 0
        for position in self.store.positions(("open",)):
            liquidation = prices.get((position.symbol, position.position_side))
            if liquidation is None or self.is_paper(position) or not self.owns(position.symbol):
                continue
            try:
                self.engine.set_liquidation_price(position.position_id, str(liquidation))  # type: ignore[attr-defined]
            except (PyquantError, KeyError, ValueError) as exc:
                logger.warning(
                    "Liquidation price refused position_id=%s price=%s error=%s",
                    position.position_id,
                    liquidation,
                    exc,
                )
                continue
            applied += 1
        return applied

    async def _refresh_liquidation_quietly(self) -> None:
        await self.refresh_liquidation_prices()

    def _engine_opened_at(self, position_id: str) -> int | None:
        try:
            view = self.engine.position(position_id)  # type: ignore[attr-defined]
        except Exception:  # an engine without views (tests' doubles): keep the desk's clock
            return None
        opened = None if view is None else _field(view, "opened_at_ms")
        return opened if isinstance(opened, int) else None

    def _engine_adopt(self, position: PositionRow, quantity: Decimal) -> None:
        actions = self.engine_call(
            "adopt_position",
            position.position_id,
            position.symbol,
            position.position_side,
            str(quantity),
            position.entry_price or "0",
            leverage=position.leverage,
            opened_at_ms=position.opened_at_ms,
        )
        if isinstance(actions, list) and actions:
            self.on_actions(actions)

    def _engine_stop(self, position_id: str) -> str | None:
        try:
            views = self.engine.positions()
        except Exception:
            logger.exception("Engine positions() failed")
            return None
        for view in views:
            if str(_field(view, "position_id")) == position_id:
                stop = _field(view, "stop_price")
                return None if stop is None else str(stop)
        return None

    async def _sync_backstop(self, position_id: str, *, force: bool = True) -> None:
        if self.config.shadow or not self.config.router.backstop_enabled:
            return
        position = self.store.get_position(position_id)
        if position is None or position.status != "open" or not self.owns(position.symbol):
            return
        key = self._leg_of(position)
        if not self.legs.accepts(key, "backstop"):
            return  # being flattened or found flat, or a move is already under way
        try:
            # Placement and cancellation of a leg's stop are serialized with its exits and
            # its close: a close can never cancel a stop that is still being placed.
            async with self.legs.lock(key).hold():
                position = self.store.get_position(position_id)
                if position is None or position.status != "open":
                    return
                stop = self._engine_stop(position_id)
                if stop is None:
                    return
                await self.router.backstops.update_backstop(
                    position_id,
                    position.symbol,
                    position.position_side,
                    stop,
                    force=force,
                    quantity=position.quantity,
                )
        except StopWouldTrigger as exc:
            logger.warning(
                "Stop already crossed, closing now position_id=%s error=%s", position_id, exc
            )
            await self._close_now(position_id, "stop_would_trigger")
        except ExchangeError as exc:
            logger.warning("Backstop update failed position_id=%s error=%s", position_id, exc)
        except Exception as exc:  # a bug must not stop the backstops of later positions
            self._failed(f"backstop of {position_id}", exc)
        finally:
            self.legs.apply(key, WorkDone("backstop"))

    async def _close_now(self, position_id: str, reason: str) -> None:
        """Close a leg at market at once (its stop could not be placed: the mark is through it)."""
        position = self.store.get_position(position_id)
        if position is None or position.status != "open":
            return
        key = self._leg_of(position)
        if not self.legs.accepts(key, "close_now"):
            return
        try:
            async with self.legs.lock(key).hold():
                position = self.store.get_position(position_id)
                live = (
                    await self._live_quantity(position.symbol, position.position_side)
                    if position
                    else None
                )
                if position is None or position.status != "open" or live is None:
                    return
                if live > 0:
                    sequence = (self.store.max_sequence(position_id, "flatten") or 0) + 1
                    outcome = await self.router.send_exit(
                        position_id,
                        position.symbol,
                        position.position_side,
                        self.rules.quantize_qty(position.symbol, str(live), True),
                        sequence=sequence,
                        reason=reason,
                        live_quantity=live,
                        kind="flatten",
                    )
                    if not (outcome.flat or outcome.executed_qty >= live):
                        logger.error(
                            "Immediate close incomplete position_id=%s state=%s code=%s",
                            position_id,
                            outcome.state,
                            outcome.error_code,
                        )
                        return
                self.engine_call("close_position", position_id)
                self.store.bump("exits", reason)
                self._note(
                    "exit",
                    position_id=position_id,
                    symbol=position.symbol,
                    position_side=position.position_side,
                    reason=reason,
                    quantity=str(live),
                )
                await self._closed(position, reason)
        finally:
            self.legs.apply(key, WorkDone("close_now"))

    async def sync_backstops(self) -> None:
        """Timer work: record due closes, retry failed cancels, move backstops (throttled).

        Closes of legs found flat are recorded once their evidence came or their grace ran
        out; every backstop moves toward the engine's current stop.
        """
        await self.settle_closing()
        if not self.config.shadow:
            try:
                await self.router.backstops.retry_cancels()
            except Exception as exc:
                self._failed("backstop cancel retry", exc)
        for position in self.store.positions(("open",)):
            await self._sync_backstop(position.position_id, force=False)

    # ---- exits ------------------------------------------------------------------------------

    def on_actions(self, actions: Sequence[Any], *, received_at_ns: int | None = None) -> None:
        """Schedule the exit engine's actions (never blocks the market task).

        Each action is work in flight on its leg from this moment (through any retry pause)
        until its order is final; a leg being flattened or found flat refuses it.
        """
        for action in actions:
            key = (str(action.symbol), str(action.position_side))
            token = f"exit:{action.sequence}"
            position = self.store.get_position(str(action.position_id))
            if position is not None and position.status == "open":
                self._leg_of(position)
            leg = self.legs.get(key)
            if leg is not None and token in leg.work:
                continue  # emitted again while the first is still running
            if (
                leg is None
                or leg.position_id != str(action.position_id)
                or not self.legs.accepts(key, token)
            ):
                logger.info(
                    "Action refused by its leg position_id=%s reason=%s state=%s",
                    action.position_id,
                    action.reason,
                    None if leg is None else leg.state,
                )
                self.engine_call("reject", action)
                continue
            self.spawn(self._run_exit(action, received_at_ns, key, token), f"exit-{token}")

    async def _run_exit(
        self,
        action: Any,  # noqa: ANN401
        received_at_ns: int | None,
        key: LegKey | None = None,
        token: str = "",
    ) -> None:
        key = key or (str(action.symbol), str(action.position_side))
        token = token or f"exit:{action.sequence}"
        done = True
        try:
            done = await self._exit_work(action, received_at_ns, key)
        except Exception as exc:
            # Whatever failed (a bad answer, a rules error), the action goes back to the
            # engine so the leg is not stuck with a pending close nobody runs.
            self._failed(f"exit {action.position_id}:{action.sequence}", exc)
            self.engine_call("reject", action)
            position_id = str(action.position_id)
            self._exit_failures[position_id] = self._exit_failures.get(position_id, 0) + 1
        finally:
            if done:
                self.legs.apply(key, WorkDone(token))
            else:
                cid = self._pending_cid(action)
                if cid:
                    self._exit_tokens[cid] = (key, token)
                else:
                    self.legs.apply(key, WorkDone(token))

    def _pending_cid(self, action: Any) -> str:  # noqa: ANN401
        for cid, pending in self._actions.items():
            if pending is action:
                return cid
        return ""

    async def _exit_work(self, action: Any, received_at_ns: int | None, key: LegKey) -> bool:  # noqa: ANN401
        # Returns False when the order is still live (its user-stream update settles it).
        position_id = str(action.position_id)
        failures = self._exit_failures.get(position_id, 0)
        if failures and not self.config.shadow:
            # The engine re-emits a rejected exit on the next tick; pace the retries so a
            # persistent refusal cannot turn into an order storm.
            await self._sleep(min(0.25 * 2 ** (failures - 1), 30.0))
        async with self.legs.lock(key).hold():
            position = self.store.get_position(position_id)
            leg = self.legs.get(key)
            if (
                position is None
                or position.status != "open"
                or leg is None
                or leg.position_id != position_id
                or leg.state in (LegState.FLATTENING, LegState.CLOSING)
                or not self.owns(position.symbol)
            ):
                # Closed, handed to a peer or being flattened while this waited: not ours to sell.
                logger.warning(
                    "Action for a position no longer run here dropped position_id=%s", position_id
                )
                self.engine_call("reject", action)
                return True
            if self.config.shadow:
                self._note(
                    "exit_shadow",
                    position_id=position_id,
                    reason=action.reason,
                    quantity=action.quantity,
                )
                if self.is_paper(position):
                    await self._paper_exit(position, action)
                else:
                    # A real position (adopted) in shadow mode: nothing is sent, it stays open.
                    self.engine_call("reject", action)
                return True
            replayed = self._replayed_fill(position_id, action)
            if replayed is not None:
                await self._exit_filled(position_id, action, replayed[1], replayed[0])
                return True
            if not failures and received_at_ns is not None:
                self._latencies_ms.append((time.perf_counter_ns() - received_at_ns) / 1e6)
                del self._latencies_ms[:-10_000]

            def live() -> Decimal:
                row = self.store.get_position(position_id)
                return Decimal(0) if row is None else _dec(row.quantity)

            outcome = await self.router.send_exit(
                position_id,
                position.symbol,
                position.position_side,
                action.quantity,
                sequence=int(action.sequence),
                reason=str(action.reason),
                live_quantity=live,
            )
            if outcome.client_order_id:
                self._actions[outcome.client_order_id] = action
            await self._exit_outcome(position_id, action, outcome)
            return outcome.flat or outcome.state in FINAL_STATES

    def _replayed_fill(self, position_id: str, action: Any) -> tuple[str, Decimal] | None:  # noqa: ANN401
        # After a restart the restored engine may emit again an action whose order filled
        # while the daemon was down (same position, sequence and reason): confirm that fill
        # instead of sending a second order.
        for row in self.store.orders(position_id=position_id, kind="exit"):
            if (
                row.sequence == int(action.sequence)
                and row.reason == str(action.reason)
                and not row.engine_applied
                and _dec(row.executed_qty) > 0
                and OrderState(row.status) in FINAL_STATES
            ):
                return row.client_order_id, _dec(row.executed_qty)
        return None

    async def _exit_outcome(self, position_id: str, action: Any, outcome: OrderOutcome) -> None:  # noqa: ANN401
        if outcome.flat:
            await self._check_flat(position_id, action)
            return
        if outcome.state not in FINAL_STATES:
            return  # NEW after an unknown outcome: the stream finishes it
        self._actions.pop(outcome.client_order_id, None)
        if not outcome.filled and outcome.skipped and outcome.error_msg == "lease_fenced":
            # Not the venue's refusal: our lease may lapse, so nothing is sent until it is
            # renewed. No retry pause builds up meanwhile (the exchange stop covers the leg).
            self.engine_call("reject", action)
            return
        if not outcome.filled:
            self.engine_call("reject", action)
            self._exit_failures[position_id] = self._exit_failures.get(position_id, 0) + 1
            self._note(
                "exit_rejected",
                position_id=position_id,
                reason=str(action.reason),
                code=outcome.error_code,
            )
            return
        await self._exit_filled(position_id, action, outcome.executed_qty, outcome.client_order_id)

    async def _exit_filled(
        self,
        position_id: str,
        action: Any,  # noqa: ANN401
        filled: Decimal,
        client_order_id: str,
    ) -> None:
        self._exit_failures.pop(position_id, None)
        self.engine_call("confirm", action, filled_quantity=str(filled))
        self.save_snapshot()
        position = self.store.get_position(position_id)
        if position is None:
            return
        remaining = max(_dec(position.quantity) - filled, Decimal(0))
        if remaining > 0 and not self._engine_has(position_id):
            # The engine took this as the full close but the exchange still holds a rest
            # (our view of the size was larger): keep that rest managed.
            live = await self._live_quantity(position.symbol, position.position_side)
            remaining = remaining if live is None else live
            if remaining > 0:
                self._engine_adopt(position, remaining)
        with self.store.transaction():
            self.store.update_order(client_order_id, engine_applied=True)
            self.store.update_position(position_id, quantity=str(remaining))
            self.store.bump("exits", str(action.reason))
        self._note(
            "exit",
            position_id=position_id,
            symbol=position.symbol,
            position_side=position.position_side,
            reason=str(action.reason),
            quantity=str(filled),
        )
        if remaining == 0:
            await self._closed(position, str(action.reason))
        else:
            await self._sync_backstop(position_id)

    def _note_forced_close(self, symbol: str, leg: str, reason: str) -> None:
        # The stream runs behind REST: our exit may already have found the leg flat (-2022).
        # A leg waiting for its evidence takes it now (settle_closing records it); an older
        # close under a vaguer reason is renamed; else the reason waits for the close.
        waiting = self.legs.get((symbol, leg))
        if waiting is not None and waiting.state == LegState.CLOSING:
            self.legs.apply((symbol, leg), CloseEvidence(reason))
            return
        recent = self._clock() - 120_000
        for position in reversed(self.store.positions(("closed",))):
            if (position.symbol, position.position_side) != (symbol, leg):
                continue
            if (
                position.close_reason in ("already_flat", "external")
                and (position.closed_at_ms or 0) >= recent
            ):
                with self.store.transaction():
                    self.store.update_position(position.position_id, close_reason=reason)
                    if position.close_reason == "external":
                        self.store.bump("exits", "external", -1)
                    self.store.bump("exits", reason)
                logger.warning(
                    "Position closed by the exchange position_id=%s reason=%s",
                    position.position_id,
                    reason,
                )
                return
            break
        self._forced_closes[(symbol, leg)] = reason

    async def _check_flat(self, position_id: str, action: Any) -> None:  # noqa: ANN401
        position = self.store.get_position(position_id)
        if position is None:
            return
        live = await self._live_quantity(position.symbol, position.position_side)
        if live is not None and live == 0:
            forced = self._forced_closes.pop((position.symbol, position.position_side), "")
            await self._found_flat(position, forced)
        else:
            self.engine_call("reject", action)
            if live is not None:
                self.store.update_position(position_id, quantity=str(live))

    async def _found_flat(self, position: PositionRow, reason: str) -> None:
        """Record a leg the exchange shows flat: now when its cause is known.

        Otherwise once the evidence arrives or ``close_grace_ms`` passes (``settle_closing``).
        """
        self.engine_call("close_position", position.position_id)
        key = self._leg_of(position)
        leg = self.legs.apply(key, FoundFlat(reason, self._clock()))
        if reason or leg is None or self.config.close_grace_ms <= 0:
            await self._finish_close(position, reason or "already_flat")

    async def _finish_close(self, position: PositionRow, reason: str) -> None:
        current = self.store.get_position(position.position_id)
        if current is None or current.status != "open":
            return
        if reason != "already_flat":
            self.store.bump("exits", reason)
        await self._closed(current, reason)

    async def settle_closing(self) -> None:
        """Record the closes of legs found flat whose evidence came or whose grace ran out."""
        now = self._clock()
        for leg in self.legs.closing():
            if leg.close_reason or now - leg.flat_since_ms >= self.config.close_grace_ms:
                reason = leg.close_reason or "already_flat"
                position = self.store.get_position(leg.position_id)
                if position is None or position.status != "open":
                    self.legs.apply(leg.key, Closed(reason))
                    continue
                await self._finish_close(position, reason)

    async def _live_quantity(self, symbol: str, leg: str) -> Decimal | None:
        try:
            rows = await self.venue.position_risk()
        except ExchangeError as exc:
            logger.warning("positionRisk failed error=%s", exc)
            return None
        return legs_from_rows(rows).get((symbol, leg), Decimal(0))

    async def _closed(self, position: PositionRow, reason: str) -> None:
        key = (position.symbol, position.position_side)
        leg = self.legs.get(key)
        if leg is not None and leg.position_id == position.position_id:
            # Before any await: a new entry on the leg starts from a closed leg, and waits for
            # the lock below, so the old position's stops go before the new one's go in.
            self.legs.apply(key, Closed(reason))
        with self.store.transaction():
            self.store.update_position(
                position.position_id,
                status="closed",
                quantity="0",
                closed_at_ms=self._clock(),
                close_reason=reason,
            )
            self.guard.start_cooldown(position.symbol, position.position_side)
        self.save_snapshot()
        self._note(
            "closed",
            position_id=position.position_id,
            symbol=position.symbol,
            position_side=position.position_side,
            reason=reason,
        )
        logger.info("Position closed position_id=%s reason=%s", position.position_id, reason)
        if not self.config.shadow:
            async with self.legs.lock(key).hold():
                await self.router.backstops.cancel_backstops(position.position_id)
                if self.owns(position.symbol) and self._position_for(*key) is None:
                    try:
                        await self.router.backstops.retire_leg_stops(*key)
                    except ExchangeError as exc:
                        logger.warning("Leftover stops not checked symbol=%s error=%s", key[0], exc)

    # ---- user stream ------------------------------------------------------------------------

    async def on_user_event(self, event: Mapping[str, Any]) -> None:
        """Apply one decoded user-data event (unknown kinds are ignored)."""
        kind = event.get("e")
        if kind == "ORDER_TRADE_UPDATE":
            await self._on_order(event.get("o") or {}, int(event.get("E") or 0))
        elif kind == "ALGO_UPDATE":
            self.router.on_algo_update(event.get("o") or {}, int(event.get("E") or 0))
        elif kind == "ACCOUNT_UPDATE":
            await self._on_account(event.get("a") or {})
        elif kind == "TRADE_LITE":
            pass  # ORDER_TRADE_UPDATE carries the same fill; fills dedupe on trade id anyway

    async def _on_order(self, order: Mapping[str, Any], event_time_ms: int) -> None:
        cid = str(order.get("c", ""))
        before = self.store.get_order(cid)
        if before is None and not self.owns(str(order.get("s"))):
            return  # another daemon's symbol: its owner records it
        trade_id = order.get("t")
        forced = _forced_close_reason(cid)
        if forced is not None and order.get("X") == "FILLED":
            leg = str(order.get("ps", "BOTH"))
            if leg == "BOTH":
                leg = "LONG" if order.get("S") == "SELL" else "SHORT"
            self._note_forced_close(str(order.get("s")), leg, forced)
        # A liquidation's fill comes as x=CALCULATED, not TRADE: it is a fill all the same.
        if order.get("x") in ("TRADE", "CALCULATED") and trade_id not in (None, 0, "0"):
            fill = Fill(
                symbol=str(order.get("s")),
                trade_id=str(trade_id),
                client_order_id=cid or None,
                exchange_order_id=None if order.get("i") is None else str(order["i"]),
                side=str(order.get("S")),
                position_side=str(order.get("ps")),
                price=str(order.get("L", "0")),
                quantity=str(order.get("l", "0")),
                commission=str(order.get("n") or "0"),
                commission_asset=None if order.get("N") is None else str(order["N"]),
                realized_pnl=str(order.get("rp") or "0"),
                time_ms=int(order.get("T") or event_time_ms),
            )
            if self.store.add_fill(fill):
                self._note(
                    "fill",
                    symbol=fill.symbol,
                    client_order_id=fill.client_order_id,
                    side=fill.side,
                    position_side=fill.position_side,
                    price=fill.price,
                    quantity=fill.quantity,
                    commission=fill.commission,
                    realized_pnl=fill.realized_pnl,
                    trade_id=fill.trade_id,
                )
        row = self.router.on_order_update(order, event_time_ms)
        if row is None or before is None:
            return
        became_final = (
            OrderState(before.status) not in FINAL_STATES and OrderState(row.status) in FINAL_STATES
        )
        if not became_final:
            return
        outcome = OrderOutcome(
            row.client_order_id,
            OrderState(row.status),
            _dec(row.executed_qty),
            _dec(row.avg_price) or None,
            time_ms=row.exchange_time_ms,
        )
        if row.kind == "entry":
            await self._entry_outcome(row.position_id, outcome)
        elif row.kind == "exit":
            action = self._actions.pop(row.client_order_id, None)
            work = self._exit_tokens.pop(row.client_order_id, None)
            if action is not None:
                # Off the user-stream task: the leg's lock may be held by other work.
                self.spawn(self._settle_exit(row.position_id, action, outcome, work), "exit-settle")
            elif work is not None:
                self.legs.apply(work[0], WorkDone(work[1]))

    async def _settle_exit(
        self,
        position_id: str,
        action: Any,  # noqa: ANN401
        outcome: OrderOutcome,
        work: tuple[LegKey, str] | None,
    ) -> None:
        key = work[0] if work is not None else (str(action.symbol), str(action.position_side))
        try:
            async with self.legs.lock(key).hold():
                await self._exit_outcome(position_id, action, outcome)
        finally:
            if work is not None:
                self.legs.apply(work[0], WorkDone(work[1]))

    async def _on_account(self, account: Mapping[str, Any]) -> None:
        rows = account.get("P") or []
        changed: dict[tuple[str, str], tuple[Decimal, Decimal]] = {}
        for row in rows:
            symbol = str(row.get("s"))
            amount = _dec(row.get("pa"))
            entry = _dec(row.get("ep"))
            leg = str(row.get("ps", "BOTH"))
            if leg == "BOTH":
                changed[(symbol, "LONG")] = (max(amount, Decimal(0)), entry)
                changed[(symbol, "SHORT")] = (max(-amount, Decimal(0)), entry)
            else:
                changed[(symbol, leg)] = (abs(amount), entry)
        for (symbol, leg), (quantity, entry) in changed.items():
            if self.owns(symbol):
                await self._reconcile_leg(symbol, leg, quantity, entry)
            elif quantity > 0 and self.on_unowned_leg is not None:
                await self.on_unowned_leg(symbol)

    def is_busy(self, symbol: str, leg: str) -> bool:
        """Return True while work of ours on (symbol, leg) is in flight (the leg's owner says)."""
        if not self.legs.is_idle((symbol, leg)):
            return True
        # Orders the journal holds live (a restart's leftovers) count as in flight too.
        for row in self.store.positions(("opening", "open")):
            if row.symbol == symbol and row.position_side == leg:
                if row.status == "opening":
                    return True
                if any(
                    o.kind in ("exit", "flatten") and OrderState(o.status) not in FINAL_STATES
                    for o in self.store.orders(position_id=row.position_id)
                ):
                    return True
        return False

    async def _reconcile_leg(
        self, symbol: str, leg: str, quantity: Decimal, entry: Decimal
    ) -> None:
        if self.is_busy(symbol, leg):
            return  # our own order in flight: its outcome will settle the leg
        # Under the leg's owner: a takeover reconciliation adopting the same leg waits.
        async with self.legs.lock((symbol, leg)).hold():
            await self._reconcile_idle_leg(symbol, leg, quantity, entry)

    async def _reconcile_idle_leg(
        self, symbol: str, leg: str, quantity: Decimal, entry: Decimal
    ) -> None:
        position = self._position_for(symbol, leg)
        known = Decimal(0) if position is None else _dec(position.quantity)
        if quantity == known:
            return
        # The stream can run behind REST (events queued while our own orders settled): a
        # stale update must not adopt a leg we already closed, nor drop one we hold. The
        # venue's answer decides; the event's only when the venue cannot be asked.
        live = await self._live_quantity(symbol, leg)
        if live is not None:
            if self.is_busy(symbol, leg):
                return
            quantity = live
            position = self._position_for(symbol, leg)
            known = Decimal(0) if position is None else _dec(position.quantity)
            if quantity == known:
                return
        if position is None:
            if quantity > 0:
                await self.adopt(symbol, leg, quantity, entry)
            return
        if quantity == 0:
            # Our exchange-side backstop (ALGO_UPDATE TRIGGERED/FINISHED) or someone else.
            orders = self.store.orders(position_id=position.position_id)
            flattened = any(o.kind == "flatten" and o.status == OrderState.FILLED for o in orders)
            triggered = any(
                o.kind == "backstop" and o.status in (OrderState.TRIGGERED, OrderState.FILLED)
                for o in orders
            )
            # Our kill switch's close, seen on the stream before the flatten itself settled
            # the position: count it once, as what it was.
            reason = "flatten" if flattened else "backstop" if triggered else ""
            reason = self._forced_closes.pop((symbol, leg), reason)
            self._note(
                "exit",
                position_id=position.position_id,
                symbol=symbol,
                position_side=leg,
                reason=reason or "external",
                quantity=position.quantity,
            )
            # The stream's own order puts the closing fill before this update, so the
            # reason is known here; only our REST answers (-2022) can run ahead of it.
            await self._found_flat(position, reason or "external")
        elif quantity != _dec(position.quantity):
            if self._engine_has(position.position_id):
                self.engine_call("resize_position", position.position_id, str(quantity))
            else:
                self._engine_adopt(position, quantity)
            self.store.update_position(position.position_id, quantity=str(quantity))
            self.save_snapshot()

    async def adopt(
        self,
        symbol: str,
        leg: str,
        quantity: Decimal,
        entry: Decimal,
        leverage: int | None = None,
    ) -> str:
        """Adopt a position opened elsewhere under the exit policy; return its position id.

        When ``adoption_hint`` knows the leg (a peer daemon ran it and published its exit
        state), the ladder progress, best price and open time carry over, so the stop resumes
        where it was: a takeover never loosens it.
        """
        async with self.legs.lock((symbol, leg)).hold():
            held = self._position_for(symbol, leg)
            if held is not None:
                # Adopted meanwhile (an account update and a takeover both saw the leg): one
                # position per leg, never two copies in the engine.
                logger.info("Leg already adopted symbol=%s leg=%s", symbol, leg)
                return held.position_id
            return await self._adopt_idle_leg(symbol, leg, quantity, entry, leverage)

    async def _adopt_idle_leg(
        self, symbol: str, leg: str, quantity: Decimal, entry: Decimal, leverage: int | None
    ) -> str:
        if leverage is None:
            leverage = await self.leverage_of(symbol)
        self._drop_stale_engine_copies(symbol, leg)
        position_id = position_id_text(self.store.next_position_number())
        now = self._clock()
        hinted_open, extra = self._adoption_extra(symbol, leg, quantity, entry)

        def adopt_in_engine(opened_at_ms: int | None, **hint: str) -> object:
            return self.engine.adopt_position(
                position_id,
                symbol,
                leg,
                str(quantity),
                str(entry),
                leverage=leverage,
                opened_at_ms=opened_at_ms,
                **hint,
            )

        try:
            actions = adopt_in_engine(hinted_open, **extra)
        except (PyquantError, KeyError, ValueError) as exc:
            if not extra:
                raise
            logger.warning("Adoption hint refused symbol=%s leg=%s error=%s", symbol, leg, exc)
            actions = adopt_in_engine(None)
        self.store.upsert_position(
            PositionRow(
                position_id,
                symbol,
                leg,
                "open",
                "adopted",
                str(quantity),
                str(entry),
                leverage,
                None,
                None,
                self._engine_opened_at(position_id) or now,
                None,
                None,
            )
        )
        self.store.bump("adopted")
        self.legs.apply((symbol, leg), Adopted(position_id))
        self.save_snapshot()
        self._note(
            "adopted", position_id=position_id, symbol=symbol, side=leg, quantity=str(quantity)
        )
        logger.info(
            "Position adopted position_id=%s symbol=%s position_side=%s quantity=%s",
            position_id,
            symbol,
            leg,
            quantity,
        )
        await self._sync_backstop(position_id)
        if isinstance(actions, list) and actions:
            # e.g. over-leveraged for the policy, or a ladder level already passed
            self.on_actions(actions)
        return position_id

    def _adoption_extra(
        self, symbol: str, leg: str, quantity: Decimal, entry: Decimal
    ) -> tuple[int | None, dict[str, str]]:
        hint = self.adoption_hint(symbol, leg) if self.adoption_hint is not None else None
        if not hint:
            return None, {}
        try:
            hinted_entry = Decimal(str(hint["entry_price"]))
            original = Decimal(str(hint["original_quantity"]))
            best = Decimal(str(hint["best_price"]))
            opened_at = int(str(hint["opened_at_ms"]))
        except (KeyError, ArithmeticError, ValueError) as exc:
            logger.warning("Adoption hint unreadable symbol=%s leg=%s error=%s", symbol, leg, exc)
            return None, {}
        if hinted_entry != entry or best <= 0:
            # Another position than the one the hint describes (closed and reopened since).
            logger.info("Adoption hint stale symbol=%s leg=%s", symbol, leg)
            return None, {}
        return opened_at, {
            "original_quantity": str(max(original, quantity)),
            "best_price": str(best),
        }

    async def hand_over(self, symbol: str, owner: str = "") -> list[str]:
        """Stop running ``symbol``: another daemon owns it now and adopts its positions.

        Nothing is sent: the positions stay open on the exchange with their backstops (the
        new owner retires those once its own are in place). Work in flight on a leg (an exit,
        a backstop move) finishes first, under the leg's lock; an exit still waiting for its
        turn then finds the leg handed over and sends nothing.

        Returns:
            The position ids handed over.
        """
        handed: list[str] = []
        for position in self.store.positions(("open",)):
            if position.symbol != symbol:
                continue
            key = self._leg_of(position)
            async with self.legs.lock(key).hold():
                current = self.store.get_position(position.position_id)
                if current is None or current.status != "open":
                    continue
                self.engine_call("close_position", position.position_id)
                self.store.update_position(
                    position.position_id,
                    status="closed",
                    closed_at_ms=self._clock(),
                    close_reason=f"handed_over{':' + owner if owner else ''}",
                )
                leg = self.legs.get(key)
                if leg is not None and leg.position_id == position.position_id:
                    self.legs.apply(key, HandedOver(owner))
                self.router.backstops.forget_backstop(position.position_id)
            handed.append(position.position_id)
            self._note(
                "handed_over",
                position_id=position.position_id,
                symbol=symbol,
                position_side=position.position_side,
                quantity=current.quantity,
                owner=owner,
            )
            logger.info(
                "Position handed over position_id=%s symbol=%s new_owner=%s",
                position.position_id,
                symbol,
                owner or "?",
            )
        if handed:
            self.save_snapshot()
        return handed

    async def settle_pending_actions(self, *, live: bool = False) -> dict[str, str]:
        """Settle actions a restored engine holds as pending, from the journal (at restart).

        For each: its exit filled -> confirmed with the fill; its order still live -> left
        to the user stream; never sent, refused or never placed -> given back to the engine,
        which emits it again if it is still due. Returns ``position:sequence -> what``.

        ``live``: the desk is running; an action whose leg has work in flight (its exit task,
        perhaps waiting out a retry pause) belongs to that work and is left alone.
        """
        settled: dict[str, str] = {}
        pending = self.engine_call("pending_actions")
        for action in pending if isinstance(pending, list) else []:
            position_id = str(action.position_id)
            key = f"{position_id}:{action.sequence}"
            leg_key = (str(action.symbol), str(action.position_side))
            if live and not self.legs.is_idle(leg_key):
                settled[key] = "in_flight"
                continue
            rows = [
                row
                for row in self.store.orders(position_id=position_id)
                if row.kind in ("exit", "flatten") and row.sequence == int(action.sequence)
            ]
            last = rows[-1] if rows else None
            if last is None:
                self.engine_call("reject", action)
                settled[key] = "given_back"
            elif OrderState(last.status) not in FINAL_STATES:
                self._actions[last.client_order_id] = action
                settled[key] = "live"
            elif _dec(last.executed_qty) > 0 and not last.engine_applied:
                await self._exit_filled(
                    position_id, action, _dec(last.executed_qty), last.client_order_id
                )
                settled[key] = "confirmed"
            elif last.engine_applied:
                settled[key] = "applied"
            else:
                self.engine_call("reject", action)
                settled[key] = "given_back"
        return settled

    # ---- state ------------------------------------------------------------------------------

    def on_stream_lost(self, reason: str) -> None:
        """Refuse entries until the next reconciliation (fail closed)."""
        self.guard.mark_state_unknown(reason)

    def save_snapshot(self) -> None:
        """Store the engine's snapshot."""
        self.store.save_snapshot(self.engine.snapshot())

    async def flatten(self) -> list[FlattenStep]:
        """Kill switch: close every position, then cancel our orders; report each step.

        Every leg is FLATTENING first (its exits and backstop moves refused from then on;
        those in flight finish), the router closes each leg from the quantity it reads under
        the leg's lock before any protection is cancelled, and a leg whose close failed
        returns to its exits. In shadow mode nothing is sent: paper positions close on paper.
        """
        self.guard.mark_state_unknown("flatten in progress")
        if self.config.shadow:
            steps = []
            for position in self.store.positions(("open",)):
                if not self.is_paper(position):
                    continue
                self.engine_call("close_position", position.position_id)
                self.store.bump("exits", "flatten")
                await self._closed(position, "flatten")
                steps.append(
                    FlattenStep(
                        "close", position.symbol, position.position_side, "", True, "on paper"
                    )
                )
            return steps
        scope = self.ownership() if self.ownership is not None else None
        known: dict[tuple[str, str], str] = {}
        flattening: list[LegKey] = []
        for position in self.store.positions(("open",)):
            if scope is not None and position.symbol not in scope:
                continue
            key = self._leg_of(position)
            known[key] = position.position_id
            self.legs.apply(key, FlattenStarted())
            flattening.append(key)
        try:
            steps = await self.router.flatten(known, symbols=scope)
            for step in steps:
                logger.info(
                    "Flatten step=%s symbol=%s position_side=%s ok=%s detail=%s",
                    step.step,
                    step.symbol,
                    step.position_side,
                    step.ok,
                    step.detail,
                )
            legs = legs_from_rows(await self.venue.position_risk())
            for position in self.store.positions(("open",)):
                if scope is not None and position.symbol not in scope:
                    continue
                if legs.get((position.symbol, position.position_side), Decimal(0)) == 0:
                    self.engine_call("close_position", position.position_id)
                    self.store.bump("exits", "flatten")
                    await self._closed(position, "flatten")
        finally:
            for key in flattening:
                self.legs.apply(key, FlattenEnded())
        return steps

    async def drain(self) -> None:
        """Wait for every scheduled exit to finish (clean stop: no half-sent order)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        self.save_snapshot()

    def summary(self) -> dict[str, object]:
        """Return the run summary (the keys of issue 5's ``--summary-json``)."""
        latencies = sorted(self._latencies_ms)

        def pct(p: float) -> float | None:
            if not latencies:
                return None
            return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))], 3)

        return {
            "intents_accepted": self.store.counter("intents_accepted"),
            "intents_rejected": self.store.counters("intents_rejected"),
            "entries": self.store.counter("entries"),
            "exits": self.store.counters("exits"),
            "realized_pnl": str(self.store.realized_pnl()),
            "order_rejections": self.store.counters("order_rejections"),
            "open_positions": len(self.store.positions(("open",))),
            "latency_ms": {"p50": pct(0.50), "p99": pct(0.99)},
            "position_mode": self.router.mode,
        }


def _forced_close_reason(client_order_id: str) -> str | None:
    # Binance names the orders it sends itself (contract, ORDER_TRADE_UPDATE ``c``).
    if client_order_id.startswith("autoclose-"):
        return "liquidation"
    if client_order_id.startswith("adl_autoclose"):
        return "adl"
    return None


def legs_from_rows(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], Decimal]:
    """Return (symbol, leg) -> absolute quantity from positionRisk rows (both modes)."""
    legs: dict[tuple[str, str], Decimal] = {}
    for row in rows:
        amount = _dec(row.get("positionAmt"))
        if amount == 0:
            continue
        symbol = str(row.get("symbol"))
        leg = str(row.get("positionSide", "BOTH"))
        if leg == "BOTH":
            leg = "LONG" if amount > 0 else "SHORT"
        legs[(symbol, leg)] = abs(amount)
    return legs
