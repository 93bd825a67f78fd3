"""Capped, jittered exponential backoff shared by the Redis tasks.

Full jitter (a uniform draw below the capped exponential) spreads the reconnects of several
daemons after a Redis restart instead of having them hammer the server in lock step.
"""

from __future__ import annotations

import random


class Backoff:
    """Delays for successive failed attempts: uniform in [base/2, min(cap, base * 2**n)].

    Args:
        base_ms: the first delay's upper bound, in milliseconds.
        cap_ms: the largest delay, in milliseconds.
    """

    def __init__(self, base_ms: int = 100, cap_ms: int = 5_000) -> None:
        if base_ms <= 0 or cap_ms < base_ms:
            raise ValueError(f"backoff base_ms {base_ms} and cap_ms {cap_ms}: need 0 < base <= cap")
        self._base_ms = base_ms
        self._cap_ms = cap_ms
        self._attempt = 0
        # Not cryptographic: jitter only has to decorrelate processes.
        self._random = random.Random()  # noqa: S311

    @property
    def attempt(self) -> int:
        """Return how many failures were counted since the last reset."""
        return self._attempt

    def next_delay_s(self) -> float:
        """Return the delay before the next attempt, in seconds, and count one failure."""
        ceiling = min(self._cap_ms, self._base_ms * (2 ** min(self._attempt, 20)))
        self._attempt += 1
        return self._random.uniform(ceiling / 2, ceiling) / 1000.0

    def reset(self) -> None:
        """Forget the failures after a success."""
        self._attempt = 0
