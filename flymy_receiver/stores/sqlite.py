"""An SQLite idempotency store and delivery journal, shared by the worker processes of one
machine.

The database runs in WAL mode with a busy timeout, and every step is one ``BEGIN
IMMEDIATE`` transaction, so that of many processes claiming one event at once exactly one
wins; the journal entry, its history and its handlers' outcomes are written in the
transaction of the claim, completion or release they go with (a one-handler delivery
commits twice). Each thread of each process opens its own connection, and a process forked
from one that already had a connection (gunicorn forks its workers) opens a fresh one.
Times are wall-clock seconds, since several processes compare them.

The tables, and the migration of a file written by an older version, are in
:mod:`.sqlite_schema`; the journal's reads and writes in :mod:`.sqlite_journal`.
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

from ..errors import StoreUnavailable
from . import sqlite_deferred as deferred
from . import sqlite_journal as journal
from .base import Claim, ClaimState
from .records import (
    Attempt,
    HandlerOutcome,
    JournalEntry,
    NewEntry,
    Refusal,
    to_datetime,
)
from .sqlite_schema import CLAIM_AND_ENTRY, COMPLETE_READ, FULL, prepare

__all__ = ["SQLiteStore"]

logger = logging.getLogger("flymy_receiver")

#: Expired rows are deleted once per this many writes, in the same transaction, at most
#: ``_PURGE_LIMIT`` per table each time (found through the ``expires`` indexes): a write
#: never pays for a long backlog at once.
_PURGE_EVERY = 50
_PURGE_LIMIT = 200
#: :meth:`SQLiteStore.purge` deletes this many rows of a table per transaction, so that the
#: write lock is never held for long whatever the backlog.
_PURGE_BATCH = 2000
#: What the waiters of flymy_receiver.awaiting take as a run's end (not pending nor queued).
_SETTLED = "('handled', 'failed', 'ignored')"

# SQLite's primary result codes for a lock held elsewhere (the only errors worth a retry).
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6


class SQLiteStore:
    """Idempotency records and the delivery journal in an SQLite file, safe for several
    processes on one machine.

    ``timeout`` (seconds) is how long a call waits for a lock held by another process
    before the delivery is answered 503. Do not put the file on a network file system:
    SQLite's locking is only reliable on a local disk. Journal entries are kept for their
    retention after their last change; the newest ``max_refusals`` refusals are kept.
    ``max_journal_bytes`` (optional) bounds the journal's bodies in all: past it an entry is
    kept without its body (``body_dropped``), never a claim refused. With ``create=False`` a
    missing file is an error (:class:`~flymy_receiver.errors.StoreUnavailable`) and nothing
    is created: for tools that only read.
    """

    blocking = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = 5.0,
        max_refusals: int = 1000,
        max_journal_bytes: int | None = None,
        create: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = os.fspath(path)
        if self.path in ("", ":memory:") or self.path.startswith("file::memory:"):
            raise ValueError("SQLiteStore needs a file shared by the workers; use MemoryStore")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if max_refusals < 1:
            raise ValueError("max_refusals must be at least 1")
        if max_journal_bytes is not None and max_journal_bytes < 0:
            raise ValueError("max_journal_bytes must not be negative")
        if not create and not os.path.isfile(self.path):
            raise StoreUnavailable(f"sqlite: no database file at {self.path!r} (not creating it)")
        self.timeout = timeout
        self.max_refusals = max_refusals
        self.max_journal_bytes = max_journal_bytes
        self.create = create
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
        journal ``entry`` (or the replay) in the same transaction."""
        now = self._clock()
        with self._transaction() as db:
            if entry is not None or replay:
                # One read for both: the claim's row and the entry's.
                token, done, until, entry_id, expires, state = db.execute(
                    CLAIM_AND_ENTRY, (key,)
                ).fetchone()
                held = (token, done, until) if until is not None else None
                found = (entry_id, expires, state) if entry_id is not None else None
                if entry is not None and entry.key != key:
                    found = journal.UNREAD
            else:
                found = None
                held = db.execute(
                    "SELECT token, done, expires FROM flymy_deliveries WHERE key = ?", (key,)
                ).fetchone()
            claim = self._claim(db, key, lease, now, force, held)
            if entry is not None:
                claim.prior_state = self._journal_delivery(db, entry, claim, now, lease, found)
            elif replay:
                claim.prior_state = self._journal_replay(db, key, claim, now, lease, found)
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

    def _journal_delivery(
        self,
        db: sqlite3.Connection,
        entry: NewEntry,
        claim: Claim,
        now: float,
        lease: float,
        found: Any,
    ) -> str:
        at = journal.wall(now)
        if claim.state is ClaimState.ACQUIRED:
            state, attempt, until = "pending", None, now + lease
        elif claim.state is ClaimState.DONE:
            state, attempt, until = "handled", Attempt(at, "sender", 200, "duplicate"), 0.0
        else:
            state, attempt = "pending", Attempt(at, "sender", 409, "in_flight")
            until = now + claim.retry_after
        return journal.deliver(
            db,
            entry,
            now,
            state,
            acquired=claim.state is ClaimState.ACQUIRED,
            attempt=attempt,
            lease_until=until,
            found=found,
            max_bytes=self.max_journal_bytes,
        )

    @staticmethod
    def _journal_replay(
        db: sqlite3.Connection, key: str, claim: Claim, now: float, lease: float, found: Any
    ) -> str:
        if found is None or found[1] <= now:
            return ""
        if claim.state is ClaimState.ACQUIRED:
            journal.update(db, key, now, "pending", lease_until=now + lease)
        elif claim.state is ClaimState.BUSY:
            busy = Attempt(journal.wall(now), "replay", 409, "in_flight")
            journal.update(db, key, now, None, attempt=busy)
        return str(found[2])

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
                journal.update(db, key, now, None, {handler: outcome})

    def complete(
        self,
        key: str,
        token: str,
        ttl: float,
        outcomes: Mapping[str, HandlerOutcome] | None = None,
        attempt: Attempt | None = None,
    ) -> None:
        """Remember ``key`` as done for ``ttl`` seconds, whoever holds the claim now; the
        entry is ``handled`` (``queued`` while a deferred handler waits for its worker)."""
        now = self._clock()
        with self._transaction() as db:
            held_by, done, handlers = db.execute(COMPLETE_READ, (key, now)).fetchone()
            if held_by is None or (held_by != token and not done):
                _warn_lease_lost(key)
            db.execute(
                "INSERT OR REPLACE INTO flymy_deliveries (key, token, done, expires) "
                "VALUES (?, '', 1, ?)",
                (key, now + ttl),
            )
            db.execute("DELETE FROM flymy_handlers WHERE key = ?", (key,))
            if outcomes is not None or attempt is not None:
                state = None
                if outcomes is not None:
                    queued = any(o.deferred and o.state == "queued" for o in outcomes.values())
                    state = "queued" if queued else "handled"
                journal.update(db, key, now, state, outcomes, attempt, handlers)

    def release(
        self,
        key: str,
        token: str,
        outcomes: Mapping[str, HandlerOutcome] | None = None,
        attempt: Attempt | None = None,
    ) -> None:
        """Drop the claim held with ``token``; keep the per-handler records."""
        now = self._clock()
        with self._transaction() as db:
            released = db.execute(
                "DELETE FROM flymy_deliveries WHERE key = ? AND token = ? AND done = 0",
                (key, token),
            ).rowcount
            if released and (outcomes is not None or attempt is not None):
                state = "failed" if outcomes is not None else None
                journal.update(db, key, now, state, outcomes, attempt)

    # -- the journal --------------------------------------------------------------------

    def journal_ignore(self, entry: NewEntry, attempt: Attempt | None = None) -> None:
        """Record an authentic event that no handler wanted (an existing entry keeps its
        state and body)."""
        now = self._clock()
        with self._transaction() as db:
            journal.deliver(
                db, entry, now, "ignored", attempt=attempt, max_bytes=self.max_journal_bytes
            )
            self._maybe_purge(db, now)

    def journal_get(self, key_or_run_id: str) -> JournalEntry | None:
        """The entry with this key, else the newest entry for this run id."""
        with self._reading() as db:
            return journal.get(db, key_or_run_id, self._clock())

    def journal_settled(self, run_ids: Sequence[str]) -> dict[str, JournalEntry]:
        """For each run id, its newest settled entry (handled, failed or ignored: not
        pending nor queued), in one query: how the waiters of :mod:`flymy_receiver.awaiting`
        poll (at most 500 run ids a call)."""
        if not run_ids:
            return {}
        marks = ",".join("?" * len(run_ids))
        now = self._clock()
        with self._reading() as db:
            # Only placeholders are joined in; every run id is a parameter.
            rows = db.execute(
                # Found through the run id's index; the state and expiry are checked on it
                # (and the few rows sorted here, so that no plan scans for the order).
                FULL + f"WHERE j.run_id IN ({marks}) AND +j.state IN {_SETTLED} AND +j.expires > ?",
                (*run_ids, now),
            ).fetchall()
        rows.sort(key=lambda row: (row[7], row[0]))  # oldest first: the newest of a run is kept
        return {row[2]: journal.entry_from_row(row, now, full=True) for row in rows}

    def journal_list(
        self,
        *,
        state: str | None = None,
        event: str | None = None,
        agent_id: str | None = None,
        run_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        before: str | None = None,
        limit: int = 100,
    ) -> list[JournalEntry]:
        """Summaries newest first, filtered; ``before`` is the previous page's last key."""
        filters = {"event": event, "agent_id": agent_id, "run_id": run_id}
        with self._reading() as db:
            return journal.list_entries(
                db,
                self._clock(),
                state=state,
                filters=filters,
                since=since,
                until=until,
                before=before,
                limit=limit,
            )

    def journal_resolve(self, key: str, note: str) -> bool:
        """Make the entry ``resolved`` with ``note``; False when there is no such entry."""
        now = self._clock()
        with self._transaction() as db:
            changed = db.execute(
                "UPDATE flymy_journal SET state = 'resolved', note = ?, updated_at = ?, "
                "expires = ? + retention WHERE key = ? AND expires > ?",
                (note, journal.wall(now), now, key, now),
            ).rowcount
        return bool(changed)

    def claim_handler(self, key: str, handler: str, lease: float) -> Claim:
        """Take one deferred handler's own lease (``Claim.body`` holds the stored body);
        raises KeyError when the journal has no such entry."""
        now = self._clock()
        with self._transaction() as db:
            return deferred.claim_handler(db, key, handler, lease, now)

    def finish_handler(
        self,
        key: str,
        handler: str,
        token: str,
        outcome: HandlerOutcome,
        attempt: Attempt,
        final: bool,
        ttl: float,
    ) -> None:
        """Record a deferred handler's run (see :mod:`flymy_receiver.stores.base`)."""
        now = self._clock()
        with self._transaction() as db:
            deferred.finish_handler(db, key, handler, token, outcome, attempt, final, ttl, now)

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

    # -- housekeeping -------------------------------------------------------------------

    def purge(self) -> int:
        """Delete every expired record now, in transactions of at most ``_PURGE_BATCH``
        rows of a table each (other processes write in between); returns how many rows
        went."""
        total = 0
        while True:
            with self._transaction() as db:
                gone = self._purge(db, self._clock(), _PURGE_BATCH)
            total += gone
            if gone == 0:
                return total

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local.conn = None

    def _maybe_purge(self, db: sqlite3.Connection, now: float) -> None:
        self._writes += 1
        if self._writes % _PURGE_EVERY == 0:
            self._purge(db, now, _PURGE_LIMIT)

    @staticmethod
    def _purge(db: sqlite3.Connection, now: float, limit: int) -> int:
        """Delete up to ``limit`` expired rows of each table (through their expiry index)."""
        args = (now, limit)
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
        ids = db.execute("SELECT id FROM flymy_journal WHERE expires <= ? LIMIT ?", args)
        gone += journal.delete(db, [row[0] for row in ids.fetchall()])
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
        # Without ``create``, "rw" mode: a file removed meanwhile is an error, never remade.
        target = self.path if self.create else Path(self.path).absolute().as_uri() + "?mode=rw"
        conn = sqlite3.connect(
            target,
            timeout=self.timeout,
            isolation_level=None,
            check_same_thread=True,
            uri=not self.create,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            self._set_wal(conn)
            # NORMAL is durable in WAL mode except across a power cut; losing the last
            # records then only means a redelivery runs its handlers again.
            conn.execute("PRAGMA synchronous = NORMAL")
            prepare(conn, self.create)
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
