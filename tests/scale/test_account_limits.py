"""Two `pyquant run` daemons racing eight symbols under an account-wide position limit.

Each daemon's config says ``max_open_positions = 3``. Before the ledger, two daemons let the
account reach six positions. Now the third entry anywhere fills the account: the other five
fail with the account limit's reason, nothing more reaches the exchange, and after a kill -9
the survivor adopts the victim's positions, rebuilds the ledger from them and still refuses a
new entry.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

redis_asyncio = pytest.importorskip("redis.asyncio")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from fleet import STREAM, bus_url, daemon, intent  # noqa: E402
from pq_harness import DaemonProcess, simulator, until, venue_env, write_config  # noqa: E402
from redis_server_proc import RedisServer  # noqa: E402

MARKS = {
    "BTCUSDT": "100000.0",
    "ETHUSDT": "2500.00",
    "BNBUSDT": "650.00",
    "SOLUSDT": "50.00",
    "XRPUSDT": "2.5000",
    "LTCUSDT": "90.00",
    "ADAUSDT": "0.70000",
    "LINKUSDT": "15.000",
}
LEDGER = "pyquant:default:ledger"


def limit_failures(*processes: DaemonProcess) -> int:
    """Intents refused for the position limit: by the ledger (account-wide, the entry fails
    before anything is sent) or by a daemon's own guard (it holds the limit itself)."""
    return sum(
        1
        for p in processes
        for line in p.lines
        if (
            "Entry failed" in str(line.get("msg", ""))
            and "account limit max_positions" in str(line.get("msg", ""))
        )
        or "decision=rejected reason=max_positions" in str(line.get("msg", ""))
    )


async def test_two_daemons_never_exceed_the_account_wide_position_limit(
    tmp_path: Path, redis_server: RedisServer, client: Any
) -> None:
    intents_file = tmp_path / "unused.jsonl"
    intents_file.touch()
    config = tmp_path / "pyquant.toml"
    async with simulator("hedge", symbols=list(MARKS)) as venue:
        exchange = venue.exchange
        for symbol, mark in MARKS.items():
            await venue.set_mark(symbol, mark)
        write_config(config, venue, intents_file)
        text = config.read_text().replace("[entries]\n", "[entries]\nmax_open_positions = 3\n")
        config.write_text(text)
        env = venue_env(venue)
        alpha = daemon(tmp_path, "alpha", config, env, bus_url(redis_server.port, "alpha"))
        beta = daemon(tmp_path, "beta", config, env, bus_url(redis_server.port, "beta"))
        await asyncio.gather(alpha.start(), beta.start())

        def open_legs() -> list[str]:
            return [s for s in MARKS if exchange.position(s, "LONG").amount != 0]

        try:
            await asyncio.gather(
                alpha.wait_logged("Daemon running"), beta.wait_logged("Daemon running")
            )
            pipe = client.pipeline(transaction=False)
            for symbol in MARKS:
                pipe.xadd(STREAM, intent(symbol, size_usd="100", id=f"race-1-{symbol}"))
            await pipe.execute()
            await until(lambda: limit_failures(alpha, beta) == 5, 40, "five entries refused")
            await until(lambda: len(open_legs()) == 3, 20, "three positions")
            ledger = await client.hgetall(LEDGER)
            assert sorted(k.decode().split("|")[0] for k in ledger) == sorted(open_legs())
            entries = [o for o in venue.order_log.orders if "-e0-" in str(o["clientOrderId"])]
            assert len(entries) == 3  # the refused five never reached the exchange

            # kill -9 one daemon that holds a position: the survivor adopts it and rebuilds
            # the ledger; the account is still full.
            owners = [await client.get(f"pyquant:default:lease:{s}") for s in open_legs()]
            victim, survivor = (alpha, beta) if b"alpha" in owners else (beta, alpha)
            survivor_id = "beta" if victim is alpha else "alpha"
            await victim.kill9()

            async def rebuilt() -> bool:
                values = (await client.hgetall(LEDGER)).values()
                return len(values) == 3 and all(
                    v.decode().split("|")[1] == survivor_id for v in values
                )

            for _ in range(400):
                if await rebuilt():
                    break
                await asyncio.sleep(0.05)
            assert await rebuilt()
            free = next(s for s in MARKS if s not in open_legs())
            before = limit_failures(survivor)
            await client.xadd(STREAM, intent(free, size_usd="100", id=f"race-2-{free}"))
            decided = f"Intent decided intent_id=race-2-{free}"
            await until(lambda: survivor.logged(decided), 30, "the new intent decided")
            # Refused (by the survivor's own guard, which counts the adopted legs now, or by
            # the ledger); either way nothing is sent.
            await until(lambda: limit_failures(survivor) == before + 1, 10, "refused")
            assert len(open_legs()) == 3
            entries = [o for o in venue.order_log.orders if "-e0-" in str(o["clientOrderId"])]
            assert len(entries) == 3
        finally:
            for process in (alpha, beta):
                if process.proc is not None and process.proc.returncode is None:
                    await process.kill9()
