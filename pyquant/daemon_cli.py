"""``pyquant run`` and ``pyquant flatten``.

``pyquant run`` with no arguments trades the built-in simulator on its bundled real data
with a paper account and the demo intent producer, until Ctrl-C; then prints the summary.
Flags override the config file, which overrides the defaults (see ``pyquant.config``).

``pyquant flatten`` is the kill switch from outside: it connects to the configured venue,
reconciles the store at ``--state`` with the exchange, cancels our orders and closes every
position, printing each step. A running daemon does the same on SIGUSR1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from pyquant.config import Config, load_config
from pyquant.errors import ConfigError, PolicyError, PyquantError
from pyquant.log import configure_logging


def _parser(command: str) -> argparse.ArgumentParser:
    if command == "flatten":
        parser = argparse.ArgumentParser(
            prog="pyquant flatten",
            description="Kill switch: cancel pyquant's orders and close every position.",
        )
    else:
        parser = argparse.ArgumentParser(
            prog="pyquant run",
            description=(
                "Run the streaming daemon. Without --config it trades the built-in simulator "
                "on bundled real data with a paper account and the demo intent producer."
            ),
            epilog=(
                "Ctrl-C or SIGTERM: clean stop (intake closed, in-flight orders finished), then "
                "the summary; a second one abandons the wait. SIGUSR1: kill switch (cancel our "
                "orders, close every position)."
            ),
        )
    parser.add_argument("--config", type=Path, help="TOML configuration file")
    parser.add_argument("--state", type=Path, metavar="DIR", help="state directory (SQLite)")
    parser.add_argument(
        "--log-format", choices=("text", "json"), help="log line format (default: text)"
    )
    parser.add_argument(
        "--log-level",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="log level (default INFO; WARNING on the terminal under the dashboard)",
    )
    parser.add_argument(
        "--i-understand-mainnet",
        action="store_true",
        help="confirm trading real money on Binance mainnet",
    )
    if command == "flatten":
        parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        return parser
    parser.add_argument("--speed", type=float, help="simulator replay speed (default 600)")
    parser.add_argument(
        "--position-mode", choices=("one-way", "hedge"), help="simulator account position mode"
    )
    parser.add_argument("--duration", type=float, metavar="SECONDS", help="stop after this long")
    parser.add_argument("--summary-json", type=Path, metavar="FILE", help="write the summary here")
    parser.add_argument("--no-tui", action="store_true", help="no dashboard; log lines instead")
    parser.add_argument("--shadow", action="store_true", help="decide and log, send nothing")
    parser.add_argument(
        "--intents",
        metavar="URL",
        help=(
            "read intents from a Redis stream and share the account with other daemons: "
            "redis://HOST:PORT/DB?stream=NAME&group=NAME&daemon=ID (turns the demo producer off)"
        ),
    )
    parser.add_argument(
        "--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics on 127.0.0.1"
    )
    parser.add_argument(
        "--show-config", action="store_true", help="print the effective config (redacted), exit"
    )
    return parser


def _overrides(args: argparse.Namespace, command: str) -> dict[str, Any]:
    over: dict[str, dict[str, Any]] = {
        "sim": {},
        "daemon": {},
        "router": {},
        "log": {},
        "sources": {},
    }
    if args.log_format:
        over["log"]["format"] = args.log_format
    if args.log_level:
        over["log"]["level"] = args.log_level
    if args.state is not None:
        over["daemon"]["state_dir"] = str(args.state)
    if command == "run":
        if args.speed is not None:
            over["sim"]["speed"] = args.speed
        if args.position_mode:
            over["sim"]["position_mode"] = args.position_mode
        if args.duration is not None:
            over["daemon"]["duration_s"] = args.duration
        if args.no_tui:
            over["daemon"]["dashboard"] = False
        if args.shadow:
            over["router"]["shadow"] = True
        if args.intents:
            over["sources"]["redis_url"] = args.intents
            over["sources"]["demo"] = False
    return {k: v for k, v in over.items() if v}


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def format_summary(summary: dict[str, object]) -> str:
    """Render the summary for the terminal."""
    lines = ["", "pyquant run summary", "-------------------"]
    for key, value in summary.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k}: {v}" for k, v in value.items()) or "none"
            lines.append(f"{key:<18} {inner}")
        else:
            lines.append(f"{key:<18} {value}")
    return "\n".join(lines)


def run_command(command: str, argv: list[str]) -> int:
    """Entry point of ``pyquant run`` and ``pyquant flatten``; returns the exit status."""
    parser = _parser(command)
    args = parser.parse_args(argv)
    try:
        config = load_config(
            args.config,
            overrides=_overrides(args, command),
            confirm_mainnet=args.i_understand_mainnet,
        )
    except ConfigError as exc:
        print(f"pyquant {command}: {exc}", file=sys.stderr)
        return 2
    try:
        config.exit_policy()  # validated by the core now, before any venue is touched
    except (PolicyError, ConfigError) as exc:
        print(f"pyquant {command}: invalid exit policy: {exc}", file=sys.stderr)
        return 2
    if command == "run" and args.show_config:
        print(json.dumps(config.redacted(), indent=2, default=str))
        return 0
    secrets = [
        s.reveal()
        for s in (
            config.credentials.api_key,
            config.credentials.api_secret,
            config.sources.http_token,
        )
        if s is not None
    ]
    level: str = config.log.level
    tui = command == "run" and config.daemon.dashboard and sys.stdout.isatty()
    if tui and args.log_level is None and not config.log.file and level == "INFO":
        # The dashboard shows every action and rejection; on the terminal below it only
        # warnings and errors (pass --log-level INFO, or set log.file, for the full log).
        level = "WARNING"
    configure_logging(fmt=config.log.format, level=level, secrets=secrets, file=config.log.file)
    state = Path(config.daemon.state_dir).expanduser() if config.daemon.state_dir else None
    try:
        if command == "flatten":
            if not _flatten_allowed(config, state, args):
                return 2
            return asyncio.run(_flatten(config, state))
        return asyncio.run(_run(config, args, state, tui=tui))
    except (PolicyError, ConfigError) as exc:
        print(f"pyquant {command}: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except PyquantError as exc:
        print(f"pyquant {command}: {exc}", file=sys.stderr)
        return 1
    except ExceptionGroup as group:
        # A task of the daemon's TaskGroup failed; name the first cause plainly.
        first = _first_leaf(group)
        if isinstance(first, PolicyError | ConfigError):
            print(f"pyquant {command}: invalid configuration: {first}", file=sys.stderr)
            return 2
        if isinstance(first, PyquantError | OSError):
            print(f"pyquant {command}: stopped: {type(first).__name__}: {first}", file=sys.stderr)
            return 1
        raise
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"pyquant {command}: stopped without a clean stop", file=sys.stderr)
        return 130


async def _run(config: Config, args: argparse.Namespace, state: Path | None, *, tui: bool) -> int:
    from pyquant.daemon import Daemon

    daemon = Daemon(
        config,
        state_dir=state,
        dashboard=tui,
        metrics_port=args.metrics_port
        if args.metrics_port is not None
        else (config.metrics.port if config.metrics.enabled else None),
    )
    summary = await daemon.run()
    print(format_summary(summary))
    if args.summary_json is not None:
        args.summary_json.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return 0


def _flatten_allowed(config: Config, state: Path | None, args: argparse.Namespace) -> bool:
    if config.exchange == "sim":
        print(
            "pyquant flatten: the built-in simulator lives inside its daemon; send SIGUSR1 to "
            "the running 'pyquant run' or point --config at a standalone 'pyquant sim'",
            file=sys.stderr,
        )
        return False
    if state is None:
        print("pyquant flatten: --state DIR of the daemon is required", file=sys.stderr)
        return False
    if not args.yes:
        answer = input(f"Close every position on {config.exchange} ({config.rest_url})? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            return False
    return True


async def _flatten(config: Config, state: Path | None) -> int:
    from pyquant.daemon import Daemon

    daemon = Daemon(config, state_dir=state, install_signal_handlers=False)
    steps = await daemon.flatten_only()
    failed = 0
    for step in steps:
        mark = "ok " if step.ok else "FAILED"
        failed += 0 if step.ok else 1
        print(
            f"{mark} {step.step:<16} {step.symbol:<12} {step.position_side:<5} "
            f"{step.client_order_id} {step.detail}"
        )
    print(f"flatten: {len(steps)} step(s), {failed} failed")
    return 0 if failed == 0 else 1


__all__ = ["format_summary", "run_command"]
