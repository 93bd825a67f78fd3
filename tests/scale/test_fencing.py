"""Lease fencing: a daemon cut off from Redis stops sending orders before a peer can hold its
symbol, and sends again only once it holds the lease again.

alpha reaches Redis through a proxy the test turns into a black hole; beta reaches it directly.
Each has its own order router (``send_gate`` = its lease manager's ``may_send``) and keeps
trying to send an exit for BTCUSDT every few milliseconds, as an exit engine re-emitting a
refused action does. One log records every order that reached the exchange, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

redis_asyncio = pytest.importorskip("redis.asyncio")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trading"))
from fake_venue import FakeRules, FakeVenue  # noqa: E402
from tcp_proxy import BlackholeProxy  # noqa: E402

from pyquant.errors import ConfigError  # noqa: E402
from pyquant.scale.leases import LeaseConfig, LeaseManager  # noqa: E402
from pyquant.trading.journal import Store  # noqa: E402
from pyquant.trading.router import OrderRouter, OrderState  # noqa: E402

TTL_MS = 1500
SYMBOL = "BTCUSDT"


class LoggingVenue(FakeVenue):
    """A fake exchange that writes each order it receives to a log shared by both daemons."""

    def __init__(self, name: str, log: list[tuple[str, float]]) -> None:
        super().__init__(hedge=True)
        self.name = name
        self.log = log

    async def new_order(self, params: Mapping[str, str]) -> dict[str, Any]:
        self.log.append((self.name, time.monotonic()))
        return await super().new_order(params)


async def _no_sleep(_: float) -> None:
    return None


def router_for(name: str, leases: LeaseManager, log: list[tuple[str, float]]) -> OrderRouter:
    store = Store.open(":memory:")
    router = OrderRouter(LoggingVenue(name, log), store, FakeRules(), sleep=_no_sleep)  # type: ignore[arg-type]
    router.send_gate = leases.may_send
    return router


async def keep_exiting(router: OrderRouter, stop: asyncio.Event, fenced: list[int]) -> None:
    sequence = 0
    while not stop.is_set():
        sequence += 1
        outcome = await router.send_exit(
            "p1", SYMBOL, "LONG", "0.010", sequence=sequence, reason="stop_loss"
        )
        if outcome.skipped and outcome.error_msg == "lease_fenced":
            assert outcome.state == OrderState.REJECTED
            fenced[0] += 1
        await asyncio.sleep(0.005)


def senders_after(log: list[tuple[str, float]], start: int) -> list[str]:
    return [name for name, _ in log[start:]]


async def test_a_daemon_cut_off_from_redis_stops_sending_before_its_peer_takes_over(
    redis_server, wait_until
):
    proxy = BlackholeProxy(redis_server.port)
    await proxy.start()
    via_proxy = redis_asyncio.from_url(
        f"redis://127.0.0.1:{proxy.port}/0", socket_timeout=0.3, socket_connect_timeout=0.3
    )
    direct = redis_asyncio.from_url(redis_server.url, socket_timeout=5)
    acquired_at: dict[str, list[float]] = {"alpha": [], "beta": []}

    def recorder(name: str):
        async def on_acquire(symbol: str, reason: str) -> None:
            acquired_at[name].append(time.monotonic())

        return on_acquire

    alpha = LeaseManager(
        via_proxy,
        LeaseConfig(daemon_id="alpha", account="main", ttl_ms=TTL_MS, balance=False),
        on_acquire=recorder("alpha"),
    )
    beta = LeaseManager(
        direct,
        LeaseConfig(daemon_id="beta", account="main", ttl_ms=TTL_MS, balance=False),
        on_acquire=recorder("beta"),
    )
    log: list[tuple[str, float]] = []
    stop = asyncio.Event()
    fenced = {"alpha": [0], "beta": [0]}
    routers = {"alpha": router_for("alpha", alpha, log), "beta": router_for("beta", beta, log)}
    tasks: list[asyncio.Task[None]] = []
    try:
        for manager in (alpha, beta):
            await manager.register()
        assert await alpha.want(SYMBOL)
        tasks = [asyncio.create_task(m.run()) for m in (alpha, beta)]
        tasks += [
            asyncio.create_task(keep_exiting(routers[n], stop, fenced[n]))
            for n in ("alpha", "beta")
        ]
        # alpha owns the symbol: only alpha's orders reach the exchange.
        await wait_until(lambda: len(log) >= 5 and fenced["beta"][0] >= 5)
        assert set(senders_after(log, 0)) == {"alpha"}

        proxy.block()
        blocked_at = len(log)
        await wait_until(lambda: "beta" in senders_after(log, blocked_at), timeout_s=20)
        first_beta = next(i for i, (n, _) in enumerate(log) if n == "beta")
        # Everything alpha sent went out before beta held the lease; nothing of alpha after.
        last_alpha_time = max(t for n, t in log[:first_beta] if n == "alpha")
        assert last_alpha_time < acquired_at["beta"][0]
        assert alpha.owned() == {SYMBOL}  # it still thinks it owns it: its exits stay armed
        assert not alpha.may_send(SYMBOL)
        assert fenced["alpha"][0] > 0

        # Back on the network: alpha learns the lease is beta's and stays silent.
        proxy.unblock()
        await wait_until(lambda: alpha.owned() == frozenset(), timeout_s=20)
        beta_sent = len(log)
        await wait_until(lambda: len(log) >= beta_sent + 5)
        assert "alpha" not in senders_after(log, first_beta)

        # beta gives the symbol up; alpha sends again only once it holds the lease again.
        await beta.stop()
        await wait_until(lambda: SYMBOL in alpha.owned(), timeout_s=20)
        handed = len(log)
        await wait_until(lambda: "alpha" in senders_after(log, handed), timeout_s=20)
        again = next(i for i, (n, _) in enumerate(log) if i >= first_beta and n == "alpha")
        # One sender at a time: alpha, then beta alone, then alpha alone.
        assert set(senders_after(log, first_beta)[: again - first_beta]) == {"beta"}
        assert set(senders_after(log, again)) == {"alpha"}
    finally:
        stop.set()
        await alpha.stop()
        await beta.stop()
        for task in tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 10)
        await proxy.close()
        await via_proxy.aclose()
        await direct.aclose()


async def test_may_send_closes_before_the_lease_can_lapse(redis_client):
    now = [1000.0]
    leases = LeaseManager(
        redis_client,
        LeaseConfig(daemon_id="alpha", account="main", ttl_ms=5000),
        clock=lambda: now[0],
    )
    await leases.register()
    assert await leases.want(SYMBOL)
    assert leases.may_send(SYMBOL)
    assert not leases.may_send("ETHUSDT")
    # Renewal started at 1000.0: the lease lapses in Redis at 1005.0 at the earliest. The gate
    # closes 10 % (drift) + 2 ms + 10 % (in flight) of the TTL before: at 1003.998.
    now[0] = 1003.99
    assert leases.may_send(SYMBOL)
    now[0] = 1004.0
    assert not leases.may_send(SYMBOL)
    assert leases.confirmed(SYMBOL)  # intents may still be routed here; orders may not
    assert await leases.want(SYMBOL)  # confirmed again
    assert leases.may_send(SYMBOL)


def test_send_margin_is_checked():
    assert LeaseConfig(daemon_id="a", ttl_ms=5000).send_margin_s == 0.5
    assert LeaseConfig(daemon_id="a", ttl_ms=5000, send_margin_ms=0).send_margin_s == 0.0
    with pytest.raises(ConfigError, match=r"lease.send_margin_ms was 3000: must be from 0 to"):
        LeaseConfig(daemon_id="a", ttl_ms=5000, send_margin_ms=3000)


async def test_a_fenced_router_sends_no_entry_and_moves_no_backstop():
    open_gate = [False]
    store = Store.open(":memory:")
    venue = FakeVenue(hedge=True)
    router = OrderRouter(venue, store, FakeRules(), sleep=_no_sleep)  # type: ignore[arg-type]
    router.send_gate = lambda symbol: open_gate[0] and symbol == SYMBOL
    outcome = await router.send_entry("p1", SYMBOL, "LONG", "0.010")
    assert (outcome.state, outcome.skipped, outcome.error_msg) == (
        OrderState.REJECTED,
        True,
        "lease_fenced",
    )
    assert await router.backstops.update_backstop("p1", SYMBOL, "LONG", "29000.0") is None
    assert venue.sent == []
    assert store.orders(position_id="p1") == []
    open_gate[0] = True
    assert (await router.send_entry("p1", SYMBOL, "LONG", "0.010")).state == OrderState.FILLED
    placed = await router.backstops.update_backstop("p1", SYMBOL, "LONG", "29000.0")
    assert placed is not None
    # Fenced again: the backstop in place stays, nothing new is sent.
    open_gate[0] = False
    assert (
        await router.backstops.update_backstop("p1", SYMBOL, "LONG", "29500.0", force=True)
        == placed
    )
    assert [s.path for s in venue.sent] == ["/fapi/v1/order", "/fapi/v1/algoOrder"]
