"""Backtest runs: one policy or a grid of them through the Rust exit engine.

Turns validated inputs into the core's arrays (one pass over the entries, bars as contiguous
columns), calls ``pyquant._core`` in a few coarse chunks with the GIL released, and hands the
raw columns to ``reporting``. It owns the run's configuration (fees, sizing, intrabar rule)
and its result type; it reads no files and draws nothing.
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl

from pyquant import _core
from pyquant.backtest.loading import (
    _INTENT_SCHEMA,
    Intrabar,
    KlinesError,
    ProgressCallback,
    _rules_for,
    interval_ms,
    momentum24h,
)
from pyquant.backtest.reporting import (
    _FILL_ORDER,
    _TRADE_ORDER,
    _arrange,
    _exact,
    _exact_tables,
    _tables,
    summarize,
)
from pyquant.errors import ConfigError

if TYPE_CHECKING:
    from pyquant._core import ExchangeRules, ExitPolicy


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
        summary: metrics per symbol and a ``TOTAL`` row (see ``summarize``), computed from
            ``fills`` and ``trades`` when first read (a run that only needs the tables does
            not pay for it).
        stops: the stop after each bar while a position was open (for charts).
        levels: each position's take-profit level prices (for charts).
        skipped: entries that were not taken, with the reason.
        evaluations: bar x position evaluations performed by the core.
        policies: the policies run, in ``policy`` index order.
        warnings: what makes the result less trustworthy (see ``liquidation_warnings``).
    """

    fills: pl.DataFrame
    trades: pl.DataFrame
    stops: pl.DataFrame
    levels: pl.DataFrame
    skipped: pl.DataFrame
    evaluations: int
    policies: list[ExitPolicy] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    _summary: pl.DataFrame | None = field(default=None, repr=False)

    @property
    def summary(self) -> pl.DataFrame:
        """Metrics per symbol and a ``TOTAL`` row (``summarize``), computed on first read."""
        if self._summary is None:
            self._summary = summarize(self.fills, self.trades)
        return self._summary


@dataclass(frozen=True, slots=True)
class _Series:
    symbol: str
    interval_ms: int
    arrays: dict[str, Any]


def _contiguous(series: pl.Series, dtype: type[np.generic]) -> np.ndarray[Any, Any]:
    array = series.to_numpy()
    if array.dtype == dtype and array.flags.c_contiguous:
        return array  # a view of the column (no nulls, one chunk): nothing to convert
    return np.ascontiguousarray(array, dtype=dtype)


_CORE_ENTRY_COLUMNS = ("time_ms", "symbol", "side", "confidence", "size_usd", "leverage")


class _Pieces:
    """A column as the numpy arrays of its chunks (no copy), cut into row ranges.

    A frame joined from per-symbol frames (``pl.concat``) keeps one chunk per part: a
    symbol's rows then lie in one chunk and are cut as a view, where a contiguous copy of
    the whole column would copy every row.
    """

    def __init__(self, column: pl.Series, dtype: type[np.generic]) -> None:
        self.parts = [_contiguous(chunk, dtype) for chunk in column.get_chunks()]
        self.parts = self.parts or [np.zeros(0, dtype=dtype)]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts]).tolist()

    def cut(self, start: int, stop: int) -> np.ndarray[Any, Any]:
        # The chunk holding row ``start`` (the last one for an empty range at the end).
        first = min(bisect.bisect_right(self.starts, start) - 1, len(self.parts) - 1)
        base = self.starts[first]
        if stop <= self.starts[first + 1]:
            return self.parts[first][start - base : stop - base]
        last = bisect.bisect_left(self.starts, stop) - 1
        return np.concatenate(
            [
                self.parts[k][max(start - self.starts[k], 0) : stop - self.starts[k]]
                for k in range(first, last + 1)
            ]
        )


def _bad_side(entries: pl.DataFrame, row: int) -> None:
    raise ConfigError(
        f"entries side was {entries['side'][row]!r} (intent at time_ms "
        f"{entries['time_ms'][row]}): must be BUY or SELL"
    )


_ZEROS = np.zeros(0, dtype=np.int64)


def _zeros(rows: int) -> np.ndarray[Any, Any]:
    # ``rows`` int64 zeros (no entry gives its leverage: the default applies), read-only and
    # kept for the next run: a fresh array's pages are faulted in again at every run.
    global _ZEROS
    if len(_ZEROS) < rows:
        _ZEROS = np.zeros(rows, dtype=np.int64)
        _ZEROS.setflags(write=False)
    return _ZEROS[:rows]


def _entry_pieces(entries: pl.DataFrame, side: np.ndarray[Any, Any]) -> dict[str, Any]:
    # The core's entry columns of ``entries`` (one symbol's, in time order, or several that
    # the caller cuts into symbols), their sides already coded 1/-1: views of the columns'
    # chunks where they have no nulls, a column of nulls as zeros (lazily zeroed pages).
    confidence = entries["confidence"]
    leverage = entries["leverage"]
    return {
        "entry_time": _Pieces(entries["time_ms"], np.int64),
        "entry_side": side,
        "entry_confidence": _Pieces(
            confidence.fill_null(float("nan")) if confidence.null_count() else confidence,
            np.float64,
        ),
        "entry_notional": _own_notionals(entries["size_usd"]),
        "entry_leverage": (
            _zeros(leverage.len())
            if leverage.null_count() == leverage.len()
            else _Pieces(leverage.fill_null(0), np.int64)
        ),
    }


def _entry_arrays(entries: pl.DataFrame, side: np.ndarray[Any, Any]) -> dict[str, Any]:
    # The core's entry arrays of ``entries`` (one symbol's, in time order), whole.
    return _cut(_entry_pieces(entries, side), 0, entries.height)


def _read_only(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    array.setflags(write=False)
    return array


# The entry arrays of a series without entries (shared by every run: read-only).
_NO_ENTRIES: dict[str, Any] = {
    "entry_time": _read_only(np.zeros(0, dtype=np.int64)),
    "entry_side": _read_only(np.zeros(0, dtype=np.int8)),
    "entry_confidence": _read_only(np.zeros(0, dtype=np.float64)),
    "entry_notional": None,
    "entry_leverage": _read_only(np.zeros(0, dtype=np.int64)),
}


def _own_notionals(notional: pl.Series) -> tuple[np.ndarray[Any, Any], list[str]] | None:
    # The entries that give their own size, as the core reads them: None when none does (the
    # usual case: nothing per entry to build or read), else their rows and decimal strings.
    if notional.null_count() == notional.len():
        return None
    given = notional.is_not_null()
    rows = np.flatnonzero(given.to_numpy()).astype(np.int64)
    return rows, notional.filter(given).cast(pl.String).to_list()


def _cut_notionals(
    notional: tuple[np.ndarray[Any, Any], list[str]] | None, start: int, stop: int
) -> tuple[np.ndarray[Any, Any], list[str]] | None:
    # The own notionals of entry rows start..stop, renumbered from 0.
    if notional is None:
        return None
    rows, texts = notional
    first, last = (int(k) for k in np.searchsorted(rows, [start, stop]))
    return None if first == last else (rows[first:last] - start, texts[first:last])


def _cut(pieces: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    # Rows start..stop of the entry columns: views where they lie in one chunk, and the own
    # notionals among them.
    return {
        key: (
            _cut_notionals(values, start, stop)
            if key == "entry_notional"
            else values.cut(start, stop)
            if isinstance(values, _Pieces)
            else values[start:stop]
        )
        for key, values in pieces.items()
    }


def _columns(frame: pl.DataFrame, names: Sequence[str]) -> pl.DataFrame:
    # Some columns as they are: a ``select`` rechunks every column of a frame whose columns
    # are cut into chunks differently (a copy of each).
    return pl.DataFrame([frame.get_column(name) for name in names])


def _key_columns(entries: pl.DataFrame) -> tuple[pl.Series, pl.Series, pl.Series]:
    # The side, symbol and time columns as ``backtest_entry_keys`` reads them: each with its
    # own chunks, through the Arrow C stream of the series (a frame's stream would join
    # the chunks into one first, a copy of every row).
    return entries.get_column("side"), entries.get_column("symbol"), entries.get_column("time_ms")


def _entry_arrays_by_symbol(
    entries: pl.DataFrame, symbols: Sequence[str]
) -> dict[str, dict[str, Any]]:
    # One pass over the entries for every symbol: each column converted once, in (symbol,
    # time) order (a stable sort: ties keep the file's order), then cut into per-symbol
    # views. Entries of symbols without bars, or without a symbol, are left out.
    if entries.is_empty():
        return {}
    needed = _columns(entries, _CORE_ENTRY_COLUMNS)
    if needed["time_ms"].null_count():
        row = int(needed["time_ms"].is_null().arg_max() or 0)
        raise ConfigError(f"entries time_ms is missing in row {row}: every intent needs a time")
    # The side and symbol strings read by the core in one pass over their Arrow views (a
    # compare of 16 bytes per row, no hash): the side coded, the runs of one symbol found.
    sides, bad, runs, in_order = _core.backtest_entry_keys(*_key_columns(needed), list(symbols))
    side = np.frombuffer(memoryview(sides), dtype=np.int8)
    if bad is not None:
        _bad_side(needed, bad)
    known = [(code, start, stop) for code, start, stop in runs if code >= 0]
    if in_order and len({code for code, _, _ in known}) == len(known):
        # Each symbol's intents in one block in time order (one symbol, or written symbol by
        # symbol): the columns converted as they are and cut at the block bounds, no sort.
        pieces = _entry_pieces(needed, side)
        return {symbols[code]: _cut(pieces, start, stop) for code, start, stop in known}
    codes = np.repeat(
        np.array([code for code, _, _ in runs], dtype=np.int64),
        [stop - start for _, start, stop in runs],
    )
    keyed = needed.with_columns(pl.Series("series", codes), pl.Series("side_code", side))
    if len(known) < len(runs):
        keyed = keyed.filter(pl.col("series") >= 0)
    ordered = keyed.sort(["series", "time_ms"], maintain_order=True)
    pieces = _entry_pieces(ordered, _contiguous(ordered["side_code"], np.int8))
    bounds = np.searchsorted(ordered["series"].to_numpy(), np.arange(len(symbols) + 1))
    return {
        name: _cut(pieces, int(bounds[i]), int(bounds[i + 1]))
        for i, name in enumerate(symbols)
        if bounds[i] < bounds[i + 1]
    }


def _series_inputs(
    frames: Sequence[pl.DataFrame],
    symbols: Sequence[str],
    intents: pl.DataFrame,
    fine: Mapping[str, pl.DataFrame] | None,
) -> list[_Series]:
    by_symbol = _entry_arrays_by_symbol(intents, symbols)
    # One interval for all (``_order_symbols`` checked it): parsed once, not per series.
    step = interval_ms(str(frames[0].get_column("interval")[0])) if frames else 0
    return [
        _series_arrays(k, by_symbol.get(s, _NO_ENTRIES), (fine or {}).get(s), s, step)
        for k, s in zip(frames, symbols, strict=True)
    ]


def _prepare_series(
    klines: pl.DataFrame,
    entries: pl.DataFrame,
    fine: pl.DataFrame | None,
) -> _Series:
    # One series on its own: its symbol's entries picked from ``entries``.
    symbol = str(klines["symbol"][0])
    # A filter and a sort, and the side coded by polars: the plain reference the one-pass
    # path of ``_entry_arrays_by_symbol`` is held to.
    mine = entries.filter(pl.col("symbol") == symbol).sort("time_ms", maintain_order=True)
    side = mine["side"].replace_strict(["BUY", "SELL"], [1, -1], default=None, return_dtype=pl.Int8)
    if side.null_count():
        _bad_side(mine, int(side.is_null().arg_max() or 0))
    return _series_arrays(klines, _entry_arrays(mine, _contiguous(side, np.int8)), fine)


def _series_arrays(
    klines: pl.DataFrame,
    entry_arrays: Mapping[str, Any],
    fine: pl.DataFrame | None,
    symbol: str | None = None,
    step: int | None = None,
) -> _Series:
    # ``symbol`` and ``step``: the series' symbol and interval when the caller knows them.
    column = klines.get_column
    symbol = str(column("symbol")[0]) if symbol is None else symbol
    step = interval_ms(str(column("interval")[0])) if step is None else step
    arrays: dict[str, Any] = {
        "symbol": symbol,
        "interval_ms": step,
        "open_time": _contiguous(column("open_time"), np.int64),
        "open": _contiguous(column("open"), np.float64),
        "high": _contiguous(column("high"), np.float64),
        "low": _contiguous(column("low"), np.float64),
        "close": _contiguous(column("close"), np.float64),
        **entry_arrays,
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
        # Column by column, no query: a frame joined from many parts keeps its chunks (each
        # symbol's block then stays a view), and a column of the right type is not touched.
        columns = []
        for name, dtype in _INTENT_SCHEMA.items():
            if name not in entries.columns:
                # A column of nulls cast from the Null type: its values are never written
                # (nothing reads them), where ``pl.repeat`` fills them in.
                nulls = pl.Series(name, [None], dtype=pl.Null).new_from_index(0, entries.height)
                columns.append(nulls.cast(dtype))
                continue
            given = entries.get_column(name)
            try:
                columns.append(given if given.dtype == dtype else given.cast(dtype))
            except pl.exceptions.PolarsError as exc:
                raise ConfigError(
                    f"entries column {name!r} is {given.dtype}: must be {dtype} ({exc})"
                ) from None
        return pl.DataFrame(columns), False
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
    # Chunks exist for the progress bar; without one, a single call keeps every core busy
    # to the end and converts no table twice.
    chunks = (
        _chunks(len(series), len(policies))
        if progress is not None
        else [(range(len(series)), range(len(policies)))]
    )
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


# The tables a run without detail leaves empty, as ``_frame`` builds them (``clear`` makes
# each result its own empty frame).
_EMPTY_TABLES = {
    "stops": pl.DataFrame(
        schema={
            "series": pl.UInt32,
            "policy": pl.UInt32,
            "trade": pl.UInt32,
            "time_ms": pl.Int64,
            "stop": pl.Float64,
            "symbol": pl.String,
        }
    ),
    "levels": pl.DataFrame(
        schema={
            "series": pl.UInt32,
            "policy": pl.UInt32,
            "trade": pl.UInt32,
            "level": pl.UInt32,
            "price": pl.Float64,
            "symbol": pl.String,
        }
    ),
}


def _order_symbols(klines: Sequence[pl.DataFrame]) -> list[str]:
    symbols = [str(k.item(0, "symbol")) for k in klines]
    seen: set[str] = set()
    for symbol in symbols:
        if symbol in seen:
            raise KlinesError(
                f"{symbol} is given twice; merge its files into one series (sorted, without "
                "duplicated open_time) before the backtest"
            )
        seen.add(symbol)
    intervals = {str(k.item(0, "interval")) for k in klines}
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
            audits. Without it (the default) the core builds no per-bar rows and no string per row:
            the exact columns come from its integer mantissas (see ``_exact_tables``),
            and ``stops``/``levels`` are empty.

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
    outputs = _call_core(series, [policy], rules, {**options, "exact": not detail}, progress)
    exact = None if detail else _exact_tables(outputs)
    if exact is not None:
        return BacktestResult(
            fills=exact[0],
            trades=exact[1],
            skipped=exact[2],
            # Without detail the core gives no stops and no levels.
            stops=_EMPTY_TABLES["stops"].clear(),
            levels=_EMPTY_TABLES["levels"].clear(),
            evaluations=sum(int(out["raw"]["evaluations"]) for out in outputs),
            policies=[policy],
            warnings=liquidation_warnings(policy, _leverages(intents, config)),
        )
    if not detail:
        # A value beyond the 12 decimals of the mantissas: the core's decimal text decides.
        outputs = _call_core(series, [policy], rules, {**options, "detail": True}, progress=None)
    tables, evaluations = _tables(outputs, symbols)
    if not detail:
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
    if given.null_count() == given.len():
        return [config.leverage]  # no entry gives its own (the usual case: nothing to scan)
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
