"""An SQLite idempotency store, shared by the worker processes of one machine.

The database runs in WAL mode with a busy timeout, and every claim is one ``BEGIN
IMMEDIATE`` transaction, so that of many processes claiming one event at once exactly one
wins. Each thread of each process opens its own connection, and a process forked from one
that already had a connection (gunicorn forks its workers) opens a fresh one. Times are
wall-clock seconds, since several processes compare them.
"""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import StoreUnavailable
from .base import Claim, ClaimState

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
"""

#: Expired rows are deleted once per this many writes, in the same transaction.
_PURGE_EVERY = 500


class SQLiteStore:
    """Idempotency records in an SQLite file, safe for several processes on one machine.

    ``timeout`` (seconds) is how long a call waits for a lock held by another process
    before the delivery is answered 503. Do not put the file on a network file system:
    SQLite's locking is only reliable on a local disk.
    """

    blocking = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = os.fspath(path)
        if self.path in ("", ":memory:") or self.path.startswith("file::memory:"):
            raise ValueError("SQLiteStore needs a file shared by the workers; use MemoryStore")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.timeout = timeout
        self._clock = clock
        self._local = threading.local()
        self._writes = 0

    def __repr__(self) -> str:
        return f"SQLiteStore({Path(self.path).name!r})"

    # -- the store contract -------------------------------------------------------------

    def claim(self, key: str, lease: float) -> Claim:
        """Take ``key`` for ``lease`` seconds unless it is done or held by a live claim."""
        now = self._clock()
        with self._transaction() as db:
            row = db.execute(
                "SELECT token, done, expires FROM flymy_deliveries WHERE key = ?", (key,)
            ).fetchone()
            if row is not None and row[2] > now:
                if row[1]:
                    return Claim(ClaimState.DONE)
                if row[0]:
                    return Claim(ClaimState.BUSY, retry_after=row[2] - now)
            token = secrets.token_hex(8)
            db.execute(
                "INSERT OR REPLACE INTO flymy_deliveries (key, token, done, expires) "
                "VALUES (?, ?, 0, ?)",
                (key, token, now + lease),
            )
            handlers = db.execute(
                "SELECT handler FROM flymy_handlers WHERE key = ? AND expires > ?", (key, now)
            ).fetchall()
            self._maybe_purge(db, now)
        return Claim(ClaimState.ACQUIRED, token, frozenset(h[0] for h in handlers))

    def mark_handler_done(self, key: str, token: str, handler: str, ttl: float) -> None:
        """Remember that ``handler`` succeeded for ``key`` for ``ttl`` seconds."""
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO flymy_handlers (key, handler, expires) VALUES (?, ?, ?)",
                (key, handler, self._clock() + ttl),
            )

    def complete(self, key: str, token: str, ttl: float) -> None:
        """Remember ``key`` as done for ``ttl`` seconds, whoever holds the claim now."""
        now = self._clock()
        with self._transaction() as db:
            row = db.execute(
                "SELECT token, done FROM flymy_deliveries WHERE key = ?", (key,)
            ).fetchone()
            if row is None or (row[0] != token and not row[1]):
                _warn_lease_lost(key)
            db.execute(
                "INSERT OR REPLACE INTO flymy_deliveries (key, token, done, expires) "
                "VALUES (?, '', 1, ?)",
                (key, now + ttl),
            )
            db.execute("DELETE FROM flymy_handlers WHERE key = ?", (key,))

    def release(self, key: str, token: str) -> None:
        """Drop the claim held with ``token``; keep the per-handler records."""
        with self._transaction() as db:
            db.execute(
                "DELETE FROM flymy_deliveries WHERE key = ? AND token = ? AND done = 0",
                (key, token),
            )

    # -- housekeeping -------------------------------------------------------------------

    def purge(self) -> int:
        """Delete expired records now; returns how many rows went."""
        with self._transaction() as db:
            return self._purge(db, self._clock())

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
        gone = db.execute("DELETE FROM flymy_deliveries WHERE expires <= ?", (now,)).rowcount
        gone += db.execute("DELETE FROM flymy_handlers WHERE expires <= ?", (now,)).rowcount
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
        # waiting on the busy timeout while other processes open it too: retry, bounded.
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL").fetchone()
                return
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def _drop_broken_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid() and conn.in_transaction:
            _rollback(conn)


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
