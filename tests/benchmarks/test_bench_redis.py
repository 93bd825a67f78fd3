"""Redis scale-out: intents per second from XADD to a stored decision, and takeover time.

Intents: a batch of intents is XADDed (pipelined) to a fresh stream and the clock runs until
the last one's decision is in SQLite (pyquant's ``Store``, WAL, one commit per decision, the
duplicate check by intent id the guard does). Side by side in the same run:

- ``floor``: plain redis-py ``XREADGROUP`` + ``XACK`` with the same store write and no
  parsing, routing or events: the cost of Redis and SQLite alone;
- ``one consumer``: ``RedisIntentSource`` with its event publisher;
- ``two consumers``: two sources (two clients, two stores) in one consumer group, without
  leases;
- ``two daemons + leases``: two sources with lease managers over 8 symbols: each intent is
  decided by its symbol's owner, the other forwards it (Lua move to the owner's inbox).

All consumers share this process's one core; the two-consumer figures show the protocol's
overhead, not a second machine's throughput.

Takeover: a lease holder in its own process owns 10 symbols (TTL 1000 ms, renewal every
333 ms); it is killed with SIGKILL and the clock runs until the survivor owns all 10. Beside
it, the same with SIGTERM (clean stop: leases released, taken at the survivor's next scan).

With ``--benchmark-disable`` (the default suite) each runs once on a small batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

redis_asyncio = pytest.importorskip("redis.asyncio")

from pyquant.scale.events import EventPublisher  # noqa: E402
from pyquant.scale.leases import LeaseConfig, LeaseManager  # noqa: E402
from pyquant.scale.redis_intents import IntentStreamConfig, RedisIntentSource  # noqa: E402
from pyquant.trading.intents import Intent  # noqa: E402
from pyquant.trading.journal import Store  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "scale"))
from redis_server_proc import RedisServer  # noqa: E402

HOLDER = Path(__file__).parents[1] / "scale" / "lease_holder.py"
SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT", "XRPUSDT", "ADAUSDT", "DOGEUSDT", "DOTUSDT"]


@pytest.fixture
def server(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install -y redis-server)")
    srv = RedisServer(tmp_path)
    srv.start()
    yield srv
    srv.stop(kill=True)


class Decided:
    """The guard's duplicate check and the store write, counted."""

    def __init__(self, store: Store, counter: list[int], done: asyncio.Event, total: int) -> None:
        self.store, self.counter, self.done, self.total = store, counter, done, total

    async def decide(self, intent: Intent) -> bool:
        if self.store.intent_seen(intent.intent_id):
            self.store.record_intent_decision(intent, "rejected", "duplicate_intent")
            accepted = False
        else:
            self.store.record_intent_decision(intent, "accepted", "accepted")
            accepted = True
        self.counter[0] += 1
        if self.counter[0] >= self.total:
            self.done.set()
        return accepted


async def xadd_batch(client, stream: str, count: int, run: int) -> None:
    pipe = client.pipeline(transaction=False)
    for i in range(count):
        body = {"id": f"r{run}-{i}", "symbol": SYMBOLS[i % len(SYMBOLS)], "side": "BUY"}
        pipe.xadd(stream, {"data": orjson.dumps(body)})
    await pipe.execute()


async def floor_round(url: str, stores: list[Store], count: int, run: int) -> None:
    client = redis_asyncio.from_url(url)
    stream = f"bench:{run}"
    await client.xgroup_create(stream, "g", id="0", mkstream=True)
    await xadd_batch(client, stream, count, run)
    store, done = stores[0], 0
    while done < count:
        reply = await client.xreadgroup("g", "c", {stream: ">"}, count=64, block=100)
        for _, entries in reply:
            for entry_id, fields in entries:
                body = orjson.loads(fields[b"data"])
                intent = Intent(body["id"], body["symbol"], "BUY", 0.5, 1, "redis")
                store.record_intent_decision(intent, "accepted", "accepted")
                await client.xack(stream, "g", entry_id)
                done += 1
    await client.aclose()


async def sources_round(
    url: str, stores: list[Store], count: int, run: int, consumers: int, leases: bool
) -> None:
    stream = f"bench:{run}"
    counter, done = [0], asyncio.Event()
    clients = [redis_asyncio.from_url(url) for _ in range(consumers)]
    managers: list[LeaseManager] = []
    sources: list[RedisIntentSource] = []
    publishers: list[EventPublisher] = []
    for n, client in enumerate(clients):
        daemon = f"d{run}x{n}"
        router = None
        if leases:
            router = LeaseManager(
                client, LeaseConfig(daemon_id=daemon, account=f"a{run}", ttl_ms=5000)
            )
            await router.register()
            managers.append(router)
        events = EventPublisher(client, daemon_id=daemon, stream=f"ev:{run}")
        publishers.append(events)
        config = IntentStreamConfig(
            stream=stream, group="g", consumer=daemon, start_id="0", block_ms=50
        )
        decided = Decided(stores[n], counter, done, count)
        sources.append(
            RedisIntentSource(client, config, decide=decided.decide, events=events, router=router)
        )
    tasks = [asyncio.create_task(s.run()) for s in sources]
    tasks += [asyncio.create_task(p.run()) for p in publishers]
    tasks += [asyncio.create_task(m.run()) for m in managers]
    await asyncio.gather(*(s.ready.wait() for s in sources))
    await xadd_batch(clients[0], stream, count, run)
    await asyncio.wait_for(done.wait(), 120)
    for s in sources:
        s.stop()
    for m in managers:
        await m.stop()
    for p in publishers:
        p.stop()
    await asyncio.gather(*tasks)
    for c in clients:
        await c.aclose()


@pytest.mark.parametrize(
    ("name", "consumers", "leases"),
    [
        ("floor", 1, False),
        ("one consumer", 1, False),
        ("two consumers", 2, False),
        ("two daemons + leases", 2, True),
    ],
)
def test_bench_intents_per_second(benchmark, server, tmp_path, name, consumers, leases):
    benchmark.group = "redis intents: XADD -> stored decision"
    count = 200 if benchmark.disabled else 3000
    stores = [Store.open(tmp_path / f"journal{n}.sqlite") for n in range(consumers)]
    runs = iter(range(1000))

    def one_round() -> None:
        run = next(runs)
        if name == "floor":
            asyncio.run(floor_round(server.url, stores, count, run))
        else:
            asyncio.run(sources_round(server.url, stores, count, run, consumers, leases))

    benchmark.pedantic(one_round, rounds=1 if benchmark.disabled else 3, iterations=1)
    decided = sum(len(s.intent_decisions()) for s in stores)
    rounds = 1 if benchmark.disabled else 3
    assert decided == count * rounds
    # Each intent decided exactly once across the consumers.
    ids = [d["intent_id"] for s in stores for d in s.intent_decisions()]
    assert len(set(ids)) == len(ids)
    for s in stores:
        s.close()
    if benchmark.stats is not None:
        median = benchmark.stats.stats.median
        benchmark.extra_info["intents"] = count
        benchmark.extra_info["intents_per_s"] = round(count / median)


def spawn_holder(url: str, ttl_ms: int, symbols: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, str(HOLDER), url, "victim", str(ttl_ms), *symbols],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "READY"
    return proc


async def takeover_round(url: str, ttl_ms: int, how: str, symbols: list[str]) -> float:
    client = redis_asyncio.from_url(url)
    await client.flushdb()
    holder = await asyncio.to_thread(spawn_holder, url, ttl_ms, symbols)
    all_taken = asyncio.Event()
    taken: set[str] = set()

    async def on_acquire(symbol: str, reason: str) -> None:
        taken.add(symbol)
        if taken == set(symbols):
            all_taken.set()

    survivor = LeaseManager(
        client,
        LeaseConfig(daemon_id="survivor", account="main", ttl_ms=ttl_ms),
        on_acquire=on_acquire,
    )
    await survivor.register()
    task = asyncio.create_task(survivor.run())
    try:
        stopped = time.perf_counter()
        holder.send_signal(signal.SIGKILL if how == "kill -9" else signal.SIGTERM)
        await asyncio.to_thread(holder.wait)
        await asyncio.wait_for(all_taken.wait(), 10)
        took = time.perf_counter() - stopped
    finally:
        with contextlib.suppress(ProcessLookupError):
            holder.kill()
        await survivor.stop()
        await task
        await client.aclose()
    return took


@pytest.mark.parametrize("how", ["SIGTERM (clean stop)", "kill -9"])
def test_bench_takeover_after_stop(benchmark, server, how):
    benchmark.group = "redis leases: takeover of 10 symbols, TTL 1000 ms"
    symbols = [f"SYM{i}USDT" for i in range(10)]
    times: list[float] = []

    def one_round() -> None:
        times.append(asyncio.run(takeover_round(server.url, 1000, how, symbols)))

    benchmark.pedantic(one_round, rounds=1 if benchmark.disabled else 3, iterations=1)
    benchmark.extra_info["takeover_s"] = [round(t, 3) for t in times]
    # Within the TTL plus one renewal interval, plus process scheduling slack.
    assert max(times) < 1.0 + 1.0 / 3 + 1.0


# ---------------------------------------------------------------------------------------------
# The same measurement through real daemons: Daemon (desk, guard, sizing, SQLite journal,
# events) against the simulator, intents from Redis. The daemons and the simulator run in one
# background event loop for the whole benchmark, so each round times only XADD -> the last
# stored decision. Most intents are refused by the guard (their symbol's leg is open already),
# each after the mark and account reads sizing needs: the per-intent cost of a real decision.

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
from pq_harness import run_daemon, simulator  # noqa: E402

DAEMON_SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT", "XRPUSDT", "DOGEUSDT"]
MARKS = {
    "BTCUSDT": "100000.0",
    "ETHUSDT": "2500.00",
    "SOLUSDT": "150.000",
    "BNBUSDT": "600.000",
    "XRPUSDT": "2.2000",
    "DOGEUSDT": "0.200000",
}


class DaemonGroup:
    """A simulator and ``n`` daemons on one Redis, in a background event loop."""

    def __init__(self, url: str, n: int, state: Path) -> None:
        self.url, self.n, self.state = url, n, state
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.stack = contextlib.AsyncExitStack()
        self.daemons: list[Any] = []
        self.client: Any = None

    def call(self, coro: Any, timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        venue = await self.stack.enter_async_context(simulator("hedge"))
        for symbol, price in MARKS.items():
            await venue.set_mark(symbol, price)
        for i in range(self.n):
            url = f"{self.url}?stream=bench&group=g&daemon=d{i}&lease_ttl_ms=5000&block_ms=50"
            running = await self.stack.enter_async_context(
                run_daemon(
                    venue,
                    self.state / f"d{i}",
                    sources={"redis_url": url},
                    entries={"max_intent_age_s": 3600.0},
                )
            )
            self.daemons.append(running.daemon)
        for daemon in self.daemons:
            await daemon.membership.bus.ready.wait()
        self.client = redis_asyncio.from_url(self.url)

    def start(self) -> None:
        self.thread.start()
        self.call(self._start())

    async def decided_ids(self) -> list[str]:
        # SQLite connections belong to the loop's thread: read them there.
        return [d["intent_id"] for x in self.daemons for d in x.desk.store.intent_decisions()]

    def decided(self) -> int:
        return sum(len(d.desk.store.intent_decisions()) for d in self.daemons)

    async def _round(self, count: int, run: int) -> None:
        target = self.decided() + count
        pipe = self.client.pipeline(transaction=False)
        for i in range(count):
            symbol = DAEMON_SYMBOLS[i % len(DAEMON_SYMBOLS)]
            pipe.xadd("bench", {"id": f"r{run}-{i}", "symbol": symbol, "side": "BUY"})
        await pipe.execute()
        while self.decided() < target:  # noqa: ASYNC110 - the decisions land in SQLite
            await asyncio.sleep(0.001)

    def round(self, count: int, run: int) -> None:
        self.call(self._round(count, run))

    async def _stop(self) -> None:
        await self.client.aclose()
        await self.stack.aclose()

    def stop(self) -> None:
        self.call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.mark.parametrize("daemons", [1, 2])
def test_bench_daemon_intents_per_second(benchmark, server, tmp_path, daemons):
    benchmark.group = "redis intents through real daemons: XADD -> stored decision"
    count = 60 if benchmark.disabled else 600
    group = DaemonGroup(server.url, daemons, tmp_path)
    group.start()
    runs = iter(range(1000))
    try:
        benchmark.pedantic(
            lambda: group.round(count, next(runs)),
            rounds=1 if benchmark.disabled else 3,
            iterations=1,
        )
        rounds = 1 if benchmark.disabled else 3
        ids = group.call(group.decided_ids())
        assert len(ids) == count * rounds
        assert len(set(ids)) == len(ids)  # each decided once, by one daemon
        if daemons == 2:
            owners = [frozenset(d.membership.owned()) for d in group.daemons]
            assert not owners[0] & owners[1]
    finally:
        group.stop()
    if benchmark.stats is not None:
        benchmark.extra_info["intents"] = count
        benchmark.extra_info["intents_per_s"] = round(count / benchmark.stats.stats.median)
