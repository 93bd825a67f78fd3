"""`pyquant backtest` end to end on a real 1m file: files written, table printed, errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import polars as pl
import pytest
from backtest_helpers import INFO

from pyquant.backtest import load_klines, run_backtest
from pyquant.backtest.cli import run_command
from pyquant.cli import main
from pyquant.errors import UnknownSymbolError

MARKET = Path(__file__).parents[1] / "data" / "market"
BCH = MARKET / "BCHUSDT_1m_last.parquet"
PNG = b"\x89PNG\r\n\x1a\n"


def test_backtest_writes_every_output(tmp_path, capsys):
    policy = tmp_path / "policy.toml"
    policy.write_text(
        "[exit]\nstop_atr = 2.0\nmax_margin_loss = 0.1\nbreakeven_after_level = 1\n"
        "trail_atr = 2.0\ntrail_activate_r = 2.0\nmax_hold_ms = 14400000\n"
        "ladder = [{at = 1.0, fraction = 0.5}, {at = 2.0, fraction = 0.5}]\n"
    )
    out = tmp_path / "run"
    # a week of real 1m bars: enough for every output, small enough for a quick chart
    data = tmp_path / "BCHUSDT_1m_week.parquet"
    pl.read_parquet(BCH).head(7 * 1440).write_parquet(data)
    status = main(
        [
            "backtest",
            "--data",
            str(data),
            "--exchange-info",
            str(INFO),
            "--policy",
            str(policy),
            "--fees",
            "0.0002,0.0004",
            "--out",
            str(out),
            "--plot",
        ]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert "BCHUSDT" in printed
    assert "TOTAL" in printed
    assert "exits by reason" in printed

    fills = pl.read_parquet(out / "trades.parquet")
    for name in ("reason", "price", "quantity", "fee", "pnl", "r", "time"):
        assert name in fills.columns
    assert fills.schema["price"] == pl.Decimal(38, 12)
    assert set(fills["kind"]) == {"entry", "exit"}
    exits = fills.filter(pl.col("kind") == "exit")
    assert set(exits["reason"]) <= {
        "stop_loss",
        "breakeven_stop",
        "trailing_stop",
        "time_stop",
        "take_profit_1",
        "take_profit_2",
        "end_of_data",
    }
    # every position closes exactly what it opened
    opened = fills.filter(pl.col("kind") == "entry").group_by("trade").agg(pl.col("quantity").sum())
    closed = exits.group_by("trade").agg(pl.col("quantity").sum())
    assert opened.sort("trade").equals(closed.sort("trade"))
    # taker 0.0004 on every exit, exact to 8 decimals
    row = exits.row(0, named=True)
    assert row["fee"] == (row["price"] * row["quantity"] * 4 / 10_000).quantize(
        type(row["fee"])("0.00000001")
    )

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["summary"]) == {"BCHUSDT", "TOTAL"}
    total = summary["summary"]["TOTAL"]
    assert total["trades"] == pl.read_parquet(out / "positions.parquet").height > 0
    assert summary["config"]["taker_fee"] == "0.0004"
    assert summary["skipped_entries"]["position_open"] > 0
    for png in ("equity.png", "BCHUSDT.png"):
        assert (out / png).read_bytes()[:8] == PNG


def test_grid_writes_a_sorted_table_and_a_heat_map(tmp_path, capsys):
    out = tmp_path / "grid"
    status = run_command(
        "backtest",
        [
            "--data",
            str(BCH),
            "--exchange-info",
            str(INFO),
            "--preset",
            "challenge",
            "--grid",
            "stop_atr=1.5,2.5",
            "--grid",
            "trail_atr=1,2,3",
            "--sort-by",
            "profit_factor",
            "--out",
            str(out),
        ],
    )
    assert status == 0
    table = pl.read_parquet(out / "grid.parquet")
    assert table.height == 6
    factors = table["profit_factor"].drop_nulls().to_list()
    assert factors == sorted(factors, reverse=True)
    assert (out / "heatmap.png").read_bytes()[:8] == PNG
    assert "6 combinations x 1 symbols" in capsys.readouterr().out


def test_bad_input_exits_2_with_the_reason(tmp_path, capsys):
    broken = tmp_path / "BTCUSDT_1m.parquet"
    pl.read_parquet(BCH).head(100).drop("close").write_parquet(broken)
    status = run_command(
        "backtest", ["--data", str(broken), "--exchange-info", str(INFO), "--out", str(tmp_path)]
    )
    assert status == 2
    assert "missing column 'close'" in capsys.readouterr().err

    status = run_command(
        "backtest",
        [
            "--data",
            str(BCH),
            "--exchange-info",
            str(INFO),
            "--grid",
            "stop_atx=1,2",
            "--out",
            str(tmp_path),
        ],
    )
    assert status == 2
    assert "stop_atx" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--fees", "0.1"], ["--notional", "lots"]])
def test_bad_options(tmp_path, capsys, argv):
    status = run_command(
        "backtest",
        ["--data", str(BCH), "--exchange-info", str(INFO), "--out", str(tmp_path), *argv],
    )
    assert status == 2
    assert argv[0] in capsys.readouterr().err


def _bch_head(tmp_path: Path, symbol: str = "BCHUSDT", rows: int = 3000) -> Path:
    path = tmp_path / f"{symbol}_1m_head.parquet"
    frame = pl.read_parquet(BCH).head(rows).with_columns(pl.lit(symbol).alias("symbol"))
    frame.write_parquet(path)
    return path


def test_exchange_info_defaults_to_the_snapshot_bundled_with_the_simulator(tmp_path, capsys):
    out = tmp_path / "run"
    data = _bch_head(tmp_path)
    assert run_command("backtest", ["--data", str(data), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"]["exchange_info"] == "the bundled exchangeInfo_fapi_2025-11-26.json.gz"
    assert summary["summary"]["TOTAL"]["trades"] > 0
    # the same run with the full snapshot from tests/data gives the same trades
    again = tmp_path / "again"
    argv = ["--data", str(data), "--exchange-info", str(INFO), "--out", str(again)]
    assert run_command("backtest", argv) == 0
    assert pl.read_parquet(out / "trades.parquet").equals(pl.read_parquet(again / "trades.parquet"))
    assert json.loads((again / "summary.json").read_text())["inputs"]["exchange_info"] == str(INFO)


def test_a_symbol_missing_from_the_exchange_info_is_named(tmp_path, capsys):
    data = _bch_head(tmp_path, "FOOUSDT")
    status = run_command("backtest", ["--data", str(data), "--out", str(tmp_path / "out")])
    assert status == 2
    err = capsys.readouterr().err
    assert (
        "symbol FOOUSDT not in the exchange info (the bundled "
        "exchangeInfo_fapi_2025-11-26.json.gz, 647 symbols)"
    ) in err
    assert "--exchange-info FILE" in err
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_exchange_info_override_plain_or_gzipped(tmp_path, capsys):
    document = json.loads(INFO.read_bytes())
    # a document without BCHUSDT: the override is really what the run uses
    document["symbols"] = [s for s in document["symbols"] if s["symbol"] != "BCHUSDT"]
    plain = tmp_path / "info.json"
    plain.write_text(json.dumps(document))
    data = _bch_head(tmp_path)
    argv = ["--data", str(data), "--exchange-info", str(plain), "--out", str(tmp_path / "o")]
    assert run_command("backtest", argv) == 2
    assert f"symbol BCHUSDT not in the exchange info ({plain}, 646 symbols)" in (
        capsys.readouterr().err
    )

    packed = tmp_path / "info.json.gz"
    packed.write_bytes(gzip.compress(INFO.read_bytes()))
    argv = ["--data", str(data), "--exchange-info", str(packed), "--out", str(tmp_path / "o")]
    assert run_command("backtest", argv) == 0

    missing = tmp_path / "nope.json"
    argv = ["--data", str(data), "--exchange-info", str(missing), "--out", str(tmp_path / "o")]
    assert run_command("backtest", argv) == 2
    assert f"exchange info {missing}: cannot be read" in capsys.readouterr().err


def test_python_api_uses_the_bundled_rules_when_none_are_given(rules, example_policy):
    klines = load_klines(BCH)[0].head(3000)
    default = run_backtest(klines, example_policy)
    explicit = run_backtest(klines, example_policy, rules)
    assert default.fills.height > 0
    assert default.fills.equals(explicit.fills)
    unknown = klines.with_columns(pl.lit("FOOUSDT").alias("symbol"))
    with pytest.raises(UnknownSymbolError, match="symbol FOOUSDT not in the exchange info"):
        run_backtest(unknown, example_policy)


def test_without_matplotlib_the_tables_are_written_and_plot_is_refused(tmp_path):
    # matplotlib is an extra: `pip install .` alone must still backtest.
    import subprocess
    import sys

    data = tmp_path / "BCHUSDT_1m_day.parquet"
    pl.read_parquet(BCH).head(1440).write_parquet(data)
    script = (
        "import sys\n"
        "sys.modules['matplotlib'] = None  # import matplotlib -> ImportError\n"
        "from pyquant.backtest.cli import run_command\n"
        f"args = ['--data', {str(data)!r}, '--out', {str(tmp_path / 'out')!r}]\n"
        "assert run_command('backtest', args) == 0\n"
        "sys.exit(run_command('backtest', [*args, '--plot']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 2, done.stderr
    assert "--plot needs matplotlib" in done.stderr
    assert "equity.png skipped: matplotlib is not installed" in done.stdout
    assert (tmp_path / "out" / "trades.parquet").exists()
    assert (tmp_path / "out" / "summary.json").exists()
    assert not (tmp_path / "out" / "equity.png").exists()
