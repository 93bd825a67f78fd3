"""``pyquant notify test``: send one message to every configured target and report each.

Example::

    export PYQUANT_TELEGRAM_TOKEN=...      # secrets never go in the config file
    pyquant notify test --config pyquant.toml

Telegram and Discord get a short text; the generic webhook gets a one-element array with a
``daemon`` document whose action is ``test`` (the events-stream schema). The table shows each
target's HTTP status, tries and time; the exit status is 0 when every target accepted its
message, 1 when one did not, 2 on a bad configuration. Secrets are never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from pyquant.config import load_config
from pyquant.errors import ConfigError, PyquantError
from pyquant.notify.delivery import Delivery, Notifier
from pyquant.notify.documents import DocumentMaker
from pyquant.notify.targets import Target, resolve_targets


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Notifications ([notify] in the config: Telegram, Discord, generic webhook). "
            "Secrets (bot token, webhook URLs) come from the environment or the owner-only "
            "credentials.file."
        ),
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    test = sub.add_parser(
        "test",
        help="send one test message to each target and report each result",
        description="Send one test message to each [notify] target and report each result.",
    )
    test.add_argument("--config", required=True, metavar="FILE", help="config with [notify]")
    test.add_argument(
        "--attempts",
        type=int,
        default=2,
        metavar="N",
        help="tries per target (429 waits its retry_after; default 2)",
    )
    return parser


async def send_test(
    targets: Sequence[Target], attempts: int
) -> list[tuple[Target, Delivery, float]]:
    """Deliver one test message to each target, all at once; return each outcome."""
    host = socket.gethostname()
    document = DocumentMaker(host).make("daemon", None, {"action": "test"})
    text = f"pyquant test message from {host}: notifications reach this chat"
    notifier = Notifier(targets)

    async def one(target: Target) -> tuple[Target, Delivery, float]:
        started = time.perf_counter()
        result = await notifier.deliver(target, text, [document], attempts=attempts)
        return target, result, time.perf_counter() - started

    return list(await asyncio.gather(*(one(t) for t in targets)))


def run(
    argv: Sequence[str], *, prog: str = "pyquant notify", console: Console | None = None
) -> int:
    """Run ``pyquant notify``; raise PyquantError on bad input."""
    args = _parser(prog).parse_args(list(argv))
    if console is None:
        console = Console()
        if not console.is_terminal:
            console.width = 140  # a log file has room: no cut statuses
    if args.attempts < 1:
        raise ConfigError(f"--attempts {args.attempts}: must be at least 1")
    config = load_config(args.config, confirm_mainnet=True, need_keys=False)
    if not config.notify.targets:
        raise ConfigError(f"{args.config}: no [[notify.targets]] to test")
    targets = resolve_targets(config.notify.targets, secrets_file=config.credentials.file)
    results = asyncio.run(send_test(targets, args.attempts))
    table = Table(title="pyquant notify test")
    for name in ("target", "kind", "result", "status", "tries", "seconds"):
        table.add_column(name, justify="right" if name in ("tries", "seconds") else "left")
    for target, result, seconds in results:
        table.add_row(
            target.name,
            target.kind,
            "ok" if result.ok else f"FAILED ({result.detail})",
            result.status,
            str(result.attempts),
            f"{seconds:.2f}",
        )
    console.print(table)
    return 0 if all(r.ok for _, r, _ in results) else 1


def run_command(command: str, argv: Sequence[str]) -> int:
    """Entry point of ``pyquant notify``: 0 all delivered, 1 one failed, 2 bad input."""
    try:
        return run(argv, prog=f"pyquant {command}")
    except PyquantError as exc:
        print(f"pyquant {command}: error: {exc}", file=sys.stderr)
        return 2
