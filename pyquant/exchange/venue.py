"""The one venue interface the trading code depends on.

The Binance REST client (``pyquant.exchange.client``) satisfies it against Binance
mainnet, testnet or the built-in simulator; tests may satisfy it with an in-memory fake.
Guard, router and recovery never import a concrete client.

Every order-shaped argument is the exact wire mapping (Binance spellings, string values:
``{"symbol": "BTCUSDT", "side": "SELL", "positionSide": "LONG", "type": "MARKET",
"quantity": "0.003", "newClientOrderId": "..."}``); the client adds ``timestamp``,
``recvWindow`` and ``signature``. Responses are the decoded JSON documents as Binance
returns them. Failures raise the classes of ``pyquant.errors``: ``OrderRejected`` (final,
nothing executed), ``RetryableError`` (nothing accepted, back off), ``OrderStatusUnknown``
(sent, outcome unknown: look the order up by client id before sending again).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

JsonObject = dict[str, Any]


class Venue(Protocol):
    """What pyquant needs from a Binance-compatible USDⓈ-M futures venue."""

    async def server_time_ms(self) -> int:
        """Return the venue's clock (``GET /fapi/v1/time``)."""
        ...

    async def exchange_info(self) -> bytes:
        """Return the raw ``GET /fapi/v1/exchangeInfo`` document."""
        ...

    async def is_hedge_mode(self) -> bool:
        """Return True in hedge mode (``GET /fapi/v1/positionSide/dual``)."""
        ...

    async def set_leverage(self, symbol: str, leverage: int) -> JsonObject:
        """Set a symbol's leverage (``POST /fapi/v1/leverage``)."""
        ...

    async def set_margin_type(self, symbol: str, margin_type: str) -> None:
        """Set ISOLATED or CROSSED; an answer of -4046 (no change needed) is success."""
        ...

    async def new_order(self, params: Mapping[str, str]) -> JsonObject:
        """Place a LIMIT or MARKET order (``POST /fapi/v1/order``)."""
        ...

    async def get_order(self, symbol: str, client_order_id: str) -> JsonObject | None:
        """Look an order up by client id; None when the venue does not know it (-2013)."""
        ...

    async def cancel_order(self, symbol: str, client_order_id: str) -> JsonObject:
        """Cancel an open order by client id (``DELETE /fapi/v1/order``)."""
        ...

    async def open_orders(self, symbol: str | None = None) -> list[JsonObject]:
        """Return open LIMIT/MARKET orders (``GET /fapi/v1/openOrders``)."""
        ...

    async def new_algo_order(self, params: Mapping[str, str]) -> JsonObject:
        """Place a conditional order (``POST /fapi/v1/algoOrder``, algoType CONDITIONAL)."""
        ...

    async def cancel_algo_order(self, symbol: str, client_algo_id: str) -> JsonObject:
        """Cancel an open conditional order by its client algo id."""
        ...

    async def open_algo_orders(self, symbol: str | None = None) -> list[JsonObject]:
        """Return open conditional orders (``GET /fapi/v1/openAlgoOrders``)."""
        ...

    async def position_risk(self) -> list[JsonObject]:
        """Return position rows (``GET /fapi/v3/positionRisk``), signed ``positionAmt``."""
        ...

    async def account(self) -> JsonObject:
        """Return the account document (``GET /fapi/v3/account``)."""
        ...

    async def mark_price_klines(self, symbol: str, interval: str, limit: int) -> list[list[Any]]:
        """Return mark-price klines, oldest first (``GET /fapi/v1/markPriceKlines``)."""
        ...

    async def premium_index(self, symbol: str | None = None) -> list[JsonObject]:
        """Return mark prices (``GET /fapi/v1/premiumIndex``), always as a list."""
        ...

    async def ticker_24hr(self) -> list[JsonObject]:
        """Return 24 h statistics for every symbol (``GET /fapi/v1/ticker/24hr``)."""
        ...

    async def create_listen_key(self) -> str:
        """Create (or return the active) user-data listenKey."""
        ...

    async def keepalive_listen_key(self) -> None:
        """Extend the listenKey by 60 minutes."""
        ...

    async def close_listen_key(self) -> None:
        """Close the user-data stream."""
        ...
