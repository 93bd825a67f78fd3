"""Our stops left on closed, flat legs are swept (issue 17, item 8, the clean-up side).

Before: a stop whose cancel failed (timeout or 429) while its position closed stayed live on
the flat symbol until the next restart. Only stops of this journal's tag whose position the
journal closed and whose leg is flat are touched, in both position modes.
"""

from __future__ import annotations

from typing import Any

import pytest

import pyquant.sim as sim
from pyquant.errors import RetryableError
from pyquant.exchange.client import BinanceClient
from pyquant.trading.journal import PositionRow, Store
from pyquant.trading.killswitch import sweep_orphan_stops
from tests.sim.conftest import market

MODES = ["one-way", "hedge"]


def position(position_id: str, symbol: str, leg: str, status: str) -> PositionRow:
    return PositionRow(
        position_id, symbol, leg, status, "entry", "0.1", "2500", 5, None, None, 1, None, None
    )


async def no_sleep(seconds: float) -> None:
    return None


class TimingOut:
    """The venue, except that every algo cancel times out (nothing reaches the exchange)."""

    def __init__(self, client: BinanceClient) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def cancel_algo_order(self, symbol: str, client_algo_id: str) -> Any:
        raise RetryableError(-1007, "Timeout waiting for response from backend server.")


@pytest.mark.parametrize("mode", MODES)
async def test_orphan_stops_of_closed_flat_legs_are_cancelled_and_nothing_else(mode: str) -> None:
    hedge = mode == "hedge"
    store = Store.open(":memory:")
    tag = store.instance_tag
    store.upsert_position(position("1", "ETHUSDT", "SHORT", "closed"))  # orphan: flat, closed
    store.upsert_position(position("2", "BTCUSDT", "LONG", "open"))  # open: never touched
    store.upsert_position(position("3", "BNBUSDT", "LONG", "closed"))  # closed, leg not flat
    async with sim.serve(speed=0, position_mode=mode) as venue:
        for symbol, mark in (("ETHUSDT", "2500.00"), ("BTCUSDT", "30000.0"), ("BNBUSDT", "600.00")):
            await venue.set_mark(symbol, mark)
        client = BinanceClient(venue.rest_url, venue.api_key, venue.api_secret)
        try:
            # BNB holds a long on the exchange (adopted under another id, say)
            entry = market("BUY", "1.00", symbol="BNBUSDT")
            if hedge:
                entry["positionSide"] = "LONG"
            await client.new_order(entry)

            def stop(symbol: str, side: str, leg: str, trigger: str, cid: str) -> dict[str, str]:
                params = {
                    "symbol": symbol,
                    "side": side,
                    "type": "STOP_MARKET",
                    "triggerPrice": trigger,
                    "closePosition": "true",
                    "clientAlgoId": cid,
                }
                if hedge:
                    params["positionSide"] = leg
                return params

            await client.new_algo_order(
                stop("ETHUSDT", "BUY", "SHORT", "2600.00", f"pq{tag}-1-b0-0")
            )
            await client.new_algo_order(
                stop("BTCUSDT", "SELL", "LONG", "29000.0", f"pq{tag}-2-b0-0")
            )
            await client.new_algo_order(
                stop("BNBUSDT", "SELL", "LONG", "590.00", f"pq{tag}-3-b0-0")
            )
            await client.new_algo_order(stop("ETHUSDT", "SELL", "LONG", "2400.00", "pqzz99-1-b0-0"))
            # the cancel times out, as at the close that left the stop behind
            failing = await sweep_orphan_stops(TimingOut(client), store, attempts=2, sleep=no_sleep)
            assert [(s.client_id, s.ok) for s in failing] == [(f"pq{tag}-1-b0-0", False)]
            assert "after 2 attempts" in failing[0].detail
            steps = await sweep_orphan_stops(client, store, sleep=no_sleep)
            assert [(s.client_id, s.ok, s.detail) for s in steps] == [
                (f"pq{tag}-1-b0-0", True, "cancelled")
            ]
            left = sorted(a.client_algo_id for a in venue.exchange.open_algo_orders())
            assert left == sorted([f"pq{tag}-2-b0-0", f"pq{tag}-3-b0-0", "pqzz99-1-b0-0"])
            assert await sweep_orphan_stops(client, store, sleep=no_sleep) == []
        finally:
            await client.close()
