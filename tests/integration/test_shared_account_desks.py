"""Two trading desks sharing one simulated account, each running the symbols it owns.

What several daemons rely on, without Redis in the way: a reconciliation scoped to the owned
symbols never adopts a peer's position, account updates on other symbols are left alone, a
hand-over sends nothing, and a takeover keeps the exchange-side stop at least as tight as the
previous owner's (its backstop is retired only when ours is no looser; with the previous
owner's exit state the ladder and stop resume where they were).
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from pq_harness import EXIT_POLICY

import pyquant
from pyquant.exchange.client import BinanceClient
from pyquant.trading.desk import DeskConfig, TradingDesk
from pyquant.trading.guard import GuardConfig
from pyquant.trading.intents import parse_intent
from pyquant.trading.journal import Store
from pyquant.trading.recovery import reconcile
from pyquant.trading.router import RouterConfig
from pyquant.trading.sizing import SizingConfig

sim = pytest.importorskip("pyquant.sim")


def mark(symbol: str, price: str, at_ms: int) -> bytes:
    return json.dumps(
        {"e": "markPriceUpdate", "E": at_ms, "s": symbol, "p": price, "i": price, "r": "0"}
    ).encode()


def new_desk(client: BinanceClient, path: Path, rules: object, owned: set[str]) -> TradingDesk:
    config = DeskConfig(
        guard=GuardConfig(max_age_ms=10**12, cooldown_ms=0),
        sizing=SizingConfig(method="notional", notional_usd=Decimal("500")),
        router=RouterConfig(backstop_min_interval_ms=0),
    )
    engine = pyquant.ExitEngine(
        rules, pyquant.ExitPolicy(**{k: v for k, v in EXIT_POLICY.items() if k != "preset"})
    )  # type: ignore[arg-type]
    desk = TradingDesk(client, Store.open(path), rules, engine, config)  # type: ignore[arg-type]
    desk.ownership = lambda: frozenset(owned)
    return desk


async def open_long(desk: TradingDesk, client: BinanceClient, symbol: str, intent_id: str) -> str:
    intent = parse_intent(
        {"id": intent_id, "symbol": symbol, "side": "BUY", "leverage": 5},
        source="t",
        now_ms=client.now_ms(),
    )
    decision = await desk.submit(intent)
    assert decision.accepted, decision
    return decision.position_id or ""


async def feed(desk: TradingDesk, venue: object, symbol: str, price: str, at_ms: int) -> None:
    await venue.set_mark(symbol, price)  # type: ignore[attr-defined]
    actions = desk.engine.on_mark_message(mark(symbol, price, at_ms))  # type: ignore[attr-defined]
    desk.on_actions(actions)
    await desk.drain()


def algo_triggers(venue: object, symbol: str) -> dict[str, Decimal]:
    orders = venue.exchange.open_algo_orders(symbol)  # type: ignore[attr-defined]
    return {o.client_algo_id: o.trigger_price for o in orders}


@pytest.mark.parametrize("with_hint", [False, True])
async def test_takeover_never_loosens_the_exchange_stop(tmp_path: Path, with_hint: bool) -> None:
    async with sim.serve(speed=0, position_mode="hedge", symbols=["BTCUSDT", "ETHUSDT"]) as venue:
        await venue.set_mark("BTCUSDT", "100000.0")
        await venue.set_mark("ETHUSDT", "2500.00")
        async with BinanceClient(venue.rest_url, venue.api_key, venue.api_secret) as client:
            rules = pyquant.ExchangeRules.from_exchange_info(await client.exchange_info())
            owned_a, owned_b = {"BTCUSDT"}, {"ETHUSDT"}
            a = new_desk(client, tmp_path / "a.sqlite", rules, owned_a)
            b = new_desk(client, tmp_path / "b.sqlite", rules, owned_b)
            await reconcile(a, symbols=frozenset(owned_a))
            await reconcile(b, symbols=frozenset(owned_b))
            await open_long(a, client, "BTCUSDT", "a-1")
            eth = await open_long(b, client, "ETHUSDT", "b-1")
            now = client.now_ms()

            # a scoped reconciliation adopts nothing of the peer's, nor does an account update
            report = await reconcile(a, symbols=frozenset(owned_a))
            assert report.positions_adopted == []
            await a.on_user_event(
                {
                    "e": "ACCOUNT_UPDATE",
                    "E": now,
                    "a": {"P": [{"s": "ETHUSDT", "pa": "0.200", "ep": "2500", "ps": "LONG"}]},
                }
            )
            assert [p.symbol for p in a.store.positions(("open",))] == ["BTCUSDT"]

            # b takes the first profit: its stop, and so its backstop, go to breakeven
            await feed(b, venue, "ETHUSDT", "2500.00", now + 1_000)
            await feed(b, venue, "ETHUSDT", "2526.00", now + 2_000)
            assert venue.exchange.position("ETHUSDT", "LONG").amount == Decimal("0.140")
            await b.sync_backstops()
            b_stops = algo_triggers(venue, "ETHUSDT")
            assert len(b_stops) == 1
            b_cid, b_trigger = next(iter(b_stops.items()))
            view = b.engine.position(eth)  # type: ignore[attr-defined]
            hint = {
                "entry_price": view.entry_price,
                "original_quantity": view.original_quantity,
                "best_price": view.best_price,
                "opened_at_ms": str(now),
            }

            # b hands ETHUSDT over: nothing is sent, the position and its stop stay
            orders_before = len(venue.order_log)
            assert await b.hand_over("ETHUSDT", "a") == [eth]
            owned_b.discard("ETHUSDT")
            assert len(venue.order_log) == orders_before
            assert b.store.get_position(eth).close_reason == "handed_over:a"  # type: ignore[union-attr]
            assert b.engine.positions() == []  # type: ignore[attr-defined]
            assert algo_triggers(venue, "ETHUSDT") == {b_cid: b_trigger}

            # a takes it over
            owned_a.add("ETHUSDT")
            hints: dict[tuple[str, str], dict[str, str]] = (
                {("ETHUSDT", "LONG"): hint} if with_hint else {}
            )
            a.adoption_hint = lambda symbol, leg: hints.get((symbol, leg))
            # the price eases back under the first level (still above breakeven) meanwhile
            await venue.set_mark("ETHUSDT", "2510.00")
            a.engine.on_mark_message(mark("ETHUSDT", "2510.00", now + 3_000))  # type: ignore[attr-defined]
            orders_before_takeover = len(venue.order_log.orders)
            report = await reconcile(a, symbols=frozenset({"ETHUSDT"}), takeover=True)
            await a.drain()
            assert len(report.positions_adopted) == 1
            assert a.guard.state_known
            adopted = a.engine.position(report.positions_adopted[0])  # type: ignore[attr-defined]
            stops = algo_triggers(venue, "ETHUSDT")
            a_cids = [cid for cid in stops if cid != b_cid]
            assert len(a_cids) == 1
            if with_hint:
                # the ladder resumes at level 2 and the stop stays at breakeven
                assert adopted.ladder_levels_done == 1
                assert Decimal(adopted.stop_price) == Decimal(view.stop_price)
                assert report.peer_backstops_retired == [b_cid]
                assert stops == {a_cids[0]: b_trigger}
            else:
                # a fresh stop is looser than b's breakeven: b's backstop stays on the exchange
                assert Decimal(adopted.stop_price) < Decimal(view.stop_price)
                assert report.peer_backstops_retired == []
                assert stops[b_cid] == b_trigger
                assert stops[a_cids[0]] < b_trigger
            # no order was sent by the takeover (only the backstop, an algo order)
            assert len(venue.order_log.orders) == orders_before_takeover
            assert venue.exchange.position("ETHUSDT", "LONG").amount == Decimal("0.140")

            # the position closes; whatever backstop is left becomes an orphan and goes
            await feed(a, venue, "ETHUSDT", "2400.00", now + 4_000)
            assert venue.exchange.position("ETHUSDT", "LONG").amount == 0
            await reconcile(a, symbols=frozenset(owned_a))
            assert algo_triggers(venue, "ETHUSDT") == {}
            a.store.close()
            b.store.close()
