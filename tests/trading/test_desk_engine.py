"""The trading core with the real Rust ExitEngine and ExchangeRules (no sockets).

Entry sized by risk from the engine's planned stop, take profit from a mark-price message,
breakeven ratchet moving the backstop, a kill -9 and restore with the same stop, and the
breakeven stop closing the rest, in both position modes.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from fake_venue import DATA, FakeVenue

import pyquant
from pyquant.trading.desk import DeskConfig, TradingDesk
from pyquant.trading.guard import GuardConfig
from pyquant.trading.intents import parse_intent
from pyquant.trading.journal import Store
from pyquant.trading.recovery import reconcile
from pyquant.trading.sizing import SizingConfig

NOW = 1_764_000_000_000

pytestmark = pytest.mark.skipif(
    not hasattr(pyquant, "ExitEngine"), reason="the Rust exit engine is not built"
)


def mark(symbol: str, price: str, at_ms: int) -> bytes:
    return json.dumps(
        {
            "e": "markPriceUpdate",
            "E": at_ms,
            "s": symbol,
            "p": price,
            "i": price,
            "P": price,
            "r": "0.0001",
            "T": at_ms + 3_600_000,
        }
    ).encode()


def make_desk(venue: FakeVenue, path: Path, rules: object, engine: object) -> TradingDesk:
    config = DeskConfig(
        guard=GuardConfig(max_age_ms=10**12),
        sizing=SizingConfig(method="risk", risk_pct=Decimal("0.01")),
    )
    desk = TradingDesk(venue, Store.open(path), rules, engine, config, clock=lambda: NOW)  # type: ignore[arg-type]
    venue.inspect = desk.store.get_order
    return desk


@pytest.mark.parametrize("hedge", [True, False])
async def test_real_engine_through_the_desk(tmp_path: Path, hedge: bool) -> None:
    rules = pyquant.ExchangeRules.from_exchange_info(
        (DATA / "exchangeInfo_fapi_full_2025-11-26.json").read_bytes()
    )
    policy = pyquant.ExitPolicy.preset("standard")
    venue = FakeVenue(hedge=hedge)
    path = tmp_path / "state.sqlite"
    desk = make_desk(venue, path, rules, pyquant.ExitEngine(rules, policy))
    await reconcile(desk)

    intent = parse_intent(
        {"id": "a", "symbol": "BTCUSDT", "side": "BUY", "leverage": 10, "created_at_ms": NOW},
        source="t",
        now_ms=NOW,
    )
    decision = await desk.submit(intent)
    assert decision.accepted, decision
    pid = decision.position_id or ""
    # standard preset at 10x: stop 1 % below -> 300; 1 % of 10000 / 300 = 0.333
    assert venue.sent[0].params["quantity"] == "0.333"
    view = desk.engine.position(pid)  # type: ignore[attr-defined]
    assert (view.stop_price, view.quantity) == ("29700.0", "0.333")
    assert venue.sent[1].params["triggerPrice"] == "29551.5"

    # +1.5 %: take_profit_1 of 30 % of the original size
    venue.marks["BTCUSDT"] = Decimal("30460.0")
    actions = desk.engine.on_mark_message(mark("BTCUSDT", "30460.0", NOW + 1_000))  # type: ignore[attr-defined]
    assert [(a.reason, a.quantity) for a in actions] == [("take_profit_1", "0.099")]
    desk.on_actions(actions)
    await desk.drain()
    exit_order = venue.sent[2].params
    assert exit_order["quantity"] == "0.099"
    assert exit_order["positionSide"] == ("LONG" if hedge else "BOTH")
    assert ("reduceOnly" in exit_order) is (not hedge)
    view = desk.engine.position(pid)  # type: ignore[attr-defined]
    assert view.quantity == "0.234"
    stop_after_tp = view.stop_price
    assert Decimal(stop_after_tp) > Decimal("30000")  # breakeven plus fees
    live_backstops = [o for o in venue.algo_orders.values() if o["algoStatus"] == "NEW"]
    assert len(live_backstops) == 1
    assert Decimal(live_backstops[0]["triggerPrice"]) > Decimal("29551.5")  # tightened
    desk.store.close()  # kill -9

    restarted = make_desk(venue, path, rules, pyquant.ExitEngine(rules, policy))
    report = await reconcile(
        restarted, restore=lambda data: pyquant.ExitEngine.restore(data, rules)
    )
    assert report.snapshot_restored
    assert report.positions_adopted == []
    view = restarted.engine.position(pid)  # type: ignore[attr-defined]
    assert (view.stop_price, view.quantity) == (stop_after_tp, "0.234")
    sent = len(venue.sent)

    venue.marks["BTCUSDT"] = Decimal("30001.0")
    actions = restarted.engine.on_mark_message(mark("BTCUSDT", "30001.0", NOW + 2_000))  # type: ignore[attr-defined]
    assert [(a.reason, a.quantity) for a in actions] == [("breakeven_stop", "0.234")]
    restarted.on_actions(actions)
    await restarted.drain()
    assert len(venue.sent) == sent + 2  # the close, then the backstop cancel
    assert restarted.store.get_position(pid).status == "closed"  # type: ignore[union-attr]
    assert restarted.engine.positions() == []  # type: ignore[attr-defined]
    assert [o["algoStatus"] for o in venue.algo_orders.values()].count("NEW") == 0
    assert restarted.summary()["exits"] == {"breakeven_stop": 1, "take_profit_1": 1}
