"""The desk's exits: exit actions to orders, fills into the engine, closed positions, backstops.

``on_actions`` turns the exit engine's actions into one task per action (the market task
never waits for REST); the router sends each under the position's lock, clipped to the live
quantity; a fill is confirmed into the engine, a rejection given back, ``-2022`` (already flat)
checked with the venue and closed. It also keeps each position's exchange-side backstop at
the engine's stop (``sync_backstops``) and records closes, including those the exchange made
itself (liquidation, ADL). It may not take entries (``desk``) nor adopt or hand over legs
(``desk_reconcile``); leg states change only through ``LegBook`` (``next_leg_state``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from pyquant.errors import ExchangeError
from pyquant.trading.backstops import StopWouldTrigger
from pyquant.trading.desk_core import DeskCore, as_decimal, field_of
from pyquant.trading.journal import PositionRow
from pyquant.trading.legs import Closed, CloseEvidence, FoundFlat, LegKey, LegState, WorkDone
from pyquant.trading.orders import FINAL_STATES, OrderOutcome, OrderState, venue_legs

logger = logging.getLogger(__name__)


class ExitDesk(DeskCore):
    """The exits of the desk; see the module docstring."""

    async def _paper_exit(self, position: PositionRow, action: Any) -> None:  # noqa: ANN401
        filled = Decimal(str(action.quantity))
        self.engine_call("confirm", action, filled_quantity=str(filled))
        remaining = max(as_decimal(position.quantity) - filled, Decimal(0))
        with self.store.transaction():
            self.store.update_position(position.position_id, quantity=str(remaining))
            self.store.bump("exits", str(action.reason))
        self.save_snapshot()
        self._note(
            "exit",
            position_id=position.position_id,
            symbol=position.symbol,
            position_side=position.position_side,
            reason=str(action.reason),
            quantity=str(filled),
            paper=True,
        )
        if remaining == 0:
            await self._closed(position, str(action.reason))

    def _engine_adopt(self, position: PositionRow, quantity: Decimal) -> None:
        actions = self.engine_call(
            "adopt_position",
            position.position_id,
            position.symbol,
            position.position_side,
            str(quantity),
            position.entry_price or "0",
            leverage=position.leverage,
            opened_at_ms=position.opened_at_ms,
        )
        if isinstance(actions, list) and actions:
            self.on_actions(actions)

    def _engine_stop(self, position_id: str) -> str | None:
        try:
            views = self.engine.positions()
        except Exception:
            logger.exception("Engine positions() failed")
            return None
        for view in views:
            if str(field_of(view, "position_id")) == position_id:
                stop = field_of(view, "stop_price")
                return None if stop is None else str(stop)
        return None

    async def _sync_backstop(self, position_id: str, *, force: bool = True) -> None:
        if self.config.shadow or not self.config.router.backstop_enabled:
            return
        position = self.store.get_position(position_id)
        if position is None or position.status != "open" or not self.owns(position.symbol):
            return
        key = self._leg_of(position)
        if not self.legs.accepts(key, "backstop"):
            return  # being flattened or found flat, or a move is already under way
        try:
            # Placement and cancellation of a leg's stop are serialized with its exits and
            # its close: a close can never cancel a stop that is still being placed.
            async with self.legs.lock(key).hold():
                position = self.store.get_position(position_id)
                if position is None or position.status != "open":
                    return
                stop = self._engine_stop(position_id)
                if stop is None:
                    return
                await self.router.backstops.update_backstop(
                    position_id,
                    position.symbol,
                    position.position_side,
                    stop,
                    force=force,
                    quantity=position.quantity,
                )
        except StopWouldTrigger as exc:
            logger.warning(
                "Stop already crossed, closing now position_id=%s error=%s", position_id, exc
            )
            await self._close_now(position_id, "stop_would_trigger")
        except ExchangeError as exc:
            logger.warning("Backstop update failed position_id=%s error=%s", position_id, exc)
        except Exception as exc:  # a bug must not stop the backstops of later positions
            self._failed(f"backstop of {position_id}", exc)
        finally:
            self.legs.apply(key, WorkDone("backstop"))

    async def _close_now(self, position_id: str, reason: str) -> None:
        """Close a leg at market at once (its stop could not be placed: the mark is through it)."""
        position = self.store.get_position(position_id)
        if position is None or position.status != "open":
            return
        key = self._leg_of(position)
        if not self.legs.accepts(key, "close_now"):
            return
        try:
            async with self.legs.lock(key).hold():
                position = self.store.get_position(position_id)
                live = (
                    await self._live_quantity(position.symbol, position.position_side)
                    if position
                    else None
                )
                if position is None or position.status != "open" or live is None:
                    return
                if live > 0:
                    sequence = (self.store.max_sequence(position_id, "flatten") or 0) + 1
                    outcome = await self.router.send_exit(
                        position_id,
                        position.symbol,
                        position.position_side,
                        self.rules.quantize_qty(position.symbol, str(live), True),
                        sequence=sequence,
                        reason=reason,
                        live_quantity=live,
                        kind="flatten",
                    )
                    if not (outcome.flat or outcome.executed_qty >= live):
                        logger.error(
                            "Immediate close incomplete position_id=%s state=%s code=%s",
                            position_id,
                            outcome.state,
                            outcome.error_code,
                        )
                        return
                self.engine_call("close_position", position_id)
                self.store.bump("exits", reason)
                self._note(
                    "exit",
                    position_id=position_id,
                    symbol=position.symbol,
                    position_side=position.position_side,
                    reason=reason,
                    quantity=str(live),
                )
                await self._closed(position, reason)
        finally:
            self.legs.apply(key, WorkDone("close_now"))

    async def sync_backstops(self) -> None:
        """Timer work: record due closes, retry failed cancels, move backstops (throttled).

        Closes of legs found flat are recorded once their evidence came or their grace ran
        out; every backstop moves toward the engine's current stop.
        """
        await self.settle_closing()
        if not self.config.shadow:
            try:
                await self.router.backstops.retry_cancels()
            except Exception as exc:
                self._failed("backstop cancel retry", exc)
        for position in self.store.positions(("open",)):
            await self._sync_backstop(position.position_id, force=False)

    def on_actions(self, actions: Sequence[Any], *, received_at_ns: int | None = None) -> None:
        """Schedule the exit engine's actions (never blocks the market task).

        Each action is work in flight on its leg from this moment (through any retry pause)
        until its order is final; a leg being flattened or found flat refuses it.
        """
        for action in actions:
            key = (str(action.symbol), str(action.position_side))
            token = f"exit:{action.sequence}"
            position = self.store.get_position(str(action.position_id))
            if position is not None and position.status == "open":
                self._leg_of(position)
            leg = self.legs.get(key)
            if leg is not None and token in leg.work:
                continue  # emitted again while the first is still running
            if (
                leg is None
                or leg.position_id != str(action.position_id)
                or not self.legs.accepts(key, token)
            ):
                logger.info(
                    "Action refused by its leg position_id=%s reason=%s state=%s",
                    action.position_id,
                    action.reason,
                    None if leg is None else leg.state,
                )
                self.engine_call("reject", action)
                continue
            self.spawn(self._run_exit(action, received_at_ns, key, token), f"exit-{token}")

    async def _run_exit(
        self,
        action: Any,  # noqa: ANN401
        received_at_ns: int | None,
        key: LegKey | None = None,
        token: str = "",
    ) -> None:
        key = key or (str(action.symbol), str(action.position_side))
        token = token or f"exit:{action.sequence}"
        done = True
        try:
            done = await self._exit_work(action, received_at_ns, key)
        except Exception as exc:
            # Whatever failed (a bad answer, a rules error), the action goes back to the
            # engine so the leg is not stuck with a pending close nobody runs.
            self._failed(f"exit {action.position_id}:{action.sequence}", exc)
            self.engine_call("reject", action)
            position_id = str(action.position_id)
            self._exit_failures[position_id] = self._exit_failures.get(position_id, 0) + 1
        finally:
            if done:
                self.legs.apply(key, WorkDone(token))
            else:
                cid = self._pending_cid(action)
                if cid:
                    self._exit_tokens[cid] = (key, token)
                else:
                    self.legs.apply(key, WorkDone(token))

    def _pending_cid(self, action: Any) -> str:  # noqa: ANN401
        for cid, pending in self._actions.items():
            if pending is action:
                return cid
        return ""

    async def _exit_work(self, action: Any, received_at_ns: int | None, key: LegKey) -> bool:  # noqa: ANN401
        # Returns False when the order is still live (its user-stream update settles it).
        position_id = str(action.position_id)
        failures = self._exit_failures.get(position_id, 0)
        if failures and not self.config.shadow:
            # The engine re-emits a rejected exit on the next tick; pace the retries so a
            # persistent refusal cannot turn into an order storm.
            await self._sleep(min(0.25 * 2 ** (failures - 1), 30.0))
        async with self.legs.lock(key).hold():
            position = self.store.get_position(position_id)
            leg = self.legs.get(key)
            if (
                position is None
                or position.status != "open"
                or leg is None
                or leg.position_id != position_id
                or leg.state in (LegState.FLATTENING, LegState.CLOSING)
                or not self.owns(position.symbol)
            ):
                # Closed, handed to a peer or being flattened while this waited: not ours to sell.
                logger.warning(
                    "Action for a position no longer run here dropped position_id=%s", position_id
                )
                self.engine_call("reject", action)
                return True
            if self.config.shadow:
                self._note(
                    "exit_shadow",
                    position_id=position_id,
                    reason=action.reason,
                    quantity=action.quantity,
                )
                if self.is_paper(position):
                    await self._paper_exit(position, action)
                else:
                    # A real position (adopted) in shadow mode: nothing is sent, it stays open.
                    self.engine_call("reject", action)
                return True
            replayed = self._replayed_fill(position_id, action)
            if replayed is not None:
                await self._exit_filled(position_id, action, replayed[1], replayed[0])
                return True
            if not failures and received_at_ns is not None:
                self._latencies_ms.append((time.perf_counter_ns() - received_at_ns) / 1e6)
                del self._latencies_ms[:-10_000]

            def live() -> Decimal:
                row = self.store.get_position(position_id)
                return Decimal(0) if row is None else as_decimal(row.quantity)

            outcome = await self.router.send_exit(
                position_id,
                position.symbol,
                position.position_side,
                action.quantity,
                sequence=int(action.sequence),
                reason=str(action.reason),
                live_quantity=live,
            )
            if outcome.client_order_id:
                self._actions[outcome.client_order_id] = action
            await self._exit_outcome(position_id, action, outcome)
            return outcome.flat or outcome.state in FINAL_STATES

    def _replayed_fill(self, position_id: str, action: Any) -> tuple[str, Decimal] | None:  # noqa: ANN401
        # After a restart the restored engine may emit again an action whose order filled
        # while the daemon was down (same position, sequence and reason): confirm that fill
        # instead of sending a second order.
        for row in self.store.orders(position_id=position_id, kind="exit"):
            if (
                row.sequence == int(action.sequence)
                and row.reason == str(action.reason)
                and not row.engine_applied
                and as_decimal(row.executed_qty) > 0
                and OrderState(row.status) in FINAL_STATES
            ):
                return row.client_order_id, as_decimal(row.executed_qty)
        return None

    async def _exit_outcome(self, position_id: str, action: Any, outcome: OrderOutcome) -> None:  # noqa: ANN401
        if outcome.flat:
            await self._check_flat(position_id, action)
            return
        if outcome.state not in FINAL_STATES:
            return  # NEW after an unknown outcome: the stream finishes it
        self._actions.pop(outcome.client_order_id, None)
        if not outcome.filled and outcome.skipped and outcome.error_msg == "lease_fenced":
            # Not the venue's refusal: our lease may lapse, so nothing is sent until it is
            # renewed. No retry pause builds up meanwhile (the exchange stop covers the leg).
            self.engine_call("reject", action)
            return
        if not outcome.filled:
            self.engine_call("reject", action)
            self._exit_failures[position_id] = self._exit_failures.get(position_id, 0) + 1
            self._note(
                "exit_rejected",
                position_id=position_id,
                reason=str(action.reason),
                code=outcome.error_code,
            )
            return
        await self._exit_filled(position_id, action, outcome.executed_qty, outcome.client_order_id)

    async def _exit_filled(
        self,
        position_id: str,
        action: Any,  # noqa: ANN401
        filled: Decimal,
        client_order_id: str,
    ) -> None:
        self._exit_failures.pop(position_id, None)
        self.engine_call("confirm", action, filled_quantity=str(filled))
        self.save_snapshot()
        position = self.store.get_position(position_id)
        if position is None:
            return
        remaining = max(as_decimal(position.quantity) - filled, Decimal(0))
        if remaining > 0 and not self._engine_has(position_id):
            # The engine took this as the full close but the exchange still holds a rest
            # (our view of the size was larger): keep that rest managed.
            live = await self._live_quantity(position.symbol, position.position_side)
            remaining = remaining if live is None else live
            if remaining > 0:
                self._engine_adopt(position, remaining)
        with self.store.transaction():
            self.store.update_order(client_order_id, engine_applied=True)
            self.store.update_position(position_id, quantity=str(remaining))
            self.store.bump("exits", str(action.reason))
        self._note(
            "exit",
            position_id=position_id,
            symbol=position.symbol,
            position_side=position.position_side,
            reason=str(action.reason),
            quantity=str(filled),
        )
        if remaining == 0:
            await self._closed(position, str(action.reason))
        else:
            await self._sync_backstop(position_id)

    def _note_forced_close(self, symbol: str, leg: str, reason: str) -> None:
        # The stream runs behind REST: our exit may already have found the leg flat (-2022).
        # A leg waiting for its evidence takes it now (settle_closing records it); an older
        # close under a vaguer reason is renamed; else the reason waits for the close.
        waiting = self.legs.get((symbol, leg))
        if waiting is not None and waiting.state == LegState.CLOSING:
            self.legs.apply((symbol, leg), CloseEvidence(reason))
            return
        recent = self._clock() - 120_000
        for position in reversed(self.store.positions(("closed",))):
            if (position.symbol, position.position_side) != (symbol, leg):
                continue
            if (
                position.close_reason in ("already_flat", "external")
                and (position.closed_at_ms or 0) >= recent
            ):
                with self.store.transaction():
                    self.store.update_position(position.position_id, close_reason=reason)
                    if position.close_reason == "external":
                        self.store.bump("exits", "external", -1)
                    self.store.bump("exits", reason)
                logger.warning(
                    "Position closed by the exchange position_id=%s reason=%s",
                    position.position_id,
                    reason,
                )
                return
            break
        self._forced_closes[(symbol, leg)] = reason

    async def _check_flat(self, position_id: str, action: Any) -> None:  # noqa: ANN401
        position = self.store.get_position(position_id)
        if position is None:
            return
        live = await self._live_quantity(position.symbol, position.position_side)
        if live is not None and live == 0:
            forced = self._forced_closes.pop((position.symbol, position.position_side), "")
            await self._found_flat(position, forced)
        else:
            self.engine_call("reject", action)
            if live is not None:
                self.store.update_position(position_id, quantity=str(live))

    async def _found_flat(self, position: PositionRow, reason: str) -> None:
        """Record a leg the exchange shows flat: now when its cause is known.

        Otherwise once the evidence arrives or ``close_grace_ms`` passes (``settle_closing``).
        """
        self.engine_call("close_position", position.position_id)
        key = self._leg_of(position)
        leg = self.legs.apply(key, FoundFlat(reason, self._clock()))
        if reason or leg is None or self.config.close_grace_ms <= 0:
            await self._finish_close(position, reason or "already_flat")

    async def _finish_close(self, position: PositionRow, reason: str) -> None:
        current = self.store.get_position(position.position_id)
        if current is None or current.status != "open":
            return
        if reason != "already_flat":
            self.store.bump("exits", reason)
        await self._closed(current, reason)

    async def settle_closing(self) -> None:
        """Record the closes of legs found flat whose evidence came or whose grace ran out."""
        now = self._clock()
        for leg in self.legs.closing():
            if leg.close_reason or now - leg.flat_since_ms >= self.config.close_grace_ms:
                reason = leg.close_reason or "already_flat"
                position = self.store.get_position(leg.position_id)
                if position is None or position.status != "open":
                    self.legs.apply(leg.key, Closed(reason))
                    continue
                await self._finish_close(position, reason)

    async def _live_quantity(self, symbol: str, leg: str) -> Decimal | None:
        try:
            rows = await self.venue.position_risk()
        except ExchangeError as exc:
            logger.warning("positionRisk failed error=%s", exc)
            return None
        return venue_legs(rows).get((symbol, leg), Decimal(0))

    async def _closed(self, position: PositionRow, reason: str) -> None:
        key = (position.symbol, position.position_side)
        leg = self.legs.get(key)
        if leg is not None and leg.position_id == position.position_id:
            # Before any await: a new entry on the leg starts from a closed leg, and waits for
            # the lock below, so the old position's stops go before the new one's go in.
            self.legs.apply(key, Closed(reason))
        with self.store.transaction():
            self.store.update_position(
                position.position_id,
                status="closed",
                quantity="0",
                closed_at_ms=self._clock(),
                close_reason=reason,
            )
            self.guard.start_cooldown(position.symbol, position.position_side)
        self.save_snapshot()
        self._note(
            "closed",
            position_id=position.position_id,
            symbol=position.symbol,
            position_side=position.position_side,
            reason=reason,
        )
        logger.info("Position closed position_id=%s reason=%s", position.position_id, reason)
        if not self.config.shadow:
            async with self.legs.lock(key).hold():
                await self.router.backstops.cancel_backstops(position.position_id)
                if self.owns(position.symbol) and self._position_for(*key) is None:
                    try:
                        await self.router.backstops.retire_leg_stops(*key)
                    except ExchangeError as exc:
                        logger.warning("Leftover stops not checked symbol=%s error=%s", key[0], exc)
