"""The tables of :class:`~flymy_receiver.stores.postgres.PostgresStore`, and how tables of an
earlier release are upgraded in place (``ADD COLUMN IF NOT EXISTS``, ``CREATE INDEX IF NOT
EXISTS``; the index on whole run ids, which refused long ones, dropped).

Every list filter, the run-id lookup and the keyset ``(received_at, key)`` has its index;
sender-chosen text is indexed through a bounded prefix (a btree entry holds at most 2.7 KB).
"""

from __future__ import annotations

__all__ = ["BYTE_SHARDS", "HISTORY", "PREFIX", "REQUIRED_COLUMNS", "TABLES", "ddl", "quote"]

TABLES = (
    "flymy_deliveries",
    "flymy_handlers",
    "flymy_journal",
    "flymy_refusals",
    "flymy_journal_bytes",
)
#: Columns a current table must have: their absence means tables of an older version.
REQUIRED_COLUMNS = ("history", "note", "body_size", "body_dropped", "lease_until", "full_key")
#: Characters of sender-chosen text that indexes hold (4 bytes each at most, so an index
#: entry stays far below PostgreSQL's 2.7 KB limit).
PREFIX = 200
#: The newest attempts an entry's history keeps (records.HISTORY_LIMIT).
HISTORY = 50

# {s} is the quoted schema. Run without parameters (no placeholder parsing).
_DDL = """
CREATE TABLE IF NOT EXISTS {s}.flymy_deliveries (
    key text PRIMARY KEY,
    token text NOT NULL,
    done boolean NOT NULL,
    expires double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS flymy_deliveries_expires ON {s}.flymy_deliveries (expires);
CREATE TABLE IF NOT EXISTS {s}.flymy_handlers (
    key text NOT NULL,
    handler text NOT NULL,
    expires double precision NOT NULL,
    PRIMARY KEY (key, handler)
);
CREATE INDEX IF NOT EXISTS flymy_handlers_expires ON {s}.flymy_handlers (expires);
CREATE TABLE IF NOT EXISTS {s}.flymy_journal (
    key text PRIMARY KEY,
    event text NOT NULL,
    run_id text,
    agent_id text,
    agent_name text,
    state text NOT NULL,
    attempts integer NOT NULL,
    received_at double precision NOT NULL,
    updated_at double precision NOT NULL,
    retention double precision NOT NULL,
    expires double precision NOT NULL,
    body bytea,
    headers jsonb NOT NULL,
    handlers jsonb NOT NULL
);
-- Added after the first release: tables made by it are upgraded in place.
ALTER TABLE {s}.flymy_journal ADD COLUMN IF NOT EXISTS history jsonb NOT NULL DEFAULT '[]';
ALTER TABLE {s}.flymy_journal ADD COLUMN IF NOT EXISTS note text;
ALTER TABLE {s}.flymy_journal ADD COLUMN IF NOT EXISTS body_size bigint;
ALTER TABLE {s}.flymy_journal ADD COLUMN IF NOT EXISTS body_dropped boolean NOT NULL DEFAULT false;
ALTER TABLE {s}.flymy_journal ADD COLUMN IF NOT EXISTS lease_until double precision NOT NULL
    DEFAULT 0;
-- A key too long for an index is stored as its digest (key); full_key keeps it as given.
ALTER TABLE {s}.flymy_journal ADD COLUMN IF NOT EXISTS full_key text;
ALTER TABLE {s}.flymy_journal ALTER COLUMN body DROP NOT NULL;
-- The first release indexed whole run ids (a long one could never be journaled).
DROP INDEX IF EXISTS {s}.flymy_journal_run;
DROP INDEX IF EXISTS {s}.flymy_journal_state;
DROP INDEX IF EXISTS {s}.flymy_journal_received;
CREATE INDEX IF NOT EXISTS flymy_journal_newest ON {s}.flymy_journal (received_at, key);
CREATE INDEX IF NOT EXISTS flymy_journal_by_state ON {s}.flymy_journal (state, received_at, key);
CREATE INDEX IF NOT EXISTS flymy_journal_by_run
    ON {s}.flymy_journal (left(run_id, {prefix}), received_at, key);
CREATE INDEX IF NOT EXISTS flymy_journal_by_event
    ON {s}.flymy_journal (left(event, {prefix}), received_at, key);
CREATE INDEX IF NOT EXISTS flymy_journal_by_agent
    ON {s}.flymy_journal (left(agent_id, {prefix}), received_at, key);
-- What an operator must look at (failed, and pending that may have stalled): few rows.
CREATE INDEX IF NOT EXISTS flymy_journal_open ON {s}.flymy_journal (received_at, key)
    WHERE state IN ('failed', 'pending');
CREATE INDEX IF NOT EXISTS flymy_journal_expires ON {s}.flymy_journal (expires);
CREATE TABLE IF NOT EXISTS {s}.flymy_refusals (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at double precision NOT NULL,
    status integer NOT NULL,
    reason text NOT NULL,
    detail text NOT NULL
);
-- The bytes of journal bodies kept, in shards so that concurrent deliveries rarely wait
-- (a shard may go below zero: what counts is their sum)
-- on one row (used only with max_journal_bytes).
CREATE TABLE IF NOT EXISTS {s}.flymy_journal_bytes (
    shard integer PRIMARY KEY,
    bytes bigint NOT NULL
);
"""

#: Shards of the body byte count.
BYTE_SHARDS = 16


def quote(name: str) -> str:
    """A quoted SQL identifier: any name works, none can break out."""
    return '"' + name.replace('"', '""') + '"'


def ddl(schema: str) -> str:
    """The statements that create (or upgrade) the tables, run without parameters."""
    return _DDL.format(s=quote(schema), prefix=PREFIX)
