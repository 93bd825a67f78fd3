"""Daemon + simulator on 127.0.0.1: fixtures shared by the end-to-end tests.

The simulator runs with a manual clock (``speed=0``): prices move only when a test pins a
mark (``venue.set_mark``) and time only when it steps (``venue.step``), so every scenario is
exact. The daemon runs in-process against it as a ``custom`` venue (its URLs and keys), with
the demo producer off and an explicit exit policy whose levels the tests compute by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyquant.sim
from pyquant.config import Config, load_config
from pyquant.daemon.app import Daemon
from pyquant.sim.server import Venue

# Prices and sizes below are exact on ETHUSDT's grid (tick 0.01, step 0.001).
EXIT_POLICY: dict[str, Any] = {
    "preset": "none",
    "fallback_stop_pct": 0.02,
    "min_stop_pct": 0.001,
    "max_stop_pct": 0.05,
    "ladder": [{"at": 0.01, "fraction": 0.3}, {"at": 0.02, "fraction": 0.3}],
    "ladder_unit": "pct",
    "breakeven_after_level": 1,
    "trail_pct": 0.01,
    "trail_after_level": 2,
}


async def until(predicate: Callable[[], bool], limit_s: float = 10.0, what: str = "") -> None:
    """Wait until the condition holds; it is changed by other tasks (daemon, simulator)."""
    try:
        async with asyncio.timeout(limit_s):
            while not predicate():  # noqa: ASYNC110 - the state lives in the code under test
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what or predicate}") from None


def daemon_config(
    venue: Venue, /, env: dict[str, str] | None = None, **sections: dict[str, Any]
) -> Config:
    """The daemon's config for an in-test simulator (custom venue, no demo, exact policy)."""
    overrides: dict[str, Any] = {
        "exchange": "custom",
        "venue": {
            "rest_url": venue.rest_url,
            "ws_url": f"{venue.ws_url}/market",
            "user_ws_url": f"{venue.ws_url}/private",
        },
        "market": {
            "warmup_bars": 30,
            "stale_after_s": 600.0,
            "backoff_initial_s": 0.05,
            "backoff_max_s": 0.2,
        },
        "sources": {"demo": False},
        "entries": {
            "sizing": "notional",
            "notional_usdt": "500",
            "leverage": 5,
            "cooldown_s": 0.0,
            "max_intent_age_s": 60.0,
        },
        "router": {"backstop_throttle_s": 0.0},
        "daemon": {"dashboard": False, "snapshot_interval_s": 0.5},
        "exit": dict(EXIT_POLICY),
    }
    for name, values in sections.items():
        overrides[name] = (
            {**overrides.get(name, {}), **values} if isinstance(values, dict) else values
        )
    environ = {"PYQUANT_API_KEY": venue.api_key, "PYQUANT_API_SECRET": venue.api_secret}
    return load_config(None, environ={**environ, **(env or {})}, overrides=overrides)


@dataclass
class Running:
    """A daemon running against a simulator."""

    venue: Venue
    daemon: Daemon
    task: asyncio.Task[dict[str, object]]

    async def stop(self) -> dict[str, object]:
        self.daemon.stop()
        return await asyncio.wait_for(self.task, 20)


@contextlib.asynccontextmanager
async def run_daemon(
    venue: Venue,
    state_dir: Path,
    /,
    env: dict[str, str] | None = None,
    metrics_port: int | None = None,
    **sections: dict[str, Any],
) -> AsyncIterator[Running]:
    """Start a daemon against ``venue`` and wait until it takes intents."""
    config = daemon_config(venue, env, **sections)
    daemon = Daemon(
        config, state_dir=state_dir, install_signal_handlers=False, metrics_port=metrics_port
    )
    task = asyncio.get_running_loop().create_task(daemon.run())
    ready = asyncio.ensure_future(daemon.ready.wait())
    await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    assert daemon.ready.is_set(), "daemon did not become ready"
    await until(lambda: daemon.market is not None and daemon.market.health.connected, 10, "market")
    running = Running(venue, daemon, task)
    try:
        yield running
    finally:
        if not task.done():
            await running.stop()


def free_port() -> int:
    """Return a port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.asynccontextmanager
async def simulator(position_mode: str = "one-way", **kwargs: Any) -> AsyncIterator[Venue]:
    async with pyquant.sim.serve(speed=0, position_mode=position_mode, **kwargs) as venue:
        yield venue


def venue_env(venue: Venue) -> dict[str, str]:
    """This process's environment plus the simulator's API key and secret (for `pyquant run`)."""
    return {
        **os.environ,
        "PYQUANT_API_KEY": venue.api_key,
        "PYQUANT_API_SECRET": venue.api_secret,
    }


def write_config(path: Path, venue: Venue, intents: Path) -> None:
    """Write a TOML config for a ``pyquant`` subprocess against an in-test simulator."""
    ladder = ", ".join(
        f"{{ at = {lvl['at']}, fraction = {lvl['fraction']} }}" for lvl in EXIT_POLICY["ladder"]
    )
    scalars = "\n".join(f"{k} = {json.dumps(v)}" for k, v in EXIT_POLICY.items() if k != "ladder")
    path.write_text(
        f"""
exchange = "custom"
[venue]
rest_url = "{venue.rest_url}"
ws_url = "{venue.ws_url}/market"
user_ws_url = "{venue.ws_url}/private"
[market]
warmup_bars = 30
stale_after_s = 600.0
backoff_initial_s = 0.05
backoff_max_s = 0.2
[sources]
demo = false
jsonl = "{intents}"
[entries]
sizing = "notional"
notional_usdt = "500"
leverage = 5
cooldown_s = 0.0
[router]
backstop_throttle_s = 0.0
[daemon]
snapshot_interval_s = 0.2
[exit]
ladder = [{ladder}]
{scalars}
"""
    )


def run_args(config: Path, state: Path) -> list[str]:
    """The command line of `pyquant run` on ``config`` and ``state``: JSON logs, no dashboard."""
    return [
        sys.executable,
        "-m",
        "pyquant",
        "run",
        "--config",
        str(config),
        "--state",
        str(state),
        "--no-tui",
        "--log-format",
        "json",
    ]


async def run_pyquant(
    *args: str, env: dict[str, str], limit_s: float = 120
) -> tuple[int, str, str]:
    """Run one `pyquant` command to its end; return (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pyquant",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), limit_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class DaemonProcess:
    """``pyquant run`` as a subprocess, its log lines collected as they come."""

    def __init__(self, config: Path, state: Path, env: dict[str, str], summary: Path) -> None:
        self.args = [*run_args(config, state), "--summary-json", str(summary)]
        self.env = env
        self.lines: list[dict[str, object]] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.args, env=self.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            try:
                self.lines.append(json.loads(raw))
            except json.JSONDecodeError:
                self.lines.append({"msg": raw.decode(errors="replace")})

    def logged(self, text: str) -> bool:
        return any(text in str(line.get("msg", "")) for line in self.lines)

    async def wait_logged(self, text: str, limit_s: float = 30) -> None:
        await until(
            lambda: (
                self.logged(text) or (self.proc is not None and self.proc.returncode is not None)
            ),
            limit_s,
            text,
        )
        assert self.logged(text), "\n".join(str(line.get("msg")) for line in self.lines[-30:])

    async def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        if self._reader is not None:
            await self._reader

    async def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.proc.wait(), 30)
        if self._reader is not None:
            await self._reader
        return code


def append_intent(path: Path, payload: dict[str, object]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(payload) + "\n")
