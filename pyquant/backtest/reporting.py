"""Backtest results: the core's columns as exact tables, metrics, files and charts.

Builds the fills and trades tables (exact Decimal columns from the core's mantissas and text
columns from its Arrow views, or both from its decimal text), the per-symbol summary, the
equity curve, the charts and the files a run writes. It takes no exit decision and calls no
replay: it only reads what ``running`` produced.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from pyquant.errors import ConfigError

if TYPE_CHECKING:
    from pyquant._core import ExitPolicy
    from pyquant.backtest.running import BacktestConfig, BacktestResult


# Decimal(38, 12) holds every price, quantity, fee (rounded to 8 dp) and PnL exactly.
EXACT = pl.Decimal(38, 12)


def _frame(
    outputs: list[dict[str, Any]], table: str, symbols: Sequence[str], reasons: Sequence[str]
) -> pl.DataFrame:
    # One frame per core call, built from its columns in one go: the series and policy
    # offsets added in numpy, the symbol and the reason looked up by index (no Python
    # string per row, no polars query per step).
    names = pl.Series("symbol", list(symbols), dtype=pl.String)
    labels = pl.Series("reason", list(reasons), dtype=pl.String)
    kinds = pl.Series("kind", ["entry", "exit"], dtype=pl.String)
    entry_code = list(reasons).index("entry") if "entry" in reasons else -1
    frames: list[pl.DataFrame] = []
    empty: pl.DataFrame | None = None
    for out in outputs:
        columns = dict(out["raw"][table])
        if not columns:
            continue
        if not len(columns["series"]) and (frames or empty is not None):
            continue  # an empty part adds nothing to the ones before it
        series = columns["series"].astype(np.uint32) + np.uint32(out["series0"])
        columns["series"] = series
        columns["policy"] = columns["policy"].astype(np.uint32) + np.uint32(out["policy0"])
        codes = columns.pop("reason_code", None)
        # One symbol (the usual run): its name repeated, a tenth of a gather's cost. The
        # indices go in as polars series (a view of the numpy array): a gather by a numpy
        # array costs twice as much.
        columns["symbol"] = (
            names.new_from_index(0, len(series))
            if len(names) == 1
            else names.gather(pl.Series(series))
        )
        if codes is not None:
            columns["reason"] = labels.gather(pl.Series(codes.astype(np.uint32)))
            if table == "fills":
                columns["kind"] = kinds.gather(pl.Series((codes != entry_code).astype(np.uint32)))
        if not len(series):
            empty = pl.DataFrame(columns)
        else:
            frames.append(pl.DataFrame(columns))
    if not frames:
        # No rows at all: the columns of an empty part.
        return empty if empty is not None else pl.DataFrame()
    return frames[0] if len(frames) == 1 else pl.concat(frames, how="vertical_relaxed")


def _tables(
    outputs: list[dict[str, Any]], symbols: Sequence[str]
) -> tuple[dict[str, pl.DataFrame], int]:
    names: list[str] = list(outputs[0]["raw"]["reason_names"]) if outputs else []
    tables = {
        table: _frame(outputs, table, symbols, names)
        for table in ("fills", "trades", "stops", "levels", "skipped")
    }
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


_RESULT_TABLES = ("fills", "trades", "skipped")


def _exact_tables(
    outputs: Sequence[Mapping[str, Any]],
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame] | None:
    """The fills, trades and skipped tables, exact and arranged, from the core's tables.

    For a run without ``detail`` the core builds each table as an Arrow record batch in its
    final columns (exact columns as Decimal(38, 12) mantissas, text as Arrow views), which
    polars takes in one call without a copy. None when a value did not fit 12 decimals
    (the caller then asks for the decimal text).
    """
    if any(out["raw"].get("tables") is None for out in outputs):
        return None
    tables = []
    for table in _RESULT_TABLES:
        parts = []
        for out in outputs:
            part = pl.DataFrame(out["raw"]["tables"][table])
            # A core call of a later chunk numbers its series and policies from 0.
            offsets = [
                (pl.col(name) + pl.lit(out[first], dtype=pl.UInt32)).alias(name)
                for name, first in (("series", "series0"), ("policy", "policy0"))
                if out[first]
            ]
            parts.append(part.with_columns(offsets) if offsets else part)
        tables.append(parts[0] if len(parts) == 1 else pl.concat(parts))
    return tables[0], tables[1], tables[2]


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


def _one_value(column: pl.Series) -> bool:
    # A compare with the first value: a third of the time of counting distinct strings.
    if column.is_empty():
        return True
    first = column[0]
    return first is not None and not column.null_count() and bool((column == first).all())


def _aggregate(
    frame: pl.DataFrame, keys: Sequence[str], one_group: bool, *metrics: pl.Expr
) -> pl.DataFrame:
    # A run of one policy on one symbol (the usual call) is one group: a plain select then
    # gives the group_by's row without hashing every row's keys. Only for metrics whose value
    # does not depend on the summation order (counts, running sums in row order).
    if one_group:
        return frame.select(*(pl.col(key).first() for key in keys), *metrics)
    return frame.group_by(list(keys)).agg(*metrics)


def _drawdown(frame: pl.DataFrame, keys: list[str], one_group: bool) -> pl.DataFrame:
    # Realized equity moves at every fill (the entry pays its fee, each exit books its PnL);
    # the drawdown is the deepest fall of that curve from its running peak (peak starts at 0).
    equity = pl.col("pnl").cum_sum()
    drawdown = (equity.cum_max().clip(lower_bound=0.0) - equity).max().alias("max_drawdown")
    ordered = frame.sort([*keys, "time_ms", "trade", "sequence"])
    return _aggregate(ordered, keys, one_group, drawdown)


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
    single = {key: _one_value(trades[key]) and _one_value(fills[key]) for key in [*keys, "symbol"]}
    one_symbol = single["symbol"]
    for symbol_keys, label in ((["symbol"], None), ([], "TOTAL")):
        if label is not None and one_symbol:
            parts.append(parts[0].drop("symbol").with_columns(pl.lit(label).alias("symbol")))
            continue
        group = [*keys, *symbol_keys]
        one_group = all(single[key] for key in group)
        # Float sums through group_by always: its summation order, not a select's, so a
        # symbol's figures do not depend on what else was in the run.
        stats = trades.group_by(group).agg(
            pl.len().alias("trades"),
            (pl.col("pnl") > 0).sum().alias("wins"),
            pl.col("pnl").filter(pl.col("pnl") > 0).sum().alias("gross_profit"),
            (-pl.col("pnl").filter(pl.col("pnl") < 0).sum()).alias("gross_loss"),
            pl.col("pnl").sum().alias("net_pnl"),
            pl.col("fees").sum().alias("fees"),
            pl.col("r_multiple").mean().alias("expectancy_r"),
        )
        stats = stats.join(_drawdown(fills, group, one_group), on=group, how="left")
        exits = fills.filter(pl.col("kind") == "exit")
        if not exits.is_empty():
            # One count per exit reason (a handful of them), not a pivot of every exit row.
            reasons = sorted(exits["reason"].unique().to_list())
            counts = _aggregate(
                exits,
                group,
                one_group,
                *((pl.col("reason") == r).sum().alias(f"exits_{r}") for r in reasons),
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
