"""The exchange-side backstops: the closePosition / sized STOP_MARKET algo orders of each leg.

Each open position has, a configured distance beyond the engine's stop, a stop that the
exchange itself triggers on MARK_PRICE if this process is gone. This module places it,
tightens and re-sizes it (new before old is cancelled: algo orders cannot be modified), answers
-4130 by reading what rests on the leg, retries cancels that got no answer, checks the journal's
live backstops against the venue after a restart, and cancels orphans and stops left on a leg
by an earlier position or a peer daemon (contract 2.4, 2.5). It sends and records orders only
through the router it belongs to (``RouterSide``: write-ahead, state changes in
``next_state``, lookups of unknown outcomes); it may not send entries or exits, nor touch the
engine, the desk or a leg's state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Protocol

from pyquant.errors import ExchangeError, OrderRejected, OrderStatusUnknown
from pyquant.exchange.venue import JsonObject, Venue
from pyquant.trading.journal import OrderRecord, OrderRow, Store
from pyquant.trading.orders import (
    ALGO_STATES,
    FINAL_STATES,
    IMMEDIATE_TRIGGER_CODES,
    LIVE_STATUSES,
    LookupMissing,
    OrderEvent,
    OrderOutcome,
    OrderState,
    PositionMode,
    RestAnswer,
    RestUnknown,
    RouterError,
    backstop_params,
    client_order_id,
    closing_side,
    decimal_or,
    is_close_all,
    is_mode_error,
    is_ours,
    order_leg,
    sequence_of,
    venue_legs,
)

if TYPE_CHECKING:
    from pyquant.trading.router import RouterConfig, RouterStats, RulesLike

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Backstop:
    """The live backstop of one position, as this process placed it."""

    client_id: str
    trigger_price: Decimal
    placed_at_ms: int
    close_all: bool = True
    quantity: Decimal | None = None  # a sized stop's quantity


class StopWouldTrigger(RouterError):
    """The venue refused a stop because the mark is already through it (-2021/-4142)."""

    def __init__(self, code: int, msg: str, trigger: Decimal) -> None:
        super().__init__(f"stop at {trigger} would trigger immediately ({code}: {msg})")
        self.code = code
        self.trigger = trigger


class RouterSide(Protocol):
    """What the backstops use of their ``OrderRouter``: its venue, journal and bookkeeping."""

    venue: Venue
    store: Store
    rules: RulesLike
    config: RouterConfig
    stats: RouterStats
    send_gate: Callable[[str], bool] | None
    _clock: Callable[[], int]
    _tag: str
    _in_flight: set[str]

    def apply_event(self, client_id: str, event: OrderEvent) -> OrderRow | None: ...  # noqa: D102
    def record_rejection(self, cid: str, exc: ExchangeError) -> None: ...  # noqa: D102
    async def current_mode(self) -> PositionMode: ...  # noqa: D102
    async def refresh_mode(self) -> PositionMode: ...  # noqa: D102
    async def resolve_unknown(  # noqa: D102
        self, client_id: str, *, refresh: bool = False
    ) -> OrderOutcome: ...
    def market_max_qty(self, symbol: str) -> Decimal | None: ...  # noqa: D102


class Backstops:
    """The backstops of one router (``router.backstops``); see the module docstring."""

    def __init__(self, router: RouterSide) -> None:
        self._router = router
        self.live: dict[str, Backstop] = {}  # position id -> its live backstop
        # position id -> (time of the last failed placement, failures in a row)
        self._failures: dict[str, tuple[int, int]] = {}
        self._last_code = 0
        self._cancels_due: dict[str, str] = {}  # backstop client id -> symbol

    def load(self) -> None:
        """Read the live backstops from the journal (start, and after a reconciliation)."""
        for row in self._router.store.orders(kind="backstop", statuses=LIVE_STATUSES):
            trigger = decimal_or(row.params.get("triggerPrice"))
            if trigger is None:
                continue
            current = self.live.get(row.position_id)
            if current is None or row.sequence > sequence_of(current.client_id):
                sized = decimal_or(row.params.get("quantity"))
                self.live[row.position_id] = Backstop(
                    row.client_order_id, trigger, row.created_at_ms, sized is None, sized
                )

    def backstop_trigger(self, symbol: str, leg: str, stop_price: str | Decimal) -> str:
        """Return the backstop trigger for an engine stop: further out, on the tick grid."""
        stop = Decimal(str(stop_price))
        distance = self._router.config.backstop_distance_pct
        if leg == "LONG":
            return self._router.rules.quantize_price(symbol, str(stop * (1 - distance)), "down")
        return self._router.rules.quantize_price(symbol, str(stop * (1 + distance)), "up")

    def forget_backstop(self, position_id: str) -> None:
        """Stop tracking a position's backstop without cancelling it (handed to a peer)."""
        self.live.pop(position_id, None)

    def backstop_of(self, position_id: str) -> tuple[str, Decimal] | None:
        """Return (client id, trigger price) of a position's live backstop, or None."""
        current = self.live.get(position_id)
        return None if current is None else (current.client_id, current.trigger_price)

    async def update_backstop(
        self,
        position_id: str,
        symbol: str,
        leg: str,
        stop_price: str | Decimal,
        *,
        force: bool = False,
        quantity: str | Decimal | None = None,
    ) -> str | None:
        """Place, tighten or re-size the position's backstop; return the live client id.

        Binance holds one ``closePosition`` stop per direction (-4130, contract 2.5), and algo
        orders cannot be modified. So the replacement alternates two forms, the new one always
        placed before the old one is cancelled: a close-all stop (first placement) is replaced
        by a *sized* stop for the leg's ``quantity`` (one-way: ``reduceOnly`` + ``quantity``;
        hedge: ``positionSide`` + ``quantity``), which is replaced by a close-all one, and so
        on. A sized stop whose leg changed size (a take-profit filled) is replaced by a
        close-all one at the same or a tighter trigger. Moves only tighten, at most every
        ``backstop_min_interval_ms`` unless ``force``; failed placements back off the same way.

        A -4130 (a close-all stop already rests on the leg) is answered by reading the symbol's
        open algo orders, never by retrying blindly: our own stale one is cancelled (the sized
        stop or the current one covers the leg) and the close-all placed once more; a peer's
        (a takeover) is left for ``retire_peer_backstops`` and a sized stop goes in beside it.

        Raises:
            StopWouldTrigger: the venue refused the stop because the mark is already through
                it (-2021/-4142): the caller must close the position now.
        """
        if not self._router.config.backstop_enabled:
            return None
        trigger = Decimal(self.backstop_trigger(symbol, leg, stop_price))
        size = (
            None
            if quantity is None
            else decimal_or(self._router.rules.quantize_qty(symbol, str(quantity), True))
        )
        current = self.live.get(position_id)
        now = self._router._clock()
        resize = (
            current is not None
            and not current.close_all
            and size is not None
            and size != current.quantity
        )
        if current is not None:
            tighter = (
                trigger > current.trigger_price
                if leg == "LONG"
                else trigger < current.trigger_price
            )
            if not tighter and not resize:
                return current.client_id
            if not tighter:
                trigger = current.trigger_price  # re-size only: never loosen
            if (
                not force
                and not resize
                and now - current.placed_at_ms < self._router.config.backstop_min_interval_ms
            ):
                return current.client_id
        if self._router.send_gate is not None and not self._router.send_gate(symbol):
            return None if current is None else current.client_id  # fenced: the old one stays
        failed = self._failures.get(position_id)
        if failed is not None and not resize:
            at_ms, count = failed
            pause = min(self._router.config.backstop_min_interval_ms * 2 ** (count - 1), 60_000)
            if now - at_ms < pause:
                return None if current is None else current.client_id
        close_all = current is None or not current.close_all
        if not close_all and size is None:
            try:  # the caller did not say the leg's size: the venue's is the one that counts
                live = venue_legs(await self._router.venue.position_risk()).get((symbol, leg))
            except ExchangeError as exc:
                logger.warning(
                    "Leg size unreadable for a sized stop symbol=%s error=%s", symbol, exc
                )
                live = None
            if live is not None:
                size = decimal_or(self._router.rules.quantize_qty(symbol, str(live), True))
        if not close_all and (size is None or size <= 0 or not self._sized_fits(symbol, size)):
            # No valid size to place beside the close-all stop: it keeps covering the leg.
            logger.warning(
                "Backstop not moved: no valid size for a sized stop position_id=%s quantity=%s",
                position_id,
                quantity,
            )
            return None if current is None else current.client_id
        placed = await self._place_backstop(
            position_id, symbol, leg, trigger, None if close_all else size, now
        )
        if placed is None and close_all and self._last_code == -4130:
            placed = await self._answer_4130(position_id, symbol, leg, trigger, size, now)
        if placed is None:
            count = (failed[1] if failed is not None else 0) + 1
            self._failures[position_id] = (now, count)
            return None if current is None else current.client_id
        self._failures.pop(position_id, None)
        if current is not None and current.client_id != placed.client_id:
            await self.cancel_algo(symbol, current.client_id)
        return placed.client_id

    def _sized_fits(self, symbol: str, size: Decimal) -> bool:
        max_qty = self._router.market_max_qty(symbol)
        return max_qty is None or size <= max_qty

    async def _place_backstop(
        self,
        position_id: str,
        symbol: str,
        leg: str,
        trigger: Decimal,
        size: Decimal | None,
        now: int,
    ) -> Backstop | None:
        self._last_code = 0
        mode = await self._router.current_mode()
        sequence = (self._router.store.max_sequence(position_id, "backstop") or 0) + 1
        cid = client_order_id(self._router._tag, position_id, "backstop", sequence, 0)
        params = backstop_params(
            mode, symbol, leg, str(trigger), cid, None if size is None else str(size)
        )
        self._router.store.insert_order(
            OrderRecord(
                client_order_id=cid,
                kind="backstop",
                position_id=position_id,
                symbol=symbol,
                position_side=leg,
                side=closing_side(leg),
                sequence=sequence,
                attempt=0,
                params=params,
                status=OrderState.SENT,
                reason="backstop",
            )
        )
        self._router._in_flight.add(cid)
        try:
            reply = await self._router.venue.new_algo_order(params)
        except OrderStatusUnknown as exc:
            self._router.apply_event(cid, RestUnknown(exc.code, exc.msg))
            outcome = await self._router.resolve_unknown(cid)
            if outcome.state != OrderState.NEW:
                return None
        except ExchangeError as exc:
            self._last_code = exc.code
            self._router.record_rejection(cid, exc)
            if is_mode_error(exc):
                await self._router.refresh_mode()
            if exc.code in IMMEDIATE_TRIGGER_CODES:
                raise StopWouldTrigger(exc.code, exc.msg, trigger) from exc
            return None
        except Exception as exc:
            # A timeout or dropped connection after the request left: look it up.
            self._router.apply_event(cid, RestUnknown(-1007, f"{type(exc).__name__}: {exc}"))
            outcome = await self._router.resolve_unknown(cid)
            if outcome.state != OrderState.NEW:
                return None
        else:
            self._router.apply_event(
                cid,
                RestAnswer(
                    ALGO_STATES.get(str(reply.get("algoStatus", "NEW")), OrderState.NEW),
                    "0",
                    None,
                    None if reply.get("algoId") is None else str(reply["algoId"]),
                ),
            )
        finally:
            self._router._in_flight.discard(cid)
        placed = Backstop(cid, trigger, now, size is None, size)
        self.live[position_id] = placed
        self._router.stats.backstops_moved += 1
        logger.info(
            "Backstop placed client_order_id=%s symbol=%s position_side=%s trigger=%s form=%s",
            cid,
            symbol,
            leg,
            trigger,
            "close_all" if size is None else f"sized {size}",
        )
        return placed

    async def _answer_4130(
        self,
        position_id: str,
        symbol: str,
        leg: str,
        trigger: Decimal,
        size: Decimal | None,
        now: int,
    ) -> Backstop | None:
        # A close-all stop already rests on this leg. Read what is there (never a retry loop).
        try:
            resting = [
                order
                for order in await self._router.venue.open_algo_orders(symbol)
                if order_leg(order) == leg
                and is_close_all(order)
                and str(order.get("orderType", order.get("type", ""))) == "STOP_MARKET"
            ]
        except ExchangeError as exc:
            logger.warning(
                "Open algo orders unreadable after -4130 symbol=%s error=%s", symbol, exc
            )
            return None
        current = self.live.get(position_id)
        for order in resting:
            cid = str(order.get("clientAlgoId", ""))
            if not cid.startswith(f"pq{self._router._tag}-"):
                continue
            if current is not None and cid == current.client_id:
                continue
            # Our own close-all stop that a lost answer or a failed cancel left behind: the
            # current stop covers the leg meanwhile; take the stale one away and place again.
            logger.warning("Stale close-all backstop found after -4130 client_order_id=%s", cid)
            await self.cancel_algo(symbol, cid)
            return await self._place_backstop(position_id, symbol, leg, trigger, None, now)
        if resting and size is not None and size > 0 and self._sized_fits(symbol, size):
            # A peer's close-all stop (takeover): ours goes in sized beside it; the peer's is
            # retired once ours is at least as tight (retire_peer_backstops).
            return await self._place_backstop(position_id, symbol, leg, trigger, size, now)
        return None

    async def cancel_algo(self, symbol: str, client_id: str) -> bool:
        """Cancel one of our algo orders; False when it was already gone or got no answer."""
        try:
            await self._router.venue.cancel_algo_order(symbol, client_id)
        except OrderRejected as exc:
            # Already gone (triggered, cancelled elsewhere): final either way.
            logger.info("Backstop cancel refused client_order_id=%s error=%s", client_id, exc)
            self._router.apply_event(client_id, RestAnswer(OrderState.CANCELED, "0", None, None))
            self._cancels_due.pop(client_id, None)
            return False
        except Exception as exc:
            # Timeout, 429, dropped connection: the stop may still rest on a leg that no
            # longer needs it. Retried until the venue answers (``retry_cancels``).
            logger.warning("Backstop cancel failed client_order_id=%s error=%s", client_id, exc)
            self._cancels_due[client_id] = symbol
            return False
        self._router.apply_event(client_id, RestAnswer(OrderState.CANCELED, "0", None, None))
        self._cancels_due.pop(client_id, None)
        return True

    async def retry_cancels(self) -> list[str]:
        """Send again every backstop cancel that failed without an answer; return those done."""
        done: list[str] = []
        for client_id, symbol in list(self._cancels_due.items()):
            row = self._router.store.get_order(client_id)
            if row is not None and OrderState(row.status) in FINAL_STATES:
                self._cancels_due.pop(client_id, None)
                continue
            if await self.cancel_algo(symbol, client_id):
                done.append(client_id)
        return done

    async def cancel_backstops(self, position_id: str) -> list[str]:
        """Cancel every live backstop of a position (it closed); return the ids cancelled."""
        cancelled: list[str] = []
        self.live.pop(position_id, None)
        for row in self._router.store.orders(
            position_id=position_id, kind="backstop", statuses=LIVE_STATUSES
        ):
            if await self.cancel_algo(row.symbol, row.client_order_id):
                cancelled.append(row.client_order_id)
        return cancelled

    async def _open_algo_orders_of(self, symbols: frozenset[str] | None) -> list[JsonObject]:
        # One symbol costs weight 1, the whole account 40 (contract 2.4): a takeover of a few
        # symbols asks for just those, so many takeovers cannot eat the weight budget.
        if symbols is None or len(symbols) > 10:
            return list(await self._router.venue.open_algo_orders())
        orders: list[JsonObject] = []
        for symbol in sorted(symbols):
            orders += await self._router.venue.open_algo_orders(symbol)
        return orders

    async def reconcile_backstops(self, symbols: frozenset[str] | None = None) -> dict[str, str]:
        """Check every backstop the journal holds as live against the venue's open algo orders.

        One that the venue does not list (never placed before a crash, triggered, or cancelled
        elsewhere) becomes final, so the next ``update_backstop`` places a fresh one instead of
        trusting a stop that is not there. ``symbols``: only those (a takeover). Returns client
        id -> resulting state.
        """
        listed = {str(o.get("clientAlgoId")): o for o in await self._open_algo_orders_of(symbols)}
        result: dict[str, str] = {}
        for row in self._router.store.orders(kind="backstop", statuses=LIVE_STATUSES):
            cid = row.client_order_id
            if cid in self._router._in_flight or (
                symbols is not None and row.symbol not in symbols
            ):
                continue
            order = listed.get(cid)
            if order is not None:
                algo_id = order.get("algoId")
                answer = RestAnswer(
                    OrderState.NEW, "0", None, None if algo_id is None else str(algo_id)
                )
                self._router.apply_event(cid, answer)
            elif OrderState(row.status) in (OrderState.SENT, OrderState.UNKNOWN):
                self._router.apply_event(cid, LookupMissing())
            else:
                self._router.apply_event(cid, RestAnswer(OrderState.EXPIRED, "0", None, None))
                self._router.store.update_order(cid, stream_final=True)
            updated = self._router.store.get_order(cid)
            result[cid] = "" if updated is None else updated.status
        self.live.clear()
        self.load()
        return result

    async def cleanup_orphans(
        self,
        open_legs: set[tuple[str, str]],
        *,
        symbols: frozenset[str] | None = None,
        peers: bool = False,
    ) -> list[str]:
        """Cancel our conditional orders whose (symbol, leg) has no open position.

        ``open_legs`` holds (symbol, leg) pairs with a non-zero position on the venue; in
        one-way mode the leg of a BOTH order is read from its side (SELL closes a LONG).

        Args:
            open_legs: the legs with a position.
            symbols: only look at these symbols (the ones this daemon owns); None: all.
            peers: also cancel the backstops other pyquant daemons of the account left on
                these symbols (their owner handed the symbol over, so nobody else will).
        """
        cancelled: list[str] = []
        for order in await self._open_algo_orders_of(symbols):
            cid = str(order.get("clientAlgoId", ""))
            if not is_ours(cid, self._router._tag, peers=peers):
                continue
            symbol = str(order.get("symbol"))
            if symbols is not None and symbol not in symbols:
                continue
            leg = order_leg(order)
            if (symbol, leg) in open_legs:
                continue
            if await self.cancel_algo(symbol, cid):
                cancelled.append(cid)
                logger.info("Orphan backstop cancelled client_order_id=%s symbol=%s", cid, symbol)
            row = self._router.store.get_order(cid)
            if row is not None:
                self.live.pop(row.position_id, None)
        return cancelled

    async def retire_peer_backstops(self, position_id: str, symbol: str, leg: str) -> list[str]:
        """Cancel other pyquant daemons' backstops on a leg this daemon adopted from them.

        A peer's backstop is cancelled only when our own live backstop on the leg is at least
        as tight as it: the exchange-side stop is handed over, never loosened. A tighter one
        stays until the position closes (then it is an orphan, cancelled as such).

        Returns:
            The client ids cancelled.
        """
        own = self.live.get(position_id)
        if own is None:
            return []
        cancelled: list[str] = []
        for order in await self._router.venue.open_algo_orders(symbol):
            cid = str(order.get("clientAlgoId", ""))
            if not is_ours(cid, self._router._tag, peers=True) or cid == own.client_id:
                continue
            if str(order.get("symbol")) != symbol or order_leg(order) != leg:
                continue
            if cid in self._router._in_flight:
                continue
            if cid.startswith(f"pq{self._router._tag}-"):
                # Ours, but not the leg's current stop: left by an earlier position on this
                # leg (handed over and taken back) or a lost cancel. Tighter or not, it would
                # close the wrong position: it goes.
                if await self.cancel_algo(symbol, cid):
                    cancelled.append(cid)
                    logger.info("Stale own stop retired client_order_id=%s", cid)
                continue
            trigger = decimal_or(order.get("triggerPrice") or order.get("stopPrice"))
            if trigger is None:
                continue
            looser_or_same = (
                trigger <= own.trigger_price if leg == "LONG" else trigger >= own.trigger_price
            )
            if not looser_or_same:
                logger.info(
                    "Peer backstop kept, tighter than ours client_order_id=%s trigger=%s ours=%s",
                    cid,
                    trigger,
                    own.trigger_price,
                )
                continue
            if await self.cancel_algo(symbol, cid):
                cancelled.append(cid)
                logger.info(
                    "Peer backstop retired client_order_id=%s symbol=%s position_side=%s",
                    cid,
                    symbol,
                    leg,
                )
        return cancelled

    async def retire_leg_stops(self, symbol: str, leg: str) -> list[str]:
        """Cancel every pyquant conditional order left on a leg that has no position now.

        Called when a position closes (whatever closed it): a stop a previous owner or an
        earlier position left on the leg would otherwise close the next position there.
        Orders of other tools are left alone.
        """
        cancelled: list[str] = []
        for order in await self._router.venue.open_algo_orders(symbol):
            cid = str(order.get("clientAlgoId", ""))
            if not is_ours(cid, self._router._tag, peers=True) or cid in self._router._in_flight:
                continue
            if str(order.get("symbol")) != symbol or order_leg(order) != leg:
                continue
            if await self.cancel_algo(symbol, cid):
                cancelled.append(cid)
                logger.info("Leftover stop retired client_order_id=%s symbol=%s", cid, symbol)
        return cancelled

    def forget_flattened(self, symbols: frozenset[str] | None) -> None:
        """Stop tracking the backstops a flatten cancelled (``symbols``: only those; None: all)."""
        if symbols is None:
            self.live.clear()
        else:
            for position_id, backstop in list(self.live.items()):
                stored = self._router.store.get_order(backstop.client_id)
                if stored is None or stored.symbol in symbols:
                    del self.live[position_id]
