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
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import ParamSpec

from pyquant.sim.account import AccountSettings
from pyquant.sim.faults import FaultConfig
from pyquant.sim.server import Venue

__all__ = ["AccountSettings", "FaultConfig", "Venue", "serve"]


_P = ParamSpec("_P")


def _serving(make: Callable[_P, Venue]) -> Callable[_P, AbstractAsyncContextManager[Venue]]:
    """Give ``serve`` the arguments of ``make`` (the :class:`Venue` constructor) unchanged."""

    @contextlib.asynccontextmanager
    async def serve(*args: _P.args, **kwargs: _P.kwargs) -> AsyncIterator[Venue]:
        """Run a simulated venue for the duration of the ``async with`` block.

        Takes the arguments of :class:`Venue` (host, port, data, then keywords such as
        ``speed``, ``position_mode``, ``balance``, ``faults``, ``liquidation``, ``funding``,
        ``account``; documented there) and yields the running :class:`Venue`.
        """
        venue = make(*args, **kwargs)
        await venue.start()
        try:
            yield venue
        finally:
            await venue.stop()

    return serve


serve = _serving(Venue)
