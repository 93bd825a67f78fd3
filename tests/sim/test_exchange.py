"""Matching and account logic of the simulator, without sockets (pyquant.sim.exchange)."""

from __future__ import annotations

from decimal import Decimal as D

import pytest

from pyquant.sim.exchange import AlgoOrder, Exchange
from pyquant.sim.server import load_exchange_info
from pyquant.sim.validation import BinanceError, SymbolRules
from tests.sim.conftest import limit, market

INFO = load_exchange_info()
RULES = {
    s["symbol"]: SymbolRules.from_exchange_info(s)
    for s in INFO["symbols"]
    if s["symbol"] in ("BTCUSDT", "DOGEUSDT", "ETHUSDT")
}


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000_000

    def __call__(self) -> int:
        return self.t


def make(mode: str = "one-way", **kw: object) -> Exchange:
    ex = Exchange(RULES, Clock(), position_mode=mode, **kw)  # type: ignore[arg-type]
    ex.set_price("BTCUSDT", D("60000"))
    ex.set_price("DOGEUSDT", D("0.20000"))
    ex.set_price("ETHUSDT", D("3000"))
    return ex


def order(ex: Exchange, **p: str) -> dict[str, object]:
    _, body, _ = ex.new_order({"newOrderRespType": "RESULT", **p})
    return body


def long_doge(mode: str = "one-way") -> Exchange:
    """A fresh exchange holding a 100 DOGEUSDT long (its LONG leg in hedge mode)."""
    ex = make(mode)
    order(ex, **market("BUY", "100", **({"positionSide": "LONG"} if mode == "hedge" else {})))
    return ex


def code(ex: Exchange, fn: str = "new_order", **p: str) -> int:
    with pytest.raises(BinanceError) as info:
        getattr(ex, fn)(p)
    return info.value.code


def test_one_way_open_partial_close_full_close_realizes_pnl() -> None:
    ex = make(taker_fee=D(0))
    body = order(ex, **market("BUY", "100"))
    assert body["status"] == "FILLED"
    assert body["avgPrice"] == "0.200000"
    pos = ex.position("DOGEUSDT", "BOTH")
    assert pos.amount == 100
    assert pos.entry_price == D("0.2")
    ex.set_price("DOGEUSDT", D("0.21000"))
    order(ex, **market("SELL", "40", reduceOnly="true"))
    assert pos.amount == 60
    assert ex.trades[-1].realized_pnl == D("0.4")
    order(ex, **market("SELL", "60", reduceOnly="true"))
    assert pos.amount == 0
    assert ex.wallet == D(10_000) + D("1.0")


def test_one_way_opposite_order_without_reduce_only_flips_at_fill_price() -> None:
    ex = long_doge()
    ex.set_price("DOGEUSDT", D("0.19000"))
    order(ex, **market("SELL", "150"))
    pos = ex.position("DOGEUSDT", "BOTH")
    assert pos.amount == -50
    assert pos.entry_price == D("0.19")


def test_reduce_only_never_flips_and_is_rejected_when_flat_or_same_side() -> None:
    ex = make()
    assert code(ex, **market("SELL", "100", reduceOnly="true")) == -2022
    order(ex, **market("BUY", "100"))
    assert code(ex, **market("BUY", "10", reduceOnly="true")) == -2022
    body = order(ex, **market("SELL", "250", reduceOnly="true"))
    assert body["executedQty"] == "100"
    assert body["status"] == "EXPIRED"
    assert ex.position("DOGEUSDT", "BOTH").amount == 0


def test_min_notional_exempts_reduce_only() -> None:
    ex = long_doge()
    # 10 DOGE at 0.2 = 2 USDT < 5
    assert code(ex, **market("SELL", "10")) == -4164
    body = order(ex, **market("SELL", "10", reduceOnly="true"))
    assert body["status"] == "FILLED"


def test_hedge_legs_are_independent_and_closes_clip_to_the_leg() -> None:
    ex = long_doge("hedge")
    order(ex, **market("SELL", "50", positionSide="SHORT"))
    assert ex.position("DOGEUSDT", "LONG").amount == 100
    assert ex.position("DOGEUSDT", "SHORT").amount == -50
    body = order(ex, **market("SELL", "300", positionSide="LONG"))
    assert body["reduceOnly"] is True
    assert body["executedQty"] == "100"
    assert ex.position("DOGEUSDT", "LONG").amount == 0
    assert ex.position("DOGEUSDT", "SHORT").amount == -50
    # closing an empty leg is refused, it never opens the other side
    assert code(ex, **market("SELL", "10", positionSide="LONG")) == -2022


def test_hedge_mode_rules_4061_and_1106() -> None:
    ex = make("hedge")
    assert code(ex, **market("BUY", "100")) == -4061
    assert code(ex, **market("BUY", "100", positionSide="BOTH")) == -4061
    params = {
        "symbol": "DOGEUSDT",
        "side": "SELL",
        "positionSide": "LONG",
        "type": "MARKET",
        "quantity": "100",
        "reduceOnly": "true",
    }
    with pytest.raises(BinanceError) as err:
        ex.new_order(params)
    assert err.value.code == -1106
    assert err.value.msg == "Parameter 'reduceonly' sent when not required."
    one_way = make()
    assert code(one_way, **market("BUY", "100", positionSide="LONG")) == -4061


def test_limit_rests_then_fills_as_maker_when_mark_crosses() -> None:
    ex = make()
    body = order(ex, **limit("BUY", "100", "0.19500"))
    assert body["status"] == "NEW"
    ex.set_price("DOGEUSDT", D("0.19600"))
    assert ex.position("DOGEUSDT", "BOTH").amount == 0
    ex.set_price("DOGEUSDT", D("0.19400"))
    assert ex.position("DOGEUSDT", "BOTH").amount == 100
    assert ex.position("DOGEUSDT", "BOTH").entry_price == D("0.195")
    assert ex.trades[-1].maker is True


def test_time_in_force_gtx_ioc_fok() -> None:
    ex = make()
    assert code(ex, **limit("BUY", "100", "0.20100", tif="GTX")) == -5022
    assert code(ex, **limit("BUY", "100", "0.19900", tif="FOK")) == -5021
    body = order(ex, **limit("BUY", "100", "0.19900", tif="IOC"))
    assert body["status"] == "EXPIRED"
    body = order(ex, **limit("BUY", "100", "0.20100", tif="IOC"))
    assert body["status"] == "FILLED"
    assert body["avgPrice"] == "0.200000"  # better of limit and reference


def test_margin_check_2019() -> None:
    ex = make(balance=D(100))
    # 1 BTC at 60000 with 20x needs 3000 USDT
    assert code(ex, **market("BUY", "1", symbol="BTCUSDT")) == -2019
    assert order(ex, **market("BUY", "0.002", symbol="BTCUSDT"))["status"] == "FILLED"


def test_market_slippage_moves_against_the_taker() -> None:
    ex = make(slippage_ticks=3)
    assert order(ex, **market("BUY", "0.002", symbol="BTCUSDT"))["avgPrice"] == "60000.30"
    assert order(ex, **market("SELL", "0.002", symbol="BTCUSDT"))["avgPrice"] == "59999.70"


def algo(ex: Exchange, side: str, kind: str, **p: str) -> AlgoOrder:
    """Place a conditional order of type ``kind`` on DOGEUSDT."""
    return ex.new_algo_order(
        {"algoType": "CONDITIONAL", "symbol": "DOGEUSDT", "side": side, "type": kind, **p}
    )


def test_conditional_types_go_to_algo_endpoint_and_trigger_on_mark() -> None:
    ex = make()
    assert (
        code(
            ex, symbol="DOGEUSDT", side="SELL", type="STOP_MARKET", quantity="100", stopPrice="0.19"
        )
        == -4120
    )
    order(ex, **market("BUY", "100"))
    a = algo(
        ex,
        "SELL",
        "STOP_MARKET",
        triggerPrice="0.19000",
        closePosition="true",
        workingType="MARK_PRICE",
    )
    assert a.status == "NEW"
    ex.drain_events()
    ex.set_price("DOGEUSDT", D("0.19100"))
    assert a.status == "NEW"
    ex.set_price("DOGEUSDT", D("0.18900"))
    assert a.status == "FINISHED"
    assert ex.position("DOGEUSDT", "BOTH").amount == 0
    statuses = [e["o"]["X"] for e in ex.drain_events() if e["e"] == "ALGO_UPDATE"]
    assert statuses == ["TRIGGERING", "TRIGGERED", "FINISHED"]


def test_stop_that_would_trigger_at_once_is_2021() -> None:
    ex = make()
    with pytest.raises(BinanceError) as info:
        algo(
            ex,
            "SELL",
            "STOP_MARKET",
            triggerPrice="0.20500",
            quantity="100",
            workingType="MARK_PRICE",
        )
    assert info.value.code == -2021


def test_close_position_on_flat_leg_expires_without_opening() -> None:
    ex = long_doge("hedge")
    a = algo(
        ex,
        "SELL",
        "STOP_MARKET",
        positionSide="LONG",
        triggerPrice="0.19000",
        closePosition="true",
        workingType="MARK_PRICE",
    )
    order(ex, **market("SELL", "100", positionSide="LONG"))
    assert (
        a.status == "NEW"
    )  # closePosition orders stay open after the position is closed otherwise
    ex.set_price("DOGEUSDT", D("0.18000"))
    assert a.status == "EXPIRED"
    assert ex.position("DOGEUSDT", "SHORT").amount == 0
    assert ex.position("DOGEUSDT", "LONG").amount == 0


def test_gte_gtc_algo_orders_expire_when_the_position_closes() -> None:
    ex = long_doge()
    a = algo(
        ex,
        "SELL",
        "STOP_MARKET",
        triggerPrice="0.19000",
        closePosition="true",
        timeInForce="GTE_GTC",
    )
    order(ex, **market("SELL", "100", reduceOnly="true"))
    assert a.status == "EXPIRED"


def test_trailing_stop_follows_the_peak() -> None:
    ex = long_doge()
    a = algo(
        ex,
        "SELL",
        "TRAILING_STOP_MARKET",
        quantity="100",
        callbackRate="1",
        activatePrice="0.20200",
        workingType="MARK_PRICE",
    )
    for price in ("0.20100", "0.20300", "0.21000", "0.20900"):
        ex.set_price("DOGEUSDT", D(price))
        assert a.status == "NEW"
    ex.set_price("DOGEUSDT", D("0.20790"))  # 1 % below the 0.21 peak
    assert a.status == "FINISHED"
    assert ex.position("DOGEUSDT", "BOTH").amount == 0


def test_position_mode_and_margin_type_change_rules() -> None:
    ex = make()
    with pytest.raises(BinanceError) as info:
        ex.set_position_mode(False)
    assert info.value.code == -4059
    order(ex, **limit("BUY", "100", "0.19000"))
    with pytest.raises(BinanceError) as info:
        ex.set_position_mode(True)
    assert info.value.code == -4067
    with pytest.raises(BinanceError) as info:
        ex.set_margin_type("DOGEUSDT", "ISOLATED")
    assert info.value.code == -4047
    ex.cancel_all("DOGEUSDT")
    order(ex, **market("BUY", "100"))
    with pytest.raises(BinanceError) as info:
        ex.set_position_mode(True)
    assert info.value.code == -4068
    with pytest.raises(BinanceError) as info:
        ex.set_margin_type("DOGEUSDT", "ISOLATED")
    assert info.value.code == -4048
    with pytest.raises(BinanceError) as info:
        ex.set_margin_type("BTCUSDT", "CROSSED")
    assert info.value.code == -4046


def test_duplicate_client_id_among_open_orders_only() -> None:
    ex = make()
    order(ex, **limit("BUY", "100", "0.19000", newClientOrderId="abc"))
    assert code(ex, **limit("BUY", "100", "0.19000", newClientOrderId="abc")) == -4116
    ex.cancel_order("DOGEUSDT", None, "abc")
    order(ex, **limit("BUY", "100", "0.19000", newClientOrderId="abc"))


def test_resting_reduce_only_limit_expires_when_position_shrinks() -> None:
    ex = long_doge()
    body = order(ex, **limit("SELL", "100", "0.21000", reduceOnly="true"))
    order(ex, **market("SELL", "50", reduceOnly="true"))
    resting = ex.orders[int(str(body["orderId"]))]
    assert resting.status == "EXPIRED"
    assert resting.expire_reason == 4


def _trigger_sequence(ex: Exchange) -> list[str]:
    return [
        f"ALGO_UPDATE {e['o']['X']}"
        if e["e"] == "ALGO_UPDATE"
        else f"ORDER_TRADE_UPDATE {e['o']['x']}"
        for e in ex.drain_events()
        if e["e"] in ("ALGO_UPDATE", "ORDER_TRADE_UPDATE")
    ]


@pytest.mark.parametrize("mode", ["one-way", "hedge"])
def test_market_child_fill_comes_before_triggered_and_finished(mode: str) -> None:
    """Contract 2.5 (live traffic, nautilus_trader #3664): TRIGGERING, then the MARKET child's
    ORDER_TRADE_UPDATEs (NEW, TRADE), then ALGO_UPDATE TRIGGERED (ap/aq still "0", as in the real
    capture) and FINISHED (with the fill's ap/aq)."""
    ex = long_doge(mode)
    leg = {"positionSide": "LONG"} if mode == "hedge" else {}
    a = algo(
        ex,
        "SELL",
        "STOP_MARKET",
        triggerPrice="0.19000",
        closePosition="true",
        workingType="MARK_PRICE",
        clientAlgoId="bs-seq",
        **leg,
    )
    ex.drain_events()
    ex.set_price("DOGEUSDT", D("0.18900"))
    events = [e for e in ex.drain_events() if e["e"] in ("ALGO_UPDATE", "ORDER_TRADE_UPDATE")]
    assert [
        f"{e['e']} {e['o']['X'] if e['e'] == 'ALGO_UPDATE' else e['o']['x']}" for e in events
    ] == [
        "ALGO_UPDATE TRIGGERING",
        "ORDER_TRADE_UPDATE NEW",
        "ORDER_TRADE_UPDATE TRADE",
        "ALGO_UPDATE TRIGGERED",
        "ALGO_UPDATE FINISHED",
    ]
    triggered, finished = events[3]["o"], events[4]["o"]
    assert (triggered["ap"], triggered["aq"]) == ("0", "0")
    assert (finished["ap"], finished["aq"]) == ("0.189000", "100")
    assert triggered["ai"] == finished["ai"] == str(events[1]["o"]["i"]) == a.actual_order_id
    assert events[1]["o"]["ot"] == "STOP_MARKET"
    assert all(e["o"]["rm"] == "" and e["o"]["ia"] is False for e in events[::4])
    assert ex.position("DOGEUSDT", leg.get("positionSide", "BOTH")).amount == 0
    # GET /fapi/v1/algoOrder finds it after it triggered (contract 2.5)
    assert ex.find_algo(None, "bs-seq").status == "FINISHED"


def test_resting_limit_child_finishes_when_it_fills() -> None:
    ex = long_doge()
    a = algo(
        ex,
        "SELL",
        "STOP",
        quantity="100",
        reduceOnly="true",
        triggerPrice="0.19000",
        price="0.19500",
        workingType="MARK_PRICE",
    )
    ex.drain_events()
    ex.set_price("DOGEUSDT", D("0.19000"))
    assert _trigger_sequence(ex) == [
        "ALGO_UPDATE TRIGGERING",
        "ORDER_TRADE_UPDATE NEW",
        "ALGO_UPDATE TRIGGERED",
    ]
    assert a.status == "TRIGGERED"
    ex.set_price("DOGEUSDT", D("0.19600"))
    assert _trigger_sequence(ex) == ["ORDER_TRADE_UPDATE TRADE", "ALGO_UPDATE FINISHED"]
    assert a.status == "FINISHED"


def test_algo_rejected_at_trigger_carries_its_reason() -> None:
    ex = long_doge()
    a = algo(
        ex,
        "SELL",
        "STOP_MARKET",
        quantity="100",
        reduceOnly="true",
        triggerPrice="0.19000",
        workingType="MARK_PRICE",
    )
    order(ex, **market("SELL", "100", reduceOnly="true"))
    ex.drain_events()
    ex.set_price("DOGEUSDT", D("0.18000"))
    rejected = [e["o"] for e in ex.drain_events() if e["e"] == "ALGO_UPDATE"][-1]
    assert (rejected["X"], rejected["rm"]) == ("REJECTED", "ReduceOnly Order is rejected.")
    assert a.status == "REJECTED"


def test_trailing_activation_is_reported_as_ia() -> None:
    ex = long_doge()
    algo(
        ex,
        "SELL",
        "TRAILING_STOP_MARKET",
        quantity="100",
        callbackRate="1",
        activatePrice="0.20200",
        workingType="MARK_PRICE",
    )
    ex.set_price("DOGEUSDT", D("0.20300"))
    ex.set_price("DOGEUSDT", D("0.20000"))
    flags = [e["o"]["ia"] for e in ex.drain_events() if e["e"] == "ALGO_UPDATE"]
    assert flags[0] is False  # NEW: not yet activated
    assert flags[-1] is True  # TRIGGERED/FINISHED after activation


@pytest.mark.parametrize("mode", ["one-way", "hedge"])
def test_stp_mode_defaults_to_expire_maker(mode: str) -> None:
    """Contract 2.5: selfTradePreventionMode defaults to EXPIRE_MAKER (orders and algo)."""
    ex = make(mode)
    leg = {"positionSide": "LONG"} if mode == "hedge" else {}
    body = order(ex, **market("BUY", "100", **leg))
    assert body["selfTradePreventionMode"] == "EXPIRE_MAKER"
    a = algo(ex, "SELL", "STOP_MARKET", closePosition="true", triggerPrice="0.19000", **leg)
    assert a.wire(RULES["DOGEUSDT"])["selfTradePreventionMode"] == "EXPIRE_MAKER"


def test_cancelled_algo_order_is_still_found_by_client_id() -> None:
    ex = make()
    algo(ex, "SELL", "STOP_MARKET", quantity="100", triggerPrice="0.19000", clientAlgoId="bs-gone")
    ex.cancel_algo(None, "bs-gone")
    assert ex.find_algo(None, "bs-gone").status == "CANCELED"


@pytest.mark.parametrize("mode", ["one-way", "hedge"])
@pytest.mark.parametrize(
    ("side", "trigger", "kind"),
    [
        ("SELL", "0.20100", "STOP_MARKET"),  # a sell stop above the mark
        ("BUY", "0.19900", "STOP_MARKET"),  # a buy stop below the mark
        ("SELL", "0.19900", "TAKE_PROFIT_MARKET"),  # a sell take-profit below the mark
    ],
)
def test_close_all_stop_the_mark_is_through_is_2021(
    mode: str, side: str, trigger: str, kind: str
) -> None:
    """Contract 2.5/3.2: a stop whose trigger the mark already passed is -2021."""
    ex = make(mode)
    leg = {}
    if mode == "hedge":
        leg = {"positionSide": "LONG" if side == "SELL" else "SHORT"}
    with pytest.raises(BinanceError) as info:
        algo(
            ex,
            side,
            kind,
            triggerPrice=trigger,
            closePosition="true",
            workingType="MARK_PRICE",
            **leg,
        )
    assert (info.value.code, info.value.msg) == (-2021, "Order would immediately trigger.")
    assert ex.open_algo_orders() == []
