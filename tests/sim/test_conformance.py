"""Conformance: every response and stream message has the keys and value types of the real samples.

Samples are in tests/data/binance (provenance in its SOURCES.md). Ids and times appear in some
real captures as strings of digits and as numbers in others (contract 2.3: "parse both"), so an
int on our side matches a digit string in a sample; everything else must match exactly.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from tests.sim.conftest import (
    Rest,
    UserStream,
    limit,
    market,
    open_user_stream,
    sample,
    subscribed,
)

# keys the sample's source project added to Binance's payload (SOURCES.md)
SAMPLE_ONLY = {"st", "ps"}


def shape(
    ours: Any,
    real: Any,
    where: str = "$",
    subset: bool = False,
    ignore: frozenset[str] = frozenset(),
) -> None:
    """Assert ``ours`` has the keys and value types of ``real`` (recursively)."""
    if isinstance(real, dict):
        assert isinstance(ours, dict), f"{where}: expected an object, found {ours!r}"
        want = set(real) - ignore
        have = set(ours) - ignore
        if subset:
            assert want <= have, f"{where}: missing keys {sorted(want - have)}"
        else:
            assert want == have, (
                f"{where}: missing {sorted(want - have)}, extra {sorted(have - want)}"
            )
        for key in want:
            shape(ours[key], real[key], f"{where}.{key}", subset, ignore)
    elif isinstance(real, list):
        assert isinstance(ours, list), f"{where}: expected an array, found {ours!r}"
        if real and ours:
            shape(ours[0], real[0], f"{where}[0]", subset, ignore)
    elif isinstance(real, bool):
        assert isinstance(ours, bool), f"{where}: expected a boolean, found {ours!r}"
    elif (
        isinstance(real, str)
        and real.lstrip("-").isdigit()
        and isinstance(ours, int)
        and not isinstance(ours, bool)
    ):
        pass  # id or time rendered as a string in that capture
    elif real is None:
        pass  # a null in a capture says nothing about the type
    elif isinstance(real, (int, float)) and not isinstance(real, bool):
        assert isinstance(ours, (int, float)), f"{where}: expected a number, found {ours!r}"
        assert not isinstance(ours, bool), f"{where}: expected a number, found {ours!r}"
        if isinstance(real, int):
            assert isinstance(ours, int), f"{where}: expected an integer, found {ours!r}"
    else:
        assert type(ours) is type(real), f"{where}: expected {type(real).__name__}, found {ours!r}"


async def test_market_data_endpoints(rest: Rest) -> None:
    _, headers, body = await rest.public("/fapi/v1/premiumIndex", symbol="BTCUSDT")
    shape(body, sample("premiumIndex_docs.json"))
    assert "X-MBX-USED-WEIGHT-1M" in headers
    _, _, body = await rest.public("/fapi/v1/premiumIndex")
    assert len(body) == 6
    shape(body[0], sample("premiumIndex_docs.json"))
    _, _, body = await rest.public("/fapi/v1/ticker/24hr", symbol="ETHUSDT")
    shape(body, sample("ticker_24hr_docs.json"))
    _, _, body = await rest.public("/fapi/v1/klines", symbol="ETHUSDT", interval="1m", limit=3)
    shape(body, sample("klines_docs.json"))
    assert all(len(row) == 12 for row in body)
    _, _, body = await rest.public(
        "/fapi/v1/markPriceKlines", symbol="ETHUSDT", interval="1h", limit=30
    )
    shape(body, sample("markPriceKlines_docs.json"))
    assert len(body) == 25  # 24 h of history plus the open hour
    _, _, info = await rest.public("/fapi/v1/exchangeInfo")
    real = sample("exchangeInfo_fapi_full_2025-11-26.json")
    assert set(info) == set(real)
    assert [s["symbol"] for s in info["symbols"]] == [
        "BTCUSDT",
        "ETHUSDT",
        "SOLUSDT",
        "XRPUSDT",
        "DOGEUSDT",
        "BNBUSDT",
    ]
    assert info["symbols"][0] == next(s for s in real["symbols"] if s["symbol"] == "BTCUSDT")
    assert info["rateLimits"] == real["rateLimits"]
    _, _, body = await rest.public("/fapi/v1/time")
    assert set(body) == {"serverTime"}


async def test_account_endpoints(rest: Rest) -> None:
    shape(await rest.ok("GET", "/fapi/v1/positionSide/dual"), sample("positionSide_dual_GET.json"))
    await rest.ok("POST", "/fapi/v1/order", **market("BUY", "0.002", symbol="BTCUSDT"))
    account = await rest.ok("GET", "/fapi/v2/account")
    real = sample("account_v2_real.json")
    shape(
        {k: v for k, v in account.items() if k != "positions"},
        {k: v for k, v in real.items() if k != "positions"},
    )
    assert len(account["positions"]) == 6
    account = await rest.ok("GET", "/fapi/v3/account")
    shape(account, sample("account_v3_real.json"))
    assert [p["symbol"] for p in account["positions"]] == ["BTCUSDT"]
    shape(await rest.ok("GET", "/fapi/v2/balance"), sample("balance_v2_fixture.json"))
    shape(await rest.ok("GET", "/fapi/v3/balance"), sample("balance_v2_fixture.json"))
    risk = await rest.ok("GET", "/fapi/v3/positionRisk")
    shape(risk, sample("positionRisk_v3_oneway_real.json"))
    assert risk[0]["positionAmt"] == "0.002"
    assert float(risk[0]["notional"]) > 0
    risk2 = await rest.ok("GET", "/fapi/v2/positionRisk", symbol="BTCUSDT")
    shape(risk2, sample("positionRisk_v2_fixture.json"))
    shape(risk2, sample("positionRisk_v2_oneway_docs.json"), subset=True)
    trades = await rest.ok("GET", "/fapi/v1/userTrades", symbol="BTCUSDT")
    shape(trades, sample("userTrades_real.json"))
    lev = await rest.ok("POST", "/fapi/v1/leverage", symbol="BTCUSDT", leverage="21")
    assert lev == {"leverage": 21, "maxNotionalValue": "70000000", "symbol": "BTCUSDT"}


async def test_hedge_position_risk_lists_both_legs(hrest: Rest) -> None:
    risk = await hrest.ok("GET", "/fapi/v2/positionRisk", symbol="BTCUSDT")
    assert [r["positionSide"] for r in risk] == ["LONG", "SHORT"]
    shape(risk, sample("positionRisk_v2_hedge_docs.json"), subset=True)


async def test_order_endpoints(rest: Rest) -> None:
    resting = await rest.ok(
        "POST",
        "/fapi/v1/order",
        **limit(
            "SELL",
            "0.200",
            "110001.00",
            symbol="BTCUSDT",
            newClientOrderId="x-xcKtGhcu04075babaeb34c55af79ba",
        ),
    )
    real = sample("batchOrders_new_limit_real.json")[0]
    shape(resting, real)
    assert {
        k: resting[k]
        for k in ("price", "origQty", "executedQty", "cumQuote", "avgPrice", "stopPrice")
    } == {
        k: real[k] for k in ("price", "origQty", "executedQty", "cumQuote", "avgPrice", "stopPrice")
    }
    query = await rest.ok("GET", "/fapi/v1/openOrder", symbol="BTCUSDT", orderId=resting["orderId"])
    shape(query, sample("openOrder_limit_gtx_real.json"))
    shape(
        await rest.ok("GET", "/fapi/v1/order", symbol="BTCUSDT", orderId=resting["orderId"]),
        sample("openOrder_limit_gtx_real.json"),
    )
    shape(
        await rest.ok("GET", "/fapi/v1/openOrders", symbol="BTCUSDT"),
        [sample("openOrder_limit_gtx_real.json")],
    )
    shape(
        await rest.ok("DELETE", "/fapi/v1/order", symbol="BTCUSDT", orderId=resting["orderId"]),
        real,
    )
    done = await rest.ok("DELETE", "/fapi/v1/allOpenOrders", symbol="BTCUSDT")
    assert done == {"code": 200, "msg": "The operation of cancel all open order is done."}


async def test_batch_orders_mixed_result(hrest: Rest) -> None:
    await hrest.ok("POST", "/fapi/v1/order", **market("BUY", "100", positionSide="LONG"))
    mark = hrest.venue.exchange.mark("DOGEUSDT")
    rules = hrest.venue.rules["DOGEUSDT"]
    batch = [
        limit(
            "BUY",
            "10",
            str(mark - hrest.venue.rules["DOGEUSDT"].tick_size * 100),
            positionSide="LONG",
        ),
        limit(
            "SELL",
            "30",
            rules.fmt_price(rules.round_price(mark * 102 / 100, up=True)),
            tif="GTX",
            positionSide="LONG",
            newClientOrderId="clock_close_long_72518_83",
        ),
    ]
    body = await hrest.ok("POST", "/fapi/v1/batchOrders", batchOrders=json.dumps(batch))
    real = sample("batchOrders_mixed_result_real.json")
    assert body[0] == {
        "code": -4164,
        "msg": "Order's notional must be no smaller than 5 (unless you choose reduce only).",
    }
    shape(body[1], real[1], subset=True)
    assert body[1]["reduceOnly"] is True  # a hedge SELL/LONG is reported reduce-only
    too_many = await hrest.error("POST", "/fapi/v1/batchOrders", batchOrders=json.dumps(batch * 3))
    assert too_many["code"] == -1130
    cancelled = await hrest.ok(
        "DELETE",
        "/fapi/v1/batchOrders",
        symbol="DOGEUSDT",
        origClientOrderIdList=json.dumps(["clock_close_long_72518_83", "nope"]),
    )
    assert cancelled[0]["status"] == "CANCELED"
    assert cancelled[1] == {"code": -2011, "msg": "Unknown order sent."}


async def test_algo_endpoints(rest: Rest) -> None:
    params = {
        "algoType": "CONDITIONAL",
        "symbol": "BTCUSDT",
        "side": "BUY",
        "type": "STOP_MARKET",
        "quantity": "0.001",
        "triggerPrice": "200000.00",
        "workingType": "MARK_PRICE",
        "clientAlgoId": "test-algo-order-1",
    }
    algo = await rest.ok("POST", "/fapi/v1/algoOrder", **params)
    fixture = sample("openAlgoOrders_fixture.json")
    listed = await rest.ok("GET", "/fapi/v1/openAlgoOrders", symbol="BTCUSDT")
    # the fixture names the type "type"; the docs example (what we serve) says "orderType"
    shape(listed, [{k: v for k, v in fixture[0].items() if k != "type"}], subset=True)
    assert listed[0]["orderType"] == "STOP_MARKET"
    assert algo["algoStatus"] == "NEW"
    got = await rest.ok("GET", "/fapi/v1/algoOrder", clientAlgoId="test-algo-order-1")
    assert got["algoId"] == algo["algoId"]
    cancel = await rest.ok("DELETE", "/fapi/v1/algoOrder", symbol="BTCUSDT", algoId=algo["algoId"])
    assert cancel == {
        "algoId": algo["algoId"],
        "clientAlgoId": "test-algo-order-1",
        "code": "200",
        "msg": "success",
    }
    await rest.ok("POST", "/fapi/v1/algoOrder", **{**params, "clientAlgoId": "again"})
    await rest.ok("DELETE", "/fapi/v1/algoOpenOrders", symbol="BTCUSDT")
    assert await rest.ok("GET", "/fapi/v1/openAlgoOrders") == []


async def next_json(ws: aiohttp.ClientWebSocketResponse) -> Any:
    async with asyncio.timeout(5):
        msg = await ws.receive()
    return json.loads(msg.data)


async def test_market_stream_payloads(rest: Rest) -> None:
    venue = rest.venue
    ws = await rest.session.ws_connect(venue.ws_url + "/market/ws/btcusdt@markPrice@1s")
    await subscribed(venue, "btcusdt@markprice@1s")
    await venue.step(1000)
    shape(await next_json(ws), sample("ws_markPrice_docs.json"), ignore=frozenset(SAMPLE_ONLY))
    await ws.close()
    ws = await rest.session.ws_connect(
        venue.ws_url + "/market/stream?streams=!markPrice@arr@1s/btcusdt@kline_1m"
    )
    await venue.step(1000)
    seen = {}
    for _ in range(2):
        msg = await next_json(ws)
        seen[msg["stream"]] = msg
    shape(seen["!markPrice@arr@1s"]["data"], sample("ws_markPrice_arr_docs.json"))
    assert len(seen["!markPrice@arr@1s"]["data"]) == 6
    shape(
        seen["btcusdt@kline_1m"],
        sample("ws_combined_wrapper_docs.json"),
        ignore=frozenset({"data"}),
    )
    shape(seen["btcusdt@kline_1m"]["data"], sample("ws_kline_open_docs.json"))
    await ws.close()
    ws = await rest.session.ws_connect(venue.ws_url + "/public/ws/ethusdt@bookTicker")
    await subscribed(venue, "ethusdt@bookticker")
    await venue.step(1000)
    shape(
        await next_json(ws),
        sample("ws_bookTicker_docs_derived.json"),
        ignore=frozenset(SAMPLE_ONLY),
    )
    await ws.close()


async def collect_user(stream: UserStream, kind: str, status: str | None = None) -> dict[str, Any]:
    def pred(e: dict[str, Any]) -> bool:
        return e.get("e") == kind and (status is None or e["o"]["X"] == status)

    return await stream.wait_for(pred)


async def test_user_stream_payloads(rest: Rest) -> None:
    stream = await open_user_stream(rest)
    venue = rest.venue
    await rest.ok("POST", "/fapi/v1/order", **market("BUY", "100"))
    shape(
        await collect_user(stream, "ORDER_TRADE_UPDATE", "FILLED"),
        sample("ws_ORDER_TRADE_UPDATE_trade_docs_derived.json"),
        subset=True,
    )
    shape(await collect_user(stream, "TRADE_LITE"), sample("ws_TRADE_LITE_real.json"))
    shape(await collect_user(stream, "ACCOUNT_UPDATE"), sample("ws_ACCOUNT_UPDATE_docs.json"))
    mark = venue.exchange.mark("DOGEUSDT")
    tick = venue.rules["DOGEUSDT"].tick_size
    await rest.ok(
        "POST",
        "/fapi/v1/algoOrder",
        algoType="CONDITIONAL",
        symbol="DOGEUSDT",
        side="SELL",
        type="STOP_MARKET",
        closePosition="true",
        triggerPrice=str(mark - 10 * tick),
        workingType="MARK_PRICE",
    )
    await venue.set_mark("DOGEUSDT", mark - 20 * tick)
    for status, name in (
        ("TRIGGERING", "triggering"),
        ("TRIGGERED", "triggered"),
        ("FINISHED", "finished"),
    ):
        event = await collect_user(stream, "ALGO_UPDATE", status)
        # The real captures predate ``rm`` (failure reason) and ``ia`` (trailing activated),
        # which the docs list and contract 2.5 requires: ours is a superset of the capture.
        shape(event, sample(f"ws_ALGO_UPDATE_{name}_real.json")["data"], subset=True)
        assert event["o"]["rm"] == ""
        assert event["o"]["ia"] is False
    key = venue.expire_listen_key()
    expired = await stream.wait_for(lambda e: e.get("e") == "listenKeyExpired")
    shape(expired, sample("ws_listenKeyExpired_docs.json"))
    assert expired["listenKey"] == key
    await stream.ws.close()
