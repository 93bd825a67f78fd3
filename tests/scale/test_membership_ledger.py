"""The daemon's side of the account-wide ledger: reserve at the gate, settle on the fill,
release on a failed entry and on close, fail closed without Redis, rebuild by sync."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from decimal import Decimal
from types import SimpleNamespace

import pytest

pytest.importorskip("redis.asyncio")

from pyquant.scale.bus import RedisBusConfig
from pyquant.scale.membership import Membership
from pyquant.trading.guard import GuardConfig, GuardDecision
from pyquant.trading.intents import Intent

LEDGER = "pyquant:main:ledger"


@dataclass
class Row:
    position_id: str
    symbol: str
    position_side: str
    status: str
    quantity: str
    entry_price: str | None


@dataclass
class Store:
    rows: list[Row] = field(default_factory=list)

    def positions(self, statuses: tuple[str, ...]) -> list[Row]:
        return [r for r in self.rows if r.status in statuses]


class Intake:
    async def submit(self, intent: Intent, *, payload: object = None) -> object:
        raise AssertionError("not called")

    def reject_malformed(self, source: str, payload: object, error: str) -> None:
        raise AssertionError("not called")


def intent(symbol: str, side: str = "BUY") -> Intent:
    return Intent(f"i-{symbol}", symbol, side, 0.8, 1, "test")  # type: ignore[arg-type]


def accepted(position_id: str, notional: str) -> GuardDecision:
    return GuardDecision(True, "accepted", position_id=position_id, notional=Decimal(notional))


def member_for(url: str, store: Store, mode: str = "hedge") -> Membership:
    member = Membership(
        RedisBusConfig.from_url(f"{url}?daemon=alpha&account=main&lease_ttl_ms=5000"), Intake()
    )
    desk = SimpleNamespace(
        store=store,
        router=SimpleNamespace(),
        guard=SimpleNamespace(mode=mode),
        config=SimpleNamespace(
            guard=GuardConfig(max_open_positions=2, max_total_exposure_usd=Decimal(300))
        ),
    )
    member.attach(desk)  # type: ignore[arg-type]
    return member


async def settle_tasks(member: Membership) -> None:
    while member._ledger_tasks:
        await asyncio.gather(*list(member._ledger_tasks))


async def test_gate_reserves_notes_settle_and_release(redis_server, redis_client):
    store = Store()
    member = member_for(redis_server.url, store)
    assert member.bus.leases is not None
    await member.bus.leases.register()
    try:
        assert await member.bus.leases.want("BTCUSDT")
        assert await member.entry_gate(intent("BTCUSDT"), accepted("1", "200")) is None
        assert await member.entry_gate(intent("ETHUSDT"), accepted("2", "150")) == (
            "max_exposure: account-wide exposure 200 + 150 > 300 USDT"
        )
        assert await member.entry_gate(intent("SOLUSDT", "SELL"), accepted("3", "50")) is None
        assert await member.entry_gate(intent("XRPUSDT"), accepted("4", "1")) == (
            "max_positions: account-wide 2 of 2 legs in use"
        )
        assert member.has_position("BTCUSDT")  # an entry in flight counts
        assert not member.has_position("ETHUSDT")

        # The fill settles the real notional; a failed entry and a close release their legs.
        note = member.desk.on_note  # type: ignore[union-attr]
        note(
            {
                "kind": "entry",
                "position_id": "1",
                "symbol": "BTCUSDT",
                "side": "LONG",
                "quantity": "0.002",
                "price": "60000",
            }
        )
        note({"kind": "entry_failed", "position_id": "3", "detail": "x"})
        await settle_tasks(member)
        assert await redis_client.hgetall(LEDGER) == {b"BTCUSDT|LONG": b"1|alpha|120000000"}
        note(
            {
                "kind": "closed",
                "position_id": "1",
                "symbol": "BTCUSDT",
                "position_side": "LONG",
                "reason": "take_profit",
            }
        )
        await settle_tasks(member)
        assert await redis_client.hgetall(LEDGER) == {}

        # Redis lost the ledger: the sync rebuilds the owned symbol from the journal.
        store.rows = [Row("7", "BTCUSDT", "LONG", "open", "0.001", "61000")]
        await member.sync_ledger()
        assert await redis_client.hgetall(LEDGER) == {b"BTCUSDT|LONG": b"7|alpha|61000000"}
    finally:
        await member.bus.redis.aclose()


async def test_the_gate_fails_closed_without_redis():
    member = member_for("redis://127.0.0.1:1/0", Store())
    refused = await member.entry_gate(intent("BTCUSDT"), accepted("1", "10"))
    assert refused is not None
    assert refused.startswith("account_limits_unreachable: Redis did not answer")
    assert member._reserved == {}
    await member.bus.redis.aclose()
