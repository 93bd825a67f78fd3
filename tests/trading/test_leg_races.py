"""The leg-lifecycle races (issue 19), each replayed deterministically in both position modes.

A ``HeldVenue`` executes each request at once but parks its answer until the test releases
it, so a live reconciliation, a hand-over or a timer tick lands exactly between a request and
its reply. Each test failed before legs had one owner (pyquant.trading.legs).
"""

from __future__ import annotations

import asyncio
import random
from decimal import Decimal
from typing import Any

import pytest
from fake_venue import FakeEngine, FakeRules, FakeVenue
from interleave import GatedSleep, HeldVenue, settle, until

from pyquant.trading.desk import DeskConfig, TradingDesk
from pyquant.trading.guard import GuardConfig
from pyquant.trading.intents import parse_intent
from pyquant.trading.journal import Store
from pyquant.trading.legs import Closed, LegState
from pyquant.trading.recovery import reconcile
from pyquant.trading.router import RouterConfig, backstop_params
from pyquant.trading.sizing import SizingConfig

NOW = 1_700_000_000_000
MODES = [pytest.param(True, id="hedge"), pytest.param(False, id="one-way")]


async def _no_sleep(_seconds: float) -> None:
    return None


def make(hedge: bool, hold: set[str] | None = None) -> tuple[HeldVenue, TradingDesk]:
    venue = HeldVenue(FakeVenue(hedge=hedge), hold)
    store = Store.open(":memory:")
    config = DeskConfig(
        guard=GuardConfig(cooldown_ms=0),
        sizing=SizingConfig(method="notional", notional_usd=Decimal("300")),
        router=RouterConfig(lookup_delays_s=(0.1,), backstop_min_interval_ms=0),
    )
    desk = TradingDesk(venue, store, FakeRules(), FakeEngine(), config, clock=lambda: NOW)  # type: ignore[arg-type]
    desk.router._sleep = _no_sleep
    return venue, desk


def intent(intent_id: str, symbol: str = "BTCUSDT", side: str = "BUY") -> Any:
    return parse_intent(
        {"id": intent_id, "symbol": symbol, "side": side, "created_at_ms": NOW},
        source="t",
        now_ms=NOW,
    )


async def ready(desk: TradingDesk) -> None:
    await reconcile(desk, live=False)


async def desk_with_a_long(hedge: bool) -> tuple[HeldVenue, TradingDesk, str]:
    """A reconciled desk that opened one BTCUSDT long (intent "a"); its position id last."""
    venue, desk = make(hedge)
    await ready(desk)
    pid = (await desk.submit(intent("a"))).position_id or ""
    return venue, desk, pid


def engine_of(desk: TradingDesk) -> FakeEngine:
    engine = desk.engine
    assert isinstance(engine, FakeEngine)
    return engine


def open_rows(desk: TradingDesk, symbol: str = "BTCUSDT", leg: str = "LONG") -> list[Any]:
    return [
        p
        for p in desk.store.positions(("opening", "open"))
        if (p.symbol, p.position_side) == (symbol, leg)
    ]


def live_algo(venue: HeldVenue) -> list[dict[str, Any]]:
    return [o for o in venue.inner.algo_orders.values() if o["algoStatus"] == "NEW"]


def exit_orders(venue: HeldVenue) -> list[dict[str, str]]:
    return [
        s.params
        for s in venue.inner.sent
        if s.path == "/fapi/v1/order" and "-x" in s.params["newClientOrderId"]
    ]


async def pause_an_exit(
    desk: TradingDesk, pid: str, *, pending: bool = False
) -> tuple[FakeEngine, GatedSleep, Any]:
    """Emit a take-profit for ``pid`` that waits out a retry pause until the test opens it."""
    engine = engine_of(desk)
    gate = GatedSleep()
    desk._sleep = gate
    desk._exit_failures[pid] = 1  # an earlier attempt failed: the next one pauses first
    action = engine.action(pid, "0.003")
    if pending:
        engine.pending.append(action)
    desk.on_actions([action])
    await until(lambda: gate.waiting == 1, "the exit pauses")
    return engine, gate, action


@pytest.mark.parametrize("hedge", MODES)
async def test_live_reconcile_leaves_an_entry_awaiting_its_answer(hedge: bool) -> None:
    # Race 1: the entry filled on the exchange, its REST answer has not arrived.
    venue, desk = make(hedge)
    await ready(desk)
    venue.hold = {"new_order"}
    submit = asyncio.ensure_future(desk.submit(intent("a")))
    await venue.wait_parked("new_order")
    assert venue.inner.position_amount("BTCUSDT", "LONG") == Decimal("0.010")
    report = await reconcile(desk, live=True)
    assert report.positions_adopted == []
    assert report.deferred == ["BTCUSDT LONG"]
    await venue.release("new_order")
    await submit
    rows = open_rows(desk)
    assert [(p.status, p.quantity) for p in rows] == [("open", "0.010")]
    assert [v.position_id for v in desk.engine.positions()] == [rows[0].position_id]


@pytest.mark.parametrize("hedge", MODES)
async def test_live_reconcile_leaves_an_entry_in_symbol_setup(hedge: bool) -> None:
    # Race 2: the entry is still setting leverage; no order row exists yet.
    venue, desk = make(hedge)
    await ready(desk)
    venue.hold = {"set_leverage"}
    submit = asyncio.ensure_future(desk.submit(intent("a")))
    await venue.wait_parked("set_leverage")
    report = await reconcile(desk, live=True)
    assert report.entries_failed == []
    await venue.release("set_leverage")
    decision = await submit
    position = desk.store.get_position(decision.position_id or "")
    assert position is not None
    assert position.status == "open"
    assert [v.position_id for v in desk.engine.positions()] == [position.position_id]
    assert len(live_algo(venue)) == 1  # and it has its exchange-side stop


@pytest.mark.parametrize("hedge", MODES)
async def test_live_reconcile_leaves_an_exit_waiting_out_its_retry_pause(hedge: bool) -> None:
    # Race 3: an exit pauses before its retry (no order row yet); reconcile must not give it
    # back to the engine, or the re-emitted copy and the paused one both sell.
    venue, desk, pid = await desk_with_a_long(hedge)
    engine, gate, action = await pause_an_exit(desk, pid, pending=True)
    report = await reconcile(desk, live=True)
    assert report.actions_settled == {f"{pid}:{action.sequence}": "in_flight"}
    assert ("reject", (pid, action.sequence)) not in engine.calls
    gate.gate.set()
    await desk.drain()
    assert [o["quantity"] for o in exit_orders(venue)] == ["0.003"]
    assert venue.inner.position_amount("BTCUSDT", "LONG") == Decimal("0.007")


@pytest.mark.parametrize("hedge", MODES)
async def test_a_close_waits_for_a_backstop_being_placed(hedge: bool) -> None:
    # Race 4: the backstop move is in flight when the position closes; the close's cancel
    # must not run before the placement lands (it would miss it: an orphan stop).
    venue, desk, pid = await desk_with_a_long(hedge)
    engine = engine_of(desk)
    engine.views[pid].stop_price = "29900"  # the stop tightened: the timer moves the backstop
    venue.hold = {"new_algo_order"}
    move = asyncio.ensure_future(desk.sync_backstops())
    await venue.wait_parked("new_algo_order")
    desk.on_actions([engine.action(pid, "0.010", "stop_loss")])
    await settle()
    assert exit_orders(venue) == []  # the exit waits for the leg's owner
    await venue.release("new_algo_order")
    await move
    await desk.drain()
    assert desk.store.get_position(pid).status == "closed"  # type: ignore[union-attr]
    assert live_algo(venue) == []


@pytest.mark.parametrize("hedge", MODES)
async def test_hand_over_wins_over_an_exit_waiting_for_its_turn(hedge: bool) -> None:
    # Race 6: an exit paused for its retry; the symbol is handed to a peer meanwhile.
    venue, desk, pid = await desk_with_a_long(hedge)
    engine, gate, action = await pause_an_exit(desk, pid)
    assert await desk.hand_over("BTCUSDT", "peer") == [pid]
    gate.gate.set()
    await desk.drain()
    assert exit_orders(venue) == []
    assert venue.inner.position_amount("BTCUSDT", "LONG") == Decimal("0.010")
    assert ("reject", (pid, action.sequence)) in engine.calls
    assert desk.legs.get(("BTCUSDT", "LONG")) is None


@pytest.mark.parametrize("hedge", MODES)
async def test_two_backstop_syncs_under_latency_place_one_stop(hedge: bool) -> None:
    # Race 9: the post-open sync and the timer both place a backstop while the venue is slow.
    venue, desk = make(hedge)
    await ready(desk)
    venue.hold = {"new_algo_order"}
    submit = asyncio.ensure_future(desk.submit(intent("a")))
    await venue.wait_parked("new_algo_order")
    timer = asyncio.ensure_future(desk.sync_backstops())
    await settle()
    await venue.release_all()
    await submit
    await timer
    await desk.drain()
    assert len(live_algo(venue)) == 1
    assert len([s for s in venue.inner.sent if s.path == "/fapi/v1/algoOrder"]) == 1


@pytest.mark.parametrize("hedge", MODES)
async def test_an_exit_that_crashes_gives_its_action_back(hedge: bool) -> None:
    # Not an ExchangeError (a bad body, an InputError from the rules): the action must not
    # stay pending, the failure is counted, and the leg is idle again.
    _venue, desk, pid = await desk_with_a_long(hedge)
    engine = engine_of(desk)

    async def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise ValueError("unreadable JSON body")

    desk.router.send_exit = broken  # type: ignore[method-assign]
    action = engine.action(pid, "0.003")
    desk.on_actions([action])
    await desk.drain()
    assert ("reject", (pid, action.sequence)) in engine.calls
    assert desk.task_failures == 1
    leg = desk.legs.get(("BTCUSDT", "LONG"))
    assert leg is not None
    assert leg.state == LegState.OPEN
    assert not leg.work


@pytest.mark.parametrize("hedge", MODES)
async def test_flatten_closes_before_it_cancels_protection(hedge: bool) -> None:
    venue, desk = make(hedge)
    await ready(desk)
    await desk.submit(intent("a"))
    await desk.submit(intent("b", symbol="ETHUSDT", side="SELL"))
    assert len(live_algo(venue)) == 2
    steps = await desk.flatten()
    kinds = [s.step for s in steps]
    assert kinds == ["close", "close", "cancel_backstop", "cancel_backstop"]
    assert all(s.ok for s in steps)
    assert live_algo(venue) == []
    assert desk.store.positions(("open",)) == []


# ---- randomized interleavings ---------------------------------------------------------------


async def _random_run(seed: int, hedge: bool) -> None:
    rng = random.Random(seed)
    venue, desk = make(hedge)
    await ready(desk)
    engine = engine_of(desk)
    venue.hold = {"new_order", "new_algo_order", "cancel_algo_order", "set_leverage"}
    work: list[asyncio.Future[Any]] = []
    symbols = [("BTCUSDT", "BUY"), ("ETHUSDT", "SELL")]
    for step in range(40):
        choice = rng.random()
        if choice < 0.15:
            symbol, side = rng.choice(symbols)
            work.append(asyncio.ensure_future(desk.submit(intent(f"i{step}", symbol, side))))
        elif choice < 0.35:
            views = engine.positions()
            if views:
                view = rng.choice(views)
                quantity = (
                    rng.choice(["0.001", view.quantity])
                    if view.symbol == "BTCUSDT"
                    else (rng.choice(["0.01", view.quantity]))
                )
                desk.on_actions([engine.action(view.position_id, quantity)])
        elif choice < 0.45:
            for view in engine.positions():  # the trailing stop moved
                stop = Decimal(view.stop_price)
                view.stop_price = str(
                    stop * (Decimal("1.001") if view.position_side == "LONG" else Decimal("0.999"))
                )
            work.append(asyncio.ensure_future(desk.sync_backstops()))
        elif choice < 0.55:
            work.append(asyncio.ensure_future(reconcile(desk, live=True)))
        elif choice < 0.65 and venue.inner.events:
            event = venue.inner.events.pop(0)
            work.append(asyncio.ensure_future(desk.on_user_event(event)))
        elif venue.parked:
            await venue.release(index=rng.randrange(len(venue.parked)))
        await settle(rng.randint(0, 5))
    venue.hold = set()
    await venue.release_all()
    await asyncio.gather(*work)
    for event in venue.inner.events:
        await desk.on_user_event(event)
    await desk.drain()
    await desk.sync_backstops()
    await desk.drain()

    # Invariants: one journal row per leg, the engine runs exactly the open rows, the
    # journal's quantity is the exchange's, nothing was sold twice (no leg went through zero
    # the wrong way), and every open leg has exactly one exchange-side stop.
    open_positions = desk.store.positions(("open",))
    keys = [(p.symbol, p.position_side) for p in open_positions]
    assert len(keys) == len(set(keys)), keys
    assert {p.position_id for p in open_positions} == {v.position_id for v in engine.positions()}
    for position in open_positions:
        venue_qty = venue.inner.position_amount(position.symbol, position.position_side)
        assert abs(venue_qty) == Decimal(position.quantity), (position, venue_qty)
        stops = [
            o
            for o in live_algo(venue)
            if o["symbol"] == position.symbol
            and (o["positionSide"] in (position.position_side, "BOTH"))
        ]
        assert len(stops) == 1, (position, stops)
    for (symbol, leg), (amount, _entry) in venue.inner.positions.items():
        if not hedge:
            continue
        assert amount >= 0, (symbol, leg, amount)
    flat_symbols = {
        s
        for s, _ in symbols
        if all(venue.inner.position_amount(s, leg) == 0 for leg in ("LONG", "SHORT"))
    }
    assert not [o for o in live_algo(venue) if o["symbol"] in flat_symbols]


@pytest.mark.parametrize("hedge", MODES)
@pytest.mark.parametrize("seed", range(12))
async def test_random_interleavings_keep_the_leg_invariants(seed: int, hedge: bool) -> None:
    await _random_run(seed, hedge)


@pytest.mark.parametrize("hedge", MODES)
async def test_a_takeover_and_an_account_update_adopt_a_leg_once(hedge: bool) -> None:
    venue, desk = make(hedge)
    await ready(desk)
    venue.inner.set_position("BTCUSDT", "LONG" if hedge else "BOTH", "0.020", "30000")
    venue.hold = {"position_risk"}  # both read the venue before they adopt
    takeover = asyncio.ensure_future(reconcile(desk, symbols=frozenset({"BTCUSDT"}), takeover=True))
    await venue.wait_parked("position_risk")
    update = asyncio.ensure_future(desk.on_user_event(venue.inner.account_event()))
    await venue.wait_parked("position_risk", 2)
    while not (takeover.done() and update.done()):
        await venue.release_all()
        await settle()
    await takeover
    await update
    await desk.drain()
    rows = open_rows(desk)
    assert len(rows) == 1
    assert [v.position_id for v in desk.engine.positions()] == [rows[0].position_id]


@pytest.mark.parametrize("hedge", MODES)
async def test_a_journal_closed_elsewhere_does_not_block_the_next_entry(hedge: bool) -> None:
    # Another process closed the journal's row and the exchange's leg (an external flatten);
    # the engine still holds its copy. The next entry on the leg must be run and protected.
    venue, desk = make(hedge)
    await ready(desk)
    first = (await desk.submit(intent("a"))).position_id or ""
    venue.inner.set_position("BTCUSDT", "LONG" if hedge else "BOTH", "0", "0")
    for order in venue.inner.algo_orders.values():
        order["algoStatus"] = "CANCELED"
    desk.store.update_position(first, status="closed", close_reason="flatten")
    desk.legs.apply(("BTCUSDT", "LONG"), Closed("flatten"))
    second = (await desk.submit(intent("b"))).position_id or ""
    await desk.drain()
    assert second != first
    assert [v.position_id for v in desk.engine.positions()] == [second]
    assert len(live_algo(venue)) == 1


@pytest.mark.parametrize("hedge", MODES)
async def test_a_closed_leg_keeps_no_leftover_stop(hedge: bool) -> None:
    # Issue 18: a stop an earlier position (or a previous owner) left on the leg closed the
    # next position there. When a leg closes, every pyquant stop on it goes; others stay.
    venue, desk = make(hedge)
    await ready(desk)
    mode = "hedge" if hedge else "one-way"
    pid = (await desk.submit(intent("a"))).position_id or ""
    for cid, trigger in (
        ("pqzzzz-9-b1-0", "29950.0"),
        (f"pq{desk.store.instance_tag}-0-b7-0", "29960.0"),
    ):
        await venue.inner.new_algo_order(
            backstop_params(mode, "BTCUSDT", "LONG", trigger, cid, quantity="0.010")
        )
    foreign = {
        "symbol": "BTCUSDT",
        "side": "SELL",
        "positionSide": "LONG" if hedge else "BOTH",
        "type": "STOP_MARKET",
        "triggerPrice": "25000",
        "quantity": "0.010",
        "clientAlgoId": "my-own-tool-1",
    }
    await venue.inner.new_algo_order(foreign)
    engine = engine_of(desk)
    desk.on_actions([engine.action(pid, "0.010", "stop_loss")])
    await desk.drain()
    assert desk.store.get_position(pid).status == "closed"  # type: ignore[union-attr]
    assert [o["clientAlgoId"] for o in live_algo(venue)] == ["my-own-tool-1"]


@pytest.mark.parametrize("hedge", MODES)
async def test_a_stale_stop_of_ours_is_retired_even_when_tighter(hedge: bool) -> None:
    venue, desk = make(hedge)
    await ready(desk)
    mode = "hedge" if hedge else "one-way"
    pid = (await desk.submit(intent("a"))).position_id or ""
    stale = f"pq{desk.store.instance_tag}-0-b3-0"  # an earlier position on this leg
    await venue.inner.new_algo_order(
        backstop_params(mode, "BTCUSDT", "LONG", "29990.0", stale, quantity="0.010")
    )
    retired = await desk.router.backstops.retire_peer_backstops(pid, "BTCUSDT", "LONG")
    assert retired == [stale]
    assert len(live_algo(venue)) == 1
