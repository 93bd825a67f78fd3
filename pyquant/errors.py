"""The pyquant exception hierarchy.

The Rust core raises these classes too (through ``pyo3::import_exception!``), so callers
catch one hierarchy whichever side failed. Each class says what the supervisor does next:
fix the input, retry with backoff, drop the one order, or look the order up first.
"""

from __future__ import annotations


class PyquantError(Exception):
    """Base class of every error pyquant raises on purpose."""


class ConfigError(PyquantError, ValueError):
    """A configuration value is invalid: the message names its path, value and rule."""


class PolicyError(PyquantError, ValueError):
    """An ExitPolicy field is out of range."""


class MessageError(PyquantError, ValueError):
    """A stream payload is malformed; the engine's state is untouched."""


class InputError(PyquantError, ValueError):
    """A value handed to pyquant breaks a rule: the message names the field, value and rule.

    Raised for prices, quantities, arrays and exchangeInfo documents (not configuration,
    which raises ConfigError).
    """


class UnknownSymbolError(PyquantError, KeyError):
    """A symbol is not in the loaded exchange rules."""

    def __str__(self) -> str:
        # KeyError quotes its argument; a full sentence reads better unquoted.
        return str(self.args[0]) if self.args else "unknown symbol"


class ExchangeError(PyquantError):
    """An error answered by the exchange, carrying Binance's code and message."""

    def __init__(self, code: int, msg: str, *, http_status: int | None = None) -> None:
        super().__init__(f"{code}: {msg}")
        self.code = code
        self.msg = msg
        self.http_status = http_status


class OrderRejected(ExchangeError):
    """The order was refused and nothing was executed (-1111, -2019, -4164, ...)."""


class RetryableError(ExchangeError):
    """Nothing was accepted (no connection, 429/418, -1003): back off and retry."""


class OrderStatusUnknown(ExchangeError):
    """Timeout or 5xx after sending: look the order up by clientOrderId before resending."""


__all__ = [
    "ConfigError",
    "ExchangeError",
    "InputError",
    "MessageError",
    "OrderRejected",
    "OrderStatusUnknown",
    "PolicyError",
    "PyquantError",
    "RetryableError",
    "UnknownSymbolError",
]
