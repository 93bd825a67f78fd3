"""The Redis intent stream as the intake tests read it: its names, a reader config, a runner."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from pyquant.scale.redis_intents import IntentStreamConfig, RedisIntentSource

STREAM = "quantum:stream:trade.intent"
GROUP = "pyquant"


def stream_config(consumer: str = "daemon-a", **overrides: object) -> IntentStreamConfig:
    """A reader of STREAM in GROUP from its start, with short waits so the tests run fast."""
    base: dict[str, object] = {
        "stream": STREAM,
        "group": GROUP,
        "consumer": consumer,
        "start_id": "0",
        "block_ms": 50,
        "claim_idle_ms": 60_000,
        "claim_interval_ms": 50,
        "retry_ms": 20,
    }
    base.update(overrides)
    return IntentStreamConfig(**base)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(source: RedisIntentSource) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``source`` until the block ends; it has joined its group when the block starts."""
    task = asyncio.create_task(source.run())
    try:
        await asyncio.wait_for(source.ready.wait(), 10)
        yield task
    finally:
        source.stop()
        await asyncio.wait_for(task, 10)
