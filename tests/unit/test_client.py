"""The signed REST client against a tiny loopback aiohttp server."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl

import orjson
import pytest
from aiohttp import web

from pyquant.errors import OrderRejected, OrderStatusUnknown, RetryableError
from pyquant.exchange.client import BinanceClient, sign
from pyquant.exchange.codes import RateLimited

KEY = "test-api-key-AAAA"
SECRET = "test-secret-BBBB"  # noqa: S105 - a test key for a loopback server

Handler = Callable[[web.Request, dict[str, str]], Any]


class FakeVenue:
    """Records every request as received (raw query and body) and answers as scripted."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.server_offset_ms = 0
        self.routes: dict[tuple[str, str], list[Handler]] = {}
        self.url = ""

    def script(self, method: str, path: str, *handlers: Handler) -> None:
        self.routes[(method, path)] = list(handlers)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw_query = request.url.raw_query_string
        raw_body = (await request.read()).decode()
        params = dict(parse_qsl(raw_query)) | dict(parse_qsl(raw_body))
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "query": raw_query,
                "body": raw_body,
                "params": params,
                "headers": dict(request.headers),
            }
        )
        if request.path == "/fapi/v1/time" and (request.method, request.path) not in self.routes:
            now = int(time.time() * 1000) + self.server_offset_ms
            return web.json_response({"serverTime": now})
        handlers = self.routes.get((request.method, request.path))
        if not handlers:
            return web.json_response({"code": -1121, "msg": "Invalid symbol."}, status=400)
        handler = handlers.pop(0) if len(handlers) > 1 else handlers[0]
        result = handler(request, params)
        if asyncio.iscoroutine(result):
            result = await result
        if isinstance(result, web.StreamResponse):
            return result
        return web.json_response(result)


@pytest.fixture
async def venue() -> AsyncIterator[FakeVenue]:
    fake = FakeVenue()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    fake.url = f"http://127.0.0.1:{port}"
    yield fake
    await runner.cleanup()


@pytest.fixture
async def client(venue: FakeVenue) -> AsyncIterator[BinanceClient]:
    async with BinanceClient(venue.url, KEY, SECRET, timeout_s=2.0) as c:
        yield c


def error(status: int, code: int, msg: str, headers: dict[str, str] | None = None) -> Handler:
    def handler(_request: web.Request, _params: dict[str, str]) -> web.Response:
        return web.json_response({"code": code, "msg": msg}, status=status, headers=headers)

    return handler


def ok(body: Any, headers: dict[str, str] | None = None) -> Handler:
    def handler(_request: web.Request, _params: dict[str, str]) -> web.Response:
        return web.json_response(body, headers=headers)

    return handler


def test_signature_matches_the_documented_vector() -> None:
    secret = b"2b5eb11e18796d12d88f13dc27dbbd02c2cc51ff7059765ed9821957d82bb4d9"
    message = (
        "symbol=BTCUSDT&side=BUY&type=LIMIT&quantity=1&price=9000&timeInForce=GTC"
        "&recvWindow=5000&timestamp=1591702613943"
    )
    assert sign(secret, message) == (
        "3c661234138461fcc7a7d8746c6558c9842d4e10870d2ecbedf7777cad694af9"
    )


async def test_signed_post_signs_exactly_the_bytes_sent(
    venue: FakeVenue, client: BinanceClient
) -> None:
    venue.script("POST", "/fapi/v1/order", ok({"orderId": 1, "status": "NEW"}))
    params = {
        "symbol": "BTCUSDT",
        "side": "SELL",
        "positionSide": "BOTH",
        "type": "MARKET",
        "quantity": "0.003",
        "reduceOnly": "true",
        "newClientOrderId": "pq-abc:1/0",
    }
    await client.new_order(params)
    sent = next(r for r in venue.requests if r["path"] == "/fapi/v1/order")
    assert sent["headers"]["X-MBX-APIKEY"] == KEY
    assert sent["query"] == ""
    body = sent["body"]
    payload, signature = body.rsplit("&signature=", 1)
    expected = hmac.new(SECRET.encode(), payload.encode(), hashlib.sha256).hexdigest()
    assert signature == expected
    assert payload.startswith(
        "symbol=BTCUSDT&side=SELL&positionSide=BOTH&type=MARKET&quantity=0.003"
        "&reduceOnly=true&newClientOrderId=pq-abc%3A1%2F0&recvWindow=5000&timestamp="
    )
    assert sent["params"]["newClientOrderId"] == "pq-abc:1/0"


async def test_signed_get_puts_signature_last_in_query(
    venue: FakeVenue, client: BinanceClient
) -> None:
    venue.script("GET", "/fapi/v1/positionSide/dual", ok({"dualSidePosition": True}))
    assert await client.is_hedge_mode() is True
    sent = venue.requests[-1]
    payload, signature = sent["query"].rsplit("&signature=", 1)
    assert sign(SECRET.encode(), payload) == signature
    assert sent["body"] == ""


async def test_timestamp_uses_the_measured_server_offset(
    venue: FakeVenue, client: BinanceClient
) -> None:
    venue.server_offset_ms = 7_000
    venue.script("GET", "/fapi/v3/account", ok({"totalWalletBalance": "100"}))
    await client.account()
    assert abs(client.time_offset_ms - 7_000) < 500
    stamp = int(venue.requests[-1]["params"]["timestamp"])
    assert abs(stamp - (time.time() * 1000 + 7_000)) < 1_000


async def test_invalid_timestamp_resyncs_and_retries_once(
    venue: FakeVenue, client: BinanceClient
) -> None:
    venue.script(
        "POST",
        "/fapi/v1/order",
        error(400, -1021, "Timestamp for this request is outside of the recvWindow."),
        ok({"orderId": 2}),
    )
    assert (await client.new_order({"symbol": "BTCUSDT"}))["orderId"] == 2
    paths = [r["path"] for r in venue.requests]
    assert paths == ["/fapi/v1/time", "/fapi/v1/order", "/fapi/v1/time", "/fapi/v1/order"]


async def test_invalid_timestamp_twice_is_retryable_not_looped(
    venue: FakeVenue, client: BinanceClient
) -> None:
    venue.script("POST", "/fapi/v1/order", error(400, -1021, "Timestamp outside recvWindow."))
    with pytest.raises(RetryableError) as info:
        await client.new_order({"symbol": "BTCUSDT"})
    assert info.value.code == -1021
    assert [r["path"] for r in venue.requests].count("/fapi/v1/order") == 2


async def test_usage_headers_are_read_in_any_case(venue: FakeVenue, client: BinanceClient) -> None:
    venue.script(
        "POST",
        "/fapi/v1/order",
        ok(
            {"orderId": 3},
            {
                "x-mbx-used-weight-1m": "17",
                "X-Mbx-Order-Count-10s": "4",
                "X-MBX-ORDER-COUNT-1M": "9",
            },
        ),
    )
    await client.new_order({"symbol": "BTCUSDT"})
    assert client.rate_limits.used_weight_1m == 17
    assert client.rate_limits.order_count_10s == 4
    assert client.rate_limits.order_count_1m == 9


async def test_429_raises_rate_limited_and_the_next_call_waits(
    venue: FakeVenue, client: BinanceClient
) -> None:
    venue.script(
        "GET",
        "/fapi/v1/premiumIndex",
        error(429, -1003, "Too many requests.", {"Retry-After": "0.2"}),
        ok({"symbol": "BTCUSDT", "markPrice": "1"}),
    )
    with pytest.raises(RateLimited) as info:
        await client.premium_index("BTCUSDT")
    assert info.value.retry_after_s == pytest.approx(0.2)
    assert info.value.http_status == 429
    loop = asyncio.get_running_loop()
    started = loop.time()
    rows = await client.premium_index("BTCUSDT")
    assert rows == [{"symbol": "BTCUSDT", "markPrice": "1"}]
    assert loop.time() - started >= 0.15


async def test_418_ban_longer_than_the_wait_cap_raises_at_once(venue: FakeVenue) -> None:
    venue.script(
        "GET",
        "/fapi/v1/ticker/24hr",
        error(418, -1003, "Way too many requests; IP banned.", {"Retry-After": "600"}),
    )
    async with BinanceClient(venue.url, KEY, SECRET, max_backoff_wait_s=5) as c:
        with pytest.raises(RateLimited):
            await c.ticker_24hr()
        count = len(venue.requests)
        with pytest.raises(RateLimited):
            await c.ticker_24hr()
        assert len(venue.requests) == count  # nothing was sent during the ban


@pytest.mark.parametrize(
    ("status", "code", "msg", "expected"),
    [
        (
            503,
            0,
            "Unknown error, please check your request or try again later.",
            OrderStatusUnknown,
        ),
        (503, 0, "Service Unavailable.", RetryableError),
        (503, -1008, "Request throttled by system-level protection.", RetryableError),
        (500, 0, "Internal Server Error", OrderStatusUnknown),
        (408, 0, "Request Timeout", OrderStatusUnknown),
        (400, -1007, "Timeout waiting for response from backend server.", OrderStatusUnknown),
        (400, -1000, "An unknown error occured while processing the request.", OrderStatusUnknown),
        (400, -2019, "Margin is insufficient.", OrderRejected),
        (400, -4061, "Order's position side does not match user's setting.", OrderRejected),
        (
            400,
            -4164,
            "Order's notional must be no smaller than 5 (unless you choose reduce only).",
            OrderRejected,
        ),
    ],
)
async def test_order_answers_map_to_typed_errors(
    venue: FakeVenue,
    client: BinanceClient,
    status: int,
    code: int,
    msg: str,
    expected: type[Exception],
) -> None:
    if code:
        venue.script("POST", "/fapi/v1/order", error(status, code, msg))
    else:
        venue.script("POST", "/fapi/v1/order", lambda _r, _p: web.Response(status=status, text=msg))
    with pytest.raises(expected) as info:
        await client.new_order({"symbol": "BTCUSDT"})
    assert type(info.value) is expected or issubclass(type(info.value), expected)
    if code:
        assert info.value.code == code  # type: ignore[attr-defined]
        assert info.value.msg == msg  # type: ignore[attr-defined]


async def test_same_5xx_on_a_read_is_only_retryable(
    venue: FakeVenue, client: BinanceClient
) -> None:
    venue.script("GET", "/fapi/v1/openOrders", lambda _r, _p: web.Response(status=500, text="boom"))
    with pytest.raises(RetryableError) as info:
        await client.open_orders()
    assert not isinstance(info.value, OrderStatusUnknown)


async def test_no_answer_to_an_order_is_unknown(venue: FakeVenue) -> None:
    release = asyncio.Event()

    async def stalled(_request: web.Request, _params: dict[str, str]) -> dict[str, int]:
        await release.wait()
        return {"orderId": 1}

    venue.script("POST", "/fapi/v1/order", stalled)
    async with BinanceClient(venue.url, KEY, SECRET, timeout_s=0.3) as c:
        await c.sync_time()
        with pytest.raises(OrderStatusUnknown):
            await c.new_order({"symbol": "BTCUSDT"})
    release.set()


async def test_connection_refused_is_retryable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with BinanceClient(f"http://127.0.0.1:{port}", KEY, SECRET) as c:
        with pytest.raises(RetryableError) as info:
            await c.ping()
        assert not isinstance(info.value, OrderStatusUnknown)


async def test_get_order_returns_none_for_unknown_order(
    venue: FakeVenue, client: BinanceClient
) -> None:
    venue.script("GET", "/fapi/v1/order", error(400, -2013, "Order does not exist."))
    assert await client.get_order("BTCUSDT", "pq-1") is None
    assert venue.requests[-1]["params"]["origClientOrderId"] == "pq-1"


async def test_margin_type_no_change_is_success(venue: FakeVenue, client: BinanceClient) -> None:
    venue.script("POST", "/fapi/v1/marginType", error(400, -4046, "No need to change margin type."))
    await client.set_margin_type("BTCUSDT", "CROSSED")


async def test_algo_order_goes_to_the_algo_endpoint(
    venue: FakeVenue, client: BinanceClient
) -> None:
    venue.script("POST", "/fapi/v1/algoOrder", ok({"algoId": 7, "clientAlgoId": "pq-b"}))
    await client.new_algo_order(
        {
            "symbol": "ETHUSDT",
            "side": "SELL",
            "positionSide": "LONG",
            "type": "STOP_MARKET",
            "triggerPrice": "2950.10",
            "closePosition": "true",
            "workingType": "MARK_PRICE",
            "clientAlgoId": "pq-b",
        }
    )
    sent = venue.requests[-1]
    assert sent["path"] == "/fapi/v1/algoOrder"
    assert sent["params"]["algoType"] == "CONDITIONAL"
    assert sent["params"]["triggerPrice"] == "2950.10"


async def test_listen_key_uses_key_header_without_signature(
    venue: FakeVenue, client: BinanceClient
) -> None:
    venue.script("POST", "/fapi/v1/listenKey", ok({"listenKey": "lk-1"}))
    assert await client.create_listen_key() == "lk-1"
    sent = venue.requests[-1]
    assert sent["headers"]["X-MBX-APIKEY"] == KEY
    assert "signature" not in sent["params"]


async def test_float_is_refused_and_decimal_is_exact(
    venue: FakeVenue, client: BinanceClient
) -> None:
    venue.script("GET", "/fapi/v1/klines", ok([]))
    with pytest.raises(TypeError, match="never float"):
        await client.request("GET", "/fapi/v1/klines", {"price": 0.1})  # type: ignore[dict-item]
    await client.request("GET", "/fapi/v1/klines", {"price": Decimal("1E-7"), "limit": 5})
    assert venue.requests[-1]["params"] == {"price": "0.0000001", "limit": "5"}


async def test_keys_never_appear_in_repr_errors_or_logs(
    venue: FakeVenue, client: BinanceClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    venue.script(
        "POST",
        "/fapi/v1/order",
        error(400, -1021, "Timestamp outside."),
        error(429, -1003, "slow", {"Retry-After": "0"}),
    )
    with pytest.raises(RetryableError) as info:
        await client.new_order({"symbol": "BTCUSDT"})
    text = caplog.text + repr(client) + str(info.value)
    assert KEY not in text
    assert SECRET not in text
    assert "signature=" not in text


async def test_exchange_info_sets_the_weight_budget(
    venue: FakeVenue, client: BinanceClient
) -> None:
    doc = {
        "rateLimits": [
            {
                "rateLimitType": "REQUEST_WEIGHT",
                "interval": "MINUTE",
                "intervalNum": 1,
                "limit": 6000,
            }
        ],
        "symbols": [],
    }
    venue.script(
        "GET", "/fapi/v1/exchangeInfo", lambda _r, _p: web.Response(body=orjson.dumps(doc))
    )
    raw = await client.exchange_info()
    assert orjson.loads(raw) == doc
    assert client.rate_limits.weight_limit_1m == 6000


def test_client_satisfies_the_venue_protocol_exactly() -> None:
    import inspect

    from pyquant.exchange.venue import Venue

    names = [n for n, v in vars(Venue).items() if inspect.iscoroutinefunction(v)]
    assert len(names) >= 20
    for name in names:
        ours = getattr(BinanceClient, name)
        assert inspect.iscoroutinefunction(ours), name
        expected = inspect.signature(getattr(Venue, name))
        assert inspect.signature(ours).parameters.keys() == expected.parameters.keys(), name
        for pname, param in expected.parameters.items():
            assert inspect.signature(ours).parameters[pname].default == param.default, (name, pname)
    venue: Venue = BinanceClient("http://127.0.0.1:1", KEY, SECRET)  # mypy checks the shape
    assert venue is not None
