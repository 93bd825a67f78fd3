"""The trading desk's shared state: its settings, what it needs of the engine, and the helpers.

``DeskCore`` holds what every part of the desk works on: the venue, the journal, the rules,
the engine, the guard, the router and the leg book (``pyquant.trading.legs``), and the
helpers they share: task spawning and failure notes, ownership of symbols (several daemons on
one account), rules and position-mode refreshes, engine calls, liquidation prices and the
snapshot. Entries (``desk``), exits (``desk_exits``) and reconciliation (``desk_reconcile``)
are built on it. It decides nothing and sends no order itself; a leg's state changes only
through ``LegBook`` (``next_leg_state``).
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
from pyquant.trading.guard import GuardConfig, GuardDecision, PositionGuard
from pyquant.trading.intents import Intent
from pyquant.trading.journal import PositionRow, Store
from pyquant.trading.legs import Adopted, LegBook, LegKey, LegState
from pyquant.trading.orders import RouterError
from pyquant.trading.router import OrderRouter, RouterConfig
from pyquant.trading.sizing import SizingConfig

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


def now_ms() -> int:
    """Return the wall clock in milliseconds (the desk's default clock)."""
    return time.time_ns() // 1_000_000


def as_decimal(value: object, default: Decimal = Decimal(0)) -> Decimal:
    """Return ``value`` as a Decimal, ``default`` when it is empty or not a number."""
    if value is None or value == "":
        return default
    try:
        return Decimal(str(value))
    except InvalidOperation:
        return default


def field_of(obj: object, name: str) -> object:
    """Return ``name`` of a mapping or an object (engine views come as either)."""
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


class DeskCore:
    """The desk's shared state and helpers; see the module docstring."""

    def __init__(
        self,
        venue: Venue,
        store: Store,
        rules: DeskRules,
        engine: EngineLike,
        config: DeskConfig | None = None,
        *,
        clock: Callable[[], int] = now_ms,
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
                return int(as_decimal(row.get("leverage"))) or 1
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

    def _drop_stale_engine_copies(self, symbol: str, leg: str, keep: str = "") -> None:
        # An engine position on this leg whose journal row is not open (closed by another
        # process, or a lost close) would refuse the new one or run exits for nothing.
        try:
            views = list(self.engine.positions())
        except Exception:
            logger.exception("Engine positions() failed")
            return
        for view in views:
            position_id = str(field_of(view, "position_id"))
            if position_id == keep:
                continue
            if (str(field_of(view, "symbol")), str(field_of(view, "position_side"))) != (
                symbol,
                leg,
            ):
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
        return any(str(field_of(view, "position_id")) == position_id for view in views)

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
            amount = as_decimal(row.get("positionAmt"))
            price = as_decimal(row.get("liquidationPrice"))
            if amount == 0 or price <= 0:
                continue  # cross margin with enough balance reports 0: no liquidation price
            leg = str(row.get("positionSide", "BOTH"))
            if leg == "BOTH":
                leg = "LONG" if amount > 0 else "SHORT"
            mark = as_decimal(row.get("markPrice"))
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
        opened = None if view is None else field_of(view, "opened_at_ms")
        return opened if isinstance(opened, int) else None

    def on_stream_lost(self, reason: str) -> None:
        """Refuse entries until the next reconciliation (fail closed)."""
        self.guard.mark_state_unknown(reason)

    def save_snapshot(self) -> None:
        """Store the engine's snapshot."""
        self.store.save_snapshot(self.engine.snapshot())
