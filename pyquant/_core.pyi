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
            reduce_only: The order only reduces a position (exempt from MIN_NOTIONAL).
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
def atr(  # type: ignore[overload-overlap]  # a Series is also array-like; it returns a Series
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
