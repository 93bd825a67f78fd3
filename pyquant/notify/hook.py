"""Tap a running daemon for notifications: its desk's notes and its router's order changes.

The desk and the router each have one observer slot (``on_note``, ``on_order_change``), which
the Redis membership may already use for the events stream. ``attach`` chains the notifier
behind whatever is there, so both see every event, in the same order; the notifier's side of
the chain only appends to its bounded queues.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Mapping
from typing import Any

from pyquant.config import Config
from pyquant.notify.delivery import Notifier
from pyquant.notify.targets import resolve_targets

logger = logging.getLogger(__name__)


def build_notifier(config: Config, *, daemon_id: str | None = None) -> Notifier | None:
    """The notifier ``[notify]`` describes, or None without targets.

    Raises:
        ConfigError: a target's secret is missing.
    """
    notify = config.notify
    if not notify.targets:
        return None
    targets = resolve_targets(notify.targets, secrets_file=config.credentials.file)
    return Notifier(
        targets,
        daemon_id=daemon_id or socket.gethostname(),
        queue_size=notify.queue_size,
        coalesce_s=notify.coalesce_s,
        max_attempts=notify.max_attempts,
        feed_down_after_s=notify.feed_down_after_s,
        daily_summary_hour_utc=notify.daily_summary_hour_utc,
    )


def _chain(
    first: Callable[[Any], None] | None, then: Callable[[Any], None]
) -> Callable[[Any], None]:
    if first is None:
        return then

    def both(item: Any) -> None:  # noqa: ANN401 - a note dict or an OrderRow
        first(item)
        try:
            then(item)
        except Exception:  # a notification never breaks trading
            logger.exception("Notifier failed on an event")

    return both


async def attach(daemon: Any, config: Config) -> Notifier | None:  # noqa: ANN401 - pyquant.daemon.Daemon
    """Start notifications for ``daemon`` (its desk must exist); None without targets.

    The caller ends it at stop with :func:`detach`, which sends the ``stopped`` message and
    whatever is still queued, for a few seconds at most.
    """
    notifier = build_notifier(config)
    if notifier is None:
        return None
    desk = daemon.desk
    desk.on_note = _chain(desk.on_note, notifier.on_note)
    desk.router.on_order_change = _chain(desk.router.on_order_change, notifier.on_order_change)
    await notifier.start()

    def market() -> tuple[bool, float]:
        status: Mapping[str, Any] = daemon.feed_statuses()
        feed = status["market"]
        return bool(feed.connected and not feed.stale), float(feed.age_s)

    notifier.watch_feed(market)
    notifier.schedule_daily_summary()
    notifier.daemon_event("started")
    return notifier


async def detach(notifier: Notifier, timeout_s: float = 5.0) -> None:
    """Say the daemon stopped and deliver what is queued, for ``timeout_s`` at most."""
    notifier.daemon_event("stopped")
    await notifier.close(timeout_s)
