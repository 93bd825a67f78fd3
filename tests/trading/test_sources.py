"""Intent sources: API queue, JSONL follow, stdin lines, HTTP with a bearer token."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pyquant.errors import ConfigError
from pyquant.trading.intents import Intent, IntentError, parse_intent
from pyquant.trading.journal import Store
from pyquant.trading.sources import (
    ApiSource,
    HttpSource,
    SourceResult,
    deliver_line,
    follow_jsonl,
    read_lines,
)

NOW = 1_700_000_000_000
TOKEN = "t0ken-with-enough-length"  # noqa: S105 - a test token


@dataclass
class Decision:
    accepted: bool
    reason: str
    detail: str = ""
    position_id: str | None = None


class Sink:
    def __init__(self) -> None:
        self.submitted: list[Intent] = []
        self.malformed: list[tuple[str, object, str]] = []
        self.arrived = asyncio.Event()

    async def submit(self, intent: Intent, *, payload: object = None) -> Decision:
        self.submitted.append(intent)
        self.arrived.set()
        if intent.symbol == "BOOMUSDT":
            raise RuntimeError("exchange down")
        return Decision(True, "accepted", position_id=str(len(self.submitted)))

    def reject_malformed(self, source: str, payload: object, error: IntentError | str) -> None:
        self.malformed.append((source, payload, str(error)))
        self.arrived.set()


def line(intent_id: str, symbol: str = "BTCUSDT", side: str = "BUY") -> str:
    return json.dumps({"id": intent_id, "symbol": symbol, "side": side, "created_at_ms": NOW})


async def test_deliver_line_good_bad_and_blank() -> None:
    sink = Sink()
    good = await deliver_line(sink, line("a"), source="t", clock=lambda: NOW)
    assert good == SourceResult("a", True, "accepted", "", "1")
    bad_json = await deliver_line(sink, '{"id": "b", ', source="t")
    assert bad_json is not None
    assert (bad_json.reason, bad_json.accepted) == ("invalid", False)
    assert "malformed JSON" in bad_json.detail
    bad_field = await deliver_line(sink, line("c", side="UP"), source="t")
    assert bad_field is not None
    assert bad_field.intent_id == "c"
    assert "side" in bad_field.detail
    not_object = await deliver_line(sink, "[1, 2]", source="t")
    assert not_object is not None
    assert "JSON object" in not_object.detail
    assert await deliver_line(sink, "   ", source="t") is None
    assert await deliver_line(sink, "# comment", source="t") is None
    crash = await deliver_line(sink, line("d", symbol="BOOMUSDT"), source="t")
    assert crash is not None
    assert crash.reason == "error"
    assert [m[0] for m in sink.malformed] == ["t", "t", "t"]


async def test_jsonl_reads_all_lines_and_keeps_offset(tmp_path: Path) -> None:
    path = tmp_path / "intents.jsonl"
    path.write_text("\n".join([line("a"), "not json", "", line("b", side="SHORT")]) + "\n")
    store = Store.open(":memory:")
    sink = Sink()
    delivered = await follow_jsonl(sink, path, follow=False, store=store, clock=lambda: NOW)
    assert delivered == 3
    assert [i.intent_id for i in sink.submitted] == ["a", "b"]
    assert sink.submitted[1].side == "SELL"
    assert len(sink.malformed) == 1
    # a restart does not decide the same lines again
    again = Sink()
    assert await follow_jsonl(again, path, follow=False, store=store) == 0
    with path.open("a") as handle:
        handle.write(line("c") + "\n")
    assert await follow_jsonl(again, path, follow=False, store=store) == 1
    assert [i.intent_id for i in again.submitted] == ["c"]


async def test_jsonl_follow_appends_partial_lines_and_truncation(tmp_path: Path) -> None:
    path = tmp_path / "intents.jsonl"
    path.write_text(line("a") + "\n")
    sink = Sink()
    results: list[SourceResult] = []
    got = asyncio.Event()

    def on_result(result: SourceResult) -> None:
        results.append(result)
        got.set()

    task = asyncio.create_task(
        follow_jsonl(sink, path, poll_s=0.01, on_result=on_result, clock=lambda: NOW)
    )
    try:
        await asyncio.wait_for(got.wait(), 5)
        got.clear()
        with path.open("a") as handle:
            handle.write(line("b")[:10])  # partial: not decided until its newline
        await asyncio.sleep(0.05)
        assert len(results) == 1
        with path.open("a") as handle:
            handle.write(line("b")[10:] + "\n")
        await asyncio.wait_for(got.wait(), 5)
        got.clear()
        path.write_text(line("z") + "\n")  # truncated and rewritten: read from the start
        await asyncio.wait_for(got.wait(), 5)
        assert [r.intent_id for r in results] == ["a", "b", "z"]
    finally:
        task.cancel()


async def test_stdin_lines_until_eof() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data((line("a") + "\n{oops}\n" + line("b")).encode())
    reader.feed_eof()
    sink = Sink()
    assert await read_lines(sink, reader, clock=lambda: NOW) == 3
    assert [i.intent_id for i in sink.submitted] == ["a", "b"]
    assert sink.malformed[0][0] == "stdin"


async def test_api_source_queue() -> None:
    sink = Sink()
    api = ApiSource(sink, clock=lambda: NOW)
    runner = asyncio.create_task(api.run())
    try:
        intent = parse_intent(json.loads(line("a")), source="api", now_ms=NOW)
        assert (await api.submit(intent)).accepted
        result = await api.submit({"id": "b", "symbol": "BTCUSDT", "side": "SIDEWAYS"})
        assert (result.accepted, result.reason) == (False, "invalid")
        future = api.submit_nowait(json.loads(line("c")))
        assert (await future).position_id == "2"
        crash = await api.submit(json.loads(line("d", symbol="BOOMUSDT")))
        assert crash.reason == "error"
        assert (await api.submit(json.loads(line("e")))).accepted  # still running
    finally:
        runner.cancel()


async def test_http_source_auth_and_payloads() -> None:
    sink = Sink()
    http = HttpSource(sink, token=TOKEN, clock=lambda: NOW)
    port = await http.start()
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/health") as response:
                assert await response.json() == {"ok": True}
            async with session.post(f"{url}/intents", data=line("a")) as response:
                assert response.status == 401
            headers = {"Authorization": "Bearer wrong-token-of-some-length"}
            async with session.post(f"{url}/intents", data=line("a"), headers=headers) as response:
                assert response.status == 401
            assert sink.submitted == []
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with session.post(f"{url}/intents", data=line("a"), headers=headers) as response:
                assert response.status == 200
                body: Any = await response.json()
                assert body == {
                    "id": "a",
                    "accepted": True,
                    "reason": "accepted",
                    "detail": "",
                    "position_id": "1",
                }
            async with session.post(f"{url}/intents", data="{broken", headers=headers) as response:
                assert response.status == 400
                assert (await response.json())["error"] == "invalid"
            batch = f"[{line('b')}, {line('c', side='UP')}]"
            async with session.post(f"{url}/intents", data=batch, headers=headers) as response:
                assert response.status == 400
                body = await response.json()
                assert [(r["id"], r["reason"]) for r in body] == [
                    ("b", "accepted"),
                    ("c", "invalid"),
                ]
            async with session.post(
                f"{url}/intents", data="x" * 70_000, headers=headers
            ) as response:
                assert response.status == 413
            async with session.post(f"{url}/intents", data=line("d"), headers=headers) as response:
                assert response.status == 200  # still serving after every bad request
        assert [i.intent_id for i in sink.submitted] == ["a", "b", "d"]
        assert [i.source for i in sink.submitted] == ["http", "http", "http"]
        assert len(sink.malformed) == 3
    finally:
        await http.stop()


@pytest.mark.parametrize(("host", "token"), [("0.0.0.0", TOKEN), ("127.0.0.1", "short")])  # noqa: S104
def test_http_source_refuses_unsafe_settings(host: str, token: str) -> None:
    with pytest.raises(ConfigError):
        HttpSource(Sink(), token=token, host=host)
