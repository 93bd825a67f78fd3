"""Entry sizing: quantity by risk or by fixed notional, quantized and checked.

By risk: ``quantity = equity * risk_pct / stop_distance``, where the stop distance is the one
the exit engine will use for this entry (``engine.plan_entry``), so a stop-out loses about
``risk_pct`` of equity. By notional: ``quantity = size_usd / price``. Either way the quantity
is floored to the MARKET_LOT_SIZE step (``rules.quantize_qty(..., market=True)``), checked
against the symbol's filters at the mark price (``rules.check_order``: MIN_NOTIONAL gives
``below_min_notional``) and against the available margin (``insufficient_margin``); an entry
whose stop budget is below the policy's minimum is refused as ``over_leveraged``.

Usage::

    decision = size_entry(
        rules, engine, SizingConfig(risk_pct=Decimal("0.01")),
        symbol="BTCUSDT", position_side="LONG", price=Decimal("30000"), leverage=10,
        equity=Decimal("1000"), available_margin=Decimal("800"), size_usd=None,
    )
    if decision.ok: quantity = decision.quantity   # wire string, e.g. "0.083"
    else: reason = decision.reason                 # e.g. "below_min_notional"

The inputs (the mark, the account's equity and free margin) come from the exchange. A failure
to read them is not a sizing verdict: ``read_input`` retries a read that failed for a
retryable reason (a timeout, a 429: reads are safe to repeat) and raises
``SizingInputUnavailable``; ``unavailable_decision`` turns that into the refusal
``exchange_unavailable`` with the code, never "insufficient margin, 0.0000 available" or
"no mark price"::

    try:
        mark = await read_input("mark price", lambda: venue.premium_index(symbol))
    except SizingInputUnavailable as exc:
        return unavailable_decision(exc)             # reason "exchange_unavailable"
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from typing import Literal, Protocol, TypeVar

from pyquant.errors import ExchangeError, RetryableError

T = TypeVar("T")


class SizingRules(Protocol):
    """What sizing needs from ``pyquant.ExchangeRules``."""

    def quantize_qty(self, symbol: str, qty: str, market: bool = True) -> str:
        """Return ``qty`` floored to the symbol's step as a wire string."""
        ...

    def check_order(
        self,
        symbol: str,
        *,
        side: str,
        order_type: str,
        quantity: str,
        price: str | None = None,
        stop_price: str | None = None,
        mark_price: str | None = None,
        reduce_only: bool = False,
    ) -> object:
        """Return None when the order passes the filters, else an object with ``code``/``msg``."""
        ...


class EntryPlanner(Protocol):
    """What sizing needs from ``pyquant.ExitEngine``."""

    def plan_entry(
        self, symbol: str, position_side: str, entry_price: str, leverage: int
    ) -> object:
        """Return the planned stop: ``stop_price``, ``stop_distance``, ``over_leveraged``."""
        ...


@dataclass(frozen=True, slots=True)
class SizingConfig:
    """How entries are sized.

    Attributes:
        method: ``risk`` (equity * risk_pct / stop distance) or ``notional`` (fixed USDT).
        risk_pct: fraction of equity lost at the initial stop (0.01 = 1 %).
        notional_usd: the fixed notional when ``method`` is ``notional``.
        max_notional_usd: cap on one entry's notional (None: no cap).
        margin_use_pct: at most this fraction of the available margin per entry.
        default_leverage: leverage when the intent names none.
    """

    method: Literal["risk", "notional"] = "risk"
    risk_pct: Decimal = Decimal("0.01")
    notional_usd: Decimal = Decimal("100")
    max_notional_usd: Decimal | None = None
    margin_use_pct: Decimal = Decimal("0.95")
    default_leverage: int = 10


@dataclass(frozen=True, slots=True)
class SizeDecision:
    """The sizing result; ``reason`` is a stable machine string when refused."""

    ok: bool
    quantity: str = "0"
    notional: Decimal = Decimal(0)
    stop_price: str | None = None
    reason: str = ""
    detail: str = ""


def _field(obj: object, name: str) -> object:
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _dec(value: object) -> Decimal | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def size_entry(
    rules: SizingRules,
    engine: EntryPlanner,
    config: SizingConfig,
    *,
    symbol: str,
    position_side: str,
    price: Decimal,
    leverage: int,
    equity: Decimal,
    available_margin: Decimal,
    size_usd: Decimal | None = None,
) -> SizeDecision:
    """Size one entry; see the module docstring for the rules.

    Args:
        rules: the exchange rules.
        engine: the exit engine (its planned stop sets the risk distance).
        config: sizing settings.
        symbol: the symbol.
        position_side: ``LONG`` or ``SHORT``.
        price: the current mark price.
        leverage: the leverage the entry will use.
        equity: account equity in USDT (margin balance).
        available_margin: USDT free for new positions.
        size_usd: the intent's own notional, which overrides the method.

    Returns:
        The decision, with the quantity wire string when accepted.
    """
    if price <= 0:
        return SizeDecision(False, reason="invalid", detail=f"mark price {price} is not positive")
    plan = engine.plan_entry(symbol, position_side, str(price), leverage)
    stop_price = _field(plan, "stop_price")
    if bool(_field(plan, "over_leveraged")):
        return SizeDecision(
            False,
            reason="over_leveraged",
            detail=f"leverage {leverage} leaves a stop budget below the policy minimum",
        )
    if size_usd is not None:
        raw = size_usd / price
        basis = f"notional {size_usd} USDT"
    elif config.method == "notional":
        raw = config.notional_usd / price
        basis = f"notional {config.notional_usd} USDT"
    else:
        distance = _dec(_field(plan, "stop_distance"))
        if distance is None or distance <= 0:
            return SizeDecision(
                False, reason="invalid", detail=f"stop distance {distance} is not positive"
            )
        raw = equity * config.risk_pct / distance
        basis = f"risk {config.risk_pct} of equity {equity} over stop distance {distance}"
    if config.max_notional_usd is not None:
        raw = min(raw, config.max_notional_usd / price)
    # A MARKET order above MARKET_LOT_SIZE maxQty is refused (-4005): cap at it.
    symbol_info = getattr(rules, "symbol_info", None)
    if callable(symbol_info):
        max_qty = _dec(_field(symbol_info(symbol), "market_max_qty"))
        if max_qty is not None and max_qty > 0:
            raw = min(raw, max_qty)
    if raw <= 0:
        return SizeDecision(False, reason="invalid", detail=f"{basis} gives no quantity")
    # Exact decimal in, floor to the step in the rules: never more than the budget.
    raw_text = format(raw.quantize(Decimal("1e-12"), rounding=ROUND_FLOOR), "f")
    quantity = rules.quantize_qty(symbol, raw_text, True)
    qty = Decimal(quantity)
    notional = qty * price
    side = "BUY" if position_side == "LONG" else "SELL"
    if qty <= 0:
        return SizeDecision(
            False,
            reason="below_min_notional",
            detail=f"{basis} gives {raw_text}, below the step of {symbol}",
        )
    reject = rules.check_order(
        symbol, side=side, order_type="MARKET", quantity=quantity, mark_price=str(price)
    )
    if reject is not None:
        code = _field(reject, "code")
        msg = _field(reject, "msg")
        reason = "below_min_notional" if code in (-4164, -4004, -4003) else "invalid"
        return SizeDecision(
            False, quantity=quantity, notional=notional, reason=reason, detail=f"{code}: {msg}"
        )
    margin = notional / Decimal(leverage)
    budget = available_margin * config.margin_use_pct
    if margin > budget:
        return SizeDecision(
            False,
            quantity=quantity,
            notional=notional,
            reason="insufficient_margin",
            detail=f"needs {margin:.4f} USDT margin at {leverage}x, {budget:.4f} available",
        )
    return SizeDecision(
        True,
        quantity=quantity,
        notional=notional,
        stop_price=None if stop_price is None else str(stop_price),
        detail=basis,
    )


class SizingInputUnavailable(Exception):
    """A sizing input could not be read from the exchange (after retries where safe)."""

    def __init__(self, what: str, error: BaseException, attempts: int) -> None:
        code = getattr(error, "code", None)
        status = getattr(error, "http_status", None)
        parts = [f"{what} unavailable:"]
        if code is not None:
            parts.append(f"code {code}")
        if status is not None:
            parts.append(f"HTTP {status}")
        parts.append(f"({getattr(error, 'msg', None) or error})")
        if attempts > 1:
            parts.append(f"after {attempts} attempts")
        super().__init__(" ".join(parts))
        self.what = what
        self.code = code
        self.error = error
        self.attempts = attempts


async def read_input(
    what: str,
    read: Callable[[], Awaitable[T]],
    *,
    attempts: int = 3,
    delay_s: float = 0.2,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """Read one sizing input; retry a retryable failure (reads are safe to repeat).

    Raises:
        SizingInputUnavailable: the read failed (at once for a final error such as a bad
            key, after ``attempts`` for a timeout or a 429), naming what and the code.
    """
    for attempt in range(1, attempts + 1):
        try:
            return await read()
        except RetryableError as exc:
            if attempt == attempts:
                raise SizingInputUnavailable(what, exc, attempt) from exc
            await sleep(delay_s * 2 ** (attempt - 1))
        except (ExchangeError, OSError, TimeoutError) as exc:
            raise SizingInputUnavailable(what, exc, attempt) from exc
    raise AssertionError("unreachable: attempts >= 1")  # pragma: no cover


def unavailable_decision(error: SizingInputUnavailable) -> SizeDecision:
    """Return the refusal for an entry whose sizing inputs could not be read."""
    return SizeDecision(False, reason="exchange_unavailable", detail=str(error))
