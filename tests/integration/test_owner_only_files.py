"""Files and binding (issue 17, item 11): owner-only state, checks before any connection.

Before: the state directory was 0755 and the SQLite, log and summary files 0644; a
world-writable intents file was followed; a too-short HTTP token was refused only after
connecting to the venue; ``pyquant sim --host 0.0.0.0`` bound every interface silently; a
run without ``--state`` did not say that nothing would persist.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import sys
from pathlib import Path

import pytest
from pq_harness import simulator, venue_env, write_config

from pyquant.config import load_config
from pyquant.errors import ConfigError
from pyquant.log import configure_logging
from pyquant.sim.cli import non_loopback_warning


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_run_writes_owner_only_state_log_and_summary(tmp_path: Path) -> None:
    intents = tmp_path / "intents.jsonl"
    intents.touch(mode=0o600)
    config = tmp_path / "pyquant.toml"
    state = tmp_path / "state"
    log = tmp_path / "pyquant.log"
    summary = tmp_path / "summary.json"
    async with simulator("hedge") as venue:
        write_config(config, venue, intents)
        with config.open("a") as handle:
            handle.write(f'[log]\nfile = "{log}"\n')
        env = venue_env(venue)
        args = ["--config", str(config), "--no-tui", "--duration", "0.5"]
        for extra in (["--state", str(state), "--summary-json", str(summary)], []):
            old = os.umask(0o022)  # a usual umask: files would be 0644 without pyquant's care
            try:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "pyquant",
                    "run",
                    *args,
                    *extra,
                    env=env,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
            finally:
                os.umask(old)
            _, err = await asyncio.wait_for(proc.communicate(), 120)
            assert proc.returncode == 0, err.decode()[-2000:]
            warned = "no --state DIR" in err.decode()
            assert warned == (not extra), err.decode()[-2000:]
    assert mode_of(state) == 0o700
    assert mode_of(state / "pyquant.sqlite") == 0o600
    assert mode_of(state / "daemon.lock") == 0o600
    assert mode_of(log) == 0o600
    assert mode_of(summary) == 0o600


def test_log_file_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    old = os.umask(0o022)
    try:
        configure_logging(fmt="text", level="INFO", secrets=[], file=str(path))
        logging.getLogger("pyquant.test").info("hello")
    finally:
        os.umask(old)
        configure_logging(fmt="text", level="INFO", secrets=[])
    assert mode_of(path) == 0o600


def test_short_http_token_refused_at_load_before_any_connection() -> None:
    with pytest.raises(ConfigError, match=r"sources.http_token.*at least 16 characters"):
        load_config(
            None,
            environ={"PYQUANT_HTTP_TOKEN": "short"},
            overrides={"sources": {"http_port": 8089}},
        )
    config = load_config(
        None,
        environ={"PYQUANT_HTTP_TOKEN": "x" * 16},
        overrides={"sources": {"http_port": 8089}},
    )
    assert config.sources.http_port == 8089


def test_world_writable_intents_file_refused_at_load(tmp_path: Path) -> None:
    intents = tmp_path / "intents.jsonl"
    intents.touch()
    intents.chmod(0o666)
    with pytest.raises(ConfigError, match="writable by every local user"):
        load_config(None, overrides={"sources": {"jsonl": str(intents)}})
    intents.chmod(0o644)
    assert load_config(None, overrides={"sources": {"jsonl": str(intents)}}).sources.jsonl


@pytest.mark.parametrize(
    ("host", "warns"),
    [("127.0.0.1", False), ("::1", False), ("localhost", False), ("0.0.0.0", True)],  # noqa: S104
)
def test_sim_warns_on_a_non_loopback_bind(host: str, warns: bool) -> None:
    warning = non_loopback_warning(host)
    assert (warning is not None) == warns
    if warning:
        assert "not a loopback address" in warning
