"""Exchange failures while reading sizing inputs are reported as such (issue 17, item 10).

Before: a 429 on the account read became "insufficient_margin ... 0.0000 available" and a
timeout on the mark "invalid, no mark price".
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from pyquant.errors import OrderRejected, RetryableError
from pyquant.exchange.codes import error_for
from pyquant.trading.sizing import SizingInputUnavailable, read_input, unavailable_decision


async def no_sleep(seconds: float) -> None:
    return None


class Flaky:
    def __init__(self, *failures: Exception) -> None:
        self.failures = list(failures)
        self.calls = 0

    async def __call__(self) -> Decimal:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return Decimal("800")


async def test_a_retryable_read_is_retried_until_it_answers() -> None:
    read = Flaky(error_for(-1003, "Too many requests", http_status=429, mutating=False))
    assert await read_input("account", read, sleep=no_sleep) == Decimal(800)
    assert read.calls == 2


async def test_a_429_on_the_account_is_exchange_unavailable_with_the_code() -> None:
    limited = error_for(-1003, "Too many requests", http_status=429, mutating=False)
    assert isinstance(limited, RetryableError)
    read = Flaky(limited, limited, limited)
    with pytest.raises(SizingInputUnavailable) as caught:
        await read_input("account", read, sleep=no_sleep)
    assert read.calls == 3
    decision = unavailable_decision(caught.value)
    assert (decision.ok, decision.reason) == (False, "exchange_unavailable")
    assert decision.detail == (
        "account unavailable: code -1003 HTTP 429 (Too many requests) after 3 attempts"
    )
    assert "insufficient" not in decision.detail


async def test_a_timeout_on_the_mark_is_exchange_unavailable() -> None:
    timeout = error_for(
        0,
        "no answer from GET /fapi/v1/premiumIndex: TimeoutError",
        http_status=None,
        mutating=False,
    )
    read = Flaky(timeout, timeout)
    with pytest.raises(SizingInputUnavailable) as caught:
        await read_input("mark price", read, attempts=2, sleep=no_sleep)
    decision = unavailable_decision(caught.value)
    assert decision.reason == "exchange_unavailable"
    assert decision.detail.startswith("mark price unavailable: code -1001")
    assert "TimeoutError" in decision.detail


async def test_a_final_error_is_not_retried() -> None:
    read = Flaky(OrderRejected(-2015, "Invalid API-key, IP, or permissions for action."))
    with pytest.raises(SizingInputUnavailable, match="code -2015"):
        await read_input("account", read, sleep=no_sleep)
    assert read.calls == 1
