"""Records of the simulated venue: the order/fill log tests read, and the ``--state`` file.

The state file keeps the account across restarts: wallet, position mode, leverage and margin
type per symbol, position legs, orders (open ones and the recent closed ones, so queries by id
keep working), open algo orders, recent fills and the id counters. It is written atomically
(temporary file + rename) after every change, as JSON with decimals as strings.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, fields
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from pyquant.sim.exchange import Exchange
from pyquant.sim.state import AlgoOrder, Income, Order, Position, Trade

__all__ = ["OrderLog", "load_state", "save_state"]

_T = TypeVar("_T")

STATE_VERSION = 1
_KEEP_ORDERS = 5000


class OrderLog:
    """Read access to what the venue did, in order: orders, fills, cancels, expiries, algo.

    Each entry is a dict with ``kind`` (``order``, ``fill``, ``cancel``, ``expire``, ``algo``,
    ``config``, ``reject``), ``time`` (exchange clock, ms) and the order's fields in Binance
    spelling (decimals as plain strings).
    """

    def __init__(self, exchange: Exchange) -> None:
        self._exchange = exchange

    @property
    def entries(self) -> list[dict[str, Any]]:
        """Every entry so far."""
        return list(self._exchange.log)

    @property
    def orders(self) -> list[dict[str, Any]]:
        """Accepted orders (including triggered algo children)."""
        return [e for e in self._exchange.log if e["kind"] == "order"]

    @property
    def fills(self) -> list[dict[str, Any]]:
        """Fills."""
        return [e for e in self._exchange.log if e["kind"] == "fill"]

    @property
    def rejects(self) -> list[dict[str, Any]]:
        """Rejected order requests with their code."""
        return [e for e in self._exchange.log if e["kind"] == "reject"]

    def by_client_id(self, client_order_id: str) -> list[dict[str, Any]]:
        """Entries of one client order id."""
        return [e for e in self._exchange.log if e.get("clientOrderId") == client_order_id]

    def __len__(self) -> int:
        return len(self._exchange.log)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(list(self._exchange.log))


def _plain(obj: Order | AlgoOrder | Position | Trade | Income) -> dict[str, Any]:
    out = asdict(obj)
    return {k: (str(v) if isinstance(v, Decimal) else v) for k, v in out.items()}


def _build(cls: type[_T], data: dict[str, Any]) -> _T:
    kwargs: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]  # only called with dataclasses
        if f.name not in data:
            continue
        value = data[f.name]
        if isinstance(value, str) and f.type in ("Decimal", "Decimal | None"):
            value = Decimal(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def save_state(exchange: Exchange, path: str | Path) -> None:
    """Write the account to ``path`` atomically."""
    target = Path(path)
    orders = list(exchange.orders.values())
    kept = [o for o in orders if o.is_open] + [o for o in orders if not o.is_open][-_KEEP_ORDERS:]
    kept.sort(key=lambda o: o.order_id)
    state = {
        "version": STATE_VERSION,
        "wallet": str(exchange.wallet),
        "dual": exchange.dual,
        "leverage": exchange.leverage,
        "margin_type": exchange.margin_type,
        "positions": [_plain(p) for p in exchange.positions.values() if p.amount or p.realized],
        "orders": [_plain(o) for o in kept],
        "algo_orders": [_plain(a) for a in list(exchange.algo_orders.values())[-_KEEP_ORDERS:]],
        "trades": [_plain(t) for t in exchange.trades[-_KEEP_ORDERS:]],
        "income": [_plain(i) for i in exchange.income[-_KEEP_ORDERS:]],
        "next_order_id": max([o.order_id for o in orders], default=0) + 1,
        "next_algo_id": max(exchange.algo_orders, default=0) + 1,
        "next_trade_id": max([t.trade_id for t in exchange.trades], default=0) + 1,
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".sim-state-", dir=str(target.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(state, fh, separators=(",", ":"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state(exchange: Exchange, path: str | Path) -> bool:
    """Restore the account from ``path``; returns False when the file does not exist.

    Raises:
        ValueError: The file is not a state file of a version this code reads.
    """
    source = Path(path)
    if not source.exists():
        return False
    try:
        state = json.loads(source.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"state file {source}: not JSON ({exc})") from exc
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError(
            f"state file {source}: version {state.get('version')!r} found, expected {STATE_VERSION}"
        )
    exchange.wallet = Decimal(state["wallet"])
    exchange.dual = bool(state["dual"])
    exchange.leverage = {k: int(v) for k, v in state["leverage"].items()}
    exchange.margin_type = dict(state["margin_type"])
    exchange.positions = {}
    for raw in state["positions"]:
        pos: Position = _build(Position, raw)
        exchange.positions[(pos.symbol, pos.side)] = pos
    exchange.orders = {}
    for raw in state["orders"]:
        order: Order = _build(Order, raw)
        exchange.orders[order.order_id] = order
    exchange.algo_orders = {}
    for raw in state["algo_orders"]:
        algo: AlgoOrder = _build(AlgoOrder, raw)
        exchange.algo_orders[algo.algo_id] = algo
    exchange.trades = [_build(Trade, raw) for raw in state["trades"]]
    exchange.income = [_build(Income, raw) for raw in state.get("income", [])]
    if exchange.income:
        exchange._tran_ids = itertools.count(exchange.income[-1].tran_id + 1)
    exchange._order_ids = itertools.count(max(state["next_order_id"], next(exchange._order_ids)))
    exchange._algo_ids = itertools.count(max(state["next_algo_id"], next(exchange._algo_ids)))
    exchange._trade_ids = itertools.count(max(state["next_trade_id"], next(exchange._trade_ids)))
    return True
