"""Binance error codes -> exception classes and policies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pyquant.errors import OrderRejected, OrderStatusUnknown, RetryableError
from pyquant.exchange.codes import CODES, RateLimited, describe, error_for

ERRORS = Path(__file__).parents[1] / "data" / "binance" / "errors.json"


def real_bodies() -> list[dict[str, object]]:
    return [entry for entry in json.loads(ERRORS.read_text())["errors"]]


@pytest.mark.parametrize("entry", real_bodies(), ids=lambda e: str(e["body"]["code"]))  # type: ignore[index]
def test_every_collected_body_has_a_table_entry(entry: dict[str, object]) -> None:
    body = entry["body"]
    assert isinstance(body, dict)
    info = describe(int(body["code"]))
    assert info.name != "UNLISTED", f"code {body['code']} is not in the table"


def test_codes_in_table_are_unique_and_negative() -> None:
    assert all(code < 0 for code in CODES)
    assert len(CODES) >= 60


@pytest.mark.parametrize(
    ("code", "action"),
    [
        (-1021, "resync_time"),
        (-4061, "reread_mode"),
        (-1106, "reread_mode"),
        (-2022, "reconcile"),
        (-4046, "success"),
        (-4059, "success"),
        (-1007, "unknown"),
        (-1125, "new_listen_key"),
        (-4164, "rules"),
        (-1111, "rules"),
        (-2021, "market_close"),
        (-2015, "config"),
    ],
)
def test_policy_of_the_codes_the_router_relies_on(code: int, action: str) -> None:
    assert describe(code).action == action


def test_unknown_outcome_codes_only_on_state_changing_requests() -> None:
    for code in (-1000, -1006, -1007):
        assert type(error_for(code, "x", http_status=400, mutating=True)) is OrderStatusUnknown
        assert type(error_for(code, "x", http_status=400, mutating=False)) is RetryableError


def test_rate_limit_carries_retry_after() -> None:
    err = error_for(-1003, "Too many", http_status=429, mutating=True, retry_after_s=3.0)
    assert isinstance(err, RateLimited)
    assert err.retry_after_s == 3.0
    banned = error_for(-1003, "banned", http_status=418, mutating=False)
    assert isinstance(banned, RateLimited)
    assert banned.retry_after_s == 120.0
    orders = error_for(-1015, "Too many new orders", http_status=429, mutating=True)
    assert isinstance(orders, RetryableError)


def test_rejections_carry_code_and_message() -> None:
    err = error_for(-2019, "Margin is insufficient.", http_status=400, mutating=True)
    assert isinstance(err, OrderRejected)
    assert (err.code, err.msg, err.http_status) == (-2019, "Margin is insufficient.", 400)
    assert str(err) == "-2019: Margin is insufficient."


def test_unlisted_code_is_a_plain_rejection() -> None:
    err = error_for(-9999, "new thing", http_status=400, mutating=True)
    assert type(err) is OrderRejected
    assert describe(-9999).meaning == "Binance error -9999"
