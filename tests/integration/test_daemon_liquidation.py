"""The exchange liquidates a position: the daemon records the fill and names the close."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from pq_harness import run_daemon, simulator, until

SYMBOL = "ETHUSDT"


async def test_a_liquidation_is_recorded_as_such(tmp_path: Path) -> None:
    # A thin cross wallet (liquidation near 1256.28) and no exchange-side backstop; the mark
    # gaps from 2500 straight through the engine's stop and the liquidation price.
    async with simulator("one-way", balance=250, liquidation=True) as venue:
        await venue.set_mark(SYMBOL, "2500.00")
        async with run_daemon(venue, tmp_path, router={"backstop": False}) as running:
            daemon = running.daemon
            result = await daemon.submit(
                {"id": "liq-1", "symbol": SYMBOL, "side": "BUY", "size_usd": "500"}
            )
            assert result.accepted, result
            store = daemon.desk.store
            pid = result.position_id
            await until(lambda: store.get_position(pid).status == "open", what="entry")
            await venue.step(1000)
            await venue.set_mark(SYMBOL, "1200.00")
            await until(lambda: store.get_position(pid).status == "closed", what="closed")
            assert store.get_position(pid).close_reason == "liquidation"
            fills = [f for f in store.fills() if (f.client_order_id or "").startswith("autoclose-")]
            assert [(f.side, Decimal(f.quantity)) for f in fills] == [("SELL", Decimal("0.2"))]
            assert Decimal(fills[0].realized_pnl) < 0
            summary = await running.stop()
    assert summary["exits"] == {"liquidation": 1}
    assert summary["open_positions"] == 0
