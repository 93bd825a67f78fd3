"""Seeded chaos soak: the daemon under kill -9, bad input, faults and a flatten, checked live.

One run serves the simulator in this process (so its own view is at hand) with faults on,
runs ``pyquant run`` as a child process on a state directory with a JSONL intents file, and
for ``steps`` seeded steps does one of: append good intents, append bad ones (the inputs
that crashed or fooled the intake in issue 17), move a mark, or kill -9 the daemon at a
random moment and start it again. Half-way it runs ``pyquant flatten`` beside the live
daemon, feeds intents while halted, and ``pyquant resume``. After every restart and at the
end it checks, against the simulator and the journal:

* every open leg has exactly one stop of ours (after the daemon settles);
* no client order id was sent twice for an entry, no intent was filled twice;
* no accepted intent was lost: every good line in the file got a decision, and an
  accepted one either reached the venue or was decided again after the restart;
* nothing was opened while halted: no entry order between the halt and the resume, every
  intent decided then was refused as ``halted``;
* the intake survived every bad line (the last good intent is decided).

``python3 tests/chaos/soak.py --steps 200 --seed 7`` (``make chaos``) runs the long soak in
both position modes and prints a report; ``tests/chaos/test_chaos.py`` runs a short seeded
one in the suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

# The daemon's command line and the simulator's credentials: the integration tests' harness.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from pq_harness import run_args, venue_env

import pyquant.sim
from pyquant.sim.server import Venue
from pyquant.trading.journal import UNSENT_ENTRY_DETAIL, Store

SYMBOLS = {"ETHUSDT": Decimal("2500.00"), "BTCUSDT": Decimal("30000.0")}
TICK = {"ETHUSDT": Decimal("0.01"), "BTCUSDT": Decimal("0.1")}

# The inputs that crashed, stopped or fooled the intake (issue 17, items 3 to 6 and 13).
BAD_LINES = [
    "[" * 30000 + "]" * 30000,
    '{"id": "b-huge", "symbol": "ETHUSDT", "side": "BUY", "size_usd": ' + "1" * 5000 + "}",
    " " * 300_000 + '{"id": "b-tail", "symbol": "ETHUSDT", "side": "BUY", "size_usd": "300"}',
    '{"id": "b-fw", "symbol": "ETHUSDT", "side": "BUY", "size_usd": "３００"}',  # noqa: RUF001
    '{"id": "b-us", "symbol": "ETHUSDT", "side": "BUY", "size_usd": "3_0_0"}',
    '{"id": "b-ts", "symbol": "ETHUSDT", "side": "BUY", "created_at_ms": 9223372036854775808}',
    '{"id": "b-ts2", "symbol": "ETHUSDT", "side": "BUY", "created_at_ms": 1e300}',
    '{"id": "b-nl\\n", "symbol": "ETHUSDT", "side": "BUY"}',
    "{not json",
    '{"id": "b-side", "symbol": "ETHUSDT", "side": "UP"}',
]
# Bad lines whose id must never be executed (the tail of the long line, the full-width size).
NEVER_EXECUTED = {"b-tail", "b-fw", "b-us", "b-ts", "b-ts2", "b-nl", "b-huge", "b-side"}


@dataclass
class SoakReport:
    """What one soak run did and found."""

    mode: str
    seed: int
    kills: int = 0
    good_intents: int = 0
    bad_lines: int = 0
    marks_moved: int = 0
    flattens: int = 0
    checks: int = 0
    violations: list[str] = field(default_factory=list)

    def line(self) -> str:
        """Return a one-line summary."""
        state = "CLEAN" if not self.violations else f"{len(self.violations)} VIOLATION(S)"
        return (
            f"mode={self.mode} seed={self.seed}: {self.kills} kill -9 points, "
            f"{self.good_intents} good intents, {self.bad_lines} bad lines, "
            f"{self.marks_moved} mark moves, {self.flattens} flatten(s), "
            f"{self.checks} invariant checks: {state}"
        )


def write_config(path: Path, venue: Venue, intents: Path) -> None:
    """The daemon's TOML config against the in-process simulator."""
    path.write_text(
        f"""
exchange = "custom"
[venue]
rest_url = "{venue.rest_url}"
ws_url = "{venue.ws_url}/market"
user_ws_url = "{venue.ws_url}/private"
[market]
symbols = {json.dumps(sorted(SYMBOLS))}
warmup_bars = 30
stale_after_s = 600.0
backoff_initial_s = 0.05
backoff_max_s = 0.5
[sources]
demo = false
jsonl = "{intents}"
[entries]
sizing = "notional"
notional_usdt = "300"
leverage = 5
cooldown_s = 0.0
max_intent_age_s = 3600.0
max_open_positions = 10
[router]
backstop_throttle_s = 0.0
[daemon]
snapshot_interval_s = 0.2
[exit]
preset = "none"
fallback_stop_pct = 0.02
min_stop_pct = 0.001
max_stop_pct = 0.05
ladder = [{{ at = 0.01, fraction = 0.5 }}, {{ at = 0.02, fraction = 0.5 }}]
ladder_unit = "pct"
trail_pct = 0.01
trail_after_level = 1
"""
    )


class Child:
    """``pyquant run`` as a child process; its log lines kept for the report."""

    def __init__(self, config: Path, state: Path, env: dict[str, str], log: Path) -> None:
        self.args = run_args(config, state)
        self.env = env
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None
        self.running = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.running.clear()
        self.proc = await asyncio.create_subprocess_exec(
            *self.args,
            env=self.env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.ensure_future(self._read(self.proc))

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        with self.log.open("ab") as out:
            async for raw in proc.stderr:
                out.write(raw)
                if b"Daemon running" in raw:
                    self.running.set()

    async def wait_running(self, limit_s: float = 60.0) -> None:
        waiter = asyncio.ensure_future(self.running.wait())
        assert self.proc is not None
        ended = asyncio.ensure_future(self.proc.wait())
        await asyncio.wait({waiter, ended}, timeout=limit_s, return_when="FIRST_COMPLETED")
        waiter.cancel()
        ended.cancel()
        if not self.running.is_set():
            raise AssertionError(
                f"daemon did not start (exit {self.proc.returncode}); see {self.log}"
            )

    async def kill9(self) -> None:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        if self._reader is not None:
            await self._reader

    async def terminate(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.proc.wait(), 60)
        if self._reader is not None:
            await self._reader
        return code


async def _cli(*args: str, env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pyquant",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


def _stop_leg(algo: Any, hedge: bool) -> str:
    if hedge:
        return str(algo.position_side)
    return "LONG" if algo.side == "SELL" else "SHORT"


def open_legs(venue: Venue) -> dict[tuple[str, str], Decimal]:
    """The simulator's open legs: (symbol, LONG/SHORT) -> amount."""
    legs: dict[tuple[str, str], Decimal] = {}
    for (symbol, side), position in venue.exchange.positions.items():
        if position.amount == 0:
            continue
        leg = side if side in ("LONG", "SHORT") else ("LONG" if position.amount > 0 else "SHORT")
        legs[(symbol, leg)] = position.amount
    return legs


def stop_problems(venue: Venue, hedge: bool) -> list[str]:
    """Legs without exactly one stop of ours, per the simulator."""
    ours: dict[tuple[str, str], list[str]] = {}
    for algo in venue.exchange.open_algo_orders():
        if algo.client_algo_id.startswith("pq") and algo.order_type in (
            "STOP_MARKET",
            "STOP",
        ):
            ours.setdefault((algo.symbol, _stop_leg(algo, hedge)), []).append(algo.client_algo_id)
    problems = []
    for leg, amount in open_legs(venue).items():
        stops = ours.get(leg, [])
        if len(stops) != 1:
            problems.append(f"leg {leg} of {amount} has {len(stops)} stop(s) {stops}")
    return problems


async def settle(venue: Venue, hedge: bool, limit_s: float) -> list[str]:
    """Wait until every open leg has exactly one stop; return what is still wrong."""
    deadline = time.monotonic() + limit_s
    problems = stop_problems(venue, hedge)
    while problems and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        problems = stop_problems(venue, hedge)
    return problems


def journal_problems(state: Path, venue: Venue, good_ids: list[str]) -> list[str]:
    """Check the journal against the simulator (see the module docstring)."""
    problems: list[str] = []
    store = Store.open(state / "pyquant.sqlite")
    try:
        rows = store.intent_decisions()
        by_id: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            if row["intent_id"] is not None and row["symbol"] is not None:
                by_id.setdefault(str(row["intent_id"]), []).append(row)
        entry_orders = store.orders(kind="entry")
        sent = {row.position_id for row in entry_orders}
        for intent_id in good_ids:
            decided = by_id.get(intent_id)
            if not decided:
                problems.append(f"intent {intent_id} never decided")
                continue
            last = decided[-1]
            accepted = [row for row in decided if row["decision"] == "accepted"]
            if len(accepted) > 1:
                executed = [row for row in accepted if row["position_id"] in sent]
                if len(executed) > 1:
                    problems.append(f"intent {intent_id} executed {len(executed)} times")
            if last["decision"] == "accepted" and last["position_id"] not in sent:
                position = store.get_position(str(last["position_id"]))
                if position is not None and position.status == "closed":
                    reason = position.close_reason or ""
                    if UNSENT_ENTRY_DETAIL in reason:
                        problems.append(f"intent {intent_id} accepted, never sent, not re-decided")
        for bad in NEVER_EXECUTED:
            if any(row["decision"] == "accepted" for row in by_id.get(bad, [])):
                problems.append(f"bad line {bad} was accepted")
        # nothing opened while halted
        halts = store._db.execute("SELECT set_at_ms, cleared_at_ms FROM halts").fetchall()
        for set_at, cleared_at in halts:
            end = cleared_at if cleared_at is not None else 2**62
            for row in entry_orders:
                if set_at <= row.created_at_ms < end:
                    problems.append(f"entry {row.client_order_id} sent while halted")
            for row in rows:
                if row["decision"] == "accepted" and set_at <= row["decided_at_ms"] < end:
                    problems.append(f"intent {row['intent_id']} accepted while halted")
        # no entry client order id filled twice on the venue
        filled: dict[str, int] = {}
        for order in venue.exchange.orders.values():
            if order.client_order_id.startswith("pq") and order.executed_qty > 0:
                filled[order.client_order_id] = filled.get(order.client_order_id, 0) + 1
        problems += [f"order {cid} filled {n} times" for cid, n in filled.items() if n > 1]
        per_position: dict[str, int] = {}
        for cid in filled:
            parts = cid.split("-")
            if len(parts) >= 3 and parts[2].startswith("e"):
                per_position[parts[1]] = per_position.get(parts[1], 0) + 1
        problems += [
            f"position {pid} filled {n} entries" for pid, n in per_position.items() if n > 1
        ]
    finally:
        store.close()
    return problems


async def soak(
    workdir: Path,
    *,
    mode: str,
    seed: int,
    steps: int,
    settle_s: float = 30.0,
    order_faults: bool = True,
) -> SoakReport:
    """Run one seeded soak in ``workdir``; return its report (violations listed, not raised).

    ``order_faults`` adds 503s with unknown outcomes on 5 % of orders (the long soak); without
    it every REST reply is only delayed (the suite's short run, which must not depend on
    the router's handling of every unknown outcome to stay deterministic).
    """
    rng = random.Random(seed)
    hedge = mode == "hedge"
    report = SoakReport(mode, seed)
    workdir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - set-up, before the loop runs
    intents = workdir / "intents.jsonl"
    intents.touch(mode=0o600)
    state = workdir / "state"
    config = workdir / "pyquant.toml"
    log = workdir / "daemon.log"
    good_ids: list[str] = []
    async with pyquant.sim.serve(speed=0, position_mode=mode, seed=seed) as venue:
        marks = dict(SYMBOLS)
        for symbol, price in marks.items():
            await venue.set_mark(symbol, price)
        write_config(config, venue, intents)
        env = venue_env(venue)
        # Every REST reply is late; with order_faults some orders also get a 503 whose
        # outcome is unknown (half of them executed anyway), which the router must resolve.
        if order_faults:
            venue.set_faults(delay_ms=5, order_error_rate=0.05, order_error="503")
        else:
            venue.set_faults(delay_ms=5)
        child = Child(config, state, env, log)
        await child.start()
        await child.wait_running()

        def append(lines: list[str]) -> None:
            with intents.open("a", encoding="utf-8") as handle:
                for line in lines:
                    handle.write(line + "\n")

        def good_line() -> str:
            intent_id = f"g{seed}-{len(good_ids)}"
            good_ids.append(intent_id)
            report.good_intents += 1
            return json.dumps(
                {
                    "id": intent_id,
                    "symbol": rng.choice(sorted(SYMBOLS)),
                    "side": rng.choice(["BUY", "SELL"]),
                    "size_usd": str(rng.choice([150, 200, 300])),
                }
            )

        async def check(why: str) -> None:
            report.checks += 1
            for problem in await settle(venue, hedge, settle_s):
                report.violations.append(f"after {why}: {problem}")

        # every bad input once at the start (and more at random later), good ones behind
        append([*BAD_LINES, good_line()])
        report.bad_lines += len(BAD_LINES)
        halfway = steps // 2
        for step in range(steps):
            if step == halfway:
                code, out = await _cli(
                    "flatten", "--config", str(config), "--state", str(state), "--yes", env=env
                )
                report.flattens += 1
                (workdir / f"flatten-{report.flattens}.txt").write_text(out)
                if code != 0:
                    report.violations.append(f"flatten exit {code}: {out[-500:]}")
                if open_legs(venue):
                    report.violations.append(f"open after flatten: {open_legs(venue)}")
                append([good_line() for _ in range(2)])  # refused while halted
                await asyncio.sleep(1.0)
                code, out = await _cli("resume", "--state", str(state), env=env)
                if code != 0:
                    report.violations.append(f"resume exit {code}: {out[-500:]}")
                continue
            action = rng.random()
            if action < 0.35:
                append([good_line() for _ in range(rng.randint(1, 3))])
            elif action < 0.5:
                bad = rng.sample(BAD_LINES, rng.randint(1, 3))
                append(bad)
                report.bad_lines += len(bad)
            elif action < 0.75:
                symbol = rng.choice(sorted(SYMBOLS))
                move = Decimal(rng.randint(-250, 250)) / Decimal(10_000)
                price = (marks[symbol] * (1 + move) / TICK[symbol]).to_integral_value()
                await venue.set_mark(symbol, price * TICK[symbol])
                report.marks_moved += 1
            else:
                append([good_line() for _ in range(rng.randint(0, 2))])
                await asyncio.sleep(rng.uniform(0.0, 0.5))
                await child.kill9()
                report.kills += 1
                await child.start()
                await child.wait_running()
                await check(f"kill -9 #{report.kills} (step {step})")
            await asyncio.sleep(rng.uniform(0.05, 0.3))
        # the last line is good: the intake must still be reading after all of the above
        append([good_line()])
        store_path = state / "pyquant.sqlite"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with _Reader(store_path) as reader:
                if reader.decided(good_ids[-1]):
                    break
            await asyncio.sleep(0.2)
        await check("the end")
        venue.set_faults()
        code = await child.terminate()
        if code != 0:
            report.violations.append(f"daemon exit {code} at the end; see {log}")
        report.violations += journal_problems(state, venue, good_ids)
    return report


class _Reader:
    """A short-lived read of the journal (the daemon keeps writing it)."""

    def __init__(self, path: Path) -> None:
        self.store = Store.open(path)

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.store.close()

    def decided(self, intent_id: str) -> bool:
        return bool(self.store.intent_decisions(intent_id))


def main(argv: list[str] | None = None) -> int:
    """``make chaos``: the long soak in both position modes; exit 1 on any violation."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--modes", default="one-way,hedge")
    parser.add_argument("--workdir", type=Path, default=Path("chaos-runs"))
    args = parser.parse_args(argv)
    failed = 0
    for mode in args.modes.split(","):
        report = asyncio.run(
            soak(args.workdir / f"{mode}-{args.seed}", mode=mode, seed=args.seed, steps=args.steps)
        )
        print(report.line())
        for violation in report.violations:
            print(f"  VIOLATION {violation}")
        failed += bool(report.violations)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
