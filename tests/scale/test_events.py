"""The event publisher: schema, approximate MAXLEN, never blocking while Redis is down."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from importlib import resources

import orjson
import pytest

redis_asyncio = pytest.importorskip("redis.asyncio")
jsonschema = pytest.importorskip("jsonschema")

from pyquant.scale.events import EventPublisher  # noqa: E402
from pyquant.trading.intents import Intent  # noqa: E402

SCHEMA = json.loads(resources.files("pyquant.scale").joinpath("events.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker())


def publish_one_of_each(events: EventPublisher) -> None:
    intent = Intent(
        intent_id="sig-1",
        symbol="BTCUSDT",
        side="BUY",
        confidence=0.8,
        created_at_ms=1764201600000,
        source="quantum",
        size_usd=Decimal("250.5"),
        leverage=10,
    )
    events.decision(intent, accepted=True, reason=None, stream_id="1764201600000-0")
    events.decision(intent, accepted=False, reason="duplicate intent id")
    events.rejection(
        stream="quantum:stream:trade.intent",
        stream_id="1-0",
        reason="intent field 'side' was 'HOLD': must be BUY or SELL",
        field="side",
        symbol=None,
    )
    events.publish(
        "order",
        symbol="BTCUSDT",
        payload={
            "client_order_id": "pq-7f3a-1-stop",
            "side": "SELL",
            "position_side": "LONG",
            "order_type": "STOP_MARKET",
            "quantity": Decimal("0.003"),
            "price": None,
            "stop_price": Decimal("86950.1"),
            "status": "NEW",
            "reason": "backstop",
        },
    )
    events.publish(
        "fill",
        symbol="BTCUSDT",
        payload={
            "client_order_id": "pq-7f3a-1-tp1",
            "side": "SELL",
            "position_side": "LONG",
            "price": Decimal("90210.5"),
            "quantity": Decimal("0.001"),
            "commission": Decimal("0.03608420"),
            "realized_pnl": Decimal("1.2"),
            "trade_id": 123456,
        },
    )
    events.publish(
        "exit",
        symbol="BTCUSDT",
        payload={
            "position_id": "7f3a",
            "position_side": "LONG",
            "reason": "take_profit",
            "quantity": "0.001",
            "trigger_price": "90200",
            "mark_price": "90210.5",
        },
    )
    events.publish(
        "position",
        symbol="BTCUSDT",
        payload={
            "action": "handed_over",
            "position_id": "7f3a",
            "position_side": "LONG",
            "quantity": "0.002",
            "owner": "host-b",
        },
    )
    events.lease("BTCUSDT", action="acquired", owner="host-a", reason="intent")
    events.publish("daemon", symbol=None, payload={"action": "started"})


async def read_events(client, stream: str) -> list[dict]:
    entries = await client.xrange(stream)
    out = []
    for _, fields in entries:
        event = orjson.loads(fields[b"event"])
        assert fields[b"type"].decode() == event["type"]
        out.append(event)
    return out


async def test_every_event_type_matches_the_json_schema(redis_client):
    events = EventPublisher(redis_client, daemon_id="host-a", account="main", stream="ev")
    task = asyncio.create_task(events.run())
    publish_one_of_each(events)
    assert await events.flush()
    events.stop()
    await task
    published = await read_events(redis_client, "ev")
    assert [e["type"] for e in published] == [
        "decision",
        "decision",
        "rejection",
        "order",
        "fill",
        "exit",
        "position",
        "lease",
        "daemon",
    ]
    for event in published:
        VALIDATOR.validate(event)
    assert [e["seq"] for e in published] == list(range(1, 10))
    order = published[3]["payload"]
    # Money is exact text on the wire, never a float.
    assert (order["quantity"], order["stop_price"]) == ("0.003", "86950.1")
    assert published[0]["payload"]["size_usd"] == "250.5"


def test_schema_refuses_malformed_events():
    good = {
        "version": 1,
        "type": "fill",
        "ts_ms": 1,
        "daemon_id": "a",
        "account": "main",
        "seq": 1,
        "symbol": "BTCUSDT",
        "payload": {
            "client_order_id": "x",
            "side": "SELL",
            "position_side": "LONG",
            "price": "1.5",
            "quantity": "2",
        },
    }
    VALIDATOR.validate(good)
    float_money = json.loads(json.dumps(good))
    float_money["payload"]["price"] = 1.5
    unknown_type = dict(good, type="heartbeat")
    missing = json.loads(json.dumps(good))
    del missing["payload"]["client_order_id"]
    for bad in (float_money, unknown_type, missing, dict(good, version=2)):
        assert not VALIDATOR.is_valid(bad), bad


async def test_stream_is_capped_approximately(redis_client):
    events = EventPublisher(redis_client, daemon_id="host-a", stream="ev", maxlen=100)
    task = asyncio.create_task(events.run())
    for i in range(3000):
        events.publish("daemon", symbol=None, payload={"action": "started", "n": i})
    assert await events.flush(10)
    events.stop()
    await task
    length = await redis_client.xlen("ev")
    assert 100 <= length < 1000
    assert events.stats.published == 3000


async def test_publish_never_blocks_while_redis_is_down(redis_factory):
    server = redis_factory(aof=False, start=False)
    client = redis_asyncio.from_url(server.url, socket_connect_timeout=0.2, socket_timeout=0.5)
    events = EventPublisher(client, daemon_id="host-a", stream="ev", buffer_size=10)
    task = asyncio.create_task(events.run())
    try:
        for i in range(50):
            events.publish("lease", symbol="BTCUSDT", payload={"action": "lost", "owner": f"{i}"})
        # Every publish returned at once; the oldest were dropped and counted.
        assert events.stats.buffered == 10
        assert events.stats.dropped == 40
        assert not await events.flush(0.3)
        assert events.stats.failures >= 1
        server.start()
        assert await events.flush(10)
    finally:
        events.stop()
        await task
        await client.aclose()
    check = redis_asyncio.from_url(server.url)
    published = await read_events(check, "ev")
    await check.aclose()
    owners = [e["payload"]["owner"] for e in published if e["type"] == "lease"]
    assert owners == [str(i) for i in range(40, 50)]
    [dropped] = [e for e in published if e["type"] == "daemon"]
    assert dropped["payload"] == {"action": "dropped_events", "dropped": 40}
    for event in published:
        VALIDATOR.validate(event)


def test_unknown_type_and_non_json_payload_are_programming_errors():
    events = EventPublisher(object(), daemon_id="a")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="event type 'heartbeat' is not one of"):
        events.publish("heartbeat", symbol=None, payload={})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="order event payload is not JSON"):
        events.publish("order", symbol="BTCUSDT", payload={"x": object()})
