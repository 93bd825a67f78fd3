"""Two `pyquant run` daemons; one loses Redis (a black-hole proxy) but not the exchange.

alpha (through a proxy the test controls) opens BTCUSDT, which prefers alpha, so no
rebalancing moves it. beta joins. The proxy then drops alpha's Redis traffic: alpha
still runs BTCUSDT's exits (it cannot learn otherwise) but its fence closes before its lease
can lapse, and beta takes BTCUSDT over. The price then reaches the first take-profit: both
engines want the exit, only beta's order reaches the exchange. Back on the network, alpha
learns the symbol is beta's and hands it over without sending anything.
"""

from __future__ import annotations

import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

redis_asyncio = pytest.importorskip("redis.asyncio")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from fleet import STREAM, bus_url, daemon, messages  # noqa: E402
from pq_harness import simulator, until, venue_env, write_config  # noqa: E402
from redis_server_proc import RedisServer  # noqa: E402
from tcp_proxy import BlackholeProxy  # noqa: E402

from pyquant.scale.leases import _rendezvous  # noqa: E402


async def test_a_daemon_cut_off_from_redis_sends_nothing_once_its_peer_took_over(
    tmp_path: Path, redis_server: RedisServer, client: Any
) -> None:
    assert _rendezvous({"alpha", "beta"}, "BTCUSDT") == "alpha"
    intents_file = tmp_path / "unused.jsonl"
    intents_file.touch()
    config = tmp_path / "pyquant.toml"
    proxy = BlackholeProxy(redis_server.port)
    await proxy.start()
    async with simulator("hedge") as venue:
        exchange = venue.exchange
        await venue.set_mark("BTCUSDT", "100000.0")
        write_config(config, venue, intents_file)
        env = venue_env(venue)
        alpha = daemon(tmp_path, "alpha", config, env, bus_url(proxy.port, "alpha"))
        beta = daemon(tmp_path, "beta", config, env, bus_url(redis_server.port, "beta"))
        try:
            await alpha.start()
            await alpha.wait_logged("Daemon running")
            await client.xadd(
                STREAM,
                {
                    "symbol": "BTCUSDT",
                    "side": "BUY",
                    "confidence": "0.8",
                    "leverage": "5",
                    "position_size_usd": "1000",
                },
            )
            await until(
                lambda: exchange.position("BTCUSDT", "LONG").amount == Decimal("0.010"), 20, "BTC"
            )
            await until(lambda: len(exchange.open_algo_orders("BTCUSDT")) == 1, 20, "stop")
            alpha_tag = str(venue.order_log.orders[-1]["clientOrderId"]).split("-")[0]
            await beta.start()
            await beta.wait_logged("Daemon running")

            proxy.block()
            await until(
                lambda: any(
                    "Symbol reconciled" in m and "symbol=BTCUSDT reason=takeover" in m
                    for m in messages(beta)
                ),
                30,
                "beta takes BTCUSDT over",
            )
            orders_before = len(venue.order_log.orders)
            # The first take-profit (+1 %): alpha's engine fires too, but its fence is closed.
            await venue.step(1000)
            await venue.set_mark("BTCUSDT", "101100.0")
            await until(
                lambda: exchange.position("BTCUSDT", "LONG").amount == Decimal("0.007"), 20, "TP1"
            )
            await until(
                lambda: any(
                    "Order not sent, lease fenced symbol=BTCUSDT" in m for m in messages(alpha)
                ),
                20,
                "alpha's exit fenced",
            )
            exits = venue.order_log.orders[orders_before:]
            assert [o["side"] for o in exits] == ["SELL"]
            assert not str(exits[0]["clientOrderId"]).startswith(alpha_tag)

            # Back on the network: alpha hands BTCUSDT over and still sends nothing.
            proxy.unblock()
            await until(
                lambda: any(
                    "Position handed over" in m and "symbol=BTCUSDT new_owner=beta" in m
                    for m in messages(alpha)
                ),
                30,
                "alpha hands over",
            )
            assert venue.order_log.orders[orders_before:] == exits
            assert exchange.position("BTCUSDT", "LONG").amount == Decimal("0.007")
            assert await client.get("pyquant:default:lease:BTCUSDT") == b"beta"
            assert await beta.terminate() == 0
        finally:
            for process in (alpha, beta):
                if process.proc is not None and process.proc.returncode is None:
                    await process.kill9()
            await proxy.close()
