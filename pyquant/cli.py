"""The ``pyquant`` command line: a thin dispatcher to the module that owns each command.

Each command's module parses its own arguments, so ``pyquant sim`` works without the
daemon's imports and ``pyquant backtest`` without the network stack.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module with ``run_command(command, argv) -> int``, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("pyquant.daemon.cli", "run the streaming daemon (default: on the built-in simulator)"),
    "flatten": ("pyquant.daemon.cli", "kill switch: halt entries, close every position, cancel"),
    "resume": ("pyquant.daemon.cli", "clear the kill switch's halt: entries are taken again"),
    "sim": ("pyquant.sim.cli", "serve the built-in Binance-compatible futures simulator"),
    "backtest": ("pyquant.backtest.cli", "replay history through the exit engine"),
    "doctor": ("pyquant.daemon.doctor", "check an account and its venue before trading on it"),
    "data": ("pyquant.data.cli", "download klines and exchange info for backtests"),
    "notify": ("pyquant.notify.cli", "test the notification targets ([notify] in the config)"),
}


def _usage() -> str:
    lines = ["usage: pyquant COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
    lines.append("\n'pyquant COMMAND --help' describes each command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the pyquant command line and return its exit status."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"pyquant: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    status: int = module.run_command(command, rest)
    return status


if __name__ == "__main__":
    sys.exit(main())
