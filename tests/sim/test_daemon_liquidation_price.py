"""End to end: a pyquant daemon hands the simulator's liquidation price to its exit engine."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from tests.integration.pq_harness import run_daemon, simulator, until

SYMBOL = "ETHUSDT"


async def test_daemon_engine_gets_the_simulators_liquidation_price(tmp_path: Path) -> None:
    # A small cross wallet gives the long a real liquidation price (a large one gives none).
    async with simulator("one-way", balance=250) as venue:
        await venue.set_mark(SYMBOL, "2500.00")
        async with run_daemon(venue, tmp_path) as running:
            daemon = running.daemon
            result = await daemon.submit(
                {"id": "liq-1", "symbol": SYMBOL, "side": "BUY", "size_usd": "500"}
            )
            assert result.accepted, result
            position_id = result.position_id
            store = daemon.desk.store
            await until(lambda: store.get_position(position_id).status == "open", what="entry")
            # 0.2 ETH at 2500.00, taker fee 0.25: (249.75 - 500) / (0.2 x 0.004 - 0.2)
            expected = Decimal("-250.25") / Decimal("-0.1992")
            assert venue.exchange.liquidation_price(SYMBOL, "BOTH") == expected

            def seen() -> str | None:
                return daemon.engine.position(position_id).liquidation_price  # type: ignore[no-any-return]

            await until(lambda: seen() is not None, what="liquidation price in the engine")
            assert Decimal(str(seen())) == Decimal("1256.27510040")  # positionRisk: 8 decimals
            await running.stop()
