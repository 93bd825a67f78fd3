"""Intents cost no REST call they do not need (issue 17, item 12), in both position modes.

Before: every intent, duplicates included, cost a ``premiumIndex`` call before the guard saw
it; a JSONL file read again after restarts spent the venue's weight on lines long decided.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from pq_harness import run_daemon, simulator, until

SYMBOL = "ETHUSDT"


@pytest.mark.parametrize("mode", ["one-way", "hedge"])
async def test_marks_come_from_the_stream_and_duplicates_cost_no_request(
    tmp_path: Any, mode: str
) -> None:
    async with simulator(mode) as venue, run_daemon(venue, tmp_path / "state") as running:
        daemon = running.daemon
        client = daemon.client
        assert client is not None
        await venue.set_mark(SYMBOL, "2500.00")
        await until(lambda: daemon.marks.get(SYMBOL) == Decimal("2500.00"), 10, "mark")
        premium_calls: list[str | None] = []
        original = client.premium_index

        async def counting(symbol: str | None = None) -> Any:
            premium_calls.append(symbol)
            return await original(symbol)

        client.premium_index = counting  # type: ignore[method-assign]
        first = await daemon.submit(
            {"id": "r-1", "symbol": SYMBOL, "side": "BUY", "size_usd": "500"}
        )
        assert first.accepted, first
        assert premium_calls == []  # sized at the streamed mark
        sent = client.requests_sent
        again = await daemon.submit(
            {"id": "r-1", "symbol": SYMBOL, "side": "BUY", "size_usd": "500"}
        )
        assert (again.accepted, again.reason) == (False, "duplicate_intent")
        assert client.requests_sent == sent  # refused before any request
