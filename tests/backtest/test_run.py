"""The backtest through the Rust exit engine: the worked example, intrabar order, gaps, grid."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest
from backtest_helpers import EXAMPLE_POLICY, MINUTE, T0, long_entry, synthetic_klines

from pyquant import _core
from pyquant import backtest as bt
from pyquant.backtest import running as bt_running
from pyquant.errors import ConfigError, PolicyError

ENTRY_BAR = T0 + 20 * MINUTE
MARKET = Path(__file__).parents[1] / "data" / "market"


def _fills(result: bt.BacktestResult) -> list[tuple[str, str, str]]:
    return [
        (r["reason"], f"{r['quantity']:f}".rstrip("0"), f"{r['price']:f}".rstrip("0"))
        for r in result.fills.iter_rows(named=True)
    ]


def test_worked_example_one_jump_to_take_profit_3(rules, example_policy):
    klines = synthetic_klines(
        [(30000.0, 30130.0, 29990.0, 30130.0), (30370.0, 30380.0, 30360.0, 30370.0)]
    )
    result = bt.run_backtest(
        bt.validate_klines(klines),
        example_policy,
        rules,
        entries=long_entry(ENTRY_BAR),
        detail=True,
    )
    assert _fills(result) == [
        ("entry", "0.01", "30000."),
        ("take_profit_1", "0.003", "30120."),
        ("take_profit_3", "0.007", "30370."),
    ]
    trade = result.trades.row(0, named=True)
    assert trade["initial_stop"] == Decimal("29880.0")
    assert trade["risk_price"] == Decimal("120.0")
    assert trade["fees"] == Decimal("0.301475")  # 0.15 + 0.04518 + 0.106295
    assert trade["pnl"] == Decimal("2.648525")  # 0.36 + 2.59 - fees
    assert trade["r_multiple"] == pytest.approx(2.648525 / 1.2)
    assert result.levels["price"].to_list() == [30120.0, 30240.0, 30360.0]
    assert result.fills["trigger_price"].to_list()[1:] == [Decimal("30120.0"), Decimal("30360.0")]
    total = result.summary.filter(pl.col("symbol") == "TOTAL").row(0, named=True)
    assert total["trades"] == 1
    assert total["win_rate"] == 1.0
    assert total["profit_factor"] is None  # no losing trade
    assert total["exits_take_profit_1"] == 1
    assert total["exits_take_profit_3"] == 1


def test_worked_example_ratchet_stop(rules, example_policy):
    klines = synthetic_klines(
        [
            (30000.0, 30130.0, 29990.0, 30130.0),
            (30130.0, 30250.0, 30130.0, 30250.0),
            (30250.0, 30250.0, 29990.0, 29990.0),
        ]
    )
    result = bt.run_backtest(
        klines, example_policy, rules, entries=long_entry(ENTRY_BAR), detail=True
    )
    assert _fills(result) == [
        ("entry", "0.01", "30000."),
        ("take_profit_1", "0.003", "30120."),
        ("take_profit_2", "0.003", "30240."),
        ("ratchet_stop", "0.004", "30120."),
    ]
    assert result.stops["stop"].to_list() == [30030.0, 30120.0]


@pytest.mark.parametrize(
    ("intrabar", "expected"),
    [
        ("stop_first", [("stop_loss", "0.01", "29880.")]),
        (
            "target_first",
            [("take_profit_1", "0.003", "30120."), ("breakeven_stop", "0.007", "30030.")],
        ),
    ],
)
def test_intrabar_rule(rules, example_policy, intrabar, expected):
    klines = synthetic_klines([(30000.0, 30200.0, 29800.0, 30000.0)])
    config = bt.BacktestConfig(intrabar=intrabar)
    result = bt.run_backtest(
        klines, example_policy, rules, entries=long_entry(ENTRY_BAR), config=config
    )
    assert _fills(result)[1:] == expected


def test_finer_data_resolves_the_bar(rules):
    policy = _core.ExitPolicy(**{**EXAMPLE_POLICY, "atr_interval": "2m"})
    klines = synthetic_klines(
        [(30000.0, 30200.0, 29800.0, 30000.0)], interval="2m", step=2 * MINUTE
    )
    start = T0 + 40 * MINUTE
    fine = pl.DataFrame(
        {
            "open_time": [start, start + MINUTE],
            "open": [30000.0, 30150.0],
            "high": [30200.0, 30150.0],
            "low": [30000.0, 29800.0],
            "close": [30150.0, 30000.0],
            "volume": [1.0, 1.0],
            "symbol": ["BTCUSDT"] * 2,
            "interval": ["1m"] * 2,
        }
    )
    result = bt.run_backtest(
        klines, policy, rules, entries=long_entry(start), fine={"BTCUSDT": bt.validate_klines(fine)}
    )
    assert [r[0] for r in _fills(result)] == ["entry", "take_profit_1", "breakeven_stop"]


def test_gap_is_not_bridged(rules, example_policy):
    klines = synthetic_klines([(30000.0, 30010.0, 29990.0, 30005.0)])
    later = klines.tail(5).with_columns(pl.col("open_time") + 3_600_000)
    klines = pl.concat([klines, later])
    entries = pl.concat([long_entry(ENTRY_BAR), long_entry(ENTRY_BAR + 1_800_000)])
    result = bt.run_backtest(klines, example_policy, rules, entries=entries)
    assert [r[0] for r in _fills(result)] == ["entry", "data_gap"]
    assert result.fills["price"][1] == Decimal("30005.0")  # the last close before the gap
    assert result.skipped.select("reason", "count").to_dicts() == [{"reason": "no_bar", "count": 1}]


def test_grid_shape_and_order(rules):
    klines = [
        synthetic_klines([(30000.0, 30200.0, 29800.0, 30000.0)] * 5),
        synthetic_klines([(30000.0, 30130.0, 29990.0, 30130.0)] * 5, symbol="ETHUSDT"),
    ]
    entries = pl.concat(
        [long_entry(ENTRY_BAR), long_entry(ENTRY_BAR, symbol="ETHUSDT", size_usd="3000")]
    )
    grid = bt.parse_grid(["stop_atr=1,2,3", "ratchet_to_previous_level=true,false"])
    base = {k: v for k, v in EXAMPLE_POLICY.items() if k not in grid}
    table = bt.run_grid(klines, base, grid, rules, entries=entries, sort_by="net_pnl")
    assert table.height == 6
    assert table.columns[:3] == ["policy", "stop_atr", "ratchet_to_previous_level"]
    assert sorted(zip(table["stop_atr"], table["ratchet_to_previous_level"], strict=True)) == [
        (1, False),
        (1, True),
        (2, False),
        (2, True),
        (3, False),
        (3, True),
    ]
    pnl = table["net_pnl"].to_list()
    assert pnl == sorted(pnl, reverse=True)
    assert (table["trades"] == 2).all()


def test_grid_errors(rules):
    klines = [synthetic_klines([(30000.0, 30010.0, 29990.0, 30000.0)])]
    with pytest.raises(PolicyError, match="stop_atrr"):
        bt.run_grid(klines, {}, {"stop_atrr": [1.0]}, rules, entries=long_entry(ENTRY_BAR))
    with pytest.raises(ConfigError, match="sort metric 'sharpe' is unknown"):
        bt.run_grid(
            klines, {}, {"stop_atr": [1.0]}, rules, entries=long_entry(ENTRY_BAR), sort_by="sharpe"
        )


def test_input_errors(rules, example_policy):
    btc = synthetic_klines([])
    with pytest.raises(bt.KlinesError, match="BTCUSDT is given twice"):
        bt.run_backtest([btc, btc], example_policy, rules)
    other = synthetic_klines([], symbol="ETHUSDT", interval="5m", step=5 * MINUTE)
    with pytest.raises(bt.KlinesError, match="share an interval"):
        bt.run_backtest([btc, other], example_policy, rules)
    with pytest.raises(KeyError, match="NOPEUSDT"):
        bt.run_backtest(synthetic_klines([], symbol="NOPEUSDT"), example_policy, rules)
    five_minutes = synthetic_klines([], interval="5m", step=5 * MINUTE)
    with pytest.raises(
        PolicyError, match="atr_interval 60000ms must be a multiple of the backtest data interval"
    ):
        bt.run_backtest(five_minutes, example_policy, rules)
    with pytest.raises(ConfigError, match="strategy 'meanrev' is unknown"):
        bt.run_backtest(btc, example_policy, rules, strategy="meanrev")


def test_exit_decisions_for_path_is_the_backtest_half_of_the_consistency_check(
    rules, example_policy
):
    decisions = bt.exit_decisions_for_path(
        rules,
        example_policy,
        symbol="BTCUSDT",
        side="LONG",
        quantity="0.010",
        entry_price="30000.0",
        marks=[(1, "30125.0"), (2, "30130.0"), (3, "30370.0")],
        atr=60.0,
        leverage=10,
    )
    assert [(d["reason"], d["side"], d["quantity"], d["trigger_price"]) for d in decisions] == [
        ("take_profit_1", "SELL", "0.003", "30120.0"),
        ("take_profit_3", "SELL", "0.007", "30360.0"),
    ]
    ratchet = bt.exit_decisions_for_path(
        rules,
        example_policy,
        symbol="BTCUSDT",
        side="LONG",
        quantity="0.010",
        entry_price="30000.0",
        marks=[(1, "30125.0"), (2, "30250.0"), (3, "29990.0")],
        atr=60.0,
        leverage=10,
    )
    assert [(d["reason"], d["quantity"], d["trigger_price"]) for d in ratchet][-1] == (
        "ratchet_stop",
        "0.004",
        "30120.0",
    )


def test_summarize_metrics_by_hand():
    fills = pl.DataFrame(
        {
            "policy": [0] * 6,
            "symbol": ["A"] * 4 + ["B"] * 2,
            "trade": [0, 0, 1, 1, 0, 0],
            "sequence": [0, 1, 0, 1, 0, 1],
            "kind": ["entry", "exit"] * 3,
            "reason": ["entry", "take_profit_1", "entry", "stop_loss", "entry", "stop_loss"],
            "time_ms": [1, 2, 3, 4, 5, 6],
            "pnl": [-1.0, 31.0, -1.0, -9.0, -1.0, -19.0],
        }
    )
    trades = pl.DataFrame(
        {
            "policy": [0, 0, 0],
            "symbol": ["A", "A", "B"],
            "trade": [0, 1, 0],
            "pnl": [30.0, -10.0, -20.0],
            "fees": [2.0, 2.0, 2.0],
            "r_multiple": [3.0, -1.0, -1.0],
        }
    )
    summary = bt.summarize(fills, trades)
    a, b, total = summary.to_dicts()
    assert (a["symbol"], a["trades"], a["win_rate"], a["profit_factor"]) == ("A", 2, 0.5, 3.0)
    assert a["expectancy_r"] == 1.0
    assert a["max_drawdown"] == 10.0  # equity -1, 30, 29, 20: peak 30 -> 20
    assert (b["symbol"], b["win_rate"], b["profit_factor"], b["max_drawdown"]) == (
        "B",
        0.0,
        0.0,
        20.0,
    )
    assert total["symbol"] == "TOTAL"
    assert total["trades"] == 3
    assert total["profit_factor"] == 1.0
    assert total["expectancy_r"] == pytest.approx(1 / 3)
    assert total["max_drawdown"] == 30.0  # peak 30 at t=2, trough 0 at t=6
    assert (total["exits_stop_loss"], total["exits_take_profit_1"]) == (2, 1)


@pytest.mark.parametrize("preset", ["standard", "challenge", None])
def test_skipping_quiet_marks_changes_no_decision(rules, preset):
    # The driver skips marks that provably change nothing in the state machine; feeding every
    # mark (exhaustive) must give the very same fills on real data.
    [frame] = bt.load_klines(MARKET / "ETHUSDT_1m_last.parquet")
    frame = frame.head(20_000)
    policy = (
        _core.ExitPolicy.preset(preset)
        if preset
        else _core.ExitPolicy(**{**EXAMPLE_POLICY, "max_hold_ms": 3_600_000})
    )
    intents, one = bt_running._entries_for([frame], None, None)
    series = bt_running._prepare_series(frame, intents, None)
    options = bt_running._core_options(bt.BacktestConfig(), one, detail=True)
    fast = _core.backtest_run([series.arrays], [policy], rules, **options)
    slow = _core.backtest_run([series.arrays], [policy], rules, **options, exhaustive=True)
    assert fast["evaluations"] == slow["evaluations"] > 1000
    for column in ("reason_code", "time_ms", "price_exact", "quantity_exact", "pnl_exact"):
        assert list(fast["fills"][column]) == list(slow["fills"][column])


def test_config_takes_plain_numbers_and_keeps_them_exact():
    config = bt.BacktestConfig(notional_usd=1000, taker_fee=0.0004, maker_fee="0.0001")
    assert config.notional_usd == Decimal(1000)
    assert config.taker_fee == Decimal("0.0004")  # a float by its shortest repr
    assert config.maker_fee == Decimal("0.0001")
    for field, value, rule in [
        ("notional_usd", "lots", "must be a decimal number"),
        ("taker_fee", True, "must be a decimal number"),
        ("notional_usd", -5, "must be a positive USDT amount"),
        ("taker_fee", "1.5", "must be a rate in [0, 1)"),
    ]:
        with pytest.raises(ConfigError) as caught:
            bt.BacktestConfig(**{field: value})
        message = str(caught.value)
        assert message.startswith(f"backtest {field} was ")
        assert message.endswith(rule)
        assert str(value) in message


def test_a_stop_past_the_liquidation_price_is_flagged(rules):
    klines = synthetic_klines([(30000.0, 30030.0, 29970.0, 30000.0)] * 3)
    wide = _core.ExitPolicy(max_stop_pct=0.15, fallback_stop_pct=0.15)
    entry = long_entry(ENTRY_BAR).with_columns(pl.lit(20, dtype=pl.Int64).alias("leverage"))
    result = bt.run_backtest(klines, wide, rules, entries=entry)
    assert result.warnings == [
        "at leverage 20 an initial stop may lie 15.00% from the entry, past the liquidation "
        "price (about 4.60% away): the exchange liquidates such a position first (its margin "
        "and a liquidation fee), which the backtest does not model; set max_margin_loss "
        "(e.g. 0.5) or lower the leverage"
    ]
    # the margin-loss cap keeps every stop inside: nothing to say
    capped = _core.ExitPolicy(max_stop_pct=0.15, fallback_stop_pct=0.15, max_margin_loss=0.5)
    assert bt.run_backtest(klines, capped, rules, entries=entry).warnings == []
    # entries without a leverage use the configured one
    low = bt.BacktestConfig(leverage=3)
    assert bt.liquidation_warnings(wide, [3]) == []
    assert (
        bt.run_backtest(
            klines,
            wide,
            rules,
            entries=long_entry(ENTRY_BAR).with_columns(
                pl.lit(None, dtype=pl.Int64).alias("leverage")
            ),
            config=low,
        ).warnings
        == []
    )
