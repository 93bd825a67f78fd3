"""Terminal dashboard (rich Live): positions, latest actions and rejections, feed health.

The daemon hands it a function returning ``DashboardData``; the dashboard redraws a few
times a second from it and never touches trading state itself. Prices arrive as the exact
decimal strings the engine and store keep; PnL is computed here with ``Decimal``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from pyquant.daemon.metrics import FeedStatus


@dataclass(frozen=True, slots=True)
class PositionLine:
    """One open position as shown.

    Attributes:
        position_id: our id.
        symbol: the symbol.
        side: LONG or SHORT.
        size: open quantity.
        entry: entry price.
        mark: last mark price (None before the first update).
        stop: the engine's stop.
        next_take_profit: the next ladder level's price (None when the ladder is done).
        trailing: trailing state in words (``off``, ``active``).
    """

    position_id: str
    symbol: str
    side: str
    size: str
    entry: str
    mark: str | None
    stop: str | None
    next_take_profit: str | None
    trailing: str

    @property
    def pnl(self) -> Decimal | None:
        """Return unrealized PnL at the mark (USDT), or None without a mark."""
        try:
            mark = Decimal(self.mark) if self.mark is not None else None
            entry, size = Decimal(self.entry), Decimal(self.size)
        except InvalidOperation:
            return None
        if mark is None:
            return None
        sign = 1 if self.side == "LONG" else -1
        return (mark - entry) * size * sign


@dataclass(frozen=True, slots=True)
class DashboardData:
    """Everything one frame shows."""

    title: str
    position_mode: str | None
    positions: Sequence[PositionLine]
    recent: Sequence[Mapping[str, Any]]
    feeds: Mapping[str, FeedStatus]
    latency_ms: Mapping[str, float | None]
    summary: Mapping[str, Any] = field(default_factory=dict)
    shadow: bool = False


def _fmt(value: object) -> str:
    return "-" if value is None else str(value)


def _time(ms: object) -> str:
    if not isinstance(ms, int):
        return ""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%H:%M:%S")


def render(data: DashboardData) -> Group:
    """Build one frame."""
    positions = Table(title=f"Open positions ({len(data.positions)})", expand=True)
    for name in (
        "id",
        "symbol",
        "side",
        "size",
        "entry",
        "mark",
        "PnL",
        "stop",
        "next TP",
        "trail",
    ):
        # Prices must never be cut to an ellipsis: on a narrow terminal they wrap instead.
        positions.add_column(
            name,
            justify="right" if name not in ("symbol", "side", "trail") else "left",
            overflow="fold",
        )
    for line in sorted(data.positions, key=lambda p: (p.symbol, p.side)):
        pnl = line.pnl
        pnl_text = (
            Text("-") if pnl is None else Text(f"{pnl:+.2f}", style="green" if pnl >= 0 else "red")
        )
        positions.add_row(
            line.position_id,
            line.symbol,
            Text(line.side, style="green" if line.side == "LONG" else "red"),
            line.size,
            line.entry,
            _fmt(line.mark),
            pnl_text,
            _fmt(line.stop),
            _fmt(line.next_take_profit),
            line.trailing,
        )
    recent = Table(title="Latest actions and rejections", expand=True)
    for name in ("time", "kind", "symbol", "reason / detail"):
        recent.add_column(name)
    for item in list(data.recent)[-12:][::-1]:
        kind = str(item.get("kind", ""))
        style = (
            "red"
            if "reject" in kind or "fail" in kind
            else ("green" if kind in ("entry", "exit") else "")
        )
        detail = " ".join(
            f"{k}={v}"
            for k, v in item.items()
            if k not in ("kind", "time_ms", "symbol") and v not in (None, "")
        )
        recent.add_row(
            _time(item.get("time_ms")), Text(kind, style=style), _fmt(item.get("symbol")), detail
        )
    feeds = Table(title="Feeds", expand=True)
    for name in ("stream", "state", "last message", "messages", "reconnects"):
        feeds.add_column(name)
    for name, feed in data.feeds.items():
        if not feed.connected:
            state = Text("down", style="red")
        elif feed.stale:
            state = Text("stale (polling)", style="yellow")
        else:
            state = Text("live", style="green")
        age = "never" if feed.age_s == float("inf") else f"{feed.age_s:.1f} s ago"
        feeds.add_row(name, state, age, str(feed.messages), str(feed.reconnects))
    s = data.summary
    p50, p99 = data.latency_ms.get("p50"), data.latency_ms.get("p99")
    latency = "-" if p50 is None else f"p50 {p50:.2f} ms  p99 {_fmt(p99)} ms"
    rejected = sum((s.get("intents_rejected") or {}).values())
    header = Text.assemble(
        (data.title, "bold"),
        f"   mode {_fmt(data.position_mode)}",
        ("   SHADOW (nothing sent)" if data.shadow else "", "yellow"),
        f"   intents +{s.get('intents_accepted', 0)} / -{rejected}",
        f"   entries {s.get('entries', 0)}",
        f"   exits {sum((s.get('exits') or {}).values())}",
        f"   realized {s.get('realized_pnl', '0')} USDT",
        f"   tick->order {latency}",
    )
    return Group(Panel(header), positions, recent, feeds)


class Dashboard:
    """Redraws ``render(source())`` until stopped.

    Args:
        source: returns the data of the next frame.
        refresh_hz: frames per second.
        console: where to draw (stdout by default).
    """

    def __init__(
        self,
        source: Callable[[], DashboardData],
        *,
        refresh_hz: float = 2.0,
        console: Console | None = None,
    ) -> None:
        self._source = source
        self._interval = 1.0 / refresh_hz
        self._console = console or Console()
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """End the redraw loop."""
        self._stop.set()

    async def run(self) -> None:
        """Draw until ``stop()`` or cancellation."""
        with Live(
            render(self._source()), console=self._console, auto_refresh=False, screen=False
        ) as live:
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self._interval)
                live.update(render(self._source()), refresh=True)


__all__ = ["Dashboard", "DashboardData", "PositionLine", "render"]
