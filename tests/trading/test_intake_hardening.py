"""No single input line stops the intake (issue 17, items 3, 4, 5, 6, 13).

Each case is an input that crashed or stopped a source, or slipped through, before: deep
nesting, a 5000-digit integer, an over-long stdin line whose tail was executed, an id with a
trailing newline, full-width digits and ``3_0_0`` as sizes, timestamps past SQLite's int64.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pyquant.errors import ConfigError
from pyquant.trading.guard import GuardDecision
from pyquant.trading.intents import Intent, IntentError, parse_intent
from pyquant.trading.journal import Store
from pyquant.trading.sources import (
    MAX_LINE_BYTES,
    HttpSource,
    LineSplitter,
    SourceStopped,
    check_intents_file,
    deliver,
    deliver_line,
    follow_jsonl,
    read_lines,
    supervise,
)

NOW = 1_700_000_000_000
TOKEN = "t0ken-with-enough-length"  # noqa: S105 - a test token
DEEP = "[" * 30000 + "]" * 30000
HUGE_INT = "1" * 5000


class StoreSink:
    """A sink that journals like the desk: decisions and malformed payloads in a Store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.submitted: list[Intent] = []

    async def submit(self, intent: Intent, *, payload: object = None) -> GuardDecision:
        self.submitted.append(intent)
        self.store.record_intent_decision(intent, "accepted", "accepted", payload=payload)
        return GuardDecision(True, "accepted", position_id=str(len(self.submitted)))

    def reject_malformed(self, source: str, payload: object, error: IntentError | str) -> None:
        self.store.record_malformed_intent(source, payload, "invalid", str(error))


def good(intent_id: str, **extra: object) -> str:
    fields: dict[str, object] = {
        "id": intent_id,
        "symbol": "BTCUSDT",
        "side": "BUY",
        "created_at_ms": NOW,
    }
    fields.update(extra)
    return json.dumps(fields)


def rejections(store: Store) -> list[dict[str, Any]]:
    return [row for row in store.intent_decisions() if row["decision"] == "rejected"]


# ---- item 3: one line never crashes or stops a source -----------------------------------------


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (DEEP, "nested too deeply"),
        ('{"id": "n", "symbol": "BTCUSDT", "side": "BUY", "size_usd": ' + HUGE_INT + "}", "digits"),
        (HUGE_INT, "digits"),
    ],
    ids=["deep-nesting", "5000-digit-size", "5000-digit-document"],
)
async def test_jsonl_bad_line_is_a_rejection_and_the_file_goes_on(
    tmp_path: Path, bad: str, why: str
) -> None:
    path = tmp_path / "intents.jsonl"
    path.write_text(bad + "\n" + good("after") + "\n")
    store = Store.open(":memory:")
    sink = StoreSink(store)
    assert await follow_jsonl(sink, path, follow=False, store=store, clock=lambda: NOW) == 2
    assert [i.intent_id for i in sink.submitted] == ["after"]
    (rejected,) = rejections(store)
    assert rejected["reason"] == "invalid"
    assert why in rejected["detail"]
    # The saved offset is past both lines: a restart neither crashes nor decides them again.
    assert await follow_jsonl(StoreSink(store), path, follow=False, store=store) == 0


async def test_api_payload_with_a_5000_digit_id_is_rejected_not_raised() -> None:
    store = Store.open(":memory:")
    sink = StoreSink(store)
    payload = {"id": 10**4999 + 1, "symbol": "BTCUSDT", "side": "BUY"}
    result = await deliver(sink, payload, source="api", clock=lambda: NOW)
    assert (result.accepted, result.reason, result.intent_id) == (False, "invalid", None)
    assert "integer of" in result.detail
    (row,) = rejections(store)
    assert row["intent_id"] is None


async def test_deeply_nested_api_payload_is_journaled() -> None:
    store = Store.open(":memory:")
    nested: Any = []
    for _ in range(5000):
        nested = [nested]
    result = await deliver(
        StoreSink(store), {"id": "d", "symbol": nested, "side": "BUY"}, source="api"
    )
    assert (result.reason, result.intent_id) == ("invalid", "d")
    (row,) = rejections(store)
    assert row["payload"] == "<unrecordable dict payload>"


async def test_supervise_restarts_a_failed_source_and_stops_loudly_when_it_keeps_failing() -> None:
    runs: list[int] = []
    slept: list[float] = []

    async def no_sleep(seconds: float) -> None:
        slept.append(seconds)

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("boom")

    await supervise("jsonl", flaky, sleep=no_sleep, monotonic=lambda: 0.0)
    assert len(runs) == 3
    assert slept == [0.5, 1.0]

    async def broken() -> None:
        raise RuntimeError("always")

    start: Callable[[], Awaitable[None]] = broken
    with pytest.raises(SourceStopped, match=r"failed 5 times.*RuntimeError: always"):
        await supervise("stdin", start, sleep=no_sleep, monotonic=lambda: 0.0)


# ---- item 4: an over-long line is rejected whole ------------------------------------------------


async def test_stdin_oversized_line_is_rejected_whole_not_its_tail() -> None:
    store = Store.open(":memory:")
    sink = StoreSink(store)
    reader = asyncio.StreamReader()
    reader.feed_data((" " * 300_000 + good("tail") + "\n" + good("next") + "\n").encode())
    reader.feed_eof()
    assert await read_lines(sink, reader, clock=lambda: NOW) == 2
    assert [i.intent_id for i in sink.submitted] == ["next"]
    (row,) = rejections(store)
    assert row["detail"] == (
        f"line of {300_000 + len(good('tail'))} bytes exceeds {MAX_LINE_BYTES}: rejected whole"
    )


async def test_jsonl_oversized_line_is_rejected_whole(tmp_path: Path) -> None:
    path = tmp_path / "intents.jsonl"
    path.write_text(" " * 300_000 + good("tail") + "\n" + good("next") + "\n")
    store = Store.open(":memory:")
    sink = StoreSink(store)
    assert await follow_jsonl(sink, path, follow=False, store=store, clock=lambda: NOW) == 2
    assert [i.intent_id for i in sink.submitted] == ["next"]
    assert len(rejections(store)) == 1


def test_line_splitter_offsets_and_long_lines_across_chunks() -> None:
    splitter = LineSplitter(8, start=100)
    assert splitter.feed(b"abc\nxxxxx") == [
        splitter_line(b"abc", 3, 104),
    ]
    # the long line arrives in pieces: it is reported once, at its newline, with its length
    assert splitter.feed(b"xxxxxxxx") == []
    (long_line,) = splitter.feed(b"yy\nok\n")[:1]
    assert (long_line.data, long_line.length, long_line.end) == (None, 15, 120)
    assert splitter.offset == 123
    last = splitter.feed(b"end")
    assert last == []
    final = splitter.finish()
    assert final is not None
    assert (final.data, final.end) == (b"end", 126)


def splitter_line(data: bytes, length: int, end: int) -> object:
    from pyquant.trading.sources import Line

    return Line(data, length, end)


# ---- item 6: ids and symbols match in full ------------------------------------------------------


@pytest.mark.parametrize("field", ["id", "symbol"])
def test_trailing_newline_is_not_part_of_an_id_or_symbol(field: str) -> None:
    payload = json.loads(good("a1"))
    payload[field] = payload[field] + "\n"
    with pytest.raises(IntentError) as caught:
        parse_intent(payload, source="t", now_ms=NOW)
    assert caught.value.field == field


async def test_id_with_newline_cannot_bypass_the_duplicate_check() -> None:
    store = Store.open(":memory:")
    sink = StoreSink(store)
    first = await deliver_line(sink, good("dup"), source="jsonl", clock=lambda: NOW)
    again = await deliver_line(sink, good("dup\n"), source="jsonl", clock=lambda: NOW)
    assert first is not None
    assert first.accepted
    assert again is not None
    assert (again.accepted, again.reason) == (False, "invalid")
    assert [i.intent_id for i in sink.submitted] == ["dup"]


# ---- item 13: plain ASCII decimal numbers only --------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("size_usd", "３００"),  # full-width digits  # noqa: RUF001
        ("size_usd", "3_0_0"),
        ("size_usd", "٣٠٠"),  # Arabic-Indic digits
        ("size_usd", "0x12c"),
        ("position_size_usd", " 3_00 "),
        ("leverage", "1_0"),
        ("leverage", "１０"),  # noqa: RUF001
        ("confidence", "０.5"),  # noqa: RUF001
        ("created_at_ms", "1_700_000_000_000"),
        ("timestamp", "１７００００００００"),  # noqa: RUF001
    ],
)
def test_numbers_in_odd_forms_are_refused(field: str, value: str) -> None:
    payload = json.loads(good("n1"))
    if field == "timestamp":
        del payload["created_at_ms"]  # it would be read first
    payload[field] = value
    with pytest.raises(IntentError, match="plain decimal number") as caught:
        parse_intent(payload, source="t", now_ms=NOW)
    assert caught.value.field == field


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-inf", "sNaN"])
def test_non_finite_numbers_are_refused(value: str) -> None:
    payload = json.loads(good("n3"))
    payload["size_usd"] = value
    with pytest.raises(IntentError, match="must be a finite number"):
        parse_intent(payload, source="t", now_ms=NOW)


@pytest.mark.parametrize(
    ("value", "size"),
    [("300", "300"), ("300.50", "300.5"), (" 3e2 ", "300"), (300, "300"), (12.25, "12.25")],
)
def test_plain_numbers_are_sizes(value: object, size: str) -> None:
    payload = json.loads(good("n2"))
    payload["size_usd"] = value
    intent = parse_intent(payload, source="t", now_ms=NOW)
    assert str(intent.size_usd) == size


async def test_odd_numbers_refused_by_every_source(tmp_path: Path) -> None:
    bad = good("fw", size_usd="３００")  # noqa: RUF001
    store = Store.open(":memory:")
    sink = StoreSink(store)
    path = tmp_path / "intents.jsonl"
    path.write_text(bad + "\n")
    await follow_jsonl(sink, path, follow=False, clock=lambda: NOW)
    reader = asyncio.StreamReader()
    reader.feed_data((bad + "\n").encode())
    reader.feed_eof()
    await read_lines(sink, reader, clock=lambda: NOW)
    http = HttpSource(sink, token=TOKEN, clock=lambda: NOW)
    port = await http.start()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"http://127.0.0.1:{port}/intents",
                data=bad.encode(),
                headers={"Authorization": f"Bearer {TOKEN}"},
            ) as response,
        ):
            assert response.status == 400
            assert (await response.json())["reason"] == "invalid"
    finally:
        await http.stop()
    assert sink.submitted == []
    assert [(r["source"], r["reason"]) for r in rejections(store)] == [
        ("jsonl", "invalid"),
        ("stdin", "invalid"),
        ("http", "invalid"),
    ]


# ---- item 5: every numeric field bounded before the store ---------------------------------------


@pytest.mark.parametrize(
    "stamp", ["9223372036854775808", "1e300", "-1", "0", "253402300800000"], ids=str
)
async def test_huge_timestamps_are_journaled_rejections(stamp: str) -> None:
    store = Store.open(":memory:")
    sink = StoreSink(store)
    text = good("t1").replace(str(NOW), stamp)
    result = await deliver_line(sink, text, source="http", clock=lambda: NOW)
    assert result is not None
    assert (result.accepted, result.reason, result.intent_id) == (False, "invalid", "t1")
    assert "created_at_ms" in result.detail
    (row,) = rejections(store)
    assert (row["intent_id"], row["reason"]) == ("t1", "invalid")


async def test_http_answers_400_for_unparseable_bodies_not_500() -> None:
    store = Store.open(":memory:")
    sink = StoreSink(store)
    http = HttpSource(sink, token=TOKEN, clock=lambda: NOW)
    port = await http.start()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    huge_stamp = good("h1").replace(str(NOW), "9223372036854775808")
    try:
        async with aiohttp.ClientSession() as session:
            for body, status in [
                (DEEP, 400),
                (HUGE_INT, 400),
                (huge_stamp, 400),
                (good("ok"), 200),
            ]:
                async with session.post(
                    f"http://127.0.0.1:{port}/intents", data=body.encode(), headers=headers
                ) as response:
                    assert response.status == status, body[:40]
    finally:
        await http.stop()
    assert [i.intent_id for i in sink.submitted] == ["ok"]
    assert len(rejections(store)) == 3


def test_store_refuses_an_out_of_range_integer_with_the_field_named() -> None:
    store = Store.open(":memory:")
    intent = Intent("x", "BTCUSDT", "BUY", 0.5, 2**63, "api")
    with pytest.raises(ValueError, match="created_at_ms"):
        store.record_intent_decision(intent, "rejected", "invalid")
    store.record_malformed_intent("api", {"id": 10**4999 + 1}, "invalid", "bad")
    assert rejections(store)[0]["intent_id"] is None


# ---- item 11 (source side): intents files others can write are refused -------------------------


async def test_world_writable_intents_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "intents.jsonl"
    path.write_text(good("w1") + "\n")
    os.chmod(path, 0o666)  # noqa: S103 - the case under test
    with pytest.raises(ConfigError, match=r"writable by every local user.*chmod o-w"):
        check_intents_file(path)
    sink = StoreSink(Store.open(":memory:"))
    with pytest.raises(ConfigError):
        await follow_jsonl(sink, path, follow=False, clock=lambda: NOW)
    assert sink.submitted == []
    os.chmod(path, 0o600)
    check_intents_file(path)
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)  # noqa: S103 - the case under test
    with pytest.raises(ConfigError, match="could replace the file"):
        check_intents_file(open_dir / "intents.jsonl")
    os.chmod(open_dir, 0o1777)  # noqa: S103 - sticky, like /tmp: others cannot replace our file
    check_intents_file(open_dir / "intents.jsonl")
