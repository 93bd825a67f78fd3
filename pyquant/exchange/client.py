"""Async signed REST client for Binance USDⓈ-M futures (mainnet, testnet or the simulator).

It satisfies ``pyquant.exchange.venue.Venue``. What it owns:

* Signing: HMAC-SHA256 over exactly the bytes sent (query string, then body; contract 1.4).
  Every parameter is URL-encoded once, by this module, and the URL is handed to aiohttp as
  already encoded so nothing re-encodes it after signing.
* Time: ``offset = serverTime - (t_send + t_recv) / 2`` measured at start and every
  ``resync_interval_s``; on -1021 the clock is resynced and the request retried once
  (a -1021 is a clean rejection, so the retry is safe; contract 1.6).
* Rate limits: used weight and order counts read from every response's
  ``X-MBX-USED-WEIGHT-1M`` / ``X-MBX-ORDER-COUNT-*`` headers (any case). Past
  ``defer_fraction`` of the weight limit, calls marked non-essential wait for the next
  minute; orders and exits are never deferred by our own budget, only by a real 429/418,
  after which every call waits out ``Retry-After`` (contract 6).
* Errors: each Binance answer becomes the class ``pyquant.exchange.codes`` assigns
  (``OrderRejected``, ``RetryableError``/``RateLimited``, ``OrderStatusUnknown``). A
  request that changes state and gets no answer, a 408, an unexplained 5xx or -1000/-1006/
  -1007 is ``OrderStatusUnknown``: the caller looks the order up before sending again.
* Money stays exact: parameter values must be ``str``, ``int``, ``bool`` or ``Decimal``;
  a float is refused. Responses are decoded with orjson and numbers stay the strings
  Binance sends.

The API key and secret never appear in a log line, a repr or an exception.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final
from urllib.parse import urlencode

import aiohttp
import orjson
from yarl import URL

from pyquant.errors import ExchangeError, OrderRejected, RetryableError
from pyquant.exchange.codes import RateLimited, error_for
from pyquant.exchange.venue import JsonObject

logger = logging.getLogger(__name__)

ParamValue = str | int | bool | Decimal

_ORDER_PATHS: Final = frozenset({"/fapi/v1/order", "/fapi/v1/algoOrder", "/fapi/v1/batchOrders"})
_MAX_RECV_WINDOW_MS: Final = 60_000


def _wire_value(name: str, value: ParamValue) -> str:
    # Floats are refused outright: their repr is how 0.30000000000000004 reaches an exchange.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"parameter {name!r} was {value}: must be a finite decimal")
        return format(value, "f")
    raise TypeError(
        f"parameter {name!r} was {value!r} ({type(value).__name__}): "
        "send money as str or Decimal, never float"
    )


def sign(secret: bytes, payload: str) -> str:
    """Return the hex HMAC-SHA256 of ``payload`` under ``secret`` (contract 1.4).

    Args:
        secret: the API secret as bytes.
        payload: the exact query string followed by the exact body.

    Returns:
        The lower-case hex signature.
    """
    return hmac.new(secret, payload.encode("utf-8"), hashlib.sha256).hexdigest()


@dataclass(slots=True)
class RateLimitState:
    """What the exchange last told us about our usage, and when we may call again.

    Attributes:
        used_weight_1m: ``X-MBX-USED-WEIGHT-1M`` of the last response.
        order_count_10s: ``X-MBX-ORDER-COUNT-10S`` of the last order response.
        order_count_1m: ``X-MBX-ORDER-COUNT-1M`` of the last order response.
        weight_limit_1m: the REQUEST_WEIGHT limit per minute (from exchangeInfo when loaded).
        backoff_until: monotonic time before which no request is sent (429/418).
        headers_seen: number of responses that carried a weight header.
    """

    used_weight_1m: int = 0
    order_count_10s: int = 0
    order_count_1m: int = 0
    weight_limit_1m: int = 2400
    backoff_until: float = 0.0
    headers_seen: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def update(self, headers: Mapping[str, str]) -> None:
        """Read the usage headers of one response; header names are matched in any case."""
        for raw_name, raw_value in headers.items():
            name = raw_name.upper()
            if not name.startswith("X-MBX-"):
                continue
            try:
                value = int(raw_value)
            except ValueError:
                continue
            self.counts[name] = value
            if name == "X-MBX-USED-WEIGHT-1M":
                self.used_weight_1m = value
                self.headers_seen += 1
            elif name == "X-MBX-ORDER-COUNT-10S":
                self.order_count_10s = value
            elif name == "X-MBX-ORDER-COUNT-1M":
                self.order_count_1m = value


class BinanceClient:
    """Signed REST access to a Binance-compatible USDⓈ-M futures venue.

    Use as an async context manager (or call ``close()``)::

        async with BinanceClient(rest_url, api_key, api_secret) as client:
            hedge = await client.is_hedge_mode()

    Args:
        rest_url: base URL such as ``https://fapi.binance.com`` or the simulator's.
        api_key: the API key (sent only in the ``X-MBX-APIKEY`` header).
        api_secret: the API secret (used only to sign).
        recv_window_ms: ``recvWindow`` sent with signed requests (at most 60000).
        timeout_s: total time allowed for one request.
        resync_interval_s: how often the server-time offset is measured again.
        defer_fraction: share of the weight limit past which non-essential calls wait.
        max_backoff_wait_s: longest a call waits out a 429/418 before raising instead.
        clock: wall clock in seconds (injectable for tests).
    """

    def __init__(
        self,
        rest_url: str,
        api_key: str,
        api_secret: str,
        *,
        recv_window_ms: int = 5000,
        timeout_s: float = 10.0,
        resync_interval_s: float = 300.0,
        defer_fraction: float = 0.8,
        max_backoff_wait_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 1 <= recv_window_ms <= _MAX_RECV_WINDOW_MS:
            raise ValueError(
                f"recv_window_ms was {recv_window_ms}: must be from 1 to {_MAX_RECV_WINDOW_MS}"
            )
        self._base = rest_url.rstrip("/")
        self._api_key = api_key
        self._secret = api_secret.encode("utf-8")
        self._recv_window = str(recv_window_ms)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._resync_interval_s = resync_interval_s
        self._defer_fraction = defer_fraction
        self._max_backoff_wait_s = max_backoff_wait_s
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._offset_ms = 0
        self._synced_at: float | None = None
        self._sync_lock = asyncio.Lock()
        self.rate_limits = RateLimitState()
        self.requests_sent = 0
        # Called with (method, path) once a request's headers are written to the socket, in
        # the requesting task; the latency metric and benchmark hook in here.
        self.on_request_sent: Callable[[str, str], None] | None = None

    def __repr__(self) -> str:
        return f"BinanceClient(rest_url={self._base!r}, api_key=<redacted>)"

    @property
    def rest_url(self) -> str:
        """Return the base URL requests go to."""
        return self._base

    @property
    def time_offset_ms(self) -> int:
        """Return the measured ``serverTime - local time`` in milliseconds."""
        return self._offset_ms

    async def __aenter__(self) -> BinanceClient:
        self._ensure_session()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            trace = aiohttp.TraceConfig()
            trace.on_request_headers_sent.append(self._headers_sent)
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=64, ttl_dns_cache=300),
                trace_configs=[trace],
            )
        return self._session

    async def _headers_sent(
        self,
        session: aiohttp.ClientSession,
        context: object,
        params: aiohttp.TraceRequestHeadersSentParams,
    ) -> None:
        # Runs in the requesting task, so a hook can read that task's context variables.
        if self.on_request_sent is not None:
            self.on_request_sent(params.method, params.url.path)

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ----------------------------------------------------------------- time

    def now_ms(self) -> int:
        """Return the current time on the venue's clock, as far as we know it."""
        return int(self._clock() * 1000) + self._offset_ms

    async def sync_time(self) -> int:
        """Measure the server-time offset now and return it in milliseconds."""
        async with self._sync_lock:
            sent = self._clock()
            body = await self._send("GET", "/fapi/v1/time", {}, signed=False, key=False)
            received = self._clock()
            server = int(body["serverTime"])
            self._offset_ms = server - int((sent + received) * 500)
            self._synced_at = received
            logger.debug("Server time synced offset_ms=%d", self._offset_ms)
            return self._offset_ms

    async def _maybe_sync(self) -> None:
        due = self._synced_at is None or (
            self._clock() - self._synced_at >= self._resync_interval_s
        )
        if due:
            await self.sync_time()

    # ----------------------------------------------------------------- core

    async def request(
        self,
        method: str,
        path: str,
        params: Mapping[str, ParamValue] | None = None,
        *,
        signed: bool = False,
        key: bool = False,
        essential: bool = True,
    ) -> Any:  # noqa: ANN401 - a decoded JSON document is dynamically typed
        """Send one REST request and return the decoded JSON.

        Args:
            method: ``GET``, ``POST``, ``PUT`` or ``DELETE``.
            path: the path under the base URL (``/fapi/v1/order``).
            params: the parameters; values are str, int, bool or Decimal (never float).
            signed: add ``recvWindow``, ``timestamp`` and ``signature``.
            key: send the API key header (implied by ``signed``).
            essential: False lets the client defer the call when the weight budget runs low.

        Returns:
            The decoded JSON document.

        Raises:
            OrderRejected: the venue refused the request; nothing executed.
            RetryableError: nothing was accepted (connection, overload, rate limit).
            OrderStatusUnknown: a state-changing request may have executed.
        """
        wire = {name: _wire_value(name, value) for name, value in (params or {}).items()}
        if signed:
            await self._maybe_sync()
        try:
            return await self._send(
                method, path, wire, signed=signed, key=key or signed, essential=essential
            )
        except ExchangeError as exc:
            if signed and exc.code in (-1021, -5028):
                logger.warning(
                    "Timestamp rejected, resyncing clock code=%d path=%s", exc.code, path
                )
                await self.sync_time()
                return await self._send(
                    method, path, wire, signed=True, key=True, essential=essential
                )
            raise

    async def _wait_for_budget(self, essential: bool) -> None:
        state = self.rate_limits
        remaining = state.backoff_until - time.monotonic()
        if remaining > 0:
            if remaining > self._max_backoff_wait_s:
                raise RateLimited(
                    -1003,
                    f"backing off for {remaining:.1f} s after a rate-limit answer",
                    http_status=None,
                    retry_after_s=remaining,
                )
            logger.warning("Waiting out rate-limit backoff seconds=%.2f", remaining)
            await asyncio.sleep(remaining)
        if not essential and state.used_weight_1m >= self._defer_fraction * state.weight_limit_1m:
            # The weight window is a wall-clock minute: wait for the next one.
            now = self._clock()
            wait = 60.0 - (now % 60.0) + 0.05
            logger.warning(
                "Deferring non-essential call used_weight=%d limit=%d seconds=%.1f",
                state.used_weight_1m,
                state.weight_limit_1m,
                wait,
            )
            await asyncio.sleep(wait)
            state.used_weight_1m = 0

    async def _send(
        self,
        method: str,
        path: str,
        wire: Mapping[str, str],
        *,
        signed: bool,
        key: bool,
        essential: bool = True,
    ) -> Any:  # noqa: ANN401 - a decoded JSON document is dynamically typed
        await self._wait_for_budget(essential)
        session = self._ensure_session()
        items = list(wire.items())
        if signed:
            items.append(("recvWindow", self._recv_window))
            items.append(("timestamp", str(self.now_ms())))
        use_body = method in ("POST", "PUT")
        encoded = urlencode(items)
        query, body = ("", encoded) if use_body else (encoded, "")
        if signed:
            signature = sign(self._secret, query + body)
            if use_body:
                body = f"{body}&signature={signature}" if body else f"signature={signature}"
            else:
                query = f"{query}&signature={signature}" if query else f"signature={signature}"
        url = URL(f"{self._base}{path}?{query}" if query else f"{self._base}{path}", encoded=True)
        headers = {}
        if key:
            headers["X-MBX-APIKEY"] = self._api_key
        if use_body:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        mutating = method != "GET" and path not in ("/fapi/v1/listenKey",)
        self.requests_sent += 1
        try:
            async with session.request(
                method, url, data=body.encode() if use_body else None, headers=headers
            ) as response:
                raw = await response.read()
                status = response.status
                self.rate_limits.update(response.headers)
                retry_after = _retry_after(response.headers.get("Retry-After"))
        except aiohttp.ClientConnectorError as exc:
            # The connection was never made, so nothing was sent.
            raise RetryableError(-1001, f"cannot connect to {self._base}: {exc.os_error}") from None
        except (TimeoutError, aiohttp.ClientError) as exc:
            err = error_for(
                0,
                f"no answer from {method} {path}: {type(exc).__name__}",
                http_status=None,
                mutating=mutating,
            )
            raise err from None
        if 200 <= status < 300:
            return orjson.loads(raw) if raw else {}
        code, msg = _error_body(raw, status)
        err = error_for(code, msg, http_status=status, mutating=mutating, retry_after_s=retry_after)
        if isinstance(err, RateLimited):
            self.rate_limits.backoff_until = max(
                self.rate_limits.backoff_until, time.monotonic() + err.retry_after_s
            )
            logger.warning(
                "Rate limited status=%d code=%d retry_after_s=%.1f path=%s",
                status,
                err.code,
                err.retry_after_s,
                path,
            )
        raise err

    # ----------------------------------------------------------------- market data

    async def ping(self) -> None:
        """Check connectivity (``GET /fapi/v1/ping``)."""
        await self.request("GET", "/fapi/v1/ping")

    async def server_time_ms(self) -> int:
        """Return the venue's clock (``GET /fapi/v1/time``)."""
        body = await self.request("GET", "/fapi/v1/time")
        return int(body["serverTime"])

    async def exchange_info(self) -> bytes:
        """Return the raw ``GET /fapi/v1/exchangeInfo`` document.

        The REQUEST_WEIGHT limit it declares becomes the client's weight budget.
        """
        session = self._ensure_session()
        await self._wait_for_budget(essential=True)
        url = URL(f"{self._base}/fapi/v1/exchangeInfo", encoded=True)
        try:
            async with session.get(url) as response:
                raw = await response.read()
                self.rate_limits.update(response.headers)
                status = response.status
        except aiohttp.ClientError as exc:
            raise RetryableError(-1001, f"exchangeInfo failed: {type(exc).__name__}") from None
        if status != 200:
            code, msg = _error_body(raw, status)
            raise error_for(code, msg, http_status=status, mutating=False)
        try:
            for limit in orjson.loads(raw).get("rateLimits", []):
                if (
                    limit.get("rateLimitType") == "REQUEST_WEIGHT"
                    and limit.get("interval") == "MINUTE"
                ):
                    per = int(limit.get("intervalNum", 1))
                    self.rate_limits.weight_limit_1m = int(limit["limit"]) // max(per, 1)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            logger.warning("exchangeInfo rateLimits unreadable; keeping weight limit")
        return raw

    async def mark_price_klines(self, symbol: str, interval: str, limit: int) -> list[list[Any]]:
        """Return mark-price klines, oldest first (``GET /fapi/v1/markPriceKlines``)."""
        body = await self.request(
            "GET",
            "/fapi/v1/markPriceKlines",
            {"symbol": symbol, "interval": interval, "limit": limit},
            essential=False,
        )
        return list(body)

    async def premium_index(self, symbol: str | None = None) -> list[JsonObject]:
        """Return mark prices (``GET /fapi/v1/premiumIndex``), always as a list."""
        params = {"symbol": symbol} if symbol else {}
        body = await self.request("GET", "/fapi/v1/premiumIndex", params)
        return [body] if isinstance(body, dict) else list(body)

    async def ticker_24hr(self) -> list[JsonObject]:
        """Return 24 h statistics for every symbol (``GET /fapi/v1/ticker/24hr``)."""
        body = await self.request("GET", "/fapi/v1/ticker/24hr", essential=False)
        return [body] if isinstance(body, dict) else list(body)

    # ----------------------------------------------------------------- account

    async def is_hedge_mode(self) -> bool:
        """Return True in hedge mode (``GET /fapi/v1/positionSide/dual``, weight 30)."""
        body = await self.request("GET", "/fapi/v1/positionSide/dual", signed=True)
        value = body["dualSidePosition"]
        return value is True or str(value).lower() == "true"

    async def set_position_mode(self, hedge: bool) -> None:
        """Switch the account's position mode; -4059 (already so) is success."""
        try:
            await self.request(
                "POST", "/fapi/v1/positionSide/dual", {"dualSidePosition": hedge}, signed=True
            )
        except OrderRejected as exc:
            if exc.code != -4059:
                raise

    async def set_leverage(self, symbol: str, leverage: int) -> JsonObject:
        """Set a symbol's leverage (``POST /fapi/v1/leverage``)."""
        body: JsonObject = await self.request(
            "POST", "/fapi/v1/leverage", {"symbol": symbol, "leverage": leverage}, signed=True
        )
        return body

    async def set_margin_type(self, symbol: str, margin_type: str) -> None:
        """Set ISOLATED or CROSSED; an answer of -4046 (no change needed) is success."""
        try:
            await self.request(
                "POST",
                "/fapi/v1/marginType",
                {"symbol": symbol, "marginType": margin_type},
                signed=True,
            )
        except OrderRejected as exc:
            if exc.code != -4046:
                raise

    async def symbol_config(self, symbol: str | None = None) -> list[JsonObject]:
        """Return leverage and margin type per symbol (``GET /fapi/v1/symbolConfig``, weight 5).

        v3 positionRisk has no leverage field (contract 2.5): this is where it is read.
        """
        params = {"symbol": symbol} if symbol else {}
        body = await self.request("GET", "/fapi/v1/symbolConfig", params, signed=True)
        return [body] if isinstance(body, dict) else list(body)

    async def account_config(self) -> JsonObject:
        """Return the account's modes (``GET /fapi/v1/accountConfig``).

        Fields used: ``dualSidePosition`` and ``multiAssetsMargin`` (contract 2.5).
        """
        body: JsonObject = await self.request("GET", "/fapi/v1/accountConfig", signed=True)
        return body

    async def position_risk(self) -> list[JsonObject]:
        """Return position rows (``GET /fapi/v3/positionRisk``), signed ``positionAmt``."""
        return list(await self.request("GET", "/fapi/v3/positionRisk", signed=True))

    async def account(self) -> JsonObject:
        """Return the account document (``GET /fapi/v3/account``)."""
        body: JsonObject = await self.request("GET", "/fapi/v3/account", signed=True)
        return body

    # ----------------------------------------------------------------- orders

    async def new_order(self, params: Mapping[str, str]) -> JsonObject:
        """Place a LIMIT or MARKET order (``POST /fapi/v1/order``)."""
        body: JsonObject = await self.request("POST", "/fapi/v1/order", params, signed=True)
        return body

    async def get_order(self, symbol: str, client_order_id: str) -> JsonObject | None:
        """Look an order up by client id; None when the venue does not know it (-2013)."""
        return await self._lookup(
            "/fapi/v1/order", {"symbol": symbol, "origClientOrderId": client_order_id}
        )

    async def cancel_order(self, symbol: str, client_order_id: str) -> JsonObject:
        """Cancel an open order by client id (``DELETE /fapi/v1/order``)."""
        body: JsonObject = await self.request(
            "DELETE",
            "/fapi/v1/order",
            {"symbol": symbol, "origClientOrderId": client_order_id},
            signed=True,
        )
        return body

    async def open_orders(self, symbol: str | None = None) -> list[JsonObject]:
        """Return open LIMIT/MARKET orders (``GET /fapi/v1/openOrders``)."""
        params = {"symbol": symbol} if symbol else {}
        return list(await self.request("GET", "/fapi/v1/openOrders", params, signed=True))

    async def new_algo_order(self, params: Mapping[str, str]) -> JsonObject:
        """Place a conditional order (``POST /fapi/v1/algoOrder``, algoType CONDITIONAL)."""
        wire = dict(params)
        wire.setdefault("algoType", "CONDITIONAL")
        body: JsonObject = await self.request("POST", "/fapi/v1/algoOrder", wire, signed=True)
        return body

    async def get_algo_order(self, symbol: str, client_algo_id: str) -> JsonObject | None:
        """Look a conditional order up by client algo id; None when unknown (-2013)."""
        return await self._lookup(
            "/fapi/v1/algoOrder", {"symbol": symbol, "clientAlgoId": client_algo_id}
        )

    async def _lookup(self, path: str, params: Mapping[str, str]) -> JsonObject | None:
        # -2013 "Order does not exist" is an answer here, not a failure: the caller
        # resolving an unknown outcome needs "not there" apart from every error.
        try:
            body: JsonObject = await self.request("GET", path, params, signed=True)
        except OrderRejected as exc:
            if exc.code == -2013:
                return None
            raise
        return body

    async def cancel_algo_order(self, symbol: str, client_algo_id: str) -> JsonObject:
        """Cancel an open conditional order by its client algo id."""
        body: JsonObject = await self.request(
            "DELETE",
            "/fapi/v1/algoOrder",
            {"symbol": symbol, "clientAlgoId": client_algo_id},
            signed=True,
        )
        return body

    async def open_algo_orders(self, symbol: str | None = None) -> list[JsonObject]:
        """Return open conditional orders (``GET /fapi/v1/openAlgoOrders``)."""
        params = {"symbol": symbol} if symbol else {}
        body = await self.request("GET", "/fapi/v1/openAlgoOrders", params, signed=True)
        if isinstance(body, dict):
            # Some venues wrap the list ({"orders": [...]}); accept both shapes.
            return list(body.get("orders", []))
        return list(body)

    # ----------------------------------------------------------------- user stream

    async def create_listen_key(self) -> str:
        """Create (or return the active) user-data listenKey."""
        body = await self.request("POST", "/fapi/v1/listenKey", key=True)
        return str(body["listenKey"])

    async def keepalive_listen_key(self) -> None:
        """Extend the listenKey by 60 minutes; -1125 means it is gone (create a new one)."""
        await self.request("PUT", "/fapi/v1/listenKey", key=True)

    async def close_listen_key(self) -> None:
        """Close the user-data stream."""
        await self.request("DELETE", "/fapi/v1/listenKey", key=True)


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _error_body(raw: bytes, status: int) -> tuple[int, str]:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        text = raw.decode("utf-8", "replace").strip()[:200]
        return 0, text or f"HTTP {status}"
    if isinstance(doc, dict) and "code" in doc:
        try:
            code = int(doc["code"])
        except (TypeError, ValueError):
            code = 0
        return code, str(doc.get("msg", ""))
    return 0, f"HTTP {status}"


__all__ = ["BinanceClient", "RateLimitState", "sign"]
