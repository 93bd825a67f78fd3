"""Backtest: historical klines through the same Rust exit state machine as the daemon.

polars in, one coarse call into ``pyquant._core`` per chunk of work, polars out. Python
loads and validates the bars, builds the entries (an intents file or the demo rule
``momentum24h``) and turns the columnar result into DataFrames, metrics, files and charts;
every exit decision is taken by ``exit::position`` in the Rust core, the very code the daemon
runs on live mark prices.

Fill model (what the simulated fills assume; see ``rust_core/src/backtest.rs`` for the code):

* Entries are MARKET orders at the open of the first bar whose ``open_time`` is at or after the
  entry time (for ``momentum24h``: the bar after the signal bar). The size is the notional
  (``size_usd`` of the intent, else the configured default) divided by that open, floored to
  the MARKET_LOT_SIZE step; too small for minQty or MIN_NOTIONAL means the entry is skipped.
* Each bar is replayed as a mark-price path: open, then the two extremes, then close. Which
  extreme comes first is the intrabar rule: ``stop_first`` (default, the conservative one:
  the low first for a long, the high first for a short) or ``target_first``. Finer bars,
  when given, replace that guess by their own path (still open, extremes, close per fine bar).
* An exit fills at its trigger price (the stop, or the take-profit level, both already on the
  tick grid) when the path crossed it continuously; when the mark jumped over it (the bar opens
  beyond the trigger after the previous close), it fills at that open, the worse price for a
  stop and the better one for a target. A crossing carries the time of the path point the
  move started from. A time stop fills at the mark where it fired. Each action is confirmed
  at once with its full quantity (no partial fills, no rejections), and the same mark is
  looked at again, as the daemon's next update at that price would (a confirmed take-profit
  can move the stop past it).
* The daemon on the simulator takes the same decisions on the same marks (reasons, exact
  quantities, prices): ``tests/backtest/test_consistency.py`` replays real bars both ways.
* ATR is Wilder's over closed bars only; the bar being replayed never sees its own range.
* Fees: entries pay the taker fee (the maker fee with ``entry_liquidity="maker"``, a limit order
  assumed filled at the open), every exit pays the taker fee (exits are MARKET orders).
  Fees are rounded to 8 decimals, the precision of Binance's USDT commission.
* Gaps are never bridged: a step of more than ``max_gap_bars`` missing bars ends a segment;
  positions still open are closed at the last close before the gap (reason ``data_gap``), ATR
  restarts after it, and entries falling inside it are skipped. Positions still open at the
  end of the data close at the last close (reason ``end_of_data``).
* Liquidation is not modelled. With ``max_margin_loss`` the stop sits inside the liquidation
  price by construction (it caps the stop distance per leverage); without it a wide stop at a
  high leverage may lie past it, and the result says so in ``warnings`` (the command prints
  them) rather than trusting fills the exchange would never give.
"""

from __future__ import annotations

import functools
import gzip
import itertools
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl

from pyquant import _core
from pyquant.errors import ConfigError, UnknownSymbolError
from pyquant.trading.intents import IntentError, parse_intent

if TYPE_CHECKING:
    from pyquant._core import ExchangeRules, ExitPolicy

__all__ = [
    "BUNDLED_EXCHANGE_INFO",
    "BacktestConfig",
    "BacktestResult",
    "KlinesError",
    "check_symbols",
    "exit_decisions_for_path",
    "liquidation_warnings",
    "load_data",
    "load_exchange_rules",
    "load_intents",
    "load_klines",
    "momentum24h",
    "parse_grid",
    "run_backtest",
    "run_grid",
    "summarize",
    "validate_klines",
]

Intrabar = Literal["stop_first", "target_first"]
ProgressCallback = Callable[[int, int], None]

KLINE_COLUMNS: tuple[str, ...] = ("open_time", "open", "high", "low", "close", "volume")
_PRICE_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close")
_INTERVAL_UNITS_MS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_INTERVAL = re.compile(r"^(\d+)([smhdw])$")
# SYMBOL_INTERVAL[_anything].parquet|csv, as the files in tests/data/market are named.
_FILE_NAME = re.compile(r"^([A-Z0-9]{2,30})_(\d+[smhdw])(?:_[^.]*)?\.(?:parquet|csv)$", re.I)
_DAY_MS = 86_400_000
# The real exchangeInfo snapshot the simulator ships with (its SOURCES.md says where it is
# from): the default filters of a backtest, so no network and no extra file are needed.
BUNDLED_EXCHANGE_INFO = (
    Path(__file__).parent.parent / "sim" / "data" / "exchangeInfo_fapi_2025-11-26.json.gz"
)
# Decimal(38, 12) holds every price, quantity, fee (rounded to 8 dp) and PnL exactly.
EXACT = pl.Decimal(38, 12)


class KlinesError(ConfigError):
    """A klines file or frame cannot be backtested: names the file, column, row and rule."""


def interval_ms(interval: str) -> int:
    """Return the length of a Binance kline interval (``1m``, ``4h``, ``1d`` ...) in ms.

    Raises:
        KlinesError: the interval is not of the form ``<count><unit>`` with unit s/m/h/d/w.
    """
    match = _INTERVAL.match(interval)
    if match is None or int(match.group(1)) <= 0:
        raise KlinesError(f"interval {interval!r} is not a kline interval such as 1m, 5m, 1h or 1d")
    return int(match.group(1)) * _INTERVAL_UNITS_MS[match.group(2)]


# ---------------------------------------------------------------------------------------------
# Loading and validation


def load_exchange_rules(
    path: str | os.PathLike[str] | None = None,
) -> tuple[ExchangeRules, str]:
    """Load the exchange rules (ticks, steps, min notional) a backtest quantizes with.

    Args:
        path: a futures exchangeInfo JSON document, plain or gzipped (``.json.gz``); None
            loads the snapshot bundled with the simulator (``BUNDLED_EXCHANGE_INFO``).

    Returns:
        The rules and a label for messages (the file, or the bundled snapshot's name).

    Raises:
        ConfigError: the file cannot be read or decompressed.
        InputError: the document is not a valid exchangeInfo (the core names the field).
    """
    if path is None:
        return _bundled_rules(), f"the bundled {BUNDLED_EXCHANGE_INFO.name}"
    file = Path(path)
    label = str(file)
    try:
        raw = file.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise ConfigError(f"exchange info {label}: cannot be read: {exc}") from exc
    return _core.ExchangeRules.from_exchange_info(raw), label


@functools.cache
def _bundled_rules() -> ExchangeRules:
    # Read once per process: a grid or a notebook calls the backtest many times.
    return _core.ExchangeRules.from_exchange_info(
        gzip.decompress(BUNDLED_EXCHANGE_INFO.read_bytes())
    )


def _rules_for(rules: ExchangeRules | None, symbols: Sequence[str]) -> ExchangeRules:
    if rules is None:
        rules, label = load_exchange_rules()
    else:
        label = "the rules given"
    check_symbols(rules, symbols, source=label)
    return rules


def check_symbols(rules: ExchangeRules, symbols: Iterable[str], *, source: str) -> None:
    """Fail early, naming every symbol of the data that ``rules`` does not list.

    Args:
        rules: the exchange rules.
        symbols: the symbols the backtest needs.
        source: where the rules come from, for the message.

    Raises:
        UnknownSymbolError: one or more symbols are not in the rules.
    """
    missing = sorted({s for s in symbols if s not in rules})
    if missing:
        raise UnknownSymbolError(
            f"{'symbols' if len(missing) > 1 else 'symbol'} {', '.join(missing)} not in the "
            f"exchange info ({source}, {len(rules)} symbols): give exchange info that lists "
            f"{'them' if len(missing) > 1 else 'it'} (save the venue's current one with "
            "pyquant data exchange-info --out FILE, then pyquant backtest --exchange-info FILE)"
        )


def _fmt_time(ms: int) -> str:
    stamp = np.datetime64(int(ms), "ms").astype("datetime64[s]")
    return f"{ms} ({str(stamp).replace('T', ' ')} UTC)"


def validate_klines(frame: pl.DataFrame, *, source: str = "<frame>") -> pl.DataFrame:
    """Check one symbol's klines and return them in the canonical schema.

    The canonical schema is ``open_time`` (Int64, ms), ``open``/``high``/``low``/``close``/
    ``volume`` (Float64), ``symbol`` and ``interval`` (String), one symbol and interval per
    frame, strictly increasing ``open_time`` with every step a whole number of intervals.
    Gaps (steps of more than one interval) are kept as they are.

    Args:
        frame: the klines, with ``symbol`` and ``interval`` columns.
        source: what to call the data in error messages (usually the file name).

    Returns:
        The validated frame in the canonical schema and column order.

    Raises:
        KlinesError: a column is missing or of the wrong type, a value is not a valid price,
            or ``open_time`` is unsorted, duplicated or off the interval grid.
    """
    missing = [name for name in (*KLINE_COLUMNS, "symbol", "interval") if name not in frame.columns]
    if missing:
        raise KlinesError(
            f"{source}: missing column {missing[0]!r} (klines need {', '.join(KLINE_COLUMNS)}; "
            f"found {', '.join(frame.columns) or 'no columns'})"
        )
    if frame.height == 0:
        raise KlinesError(f"{source}: no rows")
    time_dtype = frame.schema["open_time"]
    if time_dtype.is_temporal():
        frame = frame.with_columns(pl.col("open_time").dt.epoch("ms"))
    elif not time_dtype.is_integer():
        raise KlinesError(
            f"{source}: column 'open_time' is {time_dtype}, expected integer milliseconds "
            "since the epoch"
        )
    for name in (*_PRICE_COLUMNS, "volume"):
        if not frame.schema[name].is_numeric():
            raise KlinesError(
                f"{source}: column {name!r} is {frame.schema[name]}, expected a number"
            )
    frame = frame.select(
        pl.col("open_time").cast(pl.Int64),
        *(pl.col(name).cast(pl.Float64) for name in (*_PRICE_COLUMNS, "volume")),
        pl.col("symbol").cast(pl.String),
        pl.col("interval").cast(pl.String),
    )
    for name in ("symbol", "interval"):
        values = frame[name].unique().to_list()
        if len(values) != 1 or values[0] is None:
            raise KlinesError(
                f"{source}: column {name!r} must hold one value per file, "
                f"found {sorted(map(str, values))}"
            )
    symbol = str(frame["symbol"][0])
    step_ms = interval_ms(str(frame["interval"][0]))

    for name in ("open_time", *_PRICE_COLUMNS, "volume"):
        nulls = frame[name].null_count()
        if nulls:
            row = int(frame[name].is_null().arg_max() or 0)
            raise KlinesError(
                f"{source}: column {name!r} is empty at row {row} ({nulls} empty values)"
            )
    times = frame["open_time"].to_numpy()
    steps = np.diff(times)
    if steps.size:
        bad = np.flatnonzero(steps <= 0)
        if bad.size:
            row = int(bad[0]) + 1
            if steps[bad[0]] == 0:
                raise KlinesError(
                    f"{source}: duplicated open_time {_fmt_time(int(times[row]))} at rows "
                    f"{row - 1} and {row} ({symbol})"
                )
            raise KlinesError(
                f"{source}: open_time is not sorted ascending: row {row} has "
                f"{_fmt_time(int(times[row]))} after {_fmt_time(int(times[row - 1]))} ({symbol}); "
                "sort the file by open_time"
            )
        off_grid = np.flatnonzero(steps % step_ms)
        if off_grid.size:
            row = int(off_grid[0]) + 1
            raise KlinesError(
                f"{source}: open_time {_fmt_time(int(times[row]))} at row {row} is "
                f"{int(steps[off_grid[0]])} ms after the previous bar, not a whole number of "
                f"{frame['interval'][0]} intervals ({step_ms} ms)"
            )
    prices = frame.select(_PRICE_COLUMNS).to_numpy()
    finite = np.isfinite(prices).all(axis=1) & (prices > 0).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise KlinesError(
            f"{source}: row {row} ({_fmt_time(int(times[row]))}) has a price that is not a "
            "positive finite number: "
            f"{dict(zip(_PRICE_COLUMNS, prices[row].tolist(), strict=True))}"
        )
    open_, high, low, close = prices.T
    inside = (high >= np.maximum(open_, close)) & (low <= np.minimum(open_, close))
    if not inside.all():
        row = int(np.flatnonzero(~inside)[0])
        raise KlinesError(
            f"{source}: row {row} ({_fmt_time(int(times[row]))}) is not a valid bar: high must be "
            f">= open and close and low <= open and close, found "
            f"{dict(zip(_PRICE_COLUMNS, prices[row].tolist(), strict=True))}"
        )
    return frame


def _read_table(path: Path) -> pl.DataFrame:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pl.read_parquet(path)
        if suffix == ".csv":
            return pl.read_csv(path, infer_schema_length=10_000)
    except FileNotFoundError:
        raise KlinesError(f"{path}: no such file") from None
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise KlinesError(f"{path}: cannot be read as {suffix[1:]}: {exc}") from exc
    raise KlinesError(f"{path}: unknown klines format {suffix!r}; use .parquet or .csv")


def load_klines(
    path: str | os.PathLike[str], *, symbol: str | None = None, interval: str | None = None
) -> list[pl.DataFrame]:
    """Load and validate a Parquet or CSV klines file, one frame per symbol in it.

    ``symbol`` and ``interval`` come from the file's columns, else from the arguments, else
    from the file name (``BTCUSDT_1m_last.parquet`` is BTCUSDT at 1m). When both a column and
    the name say something, they must agree.

    Args:
        path: a ``.parquet`` or ``.csv`` file with ``open_time`` (ms), ``open``, ``high``, ``low``,
            ``close`` and ``volume``.
        symbol: the symbol when the file has no ``symbol`` column.
        interval: the interval when the file has no ``interval`` column.

    Returns:
        The validated frames (see ``validate_klines``), sorted by symbol.

    Raises:
        KlinesError: the file cannot be read, or fails validation.
    """
    file = Path(path)
    frame = _read_table(file)
    match = _FILE_NAME.match(file.name)
    named = {
        "symbol": symbol or (match.group(1).upper() if match else None),
        "interval": interval or (match.group(2) if match else None),
    }
    for name, value in named.items():
        if name in frame.columns:
            found = frame[name].unique().drop_nulls().to_list()
            if (
                value is not None
                and len(found) == 1
                and str(found[0]) != value
                and name == "interval"
            ):
                raise KlinesError(
                    f"{file}: column 'interval' says {found[0]!r} but the file name or argument "
                    f"says {value!r}"
                )
            continue
        if value is None:
            raise KlinesError(
                f"{file}: no {name!r} column and none in the file name (expected a name such as "
                f"BTCUSDT_1m_last.parquet)"
            )
        frame = frame.with_columns(pl.lit(value).alias(name))
    if frame.height and frame["symbol"].n_unique() > 1:
        return [
            validate_klines(part, source=f"{file} [{key[0]}]")
            for key, part in sorted(
                frame.group_by("symbol", maintain_order=True), key=lambda kv: str(kv[0][0])
            )
        ]
    return [validate_klines(frame, source=str(file))]


def load_data(
    paths: Sequence[str | os.PathLike[str]],
    *,
    kind: Literal["last", "mark"] | None = None,
    interval: str | None = None,
) -> list[pl.DataFrame]:
    """Load klines from files and directories in any layout ``pyquant.data.formats`` reads.

    Our own ``SYMBOL_INTERVAL_KIND.parquet|csv`` files go through :func:`load_klines`;
    directories, freqtrade files (``BTC_USDT_USDT-1m-futures.feather`` ...) and Binance
    archives (``BTCUSDT-1m-2024-01.zip`` ...) through ``pyquant.data.formats``, where the
    files of one series (monthly archives) are joined.

    Args:
        paths: files or directories.
        kind: in directories and freqtrade files, keep only ``last`` or ``mark`` klines.
        interval: keep only this interval (a directory holding several).

    Returns:
        One validated frame per symbol, sorted by symbol.

    Raises:
        KlinesError: a file cannot be read or fails validation, or a symbol comes twice.
    """
    from pyquant.data import formats

    plain: list[Path] = []
    other: list[Path] = []
    for raw in paths:
        path = Path(raw)
        simple = (
            path.is_file()
            and path.suffix.lower() in (".parquet", ".csv")
            and formats.layout_of(path) == "pyquant"
        )
        (plain if simple else other).append(path)
    frames: list[tuple[pl.DataFrame, str]] = []
    for path in plain:
        for frame in load_klines(path):
            if interval is None or frame["interval"][0] == interval:
                frames.append((frame, str(path)))
    if other:
        try:
            raw_frames = formats.read_paths(other, kind=kind, interval=interval)
        except formats.FormatError as exc:
            raise KlinesError(str(exc)) from None
        files = ", ".join(str(p) for p in other)
        for frame in raw_frames:
            symbol = str(frame["symbol"][0]) if frame.height else "?"
            frames.append((validate_klines(frame, source=f"{files} [{symbol}]"), files))
    where: dict[str, str] = {}
    for frame, source in frames:
        symbol = str(frame["symbol"][0])
        if symbol in where:
            raise KlinesError(
                f"{symbol}: klines given twice (in {where[symbol]} and in {source}); "
                "give each symbol once"
            )
        where[symbol] = source
    intervals = sorted({str(frame["interval"][0]) for frame, _ in frames})
    if len(intervals) > 1:
        raise KlinesError(
            f"klines at several intervals ({', '.join(intervals)}); a backtest replays one: "
            "choose it with --interval"
        )
    return sorted((frame for frame, _ in frames), key=lambda f: str(f["symbol"][0]))


def load_intents(path: str | os.PathLike[str]) -> pl.DataFrame:
    """Read entry intents from a JSONL file, one JSON object per line.

    Each line is an intent as ``pyquant.trading.intents.parse_intent`` reads it (``symbol``,
    ``side`` BUY/SELL or LONG/SHORT, ``confidence``, optional ``size_usd`` and ``leverage``);
    its time is ``time`` (ms or s), ``created_at_ms`` or ``timestamp``. ``id`` is optional here
    (``line-N`` when absent). Blank lines and lines starting with ``#`` are skipped.

    Lines in the plain shape a program writes (only the fields above, numbers as JSON
    numbers, no size, no escapes) are decoded and checked as whole columns in polars; any
    other line, and any line those checks refuse, goes through ``parse_intent`` one by one,
    in file order, so every result and every error is the one ``parse_intent`` gives.

    Returns:
        Columns ``intent_id``, ``time_ms``, ``symbol``, ``side`` (BUY/SELL), ``confidence``,
        ``size_usd`` (String, null for the default) and ``leverage`` (Int64, null for the
        default), sorted by time.

    Raises:
        KlinesError: the file cannot be read, a line is not JSON or the intent is invalid
            (the message names the line, the field and the rule).
    """
    file = Path(path)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise KlinesError(f"{file}: cannot read intents: {exc}") from exc
    text = data.decode("utf-8")
    if _other_line_breaks(data):
        # Line breaks beyond \n and \r\n (str.splitlines knows more): number lines its way.
        rows = [_intent_row(file, n, line) for n, line in enumerate(text.splitlines(), 1)]
        return _intent_frame([r for r in rows if r is not None])
    if not text or text.isspace():
        return _intent_frame([])
    whole = pl.Series("text", [text])
    pieces = pl.Series("text", _pieces(text, 16))  # checked in parallel, whole lines each
    if pieces.str.contains(_PLAIN_FILE).all() and not pieces.str.contains(_KEY_TWICE).any():
        # Every line is plain (the usual file a program writes): one read of the buffer.
        fields = pl.read_ndjson(data, schema=_PLAIN_SCHEMA).with_row_index("row")
        lines: pl.Series | None = None
    else:
        lines = whole.str.split("\n").explode().str.strip_suffix("\r")
        if text.endswith("\n"):
            lines = lines.head(-1)  # the empty piece after the final newline is not a line
        plain = (
            lines.to_frame("line")
            .with_row_index("row")
            .filter(pl.col("line").str.contains(_PLAIN_LINE))
            .filter(~pl.col("line").str.contains(_KEY_TWICE))
        )
        decoded = pl.col("line").str.json_decode(pl.Struct(_PLAIN_SCHEMA)).struct.unnest()
        fields = plain.select("row", decoded)
    parsed = _plain_intents(fields)
    # Every line the columns did not settle, in file order: the first error is the file's.
    total = fields.height if lines is None else lines.len()
    settled = np.zeros(total, dtype=bool)
    settled[parsed["row"].to_numpy()] = True
    rest = np.flatnonzero(~settled)
    others = []
    if rest.size:
        if lines is None:
            lines = whole.str.split("\n").explode().str.strip_suffix("\r")
        for row, line in zip(rest.tolist(), lines.gather(rest).to_list(), strict=True):
            intent = _intent_row(file, row + 1, line)
            if intent is not None:
                others.append({"row": row, **intent})
    frame = parsed.select(pl.col("row").cast(pl.Int64), *_INTENT_SCHEMA)
    if others:
        frame = pl.concat(
            [frame, pl.DataFrame(others, schema={"row": pl.Int64, **_INTENT_SCHEMA})]
        ).sort("row")
    return frame.drop("row").sort("time_ms", maintain_order=True)


def _pieces(text: str, count: int) -> list[str]:
    # About ``count`` pieces of ``text``, each ending at a newline (the last one at the end).
    pieces = []
    start, size = 0, max(len(text) // count, 1)
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def _other_line_breaks(data: bytes) -> bool:
    # Whether str.splitlines would break a line where splitting at \n (and dropping the \r
    # of \r\n) does not. Single bytes are found with memchr; the multi-byte breaks can
    # only be in a file that is not ASCII.
    if any(mark in data for mark in (b"\x0b", b"\x0c", b"\x1c", b"\x1d", b"\x1e")):
        return True
    if b"\r" in data and data.count(b"\r") != data.count(b"\r\n"):
        return True
    return not data.isascii() and any(
        mark.encode() in data for mark in ("\x85", "\u2028", "\u2029")
    )


# The plain shape: an object of the known fields only, strings of printable ASCII without
# quotes or escapes, numbers without a sign, null only where it means "not given".
_PLAIN_STRING = r'"[ !#-\[\]-~]*"'
# (bounded: polars refuses a number beyond a double's range, json.loads reads it as inf)
_PLAIN_NUMBER = r"(?:0|[1-9][0-9]{0,29})(?:\.[0-9]{1,30})?(?:[eE][+-]?[0-9]{1,2})?"
_PLAIN_PAIR = (
    rf'"(?:id|symbol|side|source)"[ \t]*:[ \t]*{_PLAIN_STRING}'
    rf'|"intent_id"[ \t]*:[ \t]*(?:{_PLAIN_STRING}|{_PLAIN_NUMBER})'
    rf'|"(?:created_at_ms)"[ \t]*:[ \t]*{_PLAIN_NUMBER}'
    rf'|"(?:confidence|time|timestamp|ts|leverage)"[ \t]*:[ \t]*(?:{_PLAIN_NUMBER}|null)'
    rf'|"(?:size_usd|position_size_usd|notional_usd)"[ \t]*:[ \t]*null'
)
_PLAIN_OBJECT = (
    rf"[ \t]*\{{[ \t]*(?:{_PLAIN_PAIR})(?:[ \t]*,[ \t]*(?:{_PLAIN_PAIR}))*[ \t]*\}}[ \t]*"
)
_PLAIN_LINE = rf"^{_PLAIN_OBJECT}$"
# The whole file, every line plain (the last one with or without its newline).
_PLAIN_FILE = rf"\A(?:{_PLAIN_OBJECT}\r?\n)*(?:{_PLAIN_OBJECT})?\z"
_KNOWN_KEYS = (
    "id",
    "intent_id",
    "symbol",
    "side",
    "source",
    "created_at_ms",
    "confidence",
    "time",
    "timestamp",
    "ts",
    "leverage",
    "size_usd",
    "position_size_usd",
    "notional_usd",
)
# A key twice on one line ("." stops at the line's end): json.loads keeps the last value,
# polars the first, so such a line goes through parse_intent.
_KEY_TWICE = "|".join(rf'"{key}"[ \t]*:.*"{key}"[ \t]*:' for key in _KNOWN_KEYS)
_PLAIN_SCHEMA: dict[str, Any] = dict.fromkeys(
    ("id", "symbol", "side", "confidence", "time", "created_at_ms", "timestamp", "leverage"),
    pl.String,
)


def _plain_intents(fields: pl.DataFrame) -> pl.DataFrame:
    """Check the decoded plain lines as columns; return the intents of those that pass.

    ``fields`` holds the 0-based ``row`` and the fields of ``_PLAIN_SCHEMA`` as text. The
    rules are parse_intent's, for the values the plain shape allows (the same correctly
    rounded float of each number's text, the same patterns and ranges).
    """
    from pyquant.trading.intents import MAX_TIME_MS

    # The numbers are still their text: each is read by one correctly rounded cast, as
    # json.loads and float(Decimal) read it.
    stamp = pl.coalesce("created_at_ms", "time", "timestamp").cast(pl.Float64)
    created = (
        pl.when(stamp < 1e11).then(stamp * 1000.0).otherwise(stamp).cast(pl.Int64, strict=False)
    )
    confidence = pl.col("confidence").cast(pl.Float64).fill_null(0.5)
    leverage = pl.col("leverage").cast(pl.Float64)
    symbol = pl.col("symbol").str.to_uppercase()
    side = pl.col("side").str.to_uppercase()
    intent_id = pl.col("id")
    if fields["id"].null_count():  # absent: line-N, numbered from 1
        intent_id = pl.coalesce("id", pl.format("line-{}", pl.col("row") + 1))
    parsed = fields.select(
        pl.col("row").cast(pl.Int64),
        intent_id.alias("intent_id"),
        created.alias("time_ms"),
        symbol.alias("symbol"),
        pl.when(side.is_in(["BUY", "LONG"]))
        .then(pl.lit("BUY"))
        .otherwise(pl.lit("SELL"))
        .alias("side"),
        confidence.alias("confidence"),
        pl.lit(None, dtype=pl.String).alias("size_usd"),
        leverage.cast(pl.Int64, strict=False).alias("leverage"),
        (
            intent_id.str.contains(r"^[A-Za-z0-9._:\-]{1,64}$")
            & symbol.str.contains(r"^[A-Z0-9]{2,30}$")
            & side.is_in(["BUY", "LONG", "SELL", "SHORT"])
            & confidence.is_between(0.0, 1.0)
            & (stamp > 0)
            & (stamp <= MAX_TIME_MS)
            & (created > 0)
            & (leverage.is_null() | ((leverage == leverage.floor()) & leverage.is_between(1, 125)))
        ).alias("valid"),
    )
    return parsed.filter(pl.col("valid").fill_null(value=False)).drop("valid")


def _intent_row(file: Path, number: int, line: str) -> dict[str, Any] | None:
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise KlinesError(f"{file}:{number}: not a JSON object: {exc.msg}") from exc
    if not isinstance(payload, dict):
        raise KlinesError(f"{file}:{number}: not a JSON object")
    payload.setdefault("id", f"line-{number}")
    if "time" in payload and "created_at_ms" not in payload:
        payload["created_at_ms"] = payload.pop("time")
    if payload.get("created_at_ms") is None and payload.get("timestamp") is None:
        raise KlinesError(f"{file}:{number}: intent field 'time' is required in a backtest")
    try:
        intent = parse_intent(payload, source="backtest", now_ms=0)
    except IntentError as exc:
        raise KlinesError(f"{file}:{number}: {exc}") from exc
    return {
        "intent_id": intent.intent_id,
        "time_ms": intent.created_at_ms,
        "symbol": intent.symbol,
        "side": intent.side,
        "confidence": intent.confidence,
        "size_usd": None if intent.size_usd is None else str(intent.size_usd),
        "leverage": intent.leverage,
    }


def _intent_frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=_INTENT_SCHEMA).sort("time_ms", maintain_order=True)


_INTENT_SCHEMA: dict[str, Any] = {
    "intent_id": pl.String,
    "time_ms": pl.Int64,
    "symbol": pl.String,
    "side": pl.String,
    "confidence": pl.Float64,
    "size_usd": pl.String,
    "leverage": pl.Int64,
}


def momentum24h(klines: pl.DataFrame, *, threshold: float = 0.01) -> pl.DataFrame:
    """Return the demo strategy's entries: follow a 24 h move beyond ``threshold``.

    At the close of each bar, the change is ``close / close 24 h earlier - 1`` (only where the
    bar exactly 24 h earlier exists; gaps give no signal). Beyond ``+threshold`` it buys,
    beyond ``-threshold`` it sells, with confidence ``0.5 + |change|`` capped at 0.8. The entry
    time is the bar's close, so the backtest enters at the next bar's open. The backtest holds
    one position per symbol at a time for this rule, so signals while one is open are dropped.

    Args:
        klines: one symbol's validated klines.
        threshold: the absolute 24 h change that triggers an entry (0.01 = 1 %).

    Returns:
        Intents in the schema of ``load_intents``.
    """
    step = interval_ms(str(klines["interval"][0]))
    base = klines.select("open_time", "close", "symbol")
    earlier = base.select(
        (pl.col("open_time") + _DAY_MS).alias("open_time"), pl.col("close").alias("close_24h")
    )
    change = (pl.col("close") / pl.col("close_24h") - 1.0).alias("change")
    signals = (
        base.join(earlier, on="open_time", how="inner")
        .with_columns(change)
        .filter(pl.col("change").abs() > threshold)
    )
    return signals.select(
        pl.format("momentum24h-{}-{}", pl.col("symbol"), pl.col("open_time")).alias("intent_id"),
        (pl.col("open_time") + step).alias("time_ms"),
        pl.col("symbol"),
        pl.when(pl.col("change") > 0).then(pl.lit("BUY")).otherwise(pl.lit("SELL")).alias("side"),
        (0.5 + pl.col("change").abs()).clip(upper_bound=0.8).alias("confidence"),
        pl.lit(None, dtype=pl.String).alias("size_usd"),
        pl.lit(None, dtype=pl.Int64).alias("leverage"),
    )


# ---------------------------------------------------------------------------------------------
# Running


@dataclass(frozen=True, slots=True)
class BacktestConfig:
    """How trades are sized, filled and charged (the policy decides the exits).

    Attributes:
        maker_fee: fee rate of a maker fill (0.0002 = 0.02 %).
        taker_fee: fee rate of a taker fill; every exit is a MARKET order and pays it.
        entry_liquidity: ``taker`` (MARKET entry at the open) or ``maker`` (a limit entry at
            the open, assumed filled).
        notional_usd: default size of an entry in USDT (an intent's ``size_usd`` overrides it).
        leverage: default leverage (an intent's ``leverage`` overrides it); it enters the
            margin-loss cap of the initial stop.
        intrabar: which extreme of a bar the path visits first when no finer data resolves it.
        max_gap_bars: missing bars tolerated inside a segment; a longer gap ends the segment.
        one_position_per_symbol: at most one open position per symbol (else one per symbol
            and side, like the daemon's guard).
    """

    maker_fee: Decimal = Decimal("0.0002")
    taker_fee: Decimal = Decimal("0.0005")
    entry_liquidity: Literal["taker", "maker"] = "taker"
    notional_usd: Decimal = Decimal(1000)
    leverage: int = 10
    intrabar: Intrabar = "stop_first"
    max_gap_bars: int = 0
    one_position_per_symbol: bool = False

    def __post_init__(self) -> None:
        for name in ("maker_fee", "taker_fee", "notional_usd"):
            # Accept what a caller naturally types (1000, "0.0004", 0.0004: a float by its
            # shortest repr, as the core reads floats) and keep it as an exact Decimal.
            value = getattr(self, name)
            if isinstance(value, int | float | str) and not isinstance(value, bool):
                try:
                    object.__setattr__(self, name, Decimal(str(value).strip()))
                except ArithmeticError:
                    raise ConfigError(
                        f"backtest {name} was {value!r}: must be a decimal number"
                    ) from None
            elif not isinstance(value, Decimal):
                raise ConfigError(f"backtest {name} was {value!r}: must be a decimal number")
        for name in ("maker_fee", "taker_fee"):
            value = getattr(self, name)
            if not value.is_finite() or not 0 <= value < 1:
                raise ConfigError(f"backtest {name} was {value!r}: must be a rate in [0, 1)")
        if self.entry_liquidity not in ("taker", "maker"):
            raise ConfigError(
                f"backtest entry_liquidity was {self.entry_liquidity!r}: must be taker or maker"
            )
        if not self.notional_usd.is_finite() or self.notional_usd <= 0:
            raise ConfigError(
                f"backtest notional_usd was {self.notional_usd}: must be a positive USDT amount"
            )
        if not 1 <= self.leverage <= 125:
            raise ConfigError(f"backtest leverage was {self.leverage}: must be from 1 to 125")
        if self.intrabar not in ("stop_first", "target_first"):
            raise ConfigError(
                f"backtest intrabar was {self.intrabar!r}: must be stop_first or target_first"
            )
        if self.max_gap_bars < 0:
            raise ConfigError(f"backtest max_gap_bars was {self.max_gap_bars}: must be >= 0")


@dataclass(slots=True)
class BacktestResult:
    """What one backtest run produced.

    Attributes:
        fills: one row per fill (the entry and each exit) with exact ``price``, ``quantity``,
            ``fee`` and ``pnl`` (Decimal), its ``reason`` and the move in ``r``.
        trades: one row per position: side, entry, size, initial risk, net PnL, R multiple,
            the reason of its last exit.
        summary: metrics per symbol and a ``TOTAL`` row (see ``summarize``).
        stops: the stop after each bar while a position was open (for charts).
        levels: each position's take-profit level prices (for charts).
        skipped: entries that were not taken, with the reason.
        evaluations: bar x position evaluations performed by the core.
        policies: the policies run, in ``policy`` index order.
        warnings: what makes the result less trustworthy (see ``liquidation_warnings``).
    """

    fills: pl.DataFrame
    trades: pl.DataFrame
    summary: pl.DataFrame
    stops: pl.DataFrame
    levels: pl.DataFrame
    skipped: pl.DataFrame
    evaluations: int
    policies: list[ExitPolicy] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Series:
    symbol: str
    interval_ms: int
    arrays: dict[str, Any]


def _contiguous(series: pl.Series, dtype: type[np.generic]) -> np.ndarray[Any, Any]:
    return np.ascontiguousarray(series.to_numpy(), dtype=dtype)


def _entries_by_symbol(entries: pl.DataFrame) -> dict[str, pl.DataFrame]:
    # One pass over the entries for every symbol (not one filter per symbol), each part in
    # time order (ties keep the file's order), with only the columns the core reads.
    if entries.is_empty():
        return {}
    needed = entries.select(_CORE_ENTRY_COLUMNS)
    symbols = needed["symbol"].unique()
    if len(symbols) == 1:
        parts = {str(symbols[0]): needed}
    else:
        parts = {
            str(key[0]): part
            for key, part in needed.partition_by(
                "symbol", as_dict=True, maintain_order=True
            ).items()
        }
    # A stable sort of each part: what a stable sort of the whole, then the split, gives.
    return {
        symbol: part if part["time_ms"].is_sorted() else part.sort("time_ms", maintain_order=True)
        for symbol, part in parts.items()
    }


_CORE_ENTRY_COLUMNS = ("time_ms", "symbol", "side", "confidence", "size_usd", "leverage")


def _series_inputs(
    frames: Sequence[pl.DataFrame],
    symbols: Sequence[str],
    intents: pl.DataFrame,
    fine: Mapping[str, pl.DataFrame] | None,
) -> list[_Series]:
    by_symbol = _entries_by_symbol(intents)
    empty = intents.clear()
    return [
        _prepare_series(k, by_symbol.get(s, empty), (fine or {}).get(s), split=True)
        for k, s in zip(frames, symbols, strict=True)
    ]


def _prepare_series(
    klines: pl.DataFrame,
    entries: pl.DataFrame,
    fine: pl.DataFrame | None,
    *,
    split: bool = False,
) -> _Series:
    # ``split``: the entries are this symbol's alone, in time order (``_entries_by_symbol``).
    symbol = str(klines["symbol"][0])
    step = interval_ms(str(klines["interval"][0]))
    mine = entries
    if not split:
        mine = mine.filter(pl.col("symbol") == symbol).sort("time_ms", maintain_order=True)
    notional = mine["size_usd"]
    buy = (mine["side"] == "BUY").fill_null(value=False).to_numpy()
    arrays: dict[str, Any] = {
        "symbol": symbol,
        "interval_ms": step,
        "open_time": _contiguous(klines["open_time"], np.int64),
        "open": _contiguous(klines["open"], np.float64),
        "high": _contiguous(klines["high"], np.float64),
        "low": _contiguous(klines["low"], np.float64),
        "close": _contiguous(klines["close"], np.float64),
        "entry_time": _contiguous(mine["time_ms"], np.int64),
        "entry_side": np.where(buy, 1, -1).astype(np.int8),
        "entry_confidence": _contiguous(mine["confidence"].fill_null(float("nan")), np.float64),
        # The core reads None as "the configured default" with one pointer compare; only
        # intents that give their own size cost a Python string each.
        "entry_notional": (
            [None] * mine.height
            if notional.null_count() == mine.height
            else notional.cast(pl.String).to_list()
        ),
        "entry_leverage": _contiguous(mine["leverage"].fill_null(0), np.int64),
    }
    if fine is not None:
        fine_step = interval_ms(str(fine["interval"][0]))
        if fine_step >= step or step % fine_step:
            raise KlinesError(
                f"finer data for {symbol} is {fine['interval'][0]}, which does not divide the "
                f"{klines['interval'][0]} bars it should resolve"
            )
        arrays.update(
            fine_interval_ms=fine_step,
            fine_open_time=_contiguous(fine["open_time"], np.int64),
            fine_open=_contiguous(fine["open"], np.float64),
            fine_high=_contiguous(fine["high"], np.float64),
            fine_low=_contiguous(fine["low"], np.float64),
            fine_close=_contiguous(fine["close"], np.float64),
        )
    return _Series(symbol, step, arrays)


def _entries_for(
    klines: Sequence[pl.DataFrame], entries: pl.DataFrame | None, strategy: str | None
) -> tuple[pl.DataFrame, bool]:
    if entries is not None and strategy is not None:
        raise ConfigError("give entries or a strategy, not both")
    if entries is not None:
        missing = [
            n for n in ("time_ms", "symbol", "side", "confidence") if n not in entries.columns
        ]
        if missing:
            raise ConfigError(f"entries are missing column {missing[0]!r}")
        for name, dtype in _INTENT_SCHEMA.items():
            if name not in entries.columns:
                entries = entries.with_columns(pl.lit(None, dtype=dtype).alias(name))
        return entries.select(pl.col(n).cast(t) for n, t in _INTENT_SCHEMA.items()), False
    name = strategy or "momentum24h"
    if name != "momentum24h":
        raise ConfigError(f"strategy {name!r} is unknown; the built-in one is momentum24h")
    frames = [momentum24h(k) for k in klines]
    return pl.concat(frames) if frames else pl.DataFrame(schema=_INTENT_SCHEMA), True


def _core_options(config: BacktestConfig, one_per_symbol: bool, detail: bool) -> dict[str, Any]:
    return {
        "maker_fee": str(config.maker_fee),
        "taker_fee": str(config.taker_fee),
        "entry_liquidity": config.entry_liquidity,
        "notional": str(config.notional_usd),
        "leverage": config.leverage,
        "intrabar": config.intrabar,
        "max_gap_bars": config.max_gap_bars,
        "one_position_per_symbol": one_per_symbol or config.one_position_per_symbol,
        "detail": detail,
    }


def _chunks(n_series: int, n_policies: int, target: int = 10) -> list[tuple[range, range]]:
    # The core is parallel inside each call; chunks only exist so a progress bar can move,
    # so each chunk still holds enough jobs to keep every core busy, and there are few of
    # them: every call converts its series' bars again.
    workers = max(os.cpu_count() or 1, 1)
    if n_policies > 1:
        size = max(math.ceil(n_policies / target), math.ceil(2 * workers / max(n_series, 1)), 1)
        return [
            (range(n_series), range(i, min(i + size, n_policies)))
            for i in range(0, n_policies, size)
        ]
    size = max(math.ceil(n_series / target), 2 * workers)
    return [
        (range(i, min(i + size, n_series)), range(n_policies)) for i in range(0, n_series, size)
    ]


_FILL_COLUMNS = ("series", "policy", "trade", "sequence", "kind", "reason", "time_ms", "side")


def _call_core(
    series: Sequence[_Series],
    policies: Sequence[ExitPolicy],
    rules: ExchangeRules,
    options: Mapping[str, Any],
    progress: ProgressCallback | None,
) -> list[dict[str, Any]]:
    outputs: list[dict[str, Any]] = []
    chunks = _chunks(len(series), len(policies))
    done = 0
    total = len(series) * len(policies)
    for series_range, policy_range in chunks:
        raw = _core.backtest_run(
            [series[i].arrays for i in series_range],
            [policies[j] for j in policy_range],
            rules,
            **options,
        )
        outputs.append({"raw": raw, "series0": series_range.start, "policy0": policy_range.start})
        done += len(series_range) * len(policy_range)
        if progress is not None:
            progress(done, total)
    return outputs


def _frame(outputs: list[dict[str, Any]], table: str, symbols: Sequence[str]) -> pl.DataFrame:
    frames = []
    for out in outputs:
        frame = pl.DataFrame(out["raw"][table])
        if not frame.columns:
            continue
        frame = frame.with_columns(
            (pl.col("series").cast(pl.UInt32) + out["series0"]).alias("series"),
            (pl.col("policy").cast(pl.UInt32) + out["policy0"]).alias("policy"),
        )
        frames.append(frame)
    if not frames:
        return pl.DataFrame()
    frame = pl.concat(frames, how="vertical_relaxed")
    # Looked up inside polars: no Python string per row.
    names = pl.Series("symbol", list(symbols), dtype=pl.String)
    return frame.with_columns(names.gather(frame["series"]).alias("symbol"))


def _decode_reasons(frame: pl.DataFrame, names: Sequence[str]) -> pl.DataFrame:
    if frame.is_empty() or "reason_code" not in frame.columns:
        return frame
    labels = pl.Series("reason", list(names), dtype=pl.String)
    return frame.with_columns(labels.gather(frame["reason_code"]).alias("reason")).drop(
        "reason_code"
    )


def _tables(
    outputs: list[dict[str, Any]], symbols: Sequence[str]
) -> tuple[dict[str, pl.DataFrame], int]:
    names: list[str] = list(outputs[0]["raw"]["reason_names"]) if outputs else []
    tables = {}
    for table in ("fills", "trades", "stops", "levels", "skipped"):
        tables[table] = _decode_reasons(_frame(outputs, table, symbols), names)
    fills = tables["fills"]
    if not fills.is_empty():
        tables["fills"] = fills.with_columns(
            pl.when(pl.col("reason") == "entry")
            .then(pl.lit("entry"))
            .otherwise(pl.lit("exit"))
            .alias("kind")
        )
    evaluations = sum(int(out["raw"]["evaluations"]) for out in outputs)
    return tables, evaluations


_FILL_ORDER = (
    "symbol",
    "trade",
    "sequence",
    "kind",
    "reason",
    "time",
    "side",
    "price",
    "quantity",
    "fee",
    "pnl",
    "r",
    "trigger_price",
    "mark_price",
    "time_ms",
    "series",
    "policy",
)
_TRADE_ORDER = (
    "symbol",
    "trade",
    "side",
    "entry_time",
    "exit_time",
    "entry_price",
    "quantity",
    "initial_stop",
    "risk_price",
    "risk_usd",
    "pnl",
    "fees",
    "r_multiple",
    "reason",
    "bars_held",
    "confidence",
    "entry_time_ms",
    "exit_time_ms",
    "series",
    "policy",
)


def _arrange(frame: pl.DataFrame, order: Sequence[str], times: Mapping[str, str]) -> pl.DataFrame:
    if frame.is_empty():
        return frame
    frame = frame.with_columns(
        pl.col(src).cast(pl.Datetime("ms", "UTC")).alias(dst) for dst, src in times.items()
    )
    return frame.select([c for c in order if c in frame.columns])


def _exact(frame: pl.DataFrame) -> pl.DataFrame:
    # The core returns exact decimal strings next to the float columns; the files keep the
    # exact ones (Decimal) under the plain names and drop the float copies.
    exact = [c for c in frame.columns if c.endswith("_exact")]
    if not exact:
        return frame
    return (
        frame.drop(
            [c.removesuffix("_exact") for c in exact if c.removesuffix("_exact") in frame.columns]
        )
        .with_columns(pl.col(c).cast(EXACT).alias(c.removesuffix("_exact")) for c in exact)
        .drop(exact)
    )


# A float column of the core holds, for each exact decimal, its nearest double. A mantissa
# below 2^49 at the column's decimals is then the only decimal that rounds to that double
# (neighbours 10^-D apart are more than an ulp apart), so it is recovered exactly.
_MAX_MANTISSA = float(2**49)
_EXACT_SCALE = 12
_FEE_DECIMALS = 8
# Which grid fixes each exact column's decimals ("fee" columns are rounded to 8 decimals;
# "pnl" columns are price x quantity differences less fees).
_FILL_GRID = {"price": "price", "quantity": "qty", "fee": "fee", "pnl": "pnl"}
_TRADE_GRID = {
    "entry_price": "price",
    "quantity": "qty",
    "initial_stop": "price",
    "risk_price": "price",
    "pnl": "pnl",
    "fees": "fee",
}


def _grid_decimals(rules: ExchangeRules, symbols: Sequence[str]) -> dict[str, np.ndarray[Any, Any]]:
    """Return, per series, the decimals of each kind of exact column."""

    def places(text: str) -> int:
        return len(text.partition(".")[2])

    price = np.array([places(rules.quantize_price(s, "1", "nearest")) for s in symbols])
    qty = np.array([places(rules.quantize_qty(s, "1", market=True)) for s in symbols])
    fee = np.full(len(symbols), _FEE_DECIMALS)
    return {
        "price": price,
        "qty": qty,
        "fee": fee,
        "pnl": np.maximum(price + qty, fee),
    }


def _per_row(values: np.ndarray[Any, Any]) -> pl.Expr:
    # A literal: a scalar when every row shares the value (one symbol, or one grid).
    if values.size and (values == values[0]).all():
        return pl.lit(values[0].item())
    return pl.lit(pl.Series(values))


def _exact_from_floats(
    values: np.ndarray[Any, Any], decimals: np.ndarray[Any, Any]
) -> pl.Series | None:
    """Return the exact Decimal column behind ``values`` (NaN is null), or None if unproven.

    ``decimals`` (per row) must be at least the decimals of every exact value, which the
    grids guarantee. Every value must read back from its mantissa (numpy's division is the
    correctly rounded one; polars may multiply by a reciprocal instead); when one does not,
    the caller asks the core for the decimal text instead.
    """
    if decimals.size and int(decimals.max()) > _EXACT_SCALE:
        return None
    scale = 10.0 ** decimals.astype(np.float64)
    missing = np.isnan(values)
    with np.errstate(invalid="ignore", over="ignore"):
        mantissa = np.rint(values * scale)
        proven = missing | ((np.abs(mantissa) < _MAX_MANTISSA) & (mantissa / scale == values))
    if not proven.all():
        return None
    unit = _per_row(10 ** (_EXACT_SCALE - decimals.astype(np.int64))).cast(
        pl.Decimal(38, 0)
    ) * pl.lit(Decimal(1).scaleb(-_EXACT_SCALE), dtype=EXACT)
    exact = (pl.col("m").cast(pl.Decimal(38, 0)) * unit).cast(EXACT)
    if missing.any():
        exact = pl.when(pl.col("missing")).then(None).otherwise(exact)
    frame = pl.DataFrame(
        {"m": np.where(missing, 0.0, mantissa).astype(np.int64), "missing": missing}
    )
    return frame.select(exact.alias("exact")).to_series()


def _exact_columns(
    frame: pl.DataFrame,
    grids: Mapping[str, str],
    decimals: Mapping[str, np.ndarray[Any, Any]],
) -> pl.DataFrame | None:
    # The float columns the core returns without detail, made exact (None: not provable).
    if frame.is_empty():
        return frame
    series = frame["series"].to_numpy()
    replaced = []
    for name, grid in grids.items():
        if name not in frame.columns:
            continue
        column = _exact_from_floats(
            np.ascontiguousarray(frame[name].to_numpy(), dtype=np.float64),
            decimals[grid][series],
        )
        if column is None:
            return None
        replaced.append(column.alias(name))
    return frame.with_columns(replaced)


def _order_symbols(klines: Sequence[pl.DataFrame]) -> list[str]:
    symbols = [str(k["symbol"][0]) for k in klines]
    seen: set[str] = set()
    for symbol in symbols:
        if symbol in seen:
            raise KlinesError(
                f"{symbol} is given twice; merge its files into one series (sorted, without "
                "duplicated open_time) before the backtest"
            )
        seen.add(symbol)
    intervals = {str(k["interval"][0]) for k in klines}
    if len(intervals) > 1:
        raise KlinesError(
            f"all series of one run must share an interval, found {sorted(intervals)}"
        )
    return symbols


def run_backtest(
    klines: pl.DataFrame | Sequence[pl.DataFrame],
    policy: ExitPolicy,
    rules: ExchangeRules | None = None,
    *,
    entries: pl.DataFrame | None = None,
    strategy: str | None = None,
    config: BacktestConfig | None = None,
    fine: Mapping[str, pl.DataFrame] | None = None,
    progress: ProgressCallback | None = None,
    detail: bool = False,
) -> BacktestResult:
    """Replay klines through the Rust exit engine with one policy.

    Args:
        klines: validated klines (``load_klines``), one frame per symbol.
        policy: the exit policy every position runs.
        rules: the exchange rules (tick, steps, min notional) of every symbol; None uses the
            snapshot bundled with the simulator (``load_exchange_rules``).
        entries: intents (schema of ``load_intents``); None uses ``strategy``.
        strategy: the built-in entry rule when ``entries`` is None (default ``momentum24h``).
        config: sizing, fees and the intrabar rule.
        fine: finer klines by symbol that resolve the order of each bar's high and low.
        progress: called with (jobs done, jobs total) as chunks finish.
        detail: also return each fill's ``trigger_price`` and ``mark_price``, the stop after
            every bar (``stops``) and the take-profit levels (``levels``), for charts and
            audits. Without it (the default) the core builds no per-bar rows and no text:
            the exact columns come from its float columns, proven exact per value (see
            ``_exact_from_floats``), and ``stops``/``levels`` are empty.

    Returns:
        Fills, trades, the summary and, with ``detail``, the chart data.

    Raises:
        KlinesError: the klines do not fit together (a symbol twice, mixed intervals).
        ConfigError: the entries or the configuration are invalid.
        UnknownSymbolError: a symbol is missing from ``rules``.
    """
    frames = [klines] if isinstance(klines, pl.DataFrame) else list(klines)
    config = config or BacktestConfig()
    symbols = _order_symbols(frames)
    rules = _rules_for(rules, symbols)
    intents, one_per_symbol = _entries_for(frames, entries, strategy)
    series = _series_inputs(frames, symbols, intents, fine)
    options = _core_options(config, one_per_symbol, detail=detail)
    outputs = _call_core(series, [policy], rules, options, progress)
    tables, evaluations = _tables(outputs, symbols)
    fills = trades = None
    if not detail:
        decimals = _grid_decimals(rules, symbols)
        fills = _exact_columns(tables["fills"], _FILL_GRID, decimals)
        trades = _exact_columns(tables["trades"], _TRADE_GRID, decimals)
    if fills is None or trades is None:
        if not detail:
            # A value the floats cannot prove (a huge PnL): the core's decimal text decides.
            outputs = _call_core(
                series, [policy], rules, {**options, "detail": True}, progress=None
            )
            tables = _tables(outputs, symbols)[0]
            tables["fills"] = tables["fills"].drop(
                "trigger_price_exact", "mark_price_exact", strict=False
            )
            tables["stops"] = tables["stops"].clear()
            tables["levels"] = tables["levels"].clear()
        fills, trades = _exact(tables["fills"]), _exact(tables["trades"])
    fills = _arrange(fills, _FILL_ORDER, {"time": "time_ms"})
    trades = _arrange(
        trades,
        _TRADE_ORDER,
        {"entry_time": "entry_time_ms", "exit_time": "exit_time_ms"},
    )
    return BacktestResult(
        fills=fills,
        trades=trades,
        summary=summarize(fills, trades),
        stops=tables["stops"],
        levels=tables["levels"],
        skipped=tables["skipped"],
        evaluations=evaluations,
        policies=[policy],
        warnings=liquidation_warnings(policy, _leverages(intents, config)),
    )


# The lowest maintenance margin rate of Binance's USDⓈ-M brackets (first bracket of the most
# liquid contracts): an isolated position is liquidated about 1/leverage minus this from its
# entry, and never later.
_MIN_MAINTENANCE_RATE = 0.004


def _leverages(intents: pl.DataFrame, config: BacktestConfig) -> list[int]:
    given = intents["leverage"]
    found = {int(v) for v in given.drop_nulls().unique().to_list()}
    if given.null_count() or intents.is_empty():
        found.add(config.leverage)
    return sorted(found)


def liquidation_warnings(policy: ExitPolicy, leverages: Iterable[int]) -> list[str]:
    """Say where an initial stop may lie past the liquidation price (not modelled).

    The widest initial stop is ``max_stop_pct`` of the entry, capped by
    ``max_margin_loss / leverage``; liquidation comes about ``1 / leverage`` minus the
    maintenance margin rate (0.4 % at best) from the entry. A stop beyond that would never
    fill on the exchange: the position would be liquidated first, at a worse price.

    Args:
        policy: the exit policy.
        leverages: the leverages the entries use.

    Returns:
        One message per leverage at risk, naming the numbers and the fix.
    """
    fields = policy.to_dict()
    widest = float(fields["max_stop_pct"])
    cap = fields.get("max_margin_loss")
    out = []
    for leverage in sorted(set(leverages)):
        stop = widest if cap is None else min(widest, float(cap) / leverage)
        liquidation = 1.0 / leverage - _MIN_MAINTENANCE_RATE
        if stop >= liquidation:
            out.append(
                f"at leverage {leverage} an initial stop may lie {stop:.2%} from the entry, "
                f"past the liquidation price (about {liquidation:.2%} away): the exchange "
                "liquidates such a position first (its margin and a liquidation fee), which "
                "the backtest does not model; set max_margin_loss (e.g. 0.5) or lower the "
                "leverage"
            )
    return out


# ---------------------------------------------------------------------------------------------
# Metrics

_METRIC_NAMES = (
    "trades",
    "win_rate",
    "profit_factor",
    "expectancy_r",
    "net_pnl",
    "fees",
    "max_drawdown",
)


def _drawdown(frame: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    # Realized equity moves at every fill (the entry pays its fee, each exit books its PnL);
    # the drawdown is the deepest fall of that curve from its running peak (peak starts at 0).
    equity = (
        frame.sort([*keys, "time_ms", "trade", "sequence"])
        .with_columns(pl.col("pnl").cast(pl.Float64).cum_sum().over(keys).alias("equity"))
        .with_columns(
            (pl.col("equity").cum_max().over(keys).clip(lower_bound=0.0) - pl.col("equity")).alias(
                "dd"
            )
        )
    )
    return equity.group_by(keys).agg(pl.col("dd").max().alias("max_drawdown"))


def summarize(
    fills: pl.DataFrame, trades: pl.DataFrame, *, by: Sequence[str] = ("policy",)
) -> pl.DataFrame:
    """Compute the metrics per symbol and in total (``symbol == "TOTAL"``).

    Metrics: ``trades``, ``wins``, ``win_rate``, ``gross_profit``, ``gross_loss``,
    ``profit_factor`` (null without a losing trade), ``net_pnl`` and ``fees`` in USDT,
    ``expectancy_r`` (mean net PnL per trade in units of its initial risk), ``max_drawdown``
    (USDT, of the realized equity curve) and ``exits_<reason>`` counts.

    Args:
        fills: the fills table of a result.
        trades: the trades table of a result.
        by: grouping keys besides the symbol (the policy index by default).

    Returns:
        One row per (policy, symbol) and one TOTAL row per policy.
    """
    keys = list(by)
    if trades.is_empty():
        return pl.DataFrame(
            {"symbol": ["TOTAL"], "trades": [0], "win_rate": [None], "profit_factor": [None]},
            schema_overrides={"win_rate": pl.Float64, "profit_factor": pl.Float64},
        )
    # Only the columns the metrics read: the sorts below then move a few numbers per row,
    # not every Decimal and text column of the tables.
    trades = trades.select(*keys, "symbol", pl.col("pnl", "fees").cast(pl.Float64), "r_multiple")
    fills = fills.select(
        *keys,
        "symbol",
        "time_ms",
        "trade",
        "sequence",
        "kind",
        "reason",
        pl.col("pnl").cast(pl.Float64),
    )
    parts: list[pl.DataFrame] = []
    # One symbol: its rows are the TOTAL's, in the same order, so the same sums and curve.
    one_symbol = trades["symbol"].n_unique() == 1 and fills["symbol"].n_unique() == 1
    for symbol_keys, label in ((["symbol"], None), ([], "TOTAL")):
        if label is not None and one_symbol:
            parts.append(parts[0].drop("symbol").with_columns(pl.lit(label).alias("symbol")))
            continue
        group = [*keys, *symbol_keys]
        stats = trades.group_by(group).agg(
            pl.len().alias("trades"),
            (pl.col("pnl") > 0).sum().alias("wins"),
            pl.col("pnl").filter(pl.col("pnl") > 0).sum().alias("gross_profit"),
            (-pl.col("pnl").filter(pl.col("pnl") < 0).sum()).alias("gross_loss"),
            pl.col("pnl").sum().alias("net_pnl"),
            pl.col("fees").sum().alias("fees"),
            pl.col("r_multiple").mean().alias("expectancy_r"),
        )
        stats = stats.join(_drawdown(fills, group), on=group, how="left")
        exits = fills.filter(pl.col("kind") == "exit")
        if not exits.is_empty():
            counts = exits.with_columns(pl.format("exits_{}", "reason").alias("reason")).pivot(
                on="reason",
                index=group,
                values="trade",
                aggregate_function="len",
                sort_columns=True,
            )
            stats = stats.join(counts, on=group, how="left")
        if label is not None:
            stats = stats.with_columns(pl.lit(label).alias("symbol"))
        parts.append(stats)
    table = pl.concat(parts, how="diagonal_relaxed")
    exit_columns = sorted(c for c in table.columns if c.startswith("exits_"))
    table = table.with_columns(
        (pl.col("wins") / pl.col("trades")).alias("win_rate"),
        pl.when(pl.col("gross_loss") > 0)
        .then(pl.col("gross_profit") / pl.col("gross_loss"))
        .otherwise(None)
        .alias("profit_factor"),
        *(pl.col(c).fill_null(0).cast(pl.UInt32) for c in exit_columns),
    )
    order = [
        *keys,
        "symbol",
        "trades",
        "wins",
        "win_rate",
        "profit_factor",
        "expectancy_r",
        "net_pnl",
        "gross_profit",
        "gross_loss",
        "fees",
        "max_drawdown",
        *exit_columns,
    ]
    return table.select(order).sort([*keys, pl.col("symbol") == "TOTAL", "symbol"])


# ---------------------------------------------------------------------------------------------
# Grid


def _grid_value(text: str) -> object:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null", "off"):
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text.strip()


def parse_grid(specs: Iterable[str]) -> dict[str, list[Any]]:
    """Parse ``name=v1,v2,...`` specs into an ordered grid of policy field values.

    Raises:
        ConfigError: a spec has no ``=``, no values, or names a field twice.
    """
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(f"grid spec {spec!r} must look like name=v1,v2,...")
        if name in grid:
            raise ConfigError(f"grid field {name!r} is given twice")
        items = [v for v in values.split(",") if v.strip()]
        if not items:
            raise ConfigError(f"grid field {name!r} has no values")
        grid[name] = [_grid_value(v) for v in items]
    return grid


def grid_policies(
    base: Mapping[str, Any], grid: Mapping[str, Sequence[Any]]
) -> tuple[list[ExitPolicy], pl.DataFrame]:
    """Build one ExitPolicy per combination of the grid values over the base fields.

    Returns:
        The policies and a frame of the grid values, one row per policy (column ``policy``
        is the index).

    Raises:
        PolicyError: a field is unknown or a value is out of range (the core validates).
    """
    names = list(grid)
    combos = list(itertools.product(*(grid[n] for n in names))) if names else [()]
    policies = [
        _core.ExitPolicy(**{**base, **dict(zip(names, combo, strict=True))}) for combo in combos
    ]
    values = pl.DataFrame(
        {"policy": pl.Series(range(len(combos)), dtype=pl.UInt32)}
        | {n: [c[i] for c in combos] for i, n in enumerate(names)},
        strict=False,
    )
    return policies, values


def run_grid(
    klines: pl.DataFrame | Sequence[pl.DataFrame],
    base: Mapping[str, Any],
    grid: Mapping[str, Sequence[Any]],
    rules: ExchangeRules | None = None,
    *,
    entries: pl.DataFrame | None = None,
    strategy: str | None = None,
    config: BacktestConfig | None = None,
    fine: Mapping[str, pl.DataFrame] | None = None,
    sort_by: str = "expectancy_r",
    descending: bool | None = None,
    progress: ProgressCallback | None = None,
) -> pl.DataFrame:
    """Run every combination of ``grid`` over every symbol in parallel in the Rust core.

    Args:
        klines: validated klines, one frame per symbol.
        base: the ExitPolicy fields every combination starts from.
        grid: field name -> values to try.
        rules: exchange rules for every symbol; None uses the bundled snapshot.
        entries: intents; None uses ``strategy`` (default ``momentum24h``).
        strategy: the built-in entry rule when ``entries`` is None.
        config: sizing, fees and the intrabar rule.
        fine: finer klines by symbol for the intrabar order.
        sort_by: the metric to sort by (any TOTAL column of ``summarize``).
        descending: sort order; by default best first (ascending only for ``max_drawdown``).
        progress: called with (jobs done, jobs total).

    Returns:
        One row per combination: its grid values, then the TOTAL metrics, best first.

    Raises:
        ConfigError: ``sort_by`` is not a metric; see ``run_backtest`` for the rest.
    """
    frames = [klines] if isinstance(klines, pl.DataFrame) else list(klines)
    config = config or BacktestConfig()
    symbols = _order_symbols(frames)
    rules = _rules_for(rules, symbols)
    policies, values = grid_policies(base, grid)
    intents, one_per_symbol = _entries_for(frames, entries, strategy)
    series = _series_inputs(frames, symbols, intents, fine)
    options = _core_options(config, one_per_symbol, detail=False)
    outputs = _call_core(series, policies, rules, options, progress)
    tables, evaluations = _tables(outputs, symbols)
    summary = summarize(tables["fills"], tables["trades"])
    if "policy" not in summary.columns:
        summary = summary.with_columns(pl.lit(None, dtype=pl.UInt32).alias("policy"))
    totals = summary.filter(pl.col("symbol") == "TOTAL").drop("symbol")
    table = values.join(totals, on="policy", how="left").with_columns(pl.col("trades").fill_null(0))
    if sort_by not in table.columns or sort_by in values.columns:
        metrics = [c for c in table.columns if c not in values.columns]
        raise ConfigError(f"sort metric {sort_by!r} is unknown; choose one of {', '.join(metrics)}")
    desc = sort_by != "max_drawdown" if descending is None else descending
    return table.sort(sort_by, descending=desc, nulls_last=True).with_columns(
        pl.lit(evaluations, dtype=pl.UInt64).alias("evaluations_total")
    )


# ---------------------------------------------------------------------------------------------
# Consistency with the daemon


def exit_decisions_for_path(
    rules: ExchangeRules,
    policy: ExitPolicy,
    *,
    symbol: str,
    side: Literal["LONG", "SHORT"],
    quantity: str,
    entry_price: str,
    marks: Sequence[tuple[int, str]],
    atr: float | None = None,
    leverage: int = 1,
    confidence: float | None = None,
    opened_at_ms: int = 0,
) -> list[dict[str, str | None]]:
    """Return the exit decisions the backtest driver takes along a mark-price path.

    The same driver the bar replay uses (``exit::position`` state machine, every action
    confirmed at once with its full quantity), fed one mark at a time instead of bar extremes.
    The daemon + simulator replay of the same path must give the same reasons and quantities,
    and prices within one tick.

    Args:
        rules: exchange rules holding ``symbol``.
        policy: the exit policy.
        symbol: the position's symbol.
        side: ``LONG`` or ``SHORT``.
        quantity: the position size (exact decimal string).
        entry_price: the entry price (exact decimal string).
        marks: (event time ms, mark price string) in order.
        atr: the symbol's ATR for the whole path (None: not ready, the fallback applies).
        leverage: the position's leverage.
        confidence: the intent's confidence, or None.
        opened_at_ms: the open time, for the time stop.

    Returns:
        One dict per action: ``time_ms``, ``reason``, ``side`` (the closing order side),
        ``quantity``, ``trigger_price``, ``mark_price`` and ``sequence``, all strings.
    """
    result: list[dict[str, str | None]] = _core.backtest_replay_marks(
        rules,
        policy,
        symbol,
        side,
        quantity,
        entry_price,
        [int(t) for t, _ in marks],
        [str(m) for _, m in marks],
        atr,
        leverage,
        confidence,
        opened_at_ms,
    )
    return result


# ---------------------------------------------------------------------------------------------
# Outputs


def _matplotlib() -> Any:  # noqa: ANN401 - pyplot, imported only when a chart is drawn
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError(
            "charts need matplotlib, which is not installed; install the extra: "
            "pip install 'pyquant[plot]'"
        ) from exc
    return plt


def equity_curve(fills: pl.DataFrame) -> pl.DataFrame:
    """Return the realized equity (cumulative net PnL in USDT) after every fill, in total.

    Returns:
        Columns ``time_ms``, ``symbol``, ``pnl`` and ``equity``.
    """
    if fills.is_empty():
        return pl.DataFrame(
            schema={
                "time_ms": pl.Int64,
                "symbol": pl.String,
                "pnl": pl.Float64,
                "equity": pl.Float64,
            }
        )
    return (
        fills.sort("time_ms", "series", "trade", "sequence")
        .select("time_ms", "symbol", pl.col("pnl").cast(pl.Float64))
        .with_columns(pl.col("pnl").cum_sum().alias("equity"))
    )


def plot_equity(fills: pl.DataFrame, path: Path) -> Path:
    """Draw the realized equity curve, in total and per symbol, into a PNG."""
    plt = _matplotlib()
    fig, ax = plt.subplots(figsize=(11, 5))
    curve = equity_curve(fills)
    if not curve.is_empty():
        when = curve["time_ms"].cast(pl.Datetime("ms")).to_list()
        ax.plot(when, curve["equity"].to_list(), color="black", linewidth=1.6, label="total")
        for symbol in sorted(curve["symbol"].unique().to_list()):
            part = curve.filter(pl.col("symbol") == symbol)
            ax.plot(
                part["time_ms"].cast(pl.Datetime("ms")).to_list(),
                part["pnl"].cum_sum().to_list(),
                linewidth=0.8,
                alpha=0.7,
                label=symbol,
            )
        ax.legend(fontsize=7, ncol=4)
    ax.axhline(0.0, color="grey", linewidth=0.6)
    ax.set_title("Realized equity (net of fees)")
    ax.set_ylabel("USDT")
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_symbol(
    klines: pl.DataFrame, result: BacktestResult, path: Path, *, max_bars: int = 20_000
) -> Path:
    """Draw one symbol's close price with every position's stop path and take-profit levels.

    The stop path and the levels are those of a ``run_backtest(..., detail=True)`` result;
    without detail the chart shows the price and the entries only.

    Long histories are cut to the last ``max_bars`` bars so the chart stays readable.
    """
    plt = _matplotlib()
    symbol = str(klines["symbol"][0])
    bars = klines.tail(max_bars)
    start = int(bars["open_time"][0])
    fig, ax = plt.subplots(figsize=(13, 6))
    ax.plot(
        bars["open_time"].cast(pl.Datetime("ms")).to_list(),
        bars["close"].to_list(),
        color="black",
        linewidth=0.6,
        label="close",
    )
    trades = result.trades.filter((pl.col("symbol") == symbol) & (pl.col("entry_time_ms") >= start))
    stops = result.stops.filter((pl.col("symbol") == symbol) & (pl.col("time_ms") >= start))
    levels = result.levels.filter(pl.col("symbol") == symbol)
    first = True
    for trade in trades.iter_rows(named=True):
        tid = trade["trade"]
        path_ = stops.filter(pl.col("trade") == tid)
        if not path_.is_empty():
            ax.step(
                path_["time_ms"].cast(pl.Datetime("ms")).to_list(),
                path_["stop"].to_list(),
                where="post",
                color="tab:red",
                linewidth=0.9,
                label="stop" if first else None,
            )
        t0 = np.datetime64(int(trade["entry_time_ms"]), "ms")
        t1 = np.datetime64(int(trade["exit_time_ms"]), "ms")
        for level in levels.filter(pl.col("trade") == tid).iter_rows(named=True):
            ax.hlines(
                level["price"],
                t0,
                t1,
                colors="tab:green",
                linewidth=0.7,
                label="take-profit" if first else None,
            )
            first = False
        marker = "^" if trade["side"] > 0 else "v"
        ax.plot([t0], [float(trade["entry_price"])], marker=marker, color="tab:blue", markersize=5)
        first = False
    ax.set_title(f"{symbol}: price, stop path and take-profit levels")
    ax.legend(fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_heatmap(table: pl.DataFrame, x: str, y: str, metric: str, path: Path) -> Path:
    """Draw a heat map of ``metric`` over two grid parameters (other parameters: their best)."""
    plt = _matplotlib()
    best = table.group_by(x, y).agg(pl.col(metric).max())
    xs = sorted(best[x].unique().to_list(), key=lambda v: (v is None, v))
    ys = sorted(best[y].unique().to_list(), key=lambda v: (v is None, v))
    grid = np.full((len(ys), len(xs)), np.nan)
    for row in best.iter_rows(named=True):
        value = row[metric]
        if value is not None:
            grid[ys.index(row[y]), xs.index(row[x])] = float(value)
    fig, ax = plt.subplots(figsize=(1.2 * len(xs) + 3, 0.8 * len(ys) + 2.5))
    image = ax.imshow(grid, cmap="RdYlGn", aspect="auto", origin="lower")
    ax.set_xticks(range(len(xs)), [str(v) for v in xs])
    ax.set_yticks(range(len(ys)), [str(v) for v in ys])
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):
            ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label=metric)
    ax.set_title(f"{metric} by {x} and {y}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _json_ready(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Decimal):
        return str(value)
    return value


def write_outputs(
    result: BacktestResult,
    out_dir: str | os.PathLike[str],
    *,
    config: BacktestConfig,
    inputs: Mapping[str, Any] | None = None,
    klines: Sequence[pl.DataFrame] = (),
    plot: bool = False,
    equity_png: bool = True,
) -> dict[str, Path]:
    """Write trades.parquet, summary.json, equity.png and, with ``plot``, a chart per symbol.

    Returns:
        The written files by name.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    fills = result.fills.drop("series", "policy", strict=False)
    trades_path = out / "trades.parquet"
    fills.write_parquet(trades_path)
    written["trades"] = trades_path
    positions_path = out / "positions.parquet"
    result.trades.drop("series", "policy", strict=False).write_parquet(positions_path)
    written["positions"] = positions_path
    summary_rows = [
        {k: _json_ready(v) for k, v in row.items() if k != "policy"}
        for row in result.summary.iter_rows(named=True)
    ]
    skipped: dict[str, int] = {}
    if not result.skipped.is_empty():
        for row in (
            result.skipped.group_by("reason").agg(pl.col("count").sum()).iter_rows(named=True)
        ):
            skipped[str(row["reason"])] = int(row["count"])
    document = {
        "summary": {str(row["symbol"]): row for row in summary_rows},
        "skipped_entries": skipped,
        "evaluations": result.evaluations,
        "warnings": list(result.warnings),
        "config": {
            "maker_fee": str(config.maker_fee),
            "taker_fee": str(config.taker_fee),
            "entry_liquidity": config.entry_liquidity,
            "notional_usd": str(config.notional_usd),
            "leverage": config.leverage,
            "intrabar": config.intrabar,
            "max_gap_bars": config.max_gap_bars,
        },
        "policy": [_policy_fields(p) for p in result.policies],
        "inputs": dict(inputs or {}),
    }
    summary_path = out / "summary.json"
    summary_path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    written["summary"] = summary_path
    if equity_png:
        written["equity"] = plot_equity(result.fills, out / "equity.png")
    if plot:
        for frame in klines:
            symbol = str(frame["symbol"][0])
            written[f"chart_{symbol}"] = plot_symbol(frame, result, out / f"{symbol}.png")
    return written


def _policy_fields(policy: ExitPolicy) -> object:
    to_dict = getattr(policy, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    return repr(policy)
