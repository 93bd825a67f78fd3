"""kill -9 mid-position, restart with the same --state: no duplicate order, the same stop."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from pathlib import Path

from pq_harness import DaemonProcess, append_intent, simulator, until, venue_env, write_config

from pyquant.sim.server import Venue
from pyquant.trading.journal import Store

SYMBOL = "ETHUSDT"


async def first_daemon_with_a_long(
    venue: Venue, config: Path, state: Path, intent_id: str, leg: str
) -> DaemonProcess:
    """Start `pyquant run` on ``state`` and let it open a 0.200 ETHUSDT long and its backstop."""
    intents = config.with_name("intents.jsonl")
    intents.touch()
    await venue.set_mark(SYMBOL, "2500.00")
    write_config(config, venue, intents)
    first = DaemonProcess(config, state, venue_env(venue), config.with_name("first.json"))
    await first.start()
    await first.wait_logged("Daemon running")
    await first.wait_logged("Mark-price stream connected")
    append_intent(intents, {"id": intent_id, "symbol": SYMBOL, "side": "BUY", "size_usd": "500"})
    await until(
        lambda: venue.exchange.position(SYMBOL, leg).amount == Decimal("0.200"), 20, "entry"
    )
    await until(lambda: len(venue.exchange.open_algo_orders(SYMBOL)) == 1, 20, "backstop")
    return first


async def test_kill_9_mid_position_then_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = tmp_path / "pyquant.toml"
    async with simulator("hedge") as venue:
        env = venue_env(venue)
        first = await first_daemon_with_a_long(venue, config, state, "crash-1", "LONG")
        initial_trigger = venue.exchange.open_algo_orders(SYMBOL)[0].trigger_price

        await venue.step(1000)
        await venue.set_mark(SYMBOL, "2526.00")  # take_profit_1, then breakeven
        await until(
            lambda: venue.exchange.position(SYMBOL, "LONG").amount == Decimal("0.140"), 20, "TP1"
        )
        await until(
            lambda: (
                [a.trigger_price for a in venue.exchange.open_algo_orders(SYMBOL)]
                != [initial_trigger]
                and len(venue.exchange.open_algo_orders(SYMBOL)) == 1
            ),
            20,
            "backstop moved to breakeven",
        )
        breakeven_trigger = venue.exchange.open_algo_orders(SYMBOL)[0].trigger_price
        assert breakeven_trigger > initial_trigger
        await first.wait_logged("Position opened")
        # kill -9 right after the ratchet: no graceful path, no timer tick to help
        await first.kill9()
        orders_before = [e["clientOrderId"] for e in venue.order_log.orders]

        second = DaemonProcess(config, state, env, tmp_path / "second.json")
        await second.start()
        await second.wait_logged("Daemon running")
        await second.wait_logged("Mark-price stream connected")
        # nothing was resent, the position is the same, and the stop did not loosen
        assert [e["clientOrderId"] for e in venue.order_log.orders] == orders_before
        assert venue.exchange.position(SYMBOL, "LONG").amount == Decimal("0.140")
        assert [a.trigger_price for a in venue.exchange.open_algo_orders(SYMBOL)] == [
            breakeven_trigger
        ]

        await venue.step(1000)
        await venue.set_mark(SYMBOL, "2501.00")  # through the breakeven stop (2502.50)
        await until(
            lambda: venue.exchange.position(SYMBOL, "LONG").amount == 0, 20, "breakeven stop"
        )
        await until(lambda: not venue.exchange.open_algo_orders(SYMBOL), 20, "backstop cancelled")
        assert await second.terminate() == 0

    sent = [e["clientOrderId"] for e in venue.order_log.orders]
    assert len(sent) == len(set(sent)) == 3  # entry, take_profit_1, breakeven_stop
    summary = json.loads((tmp_path / "second.json").read_text())
    assert summary["exits"] == {"breakeven_stop": 1, "take_profit_1": 1}
    assert summary["open_positions"] == 0
    store = Store.open(state / "pyquant.sqlite")
    try:
        exits = store.orders(kind="exit")
        assert [o.reason for o in exits] == ["take_profit_1", "breakeven_stop"]
        assert len(store.orders(kind="entry")) == 1
        snapshot = store.load_snapshot()
    finally:
        store.close()
    assert snapshot is not None


async def test_kill_9_while_an_exit_is_unanswered_then_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = tmp_path / "pyquant.toml"
    async with simulator("one-way") as venue:
        env = venue_env(venue)
        first = await first_daemon_with_a_long(venue, config, state, "inflight-1", "BOTH")
        # the venue executes the take-profit, drops the connection without an answer and does
        # not show the order to queries for a while: the daemon is left not knowing
        venue.set_faults(
            order_error_rate=1.0, order_error="drop", execute_share=1.0, visibility_delay_ms=2500
        )
        await venue.step(1000)
        await venue.set_mark(SYMBOL, "2526.00")
        await until(
            lambda: venue.exchange.position(SYMBOL, "BOTH").amount == Decimal("0.140"),
            20,
            "TP1 executed",
        )
        await first.kill9()
        assert first.logged("reason=take_profit_1")  # sent, and no answer was ever read
        venue.set_faults()
        exits_before = [e for e in venue.order_log.orders if "-x" in str(e["clientOrderId"])]
        assert len(exits_before) == 1

        second = DaemonProcess(config, state, env, tmp_path / "second.json")
        await second.start()
        await second.wait_logged("Daemon running")
        await second.wait_logged("Mark-price stream connected")
        await venue.step(1000)
        await venue.set_mark(SYMBOL, "2527.00")  # the engine would emit take_profit_1 again
        # then the market falls through the breakeven stop; like a live feed, the mark keeps
        # arriving every (simulated) second until the daemon has acted on it
        async with asyncio.timeout(20):
            while venue.exchange.position(SYMBOL, "BOTH").amount != 0:
                await venue.step(1000)
                await venue.set_mark(SYMBOL, "2501.00")
                await asyncio.sleep(0.05)
        assert await second.terminate() == 0

    exits = [e for e in venue.order_log.orders if "-x" in str(e["clientOrderId"])]
    assert [Decimal(e["quantity"]) for e in exits] == [Decimal("0.060"), Decimal("0.140")]
    sent = [e["clientOrderId"] for e in venue.order_log.orders]
    assert len(sent) == len(set(sent))
    summary = json.loads((tmp_path / "second.json").read_text())
    assert summary["exits"] == {"breakeven_stop": 1, "take_profit_1": 1}
