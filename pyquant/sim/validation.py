"""Request checks of the simulated venue: parameters, symbol filters and Binance's error codes.

The simulator is the venue, and the venue is the independent oracle that tests pyquant's own
quantization (the Rust ``ExchangeRules``). If it reused those rules, a bug in them would be
accepted by both sides and never seen. So every filter here is re-implemented from the
exchangeInfo strings with :class:`decimal.Decimal`, from the contract
(``binance-futures-contract.md`` sections 3 and 4), with no import from ``pyquant._core``.

Numbers are parsed from the exact string the client sent: more decimals than
``pricePrecision``/``quantityPrecision`` is ``-1111`` even when the value is a tick multiple,
exponent or float-repr garbage (``1e-05``, ``nan``) is malformed (``-1102``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

__all__ = [
    "MSG",
    "BinanceError",
    "SymbolRules",
    "check_client_id",
    "fmt_decimal",
    "parse_bool",
    "parse_decimal",
    "parse_required",
]

# Binance's texts for the codes the simulator produces (docs /error-code, real captures in
# tests/data/binance/errors.json where they exist).
MSG: dict[int, str] = {
    -1000: "An unknown error occured while processing the request.",
    -1003: (
        "Too much request weight used; current limit is {limit} request weight per 1 MINUTE. "
        "Please use the websocket for live updates to avoid polling the API."
    ),
    -1007: "Timeout waiting for response from backend server. Send status unknown; "
    "execution status unknown.",
    -1015: "Too many new orders; current limit is {limit} orders per {interval}.",
    -1020: "This operation is not supported.",
    -1021: "Timestamp for this request is outside of the recvWindow.",
    -1022: "Signature for this request is not valid.",
    -1100: "Illegal characters found in parameter '{name}'; legal range is '{rule}'.",
    -1102: "Mandatory parameter '{name}' was not sent, was empty/null, or malformed.",
    -1106: "Parameter '{name}' sent when not required.",
    -1111: "Precision is over the maximum defined for this asset.",
    -1115: "Invalid timeInForce.",
    -1116: "Invalid orderType.",
    -1117: "Invalid side.",
    -1121: "Invalid symbol.",
    -1125: "This listenKey does not exist.",
    -1130: "Invalid data sent for a parameter.",
    -2011: "Unknown order sent.",
    -2013: "Order does not exist.",
    -2014: "API-key format invalid.",
    -2015: "Invalid API-key, IP, or permissions for action.",
    -2019: "Margin is insufficient.",
    -2021: "Order would immediately trigger.",
    -2022: "ReduceOnly Order is rejected.",
    -2025: "Reach max open order limit.",
    -4002: "Price greater than max price.",
    -4003: "Quantity less than or equal to zero.",
    -4004: "Quantity less than min quantity.",
    -4005: "Quantity greater than max quantity.",
    -4007: "Stop price greater than max price.",
    -4013: "Price less than min price.",
    -4014: "Price not increased by tick size.",
    -4015: "Client order id is not valid.",
    -4016: "Limit price can't be higher than {limit}.",
    -4023: "Quantity not increased by step size.",
    -4024: "Limit price can't be lower than {limit}.",
    -4028: "Leverage {value} is not valid",
    -4045: "Reach max stop order limit.",
    -4046: "No need to change margin type.",
    -4047: "Margin type cannot be changed if there exists open orders.",
    -4048: "Margin type cannot be changed if there exists position.",
    -4059: "No need to change position side.",
    -4061: "Order's position side does not match user's setting.",
    -4067: "Position side cannot be changed if there exists open orders.",
    -4068: "Position side cannot be changed if there exists position.",
    -4116: "ClientOrderId is duplicated.",
    -4120: "Order type not supported for this endpoint. "
    "Please use the Algo Order API endpoints instead.",
    -4130: "An open stop or take profit order with GTE and closePosition in the direction "
    "is existing.",
    -4131: "The counterparty's best price does not meet the PERCENT_PRICE filter limit.",
    -4135: "Invalid activation price.",
    -4136: "Invalid callback rate.",
    -4137: "Quantity must be zero with closePosition equals true.",
    -4164: "Order's notional must be no smaller than {notional} (unless you choose reduce only).",
    -5021: "Due to the order could not be filled immediately, the FOK order has been rejected. "
    "The order will not be recorded in the order history",
    -5022: "Due to the order could not be executed as maker, the Post Only order will be rejected.",
    -5040: "goodTillDate timestamp must be greater than the current time plus 600 seconds "
    "and smaller than 253402300799000",
}

_NUMBER = re.compile(r"^-?(\d+\.?\d*|\.\d+)$")
_CLIENT_ID = re.compile(r"^[\.A-Z\:/a-z0-9_-]{1,36}$")
CLIENT_ID_RULE = r"^[\.A-Z\:/a-z0-9_-]{1,36}$"
# Absurd magnitudes are rejected as malformed before any arithmetic can blow up on them.
_MAX_DIGITS = 40


class BinanceError(Exception):
    """A rejection in Binance's wire form: ``{"code": code, "msg": msg}`` with an HTTP status.

    Args:
        code: The negative Binance error code.
        msg: The message; when omitted, Binance's text for the code formatted with ``fmt``.
        http_status: The HTTP status the REST layer answers with (400 unless stated).
        **fmt: Values substituted into the code's message template.
    """

    def __init__(
        self, code: int, msg: str | None = None, http_status: int = 400, **fmt: object
    ) -> None:
        text = msg if msg is not None else MSG.get(code, "Unknown error.").format(**fmt)
        super().__init__(f"{code}: {text}")
        self.code = code
        self.msg = text
        self.http_status = http_status

    def body(self) -> dict[str, Any]:
        """Return the error body as Binance sends it."""
        return {"code": self.code, "msg": self.msg}


def parse_decimal(name: str, value: str | None, *, required: bool = True) -> Decimal | None:
    """Parse a decimal parameter exactly as sent; malformed or absurd values are ``-1102``."""
    if value is None or value == "":
        if required:
            raise BinanceError(-1102, name=name)
        return None
    if not _NUMBER.match(value) or len(value) > _MAX_DIGITS:
        raise BinanceError(-1102, name=name)
    try:
        return Decimal(value)
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only valid literals
        raise BinanceError(-1102, name=name) from exc


def parse_required(name: str, value: str | None) -> Decimal:
    """Parse a mandatory decimal parameter (``-1102`` when missing or malformed)."""
    parsed = parse_decimal(name, value)
    if parsed is None:  # pragma: no cover - parse_decimal raises for a required value
        raise BinanceError(-1102, name=name)
    return parsed


def parse_bool(name: str, value: str | None, default: bool = False) -> bool:
    """Parse Binance's ``true``/``false`` strings (any case); anything else is ``-1130``."""
    if value is None or value == "":
        return default
    low = value.lower()
    if low == "true":
        return True
    if low == "false":
        return False
    raise BinanceError(-1102, name=name)


def decimals_of(value: str) -> int:
    """Return the decimals written in a number string, trailing zeros not counted."""
    if "." not in value:
        return 0
    return len(value.split(".", 1)[1].rstrip("0"))


def fmt_decimal(value: Decimal, places: int) -> str:
    """Render ``value`` with exactly ``places`` decimals, no exponent (Binance's style)."""
    quantum = Decimal(1).scaleb(-places) if places > 0 else Decimal(1)
    text = format(value.quantize(quantum), "f")
    return "0" + text[2:] if text.startswith("-0") and Decimal(text) == 0 else text


def plain(value: Decimal) -> str:
    """Render a decimal without exponent and without trailing zeros."""
    text = format(value.normalize(), "f")
    return text


def check_client_id(name: str, value: str) -> None:
    """Check a client order id against Binance's pattern (``-4015`` length, ``-1100`` chars)."""
    if len(value) > 36 or len(value) == 0:
        raise BinanceError(-4015)
    if not _CLIENT_ID.match(value):
        raise BinanceError(-1100, name=name, rule=CLIENT_ID_RULE)


@dataclass(frozen=True)
class SymbolRules:
    """One symbol's trading rules, read from its exchangeInfo entry with exact decimals."""

    symbol: str
    status: str
    price_precision: int
    quantity_precision: int
    min_price: Decimal
    max_price: Decimal
    tick_size: Decimal
    min_qty: Decimal
    max_qty: Decimal
    step_size: Decimal
    market_min_qty: Decimal
    market_max_qty: Decimal
    market_step_size: Decimal
    min_notional: Decimal
    multiplier_up: Decimal
    multiplier_down: Decimal
    max_num_orders: int
    max_num_algo_orders: int
    market_take_bound: Decimal
    trigger_protect: Decimal
    order_types: tuple[str, ...] = field(default=())
    time_in_force: tuple[str, ...] = field(default=())
    liquidation_fee: Decimal = Decimal(0)  # exchangeInfo liquidationFee (clearance fee rate)

    @classmethod
    def from_exchange_info(cls, entry: dict[str, Any]) -> SymbolRules:
        """Build the rules from one ``symbols[]`` object of ``GET /fapi/v1/exchangeInfo``."""
        filters = {f["filterType"]: f for f in entry.get("filters", [])}

        def dec(kind: str, key: str, default: str = "0") -> Decimal:
            return Decimal(str(filters.get(kind, {}).get(key, default)))

        lot = "LOT_SIZE"
        market = "MARKET_LOT_SIZE" if "MARKET_LOT_SIZE" in filters else lot
        return cls(
            symbol=entry["symbol"],
            status=entry.get("status", "TRADING"),
            price_precision=int(entry.get("pricePrecision", 8)),
            quantity_precision=int(entry.get("quantityPrecision", 8)),
            min_price=dec("PRICE_FILTER", "minPrice"),
            max_price=dec("PRICE_FILTER", "maxPrice"),
            tick_size=dec("PRICE_FILTER", "tickSize"),
            min_qty=dec(lot, "minQty"),
            max_qty=dec(lot, "maxQty"),
            step_size=dec(lot, "stepSize"),
            market_min_qty=dec(market, "minQty"),
            market_max_qty=dec(market, "maxQty"),
            market_step_size=dec(market, "stepSize"),
            min_notional=dec("MIN_NOTIONAL", "notional"),
            multiplier_up=dec("PERCENT_PRICE", "multiplierUp"),
            multiplier_down=dec("PERCENT_PRICE", "multiplierDown"),
            max_num_orders=int(filters.get("MAX_NUM_ORDERS", {}).get("limit", 200)),
            max_num_algo_orders=int(filters.get("MAX_NUM_ALGO_ORDERS", {}).get("limit", 10)),
            market_take_bound=Decimal(str(entry.get("marketTakeBound", "0"))),
            trigger_protect=Decimal(str(entry.get("triggerProtect", "0"))),
            order_types=tuple(entry.get("orderTypes", ())),
            time_in_force=tuple(entry.get("timeInForce", ())),
            liquidation_fee=Decimal(str(entry.get("liquidationFee", "0"))),
        )

    # --- formatting -------------------------------------------------------------------------

    @property
    def quote_places(self) -> int:
        """Decimals used for quote amounts (cumQuote): price + quantity decimals, at most 8."""
        return min(8, self.price_precision + self.quantity_precision)

    def fmt_price(self, value: Decimal) -> str:
        """Render a price with the symbol's ``pricePrecision`` decimals."""
        return fmt_decimal(value, self.price_precision)

    def fmt_qty(self, value: Decimal) -> str:
        """Render a quantity with the symbol's ``quantityPrecision`` decimals."""
        return fmt_decimal(value, self.quantity_precision)

    def round_price(self, value: Decimal, up: bool) -> Decimal:
        """Round a price to a tick multiple, up or down (used for fills and replay)."""
        if self.tick_size <= 0:
            return value
        base = self.min_price if self.min_price > 0 else Decimal(0)
        ticks = (value - base) / self.tick_size
        whole = ticks.to_integral_value(rounding="ROUND_CEILING" if up else "ROUND_FLOOR")
        return base + whole * self.tick_size

    # --- checks -----------------------------------------------------------------------------

    def check_price(self, name: str, raw: str, value: Decimal, stop: bool = False) -> None:
        """Apply precision and PRICE_FILTER to a price parameter."""
        if decimals_of(raw) > self.price_precision:
            raise BinanceError(-1111)
        if value <= 0:
            raise BinanceError(-1102, name=name)
        if self.min_price > 0 and value < self.min_price:
            raise BinanceError(-4013)
        if self.max_price > 0 and value > self.max_price:
            raise BinanceError(-4007 if stop else -4002)
        if self.tick_size > 0 and (value - self.min_price) % self.tick_size != 0:
            raise BinanceError(-4014)

    def check_quantity(self, raw: str, value: Decimal, market: bool) -> None:
        """Apply precision and LOT_SIZE (MARKET_LOT_SIZE for market orders)."""
        if value <= 0:
            raise BinanceError(-4003)
        if decimals_of(raw) > self.quantity_precision:
            raise BinanceError(-1111)
        lo, hi, step = (
            (self.market_min_qty, self.market_max_qty, self.market_step_size)
            if market
            else (self.min_qty, self.max_qty, self.step_size)
        )
        if lo > 0 and value < lo:
            raise BinanceError(-4004)
        if hi > 0 and value > hi:
            raise BinanceError(-4005)
        if step > 0 and (value - lo) % step != 0:
            raise BinanceError(-4023)

    def check_percent_price(self, side: str, price: Decimal, mark: Decimal) -> None:
        """Apply PERCENT_PRICE: BUY at most mark x up, SELL at least mark x down."""
        if self.multiplier_up > 0 and side == "BUY":
            cap = mark * self.multiplier_up
            if price > cap:
                raise BinanceError(-4016, limit=self.fmt_price(self.round_price(cap, False)))
        if self.multiplier_down > 0 and side == "SELL":
            floor = mark * self.multiplier_down
            if price < floor:
                raise BinanceError(-4024, limit=self.fmt_price(self.round_price(floor, True)))

    def check_min_notional(self, price: Decimal, quantity: Decimal) -> None:
        """Apply MIN_NOTIONAL (``-4164``) to ``price x quantity``."""
        if self.min_notional > 0 and price * quantity < self.min_notional:
            raise BinanceError(-4164, notional=plain(self.min_notional))
