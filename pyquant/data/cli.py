r"""``pyquant data``: get klines and exchange info from a venue for ``pyquant backtest``.

Examples::

    pyquant data download --symbols BTCUSDT ETHUSDT --interval 1m --days 30 --out data
    pyquant data download --all-trading --interval 1h --start 2024-01-01 --end 2024-07-01 \
        --kind mark --out data --config mainnet.toml
    pyquant data exchange-info --out exchangeInfo.json --config mainnet.toml
    pyquant backtest --data data --exchange-info exchangeInfo.json --out runs/a

The venue is the one ``--config`` names (``exchange`` and ``[venue] rest_url``, as for
``pyquant run``); without it, the built-in simulator is started in this process, so the
commands work offline. Klines are public: no API key is needed, and mainnet needs no
confirmation because nothing is traded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gzip
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table

from pyquant.config import Config, load_config
from pyquant.data.download import (
    INTERVAL_MS,
    KlinesDownloader,
    RetryPolicy,
    SeriesResult,
    interval_length_ms,
    with_retries,
)
from pyquant.data.layout import KINDS, KlineKind
from pyquant.errors import ConfigError, ExchangeError, PyquantError
from pyquant.exchange.client import BinanceClient

_DAY_MS = 86_400_000
_EXAMPLES = """examples:
  pyquant data download --symbols BTCUSDT ETHUSDT --interval 1m --days 30 --out data
  pyquant data download --all-trading --interval 1h --start 2024-01-01 --end 2024-07-01 \\
      --kind mark --out data --config mainnet.toml
  pyquant data exchange-info --out exchangeInfo.json --config mainnet.toml
  pyquant backtest --data data --exchange-info exchangeInfo.json --out runs/a"""


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Download klines and exchange info from the venue for pyquant backtest. The "
            "venue is the one --config names (exchange, [venue] rest_url); without it the "
            "built-in simulator. No API key is needed."
        ),
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    down = sub.add_parser(
        "download",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="page the venue's klines into one parquet file per symbol (resumable)",
        description=(
            "Page the venue's REST klines (1500 bars a request, paced by the "
            "X-MBX-USED-WEIGHT-1M header, 429/418 and dropped connections retried) into "
            "DIR/SYMBOL_INTERVAL_KIND.parquet, the layout pyquant backtest --data DIR reads. "
            "A second run resumes: only missing bars are asked for, none is duplicated. "
            "Gaps the venue itself has are recorded in DIR/.SYMBOL_INTERVAL_KIND.download.json "
            "and reported, never filled in. Only closed bars are written."
        ),
    )
    who = down.add_mutually_exclusive_group(required=True)
    who.add_argument("--symbols", nargs="+", metavar="SYMBOL", help="symbols such as BTCUSDT")
    who.add_argument(
        "--all-trading",
        action="store_true",
        help="every perpetual whose status is TRADING in the venue's exchange info",
    )
    down.add_argument(
        "--interval",
        default="1m",
        choices=list(INTERVAL_MS),
        help="kline interval (default 1m)",
    )
    down.add_argument(
        "--start", metavar="DATE", help="first bar, UTC: 2024-01-01 or 2024-01-01T12:00"
    )
    down.add_argument("--end", metavar="DATE", help="bars closed before this, UTC (default: now)")
    down.add_argument(
        "--days",
        type=int,
        metavar="N",
        help="the last N days before --end (default 30 when --start is not given)",
    )
    down.add_argument(
        "--kind",
        choices=list(KINDS),
        default="last",
        help="last: trade-price klines; mark: mark-price klines (default last)",
    )
    down.add_argument("--out", default="data", metavar="DIR", help="directory (default ./data)")
    down.add_argument(
        "--config", metavar="FILE", help="daemon config naming the venue (default: simulator)"
    )
    down.add_argument(
        "--concurrency",
        type=int,
        default=2,
        metavar="N",
        help="symbols downloaded at once (default 2; the weight budget is shared)",
    )
    down.add_argument(
        "--page-size",
        type=int,
        default=1500,
        metavar="N",
        help="bars per request, 1 to 1500 (default 1500, the most Binance sends)",
    )
    info = sub.add_parser(
        "exchange-info",
        help="save the venue's current exchangeInfo (for pyquant backtest --exchange-info)",
        description=(
            "Save the venue's current GET /fapi/v1/exchangeInfo document as it is sent "
            "(plain JSON, or gzip when FILE ends in .gz)."
        ),
    )
    info.add_argument("--out", required=True, metavar="FILE", help="where to write it")
    info.add_argument(
        "--config", metavar="FILE", help="daemon config naming the venue (default: simulator)"
    )
    return parser


def parse_time(text: str, flag: str) -> int:
    """Read a UTC date or date-time (``2024-01-01``, ``2024-01-01T12:00``) as epoch ms.

    Raises:
        ConfigError: the text is not such a date; the message names the flag.
    """
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"{flag} {text!r}: not a date; use 2024-01-01 or 2024-01-01T12:00 (UTC)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp() * 1000)


def _span(args: argparse.Namespace, now_ms: int) -> tuple[int, int]:
    end = parse_time(args.end, "--end") if args.end else now_ms
    if args.days is not None and args.days <= 0:
        raise ConfigError(f"--days {args.days}: must be a positive number of days")
    if args.start and args.days is not None:
        raise ConfigError("--start and --days both given: name the first bar one way only")
    start = parse_time(args.start, "--start") if args.start else end - (args.days or 30) * _DAY_MS
    if start >= end:
        raise ConfigError(
            f"--start {_fmt(start)} is not before --end {_fmt(end)}: nothing to download"
        )
    return start, end


def _fmt(ms: int | None) -> str:
    if ms is None:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M")


def _load(path: str | None) -> Config:
    # Klines and exchange info are public: no keys needed, nothing traded on mainnet.
    return load_config(path, confirm_mainnet=True, need_keys=False)


@contextlib.asynccontextmanager
async def open_venue(config: Config) -> AsyncIterator[BinanceClient]:
    """Yield a keyless REST client of the configured venue (a fresh simulator for ``sim``)."""
    async with contextlib.AsyncExitStack() as stack:
        if config.exchange == "sim" and not config.venue.rest_url:
            from pyquant import sim as sim_module

            venue = await stack.enter_async_context(
                sim_module.serve(data=list(config.sim.data) or None, seed=config.sim.seed)
            )
            rest_url = venue.rest_url
        else:
            rest_url = config.rest_url
        client = await stack.enter_async_context(
            BinanceClient(rest_url, "", "", timeout_s=config.venue.timeout_s)
        )
        yield client


def _symbols(info: bytes, args: argparse.Namespace) -> list[str]:
    doc = orjson.loads(info)
    listed = {str(s.get("symbol")): s for s in doc.get("symbols", [])}
    if args.all_trading:
        return sorted(
            name
            for name, s in listed.items()
            if s.get("status") == "TRADING" and s.get("contractType") == "PERPETUAL"
        )
    wanted = [s.upper() for s in args.symbols]
    unknown = [s for s in wanted if s not in listed]
    if unknown:
        raise ConfigError(
            f"--symbols: {', '.join(unknown)} not listed by the venue's exchange info "
            f"({len(listed)} symbols)"
        )
    return list(dict.fromkeys(wanted))


async def _download(args: argparse.Namespace, console: Console) -> list[SeriesResult]:
    interval_length_ms(args.interval)
    if args.concurrency < 1:
        raise ConfigError(f"--concurrency {args.concurrency}: must be at least 1")
    config = _load(args.config)
    out = Path(args.out)
    async with open_venue(config) as client:
        downloader = KlinesDownloader(client, out, retry=RetryPolicy(), page_limit=args.page_size)
        info = await downloader.exchange_info()  # also sets the weight budget (rateLimits)
        symbols = _symbols(info, args)
        now = await downloader.server_time_ms()
        start, end = _span(args, now)
        kind: KlineKind = args.kind
        gate = asyncio.Semaphore(args.concurrency)
        with Progress(
            TextColumn("[bold]{task.description:<14}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=console,
            disable=not console.is_terminal,
        ) as bar:
            tasks: dict[str, TaskID] = {s: bar.add_task(s, total=None) for s in symbols}

            def update(symbol: str, done: int, total: int) -> None:
                bar.update(tasks[symbol], completed=done, total=total)

            async def one(symbol: str) -> SeriesResult:
                async with gate:
                    return await downloader.download(
                        symbol, args.interval, kind, start, end, now_ms=now, progress=update
                    )

            return list(await asyncio.gather(*(one(s) for s in symbols)))


def _report(console: Console, results: Sequence[SeriesResult], out: str) -> None:
    table = Table(title=f"klines in {out}")
    for name in ("symbol", "bars", "new", "gaps", "first bar", "last bar", "retries", "note"):
        table.add_column(name, justify="left" if name in ("symbol", "note") else "right")
    for r in results:
        missing = sum((b - a) for a, b in r.gaps) // max(1, INTERVAL_MS[r.interval])
        gaps = f"{len(r.gaps)} ({missing} bars)" if r.gaps else "0"
        table.add_row(
            r.symbol,
            f"{r.bars:,}",
            f"{r.fetched:,}",
            gaps,
            _fmt(r.first_ms),
            _fmt(r.last_ms),
            str(r.retries),
            r.error or "",
        )
    console.print(table)


async def _fetch_exchange_info(args: argparse.Namespace) -> bytes:
    config = _load(args.config)
    async with open_venue(config) as client:
        raw = await with_retries(client.exchange_info, RetryPolicy(), what="exchangeInfo")
        try:
            orjson.loads(raw)["symbols"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(
                f"the venue at {client.rest_url} sent no exchangeInfo document"
            ) from None
    return raw


def _write_exchange_info(raw: bytes, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(gzip.compress(raw) if out.suffix == ".gz" else raw)
    return out


def run(argv: Sequence[str], *, prog: str = "pyquant data", console: Console | None = None) -> int:
    """Run ``pyquant data``; raise PyquantError on bad input."""
    args = _parser(prog).parse_args(list(argv))
    if console is None:
        console = Console()
        if not console.is_terminal:
            console.width = 140
    try:
        if args.action == "exchange-info":
            path = _write_exchange_info(asyncio.run(_fetch_exchange_info(args)), Path(args.out))
            console.print(f"wrote {path}")
            return 0
        results = asyncio.run(_download(args, console))
    except ExchangeError as exc:
        raise ConfigError(f"the venue failed: {exc}") from exc
    _report(console, results, args.out)
    failed = [r for r in results if r.error]
    if failed:
        console.print(
            f"{len(failed)} series stopped early (saved so far; run the same command again "
            "to resume)",
            style="bold yellow",
        )
        return 1
    return 0


def run_command(command: str, argv: Sequence[str]) -> int:
    """Entry point of ``pyquant data``: 0 on success, 1 when a series stopped, 2 on bad input."""
    try:
        return run(argv, prog=f"pyquant {command}")
    except PyquantError as exc:
        print(f"pyquant {command}: error: {exc}", file=sys.stderr)
        return 2
