"""Leases come back when a daemon joins or returns, through the hand-over; idle ones go."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import pytest

redis_asyncio = pytest.importorskip("redis.asyncio")

from pyquant.scale.leases import LeaseConfig, LeaseManager, _rendezvous  # noqa: E402

TTL_MS = 600
SYMBOLS = [f"S{i}USDT" for i in range(12)]
BUSY = {"S0USDT", "S1USDT", "S2USDT", "S3USDT", "S4USDT", "S5USDT"}


@dataclass
class Recorder:
    acquired: list[tuple[str, str]] = field(default_factory=list)
    lost: list[tuple[str, str]] = field(default_factory=list)

    async def on_acquire(self, symbol: str, reason: str) -> None:
        self.acquired.append((symbol, reason))

    async def on_lose(self, symbol: str, reason: str) -> None:
        self.lost.append((symbol, reason))


def manager(client, daemon_id: str, recorder: Recorder, **kw: object) -> LeaseManager:
    return LeaseManager(
        client,
        LeaseConfig(daemon_id=daemon_id, account="main", ttl_ms=TTL_MS, **kw),  # type: ignore[arg-type]
        on_acquire=recorder.on_acquire,
        on_lose=recorder.on_lose,
        has_position=lambda symbol: symbol in BUSY,
    )


@contextlib.asynccontextmanager
async def running(m: LeaseManager):
    await m.register()
    task = asyncio.create_task(m.run())
    try:
        yield task
    finally:
        await m.stop()
        await asyncio.wait_for(task, 10)


async def test_a_returning_daemon_gets_its_symbols_back_one_owner_at_a_time(
    redis_client, wait_until
):
    ra, rb = Recorder(), Recorder()
    alpha = manager(redis_client, "alpha", ra, idle_release_ms=None)
    beta = manager(redis_client, "beta", rb, idle_release_ms=None)
    expected_beta = {s for s in SYMBOLS if _rendezvous({"alpha", "beta"}, s) == "beta"}
    assert 3 <= len(expected_beta) <= 9  # the premise: both get some
    overlaps: list[str] = []
    sampling = True

    async def sample() -> None:
        while sampling:
            overlaps.extend(s for s in SYMBOLS if alpha.may_send(s) and beta.may_send(s))
            await asyncio.sleep(0.002)

    async with running(alpha):
        for symbol in SYMBOLS:  # alpha took everything over while beta was away
            assert await alpha.want(symbol)
        sampler = asyncio.create_task(sample())
        async with running(beta):
            await wait_until(lambda: beta.owned() == expected_beta, timeout_s=30)
            await wait_until(lambda: alpha.owned() == set(SYMBOLS) - expected_beta, 10)
            await wait_until(lambda: len(rb.acquired) == len(expected_beta))
            await wait_until(lambda: len(ra.lost) == len(expected_beta))
            busy_moved = [s for s, r in rb.acquired if s in BUSY]
            assert {r for _, r in rb.acquired} == {"handed"}
            assert {(s, "rebalance") for s in expected_beta} == set(ra.lost)
            # Settled: nothing moves back and forth.
            before = (len(ra.lost), len(rb.lost))
            await asyncio.sleep(3 * TTL_MS / 1000)
            assert (len(ra.lost), len(rb.lost)) == before
        sampling = False
        await sampler
    assert overlaps == []
    assert set(busy_moved) == expected_beta & BUSY


async def test_idle_symbols_are_released_and_forgotten(redis_client, wait_until):
    recorder = Recorder()
    # Idle after 5 TTLs: a loaded machine stalling between want() and route() must not
    # make S10USDT idle (released, then taken again) before its intent arrives.
    alpha = manager(redis_client, "alpha", recorder, idle_release_ms=5 * TTL_MS)
    async with running(alpha):
        for symbol in ("S0USDT", "S9USDT", "S10USDT"):
            assert await alpha.want(symbol)
        assert (await alpha.route("S10USDT")).kind == "mine"
        # The count moves once a release has finished in Redis too (`owned()` changes at
        # its start, before the lease and the account's set are updated).
        await wait_until(lambda: alpha.stats.idle_released >= 2, timeout_s=30)
        assert alpha.owned() == {"S0USDT"}
        assert await redis_client.smembers("pyquant:main:symbols") == {b"S0USDT"}
        assert await redis_client.get("pyquant:main:lease:S9USDT") is None
        assert alpha.stats.idle_released == 2
