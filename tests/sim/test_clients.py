"""Real third-party clients and the pyquant sim command, unchanged, given only URLs and keys."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import ccxt.async_support as ccxt
import pytest
from binance import AsyncClient

import pyquant.sim as sim
from tests.sim.conftest import market


async def test_python_binance_futures_methods() -> None:
    async with sim.serve(speed=0, position_mode="hedge") as venue:
        client = AsyncClient(venue.api_key, venue.api_secret)  # no network until a call is made
        client.FUTURES_URL = venue.rest_url + "/fapi"
        try:
            assert await client.futures_get_position_mode() == {"dualSidePosition": True}
            order = await client.futures_create_order(
                symbol="ETHUSDT", side="BUY", positionSide="LONG", type="MARKET", quantity="0.01"
            )
            assert order["positionSide"] == "LONG"
            rows = await client.futures_position_information(symbol="ETHUSDT")
            assert {r["positionSide"]: r["positionAmt"] for r in rows}["LONG"] == "0.010"
            with pytest.raises(Exception, match="-4061"):
                await client.futures_create_order(
                    symbol="ETHUSDT", side="SELL", type="MARKET", quantity="0.01"
                )
            with pytest.raises(Exception, match="-1106"):
                await client.futures_create_order(
                    symbol="ETHUSDT",
                    side="SELL",
                    positionSide="LONG",
                    type="MARKET",
                    quantity="0.01",
                    reduceOnly="true",
                )
            balance = await client.futures_account_balance()
            assert balance[0]["asset"] == "USDT"
            klines = await client.futures_klines(symbol="ETHUSDT", interval="1m", limit=5)
            assert len(klines) == 5
        finally:
            await client.close_connection()


def ccxt_on(venue: sim.Venue) -> ccxt.binanceusdm:
    """A ccxt binanceusdm client whose futures (fapi) URLs point at the simulator."""
    # fetchCurrencies is a spot (sapi) call; the futures venue has no spot wallet
    ex = ccxt.binanceusdm(
        {
            "apiKey": venue.api_key,
            "secret": venue.api_secret,
            "options": {"fetchCurrencies": False},
        }
    )
    for name, url in list(ex.urls["api"].items()):
        if name.startswith("fapi"):
            ex.urls["api"][name] = url.replace("https://fapi.binance.com", venue.rest_url)
    return ex


async def test_ccxt_binanceusdm() -> None:
    async with sim.serve(speed=0) as venue:
        ex = ccxt_on(venue)
        try:
            markets = await ex.load_markets()
            assert "DOGE/USDT:USDT" in markets
            ticker = await ex.fetch_ticker("DOGE/USDT:USDT")
            assert ticker["last"] > 0
            order = await ex.create_order("DOGE/USDT:USDT", "market", "buy", 100)
            assert order["status"] == "closed"
            positions = await ex.fetch_positions(["DOGE/USDT:USDT"])
            assert positions[0]["contracts"] == 100
            closed = await ex.create_order(
                "DOGE/USDT:USDT", "market", "sell", 100, params={"reduceOnly": True}
            )
            assert closed["reduceOnly"] is True
            balance = await ex.fetch_balance()
            assert balance["USDT"]["total"] > 9000
        finally:
            await ex.close()


@pytest.mark.parametrize("mode", ["one-way", "hedge"])
async def test_python_binance_symbol_and_account_config(mode: str) -> None:
    """Contract 2.5: symbolConfig carries leverage and margin type (v3 positionRisk has none);
    accountConfig carries position mode and Multi-Assets mode."""
    async with sim.serve(speed=0, position_mode=mode) as venue:
        client = AsyncClient(venue.api_key, venue.api_secret)
        client.FUTURES_URL = venue.rest_url + "/fapi"
        try:
            await client.futures_change_leverage(symbol="ETHUSDT", leverage=7)
            await client.futures_change_margin_type(symbol="ETHUSDT", marginType="ISOLATED")
            rows = await client.futures_symbol_config(symbol="ETHUSDT")
            assert rows == [
                {
                    "symbol": "ETHUSDT",
                    "marginType": "ISOLATED",
                    "isAutoAddMargin": "false",
                    "leverage": 7,
                    "maxNotionalValue": rows[0]["maxNotionalValue"],
                }
            ]
            every = await client.futures_symbol_config()
            assert {r["symbol"] for r in every} == set(venue.rules)
            assert {r["symbol"]: r["leverage"] for r in every}["BTCUSDT"] == 20
            config = await client.futures_account_config()
            assert config == {
                "feeTier": 0,
                "canTrade": True,
                "canDeposit": True,
                "canWithdraw": True,
                "dualSidePosition": mode == "hedge",
                "updateTime": 0,
                "multiAssetsMargin": False,
                "tradeGroupId": -1,
            }
            await client.futures_change_multi_assets_mode(multiAssetsMargin="true")
            assert (await client.futures_account_config())["multiAssetsMargin"] is True
            assert (await client.futures_get_multi_assets_mode()) == {"multiAssetsMargin": True}
        finally:
            await client.close_connection()


async def test_ccxt_fetch_leverages() -> None:
    async with sim.serve(speed=0, position_mode="hedge") as venue:
        ex = ccxt_on(venue)
        try:
            await ex.load_markets()
            await ex.set_leverage(5, "DOGE/USDT:USDT")
            leverages = await ex.fetch_leverages(["DOGE/USDT:USDT", "BTC/USDT:USDT"])
            doge = leverages["DOGE/USDT:USDT"]
            assert (doge["longLeverage"], doge["shortLeverage"]) == (5, 5)
            assert doge["marginMode"] == "cross"
            assert leverages["BTC/USDT:USDT"]["longLeverage"] == 20
        finally:
            await ex.close()


def test_pyquant_sim_command_first_line_and_clean_exit(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pyquant",
            "sim",
            "--speed",
            "0",
            "--balance",
            "1234.5",
            "--state",
            str(state),
            "--api-key",
            "k" * 64,
            "--api-secret",
            "s" * 64,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        assert set(first) == {"rest", "ws", "api_key", "api_secret"}
        assert first["rest"].startswith("http://127.0.0.1:")
        assert first["ws"].startswith("ws://127.0.0.1:")
        assert first["api_key"] == "k" * 64
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    assert json.loads(state.read_text())["wallet"] == "1234.5"


async def test_state_file_keeps_the_account_across_restarts(tmp_path: Path) -> None:
    import aiohttp

    from tests.sim.conftest import Rest

    state = tmp_path / "acct.json"
    async with aiohttp.ClientSession() as session:
        async with sim.serve(speed=0, state=state, position_mode="hedge") as venue:
            rest = Rest(session, venue)
            await rest.ok(
                "POST",
                "/fapi/v1/order",
                **market("BUY", "100", positionSide="LONG", newClientOrderId="keep-1"),
            )
            await rest.ok("POST", "/fapi/v1/leverage", symbol="DOGEUSDT", leverage="5")
            wallet = venue.exchange.wallet
        async with sim.serve(speed=0, state=state) as venue:
            rest = Rest(session, venue)
            assert venue.exchange.wallet == wallet
            assert await rest.ok("GET", "/fapi/v1/positionSide/dual") == {"dualSidePosition": True}
            rows = await rest.ok("GET", "/fapi/v2/positionRisk", symbol="DOGEUSDT")
            long = next(r for r in rows if r["positionSide"] == "LONG")
            assert (long["positionAmt"], long["leverage"]) == ("100", "5")
            found = await rest.ok(
                "GET", "/fapi/v1/order", symbol="DOGEUSDT", origClientOrderId="keep-1"
            )
            assert found["status"] == "FILLED"
            again = await rest.ok(
                "POST",
                "/fapi/v1/order",
                **market("SELL", "100", positionSide="LONG", newOrderRespType="RESULT"),
            )
            assert again["orderId"] > found["orderId"]
