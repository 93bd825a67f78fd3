"""Where a downloaded series lives on disk, and the manifest that makes downloads resumable.

One Parquet file per symbol, interval and kind, ``SYMBOL_INTERVAL_KIND.parquet`` with the
canonical klines columns (``open_time`` ms, ``open``/``high``/``low``/``close``/``volume``,
``symbol``, ``interval``): exactly what ``pyquant backtest --data DIR`` reads. Beside it a
hidden manifest ``.SYMBOL_INTERVAL_KIND.download.json`` records which open-time spans were
asked of the venue (so a resume fetches only what is missing, and a span where the venue has
no bars is not asked again) and the gaps the venue itself has inside them.

Both files are replaced atomically (write to a temporary name, then ``os.replace``), the
Parquet file before the manifest, so a download killed at any moment leaves a manifest that
never claims more than the file holds.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import polars as pl

KlineKind = Literal["last", "mark"]
KINDS: tuple[KlineKind, ...] = ("last", "mark")
MANIFEST_VERSION = 1

# The canonical schema, in order (pyquant.backtest.validate_klines returns the same).
SCHEMA: dict[str, pl.DataType] = {
    "open_time": pl.Int64(),
    "open": pl.Float64(),
    "high": pl.Float64(),
    "low": pl.Float64(),
    "close": pl.Float64(),
    "volume": pl.Float64(),
    "symbol": pl.String(),
    "interval": pl.String(),
}


def series_path(out_dir: Path, symbol: str, interval: str, kind: KlineKind) -> Path:
    """Return the Parquet file of one series (``BTCUSDT_1m_last.parquet``)."""
    return out_dir / f"{symbol}_{interval}_{kind}.parquet"


def manifest_path(out_dir: Path, symbol: str, interval: str, kind: KlineKind) -> Path:
    """Return the hidden resume manifest beside the series file."""
    return out_dir / f".{symbol}_{interval}_{kind}.download.json"


def merge_spans(spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge half-open ``[start, end)`` spans that touch or overlap, sorted by start."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(s for s in spans if s[1] > s[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def missing_spans(
    wanted: tuple[int, int], covered: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Return the parts of ``wanted`` (half-open) that no covered span holds."""
    start, end = wanted
    out: list[tuple[int, int]] = []
    cursor = start
    for lo, hi in merge_spans(covered):
        if hi <= cursor or lo >= end:
            continue
        if lo > cursor:
            out.append((cursor, min(lo, end)))
        cursor = max(cursor, hi)
        if cursor >= end:
            break
    if cursor < end:
        out.append((cursor, end))
    return out


@dataclass
class Manifest:
    """What a series file holds: the spans asked of the venue and its own gaps.

    Attributes:
        symbol: the exchange symbol.
        interval: the kline interval.
        kind: ``last`` (trade-price klines) or ``mark`` (mark-price klines).
        venue: the REST base URL the bars came from.
        covered: merged half-open ``[start_ms, end_ms)`` spans of open times already fetched.
        gaps: ``[first_missing_open_ms, next_bar_open_ms]`` pairs: bars the venue does not have.
    """

    symbol: str
    interval: str
    kind: KlineKind
    venue: str = ""
    covered: list[tuple[int, int]] = field(default_factory=list)
    gaps: list[tuple[int, int]] = field(default_factory=list)

    def to_json(self) -> str:
        """Return the manifest as a JSON document."""
        return json.dumps(
            {
                "version": MANIFEST_VERSION,
                "symbol": self.symbol,
                "interval": self.interval,
                "kind": self.kind,
                "venue": self.venue,
                "covered": [list(s) for s in self.covered],
                "gaps": [list(g) for g in self.gaps],
            },
            indent=1,
        )

    @classmethod
    def read(cls, path: Path) -> Manifest | None:
        """Read a manifest; None when there is none or it is unreadable (start afresh)."""
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if doc.get("version") != MANIFEST_VERSION:
                return None
            return cls(
                symbol=str(doc["symbol"]),
                interval=str(doc["interval"]),
                kind=doc["kind"],
                venue=str(doc.get("venue", "")),
                covered=[(int(a), int(b)) for a, b in doc["covered"]],
                gaps=[(int(a), int(b)) for a, b in doc["gaps"]],
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None


def empty_frame() -> pl.DataFrame:
    """Return an empty frame of the canonical schema."""
    return pl.DataFrame(schema=SCHEMA)


def read_series(path: Path) -> pl.DataFrame:
    """Read a series file written by :func:`write_atomically` (empty when absent)."""
    if not path.exists():
        return empty_frame()
    frame = pl.read_parquet(path)
    return frame.select(pl.col(name).cast(dtype) for name, dtype in SCHEMA.items())


def _replace(path: Path, write: object) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp makes the file owner-only; market data is not a secret (the umask decides).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        if isinstance(write, pl.DataFrame):
            write.write_parquet(tmp)
        else:
            Path(tmp).write_text(str(write), encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomically(out_dir: Path, frame: pl.DataFrame, manifest: Manifest) -> tuple[Path, Path]:
    """Replace the series file, then its manifest; return both paths.

    A series without bars (a symbol listed after the span asked for) gets only its manifest:
    an empty file would be refused by the backtest, and the manifest alone keeps the span
    from being asked again.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    data = series_path(out_dir, manifest.symbol, manifest.interval, manifest.kind)
    meta = manifest_path(out_dir, manifest.symbol, manifest.interval, manifest.kind)
    if frame.height:
        _replace(data, frame)
    _replace(meta, manifest.to_json())
    return data, meta
