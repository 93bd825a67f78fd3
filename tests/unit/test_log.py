"""Log redaction and formats."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from pyquant import log
from pyquant.log import MASK, configure_logging


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    root = logging.getLogger()
    for handler in log._installed:
        root.removeHandler(handler)
    log._installed.clear()


def emit(fmt: str, *args: object, secrets: tuple[str, ...] = (), json: bool = False) -> str:
    out = io.StringIO()
    configure_logging(fmt="json" if json else "text", level="DEBUG", secrets=secrets, stream=out)
    logging.getLogger("pyquant.test").info(fmt, *args)
    return out.getvalue()


def test_registered_secrets_are_masked() -> None:
    text = emit(
        "key=%s secret=%s",
        "APIKEY-123456",
        "SECRET-987654",
        secrets=("APIKEY-123456", "SECRET-987654"),
    )
    assert "APIKEY-123456" not in text
    assert "SECRET-987654" not in text
    assert text.count(MASK) == 2


def test_signatures_and_signed_queries_are_masked() -> None:
    line = emit(
        "GET %s failed",
        "http://127.0.0.1:1/fapi/v1/order?symbol=BTCUSDT&timestamp=1591702613943&signature=3c66abcdef",
    )
    assert "3c66abcdef" not in line
    assert "timestamp=1591702613943" not in line
    assert "/fapi/v1/order?" + MASK in line
    body = emit("body %s", "symbol=BTCUSDT&quantity=1&signature=deadbeef0123")
    assert "deadbeef0123" not in body


def test_api_key_header_bearer_and_listen_key_are_masked() -> None:
    text = emit(
        "headers %s auth %s key %s",
        {"X-MBX-APIKEY": "vmPUZE6mv9SD5VNHk4HlWFsOr6aKE2zvsw0MuIgwCIPy6utIco14y7Ju91duEh8A"},
        "Bearer tok-abc-123",
        "listenKey=pqsLkXk8Bc7TQgy32Hm1rDJN5k4Xq9vx",
    )
    assert "vmPUZE6mv9" not in text
    assert "tok-abc-123" not in text
    assert "pqsLkXk8Bc7TQgy32Hm1rDJN5k4Xq9vx" not in text


def test_json_lines_carry_extras() -> None:
    out = io.StringIO()
    configure_logging(fmt="json", level="INFO", stream=out)
    logging.getLogger("pyquant.router").info(
        "Order sent client_order_id=%s", "pq-1", extra={"symbol": "BTCUSDT"}
    )
    doc = orjson.loads(out.getvalue().splitlines()[-1])
    assert doc["msg"] == "Order sent client_order_id=pq-1"
    assert doc["level"] == "INFO"
    assert doc["logger"] == "pyquant.router"
    assert doc["symbol"] == "BTCUSDT"


def test_exception_text_is_redacted() -> None:
    out = io.StringIO()
    configure_logging(fmt="text", level="INFO", secrets=("HUSH-SECRET",), stream=out)
    try:
        raise RuntimeError("failed with HUSH-SECRET inside")
    except RuntimeError:
        logging.getLogger("pyquant.x").exception("Boom")
    assert "HUSH-SECRET" not in out.getvalue()
    assert "failed with" in out.getvalue()


def test_default_handler_follows_sys_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    configure_logging(fmt="text", level="INFO")
    swapped = io.StringIO()
    monkeypatch.setattr("sys.stderr", swapped)  # what the dashboard's Live display does
    logging.getLogger("pyquant.test").info("Shown above the dashboard")
    assert "Shown above the dashboard" in swapped.getvalue()
