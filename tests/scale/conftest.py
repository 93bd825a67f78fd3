"""A real redis-server per test, on a free loopback port with its own temporary directory."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis_server_proc import REDIS_SERVER, RedisServer


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start redis-servers (``aof=True`` for an append-only file); all are stopped at the end."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install -y redis-server)")
    servers: list[RedisServer] = []

    def make(*, aof: bool = False, start: bool = True) -> RedisServer:
        directory = tmp_path / f"redis{len(servers)}"
        directory.mkdir()
        server = RedisServer(directory, aof=aof)
        servers.append(server)
        if start:
            server.start()
        return server

    yield make
    for server in servers:
        server.stop(kill=True)


@pytest.fixture
def redis_server(redis_factory: Callable[..., RedisServer]) -> RedisServer:
    """A running redis-server without persistence."""
    return redis_factory()


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[object]:
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_server.url, socket_timeout=5)
    yield client
    with contextlib.suppress(Exception):
        await client.aclose()


async def _wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


@pytest.fixture
def wait_until() -> Callable[..., object]:
    """``await wait_until(predicate, timeout_s)``: a bounded wait on state, not a fixed sleep."""
    return _wait_until


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Any]:
    """An asyncio Redis client of ``redis_server`` (the multi-daemon tests add intents with it)."""
    import redis.asyncio as aioredis

    redis = aioredis.from_url(redis_server.url, socket_timeout=5)
    yield redis
    await redis.aclose()
