"""pyquant data download against the simulator: paging, 429s, dropped connections, resume."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from aiohttp import web

from pyquant import sim
from pyquant.backtest import load_data
from pyquant.data.download import KlinesDownloader, RetryPolicy
from pyquant.data.layout import Manifest, manifest_path, series_path
from pyquant.exchange.client import BinanceClient

MARKET = Path(__file__).parents[1] / "data" / "market"
ROOT = Path(__file__).parents[2]
MINUTE = 60_000
DAY = 86_400_000
SIM_START = 1_780_000_020_000 - 1_780_000_020_000 % MINUTE  # a frozen exchange clock


@pytest.fixture(scope="module")
def two_days(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pl.DataFrame]:
    """Two real days of ETHUSDT 1m bars, the data the simulator serves."""
    eth = pl.read_parquet(MARKET / "ETHUSDT_1m_last.parquet")
    start = 1748649600000  # 2025-05-31
    part = eth.filter((pl.col("open_time") >= start) & (pl.col("open_time") < start + 2 * DAY))
    path = tmp_path_factory.mktemp("sim") / "ETHUSDT_1m_last.parquet"
    part.write_parquet(path)
    return path, part


def _served(source: pl.DataFrame, venue: sim.Venue) -> pl.DataFrame:
    """The bars the venue serves before its clock: the source shifted to the served time."""
    shift = venue.replay.shift
    return (
        source.with_columns(pl.col("open_time") + shift)
        .filter(pl.col("open_time") + MINUTE <= venue.clock.now_ms())
        .select("open_time", "open", "high", "low", "close", "volume")
    )


def _bars(path: Path) -> pl.DataFrame:
    return pl.read_parquet(path).select("open_time", "open", "high", "low", "close", "volume")


async def _download(venue: sim.Venue, out: Path, start: int, end: int, **kw: Any) -> Any:
    async with BinanceClient(venue.rest_url, "", "", timeout_s=5.0) as client:
        loader = KlinesDownloader(
            client, out, retry=RetryPolicy(base_s=0.01, cap_s=0.05), page_limit=100, **kw
        )
        await loader.exchange_info()
        return await loader.download(
            "ETHUSDT", "1m", "last", start, end, now_ms=venue.clock.now_ms()
        )


def test_pages_through_429s_and_dropped_connections_to_every_real_bar(two_days, tmp_path):
    data, source = two_days

    async def scenario() -> None:
        faults = {"reject_429_rate": 0.15, "drop_rate": 0.2}
        async with sim.serve(data=[data], speed=0, start_ms=SIM_START, faults=faults) as venue:
            expected = _served(source, venue)
            start = int(expected["open_time"][0]) - 3 * DAY  # before the venue's first bar
            result = await _download(venue, tmp_path, start, venue.clock.now_ms())
            kinds = {f["fault"] for f in venue.faults.injected}
            assert {"429", "drop"} <= kinds  # both faults really happened on this run
            assert result.error is None
            # every fault cost a request; aiohttp itself resends a GET whose reused
            # connection was dropped, the rest are this downloader's retries
            assert result.retries >= 1
            assert result.requests > result.fetched // 100
            got = _bars(result.path)
            assert got.equals(expected)  # every bar, once, with the venue's values
            assert expected.height > 1000  # more than ten pages of 100
            assert result.gaps == []  # nothing missing; bars before listing are not a gap
            (frame,) = load_data([tmp_path])  # the layout backtest --data DIR reads
            assert frame["symbol"][0] == "ETHUSDT"
            assert frame.height == expected.height

    asyncio.run(scenario())


def test_resume_asks_only_for_missing_bars_and_never_duplicates(two_days, tmp_path):
    data, source = two_days

    async def scenario() -> None:
        async with sim.serve(data=[data], speed=0, start_ms=SIM_START) as venue:
            expected = _served(source, venue)
            first = int(expected["open_time"][0])
            now = venue.clock.now_ms()
            middle = first + 600 * MINUTE
            head = await _download(venue, tmp_path, middle, middle + 300 * MINUTE)
            assert head.fetched == 300
            # wider on both sides: only the 600 bars before and the rest after are fetched
            full = await _download(venue, tmp_path, first, now)
            assert full.fetched == expected.height - 300
            assert _bars(full.path).equals(expected)
            again = await _download(venue, tmp_path, first, now)
            assert again.fetched == 0
            assert again.requests == 0
            manifest = Manifest.read(manifest_path(tmp_path, "ETHUSDT", "1m", "last"))
            assert manifest is not None
            assert manifest.covered == [(first, now - MINUTE + 1)]

    asyncio.run(scenario())


# ----------------------------------------------------------------------- venue gaps


async def _gappy_venue(bars: list[list[Any]], used_weight: str = "10") -> web.AppRunner:
    """A klines endpoint whose data has a hole, as a venue's own outage leaves one."""

    async def klines(request: web.Request) -> web.Response:
        q = request.query
        lo, hi, limit = int(q["startTime"]), int(q["endTime"]), int(q["limit"])
        rows = [b for b in bars if lo <= b[0] <= hi][:limit]
        return web.json_response(rows, headers={"X-MBX-USED-WEIGHT-1M": used_weight})

    app = web.Application()
    app.router.add_get("/fapi/v1/klines", klines)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


def test_gaps_of_the_venue_are_recorded_not_filled(two_days, tmp_path):
    _, source = two_days
    rows = [
        [t, str(o), str(h), str(lo), str(c), str(v), t + MINUTE - 1]
        for t, o, h, lo, c, v in source.head(500)
        .select("open_time", "open", "high", "low", "close", "volume")
        .iter_rows()
    ]
    hole = rows[200:230]
    bars = rows[:200] + rows[230:]
    first, last = rows[0][0], rows[-1][0]

    async def scenario() -> None:
        runner = await _gappy_venue(bars)
        port = runner.addresses[0][1]
        try:
            async with BinanceClient(f"http://127.0.0.1:{port}", "", "") as client:
                loader = KlinesDownloader(client, tmp_path, page_limit=100)
                result = await loader.download(
                    "ETHUSDT", "1m", "last", first, last + MINUTE, now_ms=last + 10 * MINUTE
                )
        finally:
            await runner.cleanup()
        assert result.gaps == [(hole[0][0], rows[230][0])]
        assert result.bars == 470
        got = pl.read_parquet(result.path)["open_time"].to_list()
        assert hole[0][0] not in got
        assert got == sorted(set(got))
        manifest = json.loads(manifest_path(tmp_path, "ETHUSDT", "1m", "last").read_text())
        assert manifest["gaps"] == [[hole[0][0], rows[230][0]]]

    async def before_listing() -> None:
        # a span before the venue's first bar: nothing to write, and not asked twice
        runner = await _gappy_venue(bars)
        port = runner.addresses[0][1]
        out = tmp_path / "early"
        try:
            async with BinanceClient(f"http://127.0.0.1:{port}", "", "") as client:
                loader = KlinesDownloader(client, out, page_limit=100)
                early = (first - 10 * DAY, first - 9 * DAY)
                once = await loader.download("ETHUSDT", "1m", "last", *early, now_ms=last)
                twice = await loader.download("ETHUSDT", "1m", "last", *early, now_ms=last)
        finally:
            await runner.cleanup()
        assert once.bars == 0
        assert once.requests == 1
        assert twice.requests == 0
        assert not series_path(out, "ETHUSDT", "1m", "last").exists()
        assert manifest_path(out, "ETHUSDT", "1m", "last").exists()

    asyncio.run(scenario())
    asyncio.run(before_listing())


def test_pages_wait_for_the_next_minute_when_the_used_weight_nears_the_limit(
    two_days, tmp_path, caplog
):
    _, source = two_days
    rows = [
        [t, str(o), str(h), str(lo), str(c), str(v), t + MINUTE - 1]
        for t, o, h, lo, c, v in source.head(300)
        .select("open_time", "open", "high", "low", "close", "volume")
        .iter_rows()
    ]
    caplog.set_level(logging.WARNING, logger="pyquant.exchange.client")

    async def scenario() -> None:
        # every answer says 2300 of the 2400 weight a minute are used
        runner = await _gappy_venue(rows, used_weight="2300")
        port = runner.addresses[0][1]
        # the wall clock the client plans with: 0.1 s before a minute ends (short waits)
        minute_end = lambda: 59.9  # noqa: E731
        try:
            async with BinanceClient(
                f"http://127.0.0.1:{port}", "", "", clock=minute_end
            ) as client:
                loader = KlinesDownloader(client, tmp_path, page_limit=100)
                result = await loader.download(
                    "ETHUSDT",
                    "1m",
                    "last",
                    rows[0][0],
                    rows[-1][0] + MINUTE,
                    now_ms=rows[-1][0] + 10 * MINUTE,
                )
        finally:
            await runner.cleanup()
        assert result.bars == 300
        assert client.rate_limits.headers_seen == result.requests

    asyncio.run(scenario())
    deferred = [r for r in caplog.records if "Deferring non-essential call" in r.getMessage()]
    # page 1 reads the header; pages 2 and 3 each wait for the next minute first
    assert len(deferred) == 2
    assert "used_weight=2300 limit=2400" in deferred[0].getMessage()


# ----------------------------------------------------------------------- restart


class _SimThread:
    """The simulator on its own event loop in a thread, so a download can run as a process."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.venue: sim.Venue | None = None
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with sim.serve(
            data=[self.data], speed=0, start_ms=SIM_START, faults={"delay_ms": 400}
        ) as venue:
            self.venue = venue
            self.ready.set()
            await self._stop.wait()

    def set_faults(self, **switches: object) -> None:
        assert self.venue is not None
        done = threading.Event()

        def apply() -> None:
            assert self.venue is not None
            self.venue.set_faults(**switches)
            done.set()

        self.loop.call_soon_threadsafe(apply)
        assert done.wait(30)

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)


@pytest.fixture
def sim_thread(two_days) -> Iterator[_SimThread]:
    runner = _SimThread(two_days[0])
    runner.thread.start()
    assert runner.ready.wait(60)
    yield runner
    runner.stop()


def _wait_for(check: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_killed_mid_download_the_next_run_completes_without_duplicates(
    two_days, sim_thread, tmp_path
):
    _, source = two_days
    venue = sim_thread.venue
    assert venue is not None
    expected = _served(source, venue)
    config = tmp_path / "venue.toml"
    config.write_text(
        f'exchange = "custom"\n[venue]\nrest_url = "{venue.rest_url}"\n'
        f'ws_url = "{venue.ws_url}/market"\n'
    )
    out = tmp_path / "data"
    start = int(expected["open_time"][0])
    end = venue.clock.now_ms()
    argv = [sys.executable, "-m", "pyquant", "data", "download", "--symbols", "ETHUSDT"]
    argv += ["--start", _iso(start), "--end", _iso(end), "--page-size", "50"]
    argv += ["--out", str(out), "--config", str(config)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    meta = manifest_path(out, "ETHUSDT", "1m", "last")
    first = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(meta.exists)  # the first checkpoint is on disk
        sim_thread.set_faults(stall_ms=5_000, stall_rate=1.0)  # no page comes before the kill
        time.sleep(0.5)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    partial = _bars(series_path(out, "ETHUSDT", "1m", "last"))
    assert 0 < partial.height < expected.height  # killed in the middle
    assert partial.equals(expected.head(partial.height))

    sim_thread.set_faults()  # healthy again
    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    final = _bars(series_path(out, "ETHUSDT", "1m", "last"))
    assert final.equals(expected)
    assert final["open_time"].is_unique().all()


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000))


def test_exchange_info_is_saved_and_backtest_names_the_command(tmp_path, capsys):
    from pyquant.data.cli import run_command

    out = tmp_path / "info.json.gz"
    assert run_command("data", ["exchange-info", "--out", str(out)]) == 0
    import gzip

    doc = json.loads(gzip.decompress(out.read_bytes()))
    assert {s["symbol"] for s in doc["symbols"]} >= {"BTCUSDT", "ETHUSDT"}
    assert doc["rateLimits"]


def test_bad_arguments_are_named(capsys):
    from pyquant.data.cli import run_command

    assert run_command("data", ["download", "--symbols", "NOPEUSDT", "--days", "1"]) == 2
    assert "--symbols: NOPEUSDT not listed by the venue's exchange info" in capsys.readouterr().err
    assert run_command("data", ["download", "--symbols", "BTCUSDT", "--start", "May 1"]) == 2
    assert "--start 'May 1': not a date" in capsys.readouterr().err
    argv = ["download", "--symbols", "BTCUSDT", "--start", "2024-02-01", "--end", "2024-01-01"]
    assert run_command("data", argv) == 2
    assert "is not before --end" in capsys.readouterr().err


def test_all_trading_from_the_built_in_simulator_mark_klines(tmp_path, capsys):
    from pyquant.data.cli import run_command

    out = tmp_path / "data"
    argv = ["download", "--all-trading", "--interval", "1h", "--days", "1", "--kind", "mark"]
    assert run_command("data", [*argv, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    files = sorted(p.name for p in out.glob("*.parquet"))
    # the bundled simulator serves these six perpetuals, all TRADING
    symbols = ["BNBUSDT", "BTCUSDT", "DOGEUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT"]
    assert files == [f"{s}_1h_mark.parquet" for s in symbols]
    for symbol in symbols:
        assert symbol in table
        frame = pl.read_parquet(out / f"{symbol}_1h_mark.parquet")
        assert frame["volume"].sum() == 0.0  # mark-price klines carry no volume
        assert frame["open_time"].diff().drop_nulls().unique().to_list() == [3_600_000]
    frames = load_data([out])
    assert [f["symbol"][0] for f in frames] == symbols
