"""Issue 6, "Consistency": the daemon on the simulator and the backtest take the same exits.

Real 1m bars (tests/data/market) become mark-price paths. One simulator serves every symbol
of a run with the real history before its path, a real ``pyquant`` Daemon opens one position
per leg through its intake, and the test then pins the simulator's mark one message at a
time, waiting after each until the daemon's engine has processed it and every exit it
emitted has been filled and confirmed. What the daemon did (the simulator's order log, the
reasons in the daemon's store, the engine actions handed to the desk) is compared with the
backtest: same reasons in the same order, exactly the same quantities and sides, trigger and
mark prices within one tick (they agree exactly), the same triggering message.

Two backtest entry points are checked, in both position modes, on both sides:

* ``exit_decisions_for_path``: fed the very messages the daemon received (each bar's open,
  extremes and close a quarter second apart, plus the venue's once-a-second repeats), the
  same entry, quantity, leverage, open time and ATR. The policy's ATR runs on 1h bars and the
  history is laid out so that the daemon's warm-up is twenty whole real hours; the test
  computes that ATR from the files and checks the daemon holds it before and after the path
  (no 1h bar closes during a path). Covers the ATR stop, the ladder (one level, two levels
  in one mark), breakeven, ratchet, the ATR trail and the time stop.
* ``run_backtest`` on the bars themselves (1m ATR, moving bar by bar on both sides): the
  daemon gets the backtest's own bar path (open, adverse extreme, other extreme, close at
  0, 20, 40 and 59.999 s) and, inside a bar, a mark at each trigger the continuous move
  crosses, as the backtest assumes. Same entry price and size, same initial stop, same exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from replay_paths import (
    HOUR_MS,
    MINUTE_MS,
    History,
    bar_marks,
    history,
    minute_history,
    on_tick,
    real_bars,
    rounded_atr,
)

import pyquant.sim
from pyquant import _core
from pyquant.backtest import (
    BacktestConfig,
    exit_decisions_for_path,
    run_backtest,
    validate_klines,
)
from pyquant.config import load_config
from pyquant.daemon import Daemon
from pyquant.sim.server import Venue, load_exchange_info

# One policy for every leg: ATR stop, a two-level ladder in R, breakeven after level 1,
# ratchet to the previous level, an ATR trail after level 2, and a time stop for positions
# that have not gone half an R their way within 20 s.
POLICY: dict[str, Any] = {
    "stop_atr": 0.5,
    "fallback_stop_pct": 0.01,
    "min_stop_pct": 0.001,
    "max_stop_pct": 0.05,
    "ladder": [{"at": 1.0, "fraction": 0.3}, {"at": 2.0, "fraction": 0.3}],
    "ladder_unit": "R",
    "breakeven_after_level": 1,
    "ratchet_to_previous_level": True,
    "taker_fee": 0.0005,
    "trail_atr": 0.5,
    "trail_after_level": 2,
    "max_hold_ms": 20_000,
    "time_stop_unless_r": 0.5,
    "atr_period": 14,
    "atr_interval": "1h",
}
WARMUP_HOURS = 20
PATH_BARS = 50
STEP_MS = 250  # one mark every quarter second of exchange time: a 1m bar in one second
NOTIONAL = "1000"
LEVERAGE = 5


@dataclass(frozen=True)
class Leg:
    """One position: a real path and the side taken on it.

    ``start`` is the row of the path's first bar in tests/data/market/<symbol>_1m_last.parquet.
    """

    symbol: str
    start: int
    side: str
    reasons: tuple[str, ...]  # what this path gives (the coverage the leg is here for)
    mirror: tuple[str, ...] = ()  # what the opposite side gives on the same path (hedge)


TP12 = ("take_profit_1", "take_profit_2")
LEGS = (
    Leg("BTCUSDT", 11006, "LONG", (*TP12, "trailing_stop"), ("stop_loss",)),
    Leg("XRPUSDT", 7029, "LONG", (*TP12, "ratchet_stop"), ("stop_loss",)),
    # both levels crossed by one mark: one take_profit_2 action for 60 %
    Leg("DOGEUSDT", 20415, "SHORT", ("take_profit_2", "ratchet_stop"), ("stop_loss",)),
    Leg("ETHUSDT", 2344, "LONG", ("take_profit_1", "breakeven_stop"), ("stop_loss",)),
    Leg("LTCUSDT", 2766, "SHORT", ("take_profit_1", "breakeven_stop"), ("stop_loss",)),
    Leg("DOTUSDT", 3399, "SHORT", (*TP12, "trailing_stop"), ("stop_loss",)),
    Leg("TRXUSDT", 4454, "LONG", ("time_stop",), ("time_stop",)),
    Leg("ADAUSDT", 1922, "SHORT", ("time_stop",), ("stop_loss",)),
    Leg("XLMUSDT", 1500, "LONG", ("stop_loss",), ("take_profit_1", "breakeven_stop")),
    Leg("ETCUSDT", 2133, "SHORT", ("stop_loss",), ("take_profit_1", "breakeven_stop")),
)


@functools.cache
def _bars(symbol: str) -> pl.DataFrame:
    return real_bars(symbol)


@functools.cache
def _rules() -> _core.ExchangeRules:
    return _core.ExchangeRules.from_exchange_info(load_exchange_info())


def _tick(symbol: str) -> Decimal:
    return Decimal(_rules().symbol_info(symbol)["tick_size"])


@dataclass
class Position:
    """One leg as the daemon opened it, and what happened to it."""

    leg: Leg
    side: str
    position_id: str
    quantity: str
    entry_price: str
    leverage: int
    opened_at_ms: int
    actions: list[Any] = field(default_factory=list)


@dataclass
class Run:
    """A finished replay: the daemon's positions and the marks each symbol's feed carried."""

    positions: list[Position]
    fed: dict[str, list[tuple[int, str]]]
    atr: dict[str, float]
    exits: list[dict[str, Any]]  # sim order log + daemon store, per exit order


def _config(
    venue: Venue,
    symbols: Sequence[str],
    policy: dict[str, Any] = POLICY,
    warmup_bars: int = WARMUP_HOURS,
) -> Any:
    overrides: dict[str, Any] = {
        "exchange": "custom",
        "venue": {
            "rest_url": venue.rest_url,
            "ws_url": f"{venue.ws_url}/market",
            "user_ws_url": f"{venue.ws_url}/private",
        },
        "market": {
            "symbols": list(symbols),
            "warmup_bars": warmup_bars,
            "stale_after_s": 600.0,
            "backoff_initial_s": 0.05,
            "backoff_max_s": 0.2,
        },
        "sources": {"demo": False},
        "entries": {
            "sizing": "notional",
            "notional_usdt": NOTIONAL,
            "leverage": LEVERAGE,
            "cooldown_s": 0.0,
            "max_intent_age_s": 60.0,
            "max_open_positions": 50,
        },
        # The exchange-side backstop is not an exit decision; off, no order can race ours.
        "router": {"backstop": False},
        "daemon": {"dashboard": False, "snapshot_interval_s": 60.0},
        "exit": {"preset": "none", **policy},
    }
    environ = {"PYQUANT_API_KEY": venue.api_key, "PYQUANT_API_SECRET": venue.api_secret}
    return load_config(None, environ=environ, overrides=overrides)


async def _until(predicate: Callable[[], bool], what: str, limit_s: float = 10.0) -> None:
    try:
        async with asyncio.timeout(limit_s):
            while not predicate():  # noqa: ASYNC110 - the state lives in the daemon's tasks
                await asyncio.sleep(0.0005)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@contextlib.asynccontextmanager
async def _daemon(
    venue: Venue, symbols: Sequence[str], state: Path, **config: Any
) -> AsyncIterator[Daemon]:
    daemon = Daemon(
        _config(venue, symbols, **config), state_dir=state, install_signal_handlers=False
    )
    task = asyncio.get_running_loop().create_task(daemon.run())
    ready = asyncio.ensure_future(daemon.ready.wait())
    await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    assert daemon.ready.is_set(), "daemon did not become ready"
    await _until(lambda: daemon.market is not None and daemon.market.health.connected, "market")
    try:
        yield daemon
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 20)


async def replay(mode: str, legs: Sequence[tuple[Leg, str]], tmp_path: Path) -> Run:
    """Open every leg in a daemon on the simulator and step all paths mark by mark."""
    symbols = sorted({leg.symbol for leg, _ in legs})
    # The daemon's 1h warm-up must find the venue's current hour still open: an hour that
    # ends during the start-up would count as closed (a wall-clock guard, rarely taken).
    to_next_hour = HOUR_MS - time.time_ns() // 1_000_000 % HOUR_MS
    if to_next_hour < 5_000:
        await asyncio.sleep(to_next_hour / 1000 + 0.05)
    start_ms = int(time.time()) * 1000
    start_minute = start_ms - start_ms % MINUTE_MS
    paths: dict[str, list[Decimal]] = {}
    histories: dict[str, History] = {}
    files = []
    for leg, _ in legs:
        if leg.symbol in paths:
            continue
        bars, tick = _bars(leg.symbol), _tick(leg.symbol)
        histories[leg.symbol] = history(
            leg.symbol, bars, leg.start, start_minute, tick, warmup_hours=WARMUP_HOURS
        )
        paths[leg.symbol] = bar_marks(bars.slice(leg.start, PATH_BARS), tick)
        file = tmp_path / f"{leg.symbol}_1m.parquet"
        histories[leg.symbol].frame.write_parquet(file)
        files.append(file)

    async with pyquant.sim.serve(
        data=files, speed=0, position_mode=mode, start_ms=start_ms, balance=100_000
    ) as venue:
        for symbol in symbols:
            await venue.set_mark(symbol, paths[symbol][0])
        async with _daemon(venue, symbols, tmp_path / "state") as daemon:
            assert daemon.engine.policy == _core.ExitPolicy(**POLICY)
            atr = {s: daemon.engine.atr(s) for s in symbols}
            for symbol in symbols:
                # the ATR the daemon warmed up is the one computed from the files
                assert atr[symbol] == pytest.approx(histories[symbol].atr, rel=1e-12), symbol

            store = daemon.desk.store
            positions: list[Position] = []
            for leg, side in legs:
                decision = await daemon.submit(
                    {
                        "id": f"{leg.symbol}-{side}",
                        "symbol": leg.symbol,
                        "side": "BUY" if side == "LONG" else "SELL",
                    }
                )
                assert decision.accepted, decision
                pid = str(decision.position_id)
                await _until(lambda p=pid: store.get_position(p).status == "open", "entry")
                view = daemon.engine.position(pid)
                assert view.entry_price == str(paths[leg.symbol][0])
                positions.append(
                    Position(
                        leg,
                        side,
                        pid,
                        view.quantity,
                        view.entry_price,
                        view.leverage,
                        int(view.opened_at_ms),
                    )
                )
            by_id = {p.position_id: p for p in positions}
            desk = daemon.desk
            handed_over = desk.on_actions

            def on_actions(actions: Sequence[Any], **kwargs: Any) -> None:
                for action in actions:
                    by_id[action.position_id].actions.append(action)
                handed_over(actions, **kwargs)

            desk.on_actions = on_actions  # type: ignore[method-assign]
            health = daemon.market.health
            engine = daemon.engine

            fed: dict[str, list[tuple[int, str]]] = {s: [] for s in symbols}
            current = {s: paths[s][0] for s in symbols}
            expected = health.messages

            def exits_of(symbol: str) -> int:
                return sum(len(p.actions) for p in positions if p.leg.symbol == symbol)

            async def settle(before: dict[str, int]) -> None:
                # every message processed, then every exit it caused filled and confirmed;
                # a symbol that just had one gets its mark again (the backtest, confirming at
                # once, looks at the same mark again), until nothing more fires
                nonlocal expected
                while True:
                    await _until(lambda n=expected: health.messages >= n, "messages")
                    assert health.messages == expected, "the feed carried an unexpected message"
                    await _until(lambda: not engine.pending_actions(), "exits confirmed")
                    again = [s for s in symbols if exits_of(s) != before[s]]
                    if not again:
                        return
                    before = {s: exits_of(s) for s in symbols}
                    for symbol in again:
                        await venue.set_mark(symbol, current[symbol])
                        fed[symbol].append((venue.clock.now_ms(), str(current[symbol])))
                        expected += 1

            async def advance(ms: int) -> int:
                nonlocal expected
                counts = {s: exits_of(s) for s in symbols}
                before = venue.clock.now_ms()
                now = await venue.step(ms)
                # each new exchange second re-publishes every pinned mark at that second
                for second in range(before // 1000 + 1, now // 1000 + 1):
                    for symbol in symbols:
                        fed[symbol].append((second * 1000, str(current[symbol])))
                        expected += 1
                await settle(counts)
                return now

            # The desk stamps a position's open with its fill's exchange time, the clock the
            # time stop counts in: the frozen simulator clock has not moved since.
            assert max(p.opened_at_ms for p in positions) <= venue.clock.now_ms()
            longest = max(len(p) for p in paths.values())
            for index in range(1, longest):
                if not engine.positions():
                    break
                now = await advance(STEP_MS)
                counts = {s: exits_of(s) for s in symbols}
                for symbol in symbols:
                    if index < len(paths[symbol]):
                        current[symbol] = paths[symbol][index]
                        await venue.set_mark(symbol, current[symbol])
                        fed[symbol].append((now, str(current[symbol])))
                        expected += 1
                await settle(counts)
            assert not engine.positions(), "a position outlived its path"
            for symbol in symbols:  # no 1h bar closed on the way: the ATR never moved
                assert engine.atr(symbol) == atr[symbol]
            await _until(
                lambda: all(
                    store.get_position(p.position_id).status == "closed" for p in positions
                ),
                "positions closed in the store",
            )
            exits = _exits(venue, store)
    return Run(positions, fed, atr, exits)


def _check_order(exit_: dict[str, Any], side: str, mode: str, label: str) -> None:
    """A MARKET exit of the right leg, as the mode wants it on the wire and on the venue."""
    order, params = exit_["order"], exit_["params"]  # the venue's record, the daemon's wire
    assert exit_["kind"] == "exit", label
    assert order["type"] == params["type"] == "MARKET", label
    assert order["side"] == params["side"] == ("SELL" if side == "LONG" else "BUY"), label
    if mode == "hedge":
        assert order["positionSide"] == params["positionSide"] == side, label
        assert "reduceOnly" not in params, label
    else:
        assert order["positionSide"] == params["positionSide"] == "BOTH", label
        assert params["reduceOnly"] == "true", label


def _check(run: Run, mode: str) -> dict[str, list[str]]:
    """Compare every position's exits with the backtest's; return the reasons by leg."""
    rules = _rules()
    policy = _core.ExitPolicy(**POLICY)
    seen: dict[str, list[str]] = {}
    for position in run.positions:
        symbol = position.leg.symbol
        tick = _tick(symbol)
        expected = exit_decisions_for_path(
            rules,
            policy,
            symbol=symbol,
            side=position.side,  # type: ignore[arg-type]
            quantity=position.quantity,
            entry_price=position.entry_price,
            marks=run.fed[symbol],
            atr=run.atr[symbol],
            leverage=position.leverage,
            opened_at_ms=position.opened_at_ms,
        )
        label = f"{mode} {symbol} {position.side}"
        sent = sorted(
            (e for e in run.exits if e["position_id"] == position.position_id),
            key=lambda e: e["sequence"],
        )
        actions = position.actions
        assert [e["reason"] for e in sent] == [d["reason"] for d in expected], label
        assert [a.reason for a in actions] == [d["reason"] for d in expected], label
        close_side = "SELL" if position.side == "LONG" else "BUY"
        for exit_, action, decision in zip(sent, actions, expected, strict=True):
            order, fill = exit_["order"], exit_["fill"]
            assert exit_["kind"] == "exit", label
            # exact quantities and sides: the order on the venue, the engine's action, the fill
            assert Decimal(order["quantity"]) == Decimal(str(decision["quantity"])), label
            assert action.quantity == decision["quantity"], label
            assert Decimal(fill["qty"]) == Decimal(str(decision["quantity"])), label
            assert order["side"] == action.side == decision["side"] == close_side, label
            _check_order(exit_, position.side, mode, label)
            assert int(action.sequence) == int(str(decision["sequence"])), label
            # the same message triggered it on both sides
            assert int(action.event_time_ms) == int(str(decision["time_ms"])), label
            # prices: within one tick (they agree exactly; the bound is the requirement's)
            trigger = Decimal(str(decision["trigger_price"]))
            mark = Decimal(str(decision["mark_price"]))
            assert abs(Decimal(action.trigger_price) - trigger) <= tick, label
            assert abs(Decimal(action.mark_price) - mark) <= tick, label
            # the venue filled the MARKET exit at the mark that triggered it (no slippage)
            assert abs(Decimal(fill["price"]) - mark) <= tick, label
        assert sum(Decimal(e["order"]["quantity"]) for e in sent) == Decimal(position.quantity)
        seen[label] = [d["reason"] for d in expected]  # type: ignore[misc]
    return seen


async def test_one_way_mode_daemon_and_backtest_agree(tmp_path: Path) -> None:
    run = await replay("one-way", [(leg, leg.side) for leg in LEGS], tmp_path)
    seen = _check(run, "one-way")
    for leg in LEGS:
        assert tuple(seen[f"one-way {leg.symbol} {leg.side}"]) == leg.reasons, leg


async def test_hedge_mode_daemon_and_backtest_agree_on_both_legs(tmp_path: Path) -> None:
    opposite = {"LONG": "SHORT", "SHORT": "LONG"}
    legs = [(leg, leg.side) for leg in LEGS] + [(leg, opposite[leg.side]) for leg in LEGS]
    run = await replay("hedge", legs, tmp_path)
    seen = _check(run, "hedge")
    for leg in LEGS:
        assert tuple(seen[f"hedge {leg.symbol} {leg.side}"]) == leg.reasons, leg
        assert tuple(seen[f"hedge {leg.symbol} {opposite[leg.side]}"]) == leg.mirror, leg


def test_the_legs_cover_every_exit_rule_on_both_sides() -> None:
    # one-way runs LEGS as they are: every rule on each side; hedge adds the mirrored legs
    rules = {"stop_loss", "take_profit_1", "take_profit_2", "breakeven_stop"}
    rules |= {"ratchet_stop", "trailing_stop", "time_stop"}
    for side in ("LONG", "SHORT"):
        covered = {r for leg in LEGS if leg.side == side for r in leg.reasons}
        assert covered == rules, side
    assert len({leg.symbol for leg in LEGS}) == len(LEGS)  # one-way: one position per symbol


# ---------------------------------------------------------------------------------------------
# The bar backtest itself: run_backtest on the bars, the daemon on the same bars' mark path

# 1m ATR: it moves with every bar, in the daemon (bars built from the marks) and in the
# backtest (closed bars of the data) alike.
BAR_POLICY: dict[str, Any] = {
    "stop_atr": 3.0,
    "min_stop_pct": 0.001,
    "max_stop_pct": 0.05,
    "ladder": [{"at": 1.0, "fraction": 0.3}, {"at": 2.0, "fraction": 0.3}],
    "breakeven_after_level": 1,
    "ratchet_to_previous_level": True,
    "taker_fee": 0.0005,
    "trail_atr": 2.0,
    "trail_after_level": 2,
    "atr_period": 14,
    "atr_interval": "1m",
}
WARMUP_BARS = 20
BAR_PATH = 30
BAR_LEGS = (
    Leg("BTCUSDT", 2538, "LONG", (*TP12, "trailing_stop")),
    Leg("LTCUSDT", 2365, "SHORT", (*TP12, "trailing_stop")),
    Leg("ETHUSDT", 144571, "SHORT", (*TP12, "ratchet_stop")),
    Leg("XRPUSDT", 1500, "LONG", ("take_profit_1", "breakeven_stop")),
    Leg("BNBUSDT", 1500, "SHORT", ("take_profit_1", "breakeven_stop")),
    Leg("TRXUSDT", 1673, "LONG", ("take_profit_1", "breakeven_stop")),
    Leg("BCHUSDT", 4268, "SHORT", (*TP12, "trailing_stop")),
    Leg("ADAUSDT", 1500, "LONG", ("stop_loss",)),
    Leg("XLMUSDT", 1673, "SHORT", ("stop_loss",)),
    # the bar after the take-profit opens a tick beyond the breakeven stop: filled at the open
    Leg("DOGEUSDT", 20166, "LONG", ("take_profit_1", "breakeven_stop")),
)


@dataclass
class BarRun:
    """The daemon's positions after a bar-path replay, and the backtest of the same bars."""

    positions: list[Position]
    initial_stops: dict[str, str]
    exits: list[dict[str, Any]]
    backtest: Any  # BacktestResult


def _bar_points(bar: tuple[Any, ...], side: str, tick: Decimal) -> list[tuple[int, Decimal]]:
    # The backtest's path of one bar (stop_first): open, the adverse extreme, the other,
    # close, at 0, 1/3, 2/3 of the bar and its last millisecond.
    o, h, lo, c = (on_tick(v, tick) for v in bar)
    first, second = (lo, h) if side == "LONG" else (h, lo)
    return [(0, o), (MINUTE_MS // 3, first), (2 * MINUTE_MS // 3, second), (MINUTE_MS - 1, c)]


async def replay_bars(legs: Sequence[Leg], tmp_path: Path, mode: str = "one-way") -> BarRun:
    """Run the legs' bars through the daemon on the simulator and through run_backtest."""
    wall = time.time_ns() // 1_000_000
    m0 = wall - wall % MINUTE_MS
    files, frames, points = [], [], {}
    for leg in legs:
        bars, tick = _bars(leg.symbol), _tick(leg.symbol)
        file = tmp_path / f"{leg.symbol}_1m.parquet"
        minute_history(leg.symbol, bars, leg.start, m0).write_parquet(file)
        files.append(file)
        window = bars.slice(leg.start - WARMUP_BARS, WARMUP_BARS + BAR_PATH)
        frames.append(
            validate_klines(
                window.with_columns(
                    (m0 + (pl.int_range(pl.len()) - WARMUP_BARS) * MINUTE_MS).alias("open_time"),
                    pl.lit(1.0).alias("volume"),
                    pl.lit(leg.symbol).alias("symbol"),
                    pl.lit("1m").alias("interval"),
                ),
                source=leg.symbol,
            )
        )
        path = window.slice(WARMUP_BARS).select("open", "high", "low", "close").rows()
        points[leg.symbol] = [_bar_points(bar, leg.side, tick) for bar in path]

    # The backtest: the same bars (warm-up, then the path), an entry at the first path bar.
    entries = pl.DataFrame(
        {
            "intent_id": [f"{leg.symbol}-{leg.side}" for leg in legs],
            "time_ms": [m0] * len(legs),
            "symbol": [leg.symbol for leg in legs],
            "side": ["BUY" if leg.side == "LONG" else "SELL" for leg in legs],
            "confidence": [0.5] * len(legs),
            "size_usd": [None] * len(legs),
            "leverage": [LEVERAGE] * len(legs),
        },
        schema_overrides={"size_usd": pl.String, "leverage": pl.Int64},
    )
    backtest = run_backtest(
        frames,
        _core.ExitPolicy(**BAR_POLICY),
        _rules(),
        entries=entries,
        config=BacktestConfig(notional_usd=Decimal(NOTIONAL), leverage=LEVERAGE),
        detail=True,
    )

    # The venue's /time follows its own clock (frozen at m0 until stepped), so the daemon's
    # warm-up sees the bars before m0 as closed and the m0 bar as open, at any wall time.
    async with pyquant.sim.serve(
        data=files,
        speed=0,
        position_mode=mode,
        start_ms=m0,
        time_skew_ms=m0 - wall,
        balance=100_000,
    ) as venue:
        for leg in legs:
            await venue.set_mark(leg.symbol, points[leg.symbol][0][0][1])
        symbols = [leg.symbol for leg in legs]
        async with _daemon(
            venue, symbols, tmp_path / "state", policy=BAR_POLICY, warmup_bars=WARMUP_BARS
        ) as daemon:
            engine, store, desk = daemon.engine, daemon.desk.store, daemon.desk
            for leg, frame in zip(legs, frames, strict=True):
                warmup = frame.head(WARMUP_BARS)
                expected_atr = rounded_atr(warmup, _tick(leg.symbol), BAR_POLICY["atr_period"])
                assert engine.atr(leg.symbol) == pytest.approx(expected_atr, rel=1e-12)
            positions, initial_stops = [], {}
            for leg in legs:
                decision = await daemon.submit(
                    {
                        "id": f"{leg.symbol}-{leg.side}",
                        "symbol": leg.symbol,
                        "side": "BUY" if leg.side == "LONG" else "SELL",
                    }
                )
                assert decision.accepted, decision
                pid = str(decision.position_id)
                await _until(lambda p=pid: store.get_position(p).status == "open", "entry")
                view = engine.position(pid)
                initial_stops[pid] = view.stop_price
                positions.append(
                    Position(
                        leg,
                        leg.side,
                        pid,
                        view.quantity,
                        view.entry_price,
                        view.leverage,
                        int(view.opened_at_ms),
                    )
                )
            by_id = {p.position_id: p for p in positions}
            handed_over = desk.on_actions

            def on_actions(actions: Sequence[Any], **kwargs: Any) -> None:
                for action in actions:
                    by_id[action.position_id].actions.append(action)
                handed_over(actions, **kwargs)

            desk.on_actions = on_actions  # type: ignore[method-assign]
            health = daemon.market.health
            last: dict[str, Decimal] = {}

            def exits_of(symbol: str) -> int:
                return sum(len(p.actions) for p in positions if p.leg.symbol == symbol)

            async def publish(prices: dict[str, Decimal]) -> None:
                # one message per symbol; then, as the backtest confirms at once and looks at
                # the same mark again, that mark again for each symbol that just had an exit
                while prices:
                    counts = {symbol: exits_of(symbol) for symbol in prices}
                    expected = health.messages + len(prices)
                    for symbol, price in prices.items():
                        await venue.set_mark(symbol, price)
                    await _until(lambda n=expected: health.messages >= n, "messages")
                    assert health.messages == expected, "the feed carried an unexpected message"
                    await _until(lambda: not engine.pending_actions(), "exits confirmed")
                    last.update(prices)
                    prices = {s: p for s, p in prices.items() if exits_of(s) != counts[s]}

            def next_trigger(symbol: str, target: Decimal) -> Decimal | None:
                # a continuous move visits every trigger on the way, nearest first
                here = last[symbol]
                low, high = min(here, target), max(here, target)
                between = []
                for view in engine.positions():
                    if view.symbol != symbol:
                        continue
                    levels = view.take_profit_prices[view.ladder_levels_done :]
                    for price in (view.stop_price, *levels):
                        if low < Decimal(price) < high:
                            between.append(Decimal(price))
                if not between:
                    return None
                return min(between) if target > here else max(between)

            def live() -> list[str]:
                return sorted({view.symbol for view in engine.positions()})

            # the first bar opens at m0 where the entries filled: the feed starts there
            await publish({symbol: points[symbol][0][0][1] for symbol in symbols})
            for bar in range(BAR_PATH):
                for step, (offset, _) in enumerate(points[symbols[0]][bar]):
                    if bar == 0 and step == 0:
                        continue
                    # within a bar the price moves (an open jumps): first the triggers on
                    # the way, at the time the move starts, as the backtest stamps them
                    while step > 0:
                        targets = {s: points[s][bar][step][1] for s in live()}
                        triggers = {s: next_trigger(s, t) for s, t in targets.items()}
                        found = {s: t for s, t in triggers.items() if t is not None}
                        if not found:
                            break
                        await publish(found)
                    at = m0 + bar * MINUTE_MS + offset
                    await venue.step(at - venue.clock.now_ms(), publish=False)
                    await publish({s: points[s][bar][step][1] for s in live()})
            assert not engine.positions(), "a position outlived its path"
            await _until(
                lambda: all(
                    store.get_position(p.position_id).status == "closed" for p in positions
                ),
                "positions closed in the store",
            )
            exits = _exits(venue, store)
    return BarRun(positions, initial_stops, exits, backtest)


def _exits(venue: Venue, store: Any) -> list[dict[str, Any]]:
    exits = []
    fills = {f["clientOrderId"]: f for f in venue.order_log.fills}
    for order in venue.order_log.orders:
        row = store.get_order(order["clientOrderId"])
        assert row is not None, order  # every order on the venue is the daemon's
        if row.kind == "entry":
            continue
        exits.append(
            {
                "position_id": row.position_id,
                "kind": row.kind,
                "reason": row.reason,
                "sequence": row.sequence,
                "params": row.params,
                "order": order,
                "fill": fills[order["clientOrderId"]],
            }
        )
    return exits


@pytest.mark.parametrize("mode", ["one-way", "hedge"])
async def test_bar_backtest_and_daemon_agree_on_the_same_bars(tmp_path: Path, mode: str) -> None:
    run = await replay_bars(BAR_LEGS, tmp_path, mode)
    fills = run.backtest.fills
    trades = run.backtest.trades
    exits = fills.filter(pl.col("kind") == "exit")
    # the case of a mark jumping past the trigger (bar opens beyond it) is in the data
    assert (exits["price"] != exits["trigger_price"]).any()
    for position in run.positions:
        symbol = position.leg.symbol
        label = f"bars {mode} {symbol} {position.side}"
        tick = _tick(symbol)
        entry = fills.filter((pl.col("symbol") == symbol) & (pl.col("kind") == "entry")).row(
            0, named=True
        )
        # same entry: price (the first bar's open), size from the same notional
        assert entry["price"] == Decimal(position.entry_price), label
        assert entry["quantity"] == Decimal(position.quantity), label
        trade = trades.filter(pl.col("symbol") == symbol).row(0, named=True)
        # same ATR at the entry: the same initial stop
        assert trade["initial_stop"] == Decimal(run.initial_stops[position.position_id]), label
        expected = (
            fills.filter((pl.col("symbol") == symbol) & (pl.col("kind") == "exit"))
            .sort("sequence")
            .rows(named=True)
        )
        sent = sorted(
            (e for e in run.exits if e["position_id"] == position.position_id),
            key=lambda e: e["sequence"],
        )
        reasons = [row["reason"] for row in expected]
        assert [a.reason for a in position.actions] == reasons, label
        assert [e["reason"] for e in sent] == reasons, label
        assert tuple(reasons) == position.leg.reasons, label
        for exit_, action, row in zip(sent, position.actions, expected, strict=True):
            _check_order(exit_, position.side, mode, label)
            assert Decimal(exit_["order"]["quantity"]) == row["quantity"], label
            assert Decimal(action.quantity) == row["quantity"], label
            assert int(action.event_time_ms) == row["time_ms"], label
            assert abs(Decimal(action.trigger_price) - row["trigger_price"]) <= tick, label
            assert abs(Decimal(action.mark_price) - row["mark_price"]) <= tick, label
            # the backtest's fill price is the daemon's fill on the venue
            assert abs(Decimal(exit_["fill"]["price"]) - row["price"]) <= tick, label
