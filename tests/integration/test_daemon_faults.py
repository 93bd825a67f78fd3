"""The daemon against the simulator when things go wrong, and the edges of the exit rules."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path

import aiohttp
import orjson
from pq_harness import free_port, run_daemon, simulator, until

SYMBOL = "ETHUSDT"


async def open_long(
    running, intent_id: str = "t-1", size: str = "500", symbol: str = SYMBOL
) -> str:
    result = await running.daemon.submit(
        {"id": intent_id, "symbol": symbol, "side": "BUY", "size_usd": size}
    )
    assert result.accepted, result
    store = running.daemon.desk.store
    await until(lambda: store.get_position(result.position_id).status == "open", what="entry fill")
    return str(result.position_id)


def our_orders(venue, kind: str | None = None) -> list[dict]:
    orders = [e for e in venue.order_log.orders if str(e["clientOrderId"]).startswith("pq")]
    if kind is not None:
        letter = {"entry": "-e", "exit": "-x"}[kind]
        orders = [e for e in orders if letter in str(e["clientOrderId"])]
    return orders


async def test_dust_remainder_becomes_one_full_close(tmp_path: Path) -> None:
    async with simulator("one-way") as venue:
        await venue.set_mark(SYMBOL, "2500.00")
        async with run_daemon(venue, tmp_path) as running:
            position_id = await open_long(running, size="27")  # 0.010 ETH, 25 USDT notional
            store = running.daemon.desk.store
            assert Decimal(store.get_position(position_id).quantity) == Decimal("0.010")
            await venue.step(1000)
            await venue.set_mark(SYMBOL, "2526.00")
            # 30 % would leave 0.007 ETH = 17.7 USDT, under ETHUSDT's MIN_NOTIONAL of 20
            await until(lambda: store.get_position(position_id).status == "closed", what="close")
            exits = our_orders(venue, "exit")
            assert len(exits) == 1
            assert Decimal(exits[0]["quantity"]) == Decimal("0.010")
            assert store.orders(kind="exit")[0].reason == "take_profit_1"
            assert venue.exchange.position(SYMBOL, "BOTH").amount == 0


async def test_duplicate_and_concurrent_intents_open_one_position(tmp_path: Path) -> None:
    async with simulator("hedge") as venue:
        await venue.set_mark(SYMBOL, "2500.00")
        async with run_daemon(venue, tmp_path) as running:
            daemon = running.daemon
            payload = {"id": "dup-1", "symbol": SYMBOL, "side": "BUY", "size_usd": "500"}
            results = await asyncio.gather(
                daemon.submit(payload),
                daemon.submit(payload),
                daemon.submit({**payload, "id": "dup-2"}),
                daemon.submit({**payload, "id": "dup-3", "side": "LONG"}),
            )
            accepted = [r for r in results if r.accepted]
            assert len(accepted) == 1
            reasons = sorted(r.reason for r in results if not r.accepted)
            assert reasons[0] == "duplicate_intent" or "duplicate_intent" in reasons
            assert set(reasons) <= {"duplicate_intent", "entry_in_flight", "position_open"}
            again = await daemon.submit(payload)
            assert (again.accepted, again.reason) == (False, "duplicate_intent")
            later = await daemon.submit({**payload, "id": "dup-4"})
            assert (later.accepted, later.reason) == (False, "position_open")
            # the other leg is a different position in hedge mode
            short = await daemon.submit({**payload, "id": "dup-5", "side": "SELL"})
            assert short.accepted, short
            await until(lambda: len(our_orders(venue, "entry")) == 2, what="two entries")
            assert {e["positionSide"] for e in our_orders(venue, "entry")} == {"LONG", "SHORT"}
            summary = daemon.current_summary()
            assert summary["intents_accepted"] == 2
            assert sum(summary["intents_rejected"].values()) == 5


async def test_websocket_drop_reconnects_and_exits_still_run(tmp_path: Path) -> None:
    async with simulator("one-way") as venue:
        await venue.set_mark(SYMBOL, "2500.00")
        async with run_daemon(venue, tmp_path) as running:
            daemon = running.daemon
            position_id = await open_long(running)
            dropped = await venue.drop_websockets()
            assert dropped >= 2  # market and user streams
            await until(
                lambda: daemon.market.health.reconnects >= 1 and daemon.market.health.connected,
                what="market reconnect",
            )
            await until(
                lambda: daemon.user.health.reconnects >= 1 and daemon.user.health.connected,
                what="user reconnect",
            )
            await until(lambda: daemon.desk.guard.state_known, what="reconciled after reconnect")
            await venue.step(1000)
            await venue.set_mark(SYMBOL, "2440.00")  # under the 2 % stop
            store = daemon.desk.store
            await until(
                lambda: store.get_position(position_id).status == "closed", what="stop loss"
            )
            assert [o.reason for o in store.orders(kind="exit")] == ["stop_loss"]
            assert len(our_orders(venue, "exit")) == 1


async def test_exit_executed_but_answered_503_is_resolved_without_a_second_order(
    tmp_path: Path,
) -> None:
    async with simulator("hedge") as venue:
        await venue.set_mark(SYMBOL, "2500.00")
        async with run_daemon(venue, tmp_path) as running:
            daemon = running.daemon
            position_id = await open_long(running)
            venue.set_faults(order_error_rate=1.0, order_error="503", execute_share=1.0)
            await venue.step(1000)
            await venue.set_mark(SYMBOL, "2440.00")
            store = daemon.desk.store
            await until(lambda: store.get_position(position_id).status == "closed", 15, "close")
            venue.set_faults()
            exits = our_orders(venue, "exit")
            assert len(exits) == 1, exits  # executed once, looked up, never resent
            rows = store.orders(kind="exit")
            assert len(rows) == 1
            assert rows[0].status == "FILLED"
            assert venue.exchange.position(SYMBOL, "LONG").amount == 0


async def test_exit_that_did_not_execute_on_503_is_sent_again_once(tmp_path: Path) -> None:
    async with simulator("one-way") as venue:
        await venue.set_mark(SYMBOL, "2500.00")
        async with run_daemon(venue, tmp_path) as running:
            daemon = running.daemon
            position_id = await open_long(running)
            venue.set_faults(order_error_rate=1.0, order_error="503", execute_share=0.0)
            await venue.step(1000)
            await venue.set_mark(SYMBOL, "2440.00")
            store = daemon.desk.store
            await until(
                lambda: any(o.status not in ("SENT", "UNKNOWN") for o in store.orders(kind="exit")),
                15,
                "first attempt resolved",
            )
            venue.set_faults()
            await venue.step(1000)
            await venue.set_mark(SYMBOL, "2439.00")
            await until(lambda: store.get_position(position_id).status == "closed", 15, "close")
            assert len(our_orders(venue, "exit")) == 1  # only the resend executed
            assert venue.exchange.position(SYMBOL, "BOTH").amount == 0


async def test_position_mode_changed_behind_our_back(tmp_path: Path) -> None:
    async with simulator("one-way") as venue:
        await venue.set_mark(SYMBOL, "2500.00")
        async with run_daemon(venue, tmp_path) as running:
            daemon = running.daemon
            assert daemon.desk.mode == "one-way"
            venue.exchange.set_position_mode(True)  # someone switched the account to hedge
            result = await daemon.submit(
                {"id": "m-1", "symbol": SYMBOL, "side": "BUY", "size_usd": "500"}
            )
            assert result.accepted, result
            store = daemon.desk.store
            await until(
                lambda: store.get_position(result.position_id).status == "open", what="entry"
            )
            assert daemon.desk.mode == "hedge"
            rejects = [e for e in venue.order_log.rejects if e.get("code") == -4061]
            assert len(rejects) == 1
            entries = our_orders(venue, "entry")
            assert len(entries) == 1
            assert entries[0]["positionSide"] == "LONG"
            await venue.step(1000)
            await venue.set_mark(SYMBOL, "2440.00")
            await until(
                lambda: store.get_position(result.position_id).status == "closed", what="stop"
            )
            exit_params = store.orders(kind="exit")[0].params
            assert exit_params["positionSide"] == "LONG"
            assert "reduceOnly" not in exit_params
            summary = daemon.current_summary()
            assert summary["order_rejections"].get("-4061") == 1
            assert summary["position_mode"] == "hedge"


async def test_malformed_intents_and_messages_are_rejected_while_running(tmp_path: Path) -> None:
    token = "integration-token-0123456789"  # noqa: S105 - a test token on loopback
    port = free_port()
    async with simulator("one-way") as venue:
        await venue.set_mark(SYMBOL, "2500.00")
        async with run_daemon(
            venue, tmp_path, {"PYQUANT_HTTP_TOKEN": token}, sources={"http_port": port}
        ) as running:
            daemon = running.daemon
            bad = await daemon.submit({"id": "bad-1", "symbol": SYMBOL, "side": "UP"})
            assert (bad.accepted, bad.reason) == (False, "invalid")
            assert "side" in bad.detail
            worse = await daemon.submit(["not", "an", "object"])
            assert worse.reason == "invalid"
            url = f"http://127.0.0.1:{port}/intents"
            async with aiohttp.ClientSession() as http:
                async with http.post(url, data=b"{}") as answer:
                    assert answer.status == 401  # no token
                auth = {"Authorization": f"Bearer {token}"}
                async with http.post(url, data=b"{not json", headers=auth) as answer:
                    assert answer.status == 400
                    assert "malformed JSON" in (await answer.json())["detail"]
                body = orjson.dumps({"id": "http-1", "symbol": "NOPEUSDT", "side": "BUY"})
                async with http.post(url, data=body, headers=auth) as answer:
                    doc = await answer.json()
                    assert doc["accepted"] is False
                    assert doc["reason"] == "unknown_symbol"
            # garbage on both websockets: refused and counted, the streams keep going
            for conn in list(venue.hub.connections):
                if conn.route == "market":
                    conn.send(b'{"e": "markPriceUpdate", "s": "ETHUSDT", "p": "oops"}')
                    conn.send(b"not json at all")
                elif conn.listen_key is not None:
                    conn.send(b'{"e": "ORDER_TRADE_UPDATE", "E": 1, "o": {"s": "ETHUSDT"}}')
            await until(lambda: daemon.market.health.malformed >= 2, what="market garbage counted")
            await until(lambda: daemon.user.health.malformed >= 1, what="user garbage counted")
            assert daemon.current_summary()["malformed_messages"] >= 2
            # and the daemon still trades
            position_id = await open_long(running, "good-1")
            await venue.step(1000)
            await venue.set_mark(SYMBOL, "2440.00")
            store = daemon.desk.store
            await until(lambda: store.get_position(position_id).status == "closed", what="stop")
            summary = daemon.current_summary()
            assert summary["intents_rejected"] == {"invalid": 3, "unknown_symbol": 1}


async def test_silent_stream_falls_back_to_premium_index_polling(tmp_path: Path) -> None:
    async with simulator("one-way") as venue:
        await venue.set_mark(SYMBOL, "2500.00")
        async with run_daemon(
            venue, tmp_path, market={"stale_after_s": 1.0, "poll_interval_s": 0.2}
        ) as running:
            daemon = running.daemon
            position_id = await open_long(running)
            # the venue's mark moves but nothing is published on the websocket
            await venue.step(1000)
            venue.exchange.set_price(SYMBOL, Decimal("2440.00"))
            store = daemon.desk.store
            await until(lambda: daemon.market.health.stale, 5, "stale feed detected")
            await until(lambda: store.get_position(position_id).status == "closed", 10, "stop")
            assert daemon.market.health.polled >= 1
            assert [o.reason for o in store.orders(kind="exit")] == ["stop_loss"]
            # the stream speaks again: polling stops
            await venue.step(1000)
            await venue.set_mark(SYMBOL, "2441.00")
            await until(lambda: not daemon.market.health.stale, 5, "feed back")


async def test_rate_limited_exit_backs_off_and_executes_once(tmp_path: Path) -> None:
    async with simulator("hedge") as venue:
        await venue.set_mark(SYMBOL, "2500.00")
        async with run_daemon(venue, tmp_path) as running:
            daemon = running.daemon
            position_id = await open_long(running)
            venue.set_faults(reject_429_rate=1.0)
            await venue.step(1000)
            await venue.set_mark(SYMBOL, "2440.00")
            client = daemon.client
            await until(lambda: client.rate_limits.backoff_until > 0, 5, "429 seen")
            venue.set_faults()
            store = daemon.desk.store
            await venue.step(1000)
            await venue.set_mark(SYMBOL, "2439.00")
            await until(lambda: store.get_position(position_id).status == "closed", 15, "stop")
            assert len(our_orders(venue, "exit")) == 1
            assert venue.exchange.position(SYMBOL, "LONG").amount == 0


async def test_per_symbol_combined_streams_drive_exits(tmp_path: Path) -> None:
    async with simulator("one-way") as venue:
        await venue.set_mark(SYMBOL, "2500.00")
        async with run_daemon(venue, tmp_path, market={"symbols": [SYMBOL, "BTCUSDT"]}) as running:
            daemon = running.daemon
            assert daemon.market.url.endswith(
                "/stream?streams=ethusdt@markPrice@1s/btcusdt@markPrice@1s"
            )
            position_id = await open_long(running)
            await venue.step(1000)
            await venue.set_mark(SYMBOL, "2440.00")
            store = daemon.desk.store
            await until(lambda: store.get_position(position_id).status == "closed", what="stop")
            assert [o.reason for o in store.orders(kind="exit")] == ["stop_loss"]
