"""Seeded multi-daemon soak of the Redis scale-out, checked against the simulator's order log.

Several ``pyquant run --intents redis://...`` daemons share one simulated hedge-mode account
and one Redis (append-only file). A seeded sequence of steps hits them: intent bursts, a limit
race (an intent on every symbol at once), bad stream entries, kill -9 of a daemon (restarted on
its journal), kill -9 of Redis (restarted from its AOF), ``CLIENT PAUSE`` longer than the lease
TTL, and price moves that run exits. After each step the soak waits until the intent stream is
drained and the venue is quiet, then checks:

- limits: never more open legs on the exchange than ``max_open_positions`` (account-wide);
- no naked leg: every open leg has a closePosition stop on the exchange;
- one owner: every open leg's symbol is leased to a live daemon, and no intent was accepted
  by two daemons;
- no entry twice: no more entry orders reached the exchange than intents were accepted;
- none pending: the stream group and every inbox are empty.

Stops left on flat legs or extra stops on a leg (issue 18 item 2, the stale stop after a
takeover) are counted and printed; ``--strict-stops`` turns them into failures.

Run: ``make chaos-redis`` (``SEED``, ``STEPS``, ``DAEMONS``), or
``python3 tests/scale/chaos_redis.py --seed 7 --steps 40 --daemons 3``. The suite runs a short
version (``test_chaos_redis.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "integration")]

import orjson  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402
from pq_harness import DaemonProcess, simulator, venue_env, write_config  # noqa: E402
from redis_server_proc import RedisServer  # noqa: E402

STREAM = "quantum:stream:trade.intent"
EVENTS = "pyquant:events"
TTL_MS = 1500
MAX_POSITIONS = 3
MARKS = {
    "BTCUSDT": "100000.0",
    "ETHUSDT": "2500.00",
    "BNBUSDT": "650.00",
    "XRPUSDT": "2.5000",
    "ADAUSDT": "0.70000",
    "LINKUSDT": "15.000",
}
KINDS = ("intents", "race", "bad", "kill", "redis_restart", "pause", "move")
BAD_ENTRIES: list[dict[bytes, bytes]] = [
    {
        b"data": b'{"symbol":"BTCUSDT","side":"BUY"}',
        **{f"x{i}".encode(): b"1" for i in range(5000)},
    },
    {b"\xff\x00": b"x", b"symbol": b"BTCUSDT", b"side": b"BUY"},
    {b"symbol": "ß".encode(), b"side": b"BUY"},
    {b"symbol": b"NOSUCHUSDT", b"side": b"BUY"},
    {b"symbol": b"ETHUSDT", b"side": b"BUY", b"timestamp": b"1e300"},
    {b"data": b'{"symbol":"ETHUSDT","side":"SELL","created_at_ms":1e19}'},
    {b"data": b"{not json"},
]


@dataclass
class Findings:
    """What the soak saw; ``violations`` must stay empty."""

    steps: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    stale_stops: int = 0
    stale_detail: list[str] = field(default_factory=list)
    max_open_legs: int = 0
    intents: int = 0
    bad_entries: int = 0


class Soak:
    """One seeded run; see the module docstring."""

    def __init__(self, root: Path, seed: int, daemons: int) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.names = [f"d{i}" for i in range(daemons)]
        self.findings = Findings()
        self.redis_server = RedisServer(root / "redis", aof=True)
        self.procs: dict[str, DaemonProcess] = {}
        self.client: Any = None
        self.venue: Any = None
        self.env: dict[str, str] = {}
        self._seq = 0

    def url(self, name: str) -> str:
        return (
            f"{self.redis_server.url}?stream={STREAM}&group=pyquant&daemon={name}"
            f"&lease_ttl_ms={TTL_MS}&start=0&claim_idle_ms=3000"
        )

    def _daemon(self, name: str) -> DaemonProcess:
        process = DaemonProcess(
            self.root / "pyquant.toml", self.root / name, self.env, self.root / f"{name}.json"
        )
        process.args += ["--intents", self.url(name)]
        return process

    async def run(self, steps: list[str]) -> Findings:
        (self.root / "redis").mkdir(parents=True, exist_ok=True)
        self.redis_server.start()
        self.client = aioredis.from_url(self.redis_server.url, socket_timeout=5)
        try:
            async with simulator("hedge", symbols=list(MARKS)) as venue:
                self.venue = venue
                for symbol, mark in MARKS.items():
                    await venue.set_mark(symbol, mark)
                intents = self.root / "unused.jsonl"
                intents.touch()
                config = self.root / "pyquant.toml"
                write_config(config, venue, intents)
                text = config.read_text().replace(
                    "[entries]\n", f"[entries]\nmax_open_positions = {MAX_POSITIONS}\n"
                )
                config.write_text(text)
                self.env = venue_env(venue)
                for name in self.names:
                    self.procs[name] = self._daemon(name)
                await asyncio.gather(*(p.start() for p in self.procs.values()))
                await asyncio.gather(
                    *(p.wait_logged("Daemon running", 60) for p in self.procs.values())
                )
                try:
                    for kind in steps:
                        self.findings.steps.append(kind)
                        await getattr(self, f"step_{kind}")()
                        await self.quiesce(kind)
                        await self.check(kind)
                finally:
                    for process in self.procs.values():
                        if process.proc is not None and process.proc.returncode is None:
                            await process.kill9()
        finally:
            await self.client.aclose()
            self.redis_server.stop(kill=True)
        return self.findings

    # ------------------------------------------------------------------ steps

    async def _xadd(self, fields: dict[Any, Any]) -> None:
        for _ in range(200):  # Redis may be restarting or paused
            try:
                await self.client.xadd(STREAM, fields)
                return
            except (aioredis.ConnectionError, aioredis.TimeoutError, OSError):
                await asyncio.sleep(0.05)
        raise AssertionError("Redis did not take an entry for 10 s")

    async def _intent(self, symbol: str) -> None:
        self._seq += 1
        self.findings.intents += 1
        await self._xadd(
            {
                "id": f"soak-{self._seq}",
                "symbol": symbol,
                "side": self.rng.choice(["BUY", "SELL"]),
                "confidence": "0.8",
                "leverage": "5",
                "position_size_usd": "100",
            }
        )

    async def step_intents(self) -> None:
        for _ in range(self.rng.randint(1, 4)):
            await self._intent(self.rng.choice(sorted(MARKS)))

    async def step_race(self) -> None:
        symbols = sorted(MARKS)
        self.rng.shuffle(symbols)
        for symbol in symbols:
            await self._intent(symbol)

    async def step_bad(self) -> None:
        for entry in self.rng.sample(BAD_ENTRIES, k=4):
            self.findings.bad_entries += 1
            await self._xadd(entry)
        await self._intent(self.rng.choice(sorted(MARKS)))

    async def step_kill(self) -> None:
        name = self.rng.choice(self.names)
        await self.procs[name].kill9()
        await self._intent(self.rng.choice(sorted(MARKS)))
        self.procs[name] = self._daemon(name)
        await self.procs[name].start()
        await self.procs[name].wait_logged("Daemon running", 60)

    async def step_redis_restart(self) -> None:
        self.redis_server.restart(kill=True)
        await self._intent(self.rng.choice(sorted(MARKS)))

    async def step_pause(self) -> None:
        await self.client.execute_command("CLIENT", "PAUSE", str(TTL_MS + 1000))
        await self._intent(self.rng.choice(sorted(MARKS)))

    async def step_move(self) -> None:
        symbol = self.rng.choice(sorted(MARKS))
        base = Decimal(MARKS[symbol])
        factor = Decimal(self.rng.choice(["0.97", "1.03"]))
        places = -base.as_tuple().exponent  # type: ignore[operator]
        await self.venue.step(1000)
        await self.venue.set_mark(symbol, str(round(base * factor, places)))
        await self.venue.step(1000)
        await self.venue.set_mark(symbol, MARKS[symbol])

    # ------------------------------------------------------------------ waiting and checks

    async def _drained(self) -> bool:
        try:
            groups = await self.client.xinfo_groups(STREAM)
            for group in groups:
                if int(group.get("pending") or 0) or int(group.get("lag") or 0):
                    return False
            for inbox in await self.client.keys("pyquant:default:inbox:*"):
                if await self.client.xlen(inbox):
                    return False
        except (aioredis.ConnectionError, aioredis.TimeoutError, OSError):
            return False
        return True

    async def quiesce(self, kind: str) -> None:
        deadline = time.monotonic() + 90
        quiet_since = time.monotonic()
        seen = len(self.venue.order_log)
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            if len(self.venue.order_log) != seen:
                seen = len(self.venue.order_log)
                quiet_since = time.monotonic()
                continue
            if time.monotonic() - quiet_since >= 2.0 and await self._drained():
                return
        self.findings.violations.append(f"after {kind}: stream not drained in 90 s")

    async def check(self, kind: str) -> None:
        exchange = self.venue.exchange
        legs = [
            (s, leg) for s in MARKS for leg in ("LONG", "SHORT") if exchange.position(s, leg).amount
        ]
        self.findings.max_open_legs = max(self.findings.max_open_legs, len(legs))
        if len(legs) > MAX_POSITIONS:
            self.findings.violations.append(f"after {kind}: {len(legs)} open legs {legs}")
        algos = exchange.open_algo_orders()
        stops: Counter[tuple[str, str]] = Counter(
            (str(a.symbol), str(a.position_side)) for a in algos
        )
        for leg in legs:
            if stops[leg] == 0:
                self.findings.violations.append(f"after {kind}: {leg} has no stop")
        self.findings.stale_stops = sum(
            n - 1 if leg in legs else n for leg, n in stops.items() if n > (leg in legs)
        )
        self.findings.stale_detail = [
            f"{a.symbol} {a.position_side} {a.client_algo_id} trigger {a.trigger_price} "
            f"({'open' if (a.symbol, a.position_side) in legs else 'flat'} leg, "
            f"{stops[(a.symbol, a.position_side)]} stops)"
            for a in algos
            if stops[(a.symbol, a.position_side)] > ((a.symbol, a.position_side) in legs)
        ]
        live = set()
        for name in self.names:
            if await self.client.exists(f"pyquant:default:member:{name}"):
                live.add(name)
        for symbol in {s for s, _ in legs}:
            owner = await self.client.get(f"pyquant:default:lease:{symbol}")
            if owner is None or owner.decode() not in live:
                self.findings.violations.append(f"after {kind}: {symbol} has no live owner")
        accepted: dict[str, set[str]] = {}
        for _, fields in await self.client.xrange(EVENTS):
            if fields.get(b"type") != b"decision":
                continue
            event = orjson.loads(fields[b"event"])
            if event["payload"].get("accepted"):
                accepted.setdefault(event["payload"]["intent_id"], set()).add(event["daemon_id"])
        twice = {i: d for i, d in accepted.items() if len(d) > 1}
        if twice:
            self.findings.violations.append(f"after {kind}: accepted by two daemons {twice}")
        entries = {
            str(o["clientOrderId"]).rsplit("-", 1)[0]
            for o in self.venue.order_log.orders
            if "-e0-" in str(o.get("clientOrderId", ""))
        }
        if len(entries) > len(accepted):
            self.findings.violations.append(
                f"after {kind}: {len(entries)} entries sent for {len(accepted)} accepted intents"
            )


def plan(seed: int, steps: int) -> list[str]:
    """Return the seeded step sequence: every kind once (shuffled), then random kinds."""
    rng = random.Random(seed)
    first = list(KINDS)
    rng.shuffle(first)
    return (first + [rng.choice(KINDS) for _ in range(max(0, steps - len(first)))])[:steps]


async def soak(root: Path, seed: int, steps: int, daemons: int) -> Findings:
    """Run one soak in ``root``; return its findings."""
    return await Soak(root, seed, daemons).run(plan(seed, steps))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--daemons", type=int, default=3)
    parser.add_argument("--strict-stops", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pyquant-chaos-") as tmp:
        findings = asyncio.run(soak(Path(tmp), args.seed, args.steps, args.daemons))
    print(f"steps: {' '.join(findings.steps)}")
    print(
        f"intents {findings.intents}, bad entries {findings.bad_entries}, "
        f"max open legs {findings.max_open_legs} (limit {MAX_POSITIONS}), "
        f"stale stops {findings.stale_stops}"
    )
    for line in findings.stale_detail:
        print(f"stale stop: {line}")
    for violation in findings.violations:
        print(f"VIOLATION {violation}")
    failed = bool(findings.violations) or (args.strict_stops and findings.stale_stops > 0)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
