"""The kill switch's latch in the journal, early refusals, and intents never lost (issue 17).

Item 1 (store side): a halt persists in the journal until cleared; the guard refuses entries
while it is set (``halted``), in both position modes. Item 12: duplicates are refused before
any sizing input is fetched; the JSONL offset advances with each decided line. Item 7: an
accepted intent whose entry was never sent is decided again when read again, never refused
as ``duplicate_intent``. Item 11: the journal is owner-only.
"""

from __future__ import annotations

import json
import stat
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from fake_venue import FakeRules

from pyquant.trading.guard import GuardConfig, GuardDecision, PositionGuard
from pyquant.trading.intents import Intent, IntentError, parse_intent
from pyquant.trading.journal import UNSENT_ENTRY_DETAIL, OrderRecord, Store
from pyquant.trading.sizing import SizeDecision
from pyquant.trading.sources import follow_jsonl

NOW = 1_700_000_000_000


def intent(intent_id: str, side: str = "BUY") -> Intent:
    payload = {"id": intent_id, "symbol": "BTCUSDT", "side": side, "created_at_ms": NOW}
    return parse_intent(payload, source="test", now_ms=NOW)


def make_guard(store: Store, mode: str) -> PositionGuard:
    guard = PositionGuard(store, FakeRules(), GuardConfig(), clock=lambda: NOW)
    guard.set_mode(mode)  # type: ignore[arg-type]
    guard.mark_state_known()
    return guard


def sized(i: Intent, leverage: int) -> SizeDecision:
    return SizeDecision(True, quantity="0.005", notional=Decimal(150))


MODES = ["one-way", "hedge"]


def test_halt_latches_until_cleared(tmp_path: Path) -> None:
    path = tmp_path / "state" / "pyquant.sqlite"
    store = Store.open(path)
    assert store.halt() is None
    first = store.set_halt("flatten requested", "pyquant flatten pid 7")
    again = store.set_halt("SIGUSR1", "daemon pid 8")
    assert again == first  # one active halt; the first reason stands
    # another connection on the same file (another process) sees it at once
    other = Store.open(path)
    seen = other.halt()
    assert seen is not None
    assert (seen.reason, seen.set_by) == ("flatten requested", "pyquant flatten pid 7")
    store.record_flatten(first.halt_id, "2 step(s), 0 failed")
    flattened = other.halt()
    assert flattened is not None
    assert flattened.flatten_result == "2 step(s), 0 failed"
    store.close()
    # it outlives the process that set it
    reopened = Store.open(path)
    assert reopened.halt() is not None
    cleared = reopened.clear_halt("pyquant resume")
    assert cleared is not None
    assert cleared.cleared_by == "pyquant resume"
    assert reopened.halt() is None
    assert other.halt() is None
    assert reopened.clear_halt("pyquant resume") is None
    # a new halt after a resume is a new latch
    assert reopened.set_halt("again", "test").halt_id == first.halt_id + 1


@pytest.mark.parametrize("mode", MODES)
def test_guard_refuses_entries_while_halted(mode: str) -> None:
    store = Store.open(":memory:")
    guard = make_guard(store, mode)
    store.set_halt("kill switch", "test")
    refused = guard.decide(intent("h1"), size=sized)
    assert (refused.accepted, refused.reason) == (False, "halted")
    assert "pyquant resume" in refused.detail
    assert store.reservations() == []
    assert store.intent_decisions("h1")[0]["reason"] == "halted"
    store.clear_halt("test")
    assert guard.decide(intent("h2"), size=sized).accepted


@pytest.mark.parametrize("mode", MODES)
def test_refuse_early_needs_no_sizing_inputs(mode: str) -> None:
    store = Store.open(":memory:")
    guard = make_guard(store, mode)
    assert guard.refuse_early(intent("e1")) is None  # nothing to refuse: decide goes on
    assert guard.decide(intent("e1"), size=sized).accepted
    duplicate = guard.refuse_early(intent("e1"))
    assert duplicate is not None
    assert duplicate.reason == "duplicate_intent"
    store.set_halt("kill switch", "test")
    halted = guard.refuse_early(intent("e2", side="SELL"))
    assert halted is not None
    assert halted.reason == "halted"
    reasons = [row["reason"] for row in store.intent_decisions()]
    assert reasons == ["accepted", "duplicate_intent", "halted"]


def accept_and_lose_the_entry(store: Store, guard: PositionGuard, the_intent: Intent) -> str:
    decision = guard.decide(the_intent, size=sized)
    assert decision.accepted
    assert decision.position_id is not None
    # what recovery does at the next start for an entry that was never sent
    guard.release(decision.position_id)
    store.update_position(
        decision.position_id,
        status="closed",
        closed_at_ms=NOW,
        close_reason=f"entry_failed: {UNSENT_ENTRY_DETAIL}",
    )
    return decision.position_id


@pytest.mark.parametrize("mode", MODES)
def test_accepted_intent_whose_entry_was_never_sent_is_decided_again(mode: str) -> None:
    store = Store.open(":memory:")
    guard = make_guard(store, mode)
    accept_and_lose_the_entry(store, guard, intent("lost"))
    again = guard.decide(intent("lost"), size=sized)
    assert (again.accepted, again.reason) == (True, "accepted")
    # once executed (its entry order written before sending), a resend is a duplicate
    assert again.position_id is not None
    store.insert_order(
        OrderRecord(
            client_order_id="pq-lost-e0-0",
            kind="entry",
            position_id=again.position_id,
            symbol="BTCUSDT",
            position_side=intent("lost").position_side,
            side="BUY",
            sequence=0,
            attempt=0,
            params={},
            status="NEW",
            reason="entry",
        )
    )
    third = guard.decide(intent("lost"), size=sized)
    assert third.reason == "duplicate_intent"


def test_unsent_intent_read_too_late_is_expired_with_a_reason() -> None:
    store = Store.open(":memory:")
    clock = [NOW]
    guard = PositionGuard(
        store, FakeRules(), GuardConfig(max_age_ms=60_000), clock=lambda: clock[0]
    )
    guard.set_mode("hedge")
    guard.mark_state_known()
    accept_and_lose_the_entry(store, guard, intent("late"))
    clock[0] = NOW + 120_000
    expired = guard.decide(intent("late"), size=sized)
    assert (expired.accepted, expired.reason) == (False, "stale")
    assert [r["reason"] for r in store.intent_decisions("late")] == ["accepted", "stale"]


class GuardSink:
    """Decides with a real guard; "dies" (like kill -9) right after accepting ``die_on``."""

    def __init__(self, guard: PositionGuard, die_on: str | None = None) -> None:
        self.guard = guard
        self.die_on = die_on
        self.decisions: list[tuple[str, str]] = []
        self.sizing_calls = 0

    async def submit(self, the_intent: Intent, *, payload: object = None) -> GuardDecision:
        early = self.guard.refuse_early(the_intent, payload=payload)
        if early is not None:
            self.decisions.append((the_intent.intent_id, early.reason))
            return early

        def size(i: Intent, leverage: int) -> SizeDecision:
            self.sizing_calls += 1  # stands for the mark and account REST reads
            return sized(i, leverage)

        decision = self.guard.decide(the_intent, size=size, payload=payload)
        self.decisions.append((the_intent.intent_id, decision.reason))
        if the_intent.intent_id == self.die_on:
            raise KeyboardInterrupt  # killed after acceptance, before the entry is sent
        return decision

    def reject_malformed(self, source: str, payload: object, error: IntentError | str) -> None:
        self.guard.store.record_malformed_intent(source, payload, "invalid", str(error))


@pytest.mark.parametrize("mode", MODES)
async def test_jsonl_intent_killed_before_its_entry_is_executed_after_restart(
    tmp_path: Path, mode: str
) -> None:
    path = tmp_path / "intents.jsonl"
    lines = [
        {"id": "k1", "symbol": "BTCUSDT", "side": "BUY", "created_at_ms": NOW},
        {"id": "k2", "symbol": "ETHUSDT", "side": "BUY", "created_at_ms": NOW},
        {"id": "k3", "symbol": "BTCUSDT", "side": "SELL", "created_at_ms": NOW},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    store = Store.open(tmp_path / "pyquant.sqlite")
    guard = make_guard(store, mode)
    dying = GuardSink(guard, die_on="k2")
    with pytest.raises(KeyboardInterrupt):
        await follow_jsonl(dying, path, follow=False, store=store, clock=lambda: NOW)
    assert dying.decisions == [("k1", "accepted"), ("k2", "accepted")]
    # restart: recovery finds k2's position opening with no entry order and closes it
    (opening,) = [p for p in store.positions(("opening",)) if p.intent_id == "k2"]
    guard.release(opening.position_id)
    store.update_position(
        opening.position_id, status="closed", close_reason=f"entry_failed: {UNSENT_ENTRY_DETAIL}"
    )
    restarted = GuardSink(make_guard(store, mode))
    await follow_jsonl(restarted, path, follow=False, store=store, clock=lambda: NOW)
    # k1 was decided and its offset saved: not read again; k2 is executed now, then k3
    # (whose BTCUSDT short is refused in one-way mode: k1's long holds the symbol)
    k3 = "accepted" if mode == "hedge" else "entry_in_flight"
    assert restarted.decisions == [("k2", "accepted"), ("k3", k3)]


async def test_duplicates_read_again_cost_no_sizing_inputs(tmp_path: Path) -> None:
    path = tmp_path / "intents.jsonl"
    path.write_text(
        "".join(
            json.dumps({"id": f"d{i}", "symbol": "BTCUSDT", "side": "BUY", "created_at_ms": NOW})
            + "\n"
            for i in range(5)
        )
    )
    store = Store.open(":memory:")
    first = GuardSink(make_guard(store, "hedge"))
    await follow_jsonl(first, path, follow=False, clock=lambda: NOW)  # no store: no offset
    sizing_before = first.sizing_calls
    again = GuardSink(make_guard(store, "hedge"))
    await follow_jsonl(again, path, follow=False, clock=lambda: NOW)
    assert [reason for _, reason in again.decisions] == ["duplicate_intent"] * 5
    assert again.sizing_calls == 0
    assert sizing_before >= 1


def test_journal_files_are_owner_only(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = Store.open(state / "pyquant.sqlite")
    store.set_meta("k", "v")
    for name in ("pyquant.sqlite", "pyquant.sqlite-wal", "pyquant.sqlite-shm"):
        mode: Any = stat.S_IMODE((state / name).stat().st_mode)
        assert mode == 0o600, (name, oct(mode))
    store.close()
    # an older, world-readable journal is tightened when opened
    (state / "pyquant.sqlite").chmod(0o644)
    Store.open(state / "pyquant.sqlite").close()
    assert stat.S_IMODE((state / "pyquant.sqlite").stat().st_mode) == 0o600


def test_state_dir_created_owner_only_and_an_open_one_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from pyquant.trading.journal import secure_state_dir

    fresh = tmp_path / "a" / "state"
    secure_state_dir(fresh)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with caplog.at_level("WARNING", logger="pyquant.trading.journal"):
        secure_state_dir(shared)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755  # the user's directory is not changed
    assert "open to other users" in caplog.text
