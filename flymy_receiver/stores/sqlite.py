"""An SQLite idempotency store and delivery journal, shared by the worker processes of one
machine.

The database runs in WAL mode with a busy timeout, and every claim is one ``BEGIN
IMMEDIATE`` transaction, so that of many processes claiming one event at once exactly one
wins; the journal entry is written in that same transaction, and each handler outcome in the
transaction that records it. Each thread of each process opens its own connection, and a
process forked from one that already had a connection (gunicorn forks its workers) opens a
fresh one. Times are wall-clock seconds, since several processes compare them.

Tables are created with ``CREATE TABLE IF NOT EXISTS``: a file written by an older version
gains the journal's tables and keeps its records.
"""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from ..errors import StoreUnavailable
from .base import Claim, ClaimState
from .records import (
    HandlerOutcome,
    JournalEntry,
    NewEntry,
    Refusal,
    outcomes_from_json,
    to_datetime,
)

__all__ = ["SQLiteStore"]

logger = logging.getLogger("flymy_receiver")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS flymy_deliveries (
    key TEXT PRIMARY KEY,
    token TEXT NOT NULL,
    done INTEGER NOT NULL,
    expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS flymy_handlers (
    key TEXT NOT NULL,
    handler TEXT NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (key, handler)
);
CREATE INDEX IF NOT EXISTS flymy_deliveries_expires ON flymy_deliveries (expires);
CREATE INDEX IF NOT EXISTS flymy_handlers_expires ON flymy_handlers (expires);
CREATE TABLE IF NOT EXISTS flymy_journal (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    event TEXT NOT NULL,
    run_id TEXT,
    agent_id TEXT,
    agent_name TEXT,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    received_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    retention REAL NOT NULL,
    expires REAL NOT NULL,
    headers BLOB NOT NULL,
    handlers BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS flymy_journal_run ON flymy_journal (run_id);
CREATE TABLE IF NOT EXISTS flymy_journal_bodies (
    id INTEGER PRIMARY KEY,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS flymy_refusals (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    status INTEGER NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL
);
"""
# What a journaled delivery writes is kept to few pages, since in WAL mode every page a
# transaction changes is appended to the log (and that, not the statements, is what a
# delivery's store calls cost): ``id`` is the arrival order, so listing needs no index of its
# own; the body, written once, has a table of its own (SQLite rewrites a whole row, overflow
# pages included, on every update); the state and the expiry have no index (lists filter as
# they scan, the purge looks at the oldest rows only).

#: Expired rows are deleted once per this many writes, in the same transaction, at most
#: ``_PURGE_LIMIT`` per table each time (and the journal's oldest ``_PURGE_SCAN`` rows are
#: looked at): a write never pays for a long backlog at once.
_PURGE_EVERY = 50
_PURGE_LIMIT = 200
_PURGE_SCAN = 250

_SELECT_ENTRIES = (
    "SELECT key, event, run_id, agent_id, agent_name, state, attempts, received_at, "
    "updated_at, body, headers, handlers "
    "FROM flymy_journal j JOIN flymy_journal_bodies b ON b.id = j.id "
)

# The claim's row and the entry's, in one read (either may be missing).
_CLAIM_AND_ENTRY = (
    "SELECT d.token, d.done, d.expires, j.expires, j.id FROM (SELECT ? AS key) AS k "
    "LEFT JOIN flymy_deliveries d ON d.key = k.key LEFT JOIN flymy_journal j ON j.key = k.key"
)
# What completing needs: who holds the claim, and the live entry's outcomes.
_COMPLETE_READ = (
    "SELECT d.token, d.done, j.handlers FROM (SELECT ? AS key) AS k "
    "LEFT JOIN flymy_deliveries d ON d.key = k.key "
    "LEFT JOIN flymy_journal j ON j.key = k.key AND j.expires > ?"
)
#: Marks a row not read yet (``None`` is a row read and not found).
_UNREAD: Any = object()

# SQLite's primary result codes for a lock held elsewhere (the only errors worth a retry).
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6


class SQLiteStore:
    """Idempotency records and the delivery journal in an SQLite file, safe for several
    processes on one machine.

    ``timeout`` (seconds) is how long a call waits for a lock held by another process
    before the delivery is answered 503. Do not put the file on a network file system:
    SQLite's locking is only reliable on a local disk. Journal entries are kept for their
    retention after their last change; the newest ``max_refusals`` refusals are kept.
    """

    blocking = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = 5.0,
        max_refusals: int = 1000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = os.fspath(path)
        if self.path in ("", ":memory:") or self.path.startswith("file::memory:"):
            raise ValueError("SQLiteStore needs a file shared by the workers; use MemoryStore")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if max_refusals < 1:
            raise ValueError("max_refusals must be at least 1")
        self.timeout = timeout
        self.max_refusals = max_refusals
        self._clock = clock
        self._local = threading.local()
        self._writes = 0

    def __repr__(self) -> str:
        return f"SQLiteStore({Path(self.path).name!r})"

    # -- the store contract -------------------------------------------------------------

    def claim(
        self,
        key: str,
        lease: float,
        entry: NewEntry | None = None,
        *,
        replay: bool = False,
        force: bool = False,
    ) -> Claim:
        """Take ``key`` for ``lease`` seconds unless it is done or held by a live claim;
        journal ``entry`` in the same transaction."""
        now = self._clock()
        with self._transaction() as db:
            if entry is not None and entry.key == key:
                # One read for both: the claim's row and the entry's.
                token, done, until, expires, entry_id = db.execute(
                    _CLAIM_AND_ENTRY, (key,)
                ).fetchone()
                held = (token, done, until) if until is not None else None
                found = (expires, entry_id) if entry_id is not None else None
            else:
                held = db.execute(
                    "SELECT token, done, expires FROM flymy_deliveries WHERE key = ?", (key,)
                ).fetchone()
                found = _UNREAD
            claim = self._claim(db, key, lease, now, force, held)
            acquired = claim.state is ClaimState.ACQUIRED
            if entry is not None:
                self._journal_delivery(db, entry, now, "pending" if acquired else None, found)
            elif replay and acquired:
                self._journal_update(db, key, now, "pending")
            self._maybe_purge(db, now)
        return claim

    @staticmethod
    def _claim(
        db: sqlite3.Connection, key: str, lease: float, now: float, force: bool, row: Any
    ) -> Claim:
        if row is not None and row[2] > now:
            if row[1]:
                if not force:
                    return Claim(ClaimState.DONE)
            elif row[0]:
                return Claim(ClaimState.BUSY, retry_after=row[2] - now)
        token = secrets.token_hex(8)
        db.execute(
            "INSERT OR REPLACE INTO flymy_deliveries (key, token, done, expires) "
            "VALUES (?, ?, 0, ?)",
            (key, token, now + lease),
        )
        if force:  # every handler runs again: forget which had succeeded
            db.execute("DELETE FROM flymy_handlers WHERE key = ?", (key,))
            return Claim(ClaimState.ACQUIRED, token)
        handlers = db.execute(
            "SELECT handler FROM flymy_handlers WHERE key = ? AND expires > ?", (key, now)
        ).fetchall()
        return Claim(ClaimState.ACQUIRED, token, frozenset(h[0] for h in handlers))

    def mark_handler_done(
        self, key: str, token: str, handler: str, ttl: float, outcome: HandlerOutcome | None = None
    ) -> None:
        """Remember that ``handler`` succeeded for ``key`` for ``ttl`` seconds."""
        now = self._clock()
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO flymy_handlers (key, handler, expires) VALUES (?, ?, ?)",
                (key, handler, now + ttl),
            )
            if outcome is not None:
                self._journal_update(db, key, now, None, {handler: outcome})

    def complete(
        self, key: str, token: str, ttl: float, outcomes: Mapping[str, HandlerOutcome] | None = None
    ) -> None:
        """Remember ``key`` as done for ``ttl`` seconds, whoever holds the claim now."""
        now = self._clock()
        with self._transaction() as db:
            held_by, done, handlers = db.execute(_COMPLETE_READ, (key, now)).fetchone()
            if held_by is None or (held_by != token and not done):
                _warn_lease_lost(key)
            db.execute(
                "INSERT OR REPLACE INTO flymy_deliveries (key, token, done, expires) "
                "VALUES (?, '', 1, ?)",
                (key, now + ttl),
            )
            db.execute("DELETE FROM flymy_handlers WHERE key = ?", (key,))
            if outcomes is not None:
                self._journal_update(db, key, now, "handled", outcomes, handlers)

    def release(
        self, key: str, token: str, outcomes: Mapping[str, HandlerOutcome] | None = None
    ) -> None:
        """Drop the claim held with ``token``; keep the per-handler records."""
        now = self._clock()
        with self._transaction() as db:
            released = db.execute(
                "DELETE FROM flymy_deliveries WHERE key = ? AND token = ? AND done = 0",
                (key, token),
            ).rowcount
            if released and outcomes is not None:
                self._journal_update(db, key, now, "failed", outcomes)

    # -- the journal --------------------------------------------------------------------

    def journal_ignore(self, entry: NewEntry) -> None:
        """Record an authentic event that no handler wanted."""
        now = self._clock()
        with self._transaction() as db:
            self._journal_delivery(db, entry, now, "ignored")
            self._maybe_purge(db, now)

    def journal_get(self, key_or_run_id: str) -> JournalEntry | None:
        """The entry with this key, else the newest entry for this run id."""
        now = self._clock()
        with self._reading() as db:
            row = db.execute(
                _SELECT_ENTRIES + "WHERE key = ? AND expires > ?",
                (key_or_run_id, now),
            ).fetchone()
            if row is None:
                row = db.execute(
                    _SELECT_ENTRIES + "WHERE run_id = ? AND expires > ? ORDER BY j.id DESC LIMIT 1",
                    (key_or_run_id, now),
                ).fetchone()
        return _entry(row) if row is not None else None

    def journal_settled(self, run_ids: Sequence[str]) -> dict[str, JournalEntry]:
        """For each run id, its newest entry that is not ``pending``, in one query: how the
        waiters of :mod:`flymy_receiver.awaiting` poll (at most 500 run ids a call)."""
        if not run_ids:
            return {}
        marks = ",".join("?" * len(run_ids))
        with self._reading() as db:
            # Only placeholders are joined in; every run id is a parameter.
            rows = db.execute(
                _SELECT_ENTRIES + f"WHERE run_id IN ({marks}) AND state != 'pending' "
                "AND expires > ? ORDER BY j.id",
                (*run_ids, self._clock()),
            ).fetchall()
        return {row[2]: _entry(row) for row in rows}  # oldest first: the newest is kept

    def journal_list(
        self,
        *,
        state: str | None = None,
        event: str | None = None,
        agent_id: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[JournalEntry]:
        """Entries newest first, filtered."""
        where: list[str] = ["expires > ?"]
        args: list[Any] = [self._clock()]
        for column, value in (("state", state), ("event", event), ("agent_id", agent_id)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if since is not None:
            where.append("received_at >= ?")
            args.append(since.timestamp())
        args.append(max(0, limit))
        with self._reading() as db:
            # Only the fixed conditions above are joined in; every value is a parameter.
            query = f"WHERE {' AND '.join(where)} ORDER BY j.id DESC LIMIT ?"
            rows = db.execute(_SELECT_ENTRIES + query, args).fetchall()
        return [_entry(row) for row in rows]

    def record_refusal(self, refusal: Refusal) -> None:
        """Keep one refused delivery; only the newest ``max_refusals`` are kept."""
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO flymy_refusals (at, status, reason, detail) VALUES (?, ?, ?, ?)",
                (refusal.at.timestamp(), refusal.status, refusal.reason, refusal.detail),
            )
            newest = cursor.lastrowid or 0
            db.execute("DELETE FROM flymy_refusals WHERE id <= ?", (newest - self.max_refusals,))

    def refusals(self, limit: int = 100) -> list[Refusal]:
        """Refused deliveries, newest first."""
        with self._reading() as db:
            rows = db.execute(
                "SELECT at, status, reason, detail FROM flymy_refusals ORDER BY id DESC LIMIT ?",
                (max(0, limit),),
            ).fetchall()
        return [
            Refusal(to_datetime(at), status, reason, detail) for at, status, reason, detail in rows
        ]

    def _journal_delivery(
        self,
        db: sqlite3.Connection,
        entry: NewEntry,
        now: float,
        state: str | None,
        row: Any = _UNREAD,
    ) -> None:
        """Create the entry (``state`` or pending) or count one more attempt on it; an
        existing entry takes ``state`` when it is given. ``row`` is the entry's expiry and
        id as already read (``None``: there is none)."""
        expires = now + entry.retention
        if row is _UNREAD:
            row = db.execute(
                "SELECT expires, id FROM flymy_journal WHERE key = ?", (entry.key,)
            ).fetchone()
        if row is not None and row[0] > now:
            db.execute(
                "UPDATE flymy_journal SET attempts = attempts + 1, updated_at = ?, retention = ?, "
                "expires = ?, state = coalesce(?, state) WHERE key = ?",
                (now, entry.retention, expires, state, entry.key),
            )
            return
        if row is not None:  # expired, not purged yet: a fresh entry, arrived now
            db.execute("DELETE FROM flymy_journal_bodies WHERE id = ?", (row[1],))
            db.execute("DELETE FROM flymy_journal WHERE id = ?", (row[1],))
        cursor = db.execute(
            "INSERT INTO flymy_journal (key, event, run_id, agent_id, agent_name, state, "
            "attempts, received_at, updated_at, retention, expires, headers, handlers) "
            "VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?)",
            (
                entry.key,
                entry.event,
                entry.run_id,
                entry.agent_id,
                entry.agent_name,
                state or "pending",
                now,
                now,
                entry.retention,
                expires,
                orjson.dumps(dict(entry.headers)),
                b"{}",
            ),
        )
        db.execute(
            "INSERT INTO flymy_journal_bodies (id, body) VALUES (?, ?)",
            (cursor.lastrowid, entry.body),
        )

    @staticmethod
    def _journal_update(
        db: sqlite3.Connection,
        key: str,
        now: float,
        state: str | None,
        outcomes: Mapping[str, HandlerOutcome] | None = None,
        stored: Any = _UNREAD,
    ) -> None:
        """Set the state and merge in handler outcomes; an entry gone or expired stays so.
        ``stored`` is the entry's outcomes as already read (``None``: no live entry)."""
        if not outcomes:
            db.execute(
                "UPDATE flymy_journal SET state = coalesce(?, state), updated_at = ?, "
                "expires = ? + retention WHERE key = ? AND expires > ?",
                (state, now, now, key, now),
            )
            return
        if stored is _UNREAD:
            row = db.execute(
                "SELECT handlers FROM flymy_journal WHERE key = ? AND expires > ?", (key, now)
            ).fetchone()
            stored = row[0] if row is not None else None
        if stored is None:
            return
        merged = orjson.loads(stored) if stored else {}  # as stored: no objects to build
        merged.update((name, outcome.to_dict()) for name, outcome in outcomes.items())
        db.execute(
            "UPDATE flymy_journal SET state = coalesce(?, state), handlers = ?, updated_at = ?, "
            "expires = ? + retention WHERE key = ?",
            (state, orjson.dumps(merged), now, now, key),
        )

    # -- housekeeping -------------------------------------------------------------------

    def purge(self) -> int:
        """Delete every expired record now (one transaction); returns how many rows went."""
        now = self._clock()
        with self._transaction() as db:
            gone = db.execute("DELETE FROM flymy_deliveries WHERE expires <= ?", (now,)).rowcount
            gone += db.execute("DELETE FROM flymy_handlers WHERE expires <= ?", (now,)).rowcount
            gone += db.execute(
                "DELETE FROM flymy_journal_bodies WHERE id IN "
                "(SELECT id FROM flymy_journal WHERE expires <= ?)",
                (now,),
            ).rowcount
            db.execute("DELETE FROM flymy_journal WHERE expires <= ?", (now,))
        return int(gone)

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local.conn = None

    def _maybe_purge(self, db: sqlite3.Connection, now: float) -> None:
        self._writes += 1
        if self._writes % _PURGE_EVERY == 0:
            self._purge(db, now)

    @staticmethod
    def _purge(db: sqlite3.Connection, now: float) -> int:
        """Delete up to ``_PURGE_LIMIT`` expired rows of each table."""
        args = (now, _PURGE_LIMIT)
        gone = db.execute(
            "DELETE FROM flymy_deliveries WHERE rowid IN "
            "(SELECT rowid FROM flymy_deliveries WHERE expires <= ? LIMIT ?)",
            args,
        ).rowcount
        gone += db.execute(
            "DELETE FROM flymy_handlers WHERE rowid IN "
            "(SELECT rowid FROM flymy_handlers WHERE expires <= ? LIMIT ?)",
            args,
        ).rowcount
        ids = db.execute(
            "SELECT id FROM (SELECT id, expires FROM flymy_journal ORDER BY id LIMIT ?) "
            "WHERE expires <= ? LIMIT ?",
            (_PURGE_SCAN, now, _PURGE_LIMIT),
        ).fetchall()
        if ids:
            db.executemany("DELETE FROM flymy_journal_bodies WHERE id = ?", ids)
            db.executemany("DELETE FROM flymy_journal WHERE id = ?", ids)
            gone += len(ids)
        return int(gone)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction; any SQLite error becomes StoreUnavailable."""
        try:
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")  # take the write lock now, so claims serialise
        except sqlite3.Error as exc:
            self._drop_broken_connection()
            raise StoreUnavailable(f"sqlite: {exc}") from None
        try:
            yield db
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(db)
            raise StoreUnavailable(f"sqlite: {exc}") from None
        except BaseException:
            _rollback(db)
            raise

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """Reads outside any write transaction; SQLite errors become StoreUnavailable."""
        try:
            yield self._connection()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite: {exc}") from None

    def _connection(self) -> sqlite3.Connection:
        pid = os.getpid()
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        # A connection inherited through fork must not be used (nor closed) by the child.
        if conn is not None and self._local.pid == pid:
            return conn
        conn = sqlite3.connect(
            self.path, timeout=self.timeout, isolation_level=None, check_same_thread=True
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            self._set_wal(conn)
            # NORMAL is durable in WAL mode except across a power cut; losing the last
            # records then only means a redelivery runs its handlers again.
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.executescript(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        self._local.conn, self._local.pid = conn, pid
        return conn

    def _set_wal(self, conn: sqlite3.Connection) -> None:
        # Switching to WAL needs a moment alone with the file and may answer "locked" without
        # waiting on the busy timeout while other processes open it too: retry that, bounded.
        # Any other error (a read-only file, a full disk) will not pass by waiting: it fails
        # at once, so that every delivery during the fault gets its 503 without a delay.
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL").fetchone()
                return
            except sqlite3.OperationalError as exc:
                if not _is_lock_error(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def _drop_broken_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid() and conn.in_transaction:
            _rollback(conn)


def _is_lock_error(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` says another connection holds a lock (worth waiting for)."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if isinstance(code, int):
        return code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    message = str(exc).lower()
    return "locked" in message or "busy" in message


def _entry(row: Any) -> JournalEntry:
    key, event, run_id, agent_id, agent_name, state, attempts, received, updated = row[:9]
    body, headers, handlers = row[9:]
    return JournalEntry(
        key=key,
        event=event,
        run_id=run_id,
        agent_id=agent_id,
        agent_name=agent_name,
        state=state,
        attempts=int(attempts),
        received_at=to_datetime(received),
        updated_at=to_datetime(updated),
        body=bytes(body),
        headers=orjson.loads(headers) if headers else {},
        handlers=outcomes_from_json(handlers),
    )


def _rollback(db: sqlite3.Connection) -> None:
    try:
        if db.in_transaction:
            db.execute("ROLLBACK")
    except sqlite3.Error:
        logger.debug("sqlite rollback failed", exc_info=True)


def _warn_lease_lost(key: str) -> None:
    logger.warning(
        "the claim on %s expired before its handlers finished: another worker may have run "
        "them too; make Receiver(lease=...) longer than the slowest handler",
        key[:200],
    )
