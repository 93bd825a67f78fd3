"""Several daemons (separate processes) on one Redis: intents split by owner, kill -9 takeover."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections import Counter
from pathlib import Path

import orjson
import pytest

redis_asyncio = pytest.importorskip("redis.asyncio")

from pyquant.errors import ConfigError  # noqa: E402
from pyquant.scale.bus import RedisBusConfig  # noqa: E402

DAEMON = Path(__file__).with_name("bus_daemon.py")
STREAM = "quantum:stream:trade.intent"


class Daemon:
    """One bus_daemon.py process and the lines it printed."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lines: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self, url: str) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(DAEMON), url, stdout=asyncio.subprocess.PIPE
        )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode().strip())

    def decided(self) -> list[tuple[str, str]]:
        return [
            (parts[2], parts[3])
            for parts in (line.split() for line in self.lines)
            if parts[0] == "DECIDED"
        ]

    async def kill(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()
        if self._reader is not None:
            await self._reader

    async def terminate(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(self.proc.wait(), 15)
        if self._reader is not None:
            await self._reader


def bus_url(server_url: str, daemon: str) -> str:
    return (
        f"{server_url}?stream={STREAM}&group=pyquant&consumer={daemon}&daemon={daemon}"
        "&account=main&start=0&block_ms=100&claim_idle_ms=500&lease_ttl_ms=1000"
    )


@contextlib.asynccontextmanager
async def daemons(server_url: str, *names: str):
    started = [Daemon(n) for n in names]
    try:
        for d in started:
            await d.start(bus_url(server_url, d.name))
        yield started
    finally:
        for d in started:
            if d.proc is not None and d.proc.returncode is None:
                await d.kill()


def intent(i: int, symbol: str) -> dict[str, bytes]:
    return {"data": orjson.dumps({"id": f"i{i}", "symbol": symbol, "side": "BUY"})}


SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT", "XRPUSDT", "ADAUSDT"]


async def test_two_daemons_split_intents_by_owner_and_take_over_after_kill(
    redis_server, redis_client, wait_until
):
    async with daemons(redis_server.url, "host-a", "host-b") as (a, b):
        await wait_until(lambda: "READY" in a.lines and "READY" in b.lines, timeout_s=15)
        pipe = redis_client.pipeline(transaction=False)
        for i in range(60):
            pipe.xadd(STREAM, intent(i, SYMBOLS[i % len(SYMBOLS)]))
        await pipe.execute()
        await wait_until(lambda: len(a.decided()) + len(b.decided()) >= 60, timeout_s=15)

        decided = a.decided() + b.decided()
        # Symbols are placed by rendezvous hashing over the live daemons: both get a share.
        assert a.decided()
        assert b.decided()
        assert Counter(i for i, _ in decided) == Counter(f"i{i}" for i in range(60))
        # Every intent of a symbol was decided by the one daemon holding its lease.
        deciders: dict[str, set[str]] = {}
        for d in (a, b):
            for _, symbol in d.decided():
                deciders.setdefault(symbol, set()).add(d.name)
        for symbol in SYMBOLS:
            owner = (await redis_client.get(f"pyquant:main:lease:{symbol}")).decode()
            assert deciders[symbol] == {owner}, symbol

        # The decision events go out in the background: let them reach Redis before a kill -9
        # (events a killed process had not sent yet are lost; that is not what this tests).
        for _ in range(400):
            events = await redis_client.xrange("pyquant:events")
            if sum(f[b"type"] == b"decision" for _, f in events) >= 60:
                break
            await asyncio.sleep(0.05)

        # kill -9 the owner of BTCUSDT; the other daemon takes its symbols over.
        owner = (await redis_client.get("pyquant:main:lease:BTCUSDT")).decode()
        victim, survivor = (a, b) if owner == "host-a" else (b, a)
        victim_symbols = {s for _, s in victim.decided()}
        await victim.kill()
        for i in range(60, 72):
            await redis_client.xadd(STREAM, intent(i, SYMBOLS[i % len(SYMBOLS)]))
        await wait_until(
            lambda: {f"i{i}" for i in range(60, 72)} <= {i for i, _ in survivor.decided()},
            timeout_s=15,
        )
        taken = {line.split()[1] for line in survivor.lines if line.endswith(" takeover")}
        assert victim_symbols <= taken | {
            line.split()[1] for line in survivor.lines if line.startswith("ACQUIRE")
        }
        for symbol in SYMBOLS:
            assert (await redis_client.get(f"pyquant:main:lease:{symbol}")) == (
                survivor.name.encode()
            )
        all_decided = [i for i, _ in a.decided() + b.decided()]
        assert Counter(all_decided) == Counter(f"i{i}" for i in range(72))
        assert int((await redis_client.xpending(STREAM, "pyquant"))["pending"]) == 0

        # A clean stop releases the leases at once.
        await survivor.terminate()
        assert "STOPPED" in survivor.lines
        for symbol in SYMBOLS:
            assert await redis_client.get(f"pyquant:main:lease:{symbol}") is None
    events = await redis_client.xrange("pyquant:events")
    kinds = Counter(f[b"type"].decode() for _, f in events)
    assert kinds["decision"] == 72
    assert kinds["lease"] >= len(SYMBOLS)


async def test_malformed_flood_leaves_the_daemon_deciding(redis_server, redis_client, wait_until):
    async with daemons(redis_server.url, "host-a") as (a,):
        await wait_until(lambda: "READY" in a.lines, timeout_s=15)
        pipe = redis_client.pipeline(transaction=False)
        for i in range(300):
            if i % 10 == 0:
                pipe.xadd(STREAM, intent(i, "BTCUSDT"))
            else:
                pipe.xadd(STREAM, {"data": b"garbage %d" % i})
        await pipe.execute()
        await wait_until(
            lambda: (
                sum(line.startswith("REJECT") for line in a.lines) == 270 and len(a.decided()) == 30
            ),
            timeout_s=15,
        )
        assert a.proc is not None
        assert a.proc.returncode is None


def test_bus_url_parameters():
    config = RedisBusConfig.from_url(
        "redis://127.0.0.1:6379/0?stream=s&group=g&consumer=c1&account=acct&lease_ttl_ms=3000"
        "&events=acct:events&events_maxlen=5000"
    )
    assert (config.daemon_id, config.account, config.lease_ttl_ms) == ("c1", "acct", 3000)
    assert (config.events_stream, config.events_maxlen) == ("acct:events", 5000)
    assert RedisBusConfig.from_url("redis://127.0.0.1/0?leases=off&consumer=x").lease_ttl_ms is None
    # two daemons on one host: each its own consumer, named after the daemon
    a = RedisBusConfig.from_url("redis://127.0.0.1/0?daemon=host-a")
    b = RedisBusConfig.from_url("redis://127.0.0.1/0?daemon=host-b")
    assert (a.intents.consumer, b.intents.consumer) == ("host-a", "host-b")
    explicit = RedisBusConfig.from_url("redis://127.0.0.1/0?daemon=host-a&consumer=worker-1")
    assert (explicit.daemon_id, explicit.intents.consumer) == ("host-a", "worker-1")
    with pytest.raises(ConfigError, match=r"lease.ttl_ms was 10: must be from 100"):
        RedisBusConfig.from_url("redis://127.0.0.1/0?lease_ttl_ms=10&consumer=x")
    with pytest.raises(ConfigError, match=r"'leases' was 'maybe': must be on or off"):
        RedisBusConfig.from_url("redis://127.0.0.1/0?leases=maybe&consumer=x")


async def test_bus_delivers_to_the_daemons_intake(redis_server, wait_until):
    from pyquant.daemon.app import Intake
    from pyquant.scale.bus import RedisBus
    from pyquant.trading.guard import GuardDecision

    class Desk:
        def __init__(self) -> None:
            self.decided: list[str] = []
            self.malformed: list[tuple[str, str]] = []

        async def submit(self, intent, *, payload=None):
            self.decided.append(intent.intent_id)
            return GuardDecision(True, "accepted")

        def reject_malformed(self, source, payload, error):
            self.malformed.append((source, error))

    intake, desk = Intake(), Desk()
    intake.desk = desk  # type: ignore[assignment]
    config = RedisBusConfig.from_url(
        f"{redis_server.url}?daemon=host-a&account=main&start=0&block_ms=50&lease_ttl_ms=1000"
    )
    bus = RedisBus.for_sink(config, intake)
    task = asyncio.create_task(bus.run())
    try:
        await asyncio.wait_for(bus.intents.ready.wait(), 10)
        await bus.redis.xadd(STREAM, intent(1, "BTCUSDT"))
        await bus.redis.xadd(STREAM, {"data": b"{}"})
        # Intake closed (the daemon is stopping): the intent stays pending.
        await wait_until(lambda: bus.intents.stats.deferred >= 1 and desk.malformed)
        assert desk.decided == []
        assert desk.malformed == [("redis", "intent field 'symbol' was None: is required")]
        intake.open = True
        await wait_until(lambda: desk.decided == ["i1"])
        await wait_until(lambda: bus.owned() == {"BTCUSDT"})
    finally:
        bus.stop()
        await asyncio.wait_for(task, 10)
