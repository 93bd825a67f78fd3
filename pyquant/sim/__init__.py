"""A Binance USDⓈ-M futures venue on loopback: same REST and websocket API, codes and payloads.

Start it in-process::

    async with pyquant.sim.serve(speed=0, position_mode="hedge") as venue:
        venue.rest_url, venue.ws_url, venue.api_key, venue.api_secret
        await venue.set_mark("BTCUSDT", "65000")   # pin a price: fills, triggers, streams
        await venue.step(1000)                      # advance the exchange clock 1 s
        venue.order_log.fills                       # what happened

or from the shell with ``pyquant sim`` (see :mod:`pyquant.sim.cli`). Parts: ``exchange``
(one account's venue, put together from ``state``, ``margin``, ``matching``, ``algo_orders``
and ``liquidation``), ``validation`` (filters and mode rules to Binance codes), ``replay``
(klines to a seeded per-second mark path), ``streams``, ``ratelimit``, ``faults``, ``records``
and ``server`` (the aiohttp app).

Positions report Binance's liquidation price (``positionRisk``) in both margin types and
modes; liquidation (``liquidation=True``, ``--liquidation``) and 8-hourly funding
(``funding=True``, ``--funding``) are off by default (rules in :mod:`pyquant.sim.exchange`).

Account-level answers a pre-flight check reads (Multi-Assets mode, the API key's permissions on
``/sapi/v1/account/apiRestrictions``, which websocket routes are served) come from
:mod:`pyquant.sim.account` and can be switched to a failing value for tests
(``serve(account=...)``, ``pyquant sim`` flags, the loopback ``/admin/account`` hook).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

from pyquant.sim.account import AccountSettings
from pyquant.sim.faults import FaultConfig
from pyquant.sim.server import Venue

__all__ = ["AccountSettings", "FaultConfig", "Venue", "serve"]


@contextlib.asynccontextmanager
async def serve(
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
    liquidation: bool = False,
    funding: bool = False,
    funding_rate: Decimal | str = "0.0001",
    account: AccountSettings | dict[str, Any] | None = None,
) -> AsyncIterator[Venue]:
    """Run a simulated venue for the duration of the ``async with`` block.

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
        liquidation: Liquidate legs whose mark reaches their liquidation price (an
            ``autoclose-`` order; see :mod:`pyquant.sim.exchange`). Off by default.
        funding: Charge funding every 8 h of exchange time (00/08/16 UTC). Off by default.
        funding_rate: Funding rate of every symbol (served as ``lastFundingRate``).
        account: Multi-Assets mode, API key permissions, whether ``apiRestrictions`` is
            served and which websocket routes are refused (see :mod:`pyquant.sim.account`).

    Yields:
        The running :class:`Venue`.
    """
    venue = Venue(
        host=host,
        port=port,
        data=data,
        symbols=symbols,
        speed=speed,
        position_mode=position_mode,
        balance=balance,
        api_key=api_key,
        api_secret=api_secret,
        seed=seed,
        fees=fees,
        slippage_ticks=slippage_ticks,
        state=state,
        faults=faults,
        rate_limits=rate_limits,
        exchange_info=exchange_info,
        time_skew_ms=time_skew_ms,
        ping_interval_s=ping_interval_s,
        max_connection_s=max_connection_s,
        start_ms=start_ms,
        liquidation=liquidation,
        funding=funding,
        funding_rate=funding_rate,
        account=account,
    )
    await venue.start()
    try:
        yield venue
    finally:
        await venue.stop()
