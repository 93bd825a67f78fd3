"""``pyquant notify test`` and the [notify] section of the config."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pyquant.config import load_config
from pyquant.errors import ConfigError
from pyquant.notify.cli import run_command

from .receiver import Receiver, closed_port_url

TOKEN = "987:SECRET-cli-token"  # noqa: S105 - a test token


def _config(path: Path, telegram_base: str) -> Path:
    path.write_text(
        f"""
[notify]
coalesce_s = 1.5

[[notify.targets]]
kind = "telegram"
name = "phone"
chat_id = "-100200"
base_url = "{telegram_base}"
events = ["exit_filled", "flatten", "feed_down"]

[[notify.targets]]
kind = "discord"
name = "desk-channel"

[[notify.targets]]
kind = "webhook"
name = "ops"
secret_env = "OPS_HOOK_URL"
"""
    )
    return path


def test_notify_section_is_read_and_checked(tmp_path):
    config = load_config(_config(tmp_path / "a.toml", "http://127.0.0.1:1"), environ={})
    assert config.notify.coalesce_s == 1.5
    names = [(t.kind, t.name, t.events) for t in config.notify.targets]
    assert names[0] == ("telegram", "phone", ("exit_filled", "flatten", "feed_down"))
    assert names[2] == ("webhook", "ops", ())
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[notify]\nqueue_size = 0\n[[notify.targets]]\nkind = "telegram"\nbot_token = "x"\n'
        '[[notify.targets]]\nkind = "sms"\n'
    )
    with pytest.raises(ConfigError) as err:
        load_config(bad, environ={})
    text = str(err.value)
    assert "notify.targets[0].bot_token: 'x' found: is not a known setting" in text
    assert "notify.targets[1].kind: 'sms' found: must be one of" in text
    assert "notify.targets[0].chat_id: '' found: a telegram target needs its chat_id" in text
    assert "notify.queue_size: 0 found: must be 1-100000" in text


async def test_notify_test_reports_each_target(tmp_path, monkeypatch, capsys):
    async with Receiver(script=["ok", "ok"]) as rx:
        monkeypatch.setenv("PYQUANT_TELEGRAM_TOKEN", TOKEN)
        monkeypatch.setenv("PYQUANT_DISCORD_WEBHOOK_URL", f"{rx.url}/api/webhooks/7/SECRET")
        monkeypatch.setenv("OPS_HOOK_URL", closed_port_url())
        path = _config(tmp_path / "n.toml", rx.url)
        argv = ["test", "--config", str(path), "--attempts", "1"]
        status = await asyncio.to_thread(run_command, "notify", argv)
    out = capsys.readouterr().out
    assert status == 1  # the ops hook is down
    assert sorted(rx.paths()) == sorted([f"/bot{TOKEN}/sendMessage", "/api/webhooks/7/SECRET"])
    telegram = next(r for r in rx.requests if r.path.endswith("/sendMessage"))
    assert telegram.body["chat_id"] == "-100200"
    assert telegram.body["text"].startswith("pyquant test message from ")
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith("│")}
    assert "ok" in lines["phone"]
    assert "ok" in lines["desk-channel"]
    assert "FAILED" in lines["ops"]
    assert "ClientConnectorError" in lines["ops"]
    assert "SECRET" not in out
    assert TOKEN not in out


def test_notify_test_names_a_missing_secret(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("PYQUANT_TELEGRAM_TOKEN", raising=False)
    monkeypatch.setenv("PYQUANT_DISCORD_WEBHOOK_URL", "http://127.0.0.1:9/x")
    monkeypatch.setenv("OPS_HOOK_URL", "http://127.0.0.1:9/y")
    path = _config(tmp_path / "n.toml", "http://127.0.0.1:9")
    assert run_command("notify", ["test", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "notify.targets[0] (phone): the bot token is missing: set $PYQUANT_TELEGRAM_TOKEN" in err
