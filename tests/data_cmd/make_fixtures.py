"""Write the klines fixtures of tests/data_cmd/fixtures from real data (see SOURCES.md there).

Run from the repository root: ``python3 tests/data_cmd/make_fixtures.py SHARED_MARKET_DIR``
(the directory holding BTCUSDT_1h_last/mark.parquet and ETHUSDT_1h_last.parquet, the shared
market set described in tests/data/market/SOURCES.md). Values are copied bit for bit;
only the layout changes.
"""

from __future__ import annotations

import gzip
import io
import json
import sys
import zipfile
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).with_name("fixtures")
MARKET = ROOT / "tests" / "data" / "market"
DAY = 86_400_000


def _slice(frame: pl.DataFrame, start: str, end: str) -> pl.DataFrame:
    lo = int(pl.Series([start]).str.to_datetime(time_zone="UTC").dt.epoch("ms")[0])
    hi = int(pl.Series([end]).str.to_datetime(time_zone="UTC").dt.epoch("ms")[0])
    return frame.filter((pl.col("open_time") >= lo) & (pl.col("open_time") < hi))


def _freqtrade_table(frame: pl.DataFrame) -> pa.Table:
    # freqtrade keeps a pandas frame: date is datetime64[ns, UTC], then float64 columns.
    dates = pa.array(frame["open_time"].to_numpy() * 1_000_000, type=pa.timestamp("ns", "UTC"))
    columns = {"date": dates}
    for name in ("open", "high", "low", "close", "volume"):
        columns[name] = pa.array(frame[name].to_numpy(), type=pa.float64())
    return pa.table(columns)


def _json_rows(frame: pl.DataFrame) -> bytes:
    # freqtrade's json/jsongz layout: rows [date_ms, open, high, low, close, volume].
    rows = [
        [t, o, h, lo, c, v]
        for t, o, h, lo, c, v in frame.select(
            "open_time", "open", "high", "low", "close", "volume"
        ).iter_rows()
    ]
    return json.dumps(rows).encode()


def _archive_csv(frame: pl.DataFrame, step_ms: int, *, header: bool, micros: bool) -> bytes:
    # Binance's twelve columns; the four we do not have (quote volume, trade count, taker
    # volumes) are written as 0, and SOURCES.md says so.
    out = io.StringIO()
    if header:
        out.write(
            "open_time,open,high,low,close,volume,close_time,quote_volume,count,"
            "taker_buy_volume,taker_buy_quote_volume,ignore\n"
        )
    scale = 1000 if micros else 1
    for t, o, h, lo, c, v in frame.select(
        "open_time", "open", "high", "low", "close", "volume"
    ).iter_rows():
        close_time = (t + step_ms) * scale - 1
        out.write(f"{t * scale},{o!r},{h!r},{lo!r},{c!r},{v!r},{close_time},0,0,0,0,0\n")
    return out.getvalue().encode()


def _zip(path: Path, member: str, data: bytes) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(member, data)


def main(shared: Path) -> None:
    btc_last = _slice(
        pl.read_parquet(shared / "BTCUSDT_1h_last.parquet"), "2025-01-01", "2025-02-01"
    )
    btc_mark = _slice(
        pl.read_parquet(shared / "BTCUSDT_1h_mark.parquet"), "2025-01-01", "2025-02-01"
    )
    eth_1h = _slice(pl.read_parquet(shared / "ETHUSDT_1h_last.parquet"), "2025-01-01", "2025-02-01")
    eth = pl.read_parquet(MARKET / "ETHUSDT_1m_last.parquet")
    eth_day1 = _slice(eth, "2025-05-31", "2025-06-01")
    eth_day2 = _slice(eth, "2025-06-01", "2025-06-02")
    sol_day = _slice(
        pl.read_parquet(MARKET / "SOLUSDT_1m_last.parquet"), "2025-05-31", "2025-06-01"
    )

    futures = OUT / "freqtrade" / "user_data" / "data" / "binance" / "futures"
    futures.mkdir(parents=True, exist_ok=True)
    feather.write_feather(
        _freqtrade_table(btc_last), futures / "BTC_USDT_USDT-1h-futures.feather", compression="lz4"
    )
    feather.write_feather(
        _freqtrade_table(btc_mark), futures / "BTC_USDT_USDT-1h-mark.feather", compression="lz4"
    )
    feather.write_feather(
        _freqtrade_table(eth_1h), futures / "ETH_USDT_USDT-1h-futures.feather", compression="lz4"
    )
    other = OUT / "freqtrade-other"
    other.mkdir(parents=True, exist_ok=True)
    pq.write_table(_freqtrade_table(eth_day1), other / "ETH_USDT_USDT-1m-futures.parquet")
    (other / "SOL_USDT_USDT-1m-futures.json").write_bytes(_json_rows(sol_day))
    gz = OUT / "freqtrade-jsongz"
    gz.mkdir(parents=True, exist_ok=True)
    (gz / "ETH_USDT_USDT-1m-futures.json.gz").write_bytes(gzip.compress(_json_rows(eth_day1)))

    daily = OUT / "binance" / "daily"
    daily.mkdir(parents=True, exist_ok=True)
    _zip(
        daily / "ETHUSDT-1m-2025-05-31.zip",
        "ETHUSDT-1m-2025-05-31.csv",
        _archive_csv(eth_day1, 60_000, header=True, micros=False),
    )
    _zip(
        daily / "ETHUSDT-1m-2025-06-01.zip",
        "ETHUSDT-1m-2025-06-01.csv",
        _archive_csv(eth_day2, 60_000, header=False, micros=True),
    )
    monthly = OUT / "binance" / "monthly"
    monthly.mkdir(parents=True, exist_ok=True)
    _zip(
        monthly / "BTCUSDT-1h-2025-01.zip",
        "BTCUSDT-1h-2025-01.csv",
        _archive_csv(btc_last, 3_600_000, header=False, micros=False),
    )
    (monthly / "BTCUSDT-1h-2025-01.csv").write_bytes(
        _archive_csv(btc_last, 3_600_000, header=True, micros=False)
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
