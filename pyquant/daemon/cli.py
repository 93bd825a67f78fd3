"""``pyquant run``, ``pyquant flatten`` and ``pyquant resume``.

``pyquant run`` with no arguments trades the built-in simulator on its bundled real data
with a paper account and the demo intent producer, until Ctrl-C; then prints the summary.
Flags override the config file, which overrides the defaults (see ``pyquant.config``).
With ``--state DIR`` it holds ``DIR/daemon.lock`` (its pid inside) while it runs; without,
the journal lives in a temporary directory and a warning says so.

``pyquant flatten`` is the kill switch from outside. It first latches a halt in the journal
at ``--state`` (no new entries until ``pyquant resume``). When a daemon runs on that
directory it signals it (SIGUSR1) and waits for its flatten instead of opening the journal a
second time; otherwise it connects to the venue itself, reconciles and closes every
position. Then it cancels every open order and algo order on the account (``--ours-only``:
only orders with a pyquant id), prints each step, and exits 1 when anything is left open.
A running daemon flattens the same way on SIGUSR1.

``pyquant resume --state DIR`` clears the halt; a running daemon takes entries again within
a second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from pyquant.config import Config, load_config
from pyquant.daemon.state_lock import StateLock, StateLocked
from pyquant.errors import ConfigError, PolicyError, PyquantError
from pyquant.log import configure_logging
from pyquant.trading.journal import Halt
from pyquant.trading.killswitch import SweepReport, sweep_account


def _parser(command: str) -> argparse.ArgumentParser:
    if command == "flatten":
        parser = argparse.ArgumentParser(
            prog="pyquant flatten",
            description=(
                "Kill switch: halt entries (until 'pyquant resume'), close every position and "
                "cancel every open order on the account. Exit status 1 if anything is left."
            ),
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
        parser.add_argument(
            "--ours-only",
            action="store_true",
            help="cancel only orders with a pyquant id (default: every open order on the account)",
        )
        parser.add_argument(
            "--wait",
            type=float,
            default=60.0,
            metavar="SECONDS",
            help="how long to wait for a running daemon's flatten (default 60)",
        )
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
    """Entry point of ``pyquant run``, ``flatten`` and ``resume``; returns the exit status."""
    if command == "resume":
        return _resume(argv)
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
            assert state is not None  # noqa: S101 - _flatten_allowed requires it
            return asyncio.run(_flatten(config, state, ours_only=args.ours_only, wait_s=args.wait))
        if state is None:
            print(
                "pyquant run: warning: no --state DIR: the journal lives in a temporary "
                "directory deleted at exit; positions, the kill switch's halt and the "
                "order-id tag will not persist across runs",
                file=sys.stderr,
            )
            return asyncio.run(_run(config, args, state, tui=tui))
        lock = StateLock(state)
        try:
            lock.acquire()
        except StateLocked as exc:
            print(f"pyquant run: {exc}: one daemon per state directory", file=sys.stderr)
            return 2
        try:
            return asyncio.run(_run(config, args, state, tui=tui))
        finally:
            lock.release()
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
    from pyquant.daemon.app import Daemon

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
        write_private(args.summary_json, json.dumps(summary, indent=2, default=str) + "\n")
    return 0


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (0600), whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(text)


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


async def _flatten(config: Config, state: Path, *, ours_only: bool, wait_s: float) -> int:
    from pyquant.trading.journal import Store

    # The halt first: whatever happens next (a kill, a lost connection), no new entry is
    # taken on this state until 'pyquant resume'.
    store = Store.open(state / "pyquant.sqlite")
    try:
        halt = store.set_halt("pyquant flatten", f"pyquant flatten pid {os.getpid()}")
    finally:
        store.close()
    print(f"halt: set (entries refused until 'pyquant resume --state {state}')")
    lock = StateLock(state)
    failed = 0
    try:
        lock.acquire()
    except StateLocked as exc:
        if exc.pid is None or exc.pid <= 0:
            print(f"flatten: {exc}, and its pid is unreadable: not signalled", file=sys.stderr)
            return 1
        failed += await _flatten_by_daemon(state, exc.pid, halt, wait_s)
    else:
        try:
            failed += await _flatten_here(config, state)
        finally:
            lock.release()
    report = await _sweep(config, ours_only=ours_only)
    for step in report.steps:
        print(step.line())
    failed += report.failed
    scope = "pyquant's orders" if ours_only else "every open order"
    print(f"sweep: {scope}: {len(report.steps)} cancel(s), {report.failed} failed")
    for line in report.left_open:
        print(f"LEFT OPEN {line}")
    print(
        f"flatten: {failed} failed, {len(report.left_open)} left open"
        + ("" if report.left_open or failed else ": the account is flat")
    )
    return 0 if failed == 0 and not report.left_open else 1


async def _flatten_here(config: Config, state: Path) -> int:
    from pyquant.daemon.app import Daemon

    daemon = Daemon(config, state_dir=state, install_signal_handlers=False)
    steps = await daemon.flatten_only()
    for step in steps:
        mark = "ok " if step.ok else "FAILED"
        print(
            f"{mark} {step.step:<16} {step.symbol:<12} {step.position_side:<5} "
            f"{step.client_order_id} {step.detail}"
        )
    result = daemon.flatten_result
    print(f"positions: {result or f'{len(steps)} step(s)'}")
    # the last round's failures count (earlier ones were tried again)
    return _failed_count(result) if result else 0


async def _flatten_by_daemon(state: Path, pid: int, before: Halt, wait_s: float) -> int:
    from pyquant.trading.journal import Store

    # The halt may be older than this command (set by an earlier flatten): its report counts
    # only once the daemon's flatten for this signal has written a new one.
    halt_id, reported_before = before.halt_id, before.flattened_at_ms
    try:
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError:
        print(f"flatten: the daemon (pid {pid}) is gone; run flatten again", file=sys.stderr)
        return 1
    print(f"daemon: pid {pid} runs on {state}: signalled (SIGUSR1), waiting for its flatten")
    store = Store.open(state / "pyquant.sqlite")
    try:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            halt = store.halt()
            if halt is None or halt.halt_id != halt_id:
                print("flatten: the halt was cleared meanwhile ('pyquant resume')")
                return 1
            if halt.flatten_result is not None and halt.flattened_at_ms != reported_before:
                failed = _failed_count(halt.flatten_result)
                print(f"positions: the daemon reports {halt.flatten_result}")
                return failed
            await asyncio.sleep(0.1)
    finally:
        store.close()
    print(f"flatten: the daemon (pid {pid}) did not report within {wait_s:g} s", file=sys.stderr)
    return 1


def _failed_count(result: str) -> int:
    # "<n> step(s), <m> failed", as Daemon.flatten records it
    words = result.replace(",", " ").split()
    for index, word in enumerate(words):
        if word == "failed" and index > 0 and words[index - 1].isdigit():
            return int(words[index - 1])
    return 1


async def _sweep(config: Config, *, ours_only: bool) -> SweepReport:
    from pyquant.exchange.client import BinanceClient

    key, secret = config.credentials.api_key, config.credentials.api_secret
    if key is None or secret is None:
        raise PyquantError(f"exchange {config.exchange!r} needs an API key and secret")
    client = BinanceClient(
        config.rest_url,
        key.reveal(),
        secret.reveal(),
        recv_window_ms=config.venue.recv_window_ms,
        timeout_s=config.venue.timeout_s,
    )
    try:
        await client.sync_time()
        return await sweep_account(client, ours_only=ours_only)
    finally:
        await client.close()


def _resume(argv: list[str]) -> int:
    from pyquant.trading.journal import Store

    parser = argparse.ArgumentParser(
        prog="pyquant resume",
        description="Clear the kill switch's halt: the daemon on DIR takes entries again.",
    )
    parser.add_argument("--state", type=Path, metavar="DIR", required=True)
    args = parser.parse_args(argv)
    path = args.state.expanduser() / "pyquant.sqlite"
    if not path.exists():
        print(f"pyquant resume: no journal at {path}", file=sys.stderr)
        return 2
    store = Store.open(path)
    try:
        cleared = store.clear_halt(f"pyquant resume pid {os.getpid()}")
    finally:
        store.close()
    if cleared is None:
        print("resume: no halt was set")
        return 0
    print(
        f"resume: cleared the halt set by {cleared.set_by} ({cleared.reason}); "
        "entries are taken again"
    )
    return 0


__all__ = ["format_summary", "run_command"]
