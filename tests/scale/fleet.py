"""Several `pyquant run` daemons on one Redis bus: their intake URL, process and log lines.

Shared by the multi-daemon tests (two daemons, rebalance, fencing, account limits). The
``client`` fixture they use is in this folder's conftest.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from pq_harness import DaemonProcess

STREAM = "quantum:stream:trade.intent"
TTL_MS = 1500


def bus_url(port: int, daemon_id: str, *, from_start: bool = True) -> str:
    """The ``--intents`` URL of daemon ``daemon_id`` on the Redis at ``port`` (loopback)."""
    url = (
        f"redis://127.0.0.1:{port}/0?stream={STREAM}&group=pyquant&daemon={daemon_id}"
        f"&lease_ttl_ms={TTL_MS}"
    )
    return url + "&start=0" if from_start else url


def daemon(tmp_path: Path, name: str, config: Path, env: dict[str, str], url: str) -> DaemonProcess:
    """`pyquant run` with its own state directory, reading intents from the bus at ``url``."""
    process = DaemonProcess(config, tmp_path / name, env, tmp_path / f"{name}.json")
    process.args += ["--intents", url]
    return process


def messages(process: DaemonProcess) -> list[str]:
    """The log messages the daemon wrote so far."""
    return [str(line.get("msg", "")) for line in process.lines]


def intent(symbol: str, *, size_usd: str = "500", **extra: str) -> dict[str, str]:
    """A BUY intent for the bus, as the signal source writes it (``extra`` adds fields)."""
    return {
        **extra,
        "symbol": symbol,
        "side": "BUY",
        "confidence": "0.8",
        "leverage": "5",
        "position_size_usd": size_usd,
    }
