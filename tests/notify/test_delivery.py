"""Notifier delivery: message bodies, coalescing, 429/500/slow/down receivers, drops, secrets."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import pytest

from pyquant.config import NotifyTargetConfig, Secret
from pyquant.errors import ConfigError
from pyquant.notify.delivery import Notifier
from pyquant.notify.documents import DocumentMaker, classify
from pyquant.notify.messages import render
from pyquant.notify.targets import Target, resolve_targets

from .receiver import Receiver, closed_port_url

SCHEMA = json.loads(
    (Path(__file__).parents[2] / "pyquant" / "scale" / "events.schema.json").read_text()
)
TOKEN = "123456:SECRET-bot-token-do-not-log"  # noqa: S105 - a test token


def telegram(url: str, **kw: object) -> Target:
    return Target("phone", "telegram", frozenset(), Secret(TOKEN), chat_id="42", base_url=url, **kw)  # type: ignore[arg-type]


def discord(url: str) -> Target:
    return Target("team", "discord", frozenset(), Secret(f"{url}/api/webhooks/1/SECRET-hook"))


def webhook(url: str, events: frozenset[str] = frozenset()) -> Target:
    return Target("svc", "webhook", events, Secret(f"{url}/hook?key=SECRET-key"))


def ladder_notes() -> list[dict[str, object]]:
    """What the desk notes when a long's five take-profit levels fill one after the other."""
    notes: list[dict[str, object]] = []
    pnls = ["2.50", "3.10", "4.25", "1.05", "-0.40"]
    for i, pnl in enumerate(pnls, start=1):
        notes.append(
            {
                "kind": "exit",
                "symbol": "ETHUSDT",
                "position_id": "p1",
                "position_side": "LONG",
                "reason": f"take_profit_{i}",
                "quantity": "0.040",
            }
        )
        notes.append(
            {
                "kind": "fill",
                "symbol": "ETHUSDT",
                "client_order_id": f"pq-x-p1-{i}",
                "side": "SELL",
                "position_side": "LONG",
                "price": "2525.10",
                "quantity": "0.040",
                "commission": Decimal("0.0505"),
                "realized_pnl": Decimal(pnl),
                "trade_id": 100 + i,
            }
        )
    return notes


async def until(check, limit_s: float = 20.0) -> None:
    async with asyncio.timeout(limit_s):
        while not check():  # noqa: ASYNC110 - the state lives in other tasks
            await asyncio.sleep(0.01)


async def test_a_ladder_of_five_fills_is_one_message_per_target_with_exact_pnl():
    async with Receiver() as rx:
        notifier = Notifier([telegram(rx.url), discord(rx.url), webhook(rx.url)], coalesce_s=0.3)
        await notifier.start()
        for note in ladder_notes():
            notifier.on_note(note)
        await until(lambda: len(rx.requests) == 3)
        await notifier.close()
    by_path = {r.path: r.body for r in rx.requests}
    assert len(rx.requests) == 3  # one message each, not ten
    text = by_path[f"/bot{TOKEN}/sendMessage"]["text"]
    assert by_path[f"/bot{TOKEN}/sendMessage"]["chat_id"] == "42"
    assert text.startswith("ETHUSDT:\n  exit take_profit_1 LONG 0.040\n")
    assert "exit take_profit_5 LONG 0.040" in text
    assert text.endswith("realized PnL +10.5 USDT")  # 2.50+3.10+4.25+1.05-0.40, exact
    assert by_path["/api/webhooks/1/SECRET-hook"]["content"] == text
    documents = by_path["/hook"]
    assert [d["type"] for d in documents] == ["exit", "fill"] * 5
    for document in documents:
        jsonschema.validate(document, SCHEMA)
    assert documents[1]["payload"]["realized_pnl"] == "2.50"  # decimal text, never a float
    assert [d["seq"] for d in documents] == list(range(1, 11))


async def test_events_are_chosen_per_target():
    async with Receiver() as rx:
        exits_only = Target(
            "exits", "webhook", frozenset({"exit_filled"}), Secret(f"{rx.url}/exits")
        )
        rejections = Target(
            "rej", "webhook", frozenset({"intent_rejected"}), Secret(f"{rx.url}/rej")
        )
        notifier = Notifier([exits_only, rejections], coalesce_s=0.05)
        await notifier.start()
        notifier.on_note(ladder_notes()[0])
        maker = DocumentMaker("d1")
        notifier.publish(
            maker.make(
                "rejection",
                None,
                {"stream": "http", "stream_id": "", "reason": "size_usd: -5 found", "field": None},
            )
        )
        await until(lambda: len(rx.requests) == 2)
        await notifier.close()
    got = {r.path: [d["type"] for d in r.body] for r in rx.requests}
    assert got == {"/exits": ["exit"], "/rej": ["rejection"]}


async def test_429_waits_the_retry_after_the_target_gave():
    async with Receiver(script=["429"]) as rx:
        notifier = Notifier([telegram(rx.url)], coalesce_s=0.0, backoff_base_s=0.01)
        started = time.monotonic()
        result = await notifier.deliver(telegram(rx.url), "hello")
        waited = time.monotonic() - started
    assert result.ok
    assert result.attempts == 2
    assert list(rx.answered()) == ["429", "ok"]
    assert waited >= 1.0  # retry_after 1 s was honoured (a lower bound, not a speed target)


async def test_500_is_retried_with_backoff_and_400_is_not():
    async with Receiver(script=["500", "500"]) as rx:
        notifier = Notifier([], backoff_base_s=0.01)
        ok = await notifier.deliver(webhook(rx.url), "x", [])
        assert ok.ok
        assert ok.attempts == 3
        rx.script[:] = ["400"]
        refused = await notifier.deliver(webhook(rx.url), "x", [])
    assert not refused.ok
    assert refused.attempts == 1
    assert refused.detail == "refused"


async def test_a_down_target_gives_up_and_the_next_message_says_how_many_were_lost(caplog):
    caplog.set_level(logging.DEBUG)
    down = closed_port_url()
    dead = Target("dead", "discord", frozenset(), Secret(down))
    async with Receiver() as rx:
        notifier = Notifier(
            [dead, telegram(rx.url)], coalesce_s=0.05, max_attempts=3, backoff_base_s=0.01
        )
        await notifier.start()
        notifier.on_note(ladder_notes()[0])
        await until(lambda: notifier.stats()["dead"].failed == 1)
        # the healthy target was not held up by the dead one
        assert len(rx.requests) == 1
        assert notifier.stats()["dead"].attempts == 3
        # the dead target comes back: its next message reports the lost one
        object.__setattr__(dead, "secret", Secret(f"{rx.url}/revived"))
        notifier.on_note(ladder_notes()[2])
        await until(lambda: any(r.path == "/revived" for r in rx.requests))
        await notifier.close()
    revived = next(r for r in rx.requests if r.path == "/revived")
    assert revived.body["content"].endswith(
        "(1 earlier notification(s) dropped: queue full or undeliverable)"
    )
    assert "SECRET" not in caplog.text
    assert TOKEN not in caplog.text
    assert down not in caplog.text


async def test_a_full_queue_drops_the_oldest_and_counts_them():
    async with Receiver(script=["slow"]) as rx:
        notifier = Notifier([discord(rx.url)], queue_size=5, coalesce_s=0.0)
        await notifier.start()
        notifier.on_note(ladder_notes()[0])
        await until(lambda: rx.pending == 1)  # the target holds the first message
        for i in range(100):  # publish never waits for the held request
            notifier.on_note({**ladder_notes()[0], "reason": f"stop_{i}"})
        stats = notifier.stats()["team"]
        assert stats.dropped == 95  # only the newest five wait
        rx.release()
        await until(lambda: len(rx.requests) == 2)
        await notifier.close()
    second = rx.requests[1].body["content"]
    assert "exit stop_95 LONG" in second
    assert "exit stop_99 LONG" in second
    assert "stop_94" not in second
    assert second.endswith("(95 earlier notification(s) dropped: queue full or undeliverable)")


def test_feed_down_and_restored_after_the_threshold_and_the_daily_summary():
    notifier = Notifier([], feed_down_after_s=30)
    seen: list[dict[str, object]] = []
    notifier.publish = seen.append  # type: ignore[method-assign]
    notifier.check_feed(True, 0.0)
    notifier.check_feed(False, 10.0)
    notifier.check_feed(False, 39.0)
    assert seen == []  # down for 29 s only
    notifier.check_feed(False, 40.5)
    notifier.check_feed(False, 60.0)  # told once
    notifier.check_feed(True, 70.0)
    assert [d["payload"] for d in seen] == [
        {"action": "feed_down", "down_s": 30.5},
        {"action": "feed_restored", "down_s": 60.0},
    ]
    for document in seen:
        jsonschema.validate(document, SCHEMA)
    assert (
        render(seen)
        == "pyquant:\n  market feed down for 30.5 s\n  market feed restored after 60.0 s"
    )


def test_daily_summary_counts_the_day():
    notifier = Notifier([])
    for note in ladder_notes():
        notifier.on_note(note)
    notifier.on_note(
        {
            "kind": "entry",
            "symbol": "ETHUSDT",
            "position_id": "p2",
            "side": "SHORT",
            "quantity": "0.2",
            "price": "2500.00",
        }
    )
    captured: list[dict[str, object]] = []
    notifier.publish = captured.append  # type: ignore[method-assign]
    notifier.daily_summary("2026-12-06")
    (document,) = captured
    jsonschema.validate(document, SCHEMA)
    assert document["payload"] == {
        "action": "daily_summary",
        "day": "2026-12-06",
        "entries": 1,
        "exits": 5,
        "rejections": 0,
        "realized_pnl": "10.50",
    }
    assert classify(document) == "daily_summary"


def test_secrets_come_from_env_or_the_owner_only_file_and_are_never_shown(tmp_path):
    configs = (
        NotifyTargetConfig(kind="telegram", chat_id="42"),
        NotifyTargetConfig(kind="webhook", name="svc", secret_env="MY_HOOK"),  # noqa: S106 - a variable name
    )
    with pytest.raises(ConfigError) as err:
        resolve_targets(configs, environ={"PYQUANT_TELEGRAM_TOKEN": TOKEN})
    assert "set $MY_HOOK or my_hook in credentials.file" in str(err.value)
    assert TOKEN not in str(err.value)
    secrets = tmp_path / "keys.toml"
    secrets.write_text('my_hook = "http://127.0.0.1:9/SECRET"\n')
    secrets.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        resolve_targets(
            configs, environ={"PYQUANT_TELEGRAM_TOKEN": TOKEN}, secrets_file=str(secrets)
        )
    secrets.chmod(0o600)
    targets = resolve_targets(
        configs, environ={"PYQUANT_TELEGRAM_TOKEN": TOKEN}, secrets_file=str(secrets)
    )
    assert [t.secret.reveal() for t in targets] == [TOKEN, "http://127.0.0.1:9/SECRET"]
    assert TOKEN not in repr(targets)
    assert "SECRET" not in repr(targets)
    with pytest.raises(ConfigError, match=r"must be an http\(s\) URL \(value not shown"):
        resolve_targets(configs, environ={"PYQUANT_TELEGRAM_TOKEN": TOKEN, "MY_HOOK": "x-SECRET"})


def test_documents_follow_the_events_stream_schema_version():
    from pyquant.notify import documents
    from pyquant.scale import events

    assert documents.SCHEMA_VERSION == events.SCHEMA_VERSION


def _order(**changes: object) -> SimpleNamespace:
    fields: dict[str, object] = {
        "client_order_id": "pq-f-1",
        "symbol": "ETHUSDT",
        "side": "SELL",
        "position_side": "LONG",
        "params": {"type": "MARKET", "quantity": "0.200", "positionSide": "LONG"},
        "status": "NEW",
        "reason": "flatten",
        "kind": "flatten",
        "executed_qty": "0",
        "error_code": None,
        "error_msg": None,
    }
    fields.update(changes)
    return SimpleNamespace(**fields)


def test_flatten_is_said_once_per_order_and_refusals_name_the_exchange_code():
    maker = DocumentMaker("d1")
    documents = [
        maker.from_order(_order()),
        maker.from_order(_order(status="FILLED", executed_qty="0.200")),
        maker.from_order(
            _order(
                client_order_id="pq-b-1",
                kind="backstop",
                status="REJECTED",
                params={"type": "STOP_MARKET", "positionSide": "LONG", "closePosition": "true"},
                error_code=-2021,
                error_msg="Order would immediately trigger.",
            )
        ),
        maker.from_order(
            _order(
                client_order_id="pq-e-2",
                kind="entry",
                side="BUY",
                status="REJECTED",
                params={"type": "MARKET", "quantity": "0.200", "positionSide": "LONG"},
                error_code=-2019,
                error_msg="Margin is insufficient.",
            )
        ),
        maker.from_order(_order(client_order_id="pq-x-3", kind="exit", status="NEW")),
    ]
    for document in documents:
        jsonschema.validate(document, SCHEMA)
    assert [classify(d) for d in documents] == [
        "flatten",
        "flatten",
        "no_exchange_stop",
        "order_refused",
        None,  # an exit order's acknowledgement is not news
    ]
    assert render(documents) == (
        "ETHUSDT:\n"
        "  kill switch: closing LONG 0.200\n"
        "  LONG leg has no exchange stop: backstop refused -2021 Order would immediately "
        "trigger.\n"
        "  entry order BUY 0.200 refused by the exchange: -2019 Margin is insufficient."
    )
