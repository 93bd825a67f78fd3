"""Fault injection and limits, each observed the way a client sees it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

import pyquant.sim as sim
from tests.sim.conftest import Rest, market, open_user_stream

BUY = market("BUY", "100", newOrderRespType="RESULT")


async def test_503_unknown_outcome_executes_a_share_of_orders(rest: Rest) -> None:
    rest.venue.set_faults(order_error_rate=1.0, order_error="503", execute_share=1.0)
    status, _, body = await rest.signed(
        "POST", "/fapi/v1/order", **BUY, newClientOrderId="unknown-1"
    )
    assert status == 503
    assert body["msg"] == "Unknown error, please check your request or try again later."
    rest.venue.set_faults()
    found = await rest.ok("GET", "/fapi/v1/order", symbol="DOGEUSDT", origClientOrderId="unknown-1")
    assert found["status"] == "FILLED"  # it did execute: the client must look before resending
    rest.venue.set_faults(order_error_rate=1.0, order_error="-1007", execute_share=0.0)
    status, _, body = await rest.signed(
        "POST", "/fapi/v1/order", **BUY, newClientOrderId="unknown-2"
    )
    assert (status, body["code"]) == (408, -1007)
    rest.venue.set_faults()
    missing = await rest.error(
        "GET", "/fapi/v1/order", symbol="DOGEUSDT", origClientOrderId="unknown-2"
    )
    assert missing["code"] == -2013


async def test_share_of_faulted_orders_is_seeded(session: aiohttp.ClientSession) -> None:
    outcomes = []
    for _ in range(2):
        async with sim.serve(
            speed=0, seed=11, faults={"order_error_rate": 0.5, "execute_share": 0.5}
        ) as venue:
            rest = Rest(session, venue)
            statuses = [(await rest.signed("POST", "/fapi/v1/order", **BUY))[0] for _ in range(12)]
            outcomes.append((statuses, len(venue.order_log.fills)))
    assert outcomes[0] == outcomes[1]
    statuses, fills = outcomes[0]
    assert 200 in statuses
    assert 503 in statuses
    assert statuses.count(200) < fills <= 12  # some faulted orders executed anyway


async def test_dropped_reply_and_service_unavailable(rest: Rest) -> None:
    rest.venue.set_faults(order_error_rate=1.0, order_error="drop", execute_share=1.0)
    with pytest.raises(aiohttp.ClientError):
        await rest.signed("POST", "/fapi/v1/order", **BUY, newClientOrderId="dropped")
    rest.venue.set_faults(order_error_rate=1.0, order_error="503-unavailable", execute_share=1.0)
    status, _, body = await rest.signed("POST", "/fapi/v1/order", **BUY, newClientOrderId="never")
    assert (status, body["msg"]) == (503, "Service Unavailable.")
    rest.venue.set_faults()
    assert (await rest.ok("GET", "/fapi/v1/order", symbol="DOGEUSDT", origClientOrderId="dropped"))[
        "status"
    ] == "FILLED"
    assert (
        await rest.error("GET", "/fapi/v1/order", symbol="DOGEUSDT", origClientOrderId="never")
    )["code"] == -2013


async def test_stalled_reply_times_out_the_client(rest: Rest) -> None:
    rest.venue.set_faults(stall_ms=3000, stall_rate=1.0)
    with pytest.raises(asyncio.TimeoutError):
        async with asyncio.timeout(0.3):
            await rest.public("/fapi/v1/ping")
    rest.venue.set_faults()
    assert (await rest.public("/fapi/v1/ping"))[0] == 200


async def test_injected_429(rest: Rest) -> None:
    rest.venue.set_faults(reject_429_rate=1.0)
    status, headers, body = await rest.public("/fapi/v1/time")
    assert (status, body["code"]) == (429, -1003)
    assert "X-MBX-USED-WEIGHT-1M" in headers


@pytest.fixture
async def limited(session: aiohttp.ClientSession) -> AsyncIterator[Rest]:
    limits = [
        {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": 40},
        {"rateLimitType": "ORDERS", "interval": "MINUTE", "intervalNum": 1, "limit": 100},
        {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 3},
    ]
    async with sim.serve(speed=0, rate_limits=limits) as venue:
        now = int(time.time() * 1000)
        venue.limits.now_ms = lambda: (
            now - now % 60_000 + 1
        )  # one fixed window: no boundary in the test
        yield Rest(session, venue)


async def test_weight_limit_from_exchange_info_then_429_then_418(limited: Rest) -> None:
    _, _, info = await limited.public("/fapi/v1/exchangeInfo")
    assert info["rateLimits"][0]["limit"] == 40
    _, headers, _ = await limited.signed("GET", "/fapi/v1/positionSide/dual")  # weight 30
    assert headers["X-MBX-USED-WEIGHT-1M"] == "31"
    for expected in range(32, 41):
        _, headers, _ = await limited.public("/fapi/v1/ping")
        assert headers["X-MBX-USED-WEIGHT-1M"] == str(expected)
    status, headers, body = await limited.public("/fapi/v1/ping")
    assert (status, body["code"]) == (429, -1003)
    assert "40 request weight per 1 MINUTE" in body["msg"]
    statuses = [(await limited.public("/fapi/v1/ping"))[0] for _ in range(12)]
    assert statuses[-1] == 418


async def test_order_count_limit_and_headers(limited: Rest) -> None:
    for n in range(1, 4):
        status, headers, _ = await limited.signed("POST", "/fapi/v1/order", **BUY)
        assert status == 200
        assert headers["X-MBX-ORDER-COUNT-10S"] == str(n)
        assert headers["X-MBX-ORDER-COUNT-1M"] == str(n)
    status, headers, body = await limited.signed("POST", "/fapi/v1/order", **BUY)
    assert (status, body["code"]) == (429, -1015)
    assert headers["X-MBX-ORDER-COUNT-10S"] == "4"


async def test_websocket_drop_and_listen_key_expiry_through_admin(rest: Rest) -> None:
    venue = rest.venue
    market = await rest.session.ws_connect(venue.ws_url + "/market/ws/btcusdt@markPrice@1s")
    stream = await open_user_stream(rest)
    async with rest.session.post(venue.rest_url + "/admin/drop_websockets") as resp:
        assert (await resp.json())["dropped"] == 2
    async with asyncio.timeout(5):
        msg = await market.receive()
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
    stream = await open_user_stream(rest)
    async with rest.session.post(venue.rest_url + "/admin/expire_listen_key") as resp:
        key = (await resp.json())["listenKey"]
    event = await stream.wait_for(lambda e: e["e"] == "listenKeyExpired")
    assert event["listenKey"] == key
    assert (await rest.raw("PUT", "/fapi/v1/listenKey"))[2]["code"] == -1125


async def test_admin_faults_endpoint_and_time_skew(rest: Rest) -> None:
    venue = rest.venue
    async with rest.session.post(
        venue.rest_url + "/admin/faults", json={"order_error_rate": 2}
    ) as resp:
        assert resp.status == 400
        assert "order_error_rate" in (await resp.json())["error"]
    async with rest.session.post(venue.rest_url + "/admin/faults", json={"bogus": 1}) as resp:
        assert "bogus" in (await resp.json())["error"]
    async with rest.session.post(venue.rest_url + "/admin/faults", json={"delay_ms": 1}) as resp:
        assert (await resp.json())["delay_ms"] == 1
    async with rest.session.post(venue.rest_url + "/admin/time_skew", json={"ms": 10_000}) as resp:
        assert resp.status == 200
    assert (await rest.error("GET", "/fapi/v2/balance"))["code"] == -1021
    async with rest.session.post(
        venue.rest_url + "/admin/mark", json={"symbol": "BTCUSDT", "price": "70000"}
    ) as resp:
        assert resp.status == 200
    assert venue.exchange.mark("BTCUSDT") == 70000


async def test_new_order_invisible_to_queries_for_a_while(rest: Rest) -> None:
    venue = rest.venue
    venue.set_faults(visibility_delay_ms=5000)
    clock = [int(time.time() * 1000)]
    venue._now_wall = lambda: clock[0]  # type: ignore[method-assign]
    await rest.ok("POST", "/fapi/v1/order", **BUY, newClientOrderId="late")
    assert (await rest.error("GET", "/fapi/v1/order", symbol="DOGEUSDT", origClientOrderId="late"))[
        "code"
    ] == -2013
    clock[0] += 5000
    assert (await rest.ok("GET", "/fapi/v1/order", symbol="DOGEUSDT", origClientOrderId="late"))[
        "status"
    ] == "FILLED"
