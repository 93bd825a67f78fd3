"""The order router against the real simulator over loopback, in both position modes.

The simulator (``pyquant.sim.serve``) enforces Binance's mode rules (-4061, -1106, -2022) and
injects unknown outcomes; the client is pyquant's own signed REST client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest

import pyquant
from pyquant.exchange.client import BinanceClient
from pyquant.trading.journal import Store
from pyquant.trading.router import OrderRouter, OrderState, RouterConfig

sim = pytest.importorskip("pyquant.sim")


@dataclass
class Rig:
    venue: Any  # pyquant.sim.Venue
    client: BinanceClient
    store: Store
    router: OrderRouter


@asynccontextmanager
async def rig(mode: str) -> AsyncIterator[Rig]:
    async with sim.serve(speed=0, position_mode=mode, symbols=["BTCUSDT", "ETHUSDT"]) as venue:
        await venue.set_mark("BTCUSDT", "30000.0")
        await venue.set_mark("ETHUSDT", "2000.00")
        async with BinanceClient(venue.rest_url, venue.api_key, venue.api_secret) as client:
            rules = pyquant.ExchangeRules.from_exchange_info(await client.exchange_info())
            store = Store.open(":memory:")
            router = OrderRouter(
                client, store, rules, RouterConfig(lookup_delays_s=(0.05, 0.2, 0.5))
            )
            yield Rig(venue, client, store, router)
            store.close()


async def legs(client: BinanceClient) -> dict[tuple[str, str], Decimal]:
    found: dict[tuple[str, str], Decimal] = {}
    for row in await client.position_risk():
        amount = Decimal(str(row["positionAmt"]))
        if amount != 0:
            found[(row["symbol"], row["positionSide"])] = amount
    return found


@pytest.mark.parametrize("mode", ["one-way", "hedge"])
async def test_entry_partial_exit_backstop_and_flatten(mode: str) -> None:
    async with rig(mode) as r:
        hedge = mode == "hedge"
        assert await r.router.refresh_mode() == mode
        await r.router.prepare_symbol("BTCUSDT", 10)
        entry = await r.router.send_entry("1", "BTCUSDT", "LONG", "0.010")
        assert (entry.state, entry.executed_qty) == (OrderState.FILLED, Decimal("0.010"))
        leg = "LONG" if hedge else "BOTH"
        assert await legs(r.client) == {("BTCUSDT", leg): Decimal("0.010")}

        partial = await r.router.send_exit(
            "1",
            "BTCUSDT",
            "LONG",
            "0.003",
            sequence=1,
            reason="take_profit_1",
            live_quantity=Decimal("0.010"),
        )
        assert (partial.state, partial.executed_qty) == (OrderState.FILLED, Decimal("0.003"))
        assert await legs(r.client) == {("BTCUSDT", leg): Decimal("0.007")}

        first = await r.router.backstops.update_backstop("1", "BTCUSDT", "LONG", "29700.0")
        second = await r.router.backstops.update_backstop(
            "1", "BTCUSDT", "LONG", "29800.0", force=True
        )
        open_algo = await r.client.open_algo_orders("BTCUSDT")
        assert [o["clientAlgoId"] for o in open_algo] == [second]
        assert first != second
        (algo,) = open_algo
        assert (algo["positionSide"], algo["side"]) == (leg, "SELL")
        assert str(algo["triggerPrice"]).rstrip("0").rstrip(".") == "29651"

        # the backstop triggers on the mark and closes the rest
        await r.venue.set_mark("BTCUSDT", "29600.0")
        assert await legs(r.client) == {}

        # re-open and flatten
        await r.router.send_entry("2", "BTCUSDT", "SHORT", "0.005")
        await r.router.send_entry("3", "ETHUSDT", "LONG", "0.5")
        steps = await r.router.flatten({("BTCUSDT", "SHORT"): "2", ("ETHUSDT", "LONG"): "3"})
        assert all(step.ok for step in steps if step.step == "close")
        assert await legs(r.client) == {}
        assert await r.client.open_algo_orders() == []


async def test_mode_changed_behind_our_back_rebuilds() -> None:
    async with rig("one-way") as r:
        assert await r.router.refresh_mode() == "one-way"
        await r.client.set_position_mode(True)  # someone switched the account to hedge mode
        entry = await r.router.send_entry("1", "BTCUSDT", "SHORT", "0.004")
        assert entry.state == OrderState.FILLED
        assert r.router.mode == "hedge"
        assert r.store.counters("order_rejections") == {"-4061": 1}
        assert await legs(r.client) == {("BTCUSDT", "SHORT"): Decimal("-0.004")}
        # and the exit of that leg is a hedge close: no reduceOnly, positionSide SHORT
        out = await r.router.send_exit("1", "BTCUSDT", "SHORT", "0.004", sequence=1, reason="x")
        assert out.state == OrderState.FILLED
        row = r.store.get_order(out.client_order_id)
        assert row is not None
        assert row.params["positionSide"] == "SHORT"
        assert "reduceOnly" not in row.params


@pytest.mark.parametrize("error", ["503", "-1007", "drop"])
async def test_executed_order_answering_unknown_is_resolved_without_a_second_order(
    error: str,
) -> None:
    async with rig("hedge") as r:
        await r.router.refresh_mode()
        r.venue.set_faults(order_error_rate=1.0, order_error=error, execute_share=1.0)
        entry = await r.router.send_entry("1", "BTCUSDT", "LONG", "0.010")
        r.venue.set_faults()
        assert (entry.state, entry.executed_qty) == (OrderState.FILLED, Decimal("0.010"))
        assert await legs(r.client) == {("BTCUSDT", "LONG"): Decimal("0.010")}
        assert len(r.venue.order_log.by_client_id(entry.client_order_id)) >= 1
        assert len(r.venue.order_log.orders) == 1


async def test_unknown_outcome_not_executed_is_not_found() -> None:
    async with rig("one-way") as r:
        await r.router.refresh_mode()
        r.venue.set_faults(order_error_rate=1.0, order_error="503", execute_share=0.0)
        entry = await r.router.send_entry("1", "BTCUSDT", "LONG", "0.010")
        r.venue.set_faults()
        assert entry.state == OrderState.NOT_FOUND
        assert await legs(r.client) == {}
        assert r.venue.order_log.orders == []


@pytest.mark.parametrize("mode", ["one-way", "hedge"])
async def test_exit_on_a_flat_leg_reports_flat(mode: str) -> None:
    async with rig(mode) as r:
        await r.router.refresh_mode()
        out = await r.router.send_exit("1", "BTCUSDT", "LONG", "0.003", sequence=1, reason="x")
        assert out.flat
        assert out.error_code == -2022
