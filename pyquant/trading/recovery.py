"""Restart recovery: reload the journal, reconcile it with the exchange, then resume.

It lives with the trading desk because two parts run it: the daemon at start-up and the
scale-out (``pyquant.scale.membership``) when it takes symbols over from a dead peer. It
works only through the desk, its router and the journal; it may not import the daemon.

The exchange is the truth for what is open; the journal is the truth for what we sent and
decided; the engine snapshot is the truth for each position's exit state (stop, best price,
ladder progress). ``reconcile`` brings the three together, in this order:

1. Fail closed: the guard refuses entries until the end.
2. Read the position mode (never assumed).
3. Restore the engine from its snapshot (when a ``restore`` function is given).
4. Resolve every order the journal left without a final answer (written ahead, unknown
   outcome, or still open) by looking it up by client id; nothing is resent. Then settle
   the actions the restored engine holds as pending: confirm the filled, give back the
   never placed (``TradingDesk.settle_pending_actions``).
5. Finish entries whose order filled while we were down; fail those that never executed.
6. Read the exchange's positions: drop local positions that are gone, resize those whose
   quantity changed (unless a filled exit is waiting to be replayed into the engine), put
   back into the engine open positions the snapshot missed, and adopt positions opened
   elsewhere under the exit policy.
7. Check the backstops the journal holds as live against the venue's open algo orders
   (one that is not there is not trusted), cancel our conditional orders whose position is
   gone (orphans), and release stale reservations.
8. Make sure every open position has its backstop at (never looser than) the engine's stop.
9. Save a fresh snapshot and allow entries again.

Why a kill -9 at any moment leads to no duplicate order: every request is in the journal
before it is sent and is resolved by lookup here; an exit that filled while we were down is
confirmed into the engine when the restored engine emits it again (same position, sequence
and reason, see ``TradingDesk``) instead of being sent twice; and exits are clipped to the
exchange's quantity. No lost position: every non-zero leg on the exchange ends up open in
the engine. No loosened stop: the engine resumes from its snapshot (saved after every
confirmed change and on the daemon's timer), and a backstop is only ever moved to tighten.

Two reconciliations. The *cold* one (``live=False``, at start) runs before anything of ours
can be in flight: whatever the journal holds unanswered is a leftover of the last run and is
resolved as above. The *live* one (``live=True``: user-stream reconnect, a takeover) runs
beside the desk's own work, so it asks each leg's owner (``TradingDesk.legs``) first and acts
only on legs that are idle: an entry still in symbol set-up or awaiting its REST answer, an
exit waiting out its retry pause, a backstop move, a flatten are left to the work that owns
them, and the leg is reported ``deferred`` (the daemon reconciles those symbols again once
their legs are idle).

Several daemons on one account (``pyquant.scale``): ``symbols`` limits steps 6 to 8 to the
symbols this daemon owns, so it never adopts a peer's position, and orphan cleanup then also
takes the backstops a previous owner left on them. Called with one symbol when a lease is
taken over, it leaves the guard's state alone (the other symbols trade on).

Usage::

    desk = TradingDesk(venue, store, rules, engine, config)
    report = await reconcile(desk, restore=lambda data: ExitEngine.restore(data, rules))
    logger.info("Recovered %s", report)
    report = await reconcile(desk, symbols=frozenset({"BTCUSDT"}))   # after a takeover
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal

from pyquant.errors import ExchangeError
from pyquant.trading.desk import EngineLike, TradingDesk
from pyquant.trading.journal import UNSENT_ENTRY_DETAIL, PositionRow
from pyquant.trading.orders import FINAL_STATES, LIVE_STATUSES, OrderOutcome, OrderState, venue_legs

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RecoveryReport:
    """What reconciliation did, step by step."""

    position_mode: str = ""
    snapshot_restored: bool = False
    orders_resolved: dict[str, str] = field(default_factory=dict)
    actions_settled: dict[str, str] = field(default_factory=dict)
    entries_completed: list[str] = field(default_factory=list)
    entries_failed: list[str] = field(default_factory=list)
    positions_dropped: list[str] = field(default_factory=list)
    positions_resized: list[str] = field(default_factory=list)
    positions_reopened: list[str] = field(default_factory=list)
    positions_adopted: list[str] = field(default_factory=list)
    orphans_cancelled: list[str] = field(default_factory=list)
    backstops_checked: dict[str, str] = field(default_factory=dict)
    peer_backstops_retired: list[str] = field(default_factory=list)
    reservations_released: list[str] = field(default_factory=list)
    deferred: list[str] = field(default_factory=list)  # "SYMBOL SIDE" left to work in flight
    multi_assets: bool | None = None
    open_positions: int = 0


def _view_id(view: object) -> str:
    if isinstance(view, Mapping):
        return str(view.get("position_id"))
    return str(getattr(view, "position_id", None))


def _view_field(view: object, name: str) -> object:
    if isinstance(view, Mapping):
        return view.get(name)
    return getattr(view, name, None)


def _dec(value: object) -> Decimal:
    try:
        return Decimal(str(value))
    except ArithmeticError:
        return Decimal(0)


def _reopen(desk: TradingDesk, position: PositionRow, quantity: Decimal) -> None:
    # Back into the engine as the journal knows it (the snapshot missed it).
    desk.engine_call(
        "open_position",
        position.position_id,
        position.symbol,
        position.position_side,
        str(quantity),
        position.entry_price or "0",
        leverage=position.leverage,
        confidence=position.confidence,
        opened_at_ms=position.opened_at_ms,
    )


async def reconcile(
    desk: TradingDesk,
    *,
    restore: Callable[[bytes], EngineLike] | None = None,
    symbols: frozenset[str] | None = None,
    takeover: bool = False,
    live: bool | None = None,
) -> RecoveryReport:
    """Reconcile the journal, the engine and the exchange; see the module docstring.

    Args:
        desk: the trading desk (its store, router, guard and engine).
        restore: builds an engine from a snapshot (``ExitEngine.restore(data, rules)``);
            None keeps ``desk.engine`` as is.
        symbols: reconcile positions of these symbols only (the ones this daemon owns);
            None: every symbol on the account.
        takeover: the daemon is running and took ``symbols`` over: entries on its other
            symbols go on (the guard is not closed meanwhile).
        live: the desk is running (see the module docstring); None: live when the desk has
            work in flight or ``takeover``.

    Returns:
        The report of every step.

    Raises:
        ExchangeError: the exchange could not be read; entries stay refused.
    """
    report = RecoveryReport()
    store, router = desk.store, desk.router
    if live is None:
        live = takeover or desk.has_work_in_flight()
    deferred: set[tuple[str, str]] = set()

    def busy(symbol: str, leg: str) -> bool:
        # Live: a leg with work in flight belongs to that work; look again once it is idle.
        if live and not desk.legs.is_idle((symbol, leg)):
            deferred.add((symbol, leg))
            return True
        return False

    # A takeover of some symbols does not stop entries on the others.
    whole_account = not takeover
    if whole_account:
        desk.guard.mark_state_unknown("reconciling with the exchange")

    def in_scope(symbol: str) -> bool:
        return symbols is None or symbol in symbols

    report.position_mode = await desk.refresh_mode()
    if not live:
        report.multi_assets = await desk.check_account_config()

    snapshot = store.load_snapshot()
    if snapshot is not None and restore is not None:
        desk.engine = restore(snapshot)
        report.snapshot_restored = True

    # 4. orders without a final answer
    for row in store.orders(statuses=LIVE_STATUSES):
        if row.kind == "backstop":
            continue  # live backstops are checked against the venue's open algo orders below
        if router.is_in_flight(row.client_order_id):
            continue  # a reconcile while running (stream reconnect): its sender resolves it
        if busy(row.symbol, row.position_side):
            continue
        outcome = await router.resolve_unknown(row.client_order_id, refresh=True)
        report.orders_resolved[row.client_order_id] = outcome.state.value

    # An order final by its REST answer whose stream event was lost (a reconnect) would
    # otherwise stay in the live set forever: the venue's answer stands for both.
    for row in store.unsettled_orders():
        if OrderState(row.status) in FINAL_STATES:
            store.update_order(row.client_order_id, rest_final=True, stream_final=True)

    # 4b. actions the restored engine holds as pending
    report.actions_settled = await desk.settle_pending_actions(live=live)

    # 5. entries
    for position in store.positions(("opening",)):
        if busy(position.symbol, position.position_side):
            continue  # still in symbol set-up or awaiting its answer: its sender finishes it
        entries = store.orders(position_id=position.position_id, kind="entry")
        if not entries:
            desk._entry_failed(position.position_id, UNSENT_ENTRY_DETAIL)
            report.entries_failed.append(position.position_id)
            continue
        last = entries[-1]
        state = OrderState(last.status)
        if state in FINAL_STATES:
            await desk._entry_outcome(
                position.position_id,
                OrderOutcome(
                    last.client_order_id,
                    state,
                    _dec(last.executed_qty),
                    _dec(last.avg_price) if last.avg_price else None,
                    time_ms=last.exchange_time_ms,
                ),
            )
            refreshed = store.get_position(position.position_id)
            if refreshed is not None and refreshed.status == "open":
                report.entries_completed.append(position.position_id)
            else:
                report.entries_failed.append(position.position_id)

    # 6. positions against the exchange
    rows = [row for row in await desk.venue.position_risk() if in_scope(str(row.get("symbol")))]
    legs = venue_legs(rows)
    views = desk.engine.positions()
    engine_ids = {_view_id(view) for view in views}
    engine_quantities = {_view_id(view): _dec(_view_field(view, "quantity")) for view in views}
    matched: set[tuple[str, str]] = set()
    for position in store.positions(("open",)):
        if not in_scope(position.symbol):
            continue
        if desk.is_paper(position):
            # Shadow mode: the exchange does not hold it; it only has to be in the engine.
            if position.position_id not in engine_ids:
                _reopen(desk, position, Decimal(position.quantity))
                report.positions_reopened.append(position.position_id)
            continue
        key = (position.symbol, position.position_side)
        if busy(*key):
            matched.add(key)
            continue
        live_qty = legs.get(key, Decimal(0))
        if desk.is_busy(position.symbol, position.position_side):
            matched.add(key)
            continue  # an exit of ours is in flight: its outcome settles the quantity
        if live_qty == 0:
            if position.position_id in engine_ids:
                desk.engine_call("close_position", position.position_id)
            await desk._closed(position, "gone_on_restart")
            report.positions_dropped.append(position.position_id)
            continue
        matched.add(key)
        unapplied = [
            row
            for row in store.orders(position_id=position.position_id, kind="exit")
            if OrderState(row.status) in FINAL_STATES
            and not row.engine_applied
            and _dec(row.executed_qty) > 0
        ]
        stored = _dec(position.quantity)
        if unapplied and engine_quantities.get(position.position_id) == live_qty:
            # Crash between the engine's confirm (snapshot saved) and the journal's write:
            # the engine already counted these fills.
            with store.transaction():
                for row in unapplied:
                    store.update_order(row.client_order_id, engine_applied=True)
                store.update_position(position.position_id, quantity=str(live_qty))
            unapplied, stored = [], live_qty
        pending_replay = bool(unapplied)
        if position.position_id not in engine_ids:
            _reopen(desk, position, live_qty)
            store.update_position(position.position_id, quantity=str(live_qty))
            report.positions_reopened.append(position.position_id)
        elif live_qty != stored and not pending_replay:
            desk.engine_call("resize_position", position.position_id, str(live_qty))
            store.update_position(position.position_id, quantity=str(live_qty))
            report.positions_resized.append(position.position_id)
    entry_prices: dict[tuple[str, str], tuple[Decimal, int]] = {}
    for risk in rows:
        amount = _dec(risk.get("positionAmt"))
        leg = str(risk.get("positionSide", "BOTH"))
        if leg == "BOTH":
            leg = "LONG" if amount > 0 else "SHORT"
        leverage = int(_dec(risk.get("leverage") or 0))
        entry_prices[(str(risk.get("symbol")), leg)] = (_dec(risk.get("entryPrice")), leverage)
    for key, quantity in legs.items():
        if key in matched or busy(*key):
            continue
        entry, leverage = entry_prices.get(key, (Decimal(0), 0))
        # v3 positionRisk has no leverage (contract 2.5): adopt() reads symbolConfig.
        position_id = await desk.adopt(key[0], key[1], quantity, entry, leverage or None)
        report.positions_adopted.append(position_id)

    await desk.refresh_liquidation_prices(rows)

    # 7. backstops the journal believes live, orphans and stale reservations
    open_legs = {(p.symbol, p.position_side) for p in store.positions(("open",))}
    try:
        report.backstops_checked = await router.backstops.reconcile_backstops(symbols)
        report.orphans_cancelled = await router.backstops.cleanup_orphans(
            open_legs, symbols=symbols, peers=symbols is not None
        )
    except ExchangeError as exc:
        logger.warning("Orphan cleanup failed error=%s", exc)
    opening = {p.position_id for p in store.positions(("opening",))}
    for reservation in store.reservations():
        if reservation.position_id not in opening:
            store.release_reservation(reservation.position_id)
            report.reservations_released.append(reservation.position_id)

    # 8. backstops at the engine's stop; then a peer's backstop on a leg we run now goes,
    # unless it is tighter than ours.
    for position in store.positions(("open",)):
        if not in_scope(position.symbol) or busy(position.symbol, position.position_side):
            continue
        await desk._sync_backstop(position.position_id, force=True)
        if symbols is not None and not desk.config.shadow:
            # Under the leg's owner: a stop move in flight is never taken for a leftover.
            async with desk.legs.lock((position.symbol, position.position_side)).hold():
                try:
                    report.peer_backstops_retired += await router.backstops.retire_peer_backstops(
                        position.position_id, position.symbol, position.position_side
                    )
                except ExchangeError as exc:
                    logger.warning("Peer backstops not checked error=%s", exc)

    desk.save_snapshot()
    report.deferred = sorted(f"{symbol} {leg}" for symbol, leg in deferred)
    if symbols is None:
        desk.deferred_symbols = {symbol for symbol, _leg in deferred}
    else:
        desk.deferred_symbols = (desk.deferred_symbols - symbols) | {s for s, _ in deferred}
    report.open_positions = len(store.positions(("open",)))
    if whole_account:
        desk.guard.mark_state_known()
    logger.info(
        "Recovery done mode=%s open=%d adopted=%d dropped=%d resolved=%d orphans=%d",
        report.position_mode,
        report.open_positions,
        len(report.positions_adopted),
        len(report.positions_dropped),
        len(report.orders_resolved),
        len(report.orphans_cancelled),
    )
    return report
