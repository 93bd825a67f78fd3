"""Stream entries that used to crash or wedge a daemon: each is refused with its reason and
acknowledged, the intake goes on, and a restart reading them from its pending list does too.

Every case runs the forwarding path (two lease managers, the symbol held by the peer) where one
exists, since that is where the original crashes happened.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import orjson
import pytest

redis_asyncio = pytest.importorskip("redis.asyncio")

from intent_stream import GROUP, STREAM, running, stream_config  # noqa: E402

from pyquant.scale.leases import LeaseConfig, LeaseManager  # noqa: E402
from pyquant.scale.redis_intents import (  # noqa: E402
    RedisIntentSource,
    Rejection,
)
from pyquant.trading.intents import Intent  # noqa: E402

LISTED = frozenset({"BTCUSDT", "ETHUSDT"})


@dataclass(frozen=True)
class Decision:
    accepted: bool
    reason: str | None


@dataclass
class Journal:
    decided: list[str] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)

    async def decide(self, intent: Intent) -> Decision:
        self.decided.append(intent.intent_id)
        return Decision(True, None)

    async def reject(self, rejection: Rejection) -> None:
        self.rejections.append(rejection)

    def reason_of(self, stream_id: str) -> str:
        [reason] = [r.reason for r in self.rejections if r.stream_id == stream_id]
        return reason


def listed(symbol: str) -> str | None:
    return None if symbol in LISTED else "is not listed in this daemon's exchangeInfo"


def good(intent_id: str, symbol: str = "BTCUSDT") -> dict[bytes, bytes]:
    payload = {"id": intent_id, "symbol": symbol, "side": "BUY", "confidence": 0.7}
    return {b"data": orjson.dumps(payload)}


@contextlib.asynccontextmanager
async def pair(client: object) -> AsyncIterator[tuple[LeaseManager, LeaseManager]]:
    """alpha (the reader, holding ETHUSDT) and beta (holding BTCUSDT), both renewing."""
    alpha = LeaseManager(client, LeaseConfig(daemon_id="alpha", account="main", ttl_ms=5000))
    beta = LeaseManager(client, LeaseConfig(daemon_id="beta", account="main", ttl_ms=5000))
    for manager in (alpha, beta):
        await manager.register()
    tasks = [asyncio.create_task(m.run()) for m in (alpha, beta)]
    assert await beta.want("BTCUSDT")
    assert await alpha.want("ETHUSDT")
    try:
        yield alpha, beta
    finally:
        for manager, task in zip((alpha, beta), tasks, strict=True):
            await manager.stop()
            await asyncio.wait_for(task, 10)


BAD_ENTRIES: list[tuple[str, dict[bytes, bytes], str]] = [
    (
        "5000 extra fields",
        {**good("wide"), **{f"x{i}".encode(): b"1" for i in range(5000)}},
        "intent field '<entry>' was '5001 fields': must have at most 256",
    ),
    (
        "a 100 KB value",
        {**good("fat"), b"note": b"x" * 100_000},
        "must have at most 65536",
    ),
    (
        "non-UTF-8 field name",
        {b"\xff\x00": b"x", b"symbol": b"BTCUSDT", b"side": b"BUY"},
        "intent field '<field name>' was b'\\xff\\x00': must be UTF-8 text",
    ),
    (
        "sharp s",
        {b"symbol": "ß".encode(), b"side": b"BUY", b"id": b"sharp"},
        "intent field 'symbol' was 'ß': must be ASCII letters and digits",
    ),
    (
        "unknown symbol",
        {b"symbol": b"NOSUCHUSDT", b"side": b"BUY", b"id": b"nosuch"},
        "intent field 'symbol' was 'NOSUCHUSDT': is not listed in this daemon's exchangeInfo",
    ),
    (
        "timestamp 1e300",
        {b"symbol": b"BTCUSDT", b"side": b"BUY", b"id": b"t300", b"timestamp": b"1e300"},
        # the intent parser's bound (year 9999) refuses it before the stream's (24 h ahead)
        "intent field 'timestamp' was '1e300': must be a positive time",
    ),
    (
        "created_at_ms 1e19",
        {b"data": b'{"id":"c19","symbol":"BTCUSDT","side":"SELL","created_at_ms":1e19}'},
        "intent field 'created_at_ms' was 1e+19: must be a positive time",
    ),
]


async def test_each_bad_entry_is_refused_at_once_and_a_restart_survives_them(
    redis_client, wait_until
):
    journal = Journal()
    async with pair(redis_client) as (alpha, _beta):
        await redis_client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        ids: dict[str, str] = {}
        for name, fields, _ in BAD_ENTRIES:
            ids[name] = (await redis_client.xadd(STREAM, fields)).decode()
        # The previous instance read them and died before acknowledging: the restarted one
        # finds them in its own pending list first.
        await redis_client.xreadgroup(GROUP, "alpha", {STREAM: ">"}, count=100)
        tail = (await redis_client.xadd(STREAM, good("after", "ETHUSDT"))).decode()
        source = RedisIntentSource(
            redis_client,
            stream_config("alpha"),
            decide=journal.decide,
            on_reject=journal.reject,
            router=alpha,
            symbol_check=listed,
        )
        async with running(source):
            await wait_until(lambda: "after" in journal.decided, timeout_s=20)
            assert int((await redis_client.xpending(STREAM, GROUP))["pending"]) == 0
        for name, _, reason in BAD_ENTRIES:
            assert reason in journal.reason_of(ids[name]), name
        # Refused on the first attempt, before any decision, lease or forward.
        assert source.stats.decide_failures == 0
        assert journal.decided == ["after"]
        assert source.stats.forwarded == 0
        assert source.stats.rejected == len(BAD_ENTRIES)
        assert tail not in {r.stream_id for r in journal.rejections}
        leased = sorted(k.decode() for k in await redis_client.keys("pyquant:main:lease:*"))
        assert leased == ["pyquant:main:lease:BTCUSDT", "pyquant:main:lease:ETHUSDT"]
        assert await redis_client.xlen("pyquant:main:inbox:beta") == 0
    # The non-UTF-8 name is shown escaped in the record, not lost.
    [odd] = [r for r in journal.rejections if r.stream_id == ids["non-UTF-8 field name"]]
    assert odd.fields["\\xff\x00"] == "x"  # the NUL is valid UTF-8, the 0xff is not


async def test_a_thousand_unknown_symbols_take_no_lease_and_do_not_delay_a_good_intent(
    redis_client, wait_until
):
    journal = Journal()
    async with pair(redis_client) as (alpha, _beta):
        source = RedisIntentSource(
            redis_client,
            stream_config("alpha", batch_size=200),
            decide=journal.decide,
            on_reject=journal.reject,
            router=alpha,
            symbol_check=listed,
        )
        async with running(source):
            pipe = redis_client.pipeline(transaction=False)
            for i in range(1000):
                pipe.xadd(STREAM, good(f"u{i}", f"ZZ{i:04d}USDT"))
            await pipe.execute()
            await redis_client.xadd(STREAM, good("real", "ETHUSDT"))
            await wait_until(lambda: "real" in journal.decided, timeout_s=30)
        assert source.stats.rejected == 1000
        assert journal.decided == ["real"]
        assert await redis_client.smembers("pyquant:main:symbols") == {b"BTCUSDT", b"ETHUSDT"}
        assert int((await redis_client.xpending(STREAM, GROUP))["pending"]) == 0


async def test_a_deleted_inbox_is_created_again_and_read(redis_client, wait_until):
    journal = Journal()
    async with pair(redis_client) as (alpha, _beta):
        source = RedisIntentSource(
            redis_client,
            stream_config("alpha", block_ms=2000),
            decide=journal.decide,
            on_reject=journal.reject,
            router=alpha,
        )
        inbox = "pyquant:main:inbox:alpha"
        async with running(source) as task:
            # Wait until the reader is blocked on the inbox, then delete it under it.
            await wait_until_blocked(redis_client, wait_until)
            assert await redis_client.delete(inbox) == 1
            await redis_client.xadd(inbox, good("via-inbox", "ETHUSDT"))
            await wait_until(lambda: "via-inbox" in journal.decided, timeout_s=20)
            assert not task.done()
        assert await redis_client.xlen(inbox) == 0


async def wait_until_blocked(client: object, wait_until: object) -> None:
    blocked = [False]

    async def poll() -> None:
        while not blocked[0]:
            clients = await client.client_list()  # type: ignore[attr-defined]
            blocked[0] = any(c.get("cmd") == "xreadgroup" for c in clients)
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), 10)


async def test_an_entry_whose_handling_keeps_failing_is_refused_after_the_retries(
    redis_client, wait_until
):
    journal = Journal()
    calls = [0]

    def broken(symbol: str) -> str | None:
        if symbol == "ETHUSDT":
            calls[0] += 1
            raise RuntimeError("rules table corrupt")
        return None

    source = RedisIntentSource(
        redis_client,
        stream_config("alpha", max_deliveries=3),
        decide=journal.decide,
        on_reject=journal.reject,
        symbol_check=broken,
    )
    async with running(source) as task:
        bad = (await redis_client.xadd(STREAM, good("e1", "ETHUSDT"))).decode()
        await redis_client.xadd(STREAM, good("b1"))
        await wait_until(lambda: source.stats.rejected == 1 and "b1" in journal.decided)
        assert not task.done()
    assert calls[0] == 3
    assert journal.reason_of(bad) == (
        "entry could not be handled 3 times, last error: RuntimeError: rules table corrupt"
    )
    assert int((await redis_client.xpending(STREAM, GROUP))["pending"]) == 0


def test_the_daemon_refuses_symbols_its_exchange_info_does_not_list():
    from types import SimpleNamespace

    from pyquant.errors import UnknownSymbolError
    from pyquant.scale.bus import RedisBusConfig
    from pyquant.scale.membership import Membership

    class Rules:
        def symbol_info(self, symbol: str) -> dict[str, str]:
            if symbol not in LISTED:
                raise UnknownSymbolError(symbol)
            return {"symbol": symbol, "status": "TRADING"}

    class Intake:
        async def submit(self, intent: Intent, *, payload: object = None) -> object:
            raise AssertionError("not called")

        def reject_malformed(self, source: str, payload: object, error: str) -> None:
            raise AssertionError("not called")

    member = Membership(RedisBusConfig.from_url("redis://127.0.0.1:1/0?daemon=alpha"), Intake())
    desk = SimpleNamespace(rules=Rules(), router=SimpleNamespace())
    member.attach(desk)  # type: ignore[arg-type]
    check = member.bus.intents.symbol_check
    assert check is not None
    assert check("BTCUSDT") is None
    assert check("SS") == "is not listed in this daemon's exchangeInfo"
