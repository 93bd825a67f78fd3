"""A returning daemon gets its symbol back from a running peer, position and all.

alpha runs alone and opens BTCUSDT and ETHUSDT. beta (ETHUSDT's preferred daemon) starts; two
TTLs later alpha hands ETHUSDT over: its fence closes, its desk hands the position over
without sending anything, beta adopts it, puts its own backstop in and only then retires
alpha's. The position never goes without a stop and nothing is sent twice.
"""

from __future__ import annotations

import asyncio
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

redis_asyncio = pytest.importorskip("redis.asyncio")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from fleet import STREAM, bus_url, daemon, intent, messages  # noqa: E402
from pq_harness import simulator, until, venue_env, write_config  # noqa: E402
from redis_server_proc import RedisServer  # noqa: E402

from pyquant.scale.leases import _rendezvous  # noqa: E402


async def test_a_joining_daemon_gets_its_symbol_handed_over_with_the_position(
    tmp_path: Path, redis_server: RedisServer, client: Any
) -> None:
    assert _rendezvous({"alpha", "beta"}, "BTCUSDT") == "alpha"
    assert _rendezvous({"alpha", "beta"}, "ETHUSDT") == "beta"
    intents_file = tmp_path / "unused.jsonl"
    intents_file.touch()
    config = tmp_path / "pyquant.toml"
    async with simulator("hedge") as venue:
        exchange = venue.exchange
        await venue.set_mark("BTCUSDT", "100000.0")
        await venue.set_mark("ETHUSDT", "2500.00")
        write_config(config, venue, intents_file)
        env = venue_env(venue)
        alpha = daemon(tmp_path, "alpha", config, env, bus_url(redis_server.port, "alpha"))
        beta = daemon(tmp_path, "beta", config, env, bus_url(redis_server.port, "beta"))
        try:
            await alpha.start()
            await alpha.wait_logged("Daemon running")
            await client.xadd(STREAM, intent("BTCUSDT"))
            await client.xadd(STREAM, intent("ETHUSDT"))
            for symbol, amount in (("BTCUSDT", "0.005"), ("ETHUSDT", "0.200")):
                await until(
                    lambda s=symbol, a=amount: exchange.position(s, "LONG").amount == Decimal(a),
                    20,
                    symbol,
                )
                await until(lambda s=symbol: len(exchange.open_algo_orders(s)) == 1, 20, "stop")
            alpha_stop = exchange.open_algo_orders("ETHUSDT")[0]
            assert await client.get("pyquant:default:lease:ETHUSDT") == b"alpha"
            orders_before = [e["clientOrderId"] for e in venue.order_log.orders]

            await beta.start()
            await beta.wait_logged("Daemon running")
            await until(
                lambda: any(
                    "Symbol reconciled" in m and "symbol=ETHUSDT reason=handed" in m
                    for m in messages(beta)
                ),
                30,
                "beta adopts ETHUSDT",
            )
            assert await client.get("pyquant:default:lease:ETHUSDT") == b"beta"
            assert any(
                "Position handed over" in m and "symbol=ETHUSDT new_owner=beta" in m
                for m in messages(alpha)
            )
            # beta's backstop went in before alpha's was retired; one stop in the end
            await until(
                lambda: (
                    [a.client_algo_id for a in exchange.open_algo_orders("ETHUSDT")]
                    not in ([], [alpha_stop.client_algo_id])
                ),
                20,
                "beta's backstop",
            )
            await until(lambda: len(exchange.open_algo_orders("ETHUSDT")) == 1, 20, "one stop")
            beta_stop = exchange.open_algo_orders("ETHUSDT")[0]
            log = venue.order_log.entries
            placed = next(
                i
                for i, e in enumerate(log)
                if e.get("clientAlgoId") == beta_stop.client_algo_id and "triggerPrice" in e
            )
            retired = next(
                i
                for i, e in enumerate(log)
                if e.get("clientAlgoId") == alpha_stop.client_algo_id
                and e.get("status") in ("CANCELED", "CANCELLED")
            )
            assert placed < retired
            # nothing sent by the hand-over itself; BTCUSDT stays with alpha
            assert [e["clientOrderId"] for e in venue.order_log.orders] == orders_before
            assert exchange.position("ETHUSDT", "LONG").amount == Decimal("0.200")
            assert await client.get("pyquant:default:lease:BTCUSDT") == b"alpha"
            assert len(exchange.open_algo_orders("BTCUSDT")) == 1
            # the ledger names the new owner
            ledger = await client.hget("pyquant:default:ledger", "ETHUSDT|LONG")
            for _ in range(100):
                if ledger is not None and b"|beta|" in ledger:
                    break
                await asyncio.sleep(0.05)
                ledger = await client.hget("pyquant:default:ledger", "ETHUSDT|LONG")
            assert ledger is not None
            assert b"|beta|" in ledger
            assert await alpha.terminate() == 0
            assert await beta.terminate() == 0
        finally:
            for process in (alpha, beta):
                if process.proc is not None and process.proc.returncode is None:
                    await process.kill9()
