"""Liquidation prices, liquidation and funding of the simulator (pyquant.sim.exchange + server).

Every expected liquidation price is Binance's published formula worked by hand for the case:
``LP = (WB - TMM1 + UPNL1 + cum - sum(signed size x entry)) / (sum(size x MMR) - sum(signed
size))`` with the bracket (MMR, cum) of each leg's notional at the liquidation price.
"""

from __future__ import annotations

from decimal import Decimal as D
from typing import Any

import pytest

from pyquant.sim.exchange import Exchange
from pyquant.sim.liquidation import FUNDING_INTERVAL_MS
from tests.sim.conftest import Rest, limit, market, open_user_stream, sample
from tests.sim.test_exchange import make, order


def buy(ex: Exchange, symbol: str, qty: str, side: str = "BUY", **p: str) -> None:
    order(ex, symbol=symbol, side=side, type="MARKET", quantity=qty, **p)


# --- liquidation prices -------------------------------------------------------------------------


def test_one_way_cross_long_uses_the_bracket_at_the_liquidation_price() -> None:
    ex = make(taker_fee=D(0))
    buy(ex, "BTCUSDT", "1")  # notional 60000: bracket 2 (0.5 %, cum 50)
    # (10000 + 50 - 60000) / (1 x 0.005 - 1); 50201 is still in bracket 2
    assert ex.liquidation_price("BTCUSDT", "BOTH") == D(-49950) / D("-0.995")


def test_one_way_cross_long_recomputed_when_the_bracket_changes() -> None:
    ex = make(taker_fee=D(0))
    buy(ex, "BTCUSDT", "0.9")  # notional 54000 at entry: bracket 2 ...
    # ... but bracket 2 gives 49078.7 (notional 44171, bracket 1): recomputed with 0.4 %, cum 0
    expected = D(10000 - 54000) / (D("0.9") * D("0.004") - D("0.9"))
    assert ex.liquidation_price("BTCUSDT", "BOTH") == expected
    assert D("0.9") * expected < 50_000


def test_one_way_cross_short_and_the_other_symbols_margin_and_pnl() -> None:
    ex = make(taker_fee=D(0))
    buy(ex, "ETHUSDT", "10", side="SELL")
    # (10000 + 0 + 10 x 3000) / (10 x 0.004 + 10)
    assert ex.liquidation_price("ETHUSDT", "BOTH") == D(40000) / D("10.04")
    buy(ex, "BTCUSDT", "1")
    ex.set_price("ETHUSDT", D(3100))  # ETH: UPNL -1000, maintenance 31000 x 0.4 % = 124
    # (10000 - 124 - 1000 + 50 - 60000) / (0.005 - 1)
    assert ex.liquidation_price("BTCUSDT", "BOTH") == D(-51074) / D("-0.995")


def test_hedge_cross_both_legs_share_one_price() -> None:
    ex = make("hedge", taker_fee=D(0))
    buy(ex, "BTCUSDT", "1", positionSide="LONG")
    buy(ex, "BTCUSDT", "0.5", side="SELL", positionSide="SHORT")
    # (10000 + 0 + 0 - 1 x 60000 + 0.5 x 60000) / (1 x 0.004 + 0.5 x 0.004 - 1 + 0.5)
    expected = D(-20000) / D("-0.494")
    assert ex.liquidation_price("BTCUSDT", "LONG") == expected
    assert ex.liquidation_price("BTCUSDT", "SHORT") == expected


def test_cross_long_with_enough_balance_has_no_liquidation_price() -> None:
    ex = make(taker_fee=D(0))
    buy(ex, "DOGEUSDT", "1000")  # 200 USDT against a 10000 wallet
    assert ex.liquidation_price("DOGEUSDT", "BOTH") == 0
    assert ex.liquidation_price("BTCUSDT", "BOTH") == 0  # flat


def test_one_way_isolated_uses_its_isolated_wallet_only() -> None:
    ex = make(taker_fee=D(0))
    ex.set_margin_type("BTCUSDT", "ISOLATED")
    ex.set_leverage("BTCUSDT", "10")
    buy(ex, "BTCUSDT", "0.5")
    assert ex.position("BTCUSDT", "BOTH").isolated_wallet == D(3000)  # 30000 / 10
    # (3000 - 0.5 x 60000) / (0.5 x 0.004 - 0.5)
    expected = D(-27000) / D("-0.498")
    assert ex.liquidation_price("BTCUSDT", "BOTH") == expected
    buy(ex, "ETHUSDT", "10", side="SELL")  # a cross position elsewhere does not move it
    ex.set_price("ETHUSDT", D(3100))
    assert ex.liquidation_price("BTCUSDT", "BOTH") == expected
    # ... but the cross wallet excludes the isolated 3000: (7000 + 30000) / 10.04
    assert ex.liquidation_price("ETHUSDT", "BOTH") == D(37000) / D("10.04")
    buy(ex, "BTCUSDT", "0.2", side="SELL")  # a partial close releases 2/5 of the wallet
    assert ex.position("BTCUSDT", "BOTH").isolated_wallet == D(1800)


def test_hedge_isolated_legs_have_their_own_prices() -> None:
    ex = make("hedge", taker_fee=D(0))
    ex.set_margin_type("BTCUSDT", "ISOLATED")
    ex.set_leverage("BTCUSDT", "10")
    buy(ex, "BTCUSDT", "0.5", positionSide="LONG")
    buy(ex, "BTCUSDT", "0.2", side="SELL", positionSide="SHORT")
    assert ex.liquidation_price("BTCUSDT", "LONG") == D(-27000) / D("-0.498")
    # (1200 + 0.2 x 60000) / (0.2 x 0.004 + 0.2)
    assert ex.liquidation_price("BTCUSDT", "SHORT") == D(13200) / D("0.2008")


# --- liquidation --------------------------------------------------------------------------------


def test_liquidation_is_off_by_default() -> None:
    ex = make(taker_fee=D(0))
    ex.set_margin_type("BTCUSDT", "ISOLATED")
    ex.set_leverage("BTCUSDT", "10")
    buy(ex, "BTCUSDT", "0.5")
    ex.set_price("BTCUSDT", D(50000))
    assert ex.position("BTCUSDT", "BOTH").amount == D("0.5")


def test_isolated_long_is_liquidated_when_the_mark_reaches_its_price() -> None:
    ex = make(taker_fee=D(0), liquidation=True)
    ex.set_margin_type("BTCUSDT", "ISOLATED")
    ex.set_leverage("BTCUSDT", "10")
    buy(ex, "BTCUSDT", "0.5")
    _, resting, _ = ex.new_order(limit("BUY", "0.1", "40000", symbol="BTCUSDT"))
    ex.set_price("BTCUSDT", D("54300"))  # LP 54216.87: not yet
    assert ex.position("BTCUSDT", "BOTH").amount == D("0.5")
    ex.drain_events()
    ex.set_price("BTCUSDT", D("54216.8"))
    assert ex.position("BTCUSDT", "BOTH").amount == 0
    events = ex.drain_events()
    assert [(e["e"], e.get("o", {}).get("x")) for e in events] == [
        ("ORDER_TRADE_UPDATE", "EXPIRED"),  # the symbol's open orders go first (er 5)
        ("ORDER_TRADE_UPDATE", "NEW"),
        ("ORDER_TRADE_UPDATE", "CALCULATED"),
        ("ACCOUNT_UPDATE", None),
    ]
    expired, new, fill, account = events
    assert expired["o"]["i"] == resting["orderId"]
    assert expired["o"]["er"] == "5"
    like = sample("ws_ORDER_TRADE_UPDATE_liquidation_synthetic.json")["data"]["o"]
    assert set(like) - {"W"} <= set(fill["o"])
    o = fill["o"]
    assert o["c"].startswith("autoclose-")
    assert new["o"]["c"] == o["c"]
    assert new["o"]["X"] == "NEW"
    assert (o["S"], o["o"], o["ot"], o["ps"], o["R"]) == (
        "SELL",
        "MARKET",
        "LIQUIDATION",
        "BOTH",
        False,
    )
    assert (o["X"], o["q"], o["l"], o["z"]) == ("FILLED", "0.500", "0.500", "0.500")
    assert o["L"] == o["ap"] == "54216.80"
    # realized (54216.8 - 60000) x 0.5; clearance fee 54216.8 x 0.5 x liquidationFee 0.02
    assert o["rp"] == "-2891.60000000"
    assert o["n"] == "542.16800000"
    assert account["a"]["m"] == "ORDER"
    assert account["a"]["P"][0]["pa"] == "0"
    assert account["a"]["P"][0]["iw"] == "0"
    assert ex.wallet == D(10000) - D("2891.6") - D("542.168")
    assert account["a"]["B"][0]["wb"] == "6566.23200000"
    kinds = [(e["kind"], e.get("clientOrderId")) for e in ex.log[-4:]]
    assert kinds == [
        ("expire", resting["clientOrderId"]),
        ("order", o["c"]),
        ("liquidation", o["c"]),
        ("fill", o["c"]),
    ]
    assert ex.log[-2]["liquidationPrice"] == str(D(-27000) / D("-0.498"))
    assert ex.log[-3]["origType"] == "LIQUIDATION"
    assert ex.trades[-1].order_id == o["i"]


def test_cross_hedge_legs_are_liquidated_together() -> None:
    ex = make("hedge", taker_fee=D(0), liquidation=True, balance=D(1000))
    ex.set_leverage("BTCUSDT", "100")
    buy(ex, "BTCUSDT", "1", positionSide="LONG")
    buy(ex, "BTCUSDT", "0.5", side="SELL", positionSide="SHORT")
    price = ex.liquidation_price("BTCUSDT", "LONG")
    # (1000 - 60000 + 30000) / (0.005 + 0.5 x 0.004 - 0.5): long notional 58824 in bracket 2
    assert price == D(-28950) / D("-0.493")
    ex.drain_events()
    ex.set_price("BTCUSDT", D("58722.1"))  # just below 58722.11
    fills = [e["o"] for e in ex.drain_events() if e.get("o", {}).get("x") == "CALCULATED"]
    assert [(f["S"], f["ps"], f["l"]) for f in fills] == [
        ("SELL", "LONG", "1.000"),
        ("BUY", "SHORT", "0.500"),
    ]
    assert ex.position("BTCUSDT", "LONG").amount == ex.position("BTCUSDT", "SHORT").amount == 0


def test_isolated_hedge_liquidation_leaves_the_other_leg_and_its_orders() -> None:
    ex = make("hedge", taker_fee=D(0), liquidation=True)
    ex.set_margin_type("BTCUSDT", "ISOLATED")
    ex.set_leverage("BTCUSDT", "10")
    buy(ex, "BTCUSDT", "0.5", positionSide="LONG")
    buy(ex, "BTCUSDT", "0.2", side="SELL", positionSide="SHORT")
    limit = {"symbol": "BTCUSDT", "type": "LIMIT", "timeInForce": "GTC", "quantity": "0.1"}
    _, long_order, _ = ex.new_order(
        {**limit, "side": "BUY", "positionSide": "LONG", "price": "40000"}
    )
    _, short_order, _ = ex.new_order(
        {**limit, "side": "SELL", "positionSide": "SHORT", "price": "80000"}
    )
    ex.set_price("BTCUSDT", D("54216.8"))  # the LONG's 54216.87; the SHORT's is 65737.05
    assert ex.position("BTCUSDT", "LONG").amount == 0
    assert ex.position("BTCUSDT", "SHORT").amount == D("-0.2")
    assert [o.order_id for o in ex.open_orders("BTCUSDT")] == [short_order["orderId"]]
    assert ex.orders[long_order["orderId"]].expire_reason == 5


def test_short_is_liquidated_upward_only() -> None:
    ex = make(taker_fee=D(0), liquidation=True, balance=D(500))
    buy(ex, "ETHUSDT", "2", side="SELL")  # (500 + 6000) / (2 x 0.004 + 2)
    price = ex.liquidation_price("ETHUSDT", "BOTH")
    assert price == D(6500) / D("2.008")
    ex.set_price("ETHUSDT", D(100))  # far in profit: nothing
    ex.set_price("ETHUSDT", D("3237.05"))  # 3237.051...: not yet
    assert ex.position("ETHUSDT", "BOTH").amount == -2
    ex.set_price("ETHUSDT", D("3237.06"))
    assert ex.position("ETHUSDT", "BOTH").amount == 0


# --- funding ------------------------------------------------------------------------------------

START = 1_700_000_000_000
FUNDING_AT = START - START % FUNDING_INTERVAL_MS + FUNDING_INTERVAL_MS


def test_funding_charges_each_leg_at_the_funding_time() -> None:
    ex = make(taker_fee=D(0), funding=True)
    assert ex.next_funding_time() == FUNDING_AT == 1_700_006_400_000  # 00:00 UTC
    buy(ex, "BTCUSDT", "0.1")  # cross long
    ex.set_margin_type("ETHUSDT", "ISOLATED")
    ex.set_leverage("ETHUSDT", "10")
    buy(ex, "ETHUSDT", "2", side="SELL")  # isolated short, wallet 600
    ex.set_funding_rate("ETHUSDT", D("-0.0003"))
    ex.drain_events()
    ex.now_ms.t = FUNDING_AT - 1  # type: ignore[attr-defined]
    ex.set_price("BTCUSDT", D(61000))
    assert ex.drain_events() == []
    ex.now_ms.t = FUNDING_AT + 500  # type: ignore[attr-defined]
    ex.set_price("BTCUSDT", D(61000))
    btc, eth = ex.drain_events()
    # BTC: long pays 0.1 x 61000 x 0.0001; ETH: short pays at a negative rate 2 x 3000 x 0.0003
    assert btc == {
        "e": "ACCOUNT_UPDATE",
        "E": FUNDING_AT + 500,
        "T": FUNDING_AT,
        "a": {
            "m": "FUNDING_FEE",
            "B": [{"a": "USDT", "wb": "9999.39000000", "cw": "9999.39000000", "bc": "-0.61000000"}],
            "P": [],
        },
    }
    assert eth["T"] == FUNDING_AT
    assert eth["a"]["B"][0]["bc"] == "-1.80000000"
    assert eth["a"]["B"][0]["wb"] == "9997.59000000"
    assert eth["a"]["P"] == [
        {
            "s": "ETHUSDT",
            "pa": "-2",
            "ep": "3000",
            "bep": "3000",
            "cr": "0.00000000",
            "up": "0.00000000",
            "mt": "isolated",
            "iw": "598.20000000",
            "ps": "BOTH",
        }
    ]
    assert ex.wallet == D(10000) - D("0.61") - D("1.8")
    assert ex.position("ETHUSDT", "BOTH").isolated_wallet == D("598.2")
    funding = [e for e in ex.log if e["kind"] == "funding"]
    assert funding[0] == {
        "kind": "funding",
        "time": FUNDING_AT + 500,
        "symbol": "BTCUSDT",
        "positionSide": "BOTH",
        "fundingTime": FUNDING_AT,
        "positionAmt": "0.1",
        "markPrice": "61000",
        "fundingRate": "0.0001",
        "income": "-0.61",
    }
    assert ex.next_funding_time() == FUNDING_AT + FUNDING_INTERVAL_MS
    ex.set_price("ETHUSDT", D(3000))  # the same funding time is never charged twice
    assert ex.drain_events() == []


def test_funding_is_off_by_default_and_the_time_stays_aligned() -> None:
    ex = make(taker_fee=D(0))
    buy(ex, "BTCUSDT", "0.1")
    ex.now_ms.t = FUNDING_AT + 10  # type: ignore[attr-defined]
    ex.set_price("BTCUSDT", D(60000))
    assert ex.wallet == D(10000)
    assert ex.next_funding_time() == FUNDING_AT + FUNDING_INTERVAL_MS


# --- served over REST and the user stream -------------------------------------------------------


@pytest.fixture
async def lvenue() -> Any:
    import pyquant.sim as sim

    async with sim.serve(
        speed=0, seed=7, liquidation=True, funding=True, funding_rate="0.0002", balance=1000
    ) as v:
        yield v


@pytest.fixture
def lrest(session: Any, lvenue: Any) -> Rest:
    return Rest(session, lvenue)


async def test_position_risk_premium_index_and_a_liquidation_over_the_wire(lrest: Rest) -> None:
    venue = lrest.venue
    await venue.set_mark("ETHUSDT", "2500.00")
    stream = await open_user_stream(lrest)
    await lrest.ok("POST", "/fapi/v1/leverage", symbol="ETHUSDT", leverage="50")
    await lrest.ok("POST", "/fapi/v1/order", **market("BUY", "4", symbol="ETHUSDT"))
    # wallet 1000 - taker fee 10000 x 0.0005 = 995: (995 - 10000) / (4 x 0.004 - 4)
    expected = D(-9005) / D("-3.984")
    assert venue.exchange.liquidation_price("ETHUSDT", "BOTH") == expected
    v2 = await lrest.ok("GET", "/fapi/v2/positionRisk", symbol="ETHUSDT")
    v3 = await lrest.ok("GET", "/fapi/v3/positionRisk", symbol="ETHUSDT")
    assert v2[0]["liquidationPrice"] == v3[0]["liquidationPrice"] == "2260.29116466"
    flat = await lrest.ok("GET", "/fapi/v2/positionRisk", symbol="BTCUSDT")
    assert flat[0]["liquidationPrice"] == "0"
    _, _, premium = await lrest.public("/fapi/v1/premiumIndex", symbol="ETHUSDT")
    assert premium["lastFundingRate"] == "0.00020000"
    assert premium["nextFundingTime"] == venue.exchange.next_funding_time()
    assert premium["nextFundingTime"] % FUNDING_INTERVAL_MS == 0
    brackets = await lrest.ok("GET", "/fapi/v1/leverageBracket", symbol="ETHUSDT")
    first = brackets["brackets"][0] if isinstance(brackets, dict) else brackets[0]["brackets"][0]
    assert (first["maintMarginRatio"], first["cum"]) == (0.004, 0.0)

    await venue.set_mark("ETHUSDT", "2260.29")
    fill = await stream.wait_for(lambda e: e.get("o", {}).get("x") == "CALCULATED")
    assert fill["o"]["c"].startswith("autoclose-")
    assert (fill["o"]["X"], fill["o"]["l"], fill["o"]["L"]) == ("FILLED", "4.000", "2260.29")
    update = await stream.wait_for(
        lambda e: e["e"] == "ACCOUNT_UPDATE" and e["a"]["P"][0]["pa"] == "0"
    )
    assert update["a"]["m"] == "ORDER"
    after = await lrest.ok("GET", "/fapi/v3/positionRisk", symbol="ETHUSDT")
    assert after == []
    assert [e["kind"] for e in venue.order_log.by_client_id(fill["o"]["c"])] == [
        "order",
        "liquidation",
        "fill",
    ]


async def test_isolated_wallet_is_served_and_survives_a_restart(rest: Rest, tmp_path: Any) -> None:
    from pyquant.sim.records import load_state, save_state

    venue = rest.venue
    await venue.set_mark("ETHUSDT", "2500.00")
    await rest.ok("POST", "/fapi/v1/marginType", symbol="ETHUSDT", marginType="ISOLATED")
    await rest.ok("POST", "/fapi/v1/leverage", symbol="ETHUSDT", leverage="10")
    await rest.ok("POST", "/fapi/v1/order", **market("SELL", "2", symbol="ETHUSDT"))
    await venue.set_mark("ETHUSDT", "2510.00")
    # isolated wallet 5000 / 10 = 500; isolatedMargin adds the unrealized -20
    v2 = (await rest.ok("GET", "/fapi/v2/positionRisk", symbol="ETHUSDT"))[0]
    assert (v2["isolatedWallet"], v2["isolatedMargin"]) == ("500.00000000", "480.00000000")
    v3 = (await rest.ok("GET", "/fapi/v3/positionRisk", symbol="ETHUSDT"))[0]
    assert (v3["isolatedWallet"], v3["isolatedMargin"]) == ("500.00000000", "480.00000000")
    # (500 + 2 x 2500) / (2 x 0.004 + 2)
    assert v3["liquidationPrice"] == "2739.04382470" == v2["liquidationPrice"]
    path = tmp_path / "state.json"
    save_state(venue.exchange, path)
    fresh = make()
    assert load_state(fresh, path)
    assert fresh.position("ETHUSDT", "BOTH").isolated_wallet == D(500)
    assert fresh.liquidation_price("ETHUSDT", "BOTH") == D(5500) / D("2.008")


def test_cli_options() -> None:
    from pyquant.sim.cli import build_parser

    args = build_parser().parse_args(["--liquidation", "--funding", "--funding-rate", "-0.0003"])
    assert (args.liquidation, args.funding, args.funding_rate) == (True, True, D("-0.0003"))
    defaults = build_parser().parse_args([])
    assert (defaults.liquidation, defaults.funding, defaults.funding_rate) == (
        False,
        False,
        D("0.0001"),
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--funding-rate", "x"])


async def test_income_history_lists_fills_and_funding(rest: Rest) -> None:
    venue = rest.venue
    await venue.set_mark("ETHUSDT", "2500.00")
    await rest.ok("POST", "/fapi/v1/order", **market("BUY", "2", symbol="ETHUSDT"))
    await venue.set_mark("ETHUSDT", "2510.00")
    await rest.ok("POST", "/fapi/v1/order", **market("SELL", "2", symbol="ETHUSDT"))
    ex = venue.exchange
    ex.funding = True  # one settlement, charged on a position opened for it
    await rest.ok("POST", "/fapi/v1/order", **market("SELL", "1", symbol="ETHUSDT"))
    ex._next_funding = ex.now_ms()
    await venue.set_mark("ETHUSDT", "2510.00")
    flows = await rest.ok("GET", "/fapi/v1/income", symbol="ETHUSDT")
    trades = await rest.ok("GET", "/fapi/v1/userTrades", symbol="ETHUSDT")
    assert [(f["incomeType"], f["income"], f["tradeId"]) for f in flows] == [
        ("COMMISSION", "-2.50000000", str(trades[0]["id"])),  # 5000 x 0.0005
        ("REALIZED_PNL", "20.00000000", str(trades[1]["id"])),
        ("COMMISSION", "-2.51000000", str(trades[1]["id"])),
        ("COMMISSION", "-1.25500000", str(trades[2]["id"])),
        ("FUNDING_FEE", "0.25100000", ""),  # the short receives 1 x 2510 x 0.0001
    ]
    assert all(f["asset"] == "USDT" and f["symbol"] == "ETHUSDT" for f in flows)
    assert len({f["tranId"] for f in flows}) == 5
    only = await rest.ok("GET", "/fapi/v1/income", incomeType="FUNDING_FEE", limit="1", page="1")
    assert [f["income"] for f in only] == ["0.25100000"]
    assert await rest.ok("GET", "/fapi/v1/income", limit="2", page="3") == flows[4:]
    bad = await rest.error("GET", "/fapi/v1/income", incomeType="NOPE")
    assert bad["code"] == -1130


async def test_funding_over_the_wire_at_the_funding_time(session: Any) -> None:
    import pyquant.sim as sim

    async with sim.serve(speed=0, seed=7, funding=True, start_ms=FUNDING_AT - 2_000) as venue:
        rest = Rest(session, venue)
        await venue.set_mark("ETHUSDT", "2500.00")
        stream = await open_user_stream(rest)
        await rest.ok("POST", "/fapi/v1/order", **market("BUY", "1", symbol="ETHUSDT"))
        _, _, before = await rest.public("/fapi/v1/premiumIndex", symbol="ETHUSDT")
        assert before["nextFundingTime"] == FUNDING_AT
        await venue.step(3_000)  # the pinned mark stays 2500.00
        event = await stream.wait_for(lambda e: e.get("a", {}).get("m") == "FUNDING_FEE")
        assert event["T"] == FUNDING_AT
        assert event["a"]["P"] == []
        assert event["a"]["B"][0]["bc"] == "-0.25000000"  # 1 x 2500 x 0.0001
        _, _, after = await rest.public("/fapi/v1/premiumIndex", symbol="ETHUSDT")
        assert after["nextFundingTime"] == FUNDING_AT + FUNDING_INTERVAL_MS
        flows = await rest.ok("GET", "/fapi/v1/income", incomeType="FUNDING_FEE")
        assert [(f["income"], f["time"]) for f in flows] == [("-0.25000000", FUNDING_AT)]
