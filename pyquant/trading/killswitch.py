"""The kill switch's account-wide sweep: cancel every open order, then say what is left.

The desk's flatten closes positions and cancels the orders of its own journal. That misses
orders pyquant did not place (a manual STOP_MARKET that later triggers and opens a position
"after" the flatten) and pyquant's own stops placed under another state directory (each
journal has its own order-id tag; a run without ``--state`` uses a new one each time). This
sweep lists the account's open orders and open conditional (algo) orders on every symbol,
cancels each (``ours_only`` narrows it to orders with a pyquant client id of any tag),
retries a cancel that failed for a retryable reason, and then reads the account again:
``SweepReport.left_open`` names every order and position still open, so the caller's exit
status can say whether the account is flat.

The same module holds the periodic clean-up of our orphan stops (``sweep_orphan_stops``):
a stop of this journal's tag whose position the journal has closed and whose leg is flat on
the exchange is cancelled, retried until the exchange confirms; a failed cancel at close
time (timeout, 429) no longer leaves a live stop on a flat symbol until the next restart.

Usage::

    report = await sweep_account(client)            # every order on the account
    for step in report.steps: print(step)
    if report.left_open: ...                        # exit status 1

    steps = await sweep_orphan_stops(client, store)   # every 30 s in the daemon
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from functools import partial
from typing import Any, Protocol

from pyquant.errors import ExchangeError, OrderRejected, RetryableError

logger = logging.getLogger(__name__)

# pyquant's client order ids: pq<tag>-<position>-<kind><sequence>-<attempt>, any tag.
PYQUANT_ORDER_ID = re.compile(r"pq[a-z0-9]{4}-[A-Za-z0-9:._-]+", re.ASCII)
# Cancelling an order that is no longer open: it is gone, which is what the sweep wants.
GONE_CODES = frozenset({-2011, -2013})


class SweepVenue(Protocol):
    """What the sweep needs from the REST client (``BinanceClient`` satisfies it)."""

    async def open_orders(self, symbol: str | None = None) -> list[Any]:  # noqa: D102
        ...

    async def open_algo_orders(self, symbol: str | None = None) -> list[Any]:  # noqa: D102
        ...

    async def cancel_order(self, symbol: str, client_order_id: str) -> Any:  # noqa: D102, ANN401
        ...

    async def cancel_algo_order(self, symbol: str, client_algo_id: str) -> Any:  # noqa: D102, ANN401
        ...

    async def position_risk(self) -> list[Any]:  # noqa: D102
        ...


@dataclass(frozen=True, slots=True)
class SweepStep:
    """One cancel of the sweep, as reported to the user."""

    step: str  # "cancel_order" or "cancel_algo_order"
    symbol: str
    order_type: str
    client_id: str
    ours: bool
    ok: bool
    detail: str

    def line(self) -> str:
        """Return the step as one terminal line."""
        mark = "ok " if self.ok else "FAILED"
        owner = "pyquant" if self.ours else "other"
        return (
            f"{mark} {self.step:<17} {self.symbol:<12} {self.order_type:<20} {owner:<7} "
            f"{self.client_id} {self.detail}"
        )


@dataclass(slots=True)
class SweepReport:
    """What the sweep did and what it found open afterwards."""

    steps: list[SweepStep] = field(default_factory=list)
    left_open: list[str] = field(default_factory=list)  # one line per order or position

    @property
    def failed(self) -> int:
        """Return how many cancels failed."""
        return sum(1 for step in self.steps if not step.ok)


def is_pyquant_order(client_id: str) -> bool:
    """Return whether a client order id is pyquant's (of any state directory's tag)."""
    return PYQUANT_ORDER_ID.fullmatch(client_id) is not None


async def _cancel(
    call: Callable[[], Awaitable[Any]],
    *,
    attempts: int,
    sleep: Callable[[float], Awaitable[None]],
) -> tuple[bool, str]:
    for attempt in range(1, attempts + 1):
        try:
            await call()
        except OrderRejected as exc:
            if exc.code in GONE_CODES:
                return True, f"already gone ({exc.code})"
            return False, str(exc)
        except RetryableError as exc:
            if attempt == attempts:
                return False, f"{exc} (after {attempts} attempts)"
            await sleep(0.2 * 2 ** (attempt - 1))
            continue
        except ExchangeError as exc:
            return False, str(exc)
        return True, "cancelled"
    return False, "not attempted"  # pragma: no cover - attempts >= 1


async def sweep_account(
    venue: SweepVenue,
    *,
    ours_only: bool = False,
    attempts: int = 4,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> SweepReport:
    """Cancel every open order and algo order on the account; report each and what is left.

    Args:
        venue: the REST client.
        ours_only: cancel only orders with a pyquant client id (any state's tag).
        attempts: tries per cancel when the venue answers a retryable error (timeout, 429).
        sleep: injected for tests.

    Returns:
        Each cancel, and every order (of the swept kind) and position still open after it.
    """
    report = SweepReport()
    for order in await venue.open_orders():
        cid = str(order.get("clientOrderId", ""))
        symbol = str(order.get("symbol", ""))
        ours = is_pyquant_order(cid)
        if ours_only and not ours:
            continue
        ok, detail = await _cancel(
            partial(venue.cancel_order, symbol, cid), attempts=attempts, sleep=sleep
        )
        report.steps.append(
            SweepStep("cancel_order", symbol, str(order.get("type", "")), cid, ours, ok, detail)
        )
    for order in await venue.open_algo_orders():
        cid = str(order.get("clientAlgoId", ""))
        symbol = str(order.get("symbol", ""))
        ours = is_pyquant_order(cid)
        if ours_only and not ours:
            continue
        ok, detail = await _cancel(
            partial(venue.cancel_algo_order, symbol, cid), attempts=attempts, sleep=sleep
        )
        kind = str(order.get("orderType") or order.get("type") or "")
        report.steps.append(SweepStep("cancel_algo_order", symbol, kind, cid, ours, ok, detail))
    report.left_open = await left_open(venue)
    return report


async def left_open(venue: SweepVenue) -> list[str]:
    """Return one line per open order, algo order and position on the account.

    Every order counts, pyquant's or not (with ``ours_only`` the others are left open on
    purpose, and the caller's exit status still says the account is not flat).
    """
    lines: list[str] = []
    for order in await venue.open_orders():
        cid = str(order.get("clientOrderId", ""))
        lines.append(f"order {order.get('symbol')} {order.get('type')} {cid}")
    for order in await venue.open_algo_orders():
        cid = str(order.get("clientAlgoId", ""))
        kind = order.get("orderType") or order.get("type")
        lines.append(f"algo order {order.get('symbol')} {kind} {cid}")
    for row in await venue.position_risk():
        amount = _amount(row)
        if amount != 0:
            lines.append(f"position {row.get('symbol')} {row.get('positionSide', 'BOTH')} {amount}")
    return lines


def _position_id(client_id: str, tag: str) -> str | None:
    # pq<tag>-<position id>-<kind><sequence>-<attempt>
    prefix = f"pq{tag}-"
    if not client_id.startswith(prefix):
        return None
    position_id, _, rest = client_id[len(prefix) :].partition("-")
    return position_id if position_id and rest else None


def _live_legs(rows: list[Any]) -> set[tuple[str, str]]:
    legs: set[tuple[str, str]] = set()
    for row in rows:
        amount = _amount(row)
        if amount == 0:
            continue
        side = str(row.get("positionSide", "BOTH"))
        if side == "BOTH":
            side = "LONG" if amount > 0 else "SHORT"
        legs.add((str(row.get("symbol")), side))
    return legs


class ClosedPositions(Protocol):
    """What the orphan sweep reads from the journal (``pyquant.trading.journal.Store``)."""

    @property
    def instance_tag(self) -> str: ...

    def get_position(self, position_id: str) -> Any:  # noqa: ANN401
        ...


async def sweep_orphan_stops(
    venue: SweepVenue,
    store: ClosedPositions,
    *,
    attempts: int = 4,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> list[SweepStep]:
    """Cancel this journal's stops whose position is closed and whose leg is flat.

    A stop is an orphan only when both hold: the journal closed its position (a stop of an
    open or opening position is never touched, however the exchange looks at this instant)
    and the exchange shows no position on its leg (in one-way mode: on the symbol). Other
    tags' and other people's orders are left alone: ``pyquant flatten`` sweeps those.

    Returns:
        One step per orphan found, cancelled or not (a failed one is tried again next time).
    """
    tag = store.instance_tag
    candidates: list[tuple[str, str, str, str]] = []
    for order in await venue.open_algo_orders():
        cid = str(order.get("clientAlgoId", ""))
        position_id = _position_id(cid, tag)
        if position_id is None:
            continue
        position = store.get_position(position_id)
        if position is not None and getattr(position, "status", None) != "closed":
            continue
        kind = str(order.get("orderType") or order.get("type") or "")
        candidates.append((str(order.get("symbol", "")), cid, kind, position_id))
    if not candidates:
        return []
    live = _live_legs(await venue.position_risk())
    steps: list[SweepStep] = []
    for symbol, cid, kind, position_id in candidates:
        position = store.get_position(position_id)
        leg = getattr(position, "position_side", None)
        if any(s == symbol and (leg is None or side == leg) for s, side in live):
            continue  # something is open there (adopted under a new id): not an orphan
        ok, detail = await _cancel(
            partial(venue.cancel_algo_order, symbol, cid), attempts=attempts, sleep=sleep
        )
        step = SweepStep("cancel_orphan_stop", symbol, kind, cid, True, ok, detail)
        steps.append(step)
        log = logger.info if ok else logger.warning
        log(
            "Orphan stop swept client_algo_id=%s symbol=%s ok=%s detail=%s", cid, symbol, ok, detail
        )
    return steps


def _amount(row: Mapping[str, Any]) -> Decimal:
    try:
        return Decimal(str(row.get("positionAmt", "0")))
    except InvalidOperation:
        return Decimal(0)


__all__ = [
    "PYQUANT_ORDER_ID",
    "SweepReport",
    "SweepStep",
    "SweepVenue",
    "is_pyquant_order",
    "left_open",
    "sweep_account",
    "sweep_orphan_stops",
]
