"""The desk's reconciliation: the venue's view of each leg brought into the journal and engine.

Account updates (ACCOUNT_UPDATE) resize, close or adopt legs that changed behind the desk's
back; ``adopt`` puts a position opened elsewhere (or by a previous owner, with its published
exit state) under the exit policy; ``hand_over`` stops running a symbol another daemon took,
closing nothing; ``settle_pending_actions`` confirms or gives back the exit actions a restored
engine holds (restart recovery, ``pyquant.trading.recovery``). It may not send entries or
exits itself (it settles them through ``desk_exits``); leg states change only through
``LegBook`` (``next_leg_state``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from pyquant.errors import PyquantError
from pyquant.trading.desk_core import as_decimal
from pyquant.trading.desk_exits import ExitDesk
from pyquant.trading.guard import position_id_text
from pyquant.trading.journal import PositionRow
from pyquant.trading.legs import Adopted, HandedOver
from pyquant.trading.orders import FINAL_STATES, OrderState

logger = logging.getLogger(__name__)


class LegReconciler(ExitDesk):
    """The reconciliation of the desk; see the module docstring."""

    async def _on_account(self, account: Mapping[str, Any]) -> None:
        rows = account.get("P") or []
        changed: dict[tuple[str, str], tuple[Decimal, Decimal]] = {}
        for row in rows:
            symbol = str(row.get("s"))
            amount = as_decimal(row.get("pa"))
            entry = as_decimal(row.get("ep"))
            leg = str(row.get("ps", "BOTH"))
            if leg == "BOTH":
                changed[(symbol, "LONG")] = (max(amount, Decimal(0)), entry)
                changed[(symbol, "SHORT")] = (max(-amount, Decimal(0)), entry)
            else:
                changed[(symbol, leg)] = (abs(amount), entry)
        for (symbol, leg), (quantity, entry) in changed.items():
            if self.owns(symbol):
                await self._reconcile_leg(symbol, leg, quantity, entry)
            elif quantity > 0 and self.on_unowned_leg is not None:
                await self.on_unowned_leg(symbol)

    def is_busy(self, symbol: str, leg: str) -> bool:
        """Return True while work of ours on (symbol, leg) is in flight (the leg's owner says)."""
        if not self.legs.is_idle((symbol, leg)):
            return True
        # Orders the journal holds live (a restart's leftovers) count as in flight too.
        for row in self.store.positions(("opening", "open")):
            if row.symbol == symbol and row.position_side == leg:
                if row.status == "opening":
                    return True
                if any(
                    o.kind in ("exit", "flatten") and OrderState(o.status) not in FINAL_STATES
                    for o in self.store.orders(position_id=row.position_id)
                ):
                    return True
        return False

    async def _reconcile_leg(
        self, symbol: str, leg: str, quantity: Decimal, entry: Decimal
    ) -> None:
        if self.is_busy(symbol, leg):
            return  # our own order in flight: its outcome will settle the leg
        # Under the leg's owner: a takeover reconciliation adopting the same leg waits.
        async with self.legs.lock((symbol, leg)).hold():
            await self._reconcile_idle_leg(symbol, leg, quantity, entry)

    async def _reconcile_idle_leg(
        self, symbol: str, leg: str, quantity: Decimal, entry: Decimal
    ) -> None:
        position = self._position_for(symbol, leg)
        known = Decimal(0) if position is None else as_decimal(position.quantity)
        if quantity == known:
            return
        # The stream can run behind REST (events queued while our own orders settled): a
        # stale update must not adopt a leg we already closed, nor drop one we hold. The
        # venue's answer decides; the event's only when the venue cannot be asked.
        live = await self._live_quantity(symbol, leg)
        if live is not None:
            if self.is_busy(symbol, leg):
                return
            quantity = live
            position = self._position_for(symbol, leg)
            known = Decimal(0) if position is None else as_decimal(position.quantity)
            if quantity == known:
                return
        if position is None:
            if quantity > 0:
                await self.adopt(symbol, leg, quantity, entry)
            return
        if quantity == 0:
            # Our exchange-side backstop (ALGO_UPDATE TRIGGERED/FINISHED) or someone else.
            orders = self.store.orders(position_id=position.position_id)
            flattened = any(o.kind == "flatten" and o.status == OrderState.FILLED for o in orders)
            triggered = any(
                o.kind == "backstop" and o.status in (OrderState.TRIGGERED, OrderState.FILLED)
                for o in orders
            )
            # Our kill switch's close, seen on the stream before the flatten itself settled
            # the position: count it once, as what it was.
            reason = "flatten" if flattened else "backstop" if triggered else ""
            reason = self._forced_closes.pop((symbol, leg), reason)
            self._note(
                "exit",
                position_id=position.position_id,
                symbol=symbol,
                position_side=leg,
                reason=reason or "external",
                quantity=position.quantity,
            )
            # The stream's own order puts the closing fill before this update, so the
            # reason is known here; only our REST answers (-2022) can run ahead of it.
            await self._found_flat(position, reason or "external")
        elif quantity != as_decimal(position.quantity):
            if self._engine_has(position.position_id):
                self.engine_call("resize_position", position.position_id, str(quantity))
            else:
                self._engine_adopt(position, quantity)
            self.store.update_position(position.position_id, quantity=str(quantity))
            self.save_snapshot()

    async def adopt(
        self,
        symbol: str,
        leg: str,
        quantity: Decimal,
        entry: Decimal,
        leverage: int | None = None,
    ) -> str:
        """Adopt a position opened elsewhere under the exit policy; return its position id.

        When ``adoption_hint`` knows the leg (a peer daemon ran it and published its exit
        state), the ladder progress, best price and open time carry over, so the stop resumes
        where it was: a takeover never loosens it.
        """
        async with self.legs.lock((symbol, leg)).hold():
            held = self._position_for(symbol, leg)
            if held is not None:
                # Adopted meanwhile (an account update and a takeover both saw the leg): one
                # position per leg, never two copies in the engine.
                logger.info("Leg already adopted symbol=%s leg=%s", symbol, leg)
                return held.position_id
            return await self._adopt_idle_leg(symbol, leg, quantity, entry, leverage)

    async def _adopt_idle_leg(
        self, symbol: str, leg: str, quantity: Decimal, entry: Decimal, leverage: int | None
    ) -> str:
        if leverage is None:
            leverage = await self.leverage_of(symbol)
        self._drop_stale_engine_copies(symbol, leg)
        position_id = position_id_text(self.store.next_position_number())
        now = self._clock()
        hinted_open, extra = self._adoption_extra(symbol, leg, quantity, entry)

        def adopt_in_engine(opened_at_ms: int | None, **hint: str) -> object:
            return self.engine.adopt_position(
                position_id,
                symbol,
                leg,
                str(quantity),
                str(entry),
                leverage=leverage,
                opened_at_ms=opened_at_ms,
                **hint,
            )

        try:
            actions = adopt_in_engine(hinted_open, **extra)
        except (PyquantError, KeyError, ValueError) as exc:
            if not extra:
                raise
            logger.warning("Adoption hint refused symbol=%s leg=%s error=%s", symbol, leg, exc)
            actions = adopt_in_engine(None)
        self.store.upsert_position(
            PositionRow(
                position_id,
                symbol,
                leg,
                "open",
                "adopted",
                str(quantity),
                str(entry),
                leverage,
                None,
                None,
                self._engine_opened_at(position_id) or now,
                None,
                None,
            )
        )
        self.store.bump("adopted")
        self.legs.apply((symbol, leg), Adopted(position_id))
        self.save_snapshot()
        self._note(
            "adopted", position_id=position_id, symbol=symbol, side=leg, quantity=str(quantity)
        )
        logger.info(
            "Position adopted position_id=%s symbol=%s position_side=%s quantity=%s",
            position_id,
            symbol,
            leg,
            quantity,
        )
        await self._sync_backstop(position_id)
        if isinstance(actions, list) and actions:
            # e.g. over-leveraged for the policy, or a ladder level already passed
            self.on_actions(actions)
        return position_id

    def _adoption_extra(
        self, symbol: str, leg: str, quantity: Decimal, entry: Decimal
    ) -> tuple[int | None, dict[str, str]]:
        hint = self.adoption_hint(symbol, leg) if self.adoption_hint is not None else None
        if not hint:
            return None, {}
        try:
            hinted_entry = Decimal(str(hint["entry_price"]))
            original = Decimal(str(hint["original_quantity"]))
            best = Decimal(str(hint["best_price"]))
            opened_at = int(str(hint["opened_at_ms"]))
        except (KeyError, ArithmeticError, ValueError) as exc:
            logger.warning("Adoption hint unreadable symbol=%s leg=%s error=%s", symbol, leg, exc)
            return None, {}
        if hinted_entry != entry or best <= 0:
            # Another position than the one the hint describes (closed and reopened since).
            logger.info("Adoption hint stale symbol=%s leg=%s", symbol, leg)
            return None, {}
        return opened_at, {
            "original_quantity": str(max(original, quantity)),
            "best_price": str(best),
        }

    async def hand_over(self, symbol: str, owner: str = "") -> list[str]:
        """Stop running ``symbol``: another daemon owns it now and adopts its positions.

        Nothing is sent: the positions stay open on the exchange with their backstops (the
        new owner retires those once its own are in place). Work in flight on a leg (an exit,
        a backstop move) finishes first, under the leg's lock; an exit still waiting for its
        turn then finds the leg handed over and sends nothing.

        Returns:
            The position ids handed over.
        """
        handed: list[str] = []
        for position in self.store.positions(("open",)):
            if position.symbol != symbol:
                continue
            key = self._leg_of(position)
            async with self.legs.lock(key).hold():
                current = self.store.get_position(position.position_id)
                if current is None or current.status != "open":
                    continue
                self.engine_call("close_position", position.position_id)
                self.store.update_position(
                    position.position_id,
                    status="closed",
                    closed_at_ms=self._clock(),
                    close_reason=f"handed_over{':' + owner if owner else ''}",
                )
                leg = self.legs.get(key)
                if leg is not None and leg.position_id == position.position_id:
                    self.legs.apply(key, HandedOver(owner))
                self.router.backstops.forget_backstop(position.position_id)
            handed.append(position.position_id)
            self._note(
                "handed_over",
                position_id=position.position_id,
                symbol=symbol,
                position_side=position.position_side,
                quantity=current.quantity,
                owner=owner,
            )
            logger.info(
                "Position handed over position_id=%s symbol=%s new_owner=%s",
                position.position_id,
                symbol,
                owner or "?",
            )
        if handed:
            self.save_snapshot()
        return handed

    async def settle_pending_actions(self, *, live: bool = False) -> dict[str, str]:
        """Settle actions a restored engine holds as pending, from the journal (at restart).

        For each: its exit filled -> confirmed with the fill; its order still live -> left
        to the user stream; never sent, refused or never placed -> given back to the engine,
        which emits it again if it is still due. Returns ``position:sequence -> what``.

        ``live``: the desk is running; an action whose leg has work in flight (its exit task,
        perhaps waiting out a retry pause) belongs to that work and is left alone.
        """
        settled: dict[str, str] = {}
        pending = self.engine_call("pending_actions")
        for action in pending if isinstance(pending, list) else []:
            position_id = str(action.position_id)
            key = f"{position_id}:{action.sequence}"
            leg_key = (str(action.symbol), str(action.position_side))
            if live and not self.legs.is_idle(leg_key):
                settled[key] = "in_flight"
                continue
            rows = [
                row
                for row in self.store.orders(position_id=position_id)
                if row.kind in ("exit", "flatten") and row.sequence == int(action.sequence)
            ]
            last = rows[-1] if rows else None
            if last is None:
                self.engine_call("reject", action)
                settled[key] = "given_back"
            elif OrderState(last.status) not in FINAL_STATES:
                self._actions[last.client_order_id] = action
                settled[key] = "live"
            elif as_decimal(last.executed_qty) > 0 and not last.engine_applied:
                await self._exit_filled(
                    position_id, action, as_decimal(last.executed_qty), last.client_order_id
                )
                settled[key] = "confirmed"
            elif last.engine_applied:
                settled[key] = "applied"
            else:
                self.engine_call("reject", action)
                settled[key] = "given_back"
        return settled
