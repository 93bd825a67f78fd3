"""Typed stubs for the Rust extension ``pyquant._core``."""

__version__: str

# --- exchange rules and ATR (rust_core/src/python/rules.rs, arrays.rs) ---------------

from decimal import Decimal as _Decimal
from typing import Any as _Any
from typing import TypeAlias as _TypeAlias
from typing import final as _final
from typing import overload as _overload

import numpy as _np
import numpy.typing as _npt
import polars as _pl

_Number: _TypeAlias = str | _Decimal | int | float
"""A price or quantity: str and Decimal are exact, float is read by its shortest repr."""

@_final
class OrderReject:
    """A refusal as Binance would answer it: ``{"code": -4164, "msg": "..."}``."""

    def __new__(cls, code: int, msg: str) -> OrderReject: ...
    @property
    def code(self) -> int:
        """Binance's error code, e.g. -4164."""
    @property
    def msg(self) -> str:
        """Binance's error message."""
    def __eq__(self, other: object, /) -> bool: ...
    def __hash__(self) -> int: ...

@_final
class ExchangeRules:
    """Per-symbol filters of a USDⓈ-M futures exchangeInfo document, with exact quantization."""

    @staticmethod
    def from_exchange_info(data: bytes | str | dict[str, _Any]) -> ExchangeRules:
        """Parse a futures exchangeInfo document.

        Args:
            data: The document as bytes, str, or a decoded dict.

        Returns:
            The rules of every symbol in the document.

        Raises:
            InputError: A required field is missing or malformed (the message names the
                symbol, the field, the value and the rule).
            TypeError: ``data`` is not bytes, str or dict.
        """
    def symbols(self) -> list[str]:
        """Return the symbol names, sorted."""
    def __len__(self) -> int: ...
    def __contains__(self, symbol: str, /) -> bool: ...
    def quantize_price(self, symbol: str, price: _Number, rounding: str = "down") -> str:
        """Round a price onto the symbol's tick grid (``minPrice + k * tickSize``).

        Args:
            symbol: The symbol, e.g. ``"BTCUSDT"``.
            price: A positive price; a float is read by its shortest repr.
            rounding: ``"down"``, ``"up"`` or ``"nearest"`` (ties away from zero).

        Returns:
            The wire string with exactly the tick's decimals (``"30120.0"`` for tick 0.10),
            never an exponent. Bounds are not applied: see ``check_order``.

        Raises:
            UnknownSymbolError: The symbol is not loaded.
            InputError: The price is not a positive plain decimal or ``rounding`` is unknown.
            TypeError: The price is not str, Decimal, int or float.
        """
    def quantize_qty(self, symbol: str, qty: _Number, market: bool = True) -> str:
        """Floor a quantity to the MARKET_LOT_SIZE step (``market=True``) or LOT_SIZE step.

        Args:
            symbol: The symbol.
            qty: A non-negative quantity.
            market: Use MARKET_LOT_SIZE (market orders) rather than LOT_SIZE.

        Returns:
            The wire string with exactly the step's decimals; it is never above ``qty``
            and may be below minQty (even zero): see ``check_order``.

        Raises:
            UnknownSymbolError: The symbol is not loaded.
            InputError: The quantity is negative or not a plain decimal.
            TypeError: The quantity is not str, Decimal, int or float.
        """
    def check_order(
        self,
        symbol: str,
        *,
        side: str,
        order_type: str,
        quantity: _Number,
        price: _Number | None = None,
        stop_price: _Number | None = None,
        mark_price: _Number | None = None,
        reduce_only: bool = False,
        best_price: _Number | None = None,
    ) -> OrderReject | None:
        """Validate an order against the symbol's filters as Binance would.

        Checks, first failure wins: -1102 missing price/stopPrice, -1116 order type not
        offered, -1111 too many decimals, PRICE_FILTER (-4001/-4013/-4002/-4014, stops
        -4006/-4007), LOT_SIZE or MARKET_LOT_SIZE (-4003/-4004/-4005/-4023),
        PERCENT_PRICE (-4016/-4024; -4131 for MARKET with ``best_price``), MIN_NOTIONAL
        (-4164, reduce-only exempt; MARKET measured at ``mark_price``), then -4140 for
        opening orders on a symbol that is not TRADING.

        Args:
            symbol: The symbol.
            side: ``"BUY"`` or ``"SELL"``.
            order_type: ``"LIMIT"``, ``"MARKET"``, ``"STOP"``, ``"STOP_MARKET"``,
                ``"TAKE_PROFIT"``, ``"TAKE_PROFIT_MARKET"`` or ``"TRAILING_STOP_MARKET"``.
            quantity: The quantity exactly as it would be sent (trailing zeros count
                toward -1111).
            price: The limit price.
            stop_price: The trigger price.
            mark_price: The current mark price (PERCENT_PRICE reference, MARKET notional).
            reduce_only: The order only reduces a position, exempt from MIN_NOTIONAL and
                from the TRADING status check: ``reduceOnly=true`` in one-way mode, or a
                close of a leg in hedge mode (contract §4.3 treats both as exempt).
            best_price: For MARKET orders, the best opposite book price (enables -4131).

        Returns:
            The rejection Binance would answer, or None when the order passes.

        Raises:
            UnknownSymbolError: The symbol is not loaded.
            InputError: A value is malformed, or ``mark_price`` is missing where the
                notional needs it (a MARKET order that is not reduce-only).
        """
    def symbol_info(self, symbol: str) -> dict[str, str]:
        """Return the symbol's filters as strings.

        Keys: symbol, status, contract_type, base_asset, quote_asset, margin_asset,
        price_precision, quantity_precision, tick_size, min_price, max_price, step_size,
        min_qty, max_qty, market_step_size, market_min_qty, market_max_qty,
        min_notional, and when present multiplier_up, multiplier_down, trigger_protect,
        market_take_bound, liquidation_fee, max_num_orders, max_num_algo_orders.

        Raises:
            UnknownSymbolError: The symbol is not loaded.
        """

@_overload
def atr(  # a Series is also array-like: the Series overload comes first
    high: _pl.Series,
    low: _pl.Series | _npt.ArrayLike,
    close: _pl.Series | _npt.ArrayLike,
    period: int = 14,
) -> _pl.Series: ...
@_overload
def atr(
    high: _npt.ArrayLike, low: _npt.ArrayLike, close: _npt.ArrayLike, period: int = 14
) -> _npt.NDArray[_np.float64]:
    """Compute Wilder's Average True Range, identical to ``talib.ATR``.

    The first ATR (index ``period``) is the mean of the true ranges of bars 1..period,
    then ``atr = (atr * (period - 1) + tr) / period``; earlier values are NaN.

    Args:
        high: Highs, oldest first (numpy array, polars Series or sequence).
        low: Lows, same length.
        close: Closes, same length.
        period: Bars in the average, 1 to 100000.

    Returns:
        A float64 numpy array, or a polars Series named ``"atr"`` when ``high`` is a
        Series.

    Raises:
        InputError: Lengths differ, an input is not one-dimensional or numeric, or the
            period is out of range.
    """

# --- exit engine (rust_core/src/python/engine.rs) -------------------------------------

@_final
class ExitPolicy:
    """Validated exit parameters with explicit units.

    Units: ``*_pct`` are fractions of the entry price (0.015 = 1.5 %), ``max_margin_loss``
    is a fraction of margin (pct x leverage), ``*_atr`` are multiples of the symbol's ATR,
    ``*_r`` are multiples of R (the initial stop distance), ``*_ms`` are event-time
    milliseconds. Any field read as an attribute (``policy.stop_atr``) returns its value.
    """

    def __new__(
        cls,
        *,
        stop_atr: float | None = None,
        fallback_stop_pct: float = 0.01,
        min_stop_pct: float = 0.003,
        max_stop_pct: float = 0.05,
        max_margin_loss: float | None = None,
        liq_buffer_pct: float = 0.01,
        min_allowed_stop_pct: float | None = None,
        ladder: list[tuple[float, float] | dict[str, float]] | None = None,
        ladder_unit: str = "R",
        confidence_scale: float = 0.0,
        m_min: float = 1.0,
        m_max: float = 1.0,
        breakeven_after_level: int | None = None,
        breakeven_extra_pct: float = 0.0,
        taker_fee: float = 0.0005,
        ratchet_to_previous_level: bool = False,
        trail_atr: float | None = None,
        trail_pct: float | None = None,
        trail_activate_r: float | None = None,
        trail_activate_pct: float | None = None,
        trail_after_level: int | None = None,
        max_hold_ms: int | None = None,
        time_stop_unless_r: float | None = None,
        atr_period: int = 14,
        atr_interval: str = "1m",
        **aliases: float | None,
    ) -> ExitPolicy:
        """Build and validate a policy (``trail_activate_R``/``time_stop_unless_R`` also work).

        Raises:
            PolicyError: A field is unknown, of the wrong type or out of range (the message
                names the field, the value and the rule).
        """
    @staticmethod
    def from_toml(text: str) -> ExitPolicy:
        """Build a policy from a TOML table of the same fields.

        ``ladder = [{at = 1.0, fraction = 0.3}, ...]`` gives the levels.

        Raises:
            PolicyError: The TOML is invalid or a field is unknown or out of range.
        """
    @staticmethod
    def preset(name: str) -> ExitPolicy:
        """Return ``"standard"`` or ``"challenge"`` (see docs/exit-rules.md).

        Raises:
            PolicyError: The name is not a preset.
        """
    def to_dict(self) -> dict[str, _Any]:
        """Return every field (``None`` for unset options)."""
    def to_toml(self) -> str:
        """Return the fields as TOML that ``from_toml`` reads back to an equal policy."""
    @property
    def interval_ms(self) -> int:
        """The ATR bar interval in milliseconds."""
    def __getattr__(self, name: str) -> _Any: ...  # noqa: ANN401  # field types differ; see to_dict
    def __eq__(self, other: object, /) -> bool: ...
    def __reduce__(self) -> tuple[_Any, tuple[str]]: ...

@_final
class ExitAction:
    """One exit order: close ``quantity`` of ``(symbol, position_side)`` with ``side``.

    ``(position_id, sequence)`` identifies it within one position instance (the order
    router's clientOrderId derives from it; the daemon never reuses a position id) and
    ``generation`` tells instances of a reused id apart: ``confirm``/``reject`` refuse an
    action of an earlier position with the same id. It stays pending in the engine until
    ``confirm`` or ``reject``.
    """

    @property
    def position_id(self) -> str: ...
    @property
    def symbol(self) -> str: ...
    @property
    def position_side(self) -> str:
        """``"LONG"`` or ``"SHORT"``."""
    @property
    def side(self) -> str:
        """The closing order side: ``"SELL"`` for LONG, ``"BUY"`` for SHORT."""
    @property
    def quantity(self) -> str:
        """Exact wire quantity on the MARKET_LOT_SIZE step."""
    @property
    def reason(self) -> str:
        """Why it fired.

        ``stop_loss``, ``take_profit_N``, ``breakeven_stop``, ``ratchet_stop``,
        ``trailing_stop``, ``time_stop`` or ``over_leverage``.
        """
    @property
    def trigger_price(self) -> str:
        """The level crossed (the mark itself for time stops and over-leverage)."""
    @property
    def mark_price(self) -> str:
        """The mark price that triggered the action."""
    @property
    def sequence(self) -> int:
        """Per-position sequence number, from 1, never reused."""
    @property
    def is_full_close(self) -> bool:
        """True when it closes everything still open."""
    @property
    def generation(self) -> int:
        """The engine's number of the position instance that emitted it."""
    @property
    def event_time_ms(self) -> int:
        """Event time ``E`` of the triggering message."""
    def to_dict(self) -> dict[str, _Any]:
        """Return the fields as a dict."""
    def __eq__(self, other: object, /) -> bool: ...
    def __hash__(self) -> int: ...

@_final
class PositionView:
    """A read-only snapshot of one position's exit state (prices and sizes as strings)."""

    @property
    def position_id(self) -> str: ...
    @property
    def symbol(self) -> str: ...
    @property
    def position_side(self) -> str: ...
    @property
    def quantity(self) -> str: ...
    @property
    def original_quantity(self) -> str: ...
    @property
    def entry_price(self) -> str: ...
    @property
    def leverage(self) -> int: ...
    @property
    def confidence(self) -> float | None: ...
    @property
    def stop_price(self) -> str: ...
    @property
    def stop_reason(self) -> str:
        """The rule that moved the stop last (the reason a stop-out would carry)."""
    @property
    def r_distance(self) -> str: ...
    @property
    def best_price(self) -> str: ...
    @property
    def next_take_profit(self) -> str | None: ...
    @property
    def take_profit_prices(self) -> list[str]: ...
    @property
    def ladder_levels_done(self) -> int: ...
    @property
    def trailing_active(self) -> bool: ...
    @property
    def over_leveraged(self) -> bool: ...
    @property
    def pending_action(self) -> bool: ...
    @property
    def pending_sequence(self) -> int | None: ...
    @property
    def sequence(self) -> int:
        """Last sequence number used (0: none yet)."""
    @property
    def opened_at_ms(self) -> int | None: ...
    @property
    def liquidation_price(self) -> str | None: ...
    @property
    def last_mark_price(self) -> str | None: ...
    @property
    def atr(self) -> float | None: ...

@_final
class EntryPlan:
    """The initial stop a prospective entry would get; size by ``stop_distance``."""

    @property
    def symbol(self) -> str: ...
    @property
    def position_side(self) -> str: ...
    @property
    def entry_price(self) -> str: ...
    @property
    def stop_price(self) -> str: ...
    @property
    def stop_distance(self) -> str:
        """R = |entry - stop|: the loss per unit of quantity at the stop."""
    @property
    def over_leveraged(self) -> bool:
        """The leverage leaves a stop budget below the policy minimum: refuse the entry."""
    @property
    def atr(self) -> float | None: ...
    @property
    def take_profit_prices(self) -> list[str]: ...

@_final
class ExitEngine:
    """Every open position's exit, driven by mark-price websocket messages (event time).

    Semantics are docs/exit-rules.md. Two points callers meet: a ladder level whose
    quantity floors to zero on the step is done with no order (the position keeps its
    size; the level's breakeven and ratchet still apply), and a rejection clears the
    pending action and nothing else (a tightened trailing stop stays). Every quantity the
    engine emits is on the MARKET_LOT_SIZE step, and every input it acts on is inside
    its plausible bounds; anything else is refused with a ``pyquant.errors`` class, the
    state untouched. Methods are safe to call from several threads (each waits for the
    GIL; none holds the engine while the GIL is released).
    """

    def __new__(cls, rules: ExchangeRules, policy: ExitPolicy) -> ExitEngine: ...
    @property
    def policy(self) -> ExitPolicy: ...
    @property
    def last_event_ms(self) -> int | None:
        """The latest event time applied."""
    @property
    def implausible_event_times(self) -> int:
        """Updates refused for an implausible event time (since creation or restore).

        An event time before 1970 or from 2100 on, more than 10 minutes ahead of the
        wall clock passed to ``on_mark_message(now_ms=...)``/``set_clock``, or, without
        a clock, more than 30 days ahead of the latest accepted one. Such an update
        changes nothing (the rest of its message applies); the daemon reports the count
        as malformed input.
        """
    @property
    def implausible_marks(self) -> int:
        """Updates refused for a mark outside the symbol's plausible band.

        The band is the PRICE_FILTER's ``[minPrice / 10, maxPrice x 10]``, at most 1e15.
        """
    @property
    def clock_ms(self) -> int | None:
        """The latest wall clock passed to ``on_mark_message``/``set_clock`` (ms)."""
    def set_clock(self, now_ms: int) -> None:
        """Record the wall clock (ms); it only bounds event times, never drives a rule.

        Raises:
            InputError: ``now_ms`` is outside ``[0, 4102444800000]``.
        """
    def warm_up(
        self,
        symbol: str,
        high: _npt.ArrayLike | _pl.Series,
        low: _npt.ArrayLike | _pl.Series,
        close: _npt.ArrayLike | _pl.Series,
        last_open_time_ms: int | None = None,
    ) -> None:
        """Rebuild the symbol's ATR from closed historical bars (oldest first).

        The ATR is replaced, not extended: warming up again after a stream gap with the
        same window gives the ATR of a cold start on those bars.

        Args:
            symbol: The symbol.
            high: Highs of closed bars at the policy's ``atr_interval``.
            low: Lows.
            close: Closes.
            last_open_time_ms: Open time of the last bar given: live updates of that bar
                or earlier are then ignored and missing bars after it count as a gap.

        Raises:
            UnknownSymbolError: The symbol is not in the rules.
            InputError: Lengths differ or a bar is not finite or has high < low.
        """
    def atr(self, symbol: str) -> float | None:
        """Return the symbol's current ATR, ``None`` until ready."""
    def open_position(
        self,
        position_id: str,
        symbol: str,
        position_side: str,
        quantity: _Number,
        entry_price: _Number,
        leverage: int = 1,
        confidence: float | None = None,
        opened_at_ms: int | None = None,
        liquidation_price: _Number | None = None,
    ) -> None:
        """Start tracking a freshly opened position.

        ``opened_at_ms`` defaults to the latest event time seen (or, before any message,
        to the event time of the position's first update). An over-leveraged position is
        closed on its first update (reason ``over_leverage``).

        Raises:
            UnknownSymbolError: The symbol is not in the rules.
            InputError: Duplicate id, ``(symbol, position_side)`` already open, or a value
                out of range: a quantity off the MARKET_LOT_SIZE step or above 1e12, an
                entry outside the plausible band (see ``implausible_marks``), a leverage
                outside [1, 125], a confidence outside [0, 1] (NaN included).
        """
    def adopt_position(
        self,
        position_id: str,
        symbol: str,
        position_side: str,
        quantity: _Number,
        entry_price: _Number,
        leverage: int = 1,
        confidence: float | None = None,
        opened_at_ms: int | None = None,
        liquidation_price: _Number | None = None,
        original_quantity: _Number | None = None,
        best_price: _Number | None = None,
        mark_price: _Number | None = None,
    ) -> list[ExitAction]:
        """Start tracking a position found on the exchange mid-life.

        ``original_quantity - quantity`` counts as closed by the ladder; levels passed by
        ``best_price`` fire at once. With a mark (given, or the symbol's last one) the
        position is evaluated at once and the actions are returned (a stop already
        crossed, passed levels, over-leverage close), even before any message: the time
        is the latest event time seen, else the wall clock, else ``opened_at_ms``; with
        none known the time stop alone waits for the first update.

        Raises:
            InputError: As ``open_position``, and a ``mark_price``/``best_price`` outside
                the plausible band or an ``original_quantity`` off the step.
        """
    def on_mark_message(self, data: bytes | str, now_ms: int | None = None) -> list[ExitAction]:
        """Apply one mark-price websocket message; return the actions it triggers.

        Accepts one ``markPriceUpdate``, the ``!markPrice@arr`` array or the combined
        stream wrapper. Parses with the GIL released, then applies with it held, so
        another thread may call ``positions()`` (or any method) meanwhile: it waits, it
        never sees "Already mutably borrowed". ``now_ms`` is the wall clock (see
        ``set_clock``). An update with an implausible event time or mark is refused and
        counted (``implausible_event_times``, ``implausible_marks``); the rest applies.

        Raises:
            MessageError: The payload is malformed; the state is untouched.
            InputError: ``now_ms`` is out of range; the state is untouched.
        """
    def confirm(self, action: ExitAction, filled_quantity: _Number | None = None) -> bool:
        """Confirm a pending action with its fill (default: all). Return True when closed.

        Raises:
            InputError: The action is not the pending one (another sequence, or an
                earlier position with the same id: ``generation``), or the fill is out of
                range or off the MARKET_LOT_SIZE step; nothing changes then.
        """
    def reject(self, action: ExitAction) -> None:
        """Give a pending action back; the rule may fire again on the next update.

        Only the pending action is cleared: what the update observed (best mark, a
        tightened trailing stop) stays, because undoing it would loosen the stop.
        """
    def confirm_sequence(
        self,
        position_id: str,
        sequence: int,
        filled_quantity: _Number | None = None,
        generation: int | None = None,
    ) -> bool:
        """Like ``confirm`` by ``(position_id, sequence)`` (after a restart).

        With ``generation`` an action of an earlier position with the same id is refused.
        """
    def reject_sequence(
        self, position_id: str, sequence: int, generation: int | None = None
    ) -> None:
        """Like ``reject`` by ``(position_id, sequence)`` (and ``generation``)."""
    def pending_actions(self) -> list[ExitAction]:
        """Return every pending action (ordered by position id)."""
    def resize_position(self, position_id: str, quantity: _Number) -> bool:
        """Set the live quantity (entry fill grows the original size; a reduce does not).

        Returns True when the quantity is zero and the position was dropped.
        """
    def close_position(self, position_id: str) -> None:
        """Stop tracking a position closed outside the engine (its pending action too)."""
    def set_liquidation_price(self, position_id: str, price: _Number) -> None:
        """Record the liquidation price; the stop tightens to stay inside its buffer."""
    def update_rules(self, rules: ExchangeRules) -> None:
        """Replace the exchange rules.

        Raises:
            UnknownSymbolError: An open position's symbol is missing from the new rules.
        """
    def positions(self) -> list[PositionView]:
        """Return every open position, ordered by id."""
    def position(self, position_id: str) -> PositionView | None:
        """Return one position, or None."""
    def plan_entry(
        self,
        symbol: str,
        position_side: str,
        entry_price: _Number,
        leverage: int = 1,
        confidence: float | None = None,
        liquidation_price: _Number | None = None,
    ) -> EntryPlan:
        """Return the initial stop an entry would get with the symbol's current ATR.

        Raises:
            InputError: An entry outside the plausible band, a leverage outside [1, 125]
                or a confidence outside [0, 1] (NaN included), naming the field.
        """
    def snapshot(self) -> bytes:
        """Return the versioned engine state (policy, bars, ATR, positions, pending)."""
    @staticmethod
    def restore(data: bytes, rules: ExchangeRules) -> ExitEngine:
        """Rebuild an engine from ``snapshot()`` bytes and the current rules.

        Every field is validated against the policy, the rules and the input bounds
        (quantities on the step, prices in the plausible band, ladder lengths, levels
        done, sequences, bars and ATR); an impossible snapshot is refused here, never
        restored to fail on a later mark.

        Raises:
            InputError: Not a snapshot, another version, corrupt, an impossible field
                (named, e.g. ``position[p1].ladder_targets``), or a position's symbol is
                missing from ``rules``.
        """

# --- backtest (rust_core/src/python/backtest.rs) -------------------------------------------

def backtest_run(
    series: list[dict[str, _Any]],
    policies: list[ExitPolicy],
    rules: ExchangeRules,
    *,
    maker_fee: str,
    taker_fee: str,
    entry_liquidity: str,
    notional: str,
    leverage: int,
    intrabar: str,
    max_gap_bars: int,
    one_position_per_symbol: bool,
    detail: bool,
    exhaustive: bool = False,
    exact: bool = False,
) -> dict[str, _Any]:
    """Run every series under every policy through the exit rules (GIL released).

    Each series is a dict of numpy arrays (``open_time`` int64 ms, ``open``/``high``/``low``/
    ``close`` float64, ``entry_time`` int64 (sorted), ``entry_side`` int8 (1 LONG, -1 SHORT),
    ``entry_confidence`` float64 (NaN: none), ``entry_leverage`` int64 (0: the default),
    ``entry_notional`` None when no entry gives its own notional, else a pair (int64 array of
    those entries' rows, ascending; list of their decimal strings), optional ``fine_*`` bars
    and ``fine_interval_ms``) plus ``symbol`` and ``interval_ms``; arrays are read in place.
    Returns columns: ``fills``, ``trades``, ``stops``, ``levels``, ``skipped`` (dicts of numpy
    arrays, exact strings under ``*_exact`` when ``detail``), ``reason_names``,
    ``evaluations``, ``quiet_bars`` (of those, bars settled as one integer step) and
    ``decimal_jobs``. The default replay runs in integer ticks, lot units and money
    mantissas; ``exhaustive`` replays the decimal way instead, every mark of the bar path
    through the daemon's exit state machine (slower; the reference the tests hold the
    default to), and so does a job beyond what the integers hold (counted in
    ``decimal_jobs``). ``exact`` gives ``tables`` instead of the ``fills`` and ``trades``
    columns: the ``fills``, ``trades`` and ``skipped`` tables as ``ArrowTable``s in their
    final columns (prices, quantities and money as Decimal(38, 12), times as UTC
    timestamps, text as Arrow views), or None when a value has more than 12 decimals (ask
    for ``detail`` then). Use ``pyquant.backtest`` instead.
    """

def backtest_entry_keys(
    side: object, symbol: object, time_ms: object, symbols: list[str]
) -> tuple[PooledBytes, int | None, list[tuple[int, int, int]], bool]:
    """Read the entries' side, symbol and time columns in one pass (GIL released).

    ``side`` and ``symbol``: polars ``String`` series, ``time_ms``: an ``Int64`` one (any
    objects with ``__arrow_c_stream__``), of as many rows, read in place chunk by chunk.
    Returns the sides as int8 bytes (1 BUY, -1 SELL, 0 neither or null), the first
    row of a symbol in ``symbols`` whose side is 0 (or None), the runs of one symbol as
    (index in ``symbols`` or -1, first row, end row) and whether every run is in time order.
    Use ``pyquant.backtest`` instead.
    """

@_final
class ArrowTable:
    """One result table of ``backtest_run`` as an Arrow record batch.

    ``polars.DataFrame(table)`` or ``pyarrow.table(table)`` read it through the Arrow
    PyCapsule interface without a copy; its memory is reused by a later run once nothing
    reads it any more.
    """

    def __len__(self) -> int: ...
    def __arrow_c_stream__(self, requested_schema: object | None = None) -> object: ...

@_final
class PooledBytes:
    """Read-only bytes made by the core (the side codes of ``backtest_entry_keys``).

    Read through the buffer protocol (``bytes(buffer)``, ``memoryview(buffer)``, pyarrow)
    without a copy; their memory is reused by a later run once nothing reads them any more.
    """

    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...

def backtest_replay_marks(
    rules: ExchangeRules,
    policy: ExitPolicy,
    symbol: str,
    side: str,
    quantity: str,
    entry_price: str,
    times: list[int],
    marks: list[str],
    atr: float | None = None,
    leverage: int = 1,
    confidence: float | None = None,
    opened_at_ms: int = 0,
) -> list[dict[str, str | None]]:
    """Feed one position a mark path with the backtest's driver; return its decisions."""

def scan_plain_intents(data: bytes) -> tuple[bytes, _np.ndarray[_Any, _Any], int]:
    r"""Cut the plain lines of an intents JSONL file into fields (GIL released).

    Returns ``(table, other_lines, lines)``: the tab-separated fields of every plain line
    (its 0-based number, then id, symbol, side, confidence, time, created_at_ms, timestamp,
    leverage; ``\x01`` for a missing or null field), the 0-based numbers of the other lines
    (uint64) and the number of lines. Use ``pyquant.backtest.load_intents`` instead.
    """
