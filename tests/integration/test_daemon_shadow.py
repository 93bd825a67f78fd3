"""--shadow: decisions and exits run on paper positions; nothing reaches the exchange."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from pq_harness import run_daemon, simulator, until

SYMBOL = "ETHUSDT"


async def test_shadow_daemon_runs_exits_on_paper_and_sends_nothing(tmp_path: Path) -> None:
    async with simulator("hedge") as venue:
        await venue.set_mark(SYMBOL, "2500.00")
        async with run_daemon(venue, tmp_path, router={"shadow": True}) as running:
            daemon = running.daemon
            result = await daemon.submit(
                {"id": "paper-1", "symbol": SYMBOL, "side": "BUY", "size_usd": "500"}
            )
            assert result.accepted, result
            store = daemon.desk.store
            position = store.get_position(result.position_id)
            assert (position.status, Decimal(position.quantity)) == ("open", Decimal("0.2"))
            assert Decimal(position.entry_price) == Decimal("2500.00")
            # the guard counts paper positions: no second entry on the leg
            again = await daemon.submit(
                {"id": "paper-2", "symbol": SYMBOL, "side": "BUY", "size_usd": "500"}
            )
            assert not again.accepted

            await venue.step(1000)
            await venue.set_mark(SYMBOL, "2525.25")  # +1.01 %: take_profit_1 on paper
            await until(
                lambda: store.get_position(result.position_id).quantity == "0.140",
                what="paper take-profit",
            )
            view = daemon.engine.position(result.position_id)
            assert view.ladder_levels_done == 1
            assert view.stop_reason == "breakeven_stop"
            summary = await running.stop()
        assert summary["exits"] == {"take_profit_1": 1}
        assert summary["open_positions"] == 1

        # a restart keeps the paper position (the exchange does not hold it: not "gone")
        async with run_daemon(venue, tmp_path, router={"shadow": True}) as running:
            daemon = running.daemon
            store = daemon.desk.store
            assert [p.position_id for p in store.positions(("open",))] == [result.position_id]
            assert daemon.engine.position(result.position_id).ladder_levels_done == 1
            steps = await daemon.flatten()
            assert [(s.step, s.ok, s.detail) for s in steps] == [("close", True, "on paper")]
            assert store.positions(("open",)) == []

        # nothing ever reached the exchange: no order, no algo order, no position
        assert venue.order_log.orders == []
        assert [e for e in venue.order_log.entries if e["kind"] == "algo"] == []
        assert venue.exchange.position(SYMBOL, "LONG").amount == 0
