"""Account settings a pre-flight check reads, and the loopback admin hook that changes them."""

from __future__ import annotations

import aiohttp
import pytest

from pyquant.sim.account import AccountSettings
from tests.sim.conftest import Rest

RESTRICTIONS = "/sapi/v1/account/apiRestrictions"


async def test_api_restrictions_default_to_a_careful_key(rest: Rest) -> None:
    body = await rest.ok("GET", RESTRICTIONS)
    assert body["enableFutures"] is True
    assert body["enableWithdrawals"] is False
    assert body["ipRestrict"] is True
    assert body["enableReading"] is True
    assert isinstance(body["createTime"], int)


async def test_admin_hook_changes_permissions_mode_and_multi_assets(rest: Rest) -> None:
    url = rest.venue.rest_url + "/admin/account"
    changes = {
        "enableWithdrawals": True,
        "ipRestrict": False,
        "multi_assets": True,
        "position_mode": "hedge",
    }
    async with rest.session.post(url, json=changes) as resp:
        assert resp.status == 200
        after = await resp.json()
    assert after["position_mode"] == "hedge"
    body = await rest.ok("GET", RESTRICTIONS)
    assert (body["enableWithdrawals"], body["ipRestrict"]) == (True, False)
    config = await rest.ok("GET", "/fapi/v1/accountConfig")
    assert (config["dualSidePosition"], config["multiAssetsMargin"]) == (True, True)
    assert (await rest.ok("GET", "/fapi/v1/multiAssetsMargin")) == {"multiAssetsMargin": True}
    async with rest.session.post(url, json={"api_restrictions_served": False}) as resp:
        assert resp.status == 200
    status, _, body = await rest.signed("GET", RESTRICTIONS)
    assert status == 404


async def test_admin_hook_rejects_bad_settings_and_changes_nothing(rest: Rest) -> None:
    url = rest.venue.rest_url + "/admin/account"
    for bad, words in (
        ({"enableWithdrawals": "yes"}, "enableWithdrawals must be true or false"),
        ({"refused_ws_routes": ["nowhere"]}, "unknown route(s) ['nowhere']"),
        ({"withdraw": True}, "unknown account setting 'withdraw'"),
        ({"position_mode": "both"}, "position_mode must be 'hedge' or 'one-way'"),
        ({"multi_assets": True, "colour": "red"}, "unknown account setting 'colour'"),
    ):
        async with rest.session.post(url, json=bad) as resp:
            assert resp.status == 400
            assert words in (await resp.json())["error"]
    assert rest.venue.account == AccountSettings()


async def test_refused_websocket_route_fails_the_handshake(rest: Rest) -> None:
    venue = rest.venue
    venue.set_account({"refused_ws_routes": ["market"]})
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await rest.session.ws_connect(f"{venue.ws_url}/market/ws/dogeusdt@markPrice@1s")
    assert info.value.status == 404
    ws = await rest.session.ws_connect(f"{venue.ws_url}/ws/dogeusdt@markPrice@1s")
    await ws.close()
