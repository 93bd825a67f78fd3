"""Tick-to-order latency through the whole daemon on loopback.

What is measured: from the moment a ``!markPrice@arr@1s`` websocket message is handed to the
daemon's callback to the moment the exit order's request headers are written to the socket
(``Daemon.latency``; the receive time travels in a context variable to the REST client's
``on_request_sent`` hook). The whole daemon runs: websocket client, Rust engine, trading desk
(store write-ahead, router), signed REST client.

Scale: 600 symbols in every message, 1,000 open positions (500 symbols, both hedge legs,
adopted at start from the venue's positionRisk). Each round moves the mark of 1 (typical) or
5 (a burst) symbols through their long stops (the others unchanged), so each message carries
600 updates and triggers 1 or 5 stop exits, plus the take-profits the same move gives those
symbols' short legs: 2 or 10 exit orders per message, all measured.

The venue is a lean loopback Binance stand-in (aiohttp REST + websocket on one port): it
answers every MARKET order FILLED at once, so the figures are the daemon's own path, not a
matching engine's. Baseline, side by side in the same run: the floor, a handler that sends
the same order straight from the websocket callback through the same REST client with no
parsing, engine, store or router.

With ``--benchmark-disable`` (the default suite) it runs once at a small scale as a smoke test.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import time
from collections.abc import Coroutine, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import WSMsgType, web

from pyquant.config import load_config
from pyquant.daemon.app import TICK_RECEIVED_NS, Daemon, LatencyRecorder
from pyquant.exchange.client import BinanceClient

DATA = Path(__file__).parents[1] / "data" / "binance"
KEY, SECRET = "bench-key", "bench-secret"


def exchange_info(
    symbol_count: int,
) -> tuple[dict[str, Any], dict[str, Decimal], dict[str, Decimal]]:
    """Return the real exchangeInfo cut to ``symbol_count`` TRADING symbols, price and qty each."""
    doc = json.loads((DATA / "exchangeInfo_fapi_full_2025-11-26.json").read_text())
    usable = [
        s
        for s in doc["symbols"]
        if all(
            Decimal(f.get("tickSize", "1")) > 0 and Decimal(f.get("stepSize", "1")) > 0
            for f in s["filters"]
        )
    ]
    symbols = usable[:symbol_count]
    assert len(symbols) == symbol_count
    prices: dict[str, Decimal] = {}
    quantities: dict[str, Decimal] = {}
    for s in symbols:
        s["status"] = "TRADING"
        filters = {f["filterType"]: f for f in s["filters"]}
        tick = Decimal(filters["PRICE_FILTER"]["tickSize"])
        low = max(Decimal(filters["PRICE_FILTER"]["minPrice"]), tick)
        price = (low * 40 / tick).to_integral_value() * tick
        step = Decimal(filters["MARKET_LOT_SIZE"]["stepSize"])
        min_qty = max(Decimal(filters["MARKET_LOT_SIZE"]["minQty"]), step)
        notional = Decimal(filters.get("MIN_NOTIONAL", {}).get("notional", "5"))
        qty = max(min_qty * 10, ((notional * 20 / price) / step).to_integral_value() * step)
        prices[s["symbol"]] = Decimal(format(price, "f"))
        quantities[s["symbol"]] = Decimal(format(qty, "f"))
    out = copy.copy(doc)
    out["symbols"] = symbols
    return out, prices, quantities


class LoopbackVenue:
    """Just enough of Binance USDⓈ-M futures for the daemon, answering at once."""

    def __init__(self, symbol_count: int, position_symbols: int) -> None:
        self.info, self.prices, self.quantities = exchange_info(symbol_count)
        self.symbols = [s["symbol"] for s in self.info["symbols"]]
        self.legs: dict[tuple[str, str], Decimal] = {}
        for symbol in self.symbols[:position_symbols]:
            self.legs[(symbol, "LONG")] = self.quantities[symbol]
            self.legs[(symbol, "SHORT")] = self.quantities[symbol]
        self.orders: dict[str, dict[str, Any]] = {}
        self.order_event = asyncio.Event()
        self.order_count = 0
        self.market: list[web.WebSocketResponse] = []
        self.market_connected = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None

    def _json(self, body: Any) -> web.Response:
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def rest(self, request: web.Request) -> web.StreamResponse:
        path, method = request.path, request.method
        if method in ("POST", "PUT", "DELETE"):
            params = dict(request.query) | dict(await request.post())
        else:
            params = dict(request.query)
        now = int(time.time() * 1000)
        if path == "/fapi/v1/time":
            return self._json({"serverTime": now})
        if path == "/fapi/v1/exchangeInfo":
            return self._json(self.info)
        if path == "/fapi/v1/positionSide/dual":
            return self._json({"dualSidePosition": True})
        if path == "/fapi/v3/account":
            return self._json(
                {
                    "totalWalletBalance": "1000000",
                    "totalMarginBalance": "1000000",
                    "availableBalance": "1000000",
                }
            )
        if path in ("/fapi/v3/positionRisk", "/fapi/v2/positionRisk"):
            rows = []
            for (symbol, leg), qty in self.legs.items():
                if qty:
                    amount = qty if leg == "LONG" else -qty
                    rows.append(
                        {
                            "symbol": symbol,
                            "positionSide": leg,
                            "positionAmt": str(amount),
                            "entryPrice": str(self.prices[symbol]),
                            "markPrice": str(self.prices[symbol]),
                            "leverage": "5",
                        }
                    )
            return self._json(rows)
        if path in ("/fapi/v1/openOrders", "/fapi/v1/openAlgoOrders"):
            return self._json([])
        if path == "/fapi/v1/listenKey":
            return self._json({"listenKey": "benchlistenkey0000000000"})
        if path in ("/fapi/v1/leverage", "/fapi/v1/marginType"):
            return self._json({"code": 200, "msg": "success"})
        if path == "/fapi/v1/premiumIndex":
            return self._json(
                [{"symbol": s, "markPrice": str(p), "time": now} for s, p in self.prices.items()]
            )
        if path == "/fapi/v1/ticker/24hr":
            return self._json([])
        if path == "/fapi/v1/algoOrder":
            return self._json(
                {
                    "algoId": 1,
                    "clientAlgoId": params.get("clientAlgoId"),
                    "algoStatus": "NEW" if method == "POST" else "CANCELED",
                }
            )
        if path == "/fapi/v1/order" and method == "GET":
            order = self.orders.get(params.get("origClientOrderId", ""))
            if order is None:
                return web.json_response(
                    {"code": -2013, "msg": "Order does not exist."}, status=400
                )
            return self._json(order)
        if path == "/fapi/v1/order" and method == "POST":
            symbol, leg = params["symbol"], params.get("positionSide", "BOTH")
            qty = Decimal(params["quantity"])
            reduce = (leg == "LONG" and params["side"] == "SELL") or (
                leg == "SHORT" and params["side"] == "BUY"
            )
            held = self.legs.get((symbol, leg), Decimal(0))
            if reduce:
                if held <= 0:
                    return web.json_response(
                        {"code": -2022, "msg": "ReduceOnly Order is rejected."}, status=400
                    )
                qty = min(qty, held)
                self.legs[(symbol, leg)] = held - qty
            else:
                self.legs[(symbol, leg)] = held + qty
            self.order_count += 1
            order = {
                "orderId": self.order_count,
                "clientOrderId": params.get("newClientOrderId"),
                "symbol": symbol,
                "status": "FILLED",
                "type": "MARKET",
                "side": params["side"],
                "positionSide": leg,
                "origQty": str(qty),
                "executedQty": str(qty),
                "cumQuote": "0",
                "avgPrice": str(self.prices[symbol]),
                "reduceOnly": reduce,
                "updateTime": now,
            }
            self.orders[str(order["clientOrderId"])] = order
            self.order_event.set()
            return self._json(order)
        return web.json_response({"code": -1121, "msg": f"unknown path {path}"}, status=400)

    async def ws(self, request: web.Request) -> web.StreamResponse:
        socket = web.WebSocketResponse(heartbeat=None)
        await socket.prepare(request)
        if request.path.startswith("/market"):
            self.market.append(socket)
            self.market_connected.set()
        async for message in socket:
            if message.type == WSMsgType.CLOSE:
                break
        return socket

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("GET", "/market/{tail:.*}", self.ws)
        app.router.add_route("GET", "/private/{tail:.*}", self.ws)
        app.router.add_route("*", "/{tail:.*}", self.rest)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        for socket in self.market:
            await socket.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def message(self, moved: dict[str, Decimal]) -> bytes:
        now = int(time.time() * 1000)
        return orjson.dumps(
            [
                {
                    "e": "markPriceUpdate",
                    "E": now,
                    "s": s,
                    "p": str(moved.get(s, p)),
                    "i": str(p),
                    "P": str(p),
                    "r": "0.0001",
                    "T": now + 3_600_000,
                }
                for s, p in self.prices.items()
            ]
        )

    async def push(self, data: bytes) -> None:
        await self.market[-1].send_str(data.decode())


class LoopThread:
    """An asyncio loop in a thread, so pytest-benchmark can time rounds synchronously."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    runner = LoopThread()
    yield runner
    runner.close()


async def wait_orders(venue: LoopbackVenue, count: int, limit_s: float = 30) -> None:
    async with asyncio.timeout(limit_s):
        while venue.order_count < count:
            venue.order_event.clear()
            await venue.order_event.wait()


def scale(benchmark: Any) -> tuple[int, int, int]:
    """(symbols, symbols with positions, rounds): full scale only when benchmarks are enabled."""
    if getattr(benchmark, "disabled", False):
        return 60, 50, 3
    return 600, 500, 80


@pytest.mark.benchmark(group="tick-to-order")
@pytest.mark.parametrize("movers_per_message", [1, 5])
def test_daemon_tick_to_order(
    benchmark: Any, loop_thread: LoopThread, tmp_path: Path, movers_per_message: int
) -> None:
    symbol_count, position_symbols, rounds = scale(benchmark)
    venue = LoopbackVenue(symbol_count, position_symbols)
    loop_thread.run(venue.start())
    env = {"PYQUANT_API_KEY": KEY, "PYQUANT_API_SECRET": SECRET}
    config = load_config(
        None,
        environ=env,
        overrides={
            "exchange": "custom",
            "venue": {
                "rest_url": f"http://{venue.url}",
                "ws_url": f"ws://{venue.url}/market",
                "user_ws_url": f"ws://{venue.url}/private",
            },
            "market": {"warmup_bars": 0, "stale_after_s": 600.0},
            "sources": {"demo": False},
            "router": {"backstop": False},
            "entries": {"max_open_positions": 2000},
            "daemon": {"dashboard": False, "snapshot_interval_s": 3600.0},
        },
    )
    daemon = Daemon(config, state_dir=tmp_path / "state", install_signal_handlers=False)

    running: dict[str, asyncio.Task[dict[str, object]]] = {}

    async def start() -> None:
        task = asyncio.get_running_loop().create_task(daemon.run())
        running["task"] = task
        ready = asyncio.ensure_future(daemon.ready.wait())
        await asyncio.wait({task, ready}, timeout=120, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raises what stopped the daemon
        assert daemon.ready.is_set(), "daemon did not become ready"
        await asyncio.wait_for(venue.market_connected.wait(), 30)

    loop_thread.run(start())
    assert daemon.engine is not None
    assert len(daemon.engine.positions()) == 2 * position_symbols
    movers = iter(venue.symbols[:position_symbols])
    state = {"orders": venue.order_count}

    async def one_round() -> None:
        chosen = [next(movers) for _ in range(movers_per_message)]
        moved = {s: venue.prices[s] * Decimal("0.85") for s in chosen}
        moved = {
            s: Decimal(daemon.rules.quantize_price(s, str(p), "down")) for s, p in moved.items()
        }
        await venue.push(venue.message(moved))
        await wait_orders(venue, state["orders"] + movers_per_message)
        assert daemon.desk is not None
        await daemon.desk.drain()  # the short legs' take-profits of the same move land too
        for s, p in moved.items():
            venue.prices[s] = p
        state["orders"] = venue.order_count

    benchmark.pedantic(lambda: loop_thread.run(one_round()), rounds=rounds, iterations=1)

    async def stop() -> dict[str, object]:
        daemon.stop()
        summary = await running["task"]
        await venue.stop()
        return summary

    summary = loop_thread.run(stop())
    samples = sorted(daemon.latency.samples)
    assert samples, "no exit order was measured"
    percentiles = daemon.latency.percentiles()
    benchmark.extra_info.update(
        {
            "symbols": symbol_count,
            "open_positions": 2 * position_symbols,
            "stops_per_message": movers_per_message,
            "orders_measured": len(samples),
            "p50_ms": percentiles["p50"],
            "p99_ms": percentiles["p99"],
            "max_ms": round(samples[-1], 3),
        }
    )
    assert summary["exits"], summary


@pytest.mark.benchmark(group="tick-to-order")
def test_floor_tick_to_order(benchmark: Any, loop_thread: LoopThread) -> None:
    """The floor: the same websocket and REST client, no engine, store or router."""
    symbol_count, position_symbols, rounds = scale(benchmark)
    venue = LoopbackVenue(symbol_count, position_symbols)
    loop_thread.run(venue.start())
    recorder = LatencyRecorder()
    client = BinanceClient(f"http://{venue.url}", KEY, SECRET)
    client.on_request_sent = recorder.on_request_sent
    symbols = iter(venue.symbols[:position_symbols])
    counter = {"n": 0}

    async def consume(url: str, ready: asyncio.Event, stop: asyncio.Event) -> None:
        from websockets.asyncio.client import connect

        async with connect(url, max_size=2**24) as ws:
            ready.set()
            while not stop.is_set():
                data = await ws.recv(decode=False)
                token = TICK_RECEIVED_NS.set(time.perf_counter_ns())
                try:
                    tasks = []
                    for _ in range(5):
                        counter["n"] += 1
                        symbol = next(symbols)
                        tasks.append(
                            asyncio.ensure_future(
                                client.new_order(
                                    {
                                        "symbol": symbol,
                                        "side": "SELL",
                                        "positionSide": "LONG",
                                        "type": "MARKET",
                                        "quantity": str(venue.quantities[symbol]),
                                        "newClientOrderId": f"floor-{counter['n']}",
                                        "newOrderRespType": "RESULT",
                                    }
                                )
                            )
                        )
                finally:
                    TICK_RECEIVED_NS.reset(token)
                del data
                await asyncio.gather(*tasks)

    ready, stop = asyncio.Event(), asyncio.Event()

    async def start() -> asyncio.Task[None]:
        await client.sync_time()
        task = asyncio.get_running_loop().create_task(
            consume(f"ws://{venue.url}/market/ws/x", ready, stop)
        )
        await asyncio.wait_for(ready.wait(), 10)
        await asyncio.wait_for(venue.market_connected.wait(), 10)
        return task

    task = loop_thread.run(start())
    message = venue.message({})
    state = {"orders": venue.order_count, "rounds": 0}

    async def one_round() -> None:
        state["rounds"] += 1
        await venue.push(message)
        await wait_orders(venue, state["orders"] + 5)
        state["orders"] = venue.order_count

    benchmark.pedantic(lambda: loop_thread.run(one_round()), rounds=rounds, iterations=1)

    async def finish() -> None:
        stop.set()
        task.cancel()
        await client.close()
        await venue.stop()

    loop_thread.run(finish())
    percentiles = recorder.percentiles()
    benchmark.extra_info.update(
        {
            "symbols": symbol_count,
            "orders_measured": len(recorder.samples),
            "p50_ms": percentiles["p50"],
            "p99_ms": percentiles["p99"],
        }
    )
    assert len(recorder.samples) == 5 * state["rounds"]
