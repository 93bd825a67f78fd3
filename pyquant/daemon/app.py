"""The streaming daemon: one process, one ``asyncio.TaskGroup``, a clean stop.

Wiring (architecture.md, "Data flow")::

    market websocket ──bytes──► engine.on_mark_message ──actions──► desk.on_actions ──► router
    user websocket ──events──► desk.on_user_event (store, engine, router order states)
    intent sources ──payload──► parse_intent ──► desk.submit (guard ► sizing ► router)
    timers: engine snapshot into the store; backstop moves (throttled by the router)

Start-up, in order: open the venue (the in-process simulator by default), load exchangeInfo
into ``pyquant.ExchangeRules``, open the store, restore the engine from its last snapshot
(or build it from the exit policy), read the position mode, warm ATR up from
``markPriceKlines``, connect the user stream, reconcile with the exchange
(``pyquant.trading.recovery``), then start the market stream and the intent sources.

Stop (SIGINT, SIGTERM, ``--duration`` or ``Daemon.stop()``): intake stops first, then the
market stream (no new exit actions), then every in-flight entry and exit is awaited to its
outcome (no half-sent order), the engine snapshot is saved, the user stream and sockets
close, and ``run()`` returns the summary. SIGUSR1 is the kill switch: latch a halt, close
every position, then cancel our orders, reporting each step (a stop waits for it).

With ``sources.redis_url`` (``--intents redis://...``) intents come from a Redis stream and
the daemon may share the account with others (``pyquant.scale.membership``): before the
start-up reconciliation it claims the leases of the symbols its journal holds positions on,
reconciles only what it owns, takes symbols over from dead peers while running, and hands
lost ones over. The stop order then is: Redis intake, other sources, the market stream, the
in-flight orders, and only then the leases are released, so peers adopt positions whose
exits have stopped here.

Tick-to-order latency is measured from the moment a mark-price message is handed to the
callback to the moment the exit order's request headers are written to the socket: the
receive time travels in a context variable that the desk's exit tasks inherit, and the REST
client's ``on_request_sent`` hook reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyquant
from pyquant.config import Config
from pyquant.daemon.dashboard import Dashboard, DashboardData, PositionLine
from pyquant.daemon.demo import DemoProducer
from pyquant.daemon.metrics import FeedStatus, Metrics, Status
from pyquant.errors import ConfigError, ExchangeError, MessageError, PyquantError, RetryableError
from pyquant.exchange.client import BinanceClient
from pyquant.exchange.streams import (
    Backoff,
    FeedHealth,
    MarkPriceStream,
    UserDataStream,
    UserEvent,
    fetch_closed_bars,
    interval_ms,
)
from pyquant.notify import hook as notify_hook
from pyquant.trading.desk import DeskConfig, TradingDesk
from pyquant.trading.guard import GuardConfig, GuardDecision
from pyquant.trading.intents import Intent
from pyquant.trading.journal import Store, secure_state_dir
from pyquant.trading.killswitch import sweep_orphan_stops
from pyquant.trading.marks import MarkCache
from pyquant.trading.router import RouterConfig as DeskRouterConfig
from pyquant.trading.sizing import SizingConfig
from pyquant.trading.sources import (
    HttpSource,
    SourceResult,
    SourceStopped,
    deliver,
    follow_jsonl,
    read_stdin,
    supervise,
)

if TYPE_CHECKING:  # redis-py is optional: needed only with sources.redis_url
    from pyquant.scale.membership import Membership

logger = logging.getLogger(__name__)

TICK_RECEIVED_NS: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "tick_received_ns", default=None
)

_ORDER_PATH = "/fapi/v1/order"
# How often a running daemon looks for a halt written by another process (the issue asks
# that every daemon on the state observe it within a second).
HALT_POLL_S = 0.5
# How often our stops left on closed, flat legs (a cancel that failed at close) are swept.
ORPHAN_SWEEP_S = 30.0
# How long the kill switch waits for entries decided before the halt to reach an outcome.
FLATTEN_WAIT_ENTRIES_S = 15.0
# Rounds of the desk's flatten while a step fails.
FLATTEN_ROUNDS = 3


@dataclass(frozen=True, slots=True)
class VenueEndpoints:
    """Where the daemon connects, once the venue is up."""

    rest_url: str
    market_ws_url: str
    user_ws_url: str
    api_key: str
    api_secret: str
    label: str
    # the pre-split websocket host, tried when a route refuses the handshake ("" none)
    legacy_ws_url: str = ""


class LatencyRecorder:
    """Tick-to-order latencies in milliseconds over the latest ``keep`` orders, with percentiles.

    The window is bounded and the percentiles are cached per sample count, so the dashboard
    and metrics asking several times a second cost nothing on the event loop between orders.
    """

    def __init__(self, keep: int = 10_000) -> None:
        self.samples: list[float] = []
        self._keep = keep
        self._count = 0
        self._cached: tuple[int, dict[str, float | None]] = (0, {"p50": None, "p99": None})
        self.observers: list[Callable[[float], None]] = []

    def on_request_sent(self, method: str, path: str) -> None:
        """REST client hook: record the latency of an order that a tick caused."""
        if method != "POST" or path != _ORDER_PATH:
            return
        started = TICK_RECEIVED_NS.get()
        if started is None:
            return
        elapsed_ms = (time.perf_counter_ns() - started) / 1e6
        self.samples.append(elapsed_ms)
        self._count += 1
        if len(self.samples) > 2 * self._keep:
            del self.samples[: len(self.samples) - self._keep]
        for observe in self.observers:
            observe(elapsed_ms / 1000)

    def percentiles(self) -> dict[str, float | None]:
        """Return p50 and p99 in milliseconds (None before the first sample)."""
        if self._cached[0] == self._count:
            return dict(self._cached[1])
        ordered = sorted(self.samples[-self._keep :])
        if not ordered:
            return {"p50": None, "p99": None}

        def pick(q: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

        result: dict[str, float | None] = {"p50": pick(0.50), "p99": pick(0.99)}
        self._cached = (self._count, result)
        return dict(result)


def desk_config(config: Config) -> DeskConfig:
    """Translate the user's configuration into the trading core's settings."""
    e = config.entries
    return DeskConfig(
        guard=GuardConfig(
            max_open_positions=e.max_open_positions,
            max_total_exposure_usd=e.max_exposure_usdt,
            max_age_ms=int(e.max_intent_age_s * 1000),
            cooldown_ms=int(e.cooldown_s * 1000),
            default_leverage=e.leverage,
        ),
        sizing=SizingConfig(
            method=e.sizing,
            risk_pct=e.risk_pct,
            notional_usd=e.notional_usdt,
            max_notional_usd=e.max_notional_usdt or None,
            margin_use_pct=e.margin_use_pct,
            default_leverage=e.leverage,
        ),
        router=DeskRouterConfig(
            backstop_enabled=config.router.backstop,
            backstop_distance_pct=config.router.backstop_distance_pct,
            backstop_min_interval_ms=int(config.router.backstop_throttle_s * 1000),
            margin_type=e.margin_type,
        ),
        shadow=config.router.shadow,
        allow_multi_assets=config.router.allow_multi_assets,
    )


class Intake:
    """The sink every intent source delivers to: the desk, while intake is open.

    It refuses intents once the daemon is stopping (nothing new starts during a clean stop)
    and keeps track of submissions in flight, so the stop can wait for their entry orders
    to reach an outcome.
    """

    def __init__(self) -> None:
        self.desk: TradingDesk | None = None
        self.open = False
        self.in_flight: set[asyncio.Task[Any]] = set()
        self.membership: Membership | None = None
        # Set while no submission is in flight. The tasks in ``in_flight`` are the sources'
        # own (a JSONL follower never ends): wait on this, never on those tasks.
        self._idle = asyncio.Event()
        self._idle.set()

    async def submit(self, intent: Intent, *, payload: object = None) -> GuardDecision:
        """Decide one intent through the desk (refused while closed)."""
        if self.desk is None or not self.open:
            logger.info("Intent refused intent_id=%s reason=intake_closed", intent.intent_id)
            return GuardDecision(False, "intake_closed", "the daemon is not taking intents now")
        member = self.membership
        if member is not None and member.shared:
            if intent.symbol not in member.owned():
                logger.info(
                    "Intent refused intent_id=%s symbol=%s reason=not_owner",
                    intent.intent_id,
                    intent.symbol,
                )
                return GuardDecision(
                    False,
                    "not_owner",
                    f"symbol {intent.symbol} is run by another daemon of this account",
                )
            pending = member.pending_reason(intent.symbol)
            if pending is not None:
                return GuardDecision(
                    False,
                    pending,
                    f"symbol {intent.symbol} was taken over and is not reconciled yet",
                )
        task = asyncio.current_task()
        if task is not None:
            self.in_flight.add(task)
            self._idle.clear()
        try:
            decision = await self.desk.submit(intent, payload=payload)
        finally:
            if task is not None:
                self.in_flight.discard(task)
                if not self.in_flight:
                    self._idle.set()
        # The guard logs each decision with its reason; nothing to add here.
        return decision

    def reject_malformed(self, source: str, payload: object, error: object) -> None:
        """Record a payload that is not a valid intent."""
        if self.desk is not None:
            self.desk.reject_malformed(source, payload, str(error))

    async def wait_idle(self) -> None:
        """Wait until no submission is in flight (the sources themselves may run on)."""
        await self._idle.wait()


def _attr(obj: object, *names: str) -> Any:  # noqa: ANN401 - engine views are extension objects
    for name in names:
        value = obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)
        if value is not None:
            return value
    return None


class Daemon:
    """One running ``pyquant run``.

    Args:
        config: the validated configuration.
        state_dir: where the SQLite state lives (a fresh temporary directory when None).
        dashboard: draw the terminal dashboard.
        metrics_port: serve Prometheus metrics on 127.0.0.1 at this port (None: off).
        install_signal_handlers: catch SIGINT/SIGTERM/SIGUSR1 (off when embedded in tests).
    """

    def __init__(
        self,
        config: Config,
        *,
        state_dir: Path | None = None,
        dashboard: bool = False,
        metrics_port: int | None = None,
        install_signal_handlers: bool = True,
    ) -> None:
        self.config = config
        self._state_dir = state_dir
        self._dashboard_enabled = dashboard
        self._metrics_port = metrics_port
        self._signals = install_signal_handlers
        self._stop = asyncio.Event()
        self._stopping = False
        self._run_task: asyncio.Task[Any] | None = None
        self.latency = LatencyRecorder()
        self.ready = asyncio.Event()
        self.desk: TradingDesk | None = None
        self.engine: Any = None
        self.rules: Any = None
        self.client: BinanceClient | None = None
        self.endpoints: VenueEndpoints | None = None
        self.market: MarkPriceStream | None = None
        self.user: UserDataStream | None = None
        self.demo: DemoProducer | None = None
        self.metrics: Metrics | None = None
        self.state_dir: Path | None = None
        self.sim: Any = None
        self._intake = Intake()
        self._background: set[asyncio.Task[Any]] = set()
        self.http: HttpSource | None = None
        self._source_tasks: list[asyncio.Task[Any]] = []
        self._dashboard: Dashboard | None = None
        self._symbol_set: frozenset[str] = frozenset()
        self._user_connected = asyncio.Event()
        self._symbols: list[str] = []
        self.malformed_messages = 0
        self.summary: dict[str, object] = {}
        self.flatten_steps: list[Any] = []
        self.flatten_result: str | None = None  # "<n> step(s) in <r> round(s), <m> failed"
        self._status_cache = Status({}, {}, 0, 0)
        self.membership: Membership | None = None
        self._membership_task: asyncio.Task[None] | None = None
        self._exits_stopped = asyncio.Event()
        self._owned_at_stop: list[str] | None = None
        # Marks for sizing entries, from the market stream (REST only when it is stale).
        self.marks = MarkCache(max_age_s=config.market.stale_after_s)
        self._flatten_task: asyncio.Task[list[Any]] | None = None
        self._failure: PyquantError | None = None  # why the daemon stopped itself
        self._halt_seen: int | None = None
        self._flatten_request: asyncio.Task[list[Any]] | None = None
        self.flatten_failures = 0

    # ------------------------------------------------------------------ control

    def stop(self) -> None:
        """Ask for a clean stop (safe to call from a signal handler or another task)."""
        if not self._stop.is_set():
            logger.info("Stop requested: closing intake, finishing in-flight orders")
        self._stop.set()

    def _on_signal(self) -> None:
        if not self._stop.is_set():
            self.stop()
            return
        # A second Ctrl-C while the clean stop waits on the venue: give up waiting. Orders
        # already sent stay in the journal and are resolved by lookup at the next start.
        logger.warning("Second stop signal: abandoning the clean stop")
        if self._run_task is not None:
            self._run_task.cancel()

    async def submit(
        self, payload: Mapping[str, Any] | object, *, source: str = "api"
    ) -> SourceResult:
        """Hand one intent payload to the guard (the Python API intake).

        Malformed payloads are recorded as rejections with their reason; the daemon keeps
        running. Returns once the decision is recorded and the entry has an outcome.

        Args:
            payload: the intent in pyquant's (or the original system's) format.
            source: the source name recorded with the decision.

        Returns:
            What became of the payload (accepted, or the reason it was refused).
        """
        return await deliver(self._intake, payload, source=source)

    def submit_nowait(self, payload: Mapping[str, Any] | object, *, source: str = "api") -> None:
        """Schedule ``submit`` without waiting for its outcome (sources that must not block)."""
        task = asyncio.get_running_loop().create_task(self.submit(payload, source=source))
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            if self.desk is not None:
                self.desk.task_failures += 1
                self.desk.last_task_failure = f"intake: {type(error).__name__}: {error}"
            logger.error("Intake task failed error=%s", error, exc_info=error)

    # ------------------------------------------------------------------ venue

    async def _open_venue(self, stack: AsyncExitStack) -> VenueEndpoints:
        config = self.config
        if config.exchange == "sim":
            import pyquant.sim as sim_module  # the daemon runs without it on real venues

            sim = config.sim
            venue = await stack.enter_async_context(
                sim_module.serve(
                    data=list(sim.data) or None,
                    speed=sim.speed,
                    position_mode=sim.position_mode,
                    balance=sim.balance_usdt,
                    seed=sim.seed,
                    # With --state the paper account lives beside the daemon's journal, so
                    # a restart finds the positions it left; without it each run is fresh.
                    state=self._sim_state_path(),
                )
            )
            self.sim = venue
            ws = str(venue.ws_url).rstrip("/")
            return VenueEndpoints(
                rest_url=str(venue.rest_url),
                market_ws_url=f"{ws}/market",
                user_ws_url=f"{ws}/private",
                api_key=str(venue.api_key),
                api_secret=str(venue.api_secret),
                label=f"simulator {venue.rest_url} speed {sim.speed:g}x",
                legacy_ws_url=ws,
            )
        key, secret = config.credentials.api_key, config.credentials.api_secret
        if key is None or secret is None:
            raise PyquantError(f"exchange {config.exchange!r} needs an API key and secret")
        return VenueEndpoints(
            rest_url=config.rest_url,
            market_ws_url=config.ws_url,
            user_ws_url=config.user_ws_url,
            api_key=key.reveal(),
            api_secret=secret.reveal(),
            label=f"{config.exchange} {config.rest_url}",
            legacy_ws_url=config.legacy_ws_url,
        )

    def _sim_state_path(self) -> Path | None:
        if self._state_dir is None:
            return None
        secure_state_dir(self._state_dir)
        return self._state_dir / "sim-account.json"

    # ------------------------------------------------------------------ engine

    def _build_engine(self, store: Store) -> Any:  # noqa: ANN401 - pyquant.ExitEngine
        snapshot = store.load_snapshot()
        if snapshot is not None:
            engine = pyquant.ExitEngine.restore(snapshot, self.rules)
            logger.info("Engine restored from snapshot bytes=%d", len(snapshot))
            return engine
        return pyquant.ExitEngine(self.rules, self.config.exit_policy())

    def _trading_symbols(self) -> list[str]:
        if self.config.market.symbols:
            return list(self.config.market.symbols)
        symbols = []
        for symbol in self.rules.symbols():
            info = self.rules.symbol_info(symbol)
            status = _attr(info, "status")
            if status in (None, "TRADING"):
                symbols.append(symbol)
        return symbols

    def _atr_interval(self) -> str:
        # The engine's bars (and so its ATR) run on the policy's interval; warm up on the same.
        policy = self.engine.policy
        return str(policy.to_dict().get("atr_interval", self.config.market.warmup_interval))

    async def _warm_up(self, symbols: list[str]) -> int:
        if self.config.market.warmup_bars <= 0 or self.client is None:
            return 0
        interval = self._atr_interval()
        limit = self.config.market.warmup_bars + 1
        gate = asyncio.Semaphore(8)
        warmed = 0

        async def one(symbol: str) -> None:
            nonlocal warmed
            async with gate:
                assert self.client is not None  # noqa: S101 - set before warm-up
                try:
                    bars = await fetch_closed_bars(self.client, symbol, interval, limit)
                except (ExchangeError, MessageError) as exc:
                    logger.warning("Warm-up failed symbol=%s error=%s", symbol, exc)
                    return
            if len(bars):
                try:
                    self.engine.warm_up(
                        symbol,
                        bars.high,
                        bars.low,
                        bars.close,
                        last_open_time_ms=int(bars.open_time_ms[-1]),
                    )
                except (PyquantError, ValueError, KeyError) as exc:
                    logger.warning("Warm-up refused symbol=%s error=%s", symbol, exc)
                    return
                warmed += 1

        await asyncio.gather(*(one(symbol) for symbol in symbols))
        logger.info("ATR warmed up symbols=%d of %d interval=%s", warmed, len(symbols), interval)
        return warmed

    # ------------------------------------------------------------------ callbacks

    def _on_mark(self, data: bytes) -> None:
        token = TICK_RECEIVED_NS.set(time.perf_counter_ns())
        self.marks.feed(data)
        try:
            try:
                actions = self.engine.on_mark_message(data, now_ms=self._venue_now_ms())
            except ValueError as exc:
                self.malformed_messages += 1
                raise MessageError(str(exc)) from None
            if actions and self.desk is not None:
                self.desk.on_actions(actions, received_at_ns=TICK_RECEIVED_NS.get())
        finally:
            TICK_RECEIVED_NS.reset(token)

    def _venue_now_ms(self) -> int | None:
        # Real Binance stamps mark updates with its own clock: an event time far ahead of it
        # is refused by the engine. A custom venue (a simulator with its own, possibly
        # accelerated or hand-stepped clock) is held to the engine's own rule instead (no
        # more than 30 days past the latest accepted time).
        if self.client is None or self.config.exchange not in ("mainnet", "testnet"):
            return None
        return self.client.now_ms()

    def implausible_updates(self) -> int:
        """Mark updates the engine refused for an implausible event time or price."""
        engine = self.desk.engine if self.desk is not None else self.engine
        if engine is None:
            return 0
        return int(getattr(engine, "implausible_event_times", 0)) + int(
            getattr(engine, "implausible_marks", 0)
        )

    async def _on_user_event(self, event: UserEvent) -> None:
        if self.desk is None:
            return
        try:
            await self.desk.on_user_event(event.payload)
        except (PyquantError, ArithmeticError, KeyError, TypeError, ValueError):
            logger.exception("User event not applied kind=%s", event.kind)

    async def _on_user_connected(self, reconnect: bool) -> None:
        self._user_connected.set()
        if reconnect and self.desk is not None and self.ready.is_set():
            await self._reconcile("user stream reconnected")

    def _on_user_disconnected(self) -> None:
        if self.desk is not None and not self._stopping:
            self.desk.on_stream_lost("user-data stream disconnected")

    async def _on_gap(self, gap_s: float) -> None:
        await self._warm_up(self._symbols)

    async def _reconcile(
        self, why: str, *, live: bool = True, symbols: frozenset[str] | None = None
    ) -> None:
        from pyquant.trading.recovery import reconcile

        assert self.desk is not None  # noqa: S101 - reconcile runs after the desk exists
        member = self.membership
        scope = member.owned() if member is not None and member.shared else None
        if symbols is not None:
            scope = symbols if scope is None else scope & symbols
        report = await reconcile(self.desk, symbols=scope, live=live)
        logger.info("Reconciled with the exchange why=%s report=%s", why, report)

    async def _reconcile_deferred(self) -> None:
        # A live reconcile left legs that had work in flight: look at those symbols again
        # once every leg of theirs is idle.
        desk = self.desk
        if desk is None or not desk.deferred_symbols:
            return
        busy = {symbol for symbol, _leg in desk.legs.busy_keys()}
        ready = frozenset(desk.deferred_symbols - busy)
        if ready:
            await self._reconcile("deferred legs are idle", symbols=ready)

    async def _reconcile_at_start(self) -> None:
        # Entries stay refused until this succeeds; a venue that is briefly unreachable is
        # retried with backoff rather than ending the daemon at once.
        backoff = Backoff(self.config.market.backoff_initial_s, self.config.market.backoff_max_s)
        for attempt in range(1, 7):
            try:
                await self._reconcile("start", live=False)
                return
            except RetryableError as exc:
                if attempt == 6 or self._stop.is_set():
                    raise
                delay = backoff.next_delay()
                logger.warning(
                    "Start-up reconciliation failed attempt=%d error=%s retry_in_s=%.1f",
                    attempt,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)

    # ------------------------------------------------------------------ views

    def feed_statuses(self) -> dict[str, FeedStatus]:
        """Return the health of both streams (and of Redis, when intents come from it)."""
        out: dict[str, FeedStatus] = {}
        for name, stream in (("market", self.market), ("user", self.user)):
            health = stream.health if stream is not None else FeedHealth()
            out[name] = FeedStatus(
                health.connected, health.stale, health.age_s(), health.reconnects, health.messages
            )
        if self.membership is not None:
            bus = self.membership.bus
            connected = bus.leases.connected if bus.leases is not None else True
            stats = bus.intents.stats
            # age: not tracked per message; "reconnects" counts failed Redis calls
            out["redis"] = FeedStatus(connected, False, 0.0, stats.redis_errors, stats.read)
        return out

    def current_summary(self) -> dict[str, object]:
        """Return the summary as it stands (the keys of ``--summary-json``)."""
        if self.desk is None:
            return dict(self.summary)
        summary = self.desk.summary()
        measured = self.latency.percentiles()
        if measured["p50"] is not None:
            summary["latency_ms"] = measured
        summary["malformed_messages"] = self.malformed_messages + self.implausible_updates()
        summary["task_failures"] = self.desk.task_failures + self.flatten_failures
        if self.desk.last_task_failure:
            summary["last_task_failure"] = self.desk.last_task_failure
        summary["legs"] = self.desk.leg_states()
        if self.membership is not None and self.membership.shared:
            # After a clean stop the leases are gone: report what was owned until then.
            stopped = self._owned_at_stop
            summary["owned_symbols"] = (
                stopped if stopped is not None else sorted(self.membership.owned())
            )
        return summary

    def position_lines(self) -> list[PositionLine]:
        """Return the open positions with the engine's view of each."""
        if self.engine is None:
            return []
        lines = []
        for view in self.engine.positions():
            trailing = _attr(view, "trailing_active")
            lines.append(
                PositionLine(
                    position_id=str(_attr(view, "position_id")),
                    symbol=str(_attr(view, "symbol")),
                    side=str(_attr(view, "position_side")),
                    size=str(_attr(view, "quantity")),
                    entry=str(_attr(view, "entry_price")),
                    mark=_str_or_none(_attr(view, "last_mark_price", "mark_price")),
                    stop=_str_or_none(_attr(view, "stop_price")),
                    next_take_profit=_str_or_none(_attr(view, "next_take_profit")),
                    trailing="active" if trailing else "off",
                )
            )
        return lines

    def dashboard_data(self) -> DashboardData:
        """Return one dashboard frame's data."""
        title = f"pyquant  {self.endpoints.label if self.endpoints else 'starting'}"
        if self.membership is not None and self.membership.shared:
            owned = len(self.membership.owned())
            title += f"  daemon {self.membership.config.daemon_id} owns {owned} symbols"
        return DashboardData(
            title=title,
            position_mode=self.desk.mode if self.desk else None,
            positions=self.position_lines(),
            recent=list(self.desk.recent) if self.desk else [],
            feeds=self.feed_statuses(),
            latency_ms=self.latency.percentiles(),
            summary=self.current_summary(),
            shadow=self.config.router.shadow,
        )

    def _cached_status(self) -> Status:
        # Called on the metrics server's thread: it only reads the value the event loop
        # last stored (the store's SQLite connection belongs to the loop's thread).
        return self._status_cache

    async def _refresh_status(self) -> None:
        self._status_cache = self._status()

    def _status(self) -> Status:
        limits = self.client.rate_limits if self.client else None
        return Status(
            summary=self.current_summary(),
            feeds=self.feed_statuses(),
            used_weight_1m=limits.used_weight_1m if limits else 0,
            order_count_10s=limits.order_count_10s if limits else 0,
        )

    # ------------------------------------------------------------------ run

    async def run(self) -> dict[str, object]:
        """Run until stopped; return the summary."""
        self._run_task = asyncio.current_task()
        async with AsyncExitStack() as stack:
            await self._start(stack)
            try:
                async with asyncio.TaskGroup() as group:
                    self._spawn(group)
                    await self._stop.wait()
                    await self._shutdown()
            finally:
                self.summary = self.current_summary()
                await self._close_quietly()
        if self._failure is not None:
            raise self._failure
        return self.summary

    async def flatten_only(self) -> list[Any]:
        """Start far enough to trade, reconcile, flatten every position, and stop.

        ``pyquant flatten`` is the account's kill switch: it does not join a Redis group, so
        it closes every position on the account, whichever daemon ran it.

        Returns:
            Each step of the kill switch, as reported by the router.
        """
        async with AsyncExitStack() as stack:
            await self._start(stack, warm_up=False, join_redis=False)
            await self._reconcile("flatten", live=False)
            steps = await self.flatten()
            if self.desk is not None:
                await self.desk.drain()
        return steps

    async def _start(
        self, stack: AsyncExitStack, *, warm_up: bool = True, join_redis: bool = True
    ) -> None:
        config = self.config
        if self._signals:
            self._install_signals()
        if self._state_dir is None:
            self.state_dir = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="pyquant-"))
            )
        else:
            self.state_dir = self._state_dir
        secure_state_dir(self.state_dir)
        self.endpoints = await self._open_venue(stack)
        self.client = BinanceClient(
            self.endpoints.rest_url,
            self.endpoints.api_key,
            self.endpoints.api_secret,
            recv_window_ms=config.venue.recv_window_ms,
            timeout_s=config.venue.timeout_s,
        )
        stack.push_async_callback(self.client.close)
        self.client.on_request_sent = self.latency.on_request_sent
        await self.client.sync_time()
        raw = await self.client.exchange_info()
        self.rules = pyquant.ExchangeRules.from_exchange_info(raw)
        store = Store.open(self.state_dir / "pyquant.sqlite")
        stack.callback(store.close)
        self.engine = self._build_engine(store)
        self.desk = TradingDesk(
            self.client,
            store,
            self.rules,
            self.engine,
            desk_config(config),
            mark_price=self.marks.get,
        )
        if config.sources.redis_url and join_redis:
            self.membership = self._join_redis(config.sources.redis_url)
            self.membership.attach(self.desk)
            self._intake.membership = self.membership
        # Notifications ([notify]): a tap on the desk's events, delivered off the trading path.
        notifier = await notify_hook.attach(self, config)
        if notifier is not None:
            stack.push_async_callback(notify_hook.detach, notifier)
        mode = await self.desk.refresh_mode()
        logger.info(
            "Daemon starting venue=%s position_mode=%s state=%s",
            self.endpoints.label,
            mode,
            self.state_dir,
        )
        self._symbols = self._trading_symbols()
        self._symbol_set = frozenset(self._symbols)
        if warm_up:
            await self._warm_up(self._symbols)
        if self._metrics_port is not None:
            self._status_cache = self._status()
            self.metrics = Metrics(self._cached_status)
            self.latency.observers.append(self.metrics.tick_to_order.observe)
            self.metrics.serve(self._metrics_port)
            stack.callback(self.metrics.close)

    def _join_redis(self, url: str) -> Membership:
        from dataclasses import replace

        try:
            from pyquant.scale.bus import RedisBusConfig
            from pyquant.scale.membership import UNRECONCILED, Membership
        except ImportError as exc:
            raise ConfigError(
                f"sources.redis_url needs redis-py, which is not installed ({exc}); "
                "install the extra: pip install 'pyquant[redis]'"
            ) from None

        bus_config = RedisBusConfig.from_url(url)
        # An intent for a symbol whose takeover is still reconciling is not decided: it
        # stays pending in the stream and comes back.
        intents = replace(
            bus_config.intents,
            retry_reasons=bus_config.intents.retry_reasons | {UNRECONCILED},
        )
        return Membership(replace(bus_config, intents=intents), self._intake)

    def _spawn(self, group: asyncio.TaskGroup) -> None:
        config = self.config
        assert self.client is not None  # noqa: S101 - set by _start
        assert self.endpoints is not None  # noqa: S101
        self.user = UserDataStream(
            self.endpoints.user_ws_url,
            self.client,
            self._on_user_event,
            keepalive_interval_s=self._keepalive_interval_s(),
            rotate_after_s=config.market.rotate_after_s,
            backoff=Backoff(config.market.backoff_initial_s, config.market.backoff_max_s),
            on_connected=self._on_user_connected,
            on_disconnected=self._on_user_disconnected,
            fallback_ws_base=self.endpoints.legacy_ws_url,
        )
        self.market = MarkPriceStream(
            self.endpoints.market_ws_url,
            self.client,
            self._on_mark,
            symbols=config.market.symbols,
            stale_after_s=config.market.stale_after_s,
            poll_interval_s=config.market.poll_interval_s,
            rotate_after_s=config.market.rotate_after_s,
            backoff=Backoff(config.market.backoff_initial_s, config.market.backoff_max_s),
            on_gap=self._on_gap,
            gap_threshold_s=interval_ms(self._atr_interval()) / 1000,
            fallback_ws_base=self.endpoints.legacy_ws_url,
        )
        group.create_task(self.user.run(), name="user-stream")
        group.create_task(self._after_user_connected(group), name="startup")
        if config.daemon.duration_s > 0:
            group.create_task(self._stop_after(config.daemon.duration_s), name="duration")
        group.create_task(
            self._every(config.daemon.snapshot_interval_s, self._snapshot), name="snapshot"
        )
        group.create_task(self._every(1.0, self._backstops), name="backstops")
        group.create_task(self._every(HALT_POLL_S, self._watch_halt), name="halt-watch")
        group.create_task(
            self._every(ORPHAN_SWEEP_S, self._sweep_orphan_stops), name="orphan-stops"
        )
        group.create_task(self._every(30.0, self._liquidation_prices), name="liquidation-prices")
        if self.membership is not None and self.membership.shared:
            group.create_task(
                self._every(1.0, self.membership.publish_exit_state), name="exit-state"
            )
            group.create_task(
                self._every(2.0, self.membership.retry_unreconciled), name="takeover-retry"
            )
        if self.metrics is not None:
            group.create_task(self._every(1.0, self._refresh_status), name="metrics-status")
        if self._dashboard_enabled:
            dashboard = Dashboard(self.dashboard_data)
            self._dashboard = dashboard
            group.create_task(dashboard.run(), name="dashboard")
        else:
            group.create_task(self._every(30.0, self._heartbeat), name="heartbeat")

    def _keepalive_interval_s(self) -> float:
        interval = self.config.user_stream.keepalive_interval_s
        if self.config.exchange == "sim" and self.config.sim.speed > 0:
            # The simulator expires listenKeys on its own clock, which runs ``speed`` times
            # faster than ours: keep the key alive at the same share of its 60 minutes.
            interval = min(interval, interval / self.config.sim.speed)
        return max(interval, 0.5)

    async def _after_user_connected(self, group: asyncio.TaskGroup) -> None:
        await self._user_connected.wait()
        if self._stop.is_set():
            return
        if self.membership is not None:
            # Know what this daemon owns before reconciling: a symbol a peer took while we
            # were down is handed over, never reconciled (or closed) here. Redis may be down:
            # the claim waits for it, unless the daemon is asked to stop meanwhile.
            claim = asyncio.ensure_future(self.membership.claim())
            stopping = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait({claim, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not claim.done():
                claim.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await claim
                return
            claim.result()
        await self._reconcile_at_start()
        assert self.market is not None  # noqa: S101 - created in _spawn
        group.create_task(self.market.run(), name="market-stream")
        self._intake.desk = self.desk
        self._intake.open = True
        await self._start_sources(group)
        if self.membership is not None:
            # Not cancelled at the stop (redis-py can swallow a cancellation): stopped in order.
            self._membership_task = group.create_task(
                self.membership.bus.run(before_release=self._wait_exits_stopped),
                name="redis-bus",
            )
        self.ready.set()
        logger.info("Daemon running: streams connected, intake open")

    async def _start_sources(self, group: asyncio.TaskGroup) -> None:
        sources = self.config.sources
        assert self.client is not None  # noqa: S101
        assert self.desk is not None  # noqa: S101
        if sources.demo:
            self.demo = DemoProducer(
                self.client,
                self._demo_submit,
                interval_s=sources.demo_interval_s,
                threshold_pct=sources.demo_threshold_pct,
                tradable=self._tradable,
            )
            self._source_tasks.append(group.create_task(self.demo.run(), name="demo-producer"))
        if sources.jsonl == "-":
            self._source_tasks.append(
                group.create_task(
                    self._source("stdin", lambda: read_stdin(self._intake)), name="stdin-intents"
                )
            )
        elif sources.jsonl:
            path = _user_path(sources.jsonl)
            store = self.desk.store
            task = group.create_task(
                self._source("jsonl", lambda: follow_jsonl(self._intake, path, store=store)),
                name="jsonl-intents",
            )
            self._source_tasks.append(task)
        if sources.http_port and sources.http_token is not None:
            self.http = HttpSource(
                self._intake, token=sources.http_token.reveal(), port=sources.http_port
            )
            await self.http.start()

    async def _source(self, name: str, start: Callable[[], Awaitable[object]]) -> None:
        # Restarted when it fails; failing again and again it stops the daemon, cleanly
        # (in-flight orders finish) and loudly: run() raises the reason.
        try:
            await supervise(name, start)
        except SourceStopped as exc:
            self._failure = exc
            self.stop()

    async def _demo_submit(self, payload: Mapping[str, Any]) -> None:
        self.submit_nowait(payload, source="demo")

    def _tradable(self, symbol: str) -> bool:
        # The demo asks only where the guard could say yes: no position, no entry in flight,
        # no cooldown on the symbol. Other sources send what they like; the guard decides.
        if symbol not in self._symbol_set or self.desk is None:
            return False
        store = self.desk.store
        if any(row.symbol == symbol for row in store.positions(("opening", "open"))):
            return False
        cooling = store.cooldowns(time.time_ns() // 1_000_000)
        return not any(key[0] == symbol for key in cooling)

    async def _stop_after(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
        logger.info("Duration of %.0f s reached", seconds)
        self.stop()

    async def _every(self, seconds: float, job: Callable[[], Awaitable[None]]) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), seconds)
            if self._stop.is_set():
                return
            try:
                await job()
            except (PyquantError, OSError) as exc:
                logger.warning(
                    "Periodic job failed job=%s error=%s", getattr(job, "__name__", job), exc
                )
            except Exception:
                # A timer's bug must not end the daemon and the exits it runs: log, go on.
                logger.exception("Periodic job crashed job=%s", getattr(job, "__name__", job))

    async def _snapshot(self) -> None:
        if self.desk is not None:
            self.desk.save_snapshot()

    async def _backstops(self) -> None:
        if self.desk is not None and self.ready.is_set():
            await self.desk.sync_backstops()
            await self._reconcile_deferred()

    async def _sweep_orphan_stops(self) -> None:
        if self.desk is None or self.client is None or not self.ready.is_set():
            return
        if self.config.router.shadow:
            return  # nothing of ours is on the exchange
        await sweep_orphan_stops(self.client, self.desk.store)

    async def _liquidation_prices(self) -> None:
        # They move with the account's margin (cross margin): refreshed on a slow timer.
        if self.desk is not None and self.ready.is_set():
            await self.desk.refresh_liquidation_prices()

    async def _heartbeat(self) -> None:
        s = self.current_summary()
        market = self.market.health if self.market else FeedHealth()
        logger.info(
            "Heartbeat open_positions=%s entries=%s exits=%s realized_pnl=%s feed_age_s=%.1f "
            "stale=%s latency_ms=%s",
            s.get("open_positions"),
            s.get("entries"),
            s.get("exits"),
            s.get("realized_pnl"),
            market.age_s(),
            market.stale,
            s.get("latency_ms"),
        )

    async def _wait_exits_stopped(self) -> None:
        await self._exits_stopped.wait()
        if self.membership is not None and self.membership.shared:
            # The last word on each position's exit state, for the peer that adopts it.
            await self.membership.publish_exit_state()

    async def _close_intake(self) -> None:
        if self.membership is not None:
            self.membership.bus.stop()
        self._intake.open = False
        if self.demo is not None:
            self.demo.stop()
        for task in self._source_tasks:
            task.cancel()
        if self.http is not None:
            await self.http.stop()
            self.http = None
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        await self._intake.wait_idle()

    async def flatten(self, *, set_by: str = "") -> list[Any]:
        """Kill switch: latch a halt in the journal, then close everything and cancel our orders.

        The halt comes first, so a daemon killed mid-flatten (or any other daemon on this
        state) takes no new entry, and the next start finishes the flatten. Intake stays
        open: intents are refused as ``halted`` (and recorded) until ``pyquant resume``.
        One flatten runs at a time; a second request waits for the running one.
        """
        if self.desk is None:
            return []
        halt = self.desk.store.set_halt(
            "kill switch", set_by or f"pyquant daemon pid {os.getpid()}"
        )
        self._halt_seen = halt.halt_id
        running = self._flatten_task
        if running is not None and not running.done():
            return await asyncio.shield(running)
        self._flatten_task = asyncio.ensure_future(self._flatten_halted(halt.halt_id))
        return await asyncio.shield(self._flatten_task)

    async def _flatten_halted(self, halt_id: int) -> list[Any]:
        assert self.desk is not None  # noqa: S101 - checked by the callers
        logger.warning("Kill switch: halted (no new entries), flattening every position")
        # Entries decided before the halt finish first, so their positions are closed too;
        # one stuck on the venue does not hold the flatten up for long.
        try:
            await asyncio.wait_for(self._intake.wait_idle(), FLATTEN_WAIT_ENTRIES_S)
        except TimeoutError:
            logger.warning("Kill switch: entries still in flight, flattening anyway")
        # A step that failed (a close refused, an unknown outcome found not executed) is
        # tried again by another round: the kill switch finishes, or says what it could not.
        steps: list[Any] = []
        failed = 0
        rounds = 0
        while rounds < FLATTEN_ROUNDS:
            rounds += 1
            round_steps = await self.desk.flatten()
            steps += round_steps
            failed = sum(1 for step in round_steps if not getattr(step, "ok", False))
            if failed == 0:
                break
            logger.warning("Kill switch: %d step(s) failed, flattening again", failed)
        self.flatten_steps = steps
        self.flatten_result = f"{len(steps)} step(s) in {rounds} round(s), {failed} failed"
        self.desk.store.record_flatten(halt_id, self.flatten_result)
        if self.ready.is_set() and not self._stop.is_set():
            # The flatten leaves the guard fail-closed; the halt now keeps entries out, and
            # a fresh view of the exchange lets them in again after 'pyquant resume'.
            try:
                await self._reconcile("after flatten")
            except (PyquantError, OSError) as exc:
                logger.warning("Reconciliation after the flatten failed error=%s", exc)
        return self.flatten_steps

    def request_flatten(self) -> asyncio.Task[list[Any]]:
        """Start the kill switch as a task the daemon owns (SIGUSR1).

        The shutdown waits for it (a SIGTERM right after SIGUSR1 does not cut it short), and
        its failure is logged and counted instead of dying unseen.
        """
        if self._flatten_request is not None and not self._flatten_request.done():
            return self._flatten_request
        task = asyncio.get_running_loop().create_task(self.flatten(), name="flatten")
        self._flatten_request = task

        def done(finished: asyncio.Task[list[Any]]) -> None:
            if finished.cancelled():
                return
            error = finished.exception()
            if error is not None:
                self.flatten_failures += 1
                logger.error(
                    "Kill switch failed error=%s",
                    error,
                    exc_info=(type(error), error, error.__traceback__),
                )

        task.add_done_callback(done)
        return task

    async def _watch_halt(self) -> None:
        # A halt written by another process (``pyquant flatten``, a peer daemon on this
        # state) or left by a daemon killed mid-flatten: flatten here too, once per halt.
        if self.desk is None or not self.ready.is_set():
            return
        halt = self.desk.store.halt()
        if halt is None:
            if self._halt_seen is not None:
                logger.warning("Halt cleared: entries allowed again")
            self._halt_seen = None
            return
        if halt.halt_id == self._halt_seen:
            return
        self._halt_seen = halt.halt_id
        logger.warning(
            "Halt observed set_by=%s reason=%s: no new entries, flattening",
            halt.set_by,
            halt.reason,
        )
        await self.flatten(set_by=halt.set_by)

    async def _shutdown(self) -> None:
        self._stopping = True
        for flattening in (self._flatten_request, self._flatten_task):
            if flattening is not None:
                # A kill switch under way finishes before anything it needs is closed.
                await asyncio.gather(flattening, return_exceptions=True)
        await self._close_intake()
        if self.market is not None:
            await self.market.close()
        if self.desk is not None:
            await self.desk.drain()
        if self.membership is not None:
            self._owned_at_stop = sorted(self.membership.owned())
        self._exits_stopped.set()
        if self._membership_task is not None:
            # Leases go only now: a peer adopts positions whose exits stopped here.
            await self._membership_task
        if self._dashboard is not None:
            self._dashboard.stop()
        if self.user is not None:
            await self.user.close()
        self._user_connected.set()
        logger.info("Daemon stopped cleanly")

    async def _close_quietly(self) -> None:
        if self.desk is not None:
            with contextlib.suppress(Exception):
                self.desk.save_snapshot()

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)
        if hasattr(signal, "SIGUSR1"):
            loop.add_signal_handler(signal.SIGUSR1, self.request_flatten)


def _user_path(text: str) -> Path:
    return Path(os.path.expanduser(text))


def _str_or_none(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, Decimal):
        return format(value, "f")
    return str(value)


__all__ = ["TICK_RECEIVED_NS", "Daemon", "LatencyRecorder", "VenueEndpoints", "desk_config"]
