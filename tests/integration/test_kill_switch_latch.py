"""The kill switch latches and reaches every order (issue 17, items 1 and 2), in both modes.

Before: after an external ``pyquant flatten`` a running daemon took a new entry 2 s later, a
restarted daemon took new entries after SIGUSR1, and the flatten left a manual STOP_MARKET
and our stops of another state directory in place while reporting "0 failed".
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pq_harness import (
    DaemonProcess,
    append_intent,
    run_daemon,
    run_pyquant,
    simulator,
    until,
    venue_env,
    write_config,
)

from pyquant.daemon.cli import run_command
from pyquant.exchange.client import BinanceClient
from pyquant.trading.journal import Store

SYMBOL = "ETHUSDT"
MODES = ["one-way", "hedge"]


def env_for(venue: Any) -> dict[str, str]:
    return venue_env(venue)


def leg(mode: str, side: str) -> str:
    return ("LONG" if side == "BUY" else "SHORT") if mode == "hedge" else "BOTH"


@pytest.mark.parametrize("mode", MODES)
async def test_halt_outlives_the_daemon_until_resume(tmp_path: Path, mode: str) -> None:
    state = tmp_path / "state"
    async with simulator(mode) as venue:
        await venue.set_mark(SYMBOL, "2500.00")
        async with run_daemon(venue, state) as running:
            # sizing reads the mark the market stream delivered (item 12), not REST
            await venue.set_mark(SYMBOL, "2500.00")
            await until(lambda: running.daemon.marks.get(SYMBOL) == Decimal("2500.00"), 10, "mark")
            opened = await running.daemon.submit(
                {"id": "h-1", "symbol": SYMBOL, "side": "BUY", "size_usd": "500"}
            )
            assert opened.accepted, opened
            await until(lambda: venue.exchange.position(SYMBOL, leg(mode, "BUY")).amount > 0)
            steps = await running.daemon.flatten()
            assert all(step.ok for step in steps), steps
            assert venue.exchange.position(SYMBOL, leg(mode, "BUY")).amount == 0
            refused = await running.daemon.submit(
                {"id": "h-2", "symbol": SYMBOL, "side": "BUY", "size_usd": "500"}
            )
            assert (refused.accepted, refused.reason) == (False, "halted")
        # a restart on the same state is still halted
        async with run_daemon(venue, state) as running:
            refused = await running.daemon.submit(
                {"id": "h-3", "symbol": SYMBOL, "side": "SELL", "size_usd": "500"}
            )
            assert (refused.accepted, refused.reason) == (False, "halted")
            assert "pyquant resume" in refused.detail
            # 'pyquant resume' beside the running daemon: entries are taken again
            assert run_command("resume", ["--state", str(state)]) == 0
            taken = await running.daemon.submit(
                {"id": "h-4", "symbol": SYMBOL, "side": "SELL", "size_usd": "500"}
            )
            assert taken.accepted, taken
            await until(lambda: venue.exchange.position(SYMBOL, leg(mode, "SELL")).amount < 0)
    store = Store.open(state / "pyquant.sqlite")
    reasons = {row["intent_id"]: row["reason"] for row in store.intent_decisions()}
    assert reasons == {"h-1": "accepted", "h-2": "halted", "h-3": "halted", "h-4": "accepted"}


async def place_foreign_stops(venue: Any, mode: str) -> None:
    """A manual STOP_MARKET (not pyquant's) and a pyquant stop of another state's tag."""
    client = BinanceClient(venue.rest_url, venue.api_key, venue.api_secret)
    try:
        manual = {
            "symbol": "BTCUSDT",
            "side": "SELL",
            "type": "STOP_MARKET",
            "triggerPrice": "25000.0",
            "quantity": "0.050",
            "clientAlgoId": "manual-stop-1",
        }
        other_state = {
            "symbol": "BTCUSDT",
            "side": "BUY",
            "type": "STOP_MARKET",
            "triggerPrice": "35000.0",
            "quantity": "0.050",
            "clientAlgoId": "pqzz99-7-b0-0",
        }
        if mode == "hedge":
            manual["positionSide"] = "SHORT"
            other_state["positionSide"] = "LONG"
        await client.new_algo_order(manual)
        await client.new_algo_order(other_state)
    finally:
        await client.close()


@pytest.mark.parametrize("mode", MODES)
async def test_flatten_cancels_every_order_on_the_account(tmp_path: Path, mode: str) -> None:
    state = tmp_path / "state"
    config = tmp_path / "pyquant.toml"
    async with simulator(mode) as venue:
        await venue.set_mark(SYMBOL, "2500.00")
        await venue.set_mark("BTCUSDT", "30000.0")
        async with run_daemon(venue, state) as running:
            opened = await running.daemon.submit(
                {"id": "f-1", "symbol": SYMBOL, "side": "SELL", "size_usd": "500"}
            )
            assert opened.accepted, opened
            await until(lambda: len(venue.exchange.open_algo_orders(SYMBOL)) == 1, 10, "stop")
            await running.stop()  # positions and the backstop stay
        await place_foreign_stops(venue, mode)
        assert len(venue.exchange.open_algo_orders("BTCUSDT")) == 2
        write_config(config, venue, tmp_path / "none.jsonl")
        env = env_for(venue)
        base = ["flatten", "--config", str(config), "--state", str(state), "--yes"]
        # narrowed to pyquant's orders: the manual stop stays, and the status says so
        code, out, err = await run_pyquant(*base, "--ours-only", env=env)
        assert code == 1, out + err
        assert "pqzz99-7-b0-0" in out
        assert "LEFT OPEN algo order BTCUSDT STOP_MARKET manual-stop-1" in out
        assert [o.client_algo_id for o in venue.exchange.open_algo_orders("BTCUSDT")] == [
            "manual-stop-1"
        ]
        assert venue.exchange.position(SYMBOL, leg(mode, "SELL")).amount == 0
        # by default: every open order on the account
        code, out, err = await run_pyquant(*base, env=env)
        assert code == 0, out + err
        assert "manual-stop-1 cancelled" in out
        assert "the account is flat" in out
        assert venue.exchange.open_algo_orders() == []
        assert venue.exchange.open_orders() == []
    store = Store.open(state / "pyquant.sqlite")
    halt = store.halt()
    assert halt is not None  # the flatten latched it; 'pyquant resume' clears it
    assert halt.flatten_result is not None


@pytest.mark.parametrize("mode", MODES)
async def test_external_flatten_beside_a_live_daemon_latches(tmp_path: Path, mode: str) -> None:
    intents = tmp_path / "intents.jsonl"
    intents.touch(mode=0o600)
    config = tmp_path / "pyquant.toml"
    state = tmp_path / "state"
    async with simulator(mode) as venue:
        await venue.set_mark(SYMBOL, "2500.00")
        write_config(config, venue, intents)
        env = env_for(venue)
        daemon = DaemonProcess(config, state, env, tmp_path / "summary.json")
        await daemon.start()
        try:
            await daemon.wait_logged("Daemon running")
            append_intent(
                intents, {"id": "x-1", "symbol": SYMBOL, "side": "BUY", "size_usd": "500"}
            )
            await until(
                lambda: (
                    venue.exchange.position(SYMBOL, leg(mode, "BUY")).amount == Decimal("0.200")
                ),
                20,
                "entry",
            )
            # a second daemon on the same state is refused with the holder's pid
            code, _, err = await run_pyquant(
                "run", "--config", str(config), "--state", str(state), "--no-tui", env=env
            )
            assert code == 2
            assert daemon.proc is not None
            assert f"in use by process {daemon.proc.pid}" in err
            code, out, err = await run_pyquant(
                "flatten", "--config", str(config), "--state", str(state), "--yes", env=env
            )
            assert code == 0, out + err
            assert f"pid {daemon.proc.pid}" in out
            assert "signalled (SIGUSR1)" in out
            assert venue.exchange.position(SYMBOL, leg(mode, "BUY")).amount == 0
            # the running daemon refuses the next entry: the halt latched
            append_intent(
                intents, {"id": "x-2", "symbol": SYMBOL, "side": "BUY", "size_usd": "500"}
            )
            journal = Store.open(state / "pyquant.sqlite")
            await until(lambda: bool(journal.intent_decisions("x-2")), 20, "x-2 decided")
            assert journal.intent_decisions("x-2")[0]["reason"] == "halted"
            assert venue.exchange.position(SYMBOL, leg(mode, "BUY")).amount == 0
            code, out, _ = await run_pyquant("resume", "--state", str(state), env=env)
            assert code == 0
            assert "cleared the halt set by pyquant flatten" in out
            append_intent(
                intents, {"id": "x-3", "symbol": SYMBOL, "side": "BUY", "size_usd": "500"}
            )
            await until(
                lambda: (
                    venue.exchange.position(SYMBOL, leg(mode, "BUY")).amount == Decimal("0.200")
                ),
                20,
                "entry after resume",
            )
        finally:
            assert await daemon.terminate() == 0


@pytest.mark.parametrize("mode", MODES)
async def test_sigusr1_then_kill9_the_restart_finishes_the_flatten(
    tmp_path: Path, mode: str
) -> None:
    import signal

    intents = tmp_path / "intents.jsonl"
    intents.touch(mode=0o600)
    config = tmp_path / "pyquant.toml"
    state = tmp_path / "state"
    async with simulator(mode) as venue:
        await venue.set_mark(SYMBOL, "2500.00")
        write_config(config, venue, intents)
        env = env_for(venue)
        daemon = DaemonProcess(config, state, env, tmp_path / "summary.json")
        await daemon.start()
        await daemon.wait_logged("Daemon running")
        append_intent(intents, {"id": "k-1", "symbol": SYMBOL, "side": "BUY", "size_usd": "500"})
        append_intent(intents, {"id": "k-2", "symbol": SYMBOL, "side": "SELL", "size_usd": "500"})
        held = leg(mode, "SELL") if mode == "hedge" else leg(mode, "BUY")
        await until(lambda: venue.exchange.position(SYMBOL, held).amount != 0, 20, "entry")
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGUSR1)
        await daemon.wait_logged("Kill switch: halted")
        await daemon.kill9()  # wherever the flatten was: the halt is in the journal
        restarted = DaemonProcess(config, state, env, tmp_path / "summary2.json")
        await restarted.start()
        try:
            await restarted.wait_logged("Daemon running")
            await until(
                lambda: all(
                    venue.exchange.position(SYMBOL, side).amount == 0
                    for side in {leg(mode, "BUY"), leg(mode, "SELL")}
                ),
                30,
                "flattened after the restart",
            )
            append_intent(
                intents, {"id": "k-3", "symbol": SYMBOL, "side": "BUY", "size_usd": "500"}
            )
            journal = Store.open(state / "pyquant.sqlite")
            await until(lambda: bool(journal.intent_decisions("k-3")), 20, "k-3 decided")
            assert journal.intent_decisions("k-3")[0]["reason"] == "halted"
        finally:
            assert await restarted.terminate() == 0
