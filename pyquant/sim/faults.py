"""Fault injection of the simulated venue (all off by default).

Set at start (``serve(faults=...)``) or at run time through ``Venue.set_faults`` or the
loopback-only ``POST /admin/faults`` with a JSON object of the fields below. Draws come from
one seeded generator, so a run with the same seed and the same requests sees the same faults.

Order faults (``POST /fapi/v1/order``, ``batchOrders``, ``algoOrder``):

* ``order_error_rate``: share of orders answered with ``order_error`` instead of the result;
* ``order_error``: ``"503"`` (HTTP 503 "Unknown error, please check your request or try again
  later.", an unknown outcome), ``"-1007"`` (HTTP 408 backend timeout, unknown outcome),
  ``"drop"`` (the connection is closed without a reply), ``"503-unavailable"`` (HTTP 503
  "Service Unavailable.", a certain failure: never executed);
* ``execute_share``: share of the faulted orders that are executed anyway (the unknown outcome
  a client must resolve by querying); ``"503-unavailable"`` never executes.

Other faults: ``delay_ms`` (every REST reply waits), ``stall_ms`` with ``stall_rate`` (a share of
replies waits this long: a client timeout), ``reject_429_rate`` (a share of requests gets 429
``-1003`` before any work), ``visibility_delay_ms`` (a new order is ``-2013`` to queries for
this long), ``drop_rate`` (a share of REST requests of any kind whose connection is closed
without a reply, before any work: a read such as a klines page dropped mid-download).
One-shot actions: ``drop_websockets`` and ``expire_listen_key`` (``Venue`` methods and admin
fields of the same names).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["FaultConfig", "Faults"]

ORDER_ERRORS = ("503", "-1007", "drop", "503-unavailable")


@dataclass
class FaultConfig:
    """The fault switches (see the module docstring)."""

    order_error_rate: float = 0.0
    order_error: str = "503"
    execute_share: float = 0.5
    delay_ms: int = 0
    stall_ms: int = 0
    stall_rate: float = 0.0
    reject_429_rate: float = 0.0
    visibility_delay_ms: int = 0
    drop_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in (
            "order_error_rate",
            "execute_share",
            "stall_rate",
            "reject_429_rate",
            "drop_rate",
        ):
            value = getattr(self, name)
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"faults.{name} {value!r} found: must be between 0 and 1")
        if self.order_error not in ORDER_ERRORS:
            raise ValueError(
                f"faults.order_error {self.order_error!r} found: "
                f"must be one of {', '.join(ORDER_ERRORS)}"
            )
        for name in ("delay_ms", "stall_ms", "visibility_delay_ms"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"faults.{name} {getattr(self, name)!r} found: must be >= 0")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FaultConfig:
        """Build from a JSON object; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown fault field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The switches as a JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class OrderFault:
    """What happens to one order request: the error to answer and whether it executes."""

    kind: str
    execute: bool


class Faults:
    """Seeded fault decisions."""

    def __init__(self, config: FaultConfig | None = None, seed: int = 0) -> None:
        self.config = config or FaultConfig()
        self._rng = random.Random(f"faults:{seed}")  # noqa: S311 - seeded simulation, not security
        self.injected: list[dict[str, Any]] = []

    def order_fault(self) -> OrderFault | None:
        """Decide the fault of one order request (None: answer normally)."""
        c = self.config
        if c.order_error_rate <= 0 or self._rng.random() >= c.order_error_rate:
            return None
        execute = c.order_error != "503-unavailable" and self._rng.random() < c.execute_share
        self.injected.append({"fault": c.order_error, "executed": execute})
        return OrderFault(c.order_error, execute)

    def reject_429(self) -> bool:
        """Whether this request gets an injected 429."""
        rate = self.config.reject_429_rate
        hit = rate > 0 and self._rng.random() < rate
        if hit:
            self.injected.append({"fault": "429"})
        return hit

    def drop(self) -> bool:
        """Whether this request's connection is closed without a reply."""
        rate = self.config.drop_rate
        hit = rate > 0 and self._rng.random() < rate
        if hit:
            self.injected.append({"fault": "drop"})
        return hit

    def stall_ms(self) -> int:
        """Extra wait before this reply (delay plus a possible stall)."""
        c = self.config
        wait = c.delay_ms
        if c.stall_ms and c.stall_rate > 0 and self._rng.random() < c.stall_rate:
            self.injected.append({"fault": "stall", "ms": c.stall_ms})
            wait += c.stall_ms
        return wait
