"""Mark updates the engine refuses are shown as malformed input by the running daemon."""

from __future__ import annotations

import json
from pathlib import Path

from pq_harness import run_daemon, simulator, until

SYMBOL = "ETHUSDT"


def mark_message(event_ms: int, price: str) -> bytes:
    return json.dumps(
        {
            "e": "markPriceUpdate",
            "E": event_ms,
            "s": SYMBOL,
            "p": price,
            "i": price,
            "P": price,
            "r": "0.0001",
            "T": event_ms + 3_600_000,
        }
    ).encode()


async def test_an_implausible_event_time_is_counted_and_poisons_nothing(tmp_path: Path) -> None:
    async with simulator("one-way") as venue:
        await venue.set_mark(SYMBOL, "2500.00")
        async with run_daemon(venue, tmp_path) as running:
            daemon = running.daemon
            result = await daemon.submit(
                {"id": "t-1", "symbol": SYMBOL, "side": "BUY", "size_usd": "500"}
            )
            store = daemon.desk.store
            await until(lambda: store.get_position(result.position_id).status == "open")
            before = daemon.current_summary()["malformed_messages"]
            last = venue.exchange.now_ms()
            daemon._on_mark(mark_message(last * 1000, "2500.00"))  # E in microseconds
            assert daemon.current_summary()["malformed_messages"] == before + 1
            # a later, correct update still reaches the position: through its stop
            daemon._on_mark(mark_message(last + 60_000, "2000.00"))
            await until(
                lambda: store.get_position(result.position_id).status == "closed",
                what="the stop acts",
            )
            await running.stop()
