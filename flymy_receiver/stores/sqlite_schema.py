"""The tables of :class:`~flymy_receiver.stores.SQLiteStore`, how a file made by an older
version is brought up to date, and the SQL text the store runs.

The schema's version is SQLite's ``user_version``: a connection reads it (one cheap pragma)
and, when it is behind, migrates in one ``BEGIN IMMEDIATE`` transaction (so that processes
opening the file at once migrate it once): missing tables and columns are added, existing
rows filled in, indexes created. Records are never dropped by a migration.
"""

from __future__ import annotations

import sqlite3

from ..errors import StoreUnavailable
from .records import HISTORY_LIMIT

__all__ = ["SCHEMA_VERSION", "prepare"]

#: 1: the tables of 0.x (no ``user_version``); 2: history, resolve, byte bound, stalled,
#: deferred handlers' leases, and an index for every list filter and the keyset order.
SCHEMA_VERSION = 2

_TABLES = (
    """CREATE TABLE IF NOT EXISTS flymy_deliveries (
        key TEXT PRIMARY KEY,
        token TEXT NOT NULL,
        done INTEGER NOT NULL,
        expires REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS flymy_handlers (
        key TEXT NOT NULL,
        handler TEXT NOT NULL,
        expires REAL NOT NULL,
        PRIMARY KEY (key, handler)
    )""",
    "CREATE INDEX IF NOT EXISTS flymy_deliveries_expires ON flymy_deliveries (expires)",
    "CREATE INDEX IF NOT EXISTS flymy_handlers_expires ON flymy_handlers (expires)",
    """CREATE TABLE IF NOT EXISTS flymy_journal (
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
    )""",
    # The body, written once, has a table of its own: SQLite rewrites a whole row, overflow
    # pages included, on every update. A body dropped by the byte bound has no row.
    """CREATE TABLE IF NOT EXISTS flymy_journal_bodies (
        id INTEGER PRIMARY KEY,
        body BLOB NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS flymy_refusals (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        status INTEGER NOT NULL,
        reason TEXT NOT NULL,
        detail TEXT NOT NULL
    )""",
    # The bodies' bytes in all, kept in step by every write (the byte bound reads one row).
    """CREATE TABLE IF NOT EXISTS flymy_journal_size (
        id INTEGER PRIMARY KEY CHECK (id = 0),
        bytes INTEGER NOT NULL
    )""",
)

#: Columns added by version 2 (``ALTER TABLE ... ADD COLUMN`` on an older file).
_COLUMNS = (
    ("history", "TEXT NOT NULL DEFAULT '[]'"),  # JSON, oldest first, appended by SQL
    ("note", "TEXT"),
    ("body_size", "INTEGER NOT NULL DEFAULT 0"),
    ("body_dropped", "INTEGER NOT NULL DEFAULT 0"),
    ("lease_until", "REAL NOT NULL DEFAULT 0"),  # a pending entry's claim ends then
    ("leases", "TEXT"),  # deferred handlers' leases, JSON {handler: [token, until]}
)

# Every list is ``ORDER BY received_at DESC, key DESC`` with an equality filter or none: an
# index per filter, ending with the order, serves a page (and the keyset bound) without a
# sort or a scan. ``key`` is UNIQUE (its own index); ``expires`` serves the pruning.
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS flymy_journal_time ON flymy_journal (received_at, key)",
    "CREATE INDEX IF NOT EXISTS flymy_journal_state ON flymy_journal (state, received_at, key)",
    "CREATE INDEX IF NOT EXISTS flymy_journal_event ON flymy_journal (event, received_at, key)",
    "CREATE INDEX IF NOT EXISTS flymy_journal_agent ON flymy_journal (agent_id, received_at, key)",
    "CREATE INDEX IF NOT EXISTS flymy_journal_runs ON flymy_journal (run_id, received_at, key)",
    "CREATE INDEX IF NOT EXISTS flymy_journal_expires ON flymy_journal (expires)",
)

_BACKFILL = (
    # Version 1 kept every body: its size is its length.
    "UPDATE flymy_journal SET body_size = coalesce("
    "(SELECT length(b.body) FROM flymy_journal_bodies b WHERE b.id = flymy_journal.id), 0)",
    # A pending entry's claim, if one is still held, says when it stalls.
    "UPDATE flymy_journal SET lease_until = coalesce((SELECT d.expires FROM flymy_deliveries d "
    "WHERE d.key = flymy_journal.key AND d.done = 0), 0) WHERE state = 'pending'",
)


def prepare(db: sqlite3.Connection, create: bool) -> None:
    """Bring the file's schema to :data:`SCHEMA_VERSION` (a no-op read when it is there).
    With ``create=False`` a file without the store's tables is refused, never filled."""
    if _version(db) >= SCHEMA_VERSION:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        if _version(db) < SCHEMA_VERSION:  # another process may have migrated meanwhile
            _migrate(db, create)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def _migrate(db: sqlite3.Connection, create: bool) -> None:
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not create and "flymy_deliveries" not in tables:
        raise StoreUnavailable("sqlite: the file holds no flymy_receiver records (create=False)")
    for statement in _TABLES:
        db.execute(statement)
    present = {row[1] for row in db.execute("PRAGMA table_info(flymy_journal)")}
    added = False
    for name, declaration in _COLUMNS:
        if name not in present:
            db.execute(f"ALTER TABLE flymy_journal ADD COLUMN {name} {declaration}")
            added = True
    if added and "flymy_journal" in tables:
        for statement in _BACKFILL:
            db.execute(statement)
    db.execute("DROP INDEX IF EXISTS flymy_journal_run")  # version 1's: run_id alone
    for statement in _INDEXES:
        db.execute(statement)
    db.execute(
        "INSERT OR IGNORE INTO flymy_journal_size (id, bytes) "
        "VALUES (0, (SELECT coalesce(sum(length(body)), 0) FROM flymy_journal_bodies))"
    )
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


# -- the SQL text the store runs --------------------------------------------------------------

#: The claim's row and the live entry's, in one read (either may be missing).
CLAIM_AND_ENTRY = (
    "SELECT d.token, d.done, d.expires, j.id, j.expires, j.state "
    "FROM (SELECT ? AS key) AS k "
    "LEFT JOIN flymy_deliveries d ON d.key = k.key LEFT JOIN flymy_journal j ON j.key = k.key"
)
#: What completing needs: who holds the claim, and the live entry's outcomes.
COMPLETE_READ = (
    "SELECT d.token, d.done, j.handlers FROM (SELECT ? AS key) AS k "
    "LEFT JOIN flymy_deliveries d ON d.key = k.key "
    "LEFT JOIN flymy_journal j ON j.key = k.key AND j.expires > ?"
)
#: ``history`` with one more attempt (a JSON parameter), the oldest dropped past the bound:
#: appended by SQLite, so a write never reads the history back.
APPEND_HISTORY = (
    "json_insert(CASE WHEN json_array_length(history) >= "
    f"{HISTORY_LIMIT} THEN json_remove(history, '$[0]') ELSE history END, '$[#]', json(?))"
)
#: An entry summary's columns (what lists read: never a body nor the history).
SUMMARY = (
    "j.key, j.event, j.run_id, j.agent_id, j.agent_name, j.state, j.attempts, j.received_at, "
    "j.updated_at, j.headers, j.handlers, j.note, j.body_size, j.body_dropped, j.lease_until"
)
#: A whole entry: the summary, then its body and history.
FULL = (
    f"SELECT {SUMMARY}, b.body, j.history "  # noqa: S608 (constant text)
    "FROM flymy_journal j LEFT JOIN flymy_journal_bodies b ON b.id = j.id "
)
INSERT_ENTRY = (
    "INSERT INTO flymy_journal (key, event, run_id, agent_id, agent_name, state, attempts, "
    "received_at, updated_at, retention, expires, headers, handlers, history, body_size, "
    "body_dropped, lease_until) VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?, '{}', ?, ?, ?, ?)"
)
ADD_BYTES = "UPDATE flymy_journal_size SET bytes = bytes + ? WHERE id = 0"
