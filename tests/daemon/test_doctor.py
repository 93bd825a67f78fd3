"""``pyquant doctor`` against the simulator, healthy and made to fail one check at a time.

Each unhealthy run flips one switch of the simulator (its loopback admin hook or a
``pyquant sim`` flag) and asserts the doctor names that check with the right status and a
fix, in both position modes where the mode matters.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import pyquant.sim as sim
from pyquant.config import Config, load_config
from pyquant.daemon.doctor import DoctorOptions, Report, run_doctor


def write_config(tmp_path: Path, rest: str, ws: str, **venue: str) -> Path:
    lines = [
        'exchange = "custom"',
        "[venue]",
        f'rest_url = "{rest}"',
        f'ws_url = "{venue.get("ws_url", ws + "/market")}"',
        f'user_ws_url = "{venue.get("user_ws_url", ws + "/private")}"',
        f'legacy_ws_url = "{venue.get("legacy_ws_url", ws)}"',
        "[market]",
        'symbols = ["DOGEUSDT", "ETHUSDT"]',
        "[entries]",
        "leverage = 5",
    ]
    path = tmp_path / "pyquant.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def config_for(venue: sim.Venue, tmp_path: Path, **venue_keys: str) -> Config:
    path = write_config(tmp_path, venue.rest_url, venue.ws_url, **venue_keys)
    env = {"PYQUANT_API_KEY": venue.api_key, "PYQUANT_API_SECRET": venue.api_secret}
    return load_config(path, environ=env)


def by_name(report: Report) -> dict[str, Any]:
    return {c.name: c for c in report.checks}


@pytest.fixture(params=["one-way", "hedge"])
async def venue(request: pytest.FixtureRequest) -> AsyncIterator[sim.Venue]:
    async with sim.serve(speed=1, seed=3, position_mode=request.param) as v:
        yield v


async def test_healthy_account_passes_every_check(venue: sim.Venue, tmp_path: Path) -> None:
    report = await run_doctor(
        config_for(venue, tmp_path), DoctorOptions(place_test_orders=True, ws_wait_s=15)
    )
    checks = by_name(report)
    assert report.ok, report.to_json()
    assert [c.status for c in report.checks] == ["OK"] * len(report.checks), report.to_json()
    assert list(checks) == [
        "connectivity",
        "clock skew",
        "API key",
        "key permissions",
        "position mode",
        "Multi-Assets mode",
        "symbol DOGEUSDT",
        "symbol ETHUSDT",
        "market websocket",
        "user websocket",
        "listenKey",
        "test orders",
    ]
    mode = "hedge" if venue.exchange.dual else "one-way"
    assert checks["position mode"].detail.startswith(f"{mode} mode")
    assert "markPriceUpdate" in checks["market websocket"].detail
    assert "ACCOUNT_CONFIG_UPDATE" in checks["user websocket"].detail
    assert "<listenKey>" in checks["user websocket"].detail
    orders = checks["test orders"].detail
    assert "a second close-all was refused with -4130" in orders
    assert "tightened: sized stop of" in orders
    assert "both found by clientAlgoId before and after their cancel" in orders
    # nothing of the doctor's is left on the venue, and no position was opened
    assert venue.exchange.open_algo_orders() == []
    assert all(
        venue.exchange.position(s, leg).amount == 0
        for s in venue.rules
        for leg in venue.exchange.legs()
    )
    sized = [a for a in venue.exchange.algo_orders.values() if not a.close_position]
    assert len(sized) == 1
    assert sized[0].reduce_only is (mode == "one-way")
    assert sized[0].position_side == ("LONG" if mode == "hedge" else "BOTH")
    assert {a.status for a in venue.exchange.algo_orders.values()} == {"CANCELED"}


async def test_test_orders_leave_an_existing_backstop_alone(
    venue: sim.Venue, tmp_path: Path
) -> None:
    """A close-all stop already resting (a daemon's backstop) makes the doctor's own one a
    -4130: it says so and touches nothing."""
    mark = venue.exchange.mark("DOGEUSDT")
    leg = {"positionSide": "LONG"} if venue.exchange.dual else {}
    theirs = venue.exchange.new_algo_order(
        {
            "algoType": "CONDITIONAL",
            "symbol": "DOGEUSDT",
            "side": "SELL",
            "type": "STOP_MARKET",
            "closePosition": "true",
            "triggerPrice": str(mark - 500 * venue.rules["DOGEUSDT"].tick_size),
            "workingType": "MARK_PRICE",
            **leg,
        }
    )
    report = await run_doctor(
        config_for(venue, tmp_path), DoctorOptions(place_test_orders=True, ws_wait_s=15)
    )
    check = by_name(report)["test orders"]
    assert check.status == "WARN"
    assert "already rests on DOGEUSDT (-4130)" in check.detail
    assert [a.algo_id for a in venue.exchange.open_algo_orders()] == [theirs.algo_id]


async def test_wrong_position_mode_and_multi_assets_fail(venue: sim.Venue, tmp_path: Path) -> None:
    other = "one-way" if venue.exchange.dual else "hedge"
    venue.set_account({"multi_assets": True})
    report = await run_doctor(
        config_for(venue, tmp_path), DoctorOptions(expect_position_mode=other, ws_wait_s=15)
    )
    checks = by_name(report)
    assert not report.ok
    assert checks["position mode"].status == "FAIL"
    assert f"{other} was expected" in checks["position mode"].detail
    assert "/fapi/v1/positionSide/dual" in checks["position mode"].fix
    assert checks["Multi-Assets mode"].status == "FAIL"
    assert "multiAssetsMargin=false" in checks["Multi-Assets mode"].fix
    assert checks["connectivity"].status == "OK"


async def test_multi_assets_allowed_by_the_config_is_a_warning(
    venue: sim.Venue, tmp_path: Path
) -> None:
    venue.set_account({"multi_assets": True})
    path = write_config(tmp_path, venue.rest_url, venue.ws_url)
    env = {"PYQUANT_API_KEY": venue.api_key, "PYQUANT_API_SECRET": venue.api_secret}
    config = load_config(path, environ=env, overrides={"router": {"allow_multi_assets": True}})
    report = await run_doctor(config, DoctorOptions(ws_wait_s=15))
    check = by_name(report)["Multi-Assets mode"]
    assert check.status == "WARN"
    assert "allow_multi_assets" in check.detail


async def test_key_permissions_warn_and_fail(venue: sim.Venue, tmp_path: Path) -> None:
    venue.set_account({"enableWithdrawals": True, "ipRestrict": False})
    report = await run_doctor(config_for(venue, tmp_path), DoctorOptions(ws_wait_s=15))
    check = by_name(report)["key permissions"]
    assert check.status == "WARN"
    assert "withdrawals are enabled" in check.detail
    assert "no IP restriction" in check.detail
    assert report.ok  # warnings do not fail the run
    venue.set_account({"enableFutures": False})
    report = await run_doctor(config_for(venue, tmp_path), DoctorOptions(ws_wait_s=15))
    check = by_name(report)["key permissions"]
    assert (check.status, report.ok) == ("FAIL", False)
    assert "enableFutures=false" in check.detail
    venue.set_account({"enableFutures": True, "api_restrictions_served": False})
    report = await run_doctor(config_for(venue, tmp_path), DoctorOptions(ws_wait_s=15))
    check = by_name(report)["key permissions"]
    assert check.status == "WARN"
    assert "is not served by this venue" in check.detail


async def test_refused_routes_warn_with_legacy_and_fail_without(
    venue: sim.Venue, tmp_path: Path
) -> None:
    venue.set_account({"refused_ws_routes": ["market", "private"]})
    report = await run_doctor(config_for(venue, tmp_path), DoctorOptions(ws_wait_s=15))
    checks = by_name(report)
    for name in ("market websocket", "user websocket"):
        assert checks[name].status == "WARN", checks[name]
        assert "handshake refused with HTTP 404" in checks[name].detail
        assert "the legacy host" in checks[name].detail
    assert report.ok
    venue.set_account({"refused_ws_routes": ["market", "private", "root"]})
    report = await run_doctor(config_for(venue, tmp_path), DoctorOptions(ws_wait_s=15))
    checks = by_name(report)
    assert checks["market websocket"].status == "FAIL"
    assert "venue.ws_url" in checks["market websocket"].fix
    assert checks["user websocket"].status == "FAIL"
    assert not report.ok


async def test_clock_skew_warns_then_fails(venue: sim.Venue, tmp_path: Path) -> None:
    venue.time_skew_ms = 2_500
    report = await run_doctor(config_for(venue, tmp_path), DoctorOptions(ws_wait_s=15))
    check = by_name(report)["clock skew"]
    assert check.status == "WARN"
    assert "NTP" in check.fix
    venue.time_skew_ms = 30_000
    report = await run_doctor(config_for(venue, tmp_path), DoctorOptions(ws_wait_s=15))
    check = by_name(report)["clock skew"]
    assert check.status == "FAIL"
    offset = int(re.search(r"venue clock is ([+-]\d+) ms", check.detail).group(1))  # type: ignore[union-attr]
    assert 29_000 <= offset <= 31_000, check.detail
    assert not report.ok


async def test_margin_type_other_than_configured_warns(venue: sim.Venue, tmp_path: Path) -> None:
    venue.exchange.set_margin_type("ETHUSDT", "ISOLATED")
    venue.exchange.set_leverage("ETHUSDT", "9")
    report = await run_doctor(config_for(venue, tmp_path), DoctorOptions(ws_wait_s=15))
    checks = by_name(report)
    assert checks["symbol DOGEUSDT"].status == "OK"
    eth = checks["symbol ETHUSDT"]
    assert eth.status == "WARN"
    assert "leverage 9 (max 125)" in eth.detail
    assert "margin type ISOLATED (config: CROSSED)" in eth.detail
    assert "the daemon sets CROSSED before its first entry" in eth.fix
    assert report.ok


async def test_leverage_beyond_the_brackets_fails(
    venue: sim.Venue, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A venue whose brackets allow at most 20x (the simulator's table cut down to its
    20x-and-lower tiers): a symbol at 50x and a configured leverage of 25 both FAIL."""
    import pyquant.sim.margin as sim_margin

    monkeypatch.setattr(sim_margin, "BRACKETS", tuple(b for b in sim_margin.BRACKETS if b[2] <= 20))
    venue.exchange.set_leverage("ETHUSDT", "50")
    path = write_config(tmp_path, venue.rest_url, venue.ws_url)
    path.write_text(path.read_text().replace("leverage = 5", "leverage = 25"))
    env = {"PYQUANT_API_KEY": venue.api_key, "PYQUANT_API_SECRET": venue.api_secret}
    report = await run_doctor(load_config(path, environ=env), DoctorOptions(ws_wait_s=15))
    checks = by_name(report)
    doge, eth = checks["symbol DOGEUSDT"], checks["symbol ETHUSDT"]
    assert doge.status == "FAIL"
    assert "entries.leverage 25 above the bracket maximum 20" in doge.detail
    assert "set entries.leverage <= 20" in doge.fix
    assert eth.status == "FAIL"
    assert "leverage 50 above the bracket maximum 20" in eth.detail
    assert "POST /fapi/v1/leverage" in eth.fix
    assert not report.ok


def test_doctor_command_against_pyquant_sim(tmp_path: Path) -> None:
    """The CLI end to end: `pyquant sim` with failure flags, then `pyquant doctor --json`."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    sim_proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pyquant",
            "sim",
            "--position-mode",
            "hedge",
            "--multi-assets",
            "--key-permissions",
            '{"enableWithdrawals": true}',
            "--refuse-ws-route",
            "market",
            "--time-skew-ms",
            "40000",
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert sim_proc.stdout is not None
        first = json.loads(sim_proc.stdout.readline())
        path = write_config(tmp_path, first["rest"], first["ws"])
        run_env = {
            **env,
            "PYQUANT_API_KEY": first["api_key"],
            "PYQUANT_API_SECRET": first["api_secret"],
        }
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pyquant",
                "doctor",
                "--config",
                str(path),
                "--json",
                "--expect-position-mode",
                "one-way",
                "--place-test-orders",
            ],
            capture_output=True,
            text=True,
            env=run_env,
            timeout=120,
            check=False,
        )
        assert done.returncode == 1, done.stderr
        report = json.loads(done.stdout)
        status = {c["name"]: c["status"] for c in report["checks"]}
        assert report["ok"] is False
        assert status["position mode"] == "FAIL"
        assert status["Multi-Assets mode"] == "FAIL"
        assert status["key permissions"] == "WARN"
        assert status["market websocket"] == "WARN"
        assert status["clock skew"] == "FAIL"
        assert status["test orders"] == "OK"
        assert status["user websocket"] == "OK"
        table = subprocess.run(
            [sys.executable, "-m", "pyquant", "doctor", "--config", str(path)],
            capture_output=True,
            text=True,
            env=run_env,
            timeout=120,
            check=False,
        )
        assert table.returncode == 1
        assert "Multi-Assets mode" in table.stdout
        assert "FAIL" in table.stdout
    finally:
        sim_proc.send_signal(signal.SIGINT)
        try:
            sim_proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            sim_proc.kill()
            sim_proc.wait(timeout=30)
            raise
