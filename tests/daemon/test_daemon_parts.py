"""Daemon parts that need no venue: demo rule, latency hook, metrics, dashboard, CLI."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import urllib.request
from decimal import Decimal
from pathlib import Path

import pytest
from rich.console import Console

from pyquant.config import load_config
from pyquant.daemon.app import TICK_RECEIVED_NS, LatencyRecorder, desk_config
from pyquant.daemon.cli import format_summary, run_command
from pyquant.daemon.dashboard import DashboardData, PositionLine, render
from pyquant.daemon.demo import DemoProducer, demo_intents
from pyquant.daemon.metrics import FeedStatus, Metrics, Status

DATA = Path(__file__).parents[1] / "data" / "binance"


def test_demo_rule_matches_the_original_system() -> None:
    rows = [
        {"symbol": "AAAUSDT", "priceChangePercent": "2.500"},
        {"symbol": "BBBUSDT", "priceChangePercent": "-45.0"},
        {"symbol": "CCCUSDT", "priceChangePercent": "1.000"},  # not beyond 1 %
        {"symbol": "DDDUSDT", "priceChangePercent": "-0.5"},
        {"symbol": "EEEUSDT", "priceChangePercent": "n/a"},
    ]
    out = demo_intents(rows, threshold_pct=Decimal("1"), round_id=3, now_ms=1000)
    assert [(p["symbol"], p["side"], p["confidence"]) for p in out] == [
        ("BBBUSDT", "SELL", 0.8),  # capped at 0.8
        ("AAAUSDT", "BUY", 0.525),
    ]
    assert out[0]["id"] == "demo-BBBUSDT-SELL-3"
    assert out[0]["created_at_ms"] == 1000
    skip = demo_intents(
        rows, threshold_pct=Decimal("1"), round_id=1, now_ms=1, tradable=lambda s: s != "BBBUSDT"
    )
    assert [p["symbol"] for p in skip] == ["AAAUSDT"]


def test_demo_on_the_docs_ticker_sample() -> None:
    row = json.loads((DATA / "ticker_24hr_docs.json").read_text())
    rows = row if isinstance(row, list) else [row]
    change = Decimal(rows[0]["priceChangePercent"])
    out = demo_intents(rows, threshold_pct=Decimal("1"), round_id=1, now_ms=1)
    assert len(out) == (1 if abs(change) > 1 else 0)


async def test_demo_producer_submits_each_round() -> None:
    class Venue:
        async def ticker_24hr(self) -> list[dict[str, str]]:
            return [{"symbol": "SOLUSDT", "priceChangePercent": "-3.2"}]

    got: list[dict[str, object]] = []
    done = asyncio.Event()

    async def submit(payload: dict[str, object]) -> None:
        got.append(payload)
        if len(got) == 2:
            producer.stop()
            done.set()

    producer = DemoProducer(Venue(), submit, interval_s=0.01, run_tag="r7")  # type: ignore[arg-type]
    await asyncio.wait_for(producer.run(), 5)
    assert [p["id"] for p in got] == ["demo-SOLUSDT-SELL-r7-1", "demo-SOLUSDT-SELL-r7-2"]
    assert got[0]["confidence"] == pytest.approx(0.532)


def test_demo_ids_differ_between_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    # A restart on the same journal must not reuse ids the guard has already seen.
    tags = []
    for now_ns in (1_764_201_600_123_000_000, 1_764_201_600_124_000_000):
        monkeypatch.setattr("pyquant.daemon.demo.time.time_ns", lambda now_ns=now_ns: now_ns)
        tags.append(DemoProducer(object(), lambda _p: asyncio.sleep(0))._run_tag)  # type: ignore[arg-type]
    assert tags == ["migo2yrf", "migo2yrg"]


def test_latency_hook_reads_the_tick_context() -> None:
    recorder = LatencyRecorder()
    recorder.on_request_sent("POST", "/fapi/v1/order")  # no tick in context: ignored
    token = TICK_RECEIVED_NS.set(1)
    try:
        recorder.on_request_sent("GET", "/fapi/v1/order")  # a lookup, not an order
        recorder.on_request_sent("POST", "/fapi/v1/algoOrder")  # a backstop, not the exit
        recorder.on_request_sent("POST", "/fapi/v1/order")
    finally:
        TICK_RECEIVED_NS.reset(token)
    assert len(recorder.samples) == 1
    assert recorder.percentiles()["p50"] is not None


def test_desk_config_carries_the_user_settings() -> None:
    config = load_config(
        None, environ={"PYQUANT__ENTRIES__COOLDOWN_S": "90", "PYQUANT__ROUTER__BACKSTOP": "false"}
    )
    desk = desk_config(config)
    assert desk.guard.cooldown_ms == 90_000
    assert desk.router.backstop_enabled is False
    assert desk.sizing.risk_pct == Decimal("0.01")
    assert desk.sizing.max_notional_usd is None


def status() -> Status:
    return Status(
        summary={
            "intents_accepted": 3,
            "intents_rejected": {"stale": 2},
            "entries": 3,
            "exits": {"take_profit_1": 1},
            "order_rejections": {"-2019": 1},
            "open_positions": 2,
            "realized_pnl": "12.5",
            "owned_symbols": ["BTCUSDT", "ETHUSDT", "SOLUSDT"],
        },
        feeds={
            "market": FeedStatus(True, False, 0.4, 1, 100),
            "redis": FeedStatus(False, False, 0.0, 4, 250),
        },
        used_weight_1m=42,
        order_count_10s=3,
    )


def test_metrics_are_served_on_loopback() -> None:
    metrics = Metrics(status)
    port = metrics.serve(0)
    try:
        metrics.tick_to_order.observe(0.0012)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        metrics.close()
    assert 'pyquant_intents_rejected_total{reason="stale"} 2.0' in body
    assert 'pyquant_exits_total{reason="take_profit_1"} 1.0' in body
    assert 'pyquant_order_rejections_total{code="-2019"} 1.0' in body
    assert "pyquant_open_positions 2.0" in body
    assert "pyquant_realized_pnl_usdt 12.5" in body
    assert 'pyquant_feed_connected{stream="market"} 1.0' in body
    assert "pyquant_rest_used_weight_1m 42.0" in body
    assert "pyquant_tick_to_order_seconds_count 1.0" in body
    assert "pyquant_owned_symbols 3.0" in body
    assert 'pyquant_feed_connected{stream="redis"} 0.0' in body
    assert 'pyquant_feed_messages_total{stream="redis"} 250.0' in body


def test_dashboard_renders_positions_and_rejections() -> None:
    line = PositionLine(
        "1a", "BTCUSDT", "SHORT", "0.010", "30000.0", "29900.0", "30090.0", "29850.0", "active"
    )
    assert line.pnl == Decimal("1.0000")
    data = DashboardData(
        title="pyquant test",
        position_mode="hedge",
        positions=[line],
        recent=[{"kind": "rejection", "time_ms": 0, "symbol": "ETHUSDT", "reason": "cooldown"}],
        feeds={"market": FeedStatus(True, True, 12.0, 0, 5)},
        latency_ms={"p50": 1.5, "p99": 3.0},
        summary=status().summary,
    )
    out = io.StringIO()
    Console(file=out, width=160, color_system=None).print(render(data))
    text = out.getvalue()
    for expected in (
        "BTCUSDT",
        "SHORT",
        "+1.00",
        "29850.0",
        "active",
        "cooldown",
        "stale (polling)",
        "p50 1.50 ms",
        "mode hedge",
    ):
        assert expected in text, expected


def test_cli_reports_config_errors_with_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('exchange = "mainnet"\n')
    assert run_command("run", ["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "--i-understand-mainnet" in err


def test_cli_show_config_is_redacted(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYQUANT_API_KEY", "VERYSECRETKEY")
    assert run_command("run", ["--show-config", "--speed", "30", "--position-mode", "hedge"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["sim"]["speed"] == 30.0
    assert shown["sim"]["position_mode"] == "hedge"
    assert shown["credentials"]["api_key"] == "********"


def test_summary_format_lists_every_key() -> None:
    text = format_summary({"entries": 2, "exits": {"stop_loss": 1}, "intents_rejected": {}})
    assert "entries            2" in text
    assert "stop_loss: 1" in text
    assert "intents_rejected   none" in text


def test_cli_refuses_a_bad_intents_url_naming_the_parameter(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_command("run", ["--intents", "redis://127.0.0.1:6379/0?strem=x"]) == 2
    err = capsys.readouterr().err
    assert "sources.redis_url" in err
    assert "parameter 'strem' is unknown" in err
    assert run_command("run", ["--intents", "redis://127.0.0.1/0?lease_ttl_ms=50"]) == 2
    assert "lease.ttl_ms was 50: must be from 100 to 600000" in capsys.readouterr().err


def test_cli_intents_url_password_is_never_shown(capsys: pytest.CaptureFixture[str]) -> None:
    url = "redis://pyq:hunter2@127.0.0.1:6379/0?stream=s&group=g&daemon=host-a"
    assert run_command("run", ["--show-config", "--intents", url]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out
    shown = json.loads(out)
    assert shown["sources"]["redis_url"].startswith("redis://pyq:********@127.0.0.1:6379/0?")
    assert shown["sources"]["demo"] is False  # intents come from the stream
    assert run_command("run", ["--intents", "redis://:hunter2@127.0.0.1/0?strem=1"]) == 2
    assert "hunter2" not in capsys.readouterr().err


def test_the_daemon_needs_no_redis_unless_intents_come_from_it() -> None:
    # `pip install .` does not install redis-py (an extra): `pyquant run` must still start.
    script = (
        "import sys\n"
        "sys.modules['redis'] = None  # import redis -> ImportError\n"
        "import pyquant.daemon.app\n"
        "from pyquant.daemon.cli import run_command\n"
        "assert run_command('run', ['--show-config']) == 0\n"
        "sys.exit(run_command('run', ['--intents', 'redis://127.0.0.1:6379/0']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2, done.stderr
    assert "sources.redis_url" in done.stderr
    assert "pip install 'pyquant[redis]'" in done.stderr
