"""Download klines from a venue's REST API into the backtest layout, resuming from disk.

``GET /fapi/v1/klines`` (kind ``last``) or ``/fapi/v1/markPriceKlines`` (kind ``mark``) is
paged forward with ``startTime``/``endTime`` and ``limit=1500`` (weight 10 a page). Pacing and
errors are the signed client's (``pyquant.exchange.client.BinanceClient``, used without keys):
the used weight is read from every ``X-MBX-USED-WEIGHT-1M`` header and pages are deferred to
the next minute past 80 % of the venue's REQUEST_WEIGHT limit; a 429/418 makes every call wait
out ``Retry-After``. A dropped connection, a 5xx or a rate-limit answer is retried here with
capped exponential back-off; nothing a page brings is lost, because the page is simply asked
for again from the same cursor.

Only closed bars are kept (close time before the venue's clock and before ``end``). Resume:
the manifest (``pyquant.data.layout``) lists the spans already asked for, so a second run
(or a run after a crash) asks only for the rest and merges on ``open_time``, which leaves no
duplicate and no hole. A step of more than one interval between two bars inside what was
asked is a gap the venue itself has: it is recorded in the manifest and reported, never
filled in. Bars before the venue's first one (a symbol listed after ``start``) are neither.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import polars as pl

from pyquant.data.layout import (
    SCHEMA,
    KlineKind,
    Manifest,
    manifest_path,
    merge_spans,
    missing_spans,
    read_series,
    series_path,
    write_atomically,
)
from pyquant.errors import ConfigError, ExchangeError, RetryableError
from pyquant.exchange.client import BinanceClient, ParamValue
from pyquant.exchange.codes import RateLimited

logger = logging.getLogger(__name__)

T = TypeVar("T")
PAGE_LIMIT = 1500
_MINUTE_MS = 60_000
# Every fixed-length Binance kline interval (1M, a calendar month, has no fixed length).
INTERVAL_MS: dict[str, int] = {
    "1m": _MINUTE_MS,
    "3m": 3 * _MINUTE_MS,
    "5m": 5 * _MINUTE_MS,
    "15m": 15 * _MINUTE_MS,
    "30m": 30 * _MINUTE_MS,
    "1h": 60 * _MINUTE_MS,
    "2h": 120 * _MINUTE_MS,
    "4h": 240 * _MINUTE_MS,
    "6h": 360 * _MINUTE_MS,
    "8h": 480 * _MINUTE_MS,
    "12h": 720 * _MINUTE_MS,
    "1d": 1440 * _MINUTE_MS,
    "3d": 3 * 1440 * _MINUTE_MS,
    "1w": 7 * 1440 * _MINUTE_MS,
}
_PATHS: dict[str, str] = {"last": "/fapi/v1/klines", "mark": "/fapi/v1/markPriceKlines"}

ProgressCallback = Callable[[str, int, int], None]  # (symbol, bars done, bars expected)


def interval_length_ms(interval: str) -> int:
    """Return the length of a Binance kline interval, refusing the ones a backtest cannot use.

    Raises:
        ConfigError: not a Binance interval, or ``1M`` (a calendar month has no fixed length).
    """
    if interval == "1M":
        raise ConfigError(
            "--interval 1M: a calendar month has no fixed length; backtests need a fixed "
            "interval (use 1w or shorter)"
        )
    try:
        return INTERVAL_MS[interval]
    except KeyError:
        raise ConfigError(
            f"--interval {interval!r}: not a Binance kline interval; one of "
            f"{', '.join(INTERVAL_MS)}"
        ) from None


@dataclass
class RetryPolicy:
    """How often and how long a failing page is asked again.

    Attributes:
        attempts: tries per page before the download of that symbol stops (its progress is
            saved; the next run resumes).
        base_s: first back-off; doubled per failure.
        cap_s: longest back-off between two tries.
    """

    attempts: int = 10
    base_s: float = 0.25
    cap_s: float = 15.0

    def delay_s(self, failure: int) -> float:
        """Back-off before try ``failure + 1``."""
        return float(min(self.cap_s, self.base_s * (2 ** max(0, failure - 1))))


async def with_retries(
    call: Callable[[], Awaitable[T]],
    retry: RetryPolicy,
    *,
    what: str,
    on_retry: Callable[[], None] | None = None,
) -> T:
    """Await ``call()``, asking again after a rate limit, a dropped connection or a 5xx.

    Raises:
        RetryableError: still failing after ``retry.attempts`` tries.
        ExchangeError: any other answer of the venue (not retried).
    """
    failures = 0
    while True:
        try:
            return await call()
        except RetryableError as exc:
            failures += 1
            if failures >= retry.attempts:
                raise
            if on_retry is not None:
                on_retry()
            # A rate limit sets the client's own wait (Retry-After, honoured before its next
            # request); a dropped connection or a 5xx waits here.
            delay = 0.0 if isinstance(exc, RateLimited) else retry.delay_s(failures)
            logger.warning(
                "Request failed, asking again what=%s try=%d code=%s wait_s=%.2f",
                what,
                failures + 1,
                exc.code,
                delay,
            )
            await asyncio.sleep(delay)


@dataclass
class SeriesResult:
    """What one series download did.

    Attributes:
        symbol, interval, kind: the series.
        path: the Parquet file.
        bars: bars in the file now.
        fetched: bars received in this run (before de-duplication).
        first_ms, last_ms: open times of the first and last bar in the file (None: empty).
        gaps: the venue's own gaps, ``(first missing open, next bar open)``.
        requests: kline pages asked for in this run (retries included).
        retries: pages asked again after a rate limit or a dropped connection.
        error: why the download stopped early, or None.
    """

    symbol: str
    interval: str
    kind: KlineKind
    path: Path
    bars: int = 0
    fetched: int = 0
    first_ms: int | None = None
    last_ms: int | None = None
    gaps: list[tuple[int, int]] = field(default_factory=list)
    requests: int = 0
    retries: int = 0
    error: str | None = None


def _rows_to_frame(rows: list[list[Any]], symbol: str, interval: str) -> pl.DataFrame:
    if not rows:
        return pl.DataFrame(schema=SCHEMA)
    return pl.DataFrame(
        {
            "open_time": [int(r[0]) for r in rows],
            # Binance sends decimal strings; float64 is the backtest's bar type.
            "open": [float(r[1]) for r in rows],
            "high": [float(r[2]) for r in rows],
            "low": [float(r[3]) for r in rows],
            "close": [float(r[4]) for r in rows],
            "volume": [float(r[5]) for r in rows],
            "symbol": [symbol] * len(rows),
            "interval": [interval] * len(rows),
        },
        schema=SCHEMA,
    )


def find_gaps(open_times: list[int], step_ms: int) -> list[tuple[int, int]]:
    """Return ``(first missing open, next bar open)`` for every step longer than one bar."""
    return [(a + step_ms, b) for a, b in itertools.pairwise(open_times) if b - a > step_ms]


class KlinesDownloader:
    """Download series from one venue into one directory.

    Args:
        client: a REST client of the venue (no keys needed: klines are public).
        out_dir: the directory of the series files.
        retry: back-off of failing pages.
        checkpoint_s: the file and manifest are rewritten at least this often while pages
            arrive, so a crash loses at most this much work.
        page_limit: bars asked for per request (Binance allows 1 to 1500).
        clock_ms: the local wall clock (only a fallback when the venue's time is unknown).
    """

    def __init__(
        self,
        client: BinanceClient,
        out_dir: Path,
        *,
        retry: RetryPolicy | None = None,
        checkpoint_s: float = 2.0,
        page_limit: int = PAGE_LIMIT,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self.client = client
        self.out_dir = out_dir
        self.retry = retry or RetryPolicy()
        self.checkpoint_s = checkpoint_s
        if not 1 <= page_limit <= PAGE_LIMIT:
            raise ConfigError(f"--page-size {page_limit}: must be from 1 to {PAGE_LIMIT}")
        self.page_limit = page_limit
        self._clock_ms = clock_ms

    async def _call(self, result: SeriesResult, call: Callable[[], Awaitable[T]]) -> T:
        def counted() -> Awaitable[T]:
            result.requests += 1
            return call()

        def retried() -> None:
            result.retries += 1

        return await with_retries(counted, self.retry, what=result.symbol, on_retry=retried)

    async def exchange_info(self) -> bytes:
        """The venue's exchangeInfo (retried like a page); it also sets the weight budget."""
        return await with_retries(self.client.exchange_info, self.retry, what="exchangeInfo")

    async def server_time_ms(self) -> int:
        """The venue's clock (the local one if the venue does not answer)."""
        try:
            return await with_retries(self.client.server_time_ms, self.retry, what="time")
        except ExchangeError:
            return self._clock_ms()

    async def download(
        self,
        symbol: str,
        interval: str,
        kind: KlineKind,
        start_ms: int,
        end_ms: int,
        *,
        now_ms: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> SeriesResult:
        """Bring one series up to ``[start_ms, end_ms)`` of open times, resuming from disk.

        Args:
            symbol: the exchange symbol.
            interval: a fixed-length Binance interval (``1m`` ... ``1w``).
            kind: ``last`` or ``mark``.
            start_ms: first open time wanted.
            end_ms: bars must close before this (exclusive).
            now_ms: the venue's clock (bars still open then are not kept).
            progress: called with (symbol, bars so far, bars expected).

        Returns:
            What was done; ``error`` is set when the venue kept failing (progress is saved).
        """
        step = interval_length_ms(interval)
        now = now_ms if now_ms is not None else await self.server_time_ms()
        # Only bars closed by both `end` and the venue's clock: [start, stop) of open times.
        stop = min(end_ms, now) - step + 1
        path = series_path(self.out_dir, symbol, interval, kind)
        result = SeriesResult(symbol, interval, kind, path)
        frame = read_series(path)
        manifest = Manifest.read(manifest_path(self.out_dir, symbol, interval, kind))
        if manifest is None:
            manifest = Manifest(symbol, interval, kind)
            if frame.height:  # a file without its manifest: it covers its own first..last bar
                times = frame["open_time"]
                manifest.covered = [(int(times.min()), int(times.max()) + step)]  # type: ignore[arg-type]
        manifest.venue = self.client.rest_url
        todo = missing_spans((start_ms, stop), manifest.covered) if stop > start_ms else []
        expected = max(0, (stop - start_ms + step - 1) // step)
        done_before = frame.filter(
            (pl.col("open_time") >= start_ms) & (pl.col("open_time") < stop)
        ).height
        pages: list[pl.DataFrame] = []
        fetched_spans: list[tuple[int, int]] = []
        last_save = time.monotonic()

        def save() -> None:
            nonlocal frame, pages, fetched_spans
            if pages:
                frame = (
                    pl.concat([frame, *pages], how="vertical")
                    .unique("open_time", keep="last")
                    .sort("open_time")
                )
            manifest.covered = merge_spans([*manifest.covered, *fetched_spans])
            manifest.gaps = _gaps_inside(frame, step, manifest.covered)
            write_atomically(self.out_dir, frame, manifest)
            pages, fetched_spans = [], []

        if progress is not None:
            progress(symbol, done_before, expected)
        try:
            for lo, hi in todo:
                cursor = lo
                while cursor < hi:
                    params: dict[str, ParamValue] = {
                        "symbol": symbol,
                        "interval": interval,
                        "startTime": cursor,
                        "endTime": hi - 1,
                        "limit": self.page_limit,
                    }
                    page = functools.partial(
                        self.client.request, "GET", _PATHS[kind], params, essential=False
                    )
                    rows: list[list[Any]] = await self._call(result, page)
                    kept = [r for r in rows if cursor <= int(r[0]) < hi]
                    if kept:
                        pages.append(_rows_to_frame(kept, symbol, interval))
                        result.fetched += len(kept)
                    if len(rows) < self.page_limit or not kept:
                        fetched_spans.append((cursor, hi))
                        cursor = hi
                    else:
                        nxt = int(kept[-1][0]) + step
                        fetched_spans.append((cursor, nxt))
                        cursor = nxt
                    if progress is not None:
                        progress(symbol, min(expected, done_before + result.fetched), expected)
                    if time.monotonic() - last_save >= self.checkpoint_s:
                        save()
                        last_save = time.monotonic()
        except ExchangeError as exc:
            result.error = f"{type(exc).__name__} {exc.code}: {exc}"
        save()
        result.bars = frame.height
        if frame.height:
            result.first_ms = int(frame["open_time"][0])
            result.last_ms = int(frame["open_time"][-1])
        result.gaps = list(manifest.gaps)
        return result


def _gaps_inside(
    frame: pl.DataFrame, step: int, covered: list[tuple[int, int]]
) -> list[tuple[int, int]]:
    # A step between two bars is the venue's gap only when everything between was asked for.
    gaps = find_gaps(frame["open_time"].to_list(), step)
    return [(a, b) for a, b in gaps if any(lo <= a and b <= hi for lo, hi in covered)]
