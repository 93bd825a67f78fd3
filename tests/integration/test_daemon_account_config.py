"""Account modes and leverage read as real Binance serves them (contract 2.5), in both modes."""

from __future__ import annotations

from pathlib import Path

import pytest
from pq_harness import run_daemon, simulator, until

from pyquant.exchange.client import BinanceClient
from pyquant.trading.router import RouterError

SYMBOL = "ETHUSDT"


@pytest.mark.parametrize("mode", ["one-way", "hedge"])
async def test_the_daemon_refuses_multi_assets_mode_unless_told(tmp_path: Path, mode: str) -> None:
    async with simulator(mode) as venue:
        venue.account.multi_assets = True
        with pytest.raises(BaseExceptionGroup) as refused:
            async with run_daemon(venue, tmp_path / "a"):
                pass
        assert refused.group_contains(RouterError, match="Multi-Assets mode", depth=None)
        async with run_daemon(venue, tmp_path / "b", router={"allow_multi_assets": True}) as ok:
            assert ok.daemon.ready.is_set()
            await ok.stop()


@pytest.mark.parametrize("mode", ["one-way", "hedge"])
async def test_an_adopted_position_runs_at_its_real_leverage(tmp_path: Path, mode: str) -> None:
    async with simulator(mode) as venue:
        await venue.set_mark(SYMBOL, "2500.00")
        venue.exchange.set_leverage(SYMBOL, "7")
        async with BinanceClient(venue.rest_url, venue.api_key, venue.api_secret) as hand:
            await hand.new_order(  # opened by hand, before the daemon starts
                {
                    "symbol": SYMBOL,
                    "side": "BUY",
                    "positionSide": "LONG" if mode == "hedge" else "BOTH",
                    "type": "MARKET",
                    "quantity": "0.200",
                    "newClientOrderId": "by-hand-1",
                }
            )
        async with run_daemon(venue, tmp_path) as running:
            store = running.daemon.desk.store
            await until(lambda: store.positions(("open",)) != [], what="adoption")
            [position] = store.positions(("open",))
            assert position.origin == "adopted"
            assert position.leverage == 7  # symbolConfig's (v3 positionRisk has none)
            await running.stop()


@pytest.mark.parametrize("mode", ["one-way", "hedge"])
async def test_refused_websocket_routes_fall_back_to_the_legacy_host(
    tmp_path: Path, mode: str
) -> None:
    # Contract 2.5: whether a testnet serves /market and /private is unconfirmed; the daemon
    # must trade either way.
    async with simulator(mode) as venue:
        await venue.set_mark(SYMBOL, "2500.00")
        venue.set_account({"refused_ws_routes": ["market", "private"]})
        legacy = {"legacy_ws_url": str(venue.ws_url)}
        async with run_daemon(venue, tmp_path, venue=legacy) as running:
            daemon = running.daemon
            assert daemon.market is not None
            assert daemon.market.routes.current.rstrip("/") == str(venue.ws_url).rstrip("/")
            result = await daemon.submit(
                {"id": "legacy-1", "symbol": SYMBOL, "side": "BUY", "size_usd": "500"}
            )
            assert result.accepted, result
            store = daemon.desk.store
            # the fill reaches us (REST or the user stream on the legacy host)
            await until(
                lambda: store.get_position(result.position_id).status == "open", what="entry"
            )
            await until(lambda: daemon.user is not None and daemon.user.health.connected)
            assert daemon.user.routes.current.rstrip("/") == str(venue.ws_url).rstrip("/")
            await running.stop()
