"""SQLite journal of the trading core: intents, orders, fills, positions and engine state.

One ``Store`` per daemon owns one SQLite file in WAL mode. Every write is a short synchronous
transaction made from the event-loop thread. That is a deliberate choice over a writer thread:
each write is well under a millisecond, the write-ahead rule ("the order row is committed before
the request is sent") then holds by plain program order, and no cross-thread queue can reorder a
decision and its order. ``synchronous=NORMAL`` in WAL mode survives ``kill -9`` of the process
(committed pages are in the OS cache); ``durability="full"`` adds an fsync per commit for power
loss, at about a millisecond per order on an SSD.

Schema (version ``SCHEMA_VERSION``; ``schema_version`` records every applied migration):

* ``meta``: key/value (``instance_tag``: random per database, part of every clientOrderId so a
  fresh database never collides with orders of an earlier one).
* ``intents``: every intent seen, with its decision (``accepted``/``rejected``), stable reason,
  detail, the raw payload and the position id it opened. Malformed payloads are rows too.
* ``orders``: one row per request attempt, keyed by ``client_order_id``; params exactly as sent.
* ``fills``: one row per trade, deduplicated on ``(symbol, trade_id)``.
* ``positions``: our view of each position (``opening``, ``open``, ``closed``).
* ``engine_snapshot``: the exit engine's latest ``snapshot()`` blob.
* ``reservations``: entries in flight per (symbol, leg), held until fill or reject.
* ``cooldowns``: no new entry on (symbol, leg) until ``until_ms``.
* ``counters``: summary counters ``(name, key) -> count``.
* ``halts``: the kill switch's latch. A row without ``cleared_at_ms`` is an active halt: no
  new entries on this state (exits and the flatten go on) until ``pyquant resume`` clears it.
  Written by the flatten before it does anything else, so a daemon killed mid-flatten, or any
  other daemon on the same state, sees it.

Where it lives: in ``pyquant.trading`` because its writers are the trading desk (guard,
router, desk, kill switch, intent sources, recovery); the daemon opens it, and
``pyquant.scale.membership`` only reads its order rows. The simulator and the backtest never
use it. It may not import the daemon, the exchange clients or the engine.

Usage::

    store = Store.open(state_dir / "pyquant.sqlite")
    store.record_intent_decision(intent, "accepted", "accepted", "", position_id="1a")
    store.insert_order(OrderRecord(...))      # before the request goes out
    store.update_order(cid, status="FILLED", executed_qty="0.003")
    store.close()
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
import stat
import string
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pyquant.errors import PyquantError
from pyquant.trading.intents import Intent

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 4

# Each entry migrates from version i to i + 1 (index 0 creates version 1). Never edit an applied
# migration: add a new one, and a test that migrates a database of the previous version.
MIGRATIONS: tuple[str, ...] = (
    # v1: the journal as first released.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE intents (
        row_id INTEGER PRIMARY KEY AUTOINCREMENT,
        intent_id TEXT,
        symbol TEXT,
        side TEXT,
        confidence REAL,
        created_at_ms INTEGER,
        source TEXT NOT NULL,
        size_usd TEXT,
        leverage INTEGER,
        payload TEXT,
        decision TEXT NOT NULL,
        reason TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '',
        position_id TEXT,
        decided_at_ms INTEGER NOT NULL
    );
    CREATE INDEX intents_by_id ON intents(intent_id);
    CREATE TABLE orders (
        client_order_id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        position_id TEXT NOT NULL,
        symbol TEXT NOT NULL,
        position_side TEXT NOT NULL,
        side TEXT NOT NULL,
        sequence INTEGER NOT NULL,
        attempt INTEGER NOT NULL,
        params TEXT NOT NULL,
        status TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        exchange_order_id TEXT,
        executed_qty TEXT NOT NULL DEFAULT '0',
        avg_price TEXT,
        error_code INTEGER,
        error_msg TEXT,
        rest_final INTEGER NOT NULL DEFAULT 0,
        stream_final INTEGER NOT NULL DEFAULT 0,
        created_at_ms INTEGER NOT NULL,
        updated_at_ms INTEGER NOT NULL
    );
    CREATE INDEX orders_by_position ON orders(position_id);
    CREATE TABLE fills (
        symbol TEXT NOT NULL,
        trade_id TEXT NOT NULL,
        client_order_id TEXT,
        exchange_order_id TEXT,
        side TEXT NOT NULL,
        position_side TEXT NOT NULL,
        price TEXT NOT NULL,
        quantity TEXT NOT NULL,
        commission TEXT NOT NULL DEFAULT '0',
        commission_asset TEXT,
        realized_pnl TEXT NOT NULL DEFAULT '0',
        time_ms INTEGER NOT NULL,
        PRIMARY KEY (symbol, trade_id)
    );
    CREATE TABLE positions (
        position_id TEXT PRIMARY KEY,
        symbol TEXT NOT NULL,
        position_side TEXT NOT NULL,
        status TEXT NOT NULL,
        origin TEXT NOT NULL,
        quantity TEXT NOT NULL DEFAULT '0',
        entry_price TEXT,
        leverage INTEGER NOT NULL DEFAULT 1,
        confidence REAL,
        intent_id TEXT,
        opened_at_ms INTEGER,
        closed_at_ms INTEGER,
        close_reason TEXT
    );
    CREATE INDEX positions_by_status ON positions(status);
    CREATE TABLE engine_snapshot (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        data BLOB NOT NULL,
        taken_at_ms INTEGER NOT NULL
    );
    """,
    # v2: entry reservations, cooldowns and summary counters moved from memory into the journal
    # (so a restart keeps them), and the exchange time of the last order update (stale updates
    # lose by exchange time).
    """
    CREATE TABLE reservations (
        symbol TEXT NOT NULL,
        position_side TEXT NOT NULL,
        intent_id TEXT NOT NULL,
        position_id TEXT NOT NULL,
        notional TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        PRIMARY KEY (symbol, position_side)
    );
    CREATE TABLE cooldowns (
        symbol TEXT NOT NULL,
        position_side TEXT NOT NULL,
        until_ms INTEGER NOT NULL,
        PRIMARY KEY (symbol, position_side)
    );
    CREATE TABLE counters (
        name TEXT NOT NULL,
        key TEXT NOT NULL DEFAULT '',
        count INTEGER NOT NULL,
        PRIMARY KEY (name, key)
    );
    ALTER TABLE orders ADD COLUMN exchange_time_ms INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX orders_by_status ON orders(status);
    """,
    # v3: whether a filled exit was applied to the exit engine (confirm), so a restart can
    # tell an exit that filled while the daemon was down from one the engine already counted.
    """
    ALTER TABLE orders ADD COLUMN engine_applied INTEGER NOT NULL DEFAULT 0;
    """,
    # v4: the kill switch latches: a halt outlives the process that set it.
    """
    CREATE TABLE halts (
        halt_id INTEGER PRIMARY KEY AUTOINCREMENT,
        reason TEXT NOT NULL,
        set_by TEXT NOT NULL,
        set_at_ms INTEGER NOT NULL,
        flattened_at_ms INTEGER,
        flatten_result TEXT,
        cleared_at_ms INTEGER,
        cleared_by TEXT
    );
    CREATE INDEX halts_active ON halts(cleared_at_ms);
    """,
)

# The close reason recovery gives an accepted entry that never reached the venue: the intent
# was not executed, so a resend of it is decided again rather than refused as a duplicate.
UNSENT_ENTRY_DETAIL = "no entry order was sent before the restart"

Decision = Literal["accepted", "rejected"]
# Owner-only: the journal holds the account's positions, orders and intents.
FILE_MODE = 0o600
DIR_MODE = 0o700
Durability = Literal["normal", "full"]


class StoreError(PyquantError):
    """The state database cannot be used (newer schema than this code, corrupt file)."""


@dataclass(frozen=True, slots=True)
class OrderRecord:
    """One order request attempt as written before it is sent.

    Attributes:
        client_order_id: deterministic id (``newClientOrderId`` / ``clientAlgoId``).
        kind: ``entry``, ``exit``, ``backstop`` or ``flatten``.
        position_id: our position id.
        symbol: exchange symbol.
        position_side: ``LONG`` or ``SHORT`` (the leg, in both modes).
        side: ``BUY`` or ``SELL``.
        sequence: the action sequence (0 for an entry).
        attempt: 0 for the first request of this (position, sequence).
        params: the exact wire params.
        status: the order state (see ``pyquant.trading.router.OrderState``).
        reason: why the order exists (exit reason, ``entry``, ``backstop``, ``flatten``).
    """

    client_order_id: str
    kind: str
    position_id: str
    symbol: str
    position_side: str
    side: str
    sequence: int
    attempt: int
    params: Mapping[str, str]
    status: str
    reason: str = ""


@dataclass(slots=True)
class OrderRow:
    """An order as stored (see ``OrderRecord`` for the fields written before sending)."""

    client_order_id: str
    kind: str
    position_id: str
    symbol: str
    position_side: str
    side: str
    sequence: int
    attempt: int
    params: dict[str, str]
    status: str
    reason: str
    exchange_order_id: str | None
    executed_qty: str
    avg_price: str | None
    error_code: int | None
    error_msg: str | None
    rest_final: bool
    stream_final: bool
    created_at_ms: int
    updated_at_ms: int
    exchange_time_ms: int
    engine_applied: bool


@dataclass(slots=True)
class PositionRow:
    """Our record of one position leg."""

    position_id: str
    symbol: str
    position_side: str
    status: str
    origin: str
    quantity: str
    entry_price: str | None
    leverage: int
    confidence: float | None
    intent_id: str | None
    opened_at_ms: int | None
    closed_at_ms: int | None
    close_reason: str | None


@dataclass(frozen=True, slots=True)
class Reservation:
    """An entry in flight on (symbol, leg)."""

    symbol: str
    position_side: str
    intent_id: str
    position_id: str
    notional: Decimal
    created_at_ms: int


@dataclass(frozen=True, slots=True)
class Fill:
    """One trade of one of our orders (``ORDER_TRADE_UPDATE`` with ``x=TRADE``)."""

    symbol: str
    trade_id: str
    client_order_id: str | None
    exchange_order_id: str | None
    side: str
    position_side: str
    price: str
    quantity: str
    commission: str = "0"
    commission_asset: str | None = None
    realized_pnl: str = "0"
    time_ms: int = 0


_ORDER_COLUMNS = (
    "client_order_id, kind, position_id, symbol, position_side, side, sequence, attempt, params, "
    "status, reason, exchange_order_id, executed_qty, avg_price, error_code, error_msg, "
    "rest_final, stream_final, created_at_ms, updated_at_ms, exchange_time_ms, engine_applied"
)
_POSITION_COLUMNS = (
    "position_id, symbol, position_side, status, origin, quantity, entry_price, leverage, "
    "confidence, intent_id, opened_at_ms, closed_at_ms, close_reason"
)
_ORDER_UPDATABLE = frozenset(
    {
        "status",
        "exchange_order_id",
        "executed_qty",
        "avg_price",
        "error_code",
        "error_msg",
        "rest_final",
        "stream_final",
        "exchange_time_ms",
        "reason",
        "engine_applied",
    }
)
_POSITION_UPDATABLE = frozenset(
    {
        "status",
        "quantity",
        "entry_price",
        "leverage",
        "opened_at_ms",
        "closed_at_ms",
        "close_reason",
    }
)
_TAG_ALPHABET = string.ascii_lowercase + string.digits


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Halt:
    """An active (or cleared) halt: why, who set it, and what its flatten reported."""

    halt_id: int
    reason: str
    set_by: str
    set_at_ms: int
    flattened_at_ms: int | None = None
    flatten_result: str | None = None
    cleared_at_ms: int | None = None
    cleared_by: str | None = None


def secure_state_dir(path: Path) -> None:
    """Create ``path`` owner-only (0700); warn about an existing one others can enter.

    An existing directory is not changed (``--state .`` must not lock the user out of
    their working directory's group): the journal's own files are 0600 in any case.
    """
    if not path.exists():
        path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        path.chmod(DIR_MODE)  # mkdir's mode is cut by the umask; make it exact
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        logger.warning(
            "State directory is open to other users path=%s mode=%o: chmod 700 it "
            "(the journal files themselves are owner-only)",
            path,
            mode,
        )


def secure_file(path: Path) -> None:
    """Make an existing file owner-only (0600); a missing one is left alone."""
    try:
        path.chmod(FILE_MODE)
    except FileNotFoundError:
        return


class Store:
    """The SQLite journal; see the module docstring for the schema and the threading rule."""

    def __init__(self, connection: sqlite3.Connection, clock: Callable[[], int] = _now_ms) -> None:
        self._db = connection
        self._clock = clock

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        durability: Durability = "normal",
        clock: Callable[[], int] = _now_ms,
        target_version: int = SCHEMA_VERSION,
    ) -> Store:
        """Open (creating or migrating) the journal at ``path``; ``:memory:`` for tests.

        Args:
            path: the database file.
            durability: ``normal`` survives a process kill; ``full`` also a power loss.
            clock: milliseconds since the epoch, injected for tests.
            target_version: migrate only this far (tests build old databases with it).

        Raises:
            StoreError: the file has a newer schema than this code knows.
        """
        on_disk = str(path) != ":memory:"
        if on_disk:
            Path(path).parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
            # Created owner-only (0600) before SQLite opens it; an older file is tightened.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE))
            secure_file(Path(path))
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE in `_tx`).
        db = sqlite3.connect(str(path), isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        if on_disk:
            # The WAL and shared-memory files take the database file's mode; tighten any
            # left by an older pyquant.
            for suffix in ("-wal", "-shm"):
                secure_file(Path(f"{path}{suffix}"))
        db.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA busy_timeout=5000")
        store = cls(db, clock)
        store._migrate(target_version)
        return store

    def close(self) -> None:
        """Close the database (checkpointing the WAL)."""
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group several writes into one atomic transaction (nesting is not supported)."""
        with self._tx():
            yield

    def _in_tx(self) -> bool:
        return self._db.in_transaction

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        # Inside `transaction()` the caller's transaction covers this write.
        if self._in_tx():
            yield self._db
        else:
            with self._tx() as db:
                yield db

    # ---- schema -----------------------------------------------------------------------------

    @property
    def schema_version(self) -> int:
        """Return the applied schema version (0 for an empty file)."""
        row = self._db.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name='schema_version'"
        ).fetchone()
        if row is None:
            return 0
        found = self._db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
        return int(found or 0)

    def _migrate(self, target: int) -> None:
        current = self.schema_version
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"state database schema version {current} is newer than this pyquant "
                f"supports ({SCHEMA_VERSION}); upgrade pyquant or use another --state directory"
            )
        if current == 0:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS schema_version "
                "(version INTEGER PRIMARY KEY, applied_at_ms INTEGER NOT NULL)"
            )
        for version in range(current + 1, target + 1):
            script = MIGRATIONS[version - 1]
            # executescript commits implicitly, so wrap the script's statements ourselves:
            # a crash mid-migration must leave the previous version intact.
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _split_sql(script):
                    self._db.execute(statement)
                self._db.execute(
                    "INSERT INTO schema_version(version, applied_at_ms) VALUES (?, ?)",
                    (version, self._clock()),
                )
                if version == 1:
                    self._db.execute(
                        "INSERT INTO meta(key, value) VALUES ('instance_tag', ?)",
                        ("".join(secrets.choice(_TAG_ALPHABET) for _ in range(4)),),
                    )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ---- meta -------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        """Return a meta value, or None."""
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        """Set a meta value."""
        with self._write() as db:
            db.execute(
                "INSERT INTO meta(key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    @property
    def instance_tag(self) -> str:
        """Return this database's random tag (4 characters of [a-z0-9])."""
        tag = self.get_meta("instance_tag")
        if tag is None:  # pragma: no cover - written by migration 1
            raise StoreError("state database has no instance_tag; it was not created by pyquant")
        return tag

    def next_position_number(self) -> int:
        """Allocate the next position number (monotonic for this database)."""
        with self._write() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'position_counter'").fetchone()
            number = int(row[0]) + 1 if row is not None else 1
            db.execute(
                "INSERT INTO meta(key, value) VALUES ('position_counter', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (str(number),),
            )
        return number

    # ---- halt (the kill switch's latch) -----------------------------------------------------

    def halt(self) -> Halt | None:
        """Return the active halt, or None (read fresh each call: another process may set it)."""
        row = self._db.execute(
            "SELECT * FROM halts WHERE cleared_at_ms IS NULL ORDER BY halt_id LIMIT 1"
        ).fetchone()
        return None if row is None else Halt(**dict(row))

    def set_halt(self, reason: str, set_by: str) -> Halt:
        """Latch a halt (or return the one already active): no new entries until cleared."""
        with self._write() as db:
            row = db.execute(
                "SELECT * FROM halts WHERE cleared_at_ms IS NULL ORDER BY halt_id LIMIT 1"
            ).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO halts(reason, set_by, set_at_ms) VALUES (?, ?, ?)",
                    (reason[:512], set_by[:128], self._clock()),
                )
                row = db.execute(
                    "SELECT * FROM halts WHERE halt_id = last_insert_rowid()"
                ).fetchone()
        return Halt(**dict(row))

    def record_flatten(self, halt_id: int, result: str) -> None:
        """Record what the flatten of a halt reported (``pyquant flatten`` waits for it)."""
        with self._write() as db:
            db.execute(
                "UPDATE halts SET flattened_at_ms = ?, flatten_result = ? WHERE halt_id = ?",
                (self._clock(), result[:4096], halt_id),
            )

    def clear_halt(self, cleared_by: str) -> Halt | None:
        """Clear the active halt (``pyquant resume``); return it, or None if none was set."""
        active = self.halt()
        if active is None:
            return None
        now = self._clock()
        with self._write() as db:
            db.execute(
                "UPDATE halts SET cleared_at_ms = ?, cleared_by = ? WHERE cleared_at_ms IS NULL",
                (now, cleared_by[:128]),
            )
        return Halt(
            active.halt_id,
            active.reason,
            active.set_by,
            active.set_at_ms,
            active.flattened_at_ms,
            active.flatten_result,
            now,
            cleared_by,
        )

    # ---- intents ----------------------------------------------------------------------------

    def intent_seen(self, intent_id: str) -> bool:
        """Return True when an intent with this id was decided before (accepted or rejected).

        A malformed payload that only carried the id does not count: its corrected resend
        is decided normally. Nor does an accepted intent whose entry was never sent (the
        daemon was killed between the decision and the order; recovery closed its position
        with ``UNSENT_ENTRY_DETAIL``): it was not executed, so its resend (the JSONL line
        read again after the restart) is decided again: executed, or refused with a reason
        such as ``stale``, never dropped as a duplicate.
        """
        row = self._db.execute(
            "SELECT 1 FROM intents i WHERE i.intent_id = ? AND i.symbol IS NOT NULL AND NOT ("
            " i.decision = 'accepted'"
            " AND EXISTS (SELECT 1 FROM positions p WHERE p.position_id = i.position_id"
            "  AND p.status = 'closed' AND instr(p.close_reason, ?) > 0)"
            " AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.position_id = i.position_id"
            "  AND o.kind = 'entry')"
            ") LIMIT 1",
            (intent_id, UNSENT_ENTRY_DETAIL),
        ).fetchone()
        return row is not None

    def record_intent_decision(
        self,
        intent: Intent,
        decision: Decision,
        reason: str,
        detail: str = "",
        *,
        position_id: str | None = None,
        payload: object = None,
    ) -> None:
        """Record one intent (an ``Intent``) and the guard's decision about it.

        Raises:
            ValueError: a number does not fit a SQLite integer (``parse_intent`` bounds them
                all first; this keeps a bad row out however the intent was built).
        """
        _check_int64("created_at_ms", intent.created_at_ms)
        if intent.leverage is not None:
            _check_int64("leverage", intent.leverage)
        with self._write() as db:
            db.execute(
                "INSERT INTO intents(intent_id, symbol, side, confidence, created_at_ms, source, "
                "size_usd, leverage, payload, decision, reason, detail, position_id, "
                "decided_at_ms) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    intent.intent_id,
                    intent.symbol,
                    intent.side,
                    intent.confidence,
                    intent.created_at_ms,
                    intent.source,
                    None if intent.size_usd is None else str(intent.size_usd),
                    intent.leverage,
                    _payload_text(payload),
                    decision,
                    reason,
                    detail,
                    position_id,
                    self._clock(),
                ),
            )
            self._bump(
                db,
                "intents_accepted" if decision == "accepted" else "intents_rejected",
                "" if decision == "accepted" else reason,
            )

    def record_malformed_intent(
        self, source: str, payload: object, reason: str, detail: str
    ) -> None:
        """Record a payload that could not be parsed into an intent."""
        intent_id = payload.get("id") if isinstance(payload, Mapping) else None
        if not isinstance(intent_id, str | int) or isinstance(intent_id, bool):
            intent_id = None
        elif isinstance(intent_id, int) and intent_id.bit_length() > 200:
            intent_id = None  # str() of a huge int raises; such an id is no id
        with self._write() as db:
            db.execute(
                "INSERT INTO intents(intent_id, source, payload, decision, reason, detail, "
                "decided_at_ms) VALUES (?, ?, ?, 'rejected', ?, ?, ?)",
                (
                    None if intent_id is None else str(intent_id)[:64],
                    source,
                    _payload_text(payload),
                    reason,
                    detail,
                    self._clock(),
                ),
            )
            self._bump(db, "intents_rejected", reason)

    def intent_decisions(self, intent_id: str | None = None) -> list[dict[str, Any]]:
        """Return recorded decisions (all, or those of one intent id), oldest first."""
        if intent_id is None:
            rows = self._db.execute("SELECT * FROM intents ORDER BY row_id").fetchall()
        else:
            rows = self._db.execute(
                "SELECT * FROM intents WHERE intent_id = ? ORDER BY row_id", (intent_id,)
            ).fetchall()
        return [dict(row) for row in rows]

    # ---- orders -----------------------------------------------------------------------------

    def insert_order(self, record: OrderRecord) -> None:
        """Write an order attempt before its request is sent (the write-ahead record).

        Raises:
            sqlite3.IntegrityError: the client order id exists already (a resend bug).
        """
        now = self._clock()
        with self._write() as db:
            db.execute(
                "INSERT INTO orders(client_order_id, kind, position_id, symbol, position_side, "
                "side, sequence, attempt, params, status, reason, created_at_ms, updated_at_ms) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    record.client_order_id,
                    record.kind,
                    record.position_id,
                    record.symbol,
                    record.position_side,
                    record.side,
                    record.sequence,
                    record.attempt,
                    json.dumps(dict(record.params), sort_keys=True),
                    record.status,
                    record.reason,
                    now,
                    now,
                ),
            )

    def update_order(self, client_order_id: str, **fields: object) -> None:
        """Update named columns of an order row (see ``OrderRow``)."""
        unknown = set(fields) - _ORDER_UPDATABLE
        if unknown:
            raise ValueError(f"order fields {sorted(unknown)} cannot be updated")
        if not fields:
            return
        names = sorted(fields)
        assignments = ", ".join(f"{name} = ?" for name in names)
        values = [_sql_value(fields[name]) for name in names]
        with self._write() as db:
            db.execute(
                f"UPDATE orders SET {assignments}, updated_at_ms = ? "  # noqa: S608 - names are whitelisted
                "WHERE client_order_id = ?",
                (*values, self._clock(), client_order_id),
            )

    def get_order(self, client_order_id: str) -> OrderRow | None:
        """Return one order row, or None."""
        row = self._db.execute(
            f"SELECT {_ORDER_COLUMNS} FROM orders WHERE client_order_id = ?",  # noqa: S608
            (client_order_id,),
        ).fetchone()
        return None if row is None else _order_row(row)

    def orders(
        self,
        *,
        statuses: Sequence[str] | None = None,
        position_id: str | None = None,
        kind: str | None = None,
    ) -> list[OrderRow]:
        """Return order rows filtered by status, position and kind, oldest first."""
        clauses: list[str] = []
        values: list[Any] = []
        if statuses is not None:
            clauses.append(f"status IN ({', '.join('?' for _ in statuses)})")
            values.extend(statuses)
        if position_id is not None:
            clauses.append("position_id = ?")
            values.append(position_id)
        if kind is not None:
            clauses.append("kind = ?")
            values.append(kind)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._db.execute(
            f"SELECT {_ORDER_COLUMNS} FROM orders {where} ORDER BY created_at_ms, rowid",  # noqa: S608
            values,
        ).fetchall()
        return [_order_row(row) for row in rows]

    def unsettled_orders(self) -> list[OrderRow]:
        """Return orders not yet final on both the REST and the stream side."""
        rows = self._db.execute(
            f"SELECT {_ORDER_COLUMNS} FROM orders "  # noqa: S608
            "WHERE rest_final = 0 OR stream_final = 0 ORDER BY created_at_ms, rowid"
        ).fetchall()
        return [_order_row(row) for row in rows]

    def max_attempt(self, position_id: str, kind: str, sequence: int) -> int | None:
        """Return the highest attempt recorded for (position, kind, sequence), or None."""
        row = self._db.execute(
            "SELECT MAX(attempt) FROM orders WHERE position_id = ? AND kind = ? AND sequence = ?",
            (position_id, kind, sequence),
        ).fetchone()
        return None if row[0] is None else int(row[0])

    def max_sequence(self, position_id: str, kind: str) -> int | None:
        """Return the highest sequence recorded for (position, kind), or None."""
        row = self._db.execute(
            "SELECT MAX(sequence) FROM orders WHERE position_id = ? AND kind = ?",
            (position_id, kind),
        ).fetchone()
        return None if row[0] is None else int(row[0])

    # ---- fills ------------------------------------------------------------------------------

    def add_fill(self, fill: Fill) -> bool:
        """Record a fill; return False when this (symbol, trade id) was recorded already."""
        with self._write() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO fills(symbol, trade_id, client_order_id, exchange_order_id, "
                "side, position_side, price, quantity, commission, commission_asset, "
                "realized_pnl, time_ms) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    fill.symbol,
                    fill.trade_id,
                    fill.client_order_id,
                    fill.exchange_order_id,
                    fill.side,
                    fill.position_side,
                    fill.price,
                    fill.quantity,
                    fill.commission,
                    fill.commission_asset,
                    fill.realized_pnl,
                    fill.time_ms,
                ),
            )
            return cursor.rowcount == 1

    def fills(self, client_order_id: str | None = None) -> list[Fill]:
        """Return recorded fills (all, or one order's), in time order."""
        if client_order_id is None:
            rows = self._db.execute("SELECT * FROM fills ORDER BY time_ms, rowid").fetchall()
        else:
            rows = self._db.execute(
                "SELECT * FROM fills WHERE client_order_id = ? ORDER BY time_ms, rowid",
                (client_order_id,),
            ).fetchall()
        return [Fill(**dict(row)) for row in rows]

    def realized_pnl(self) -> Decimal:
        """Return the sum of realized PnL minus commissions in the quote asset, exactly."""
        total = Decimal(0)
        for row in self._db.execute("SELECT realized_pnl, commission FROM fills"):
            total += Decimal(row[0]) - Decimal(row[1])
        return total

    # ---- positions --------------------------------------------------------------------------

    def upsert_position(self, position: PositionRow) -> None:
        """Insert or replace a position row."""
        with self._write() as db:
            db.execute(
                f"INSERT OR REPLACE INTO positions({_POSITION_COLUMNS}) "  # noqa: S608
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    position.position_id,
                    position.symbol,
                    position.position_side,
                    position.status,
                    position.origin,
                    position.quantity,
                    position.entry_price,
                    position.leverage,
                    position.confidence,
                    position.intent_id,
                    position.opened_at_ms,
                    position.closed_at_ms,
                    position.close_reason,
                ),
            )

    def update_position(self, position_id: str, **fields: object) -> None:
        """Update named columns of a position row."""
        unknown = set(fields) - _POSITION_UPDATABLE
        if unknown:
            raise ValueError(f"position fields {sorted(unknown)} cannot be updated")
        names = sorted(fields)
        assignments = ", ".join(f"{name} = ?" for name in names)
        with self._write() as db:
            db.execute(
                f"UPDATE positions SET {assignments} WHERE position_id = ?",  # noqa: S608
                (*[_sql_value(fields[name]) for name in names], position_id),
            )

    def get_position(self, position_id: str) -> PositionRow | None:
        """Return one position row, or None."""
        row = self._db.execute(
            f"SELECT {_POSITION_COLUMNS} FROM positions WHERE position_id = ?",  # noqa: S608
            (position_id,),
        ).fetchone()
        return None if row is None else PositionRow(**dict(row))

    def positions(self, statuses: Sequence[str] = ("opening", "open")) -> list[PositionRow]:
        """Return positions with one of ``statuses`` (default: not closed)."""
        rows = self._db.execute(
            f"SELECT {_POSITION_COLUMNS} FROM positions "  # noqa: S608
            f"WHERE status IN ({', '.join('?' for _ in statuses)}) ORDER BY rowid",
            tuple(statuses),
        ).fetchall()
        return [PositionRow(**dict(row)) for row in rows]

    # ---- engine snapshot --------------------------------------------------------------------

    def save_snapshot(self, data: bytes) -> None:
        """Replace the stored engine snapshot."""
        with self._write() as db:
            db.execute(
                "INSERT INTO engine_snapshot(id, data, taken_at_ms) VALUES (1, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET data = excluded.data, "
                "taken_at_ms = excluded.taken_at_ms",
                (data, self._clock()),
            )

    def load_snapshot(self) -> bytes | None:
        """Return the stored engine snapshot, or None."""
        row = self._db.execute("SELECT data FROM engine_snapshot WHERE id = 1").fetchone()
        return None if row is None else bytes(row[0])

    # ---- reservations and cooldowns ---------------------------------------------------------

    def add_reservation(self, reservation: Reservation) -> None:
        """Hold (symbol, leg) for an entry in flight.

        Raises:
            sqlite3.IntegrityError: the leg is reserved already.
        """
        with self._write() as db:
            db.execute(
                "INSERT INTO reservations(symbol, position_side, intent_id, position_id, notional, "
                "created_at_ms) VALUES (?,?,?,?,?,?)",
                (
                    reservation.symbol,
                    reservation.position_side,
                    reservation.intent_id,
                    reservation.position_id,
                    str(reservation.notional),
                    reservation.created_at_ms,
                ),
            )

    def release_reservation(self, position_id: str) -> None:
        """Release the reservation held for a position's entry (no-op when none)."""
        with self._write() as db:
            db.execute("DELETE FROM reservations WHERE position_id = ?", (position_id,))

    def reservations(self) -> list[Reservation]:
        """Return every reservation."""
        rows = self._db.execute("SELECT * FROM reservations ORDER BY created_at_ms").fetchall()
        return [
            Reservation(
                symbol=row["symbol"],
                position_side=row["position_side"],
                intent_id=row["intent_id"],
                position_id=row["position_id"],
                notional=Decimal(row["notional"]),
                created_at_ms=int(row["created_at_ms"]),
            )
            for row in rows
        ]

    def set_cooldown(self, symbol: str, position_side: str, until_ms: int) -> None:
        """Refuse entries on (symbol, leg) until ``until_ms`` (keeps the later of two)."""
        with self._write() as db:
            db.execute(
                "INSERT INTO cooldowns(symbol, position_side, until_ms) VALUES (?,?,?) "
                "ON CONFLICT(symbol, position_side) DO UPDATE SET "
                "until_ms = MAX(until_ms, excluded.until_ms)",
                (symbol, position_side, until_ms),
            )

    def cooldowns(self, now_ms: int) -> dict[tuple[str, str], int]:
        """Return cooldowns still running at ``now_ms``: (symbol, leg) -> until_ms."""
        rows = self._db.execute(
            "SELECT symbol, position_side, until_ms FROM cooldowns WHERE until_ms > ?", (now_ms,)
        ).fetchall()
        return {(row[0], row[1]): int(row[2]) for row in rows}

    # ---- counters ---------------------------------------------------------------------------

    @staticmethod
    def _bump(db: sqlite3.Connection, name: str, key: str = "", by: int = 1) -> None:
        db.execute(
            "INSERT INTO counters(name, key, count) VALUES (?, ?, ?) "
            "ON CONFLICT(name, key) DO UPDATE SET count = count + excluded.count",
            (name, key, by),
        )

    def bump(self, name: str, key: str = "", by: int = 1) -> None:
        """Add ``by`` to counter (name, key)."""
        with self._write() as db:
            self._bump(db, name, key, by)

    def counters(self, name: str) -> dict[str, int]:
        """Return the counters of one name: key -> count."""
        rows = self._db.execute(
            "SELECT key, count FROM counters WHERE name = ? AND count != 0 ORDER BY key", (name,)
        ).fetchall()
        return {str(row[0]): int(row[1]) for row in rows}

    def counter(self, name: str, key: str = "") -> int:
        """Return one counter's value (0 when never bumped)."""
        return self.counters(name).get(key, 0)


def _split_sql(script: str) -> list[str]:
    # The migrations contain no string literals with ';', so a plain split is exact.
    return [part.strip() for part in script.split(";") if part.strip()]


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _check_int64(field: str, value: int) -> None:
    if not _INT64_MIN <= value <= _INT64_MAX:
        shown = value if value.bit_length() <= 200 else f"<integer of {value.bit_length()} bits>"
        raise ValueError(f"intent field {field!r} was {shown}: out of the journal's integer range")


def _payload_text(payload: object) -> str | None:
    if payload is None:
        return None
    if isinstance(payload, bytes | bytearray):
        return bytes(payload).decode("utf-8", "replace")[:4096]
    if isinstance(payload, str):
        return payload[:4096]
    try:
        return json.dumps(payload, default=str, sort_keys=True)[:4096]
    except (TypeError, ValueError, RecursionError):
        # Unserializable, a huge int, or nested too deeply: keep what can be shown safely.
        return f"<unrecordable {type(payload).__name__} payload>"


def _sql_value(value: object) -> object:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, Decimal):
        return str(value)
    return value


def _order_row(row: sqlite3.Row) -> OrderRow:
    data = dict(row)
    data["params"] = json.loads(data["params"])
    data["rest_final"] = bool(data["rest_final"])
    data["stream_final"] = bool(data["stream_final"])
    data["engine_applied"] = bool(data["engine_applied"])
    return OrderRow(**data)
