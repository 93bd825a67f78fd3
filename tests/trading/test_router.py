"""Order router: exact wire params per mode, write-ahead, unknown outcomes, locks, backstop."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import pytest
from fake_venue import FakeRules, FakeVenue, retryable_429

from pyquant.errors import OrderRejected
from pyquant.trading.journal import Store
from pyquant.trading.router import (
    CLIENT_ORDER_ID,
    OrderRouter,
    OrderState,
    RestAnswer,
    RouterConfig,
    RouterError,
    StopWouldTrigger,
    StreamUpdate,
    backstop_params,
    client_order_id,
    entry_params,
    exit_params,
    next_state,
)


async def _no_sleep(_: float) -> None:
    return None


def make(hedge: bool, **config: object) -> tuple[FakeVenue, Store, OrderRouter]:
    venue = FakeVenue(hedge=hedge)
    store = Store.open(":memory:")
    router = OrderRouter(
        venue,
        store,
        FakeRules(),
        RouterConfig(**config),
        sleep=_no_sleep,  # type: ignore[arg-type]
    )
    venue.inspect = store.get_order
    return venue, store, router


# ---- pure params ----------------------------------------------------------------------------


def test_hedge_exit_params_exact() -> None:
    assert exit_params("hedge", "BTCUSDT", "LONG", "0.003", "pqab12-1-x1-0") == {
        "symbol": "BTCUSDT",
        "side": "SELL",
        "positionSide": "LONG",
        "type": "MARKET",
        "quantity": "0.003",
        "newClientOrderId": "pqab12-1-x1-0",
        "newOrderRespType": "RESULT",
    }
    assert exit_params("hedge", "BTCUSDT", "SHORT", "0.003", "c")["side"] == "BUY"
    assert "reduceOnly" not in exit_params("hedge", "BTCUSDT", "SHORT", "0.003", "c")


def test_one_way_exit_params_exact() -> None:
    assert exit_params("one-way", "BTCUSDT", "SHORT", "0.004", "pqab12-1-x2-0") == {
        "symbol": "BTCUSDT",
        "side": "BUY",
        "positionSide": "BOTH",
        "type": "MARKET",
        "quantity": "0.004",
        "reduceOnly": "true",
        "newClientOrderId": "pqab12-1-x2-0",
        "newOrderRespType": "RESULT",
    }


def test_entry_params_per_mode() -> None:
    assert entry_params("hedge", "ETHUSDT", "SHORT", "0.5", "c") == {
        "symbol": "ETHUSDT",
        "side": "SELL",
        "positionSide": "SHORT",
        "type": "MARKET",
        "quantity": "0.5",
        "newClientOrderId": "c",
        "newOrderRespType": "RESULT",
    }
    one_way = entry_params("one-way", "ETHUSDT", "LONG", "0.5", "c")
    assert one_way["positionSide"] == "BOTH"
    assert one_way["side"] == "BUY"
    assert "reduceOnly" not in one_way


def test_backstop_params_per_mode() -> None:
    assert backstop_params("hedge", "BTCUSDT", "LONG", "29700.0", "pqab12-1-b1-0") == {
        "algoType": "CONDITIONAL",
        "symbol": "BTCUSDT",
        "side": "SELL",
        "positionSide": "LONG",
        "type": "STOP_MARKET",
        "triggerPrice": "29700.0",
        "workingType": "MARK_PRICE",
        "closePosition": "true",
        "clientAlgoId": "pqab12-1-b1-0",
    }
    one_way = backstop_params("one-way", "BTCUSDT", "SHORT", "30300.0", "c")
    assert one_way["positionSide"] == "BOTH"
    assert one_way["side"] == "BUY"
    assert "quantity" not in one_way
    assert "reduceOnly" not in one_way


@pytest.mark.parametrize(
    ("position_id", "kind", "sequence", "attempt"),
    [("1", "entry", 0, 0), ("zzzzzzzz", "exit", 99_999_999, 99), ("a1", "backstop", 7, 0)],
)
def test_client_order_id_is_deterministic_and_valid(
    position_id: str, kind: str, sequence: int, attempt: int
) -> None:
    first = client_order_id("ab12", position_id, kind, sequence, attempt)
    assert first == client_order_id("ab12", position_id, kind, sequence, attempt)
    assert CLIENT_ORDER_ID.match(first)
    assert len(first) <= 36


def test_client_order_id_too_long_is_refused() -> None:
    with pytest.raises(ValueError, match="does not match"):
        client_order_id("ab12", "x" * 30, "exit", 1, 0)


# ---- sending --------------------------------------------------------------------------------


@pytest.mark.parametrize("hedge", [True, False])
async def test_exit_is_written_ahead_then_sent_with_mode_params(hedge: bool) -> None:
    venue, store, router = make(hedge)
    venue.set_position("BTCUSDT", "LONG" if hedge else "BOTH", "0.010", "30000")
    outcome = await router.send_exit(
        "1",
        "BTCUSDT",
        "LONG",
        "0.003",
        sequence=1,
        reason="take_profit_1",
        live_quantity=Decimal("0.010"),
    )
    assert outcome.state == OrderState.FILLED
    assert outcome.executed_qty == Decimal("0.003")
    (sent,) = venue.sent
    cid = f"pq{store.instance_tag}-1-x1-0"
    expected = {
        "symbol": "BTCUSDT",
        "side": "SELL",
        "positionSide": "LONG" if hedge else "BOTH",
        "type": "MARKET",
        "quantity": "0.003",
        "newClientOrderId": cid,
        "newOrderRespType": "RESULT",
    }
    if not hedge:
        expected["reduceOnly"] = "true"
    assert sent.params == expected
    # write-ahead: the row existed, as SENT with these params, when the request went out
    assert sent.store_row is not None
    assert sent.store_row.status == "SENT"
    assert sent.store_row.params == expected
    row = store.get_order(cid)
    assert row is not None
    assert row.status == "FILLED"
    assert row.rest_final
    assert not row.stream_final
    assert [r.client_order_id for r in router.live_orders("1")] == [cid]
    # the stream's FILLED makes it final on both counts: it leaves the live set
    router.on_order_update(venue.events[0]["o"], venue.events[0]["E"])
    assert router.live_orders("1") == []


async def test_unknown_outcome_executed_is_resolved_by_lookup_without_second_order() -> None:
    venue, _store, router = make(hedge=True)
    venue.set_position("BTCUSDT", "LONG", "0.010", "30000")
    venue.faults = ["unknown_executed"]
    venue.lookup_misses = 1  # -2013 right after the unknown outcome is no proof of absence
    outcome = await router.send_exit(
        "1", "BTCUSDT", "LONG", "0.003", sequence=1, reason="stop_loss"
    )
    assert outcome.state == OrderState.FILLED
    assert outcome.executed_qty == Decimal("0.003")
    assert len([s for s in venue.sent if s.path == "/fapi/v1/order"]) == 1
    assert venue.position_amount("BTCUSDT", "LONG") == Decimal("0.007")
    assert router.stats.resolved_by_lookup == 1


@pytest.mark.parametrize("fault", ["drop_after_execute", OrderRejected(-1000, "x")])
async def test_transport_failure_after_send_is_an_unknown_outcome(fault: object) -> None:
    venue, _, router = make(hedge=False)
    venue.set_position("BTCUSDT", "BOTH", "0.010", "30000")
    if isinstance(fault, OrderRejected):
        # -1000 arrives as a plain ExchangeError from a client that does not classify it
        from pyquant.errors import ExchangeError

        venue.faults = [ExchangeError(-1000, "An unknown error occurred while processing.")]
    else:
        venue.faults = [fault]  # type: ignore[list-item]
    outcome = await router.send_exit("1", "BTCUSDT", "LONG", "0.003", sequence=1, reason="x")
    if isinstance(fault, OrderRejected):
        assert outcome.state == OrderState.NOT_FOUND  # raised before executing
    else:
        assert outcome.state == OrderState.FILLED
    assert len(venue.sent) == 1


async def test_unknown_outcome_not_executed_ends_not_found_and_nothing_resent() -> None:
    venue, _store, router = make(hedge=False)
    venue.set_position("BTCUSDT", "BOTH", "0.010", "30000")
    venue.faults = ["unknown_not_executed"]
    outcome = await router.send_exit("1", "BTCUSDT", "LONG", "0.003", sequence=1, reason="x")
    assert outcome.state == OrderState.NOT_FOUND
    assert not outcome.filled
    assert len(venue.sent) == 1
    # the next attempt of the same action gets a new id
    venue.faults = []
    again = await router.send_exit("1", "BTCUSDT", "LONG", "0.003", sequence=1, reason="x")
    assert again.client_order_id.endswith("-x1-1")
    assert again.state == OrderState.FILLED


async def test_stream_answers_unknown_outcome_during_lookup() -> None:
    venue, _store, router = make(hedge=True)
    venue.set_position("BTCUSDT", "LONG", "0.010", "30000")
    venue.faults = ["unknown_executed"]
    venue.lookup_misses = 10

    async def stream_then_sleep(_: float) -> None:
        for event in venue.events:
            if event["e"] == "ORDER_TRADE_UPDATE":
                router.on_order_update(event["o"], event["E"])

    router._sleep = stream_then_sleep
    outcome = await router.send_exit("1", "BTCUSDT", "LONG", "0.003", sequence=1, reason="x")
    assert outcome.state == OrderState.FILLED
    assert len(venue.sent) == 1


async def test_mode_changed_behind_our_back_rebuilds_once() -> None:
    venue, store, router = make(hedge=False)
    await router.refresh_mode()
    venue.hedge = True  # changed elsewhere
    venue.set_position("BTCUSDT", "LONG", "0.010", "30000")
    outcome = await router.send_exit("1", "BTCUSDT", "LONG", "0.003", sequence=1, reason="x")
    assert outcome.state == OrderState.FILLED
    first, second = venue.sent
    assert first.params["positionSide"] == "BOTH"
    assert first.params["reduceOnly"] == "true"
    assert second.params["positionSide"] == "LONG"
    assert "reduceOnly" not in second.params
    assert second.params["newClientOrderId"].endswith("-x1-1")
    assert router.mode == "hedge"
    assert store.counters("order_rejections") == {"-4061": 1}
    rejected = store.get_order(first.params["newClientOrderId"])
    assert rejected is not None
    assert rejected.status == "REJECTED"
    assert rejected.error_code == -4061


async def test_reduce_only_in_hedge_mode_minus_1106_rebuilds() -> None:
    venue, _store, router = make(hedge=False)
    await router.refresh_mode()
    venue.hedge = True
    venue.set_position("BTCUSDT", "SHORT", "0.010", "30000")
    # a mode error from a venue that checks reduceOnly first
    venue.faults = [OrderRejected(-1106, "Parameter 'reduceonly' sent when not required.")]
    outcome = await router.send_exit("1", "BTCUSDT", "SHORT", "0.010", sequence=1, reason="x")
    assert outcome.state == OrderState.FILLED
    assert venue.sent[-1].params["positionSide"] == "SHORT"


async def test_minus_2022_on_exit_reports_flat() -> None:
    venue, _store, router = make(hedge=False)
    outcome = await router.send_exit("1", "BTCUSDT", "LONG", "0.003", sequence=1, reason="x")
    assert outcome.flat
    assert outcome.error_code == -2022
    assert len(venue.sent) == 1


async def test_rate_limited_backs_off_and_resends_under_next_attempt() -> None:
    venue, _store, router = make(hedge=True)
    venue.set_position("BTCUSDT", "LONG", "0.010", "30000")
    venue.faults = [retryable_429()]
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    router._sleep = record
    outcome = await router.send_exit("1", "BTCUSDT", "LONG", "0.003", sequence=4, reason="x")
    assert outcome.state == OrderState.FILLED
    assert [s.params["newClientOrderId"][-5:] for s in venue.sent] == ["-x4-0", "-x4-1"]
    assert waits == [1.0]  # retry_after_s 0 -> the configured default


async def test_filter_error_asks_for_a_rules_refresh() -> None:
    venue, _store, router = make(hedge=True)
    venue.set_position("BTCUSDT", "LONG", "0.010", "30000")
    refreshed: list[tuple[str, int]] = []

    async def refresh(symbol: str, code: int) -> None:
        refreshed.append((symbol, code))

    router._on_rules_stale = refresh
    venue.faults = [OrderRejected(-1111, "Precision is over the maximum defined for this asset.")]
    outcome = await router.send_exit("1", "BTCUSDT", "LONG", "0.003", sequence=1, reason="x")
    assert outcome.state == OrderState.REJECTED
    assert refreshed == [("BTCUSDT", -1111)]


async def test_exit_never_exceeds_live_quantity() -> None:
    venue, _store, router = make(hedge=True)
    venue.set_position("BTCUSDT", "LONG", "0.0025", "30000")
    outcome = await router.send_exit(
        "1",
        "BTCUSDT",
        "LONG",
        "0.010",
        sequence=1,
        reason="stop_loss",
        live_quantity=Decimal("0.0025"),
    )
    assert venue.sent[0].params["quantity"] == "0.002"
    assert outcome.executed_qty == Decimal("0.002")


async def test_concurrent_closes_of_one_position_are_serialized() -> None:
    venue, _store, router = make(hedge=True)
    venue.set_position("BTCUSDT", "LONG", "0.010", "30000")
    venue.gate = asyncio.Event()
    first = asyncio.create_task(
        router.send_exit("1", "BTCUSDT", "LONG", "0.003", sequence=1, reason="take_profit_1")
    )
    second = asyncio.create_task(
        router.send_exit("1", "BTCUSDT", "LONG", "0.007", sequence=2, reason="stop_loss")
    )
    for _ in range(5):
        await asyncio.sleep(0)
    assert venue.in_flight == 1
    venue.gate.set()
    results = await asyncio.gather(first, second)
    assert venue.max_in_flight == 1
    assert [r.state for r in results] == [OrderState.FILLED, OrderState.FILLED]
    # another position is not held up by the first one's lock
    assert not router.position_lock("2").locked()


async def test_prepare_symbol_confirms_or_fails_closed() -> None:
    venue, _store, router = make(hedge=True)
    await router.prepare_symbol("BTCUSDT", 7)
    assert venue.leverage == {"BTCUSDT": 7}
    assert venue.margin_types == {"BTCUSDT": "CROSSED"}
    venue.refuse_leverage.add("ETHUSDT")
    with pytest.raises(RouterError, match="not confirmed"):
        await router.prepare_symbol("ETHUSDT", 50)


# ---- order state machine --------------------------------------------------------------------


async def test_state_machine_drops_stale_and_regressions() -> None:
    venue, store, router = make(hedge=True)
    venue.set_position("BTCUSDT", "LONG", "0.010", "30000")
    venue.faults = ["unknown_not_executed"]
    venue.lookup_misses = 0
    router.config = RouterConfig(lookup_delays_s=())
    # build a row in UNKNOWN by hand through the public path, then feed events
    outcome = await router.send_exit("1", "BTCUSDT", "LONG", "0.003", sequence=1, reason="x")
    row = store.get_order(outcome.client_order_id)
    assert row is not None
    assert row.status == "NOT_FOUND"
    # NOT_FOUND is only inferred: a later answer from the venue wins
    late = next_state(row, RestAnswer(OrderState.FILLED, "0.003", "30000", "7"))
    assert late.changes["status"] == OrderState.FILLED
    assert late.changes["executed_qty"] == "0.003"
    # a final state said by the venue never goes back
    store.update_order(outcome.client_order_id, status="FILLED", rest_final=True)
    filled = store.get_order(outcome.client_order_id)
    assert filled is not None
    transition = next_state(filled, RestAnswer(OrderState.NEW, "0", None, "7"))
    assert "status" not in transition.changes
    fresh = store.get_order(outcome.client_order_id)
    assert fresh is not None
    fresh.status = "PARTIALLY_FILLED"
    fresh.exchange_time_ms = 100
    stale = next_state(fresh, StreamUpdate(OrderState.NEW, "0", None, "7", 90))
    assert stale.changes == {}
    assert "stale" in stale.note
    regress = next_state(fresh, StreamUpdate(OrderState.NEW, "0", None, "7", 110))
    assert "status" not in regress.changes
    final = next_state(fresh, StreamUpdate(OrderState.FILLED, "0.003", "30000", "7", 120))
    assert final.changes["status"] == OrderState.FILLED
    assert final.changes["stream_final"] is True


# ---- backstop -------------------------------------------------------------------------------


@pytest.mark.parametrize("hedge", [True, False])
async def test_backstop_tightens_new_before_old_and_is_throttled(hedge: bool) -> None:
    venue, store, router = make(hedge, backstop_min_interval_ms=60_000)
    venue.set_position("BTCUSDT", "LONG", "0.010", "30000")
    clock = [1_000_000]
    router._clock = lambda: clock[0]
    first = await router.backstops.update_backstop(
        "1", "BTCUSDT", "LONG", "29700.0", quantity="0.010"
    )
    assert first is not None
    params = venue.sent[0].params
    assert params["triggerPrice"] == "29551.5"  # 29700 * 0.995, rounded down (further out)
    assert params["positionSide"] == ("LONG" if hedge else "BOTH")
    assert params["closePosition"] == "true"
    assert "quantity" not in params
    assert "reduceOnly" not in params
    # looser stop: no move
    assert await router.backstops.update_backstop("1", "BTCUSDT", "LONG", "29600.0") == first
    # tighter but inside the throttle window: no move
    assert await router.backstops.update_backstop("1", "BTCUSDT", "LONG", "29800.0") == first
    clock[0] += 60_000
    second = await router.backstops.update_backstop(
        "1", "BTCUSDT", "LONG", "29800.0", quantity="0.010"
    )
    assert second != first
    paths = [s.path for s in venue.sent]
    assert paths == ["/fapi/v1/algoOrder", "/fapi/v1/algoOrder", "DELETE /fapi/v1/algoOrder"]
    # Binance holds one closePosition stop per direction (-4130): the tightened one is
    # sized for the leg and placed before the close-all one is cancelled.
    sized = venue.sent[1].params
    assert sized["quantity"] == "0.010"
    assert "closePosition" not in sized
    assert sized.get("reduceOnly") == (None if hedge else "true")
    assert venue.algo_orders[first]["algoStatus"] == "CANCELED"
    assert venue.algo_orders[second]["algoStatus"] == "NEW"
    # a restarted router knows the live backstop from the store
    again = OrderRouter(venue, store, FakeRules(), RouterConfig(), sleep=_no_sleep)
    assert again.backstops.backstop_of("1") == (second, Decimal("29651.0"))
    # the next tightening is a close-all stop again, placed before the sized one goes
    clock[0] += 60_000
    third = await router.backstops.update_backstop(
        "1", "BTCUSDT", "LONG", "29900.0", quantity="0.010"
    )
    assert venue.sent[-2].params["closePosition"] == "true"
    assert venue.algo_orders[second]["algoStatus"] == "CANCELED"
    # a take-profit shrinks the leg: the sized stop would be wrong, so it is replaced...
    clock[0] += 60_000
    fourth = await router.backstops.update_backstop(
        "1", "BTCUSDT", "LONG", "29950.0", quantity="0.010"
    )
    assert venue.sent[-2].params["quantity"] == "0.010"
    fifth = await router.backstops.update_backstop(
        "1", "BTCUSDT", "LONG", "29950.0", quantity="0.007"
    )
    # ...by a close-all stop at the same trigger, at once (no throttle for a re-size)
    assert fifth != fourth
    assert venue.sent[-2].params["closePosition"] == "true"
    assert venue.sent[-2].params["triggerPrice"] == venue.sent[-4].params["triggerPrice"]
    live = [o for o in venue.algo_orders.values() if o["algoStatus"] == "NEW"]
    assert [o["clientAlgoId"] for o in live] == [fifth]
    assert third != second
    # closed position: cancelled
    assert await router.backstops.cancel_backstops("1") == [fifth]
    assert await venue.open_algo_orders() == []


@pytest.mark.parametrize("hedge", [True, False])
async def test_a_4130_is_answered_from_the_open_algo_orders(hedge: bool) -> None:
    venue, store, router = make(hedge)
    venue.set_position("BTCUSDT", "LONG", "0.010", "30000")
    # Our own close-all stop whose answer was lost: the journal does not know it rests.
    stale = await router.backstops.update_backstop(
        "1", "BTCUSDT", "LONG", "29000.0", quantity="0.010"
    )
    assert stale is not None
    router.backstops.forget_backstop("1")
    placed = await router.backstops.update_backstop(
        "1", "BTCUSDT", "LONG", "29700.0", quantity="0.010"
    )
    codes = [s.path for s in venue.sent]
    # refused once (-4130), the open algo orders read, the stale stop cancelled, placed once
    assert codes == [
        "/fapi/v1/algoOrder",
        "/fapi/v1/algoOrder",
        "DELETE /fapi/v1/algoOrder",
        "/fapi/v1/algoOrder",
    ]
    assert store.get_order(venue.sent[1].params["clientAlgoId"]).error_code == -4130
    live = [o["clientAlgoId"] for o in venue.algo_orders.values() if o["algoStatus"] == "NEW"]
    assert live == [placed]


@pytest.mark.parametrize("hedge", [True, False])
async def test_a_peers_close_all_stop_gets_a_sized_one_beside_it(hedge: bool) -> None:
    venue, _store, router = make(hedge)
    venue.set_position("BTCUSDT", "LONG", "0.010", "30000")
    await venue.new_algo_order(
        backstop_params(
            "hedge" if hedge else "one-way", "BTCUSDT", "LONG", "29000.0", "pqpeer-9-b1-0"
        )
    )
    placed = await router.backstops.update_backstop(
        "1", "BTCUSDT", "LONG", "29700.0", quantity="0.010"
    )
    assert placed is not None
    assert venue.algo_orders[placed]["quantity"] == "0.010"
    # the peer's stays until retire_peer_backstops finds ours at least as tight
    assert venue.algo_orders["pqpeer-9-b1-0"]["algoStatus"] == "NEW"
    assert await router.backstops.retire_peer_backstops("1", "BTCUSDT", "LONG") == ["pqpeer-9-b1-0"]


@pytest.mark.parametrize("hedge", [True, False])
async def test_a_stop_that_would_trigger_now_is_reported(hedge: bool) -> None:
    venue, _store, router = make(hedge)
    venue.faults.append(OrderRejected(-2021, "Order would immediately trigger."))
    with pytest.raises(StopWouldTrigger) as caught:
        await router.backstops.update_backstop("1", "BTCUSDT", "LONG", "29700.0", quantity="0.010")
    assert caught.value.code == -2021
    assert router.backstops.backstop_of("1") is None


async def test_a_refused_first_backstop_is_throttled_too() -> None:
    venue, _store, router = make(False, backstop_min_interval_ms=5_000)
    clock = [1_000_000]
    router._clock = lambda: clock[0]
    venue.faults.append(OrderRejected(-4045, "Reach max stop order limit."))
    assert await router.backstops.update_backstop("1", "BTCUSDT", "LONG", "29700.0") is None
    for _ in range(4):  # the timer calls every second: no placement storm
        clock[0] += 1_000
        assert await router.backstops.update_backstop("1", "BTCUSDT", "LONG", "29700.0") is None
    clock[0] += 1_000
    assert await router.backstops.update_backstop("1", "BTCUSDT", "LONG", "29700.0") is not None
    assert len([s for s in venue.sent if s.path == "/fapi/v1/algoOrder"]) == 2


async def test_a_failed_backstop_cancel_is_retried() -> None:
    venue, _store, router = make(False)
    placed = await router.backstops.update_backstop("1", "BTCUSDT", "LONG", "29700.0")
    original = venue.cancel_algo_order
    calls = []

    async def flaky(symbol: str, cid: str) -> Any:
        calls.append(cid)
        if len(calls) == 1:
            raise TimeoutError("read timed out")
        return await original(symbol, cid)

    venue.cancel_algo_order = flaky  # type: ignore[method-assign]
    assert await router.backstops.cancel_backstops("1") == []
    assert venue.algo_orders[placed]["algoStatus"] == "NEW"
    assert await router.backstops.retry_cancels() == [placed]
    assert venue.algo_orders[placed]["algoStatus"] == "CANCELED"
    assert await router.backstops.retry_cancels() == []


async def test_short_backstop_rounds_up() -> None:
    venue, _store, router = make(hedge=True)
    await router.backstops.update_backstop("1", "BTCUSDT", "SHORT", "30300.0")
    assert venue.sent[0].params["triggerPrice"] == "30451.5"
    assert venue.sent[0].params["side"] == "BUY"


async def test_orphan_backstops_are_cancelled() -> None:
    venue, _store, router = make(hedge=True)
    venue.set_position("BTCUSDT", "LONG", "0.010", "30000")
    keep = await router.backstops.update_backstop("1", "BTCUSDT", "LONG", "29700.0")
    orphan = await router.backstops.update_backstop("2", "ETHUSDT", "SHORT", "2100.00")
    foreign = await venue.new_algo_order(
        {
            "symbol": "ETHUSDT",
            "side": "BUY",
            "positionSide": "SHORT",
            "type": "STOP_MARKET",
            "triggerPrice": "2200",
            "quantity": "0.5",  # a close-all one would be refused beside ours (-4130)
            "clientAlgoId": "someone-else",
        }
    )
    cancelled = await router.backstops.cleanup_orphans({("BTCUSDT", "LONG")})
    assert cancelled == [orphan]
    assert venue.algo_orders[keep]["algoStatus"] == "NEW"
    assert venue.algo_orders[foreign["clientAlgoId"]]["algoStatus"] == "NEW"


@pytest.mark.parametrize("hedge", [True, False])
async def test_flatten_cancels_and_closes_every_leg(hedge: bool) -> None:
    venue, _store, router = make(hedge)
    if hedge:
        venue.set_position("BTCUSDT", "LONG", "0.010", "30000")
        venue.set_position("BTCUSDT", "SHORT", "0.004", "30000")
    else:
        venue.set_position("BTCUSDT", "BOTH", "-0.004", "30000")
    venue.set_position("ETHUSDT", "LONG" if hedge else "BOTH", "0.5", "2000")
    await router.backstops.update_backstop("1", "BTCUSDT", "SHORT", "30300.0")
    steps = await router.flatten({("BTCUSDT", "SHORT"): "1"})
    kinds = [(s.step, s.symbol, s.position_side, s.ok) for s in steps]
    assert ("cancel_backstop", "BTCUSDT", "SHORT" if hedge else "BOTH", True) in kinds
    closes = [s for s in steps if s.step == "close"]
    assert all(s.ok for s in closes)
    assert len(closes) == (3 if hedge else 2)
    assert await venue.position_risk() == []
    close_params = [s.params for s in venue.sent if s.path == "/fapi/v1/order"]
    for params in close_params:
        assert ("reduceOnly" in params) is (not hedge)


async def test_flatten_splits_a_leg_above_market_max_qty() -> None:
    venue, _, router = make(hedge=True)
    venue.marks["BTCUSDT"] = Decimal("30000")
    venue.set_position("BTCUSDT", "LONG", "2500.5", "30000")
    steps = await router.flatten()
    closes = [s for s in steps if s.step == "close"]
    assert [s.ok for s in closes] == [True, True, True]
    assert [s.params["quantity"] for s in venue.sent] == ["1000.000", "1000.000", "500.500"]
    assert await venue.position_risk() == []


async def test_an_exit_above_market_max_qty_sends_max_qty_now() -> None:
    # -4005 otherwise; the engine confirms the partial fill and emits the rest next update.
    venue, _, router = make(hedge=True)
    venue.marks["BTCUSDT"] = Decimal("30000")
    venue.set_position("BTCUSDT", "LONG", "2500.5", "30000")
    await router.refresh_mode()
    outcome = await router.send_exit(
        "1",
        "BTCUSDT",
        "LONG",
        "2500.500",
        sequence=4,
        reason="stop_loss",
        live_quantity=Decimal("2500.5"),
    )
    assert outcome.state == OrderState.FILLED
    assert outcome.executed_qty == Decimal("1000.000")
    assert [s.params["quantity"] for s in venue.sent] == ["1000.000"]
    assert venue.position_amount("BTCUSDT", "LONG") == Decimal("1500.5")
