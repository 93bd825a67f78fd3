"""pyquant backtest --data reads freqtrade and Binance-archive files as they are on disk."""

from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path

import polars as pl
import pytest

from pyquant.backtest import KlinesError, load_data
from pyquant.backtest.cli import run_command

FIXTURES = Path(__file__).with_name("fixtures")
FREQTRADE = FIXTURES / "freqtrade" / "user_data" / "data" / "binance" / "futures"
MARKET = Path(__file__).parents[1] / "data" / "market"
DAY_MS = 86_400_000
MAY31 = 1748649600000  # 2025-05-31 00:00 UTC


def _eth_days(days: int) -> pl.DataFrame:
    eth = pl.read_parquet(MARKET / "ETHUSDT_1m_last.parquet")
    return eth.filter(
        (pl.col("open_time") >= MAY31) & (pl.col("open_time") < MAY31 + days * DAY_MS)
    )


def _same_bars(frame: pl.DataFrame, expected: pl.DataFrame) -> None:
    columns = ["open_time", "open", "high", "low", "close", "volume"]
    assert frame.select(columns).equals(expected.select(columns))


def test_freqtrade_directory_reads_futures_by_default_choice_and_names_the_clash():
    with pytest.raises(KlinesError) as err:
        load_data([FIXTURES / "freqtrade"])
    message = str(err.value)
    assert "BTCUSDT: both trade-price (last) and mark-price klines found" in message
    assert "BTC_USDT_USDT-1h-futures.feather" in message
    assert "--kind last or --kind mark" in message

    last = load_data([FIXTURES / "freqtrade"], kind="last")
    mark = load_data([FIXTURES / "freqtrade"], kind="mark")
    assert [f["symbol"][0] for f in last] == ["BTCUSDT", "ETHUSDT"]
    assert [f["symbol"][0] for f in mark] == ["BTCUSDT"]  # ETH has no mark file
    btc_last, btc_mark = last[0], mark[0]
    assert btc_last.height == btc_mark.height == 744
    assert btc_last["interval"][0] == "1h"
    assert btc_last["open_time"][0] == 1735689600000  # 2025-01-01 00:00 UTC from `date`
    # mark klines are another series (no volume), not a copy of the trade klines
    assert btc_mark["volume"].sum() == 0.0
    assert not btc_mark["close"].equals(btc_last["close"])


def test_freqtrade_parquet_json_and_jsongz_hold_the_real_bars():
    day = _eth_days(1)
    (eth_parquet,) = load_data([FIXTURES / "freqtrade-other" / "ETH_USDT_USDT-1m-futures.parquet"])
    (eth_jsongz,) = load_data([FIXTURES / "freqtrade-jsongz"])
    _same_bars(eth_parquet, day)
    _same_bars(eth_jsongz, day)
    (sol,) = load_data([FIXTURES / "freqtrade-other" / "SOL_USDT_USDT-1m-futures.json"])
    assert sol["symbol"][0] == "SOLUSDT"
    assert sol["interval"][0] == "1m"
    sol_day = pl.read_parquet(MARKET / "SOLUSDT_1m_last.parquet").filter(
        (pl.col("open_time") >= MAY31) & (pl.col("open_time") < MAY31 + DAY_MS)
    )
    _same_bars(sol, sol_day)


def test_daily_archives_with_and_without_header_ms_and_micros_join_into_one_series():
    (eth,) = load_data([FIXTURES / "binance" / "daily"])
    _same_bars(eth, _eth_days(2))  # day 1: header + ms; day 2: no header + µs
    assert eth["symbol"][0] == "ETHUSDT"
    assert eth["interval"][0] == "1m"


def test_monthly_archive_zip_and_csv_agree_and_the_same_bars_twice_are_one():
    zipped = load_data([FIXTURES / "binance" / "monthly" / "BTCUSDT-1h-2025-01.zip"])[0]
    plain = load_data([FIXTURES / "binance" / "monthly" / "BTCUSDT-1h-2025-01.csv"])[0]
    both = load_data([FIXTURES / "binance" / "monthly"])[0]
    assert zipped.height == 744
    assert zipped.equals(plain)
    assert both.equals(zipped)
    freqtrade = load_data([FREQTRADE / "BTC_USDT_USDT-1h-futures.feather"])[0]
    assert freqtrade.equals(zipped)  # the same real bars through two layouts


def _zip_csv(path: Path, text: str) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(path.with_suffix(".csv").name, text)
    return path


def test_rejected_files_name_the_file_column_row_and_what_was_expected(tmp_path):
    bad_header = _zip_csv(tmp_path / "BTCUSDT-1m-2024-01.zip", "time,o,h,l,c,v\n1,2,3,4,5,6\n")
    with pytest.raises(
        KlinesError,
        match=r"BTCUSDT-1m-2024-01.zip \[BTCUSDT-1m-2024-01.csv\]: "
        r"header row is time,o,h,l,c,v, expected the Binance klines columns",
    ):
        load_data([bad_header])

    short = _zip_csv(tmp_path / "ETHUSDT-1m-2024-02.zip", "1706745600000,1,2,0.5,1.5\n")
    with pytest.raises(KlinesError, match="5 columns, expected the 12 of Binance's klines archive"):
        load_data([short])

    rows = json.dumps([[1706745600000, 1, 2, 0.5, 1.5, 3], ["x", 1, 2, 0.5, 1.5, 3]])
    jsongz = tmp_path / "ETH_USDT_USDT-1m-futures.json.gz"
    jsongz.write_bytes(gzip.compress(rows.encode()))
    with pytest.raises(KlinesError, match=r"row 1 date 'x' is not epoch milliseconds"):
        load_data([jsongz])

    frame = pl.read_ipc(FREQTRADE / "BTC_USDT_USDT-1h-futures.feather").drop("close")
    no_close = tmp_path / "BTC_USDT_USDT-1h-futures.feather"
    frame.write_ipc(no_close)
    with pytest.raises(KlinesError, match=r"missing column 'close' for the freqtrade layout"):
        load_data([no_close])

    local = pl.read_ipc(FREQTRADE / "BTC_USDT_USDT-1h-futures.feather").with_columns(
        pl.col("date").dt.convert_time_zone("Europe/Berlin")
    )
    berlin = tmp_path / "berlin" / "BTC_USDT_USDT-1h-futures.feather"
    berlin.parent.mkdir()
    local.write_ipc(berlin)
    with pytest.raises(
        KlinesError, match=r"column 'date' is in time zone 'Europe/Berlin', expected UTC"
    ):
        load_data([berlin])

    funding = tmp_path / "BTC_USDT_USDT-8h-funding_rate.feather"
    funding.write_bytes(b"")
    with pytest.raises(KlinesError, match="funding_rate data are not price klines"):
        load_data([funding])

    unknown = tmp_path / "notes.txt.gz"
    unknown.write_bytes(b"")
    with pytest.raises(KlinesError, match="not a klines file this tool reads"):
        load_data([unknown])


def test_a_broken_bar_in_an_archive_is_named_with_its_row(tmp_path):
    lines = (FIXTURES / "binance" / "monthly" / "BTCUSDT-1h-2025-01.csv").read_text().splitlines()
    fields = lines[5].split(",")
    fields[2] = "1.0"  # high below open and close
    lines[5] = ",".join(fields)
    broken = tmp_path / "BTCUSDT-1h-2025-01.csv"
    broken.write_text("\n".join(lines) + "\n")
    with pytest.raises(KlinesError, match=r"row 4 \(1735704000000 .*\) is not a valid bar"):
        load_data([broken])


def test_two_archives_disagreeing_on_a_bar_are_refused(tmp_path):
    source = (FIXTURES / "binance" / "monthly" / "BTCUSDT-1h-2025-01.csv").read_text()
    (tmp_path / "BTCUSDT-1h-2025-01.csv").write_text(source)
    lines = source.splitlines()
    fields = lines[1].split(",")
    fields[4] = str(float(fields[4]) + 1)  # another close for the first bar
    lines[1] = ",".join(fields)
    with zipfile.ZipFile(tmp_path / "BTCUSDT-1h-2025-01.zip", "w") as archive:
        archive.writestr("BTCUSDT-1h-2025-01.csv", "\n".join(lines) + "\n")
    with pytest.raises(
        KlinesError, match=r"BTCUSDT 1h: the bar at open_time 1735689600000 differs"
    ):
        load_data([tmp_path])


def test_backtest_cli_runs_on_a_freqtrade_directory_and_archives(tmp_path, capsys):
    out = tmp_path / "ft"
    policy = tmp_path / "hourly.toml"
    policy.write_text('atr_interval = "1h"\n')  # the freqtrade fixtures are 1h bars
    argv = ["--data", str(FIXTURES / "freqtrade"), "--kind", "last", "--policy", str(policy)]
    argv += ["--out", str(out)]
    assert run_command("backtest", argv) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["summary"]) >= {"BTCUSDT", "ETHUSDT", "TOTAL"}

    out2 = tmp_path / "archives"
    argv = ["--data", str(FIXTURES / "binance" / "daily"), "--out", str(out2)]
    assert run_command("backtest", argv) == 0, capsys.readouterr().err
    assert "ETHUSDT" in json.loads((out2 / "summary.json").read_text())["summary"]

    status = run_command("backtest", ["--data", str(FIXTURES / "freqtrade"), "--out", str(out)])
    assert status == 2
    assert "--kind last or --kind mark" in capsys.readouterr().err


def test_mixed_intervals_need_a_choice(tmp_path):
    with pytest.raises(KlinesError, match=r"several intervals \(1h, 1m\).*--interval"):
        load_data([FIXTURES / "binance"])
    (eth,) = load_data([FIXTURES / "binance"], interval="1m")
    assert eth["symbol"][0] == "ETHUSDT"


def test_a_symbol_given_twice_names_both_places(tmp_path):
    eth = tmp_path / "ETHUSDT_1m_last.parquet"
    _eth_days(1).write_parquet(eth)
    with pytest.raises(KlinesError) as err:
        load_data([eth, FIXTURES / "freqtrade-jsongz"])
    assert str(err.value) == (
        f"ETHUSDT: klines given twice (in {eth} and in {FIXTURES / 'freqtrade-jsongz'}); "
        "give each symbol once"
    )
