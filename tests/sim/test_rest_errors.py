"""Every rejection the simulator gives, produced over HTTP by the request that produces it."""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import urlencode

import pytest

from tests.sim.conftest import Rest, conditional, limit, market, sample

ORDER = "/fapi/v1/order"
ALGO = "/fapi/v1/algoOrder"
REAL = {e["body"]["code"]: e["body"]["msg"] for e in sample("errors.json")["errors"]}


async def test_signature_timestamp_and_key_errors(rest: Rest) -> None:
    query = rest.sign({"symbol": "BTCUSDT"})
    status, _, body = await rest.raw(
        "GET", "/fapi/v2/positionRisk", query[:-1] + ("0" if query[-1] != "0" else "1")
    )
    assert (status, body) == (400, {"code": -1022, "msg": REAL[-1022]})
    old = rest.sign({"symbol": "BTCUSDT"}, ts=int(time.time() * 1000) - 60_000)
    status, _, body = await rest.raw("GET", "/fapi/v2/positionRisk", old)
    assert body == {"code": -1021, "msg": REAL[-1021]}
    ahead = rest.sign({}, ts=int(time.time() * 1000) + 5_000)
    assert (await rest.raw("GET", "/fapi/v2/balance", ahead))[2]["code"] == -1021
    status, _, body = await rest.raw(
        "GET", "/fapi/v2/balance", rest.sign({}), headers={"X-MBX-APIKEY": "x" * 64}
    )
    assert (status, body["code"]) == (401, -2015)
    status, _, body = await rest.raw(
        "GET", "/fapi/v2/balance", rest.sign({}), headers={"X-MBX-APIKEY": "bad key!"}
    )
    assert body["code"] == -2014
    status, _, body = await rest.raw("GET", "/fapi/v2/balance", "recvWindow=5000")
    assert body == {
        "code": -1102,
        "msg": "Mandatory parameter 'timestamp' was not sent, was empty/null, or malformed.",
    }


async def test_signature_over_query_plus_body_as_received(rest: Rest) -> None:
    # the documented test vector's parameters, split between query string and body
    query = "symbol=DOGEUSDT&side=BUY&type=MARKET"
    body = f"quantity=100&recvWindow=5000&timestamp={int(time.time() * 1000)}"
    sig = hmac.new(rest.secret.encode(), (query + body).encode(), hashlib.sha256).hexdigest()
    status, _, reply = await rest.raw("POST", ORDER, query, body + "&signature=" + sig.upper())
    assert status == 200, reply
    # the same parameters re-ordered in the body no longer match the signature
    status, _, reply = await rest.raw(
        "POST",
        ORDER,
        query,
        "recvWindow=5000&" + body.replace("&recvWindow=5000", "") + "&signature=" + sig,
    )
    assert reply["code"] == -1022


async def test_original_failures_in_hedge_mode(hrest: Rest) -> None:
    body = await hrest.error("POST", ORDER, **market("BUY", "100"))
    assert body == {"code": -4061, "msg": REAL[-4061]}
    await hrest.ok("POST", ORDER, **market("BUY", "100", positionSide="LONG"))
    body = await hrest.error(
        "POST", ORDER, **market("SELL", "100", positionSide="LONG", reduceOnly="true")
    )
    assert body == {"code": -1106, "msg": "Parameter 'reduceonly' sent when not required."}


@pytest.mark.parametrize(
    ("params", "code"),
    [
        (market("BUY", "1", symbol="NOPEUSDT"), -1121),
        (market("UP", "100"), -1117),
        ({"symbol": "DOGEUSDT", "side": "BUY", "type": "ICEBERG", "quantity": "100"}, -1116),
        (
            {
                "symbol": "DOGEUSDT",
                "side": "BUY",
                "type": "STOP_MARKET",
                "quantity": "100",
                "stopPrice": "0.3",
            },
            -4120,
        ),
        (
            {
                "symbol": "DOGEUSDT",
                "side": "BUY",
                "type": "TAKE_PROFIT",
                "quantity": "100",
                "price": "0.1",
                "stopPrice": "0.1",
            },
            -4120,
        ),
        (
            {
                "symbol": "DOGEUSDT",
                "side": "BUY",
                "type": "TRAILING_STOP_MARKET",
                "quantity": "100",
                "callbackRate": "1",
            },
            -4120,
        ),
        ({"symbol": "DOGEUSDT", "side": "BUY", "type": "MARKET"}, -1102),
        (market("BUY", "1e-05"), -1102),
        (market("BUY", "nan"), -1102),
        (market("BUY", "9" * 60), -1102),
        (market("BUY", "100.5"), -1111),
        (market("BUY", "0"), -4003),
        (market("BUY", "5000", symbol="BTCUSDT"), -4005),
        (market("BUY", "10"), -4164),
        (limit("BUY", "0.001", "50000.155", symbol="BTCUSDT"), -1111),
        (limit("BUY", "0.002", "50000.15", symbol="BTCUSDT"), -4014),
        (limit("BUY", "0.01", "900000", symbol="BTCUSDT"), -4002),
        (limit("BUY", "0.01", "200000", symbol="BTCUSDT"), -4016),
        (limit("SELL", "0.01", "50000", symbol="BTCUSDT"), -4024),
        (
            {
                "symbol": "BTCUSDT",
                "side": "BUY",
                "type": "LIMIT",
                "quantity": "0.01",
                "price": "100000",
            },
            -1102,
        ),
        (limit("BUY", "0.01", "100000", tif="XYZ", symbol="BTCUSDT"), -1115),
        (limit("BUY", "0.01", "110000", tif="GTX", symbol="BTCUSDT"), -5022),
        (market("BUY", "100", symbol="BTCUSDT"), -2019),
        (market("SELL", "100", reduceOnly="true"), -2022),
        (market("BUY", "100", newClientOrderId="a b"), -1100),
        (market("BUY", "100", newClientOrderId="x" * 37), -4015),
        (market("BUY", "100", positionSide="LONG"), -4061),
        (market("BUY", "100", closePosition="true"), -1106),
    ],
)
async def test_order_rejections(rest: Rest, params: dict[str, str], code: int) -> None:
    body = await rest.error("POST", ORDER, **params)
    assert body["code"] == code, body
    if code in REAL and code not in (-1106,):
        assert body["msg"].rstrip(".") == REAL[code].rstrip(".") or code == -4164


async def test_unknown_params_are_ignored_and_server_keeps_serving(rest: Rest) -> None:
    body = await rest.ok(
        "POST",
        ORDER,
        **market("BUY", "100", fooBar="1", recvWindow="10000", newOrderRespType="RESULT"),
    )
    assert body["status"] == "FILLED"
    status, _, body = await rest.raw("GET", "/fapi/v1/nothing")
    assert status == 404
    status, _, body = await rest.public("/fapi/v1/klines", symbol="BTCUSDT", interval="7m")
    assert body["code"] == -1120
    status, _, body = await rest.public(
        "/fapi/v1/klines", symbol="BTCUSDT", interval="1m", limit="99999999999"
    )
    assert body["code"] == -1130
    assert (await rest.public("/fapi/v1/ping"))[2] == {}


async def test_unknown_order_duplicate_id_and_cancel(rest: Rest) -> None:
    body = await rest.error("GET", ORDER, symbol="DOGEUSDT", orderId="42")
    assert body == {"code": -2013, "msg": "Order does not exist."}
    body = await rest.error("DELETE", ORDER, symbol="DOGEUSDT", origClientOrderId="never")
    assert body == {"code": -2011, "msg": REAL[-2011]}
    resting = limit("BUY", "100", "0.15000", newClientOrderId="dup-1")
    await rest.ok("POST", ORDER, **resting)
    body = await rest.error("POST", ORDER, **resting)
    assert body == {"code": -4116, "msg": "ClientOrderId is duplicated."}
    cancelled = await rest.ok("DELETE", ORDER, symbol="DOGEUSDT", origClientOrderId="dup-1")
    assert cancelled["status"] == "CANCELED"
    assert (await rest.error("DELETE", ORDER, symbol="DOGEUSDT", origClientOrderId="dup-1"))[
        "code"
    ] == -2011
    found = await rest.ok("GET", ORDER, symbol="DOGEUSDT", origClientOrderId="dup-1")
    assert found["status"] == "CANCELED"


async def test_algo_order_rejections(rest: Rest) -> None:
    mark = rest.venue.exchange.mark("DOGEUSDT")
    body = await rest.error(
        "POST",
        ALGO,
        **conditional(
            "SELL",
            "STOP_MARKET",
            str(mark + 1000 * rest.venue.rules["DOGEUSDT"].tick_size),
            quantity="100",
        ),
    )
    assert body == {"code": -2021, "msg": REAL[-2021]}
    body = await rest.error(
        "POST",
        ALGO,
        **conditional("SELL", "STOP_MARKET", "0.10000", closePosition="true", quantity="100"),
    )
    assert body["code"] == -4137
    body = await rest.error(
        "POST", ALGO, **conditional("SELL", "STOP_MARKET", "0.10000", quantity="100", algoType="")
    )
    assert body["code"] == -1102
    # Only one resting close-all per type and direction (contract 2.5), so the limit of 10 is
    # reached with one close-all stop and nine sized ones.
    await rest.ok(
        "POST", ALGO, **conditional("SELL", "STOP_MARKET", "0.10000", closePosition="true")
    )
    for _ in range(9):
        await rest.ok("POST", ALGO, **conditional("SELL", "STOP_MARKET", "0.10000", quantity="100"))
    body = await rest.error(
        "POST", ALGO, **conditional("SELL", "STOP_MARKET", "0.10000", quantity="100")
    )
    assert body == {"code": -4045, "msg": "Reach max stop order limit."}
    assert (await rest.error("DELETE", ALGO, algoId="1"))["code"] == -2011
    assert (await rest.error("GET", ALGO, clientAlgoId="nope"))["code"] == -2013


CLOSE_ALL_EXISTS = {
    "code": -4130,
    "msg": "An open stop or take profit order with GTE and closePosition in the direction "
    "is existing.",
}


async def test_second_close_all_stop_in_one_direction_is_4130_one_way(rest: Rest) -> None:
    """Contract 2.5: Binance refuses a second resting closePosition order of one type per
    direction with -4130 (HTTP 400); another type, the other direction and sized stops pass."""
    mark = rest.venue.exchange.mark("DOGEUSDT")
    tick = rest.venue.rules["DOGEUSDT"].tick_size
    await rest.ok("POST", ORDER, **market("BUY", "100"))
    below, above = str(mark - 50 * tick), str(mark + 50 * tick)
    first = await rest.ok(
        "POST",
        ALGO,
        **conditional("SELL", "STOP_MARKET", below, closePosition="true", clientAlgoId="stop-1"),
    )
    status, _, body = await rest.signed(
        "POST",
        ALGO,
        **conditional(
            "SELL",
            "STOP_MARKET",
            str(mark - 10 * tick),
            closePosition="true",
            clientAlgoId="stop-2",
        ),
    )
    assert (status, body) == (400, CLOSE_ALL_EXISTS)
    # the refused order does not exist
    assert (await rest.error("GET", ALGO, clientAlgoId="stop-2"))["code"] == -2013
    # a take-profit close-all beside the stop close-all is accepted
    await rest.ok(
        "POST", ALGO, **conditional("SELL", "TAKE_PROFIT_MARKET", above, closePosition="true")
    )
    # so is a BUY close-all (the other direction) and a sized reduce-only stop (tightening)
    await rest.ok("POST", ALGO, **conditional("BUY", "STOP_MARKET", above, closePosition="true"))
    await rest.ok(
        "POST",
        ALGO,
        **conditional(
            "SELL", "STOP_MARKET", str(mark - 10 * tick), quantity="100", reduceOnly="true"
        ),
    )
    # once the first is cancelled, a new close-all stop is accepted again
    await rest.ok("DELETE", ALGO, algoId=str(first["algoId"]))
    await rest.ok(
        "POST",
        ALGO,
        **conditional("SELL", "STOP_MARKET", str(mark - 10 * tick), closePosition="true"),
    )


async def test_second_close_all_stop_per_position_side_is_4130_hedge(hrest: Rest) -> None:
    """Contract 2.5 in hedge mode: one resting closePosition STOP_MARKET per positionSide;
    the other leg's and a sized (positionSide + quantity) stop are accepted."""
    rest = hrest
    mark = rest.venue.exchange.mark("DOGEUSDT")
    tick = rest.venue.rules["DOGEUSDT"].tick_size
    for side, leg in (("BUY", "LONG"), ("SELL", "SHORT")):
        await rest.ok("POST", ORDER, **market(side, "100", positionSide=leg))
    below, above = str(mark - 50 * tick), str(mark + 50 * tick)
    await rest.ok(
        "POST",
        ALGO,
        **conditional("SELL", "STOP_MARKET", below, positionSide="LONG", closePosition="true"),
    )
    await rest.ok(
        "POST",
        ALGO,
        **conditional("BUY", "STOP_MARKET", above, positionSide="SHORT", closePosition="true"),
    )
    status, _, body = await rest.signed(
        "POST",
        ALGO,
        **conditional(
            "SELL", "STOP_MARKET", str(mark - 10 * tick), positionSide="LONG", closePosition="true"
        ),
    )
    assert (status, body) == (400, CLOSE_ALL_EXISTS)
    status, _, body = await rest.signed(
        "POST",
        ALGO,
        **conditional(
            "BUY", "STOP_MARKET", str(mark + 10 * tick), positionSide="SHORT", closePosition="true"
        ),
    )
    assert (status, body) == (400, CLOSE_ALL_EXISTS)
    await rest.ok(
        "POST",
        ALGO,
        **conditional(
            "SELL", "STOP_MARKET", str(mark - 10 * tick), positionSide="LONG", quantity="100"
        ),
    )
    assert len(await rest.ok("GET", "/fapi/v1/openAlgoOrders", symbol="DOGEUSDT")) == 3


async def test_algo_lookup_finds_triggered_and_cancelled_orders(rest: Rest) -> None:
    """Contract 2.5: GET /fapi/v1/algoOrder finds an algo order whatever its status, by
    clientAlgoId or algoId (openAlgoOrders lists only the resting ones)."""
    venue = rest.venue
    mark = venue.exchange.mark("DOGEUSDT")
    tick = venue.rules["DOGEUSDT"].tick_size
    await rest.ok("POST", ORDER, **market("BUY", "100"))
    fired = await rest.ok(
        "POST",
        ALGO,
        **conditional(
            "SELL",
            "STOP_MARKET",
            str(mark - 10 * tick),
            closePosition="true",
            clientAlgoId="lk-fired",
        ),
    )
    await rest.ok(
        "POST",
        ALGO,
        **conditional(
            "SELL",
            "TAKE_PROFIT_MARKET",
            str(mark + 50 * tick),
            closePosition="true",
            clientAlgoId="lk-cancelled",
        ),
    )
    await rest.ok("DELETE", ALGO, clientAlgoId="lk-cancelled")
    await venue.set_mark("DOGEUSDT", mark - 20 * tick)
    assert await rest.ok("GET", "/fapi/v1/openAlgoOrders", symbol="DOGEUSDT") == []
    by_client = await rest.ok("GET", ALGO, clientAlgoId="lk-fired")
    by_id = await rest.ok("GET", ALGO, algoId=str(fired["algoId"]))
    assert by_client == by_id
    assert by_client["algoStatus"] == "FINISHED"
    assert by_client["actualOrderId"] != ""
    cancelled = await rest.ok("GET", ALGO, clientAlgoId="lk-cancelled")
    assert cancelled["algoStatus"] == "CANCELED"


async def test_mode_and_margin_type_changes(rest: Rest) -> None:
    dual = "/fapi/v1/positionSide/dual"
    assert (await rest.error("POST", dual, dualSidePosition="false")) == {
        "code": -4059,
        "msg": REAL[-4059],
    }
    await rest.ok("POST", ORDER, **limit("BUY", "100", "0.15000"))
    assert (await rest.error("POST", dual, dualSidePosition="true")) == {
        "code": -4067,
        "msg": REAL[-4067],
    }
    assert (
        await rest.error("POST", "/fapi/v1/marginType", symbol="DOGEUSDT", marginType="ISOLATED")
    )["code"] == -4047
    await rest.ok("DELETE", "/fapi/v1/allOpenOrders", symbol="DOGEUSDT")
    await rest.ok("POST", ORDER, **market("BUY", "100"))
    assert (await rest.error("POST", dual, dualSidePosition="true")) == {
        "code": -4068,
        "msg": REAL[-4068],
    }
    assert (
        await rest.error("POST", "/fapi/v1/marginType", symbol="DOGEUSDT", marginType="ISOLATED")
    )["code"] == -4048
    body = await rest.error("POST", "/fapi/v1/marginType", symbol="BTCUSDT", marginType="CROSSED")
    assert body == {"code": -4046, "msg": REAL[-4046]}
    assert await rest.ok(
        "POST", "/fapi/v1/marginType", symbol="BTCUSDT", marginType="ISOLATED"
    ) == {"code": 200, "msg": "success"}
    assert (await rest.error("POST", "/fapi/v1/leverage", symbol="BTCUSDT", leverage="500"))[
        "code"
    ] == -4028
    await rest.ok("POST", ORDER, **market("SELL", "100", reduceOnly="true"))
    assert await rest.ok("POST", dual, dualSidePosition="true") == {"code": 200, "msg": "success"}
    assert await rest.ok("GET", dual) == {"dualSidePosition": True}


async def test_listen_key_lifecycle_1125(rest: Rest) -> None:
    _, _, body = await rest.raw("PUT", "/fapi/v1/listenKey")
    assert body == {"code": -1125, "msg": REAL[-1125]}
    first = (await rest.raw("POST", "/fapi/v1/listenKey"))[2]["listenKey"]
    again = (await rest.raw("POST", "/fapi/v1/listenKey"))[2]["listenKey"]
    assert first == again
    assert (await rest.raw("PUT", "/fapi/v1/listenKey"))[2] == {"listenKey": first}
    assert (await rest.raw("DELETE", "/fapi/v1/listenKey"))[2] == {}
    assert (await rest.raw("PUT", "/fapi/v1/listenKey", urlencode({"listenKey": first})))[2][
        "code"
    ] == -1125
    _, _, body = await rest.raw("POST", "/fapi/v1/listenKey", headers={"X-MBX-APIKEY": "y" * 64})
    assert body["code"] == -2015
