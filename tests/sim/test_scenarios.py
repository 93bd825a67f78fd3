"""Trading scenarios in both position modes, observed through REST and the user-data stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal as D
from typing import Any

import aiohttp
import pytest

import pyquant.sim as sim
from tests.sim.conftest import Rest, limit, open_user_stream

SYMBOL = "DOGEUSDT"


@pytest.fixture(params=["one-way", "hedge"])
async def mode_rest(
    request: pytest.FixtureRequest, session: aiohttp.ClientSession
) -> AsyncIterator[Rest]:
    async with sim.serve(speed=0, seed=3, position_mode=request.param) as venue:
        yield Rest(session, venue)


def hedge_of(rest: Rest) -> bool:
    return rest.venue.exchange.dual


def open_params(rest: Rest, side: str, qty: str) -> dict[str, str]:
    p = {
        "symbol": SYMBOL,
        "side": side,
        "type": "MARKET",
        "quantity": qty,
        "newOrderRespType": "RESULT",
    }
    if hedge_of(rest):
        p["positionSide"] = "LONG" if side == "BUY" else "SHORT"
    return p


def close_params(rest: Rest, long: bool, qty: str) -> dict[str, str]:
    """Close as contract 3.4 says: one-way reduceOnly+BOTH, hedge opposite side on the leg."""
    p = {
        "symbol": SYMBOL,
        "side": "SELL" if long else "BUY",
        "type": "MARKET",
        "quantity": qty,
        "newOrderRespType": "RESULT",
    }
    if hedge_of(rest):
        p["positionSide"] = "LONG" if long else "SHORT"
    else:
        p["reduceOnly"] = "true"
    return p


async def position_amount(rest: Rest, long: bool = True) -> D:
    rows = await rest.ok("GET", "/fapi/v2/positionRisk", symbol=SYMBOL)
    side = ("LONG" if long else "SHORT") if hedge_of(rest) else "BOTH"
    return D(next(r["positionAmt"] for r in rows if r["positionSide"] == side))


async def test_open_partial_close_full_close(mode_rest: Rest) -> None:
    rest = mode_rest
    stream = await open_user_stream(rest)
    opened = await rest.ok("POST", "/fapi/v1/order", **open_params(rest, "BUY", "300"))
    assert opened["status"] == "FILLED"
    update = await stream.wait_for(lambda e: e["e"] == "ACCOUNT_UPDATE")
    leg = update["a"]["P"][0]
    assert (leg["pa"], leg["ps"]) == ("300", "LONG" if hedge_of(rest) else "BOTH")
    await rest.venue.set_mark(SYMBOL, D(opened["avgPrice"]) + D("0.01"))
    partial = await rest.ok("POST", "/fapi/v1/order", **close_params(rest, True, "100"))
    assert partial["reduceOnly"] is True
    assert await position_amount(rest) == 200
    fill = await stream.wait_for(
        lambda e: (
            e["e"] == "ORDER_TRADE_UPDATE"
            and e["o"]["i"] == partial["orderId"]
            and e["o"]["x"] == "TRADE"
        )
    )
    assert D(fill["o"]["rp"]) == D("1.00000000")  # 100 x 0.01
    await rest.ok("POST", "/fapi/v1/order", **close_params(rest, True, "200"))
    assert await position_amount(rest) == 0
    closed = await stream.wait_for(
        lambda e: e["e"] == "ACCOUNT_UPDATE" and e["a"]["P"][0]["pa"] == "0"
    )
    assert closed["a"]["m"] == "ORDER"
    trades = await rest.ok("GET", "/fapi/v1/userTrades", symbol=SYMBOL)
    assert [t["qty"] for t in trades] == ["300", "100", "200"]
    assert sum(D(t["realizedPnl"]) for t in trades) == D(3)
    await stream.ws.close()


async def test_flip_attempt_never_flips_a_closing_order(mode_rest: Rest) -> None:
    rest = mode_rest
    await rest.ok("POST", "/fapi/v1/order", **open_params(rest, "BUY", "100"))
    body = await rest.ok("POST", "/fapi/v1/order", **close_params(rest, True, "250"))
    assert body["executedQty"] == "100"
    assert await position_amount(rest) == 0
    if hedge_of(rest):
        assert await position_amount(rest, long=False) == 0
    # nothing left to close: the same close is now rejected
    assert (await rest.error("POST", "/fapi/v1/order", **close_params(rest, True, "100")))[
        "code"
    ] == -2022


async def test_one_way_opposite_order_without_reduce_only_flips(rest: Rest) -> None:
    await rest.ok(
        "POST", "/fapi/v1/order", symbol=SYMBOL, side="BUY", type="MARKET", quantity="100"
    )
    await rest.ok(
        "POST", "/fapi/v1/order", symbol=SYMBOL, side="SELL", type="MARKET", quantity="250"
    )
    rows = await rest.ok("GET", "/fapi/v3/positionRisk", symbol=SYMBOL)
    assert rows[0]["positionAmt"] == "-150"


async def test_conditional_orders_trigger_on_mark_and_close_position_cleanup(
    mode_rest: Rest,
) -> None:
    rest = mode_rest
    venue = rest.venue
    stream = await open_user_stream(rest)
    opened = await rest.ok("POST", "/fapi/v1/order", **open_params(rest, "BUY", "200"))
    entry = D(opened["avgPrice"])
    tick = venue.rules[SYMBOL].tick_size
    common: dict[str, Any] = {
        "algoType": "CONDITIONAL",
        "symbol": SYMBOL,
        "side": "SELL",
        "workingType": "MARK_PRICE",
    }
    if hedge_of(rest):
        common["positionSide"] = "LONG"
    stop = await rest.ok(
        "POST",
        "/fapi/v1/algoOrder",
        **common,
        type="STOP_MARKET",
        closePosition="true",
        triggerPrice=str(entry - 50 * tick),
        clientAlgoId="backstop-1",
    )
    take = await rest.ok(
        "POST",
        "/fapi/v1/algoOrder",
        **common,
        type="TAKE_PROFIT_MARKET",
        quantity="50",
        triggerPrice=str(entry + 50 * tick),
    )
    # the take-profit triggers on the mark, closes 50
    await venue.set_mark(SYMBOL, entry + 60 * tick)
    finished = await stream.wait_for(
        lambda e: e["e"] == "ALGO_UPDATE" and e["o"]["X"] == "FINISHED"
    )
    assert finished["o"]["aid"] == take["algoId"]
    assert finished["o"]["aq"] == "50"
    child = await stream.wait_for(
        lambda e: (
            e["e"] == "ORDER_TRADE_UPDATE"
            and e["o"]["X"] == "FILLED"
            and e["o"]["ot"] == "TAKE_PROFIT_MARKET"
        )
    )
    assert child["o"]["i"] == int(finished["o"]["ai"])
    assert await position_amount(rest) == 150
    # the closePosition stop closes whatever the leg holds when the mark falls through it
    await venue.set_mark(SYMBOL, entry - 60 * tick)
    done = await stream.wait_for(lambda e: e["e"] == "ALGO_UPDATE" and e["o"]["X"] == "FINISHED")
    assert (done["o"]["caid"], done["o"]["aq"], done["o"]["cp"]) == ("backstop-1", "150", True)
    assert await position_amount(rest) == 0
    assert await rest.ok("GET", "/fapi/v1/openAlgoOrders", symbol=SYMBOL) == []
    assert stop["algoStatus"] == "NEW"


async def test_backstop_left_after_manual_close_is_cancelled_by_the_client(mode_rest: Rest) -> None:
    rest = mode_rest
    opened = await rest.ok("POST", "/fapi/v1/order", **open_params(rest, "BUY", "200"))
    common: dict[str, Any] = {
        "algoType": "CONDITIONAL",
        "symbol": SYMBOL,
        "side": "SELL",
        "workingType": "MARK_PRICE",
        "type": "STOP_MARKET",
        "closePosition": "true",
        "triggerPrice": str(D(opened["avgPrice"]) * D("0.9"))[:7],
    }
    if hedge_of(rest):
        common["positionSide"] = "LONG"
    await rest.ok("POST", "/fapi/v1/algoOrder", **common, clientAlgoId="bs-1")
    # A second close-all STOP_MARKET on this side would be -4130 (contract 2.5); the GTE_GTC
    # one beside it is a close-all take-profit, which Binance accepts.
    take_profit = {
        **common,
        "type": "TAKE_PROFIT_MARKET",
        "triggerPrice": str(D(opened["avgPrice"]) * D("1.1"))[:7],
    }
    await rest.ok(
        "POST", "/fapi/v1/algoOrder", **take_profit, timeInForce="GTE_GTC", clientAlgoId="bs-gte"
    )
    await rest.ok("POST", "/fapi/v1/order", **close_params(rest, True, "200"))
    left = await rest.ok("GET", "/fapi/v1/openAlgoOrders", symbol=SYMBOL)
    assert [a["clientAlgoId"] for a in left] == [
        "bs-1"
    ]  # GTE_GTC expired with the position, the other stays
    gte = await rest.ok("GET", "/fapi/v1/algoOrder", clientAlgoId="bs-gte")
    assert gte["algoStatus"] == "EXPIRED"
    await rest.ok("DELETE", "/fapi/v1/algoOrder", clientAlgoId="bs-1")
    assert await rest.ok("GET", "/fapi/v1/openAlgoOrders", symbol=SYMBOL) == []


async def test_limit_order_rests_and_fills_when_the_replay_crosses(rest: Rest) -> None:
    venue = rest.venue
    mark = venue.exchange.mark("BTCUSDT")
    stream = await open_user_stream(rest)
    body = await rest.ok(
        "POST", "/fapi/v1/order", **limit("BUY", "0.002", str(mark - 5), symbol="BTCUSDT")
    )
    assert body["status"] == "NEW"
    await venue.set_mark("BTCUSDT", mark - 10)
    fill = await stream.wait_for(
        lambda e: e["e"] == "ORDER_TRADE_UPDATE" and e["o"]["x"] == "TRADE"
    )
    assert fill["o"]["m"] is True
    assert D(fill["o"]["L"]) == mark - 5
    venue.release_mark("BTCUSDT")
    await venue.step(5000)  # back on the replay path
    assert venue.exchange.mark("BTCUSDT") == venue.replay.price_at("BTCUSDT", venue.clock.now_ms())
