"""SQLite store: WAL, versioned schema and migration, write-ahead rows, fill dedupe."""

from __future__ import annotations

import sqlite3
from decimal import Decimal
from pathlib import Path

import pytest

from pyquant.trading.intents import parse_intent
from pyquant.trading.journal import (
    SCHEMA_VERSION,
    Fill,
    OrderRecord,
    PositionRow,
    Reservation,
    Store,
    StoreError,
)


def intent(intent_id: str = "i-1", symbol: str = "BTCUSDT"):
    return parse_intent(
        {"id": intent_id, "symbol": symbol, "side": "BUY", "confidence": 0.6, "size_usd": "150"},
        source="test",
        now_ms=1_700_000_000_000,
    )


def test_fresh_database_is_wal_at_latest_version(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "state" / "pyquant.sqlite")
    assert store.schema_version == SCHEMA_VERSION
    mode = store._db.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    tag = store.instance_tag
    assert len(tag) == 4
    store.close()
    # reopening keeps the tag (client ids stay stable across restarts)
    assert Store.open(tmp_path / "state" / "pyquant.sqlite").instance_tag == tag


def test_migration_from_version_1_keeps_data(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    old = Store.open(path, target_version=1)
    assert old.schema_version == 1
    old._db.execute(
        "INSERT INTO intents(intent_id, symbol, source, decision, reason, decided_at_ms) "
        "VALUES ('i-1', 'BTCUSDT', 'test', 'accepted', 'accepted', 1)"
    )
    old._db.execute(
        "INSERT INTO orders(client_order_id, kind, position_id, symbol, position_side, side, "
        "sequence, attempt, params, status, created_at_ms, updated_at_ms) "
        "VALUES ('pqx-1-e0-0','entry','1','BTCUSDT','LONG','BUY',0,0,'{}','FILLED',1,1)"
    )
    tag = old.instance_tag
    # version 1 has no reservations table
    with pytest.raises(sqlite3.OperationalError):
        old.reservations()
    old.close()

    store = Store.open(path)
    assert store.schema_version == SCHEMA_VERSION
    assert store.instance_tag == tag
    assert store.intent_seen("i-1")
    row = store.get_order("pqx-1-e0-0")
    assert row is not None
    assert row.status == "FILLED"
    assert row.exchange_time_ms == 0  # the column added by v2, defaulted
    assert store.reservations() == []
    versions = [r[0] for r in store._db.execute("SELECT version FROM schema_version ORDER BY 1")]
    assert versions == [1, 2, 3, 4]
    assert row.engine_applied is False


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite"
    store = Store.open(path)
    store._db.execute("INSERT INTO schema_version VALUES (?, 0)", (SCHEMA_VERSION + 1,))
    store.close()
    with pytest.raises(StoreError, match="newer than this pyquant supports"):
        Store.open(path)


def test_order_rows_round_trip_and_update() -> None:
    store = Store.open(":memory:")
    params = {"symbol": "BTCUSDT", "side": "SELL", "quantity": "0.003"}
    store.insert_order(
        OrderRecord(
            "pqa-1-x1-0", "exit", "1", "BTCUSDT", "LONG", "SELL", 1, 0, params, "SENT", "stop_loss"
        )
    )
    with pytest.raises(sqlite3.IntegrityError):
        store.insert_order(
            OrderRecord("pqa-1-x1-0", "exit", "1", "BTCUSDT", "LONG", "SELL", 1, 0, params, "SENT")
        )
    store.update_order("pqa-1-x1-0", status="FILLED", executed_qty="0.003", rest_final=True)
    row = store.get_order("pqa-1-x1-0")
    assert row is not None
    assert (row.status, row.executed_qty, row.rest_final, row.stream_final) == (
        "FILLED",
        "0.003",
        True,
        False,
    )
    assert row.params == params
    assert store.max_attempt("1", "exit", 1) == 0
    assert store.max_attempt("1", "exit", 2) is None
    with pytest.raises(ValueError, match="cannot be updated"):
        store.update_order("pqa-1-x1-0", params="{}")


def test_fills_dedupe_on_trade_id_and_pnl_is_exact() -> None:
    store = Store.open(":memory:")
    fill = Fill(
        "BTCUSDT", "77", "c", "9", "SELL", "LONG", "30120.0", "0.003", "0.0451", "USDT", "0.36", 5
    )
    assert store.add_fill(fill)
    assert not store.add_fill(fill)  # TRADE_LITE and ORDER_TRADE_UPDATE carry the same trade
    store.add_fill(
        Fill("BTCUSDT", "78", "c", "9", "SELL", "LONG", "30120.0", "0.001", "0.1", None, "0.1", 6)
    )
    assert len(store.fills()) == 2
    assert store.realized_pnl() == Decimal("0.36") - Decimal("0.0451") + Decimal("0.1") - Decimal(
        "0.1"
    )


def test_intent_decisions_counters_and_malformed() -> None:
    store = Store.open(":memory:")
    store.record_intent_decision(intent("a"), "accepted", "accepted", position_id="1")
    store.record_intent_decision(intent("a"), "rejected", "duplicate_intent", "seen")
    store.record_malformed_intent("jsonl", {"id": "b", "side": "UP"}, "invalid", "side was 'UP'")
    assert store.counter("intents_accepted") == 1
    assert store.counters("intents_rejected") == {"duplicate_intent": 1, "invalid": 1}
    decisions = store.intent_decisions("a")
    assert [d["reason"] for d in decisions] == ["accepted", "duplicate_intent"]
    assert not store.intent_seen("b")  # a corrected resend of a malformed payload is decided
    malformed = store.intent_decisions("b")[0]
    assert malformed["decision"] == "rejected"
    assert "UP" in malformed["payload"]


def test_transaction_is_atomic() -> None:
    store = Store.open(":memory:")
    store.add_reservation(Reservation("BTCUSDT", "LONG", "i", "1", Decimal("100"), 1))

    def add_both() -> None:
        with store.transaction():
            store.upsert_position(
                PositionRow(
                    "2",
                    "ETHUSDT",
                    "LONG",
                    "opening",
                    "entry",
                    "0",
                    None,
                    1,
                    None,
                    "j",
                    None,
                    None,
                    None,
                )
            )
            store.add_reservation(Reservation("BTCUSDT", "LONG", "j", "2", Decimal("100"), 2))

    with pytest.raises(sqlite3.IntegrityError):
        add_both()
    assert store.get_position("2") is None  # rolled back with the failed reservation


def test_cooldowns_snapshot_positions() -> None:
    store = Store.open(":memory:")
    store.set_cooldown("BTCUSDT", "LONG", 2_000)
    store.set_cooldown("BTCUSDT", "LONG", 1_000)  # keeps the later one
    assert store.cooldowns(1_500) == {("BTCUSDT", "LONG"): 2_000}
    assert store.cooldowns(2_000) == {}
    assert store.load_snapshot() is None
    store.save_snapshot(b"\x00engine")
    store.save_snapshot(b"\x01engine")
    assert store.load_snapshot() == b"\x01engine"
    assert store.next_position_number() == 1
    assert store.next_position_number() == 2
