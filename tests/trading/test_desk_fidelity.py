"""Where real Binance differs from our first reading (contract 2.5), in both position modes."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from fake_venue import FakeEngine, FakeRules, FakeVenue

from pyquant.errors import OrderRejected, OrderStatusUnknown
from pyquant.trading.desk import DeskConfig, TradingDesk
from pyquant.trading.guard import GuardConfig
from pyquant.trading.intents import parse_intent
from pyquant.trading.journal import Store
from pyquant.trading.recovery import reconcile
from pyquant.trading.router import RouterConfig, RouterError
from pyquant.trading.sizing import SizingConfig

NOW = 1_700_000_000_000
MODES = [pytest.param(True, id="hedge"), pytest.param(False, id="one-way")]


async def _no_sleep(_seconds: float) -> None:
    return None


def make(hedge: bool, **config: Any) -> tuple[FakeVenue, TradingDesk]:
    venue = FakeVenue(hedge=hedge)
    desk = TradingDesk(
        venue,
        Store.open(":memory:"),
        FakeRules(),
        FakeEngine(),
        DeskConfig(
            guard=GuardConfig(cooldown_ms=0),
            sizing=SizingConfig(method="notional", notional_usd=Decimal("300")),
            router=RouterConfig(lookup_delays_s=(0.1,)),
            **config,
        ),
        clock=lambda: NOW,
    )
    desk.router._sleep = _no_sleep
    return venue, desk


def intent(intent_id: str) -> Any:
    return parse_intent(
        {"id": intent_id, "symbol": "BTCUSDT", "side": "BUY", "created_at_ms": NOW},
        source="t",
        now_ms=NOW,
    )


@pytest.mark.parametrize("hedge", MODES)
async def test_an_adopted_position_gets_its_leverage_from_symbol_config(hedge: bool) -> None:
    venue, desk = make(hedge)
    venue.set_position("BTCUSDT", "LONG" if hedge else "BOTH", "0.020", "30000")
    venue.leverage["BTCUSDT"] = 25
    rows = await venue.position_risk()
    for row in rows:  # v3 positionRisk has no leverage field (contract 2.5)
        row.pop("leverage")
    venue.position_risk = lambda: _rows(rows)  # type: ignore[method-assign]
    report = await reconcile(desk, live=False)
    [position_id] = report.positions_adopted
    position = desk.store.get_position(position_id)
    assert position is not None
    assert position.leverage == 25


async def _rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [dict(row) for row in rows]


@pytest.mark.parametrize("hedge", MODES)
async def test_multi_assets_mode_refuses_to_start_unless_allowed(hedge: bool) -> None:
    venue, desk = make(hedge)
    venue.multi_assets = True
    with pytest.raises(RouterError, match="Multi-Assets mode") as refused:
        await reconcile(desk, live=False)
    assert "allow_multi_assets" in str(refused.value)
    assert not desk.guard.state_known  # entries stay refused
    venue, desk = make(hedge, allow_multi_assets=True)
    venue.multi_assets = True
    report = await reconcile(desk, live=False)
    assert report.multi_assets is True
    assert desk.guard.state_known


@pytest.mark.parametrize("hedge", MODES)
async def test_a_backstop_that_would_trigger_now_closes_the_position(hedge: bool) -> None:
    venue, desk = make(hedge)
    await reconcile(desk, live=False)
    place = venue.new_algo_order

    async def through(params: Any) -> Any:
        venue.new_algo_order = place  # type: ignore[method-assign]
        raise OrderRejected(-2021, "Order would immediately trigger.")

    venue.new_algo_order = through  # type: ignore[method-assign]
    decision = await desk.submit(intent("a"))
    await desk.drain()
    position = desk.store.get_position(decision.position_id or "")
    assert position is not None
    assert (position.status, position.close_reason) == ("closed", "stop_would_trigger")
    assert venue.position_amount("BTCUSDT", "LONG") == 0
    closes = [s.params for s in venue.sent if "-f" in s.params.get("newClientOrderId", "")]
    assert [(p["side"], p["quantity"]) for p in closes] == [("SELL", "0.010")]
    assert desk.store.counters("exits") == {"stop_would_trigger": 1}


@pytest.mark.parametrize("hedge", MODES)
async def test_the_entry_price_comes_from_the_fill_not_the_mark(hedge: bool) -> None:
    venue, desk = make(hedge)
    await reconcile(desk, live=False)
    execute = venue._execute

    def answer_without_avg_price(params: Any) -> dict[str, Any]:
        order = execute(params)
        venue.marks["BTCUSDT"] = Decimal("30500")  # the mark moved since the fill
        order.pop("avgPrice")  # connector 14: no avgPrice in the New Order answer
        return order

    venue._execute = answer_without_avg_price  # type: ignore[method-assign]
    decision = await desk.submit(intent("a"))
    position = desk.store.get_position(decision.position_id or "")
    assert position is not None
    assert position.entry_price == "30000"  # GET /fapi/v1/order's avgPrice, not the mark


@pytest.mark.parametrize("hedge", MODES)
async def test_an_unknown_backstop_outcome_is_looked_up_by_client_algo_id(hedge: bool) -> None:
    venue, desk = make(hedge)
    await reconcile(desk, live=False)
    lookups: list[str] = []
    lookup = venue.get_algo_order

    async def recorded(symbol: str, cid: str) -> Any:
        lookups.append(cid)
        return await lookup(symbol, cid)

    venue.get_algo_order = recorded  # type: ignore[method-assign]
    place = venue.new_algo_order

    async def lost(params: Any) -> Any:
        venue.new_algo_order = place  # type: ignore[method-assign]
        raise OrderStatusUnknown(-1007, "Timeout waiting for response")

    venue.new_algo_order = lost  # type: ignore[method-assign]
    decision = await desk.submit(intent("a"))
    row = desk.store.orders(position_id=decision.position_id, kind="backstop")[0]
    assert lookups[0] == row.client_order_id
    assert row.status == "NOT_FOUND"


@pytest.mark.parametrize("hedge", MODES)
async def test_a_takeover_reads_only_its_symbols_stops(hedge: bool) -> None:
    # openAlgoOrders costs 40 weight for the account, 1 for a symbol: a takeover of one
    # symbol must not spend the account's weight budget (issue 18, 1000 symbols).
    venue, desk = make(hedge)
    await reconcile(desk, live=False)
    venue.set_position("BTCUSDT", "LONG" if hedge else "BOTH", "0.010", "30000")
    asked: list[str | None] = []
    listing = venue.open_algo_orders

    async def recorded(symbol: str | None = None) -> Any:
        asked.append(symbol)
        return await listing(symbol)

    venue.open_algo_orders = recorded  # type: ignore[method-assign]
    report = await reconcile(desk, symbols=frozenset({"BTCUSDT"}), takeover=True)
    assert len(report.positions_adopted) == 1
    assert asked
    assert set(asked) == {"BTCUSDT"}
