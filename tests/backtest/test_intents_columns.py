"""load_intents reads plain lines as columns: the same intents and errors as line by line.

The reference is the per-line reader (``parse_intent`` on each ``json.loads``), which every
line that is not plain, and every plain line the column checks refuse, still goes through.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyquant import _core
from pyquant import backtest as bt
from pyquant.backtest import loading as bt_loading

T = 1_700_000_000_000

# The plain shape, as regular expressions: the reference the core's scanner
# (rust_core/src/intents.rs) is held to. An object of the known fields only, strings of
# printable ASCII without quotes or escapes, numbers without a sign, null only where it
# means "not given".
PLAIN_STRING = r'"[ !#-\[\]-~]*"'
# (bounded: polars refuses a number beyond a double's range, json.loads reads it as inf)
PLAIN_NUMBER = r"(?:0|[1-9][0-9]{0,29})(?:\.[0-9]{1,30})?(?:[eE][+-]?[0-9]{1,2})?"
PLAIN_PAIR = (
    rf'"(?:id|symbol|side|source)"[ \t]*:[ \t]*{PLAIN_STRING}'
    rf'|"intent_id"[ \t]*:[ \t]*(?:{PLAIN_STRING}|{PLAIN_NUMBER})'
    rf'|"(?:created_at_ms)"[ \t]*:[ \t]*{PLAIN_NUMBER}'
    rf'|"(?:confidence|time|timestamp|ts|leverage)"[ \t]*:[ \t]*(?:{PLAIN_NUMBER}|null)'
    rf'|"(?:size_usd|position_size_usd|notional_usd)"[ \t]*:[ \t]*null'
)
PLAIN_OBJECT = rf"[ \t]*\{{[ \t]*(?:{PLAIN_PAIR})(?:[ \t]*,[ \t]*(?:{PLAIN_PAIR}))*[ \t]*\}}[ \t]*"
PLAIN_LINE = rf"^{PLAIN_OBJECT}$"
# The whole file, every line plain (the last one with or without its newline).
PLAIN_FILE = rf"\A(?:{PLAIN_OBJECT}\r?\n)*(?:{PLAIN_OBJECT})?\z"
KNOWN_KEYS = (
    "id",
    "intent_id",
    "symbol",
    "side",
    "source",
    "created_at_ms",
    "confidence",
    "time",
    "timestamp",
    "ts",
    "leverage",
    "size_usd",
    "position_size_usd",
    "notional_usd",
)
# A key twice on one line ("." stops at the line's end): json.loads keeps the last value,
# so such a line goes through parse_intent.
KEY_TWICE = "|".join(rf'"{key}"[ \t]*:.*"{key}"[ \t]*:' for key in KNOWN_KEYS)


def _reference(path: Path) -> pl.DataFrame:
    rows = [
        bt_loading._intent_row(path, number, line)
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
    ]
    return bt_loading._intent_frame([row for row in rows if row is not None])


def _outcome(load, path: Path) -> pl.DataFrame | str:
    try:
        return load(path)
    except bt.KlinesError as exc:
        return f"error: {exc}"


def _same(path: Path) -> pl.DataFrame | str:
    got, expected = _outcome(bt.load_intents, path), _outcome(_reference, path)
    if isinstance(expected, str):
        assert got == expected
    else:
        assert isinstance(got, pl.DataFrame), got
        assert got.schema == expected.schema
        assert got.to_dicts() == expected.to_dicts()
    return got


PLAIN = [
    {"id": "a-1", "time": T, "symbol": "BTCUSDT", "side": "BUY", "confidence": 0.7},
    {"time": T + 1, "symbol": "ethusdt", "side": "short", "confidence": 0.25},
    {"time": 1_700_000_002, "symbol": "SOLUSDT", "side": "LONG"},  # seconds, no confidence
    {"created_at_ms": T + 3, "time": 5, "symbol": "XRPUSDT", "side": "SELL", "leverage": 20},
    {"timestamp": 1.7e12, "symbol": "BTCUSDT", "side": "BUY", "confidence": 1, "leverage": 3.0},
    {"id": "x", "intent_id": 7, "time": T, "symbol": "BTCUSDT", "side": "BUY", "source": "s"},
    {"ts": 5, "timestamp": T + 9, "symbol": "DOGEUSDT", "side": "BUY", "confidence": None},
]

# Each is appended to the plain lines: a line the columns must get right, or send on.
TRICKY = [
    '{"time": 1700000000000, "symbol": "BTCUSDT", "side": "UP"}',
    '{"time": 1700000000000, "symbol": "B", "side": "BUY"}',
    '{"time": 1700000000000, "symbol": 55, "side": "BUY"}',
    '{"time": 1700000000000, "symbol": true, "side": "BUY"}',
    '{"time": 1700000000000, "symbol": "BTCUSDT", "side": "BUY", "side": "UP"}',
    '{"time": 1700000000000, "symbol": "BTCUSDT", "side": "UP", "side": "BUY"}',
    '{"symbol": "BTCUSDT", "side": "BUY"}',
    '{"ts": 1700000000000, "symbol": "BTCUSDT", "side": "BUY"}',
    '{"created_at_ms": null, "time": 1700000000000, "symbol": "BTCUSDT", "side": "BUY"}',
    '{"id": null, "time": 1700000000000, "symbol": "BTCUSDT", "side": "BUY"}',
    '{"id": 12, "time": 1700000000000, "symbol": "BTCUSDT", "side": "BUY"}',
    '{"id": "has space", "time": 1700000000000, "symbol": "BTCUSDT", "side": "BUY"}',
    '{"id": "' + "i" * 65 + '", "time": 1700000000000, "symbol": "BTCUSDT", "side": "BUY"}',
    '{"time": 1700000000000, "symbol": "BTCUSDT", "side": "BUY", "confidence": 1.5}',
    '{"time": 1700000000000, "symbol": "BTCUSDT", "side": "BUY", "confidence": -0.0}',
    '{"time": 1700000000000, "symbol": "BTCUSDT", "side": "BUY", "confidence": "0.7"}',
    '{"time": 1700000000000, "symbol": "BTCUSDT", "side": "BUY", "confidence": 1e999}',
    '{"time": 0.00001, "symbol": "BTCUSDT", "side": "BUY"}',
    '{"time": 253402300800000, "symbol": "BTCUSDT", "side": "BUY"}',
    '{"time": 99999999999.9, "symbol": "BTCUSDT", "side": "BUY"}',
    '{"time": "1700000000000", "symbol": "BTCUSDT", "side": "BUY"}',
    '{"time": 1700000000000, "symbol": "BTCUSDT", "side": "BUY", "leverage": 126}',
    '{"time": 1700000000000, "symbol": "BTCUSDT", "side": "BUY", "leverage": 2.5}',
    '{"time": 1700000000000, "symbol": "BTCUSDT", "side": "BUY", "leverage": 0}',
    '{"time": 1700000000000, "symbol": "BTCUSDT", "side": "BUY", "size_usd": 250.123456789}',
    '{"time": 1700000000000, "symbol": "BTCUSDT", "side": "BUY", "size_usd": "1e3"}',
    '{"time": 1700000000000, "symbol": "BTCUSDT", "side": "BUY", "size_usd": null}',
    '{"time": 1700000000000, "symbol": "BTCUSDT", "side": "BUY", "note": [1, 2]}',
    '{"time": 1700000000000, "symbol": "BTC\\u0055SDT", "side": "BUY"}',
    '{"time": 1700000000000, "symbol": "BTCUSDT", "side": "BUY"',
    "[1, 2]",
    "   ",
    "# a comment",
    '  {"time":1700000000000,"symbol":"BTCUSDT","side":"BUY"}\t',
]


@pytest.mark.parametrize("tricky", TRICKY)
@pytest.mark.parametrize("ending", ["\n", "\r\n"])
def test_columns_give_what_parse_intent_gives(tmp_path, tricky, ending):
    path = tmp_path / "intents.jsonl"
    lines = [json.dumps(p) for p in PLAIN]
    path.write_text(ending.join([*lines[:3], tricky, *lines[3:]]) + ending, encoding="utf-8")
    _same(path)


def test_a_plain_file_is_read_whole(tmp_path):
    path = tmp_path / "intents.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in PLAIN), encoding="utf-8")  # no final \n
    frame = _same(path)
    assert isinstance(frame, pl.DataFrame)
    assert frame.height == len(PLAIN)
    assert sorted(frame["intent_id"].to_list()) == sorted(
        ["a-1", "line-2", "line-3", "line-4", "line-5", "x", "line-7"]
    )


@pytest.mark.parametrize("brk", ["\u2028", "\x85", "\x0b", "\x1e", "\r"])
def test_other_line_breaks_number_lines_as_splitlines_does(tmp_path, brk):
    path = tmp_path / "intents.jsonl"
    good = json.dumps(PLAIN[0])
    path.write_bytes((good + brk + '{"time": 1, "symbol": "BTCUSDT", "side": "UP"}\n').encode())
    assert _same(path) == (
        f"error: {path}:2: intent field 'side' was 'UP': must be BUY or SELL (LONG or SHORT)"
    )


def test_numbers_beyond_a_double_take_the_line_path(tmp_path):
    path = tmp_path / "intents.jsonl"
    digits = "9" * 400
    path.write_text(
        json.dumps(PLAIN[0]) + "\n"
        f'{{"time": 1700000000000, "symbol": "BTCUSDT", "side": "BUY", "confidence": 0.{digits}}}\n'
        f'{{"time": 1700000000000, "symbol": "BTCUSDT", "side": "BUY", "leverage": {digits}}}\n'
    )
    assert str(_same(path)).startswith(f"error: {path}:3: intent field 'leverage'")


@pytest.mark.parametrize("content", ["", "\n\n", "# only a comment\n", "  \r\n"])
def test_a_file_without_intents_gives_an_empty_frame(tmp_path, content):
    path = tmp_path / "intents.jsonl"
    path.write_bytes(content.encode())
    frame = _same(path)
    assert isinstance(frame, pl.DataFrame)
    assert frame.is_empty()


def test_intents_that_are_not_utf8_are_refused_by_name(tmp_path):
    path = tmp_path / "intents.jsonl"
    path.write_bytes(json.dumps(PLAIN[0]).encode() + b"\n\xff\xfe\n")
    with pytest.raises(bt.KlinesError, match=r"intents\.jsonl: intents are not UTF-8 text"):
        bt.load_intents(path)


def test_a_large_file_scanned_in_pieces_gives_what_parse_intent_gives(tmp_path):
    # Over a MiB: the core scans it in parallel pieces; tricky lines land in every piece.
    path = tmp_path / "intents.jsonl"
    plain = [json.dumps(p) for p in PLAIN]
    line_path = [  # valid intents that are not plain, and lines without an intent
        '{"time": 1700000000000, "symbol": "BTCUSDT", "side": "BUY", "size_usd": 250.5}',
        '{"time": 1700000000000, "symbol": "BTC\\u0055SDT", "side": "BUY"}',
        '{"time": 1700000000000, "symbol": "BTCUSDT", "side": "UP", "side": "BUY"}',
        "# a comment",
        "   ",
    ]
    lines = [
        line_path[i % len(line_path)] if i % 97 == 0 else plain[i % len(plain)]
        for i in range(16_000)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert path.stat().st_size > 1 << 20
    frame = _same(path)
    assert isinstance(frame, pl.DataFrame)
    assert frame.height == len(lines) - 2 * len(range(0, 16_000, 97 * 5))


_PIECES = st.sampled_from(
    [
        *(f'"{k}"' for k in KNOWN_KEYS),
        '"other"',
        ":",
        ": ",
        ",",
        ", ",
        " ",
        "\t",
        "null",
        "0",
        "01",
        "7",
        "1.5",
        "1.",
        "2e5",
        "3E-12",
        "1e123",
        "-1",
        '"BTCUSDT"',
        '""',
        '"a b"',
        '"x\\"y"',
        '"\\u0041"',
        "true",
        "[]",
        "{",
        "}",
        "\u00e9",
    ]
)


@st.composite
def _near_plain_lines(draw):
    keys = draw(st.lists(st.sampled_from(KNOWN_KEYS), min_size=0, max_size=4))
    values = {
        k: draw(st.sampled_from(['"BTCUSDT"', '"i-1"', '""', "null", "0", "12.5", "1e3", "7"]))
        for k in keys
    }
    body = ", ".join(f'"{k}": {v}' for k, v in values.items())
    line = "{" + body + "}"
    if draw(st.booleans()):  # break it somewhere
        at = draw(st.integers(0, len(line)))
        line = line[:at] + draw(_PIECES) + line[at:]
    return draw(st.sampled_from(["", " ", "\t"])) + line + draw(st.sampled_from(["", " ", "\r"]))


@settings(max_examples=300, deadline=None)
@given(st.lists(_near_plain_lines(), min_size=1, max_size=8))
def test_the_scanner_finds_exactly_the_lines_the_grammar_calls_plain(lines):
    table, others, count = _core.scan_plain_intents("\n".join(lines).encode())
    assert count == len(lines)
    plain = [
        i
        for i, line in enumerate(lines)
        if re.search(PLAIN_LINE, line.removesuffix("\r")) and not re.search(KEY_TWICE, line)
    ]
    assert sorted(set(range(len(lines))) - set(others.tolist())) == plain
    rows = table.decode().splitlines()
    assert [int(r.split("\t")[0]) for r in rows] == plain
    for row in rows:
        number, *fields = row.split("\t")
        decoded = json.loads(lines[int(number)])
        # The core's columns are those load_intents reads the table with.
        for name, text in zip(
            bt_loading._PLAIN_SCHEMA,
            fields,
            strict=True,
        ):
            value = decoded.get(name)
            if value is None:
                assert text == "\x01", (name, row)
            elif isinstance(value, str):
                assert text == value
            else:
                assert float(text) == float(value)
