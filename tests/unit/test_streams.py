"""Market and user-data streams against a loopback websocket server."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.server import Server, ServerConnection, serve

from pyquant.errors import MessageError, OrderRejected
from pyquant.exchange.streams import (
    Backoff,
    MarkPriceStream,
    RouteChoice,
    UserDataStream,
    UserEvent,
    closed_bars,
    mark_price_url,
    parse_user_event,
    premium_to_mark_message,
)

DATA = Path(__file__).parents[1] / "data" / "binance"
MARK = (DATA / "ws_markPrice_arr_docs.json").read_bytes()


async def until(predicate: Callable[[], bool], limit_s: float = 5.0) -> None:
    """Wait until the condition holds (state changes come from other tasks)."""
    async with asyncio.timeout(limit_s):
        while not predicate():  # noqa: ASYNC110 - the state lives in the code under test
            await asyncio.sleep(0.01)


class WsServer:
    """A scripted websocket server: records paths, runs a per-connection script."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.connections: list[ServerConnection] = []
        self.script: Callable[[ServerConnection], Awaitable[None]] = self.idle
        self.server: Server | None = None
        self.url = ""

    async def idle(self, ws: ServerConnection) -> None:
        await ws.wait_closed()

    async def handler(self, ws: ServerConnection) -> None:
        self.paths.append(ws.request.path if ws.request else "")
        self.connections.append(ws)
        await self.script(ws)


@pytest.fixture
async def ws_server() -> AsyncIterator[WsServer]:
    fake = WsServer()
    async with serve(fake.handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        fake.server = server
        fake.url = f"ws://127.0.0.1:{port}"
        yield fake


class FakeVenue:
    """The REST calls streams make, in memory."""

    def __init__(self) -> None:
        self.premium_calls = 0
        self.keys: list[str] = []
        self.keepalives = 0
        self.keepalive_error: Exception | None = None
        self.closed = 0

    async def premium_index(self, symbol: str | None = None) -> list[dict[str, Any]]:
        self.premium_calls += 1
        return [
            {
                "symbol": "BTCUSDT",
                "markPrice": "30000.10",
                "indexPrice": "30001.00",
                "estimatedSettlePrice": "30000.00",
                "lastFundingRate": "0.0001",
                "nextFundingTime": 1597392000000,
                "interestRate": "0.0001",
                "time": 1597370495002,
            },
            {"symbol": "ETHUSDT", "markPrice": "2000.5", "time": 1597370495002},
        ]

    async def create_listen_key(self) -> str:
        key = f"key{len(self.keys)}" + "x" * 20
        self.keys.append(key)
        return key

    async def keepalive_listen_key(self) -> None:
        self.keepalives += 1
        if self.keepalive_error is not None:
            raise self.keepalive_error

    async def close_listen_key(self) -> None:
        self.closed += 1


async def run_in_background(coro: Awaitable[None]) -> asyncio.Task[None]:
    return asyncio.ensure_future(coro)


def test_mark_price_urls() -> None:
    assert mark_price_url("wss://fstream.binance.com/market", ()) == (
        "wss://fstream.binance.com/market/ws/!markPrice@arr@1s"
    )
    assert mark_price_url("wss://x/market/", ["BTCUSDT", "ETHUSDT"]) == (
        "wss://x/market/stream?streams=btcusdt@markPrice@1s/ethusdt@markPrice@1s"
    )


def test_backoff_is_capped_and_jittered() -> None:
    backoff = Backoff(initial_s=0.5, max_s=4.0, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(10)]
    assert 0.25 <= delays[0] <= 0.5
    assert all(d <= 4.0 for d in delays)
    assert all(d >= 2.0 for d in delays[4:])
    backoff.reset()
    assert backoff.next_delay() <= 0.5


def test_closed_bars_drop_the_open_bar_and_keep_order() -> None:
    rows = [
        [120_000, "3", "5", "1", "4", "0", 179_999, "0", 0, "0", "0", "0"],
        [60_000, "1", "3", "0.5", "2", "0", 119_999, "0", 0, "0", "0", "0"],
        [180_000, "4", "6", "3", "5", "0", 239_999, "0", 0, "0", "0", "0"],
    ]
    bars = closed_bars(rows, now_ms=200_000)
    assert list(bars.open_time_ms) == [60_000, 120_000]
    assert list(bars.high) == [3.0, 5.0]
    assert list(bars.close) == [2.0, 4.0]
    with pytest.raises(MessageError, match="row 0"):
        closed_bars([["x"]], now_ms=1)


def test_docs_mark_price_kline_is_closed() -> None:
    rows = json.loads((DATA / "markPriceKlines_docs.json").read_text())
    assert len(closed_bars(rows, now_ms=1_700_000_000_000)) == 1


def test_premium_rows_become_mark_price_updates() -> None:
    rows = [json.loads((DATA / "premiumIndex_docs.json").read_text())]
    doc = orjson.loads(premium_to_mark_message(rows, None))
    assert doc == [
        {
            "e": "markPriceUpdate",
            "E": 1597370495002,
            "s": "BTCUSDT",
            "p": "11793.63104562",
            "i": "11781.80495970",
            "P": "11781.16138815",
            "r": "0.00038246",
            "T": 1597392000000,
        }
    ]
    assert orjson.loads(premium_to_mark_message(rows, frozenset({"ETHUSDT"}))) == []


async def test_bytes_reach_the_callback_verbatim(ws_server: WsServer) -> None:
    async def script(ws: ServerConnection) -> None:
        await ws.send(MARK.decode())
        await ws.wait_closed()

    ws_server.script = script
    got: list[bytes] = []
    stream = MarkPriceStream(ws_server.url + "/market", FakeVenue(), got.append)  # type: ignore[arg-type]
    task = asyncio.create_task(stream.run())
    await until(lambda: bool(got))
    assert got[0] == MARK
    assert ws_server.paths == ["/market/ws/!markPrice@arr@1s"]
    await stream.close()
    await task


async def test_dropped_connection_reconnects(ws_server: WsServer) -> None:
    async def script(ws: ServerConnection) -> None:
        await ws.send(MARK.decode())
        if len(ws_server.connections) == 1:
            await ws.close()  # the server drops the first connection
        else:
            await ws.wait_closed()

    ws_server.script = script
    got: list[bytes] = []
    stream = MarkPriceStream(
        ws_server.url,
        FakeVenue(),
        got.append,
        backoff=Backoff(0.01, 0.05),  # type: ignore[arg-type]
    )
    task = asyncio.create_task(stream.run())
    await until(lambda: len(got) >= 2)
    assert stream.health.reconnects == 1
    assert len(ws_server.connections) == 2
    await stream.close()
    await task


async def test_stale_feed_polls_rest_until_the_stream_is_back(ws_server: WsServer) -> None:
    resume = asyncio.Event()

    async def script(ws: ServerConnection) -> None:
        await ws.send(MARK.decode())
        await resume.wait()
        await ws.send(MARK.decode())
        await ws.wait_closed()

    ws_server.script = script
    got: list[bytes] = []
    gaps: list[float] = []

    async def on_gap(seconds: float) -> None:
        gaps.append(seconds)

    venue = FakeVenue()
    stream = MarkPriceStream(
        ws_server.url,
        venue,
        got.append,
        stale_after_s=0.2,
        poll_interval_s=0.05,  # type: ignore[arg-type]
        on_gap=on_gap,
        gap_threshold_s=0.2,
    )
    task = asyncio.create_task(stream.run())
    await until(lambda: stream.health.stale and stream.health.polled >= 2)
    synthesized = orjson.loads(got[1])
    assert synthesized[0]["e"] == "markPriceUpdate"
    assert synthesized[0]["s"] == "BTCUSDT"
    assert synthesized[0]["p"] == "30000.10"
    resume.set()
    await until(lambda: not stream.health.stale and stream.health.messages == 2)
    await until(lambda: bool(gaps))
    assert gaps[0] >= 0.2
    polls = venue.premium_calls
    await asyncio.sleep(0.15)  # polling must have stopped; no timing assert on speed
    assert venue.premium_calls <= polls + 1
    await stream.close()
    await task


async def test_proactive_rotation_opens_a_new_connection(ws_server: WsServer) -> None:
    async def script(ws: ServerConnection) -> None:
        while True:
            await ws.send(MARK.decode())
            await asyncio.sleep(0.02)

    ws_server.script = script
    stream = MarkPriceStream(ws_server.url, FakeVenue(), lambda _b: None, rotate_after_s=0.2)  # type: ignore[arg-type]
    task = asyncio.create_task(stream.run())
    await until(lambda: len(ws_server.connections) >= 2)
    await stream.close()
    await task


async def test_malformed_message_is_counted_and_stream_continues(ws_server: WsServer) -> None:
    async def script(ws: ServerConnection) -> None:
        await ws.send("not json")
        await ws.send(MARK.decode())
        await ws.wait_closed()

    ws_server.script = script
    good: list[bytes] = []

    def engine(data: bytes) -> None:
        if not data.startswith(b"["):
            raise MessageError("mark-price message is not JSON")
        good.append(data)

    stream = MarkPriceStream(ws_server.url, FakeVenue(), engine)  # type: ignore[arg-type]
    task = asyncio.create_task(stream.run())
    await until(lambda: bool(good))
    assert stream.health.malformed == 1
    await stream.close()
    await task


def sample(name: str) -> bytes:
    return (DATA / name).read_bytes()


@pytest.mark.parametrize(
    "name",
    [
        "ws_ORDER_TRADE_UPDATE_new_docs.json",
        "ws_ORDER_TRADE_UPDATE_trade_docs_derived.json",
        "ws_ORDER_TRADE_UPDATE_partial_docs_derived.json",
        "ws_ORDER_TRADE_UPDATE_reduceonly_fill_synthetic.json",
        "ws_ORDER_TRADE_UPDATE_liquidation_synthetic.json",
        "ws_ORDER_TRADE_UPDATE_adl_synthetic.json",
        "ws_ACCOUNT_UPDATE_docs.json",
        "ws_ACCOUNT_UPDATE_bnfcr.json",
        "ws_ALGO_UPDATE_triggering_real.json",
        "ws_ALGO_UPDATE_triggered_real.json",
        "ws_ALGO_UPDATE_finished_real.json",
        "ws_TRADE_LITE_real.json",
        "ws_listenKeyExpired_docs.json",
    ],
)
def test_real_user_events_parse(name: str) -> None:
    event = parse_user_event(sample(name))
    doc = orjson.loads(sample(name))
    assert event.kind == doc.get("data", doc)["e"]
    assert event.event_time_ms > 0


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"{", "not JSON"),
        (b"[1]", "must be a JSON object"),
        (b'{"E": 1}', "field 'e'"),
        (b'{"e": "ORDER_TRADE_UPDATE", "E": 1, "o": {"s": "BTCUSDT"}}', "missing field"),
        (b'{"e": "ACCOUNT_UPDATE", "E": 1, "a": {"P": {}}}', "must be a list"),
        (b'{"e": "ALGO_UPDATE", "E": "soon", "o": {}}', "field 'E'"),
    ],
)
def test_malformed_user_events_are_refused(data: bytes, match: str) -> None:
    with pytest.raises(MessageError, match=match):
        parse_user_event(data)


async def test_user_stream_lifecycle(ws_server: WsServer) -> None:
    expire_first = asyncio.Event()

    async def script(ws: ServerConnection) -> None:
        if len(ws_server.connections) == 1:
            await ws.send(sample("ws_ORDER_TRADE_UPDATE_new_docs.json").decode())
            await ws.send("garbage")
            await ws.send(sample("ws_ACCOUNT_UPDATE_docs.json").decode())
            await expire_first.wait()
            await ws.send(sample("ws_listenKeyExpired_docs.json").decode())
            await ws.wait_closed()
        else:
            await ws.send(sample("ws_ALGO_UPDATE_triggered_real.json").decode())
            await ws.wait_closed()

    ws_server.script = script
    venue = FakeVenue()
    events: list[UserEvent] = []
    connected: list[bool] = []
    disconnected: list[int] = []

    async def on_event(event: UserEvent) -> None:
        events.append(event)

    async def on_connected(reconnect: bool) -> None:
        connected.append(reconnect)

    stream = UserDataStream(
        ws_server.url + "/private",
        venue,
        on_event,  # type: ignore[arg-type]
        on_connected=on_connected,
        on_disconnected=lambda: disconnected.append(1),
        backoff=Backoff(0.01, 0.05),
    )
    task = asyncio.create_task(stream.run())
    await until(lambda: len(events) == 2)
    assert [e.kind for e in events] == ["ORDER_TRADE_UPDATE", "ACCOUNT_UPDATE"]
    assert stream.health.malformed == 1
    assert ws_server.paths[0] == f"/private/ws/{venue.keys[0]}"
    expire_first.set()
    await until(lambda: len(events) == 3)
    assert events[2].kind == "ALGO_UPDATE"
    assert len(venue.keys) == 2
    assert ws_server.paths[1] == f"/private/ws/{venue.keys[1]}"
    assert connected == [False, True]
    assert disconnected == [1]
    await stream.close()
    await task
    assert venue.closed == 1


async def test_keepalive_minus_1125_creates_a_new_key(ws_server: WsServer) -> None:
    venue = FakeVenue()
    venue.keepalive_error = OrderRejected(-1125, "This listenKey does not exist.")

    async def on_event(event: UserEvent) -> None:
        return None

    stream = UserDataStream(
        ws_server.url,
        venue,
        on_event,
        keepalive_interval_s=0.05,  # type: ignore[arg-type]
        backoff=Backoff(0.01, 0.05),
    )
    task = asyncio.create_task(stream.run())
    await until(lambda: len(venue.keys) >= 2 and len(ws_server.paths) >= 2)
    assert ws_server.paths[1] == f"/ws/{venue.keys[1]}"
    venue.keepalive_error = None
    await stream.close()
    await task


def test_route_choice_alternates_only_with_a_fallback() -> None:
    alone = RouteChoice("wss://h/market/")
    assert (alone.current, alone.refused(), alone.current) == (
        "wss://h/market",
        False,
        "wss://h/market",
    )
    both = RouteChoice("wss://h/market", "wss://h/")
    assert both.refused()
    assert both.current == "wss://h"
    assert both.refused()
    assert both.current == "wss://h/market"
    assert both.switches == 2


async def test_refused_routes_fall_back_to_the_legacy_host() -> None:
    """Contract 1.1/2.5: the testnet may serve only the legacy root; a route refused at the
    handshake (HTTP 404) moves both streams to the fallback base, which then delivers."""
    paths: list[str] = []

    def refuse_routes(conn: ServerConnection, request: Any) -> Any:
        paths.append(request.path)
        if request.path.startswith(("/market", "/private")):
            return conn.respond(404, "route not served\n")
        return None

    async def handler(ws: ServerConnection) -> None:
        if ws.request is not None and "@" in ws.request.path:
            await ws.send(MARK.decode())
        else:
            await ws.send(json.dumps({"e": "STRATEGY_UPDATE", "E": 1}))
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, process_request=refuse_routes) as server:
        base = f"ws://127.0.0.1:{next(iter(server.sockets)).getsockname()[1]}"
        got: list[bytes] = []
        market = MarkPriceStream(
            base + "/market",
            FakeVenue(),  # type: ignore[arg-type]
            got.append,
            backoff=Backoff(0.01, 0.05),
            fallback_ws_base=base,
        )
        events: list[UserEvent] = []

        async def on_event(event: UserEvent) -> None:
            events.append(event)

        user = UserDataStream(
            base + "/private",
            FakeVenue(),  # type: ignore[arg-type]
            on_event,
            backoff=Backoff(0.01, 0.05),
            fallback_ws_base=base,
        )
        tasks = [asyncio.create_task(market.run()), asyncio.create_task(user.run())]
        await until(lambda: bool(got) and bool(events))
        assert got[0] == MARK
        assert events[0].kind == "STRATEGY_UPDATE"
        assert market.routes.current == base
        assert user.routes.current == base
        assert "/market/ws/!markPrice@arr@1s" in paths
        assert "/ws/!markPrice@arr@1s" in paths
        assert any(p.startswith("/private/ws/key0") for p in paths)
        await market.close()
        await user.close()
        for task in tasks:
            await task
