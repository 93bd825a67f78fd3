"""Trading desk: entry -> exits -> close through guard, router, engine and store, both modes."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from fake_venue import FakeAction, FakeEngine, FakeRules, FakeVenue

from pyquant.trading.desk import DeskConfig, TradingDesk
from pyquant.trading.guard import GuardConfig
from pyquant.trading.intents import parse_intent
from pyquant.trading.journal import Store
from pyquant.trading.sizing import SizingConfig

NOW = 1_700_000_000_000


def make(hedge: bool, **desk: Any) -> tuple[FakeVenue, Store, FakeEngine, TradingDesk]:
    venue = FakeVenue(hedge=hedge)
    store = Store.open(":memory:")
    engine = FakeEngine()
    config = DeskConfig(
        guard=GuardConfig(cooldown_ms=60_000),
        sizing=SizingConfig(method="notional", notional_usd=Decimal("300")),
        **desk,
    )
    return (
        venue,
        store,
        engine,
        TradingDesk(venue, store, FakeRules(), engine, config, clock=lambda: NOW),
    )


def account_update(
    symbol: str, amount: str, entry: str, leg: str, *, time_ms: int
) -> dict[str, object]:
    """An ACCOUNT_UPDATE of one leg, as the user stream sends it."""
    position = {"s": symbol, "pa": amount, "ep": entry, "ps": leg}
    return {"e": "ACCOUNT_UPDATE", "E": time_ms, "a": {"m": "ORDER", "P": [position]}}


def intent(intent_id: str, side: str = "BUY", symbol: str = "BTCUSDT") -> Any:
    return parse_intent(
        {"id": intent_id, "symbol": symbol, "side": side, "created_at_ms": NOW},
        source="t",
        now_ms=NOW,
    )


async def ready(desk: TradingDesk) -> None:
    await desk.refresh_mode()
    desk.guard.mark_state_known()


@pytest.mark.parametrize("hedge", [True, False])
async def test_entry_partial_exit_and_stop_close(hedge: bool) -> None:
    venue, store, engine, desk = make(hedge)
    await ready(desk)
    decision = await desk.submit(intent("a"))
    assert decision.accepted
    pid = decision.position_id
    assert pid is not None
    # entry: leverage set first, MARKET BUY 0.010 (300 USDT at 30000), position open in engine
    assert venue.leverage == {"BTCUSDT": 10}
    entry = venue.sent[0].params
    assert entry["side"] == "BUY"
    assert entry["quantity"] == "0.010"
    assert entry["positionSide"] == ("LONG" if hedge else "BOTH")
    assert engine.calls[0] == ("open", (pid, "BTCUSDT", "LONG", "0.010", "30000"))
    position = store.get_position(pid)
    assert position is not None
    assert (position.status, position.quantity) == ("open", "0.010")
    assert store.reservations() == []
    # backstop at 1 % stop, 0.5 % further out
    backstop = venue.sent[1].params
    assert backstop["triggerPrice"] == "29551.5"
    # the engine's events from the venue do not disturb anything
    for event in venue.events:
        await desk.on_user_event(event)
    assert store.get_position(pid).status == "open"  # type: ignore[union-attr]

    # take profit 1: 0.003
    desk.on_actions([engine.action(pid, "0.003", "take_profit_1")])
    await desk.drain()
    exit_params = venue.sent[2].params
    assert exit_params["side"] == "SELL"
    assert exit_params["quantity"] == "0.003"
    assert ("reduceOnly" in exit_params) is (not hedge)
    assert ("confirm", (pid, 1, "0.003")) in engine.calls
    assert store.get_position(pid).quantity == "0.007"  # type: ignore[union-attr]

    # stop: the rest; position closes, backstop cancelled, cooldown starts
    desk.on_actions([engine.action(pid, "0.007", "stop_loss")])
    await desk.drain()
    assert store.get_position(pid).status == "closed"  # type: ignore[union-attr]
    assert await venue.open_algo_orders() == []
    assert venue.position_amount("BTCUSDT", "LONG") == 0
    assert store.counters("exits") == {"stop_loss": 1, "take_profit_1": 1}
    again = await desk.submit(intent("b"))
    assert again.reason == "cooldown"
    summary = desk.summary()
    assert summary["entries"] == 1
    assert summary["intents_accepted"] == 1
    assert summary["intents_rejected"] == {"cooldown": 1}
    assert summary["open_positions"] == 0
    assert summary["position_mode"] == ("hedge" if hedge else "one-way")


async def test_exit_on_flat_leg_closes_position_after_check() -> None:
    venue, store, engine, desk = make(hedge=True)
    await ready(desk)
    decision = await desk.submit(intent("a"))
    pid = decision.position_id or ""
    venue.set_position("BTCUSDT", "LONG", "0", "0")  # closed elsewhere, no event seen yet
    desk.on_actions([engine.action(pid, "0.003", "take_profit_1")])
    await desk.drain()
    assert ("close", (pid,)) in engine.calls
    # Flat, but why? The leg waits for the evidence (a liquidation fill, ...) first.
    leg = desk.legs.get(("BTCUSDT", "LONG"))
    assert leg is not None
    assert leg.state == "closing"
    assert store.get_position(pid).status == "open"
    await desk.settle_closing()  # grace not over yet
    assert store.get_position(pid).status == "open"
    desk._clock = lambda: NOW + 2_000
    await desk.settle_closing()
    position = store.get_position(pid)
    assert position is not None
    assert (position.status, position.close_reason) == ("closed", "already_flat")
    assert desk.legs.get(("BTCUSDT", "LONG")) is None


async def test_a_late_liquidation_fill_names_the_close() -> None:
    venue, store, engine, desk = make(hedge=False)
    await ready(desk)
    decision = await desk.submit(intent("a"))
    pid = decision.position_id or ""
    venue.set_position("BTCUSDT", "BOTH", "0", "0")  # liquidated; the stream has not said so
    desk.on_actions([engine.action(pid, "0.010", "stop_loss")])
    await desk.drain()
    assert store.get_position(pid).status == "open"
    await desk.on_user_event(
        {
            "e": "ORDER_TRADE_UPDATE",
            "E": NOW,
            "o": {
                "s": "BTCUSDT",
                "c": "autoclose-1",
                "S": "SELL",
                "X": "FILLED",
                "x": "CALCULATED",
                "ps": "BOTH",
                "t": 77,
                "l": "0.010",
                "L": "29000",
                "z": "0.010",
                "T": NOW,
            },
        }
    )
    await desk.settle_closing()  # the evidence is in: no need to wait for the grace
    position = store.get_position(pid)
    assert (position.status, position.close_reason) == ("closed", "liquidation")
    assert store.counters("exits") == {"liquidation": 1}


async def test_rejected_exit_is_given_back_to_the_engine() -> None:
    venue, store, engine, desk = make(hedge=True)
    await ready(desk)
    pid = (await desk.submit(intent("a"))).position_id or ""
    from pyquant.errors import OrderRejected

    venue.faults = [
        OrderRejected(
            -4131, "The counterparty's best price does not meet the PERCENT_PRICE filter limit."
        )
    ]
    action = engine.action(pid, "0.003")
    desk.on_actions([action])
    await desk.drain()
    assert ("reject", (pid, action.sequence)) in engine.calls
    assert store.counters("order_rejections") == {"-4131": 1}


async def test_account_update_resizes_closes_and_adopts() -> None:
    venue, store, engine, desk = make(hedge=True)
    await ready(desk)
    pid = (await desk.submit(intent("a"))).position_id or ""
    # reduced elsewhere
    venue.set_position("BTCUSDT", "LONG", "0.004", "30000")
    await desk.on_user_event(account_update("BTCUSDT", "0.004", "30000", "LONG", time_ms=1))
    assert ("resize", (pid, "0.004")) in engine.calls
    # a position opened elsewhere is adopted, with a backstop
    venue.set_position("ETHUSDT", "SHORT", "0.5", "2000")
    await desk.on_user_event(account_update("ETHUSDT", "-0.5", "2000", "SHORT", time_ms=2))
    adopted = [c for c in engine.calls if c[0] == "adopt"]
    assert adopted == [("adopt", ("2", "ETHUSDT", "SHORT", "0.5", "2000"))]
    assert any(
        s.params.get("symbol") == "ETHUSDT" and s.path == "/fapi/v1/algoOrder" for s in venue.sent
    )
    # closed elsewhere
    venue.set_position("BTCUSDT", "LONG", "0")
    await desk.on_user_event(account_update("BTCUSDT", "0", "0", "LONG", time_ms=3))
    assert store.get_position(pid).close_reason == "external"  # type: ignore[union-attr]
    assert store.counters("exits") == {"external": 1}


async def test_a_stale_account_update_neither_adopts_nor_drops() -> None:
    # The user stream runs behind REST: an update queued before our own orders settled must
    # not bring back a leg we closed, nor close one the venue still holds.
    _venue, store, engine, desk = make(hedge=True)
    await ready(desk)
    pid = (await desk.submit(intent("a"))).position_id or ""
    held = store.get_position(pid).quantity  # type: ignore[union-attr]

    await desk.on_user_event(
        account_update("BTCUSDT", "0", "30000", "LONG", time_ms=9)
    )  # stale: the venue holds it
    assert store.get_position(pid).status == "open"  # type: ignore[union-attr]
    assert store.get_position(pid).quantity == held  # type: ignore[union-attr]
    await desk.on_user_event(
        account_update("ETHUSDT", "-0.5", "30000", "SHORT", time_ms=9)
    )  # stale: already flat
    assert [c for c in engine.calls if c[0] == "adopt"] == []
    assert [p.symbol for p in store.positions(("open",))] == ["BTCUSDT"]
    assert store.counters("exits") == {}


async def test_one_way_flip_is_close_plus_adoption() -> None:
    venue, store, engine, desk = make(hedge=False)
    await ready(desk)
    pid = (await desk.submit(intent("a"))).position_id or ""
    venue.set_position("BTCUSDT", "BOTH", "-0.002", "30100")
    await desk.on_user_event(account_update("BTCUSDT", "-0.002", "30100", "BOTH", time_ms=1))
    assert store.get_position(pid).status == "closed"  # type: ignore[union-attr]
    assert next(c for c in engine.calls if c[0] == "adopt")[1][2] == "SHORT"


async def test_entry_with_failed_symbol_setup_fails_closed() -> None:
    venue, store, _engine, desk = make(hedge=True)
    await ready(desk)
    venue.refuse_leverage.add("BTCUSDT")
    decision = await desk.submit(intent("a"))
    assert decision.accepted
    assert [s for s in venue.sent if s.path == "/fapi/v1/order"] == []
    position = store.get_position(decision.position_id or "")
    assert position is not None
    assert position.status == "closed"
    assert "symbol setup failed" in (position.close_reason or "")
    assert store.reservations() == []


async def test_shadow_mode_sends_nothing() -> None:
    venue, _store, _engine, desk = make(hedge=True, shadow=True)
    await ready(desk)
    decision = await desk.submit(intent("a"))
    assert decision.accepted
    assert venue.sent == []


async def test_flatten_closes_everything_and_the_engine_knows() -> None:
    _venue, store, engine, desk = make(hedge=True)
    await ready(desk)
    pid = (await desk.submit(intent("a"))).position_id or ""
    steps = await desk.flatten()
    # closes first: a leg keeps its exchange-side stop until it is flat
    assert [s.step for s in steps] == ["close", "cancel_backstop"]
    assert all(s.ok for s in steps)
    assert store.get_position(pid).status == "closed"  # type: ignore[union-attr]
    assert ("close", (pid,)) in engine.calls
    assert (await desk.submit(intent("b"))).reason == "state_unknown"


async def test_malformed_intent_is_recorded() -> None:
    _venue, store, _engine, desk = make(hedge=True)
    desk.reject_malformed("http", {"id": "x", "side": "UP"}, "intent field 'side' was 'UP'")
    assert store.counters("intents_rejected") == {"invalid": 1}
    assert desk.recent[-1]["reason"] == "invalid"


def test_fake_action_shape() -> None:
    action = FakeAction("BTCUSDT", "LONG", "SELL", "0.003", "stop_loss", "1", 1)
    assert action.is_full_close is False


async def test_repeated_exit_rejections_are_paced() -> None:
    from pyquant.errors import OrderRejected

    venue, store, engine, desk = make(hedge=True)
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    desk._sleep = record
    await ready(desk)
    pid = (await desk.submit(intent("a"))).position_id or ""
    venue.faults = [OrderRejected(-4131, "x"), OrderRejected(-4131, "x"), OrderRejected(-4131, "x")]
    for _ in range(3):
        desk.on_actions([engine.action(pid, "0.003")])
        await desk.drain()
    assert waits == [0.25, 0.5]
    desk.on_actions([engine.action(pid, "0.003")])
    await desk.drain()
    assert waits == [0.25, 0.5, 1.0]
    assert store.get_position(pid).quantity == "0.007"  # type: ignore[union-attr]
    desk.on_actions([engine.action(pid, "0.003")])
    await desk.drain()
    assert waits == [0.25, 0.5, 1.0]  # a fill resets the pacing


async def test_engine_full_close_with_exchange_rest_is_adopted() -> None:
    venue, store, engine, desk = make(hedge=True)
    await ready(desk)
    pid = (await desk.submit(intent("a"))).position_id or ""
    venue.set_position("BTCUSDT", "LONG", "0.012", "30000")  # 0.002 more arrived elsewhere
    store.update_position(pid, quantity="0.012")  # the journal saw it, the engine did not
    desk.on_actions([engine.action(pid, "0.010", "stop_loss")])
    await desk.drain()
    position = store.get_position(pid)
    assert position is not None
    assert (position.status, position.quantity) == ("open", "0.002")
    assert ("adopt", (pid, "BTCUSDT", "LONG", "0.002", "30000")) in engine.calls
    # and a later ACCOUNT_UPDATE with the rest adopts nothing twice
    await desk.on_user_event(venue.account_event())
    assert len([c for c in engine.calls if c[0] == "adopt"]) == 1


async def test_update_rules_reaches_guard_router_and_engine() -> None:
    _venue, _store, engine, desk = make(hedge=True)
    fresh = FakeRules(symbols=("BTCUSDT",))
    engine.update_rules = lambda rules: engine.calls.append(("update_rules", (rules,)))  # type: ignore[attr-defined]
    desk.update_rules(fresh)
    assert desk.guard.rules is fresh
    assert desk.router.rules is fresh
    assert engine.calls[-1] == ("update_rules", (fresh,))
    await ready(desk)
    assert (await desk.submit(intent("a", symbol="ETHUSDT"))).reason == "unknown_symbol"


@pytest.mark.parametrize("hedge", [True, False])
async def test_stream_events_before_the_rest_answer(hedge: bool) -> None:
    venue, store, engine, desk = make(hedge)
    plain_new_order = venue.new_order

    async def stream_first(params: Any) -> dict[str, Any]:
        seen = len(venue.events)
        reply = await plain_new_order(params)
        for event in venue.events[seen:]:
            await desk.on_user_event(event)  # the user stream wins the race
        return reply

    venue.new_order = stream_first  # type: ignore[method-assign]
    await ready(desk)
    pid = (await desk.submit(intent("a"))).position_id or ""
    assert [c[0] for c in engine.calls].count("open") == 1
    assert store.get_position(pid).status == "open"  # type: ignore[union-attr]
    desk.on_actions([engine.action(pid, "0.003")])
    await desk.drain()
    assert [c[0] for c in engine.calls].count("confirm") == 1
    assert store.get_position(pid).quantity == "0.007"  # type: ignore[union-attr]
    assert [c for c in engine.calls if c[0] in ("resize", "adopt", "close")] == []
    assert store.unsettled_orders()[-1].kind == "backstop"
    assert len(store.fills()) == 2


async def test_filter_error_reloads_the_rules_once_a_minute() -> None:
    from pyquant.errors import OrderRejected

    class LoadableRules(FakeRules):
        loads = 0

        @classmethod
        def from_exchange_info(cls, raw: bytes) -> LoadableRules:
            assert raw.startswith(b"{")
            cls.loads += 1
            return cls()

    venue, _store, engine, desk = make(hedge=True)
    engine.update_rules = lambda rules: None  # type: ignore[attr-defined]
    desk.update_rules(LoadableRules())
    await ready(desk)
    pid = (await desk.submit(intent("a"))).position_id or ""
    venue.faults = [OrderRejected(-1111, "Precision is over the maximum defined for this asset.")]
    desk.on_actions([engine.action(pid, "0.003")])
    await desk.drain()
    assert LoadableRules.loads == 1
    assert desk.router.rules is desk.rules
    assert isinstance(desk.rules, LoadableRules)
    assert not await desk.refresh_rules("BTCUSDT", -1111)  # throttled


async def test_backstop_close_is_labelled() -> None:
    venue, store, _engine, desk = make(hedge=True)
    await ready(desk)
    pid = (await desk.submit(intent("a"))).position_id or ""
    (cid,) = list(venue.algo_orders)
    await desk.on_user_event(
        {"e": "ALGO_UPDATE", "E": 5, "o": {"caid": cid, "aid": 1, "X": "TRIGGERED", "s": "BTCUSDT"}}
    )
    venue.set_position("BTCUSDT", "LONG", "0")
    await desk.on_user_event(account_update("BTCUSDT", "0", "0", "LONG", time_ms=6))
    assert store.get_position(pid).close_reason == "backstop"  # type: ignore[union-attr]
    assert store.counters("exits") == {"backstop": 1}


async def test_liquidation_price_reaches_the_engine_after_the_entry() -> None:
    venue, _store, engine, desk = make(hedge=True)
    await ready(desk)
    venue.liquidation[("BTCUSDT", "LONG")] = "27012.3"
    pid = (await desk.submit(intent("a"))).position_id or ""
    await desk.drain()  # the refresh runs off the entry's path
    assert ("liquidation", (pid, "27012.3")) in engine.calls
    # cross margin with room to spare reports 0: nothing to set
    venue.liquidation[("BTCUSDT", "LONG")] = "0"
    engine.calls.clear()
    assert await desk.refresh_liquidation_prices() == 0
    assert [c for c in engine.calls if c[0] == "liquidation"] == []


async def test_the_open_time_is_the_fills_exchange_time() -> None:
    # The time stop counts in exchange time; the desk's own clock is far off here.
    _venue, store, engine, desk = make(hedge=True)
    await ready(desk)
    pid = (await desk.submit(intent("a"))).position_id or ""
    fill_time = next(o for o in store.orders(position_id=pid) if o.kind == "entry")
    assert fill_time.exchange_time_ms > 1_700_000_000_000  # the venue's updateTime
    assert engine.opened_at[pid] == fill_time.exchange_time_ms
    assert store.get_position(pid).opened_at_ms == fill_time.exchange_time_ms  # type: ignore[union-attr]


async def test_a_liquidation_price_on_the_legs_profit_side_is_not_a_stop_limit() -> None:
    # Hedged legs under cross margin share one liquidation price, far above the mark when the
    # legs net to nothing: the LONG leg's stop must not be pulled up to it.
    venue, _store, engine, desk = make(hedge=True)
    await ready(desk)
    venue.liquidation[("BTCUSDT", "LONG")] = "912345.6"
    await desk.submit(intent("a"))
    await desk.drain()
    assert [c for c in engine.calls if c[0] == "liquidation"] == []
