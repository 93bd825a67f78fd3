"""The Notifier: events in without ever blocking, messages out in background tasks.

``publish(document)`` is what the daemon's callbacks call: it classifies the document and
appends it to the bounded queue of every target that wants it, in O(targets), with no I/O and
no await. When a queue is full its oldest entry goes and is counted; the next message says
how many were lost. One task per target sends: it waits ``coalesce_s`` after the first event
of a burst so that the burst (a ladder of fills, a flatten of ten positions) becomes one
message, then POSTs it. A 429 waits the ``retry_after`` the target gave; a 5xx, a timeout or
a refused connection backs off exponentially; after ``max_attempts`` the message is dropped
and counted. A slow or dead target therefore delays only its own queue, never another
target's and never the daemon.

Two watchers publish documents of their own: the market feed down for longer than
``feed_down_after_s`` (and restored), and the daily summary at ``daily_summary_hour_utc``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import aiohttp
from yarl import URL

from pyquant.notify.documents import Document, DocumentMaker, classify
from pyquant.notify.messages import render
from pyquant.notify.targets import Target, retry_after_s

logger = logging.getLogger(__name__)

MAX_BURST = 50  # events in one message; a longer burst is split


@dataclass
class TargetStats:
    """Counters of one target.

    Attributes:
        queued: events accepted into its queue.
        sent: messages delivered (2xx).
        attempts: POSTs made.
        dropped: events lost because its queue was full.
        failed: messages given up after ``max_attempts`` or a permanent refusal.
        last_status: HTTP status (or error name) of the last attempt.
    """

    queued: int = 0
    sent: int = 0
    attempts: int = 0
    dropped: int = 0
    failed: int = 0
    last_status: str = ""


@dataclass(frozen=True)
class Delivery:
    """The outcome of delivering one message."""

    ok: bool
    status: str
    attempts: int
    detail: str = ""


@dataclass
class _Lane:
    target: Target
    queue: collections.deque[Document]
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    stats: TargetStats = field(default_factory=TargetStats)
    unreported: int = 0  # events lost since the last delivered message
    task: asyncio.Task[None] | None = None


@dataclass
class _Day:
    entries: int = 0
    exits: int = 0
    rejections: int = 0
    realized_pnl: Decimal = Decimal(0)


class Notifier:
    """Deliver notifications to several targets off the caller's path.

    Args:
        targets: the resolved targets.
        daemon_id: written in the documents this notifier makes itself.
        queue_size: events waiting per target (drop-oldest beyond, counted).
        coalesce_s: burst window.
        max_attempts: tries per message.
        backoff_base_s: first back-off after a 5xx or a network error (doubles, capped).
        backoff_cap_s: longest back-off and longest ``retry_after`` honoured.
        feed_down_after_s: threshold of the feed-down notification.
        daily_summary_hour_utc: hour of the daily summary (-1: none).
    """

    def __init__(
        self,
        targets: Sequence[Target],
        *,
        daemon_id: str = "pyquant",
        queue_size: int = 200,
        coalesce_s: float = 2.0,
        max_attempts: int = 6,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 60.0,
        feed_down_after_s: float = 30.0,
        daily_summary_hour_utc: int = 0,
    ) -> None:
        self.documents = DocumentMaker(daemon_id)
        self.lanes = [_Lane(t, collections.deque()) for t in targets]
        self.queue_size = queue_size
        self.coalesce_s = coalesce_s
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.feed_down_after_s = feed_down_after_s
        self.daily_summary_hour_utc = daily_summary_hour_utc
        self._session: aiohttp.ClientSession | None = None
        self._closing = False
        self._watchers: list[asyncio.Task[None]] = []
        self._day = _Day()
        self._feed_down_since: float | None = None
        self._feed_reported = False

    # ------------------------------------------------------------------ intake (sync)

    def stats(self) -> dict[str, TargetStats]:
        """Counters by target name."""
        return {lane.target.name: lane.stats for lane in self.lanes}

    def publish(self, document: Document) -> None:
        """Queue one events-stream document for every target that wants it; never blocks."""
        event = classify(document)
        if event is None:
            return
        self._count(event, document)
        for lane in self.lanes:
            if not lane.target.wants(event):
                continue
            if len(lane.queue) >= self.queue_size:
                lane.queue.popleft()
                lane.stats.dropped += 1
                lane.unreported += 1
            lane.queue.append(document)
            lane.stats.queued += 1
            lane.wake.set()

    def on_note(self, note: Mapping[str, object]) -> None:
        """A desk note (``TradingDesk.on_note``)."""
        document = self.documents.from_note(note)
        if document is not None:
            self.publish(document)

    def on_order_change(self, row: Any) -> None:  # noqa: ANN401 - pyquant.trading.journal.OrderRow
        """A router order change (``OrderRouter.on_order_change``)."""
        self.publish(self.documents.from_order(row))

    def daemon_event(self, action: str, **payload: object) -> None:
        """Publish a daemon-wide document (``started``, ``stopped``, ``feed_down`` ...)."""
        self.publish(self.documents.make("daemon", None, {"action": action, **payload}))

    def _count(self, event: str, document: Mapping[str, Any]) -> None:
        payload: Mapping[str, Any] = document.get("payload") or {}
        if event == "entry_filled":
            self._day.entries += 1
        elif event == "exit_filled" and document.get("type") == "exit":
            self._day.exits += 1
        elif event == "intent_rejected":
            self._day.rejections += 1
        if document.get("type") == "fill" and payload.get("realized_pnl") is not None:
            with contextlib.suppress(InvalidOperation, ValueError):
                self._day.realized_pnl += Decimal(str(payload["realized_pnl"]))

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the HTTP session and start one sender per target."""
        self._session = aiohttp.ClientSession()
        for lane in self.lanes:
            lane.task = asyncio.create_task(self._run_lane(lane), name=f"notify-{lane.target.name}")

    def watch_feed(self, feed: Callable[[], tuple[bool, float]]) -> None:
        """Watch the market feed: ``feed()`` returns (healthy, seconds since its last message)."""
        self._watchers.append(asyncio.create_task(self._feed_loop(feed), name="notify-feed"))

    def schedule_daily_summary(self) -> None:
        """Publish the daily summary every day at ``daily_summary_hour_utc``."""
        if self.daily_summary_hour_utc >= 0:
            self._watchers.append(asyncio.create_task(self._summary_loop(), name="notify-daily"))

    async def close(self, timeout_s: float = 5.0) -> None:
        """Deliver what is queued (no longer than ``timeout_s``), then stop."""
        self._closing = True
        for task in self._watchers:
            task.cancel()
        for lane in self.lanes:
            lane.wake.set()
        tasks = [lane.task for lane in self.lanes if lane.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for lane in self.lanes:
            if lane.queue:
                lane.stats.dropped += len(lane.queue)
                logger.warning(
                    "Notifications not delivered at stop target=%s count=%d",
                    lane.target.name,
                    len(lane.queue),
                )
                lane.queue.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------------ sending

    async def _run_lane(self, lane: _Lane) -> None:
        while True:
            if not lane.queue:
                if self._closing:
                    return
                lane.wake.clear()
                await lane.wake.wait()
                continue
            if not self._closing and self.coalesce_s > 0:
                with contextlib.suppress(TimeoutError):
                    # wake early only for the stop; the burst window is what coalesces
                    await asyncio.wait_for(self._until_closing(), self.coalesce_s)
            burst = [lane.queue.popleft() for _ in range(min(MAX_BURST, len(lane.queue)))]
            lost, lane.unreported = lane.unreported, 0
            text = render(burst, dropped=lost)
            if not text:
                continue
            result = await self.deliver(lane.target, text, burst, stats=lane.stats)
            if result.ok:
                lane.stats.sent += 1
            else:
                lane.stats.failed += 1
                lane.unreported += lost + len(burst)

    async def _until_closing(self) -> None:
        while not self._closing:  # noqa: ASYNC110 - set by close() from another task
            await asyncio.sleep(0.05)

    async def deliver(
        self,
        target: Target,
        text: str,
        documents: Sequence[Mapping[str, Any]] = (),
        *,
        stats: TargetStats | None = None,
        attempts: int | None = None,
    ) -> Delivery:
        """POST one message to ``target`` with retries; never raises for the target's faults."""
        session = self._session
        owned = session is None
        if session is None:
            session = aiohttp.ClientSession()
        request = target.request(text, documents)
        tries = attempts or self.max_attempts
        status = ""
        try:
            for attempt in range(1, tries + 1):
                wait: float | None = None
                try:
                    async with session.post(
                        URL(request.url.reveal(), encoded=True),
                        data=request.body,
                        headers={"Content-Type": "application/json"},
                        timeout=aiohttp.ClientTimeout(total=target.timeout_s),
                    ) as response:
                        body = await response.read()
                        status = str(response.status)
                        if 200 <= response.status < 300:
                            self._note_status(stats, status)
                            return Delivery(True, status, attempt)
                        wait = retry_after_s(response.status, response.headers, body)
                        permanent = 400 <= response.status < 500 and response.status != 429
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    # The exception text may hold the URL (and so the secret): name its type.
                    status = type(exc).__name__
                    permanent = False
                self._note_status(stats, status)
                logger.warning(
                    "Notification not delivered target=%s kind=%s status=%s attempt=%d/%d",
                    target.name,
                    target.kind,
                    status,
                    attempt,
                    tries,
                )
                if permanent or attempt == tries:
                    break
                if wait is None:
                    wait = self.backoff_base_s * 2 ** (attempt - 1)
                await asyncio.sleep(min(wait, self.backoff_cap_s))
            return Delivery(False, status, attempt, "refused" if permanent else "gave up")
        finally:
            if owned:
                await session.close()

    @staticmethod
    def _note_status(stats: TargetStats | None, status: str) -> None:
        if stats is not None:
            stats.attempts += 1
            stats.last_status = status

    # ------------------------------------------------------------------ watchers

    def check_feed(self, healthy: bool, now: float) -> None:
        """One look at the feed (``now``: monotonic seconds); publishes down/restored."""
        if healthy:
            if self._feed_reported and self._feed_down_since is not None:
                self.daemon_event("feed_restored", down_s=round(now - self._feed_down_since, 1))
            self._feed_down_since = None
            self._feed_reported = False
            return
        if self._feed_down_since is None:
            self._feed_down_since = now
        down = now - self._feed_down_since
        if not self._feed_reported and down >= self.feed_down_after_s:
            self._feed_reported = True
            self.daemon_event("feed_down", down_s=round(down, 1))

    async def _feed_loop(self, feed: Callable[[], tuple[bool, float]]) -> None:
        while True:
            try:
                healthy, _age = feed()
                self.check_feed(healthy, time.monotonic())
            except Exception:  # a watcher never takes the daemon down
                logger.exception("Feed watch failed")
            await asyncio.sleep(1.0)

    def daily_summary(self, day: str) -> None:
        """Publish the summary of the day since the last one, and start counting anew."""
        d, self._day = self._day, _Day()
        self.daemon_event(
            "daily_summary",
            day=day,
            entries=d.entries,
            exits=d.exits,
            rejections=d.rejections,
            realized_pnl=format(d.realized_pnl, "f"),
        )

    async def _summary_loop(
        self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    ) -> None:
        while True:
            now = dt.datetime.now(dt.UTC)
            at = now.replace(hour=self.daily_summary_hour_utc, minute=0, second=0, microsecond=0)
            if at <= now:
                at += dt.timedelta(days=1)
            await sleep((at - now).total_seconds())
            self.daily_summary((at - dt.timedelta(days=1)).date().isoformat())
