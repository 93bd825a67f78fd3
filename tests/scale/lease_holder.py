"""A daemon stand-in for kill -9 tests: takes leases on symbols, renews them, prints READY.

kill -9 leaves the leases to lapse; SIGTERM releases them.

Usage: python lease_holder.py URL DAEMON_ID TTL_MS SYMBOL...
"""

from __future__ import annotations

import asyncio
import signal
import sys

import redis.asyncio as aioredis

from pyquant.scale.leases import LeaseConfig, LeaseManager


async def main(url: str, daemon_id: str, ttl_ms: int, symbols: list[str]) -> None:
    client = aioredis.from_url(url, socket_timeout=5)
    leases = LeaseManager(client, LeaseConfig(daemon_id=daemon_id, account="main", ttl_ms=ttl_ms))
    await leases.register()
    task = asyncio.create_task(leases.run())
    for symbol in symbols:
        if not await leases.want(symbol):
            print(f"NOT OWNER {symbol}", flush=True)
            sys.exit(2)
    loop = asyncio.get_running_loop()
    # SIGTERM is a clean stop: leases released, peers take over at once.
    loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(leases.stop()))
    print("READY", flush=True)
    await task


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]))
