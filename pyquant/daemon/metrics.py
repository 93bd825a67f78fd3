"""Prometheus metrics for the daemon, served on 127.0.0.1 only.

Counters and gauges are read from the daemon's own state at scrape time (``StatusSource``),
so nothing on the hot path increments a metric except the tick-to-order latency histogram.
Each daemon gets its own registry, so several can live in one process (tests).

Metrics (all prefixed ``pyquant_``): ``intents_accepted_total``,
``intents_rejected_total{reason}``, ``entries_total``, ``exits_total{reason}``,
``order_rejections_total{code}``, ``open_positions``, ``realized_pnl_usdt``,
``feed_connected{stream}``, ``feed_stale{stream}``, ``feed_age_seconds{stream}``,
``feed_reconnects_total{stream}``, ``feed_messages_total{stream}``,
``rest_used_weight_1m``, ``rest_order_count_10s``, ``tick_to_order_seconds`` (histogram);
with ``--intents redis://...`` also ``owned_symbols`` and the ``redis`` stream of the
``feed_*`` families (connected: lease renewals succeed; messages: stream entries read).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FeedStatus:
    """One stream's health as the metrics see it."""

    connected: bool
    stale: bool
    age_s: float
    reconnects: int
    messages: int


@dataclass(frozen=True, slots=True)
class Status:
    """Everything the collector reports, read at scrape time."""

    summary: Mapping[str, Any]
    feeds: Mapping[str, FeedStatus]
    used_weight_1m: int
    order_count_10s: int


StatusSource = Callable[[], Status]


class DaemonCollector(Collector):
    """Turns a ``Status`` into metric families at each scrape."""

    def __init__(self, source: StatusSource) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        """Yield the current metric families."""
        status = self._source()
        s = status.summary
        accepted = CounterMetricFamily("pyquant_intents_accepted", "Intents accepted by the guard")
        accepted.add_metric([], float(s.get("intents_accepted") or 0))
        yield accepted
        yield _labelled_counter(
            "pyquant_intents_rejected",
            "Intents rejected, by reason",
            "reason",
            s.get("intents_rejected"),
        )
        entries = CounterMetricFamily("pyquant_entries", "Entries filled")
        entries.add_metric([], float(s.get("entries") or 0))
        yield entries
        yield _labelled_counter(
            "pyquant_exits", "Exits filled, by reason", "reason", s.get("exits")
        )
        yield _labelled_counter(
            "pyquant_order_rejections",
            "Orders rejected, by Binance code",
            "code",
            s.get("order_rejections"),
        )
        open_positions = GaugeMetricFamily("pyquant_open_positions", "Open positions")
        open_positions.add_metric([], float(s.get("open_positions") or 0))
        yield open_positions
        failures = CounterMetricFamily(
            "pyquant_task_failures", "Daemon tasks (exits, backstops, kill switch) that crashed"
        )
        failures.add_metric([], float(str(s.get("task_failures") or 0)))
        yield failures
        legs = s.get("legs")
        if isinstance(legs, dict):
            busy = GaugeMetricFamily(
                "pyquant_legs", "Position legs run here, by state", labels=["state"]
            )
            counts: dict[str, int] = {}
            for state in legs.values():
                name = str(state).split(" ", 1)[0]
                counts[name] = counts.get(name, 0) + 1
            for name, count in sorted(counts.items()):
                busy.add_metric([name], float(count))
            yield busy
        owned = s.get("owned_symbols")
        if isinstance(owned, list | tuple):
            gauge = GaugeMetricFamily(
                "pyquant_owned_symbols", "Symbols whose lease this daemon holds (Redis)"
            )
            gauge.add_metric([], float(len(owned)))
            yield gauge
        pnl = GaugeMetricFamily("pyquant_realized_pnl_usdt", "Realized PnL net of fees (USDT)")
        try:
            pnl.add_metric([], float(str(s.get("realized_pnl") or "0")))
        except ValueError:
            pnl.add_metric([], 0.0)
        yield pnl
        connected = GaugeMetricFamily("pyquant_feed_connected", "Websocket open", labels=["stream"])
        stale = GaugeMetricFamily(
            "pyquant_feed_stale", "Feed stale (REST polling)", labels=["stream"]
        )
        age = GaugeMetricFamily(
            "pyquant_feed_age_seconds", "Seconds since the last message", labels=["stream"]
        )
        reconnects = CounterMetricFamily(
            "pyquant_feed_reconnects", "Reconnections", labels=["stream"]
        )
        messages = CounterMetricFamily(
            "pyquant_feed_messages", "Messages received", labels=["stream"]
        )
        for name, feed in status.feeds.items():
            connected.add_metric([name], 1.0 if feed.connected else 0.0)
            stale.add_metric([name], 1.0 if feed.stale else 0.0)
            age.add_metric([name], feed.age_s if feed.age_s != float("inf") else -1.0)
            reconnects.add_metric([name], float(feed.reconnects))
            messages.add_metric([name], float(feed.messages))
        yield from (connected, stale, age, reconnects, messages)
        weight = GaugeMetricFamily("pyquant_rest_used_weight_1m", "X-MBX-USED-WEIGHT-1M last seen")
        weight.add_metric([], float(status.used_weight_1m))
        yield weight
        orders = GaugeMetricFamily(
            "pyquant_rest_order_count_10s", "X-MBX-ORDER-COUNT-10S last seen"
        )
        orders.add_metric([], float(status.order_count_10s))
        yield orders


def _labelled_counter(name: str, doc: str, label: str, values: object) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    if isinstance(values, Mapping):
        for key, value in values.items():
            family.add_metric([str(key)], float(value))
    return family


class Metrics:
    """The daemon's registry, latency histogram and (optionally) its HTTP endpoint.

    Args:
        source: returns the current ``Status`` at each scrape.
    """

    def __init__(self, source: StatusSource) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(DaemonCollector(source))
        self.tick_to_order = Histogram(
            "pyquant_tick_to_order_seconds",
            "Mark-price message received to exit order request written",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self._server: Any = None
        self.port: int | None = None

    def serve(self, port: int) -> int:
        """Serve ``/metrics`` on 127.0.0.1 and return the port (0 picks a free one)."""
        server, _thread = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        self._server = server
        self.port = int(server.server_port)
        logger.info("Metrics served url=http://127.0.0.1:%d/metrics", self.port)
        return self.port

    def close(self) -> None:
        """Stop the HTTP endpoint."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


__all__ = ["DaemonCollector", "FeedStatus", "Metrics", "Status", "StatusSource"]
