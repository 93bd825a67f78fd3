"""``pyquant sim``: serve the simulated Binance USDⓈ-M futures venue until SIGINT/SIGTERM.

The first stdout line is one JSON object scripts can read, flushed at once::

    {"rest": "http://127.0.0.1:N", "ws": "ws://127.0.0.1:N", "api_key": "…", "api_secret": "…"}

Human-readable logs follow on stdout. Exit status 0 on a clean stop, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import signal
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from pyquant.sim.account import WS_ROUTES, AccountSettings

__all__ = ["build_parser", "run_command"]

logger = logging.getLogger("pyquant.sim")


def _fees(text: str) -> tuple[Decimal, Decimal]:
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(
            f"--fees {text!r}: expected MAKER,TAKER such as 0.0002,0.0005"
        )
    try:
        maker, taker = (Decimal(p.strip()) for p in parts)
    except InvalidOperation as exc:
        raise argparse.ArgumentTypeError(f"--fees {text!r}: not decimal numbers") from exc
    if not (0 <= maker < 1 and 0 <= taker < 1):
        raise argparse.ArgumentTypeError(f"--fees {text!r}: rates must be in [0, 1)")
    return maker, taker


def _balance(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation as exc:
        raise argparse.ArgumentTypeError(f"--balance {text!r}: not a decimal number") from exc
    if not value.is_finite() or value < 0:
        raise argparse.ArgumentTypeError(f"--balance {text!r}: must be a finite amount >= 0")
    return value


def _funding_rate(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation as exc:
        raise argparse.ArgumentTypeError(f"--funding-rate {text!r}: not a decimal number") from exc
    if not value.is_finite() or abs(value) >= 1:
        raise argparse.ArgumentTypeError(
            f"--funding-rate {text!r}: must be a finite rate between -1 and 1"
        )
    return value


def build_parser(prog: str = "pyquant sim") -> argparse.ArgumentParser:
    """Return the argument parser of ``pyquant sim``."""
    p = argparse.ArgumentParser(
        prog=prog, description="Serve a Binance USDⓈ-M futures simulator on loopback."
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port to bind (default: a free one)")
    p.add_argument(
        "--data",
        nargs="+",
        metavar="PATH",
        help="1m klines, Parquet or CSV "
        "(open_time, open, high, low, close[, volume, symbol]); default: bundled real data",
    )
    p.add_argument(
        "--symbols",
        nargs="+",
        metavar="SYMBOL",
        help="also serve these symbols as a seeded random walk",
    )
    p.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="exchange-clock seconds per wall second (0 = frozen)",
    )
    p.add_argument("--position-mode", choices=("one-way", "hedge"), default="one-way")
    p.add_argument("--balance", type=_balance, default=Decimal(10_000), help="starting USDT wallet")
    p.add_argument("--api-key", help="API key clients send (default: random)")
    p.add_argument("--api-secret", help="HMAC secret (default: random)")
    p.add_argument("--state", type=Path, help="JSON file that keeps the account across restarts")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of price paths, random walks and faults"
    )
    p.add_argument(
        "--fees",
        type=_fees,
        default=(Decimal("0.0002"), Decimal("0.0005")),
        help="maker,taker fee rates (default 0.0002,0.0005)",
    )
    p.add_argument(
        "--slippage-ticks", type=int, default=0, help="ticks a MARKET fill moves against the taker"
    )
    p.add_argument("--faults", help="fault switches as a JSON object (see pyquant.sim.faults)")
    p.add_argument(
        "--liquidation",
        action="store_true",
        help="liquidate positions whose mark reaches their liquidation price",
    )
    p.add_argument("--funding", action="store_true", help="charge funding every 8 h (00/08/16 UTC)")
    p.add_argument(
        "--funding-rate",
        type=_funding_rate,
        default=Decimal("0.0001"),
        help="funding rate of every symbol (default 0.0001)",
    )
    p.add_argument(
        "--time-skew-ms",
        type=int,
        default=0,
        help="offset of the server clock against the wall clock (tests clock-skew checks)",
    )
    p.add_argument(
        "--multi-assets", action="store_true", help="report the account in Multi-Assets mode"
    )
    p.add_argument(
        "--key-permissions",
        metavar="JSON",
        help='API key permissions to report, e.g. \'{"enableWithdrawals": true, '
        '"ipRestrict": false}\' (default: futures on, withdrawals off, IP-restricted)',
    )
    p.add_argument(
        "--no-api-restrictions",
        action="store_true",
        help="answer GET /sapi/v1/account/apiRestrictions with 404, as the futures testnet does",
    )
    p.add_argument(
        "--refuse-ws-route",
        action="append",
        default=[],
        choices=WS_ROUTES,
        help="refuse websocket connections on this route (root = legacy /ws and /stream); "
        "repeatable",
    )
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


def _account_settings(args: argparse.Namespace) -> AccountSettings:
    settings = AccountSettings()
    changes: dict[str, Any] = json.loads(args.key_permissions) if args.key_permissions else {}
    changes["multi_assets"] = bool(args.multi_assets)
    changes["api_restrictions_served"] = not args.no_api_restrictions
    changes["refused_ws_routes"] = list(args.refuse_ws_route)
    settings.update(changes)
    return settings


def non_loopback_warning(host: str) -> str | None:
    """Return a warning when ``host`` is not a loopback address (None when it is)."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return None
    return (
        f"--host {host} is not a loopback address: the simulator (with its fixed test keys) "
        "is reachable from other machines"
    )


async def _serve(args: argparse.Namespace) -> int:
    from pyquant.sim import serve

    faults = json.loads(args.faults) if args.faults else None
    warning = non_loopback_warning(args.host)
    if warning:
        print(f"pyquant sim: warning: {warning}", file=sys.stderr)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    data: list[str | Path] | None = list(args.data) if args.data else None
    if data is None and args.symbols:
        from pyquant.sim.replay import DEFAULT_DATA

        data = [DEFAULT_DATA]
    async with serve(
        host=args.host,
        port=args.port,
        data=data,
        symbols=args.symbols,
        speed=args.speed,
        position_mode=args.position_mode,
        balance=args.balance,
        api_key=args.api_key,
        api_secret=args.api_secret,
        seed=args.seed,
        fees=args.fees,
        slippage_ticks=args.slippage_ticks,
        state=args.state,
        faults=faults,
        liquidation=args.liquidation,
        funding=args.funding,
        funding_rate=args.funding_rate,
        time_skew_ms=args.time_skew_ms,
        account=_account_settings(args),
    ) as venue:
        line = {
            "rest": venue.rest_url,
            "ws": venue.ws_url,
            "api_key": venue.api_key,
            "api_secret": venue.api_secret,
        }
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()
        # logging starts only now, so the JSON line is always the first line on stdout
        logging.basicConfig(
            stream=sys.stdout,
            level=args.log_level,
            format="%(asctime)s %(levelname)s %(name)s %(message)s",
        )
        logger.info("Serving symbols=%s; stop with Ctrl-C", ",".join(venue.rules))
        await stop.wait()
        logger.info("Stopping")
    return 0


def run_command(command: str, argv: list[str]) -> int:
    """Entry point of ``pyquant sim`` (called by :mod:`pyquant.cli`); returns the exit status."""
    parser = build_parser(f"pyquant {command}")
    args = parser.parse_args(argv)
    if (args.api_key is None) != (args.api_secret is None):
        parser.error("--api-key and --api-secret go together")
    if args.faults:
        try:
            if not isinstance(json.loads(args.faults), dict):
                parser.error("--faults must be a JSON object")
        except json.JSONDecodeError as exc:
            parser.error(f"--faults is not JSON: {exc}")
    if args.key_permissions:
        try:
            permissions = json.loads(args.key_permissions)
        except json.JSONDecodeError as exc:
            parser.error(f"--key-permissions is not JSON: {exc}")
        if not isinstance(permissions, dict):
            parser.error("--key-permissions must be a JSON object")
        try:
            AccountSettings().update(permissions)
        except ValueError as exc:
            parser.error(f"--key-permissions: {exc}")
    try:
        return asyncio.run(_serve(args))
    except (ValueError, OSError) as exc:
        print(f"pyquant sim: {exc}", file=sys.stderr)
        return 2
