"""Parts of the kill switch and the intake (issue 17): the sweep, the state lock, mark cache."""

from __future__ import annotations

import json
import multiprocessing
import os
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from pyquant.daemon.state_lock import StateLock, StateLocked
from pyquant.errors import OrderRejected, RetryableError
from pyquant.trading.killswitch import is_pyquant_order, sweep_account
from pyquant.trading.marks import MarkCache


class SweepVenue:
    """Open orders and algo orders of an account; cancels fail as scripted."""

    def __init__(self, failures: dict[str, list[Exception]]) -> None:
        self.orders = [
            {"symbol": "BTCUSDT", "clientOrderId": "pqab12-3-e0-0", "type": "LIMIT"},
            {"symbol": "ETHUSDT", "clientOrderId": "web_manual_1", "type": "LIMIT"},
        ]
        self.algo = [
            {"symbol": "ETHUSDT", "clientAlgoId": "manual-stop", "orderType": "STOP_MARKET"},
            {"symbol": "SOLUSDT", "clientAlgoId": "pqzz99-7-b0-0", "orderType": "STOP_MARKET"},
        ]
        self.positions: list[dict[str, Any]] = [
            {"symbol": "ETHUSDT", "positionSide": "BOTH", "positionAmt": "0"}
        ]
        self.failures = failures
        self.calls: list[str] = []

    async def open_orders(self, symbol: str | None = None) -> list[Any]:
        return list(self.orders)

    async def open_algo_orders(self, symbol: str | None = None) -> list[Any]:
        return list(self.algo)

    def _fail(self, cid: str) -> None:
        self.calls.append(cid)
        pending = self.failures.get(cid)
        if pending:
            error = pending.pop(0)
            if isinstance(error, OrderRejected):  # "unknown order": gone meanwhile
                self.orders = [o for o in self.orders if o["clientOrderId"] != cid]
                self.algo = [o for o in self.algo if o["clientAlgoId"] != cid]
            raise error

    async def cancel_order(self, symbol: str, client_order_id: str) -> Any:
        self._fail(client_order_id)
        self.orders = [o for o in self.orders if o["clientOrderId"] != client_order_id]
        return {}

    async def cancel_algo_order(self, symbol: str, client_algo_id: str) -> Any:
        self._fail(client_algo_id)
        self.algo = [o for o in self.algo if o["clientAlgoId"] != client_algo_id]
        return {}

    async def position_risk(self) -> list[Any]:
        return self.positions


async def no_sleep(seconds: float) -> None:
    return None


async def test_sweep_cancels_every_order_and_retries_retryable_failures() -> None:
    venue = SweepVenue(
        {
            "manual-stop": [RetryableError(-1003, "Too many requests", http_status=429)] * 2,
            "pqzz99-7-b0-0": [OrderRejected(-2011, "Unknown order sent.")],
        }
    )
    report = await sweep_account(venue, sleep=no_sleep)
    assert [(s.client_id, s.ok, s.ours) for s in report.steps] == [
        ("pqab12-3-e0-0", True, True),
        ("web_manual_1", True, False),
        ("manual-stop", True, False),
        ("pqzz99-7-b0-0", True, True),
    ]
    assert venue.calls.count("manual-stop") == 3
    assert report.steps[3].detail == "already gone (-2011)"
    assert report.left_open == []
    assert report.failed == 0


async def test_sweep_reports_what_it_could_not_cancel_and_what_is_left() -> None:
    venue = SweepVenue({"manual-stop": [RetryableError(-1007, "Timeout")] * 10})
    venue.positions.append({"symbol": "BTCUSDT", "positionSide": "SHORT", "positionAmt": "-0.05"})
    report = await sweep_account(venue, attempts=3, sleep=no_sleep)
    failed = [s for s in report.steps if not s.ok]
    assert [(s.client_id, s.detail) for s in failed] == [
        ("manual-stop", "-1007: Timeout (after 3 attempts)")
    ]
    assert report.left_open == [
        "algo order ETHUSDT STOP_MARKET manual-stop",
        "position BTCUSDT SHORT -0.05",
    ]


async def test_sweep_ours_only_leaves_others_and_says_so() -> None:
    venue = SweepVenue({})
    report = await sweep_account(venue, ours_only=True, sleep=no_sleep)
    assert [s.client_id for s in report.steps] == ["pqab12-3-e0-0", "pqzz99-7-b0-0"]
    assert report.left_open == [
        "order ETHUSDT LIMIT web_manual_1",
        "algo order ETHUSDT STOP_MARKET manual-stop",
    ]


@pytest.mark.parametrize(
    ("cid", "ours"),
    [("pqab12-3-e0-0", True), ("pqab12-", False), ("pq-1-e0-0", False), ("xpqab12-1", False)],
)
def test_pyquant_order_ids(cid: str, ours: bool) -> None:
    assert is_pyquant_order(cid) is ours


def _hold(path: str, ready: Any, release: Any) -> None:
    lock = StateLock(Path(path))
    lock.acquire()
    ready.set()
    release.wait(30)


def test_state_lock_names_the_live_holder_and_frees_on_exit(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        lock = StateLock(tmp_path)
        assert lock.holder() == holder.pid
        with pytest.raises(StateLocked, match=f"in use by process {holder.pid}") as caught:
            lock.acquire()
        assert caught.value.pid == holder.pid
    finally:
        release.set()
        holder.join(30)
    # the holder is gone (its pid stays in the file): the lock is free
    lock = StateLock(tmp_path)
    assert lock.holder() is None
    with lock:
        assert (tmp_path / "daemon.lock").read_text().strip() == str(os.getpid())


def mark_message(symbol: str, price: str, event_ms: int) -> bytes:
    return json.dumps({"e": "markPriceUpdate", "E": event_ms, "s": symbol, "p": price}).encode()


def test_mark_cache_reads_every_stream_shape_and_expires() -> None:
    now = [100.0]
    marks = MarkCache(max_age_s=5, clock=lambda: now[0])
    assert marks.get("BTCUSDT") is None
    marks.feed(mark_message("BTCUSDT", "30000.10", 1))
    array = [json.loads(mark_message("ETHUSDT", "2500.01", 2))]
    marks.feed(json.dumps(array).encode())
    marks.feed(json.dumps({"stream": "x", "data": json.loads(mark_message("SOLUSDT", "150", 3))}))
    marks.feed(b"{not json")
    marks.feed(mark_message("BTCUSDT", "29999.90", 0 + 5))
    marks.feed(mark_message("BTCUSDT", "1.00", 4))  # older event arriving late: ignored
    assert marks.get("BTCUSDT") == Decimal("29999.90")
    assert marks.get("ETHUSDT") == Decimal("2500.01")
    assert marks.get("SOLUSDT") == Decimal("150")
    assert marks.malformed == 1
    now[0] += 6  # the stream went quiet: stale marks are not used (REST then)
    assert marks.get("BTCUSDT") is None


def test_mark_cache_backlog_is_bounded() -> None:
    marks = MarkCache(max_pending=4)
    for i in range(10):
        marks.feed(mark_message("BTCUSDT", f"{100 + i}", i))
    assert len(marks._pending) < 4
    assert marks.get("BTCUSDT") == Decimal(109)


async def test_wait_idle_waits_for_the_submission_not_the_source_task() -> None:
    # The kill switch waits for in-flight entries; the task that submitted them is a source
    # (a JSONL follower) that never ends. Waiting on that task hung the flatten.
    import asyncio

    from pyquant.daemon.app import Intake
    from pyquant.trading.guard import GuardDecision
    from pyquant.trading.intents import parse_intent

    release = asyncio.Event()

    class SlowDesk:
        async def submit(self, intent: object, *, payload: object = None) -> GuardDecision:
            await release.wait()
            return GuardDecision(True, "accepted", position_id="1")

    intake = Intake()
    intake.desk = SlowDesk()  # type: ignore[assignment]
    intake.open = True
    intent = parse_intent({"id": "w1", "symbol": "BTCUSDT", "side": "BUY"}, source="t", now_ms=1)
    follower_done = asyncio.Event()

    async def follower() -> None:
        await intake.submit(intent)
        await follower_done.wait()  # the source goes on reading after its submission

    task = asyncio.create_task(follower())
    await asyncio.sleep(0)
    assert intake.in_flight
    waiting = asyncio.create_task(intake.wait_idle())
    await asyncio.sleep(0)
    assert not waiting.done()
    release.set()
    await asyncio.wait_for(waiting, 10)
    assert not task.done()
    follower_done.set()
    await task
