"""ExitPolicy: validation names field, value and rule; presets; TOML round trip."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

import pyquant
from pyquant import ExitPolicy


def test_kwargs_build_with_units() -> None:
    policy = ExitPolicy(
        stop_atr=2,
        max_margin_loss=0.1,
        ladder=[{"at": 1.0, "fraction": 0.3}, (2.0, 0.7)],
        breakeven_after_level=1,
        trail_pct=0.015,
        trail_after_level=2,
        max_hold_ms=3_600_000,
        atr_interval="5m",
    )
    assert policy.stop_atr == 2.0
    assert policy.ladder == [{"at": 1.0, "fraction": 0.3}, {"at": 2.0, "fraction": 0.7}]
    assert policy.ladder_unit == "R"
    assert policy.interval_ms == 300_000
    assert policy.to_dict()["max_hold_ms"] == 3_600_000


def test_capitalized_r_aliases() -> None:
    policy = ExitPolicy(
        trail_atr=1.0, trail_activate_R=2.0, max_hold_ms=1000, time_stop_unless_R=0.5
    )
    assert (policy.trail_activate_r, policy.time_stop_unless_r) == (2.0, 0.5)


@pytest.mark.parametrize(
    ("fields", "field", "rule"),
    [
        ({"stop_atr": -1.0}, "stop_atr", "must be in (0, 100]"),
        ({"min_stop_pct": float("nan")}, "min_stop_pct", "must be in"),
        ({"min_stop_pct": 0.02, "max_stop_pct": 0.01}, "max_stop_pct", "min_stop_pct"),
        ({"ladder": [(1.0, 0.6), (2.0, 0.5)]}, "ladder[1].fraction", "above 1"),
        ({"ladder": [(2.0, 0.5), (1.0, 0.5)]}, "ladder[1].at", "must be above"),
        ({"ladder": [(1.0,)]}, "ladder[0]", "(at, fraction)"),
        ({"ladder": [{"at": 1.0, "fraction": 0.5, "x": 1}]}, "ladder[0].x", "not a level field"),
        ({"breakeven_after_level": 1}, "breakeven_after_level", "ladder level"),
        ({"trail_atr": 1.0, "trail_pct": 0.01}, "trail_pct", "trail_atr"),
        ({"trail_activate_r": 1.0}, "trail_activate_r", "needs trail_atr or trail_pct"),
        ({"time_stop_unless_r": 1.0}, "time_stop_unless_r", "needs max_hold_ms"),
        ({"max_hold_ms": 0}, "max_hold_ms", "must be > 0"),
        ({"atr_interval": "7x"}, "atr_interval", "count"),
        ({"atr_period": 0}, "atr_period", "[1, 1000]"),
        ({"atr_period": 14.5}, "atr_period", "integer"),
        ({"ratchet_to_previous_level": "yes"}, "ratchet_to_previous_level", "true or false"),
        ({"stop_atr": True}, "stop_atr", "number"),
        ({"ladder_unit": "bps"}, "ladder_unit", '"R" or "pct"'),
        ({"stop_loss_pct": 0.01}, "stop_loss_pct", "not an ExitPolicy field"),
    ],
)
def test_each_field_is_validated(fields: dict[str, Any], field: str, rule: str) -> None:
    with pytest.raises(pyquant.PolicyError) as info:
        ExitPolicy(**fields)
    message = str(info.value)
    assert message.startswith(field + " "), message
    assert rule in message
    assert isinstance(info.value, ValueError)


def test_standard_preset() -> None:
    policy = ExitPolicy.preset("standard")
    assert policy.stop_atr is None
    assert (policy.max_margin_loss, policy.max_stop_pct) == (0.1, 0.1)
    assert policy.ladder_unit == "pct"
    assert [level["at"] for level in policy.ladder] == [0.015, 0.025, 0.04]
    assert sum(level["fraction"] for level in policy.ladder) <= 1.0
    assert (policy.breakeven_after_level, policy.trail_pct, policy.trail_activate_pct) == (
        1,
        0.015,
        0.04,
    )


def test_challenge_preset() -> None:
    policy = ExitPolicy.preset("challenge")
    assert (policy.stop_atr, policy.liq_buffer_pct, policy.trail_atr) == (2.0, 0.01, 2.0)
    assert policy.ladder == [{"at": 1.0, "fraction": 0.3}]
    assert (policy.breakeven_after_level, policy.trail_after_level) == (1, 1)
    assert (policy.max_hold_ms, policy.time_stop_unless_r) == (7_200_000, 1.0)
    with pytest.raises(pyquant.PolicyError, match="preset"):
        ExitPolicy.preset("aggressive")


@pytest.mark.parametrize("name", ["standard", "challenge"])
def test_toml_and_pickle_round_trip(name: str) -> None:
    policy = ExitPolicy.preset(name)
    assert ExitPolicy.from_toml(policy.to_toml()) == policy
    assert pickle.loads(pickle.dumps(policy)) == policy  # noqa: S301  # our own bytes
    assert ExitPolicy(**policy.to_dict()) == policy


def test_from_toml_text() -> None:
    policy = ExitPolicy.from_toml(
        """
        stop_atr = 2.0
        min_stop_pct = 0.003
        ladder = [
            { at = 1.0, fraction = 0.3 },
            { at = 2.0, fraction = 0.3 },
            { at = 3, fraction = 0.4 },
        ]
        breakeven_after_level = 1
        ratchet_to_previous_level = true
        trail_atr = 2.0
        trail_activate_R = 3.0
        """
    )
    assert policy.ratchet_to_previous_level is True
    assert policy.ladder[2] == {"at": 3.0, "fraction": 0.4}
    with pytest.raises(pyquant.PolicyError, match="toml"):
        ExitPolicy.from_toml("stop_atr = ")
    with pytest.raises(pyquant.PolicyError, match="unknown_field"):
        ExitPolicy.from_toml("unknown_field = 1")


def test_unknown_attribute() -> None:
    with pytest.raises(AttributeError, match="nothing"):
        _ = ExitPolicy().nothing
