"""Binance USDⓈ-M error codes: what each means and which exception class it becomes.

The table follows the contract (section 5.1) and the real bodies collected in
``tests/data/binance/errors.json``. The class is what decides the caller's next move:

* ``OrderRejected``: final, nothing executed; drop this order (or rebuild it).
* ``RetryableError``: nothing was accepted; back off and try again.
* ``OrderStatusUnknown``: the request may have executed; look the order up by its client id
  before anything is sent again. Only a request that changes state can be unknown; the same
  code on a read is merely retryable.

``action`` names the router's policy for the code, so the router matches on a word rather
than on scattered integers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast, get_args

from pyquant.errors import (
    ExchangeError,
    OrderRejected,
    OrderStatusUnknown,
    RetryableError,
)

Action = Literal[
    "reject",  # final for this request
    "retry",  # nothing accepted: back off and retry
    "unknown",  # may have executed: query by client id first
    "resync_time",  # -1021: resync the clock, retry once
    "reread_mode",  # position mode differs from the cached one
    "reconcile",  # the position is probably gone already
    "success",  # "no need to change": the state is already as asked
    "config",  # keys, permissions, signature: fatal until the operator fixes it
    "rules",  # quantization or filter failure: refresh exchangeInfo
    "market_close",  # a conditional exit would trigger at once: close with MARKET
    "new_listen_key",  # listenKey gone: create another one
]


class RateLimited(RetryableError):
    """HTTP 429 or 418 (or -1003/-1015): wait ``retry_after_s`` seconds before the next call."""

    def __init__(
        self, code: int, msg: str, *, http_status: int | None, retry_after_s: float
    ) -> None:
        super().__init__(code, msg, http_status=http_status)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class CodeInfo:
    """One Binance error code.

    Attributes:
        code: the negative Binance code.
        name: Binance's constant name for it.
        meaning: what happened, in words.
        action: the policy the router and streams apply.
    """

    code: int
    name: str
    meaning: str
    action: Action

    @property
    def exception_class(self) -> type[ExchangeError]:
        """Return the exception class a state-changing request gets for this code."""
        return _CLASS_BY_ACTION[self.action]


_CLASS_BY_ACTION: dict[Action, type[ExchangeError]] = {
    "reject": OrderRejected,
    "retry": RetryableError,
    "unknown": OrderStatusUnknown,
    "resync_time": RetryableError,
    "reread_mode": OrderRejected,
    "reconcile": OrderRejected,
    "success": OrderRejected,
    "config": OrderRejected,
    "rules": OrderRejected,
    "market_close": OrderRejected,
    "new_listen_key": OrderRejected,
}

# One row per code: the code | Binance's name for it | what happened | the action (policy).
_TABLE_ROWS = """
-1000 | UNKNOWN | unknown error while processing the request | unknown
-1001 | DISCONNECTED | internal error; unable to process the request | retry
-1003 | TOO_MANY_REQUESTS | request weight limit hit or IP banned | retry
-1006 | UNEXPECTED_RESP | unexpected response; execution status unknown | unknown
-1007 | TIMEOUT | backend timeout; send and execution status unknown | unknown
-1008 | REQUEST_THROTTLED | server overloaded; the request was not processed | retry
-1013 | INVALID_MESSAGE | a filter rejected the request | rules
-1015 | TOO_MANY_ORDERS | order count limit (10 s or 1 min) hit | retry
-1021 | INVALID_TIMESTAMP | timestamp outside recvWindow or ahead of server | resync_time
-1022 | INVALID_SIGNATURE | signature is not valid | config
-1100 | ILLEGAL_CHARS | illegal characters in a parameter | reject
-1102 | MANDATORY_PARAM_EMPTY_OR_MALFORMED | a required parameter is missing | reject
-1106 | PARAM_NOT_REQUIRED | a parameter was sent when not allowed | reread_mode
-1111 | BAD_PRECISION | precision over the symbol's maximum | rules
-1116 | INVALID_ORDER_TYPE | invalid order type | reject
-1117 | INVALID_SIDE | invalid side | reject
-1121 | BAD_SYMBOL | invalid symbol | reject
-1125 | INVALID_LISTEN_KEY | the listenKey does not exist | new_listen_key
-2011 | CANCEL_REJECTED | cancel of an order that is not open | reject
-2013 | NO_SUCH_ORDER | the order does not exist | reject
-2014 | BAD_API_KEY_FMT | API key format invalid | config
-2015 | REJECTED_MBX_KEY | invalid API key, IP or permissions | config
-2018 | BALANCE_NOT_SUFFICIENT | balance insufficient | reject
-2019 | MARGIN_NOT_SUFFICIEN | margin insufficient | reject
-2020 | UNABLE_TO_FILL | unable to fill | reject
-2021 | ORDER_WOULD_IMMEDIATELY_TRIGGER | the trigger is already crossed | market_close
-2022 | REDUCE_ONLY_REJECT | reduce-only order cannot reduce | reconcile
-2025 | MAX_OPEN_ORDER_EXCEEDED | open order limit reached | reject
-2027 | MAX_LEVERAGE_RATIO | position would exceed the maximum at this leverage | reject
-4002 | PRICE_GREATER_THAN_MAX_PRICE | price above PRICE_FILTER maxPrice | rules
-4003 | QTY_LESS_THAN_ZERO | quantity less than or equal to zero | rules
-4004 | QTY_LESS_THAN_MIN_QTY | quantity below LOT_SIZE minQty | rules
-4005 | QTY_GREATER_THAN_MAX_QTY | quantity above LOT_SIZE maxQty | rules
-4007 | STOP_PRICE_GREATER_THAN_MAX_PRICE | stop price above maxPrice | rules
-4013 | PRICE_LESS_THAN_MIN_PRICE | price below PRICE_FILTER minPrice | rules
-4014 | PRICE_NOT_INCREASED_BY_TICK_SIZE | price not a multiple of tickSize | rules
-4015 | INVALID_CL_ORD_ID_LEN | client order id invalid or too long | reject
-4016 | PRICE_HIGHTER_THAN_MULTIPLIER_UP | price above mark * multiplierUp | rules
-4023 | QTY_NOT_INCREASED_BY_STEP_SIZE | quantity not a multiple of stepSize | rules
-4024 | PRICE_LOWER_THAN_MULTIPLIER_DOWN | price below mark * multiplierDown | rules
-4045 | MAX_STOP_ORDER_EXCEEDED | too many conditional orders on the symbol | reject
-4046 | NO_NEED_TO_CHANGE_MARGIN_TYPE | margin type already as asked | success
-4047 | THERE_EXISTS_OPEN_ORDERS | margin type change with open orders | reject
-4048 | THERE_EXISTS_QUANTITY | margin type change with a position | reject
-4059 | NO_NEED_TO_CHANGE_POSITION_SIDE | position mode already as asked | success
-4061 | POSITION_SIDE_NOT_MATCH | positionSide does not match the account mode | reread_mode
-4062 | REDUCE_ONLY_CONFLICT | invalid reduceOnly value | reject
-4067 | POSITION_SIDE_CHANGE_EXISTS_OPEN_ORDERS | mode change with open orders | reject
-4068 | POSITION_SIDE_CHANGE_EXISTS_QUANTITY | mode change with a position | reject
-4116 | DUPLICATED_CLIENT_ORDER_ID | client order id equals an open order's | reject
-4118 | REDUCE_ONLY_MARGIN_CHECK_FAILED | reduce-only would open the opposite side | reject
-4120 | STOP_ORDER_SWITCH_ALGO | conditional type sent to the order endpoint | reject
-4130 | CLOSE_POSITION_ORDER_EXISTS | a close-all stop already exists that way | reject
-4131 | MARKET_ORDER_REJECT | best price beyond the PERCENT_PRICE band | retry
-4135 | INVALID_ACTIVATION_PRICE | invalid trailing activation price | reject
-4137 | QTY_NOT_ZERO_WITH_CLOSE_POSITION | quantity sent with closePosition | reject
-4138 | REDUCE_ONLY_MUST_BE_TRUE | reduceOnly conflicts with closePosition | reject
-4142 | STRATEGY_INVALID_TRIGGER_PRICE | TP/SL would trigger immediately | market_close
-4164 | MIN_NOTIONAL | notional below the symbol's minimum | rules
-5021 | FOK_ORDER_REJECT | fill-or-kill could not fill | reject
-5022 | GTX_ORDER_REJECT | post-only order would take | reject
-5028 | ME_RECVWINDOW_REJECT | too late for the matching engine | resync_time
-5040 | FUTURE_GOOD_TILL_DATE | invalid goodTillDate | reject
"""


def _parse_table(text: str) -> tuple[CodeInfo, ...]:
    """Read :data:`_TABLE_ROWS`; a malformed row, unknown action or repeated code is a bug."""
    actions = get_args(Action)
    table: list[CodeInfo] = []
    for row in text.strip().splitlines():
        code, name, meaning, action = (cell.strip() for cell in row.split("|"))
        if action not in actions:
            raise ValueError(f"code table row {row!r}: action {action!r} not one of {actions}")
        table.append(CodeInfo(int(code), name, meaning, cast(Action, action)))
    if len({info.code for info in table}) != len(table):
        raise ValueError("code table: a code is listed twice")
    return tuple(table)


_TABLE = _parse_table(_TABLE_ROWS)

CODES: dict[int, CodeInfo] = {info.code: info for info in _TABLE}

# 503 bodies the docs call a certain failure; any other 5xx after sending is unknown.
_CERTAIN_FAILURE_503 = (
    "service unavailable",
    "internal error; unable to process your request",
)


def describe(code: int) -> CodeInfo:
    """Return the table entry for a code; an unlisted code is a plain rejection.

    Args:
        code: the Binance error code.

    Returns:
        Its entry, or a generic ``reject`` entry naming the code.
    """
    info = CODES.get(code)
    if info is not None:
        return info
    return CodeInfo(code, "UNLISTED", f"Binance error {code}", "reject")


def error_for(
    code: int,
    msg: str,
    *,
    http_status: int | None,
    mutating: bool,
    retry_after_s: float | None = None,
) -> ExchangeError:
    """Build the exception a response deserves.

    Args:
        code: Binance's error code (0 when the body carried none).
        msg: Binance's message, or the HTTP reason.
        http_status: the HTTP status, or None when no answer came back.
        mutating: the request changes state (order, cancel, leverage ...): only such a
            request can have an unknown outcome.
        retry_after_s: seconds from a ``Retry-After`` header, for 429 and 418.

    Returns:
        An ``OrderRejected``, ``RetryableError`` (``RateLimited`` for 429/418),
        ``OrderStatusUnknown`` or plain ``ExchangeError`` instance.
    """
    if http_status in (429, 418) or code in (-1003, -1015):
        wait = (
            retry_after_s if retry_after_s is not None else (120.0 if http_status == 418 else 1.0)
        )
        return RateLimited(code or -1003, msg, http_status=http_status, retry_after_s=wait)
    if http_status is None or http_status == 408 or (http_status >= 500 and code == 0):
        certain = http_status == 503 and any(s in msg.lower() for s in _CERTAIN_FAILURE_503)
        if mutating and not certain:
            return OrderStatusUnknown(code or -1007, msg, http_status=http_status)
        return RetryableError(code or -1001, msg, http_status=http_status)
    info = describe(code)
    if info.action == "unknown":
        if mutating:
            return OrderStatusUnknown(code, msg, http_status=http_status)
        return RetryableError(code, msg, http_status=http_status)
    if http_status is not None and http_status >= 500 and info.action not in ("retry",):
        # A 5xx that still carries a code other than overload: treat like the docs' 503s.
        certain = any(s in msg.lower() for s in _CERTAIN_FAILURE_503)
        if mutating and not certain:
            return OrderStatusUnknown(code, msg, http_status=http_status)
        return RetryableError(code, msg, http_status=http_status)
    return info.exception_class(code, msg, http_status=http_status)


__all__ = ["CODES", "Action", "CodeInfo", "RateLimited", "describe", "error_for"]
