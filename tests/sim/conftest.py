"""Fixtures for the simulator tests: a venue on a manual clock, a signed REST helper, streams."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
import yarl

import pyquant.sim as sim

DATA = Path(__file__).resolve().parents[1] / "data" / "binance"


def sample(name: str) -> Any:
    """Load a real Binance payload sample."""
    return json.loads((DATA / name).read_text())


def market(side: str, quantity: str, symbol: str = "DOGEUSDT", **p: str) -> dict[str, str]:
    """Request parameters of a MARKET order (on DOGEUSDT unless named)."""
    return {"symbol": symbol, "side": side, "type": "MARKET", "quantity": quantity, **p}


def limit(
    side: str, quantity: str, price: str, tif: str = "GTC", symbol: str = "DOGEUSDT", **p: str
) -> dict[str, str]:
    """Request parameters of a LIMIT order (GTC on DOGEUSDT unless named)."""
    return {
        "symbol": symbol,
        "side": side,
        "type": "LIMIT",
        "timeInForce": tif,
        "quantity": quantity,
        "price": price,
        **p,
    }


def conditional(side: str, kind: str, trigger: str, **p: str) -> dict[str, str]:
    """Request parameters of a DOGEUSDT conditional (algo) order triggered by the mark price."""
    return {
        "algoType": "CONDITIONAL",
        "symbol": "DOGEUSDT",
        "side": side,
        "type": kind,
        "workingType": "MARK_PRICE",
        "triggerPrice": trigger,
        **p,
    }


class Rest:
    """Minimal signed client; returns (status, headers, body)."""

    def __init__(self, session: aiohttp.ClientSession, venue: sim.Venue) -> None:
        self.session = session
        self.venue = venue
        self.key = venue.api_key
        self.secret = venue.api_secret

    async def raw(
        self,
        method: str,
        path: str,
        query: str = "",
        body: str = "",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        url = self.venue.rest_url + path + ("?" + query if query else "")
        hdrs = {"X-MBX-APIKEY": self.key, **(headers or {})}
        if body:
            hdrs["Content-Type"] = "application/x-www-form-urlencoded"
        # encoded=True: send the query bytes exactly as signed (no requoting by the client)
        async with self.session.request(
            method, yarl.URL(url, encoded=True), data=body or None, headers=hdrs
        ) as resp:
            text = await resp.text()
            return resp.status, dict(resp.headers), json.loads(text) if text else None

    def sign(self, params: dict[str, Any], ts: int | None = None) -> str:
        params = {**params, "timestamp": ts if ts is not None else int(time.time() * 1000)}
        query = urlencode(params)
        sig = hmac.new(self.secret.encode(), query.encode(), hashlib.sha256).hexdigest()
        return f"{query}&signature={sig}"

    async def signed(
        self, method: str, path: str, **params: Any
    ) -> tuple[int, dict[str, str], Any]:
        return await self.raw(method, path, self.sign(params))

    async def public(self, path: str, **params: Any) -> tuple[int, dict[str, str], Any]:
        return await self.raw("GET", path, urlencode(params))

    async def ok(self, method: str, path: str, **params: Any) -> Any:
        status, _, body = await self.signed(method, path, **params)
        assert status == 200, body
        return body

    async def error(self, method: str, path: str, **params: Any) -> dict[str, Any]:
        status, _, body = await self.signed(method, path, **params)
        assert status >= 400, body
        return body


class UserStream:
    """A user-data websocket that collects events and waits for the one a test needs."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []

    async def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], wait_s: float = 5.0
    ) -> dict[str, Any]:
        for event in self.events:
            if pred(event):
                self.events.remove(event)
                return event
        async with asyncio.timeout(wait_s):
            while True:
                msg = await self.ws.receive()
                assert msg.type == aiohttp.WSMsgType.TEXT, msg
                event = json.loads(msg.data)
                if pred(event):
                    return event
                self.events.append(event)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def venue() -> AsyncIterator[sim.Venue]:
    async with sim.serve(speed=0, seed=7) as v:
        yield v


@pytest.fixture
async def hedge() -> AsyncIterator[sim.Venue]:
    async with sim.serve(speed=0, seed=7, position_mode="hedge") as v:
        yield v


@pytest.fixture
def rest(session: aiohttp.ClientSession, venue: sim.Venue) -> Rest:
    return Rest(session, venue)


@pytest.fixture
def hrest(session: aiohttp.ClientSession, hedge: sim.Venue) -> Rest:
    return Rest(session, hedge)


async def open_user_stream(rest: Rest, prefix: str = "/private") -> UserStream:
    status, _, body = await rest.raw("POST", "/fapi/v1/listenKey")
    assert status == 200
    ws = await rest.session.ws_connect(f"{rest.venue.ws_url}{prefix}/ws/{body['listenKey']}")
    return UserStream(ws)


async def subscribed(venue: sim.Venue, *streams: str) -> None:
    """Wait until the server has registered ``streams``: step() publishes as it runs, and on a
    loaded machine the handshake can answer before the server has added the subscriber."""
    async with asyncio.timeout(20):
        # The hub has no event to await for a new subscriber: its set is polled.
        while not set(streams) <= venue.hub.wanted():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
