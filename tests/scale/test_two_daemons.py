"""Two `pyquant run` processes, one simulator, one Redis: split by owner, kill -9, takeover.

alpha and beta share one simulated account through Redis leases. Rendezvous hashing places
BTCUSDT with alpha and ETHUSDT with beta (whichever daemon reads an intent, the owner decides
it). beta takes ETHUSDT's first profit and moves its stop to breakeven; then beta is killed
with SIGKILL. alpha must take ETHUSDT over once the lease lapses, adopt the position with the
ladder where beta left it, keep a stop on the exchange at every moment (beta's backstop is
retired only after alpha's is in), never send a duplicate, and run the next exit itself.
"""

from __future__ import annotations

import asyncio
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

redis_asyncio = pytest.importorskip("redis.asyncio")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from fleet import STREAM, TTL_MS, bus_url, daemon, intent, messages  # noqa: E402
from pq_harness import simulator, until, venue_env, write_config  # noqa: E402
from redis_server_proc import RedisServer  # noqa: E402

from pyquant.scale.leases import LeaseConfig, LeaseManager  # noqa: E402


async def test_kill_9_of_an_owner_hands_its_symbol_to_the_other_daemon(
    tmp_path: Path, redis_server: RedisServer, client: Any
) -> None:
    # Who prefers what is a pure function of the ids; check the premise of the test.
    probe = LeaseManager(client, LeaseConfig(daemon_id="alpha", ttl_ms=TTL_MS))
    intents_file = tmp_path / "unused.jsonl"
    intents_file.touch()
    config = tmp_path / "pyquant.toml"
    async with simulator("hedge") as venue:
        exchange = venue.exchange
        await venue.set_mark("BTCUSDT", "100000.0")
        await venue.set_mark("ETHUSDT", "2500.00")
        write_config(config, venue, intents_file)
        env = venue_env(venue)
        alpha = daemon(
            tmp_path, "alpha", config, env, bus_url(redis_server.port, "alpha", from_start=False)
        )
        beta = daemon(
            tmp_path, "beta", config, env, bus_url(redis_server.port, "beta", from_start=False)
        )
        await asyncio.gather(alpha.start(), beta.start())
        try:
            await asyncio.gather(
                alpha.wait_logged("Daemon running"), beta.wait_logged("Daemon running")
            )
            await until(
                lambda: all(p.logged("Mark-price stream connected") for p in (alpha, beta)), 20
            )
            assert await probe.preferred_owner("BTCUSDT") == "alpha"
            assert await probe.preferred_owner("ETHUSDT") == "beta"

            await client.xadd(STREAM, intent("BTCUSDT", source="quantum"))
            await client.xadd(STREAM, intent("ETHUSDT", source="quantum"))
            await until(
                lambda: exchange.position("BTCUSDT", "LONG").amount == Decimal("0.005"), 20, "BTC"
            )
            await until(
                lambda: exchange.position("ETHUSDT", "LONG").amount == Decimal("0.200"), 20, "ETH"
            )
            await until(lambda: len(exchange.open_algo_orders("ETHUSDT")) == 1, 20, "ETH stop")
            # split by owner: each symbol was decided and is run by its lease holder only
            assert await client.get("pyquant:default:lease:BTCUSDT") == b"alpha"
            assert await client.get("pyquant:default:lease:ETHUSDT") == b"beta"
            # (log lines arrive through a pipe: wait for them, they may trail the exchange)
            await until(
                lambda: any(
                    "Position opened" in m and "symbol=BTCUSDT" in m for m in messages(alpha)
                ),
                10,
                "alpha opened BTCUSDT",
            )
            await until(
                lambda: any(
                    "Position opened" in m and "symbol=ETHUSDT" in m for m in messages(beta)
                ),
                10,
                "beta opened ETHUSDT",
            )
            assert not any("Position opened" in m and "ETHUSDT" in m for m in messages(alpha))
            assert not any("Position adopted" in m for m in messages(beta))

            # beta takes the first profit on ETH and ratchets its stop to breakeven
            initial = exchange.open_algo_orders("ETHUSDT")[0].trigger_price
            await venue.step(1000)
            await venue.set_mark("ETHUSDT", "2526.00")
            await until(
                lambda: exchange.position("ETHUSDT", "LONG").amount == Decimal("0.140"), 20, "TP1"
            )
            await until(
                lambda: (
                    [a.trigger_price for a in exchange.open_algo_orders("ETHUSDT")]
                    not in ([], [initial])
                ),
                20,
                "breakeven backstop",
            )
            await until(lambda: len(exchange.open_algo_orders("ETHUSDT")) == 1, 20, "one stop")
            beta_stop = exchange.open_algo_orders("ETHUSDT")[0]
            assert beta_stop.trigger_price > initial

            async def published_levels() -> str:
                raw = await client.hget("pyquant:default:exitstate", "ETHUSDT|LONG")
                return "" if raw is None else str(orjson.loads(raw)["ladder_levels_done"])

            for _ in range(200):  # the exit state is published every second
                if await published_levels() == "1":
                    break
                await asyncio.sleep(0.05)
            assert await published_levels() == "1"

            orders_before = [e["clientOrderId"] for e in venue.order_log.orders]
            await beta.kill9()
            killed_at = time.monotonic()
            await until(
                lambda: any(
                    "Symbol reconciled" in m and "symbol=ETHUSDT reason=takeover" in m
                    for m in messages(alpha)
                ),
                TTL_MS / 1000 + 10,
                "alpha takes ETHUSDT over",
            )
            takeover_s = time.monotonic() - killed_at
            assert await client.get("pyquant:default:lease:ETHUSDT") == b"alpha"

            # the stop never left the exchange and never loosened: alpha's backstop went in
            # before beta's was retired, at the same breakeven trigger
            await until(
                lambda: (
                    [a.client_algo_id for a in exchange.open_algo_orders("ETHUSDT")]
                    != [beta_stop.client_algo_id]
                ),
                10,
                "alpha's backstop",
            )
            await until(lambda: len(exchange.open_algo_orders("ETHUSDT")) == 1, 10, "one stop")
            alpha_stop = exchange.open_algo_orders("ETHUSDT")[0]
            assert alpha_stop.trigger_price >= beta_stop.trigger_price
            log = venue.order_log.entries
            placed = next(
                i
                for i, e in enumerate(log)
                if e.get("clientAlgoId") == alpha_stop.client_algo_id and "triggerPrice" in e
            )
            retired = next(
                i
                for i, e in enumerate(log)
                if e.get("clientAlgoId") == beta_stop.client_algo_id
                and e.get("status") in ("CANCELED", "CANCELLED")
            )
            assert placed < retired
            # nothing was resent by the takeover: same orders, same position
            assert [e["clientOrderId"] for e in venue.order_log.orders] == orders_before
            assert exchange.position("ETHUSDT", "LONG").amount == Decimal("0.140")

            # alpha runs the ladder from where beta left it: level 2 closes 30 % of 0.200
            await venue.step(1000)
            await venue.set_mark("ETHUSDT", "2551.00")
            await until(
                lambda: exchange.position("ETHUSDT", "LONG").amount == Decimal("0.080"), 20, "TP2"
            )
            entries = [o for o in venue.order_log.orders if "-e0-" in str(o["clientOrderId"])]
            assert sorted(o["symbol"] for o in entries) == ["BTCUSDT", "ETHUSDT"]
            exits = [o for o in venue.order_log.orders if o["symbol"] == "ETHUSDT"]
            exits = [o for o in exits if o["side"] == "SELL" and o["type"] == "MARKET"]
            assert [Decimal(o["quantity"]) for o in exits] == [Decimal("0.060"), Decimal("0.060")]
            assert len({o["clientOrderId"] for o in exits}) == 2
            print(f"takeover after kill -9: {takeover_s:.2f} s (TTL {TTL_MS} ms)")

            # beta comes back with its old journal: ETHUSDT is alpha's now, so beta hands its
            # stale position over (sends nothing) instead of reconciling or closing it
            orders_before = [e["clientOrderId"] for e in venue.order_log.orders]
            beta = daemon(
                tmp_path, "beta", config, env, bus_url(redis_server.port, "beta", from_start=False)
            )
            await beta.start()
            await beta.wait_logged("Daemon running")
            assert any(
                "Position handed over" in m and "symbol=ETHUSDT new_owner=alpha" in m
                for m in messages(beta)
            )
            assert await client.get("pyquant:default:lease:ETHUSDT") == b"alpha"

            # a clean stop of alpha hands both symbols to beta at once, exit state included
            # (ETHUSDT prefers beta: once beta has been back two TTLs, alpha may have handed
            # it back already by rebalancing)
            assert await alpha.terminate() == 0
            await until(
                lambda: all(
                    any(
                        "Symbol reconciled" in m
                        and (f"symbol={s} reason=takeover" in m or f"symbol={s} reason=handed" in m)
                        for m in messages(beta)
                    )
                    for s in ("BTCUSDT", "ETHUSDT")
                ),
                10,
                "beta takes both symbols",
            )
            assert [e["clientOrderId"] for e in venue.order_log.orders] == orders_before
            assert exchange.position("ETHUSDT", "LONG").amount == Decimal("0.080")
            assert exchange.position("BTCUSDT", "LONG").amount == Decimal("0.005")
            await until(lambda: len(exchange.open_algo_orders("ETHUSDT")) == 1, 10, "one stop")
            await until(lambda: len(exchange.open_algo_orders("BTCUSDT")) == 1, 10, "one stop")
            beta_tag = next(
                str(o["clientOrderId"]).split("-")[0] for o in entries if o["symbol"] == "ETHUSDT"
            )
            assert exchange.open_algo_orders("ETHUSDT")[0].client_algo_id.startswith(beta_tag)

            # beta runs the trailing stop alpha started (best 2551.00, trail 1 %: 2525.49)
            await venue.step(1000)
            await venue.set_mark("ETHUSDT", "2524.00")
            await until(lambda: exchange.position("ETHUSDT", "LONG").amount == 0, 20, "trail")
            last = venue.order_log.orders[-1]
            assert (last["symbol"], last["side"], Decimal(last["quantity"])) == (
                "ETHUSDT",
                "SELL",
                Decimal("0.080"),
            )
            assert str(last["clientOrderId"]).startswith(beta_tag)
            assert await beta.terminate() == 0
        finally:
            for process in (alpha, beta):
                if process.proc is not None and process.proc.returncode is None:
                    await process.kill9()
