"""Read klines in the layouts users already have, by file name and content.

Recognised (a file, or a directory searched recursively; hidden files are skipped):

* freqtrade data files, ``user_data/data/binance/futures/BTC_USDT_USDT-1m-futures.feather``
  and ``...-1m-mark.feather`` (also ``.parquet``, ``.json``, ``.json.gz``; spot
  ``BTC_USDT-1m.feather``): a UTC ``date`` column (datetime, or epoch ms in the JSON
  layouts, which hold rows ``[date, open, high, low, close, volume]``), then
  ``open/high/low/close/volume``. The symbol is the pair without separators
  (``BTC_USDT_USDT`` is ``BTCUSDT``); ``-futures`` is trade-price klines, ``-mark`` mark-price.
* Binance public-data archives, ``BTCUSDT-1m-2024-01.zip`` (monthly) or
  ``BTCUSDT-1m-2024-01-15.zip`` (daily) and the CSV inside them: twelve columns
  (``open_time, open, high, low, close, volume, close_time, quote_volume, count,
  taker_buy_volume, taker_buy_quote_volume, ignore``), with or without the header row, open
  times in milliseconds or microseconds (newer archives of some markets use microseconds).
* our own CSV/Parquet: ``open_time`` (ms) ... ``volume``, ``symbol`` and ``interval`` columns or
  a name such as ``BTCUSDT_1m_last.parquet``.

Every file becomes canonical frames (see ``pyquant.backtest.validate_klines``); the series of
one symbol, interval and kind spread over several files (monthly archives) are joined, and
a bar given twice with different values is an error naming both files. A file that cannot be
read says which file, which column or row, and what was expected.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import polars as pl

from pyquant.errors import ConfigError

Kind = Literal["last", "mark"]

# freqtrade: BASE_QUOTE[_SETTLE]-TIMEFRAME[-CANDLETYPE].EXT
_FREQTRADE = re.compile(
    r"^(?P<base>[A-Z0-9]+)_(?P<quote>[A-Z0-9]+)(?:_(?P<settle>[A-Z0-9]+))?"
    r"-(?P<tf>\d+[smhdwM])(?:-(?P<candle>[A-Za-z_]+))?"
    r"\.(?P<ext>feather|parquet|json|json\.gz|jsongz)$"
)
# Binance public data: SYMBOL-INTERVAL-YYYY-MM[-DD].zip|csv
_ARCHIVE = re.compile(
    r"^(?P<symbol>[A-Z0-9]+)-(?P<tf>\d+[smhdw])-(?P<date>\d{4}-\d{2}(?:-\d{2})?)\.(?P<ext>zip|csv)$"
)
# ours: SYMBOL_INTERVAL[_KIND].parquet|csv
_OURS = re.compile(
    r"^(?P<symbol>[A-Z0-9]{2,30})_(?P<tf>\d+[smhdw])(?:_(?P<rest>[^.]*))?\.(?P<ext>parquet|csv)$",
    re.I,
)
_ARCHIVE_COLUMNS = (
    "open_time",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "close_time",
    "quote_volume",
    "count",
    "taker_buy_volume",
    "taker_buy_quote_volume",
    "ignore",
)
_OHLCV = ("open", "high", "low", "close", "volume")
_KNOWN_SUFFIXES = (".feather", ".parquet", ".json", ".gz", ".jsongz", ".zip", ".csv")
# An epoch time above this is in microseconds (ms reach it only in the year 5138).
_MICROS_FROM = 100_000_000_000_000
_FREQTRADE_CANDLES: dict[str, Kind | None] = {
    "futures": "last",
    "spot": "last",
    "mark": "mark",
    "index": None,
    "premiumIndex": None,
    "funding_rate": None,
}


class FormatError(ConfigError):
    """A klines file in an unknown layout, or one that breaks its layout's rules."""


@dataclass(frozen=True)
class KlinesFile:
    """One file's bars before validation.

    Attributes:
        path: the file.
        frame: ``open_time`` (Int64 ms) and ``open``...``volume``, plus ``symbol``/``interval``.
        kind: ``last``, ``mark``, or None when the layout does not say.
        layout: ``freqtrade``, ``binance-archive`` or ``pyquant``.
    """

    path: Path
    frame: pl.DataFrame
    kind: Kind | None
    layout: str


def _label(path: Path, member: str | None = None) -> str:
    return f"{path} [{member}]" if member else str(path)


def _date_to_ms(frame: pl.DataFrame, label: str) -> pl.DataFrame:
    dtype = frame.schema["date"]
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone is not None and dtype.time_zone.upper() not in (
            "UTC",
            "ETC/UTC",
            "Z",
            "+00:00",
        ):
            raise FormatError(
                f"{label}: column 'date' is in time zone {dtype.time_zone!r}, expected UTC"
            )
        return frame.with_columns(pl.col("date").dt.epoch("ms").alias("open_time")).drop("date")
    if dtype.is_integer():
        return frame.rename({"date": "open_time"})
    raise FormatError(
        f"{label}: column 'date' is {dtype}, expected a UTC datetime or epoch milliseconds"
    )


def _check_columns(frame: pl.DataFrame, needed: Sequence[str], label: str, layout: str) -> None:
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise FormatError(
            f"{label}: missing column {missing[0]!r} for the {layout} layout (expected "
            f"{', '.join(needed)}; found {', '.join(frame.columns) or 'no columns'})"
        )


def _read_freqtrade(path: Path, match: re.Match[str]) -> KlinesFile:
    ext = match.group("ext")
    label = str(path)
    candle = match.group("candle") or "spot"
    if candle not in _FREQTRADE_CANDLES:
        raise FormatError(
            f"{label}: freqtrade candle type {candle!r} unknown; expected one of "
            f"{', '.join(_FREQTRADE_CANDLES)}"
        )
    kind = _FREQTRADE_CANDLES[candle]
    if kind is None:
        raise FormatError(
            f"{label}: freqtrade {candle} data are not price klines to backtest on; use the "
            "-futures (trade price) or -mark (mark price) files"
        )
    try:
        if ext == "feather":
            frame = pl.read_ipc(path)
        elif ext == "parquet":
            frame = pl.read_parquet(path)
        else:
            raw = path.read_bytes()
            if ext != "json" or raw[:2] == b"\x1f\x8b":
                raw = gzip.decompress(raw)
            rows = json.loads(raw)
            frame = _json_rows(rows, label)
    except FormatError:
        raise
    except (OSError, ValueError, EOFError, pl.exceptions.PolarsError) as exc:
        raise FormatError(f"{label}: cannot be read as freqtrade {ext}: {exc}") from exc
    _check_columns(frame, ("date", *_OHLCV), label, "freqtrade")
    frame = _date_to_ms(frame.select("date", *_OHLCV), label)
    symbol = match.group("base") + match.group("quote")
    if match.group("tf").endswith("M"):
        raise FormatError(f"{label}: interval 1M (a calendar month) has no fixed length")
    return KlinesFile(path, _tag(frame, symbol, match.group("tf")), kind, "freqtrade")


def _json_rows(rows: object, label: str) -> pl.DataFrame:
    if not isinstance(rows, list):
        raise FormatError(
            f"{label}: expected a JSON array of [date, open, high, low, close, volume]"
        )
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) < 6:
            raise FormatError(
                f"{label}: row {i} is {str(row)[:80]}, expected [date, open, high, low, close, "
                "volume] with date in epoch ms"
            )
        if not isinstance(row[0], int) or isinstance(row[0], bool):
            raise FormatError(f"{label}: row {i} date {row[0]!r} is not epoch milliseconds")
    try:
        return pl.DataFrame(
            {
                "date": pl.Series([int(r[0]) for r in rows], dtype=pl.Int64),
                **{
                    name: pl.Series([float(r[j + 1]) for r in rows], dtype=pl.Float64)
                    for j, name in enumerate(_OHLCV)
                },
            }
        )
    except (TypeError, ValueError) as exc:
        raise FormatError(f"{label}: a price or volume is not a number: {exc}") from None


def _archive_csv(data: bytes, label: str) -> pl.DataFrame:
    first = data.split(b"\n", 1)[0].strip()
    has_header = bool(first) and not first[:1].isdigit()
    if has_header:
        header = [h.strip() for h in first.decode("utf-8", "replace").split(",")]
        if header[: len(_OHLCV) + 1] != ["open_time", *_OHLCV]:
            raise FormatError(
                f"{label}: header row is {','.join(header)[:120]}, expected the Binance klines "
                f"columns {','.join(_ARCHIVE_COLUMNS)}"
            )
    try:
        frame = pl.read_csv(
            io.BytesIO(data),
            has_header=has_header,
            infer_schema_length=10_000,
        )
    except pl.exceptions.PolarsError as exc:
        raise FormatError(f"{label}: cannot be read as Binance klines CSV: {exc}") from exc
    if not has_header:
        if frame.width != len(_ARCHIVE_COLUMNS):
            raise FormatError(
                f"{label}: {frame.width} columns, expected the {len(_ARCHIVE_COLUMNS)} of "
                "Binance's klines archive"
            )
        frame.columns = list(_ARCHIVE_COLUMNS)
    _check_columns(frame, ("open_time", *_OHLCV), label, "Binance archive")
    if not frame.schema["open_time"].is_integer():
        row = 0
        raise FormatError(
            f"{label}: column 'open_time' is {frame.schema['open_time']} (row {row}: "
            f"{frame['open_time'][row]!r}), expected epoch milliseconds or microseconds"
        )
    return frame.select(
        pl.when(pl.col("open_time") >= _MICROS_FROM)
        .then(pl.col("open_time") // 1000)
        .otherwise(pl.col("open_time"))
        .alias("open_time"),
        *_OHLCV,
    )


def _read_archive(path: Path, match: re.Match[str]) -> KlinesFile:
    label = str(path)
    try:
        if match.group("ext") == "zip":
            with zipfile.ZipFile(path) as archive:
                members = [n for n in archive.namelist() if n.lower().endswith(".csv")]
                if len(members) != 1:
                    raise FormatError(
                        f"{label}: holds {len(members)} CSV files "
                        f"({', '.join(members) or 'none'}), expected the one klines CSV of a "
                        "Binance archive"
                    )
                data = archive.read(members[0])
                label = _label(path, members[0])
        else:
            data = path.read_bytes()
    except (OSError, zipfile.BadZipFile) as exc:
        raise FormatError(f"{label}: cannot be read as a Binance archive: {exc}") from exc
    frame = _archive_csv(data, label)
    return KlinesFile(
        path, _tag(frame, match.group("symbol"), match.group("tf")), None, "binance-archive"
    )


def _read_ours(path: Path, match: re.Match[str] | None) -> KlinesFile:
    label = str(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            frame = pl.read_parquet(path)
        else:
            data = path.read_bytes()
            first = data.split(b"\n", 1)[0].strip()
            if first[:1].isdigit():  # a header-less CSV is Binance's archive layout
                frame = _archive_csv(data, label)
            else:
                frame = pl.read_csv(io.BytesIO(data), infer_schema_length=10_000)
    except FileNotFoundError:
        raise FormatError(f"{label}: no such file") from None
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise FormatError(f"{label}: cannot be read as {suffix[1:]}: {exc}") from exc
    if "open_time" not in frame.columns and "date" in frame.columns:
        frame = _date_to_ms(frame, label)
    elif "open_time" in frame.columns and frame.schema["open_time"].is_integer():
        frame = frame.with_columns(
            pl.when(pl.col("open_time") >= _MICROS_FROM)
            .then(pl.col("open_time") // 1000)
            .otherwise(pl.col("open_time"))
            .alias("open_time")
        )
    rest = (match.group("rest") or "") if match else ""
    kind: Kind | None = "mark" if rest == "mark" else "last" if rest == "last" else None
    symbol = match.group("symbol").upper() if match else None
    interval = match.group("tf") if match else None
    for name, value in (("symbol", symbol), ("interval", interval)):
        if name not in frame.columns:
            if value is None:
                raise FormatError(
                    f"{label}: no {name!r} column and none in the file name (expected a name "
                    "such as BTCUSDT_1m_last.parquet, BTC_USDT_USDT-1m-futures.feather or "
                    "BTCUSDT-1m-2024-01.zip)"
                )
            frame = frame.with_columns(pl.lit(value).alias(name))
        elif name == "interval" and value is not None:
            found = frame["interval"].unique().drop_nulls().to_list()
            if len(found) == 1 and str(found[0]) != value:
                raise FormatError(
                    f"{label}: column 'interval' says {found[0]!r} but the file name says {value!r}"
                )
    return KlinesFile(path, frame, kind, "pyquant")


def _tag(frame: pl.DataFrame, symbol: str, interval: str) -> pl.DataFrame:
    return frame.with_columns(pl.lit(symbol).alias("symbol"), pl.lit(interval).alias("interval"))


def layout_of(path: Path) -> str:
    """Name the layout a file's name says: ``freqtrade``, ``binance-archive`` or ``pyquant``.

    A ``.csv`` whose first line is a bar rather than a header is Binance's archive layout.
    """
    if _FREQTRADE.match(path.name):
        return "freqtrade"
    if _ARCHIVE.match(path.name):
        return "binance-archive"
    if path.suffix.lower() == ".csv":
        try:
            with path.open("rb") as handle:
                if handle.readline().strip()[:1].isdigit():
                    return "binance-archive"
        except OSError:
            pass
    return "pyquant"


def read_file(path: Path) -> KlinesFile:
    """Read one klines file in any recognised layout (not yet validated).

    Raises:
        FormatError: unknown layout, unreadable, or a column/row breaks the layout.
    """
    if not path.exists():
        raise FormatError(f"{path}: no such file or directory")
    name = path.name
    if (m := _FREQTRADE.match(name)) is not None:
        return _read_freqtrade(path, m)
    if (m := _ARCHIVE.match(name)) is not None:
        return _read_archive(path, m)
    if path.suffix.lower() in (".parquet", ".csv"):
        return _read_ours(path, _OURS.match(name))
    raise FormatError(
        f"{path}: not a klines file this tool reads; expected freqtrade "
        "(BTC_USDT_USDT-1m-futures.feather|parquet|json|json.gz), a Binance archive "
        "(BTCUSDT-1m-2024-01.zip or .csv) or .parquet/.csv with open_time, open, high, low, "
        "close, volume"
    )


def candidate_files(path: Path) -> list[Path]:
    """The klines files under ``path`` (itself when it is a file), hidden ones skipped."""
    if not path.is_dir():
        return [path]
    found = []
    for item in sorted(path.rglob("*")):
        relative = item.relative_to(path).parts
        hidden = any(p.startswith(".") for p in relative)
        if item.is_file() and not hidden and item.name.lower().endswith(_KNOWN_SUFFIXES):
            found.append(item)
    return found


def read_paths(
    paths: Iterable[str | Path], *, kind: Kind | None = None, interval: str | None = None
) -> list[pl.DataFrame]:
    """Read files and directories into one frame per symbol (not yet validated).

    Args:
        paths: files or directories.
        kind: keep only files of this kind (files whose layout does not say are kept).
        interval: keep only this interval (directories holding several).

    Returns:
        Frames with ``open_time`` ms, ``open``...``volume``, ``symbol`` and ``interval``,
        sorted by symbol; the files of one series joined in time order.

    Raises:
        FormatError: a file cannot be read; a directory holds no klines; one symbol has two
            kinds or intervals left after the filters; a bar is given twice with different
            values.
    """
    files: list[KlinesFile] = []
    for raw in paths:
        path = Path(raw)
        candidates = candidate_files(path)
        if path.is_dir() and not candidates:
            raise FormatError(f"{path}: directory holds no klines files")
        for file in candidates:
            files.append(read_file(file))
    by_series: dict[tuple[str, str, Kind | None], list[tuple[Path, pl.DataFrame]]] = {}
    for f in files:
        if kind is not None and f.kind is not None and f.kind != kind:
            continue
        for sym, part in _split_symbols(f.frame):
            tf = str(part["interval"][0]) if part.height else ""
            if interval is not None and tf != interval:
                continue
            by_series.setdefault((sym, tf, f.kind), []).append((f.path, part))
    if not by_series:
        wanted = " and ".join(
            x
            for x in (f"kind {kind}" if kind else "", f"interval {interval}" if interval else "")
            if x
        )
        raise FormatError(
            f"no klines {('of ' + wanted + ' ') if wanted else ''}in {', '.join(map(str, paths))}"
        )
    per_symbol: dict[str, list[tuple[str, Kind | None]]] = {}
    for sym, tf, k in by_series:
        per_symbol.setdefault(sym, []).append((tf, k))
    for sym, series in sorted(per_symbol.items()):
        if len(series) > 1:
            names = sorted({str(p) for s in series for p, _ in by_series[(sym, *s)]})
            intervals = sorted({tf for tf, _ in series})
            if len(intervals) > 1:
                raise FormatError(
                    f"{sym}: klines at {', '.join(intervals)} found ({', '.join(names)}); "
                    "choose one with --interval"
                )
            raise FormatError(
                f"{sym}: both trade-price (last) and mark-price klines found "
                f"({', '.join(names)}); choose one with --kind last or --kind mark"
            )
    return [
        _join(sym, *series[0], by_series[(sym, *series[0])])
        for sym, series in sorted(per_symbol.items())
    ]


def _split_symbols(frame: pl.DataFrame) -> list[tuple[str, pl.DataFrame]]:
    if frame.height == 0:
        return [(str(frame["symbol"][0]) if frame.height else "", frame)]
    if frame["symbol"].n_unique() == 1:
        return [(str(frame["symbol"][0]), frame)]
    return [(str(key[0]), part) for key, part in frame.group_by("symbol", maintain_order=True)]


def _join(
    symbol: str, interval: str, kind: Kind | None, parts: list[tuple[Path, pl.DataFrame]]
) -> pl.DataFrame:
    if len(parts) == 1:
        return parts[0][1]
    columns = ["open_time", *_OHLCV, "symbol", "interval"]
    frames = [
        p.select(
            pl.col("open_time").cast(pl.Int64),
            *(pl.col(c).cast(pl.Float64) for c in _OHLCV),
            pl.col("symbol").cast(pl.String),
            pl.col("interval").cast(pl.String),
            pl.lit(str(path)).alias("_file"),
        )
        for path, p in parts
    ]
    joined = pl.concat(frames).sort("open_time", "_file")
    twice = joined.filter(pl.col("open_time").is_duplicated())
    if twice.height:
        distinct = twice.unique(subset=columns, keep="first")
        clash = distinct.filter(pl.col("open_time").is_duplicated())
        if clash.height:
            t = int(clash["open_time"][0])
            files = clash.filter(pl.col("open_time") == t)["_file"].to_list()
            raise FormatError(
                f"{symbol} {interval}: the bar at open_time {t} differs between "
                f"{' and '.join(files)}"
            )
    return joined.unique(subset=["open_time"], keep="first", maintain_order=True).drop("_file")
