"""The Redis intent source against a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from decimal import Decimal

import orjson
import pytest

redis_asyncio = pytest.importorskip("redis.asyncio")

from intent_stream import GROUP, STREAM, running, stream_config  # noqa: E402

from pyquant.errors import ConfigError  # noqa: E402
from pyquant.scale.events import EventPublisher  # noqa: E402
from pyquant.scale.redis_intents import (  # noqa: E402
    RedisIntentSource,
    Rejection,
    entry_payload,
    parse_intent_url,
)
from pyquant.trading.intents import Intent  # noqa: E402


@dataclass(frozen=True)
class Decision:
    accepted: bool
    reason: str | None
    detail: str = ""


@dataclass
class Journal:
    """A store stub that keeps one decision per intent id, as the guard does."""

    decided: dict[str, Intent] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)

    async def decide(self, intent: Intent) -> Decision:
        self.calls.append(intent.intent_id)
        if intent.intent_id in self.decided:
            return Decision(False, "duplicate intent id")
        self.decided[intent.intent_id] = intent
        return Decision(True, None)

    async def reject(self, rejection: Rejection) -> None:
        self.rejections.append(rejection)


def intent_fields(i: int, symbol: str = "BTCUSDT") -> dict[str, bytes]:
    payload = {"id": f"i{i}", "symbol": symbol, "side": "BUY", "confidence": 0.7}
    return {"data": orjson.dumps(payload)}


async def pending_count(client, stream: str = STREAM) -> int:
    summary = await client.xpending(stream, GROUP)
    return int(summary["pending"])


async def test_intent_is_acked_only_after_decide_returns(redis_client, wait_until):
    release = asyncio.Event()
    entered = asyncio.Event()
    journal = Journal()

    async def slow_decide(intent: Intent) -> Decision:
        entered.set()
        await release.wait()
        return await journal.decide(intent)

    source = RedisIntentSource(redis_client, stream_config(), decide=slow_decide)
    async with running(source):
        await redis_client.xadd(STREAM, intent_fields(1))
        await asyncio.wait_for(entered.wait(), 5)
        assert await pending_count(redis_client) == 1
        assert journal.decided == {}
        release.set()
        await wait_until(lambda: source.stats.decided == 1)
        assert await pending_count(redis_client) == 0
    assert list(journal.decided) == ["i1"]


async def test_both_entry_shapes_and_the_original_payload(redis_client, wait_until):
    journal = Journal()
    source = RedisIntentSource(redis_client, stream_config(), decide=journal.decide)
    original = {
        "symbol": "ethusdt",
        "side": "SELL",
        "confidence": 0.82,
        "leverage": 10,
        "position_size_usd": "250.50",
        "source": "quantum-ensemble",
        "timestamp": 1764201600,
    }
    async with running(source):
        first = await redis_client.xadd(STREAM, {"payload": orjson.dumps(original)})
        flat = {"id": "flat-1", "symbol": "SOLUSDT", "side": "BUY", "leverage": "5"}
        await redis_client.xadd(STREAM, flat)
        await wait_until(lambda: source.stats.decided == 2)
    first_id = first.decode()
    by_id = journal.decided
    assert set(by_id) == {first_id, "flat-1"}
    eth = by_id[first_id]
    assert (eth.symbol, eth.side, eth.leverage) == ("ETHUSDT", "SELL", 10)
    assert eth.size_usd == Decimal("250.50")
    assert eth.source == "quantum-ensemble"
    assert eth.created_at_ms == 1764201600000
    sol = by_id["flat-1"]
    assert (sol.symbol, sol.side, sol.leverage, sol.source) == ("SOLUSDT", "BUY", 5, "redis")
    # No timestamp in the entry: its creation time is the entry id's.
    assert sol.created_at_ms > 1_600_000_000_000


def test_entry_without_id_takes_the_stream_id():
    payload = entry_payload("1764201600123-4", {b"symbol": b"BTCUSDT", b"side": b"BUY"})
    assert payload["id"] == "1764201600123-4"
    assert payload["created_at_ms"] == 1764201600123


async def test_restart_decides_own_pending_first_and_nothing_twice(redis_client, wait_until):
    journal = Journal()
    stuck = asyncio.Event()

    async def hanging(intent: Intent) -> Decision:
        stuck.set()
        await asyncio.Event().wait()  # never returns: the daemon dies mid-decision
        raise AssertionError

    for i in range(5):
        await redis_client.xadd(STREAM, intent_fields(i))
    first = RedisIntentSource(redis_client, stream_config(batch_size=5), decide=hanging)
    task = asyncio.create_task(first.run())
    await asyncio.wait_for(stuck.wait(), 5)
    task.cancel()  # kill: nothing acknowledged
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert await pending_count(redis_client) == 5
    for i in range(5, 8):
        await redis_client.xadd(STREAM, intent_fields(i))

    second = RedisIntentSource(redis_client, stream_config(), decide=journal.decide)
    async with running(second):
        await wait_until(lambda: len(journal.decided) == 8)
    # The pending entries were decided first, in stream order, then the new ones.
    assert journal.calls == [f"i{i}" for i in range(8)]
    assert await pending_count(redis_client) == 0


async def test_dead_consumers_entries_are_reclaimed(redis_client, wait_until):
    await redis_client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    for i in range(3):
        await redis_client.xadd(STREAM, intent_fields(i))
    # Another consumer reads them and dies without acknowledging.
    await redis_client.xreadgroup(GROUP, "dead", {STREAM: ">"}, count=10)
    journal = Journal()
    source = RedisIntentSource(
        redis_client, stream_config(claim_idle_ms=50, claim_interval_ms=20), decide=journal.decide
    )
    async with running(source):
        await wait_until(lambda: len(journal.decided) == 3)
    assert source.stats.reclaimed == 3
    assert await pending_count(redis_client) == 0
    assert set(journal.decided) == {"i0", "i1", "i2"}


MALFORMED: list[tuple[dict[str, bytes], str]] = [
    ({b"data": b"{not json"}, "'data' was '{not json': must be a JSON object"),
    ({b"data": b"[1, 2]"}, "must be a JSON object"),
    ({b"data": orjson.dumps({"id": "x", "side": "BUY"})}, "'symbol' was None: is required"),
    (
        {b"data": orjson.dumps({"id": "x", "symbol": "BTCUSDT", "side": "HOLD"})},
        "'side' was 'HOLD': must be BUY or SELL",
    ),
    (
        {b"symbol": b"BTCUSDT", b"side": b"BUY", b"leverage": b"500"},
        "'leverage' was '500': must be a whole number from 1 to 125",
    ),
    (
        {b"symbol": b"BTCUSDT", b"side": b"BUY", b"position_size_usd": b"-3"},
        "'position_size_usd' was '-3': must be a positive USDT amount",
    ),
    ({b"symbol": b"\xff\xfe", b"side": b"BUY"}, "'symbol' was b'\\xff\\xfe': must be UTF-8 text"),
    (
        {b"symbol": b"BTCUSDT", b"side": b"SELL", b"confidence": b"nan"},
        "'confidence' was 'nan': must be a finite number",
    ),
]


async def test_flood_of_malformed_entries_each_rejected_while_good_flow(redis_client, wait_until):
    journal = Journal()
    events = EventPublisher(redis_client, daemon_id="daemon-a", stream="ev")
    source = RedisIntentSource(
        redis_client,
        stream_config(),
        decide=journal.decide,
        on_reject=journal.reject,
        events=events,
    )
    expected: dict[str, str] = {}
    good = 0
    pipe = redis_client.pipeline(transaction=False)
    for n in range(240):
        if n % 12 == 0:
            pipe.xadd(STREAM, intent_fields(n))
            good += 1
        else:
            pipe.xadd(STREAM, MALFORMED[n % len(MALFORMED)][0])
    ids = await pipe.execute()
    for n, entry_id in enumerate(ids):
        if n % 12:
            expected[entry_id.decode()] = MALFORMED[n % len(MALFORMED)][1]
    publisher = asyncio.create_task(events.run())
    async with running(source):
        await wait_until(lambda: source.stats.decided + source.stats.rejected == 240)
    assert len(journal.decided) == good == 20
    assert len(journal.rejections) == 220
    for rejection in journal.rejections:
        assert expected[rejection.stream_id] in rejection.reason, rejection
    assert await pending_count(redis_client) == 0
    assert await events.flush()
    events.stop()
    await publisher
    published = await redis_client.xrange("ev")
    rejected = [orjson.loads(f[b"event"]) for _, f in published if f[b"type"] == b"rejection"]
    assert len(rejected) == 220
    assert {r["payload"]["stream_id"] for r in rejected} == set(expected)


async def test_decide_errors_are_retried_then_rejected(redis_client, wait_until):
    journal = Journal()
    attempts: dict[str, int] = {}

    async def flaky(intent: Intent) -> Decision:
        attempts[intent.intent_id] = attempts.get(intent.intent_id, 0) + 1
        if intent.intent_id == "i0":
            raise RuntimeError("store is locked")
        if intent.intent_id == "i1" and attempts["i1"] < 3:
            raise RuntimeError("transient")
        return await journal.decide(intent)

    source = RedisIntentSource(
        redis_client, stream_config(max_deliveries=4), decide=flaky, on_reject=journal.reject
    )
    async with running(source):
        for i in range(3):
            await redis_client.xadd(STREAM, intent_fields(i))
        await wait_until(lambda: source.stats.rejected == 1 and len(journal.decided) == 2)
    assert attempts["i0"] == 4
    assert attempts["i1"] == 3
    [rejection] = journal.rejections
    assert rejection.reason == ("decide failed 4 times, last error: RuntimeError: store is locked")
    assert await pending_count(redis_client) == 0


async def test_redis_restarted_with_aof_mid_run_loses_no_intent(redis_factory, wait_until):
    server = redis_factory(aof=True)
    client = redis_asyncio.from_url(server.url, socket_timeout=2, socket_connect_timeout=1)
    journal = Journal()
    source = RedisIntentSource(client, stream_config(), decide=journal.decide)
    try:
        async with running(source):
            for i in range(30):
                await client.xadd(STREAM, intent_fields(i))
            await wait_until(lambda: len(journal.decided) >= 10)
            server.restart(kill=True)
            for i in range(30, 60):
                while True:
                    try:
                        await client.xadd(STREAM, intent_fields(i))
                        break
                    except (ConnectionError, OSError, redis_asyncio.ConnectionError):
                        await asyncio.sleep(0.02)
            await wait_until(lambda: len(journal.decided) == 60, timeout_s=20)
            assert await pending_count(client) == 0
    finally:
        await client.aclose()
    assert set(journal.decided) == {f"i{i}" for i in range(60)}


def test_url_is_parsed_with_clear_errors():
    cfg = parse_intent_url(
        "redis://127.0.0.1:6380/2?stream=quantum:stream:trade.intent&group=g1&consumer=host-a"
    )
    assert (cfg.url, cfg.stream, cfg.group, cfg.consumer) == (
        "redis://127.0.0.1:6380/2",
        "quantum:stream:trade.intent",
        "g1",
        "host-a",
    )
    assert parse_intent_url("redis://127.0.0.1").stream == "quantum:stream:trade.intent"
    with pytest.raises(ConfigError, match="parameter 'strem' is unknown"):
        parse_intent_url("redis://127.0.0.1:6379/0?strem=x")
    with pytest.raises(ConfigError, match="scheme must be redis:// or rediss://"):
        parse_intent_url("http://127.0.0.1:6379/0?stream=x")
    with pytest.raises(ConfigError, match=r"intents.group was 'a b': must be 1-64 characters"):
        parse_intent_url("redis://127.0.0.1/0?group=a%20b")
    with pytest.raises(ConfigError, match=r"intents.start was 'now': must be \$ or 0"):
        parse_intent_url("redis://127.0.0.1/0?start=now")
    with pytest.raises(ConfigError, match="'batch' was 'many': must be an integer"):
        parse_intent_url("redis://127.0.0.1/0?batch=many")
    with pytest.raises(ConfigError, match="'group' is given twice"):
        parse_intent_url("redis://127.0.0.1/0?group=a&group=b")
    with pytest.raises(ConfigError, match=r"redis://:\*\*\*@127.0.0.1/x.*must be a number"):
        parse_intent_url("redis://:hunter2@127.0.0.1/x")


async def test_intake_closed_refusal_is_left_pending(redis_client, wait_until):
    journal = Journal()
    closed = True

    async def intake(intent: Intent) -> Decision:
        if closed:
            return Decision(False, "intake_closed")
        return await journal.decide(intent)

    source = RedisIntentSource(redis_client, stream_config(), decide=intake)
    async with running(source):
        await redis_client.xadd(STREAM, intent_fields(1))
        await wait_until(lambda: source.stats.deferred >= 1)
        assert await pending_count(redis_client) == 1
        closed = False
        await wait_until(lambda: source.stats.decided == 1)
    assert list(journal.decided) == ["i1"]
    assert await pending_count(redis_client) == 0


async def test_intents_wait_while_the_symbols_lease_is_unconfirmed(redis_client, wait_until):
    from pyquant.scale.leases import LeaseConfig, LeaseManager

    now = [1000.0]
    leases = LeaseManager(
        redis_client, LeaseConfig(daemon_id="daemon-a", account="main"), clock=lambda: now[0]
    )
    await leases.register()
    assert await leases.want("BTCUSDT")
    journal = Journal()
    source = RedisIntentSource(redis_client, stream_config(), decide=journal.decide, router=leases)
    dispatcher = asyncio.create_task(leases._dispatch_callbacks())  # adoption callbacks only
    try:
        async with running(source):
            await redis_client.xadd(STREAM, intent_fields(1))
            await wait_until(lambda: source.stats.decided == 1)
            # No renewal for longer than the lease validity (Redis unreachable meanwhile):
            # the symbol stays owned, but intents for it wait.
            now[0] += 60
            assert leases.owned() == {"BTCUSDT"}
            await redis_client.xadd(STREAM, intent_fields(2))
            await wait_until(lambda: source.stats.deferred >= 2)
            assert list(journal.decided) == ["i1"]
            assert await pending_count(redis_client) == 1
            assert await leases.want("BTCUSDT")  # renewed: confirmed again
            await wait_until(lambda: source.stats.decided == 2)
    finally:
        dispatcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await dispatcher
    assert list(journal.decided) == ["i1", "i2"]
    assert await pending_count(redis_client) == 0


async def test_an_error_decision_counts_as_a_failed_decide(redis_client, wait_until):
    journal = Journal()
    calls = [0]

    async def submit(intent: Intent) -> Decision:
        calls[0] += 1
        return Decision(False, "error", "OperationalError: database is locked")

    source = RedisIntentSource(
        redis_client, stream_config(max_deliveries=2), decide=submit, on_reject=journal.reject
    )
    async with running(source):
        await redis_client.xadd(STREAM, intent_fields(1))
        await wait_until(lambda: source.stats.rejected == 1)
    assert calls[0] == 2
    [rejection] = journal.rejections
    assert rejection.reason == (
        "decide failed 2 times, last error: OperationalError: database is locked"
    )
    assert await pending_count(redis_client) == 0
