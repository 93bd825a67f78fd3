"""The trading core (desk, real ExitEngine, store) against the real simulator over loopback.

No daemon and no websockets: mark prices go to the engine as the bytes the stream would
carry, and the exchange's state is read over REST. Covers a restart mid-position (same stop,
no duplicate order) and a position closed by the exchange-side backstop, in both modes.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

import pyquant
from pyquant.exchange.client import BinanceClient
from pyquant.trading.desk import DeskConfig, TradingDesk
from pyquant.trading.guard import GuardConfig
from pyquant.trading.intents import parse_intent
from pyquant.trading.journal import Store
from pyquant.trading.recovery import reconcile
from pyquant.trading.sizing import SizingConfig

sim = pytest.importorskip("pyquant.sim")


def mark(symbol: str, price: str, at_ms: int) -> bytes:
    return json.dumps(
        {
            "e": "markPriceUpdate",
            "E": at_ms,
            "s": symbol,
            "p": price,
            "i": price,
            "P": price,
            "r": "0",
            "T": at_ms,
        }
    ).encode()


def desk_for(client: BinanceClient, path: Path, rules: object, engine: object) -> TradingDesk:
    config = DeskConfig(
        guard=GuardConfig(max_age_ms=10**12),
        sizing=SizingConfig(method="notional", notional_usd=Decimal("600")),
    )
    return TradingDesk(client, Store.open(path), rules, engine, config)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["one-way", "hedge"])
async def test_restart_mid_position_then_backstop_close(tmp_path: Path, mode: str) -> None:
    async with sim.serve(speed=0, position_mode=mode, symbols=["BTCUSDT"]) as venue:
        await venue.set_mark("BTCUSDT", "30000.0")
        async with BinanceClient(venue.rest_url, venue.api_key, venue.api_secret) as client:
            rules = pyquant.ExchangeRules.from_exchange_info(await client.exchange_info())
            policy = pyquant.ExitPolicy.preset("standard")
            path = tmp_path / "state.sqlite"
            desk = desk_for(client, path, rules, pyquant.ExitEngine(rules, policy))
            await reconcile(desk)
            intent = parse_intent(
                {"id": "a", "symbol": "BTCUSDT", "side": "SELL", "leverage": 10},
                source="t",
                now_ms=client.now_ms(),
            )
            decision = await desk.submit(intent)
            assert decision.accepted, decision
            pid = decision.position_id or ""
            view = desk.engine.position(pid)  # type: ignore[attr-defined]
            assert (view.quantity, view.stop_price) == ("0.020", "30300.0")
            now = client.now_ms()
            # -1.5 %: take profit 1 on the short
            await venue.set_mark("BTCUSDT", "29540.0")
            actions = desk.engine.on_mark_message(mark("BTCUSDT", "29540.0", now + 1_000))  # type: ignore[attr-defined]
            assert [(a.reason, a.quantity) for a in actions] == [("take_profit_1", "0.006")]
            desk.on_actions(actions)
            await desk.drain()
            stop = desk.engine.position(pid).stop_price  # type: ignore[attr-defined]
            assert Decimal(stop) < Decimal("30000")  # breakeven for a short
            orders_before = len(venue.order_log.orders)
            desk.store.close()  # kill -9 mid-position

            restarted = desk_for(client, path, rules, pyquant.ExitEngine(rules, policy))
            report = await reconcile(
                restarted, restore=lambda data: pyquant.ExitEngine.restore(data, rules)
            )
            assert report.positions_adopted == []
            assert report.positions_dropped == []
            view = restarted.engine.position(pid)  # type: ignore[attr-defined]
            assert (view.quantity, view.stop_price) == ("0.014", stop)
            assert len(venue.order_log.orders) == orders_before  # nothing sent twice

            # the exchange-side backstop closes the position (e.g. while we are down)
            (backstop,) = await client.open_algo_orders("BTCUSDT")
            assert backstop["side"] == "BUY"
            assert backstop["positionSide"] == ("SHORT" if mode == "hedge" else "BOTH")
            await venue.set_mark("BTCUSDT", str(Decimal(backstop["triggerPrice"]) + 10))
            rows = await client.position_risk()
            assert [r for r in rows if Decimal(str(r["positionAmt"])) != 0] == []
            report = await reconcile(restarted)  # the stream reconnects: reconcile again
            assert report.positions_dropped == [pid]
            assert restarted.engine.positions() == []  # type: ignore[attr-defined]
            assert await client.open_algo_orders() == []
            restarted.store.close()
