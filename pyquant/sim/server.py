"""The simulated venue's server: Binance's REST paths and websockets on one loopback port.

``Venue`` wires the pure parts together (``exchange`` for accounts and matching, ``replay`` for
prices, ``validation`` for rules, ``ratelimit``, ``faults``, ``records``) behind an aiohttp app:

* REST under ``/fapi`` with Binance's security types: HMAC-SHA256 over the raw query string
  concatenated with the raw body as received (``-1022``), ``timestamp``/``recvWindow`` against the
  server's wall clock plus an injectable skew (``-1021``), the ``X-MBX-APIKEY`` header
  (``-2014``/``-2015``); weights and order counts from the served exchangeInfo ``rateLimits``
  with the ``X-MBX-USED-WEIGHT-1M`` and ``X-MBX-ORDER-COUNT-*`` headers (``429``/``-1003``).
* websockets on ``/ws``, ``/stream`` and the ``/public``, ``/market``, ``/private`` routes
  (``streams``), fed by a ticker that advances the replay one exchange-clock second at a time.
* ``/admin/*`` for tests and scripts, answered only to loopback peers.

Clocks: signatures and ``/fapi/v1/time`` follow the wall clock (clients stamp requests with
theirs); market data, order times and listenKey expiry follow the exchange clock, which is the
wall clock at ``speed`` 1, runs faster at higher speeds and only moves through ``step`` at
``speed`` 0 (how tests drive the venue deterministically).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import gzip
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import orjson
from aiohttp import web

from pyquant.sim import streams
from pyquant.sim.account import AccountSettings
from pyquant.sim.exchange import Exchange
from pyquant.sim.faults import FaultConfig, Faults, OrderFault
from pyquant.sim.margin import max_notional_for
from pyquant.sim.matching import TestOnly
from pyquant.sim.ratelimit import Limited, RateLimits
from pyquant.sim.records import OrderLog, load_state, save_state
from pyquant.sim.replay import DEFAULT_DATA, INTERVAL_MS, Replay, SimClock, load_klines
from pyquant.sim.state import ZERO
from pyquant.sim.validation import BinanceError, SymbolRules, fmt_decimal

__all__ = ["EXCHANGE_INFO", "Venue", "load_exchange_info"]

logger = logging.getLogger(__name__)

EXCHANGE_INFO = Path(__file__).with_name("data") / "exchangeInfo_fapi_2025-11-26.json.gz"
_INCOME_TYPES = frozenset(
    {
        "TRANSFER",
        "WELCOME_BONUS",
        "REALIZED_PNL",
        "FUNDING_FEE",
        "COMMISSION",
        "INSURANCE_CLEAR",
        "REFERRAL_KICKBACK",
        "COMMISSION_REBATE",
        "API_REBATE",
        "CONTEST_REWARD",
        "CROSS_COLLATERAL_TRANSFER",
        "OPTIONS_PREMIUM_FEE",
        "OPTIONS_SETTLE_PROFIT",
        "INTERNAL_TRANSFER",
        "AUTO_EXCHANGE",
        "DELIVERED_SETTELMENT",
        "COIN_SWAP_DEPOSIT",
        "COIN_SWAP_WITHDRAW",
        "POSITION_LIMIT_INCREASE_FEE",
        "STRATEGY_UMFUTURES_TRANSFER",
        "FEE_RETURN",
        "BFUSD_REWARD",
    }
)
_API_KEY = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")
_LOOPBACK = ("127.0.0.1", "::1", "localhost")

Handler = Callable[[dict[str, str]], Awaitable[object]]


def load_exchange_info(path: str | Path | None = None) -> dict[str, Any]:
    """Load an exchangeInfo snapshot (``.json`` or ``.json.gz``); default: the bundled one."""
    return copy.deepcopy(_load_exchange_info(str(path) if path else str(EXCHANGE_INFO)))


@functools.lru_cache(maxsize=4)
def _load_exchange_info(path: str) -> dict[str, Any]:
    source = Path(path)
    raw = gzip.decompress(source.read_bytes()) if source.suffix == ".gz" else source.read_bytes()
    info: dict[str, Any] = json.loads(raw)
    return info


def _klines_weight(p: dict[str, str]) -> int:
    try:
        limit = int(p.get("limit") or 500)
    except ValueError:
        return 1
    if limit < 100:
        return 1
    if limit < 500:
        return 2
    if limit <= 1000:
        return 5
    return 10


def _by_symbol(one: int, many: int) -> Callable[[dict[str, str]], int]:
    return lambda p: one if p.get("symbol") else many


class Venue:
    """A running (or ready to run) simulated Binance USDⓈ-M futures venue.

    Use :func:`pyquant.sim.serve` rather than this class directly. Attributes of interest:
    ``rest_url``, ``ws_url``, ``api_key``, ``api_secret``, ``exchange`` (the matching state),
    ``order_log``, ``replay``, ``clock``, ``faults``.

    Args:
        host: Address to bind (keep it on loopback).
        port: Port to bind; 0 picks a free one (read ``venue.rest_url``).
        data: Kline files (Parquet/CSV) to replay; None: the bundled real data set, unless
            ``symbols`` is given alone (then every symbol is a seeded random walk).
        symbols: Symbols to serve as a seeded random walk (any real symbol of the snapshot).
        speed: Exchange-clock seconds per wall second; 0 = manual clock (tests: ``step``).
        position_mode: ``"one-way"`` or ``"hedge"``.
        balance: Starting USDT wallet balance.
        api_key: API key clients must send; a fresh random key pair when None.
        api_secret: HMAC secret paired with ``api_key``.
        seed: Seed of the in-bar price paths, the random walk and fault draws.
        fees: (maker, taker) fee rates.
        slippage_ticks: Ticks a MARKET fill moves against the taker.
        state: JSON file that keeps the account across restarts.
        faults: Fault switches (see :mod:`pyquant.sim.faults`).
        rate_limits: Replacement exchangeInfo ``rateLimits`` (served and enforced).
        exchange_info: Another exchangeInfo snapshot (path or dict).
        time_skew_ms: Offset of the server's clock for ``timestamp`` checks and ``/time``.
        ping_interval_s: Websocket ping-frame interval (Binance: 180 s).
        max_connection_s: Websocket connection lifetime (Binance: 24 h).
        start_ms: Exchange clock at start (default: now).
        walk_start: Start prices of the random-walk symbols (default: 10 000 ticks).
        liquidation: Liquidate legs whose mark reaches their liquidation price (an
            ``autoclose-`` order; see :mod:`pyquant.sim.liquidation`). Off by default.
        funding: Charge funding every 8 h of exchange time (00/08/16 UTC). Off by default.
        funding_rate: Funding rate of every symbol (served as ``lastFundingRate``).
        account: Multi-Assets mode, API key permissions, whether ``apiRestrictions`` is
            served and which websocket routes are refused (see :mod:`pyquant.sim.account`).

    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        data: list[str | Path] | None = None,
        *,
        symbols: list[str] | None = None,
        speed: float = 1.0,
        position_mode: str = "one-way",
        balance: Decimal | str | int = 10_000,
        api_key: str | None = None,
        api_secret: str | None = None,
        seed: int = 0,
        fees: tuple[Decimal | str, Decimal | str] = ("0.0002", "0.0005"),
        slippage_ticks: int = 0,
        state: str | Path | None = None,
        faults: FaultConfig | dict[str, Any] | None = None,
        rate_limits: list[dict[str, Any]] | None = None,
        exchange_info: str | Path | dict[str, Any] | None = None,
        time_skew_ms: int = 0,
        ping_interval_s: float = 180.0,
        max_connection_s: float = 86_400.0,
        start_ms: int | None = None,
        walk_start: dict[str, Decimal] | None = None,
        liquidation: bool = False,
        funding: bool = False,
        funding_rate: Decimal | str = "0.0001",
        account: AccountSettings | dict[str, Any] | None = None,
    ) -> None:
        if (api_key is None) != (api_secret is None):
            raise ValueError("api_key and api_secret must be given together (or neither)")
        if api_key is not None and not _API_KEY.match(api_key):
            raise ValueError(f"api_key {api_key!r} found: must match {_API_KEY.pattern}")
        self.host = host
        self.port = port
        self.api_key = api_key or secrets.token_hex(32)
        self.api_secret = api_secret or secrets.token_hex(32)
        info = (
            exchange_info
            if isinstance(exchange_info, dict)
            else _load_exchange_info(str(exchange_info or EXCHANGE_INFO))
        )
        klines = load_klines(data if data is not None else ([DEFAULT_DATA] if not symbols else []))
        wanted = list(klines) + [s for s in (symbols or []) if s not in klines]
        by_name = {s["symbol"]: s for s in info["symbols"]}
        unknown = [s for s in wanted if s not in by_name]
        if unknown:
            raise ValueError(f"symbol(s) {', '.join(unknown)} not in the exchangeInfo snapshot")
        if not wanted:
            raise ValueError("no symbols to serve: give data files or a symbol list")
        self.info = {**info, "symbols": [by_name[s] for s in wanted]}
        if rate_limits is not None:
            self.info["rateLimits"] = rate_limits
        self.rules = {s: SymbolRules.from_exchange_info(by_name[s]) for s in wanted}
        self.clock = SimClock(start_ms, speed)
        self.replay = Replay(klines, self.rules, self.clock.now_ms(), seed, walk_start)
        maker, taker = (Decimal(str(f)) for f in fees)
        self.exchange = Exchange(
            self.rules,
            self.clock.now_ms,
            balance=Decimal(str(balance)),
            position_mode=position_mode,
            maker_fee=maker,
            taker_fee=taker,
            slippage_ticks=slippage_ticks,
            liquidation=liquidation,
            funding=funding,
            funding_rate=Decimal(str(funding_rate)),
        )
        self.state_path = Path(state) if state else None
        if self.state_path is not None and load_state(self.exchange, self.state_path):
            logger.info("Loaded account state path=%s", self.state_path)
        self.order_log = OrderLog(self.exchange)
        config = FaultConfig.from_dict(faults) if isinstance(faults, dict) else faults
        self.faults = Faults(config, seed)
        self.limits = RateLimits(self.info["rateLimits"], lambda: int(time.time() * 1000))
        self.hub = streams.StreamHub(set(self.rules))
        self.time_skew_ms = time_skew_ms
        if isinstance(account, AccountSettings):
            self.account = account
        else:
            self.account = AccountSettings()
            self.account.update(account or {})
        self.key_created_ms = int(time.time() * 1000)
        self.ping_interval_s = ping_interval_s
        self.max_connection_s = max_connection_s
        self.overrides: dict[str, tuple[Decimal, Decimal | None]] = {}
        self._last_second = self.clock.now_ms() // 1000
        self._book_ids = 1
        self._runner: web.AppRunner | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._log_len = -1
        self._hidden: dict[int, int] = {}  # orderId -> visible from (fault: visibility delay)
        self._routes = self._route_table()
        for symbol in self.rules:
            self.exchange.set_price(symbol, self.replay.price_at(symbol, self.clock.now_ms()))
        self.exchange.drain_events()

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def rest_url(self) -> str:
        """Base REST URL (``/fapi/...`` paths go below it)."""
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        """Base websocket URL (``/ws/...``, ``/stream?...``, ``/market/...``)."""
        return f"ws://{self.host}:{self.port}"

    async def start(self) -> None:
        """Bind the port and start serving (and the ticker unless the clock is manual)."""
        app = web.Application(client_max_size=1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None)
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        if not self.clock.manual:
            self._ticker = asyncio.create_task(self._tick_loop())
        logger.info(
            "Simulator serving rest=%s symbols=%s speed=%s mode=%s",
            self.rest_url,
            ",".join(self.rules),
            self.clock.speed,
            "hedge" if self.exchange.dual else "one-way",
        )

    async def stop(self) -> None:
        """Stop the ticker, close websockets and the port; persist the state."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for conn in list(self.hub.connections):
            with contextlib.suppress(Exception):
                await conn.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
        for task in list(self._tasks):
            task.cancel()
        self._persist(force=True)

    # --- admin hooks (tests drive the venue through these) ------------------------------------

    async def set_mark(
        self, symbol: str, mark: Decimal | str | float, last: Decimal | str | None = None
    ) -> None:
        """Pin ``symbol``'s mark (and optionally last) price until :meth:`release_mark`.

        The update is applied at once: crossed LIMIT orders fill, algo orders trigger, the
        mark-price streams publish it and user-data events go out.
        """
        if symbol not in self.rules:
            raise ValueError(f"symbol {symbol!r} is not served")
        value = Decimal(str(mark))
        last_value = Decimal(str(last)) if last is not None else None
        self.overrides[symbol] = (value, last_value)
        self.exchange.set_price(symbol, value, last_value)
        now = self.clock.now_ms()
        self._publish_marks(now, [symbol], every=True)
        self._flush()

    def release_mark(self, symbol: str) -> None:
        """Let ``symbol`` follow the replay again."""
        self.overrides.pop(symbol, None)

    async def step(self, ms: int = 1000, *, publish: bool = True) -> int:
        """Advance the exchange clock by ``ms`` and process every second on the way.

        With ``publish=False`` the seconds passed still move prices, fill and trigger, but
        their mark-price stream messages are not sent: a test that pins marks and publishes
        each one itself (``set_mark``) then feeds clients exactly its own path.
        """
        now = self.clock.advance(ms)
        self._advance_to(now, publish=publish)
        return now

    def set_faults(self, **switches: object) -> FaultConfig:
        """Replace the fault switches (fields of :class:`FaultConfig`); returns the config."""
        config = FaultConfig.from_dict(switches)
        self.faults.config = config
        logger.info("Faults set %s", config.to_dict())
        return config

    async def drop_websockets(self) -> int:
        """Abort every websocket connection (fault); returns how many were dropped."""
        count = await self.hub.drop_all()
        logger.info("Dropped websocket connections count=%d", count)
        return count

    def set_account(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Change account settings (see :class:`~pyquant.sim.account.AccountSettings`).

        ``position_mode`` (``"hedge"``/``"one-way"``) switches the mode through the same rules
        as ``POST /fapi/v1/positionSide/dual`` (no positions or open orders); the other names
        are those of ``AccountSettings.update``. Returns the settings after the change.

        Raises:
            ValueError: a bad name or value (nothing changed).
        """
        rest = dict(changes)
        mode = rest.pop("position_mode", None)
        if mode is not None and mode not in ("hedge", "one-way"):
            raise ValueError(f"position_mode must be 'hedge' or 'one-way', found {mode!r}")
        self.account.update(rest)
        if mode is not None and (mode == "hedge") != self.exchange.dual:
            try:
                self.exchange.set_position_mode(mode == "hedge")
            except BinanceError as exc:
                raise ValueError(f"position_mode: {exc.msg}") from None
        self._flush()
        return {
            **self.account.to_dict(),
            "position_mode": "hedge" if self.exchange.dual else "one-way",
        }

    def expire_listen_key(self) -> str | None:
        """Expire the active listenKey now (``listenKeyExpired`` is sent); returns it."""
        key = self.exchange.expire_listen_key(force=True)
        if key is not None:
            self.hub.expire_user(key, self.clock.now_ms())
        return key

    # --- the ticker ---------------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        interval = max(0.02, min(1.0, 1.0 / self.clock.speed))
        while True:
            await asyncio.sleep(interval)
            try:
                self._advance_to(self.clock.now_ms())
            except Exception:
                logger.exception("Simulator tick failed")

    def _advance_to(self, now_ms: int, *, publish: bool = True) -> None:
        target = now_ms // 1000
        if target - self._last_second > 3600:  # a long pause: skip ahead, keep the last hour
            self._last_second = target - 3600
        while self._last_second < target:
            self._last_second += 1
            self._process_second(self._last_second * 1000, publish=publish)
        key = self.exchange.expire_listen_key()
        if key is not None:
            self.hub.expire_user(key, now_ms)
        self._persist()

    def _process_second(self, t_ms: int, *, publish: bool = True) -> None:
        for symbol in self.rules:
            if symbol in self.overrides:
                mark, last = self.overrides[symbol]
            else:
                mark, last = self.replay.price_at(symbol, t_ms), None
            self.exchange.set_price(symbol, mark, last)
        if publish:
            self._publish_marks(t_ms, list(self.rules), every=False)
        self._flush()

    def _publish_marks(self, t_ms: int, symbols: list[str], every: bool) -> None:
        wanted = self.hub.wanted()
        if not wanted:
            return
        third = every or (t_ms // 1000) % 3 == 0
        funding = self.exchange.next_funding_time()
        payloads = {
            s: streams.mark_price_payload(
                s, self.exchange.mark(s), t_ms, funding, self.exchange.funding_rate_of(s)
            )
            for s in symbols
        }
        for symbol, payload in payloads.items():
            low = symbol.lower()
            self.hub.publish(f"{low}@markprice@1s", payload)
            if third:
                self.hub.publish(f"{low}@markprice", payload)
            if f"{low}@bookticker" in wanted:
                self._book_ids += 1
                self.hub.publish(
                    f"{low}@bookticker",
                    streams.book_ticker_payload(
                        self.rules[symbol], self.exchange.mark(symbol), self._book_ids, t_ms
                    ),
                )
            for interval in INTERVAL_MS:
                name = f"{low}@kline_{interval}"
                if name in wanted:
                    rows = self.replay.klines(symbol, interval, t_ms, limit=1)
                    if rows:
                        closed = t_ms + 1000 >= rows[-1][6]
                        self.hub.publish(
                            name, streams.kline_payload(symbol, interval, rows[-1], t_ms, closed)
                        )
        every_symbol = list(payloads.values())
        self.hub.publish("!markprice@arr@1s", every_symbol)
        if third:
            self.hub.publish("!markprice@arr", every_symbol)

    def _flush(self) -> None:
        events = self.exchange.drain_events()
        active = self.exchange.listen_key
        if not events or active is None:
            return
        for event in events:
            self.hub.publish_user(active.key, event)

    def _persist(self, force: bool = False) -> None:
        if self.state_path is None:
            return
        size = len(self.exchange.log)
        if force or size != self._log_len:
            self._log_len = size
            save_state(self.exchange, self.state_path)

    # --- HTTP dispatch ------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        try:
            if path.startswith("/admin/"):
                return await self._admin(request)
            if request.headers.get("Upgrade", "").lower() == "websocket":
                return await self._websocket(request)
            return await self._rest(request)
        except BinanceError as exc:
            return self._error(exc, {})
        except Exception:
            logger.exception("Simulator request failed path=%s", path)
            return self._error(BinanceError(-1000, http_status=500), {})

    def _error(self, exc: BinanceError, headers: dict[str, str]) -> web.Response:
        return web.Response(
            body=orjson.dumps(exc.body()),
            status=exc.http_status,
            content_type="application/json",
            headers=headers,
        )

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        key = (request.method, request.path.rstrip("/") or "/")
        route = self._routes.get(key)
        if route is None:
            known = any(path == key[1] for _, path in self._routes)
            status = 405 if known else 404
            return web.Response(
                body=orjson.dumps(
                    {
                        "code": -5000,
                        "msg": f"Path {request.path}, Method {request.method} is invalid",
                    }
                ),
                status=status,
                content_type="application/json",
            )
        handler, security, weight, order_counts = route
        ip = request.remote or "?"
        if self.faults.reject_429():
            return self._error(
                BinanceError(-1003, http_status=429, limit=self._weight_limit()),
                self.limits.weight_headers(ip),
            )
        if self.faults.drop():
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)
        wait = self.faults.stall_ms()
        if wait:
            await asyncio.sleep(wait / 1000)
        raw_query = request.rel_url.raw_query_string
        raw_body = (
            (await request.read()).decode("utf-8", "replace") if request.can_read_body else ""
        )
        params = self._params(raw_query, raw_body)
        try:
            headers = self.limits.charge_weight(ip, weight(params) if callable(weight) else weight)
        except Limited as exc:
            return self._error(exc, exc.headers)
        except BinanceError as exc:
            return self._error(exc, {})
        try:
            self._authenticate(request, security, params, raw_query, raw_body)
            if order_counts:
                headers.update(self.limits.charge_orders(self.api_key, order_counts))
            fault = self.faults.order_fault() if order_counts else None
            if fault is not None:
                return await self._faulted(request, fault, handler, params, headers)
            body = await handler(params)
        except Limited as exc:
            return self._error(exc, {**headers, **exc.headers})
        except BinanceError as exc:
            if order_counts:
                self.exchange._record(
                    "reject",
                    code=exc.code,
                    msg=exc.msg,
                    path=request.path,
                    symbol=params.get("symbol"),
                    clientOrderId=params.get("newClientOrderId") or params.get("clientAlgoId"),
                )
            self._flush()
            return self._error(exc, headers)
        self._flush()
        if request.method != "GET":
            self._persist()
        return web.Response(
            body=orjson.dumps(body), content_type="application/json", headers=headers
        )

    async def _faulted(
        self,
        request: web.Request,
        fault: OrderFault,
        handler: Handler,
        params: dict[str, str],
        headers: dict[str, str],
    ) -> web.StreamResponse:
        if fault.execute:
            with contextlib.suppress(BinanceError):
                await handler(params)
            self._flush()
            self._persist()
        logger.info("Injected order fault kind=%s executed=%s", fault.kind, fault.execute)
        if fault.kind == "drop":
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)
        if fault.kind == "-1007":
            return self._error(BinanceError(-1007, http_status=408), headers)
        if fault.kind == "503-unavailable":
            return self._error(
                BinanceError(-1001, "Service Unavailable.", http_status=503), headers
            )
        return self._error(
            BinanceError(
                -1000,
                "Unknown error, please check your request or try again later.",
                http_status=503,
            ),
            headers,
        )

    def _weight_limit(self) -> int:
        return next((lim.limit for lim in self.limits.weight if lim.kind == "REQUEST_WEIGHT"), 0)

    @staticmethod
    def _params(raw_query: str, raw_body: str) -> dict[str, str]:
        merged: dict[str, str] = {}
        for source in (raw_body, raw_query):  # the query string wins on a name in both
            seen: set[str] = set()
            for name, value in parse_qsl(source, keep_blank_values=True):
                if name in seen:
                    raise BinanceError(-1101, "Duplicate values for a parameter detected.")
                seen.add(name)
                merged[name] = value
        return merged

    def _authenticate(
        self,
        request: web.Request,
        security: str,
        params: dict[str, str],
        raw_query: str,
        raw_body: str,
    ) -> None:
        if security == "NONE":
            return
        key = request.headers.get("X-MBX-APIKEY")
        if key is None or key == "":
            raise BinanceError(-2015, http_status=401)
        if not _API_KEY.match(key):
            raise BinanceError(-2014, http_status=401)
        if not hmac.compare_digest(key, self.api_key):
            raise BinanceError(-2015, http_status=401)
        if security != "SIGNED":
            return
        raw_ts = params.get("timestamp")
        if not raw_ts:
            raise BinanceError(-1102, name="timestamp")
        if not raw_ts.isdigit():
            raise BinanceError(-1102, name="timestamp")
        recv = params.get("recvWindow") or "5000"
        if not recv.isdigit():
            raise BinanceError(-1102, name="recvWindow")
        if int(recv) > 60_000:
            raise BinanceError(-1131, "recvWindow must be less than 60000")
        signature = params.get("signature")
        if not signature:
            raise BinanceError(-1102, name="signature")
        payload = _without_signature(raw_query) + _without_signature(raw_body)
        expected = hmac.new(self.api_secret.encode(), payload.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, signature.lower()):
            raise BinanceError(-1022)
        server = int(time.time() * 1000) + self.time_skew_ms
        ts = int(raw_ts)
        if ts >= server + 1000:
            raise BinanceError(
                -1021, "Timestamp for this request was 1000ms ahead of the server's time."
            )
        if server - ts > int(recv):
            raise BinanceError(-1021)

    # --- websockets ---------------------------------------------------------------------------

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip("/")
        route = "root"
        for prefix in ("/public", "/market", "/private"):
            if path == prefix or path.startswith(prefix + "/"):
                route = prefix[1:]
                path = path[len(prefix) :]
                break
        if route in self.account.refused_ws_routes:
            # what a host that does not serve the route answers (admin toggle; contract 1.1)
            raise BinanceError(-5000, f"Path {request.path} is invalid", http_status=404)
        names: list[str] = []
        combined = False
        if path == "/stream":
            combined = True
            names = [n for n in request.query.get("streams", "").split("/") if n]
        elif path.startswith("/ws"):
            names = [n for n in path[len("/ws") :].split("/") if n]
        else:
            raise BinanceError(-5000, f"Path {request.path} is invalid", http_status=404)
        listen_key = request.query.get("listenKey")
        market: list[tuple[streams.StreamKind, str]] = []
        for name in names:
            if "@" not in name and not name.startswith("!"):
                listen_key = name
                continue
            kind = streams.classify(name, set(self.rules))
            if isinstance(kind, str):
                raise BinanceError(-1100, f"Invalid request: {kind}")
            market.append((kind, name))
        if listen_key is not None:
            if route not in ("root", "private") or market:
                raise BinanceError(
                    -1100, "Invalid request: user data is served on /private (or the root) only"
                )
            if not self.exchange.listen_key_valid(listen_key):
                raise BinanceError(-1125)
        elif route == "private":
            raise BinanceError(-1102, name="listenKey")
        if len(market) > streams.MAX_STREAMS:
            raise BinanceError(-1100, "Invalid request: too many streams")
        ws = web.WebSocketResponse(heartbeat=self.ping_interval_s, autoping=True)
        conn = streams.Connection(ws=ws, route=route, combined=combined, listen_key=listen_key)
        for kind, name in market:
            if not conn.allows(kind):
                raise BinanceError(
                    -1100, f"Invalid request: stream '{name}' is not served on /{route}"
                )
            conn.subs[kind.canonical] = name
        await ws.prepare(request)
        self.hub.connections.add(conn)
        writer = asyncio.create_task(streams.writer(conn))
        self._tasks.add(writer)
        lifetime = asyncio.get_running_loop().call_later(
            self.max_connection_s, conn.queue.put_nowait, None
        )
        try:
            await streams.reader(self.hub, conn, time.time)
        finally:
            lifetime.cancel()
            self.hub.connections.discard(conn)
            conn.queue.put_nowait(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer, 2)
            self._tasks.discard(writer)
        return ws

    # --- admin --------------------------------------------------------------------------------

    async def _admin(self, request: web.Request) -> web.Response:
        if (request.remote or "") not in _LOOPBACK:
            return web.Response(status=403, text="admin endpoints answer loopback peers only")
        body: dict[str, Any] = {}
        if request.can_read_body:
            try:
                loaded = json.loads(await request.read() or b"{}")
            except json.JSONDecodeError as exc:
                return web.json_response({"error": f"body is not JSON: {exc}"}, status=400)
            if not isinstance(loaded, dict):
                return web.json_response({"error": "body must be a JSON object"}, status=400)
            body = loaded
        action = request.path[len("/admin/") :]
        try:
            if action == "faults" and request.method == "GET":
                return web.json_response(self.faults.config.to_dict())
            if action == "faults":
                return web.json_response(self.set_faults(**body).to_dict())
            if action == "mark":
                await self.set_mark(
                    str(body["symbol"]),
                    str(body["price"]),
                    str(body["last"]) if body.get("last") else None,
                )
                return web.json_response(
                    {"symbol": body["symbol"], "markPrice": str(body["price"])}
                )
            if action == "release":
                self.release_mark(str(body["symbol"]))
                return web.json_response({"symbol": body["symbol"]})
            if action == "step":
                now = await self.step(
                    int(body.get("ms", 1000)), publish=bool(body.get("publish", True))
                )
                return web.json_response({"time": now})
            if action == "drop_websockets":
                return web.json_response({"dropped": await self.drop_websockets()})
            if action == "expire_listen_key":
                return web.json_response({"listenKey": self.expire_listen_key()})
            if action == "time_skew":
                self.time_skew_ms = int(body["ms"])
                return web.json_response({"time_skew_ms": self.time_skew_ms})
            if action == "orders":
                return web.json_response(self.order_log.entries)
            if action == "account" and request.method == "GET":
                return web.json_response(self.account.to_dict())
            if action == "account":
                return web.json_response(self.set_account(body))
        except (KeyError, ValueError, TypeError) as exc:
            return web.json_response({"error": f"{type(exc).__name__}: {exc}"}, status=400)
        return web.json_response({"error": f"unknown admin action {action!r}"}, status=404)

    # --- REST endpoints -----------------------------------------------------------------------

    def _route_table(
        self,
    ) -> dict[tuple[str, str], tuple[Handler, str, Any, dict[str, int] | None]]:
        one = {"10S": 1, "1M": 1}
        v1 = "/fapi/v1/"
        table: dict[tuple[str, str], tuple[Handler, str, Any, dict[str, int] | None]] = {
            ("GET", v1 + "ping"): (self._ping, "NONE", 1, None),
            ("GET", v1 + "time"): (self._time, "NONE", 1, None),
            ("GET", v1 + "exchangeInfo"): (self._exchange_info, "NONE", 1, None),
            ("GET", v1 + "klines"): (self._klines, "NONE", _klines_weight, None),
            ("GET", v1 + "markPriceKlines"): (self._mark_klines, "NONE", _klines_weight, None),
            ("GET", v1 + "indexPriceKlines"): (self._index_klines, "NONE", _klines_weight, None),
            ("GET", v1 + "premiumIndex"): (self._premium_index, "NONE", _by_symbol(1, 10), None),
            ("GET", v1 + "ticker/24hr"): (self._ticker_24h, "NONE", _by_symbol(1, 40), None),
            ("GET", v1 + "ticker/price"): (self._ticker_price, "NONE", _by_symbol(1, 2), None),
            ("GET", "/fapi/v2/ticker/price"): (self._ticker_price, "NONE", _by_symbol(1, 2), None),
            ("GET", v1 + "ticker/bookTicker"): (self._book_ticker, "NONE", _by_symbol(2, 5), None),
            ("GET", v1 + "positionSide/dual"): (self._get_dual, "SIGNED", 30, None),
            ("POST", v1 + "positionSide/dual"): (self._set_dual, "SIGNED", 1, None),
            ("GET", v1 + "multiAssetsMargin"): (self._multi_assets, "SIGNED", 30, None),
            ("POST", v1 + "multiAssetsMargin"): (self._set_multi_assets, "SIGNED", 1, None),
            ("GET", v1 + "accountConfig"): (self._account_config, "SIGNED", 5, None),
            ("GET", v1 + "symbolConfig"): (self._symbol_config, "SIGNED", 5, None),
            ("GET", "/sapi/v1/account/apiRestrictions"): (
                self._api_restrictions,
                "SIGNED",
                1,
                None,
            ),
            ("POST", v1 + "leverage"): (self._leverage, "SIGNED", 1, None),
            ("POST", v1 + "marginType"): (self._margin_type, "SIGNED", 1, None),
            ("GET", v1 + "leverageBracket"): (self._leverage_bracket, "SIGNED", 1, None),
            ("GET", v1 + "commissionRate"): (self._commission_rate, "SIGNED", 20, None),
            ("GET", "/fapi/v2/account"): (self._account_v2, "SIGNED", 5, None),
            ("GET", "/fapi/v3/account"): (self._account_v3, "SIGNED", 5, None),
            ("GET", "/fapi/v2/balance"): (self._balance, "SIGNED", 5, None),
            ("GET", "/fapi/v3/balance"): (self._balance, "SIGNED", 5, None),
            ("GET", "/fapi/v2/positionRisk"): (self._position_risk_v2, "SIGNED", 5, None),
            ("GET", "/fapi/v3/positionRisk"): (self._position_risk_v3, "SIGNED", 5, None),
            ("POST", v1 + "order"): (self._new_order, "SIGNED", 0, one),
            ("POST", v1 + "order/test"): (self._test_order, "SIGNED", 0, None),
            ("PUT", v1 + "order"): (self._modify_order, "SIGNED", 1, None),
            ("GET", v1 + "order"): (self._get_order, "SIGNED", 1, None),
            ("DELETE", v1 + "order"): (self._cancel_order, "SIGNED", 1, None),
            ("GET", v1 + "openOrder"): (self._open_order, "SIGNED", 1, None),
            ("GET", v1 + "openOrders"): (self._open_orders, "SIGNED", _by_symbol(1, 40), None),
            ("GET", v1 + "allOrders"): (self._all_orders, "SIGNED", 5, None),
            ("DELETE", v1 + "allOpenOrders"): (self._cancel_all, "SIGNED", 1, None),
            ("POST", v1 + "batchOrders"): (self._batch_orders, "SIGNED", 5, {"10S": 5, "1M": 1}),
            ("DELETE", v1 + "batchOrders"): (self._cancel_batch, "SIGNED", 1, None),
            ("GET", v1 + "userTrades"): (self._user_trades, "SIGNED", 5, None),
            ("GET", v1 + "income"): (self._income, "SIGNED", 30, None),
            ("POST", v1 + "algoOrder"): (self._new_algo, "SIGNED", 0, one),
            ("DELETE", v1 + "algoOrder"): (self._cancel_algo, "SIGNED", 1, None),
            ("GET", v1 + "algoOrder"): (self._get_algo, "SIGNED", 1, None),
            ("GET", v1 + "openAlgoOrders"): (self._open_algo, "SIGNED", _by_symbol(1, 40), None),
            ("GET", v1 + "allAlgoOrders"): (self._all_algo, "SIGNED", 5, None),
            ("DELETE", v1 + "algoOpenOrders"): (self._cancel_all_algo, "SIGNED", 1, None),
            ("POST", v1 + "listenKey"): (self._listen_key_new, "USER_STREAM", 1, None),
            ("PUT", v1 + "listenKey"): (self._listen_key_keep, "USER_STREAM", 1, None),
            ("DELETE", v1 + "listenKey"): (self._listen_key_delete, "USER_STREAM", 1, None),
        }
        return table

    def _now(self) -> int:
        return self.clock.now_ms()

    def _symbol(self, p: dict[str, str]) -> str:
        symbol = p.get("symbol") or ""
        self.exchange.rule(symbol)
        return symbol

    async def _ping(self, p: dict[str, str]) -> object:
        return {}

    async def _time(self, p: dict[str, str]) -> object:
        return {"serverTime": int(time.time() * 1000) + self.time_skew_ms}

    async def _exchange_info(self, p: dict[str, str]) -> object:
        return {**self.info, "serverTime": int(time.time() * 1000) + self.time_skew_ms}

    def _kline_args(self, p: dict[str, str]) -> tuple[str, str, int, int | None, int | None]:
        symbol = self._symbol(p)
        interval = p.get("interval") or ""
        if not interval:
            raise BinanceError(-1102, name="interval")
        if interval not in INTERVAL_MS:
            raise BinanceError(-1120, "Invalid interval.")
        raw_limit = p.get("limit") or "500"
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 1500:
            raise BinanceError(-1130, "Data sent for parameter 'limit' is not valid.")
        times: list[int | None] = []
        for name in ("startTime", "endTime"):
            raw = p.get(name)
            if raw is None or raw == "":
                times.append(None)
            elif not raw.isdigit():
                raise BinanceError(-1102, name=name)
            else:
                times.append(int(raw))
        return symbol, interval, int(raw_limit), times[0], times[1]

    async def _klines(self, p: dict[str, str], mark: bool = False) -> object:
        symbol, interval, limit, start, end = self._kline_args(p)
        return self.replay.klines(
            symbol, interval, self._now(), start=start, end=end, limit=limit, mark=mark
        )

    async def _mark_klines(self, p: dict[str, str]) -> object:
        return await self._klines(p, mark=True)

    async def _index_klines(self, p: dict[str, str]) -> object:
        if "pair" in p and "symbol" not in p:
            p = {**p, "symbol": p["pair"]}
        return await self._klines(p, mark=True)

    def _premium(self, symbol: str) -> dict[str, Any]:
        now = self._now()
        price = fmt_decimal(self.exchange.mark(symbol), 8)
        return {
            "symbol": symbol,
            "markPrice": price,
            "indexPrice": price,
            "estimatedSettlePrice": price,
            "lastFundingRate": fmt_decimal(self.exchange.funding_rate_of(symbol), 8),
            "interestRate": "0.00010000",
            "nextFundingTime": self.exchange.next_funding_time(),
            "time": now,
        }

    async def _premium_index(self, p: dict[str, str]) -> object:
        if p.get("symbol"):
            return self._premium(self._symbol(p))
        return [self._premium(s) for s in self.rules]

    async def _ticker_24h(self, p: dict[str, str]) -> object:
        now = self._now()
        if p.get("symbol"):
            return self.replay.ticker_24h(self._symbol(p), now)
        return [self.replay.ticker_24h(s, now) for s in self.rules]

    async def _ticker_price(self, p: dict[str, str]) -> object:
        def one(s: str) -> dict[str, Any]:
            return {
                "symbol": s,
                "price": self.rules[s].fmt_price(self.exchange.last(s)),
                "time": self._now(),
            }

        return one(self._symbol(p)) if p.get("symbol") else [one(s) for s in self.rules]

    async def _book_ticker(self, p: dict[str, str]) -> object:
        def one(s: str) -> dict[str, Any]:
            raw = streams.book_ticker_payload(
                self.rules[s], self.exchange.mark(s), self._book_ids, self._now()
            )
            return {
                "symbol": s,
                "bidPrice": raw["b"],
                "bidQty": raw["B"],
                "askPrice": raw["a"],
                "askQty": raw["A"],
                "time": raw["T"],
            }

        return one(self._symbol(p)) if p.get("symbol") else [one(s) for s in self.rules]

    async def _get_dual(self, p: dict[str, str]) -> object:
        return {"dualSidePosition": self.exchange.dual}

    async def _set_dual(self, p: dict[str, str]) -> object:
        raw = (p.get("dualSidePosition") or "").lower()
        if raw not in ("true", "false"):
            raise BinanceError(-1102, name="dualSidePosition")
        self.exchange.set_position_mode(raw == "true")
        return {"code": 200, "msg": "success"}

    async def _multi_assets(self, p: dict[str, str]) -> object:
        return {"multiAssetsMargin": self.account.multi_assets}

    async def _set_multi_assets(self, p: dict[str, str]) -> object:
        """``POST /fapi/v1/multiAssetsMargin``; emits ``ACCOUNT_CONFIG_UPDATE`` with ``ai.j``."""
        raw = (p.get("multiAssetsMargin") or "").lower()
        if raw not in ("true", "false"):
            raise BinanceError(-1102, name="multiAssetsMargin")
        self.account.multi_assets = raw == "true"
        now = self._now()
        self.exchange._emit(
            {"e": "ACCOUNT_CONFIG_UPDATE", "E": now, "T": now, "ai": {"j": raw == "true"}}
        )
        return {"code": 200, "msg": "success"}

    async def _account_config(self, p: dict[str, str]) -> object:
        """``GET /fapi/v1/accountConfig`` (contract 2.5; docs Account-Config)."""
        return {
            "feeTier": 0,
            "canTrade": True,
            "canDeposit": True,
            "canWithdraw": True,
            "dualSidePosition": self.exchange.dual,
            "updateTime": 0,
            "multiAssetsMargin": self.account.multi_assets,
            "tradeGroupId": -1,
        }

    async def _symbol_config(self, p: dict[str, str]) -> object:
        """``GET /fapi/v1/symbolConfig``: leverage and margin type per symbol (contract 2.5).

        An array even when ``symbol`` is given (docs example); ``isAutoAddMargin`` is a string.
        """
        ex = self.exchange

        def one(s: str) -> dict[str, Any]:
            return {
                "symbol": s,
                "marginType": ex.margin_type.get(s, "CROSSED"),
                "isAutoAddMargin": "false",
                "leverage": ex.lev(s),
                "maxNotionalValue": str(max_notional_for(ex.lev(s))),
            }

        return [one(self._symbol(p))] if p.get("symbol") else [one(s) for s in self.rules]

    async def _api_restrictions(self, p: dict[str, str]) -> object:
        """``GET /sapi/v1/account/apiRestrictions`` (wallet API; the futures testnet lacks it)."""
        if not self.account.api_restrictions_served:
            raise BinanceError(
                -5000,
                "Path /sapi/v1/account/apiRestrictions, Method GET is invalid",
                http_status=404,
            )
        return self.account.api_restrictions(self.key_created_ms)

    async def _leverage(self, p: dict[str, str]) -> object:
        return self.exchange.set_leverage(p.get("symbol") or "", p.get("leverage"))

    async def _margin_type(self, p: dict[str, str]) -> object:
        self.exchange.set_margin_type(p.get("symbol") or "", p.get("marginType"))
        return {"code": 200, "msg": "success"}

    async def _leverage_bracket(self, p: dict[str, str]) -> object:
        from pyquant.sim.margin import BRACKETS

        def one(s: str) -> dict[str, Any]:
            return {
                "symbol": s,
                "notionalCoef": 1.0,
                "brackets": [
                    {
                        "bracket": i + 1,
                        "initialLeverage": lev,
                        "notionalCap": cap,
                        "notionalFloor": floor,
                        "maintMarginRatio": float(mmr),
                        "cum": float(cum),
                    }
                    for i, (floor, cap, lev, mmr, cum) in enumerate(BRACKETS)
                ],
            }

        if p.get("symbol"):
            return one(self._symbol(p))
        return [one(s) for s in self.rules]

    async def _commission_rate(self, p: dict[str, str]) -> object:
        symbol = self._symbol(p)
        return {
            "symbol": symbol,
            "makerCommissionRate": str(self.exchange.maker_fee),
            "takerCommissionRate": str(self.exchange.taker_fee),
            "rpiCommissionRate": "0",
        }

    # account views

    def _b8(self, value: Decimal) -> str:
        return fmt_decimal(value, 8)

    def _asset(self, v3: bool) -> dict[str, Any]:
        t = self.exchange.totals()
        out: dict[str, Any] = {
            "asset": "USDT",
            "walletBalance": self._b8(t["wallet"]),
            "unrealizedProfit": self._b8(t["unrealized"]),
            "marginBalance": self._b8(t["margin_balance"]),
            "maintMargin": self._b8(t["maint_margin"]),
            "initialMargin": self._b8(t["initial_margin"]),
            "positionInitialMargin": self._b8(t["position_margin"]),
            "openOrderInitialMargin": self._b8(t["order_margin"]),
            "maxWithdrawAmount": self._b8(t["max_withdraw"]),
            "crossWalletBalance": self._b8(t["wallet"]),
            "crossUnPnl": self._b8(t["unrealized"]),
            "availableBalance": self._b8(t["available"]),
        }
        if not v3:
            out["marginAvailable"] = True
        out["updateTime"] = self.exchange.balance_update_time
        return out

    def _totals(self) -> dict[str, Any]:
        t = self.exchange.totals()
        return {
            "totalInitialMargin": self._b8(t["initial_margin"]),
            "totalMaintMargin": self._b8(t["maint_margin"]),
            "totalWalletBalance": self._b8(t["wallet"]),
            "totalUnrealizedProfit": self._b8(t["unrealized"]),
            "totalMarginBalance": self._b8(t["margin_balance"]),
            "totalPositionInitialMargin": self._b8(t["position_margin"]),
            "totalOpenOrderInitialMargin": self._b8(t["order_margin"]),
            "totalCrossWalletBalance": self._b8(t["wallet"]),
            "totalCrossUnPnl": self._b8(t["unrealized"]),
            "availableBalance": self._b8(t["available"]),
            "maxWithdrawAmount": self._b8(t["max_withdraw"]),
        }

    def _leg_figures(self, symbol: str, side: str) -> dict[str, Any]:
        ex = self.exchange
        pos = ex.position(symbol, side)
        rules = self.rules[symbol]
        mark = ex.mark(symbol)
        notional = pos.amount * mark
        orders = [o for o in ex.open_orders(symbol) if o.position_side == side]
        order_margin = sum((ex.order_margin(o) for o in orders), ZERO)
        bid = sum((o.price * o.remaining for o in orders if o.side == "BUY"), ZERO)
        ask = sum((o.price * o.remaining for o in orders if o.side == "SELL"), ZERO)
        from pyquant.sim.margin import maint_margin

        return {
            "pos": pos,
            "rules": rules,
            "mark": mark,
            "notional": notional,
            "initial": ex.position_margin(pos),
            "maint": maint_margin(abs(notional)) if pos.amount else ZERO,
            "order_margin": order_margin,
            "bid": bid,
            "ask": ask,
            "unrealized": ex.unrealized(pos),
        }

    def _active_symbols(self) -> list[str]:
        ex = self.exchange
        return [
            s
            for s in self.rules
            if any(ex.position(s, side).amount for side in ex.legs()) or ex.open_orders(s)
        ]

    async def _account_v2(self, p: dict[str, str]) -> object:
        ex = self.exchange
        positions = []
        for symbol in self.rules:
            for side in ex.legs():
                f = self._leg_figures(symbol, side)
                pos = f["pos"]
                positions.append(
                    {
                        "symbol": symbol,
                        "initialMargin": self._b8(f["initial"] + f["order_margin"]),
                        "maintMargin": self._b8(f["maint"]),
                        "unrealizedProfit": self._b8(f["unrealized"]),
                        "positionInitialMargin": self._b8(f["initial"]),
                        "openOrderInitialMargin": self._b8(f["order_margin"]),
                        "leverage": str(ex.lev(symbol)),
                        "isolated": ex.margin_type.get(symbol) == "ISOLATED",
                        "entryPrice": f["rules"].fmt_price(pos.entry_price)
                        if pos.amount
                        else "0.0",
                        "breakEvenPrice": fmt_decimal(pos.break_even(), 8) if pos.amount else "0.0",
                        "maxNotional": str(max_notional_for(ex.lev(symbol))),
                        "bidNotional": self._b8(f["bid"]),
                        "askNotional": self._b8(f["ask"]),
                        "positionSide": side,
                        "positionAmt": f["rules"].fmt_qty(pos.amount),
                        "updateTime": pos.update_time,
                    }
                )
        return {
            "feeTier": 0,
            "canTrade": True,
            "canDeposit": True,
            "canWithdraw": True,
            "tradeGroupId": -1,
            "updateTime": 0,
            "multiAssetsMargin": self.account.multi_assets,
            **self._totals(),
            "assets": [self._asset(v3=False)],
            "positions": positions,
        }

    async def _account_v3(self, p: dict[str, str]) -> object:
        ex = self.exchange
        positions = []
        for symbol in self._active_symbols():
            for side in ex.legs():
                f = self._leg_figures(symbol, side)
                positions.append(
                    {
                        "symbol": symbol,
                        "positionSide": side,
                        "positionAmt": f["rules"].fmt_qty(f["pos"].amount),
                        "unrealizedProfit": self._b8(f["unrealized"]),
                        "isolatedMargin": self._isolated(f)[0],
                        "notional": self._b8(f["notional"]),
                        "isolatedWallet": self._isolated(f)[1],
                        "initialMargin": self._b8(f["initial"] + f["order_margin"]),
                        "maintMargin": self._b8(f["maint"]),
                        "updateTime": f["pos"].update_time,
                    }
                )
        return {**self._totals(), "assets": [self._asset(v3=True)], "positions": positions}

    async def _balance(self, p: dict[str, str]) -> object:
        t = self.exchange.totals()
        return [
            {
                "accountAlias": "SgsR",
                "asset": "USDT",
                "balance": self._b8(t["wallet"]),
                "crossWalletBalance": self._b8(t["wallet"]),
                "crossUnPnl": self._b8(t["unrealized"]),
                "availableBalance": self._b8(t["available"]),
                "maxWithdrawAmount": self._b8(t["max_withdraw"]),
                "marginAvailable": True,
                "updateTime": self.exchange.balance_update_time,
            }
        ]

    def _isolated(self, figures: dict[str, Any], zero: str = "0") -> tuple[str, str]:
        """``(isolatedMargin, isolatedWallet)`` of a leg: wallet plus unrealized PnL, wallet."""
        wallet = figures["pos"].isolated_wallet
        if not wallet:
            return zero, "0"
        return self._b8(wallet + figures["unrealized"]), self._b8(wallet)

    def _liquidation_price(self, symbol: str, side: str) -> str:
        price = self.exchange.liquidation_price(symbol, side)
        return fmt_decimal(price, 8) if price > 0 else "0"

    async def _position_risk_v2(self, p: dict[str, str]) -> object:
        ex = self.exchange
        symbols = [self._symbol(p)] if p.get("symbol") else list(self.rules)
        out = []
        for symbol in symbols:
            for side in ex.legs():
                f = self._leg_figures(symbol, side)
                pos, rules = f["pos"], f["rules"]
                out.append(
                    {
                        "symbol": symbol,
                        "positionAmt": rules.fmt_qty(pos.amount),
                        "entryPrice": fmt_decimal(pos.entry_price, 8) if pos.amount else "0.0",
                        "breakEvenPrice": fmt_decimal(pos.break_even(), 8) if pos.amount else "0.0",
                        "markPrice": fmt_decimal(f["mark"], 8),
                        "unRealizedProfit": self._b8(f["unrealized"]),
                        "liquidationPrice": self._liquidation_price(symbol, side),
                        "leverage": str(ex.lev(symbol)),
                        "maxNotionalValue": str(max_notional_for(ex.lev(symbol))),
                        "marginType": "isolated"
                        if ex.margin_type.get(symbol) == "ISOLATED"
                        else "cross",
                        "isolatedMargin": self._isolated(f, zero="0.00000000")[0],
                        "isAutoAddMargin": "false",
                        "positionSide": side,
                        "notional": self._b8(f["notional"]),
                        "isolatedWallet": self._isolated(f)[1],
                        "updateTime": pos.update_time,
                    }
                )
        return out

    async def _position_risk_v3(self, p: dict[str, str]) -> object:
        ex = self.exchange
        symbols = self._active_symbols()
        if p.get("symbol"):
            wanted = self._symbol(p)
            symbols = [s for s in symbols if s == wanted]
        out = []
        for symbol in symbols:
            for side in ex.legs():
                f = self._leg_figures(symbol, side)
                pos = f["pos"]
                out.append(
                    {
                        "symbol": symbol,
                        "positionSide": side,
                        "positionAmt": f["rules"].fmt_qty(pos.amount),
                        "entryPrice": fmt_decimal(pos.entry_price, 8) if pos.amount else "0.0",
                        "breakEvenPrice": fmt_decimal(pos.break_even(), 8) if pos.amount else "0.0",
                        "markPrice": fmt_decimal(f["mark"], 8),
                        "unRealizedProfit": self._b8(f["unrealized"]),
                        "liquidationPrice": self._liquidation_price(symbol, side),
                        "isolatedMargin": self._isolated(f)[0],
                        "notional": self._b8(f["notional"]),
                        "marginAsset": "USDT",
                        "isolatedWallet": self._isolated(f)[1],
                        "initialMargin": self._b8(f["initial"] + f["order_margin"]),
                        "maintMargin": self._b8(f["maint"]),
                        "positionInitialMargin": self._b8(f["initial"]),
                        "openOrderInitialMargin": self._b8(f["order_margin"]),
                        "adl": 0,
                        "bidNotional": self._b8(f["bid"]),
                        "askNotional": self._b8(f["ask"]),
                        "updateTime": pos.update_time,
                    }
                )
        return out

    # orders

    async def _new_order(self, p: dict[str, str]) -> object:
        order, body, _ack = self.exchange.new_order(p)
        delay = self.faults.config.visibility_delay_ms
        if delay:
            self._hidden[order.order_id] = self._now_wall() + delay
        return body

    @staticmethod
    def _now_wall() -> int:
        return int(time.time() * 1000)

    async def _test_order(self, p: dict[str, str]) -> object:
        try:
            self.exchange.new_order(p, test=True)
        except TestOnly:
            return {}
        return {}  # pragma: no cover - new_order(test=True) always raises

    async def _modify_order(self, p: dict[str, str]) -> object:
        raise BinanceError(-1020)

    def _visible(self, order_id: int) -> bool:
        until = self._hidden.get(order_id)
        if until is None:
            return True
        if self._now_wall() >= until:
            del self._hidden[order_id]
            return True
        return False

    async def _get_order(self, p: dict[str, str]) -> object:
        order = self.exchange.find_order(
            self._symbol(p), p.get("orderId"), p.get("origClientOrderId")
        )
        if not self._visible(order.order_id):
            raise BinanceError(-2013)
        return order.wire(self.rules[order.symbol], with_cum_qty=False, with_time=True)

    async def _open_order(self, p: dict[str, str]) -> object:
        order = self.exchange.find_order(
            self._symbol(p), p.get("orderId"), p.get("origClientOrderId")
        )
        if not order.is_open or not self._visible(order.order_id):
            raise BinanceError(-2013)
        return order.wire(self.rules[order.symbol], with_cum_qty=False, with_time=True)

    async def _cancel_order(self, p: dict[str, str]) -> object:
        order = self.exchange.cancel_order(
            self._symbol(p), p.get("orderId"), p.get("origClientOrderId")
        )
        return order.wire(self.rules[order.symbol])

    async def _open_orders(self, p: dict[str, str]) -> object:
        symbol = self._symbol(p) if p.get("symbol") else None
        return [
            o.wire(self.rules[o.symbol], with_cum_qty=False, with_time=True)
            for o in self.exchange.open_orders(symbol)
            if self._visible(o.order_id)
        ]

    async def _all_orders(self, p: dict[str, str]) -> object:
        symbol = self._symbol(p)
        raw_limit = p.get("limit") or "500"
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 1000:
            raise BinanceError(-1130, "Data sent for parameter 'limit' is not valid.")
        orders = [o for o in self.exchange.orders.values() if o.symbol == symbol]
        if p.get("orderId", "").isdigit():
            orders = [o for o in orders if o.order_id >= int(p["orderId"])]
        return [o.wire(self.rules[symbol], with_cum_qty=False, with_time=True) for o in orders][
            -int(raw_limit) :
        ]

    async def _cancel_all(self, p: dict[str, str]) -> object:
        self.exchange.cancel_all(self._symbol(p))
        return {"code": 200, "msg": "The operation of cancel all open order is done."}

    async def _batch_orders(self, p: dict[str, str]) -> object:
        raw = p.get("batchOrders")
        if not raw:
            raise BinanceError(-1102, name="batchOrders")
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise BinanceError(-1102, name="batchOrders") from exc
        if not isinstance(items, list) or not items:
            raise BinanceError(-1102, name="batchOrders")
        if len(items) > 5:
            raise BinanceError(-1130, "Data sent for parameter 'batchOrders' is not valid.")
        out: list[Any] = []
        for item in items:
            if not isinstance(item, dict):
                out.append(BinanceError(-1102, name="batchOrders").body())
                continue
            params = {
                str(k): ("true" if v is True else "false" if v is False else str(v))
                for k, v in item.items()
            }
            try:
                _order, body, _ack = self.exchange.new_order(params)
                out.append(body)
            except BinanceError as exc:
                self.exchange._record(
                    "reject",
                    code=exc.code,
                    msg=exc.msg,
                    path="/fapi/v1/batchOrders",
                    symbol=params.get("symbol"),
                    clientOrderId=params.get("newClientOrderId"),
                )
                out.append(exc.body())
        return out

    async def _cancel_batch(self, p: dict[str, str]) -> object:
        symbol = self._symbol(p)
        ids: list[tuple[str | None, str | None]] = []
        for name, by_id in (("orderIdList", True), ("origClientOrderIdList", False)):
            raw = p.get(name)
            if raw:
                try:
                    values = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise BinanceError(-1102, name=name) from exc
                if not isinstance(values, list) or len(values) > 10:
                    raise BinanceError(-1130, f"Data sent for parameter '{name}' is not valid.")
                ids += [((str(v), None) if by_id else (None, str(v))) for v in values]
        if not ids:
            raise BinanceError(-1102, name="orderIdList")
        out: list[Any] = []
        for order_id, client_id in ids:
            try:
                order = self.exchange.cancel_order(symbol, order_id, client_id)
                out.append(order.wire(self.rules[symbol]))
            except BinanceError as exc:
                out.append(exc.body())
        return out

    async def _income(self, p: dict[str, str]) -> object:
        """``GET /fapi/v1/income``: realized PnL, commissions, funding (default: last 7 days)."""
        symbol = self._symbol(p) if p.get("symbol") else None
        kind = p.get("incomeType") or None
        if kind is not None and kind not in _INCOME_TYPES:
            raise BinanceError(-1130, "Data sent for parameter 'incomeType' is not valid.")
        raw_limit = p.get("limit") or "100"
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 1000:
            raise BinanceError(-1130, "Data sent for parameter 'limit' is not valid.")
        raw_page = p.get("page") or "1"
        if not raw_page.isdigit() or int(raw_page) < 1:
            raise BinanceError(-1130, "Data sent for parameter 'page' is not valid.")
        bounds: dict[str, int | None] = {}
        for name in ("startTime", "endTime"):
            raw = p.get(name)
            if raw is not None and raw != "" and not raw.isdigit():
                raise BinanceError(-1102, name=name)
            bounds[name] = int(raw) if raw else None
        start, end = bounds["startTime"], bounds["endTime"]
        if start is None and end is None:
            start = self.exchange.now_ms() - 7 * 86_400_000
        flows = self.exchange.income_history(symbol, kind, start, end)
        limit, page = int(raw_limit), int(raw_page)
        return [
            {
                "symbol": i.symbol,
                "incomeType": i.income_type,
                "income": fmt_decimal(i.income, 8),
                "asset": "USDT",
                "info": i.income_type,
                "time": i.time,
                "tranId": i.tran_id,
                "tradeId": str(i.trade_id) if i.trade_id is not None else "",
            }
            for i in flows[(page - 1) * limit : page * limit]
        ]

    async def _user_trades(self, p: dict[str, str]) -> object:
        symbol = self._symbol(p)
        raw_limit = p.get("limit") or "500"
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 1000:
            raise BinanceError(-1130, "Data sent for parameter 'limit' is not valid.")

        def opt(name: str) -> int | None:
            raw = p.get(name)
            if raw is None or raw == "":
                return None
            if not raw.isdigit():
                raise BinanceError(-1102, name=name)
            return int(raw)

        trades = self.exchange.user_trades(
            symbol, int(raw_limit), opt("fromId"), opt("startTime"), opt("endTime")
        )
        order_id = opt("orderId")
        if order_id is not None:
            trades = [t for t in trades if t.order_id == order_id]
        rules = self.rules[symbol]
        return [
            {
                "symbol": t.symbol,
                "id": t.trade_id,
                "orderId": t.order_id,
                "side": t.side,
                "price": rules.fmt_price(t.price),
                "qty": rules.fmt_qty(t.qty),
                "realizedPnl": fmt_decimal(t.realized_pnl, 8),
                "marginAsset": "USDT",
                "quoteQty": fmt_decimal(t.price * t.qty, rules.quote_places),
                "commission": fmt_decimal(t.commission, 8),
                "commissionAsset": "USDT",
                "time": t.time,
                "positionSide": t.position_side,
                "maker": t.maker,
                "buyer": t.side == "BUY",
            }
            for t in trades
        ]

    async def _new_algo(self, p: dict[str, str]) -> object:
        algo = self.exchange.new_algo_order(p)
        return algo.wire(self.rules[algo.symbol])

    async def _cancel_algo(self, p: dict[str, str]) -> object:
        algo = self.exchange.cancel_algo(p.get("algoId") or p.get("algoid"), p.get("clientAlgoId"))
        return {
            "algoId": algo.algo_id,
            "clientAlgoId": algo.client_algo_id,
            "code": "200",
            "msg": "success",
        }

    async def _get_algo(self, p: dict[str, str]) -> object:
        algo = self.exchange.find_algo(p.get("algoId") or p.get("algoid"), p.get("clientAlgoId"))
        return algo.wire(self.rules[algo.symbol])

    async def _open_algo(self, p: dict[str, str]) -> object:
        symbol = self._symbol(p) if p.get("symbol") else None
        algos = self.exchange.open_algo_orders(symbol)
        if p.get("algoId"):
            algos = [a for a in algos if str(a.algo_id) == p["algoId"]]
        return [a.wire(self.rules[a.symbol]) for a in algos]

    async def _all_algo(self, p: dict[str, str]) -> object:
        symbol = self._symbol(p)
        return [
            a.wire(self.rules[symbol])
            for a in self.exchange.algo_orders.values()
            if a.symbol == symbol
        ]

    async def _cancel_all_algo(self, p: dict[str, str]) -> object:
        self.exchange.cancel_all_algo(self._symbol(p))
        return {"code": 200, "msg": "The operation of cancel all open order is done."}

    async def _listen_key_new(self, p: dict[str, str]) -> object:
        return {"listenKey": self.exchange.create_listen_key()}

    async def _listen_key_keep(self, p: dict[str, str]) -> object:
        return {"listenKey": self.exchange.keepalive_listen_key(p.get("listenKey"))}

    async def _listen_key_delete(self, p: dict[str, str]) -> object:
        self.exchange.delete_listen_key()
        return {}


def _without_signature(raw: str) -> str:
    if "signature=" not in raw:
        return raw
    return "&".join(part for part in raw.split("&") if not part.startswith("signature="))
