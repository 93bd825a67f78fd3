"""A real daemon reading intents from Redis: decisions, events, malformed floods, AOF restarts.

The daemon runs in-process against the simulator (manual clock), with
``sources.redis_url`` pointing at a redis-server this test starts on a free loopback port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
import pytest

redis_asyncio = pytest.importorskip("redis.asyncio")
jsonschema = pytest.importorskip("jsonschema")

# The daemon + simulator harness lives beside the integration tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from pq_harness import Running, run_daemon, simulator, until  # noqa: E402
from redis_server_proc import RedisServer  # noqa: E402

SCHEMA = json.loads(resources.files("pyquant.scale").joinpath("events.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
STREAM = "quantum:stream:trade.intent"
SYMBOL = "ETHUSDT"


def bus_url(server: RedisServer, daemon_id: str = "solo") -> str:
    return f"{server.url}?stream={STREAM}&group=pyquant&daemon={daemon_id}&lease_ttl_ms=1500"


def original_payload(**extra: str) -> dict[str, str]:
    """The original system's intent, as it writes it to the stream (flat fields)."""
    return {
        "symbol": SYMBOL,
        "side": "BUY",
        "confidence": "0.8",
        "leverage": "5",
        "position_size_usd": "500",
        "source": "quantum",
        **extra,
    }


async def events_of(client: Any) -> list[dict[str, Any]]:
    entries = await client.xrange("pyquant:events")
    return [orjson.loads(fields[b"event"]) for _, fields in entries]


@contextlib.asynccontextmanager
async def redis_daemon(
    tmp_path: Path, url: str, mode: str, marks: dict[str, str]
) -> AsyncIterator[Running]:
    """A daemon reading intents from ``url`` against a fresh simulator with these marks."""
    async with simulator(mode) as venue:
        for symbol, price in marks.items():
            await venue.set_mark(symbol, price)
        async with run_daemon(venue, tmp_path, sources={"redis_url": url}) as running:
            membership = running.daemon.membership
            assert membership is not None
            await until(membership.bus.ready.is_set, 10, "bus ready")
            yield running


async def wait_open(running: Running, count: int) -> None:
    store = running.daemon.desk.store  # type: ignore[union-attr]
    await until(lambda: len(store.positions(("open",))) >= count, 15, f"{count} open positions")


async def test_redis_intent_opens_position_and_every_step_is_published(
    tmp_path: Path, redis_server: RedisServer, client: Any
) -> None:
    async with redis_daemon(
        tmp_path, bus_url(redis_server), "hedge", {SYMBOL: "2500.00"}
    ) as running:
        venue, daemon = running.venue, running.daemon
        entry_id = (await client.xadd(STREAM, original_payload())).decode()
        await wait_open(running, 1)
        position = daemon.desk.store.positions(("open",))[0]
        assert (position.symbol, position.position_side) == (SYMBOL, "LONG")
        assert Decimal(position.quantity) == Decimal("0.2")  # 500 USDT at 2500.00
        assert daemon.membership.owned() == frozenset({SYMBOL})
        assert await client.get(f"pyquant:default:lease:{SYMBOL}") == b"solo"
        # acknowledged only after the decision: nothing pending for the group
        await until(lambda: daemon.membership.bus.intents.stats.decided == 1, 5, "ack")
        # an intent from another source (the Python API) is published by the daemon itself
        api = await daemon.submit({"id": "api-1", "symbol": SYMBOL, "side": "BUY"})
        assert (api.accepted, api.reason) == (False, "position_open")
        pending = await client.xpending(STREAM, "pyquant")
        assert pending["pending"] == 0

        await venue.step(1000)
        await venue.set_mark(SYMBOL, "2525.25")  # +1.01 %: take_profit_1 (30 %)
        store = daemon.desk.store
        await until(lambda: any(o.status == "FILLED" for o in store.orders(kind="exit")), 10, "tp1")
        await until(lambda: daemon.membership.events.stats.published >= 8, 10, "events flushed")
        # the exit state a peer would adopt from
        await daemon.membership.publish_exit_state()
        state = orjson.loads(await client.hget("pyquant:default:exitstate", f"{SYMBOL}|LONG"))
        assert state["entry_price"] == "2500.00" or Decimal(state["entry_price"]) == Decimal("2500")
        assert Decimal(state["original_quantity"]) == Decimal("0.2")
        assert Decimal(state["quantity"]) == Decimal("0.14")
        assert state["ladder_levels_done"] == "1"
        assert state["daemon_id"] == "solo"
        summary = await running.stop()
        assert summary["owned_symbols"] == [SYMBOL]  # as owned until the clean stop

    events = await events_of(client)
    for event in events:
        VALIDATOR.validate(event)
    kinds = [(e["type"], e["payload"].get("action") or e["payload"].get("status")) for e in events]
    decisions = [e for e in events if e["type"] == "decision"]
    assert len(decisions) == 2
    assert decisions[0]["payload"]["accepted"] is True
    assert decisions[0]["payload"]["stream_id"] == entry_id
    assert decisions[0]["payload"]["source"] == "quantum"
    assert {k: decisions[1]["payload"][k] for k in ("intent_id", "accepted", "reason")} == {
        "intent_id": "api-1",
        "accepted": False,
        "reason": "position_open",
    }
    assert "stream_id" not in decisions[1]["payload"]
    orders = [e["payload"] for e in events if e["type"] == "order"]
    assert {"kind": "entry", "status": "FILLED"}.items() <= next(
        o for o in orders if o["kind"] == "entry" and o["status"] == "FILLED"
    ).items()
    entry = next(o for o in orders if o["kind"] == "entry")
    assert entry["quantity"] == "0.200"
    assert entry["side"] == "BUY"
    assert entry["position_side"] == "LONG"
    assert any(o["kind"] == "backstop" and o.get("close_position") for o in orders)
    exits = [e["payload"] for e in events if e["type"] == "exit"]
    assert exits == [
        {
            "position_id": exits[0]["position_id"],
            "position_side": "LONG",
            "reason": "take_profit_1",
            "quantity": "0.060",
        }
    ]
    fills = [e["payload"] for e in events if e["type"] == "fill"]
    assert [(f["side"], f["quantity"]) for f in fills] == [("BUY", "0.200"), ("SELL", "0.060")]
    assert ("position", "opened") in kinds
    assert ("lease", "acquired") in kinds
    assert ("lease", "released") in kinds  # clean stop hands the symbol back at once
    assert kinds[-1] == ("daemon", "stopped")


async def test_malformed_flood_is_rejected_entry_by_entry_and_the_daemon_goes_on(
    tmp_path: Path, redis_server: RedisServer, client: Any
) -> None:
    bad_entries: list[dict[str, str]] = [
        {"symbol": SYMBOL, "side": "HOLD"},
        {"symbol": "eth usdt", "side": "BUY"},
        {"side": "BUY"},
        {"data": "{not json"},
        {"data": "[1, 2]"},
        {"symbol": SYMBOL, "side": "BUY", "confidence": "1.5"},
        {"symbol": SYMBOL, "side": "BUY", "leverage": "500"},
        {"symbol": SYMBOL, "side": "BUY", "position_size_usd": "-5"},
    ]
    async with redis_daemon(
        tmp_path, bus_url(redis_server), "one-way", {SYMBOL: "2500.00"}
    ) as running:
        daemon = running.daemon
        pipe = client.pipeline(transaction=False)
        for _ in range(25):
            for entry in bad_entries:
                pipe.xadd(STREAM, entry)
            # not UTF-8: refused alone, the rest of the batch is still read
            pipe.xadd(STREAM, {"symbol": b"\xff\xfe", "side": "BUY"})
        await pipe.execute()
        good = (await client.xadd(STREAM, original_payload(id="good-1"))).decode()
        await wait_open(running, 1)
        stats = daemon.membership.bus.intents.stats
        await until(lambda: stats.rejected == 25 * (len(bad_entries) + 1), 15, "rejections")
        await until(lambda: stats.decided == 1, 5, "the good intent acknowledged")
        assert (await client.xpending(STREAM, "pyquant"))["pending"] == 0
        # every rejection is recorded in the journal with its reason
        store = daemon.desk.store
        recorded = [d for d in store.intent_decisions() if d["source"] == "redis"]
        assert len(recorded) == 25 * (len(bad_entries) + 1)
        assert all(d["decision"] == "rejected" and d["detail"] for d in recorded)
        await until(lambda: daemon.membership.events.stats.published >= 25 * len(bad_entries), 10)
    events = await events_of(client)
    rejections = [e["payload"] for e in events if e["type"] == "rejection"]
    assert len(rejections) == 25 * (len(bad_entries) + 1)
    for event in events:
        VALIDATOR.validate(event)
    reasons = {r["reason"] for r in rejections}
    assert "intent field 'side' was 'HOLD': must be BUY or SELL (LONG or SHORT)" in reasons
    assert any("'confidence'" in r and "between 0 and 1" in r for r in reasons)
    assert any("'leverage'" in r for r in reasons)
    assert {r["field"] for r in rejections} >= {"side", "symbol", "confidence", "leverage"}
    decision = next(e for e in events if e["type"] == "decision")
    assert decision["payload"]["stream_id"] == good
    assert decision["payload"]["accepted"] is True


async def test_redis_killed_and_restarted_with_aof_loses_no_intent_and_exits_go_on(
    tmp_path: Path, redis_factory: Any
) -> None:
    server: RedisServer = redis_factory(aof=True)
    redis = redis_asyncio.from_url(server.url, socket_timeout=2, socket_connect_timeout=1)

    async def add(index: int) -> None:
        fields = original_payload(id=f"i{index}")
        while True:  # the producer retries while Redis is restarting, as any producer would
            try:
                await redis.xadd(STREAM, fields)
                return
            except (OSError, redis_asyncio.ConnectionError, redis_asyncio.TimeoutError):
                await asyncio.sleep(0.02)

    try:
        async with redis_daemon(tmp_path, bus_url(server), "hedge", {SYMBOL: "2500.00"}) as running:
            venue, daemon = running.venue, running.daemon
            store = daemon.desk.store
            await add(0)
            await wait_open(running, 1)
            for i in range(1, 20):
                await add(i)
            await until(lambda: len(store.intent_decisions()) >= 5, 10, "some decided")
            server.stop(kill=True)

            # Redis is down: the position this daemon owns keeps its exits
            await venue.step(1000)
            await venue.set_mark(SYMBOL, "2525.25")
            await until(
                lambda: any(o.status == "FILLED" for o in store.orders(kind="exit")),
                10,
                "take-profit while Redis is down",
            )
            assert daemon.membership.owned() == frozenset({SYMBOL})

            server.start()
            for i in range(20, 40):
                await add(i)
            await until(lambda: len(store.intent_decisions()) >= 40, 30, "all decided")
            # An entry whose XACK died with Redis comes back once and is acknowledged then
            # (with its stored decision): wait for the group's pending list to empty.
            for _ in range(500):
                if (await redis.xpending(STREAM, "pyquant"))["pending"] == 0:
                    break
                await asyncio.sleep(0.02)
            assert (await redis.xpending(STREAM, "pyquant"))["pending"] == 0
            decisions = store.intent_decisions()
            assert sorted(d["intent_id"] for d in decisions) == sorted(f"i{i}" for i in range(40))
            accepted = [d["intent_id"] for d in decisions if d["decision"] == "accepted"]
            assert accepted == ["i0"]  # the others found the leg already open
            assert len(store.positions(("open",))) == 1
    finally:
        await redis.aclose()


async def test_a_position_opened_by_hand_is_claimed_and_adopted(
    tmp_path: Path, redis_server: RedisServer, client: Any
) -> None:
    from pyquant.exchange.client import BinanceClient

    async with redis_daemon(
        tmp_path, bus_url(redis_server), "hedge", {"SOLUSDT": "150.000"}
    ) as running:
        venue, daemon = running.venue, running.daemon
        assert daemon.membership.owned() == frozenset()
        async with BinanceClient(venue.rest_url, venue.api_key, venue.api_secret) as hand:
            await hand.new_order(
                {
                    "symbol": "SOLUSDT",
                    "side": "SELL",
                    "positionSide": "SHORT",
                    "type": "MARKET",
                    "quantity": "4",
                    "newClientOrderId": "by-hand-1",
                }
            )
        # the account update shows a leg nobody runs: this daemon (the only live one)
        # takes the symbol's lease, reconciles it and adopts the position with a backstop
        await until(lambda: "SOLUSDT" in daemon.membership.owned(), 10, "lease")
        store = daemon.desk.store
        await until(lambda: len(store.positions(("open",))) == 1, 10, "adopted")
        position = store.positions(("open",))[0]
        assert (position.symbol, position.position_side, position.origin) == (
            "SOLUSDT",
            "SHORT",
            "adopted",
        )
        assert Decimal(position.quantity) == Decimal("4")
        await until(lambda: len(venue.exchange.open_algo_orders("SOLUSDT")) == 1, 10, "stop")
        backstop = venue.exchange.open_algo_orders("SOLUSDT")[0]
        assert backstop.position_side == "SHORT"
        assert backstop.trigger_price > Decimal("150")
        assert await client.get("pyquant:default:lease:SOLUSDT") == b"solo"


async def test_exit_state_entries_are_dropped_only_by_their_writer(
    tmp_path: Path, redis_server: RedisServer, client: Any
) -> None:
    key = "pyquant:default:exitstate"
    async with redis_daemon(
        tmp_path, bus_url(redis_server), "hedge", {SYMBOL: "2500.00"}
    ) as running:
        daemon = running.daemon
        membership = daemon.membership
        for side in ("BUY", "SELL"):
            await client.xadd(STREAM, original_payload(id=f"leg-{side}", side=side))
        await wait_open(running, 2)
        await membership.publish_exit_state()
        for leg in ("LONG", "SHORT"):
            assert orjson.loads(await client.hget(key, f"{SYMBOL}|{leg}"))["daemon_id"] == "solo"
        # a peer took the LONG leg over and wrote its state; then we hand the symbol over
        theirs = orjson.dumps({"daemon_id": "other", "entry_price": "2500.00"})
        await client.hset(key, f"{SYMBOL}|LONG", theirs)
        assert len(await daemon.desk.hand_over(SYMBOL, "other")) == 2
        await membership.publish_exit_state()
        assert await client.hget(key, f"{SYMBOL}|LONG") == theirs  # the peer's stays
        assert await client.hget(key, f"{SYMBOL}|SHORT") is None  # ours is gone
