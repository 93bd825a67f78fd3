"""Account-wide limits in Redis: never exceeded by racing daemons, released, rebuilt."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

redis_asyncio = pytest.importorskip("redis.asyncio")

from pyquant.errors import ConfigError  # noqa: E402
from pyquant.scale.limits import AccountLedger, LedgerLimits, micro_usdt  # noqa: E402

KEY = "pyquant:main:ledger"
SYMBOLS = [f"S{i}USDT" for i in range(8)]


def ledger(client, daemon: str, **limits: object) -> AccountLedger:
    return AccountLedger(client, KEY, daemon, LedgerLimits(**limits))  # type: ignore[arg-type]


async def test_three_daemons_racing_eight_symbols_never_exceed_the_account_limit(redis_server):
    clients = [redis_asyncio.from_url(redis_server.url) for _ in range(3)]
    try:
        daemons = [
            ledger(c, f"d{i}", max_positions=3, max_exposure_usd=Decimal("1000"))
            for i, c in enumerate(clients)
        ]
        results: list[tuple[str, str, object]] = []

        async def race(daemon: AccountLedger) -> None:
            for n, symbol in enumerate(SYMBOLS):
                refusal = await daemon.reserve(
                    symbol, "LONG", f"{daemon.daemon_id}-{n}", Decimal(100)
                )
                results.append((daemon.daemon_id, symbol, refusal))

        await asyncio.gather(*(race(d) for d in daemons))
        entries = await daemons[0].entries()
        assert len(entries) == 3
        accepted = [(d, s) for d, s, r in results if r is None]
        assert len(accepted) == 3
        # Each accepted reservation is the one recorded for its leg.
        assert {(e.daemon_id, e.field.split("|")[0]) for e in entries} == set(accepted)
        reasons = {str(r).split(":")[0] for _, _, r in results if r is not None}
        assert reasons <= {"max_positions", "leg_in_use"}
        # A close frees a slot for the next entry, on any daemon.
        first = entries[0]
        symbol = first.field.split("|")[0]
        assert await daemons[0].release(symbol, "LONG", "not-the-owner") is False
        owner = next(d for d in daemons if d.daemon_id == first.daemon_id)
        assert await owner.release(symbol, "LONG", first.position_id)
        free = next(s for s in SYMBOLS if s not in {e.field.split("|")[0] for e in entries})
        assert await daemons[2].reserve(free, "SHORT", "late", Decimal(100)) is None
        assert str(await daemons[1].reserve("XUSDT", "LONG", "x", Decimal(1))) == (
            "max_positions: account-wide 3 of 3 legs in use"
        )
    finally:
        for client in clients:
            await client.aclose()


async def test_exposure_limits_are_exact_and_a_retry_is_idempotent(redis_client):
    a = ledger(
        redis_client,
        "alpha",
        max_exposure_usd=Decimal("1000.000001"),
        max_symbol_exposure_usd=Decimal("600"),
    )
    assert await a.reserve("BTCUSDT", "LONG", "p1", Decimal("400.0000005")) is None
    assert await a.reserve("BTCUSDT", "LONG", "p1", Decimal("400.0000005")) is None  # retry
    refusal = await a.reserve("BTCUSDT", "SHORT", "p2", Decimal("200"))
    assert str(refusal) == "max_symbol_exposure: BTCUSDT exposure 400.000001 + 200 > 600 USDT"
    assert await a.reserve("ETHUSDT", "LONG", "p3", Decimal("600")) is None
    refusal = await a.reserve("SOLUSDT", "LONG", "p4", Decimal("0.000001"))
    assert str(refusal) == (
        "max_exposure: account-wide exposure 1000.000001 + 0.000001 > 1000.000001 USDT"
    )
    refusal = await ledger(redis_client, "beta").reserve("ETHUSDT", "LONG", "q1", Decimal(1))
    assert str(refusal) == "leg_in_use: ETHUSDT LONG is held by position p3 of daemon alpha"
    # The fill settles a smaller notional: room for more.
    assert await a.settle("ETHUSDT", "LONG", "p3", Decimal("500"))
    assert await a.reserve("SOLUSDT", "LONG", "p4", Decimal("100")) is None
    assert [(e.field, e.notional_micro) for e in await a.entries()] == [
        ("BTCUSDT|LONG", 400_000_001),
        ("ETHUSDT|LONG", 500_000_000),
        ("SOLUSDT|LONG", 100_000_000),
    ]


async def test_sync_rebuilds_the_owned_symbols_from_the_journal(redis_client):
    a = ledger(redis_client, "alpha")
    b = ledger(redis_client, "beta")
    assert await b.reserve("ETHUSDT", "LONG", "b1", Decimal(50)) is None  # beta's symbol
    assert await a.reserve("BTCUSDT", "LONG", "dead-1", Decimal(70)) is None  # stale
    assert await a.reserve("BTCUSDT", "SHORT", "inflight", Decimal(30)) is None
    deleted = await a.sync(
        ["BTCUSDT", "SOLUSDT"],
        {("SOLUSDT", "BOTH"): ("s1", Decimal("12.5")), ("ETHUSDT", "LONG"): ("x", Decimal(1))},
        keep=["inflight"],
    )
    assert deleted == 1
    assert [(e.field, e.position_id, e.daemon_id) for e in await a.entries()] == [
        ("BTCUSDT|SHORT", "inflight", "alpha"),
        ("ETHUSDT|LONG", "b1", "beta"),  # not in alpha's scope: untouched
        ("SOLUSDT|BOTH", "s1", "alpha"),
    ]
    # Redis lost everything: one sync per daemon brings it back.
    await redis_client.delete(KEY)
    await a.sync(["SOLUSDT"], {("SOLUSDT", "BOTH"): ("s1", Decimal("12.5"))}, keep=[])
    assert [e.notional_micro for e in await a.entries()] == [12_500_000]


def test_limits_are_checked():
    assert micro_usdt(Decimal("0.0000001")) == 1
    with pytest.raises(ConfigError, match=r"limits\.max_positions was -1"):
        LedgerLimits(max_positions=-1)
    with pytest.raises(ConfigError, match=r"limits\.max_exposure_usd was NaN"):
        LedgerLimits(max_exposure_usd=Decimal("NaN"))
