"""A venue whose answers the test releases in the order it chooses (interleaving harness).

``HeldVenue`` wraps ``FakeVenue``: a call to a held method is *executed* at once (the
exchange's state changes, as it would on Binance) but its answer is parked until the test
calls ``release``; so a test can put a live reconciliation, a user-stream event or a timer
tick between a request and its reply, deterministically. ``GatedSleep`` does the same for
the desk's retry pauses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fake_venue import FakeVenue


@dataclass
class Parked:
    method: str
    args: tuple[Any, ...]
    result: Any = None
    error: BaseException | None = None
    released: asyncio.Event = field(default_factory=asyncio.Event)


class HeldVenue:
    """``FakeVenue`` with the answers of the methods in ``hold`` parked until released."""

    def __init__(self, inner: FakeVenue, hold: set[str] | None = None) -> None:
        self.inner = inner
        self.hold: set[str] = set(hold or ())
        self.parked: list[Parked] = []

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if name not in self.hold or not callable(attribute):
            return attribute

        async def held(*args: Any, **kwargs: Any) -> Any:
            parked = Parked(name, args)
            try:
                parked.result = await attribute(*args, **kwargs)
            except Exception as exc:  # the answer is the error, delivered later
                parked.error = exc
            self.parked.append(parked)
            await parked.released.wait()
            self.parked.remove(parked)
            if parked.error is not None:
                raise parked.error
            return parked.result

        return held

    async def wait_parked(self, method: str, count: int = 1) -> list[Parked]:
        """Let the loop run until ``count`` answers of ``method`` are parked."""
        for _ in range(2000):
            found = [p for p in self.parked if p.method == method]
            if len(found) >= count:
                return found
            await asyncio.sleep(0)
        raise AssertionError(f"no parked {method} (parked: {[p.method for p in self.parked]})")

    async def release(self, method: str | None = None, *, index: int = 0) -> None:
        """Deliver one parked answer (the ``index``-th of ``method``) and let it land."""
        found = [p for p in self.parked if method is None or p.method == method]
        found[index].released.set()
        await settle()

    async def release_all(self) -> None:
        """Deliver every parked answer, including those parked meanwhile."""
        while self.parked:
            self.parked[0].released.set()
            await settle()


class GatedSleep:
    """An ``asyncio.sleep`` stand-in that waits until the test opens it."""

    def __init__(self) -> None:
        self.waiting = 0
        self.gate = asyncio.Event()

    async def __call__(self, _seconds: float) -> None:
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1


async def settle(rounds: int = 50) -> None:
    """Let every runnable task run (no real time passes)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def until(condition: Callable[[], bool], what: str) -> None:
    """Run the loop until ``condition`` holds (no wall-clock waits)."""
    for _ in range(5000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")
