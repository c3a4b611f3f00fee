"""A PostgreSQL idempotency store and delivery journal, for apps that already run PostgreSQL.

psycopg 3 with its connection pool. Each store call is one short transaction:

- a claim is one ``INSERT ... ON CONFLICT DO UPDATE ... WHERE`` on the event's row, which
  takes the row lock whether or not it updates, so of many receivers claiming one event at
  once exactly one wins; the journal entry is written in the same transaction. Every call
  touches the tables in one order (deliveries, handlers, journal), so calls never deadlock;
- times are the server's clock (``now()``) unless a ``clock`` is given, so receivers on
  several machines agree on leases whatever their own clocks say;
- every wait is bounded: ``connect_timeout``, the pool's wait, ``lock_timeout`` and
  ``statement_timeout`` on the server, ``idle_in_transaction_session_timeout`` so that a
  client that stalls mid-transaction leaves nothing locked, and a client-side deadline that
  cuts the connection of a server that stopped answering altogether. An unreachable or
  stalled server is :class:`~flymy_receiver.errors.StoreUnavailable` (503) within seconds;
- the tables are created on first use (``CREATE TABLE IF NOT EXISTS`` under an advisory
  lock, skipped when they exist); expired rows are purged a bounded batch at a time.

Nothing touches the server until the first call, and the pool is made per process, so a
store built before gunicorn forks its workers gives each worker its own connections.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import logging
import math
import os
import secrets
import select
import socket
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

try:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict
    from psycopg.types.json import Jsonb
    from psycopg_pool import ConnectionPool
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError(
        "PostgresStore needs psycopg 3 and psycopg-pool: pip install 'flymy-receiver[postgres]'"
    ) from None

from ..errors import ConfigurationError, StoreUnavailable
from .base import Claim, ClaimState
from .records import HandlerOutcome, JournalEntry, NewEntry, Refusal, to_datetime

__all__ = ["PostgresNotifier", "PostgresStore"]

logger = logging.getLogger("flymy_receiver")

T = TypeVar("T")
Cursor = psycopg.Cursor[Any]

#: Seconds a call may wait on the pool, to connect, on a lock or for a statement.
DEFAULT_TIMEOUT = 3.0
#: Expired rows are purged once per this many writes of a process, at most a batch a table.
_PURGE_EVERY = 100
_PURGE_BATCH = 500
#: The client-side deadline of a call is its server-side timeouts plus this much.
_GRACE = 1.0
#: The longest run id a notification carries (PostgreSQL's limit is 8000 bytes).
_MAX_PAYLOAD = 7900
#: Refusal texts are cut to this many characters.
_MAX_REASON, _MAX_DETAIL = 100, 1000
#: Errors after which a call is retried once on a fresh connection, when nothing was
#: committed: the pooled connection had died (server restarted), or the server rolled the
#: transaction back (deadlock, serialization).
_RETRY_SQLSTATES = frozenset({None, "57P01", "57P02", "57P03", "40P01", "40001"})

_TABLES = ("flymy_deliveries", "flymy_handlers", "flymy_journal", "flymy_refusals")

_SCHEMA_DDL = """
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
    body bytea NOT NULL,
    headers jsonb NOT NULL,
    handlers jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS flymy_journal_received ON {s}.flymy_journal (received_at);
CREATE INDEX IF NOT EXISTS flymy_journal_run ON {s}.flymy_journal (run_id, received_at);
CREATE INDEX IF NOT EXISTS flymy_journal_state ON {s}.flymy_journal (state, received_at);
CREATE INDEX IF NOT EXISTS flymy_journal_expires ON {s}.flymy_journal (expires);
CREATE TABLE IF NOT EXISTS {s}.flymy_refusals (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at double precision NOT NULL,
    status integer NOT NULL,
    reason text NOT NULL,
    detail text NOT NULL
);
"""

# {s} is the quoted schema, {now} the current time in epoch seconds (the server's or ours).
_CLAIM = """
INSERT INTO {s}.flymy_deliveries AS d (key, token, done, expires)
VALUES (%(key)s, %(token)s, false, {now} + %(lease)s)
ON CONFLICT (key) DO UPDATE SET token = EXCLUDED.token, done = false, expires = EXCLUDED.expires
WHERE d.expires <= {now} OR (%(force)s AND d.done)
RETURNING 1
"""
_CLAIM_STATE = """
SELECT done, expires - {now} FROM {s}.flymy_deliveries WHERE key = %(key)s
"""
_HANDLERS_DONE = """
SELECT handler FROM {s}.flymy_handlers WHERE key = %(key)s AND expires > {now}
"""
_FORGET_HANDLERS = "DELETE FROM {s}.flymy_handlers WHERE key = %(key)s"
_MARK = """
INSERT INTO {s}.flymy_handlers AS h (key, handler, expires)
SELECT %(key)s, %(handler)s, {now} + %(ttl)s
WHERE NOT EXISTS (
    SELECT 1 FROM {s}.flymy_deliveries WHERE key = %(key)s AND done AND expires > {now}
)
ON CONFLICT (key, handler) DO UPDATE SET expires = GREATEST(h.expires, EXCLUDED.expires)
"""
_COMPLETE = """
WITH old AS (SELECT token, done FROM {s}.flymy_deliveries WHERE key = %(key)s)
INSERT INTO {s}.flymy_deliveries AS d (key, token, done, expires)
VALUES (%(key)s, '', true, {now} + %(ttl)s)
ON CONFLICT (key) DO UPDATE SET token = '', done = true, expires = EXCLUDED.expires
RETURNING (SELECT token FROM old), (SELECT done FROM old)
"""
_RELEASE = """
DELETE FROM {s}.flymy_deliveries
WHERE key = %(key)s AND token = %(token)s AND NOT done
RETURNING 1
"""
# A delivery's entry: created, or one more attempt. An entry past its retention that was not
# purged yet starts afresh, as if it had been.
_JOURNAL_DELIVERY = """
INSERT INTO {s}.flymy_journal AS j (
    key, event, run_id, agent_id, agent_name, state, attempts, received_at, updated_at,
    retention, expires, body, headers, handlers)
VALUES (
    %(key)s, %(event)s, %(run_id)s, %(agent_id)s, %(agent_name)s, %(state)s, 1, {now}, {now},
    %(retention)s, {now} + %(retention)s, %(body)s, %(headers)s, '{{}}'::jsonb)
ON CONFLICT (key) DO UPDATE SET
    attempts = CASE WHEN j.expires <= {now} THEN 1 ELSE j.attempts + 1 END,
    state = CASE WHEN j.expires <= {now} OR %(set_state)s THEN EXCLUDED.state ELSE j.state END,
    received_at = CASE WHEN j.expires <= {now} THEN EXCLUDED.received_at ELSE j.received_at END,
    event = CASE WHEN j.expires <= {now} THEN EXCLUDED.event ELSE j.event END,
    run_id = CASE WHEN j.expires <= {now} THEN EXCLUDED.run_id ELSE j.run_id END,
    agent_id = CASE WHEN j.expires <= {now} THEN EXCLUDED.agent_id ELSE j.agent_id END,
    agent_name = CASE WHEN j.expires <= {now} THEN EXCLUDED.agent_name ELSE j.agent_name END,
    body = CASE WHEN j.expires <= {now} THEN EXCLUDED.body ELSE j.body END,
    headers = CASE WHEN j.expires <= {now} THEN EXCLUDED.headers ELSE j.headers END,
    handlers = CASE WHEN j.expires <= {now} THEN EXCLUDED.handlers ELSE j.handlers END,
    updated_at = EXCLUDED.updated_at,
    retention = EXCLUDED.retention,
    expires = EXCLUDED.expires
"""
_JOURNAL_UPDATE = """
UPDATE {s}.flymy_journal
SET state = COALESCE(%(state)s, state), handlers = handlers || %(outcomes)s,
    updated_at = {now}, expires = {now} + retention
WHERE key = %(key)s AND expires > {now}
"""
_ENTRY_COLUMNS = (
    "key, event, run_id, agent_id, agent_name, state, attempts, received_at, updated_at, "
    "body, headers, handlers"
)
_JOURNAL_GET = """
SELECT {columns} FROM {s}.flymy_journal
WHERE (key = %(key)s OR run_id = %(key)s) AND expires > {now}
ORDER BY key = %(key)s DESC, received_at DESC
LIMIT 1
"""
_JOURNAL_LIST = "SELECT {columns} FROM {s}.flymy_journal WHERE expires > {now}"
_JOURNAL_SETTLED = """
SELECT {columns} FROM {s}.flymy_journal
WHERE run_id = ANY(%(runs)s) AND state <> 'pending' AND expires > {now}
ORDER BY received_at
"""
_REFUSAL = """
WITH added AS (
    INSERT INTO {s}.flymy_refusals (at, status, reason, detail)
    VALUES (%(at)s, %(status)s, %(reason)s, %(detail)s)
    RETURNING id
)
DELETE FROM {s}.flymy_refusals WHERE id <= (SELECT id FROM added) - %(keep)s
"""
_REFUSALS = """
SELECT at, status, reason, detail FROM {s}.flymy_refusals ORDER BY id DESC LIMIT %(limit)s
"""
# At most a batch of expired rows, skipping rows another transaction holds (so a purge never
# waits nor deadlocks); re-checked on delete, so a row claimed again meanwhile stays.
_PURGE = """
DELETE FROM {s}.{table} WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM {s}.{table} WHERE expires <= {now} LIMIT %(batch)s FOR UPDATE SKIP LOCKED
)) AND expires <= {now}
"""


@dataclass(frozen=True, slots=True)
class _Queries:
    """Every statement, with the schema and the clock filled in."""

    ddl: str
    claim: str
    claim_state: str
    handlers_done: str
    forget_handlers: str
    mark: str
    complete: str
    release: str
    journal_delivery: str
    journal_update: str
    journal_get: str
    journal_list: str
    journal_settled: str
    refusal: str
    refusals: str
    purge: tuple[str, ...]

    @classmethod
    def build(cls, schema: str, now: str) -> _Queries:
        def q(text: str, **more: str) -> str:
            return text.format(s=schema, now=now, columns=_ENTRY_COLUMNS, **more)

        return cls(
            ddl=_SCHEMA_DDL.format(s=schema),
            claim=q(_CLAIM),
            claim_state=q(_CLAIM_STATE),
            handlers_done=q(_HANDLERS_DONE),
            forget_handlers=q(_FORGET_HANDLERS),
            mark=q(_MARK),
            complete=q(_COMPLETE),
            release=q(_RELEASE),
            journal_delivery=q(_JOURNAL_DELIVERY),
            journal_update=q(_JOURNAL_UPDATE),
            journal_get=q(_JOURNAL_GET),
            journal_list=q(_JOURNAL_LIST),
            journal_settled=q(_JOURNAL_SETTLED),
            refusal=q(_REFUSAL),
            refusals=q(_REFUSALS),
            purge=tuple(q(_PURGE, table=t) for t in _TABLES[:3]),
        )


class PostgresStore:
    """Idempotency records and the delivery journal in PostgreSQL, for many receivers.

    ``url_or_pool`` is a ``postgresql://`` URL (or a libpq connection string), or a
    ``psycopg_pool.ConnectionPool`` of your own (then its connections, sizes and closing are
    yours; the timeouts are set per transaction). Tables are created in ``schema`` on first
    use, which needs the ``CREATE`` privilege once; a user without it can run
    :meth:`schema_sql` in a migration. ``timeout`` (seconds) bounds each wait: for a pooled
    connection, to connect, on a lock, for a statement. ``pool_size`` is the most
    connections one process opens. ``clock`` makes leases and the journal use that clock
    instead of the server's (tests; all receivers must then share it). The journal keeps the
    newest ``max_refusals`` refused deliveries.

    Constructing the store never touches the server; call :meth:`close` at shutdown.
    Behind a pooler in transaction mode (PgBouncer), give it a pool of your own whose
    connections do not prepare statements (``kwargs={"prepare_threshold": None}``).
    """

    blocking = True

    def __init__(
        self,
        url_or_pool: str | ConnectionPool[Any],
        *,
        schema: str = "public",
        timeout: float = DEFAULT_TIMEOUT,
        pool_size: int = 10,
        max_refusals: int = 1_000,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError("timeout must be a positive number of seconds")
        if pool_size < 1 or max_refusals < 1:
            raise ValueError("pool_size and max_refusals must be at least 1")
        if not isinstance(schema, str) or not schema or "\x00" in schema:
            raise ValueError("schema must be a non-empty name")
        if len(schema.encode("utf-8", "surrogatepass")) > 63:
            raise ValueError("schema names are at most 63 bytes in PostgreSQL")
        self.schema = schema
        self.timeout = float(timeout)
        self.pool_size = pool_size
        self.max_refusals = max_refusals
        self._clock = clock
        self._user_pool: ConnectionPool[Any] | None = None
        if isinstance(url_or_pool, ConnectionPool):
            self._user_pool = url_or_pool
            self._display = f"pool={url_or_pool.name!r}"
            self._password = ""
            self._conninfo = ""
            self._connect_kwargs: dict[str, Any] = {}
        elif isinstance(url_or_pool, str):
            try:
                params = conninfo_to_dict(url_or_pool)
            except psycopg.Error:
                # libpq's message may quote the string, password included.
                raise ConfigurationError(
                    "not a valid PostgreSQL URL or connection string"
                ) from None
            ports = str(params.get("port") or "0").split(",")
            if not all(p.strip().isdigit() and int(p) < 65536 for p in ports):
                raise ConfigurationError("the PostgreSQL URL's port is not a number")
            self._password = str(params.get("password") or "")
            self._display = repr(_masked(params))
            self._conninfo = url_or_pool
            self._connect_kwargs = self._kwargs(params)
        else:
            raise TypeError("PostgresStore needs a postgresql:// URL or a psycopg_pool pool")
        self._q = _Queries.build(_quote(schema), "%(now)s" if clock else _SERVER_NOW)
        ms = int(self.timeout * 1000)
        self._set_local = (
            f"SET LOCAL statement_timeout = {ms}; SET LOCAL lock_timeout = {ms}; "
            f"SET LOCAL idle_in_transaction_session_timeout = {_idle_ms(self.timeout)}"
        )
        self._lock = threading.Lock()
        self._pool: ConnectionPool[Any] | None = None
        self._pool_pid = 0
        self._ready_pid = 0  # the process that has seen the tables exist
        self._writes = itertools.count(1)
        _STORES.add(self)

    def __repr__(self) -> str:
        # Never the password: the URL is shown rebuilt from its parts, without it.
        return f"PostgresStore({self._display}, schema={self.schema!r})"

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
        """Take ``key`` for ``lease`` seconds unless it is done or held by a live claim."""
        token = secrets.token_hex(8)
        db_key = _db_key(key)

        def work(cur: Cursor, now: float | None) -> Claim:
            p = {"key": db_key, "token": token, "lease": float(lease), "force": force, "now": now}
            cur.execute(self._q.claim, p)
            acquired = cur.fetchone() is not None
            if acquired and force:
                cur.execute(self._q.forget_handlers, p)
                claim = Claim(ClaimState.ACQUIRED, token)
            elif acquired:
                cur.execute(self._q.handlers_done, p)
                done = frozenset(str(row[0]) for row in cur.fetchall())
                claim = Claim(ClaimState.ACQUIRED, token, done)
            else:
                cur.execute(self._q.claim_state, p)
                row = cur.fetchone()
                if row is not None and row[0]:
                    claim = Claim(ClaimState.DONE)
                else:  # held (the row is locked by this statement: it cannot have gone)
                    left = float(row[1]) if row is not None else 0.0
                    claim = Claim(ClaimState.BUSY, retry_after=max(left, 0.001))
            if entry is not None:
                state = "handled" if claim.state is ClaimState.DONE else "pending"
                self._journal_delivery(cur, now, entry, db_key, state, acquired)
            elif replay and acquired:
                self._journal_update(cur, now, db_key, "pending", None)
            return claim

        return self._run(work, write=True)

    def mark_handler_done(
        self, key: str, token: str, handler: str, ttl: float, outcome: HandlerOutcome | None = None
    ) -> None:
        """Remember that ``handler`` succeeded for ``key`` for ``ttl`` seconds."""
        db_key = _db_key(key)

        def work(cur: Cursor, now: float | None) -> None:
            p = {"key": db_key, "handler": _clean(handler), "ttl": float(ttl), "now": now}
            cur.execute(self._q.mark, p)
            if outcome is not None:
                self._journal_update(cur, now, db_key, None, {handler: outcome})

        self._run(work, write=True)

    def complete(
        self, key: str, token: str, ttl: float, outcomes: Mapping[str, HandlerOutcome] | None = None
    ) -> None:
        """Remember ``key`` as done for ``ttl`` seconds, whoever holds the claim now."""
        db_key = _db_key(key)

        def work(cur: Cursor, now: float | None) -> bool:
            p = {"key": db_key, "ttl": float(ttl), "now": now}
            cur.execute(self._q.complete, p)
            row = cur.fetchone()
            cur.execute(self._q.forget_handlers, p)
            if outcomes is not None:
                self._journal_update(cur, now, db_key, "handled", outcomes)
            held_by_us = row is not None and (row[0] == token or bool(row[1]))
            return held_by_us

        if not self._run(work, write=True):
            _warn_lease_lost(key)

    def release(
        self, key: str, token: str, outcomes: Mapping[str, HandlerOutcome] | None = None
    ) -> None:
        """Drop the claim held with ``token``; keep the per-handler records."""
        db_key = _db_key(key)

        def work(cur: Cursor, now: float | None) -> None:
            cur.execute(self._q.release, {"key": db_key, "token": token})
            if cur.fetchone() is not None and outcomes is not None:
                self._journal_update(cur, now, db_key, "failed", outcomes)

        self._run(work, write=True)

    # -- the journal --------------------------------------------------------------------

    def journal_ignore(self, entry: NewEntry) -> None:
        """Record an authentic event that no handler wanted."""

        def work(cur: Cursor, now: float | None) -> None:
            self._journal_delivery(cur, now, entry, _db_key(entry.key), "ignored", True)

        self._run(work, write=True)

    def journal_get(self, key_or_run_id: str) -> JournalEntry | None:
        """The entry with this key, else the newest entry for this run id."""

        def work(cur: Cursor, now: float | None) -> JournalEntry | None:
            cur.execute(self._q.journal_get, {"key": _db_key(key_or_run_id), "now": now})
            row = cur.fetchone()
            return _entry(row) if row is not None else None

        return self._run(work)

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
        limit = max(int(limit), 0)
        query = self._q.journal_list
        params: dict[str, Any] = {"limit": limit}
        for column, value in (("state", state), ("event", event), ("agent_id", agent_id)):
            if value is not None:
                query += f" AND {column} = %({column})s"
                params[column] = _clean(value)
        if since is not None:
            query += " AND received_at >= %(since)s"
            params["since"] = since.timestamp()
        query += " ORDER BY received_at DESC, key DESC LIMIT %(limit)s"

        def work(cur: Cursor, now: float | None) -> list[JournalEntry]:
            cur.execute(query, {**params, "now": now})
            return [_entry(row) for row in cur.fetchall()]

        return self._run(work)

    # -- awaiting a run's webhook (flymy_receiver.awaiting) -------------------------------

    def journal_settled(self, run_ids: Sequence[str]) -> dict[str, JournalEntry]:
        """For each run id, its newest entry that is not ``pending``, in one query: how
        waiters look many runs up at once."""
        if not run_ids:
            return {}
        stored = {_clean(run_id): run_id for run_id in run_ids}

        def work(cur: Cursor, now: float | None) -> dict[str, JournalEntry]:
            cur.execute(self._q.journal_settled, {"runs": list(stored), "now": now})
            # Oldest first: the newest entry of a run is the one kept.
            return {stored.get(row[2], row[2]): _entry(row) for row in cur.fetchall()}

        return self._run(work)

    def notifier(self) -> PostgresNotifier:
        """``LISTEN``/``NOTIFY`` on this database, to wake waiters in other processes
        (:class:`flymy_receiver.awaiting.Notifier`); connects only when used."""
        return PostgresNotifier(self)

    def record_refusal(self, refusal: Refusal) -> None:
        """Keep one refused delivery; the oldest go first past ``max_refusals``."""
        params = {
            "at": refusal.at.timestamp(),
            "status": int(refusal.status),
            "reason": _clean(refusal.reason)[:_MAX_REASON],
            "detail": _clean(refusal.detail)[:_MAX_DETAIL],
            "keep": self.max_refusals,
        }

        def work(cur: Cursor, now: float | None) -> None:
            cur.execute(self._q.refusal, params)

        self._run(work)

    def refusals(self, limit: int = 100) -> list[Refusal]:
        """Refused deliveries, newest first."""

        def work(cur: Cursor, now: float | None) -> list[Refusal]:
            cur.execute(self._q.refusals, {"limit": max(int(limit), 0)})
            return [
                Refusal(to_datetime(at), int(status), str(reason), str(detail))
                for at, status, reason, detail in cur.fetchall()
            ]

        return self._run(work)

    def _journal_delivery(
        self,
        cur: Cursor,
        now: float | None,
        entry: NewEntry,
        db_key: str,
        state: str,
        set_state: bool,
    ) -> None:
        cur.execute(
            self._q.journal_delivery,
            {
                "key": db_key,
                "event": _clean(entry.event),
                "run_id": _clean_or_none(entry.run_id),
                "agent_id": _clean_or_none(entry.agent_id),
                "agent_name": _clean_or_none(entry.agent_name),
                "state": state,
                "set_state": set_state,
                "retention": float(entry.retention),
                "body": bytes(entry.body),
                "headers": Jsonb({_clean(k): _clean(v) for k, v in entry.headers.items()}),
                "now": now,
            },
        )

    def _journal_update(
        self,
        cur: Cursor,
        now: float | None,
        db_key: str,
        state: str | None,
        outcomes: Mapping[str, HandlerOutcome] | None,
    ) -> None:
        cur.execute(
            self._q.journal_update,
            {"key": db_key, "state": state, "outcomes": _outcomes(outcomes or {}), "now": now},
        )

    # -- housekeeping -------------------------------------------------------------------

    def schema_sql(self) -> str:
        """The ``CREATE`` statements of the store's tables, for a migration of your own."""
        return self._q.ddl

    def purge(self) -> int:
        """Delete expired records now, in bounded batches; returns how many rows went."""
        total = 0
        while True:
            gone, more = self._run(self._purge_batch)
            total += gone
            if not more:
                return total

    def close(self) -> None:
        """Close the connections this process opened (a later call opens new ones)."""
        with self._lock:
            pool, self._pool = self._pool, None
            mine = self._pool_pid == os.getpid()
        if pool is not None and mine:
            pool.close(timeout=self.timeout)
        elif pool is not None:
            _INHERITED.append(pool)  # the parent's: collecting it would end its sessions

    def _purge_batch(self, cur: Cursor, now: float | None) -> tuple[int, bool]:
        """At most a batch of expired rows from each table: (rows gone, whether any was full)."""
        gone, more = 0, False
        for query in self._q.purge:
            cur.execute(query, {"batch": _PURGE_BATCH, "now": now})
            gone += max(cur.rowcount, 0)
            more = more or cur.rowcount >= _PURGE_BATCH
        return gone, more

    # -- running a transaction ----------------------------------------------------------

    def _run(self, work: Callable[[Cursor, float | None], T], *, write: bool = False) -> T:
        """``work`` in one transaction; any database failure becomes StoreUnavailable."""
        started = time.monotonic()
        # After a server restart every idle connection of the pool is dead, and each fails
        # at once on first use: try the next one (each is discarded), within the time budget.
        tries = self.pool_size + 1
        while True:
            attempt = _Attempt()
            tries -= 1
            try:
                return self._attempt(work, write, attempt)
            except psycopg.Error as exc:
                in_time = time.monotonic() - started < self.timeout
                if tries > 0 and in_time and attempt.retryable(exc):
                    continue
                raise StoreUnavailable(self._describe(exc, attempt)) from None

    def _attempt(
        self, work: Callable[[Cursor, float | None], T], write: bool, attempt: _Attempt
    ) -> T:
        pool = self._pool_here()
        with pool.connection(timeout=self.timeout) as conn:
            attempt.connected = True
            guard = _WATCHDOG.arm(conn.fileno(), self.timeout + _GRACE)
            try:
                try:
                    with conn.cursor() as cur:
                        if self._user_pool is not None:
                            cur.execute(self._set_local)
                        creating = self._ready_pid != os.getpid()
                        if creating:
                            self._create_tables(cur)
                        now = self._clock() if self._clock is not None else None
                        result = work(cur, now)
                    attempt.committing = True
                    conn.commit()
                except BaseException:
                    _rollback_quietly(conn)
                    raise
                if creating:
                    self._ready_pid = os.getpid()
                if write and next(self._writes) % _PURGE_EVERY == 0:
                    self._purge_quietly(conn)
            finally:
                if _WATCHDOG.disarm(guard):
                    attempt.cut = True
                    conn.close()  # cut on purpose: the pool must not hand it out again
        return result

    def _create_tables(self, cur: Cursor) -> None:
        cur.execute(
            "SELECT count(*) FROM pg_catalog.pg_tables"
            " WHERE schemaname = %(schema)s AND tablename = ANY(%(tables)s)",
            {"schema": self.schema, "tables": list(_TABLES)},
        )
        row = cur.fetchone()
        if row is not None and row[0] == len(_TABLES):
            return
        # One creator at a time: concurrent CREATE TABLE IF NOT EXISTS can still collide.
        cur.execute(
            "SELECT pg_advisory_xact_lock(hashtext(%(name)s))",
            {"name": f"flymy_receiver:{self.schema}"},
        )
        cur.execute("SET LOCAL client_min_messages = warning")
        cur.execute(
            "SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = %(schema)s",
            {"schema": self.schema},
        )
        if cur.fetchone() is None:
            cur.execute(f"CREATE SCHEMA IF NOT EXISTS {_quote(self.schema)}")
        cur.execute(self._q.ddl)

    def _purge_quietly(self, conn: psycopg.Connection[Any]) -> None:
        try:
            with conn.cursor() as cur:
                if self._user_pool is not None:
                    cur.execute(self._set_local)
                self._purge_batch(cur, self._clock() if self._clock is not None else None)
            conn.commit()
        except psycopg.Error as exc:  # the next purge will catch up
            _rollback_quietly(conn)
            logger.debug("postgres purge failed: %s", self._describe(exc, None))

    def _pool_here(self) -> ConnectionPool[Any]:
        """This process's pool, made on first use (a forked worker makes its own)."""
        if self._user_pool is not None:
            return self._user_pool
        pid = os.getpid()
        pool = self._pool
        if pool is not None and self._pool_pid == pid:
            return pool
        with self._lock:
            if self._pool is not None and self._pool_pid == pid:
                return self._pool
            if self._pool is not None:
                # Inherited through fork: its sockets belong to the parent, so it is neither
                # used nor closed here (closing would end the parent's sessions).
                _INHERITED.append(self._pool)
            pool = ConnectionPool(
                self._conninfo,
                kwargs=self._connect_kwargs,
                min_size=1,
                max_size=self.pool_size,
                open=False,
                timeout=self.timeout,
                name=f"flymy-{pid}",
            )
            pool.open(wait=False)
            self._pool, self._pool_pid = pool, pid
            return pool

    def _kwargs(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The connection settings that bound every wait, after those of the URL."""
        ms = int(self.timeout * 1000)
        options = (
            f"-c statement_timeout={ms} -c lock_timeout={ms} "
            f"-c idle_in_transaction_session_timeout={_idle_ms(self.timeout)}"
        )
        if params.get("options"):
            options += " " + str(params["options"])  # the URL's own settings win
        kwargs: dict[str, Any] = {"options": options, "autocommit": False}
        defaults = {
            "connect_timeout": str(max(2, math.ceil(self.timeout))),
            "application_name": "flymy_receiver",
            "keepalives": "1",
            "keepalives_idle": "30",
            "keepalives_interval": "5",
            "keepalives_count": "3",
            "tcp_user_timeout": str(int((self.timeout + _GRACE) * 1000)),
        }
        for name, value in defaults.items():
            if name not in params:
                kwargs[name] = value
        return kwargs

    def _describe(self, exc: BaseException, attempt: _Attempt | None) -> str:
        if attempt is not None and attempt.cut:
            text = f"no answer within {self.timeout + _GRACE:g}s; the connection was cut"
        else:
            lines = str(exc).strip().splitlines()
            text = f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"
        if self._password:
            text = text.replace(self._password, "***")
        return f"postgres: {text}"

    def _after_fork(self) -> None:
        self._lock = threading.Lock()


_SERVER_NOW = "extract(epoch FROM now())::float8"


class PostgresNotifier:
    """Ended deliveries announced with ``NOTIFY`` on one channel per schema (the payload
    is the run id); a subscriber is one dedicated connection, outside the pool, that
    ``LISTEN``s for every waiter of its receiver."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store
        self.channel = _channel(store.schema)

    def __repr__(self) -> str:
        return f"PostgresNotifier(channel={self.channel!r})"

    def publish(self, run_id: str) -> None:
        """Announce that a delivery of ``run_id`` ended (in a transaction of its own)."""
        payload = _clean(run_id)
        if len(payload.encode("utf-8")) > _MAX_PAYLOAD:
            payload = ""  # too long for NOTIFY: listeners then look up every waited run

        def work(cur: Cursor, now: float | None) -> None:
            cur.execute("SELECT pg_notify(%s, %s)", (self.channel, payload))

        self._store._run(work)

    def subscribe(self) -> _PostgresSubscription:
        """Connect and ``LISTEN``; return once listening."""
        store = self._store
        try:
            if store._user_pool is not None:
                pool = store._user_pool
                # psycopg_pool 3.3 allows either to be a function that makes it.
                info, extra = pool.conninfo, pool.kwargs
                conninfo = info() if callable(info) else info
                kwargs = dict((extra() if callable(extra) else extra) or {})
            else:
                conninfo, kwargs = store._conninfo, dict(store._connect_kwargs)
            kwargs["autocommit"] = True
            conn: psycopg.Connection[Any] = psycopg.connect(conninfo, **kwargs)
        except psycopg.Error as exc:
            raise StoreUnavailable(store._describe(exc, None)) from None
        subscription = _PostgresSubscription(conn, store)
        try:
            subscription.run(f"LISTEN {_quote(self.channel)}")
        except BaseException:
            subscription.close()
            raise
        return subscription


class _PostgresSubscription:
    def __init__(self, conn: psycopg.Connection[Any], store: PostgresStore) -> None:
        self._conn = conn
        self._store = store
        self._arrived: list[str] = []
        conn.add_notify_handler(lambda notify: self._arrived.append(notify.payload))

    def get(self, timeout: float) -> list[str] | None:
        if not self._arrived:
            try:
                readable, _, _ = select.select([self._conn.fileno()], [], [], timeout)
            except (OSError, ValueError, psycopg.Error) as exc:
                raise StoreUnavailable(f"postgres: {type(exc).__name__}") from None
            if readable:
                # Something arrived: a statement makes psycopg read it (on every version),
                # handing each notification to the handler above.
                self.run("SELECT 1")
        arrived, self._arrived = self._arrived, []
        return None if "" in arrived else arrived

    def run(self, statement: str) -> None:
        """One statement on the listening connection, bounded like every other call."""
        conn = self._conn
        try:
            guard = _WATCHDOG.arm(conn.fileno(), self._store.timeout + _GRACE)
            try:
                conn.execute(statement)
            finally:
                _WATCHDOG.disarm(guard)
        except psycopg.Error as exc:
            raise StoreUnavailable(self._store._describe(exc, None)) from None

    def close(self) -> None:
        self._conn.close()


def _channel(schema: str) -> str:
    """The notification channel of a schema: a name of at most 63 bytes."""
    name = "flymy_awaiting" if schema == "public" else f"flymy_awaiting:{schema}"
    if len(name.encode("utf-8")) > 63:
        name = "flymy_awaiting:" + hashlib.sha256(schema.encode("utf-8")).hexdigest()[:32]
    return name


@dataclass
class _Attempt:
    """How far one try of a transaction got, to tell whether trying again is safe."""

    connected: bool = False
    committing: bool = False
    cut: bool = False

    def retryable(self, exc: BaseException) -> bool:
        # Before COMMIT the server rolled everything back, so a second try cannot double a
        # write. Not after a cut (the server is stalled) nor a timeout (it is slow).
        return (
            self.connected
            and not self.committing
            and not self.cut
            and isinstance(exc, psycopg.OperationalError)
            and exc.sqlstate in _RETRY_SQLSTATES
        )


class _Guard:
    __slots__ = ("deadline", "done", "fd", "fired")

    def __init__(self, fd: int, deadline: float) -> None:
        self.fd, self.deadline = fd, deadline
        self.done = self.fired = False


class _Watchdog:
    """One thread that cuts the connection of any call past its deadline.

    Server-side timeouts cover a slow server; this covers one that stopped answering (its
    kernel still accepting our bytes): the socket is shut down, so the blocked call fails
    at once, and the server, when it wakes, sees the client gone and rolls back.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, _Guard]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, fd: int, seconds: float) -> _Guard:
        guard = _Guard(fd, time.monotonic() + seconds)
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="flymy-postgres-watchdog", daemon=True
                )
                self._thread.start()
            heapq.heappush(self._heap, (guard.deadline, next(self._order), guard))
            if self._heap[0][2] is guard:
                self._cond.notify()
        return guard

    def disarm(self, guard: _Guard) -> bool:
        """Stop watching; True when the deadline had passed and the connection was cut."""
        with self._cond:
            guard.done = True
            return guard.fired

    def _loop(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                wait = self._heap[0][0] - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                guard = heapq.heappop(self._heap)[2]
                guard.fired = True
                _cut(guard.fd)  # under the lock: the call cannot have returned it meanwhile


def _cut(fd: int) -> None:
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()


_WATCHDOG = _Watchdog()
_STORES: weakref.WeakSet[PostgresStore] = weakref.WeakSet()
#: Pools inherited through fork, kept so that collecting them never closes their sockets.
_INHERITED: list[ConnectionPool[Any]] = []


def _after_fork_in_child() -> None:
    # A lock held by another thread at fork time would stay held forever in the child.
    _WATCHDOG._reset()
    for store in list(_STORES):
        store._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _rollback_quietly(conn: psycopg.Connection[Any]) -> None:
    try:
        if not conn.closed:
            conn.rollback()
    except psycopg.Error:
        logger.debug("postgres rollback failed", exc_info=True)


def _quote(name: str) -> str:
    """A quoted SQL identifier: any name works, none can break out."""
    return '"' + name.replace('"', '""') + '"'


def _idle_ms(timeout: float) -> int:
    # Longer than any call (so never mid-call), short enough to free a stalled client's locks.
    return int(max(10.0, 4 * (timeout + _GRACE)) * 1000)


def _masked(params: Mapping[str, Any]) -> str:
    user = f"{params['user']}@" if params.get("user") else ""
    host = str(params.get("host") or params.get("hostaddr") or "")
    port = f":{params['port']}" if params.get("port") else ""
    dbname = f"/{params['dbname']}" if params.get("dbname") else ""
    return f"postgresql://{user}{host}{port}{dbname}"


def _db_key(key: str) -> str:
    """The key as stored: PostgreSQL text cannot hold NUL, so such a key is kept hashed."""
    if "\x00" not in key:
        try:
            key.encode("utf-8")
            return key
        except UnicodeEncodeError:
            pass
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    return f"sha256-of-unstorable-key:{digest}"


def _clean(text: str) -> str:
    """``text`` storable as PostgreSQL text and JSON (no NUL, valid UTF-8), for display."""
    text = str(text)
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def _clean_or_none(text: str | None) -> str | None:
    return None if text is None else _clean(text)


def _outcomes(outcomes: Mapping[str, HandlerOutcome]) -> Jsonb:
    return Jsonb(
        {
            _clean(name): {
                "ok": o.ok,
                "error": _clean_or_none(o.error),
                "traceback": _clean_or_none(o.traceback),
                "at": o.at,
            }
            for name, o in outcomes.items()
        }
    )


def _entry(row: tuple[Any, ...]) -> JournalEntry:
    handlers = row[11] or {}
    return JournalEntry(
        key=row[0],
        event=row[1],
        run_id=row[2],
        agent_id=row[3],
        agent_name=row[4],
        state=row[5],
        attempts=int(row[6]),
        received_at=to_datetime(float(row[7])),
        updated_at=to_datetime(float(row[8])),
        body=bytes(row[9]),
        headers=dict(row[10] or {}),
        handlers={str(name): HandlerOutcome.from_dict(value) for name, value in handlers.items()},
    )


def _warn_lease_lost(key: str) -> None:
    logger.warning(
        "the claim on %s expired before its handlers finished: another worker may have run "
        "them too; make Receiver(lease=...) longer than the slowest handler",
        key[:200],
    )
