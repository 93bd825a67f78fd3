"""A user-stream reconnect refused for an expired listenKey renews it at once (issue 17, 9).

Before: after a websocket drop during which the listenKey expired, every reconnect reused the
expired key (refused by the venue) until the keepalive loop ran, about 41 s in the chaos run
and up to 30 minutes with the default interval, and entries were refused all that time.
"""

from __future__ import annotations

import asyncio

import pytest

import pyquant.sim as sim
from pyquant.exchange.client import BinanceClient
from pyquant.exchange.streams import Backoff, UserDataStream, UserEvent


async def until(predicate: object, limit_s: float = 15.0) -> None:
    async with asyncio.timeout(limit_s):
        while not predicate():  # type: ignore[operator]  # noqa: ASYNC110
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("mode", ["one-way", "hedge"])
async def test_reconnect_refused_for_an_expired_key_renews_it_at_once(mode: str) -> None:
    async with sim.serve(speed=0, position_mode=mode) as venue:
        client = BinanceClient(venue.rest_url, venue.api_key, venue.api_secret)
        connected: list[bool] = []

        async def on_event(event: UserEvent) -> None:
            return None

        async def on_connected(reconnect: bool) -> None:
            connected.append(reconnect)

        stream = UserDataStream(
            f"{venue.ws_url}/private",
            client,
            on_event,
            keepalive_interval_s=3600.0,  # the keepalive loop will not come to the rescue
            backoff=Backoff(0.5, 60.0),  # nor will a quick retry: the second wait is long
            on_connected=on_connected,
        )
        task = asyncio.create_task(stream.run())
        try:
            await until(lambda: connected == [False])
            first_key = stream.listen_key
            # the connection drops, and the key expires while nobody listens
            await venue.drop_websockets()
            assert venue.expire_listen_key() == first_key
            await until(lambda: connected == [False, True])
            assert stream.listen_key != first_key
            assert stream.listen_keys_created == 2
            assert stream.health.connected
        finally:
            await stream.close()
            await task
            await client.close()
