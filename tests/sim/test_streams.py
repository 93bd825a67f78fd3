"""Websocket routes, subscriptions, control replies, bad input and user-data delivery."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from tests.sim.conftest import Rest, open_user_stream, sample, subscribed


async def recv(ws: aiohttp.ClientWebSocketResponse, wait_s: float = 5) -> Any:
    async with asyncio.timeout(wait_s):
        msg = await ws.receive()
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    return json.loads(msg.data)


@pytest.mark.parametrize("prefix", ["", "/market"])
async def test_raw_stream_and_three_second_cadence(rest: Rest, prefix: str) -> None:
    venue = rest.venue
    ws = await rest.session.ws_connect(f"{venue.ws_url}{prefix}/ws/ethusdt@markPrice")
    await subscribed(venue, "ethusdt@markprice")
    await venue.step(3000)
    msg = await recv(ws)
    assert msg["e"] == "markPriceUpdate"
    assert msg["s"] == "ETHUSDT"
    assert msg["E"] % 3000 == 0
    assert msg["p"] == f"{venue.replay.price_at('ETHUSDT', msg['E']):.8f}"
    await ws.close()


async def test_subscribe_list_unsubscribe_and_properties(rest: Rest) -> None:
    venue = rest.venue
    ws = await rest.session.ws_connect(venue.ws_url + "/market/ws")
    exchange = sample("ws_subscribe_exchange_docs.json")
    await ws.send_json(exchange["request"])
    assert await recv(ws) == exchange["response"]
    await ws.send_json({"method": "UNSUBSCRIBE", "params": ["ethusdt@markPrice@1s"], "id": 2})
    assert await recv(ws) == {"result": None, "id": 2}
    await ws.send_json(exchange["list_request"])
    assert await recv(ws) == exchange["list_response"]
    await ws.send_json({"method": "GET_PROPERTY", "params": ["combined"], "id": 4})
    assert await recv(ws) == {"result": False, "id": 4}
    await ws.send_json({"method": "SET_PROPERTY", "params": ["combined", "yes"], "id": 5})
    assert await recv(ws) == {"code": 1, "msg": "Invalid value type: expected Boolean", "id": 5}
    await ws.send_json({"method": "SET_PROPERTY", "params": ["combined", True], "id": 6})
    assert await recv(ws) == {"result": None, "id": 6}
    await venue.step(1000)
    msg = await recv(ws)
    assert msg["stream"] == "btcusdt@markPrice@1s"
    assert msg["data"]["s"] == "BTCUSDT"
    await ws.close()


async def test_bad_input_gets_an_error_reply_and_the_server_keeps_serving(rest: Rest) -> None:
    ws = await rest.session.ws_connect(rest.venue.ws_url + "/ws")
    await ws.send_str("{not json")
    reply = await recv(ws)
    assert reply["code"] == 3
    assert reply["msg"].startswith("Invalid JSON")
    await ws.send_json({"method": "FLY", "id": 1})
    assert (await recv(ws))["code"] == 2
    await ws.send_json({"method": "SUBSCRIBE", "params": ["nosuch@markPrice"], "id": 2})
    assert (await recv(ws))["code"] == 2
    await ws.send_json({"params": [], "id": 3})
    assert (await recv(ws))["code"] == 2
    await ws.send_json({"method": "SUBSCRIBE", "params": ["btcusdt@markPrice"], "id": -1})
    assert (await recv(ws))["code"] == 2
    await ws.send_json([1, 2])
    assert (await recv(ws))["code"] == 2
    await ws.send_json({"method": "LIST_SUBSCRIPTIONS", "id": 9})
    assert await recv(ws) == {"result": [], "id": 9}
    await ws.close()
    assert (await rest.public("/fapi/v1/ping"))[0] == 200


async def test_route_mixing_rule(rest: Rest) -> None:
    venue = rest.venue
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await rest.session.ws_connect(venue.ws_url + "/public/ws/btcusdt@markPrice")
    assert info.value.status == 400
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await rest.session.ws_connect(venue.ws_url + "/market/ws/btcusdt@bookTicker")
    ws = await rest.session.ws_connect(venue.ws_url + "/public/ws")
    await ws.send_json({"method": "SUBSCRIBE", "params": ["btcusdt@markPrice@1s"], "id": 1})
    reply = await recv(ws)
    assert reply["code"] == 2
    assert "/public" in reply["msg"]
    await ws.send_json({"method": "SUBSCRIBE", "params": ["btcusdt@bookTicker"], "id": 2})
    assert await recv(ws) == {"result": None, "id": 2}
    await ws.close()
    # the root (legacy host) carries both kinds on one connection
    ws = await rest.session.ws_connect(
        venue.ws_url + "/stream?streams=btcusdt@markPrice@1s/btcusdt@bookTicker"
    )
    await subscribed(venue, "btcusdt@markprice@1s", "btcusdt@bookticker")
    await venue.step(1000)
    streams = {(await recv(ws))["stream"] for _ in range(2)}
    assert streams == {"btcusdt@markPrice@1s", "btcusdt@bookTicker"}
    await ws.close()


async def test_too_many_messages_per_second_disconnects(rest: Rest) -> None:
    ws = await rest.session.ws_connect(rest.venue.ws_url + "/ws")
    for i in range(15):
        await ws.send_json({"method": "LIST_SUBSCRIPTIONS", "id": i})
    kinds = []
    async with asyncio.timeout(5):
        while True:
            msg = await ws.receive()
            kinds.append(msg.type)
            if msg.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.CLOSING,
            ):
                break
    assert kinds.count(aiohttp.WSMsgType.TEXT) == 10


@pytest.mark.parametrize("path", ["/ws/{key}", "/private/ws/{key}", "/private/ws?listenKey={key}"])
async def test_user_data_routes(rest: Rest, path: str) -> None:
    _, _, body = await rest.raw("POST", "/fapi/v1/listenKey")
    ws = await rest.session.ws_connect(rest.venue.ws_url + path.format(key=body["listenKey"]))
    await rest.ok("POST", "/fapi/v1/leverage", symbol="BTCUSDT", leverage="7")
    event = await recv(ws)
    assert event["e"] == "ACCOUNT_CONFIG_UPDATE"
    assert event["ac"] == {"s": "BTCUSDT", "l": 7}
    await ws.close()


async def test_unknown_listen_key_and_user_data_on_market_route_are_refused(rest: Rest) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await rest.session.ws_connect(rest.venue.ws_url + "/private/ws/nosuchkey")
    _, _, body = await rest.raw("POST", "/fapi/v1/listenKey")
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await rest.session.ws_connect(rest.venue.ws_url + "/market/ws/" + body["listenKey"])


async def test_listen_key_expires_after_an_hour_without_keepalive(rest: Rest) -> None:
    stream = await open_user_stream(rest)
    await rest.venue.step(30 * 60_000)
    assert (await rest.raw("PUT", "/fapi/v1/listenKey"))[0] == 200  # keepalive: 60 more minutes
    await rest.venue.step(59 * 60_000)
    assert rest.venue.exchange.listen_key is not None
    await rest.venue.step(2 * 60_000)
    event = await stream.wait_for(lambda e: e["e"] == "listenKeyExpired")
    assert isinstance(event["E"], str)
    _, _, body = await rest.raw("PUT", "/fapi/v1/listenKey")
    assert body["code"] == -1125
    await stream.ws.close()


@pytest.mark.parametrize("start", ["as_started", "in_the_last_second"])
async def test_kline_stream_marks_the_closed_bar(rest: Rest, start: str) -> None:
    venue = rest.venue
    if start == "in_the_last_second":
        # The manual clock starts at the wall clock's second: one run in 60 starts in a
        # bar's last second, where a step of 0 publishes nothing (it flaked so).
        await venue.step((59_000 - venue.clock.now_ms() % 60_000) % 60_000)
    ws = await rest.session.ws_connect(venue.ws_url + "/market/ws/solusdt@kline_1m")
    await subscribed(venue, "solusdt@kline_1m")
    to_end = 60_000 - venue.clock.now_ms() % 60_000
    if to_end <= 1000:
        to_end += 60_000  # already in the bar's last second: aim at the next bar's
    await venue.step(to_end - 1000)  # the bar's last second
    last = None
    async with asyncio.timeout(20):  # generous: it flaked at 5 s on a loaded machine
        while True:
            last = await recv(ws, wait_s=20)
            if last["k"]["x"]:
                break
    rows = await rest.public("/fapi/v1/klines", symbol="SOLUSDT", interval="1m", limit=2)
    assert last["k"]["t"] == rows[2][-1][0]
    assert [last["k"][k] for k in "ohlc"] == rows[2][-1][1:5]
    await ws.close()
