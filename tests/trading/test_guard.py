"""Position guard: every reason, fail-closed, persistence, and the concurrent-intent race."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import pytest
from fake_venue import FakeEngine, FakeRules, FakeVenue

from pyquant.trading.desk import DeskConfig, TradingDesk
from pyquant.trading.guard import GuardConfig, PositionGuard
from pyquant.trading.intents import Intent, parse_intent
from pyquant.trading.journal import PositionRow, Store
from pyquant.trading.sizing import SizeDecision

NOW = 1_700_000_000_000


def intent(intent_id: str, symbol: str = "BTCUSDT", side: str = "BUY", **extra: Any) -> Intent:
    payload = {"id": intent_id, "symbol": symbol, "side": side, "created_at_ms": NOW, **extra}
    return parse_intent(payload, source="test", now_ms=NOW)


def make_guard(mode: str = "hedge", **config: Any) -> PositionGuard:
    clock = [NOW]
    guard = PositionGuard(
        Store.open(":memory:"), FakeRules(), GuardConfig(**config), clock=lambda: clock[0]
    )
    guard.set_mode(mode)  # type: ignore[arg-type]
    guard.mark_state_known()
    guard.clock = clock  # type: ignore[attr-defined]
    return guard


def sized(notional: str = "150") -> Any:
    return lambda i, lev: SizeDecision(True, quantity="0.005", notional=Decimal(notional))


def open_position(guard: PositionGuard, position_id: str, symbol: str, leg: str) -> None:
    guard.store.upsert_position(
        PositionRow(
            position_id,
            symbol,
            leg,
            "open",
            "entry",
            "0.005",
            "30000",
            10,
            None,
            None,
            NOW,
            None,
            None,
        )
    )


def test_accept_persists_decision_reservation_and_opening_row() -> None:
    guard = make_guard()
    decision = guard.decide(intent("a"), size=sized(), payload={"raw": 1})
    assert decision.accepted
    assert decision.reason == "accepted"
    assert decision.position_id == "1"
    assert decision.quantity == "0.005"
    (reservation,) = guard.store.reservations()
    assert (reservation.symbol, reservation.position_side, reservation.intent_id) == (
        "BTCUSDT",
        "LONG",
        "a",
    )
    position = guard.store.get_position("1")
    assert position is not None
    assert position.status == "opening"
    (row,) = guard.store.intent_decisions("a")
    assert (row["decision"], row["reason"], row["position_id"]) == ("accepted", "accepted", "1")


@pytest.mark.parametrize(
    ("setup", "the_intent", "reason"),
    [
        ("duplicate", intent("a"), "duplicate_intent"),
        ("none", intent("s", created_at_ms=NOW - 120_000), "stale"),
        ("none", intent("f", created_at_ms=NOW + 60_000), "invalid"),
        ("none", intent("u", symbol="XRPUSDT"), "unknown_symbol"),
        ("none", intent("t", symbol="EOSUSDT"), "symbol_not_trading"),
        ("open_long", intent("o"), "position_open"),
        ("in_flight", intent("r"), "entry_in_flight"),
        ("cooldown", intent("c"), "cooldown"),
        ("max_positions", intent("m"), "max_positions"),
    ],
)
def test_rejection_reasons(setup: str, the_intent: Intent, reason: str) -> None:
    guard = make_guard(max_open_positions=2)
    if setup == "duplicate":
        guard.decide(intent("a", symbol="ETHUSDT"), size=sized())
    elif setup == "open_long":
        open_position(guard, "9", "BTCUSDT", "LONG")
    elif setup == "in_flight":
        assert guard.decide(intent("first"), size=sized()).accepted
    elif setup == "cooldown":
        guard.start_cooldown("BTCUSDT", "LONG")
    elif setup == "max_positions":
        open_position(guard, "8", "ETHUSDT", "LONG")
        open_position(guard, "9", "ETHUSDT", "SHORT")
    decision = guard.decide(the_intent, size=sized())
    assert not decision.accepted
    assert decision.reason == reason
    assert decision.detail
    assert guard.store.intent_decisions(the_intent.intent_id)[-1]["reason"] == reason
    assert guard.store.counters("intents_rejected")[reason] == 1


def test_hedge_allows_other_leg_one_way_does_not() -> None:
    hedge = make_guard("hedge")
    open_position(hedge, "9", "BTCUSDT", "LONG")
    assert hedge.decide(intent("s", side="SELL"), size=sized()).accepted
    one_way = make_guard("one-way")
    open_position(one_way, "9", "BTCUSDT", "LONG")
    decision = one_way.decide(intent("s", side="SELL"), size=sized())
    assert decision.reason == "position_open"
    one_way.store.update_position("9", status="closed")
    one_way.start_cooldown("BTCUSDT", "LONG")
    assert one_way.decide(intent("t", side="SELL"), size=sized()).reason == "cooldown"


def test_cooldown_expires() -> None:
    guard = make_guard(cooldown_ms=1_000)
    guard.start_cooldown("BTCUSDT", "LONG")
    assert guard.decide(intent("a"), size=sized()).reason == "cooldown"
    guard.clock[0] += 1_001  # type: ignore[attr-defined]
    later = parse_intent(
        {"id": "b", "symbol": "BTCUSDT", "side": "BUY", "created_at_ms": NOW + 1_001},
        source="t",
        now_ms=NOW,
    )
    assert guard.decide(later, size=sized()).accepted


def test_fail_closed_until_state_known() -> None:
    guard = make_guard()
    guard.mark_state_unknown("user stream lost")
    decision = guard.decide(intent("a"), size=sized())
    assert (decision.reason, decision.detail) == ("state_unknown", "user stream lost")
    fresh = PositionGuard(Store.open(":memory:"), FakeRules(), clock=lambda: NOW)
    assert fresh.decide(intent("b"), size=sized()).reason == "state_unknown"
    guard.mark_state_known()
    assert guard.decide(intent("c"), size=sized()).accepted


def test_max_exposure_counts_open_and_reserved() -> None:
    guard = make_guard(max_total_exposure_usd=Decimal("400"))
    open_position(guard, "9", "ETHUSDT", "LONG")  # 0.005 * 30000 = 150
    assert guard.decide(intent("a"), size=sized("200")).accepted  # 150 + 200 <= 400
    decision = guard.decide(intent("b", side="SELL"), size=sized("60"))
    assert decision.reason == "max_exposure"
    assert "350" in decision.detail


def test_sizing_reason_is_the_decision() -> None:
    guard = make_guard()
    decision = guard.decide(
        intent("a"),
        size=lambda i, lev: SizeDecision(False, reason="insufficient_margin", detail="needs 50"),
    )
    assert (decision.reason, decision.detail) == ("insufficient_margin", "needs 50")
    assert guard.store.reservations() == []


def test_release_frees_the_leg() -> None:
    guard = make_guard()
    first = guard.decide(intent("a"), size=sized())
    assert guard.decide(intent("b"), size=sized()).reason == "entry_in_flight"
    guard.release(first.position_id or "")
    guard.store.update_position(first.position_id or "", status="closed")
    assert guard.decide(intent("c"), size=sized()).accepted


@pytest.mark.parametrize("hedge", [True, False])
async def test_concurrent_intents_for_one_symbol_exactly_one_accepted(hedge: bool) -> None:
    venue = FakeVenue(hedge=hedge)
    venue.gate = asyncio.Event()  # hold the entry in flight while the others are decided
    store = Store.open(":memory:")
    desk = TradingDesk(venue, store, FakeRules(), FakeEngine(), DeskConfig(), clock=lambda: NOW)
    await desk.refresh_mode()
    desk.guard.mark_state_known()
    tasks = [
        asyncio.create_task(desk.submit(intent(f"r{n}", side="BUY" if n % 2 else "SELL")))
        for n in range(6)
    ]
    for _ in range(20):
        await asyncio.sleep(0)
    venue.gate.set()
    decisions = await asyncio.gather(*tasks)
    accepted = [d for d in decisions if d.accepted]
    if hedge:
        assert len(accepted) == 2  # one per leg
    else:
        assert len(accepted) == 1
    assert {d.reason for d in decisions if not d.accepted} == {"entry_in_flight"}
    assert len([s for s in venue.sent if s.path == "/fapi/v1/order"]) == len(accepted)


def test_sizing_error_is_recorded_as_invalid() -> None:
    guard = make_guard()

    def broken(i: Intent, leverage: int) -> SizeDecision:
        raise ValueError("leverage 200 is above the symbol's maximum 125")

    decision = guard.decide(intent("a"), size=broken)
    assert (decision.accepted, decision.reason) == (False, "invalid")
    assert "leverage 200" in decision.detail
    assert guard.store.intent_decisions("a")[0]["reason"] == "invalid"
