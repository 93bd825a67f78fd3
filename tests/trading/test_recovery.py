"""Restart recovery: kill -9 at the awkward moments, then reconcile with the exchange."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from fake_venue import FakeAction, FakeEngine, FakeRules, FakeVenue

from pyquant.trading.desk import DeskConfig, TradingDesk
from pyquant.trading.guard import GuardConfig
from pyquant.trading.intents import parse_intent
from pyquant.trading.journal import OrderRecord, Store
from pyquant.trading.recovery import reconcile
from pyquant.trading.router import RouterConfig, exit_params
from pyquant.trading.sizing import SizingConfig

NOW = 1_700_000_000_000


async def _no_sleep(_: float) -> None:
    return None


def desk_for(venue: FakeVenue, path: Path, engine: FakeEngine | None = None) -> TradingDesk:
    store = Store.open(path)
    config = DeskConfig(
        guard=GuardConfig(),
        sizing=SizingConfig(method="notional", notional_usd=Decimal("300")),
        router=RouterConfig(lookup_delays_s=(0.1,)),
    )
    desk = TradingDesk(venue, store, FakeRules(), engine or FakeEngine(), config, clock=lambda: NOW)
    desk.router._sleep = _no_sleep
    venue.inspect = store.get_order
    return desk


def intent(intent_id: str, symbol: str = "BTCUSDT", side: str = "BUY") -> Any:
    return parse_intent(
        {"id": intent_id, "symbol": symbol, "side": side, "created_at_ms": NOW},
        source="t",
        now_ms=NOW,
    )


def orders_sent(venue: FakeVenue) -> list[dict[str, str]]:
    return [s.params for s in venue.sent if s.path == "/fapi/v1/order"]


async def opened_long(tmp_path: Path, *, hedge: bool) -> tuple[FakeVenue, Path, TradingDesk, str]:
    """A desk on a fresh journal, reconciled, that opened one BTCUSDT long (intent "a")."""
    venue = FakeVenue(hedge=hedge)
    path = tmp_path / "state.sqlite"
    desk = desk_for(venue, path)
    await reconcile(desk)
    pid = (await desk.submit(intent("a"))).position_id or ""
    return venue, path, desk, pid


async def crash_after_exit_filled(first: TradingDesk, venue: FakeVenue, pid: str, mode: Any) -> str:
    """Journal exit 1 of ``pid`` as SENT, let the venue execute it, then kill -9 (close the
    store, nothing else runs). Returns the exit's client order id."""
    store = first.store
    cid = f"pq{store.instance_tag}-{pid}-x1-0"
    params = exit_params(mode, "BTCUSDT", "LONG", "0.003", cid)
    store.insert_order(
        OrderRecord(
            cid, "exit", pid, "BTCUSDT", "LONG", "SELL", 1, 0, params, "SENT", "take_profit_1"
        )
    )
    await venue.new_order(params)
    store.close()
    return cid


@pytest.mark.parametrize("hedge", [True, False])
async def test_restart_keeps_position_stop_and_sends_nothing(tmp_path: Path, hedge: bool) -> None:
    venue, path, first, pid = await opened_long(tmp_path, hedge=hedge)
    backstops = dict(venue.algo_orders)
    sent_before = len(venue.sent)
    first.store.close()  # kill -9: nothing else runs

    second = desk_for(venue, path)
    assert (await second.submit(intent("early"))).reason == "state_unknown"
    report = await reconcile(second, restore=FakeEngine.restore)
    assert report.snapshot_restored
    assert report.open_positions == 1
    assert report.positions_adopted == []
    # the engine came back with the same position and stop; no order, no new backstop
    view = second.engine.positions()[0]
    assert (view.position_id, view.quantity, view.stop_price) == (pid, "0.010", "29700.00")
    assert len(venue.sent) == sent_before
    assert venue.algo_orders == backstops
    # and the guard is open again, still refusing the same leg
    assert (await second.submit(intent("b"))).reason == "position_open"


async def test_exit_filled_while_down_is_resolved_and_not_resent(tmp_path: Path) -> None:
    venue, path, first, pid = await opened_long(tmp_path, hedge=True)
    # kill -9 right after the exit request left: the row is SENT, the venue executed it
    cid = await crash_after_exit_filled(first, venue, pid, "hedge")

    second = desk_for(venue, path)
    sent_before = len(orders_sent(venue))
    report = await reconcile(second, restore=FakeEngine.restore)
    assert report.orders_resolved == {cid: "FILLED"}
    assert len(orders_sent(venue)) == sent_before
    # the restored engine emits the same action again: confirmed from the journal, not resent
    second.on_actions([FakeAction("BTCUSDT", "LONG", "SELL", "0.003", "take_profit_1", pid, 1)])
    await second.drain()
    assert len(orders_sent(venue)) == sent_before
    assert ("confirm", (pid, 1, "0.003")) in second.engine.calls  # type: ignore[attr-defined]
    assert second.store.get_position(pid).quantity == "0.007"  # type: ignore[union-attr]
    assert second.store.get_order(cid).engine_applied  # type: ignore[union-attr]


async def test_entry_states_left_by_a_crash(tmp_path: Path) -> None:
    venue = FakeVenue(hedge=True)
    path = tmp_path / "state.sqlite"
    first = desk_for(venue, path)
    await reconcile(first)
    # entry A: decided, request executed, crash before the answer was recorded
    a = first.guard.decide(intent("a"))
    cid_a = f"pq{first.store.instance_tag}-{a.position_id}-e0-0"
    params_a = {
        "symbol": "BTCUSDT",
        "side": "BUY",
        "positionSide": "LONG",
        "type": "MARKET",
        "quantity": "0.010",
        "newClientOrderId": cid_a,
        "newOrderRespType": "RESULT",
    }
    first.store.insert_order(
        OrderRecord(
            cid_a,
            "entry",
            a.position_id or "",
            "BTCUSDT",
            "LONG",
            "BUY",
            0,
            0,
            params_a,
            "SENT",
            "entry",
        )
    )
    await venue.new_order(params_a)
    # entry B: decided and written ahead, never sent
    b = first.guard.decide(intent("b", symbol="ETHUSDT"))
    cid_b = f"pq{first.store.instance_tag}-{b.position_id}-e0-0"
    first.store.insert_order(
        OrderRecord(
            cid_b, "entry", b.position_id or "", "ETHUSDT", "LONG", "BUY", 0, 0, {}, "SENT", "entry"
        )
    )
    # entry C: decided, crash before the order row
    c = first.guard.decide(intent("c", side="SELL"))
    first.store.close()

    second = desk_for(venue, path)
    report = await reconcile(second, restore=FakeEngine.restore)
    assert report.orders_resolved == {cid_a: "FILLED", cid_b: "NOT_FOUND"}
    assert report.entries_completed == [a.position_id]
    assert sorted(report.entries_failed) == sorted([b.position_id, c.position_id])
    assert report.positions_adopted == []
    assert second.store.reservations() == []
    assert [v.position_id for v in second.engine.positions()] == [a.position_id]
    assert len(orders_sent(venue)) == 1


async def test_gone_foreign_and_orphans(tmp_path: Path) -> None:
    venue, path, first, pid = await opened_long(tmp_path, hedge=False)
    (backstop,) = list(venue.algo_orders)
    # a backstop of ours whose position the journal never recorded as open
    orphan = await first.router.backstops.update_backstop("zz", "ETHUSDT", "LONG", "1900.00")
    first.store.close()
    # while we were down: our position was closed by hand (backstop left behind), and
    # someone opened ETHUSDT short
    venue.set_position("BTCUSDT", "BOTH", "0", "0")
    venue.set_position("ETHUSDT", "BOTH", "-0.5", "2000")

    second = desk_for(venue, path)
    report = await reconcile(second, restore=FakeEngine.restore)
    assert report.positions_dropped == [pid]
    assert report.orphans_cancelled == [orphan]
    (adopted,) = report.positions_adopted
    assert ("adopt", (adopted, "ETHUSDT", "SHORT", "0.5", "2000")) in second.engine.calls  # type: ignore[attr-defined]
    assert venue.algo_orders[backstop]["algoStatus"] == "CANCELED"
    eth_backstops = [o for o in venue.algo_orders.values() if o["symbol"] == "ETHUSDT"]
    assert [(o["side"], o["positionSide"], o["algoStatus"]) for o in eth_backstops] == [
        ("SELL", "BOTH", "CANCELED"),  # the orphan
        ("BUY", "BOTH", "NEW"),  # the adopted short's backstop
    ]
    assert second.store.get_position(pid).close_reason == "gone_on_restart"  # type: ignore[union-attr]
    assert report.position_mode == "one-way"


async def test_snapshot_missing_a_position_reopens_it(tmp_path: Path) -> None:
    venue, path, first, pid = await opened_long(tmp_path, hedge=True)
    first.store.save_snapshot(FakeEngine().snapshot())  # an older snapshot, before the entry
    first.store.close()
    second = desk_for(venue, path)
    report = await reconcile(second, restore=FakeEngine.restore)
    assert report.positions_reopened == [pid]
    assert [v.position_id for v in second.engine.positions()] == [pid]


async def test_reconcile_while_an_exit_is_in_flight_leaves_it_to_its_sender(tmp_path: Path) -> None:
    import asyncio

    venue, _, desk, pid = await opened_long(tmp_path, hedge=True)
    venue.gate = asyncio.Event()
    desk.on_actions([desk.engine.action(pid, "0.003")])  # type: ignore[attr-defined]
    for _ in range(5):
        await asyncio.sleep(0)
    assert venue.in_flight == 1
    report = await reconcile(desk, live=True)  # e.g. the user stream reconnected
    assert report.orders_resolved == {}
    assert report.deferred == ["BTCUSDT LONG"]
    assert report.positions_resized == []
    venue.gate.set()
    await desk.drain()
    assert len(orders_sent(venue)) == 2
    assert desk.store.get_position(pid).quantity == "0.007"  # type: ignore[union-attr]
    assert ("confirm", (pid, 1, "0.003")) in desk.engine.calls  # type: ignore[attr-defined]


async def test_pending_actions_of_a_restored_engine_are_settled(tmp_path: Path) -> None:
    venue, path, first, pid = await opened_long(tmp_path, hedge=False)
    # sequence 1: sent and filled, crash before the answer; sequence 2: never sent
    cid = await crash_after_exit_filled(first, venue, pid, "one-way")

    engine = FakeEngine.restore(FakeEngine().snapshot())
    second = desk_for(venue, path, engine)
    tp = FakeAction("BTCUSDT", "LONG", "SELL", "0.003", "take_profit_1", pid, 1)
    engine.pending = [tp]
    report = await reconcile(second)
    assert report.orders_resolved == {cid: "FILLED"}
    assert report.actions_settled == {f"{pid}:1": "confirmed"}
    assert ("confirm", (pid, 1, "0.003")) in engine.calls
    assert second.store.get_position(pid).quantity == "0.007"  # type: ignore[union-attr]
    assert report.positions_resized == []
    engine.pending = [FakeAction("BTCUSDT", "LONG", "SELL", "0.007", "stop_loss", pid, 2)]
    assert await second.settle_pending_actions() == {f"{pid}:2": "given_back"}
    assert ("reject", (pid, 2)) in engine.calls


async def test_reconcile_settles_orders_whose_stream_event_was_lost(tmp_path: Path) -> None:
    _venue, _, desk, pid = await opened_long(tmp_path, hedge=True)
    tag = desk.store.instance_tag
    unsettled = [r.client_order_id for r in desk.store.unsettled_orders()]
    # the entry is final by REST but its stream event never came; the backstop is live
    assert unsettled == [f"pq{tag}-{pid}-e0-0", f"pq{tag}-{pid}-b1-0"]
    await reconcile(desk)  # the user stream reconnected: its events are gone
    assert [r.client_order_id for r in desk.store.unsettled_orders()] == [f"pq{tag}-{pid}-b1-0"]


async def test_backstop_that_never_reached_the_venue_is_replaced(tmp_path: Path) -> None:
    venue, path, first, pid = await opened_long(tmp_path, hedge=True)
    (placed,) = list(venue.algo_orders)
    # the venue lost it (cancelled by hand while we were down)
    await venue.cancel_algo_order("BTCUSDT", placed)
    first.store.close()

    second = desk_for(venue, path)
    report = await reconcile(second, restore=FakeEngine.restore)
    assert report.backstops_checked == {placed: "EXPIRED"}
    live = [o for o in venue.algo_orders.values() if o["algoStatus"] == "NEW"]
    assert [(o["triggerPrice"], o["positionSide"]) for o in live] == [("29551.5", "LONG")]
    assert second.router.backstops.backstop_of(pid) == (live[0]["clientAlgoId"], Decimal("29551.5"))


async def test_entry_left_new_is_looked_up_and_completed(tmp_path: Path) -> None:
    venue = FakeVenue(hedge=True)
    path = tmp_path / "state.sqlite"
    first = desk_for(venue, path)
    await reconcile(first)
    decision = first.guard.decide(intent("a"))
    pid = decision.position_id or ""
    cid = f"pq{first.store.instance_tag}-{pid}-e0-0"
    params = {
        "symbol": "BTCUSDT",
        "side": "BUY",
        "positionSide": "LONG",
        "type": "MARKET",
        "quantity": "0.010",
        "newClientOrderId": cid,
        "newOrderRespType": "ACK",
    }
    first.store.insert_order(
        OrderRecord(cid, "entry", pid, "BTCUSDT", "LONG", "BUY", 0, 0, params, "SENT", "entry")
    )
    await venue.new_order(params)
    first.store.update_order(cid, status="NEW", rest_final=False)  # ACK; the fill event was lost
    # the stream reconnects (same process): the entry is looked up and finished
    report = await reconcile(first)
    assert report.orders_resolved == {cid: "FILLED"}
    assert report.entries_completed == [pid]
    assert first.store.get_position(pid).status == "open"  # type: ignore[union-attr]
    assert first.store.reservations() == []


async def test_crash_between_engine_confirm_and_journal_write(tmp_path: Path) -> None:
    venue, path, first, pid = await opened_long(tmp_path, hedge=True)
    first.on_actions([first.engine.action(pid, "0.003")])  # type: ignore[attr-defined]
    await first.drain()
    # undo the journal's part only: the snapshot (saved right after confirm) has it
    cid = f"pq{first.store.instance_tag}-{pid}-x1-0"
    first.store.update_order(cid, engine_applied=False)
    first.store.update_position(pid, quantity="0.010")
    first.store.close()

    second = desk_for(venue, path)
    report = await reconcile(second, restore=FakeEngine.restore)
    assert report.positions_resized == []
    assert second.store.get_order(cid).engine_applied  # type: ignore[union-attr]
    assert second.store.get_position(pid).quantity == "0.007"  # type: ignore[union-attr]
    assert second.engine.positions()[0].quantity == "0.007"
    assert len(orders_sent(venue)) == 2
