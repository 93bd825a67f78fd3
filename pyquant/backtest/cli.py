r"""``pyquant backtest``: replay klines through the exit engine, one policy or a grid of them.

Examples::

    pyquant backtest --data BTCUSDT_1m_last.parquet ETHUSDT_1m_last.parquet --out runs/a --plot
    pyquant backtest --data data/*_1m_last.parquet --exchange-info exchangeInfo.json \\
        --grid stop_atr=1.5,2,3 --grid trail_atr=1,2 --sort-by profit_factor --out runs/grid

Without ``--exchange-info`` the filters come from the exchangeInfo snapshot bundled with the
simulator (647 USDⓈ-M symbols, see ``pyquant/sim/data/SOURCES.md``).
"""

from __future__ import annotations

import argparse
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import polars as pl
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pyquant import _core
from pyquant import backtest as bt
from pyquant.errors import ConfigError, PyquantError

_SUMMARY_COLUMNS = (
    "symbol",
    "trades",
    "win_rate",
    "profit_factor",
    "expectancy_r",
    "net_pnl",
    "fees",
    "max_drawdown",
)


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Replay historical klines through the same Rust exit engine as the daemon. "
            "Writes trades.parquet, positions.parquet, summary.json and equity.png to --out."
        ),
    )
    parser.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="PATH",
        help=(
            "klines files or directories, one or more symbols, same interval: our "
            "SYMBOL_INTERVAL_KIND.parquet|csv (what pyquant data download writes), freqtrade "
            "data (BTC_USDT_USDT-1m-futures.feather, -mark, .parquet/.json/.json.gz) or "
            "Binance public-data archives (BTCUSDT-1m-2024-01.zip and their CSVs)"
        ),
    )
    parser.add_argument(
        "--kind",
        choices=["last", "mark"],
        help="where a directory holds both, use trade-price (last) or mark-price klines",
    )
    parser.add_argument(
        "--interval",
        metavar="INTERVAL",
        help="where a directory holds several intervals, the one to replay (1m, 5m, 1h ...)",
    )
    parser.add_argument(
        "--fine",
        nargs="+",
        default=[],
        metavar="FILE",
        help="finer klines of the same symbols that resolve each bar's high/low order",
    )
    parser.add_argument(
        "--exchange-info",
        metavar="FILE",
        help=(
            "a futures exchangeInfo JSON document, plain or .gz (ticks, steps, min notional); "
            "default: the snapshot bundled with the simulator"
        ),
    )
    policy = parser.add_mutually_exclusive_group()
    policy.add_argument("--policy", metavar="FILE", help="exit policy TOML (ExitPolicy fields)")
    policy.add_argument(
        "--preset", default="standard", help="named exit policy (default: standard)"
    )
    entries = parser.add_mutually_exclusive_group()
    entries.add_argument(
        "--entries", metavar="FILE", help="intents JSONL (time, symbol, side, confidence)"
    )
    entries.add_argument(
        "--strategy", choices=["momentum24h"], help="built-in entry rule (default)"
    )
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="NAME=V1,V2,...",
        help="sweep an ExitPolicy field; repeat for more fields (all combinations)",
    )
    parser.add_argument(
        "--fees",
        default="0.0002,0.0005",
        metavar="MAKER,TAKER",
        help="fee rates (default 0.0002,0.0005)",
    )
    parser.add_argument(
        "--entry-liquidity",
        choices=["taker", "maker"],
        default="taker",
        help="fee side of entries (exits are MARKET orders and pay taker)",
    )
    parser.add_argument(
        "--notional",
        default="1000",
        metavar="USDT",
        help="size of each entry in USDT unless the intent says (default 1000)",
    )
    parser.add_argument("--leverage", type=int, default=10, help="default leverage (default 10)")
    parser.add_argument(
        "--intrabar",
        choices=["stop_first", "target_first"],
        default="stop_first",
        help="which extreme a bar visits first without finer data (default stop_first)",
    )
    parser.add_argument(
        "--max-gap-bars",
        type=int,
        default=0,
        metavar="N",
        help="missing bars tolerated before a gap ends the segment (default 0)",
    )
    parser.add_argument(
        "--sort-by",
        default="expectancy_r",
        metavar="METRIC",
        help="grid: the metric to rank combinations by (default expectancy_r)",
    )
    parser.add_argument(
        "--heatmap",
        metavar="X,Y",
        help="grid: the two fields of the heat map (default: the first two)",
    )
    parser.add_argument("--top", type=int, default=20, help="grid: rows to print (default 20)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument(
        "--plot",
        action="store_true",
        help="also draw a chart per symbol (needs the plot extra: matplotlib)",
    )
    return parser


def _fees(text: str) -> tuple[Decimal, Decimal]:
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise InvalidOperation
        maker, taker = (Decimal(p.strip()) for p in parts)
    except InvalidOperation:
        raise ConfigError(
            f"--fees was {text!r}: must be MAKER,TAKER rates such as 0.0002,0.0005"
        ) from None
    return maker, taker


def _policy_fields(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"--policy {path}: cannot be read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--policy {path}: not valid TOML: {exc}") from exc
    # A daemon config keeps the policy under [exit]; a policy file may be the table itself.
    table = document.get("exit", document)
    if not isinstance(table, dict):
        raise ConfigError(f"--policy {path}: [exit] must be a table of ExitPolicy fields")
    return table


def _base_fields(args: argparse.Namespace) -> dict[str, Any]:
    if args.policy is not None:
        return _policy_fields(args.policy)
    preset = _core.ExitPolicy.preset(args.preset)
    fields: dict[str, Any] = preset.to_dict()
    return fields


@contextmanager
def _progress(console: Console, label: str) -> Iterator[bt.ProgressCallback]:
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 100 else f"{value:,.2f}"
    return str(value)


def _print_table(console: Console, title: str, frame: pl.DataFrame, columns: Sequence[str]) -> None:
    table = Table(title=title)
    shown = [c for c in columns if c in frame.columns]
    for name in shown:
        table.add_column(name, justify="left" if name == "symbol" else "right")
    for row in frame.select(shown).iter_rows():
        table.add_row(*(_cell(v) for v in row))
    console.print(table)


def _load(
    paths: Sequence[str], console: Console, *, kind: str | None, interval: str | None
) -> list[pl.DataFrame]:
    with _progress(console, "loading klines") as update:
        update(0, 1)
        frames = bt.load_data(paths, kind=kind, interval=interval)  # type: ignore[arg-type]
        update(1, 1)
    return frames


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401 - only asking whether it is there
    except ImportError:
        return False
    return True


_NO_CHARTS = "{what} skipped: matplotlib is not installed (pip install 'pyquant[plot]')"


def run(
    argv: Sequence[str], *, prog: str = "pyquant backtest", console: Console | None = None
) -> int:
    """Run the command with parsed arguments; raise PyquantError on bad input."""
    args = _parser(prog).parse_args(list(argv))
    # Charts are an extra (matplotlib): without it the tables and files are still written.
    charts = _have_matplotlib()
    if args.plot and not charts:
        raise ConfigError(
            "--plot needs matplotlib, which is not installed; install the extra: "
            "pip install 'pyquant[plot]'"
        )
    if console is None:
        console = Console()
        if not console.is_terminal:
            # Piped output would wrap the tables at 80 columns; a log file has room.
            console.width = 160
    maker, taker = _fees(args.fees)
    try:
        notional = Decimal(args.notional)
    except InvalidOperation:
        raise ConfigError(f"--notional was {args.notional!r}: must be a USDT amount") from None
    config = bt.BacktestConfig(
        maker_fee=maker,
        taker_fee=taker,
        entry_liquidity=args.entry_liquidity,
        notional_usd=notional,
        leverage=args.leverage,
        intrabar=args.intrabar,
        max_gap_bars=args.max_gap_bars,
    )
    rules, rules_source = bt.load_exchange_rules(args.exchange_info)
    klines = _load(args.data, console, kind=args.kind, interval=args.interval)
    fine = (
        {str(f["symbol"][0]): f for f in bt.load_data(args.fine, kind=args.kind)}
        if args.fine
        else {}
    )
    bt.check_symbols(rules, [str(f["symbol"][0]) for f in klines] + list(fine), source=rules_source)
    entries = bt.load_intents(args.entries) if args.entries else None
    strategy = None if entries is not None else (args.strategy or "momentum24h")
    base = _base_fields(args)
    out = Path(args.out)
    inputs = {
        "data": list(args.data),
        "fine": list(args.fine),
        "entries": args.entries,
        "strategy": strategy,
        "policy_file": args.policy,
        "preset": None if args.policy else args.preset,
        "exchange_info": rules_source,
    }
    started = time.perf_counter()

    if args.grid:
        grid = bt.parse_grid(args.grid)
        with _progress(console, "grid") as update:
            table = bt.run_grid(
                klines,
                base,
                grid,
                rules,
                entries=entries,
                strategy=strategy,
                config=config,
                fine=fine,
                sort_by=args.sort_by,
                progress=update,
            )
        elapsed = time.perf_counter() - started
        out.mkdir(parents=True, exist_ok=True)
        table.write_parquet(out / "grid.parquet")
        table.write_csv(out / "grid.csv")
        names = list(grid)
        if args.heatmap:
            names = [n.strip() for n in args.heatmap.split(",")]
            if len(names) != 2 or any(n not in grid for n in names):
                raise ConfigError(f"--heatmap was {args.heatmap!r}: name two --grid fields as X,Y")
        if len(names) >= 2 and charts:
            bt.plot_heatmap(table, names[0], names[1], args.sort_by, out / "heatmap.png")
        elif len(names) >= 2:
            console.print(_NO_CHARTS.format(what="heatmap.png"), style="yellow", markup=False)
        _print_table(
            console,
            f"grid: {table.height} combinations x {len(klines)} symbols, "
            f"sorted by {args.sort_by} ({elapsed:.1f} s)",
            table.head(args.top),
            [*names, *_SUMMARY_COLUMNS[1:]],
        )
        console.print(f"wrote {out / 'grid.parquet'}")
        return 0

    policy = _core.ExitPolicy(**base)
    with _progress(console, "backtest") as update:
        result = bt.run_backtest(
            klines,
            policy,
            rules,
            entries=entries,
            strategy=strategy,
            config=config,
            fine=fine,
            progress=update,
            # The files keep each fill's trigger and mark price; charts need the stop path.
            detail=True,
        )
    elapsed = time.perf_counter() - started
    written = bt.write_outputs(
        result, out, config=config, inputs=inputs, klines=klines, plot=args.plot, equity_png=charts
    )
    if not charts:
        console.print(_NO_CHARTS.format(what="equity.png"), style="yellow", markup=False)
    _print_table(
        console,
        f"backtest: {len(klines)} symbols, {result.trades.height} positions, "
        f"{result.evaluations:,} bar x position evaluations ({elapsed:.1f} s)",
        result.summary,
        _SUMMARY_COLUMNS,
    )
    exits = [c for c in result.summary.columns if c.startswith("exits_")]
    if exits:
        by_reason = result.summary.rename({c: c.removeprefix("exits_") for c in exits})
        reasons = [c.removeprefix("exits_") for c in exits]
        _print_table(console, "exits by reason", by_reason, ["symbol", *reasons])
    for warning in result.warnings:
        console.print(f"warning: {warning}", style="bold yellow", markup=False)
    for path in written.values():
        console.print(f"wrote {path}")
    return 0


def run_command(command: str, argv: Sequence[str]) -> int:
    """Entry point of ``pyquant backtest``: 0 on success, 2 on bad input (message on stderr)."""
    try:
        return run(argv, prog=f"pyquant {command}")
    except PyquantError as exc:
        print(f"pyquant {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyError as exc:  # UnknownSymbolError is a KeyError: name the symbol plainly
        print(f"pyquant {command}: error: {exc}", file=sys.stderr)
        return 2
