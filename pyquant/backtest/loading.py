"""Backtest inputs: klines, exchange rules and intents, loaded and validated.

Reads what a backtest replays (klines files or frames, the exchange rules that quantize it,
intents JSONL) and refuses, with the file, column, row and rule, anything that cannot be
replayed faithfully; also builds the built-in entry rule ``momentum24h``. It never calls the
core's replay and never shapes results: ``running`` does the first, ``reporting`` the second.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl

from pyquant import _core
from pyquant.errors import ConfigError, UnknownSymbolError
from pyquant.trading.intents import IntentError, parse_intent

if TYPE_CHECKING:
    from pyquant._core import ExchangeRules


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
    numbers, no size, no escapes) are cut into fields by the core in one parallel pass and
    checked as whole columns in polars; any other line, and any line those checks refuse,
    goes through ``parse_intent`` one by one, in file order, so every result and every
    error is the one ``parse_intent`` gives.

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
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KlinesError(
            f"{file}: intents are not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    if _other_line_breaks(data):
        # Line breaks beyond \n and \r\n (str.splitlines knows more): number lines its way.
        rows = [_intent_row(file, n, line) for n, line in enumerate(text.splitlines(), 1)]
        return _intent_frame([r for r in rows if r is not None])
    if not text or text.isspace():
        return _intent_frame([])
    # The core cuts the plain lines into fields in one pass (the grammar of _PLAIN_LINE and
    # _KEY_TWICE, GIL released); the values are checked here, as columns.
    table, _, total = _core.scan_plain_intents(data)
    fields = _plain_fields(table)
    parsed = _plain_intents(fields)
    # Every line the columns did not settle, in file order: the first error is the file's.
    settled = np.zeros(total, dtype=bool)
    settled[parsed["row"].to_numpy()] = True
    rest = np.flatnonzero(~settled)
    others = []
    if rest.size:
        lines = pl.Series("text", [text]).str.split("\n").explode().str.strip_suffix("\r")
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


def _plain_fields(table: bytes) -> pl.DataFrame:
    # The core's table of plain lines: the row, then each field of _PLAIN_SCHEMA as text.
    schema = {"row": pl.Int64, **_PLAIN_SCHEMA}
    if not table:
        return pl.DataFrame(schema=schema)
    return pl.read_csv(
        table,
        has_header=False,
        separator="\t",
        quote_char=None,
        new_columns=list(schema),
        schema=schema,
        null_values="\x01",
        empty_string_is_null=False,
    )


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


# The plain shape (rust_core/src/intents.rs scans for it; tests/backtest/test_intents_columns.py
# states it as regular expressions): an object of the known fields only, each at most once,
# strings of printable ASCII without quotes or escapes, numbers without a sign and small
# enough for a double, null only where it means "not given". Its fields, as text:
_PLAIN_SCHEMA: dict[str, Any] = {
    "id": pl.String,
    "symbol": pl.String,
    "side": pl.String,
    # Each number read once from its text, correctly rounded, as json.loads reads it.
    **dict.fromkeys(("confidence", "time", "created_at_ms", "timestamp", "leverage"), pl.Float64),
}


def _plain_intents(fields: pl.DataFrame) -> pl.DataFrame:
    """Check the decoded plain lines as columns; return the intents of those that pass.

    ``fields`` holds the 0-based ``row`` and the fields of ``_PLAIN_SCHEMA``. The rules are
    parse_intent's, for the values the plain shape allows (the same correctly
    rounded float of each number's text, the same patterns and ranges).
    """
    from pyquant.trading.intents import MAX_TIME_MS

    stamp = pl.coalesce("created_at_ms", "time", "timestamp")
    created = (
        pl.when(stamp < 1e11).then(stamp * 1000.0).otherwise(stamp).cast(pl.Int64, strict=False)
    )
    confidence = pl.col("confidence").fill_null(0.5)
    leverage = pl.col("leverage")
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
