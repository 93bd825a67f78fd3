"""Request-weight and order-count limits of the simulated venue, from exchangeInfo ``rateLimits``.

Fixed windows aligned to the wall-clock interval (as Binance's ``X-MBX-USED-WEIGHT-1M`` counts
per clock minute). ``REQUEST_WEIGHT`` limiters count per IP, ``ORDERS`` limiters per account.
Past a weight limit a request is answered 429 ``-1003``; an IP that keeps sending
``ban_after`` more requests inside the same window is banned with 418 for ``ban_ms``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyquant.sim.validation import MSG, BinanceError

__all__ = ["Limiter", "RateLimits"]

_UNIT_MS = {"SECOND": 1000, "MINUTE": 60_000, "HOUR": 3_600_000, "DAY": 86_400_000}
_LETTER = {"SECOND": "S", "MINUTE": "M", "HOUR": "H", "DAY": "D"}


@dataclass
class Limiter:
    """One fixed-window counter from a ``rateLimits`` entry."""

    kind: str
    interval: str
    interval_num: int
    limit: int
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # who -> (window, used)

    @property
    def window_ms(self) -> int:
        """Window length in ms."""
        return _UNIT_MS[self.interval] * self.interval_num

    @property
    def suffix(self) -> str:
        """Header suffix, e.g. ``1M`` or ``10S``."""
        return f"{self.interval_num}{_LETTER[self.interval]}"

    def used(self, who: str, now_ms: int) -> int:
        """Units used by ``who`` in the current window."""
        window, used = self.counts.get(who, (-1, 0))
        return used if window == now_ms // self.window_ms else 0

    def add(self, who: str, units: int, now_ms: int) -> int:
        """Count ``units`` for ``who``; returns the new total of the window."""
        total = self.used(who, now_ms) + units
        self.counts[who] = (now_ms // self.window_ms, total)
        return total


class RateLimits:
    """The limiters of one venue.

    Args:
        rate_limits: exchangeInfo ``rateLimits`` entries.
        now_ms: Wall clock in ms (limits follow real time, not the replay clock).
        ban_after: Requests past a 429 in the same window before a 418 ban.
        ban_ms: Length of a ban.
    """

    def __init__(
        self,
        rate_limits: list[dict[str, Any]],
        now_ms: Callable[[], int],
        ban_after: int = 10,
        ban_ms: int = 120_000,
    ) -> None:
        self.now_ms = now_ms
        self.weight = [
            Limiter(r["rateLimitType"], r["interval"], int(r["intervalNum"]), int(r["limit"]))
            for r in rate_limits
            if r["rateLimitType"] in ("REQUEST_WEIGHT", "RAW_REQUEST")
        ]
        self.orders = [
            Limiter(r["rateLimitType"], r["interval"], int(r["intervalNum"]), int(r["limit"]))
            for r in rate_limits
            if r["rateLimitType"] == "ORDERS"
        ]
        self.ban_after = ban_after
        self.ban_ms = ban_ms
        self.banned_until: dict[str, int] = {}
        self._over: dict[str, tuple[int, int]] = {}

    def charge_weight(self, ip: str, weight: int) -> dict[str, str]:
        """Count a request's weight; returns the headers, raises 429/418 past the limit."""
        now = self.now_ms()
        until = self.banned_until.get(ip, 0)
        if until > now:
            raise BinanceError(
                -1003,
                f"Way too much request weight used; IP banned until {until}. "
                "Please use the websocket for live updates to avoid bans.",
                http_status=418,
            )
        headers: dict[str, str] = {}
        over: Limiter | None = None
        for limiter in self.weight:
            units = 1 if limiter.kind == "RAW_REQUEST" else weight
            total = limiter.add(ip, units, now)
            if limiter.kind == "REQUEST_WEIGHT":
                headers[f"X-MBX-USED-WEIGHT-{limiter.suffix}"] = str(total)
            if total > limiter.limit:
                over = limiter
        if over is not None:
            window = now // over.window_ms
            seen_window, count = self._over.get(ip, (window, 0))
            count = count + 1 if seen_window == window else 1
            self._over[ip] = (window, count)
            if count > self.ban_after:
                self.banned_until[ip] = now + self.ban_ms
            raise _Limited(-1003, headers, limit=over.limit)
        return headers

    def weight_headers(self, ip: str) -> dict[str, str]:
        """Current weight headers without counting anything."""
        now = self.now_ms()
        return {
            f"X-MBX-USED-WEIGHT-{lim.suffix}": str(lim.used(ip, now))
            for lim in self.weight
            if lim.kind == "REQUEST_WEIGHT"
        }

    def charge_orders(self, account: str, counts: dict[str, int]) -> dict[str, str]:
        """Count new orders (units per interval suffix, e.g. ``{"10S": 5, "1M": 1}``).

        Missing suffixes count 1. Raises 429 ``-1015`` past a limit.
        """
        now = self.now_ms()
        headers: dict[str, str] = {}
        over: Limiter | None = None
        for limiter in self.orders:
            total = limiter.add(account, counts.get(limiter.suffix, 1), now)
            headers[f"X-MBX-ORDER-COUNT-{limiter.suffix}"] = str(total)
            if total > limiter.limit and over is None:
                over = limiter
        if over is not None:
            interval = f"{over.interval_num} {over.interval}".lower()
            raise _Limited(-1015, headers, limit=over.limit, interval=interval)
        return headers


class _Limited(BinanceError):
    """A 429 with the usage headers to send along."""

    def __init__(self, code: int, headers: dict[str, str], **fmt: object) -> None:
        super().__init__(code, MSG[code].format(**fmt), http_status=429)
        self.headers = headers


Limited = _Limited
