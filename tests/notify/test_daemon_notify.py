"""The daemon's exits do not wait for notifications: a held and a dead target meanwhile."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jsonschema
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
from pq_harness import run_daemon, simulator, until

from .receiver import Receiver, closed_port_url

SYMBOL = "ETHUSDT"
SCHEMA = json.loads(
    (Path(__file__).parents[2] / "pyquant" / "scale" / "events.schema.json").read_text()
)


async def test_exits_run_while_one_target_holds_a_request_and_another_is_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Receiver(default="slow") as held:
        monkeypatch.setenv("PYQUANT_WEBHOOK_URL", f"{held.url}/hook")
        monkeypatch.setenv("PYQUANT_DISCORD_WEBHOOK_URL", closed_port_url())
        notify = {
            "coalesce_s": 0.0,
            "max_attempts": 2,
            "targets": [{"kind": "webhook"}, {"kind": "discord"}],
        }
        async with simulator() as venue:
            await venue.set_mark(SYMBOL, "2500.00")
            async with run_daemon(venue, tmp_path, notify=notify) as running:
                daemon = running.daemon
                store = daemon.desk.store
                # the 'started' message is in flight and the receiver does not answer
                await until(lambda: held.pending == 1, what="first notification held")
                result = await daemon.submit(
                    {"id": "n-1", "symbol": SYMBOL, "side": "BUY", "size_usd": "500"}
                )
                assert result.accepted, result
                pid = result.position_id
                await until(lambda: store.get_position(pid).status == "open", what="entry")
                await venue.step(1000)
                await venue.set_mark(SYMBOL, "2440.00")  # below the 2 % stop at 2450.00
                await until(lambda: store.get_position(pid).status == "closed", what="stop exit")
                # the whole trade happened while the first notification was still held:
                # the daemon never waited for a target
                assert held.pending == 1
                assert len(held.requests) == 1
                held.release()
                await until(
                    lambda: any(d["type"] == "exit" for r in held.requests[1:] for d in r.body),
                    what="exit notification",
                )
                # the kill switch with a position open is told too
                again = await daemon.submit(
                    {"id": "n-2", "symbol": SYMBOL, "side": "SELL", "size_usd": "500"}
                )
                assert again.accepted, again
                pid2 = again.position_id
                await until(lambda: store.get_position(pid2).status == "open", what="entry 2")
                await daemon.flatten()
                await until(
                    lambda: any(
                        d["type"] == "order" and d["payload"].get("kind") == "flatten"
                        for r in held.requests
                        for d in r.body
                    ),
                    what="flatten notification",
                )
            documents = [d for r in held.requests for d in r.body]
    kinds = [(d["type"], d["payload"].get("action")) for d in documents]
    assert kinds[0] == ("daemon", "started")
    assert ("position", "opened") in kinds
    assert ("daemon", "stopped") in kinds  # sent at the clean stop
    exit_doc = next(d for d in documents if d["type"] == "exit")
    assert exit_doc["symbol"] == SYMBOL
    assert exit_doc["payload"]["reason"]
    for document in documents:
        jsonschema.validate(document, SCHEMA)
    assert [d["seq"] for d in documents] == sorted(d["seq"] for d in documents)
