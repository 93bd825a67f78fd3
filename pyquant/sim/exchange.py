"""Matching and account state of the simulated Binance USDⓈ-M futures venue (pure logic, no I/O).

Everything here is plain code over :class:`~decimal.Decimal` values, driven by an injected clock
and by price updates pushed in by the replay; nothing reads the wall clock, sleeps or touches a
socket, so every scenario replays exactly and is testable without a server.

Fill rules (contract section 9):

* **Reference price.** Each symbol has a mark price (the replayed path) and a last price (equal to
  the mark unless a test sets it apart). There is no order book.
* **MARKET** orders fill at once and completely at ``mark ± slippage_ticks x tickSize`` (BUY
  above, SELL below, rounded to a tick in the adverse direction), taker fee. A reference price
  outside ``mark x (1 ± marketTakeBound)`` is ``-4131``. ``newOrderRespType=RESULT`` answers with
  the final state; ``ACK`` answers ``NEW`` and the fill follows on the user stream.
* **LIMIT** orders that would cross on arrival (BUY limit >= reference, SELL limit <= reference)
  fill at once as taker at the better of limit and reference; ``GTX`` is rejected with ``-5022``;
  ``IOC`` expires when it cannot fill, ``FOK`` is rejected with ``-5021``. Resting orders fill
  completely at their limit price, maker fee, when the mark crosses them (BUY when mark <= limit,
  SELL when mark >= limit). ``GTD`` orders expire at ``goodTillDate``.
* **Positions.** One-way mode nets one signed ``BOTH`` position per symbol; crossing zero flips it
  and the remainder opens at the fill price. Hedge mode keeps ``LONG`` and ``SHORT`` legs;
  ``SELL+LONG``/``BUY+SHORT`` only reduce (reported as ``reduceOnly: true``), are ``-2022`` on an
  empty leg and are clipped to the leg. Entry price is the size-weighted average of opening fills;
  realized PnL on reducing fills is accumulated into the wallet, fees are charged from it.
* **reduceOnly** (one-way): ``-2022`` when the position is flat or on the order's side; a larger
  MARKET order fills up to the position and expires the rest; a resting reduce-only LIMIT that
  no longer fits the position is expired (``er`` = 4).
* **MIN_NOTIONAL** is not applied to reduce-only, closing (hedge) or ``closePosition`` orders.
* **Conditional orders** live only on the algo endpoints (``/fapi/v1/order`` answers ``-4120``).
  Each price update checks every ``NEW`` algo order against its ``workingType`` price
  (``MARK_PRICE`` mark, ``CONTRACT_PRICE`` last) with the rules of contract 3.2; on trigger it
  emits ``TRIGGERING``, places the child (MARKET for ``*_MARKET`` and trailing, LIMIT GTC at
  ``price`` for STOP/TAKE_PROFIT) whose ``ORDER_TRADE_UPDATE``s (NEW, and the fill of a MARKET
  child) come next, then ``TRIGGERED`` with ``ai`` and ``FINISHED`` once the child is final
  (contract 2.5, from live traffic). ``ALGO_UPDATE`` carries ``rm`` (why it was rejected or
  expired) and ``ia`` (trailing activated). A stop the trigger price is already through is
  ``-2021``; a second resting ``closePosition`` order of one type in one direction (the order's
  side in one-way mode, its ``positionSide`` in hedge mode) is ``-4130``, while a take-profit
  beside a stop and sized stops beside a close-all are accepted (contract 2.5).
  ``closePosition`` children close what the leg holds at trigger time; on a flat leg
  the algo order ends ``EXPIRED`` without a child. ``GTE_GTC`` algo orders expire when their
  position goes flat; other ``closePosition`` orders stay open (as on Binance).
* **Margin.** Initial margin = notional / leverage, checked (``-2019``) for the opening part of a
  new order against ``wallet + unrealized PnL - position margin - open-order margin``; no margin
  check for algo orders until they trigger. An ``ISOLATED`` leg's isolated wallet is the initial
  margin of its opening fills (``price x qty / leverage``), released pro rata by reducing fills
  and moved by its funding fees; it is what its liquidation price is computed from.
* **Liquidation price** (Binance FAQ "How to Calculate Liquidation Price of USDⓈ-M Futures
  Contracts"), per symbol::

      LP = (WB - TMM1 + UPNL1 + cumB + cumL + cumS
            - Side1BOTH x Position1BOTH x EP1BOTH - Position1LONG x EP1LONG
            + Position1SHORT x EP1SHORT)
         / (Position1BOTH x MMRB + Position1LONG x MMRL + Position1SHORT x MMRS
            - Side1BOTH x Position1BOTH - Position1LONG + Position1SHORT)

  Cross: ``WB`` is the cross wallet (wallet minus every isolated wallet), ``TMM1``/``UPNL1`` the
  maintenance margin and unrealized PnL of the other symbols' cross legs, and both hedge legs of
  the symbol enter together (they share one price). Isolated: ``WB`` is the leg's isolated
  wallet, ``TMM1 = UPNL1 = 0`` and only that leg enters. ``MMR``/``cum`` come from the bracket of
  the leg's notional at the liquidation price (the FAQ's note: recompute when the bracket at the
  liquidation price differs from the current one). A result <= 0 means no liquidation price
  (reported ``"0"``, as Binance does for a well-funded cross long).
* **Liquidation** (``liquidation=True``; off by default): after each price update, a leg whose
  mark reached its liquidation price (long: mark <= LP, short: mark >= LP) is closed: the open
  normal orders of the liquidated legs expire (``er`` = 5), an ``autoclose-…`` MARKET order
  (``ot`` ``LIQUIDATION``) fills the whole leg at the mark (rounded a tick against it) with
  the symbol's exchangeInfo ``liquidationFee`` rate as commission (the clearance fee); events
  ``ORDER_TRADE_UPDATE`` ``x=NEW``, then ``x=CALCULATED`` ``X=FILLED`` with the fill, then
  ``ACCOUNT_UPDATE`` ``m=ORDER`` (no ``TRADE_LITE``). Cross hedge legs of the symbol go together.
* **Funding** (``funding=True``; off by default): at each funding time (every 8 h, aligned to
  00/08/16 UTC, on the first price update at or after it) every open leg is charged
  ``positionAmt x mark x fundingRate`` (longs pay a positive rate); one ``ACCOUNT_UPDATE``
  ``m=FUNDING_FEE`` per leg, ``T`` = the funding time, ``B`` only for cross, ``B`` plus the leg
  for isolated (whose isolated wallet pays), and a ``funding`` order-log entry.

Simplifications: one account; the cross wallet reported (``cw``, ``crossWalletBalance``) is the
whole wallet and available balance does not set isolated margin apart; no partial liquidation,
no insurance fund (a liquidation past bankruptcy leaves the wallet short), no ADL; one generic
leverage bracket table for every symbol (:data:`BRACKETS`); one funding rate for every symbol
unless set per symbol; resting LIMIT orders fill completely (no partial fills); no self-trade
prevention (the mode is echoed); ``priceMatch`` is echoed, not applied.

Parts, each a layer over one state: :mod:`pyquant.sim.state` (the records and their one owner),
:mod:`pyquant.sim.margin` (income, margin figures, brackets, liquidation price),
:mod:`pyquant.sim.matching` (normal orders), :mod:`pyquant.sim.algo_orders` (the Algo Service)
and :mod:`pyquant.sim.liquidation` (liquidation and funding). This module puts them together
and adds what belongs to the account as a whole: the configuration endpoints, listen keys, the
order of work on a price update and the trade and position reports.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from pyquant.sim.algo_orders import AlgoOrders
from pyquant.sim.liquidation import LiquidationAndFunding
from pyquant.sim.margin import MAX_LEVERAGE, max_notional_for
from pyquant.sim.state import AlgoOrder, Income, ListenKey, Order, Position, Trade
from pyquant.sim.validation import BinanceError

__all__ = ["AlgoOrder", "Exchange", "Income", "Order", "Position"]

LISTEN_KEY_TTL_MS = 60 * 60 * 1000


class Exchange(LiquidationAndFunding, AlgoOrders):
    """The venue's account and matching state for one account (see the module docstring).

    Args:
        rules: Symbol rules by symbol, from the served exchangeInfo.
        now_ms: The exchange clock (event time), injected so tests and replays are exact.
        balance: Starting USDT wallet balance.
        position_mode: ``"one-way"`` or ``"hedge"``.
        maker_fee: Maker fee rate (0.0002 = 0.02 %).
        taker_fee: Taker fee rate.
        slippage_ticks: Ticks a MARKET fill moves away from the mark, against the taker.
        liquidation: Close legs whose mark reaches their liquidation price.
        funding: Charge funding fees every 8 h of exchange time.
        funding_rate: The funding rate of every symbol (``lastFundingRate``); per-symbol rates
            can be set with :meth:`set_funding_rate`.
    """

    # --- configuration endpoints -------------------------------------------------------

    def set_position_mode(self, dual: bool) -> None:
        """``POST /fapi/v1/positionSide/dual`` (``-4059``/``-4068``/``-4067``)."""
        if dual == self.dual:
            raise BinanceError(-4059)
        if any(p.amount for p in self.positions.values()):
            raise BinanceError(-4068)
        if self.open_orders() or self.open_algo_orders():
            raise BinanceError(-4067)
        self.dual = dual
        self._record("config", positionMode="hedge" if dual else "one-way")

    def set_leverage(self, symbol: str, raw: str | None) -> dict[str, Any]:
        """``POST /fapi/v1/leverage``; emits ``ACCOUNT_CONFIG_UPDATE``."""
        self.rule(symbol)
        if raw is None or raw == "":
            raise BinanceError(-1102, name="leverage")
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_LEVERAGE:
            raise BinanceError(-4028, value=raw)
        value = int(raw)
        self.leverage[symbol] = value
        now = self.now_ms()
        self._emit(
            {"e": "ACCOUNT_CONFIG_UPDATE", "E": now, "T": now, "ac": {"s": symbol, "l": value}}
        )
        return {
            "leverage": value,
            "maxNotionalValue": str(max_notional_for(value)),
            "symbol": symbol,
        }

    def set_margin_type(self, symbol: str, raw: str | None) -> None:
        """``POST /fapi/v1/marginType`` (``-4046``/``-4048``/``-4047``)."""
        self.rule(symbol)
        if raw is None or raw == "":
            raise BinanceError(-1102, name="marginType")
        wanted = raw.upper()
        if wanted == "CROSS":
            wanted = "CROSSED"
        if wanted not in ("ISOLATED", "CROSSED"):
            raise BinanceError(-1130)
        if self.margin_type.get(symbol, "CROSSED") == wanted:
            raise BinanceError(-4046)
        if any(p.amount for (s, _), p in self.positions.items() if s == symbol):
            raise BinanceError(-4048)
        if self.open_orders(symbol) or self.open_algo_orders(symbol):
            raise BinanceError(-4047)
        self.margin_type[symbol] = wanted

    # --- listen keys ----------------------------------------------------------------------

    def create_listen_key(self) -> str:
        """``POST /fapi/v1/listenKey``: the active key (extended) or a new one."""
        now = self.now_ms()
        if self.listen_key is None or self.listen_key.expires_at <= now:
            self.listen_key = ListenKey(secrets.token_urlsafe(48)[:64], now + LISTEN_KEY_TTL_MS)
        else:
            self.listen_key.expires_at = now + LISTEN_KEY_TTL_MS
        return self.listen_key.key

    def keepalive_listen_key(self, key: str | None = None) -> str:
        """``PUT /fapi/v1/listenKey``: extend by 60 minutes, ``-1125`` when none is active."""
        now = self.now_ms()
        active = self.listen_key
        if active is None or active.expires_at <= now or (key and key != active.key):
            raise BinanceError(-1125)
        active.expires_at = now + LISTEN_KEY_TTL_MS
        return active.key

    def delete_listen_key(self) -> str | None:
        """``DELETE /fapi/v1/listenKey``: invalidate the active key; returns it."""
        key = self.listen_key.key if self.listen_key else None
        self.listen_key = None
        return key

    def expire_listen_key(self, force: bool = False) -> str | None:
        """Expire the active key if its time has come (or now with ``force``); returns it."""
        active = self.listen_key
        if active is None:
            return None
        if force or active.expires_at <= self.now_ms():
            self.listen_key = None
            return active.key
        return None

    def listen_key_valid(self, key: str) -> bool:
        """True when ``key`` is the active, unexpired listenKey."""
        active = self.listen_key
        return active is not None and active.key == key and active.expires_at > self.now_ms()

    # --- price updates ----------------------------------------------------------------------

    def set_price(self, symbol: str, mark: Decimal, last: Decimal | None = None) -> None:
        """Apply a price update: funding, LIMIT fills, algo triggers, GTD expiry, liquidation.

        Due funding is settled first (when enabled), liquidation is checked last (when enabled).
        """
        self.marks[symbol] = mark
        self.lasts[symbol] = last if last is not None else mark
        self._settle_funding()
        self._match_resting(symbol, mark)
        self._check_triggers(symbol, mark)
        if self.liquidation:
            self._liquidate_crossed()

    # --- reports ---------------------------------------------------------------------------

    def user_trades(
        self,
        symbol: str,
        limit: int = 500,
        from_id: int | None = None,
        start: int | None = None,
        end: int | None = None,
    ) -> list[Trade]:
        """Fills of ``symbol``, oldest first, filtered as ``GET /fapi/v1/userTrades``."""
        self.rule(symbol)
        out = [t for t in self.trades if t.symbol == symbol]
        if from_id is not None:
            out = [t for t in out if t.trade_id >= from_id]
        if start is not None:
            out = [t for t in out if t.time >= start]
        if end is not None:
            out = [t for t in out if t.time <= end]
        return out[-limit:] if from_id is None else out[:limit]

    def served_positions(self, symbols: Iterable[str]) -> list[Position]:
        """Position legs of the current mode for the given symbols."""
        return [self.position(s, side) for s in symbols for side in self.legs()]
