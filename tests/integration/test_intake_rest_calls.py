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


async def test_a_source_that_keeps_failing_stops_the_daemon_loudly(tmp_path: Any) -> None:
    # Issue 17, item 3: the JSONL source used to stop for good while the daemon ran on deaf.
    # Here the intents path is a directory: every read fails; the source is restarted with
    # backoff and, failing again and again, stops the daemon cleanly, raising the reason.
    import asyncio

    from pyquant.trading.sources import SourceStopped

    intents = tmp_path / "intents.jsonl"
    intents.mkdir(mode=0o700)
    async with simulator("hedge") as venue:
        running_cm = run_daemon(venue, tmp_path / "state", sources={"jsonl": str(intents)})
        async with running_cm as running:
            with pytest.raises(SourceStopped, match="intent source jsonl failed 5 times"):
                await asyncio.wait_for(asyncio.shield(running.task), 60)
            # a clean stop: the summary was taken and the user stream closed
            assert running.daemon.summary != {}
