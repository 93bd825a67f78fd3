"""A daemon stand-in for multi-process tests: a RedisBus whose journal is its stdout.

Usage: python bus_daemon.py BUS_URL

Prints ``READY``, then one line per event: ``DECIDED <daemon> <intent_id> <symbol>``,
``ACQUIRE <symbol> <reason>``, ``LOSE <symbol> <reason>``, ``REJECT <stream_id>``. SIGTERM stops
it cleanly (intake, then leases released).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from dataclasses import dataclass

from pyquant.scale.bus import RedisBus, RedisBusConfig
from pyquant.scale.redis_intents import Rejection
from pyquant.trading.intents import Intent


@dataclass(frozen=True)
class Decision:
    accepted: bool
    reason: str | None


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def main(url: str) -> None:
    config = RedisBusConfig.from_url(url)
    seen: set[str] = set()

    async def decide(intent: Intent) -> Decision:
        duplicate = intent.intent_id in seen
        seen.add(intent.intent_id)
        say(f"DECIDED {config.daemon_id} {intent.intent_id} {intent.symbol}")
        return Decision(not duplicate, "duplicate intent id" if duplicate else None)

    async def on_reject(rejection: Rejection) -> None:
        say(f"REJECT {rejection.stream_id}")

    async def on_acquire(symbol: str, reason: str) -> None:
        say(f"ACQUIRE {symbol} {reason}")

    async def on_lose(symbol: str, reason: str) -> None:
        say(f"LOSE {symbol} {reason}")

    bus = RedisBus(
        config, decide=decide, on_reject=on_reject, on_acquire=on_acquire, on_lose=on_lose
    )
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, bus.stop)
    run = asyncio.create_task(bus.run())
    await bus.ready.wait()
    await bus.intents.ready.wait()
    say("READY")
    await run
    say("STOPPED")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
