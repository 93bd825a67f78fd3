"""The kill switch: in the running daemon (SIGUSR1 / ``Daemon.flatten``) and ``pyquant flatten``."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

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

SYMBOL = "ETHUSDT"


async def open_both_legs(running) -> None:
    for side in ("BUY", "SELL"):
        result = await running.daemon.submit(
            {"id": f"flat-{side}", "symbol": SYMBOL, "side": side, "size_usd": "500"}
        )
        assert result.accepted, result
    venue = running.venue
    await until(
        lambda: (
            venue.exchange.position(SYMBOL, "LONG").amount == Decimal("0.200")
            and venue.exchange.position(SYMBOL, "SHORT").amount == Decimal("-0.200")
        ),
        what="both legs open",
    )
    await until(lambda: len(venue.exchange.open_algo_orders(SYMBOL)) == 2, what="two backstops")


async def test_flatten_in_the_running_daemon(tmp_path: Path) -> None:
    async with simulator("hedge") as venue:
        await venue.set_mark(SYMBOL, "2500.00")
        async with run_daemon(venue, tmp_path) as running:
            await open_both_legs(running)
            steps = await running.daemon.flatten()
            assert all(step.ok for step in steps), steps
            assert {(s.step, s.position_side) for s in steps if s.step == "close"} == {
                ("close", "LONG"),
                ("close", "SHORT"),
            }
            assert venue.exchange.position(SYMBOL, "LONG").amount == 0
            assert venue.exchange.position(SYMBOL, "SHORT").amount == 0
            await until(lambda: not venue.exchange.open_algo_orders(SYMBOL), what="backstops gone")
            refused = await running.daemon.submit(
                {"id": "after", "symbol": SYMBOL, "side": "BUY", "size_usd": "500"}
            )
            assert (refused.accepted, refused.reason) == (False, "halted")
            store = running.daemon.desk.store
            assert store.positions(("opening", "open")) == []
            summary = await running.stop()
    assert summary["open_positions"] == 0
    # each leg counted once, as a flatten, whether the stream or the flatten settled it first
    assert summary["exits"] == {"flatten": 2}


async def test_a_stop_right_after_the_kill_switch_waits_for_it(tmp_path: Path) -> None:
    # SIGUSR1 then SIGTERM: the flatten is the daemon's own task and the shutdown waits for
    # it; no leg is left open, none loses its stop before it is flat.
    async with simulator("hedge") as venue:
        await venue.set_mark(SYMBOL, "2500.00")
        async with run_daemon(venue, tmp_path) as running:
            await open_both_legs(running)
            flatten = running.daemon.request_flatten()  # what SIGUSR1 calls
            assert running.daemon.request_flatten() is flatten  # a second signal joins it
            summary = await running.stop()  # what SIGTERM asks for, at once
            assert flatten.done()
            assert all(step.ok for step in flatten.result())
    assert venue.exchange.position(SYMBOL, "LONG").amount == 0
    assert venue.exchange.position(SYMBOL, "SHORT").amount == 0
    assert not venue.exchange.open_algo_orders(SYMBOL)
    assert summary["open_positions"] == 0
    assert summary["task_failures"] == 0


async def test_pyquant_flatten_command(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = tmp_path / "pyquant.toml"
    async with simulator("hedge") as venue:
        await venue.set_mark(SYMBOL, "2500.00")
        async with run_daemon(venue, state) as running:
            await open_both_legs(running)
            await running.stop()  # a clean stop leaves positions (and backstops) in place
        assert venue.exchange.position(SYMBOL, "LONG").amount == Decimal("0.200")
        write_config(config, venue, tmp_path / "none.jsonl")
        env = venue_env(venue)
        code, text, err = await run_pyquant(
            "flatten", "--config", str(config), "--state", str(state), "--yes", env=env, limit_s=60
        )
        assert code == 0, err[-2000:]
        assert "flatten:" in text
        assert "0 failed" in text
        assert venue.exchange.position(SYMBOL, "LONG").amount == 0
        assert venue.exchange.position(SYMBOL, "SHORT").amount == 0
        assert not venue.exchange.open_algo_orders(SYMBOL)


async def test_sigusr1_flattens_a_running_pyquant_run(tmp_path: Path) -> None:
    import signal

    intents = tmp_path / "intents.jsonl"
    intents.touch()
    config = tmp_path / "pyquant.toml"
    async with simulator("hedge") as venue:
        await venue.set_mark(SYMBOL, "2500.00")
        write_config(config, venue, intents)
        env = venue_env(venue)
        daemon = DaemonProcess(config, tmp_path / "state", env, tmp_path / "summary.json")
        await daemon.start()
        await daemon.wait_logged("Daemon running")
        append_intent(intents, {"id": "usr1", "symbol": SYMBOL, "side": "SELL", "size_usd": "500"})
        await until(
            lambda: venue.exchange.position(SYMBOL, "SHORT").amount == Decimal("-0.200"),
            20,
            "entry",
        )
        await until(lambda: len(venue.exchange.open_algo_orders(SYMBOL)) == 1, 20, "backstop")
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGUSR1)
        await until(lambda: venue.exchange.position(SYMBOL, "SHORT").amount == 0, 20, "flattened")
        await until(lambda: not venue.exchange.open_algo_orders(SYMBOL), 20, "backstop cancelled")
        await daemon.wait_logged("Flatten step=close")
        assert await daemon.terminate() == 0
