"""Configuration: TOML + environment, secrets, validation that reports every problem."""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path

import pytest

from pyquant.config import Config, Secret, load_config
from pyquant.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "pyquant.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_the_offline_simulator() -> None:
    config = load_config(None, environ={})
    assert config.exchange == "sim"
    assert config.rest_url == ""
    assert config.router.backstop is True
    assert config.sources.demo is True
    assert config.sources.http_port == 0
    assert config.metrics.enabled is False
    assert config.credentials.api_key is None


def test_toml_values_land_in_typed_fields(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
exchange = "sim"
[sim]
speed = 120
position_mode = "hedge"
balance_usdt = "2500.5"
[market]
symbols = ["BTCUSDT", "ETHUSDT"]
[entries]
risk_pct = "0.005"
max_open_positions = 3
[exit]
preset = "challenge"
""",
    )
    config = load_config(path, environ={})
    assert config.sim.speed == 120.0
    assert config.sim.position_mode == "hedge"
    assert config.sim.balance_usdt == Decimal("2500.5")
    assert config.market.symbols == ("BTCUSDT", "ETHUSDT")
    assert config.entries.risk_pct == Decimal("0.005")
    assert config.entries.max_open_positions == 3
    assert dict(config.exit) == {"preset": "challenge"}


def test_environment_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[entries]\nmax_open_positions = 3\n")
    env = {
        "PYQUANT__ENTRIES__MAX_OPEN_POSITIONS": "7",
        "PYQUANT__MARKET__SYMBOLS": '["SOLUSDT"]',
        "PYQUANT__LOG__FORMAT": "json",
        "PYQUANT__ROUTER__SHADOW": "true",
    }
    config = load_config(path, environ=env)
    assert config.entries.max_open_positions == 7
    assert config.market.symbols == ("SOLUSDT",)
    assert config.log.format == "json"
    assert config.router.shadow is True


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
exchange = "moon"
[entries]
leverage = 500
risk_pct = "lots"
max_open_positions = "five"
[market]
stale_after_s = 0
typo_key = 1
""",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    text = str(info.value)
    assert "exchange: 'moon' found: must be one of 'sim' | 'testnet' | 'mainnet' | 'custom'" in text
    assert "entries.leverage: 500 found: must be from 1 to 125" in text
    assert "entries.risk_pct: 'lots' found: must be a decimal number" in text
    assert "entries.max_open_positions: 'five' found: must be a whole number" in text
    assert "market.stale_after_s: 0.0 found: must be from 1 to 3600 seconds" in text
    assert "market.typo_key: 1 found: is not a known setting of [market]" in text
    assert "6 problem(s)" in text


def test_mainnet_needs_explicit_confirmation(tmp_path: Path) -> None:
    path = write(tmp_path, 'exchange = "mainnet"\n')
    env = {"PYQUANT_API_KEY": "k" * 64, "PYQUANT_API_SECRET": "s" * 64}
    with pytest.raises(ConfigError, match="--i-understand-mainnet"):
        load_config(path, environ=env)
    config = load_config(path, environ=env, confirm_mainnet=True)
    assert config.rest_url == "https://fapi.binance.com"
    assert config.ws_url == "wss://fstream.binance.com/market"
    assert config.user_ws_url == "wss://fstream.binance.com/private"


def test_testnet_without_keys_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, 'exchange = "testnet"\n')
    with pytest.raises(ConfigError, match="needs an API key and secret"):
        load_config(path, environ={})


def test_custom_venue_needs_urls(tmp_path: Path) -> None:
    path = write(tmp_path, 'exchange = "custom"\n[venue]\nrest_url = "ftp://x"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={"PYQUANT_API_KEY": "k", "PYQUANT_API_SECRET": "s"})
    assert "needs rest_url and ws_url" in str(info.value)
    assert "venue.rest_url: 'ftp://x' found: must start with http:// or https://" in str(info.value)


def test_secrets_in_the_config_file_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, '[credentials]\napi_key = "abc"\napi_secret = "def"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    text = str(info.value)
    assert "credentials.api_key" in text
    assert "abc" not in text
    assert "def" not in text


def test_secrets_from_environment_are_redacted(tmp_path: Path) -> None:
    env = {"PYQUANT_API_KEY": "KEY123", "PYQUANT_API_SECRET": "SECRET456"}
    config = load_config(None, environ=env)
    assert config.credentials.api_key == Secret("KEY123")
    assert config.credentials.api_secret is not None
    assert config.credentials.api_secret.reveal() == "SECRET456"
    shown = repr(config) + str(config.redacted())
    assert "KEY123" not in shown
    assert "SECRET456" not in shown
    assert config.redacted()["credentials"]["api_key"] == "********"


def test_secrets_file_must_be_owner_only(tmp_path: Path) -> None:
    secrets = write(tmp_path, 'api_key = "FILEKEY"\napi_secret = "FILESECRET"\n', "keys.toml")
    path = write(tmp_path, f'[credentials]\nfile = "{secrets}"\n')
    os.chmod(secrets, 0o644)
    with pytest.raises(ConfigError, match="must be readable by its owner only"):
        load_config(path, environ={})
    os.chmod(secrets, 0o600)
    config = load_config(path, environ={})
    assert config.credentials.api_key == Secret("FILEKEY")


def test_http_intake_needs_a_token(tmp_path: Path) -> None:
    path = write(tmp_path, "[sources]\nhttp_port = 8099\n")
    with pytest.raises(ConfigError, match="bearer token"):
        load_config(path, environ={})
    with pytest.raises(ConfigError, match="at least 16 characters"):
        load_config(path, environ={"PYQUANT_HTTP_TOKEN": "tok"})
    config = load_config(path, environ={"PYQUANT_HTTP_TOKEN": "tok-of-16-chars!"})
    assert config.sources.http_token == Secret("tok-of-16-chars!")


def test_cli_overrides_win(tmp_path: Path) -> None:
    path = write(tmp_path, "[sim]\nspeed = 5\n")
    config = load_config(
        path, environ={"PYQUANT__SIM__SPEED": "10"}, overrides={"sim": {"speed": 20.0}}
    )
    assert config.sim.speed == 20.0


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(AttributeError):
        config.exchange = "mainnet"  # type: ignore[misc]


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", environ={})


def test_exit_policy_from_preset_with_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, '[exit]\npreset = "standard"\ntrail_pct = 0.02\n')
    policy = load_config(path, environ={}).exit_policy()
    fields = policy.to_dict()
    assert fields["trail_pct"] == 0.02
    assert fields["ladder_unit"] == "pct"  # the rest comes from the preset


def test_exit_policy_errors_come_from_the_core(tmp_path: Path) -> None:
    from pyquant.errors import PolicyError

    path = write(tmp_path, '[exit]\npreset = "standard"\ntrail_pct = -1\n')
    config = load_config(path, environ={})  # Python does not keep a second copy of the rules
    with pytest.raises(PolicyError, match="trail_pct"):
        config.exit_policy()


def test_exit_overrides_from_the_environment_keep_the_preset() -> None:
    config = load_config(None, environ={"PYQUANT__EXIT__TRAIL_PCT": "0.02"})
    fields = config.exit_policy().to_dict()
    assert fields["trail_pct"] == 0.02
    assert fields["max_margin_loss"] == 0.1  # from the standard preset


def test_unknown_preset_names_the_setting(tmp_path: Path) -> None:
    path = write(tmp_path, '[exit]\npreset = "yolo"\n')
    with pytest.raises(ConfigError, match=r"exit\.preset: 'yolo' found"):
        load_config(path, environ={}).exit_policy()


def test_the_documented_example_config_loads(tmp_path: Path) -> None:
    import pyquant.config

    doc = pyquant.config.__doc__ or ""
    block = doc.split("An example")[1].split("::\n\n", 1)[1].split("\nValidation")[0]
    path = write(tmp_path, "\n".join(line[4:] for line in block.splitlines()))
    env = {
        "PYQUANT_API_KEY": "k" * 8,
        "PYQUANT_API_SECRET": "s" * 8,
        "PYQUANT_HTTP_TOKEN": "t" * 20,
    }
    config = load_config(path, environ=env)
    assert config.exchange == "testnet"
    assert config.rest_url == "https://demo-fapi.binance.com"
    assert config.exit_policy().to_dict()["trail_pct"] == 0.02


def test_websocket_routes_defaults_and_overrides(tmp_path: Path) -> None:
    """Contract 1.1/2.5: the testnet's routes are unconfirmed, so each URL is configurable and
    the legacy host is the fallback; "none" disables the fallback."""
    env = {"PYQUANT_API_KEY": "k" * 64, "PYQUANT_API_SECRET": "s" * 64}
    testnet = load_config(write(tmp_path, 'exchange = "testnet"\n'), environ=env)
    assert testnet.ws_url == "wss://fstream.binancefuture.com/market"
    assert testnet.user_ws_url == "wss://fstream.binancefuture.com/private"
    assert testnet.legacy_ws_url == "wss://fstream.binancefuture.com"
    custom = load_config(
        write(
            tmp_path,
            'exchange = "testnet"\n[venue]\nws_url = "wss://a.example/market"\n'
            'user_ws_url = "wss://a.example/private"\nlegacy_ws_url = "none"\n',
        ),
        environ=env,
    )
    assert (custom.ws_url, custom.user_ws_url, custom.legacy_ws_url) == (
        "wss://a.example/market",
        "wss://a.example/private",
        "",
    )
    with pytest.raises(ConfigError, match=r"venue\.legacy_ws_url: 'http://x' found: must start"):
        load_config(write(tmp_path, '[venue]\nlegacy_ws_url = "http://x"\n'), environ=env)
