"""A PostgreSQL idempotency store and delivery journal, for apps that already run PostgreSQL.

psycopg 3 with its connection pool. Every store call is ONE statement, in autocommit (the
statements are in :mod:`.postgres_sql`, the tables in :mod:`.postgres_schema`, the
connections in :mod:`.postgres_pool`, the waiters' channel in :mod:`.postgres_notify`), so a
delivery with one handler costs two round trips: the claim with its journal entry and the
handlers already done; the completion with its outcomes, its history, the entry's state and
the ``NOTIFY`` of the run's waiters. Each extra handler adds one (its own record).

- A claim is one ``INSERT ... ON CONFLICT DO UPDATE`` on the event's row, which takes the
  row lock, so of many receivers claiming one event at once exactly one wins. Every
  statement touches an event's rows in one order (deliveries, handlers, journal), so
  calls never deadlock.
- Times are the server's clock (``now()``) unless a ``clock`` is given, so receivers on
  several machines agree on leases whatever their own clocks say.
- Every wait is bounded (see :mod:`.postgres_pool`); an unreachable or stalled server is
  :class:`~flymy_receiver.errors.StoreUnavailable` (503) within seconds. A claim whose
  answer never came (the server stalled after it was sent, so it may have taken effect) is
  given up by its token in the background once the server answers again: it never holds
  the event for its lease.
- The tables are created (or upgraded in place) on first use, under an advisory lock;
  ``create=False`` creates nothing and says so when they are missing. Expired rows are
  purged a bounded batch at a time.

Nothing touches the server until the first call, and the pool is made per process, so a
store built before gunicorn forks its workers gives each worker its own connections.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import queue
import secrets
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

try:
    import psycopg
    from psycopg.types.json import Jsonb
    from psycopg_pool import ConnectionPool
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError(
        "PostgresStore needs psycopg 3 and psycopg-pool: pip install 'flymy-receiver[postgres]'"
    ) from None

from ..errors import StoreUnavailable
from . import postgres_pool
from . import postgres_rows as values
from .base import Claim, ClaimState
from .postgres_notify import PostgresNotifier, channel
from .postgres_pool import DEFAULT_TIMEOUT, AnswerLost, Connections
from .postgres_schema import BYTE_SHARDS, PREFIX, REQUIRED_COLUMNS, TABLES, ddl, quote
from .postgres_sql import Queries
from .records import (
    Attempt,
    HandlerOutcome,
    JournalEntry,
    NewEntry,
    Refusal,
    to_datetime,
)

__all__ = ["DEFAULT_TIMEOUT", "PostgresNotifier", "PostgresStore"]

logger = logging.getLogger("flymy_receiver")

#: Expired rows are purged once per this many writes of a process, at most a batch a table.
_PURGE_EVERY = 100
_PURGE_BATCH = 500
#: Refusal texts are cut to this many characters.
_MAX_REASON, _MAX_DETAIL = 100, 1000
#: Claims waiting to be given up (beyond, their lease ends them).
_GIVE_UP_QUEUE = 1000
#: Characters of sender-chosen text in a log line.
_LOGGED = 200

_SERVER_NOW = "extract(epoch FROM now())::float8"


class PostgresStore:
    """Idempotency records and the delivery journal in PostgreSQL, for many receivers.

    ``url_or_pool`` is a ``postgresql://`` URL (or a libpq connection string), or a
    ``psycopg_pool.ConnectionPool`` of your own (then its connections, sizes and closing are
    yours; the timeouts are set per transaction). Tables are created in ``schema`` on first
    use (``create=True``), which needs the ``CREATE`` privilege once; a user without it can
    run :meth:`schema_sql` in a migration; with ``create=False`` missing tables are an error
    and nothing is created (read-only tools). ``timeout`` (seconds) bounds each wait: for a
    pooled connection, to connect, on a lock, for a statement. ``pool_size`` is the most
    connections one process opens. ``clock`` makes leases and the journal use that clock
    instead of the server's (tests; all receivers must then share it). The journal keeps
    the newest ``max_refusals`` refused deliveries, and bodies up to ``max_journal_bytes``
    in all (``None``: no limit); past it an entry is kept without its body
    (``body_dropped``), its claim and idempotency record as always.

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
        create: bool = True,
        max_journal_bytes: int | None = None,
    ) -> None:
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError("timeout must be a positive number of seconds")
        if pool_size < 1 or max_refusals < 1:
            raise ValueError("pool_size and max_refusals must be at least 1")
        if max_journal_bytes is not None and max_journal_bytes < 0:
            raise ValueError("max_journal_bytes must be a number of bytes, or None")
        if not isinstance(schema, str) or not schema or "\x00" in schema:
            raise ValueError("schema must be a non-empty name")
        try:
            encoded = schema.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("schema must be valid text") from None
        if len(encoded) > 63:
            raise ValueError("schema names are at most 63 bytes in PostgreSQL")
        self.schema = schema
        self.timeout = float(timeout)
        self.pool_size = pool_size
        self.max_refusals = max_refusals
        self.create = bool(create)
        self.max_journal_bytes = max_journal_bytes
        self._clock = clock
        now = "%(now)s" if clock else _SERVER_NOW
        self._q = Queries.build(schema, now, max_journal_bytes is not None)
        self._channel = channel(schema)
        self._conn = Connections(url_or_pool, self.timeout, pool_size, self._set_up)
        self._writes = itertools.count(1)
        self._given_up: queue.Queue[tuple[str, str, int, float]] | None = None
        self._given_up_pid = 0
        self._given_up_lock = threading.Lock()
        _GIVING_UP.add(self)

    def __repr__(self) -> str:
        # Never the password: the URL is shown rebuilt from its parts, without it.
        return f"PostgresStore({self._conn.display}, schema={self.schema!r})"

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
        journal the delivery in the same statement."""
        token = secrets.token_hex(8)
        db_key = values.db_key(key)
        params: dict[str, Any] = {
            "key": db_key,
            "token": token,
            "lease": float(lease),
            "force": bool(force),
        }
        if replay:
            statement = self._q.claim_replay
        elif entry is not None:
            statement = self._q.claim_entry
            params.update(self._entry_params(entry, db_key))
        else:
            statement = self._q.claim_plain
        try:
            row = self._one(statement, params, write=True)
        except AnswerLost as lost:
            # The statement may have taken effect with no answer reaching us: never let that
            # claim hold the event (M2). Giving up a claim that never was is a no-op.
            self._give_up_later(db_key, token, float(lease), lost.backend_pid)
            raise
        acquired, done, left, names, prior = row[0], row[1], row[2], row[3], row[4]
        if acquired:
            return Claim(
                ClaimState.ACQUIRED,
                token,
                frozenset() if force else frozenset(str(n) for n in names or ()),
                prior_state=prior or "",
            )
        if done:
            return Claim(ClaimState.DONE, prior_state=prior or "")
        return Claim(ClaimState.BUSY, retry_after=max(float(left), 0.001), prior_state=prior or "")

    def mark_handler_done(
        self, key: str, token: str, handler: str, ttl: float, outcome: HandlerOutcome | None = None
    ) -> None:
        """Remember that ``handler`` succeeded for ``key`` for ``ttl`` seconds."""
        params = {
            "key": values.db_key(key),
            "handler": values.clean(handler),
            "ttl": float(ttl),
            "journal": outcome is not None,
            "outcomes": values.outcomes_json({handler: outcome} if outcome is not None else {}),
        }
        self._one(self._q.mark, params, write=True)

    def complete(
        self,
        key: str,
        token: str,
        ttl: float,
        outcomes: Mapping[str, HandlerOutcome] | None = None,
        attempt: Attempt | None = None,
    ) -> None:
        """Remember ``key`` as done for ``ttl`` seconds, whoever holds the claim now; the
        entry becomes handled (queued while deferred handlers wait)."""
        queued = outcomes is not None and any(o.state == "queued" for o in outcomes.values())
        params = {
            "key": values.db_key(key),
            "ttl": float(ttl),
            "journal": outcomes is not None,
            "state": "queued" if queued else "handled",
            "outcomes": values.outcomes_json(outcomes or {}),
            "attempts": values.attempts_json(attempt),
            "channel": self._channel,
        }
        row = self._one(self._q.complete, params, write=True)
        if not (row[0] == token or bool(row[1])):
            _warn_lease_lost(key)

    def release(
        self,
        key: str,
        token: str,
        outcomes: Mapping[str, HandlerOutcome] | None = None,
        attempt: Attempt | None = None,
    ) -> None:
        """Drop the claim held with ``token``; keep the per-handler records; the entry
        becomes failed (only while ``token`` holds the claim)."""
        params = {
            "key": values.db_key(key),
            "token": token,
            "journal": outcomes is not None,
            "outcomes": values.outcomes_json(outcomes or {}),
            "attempts": values.attempts_json(attempt),
            "channel": self._channel,
        }
        self._one(self._q.release, params, write=True)

    # -- the journal --------------------------------------------------------------------

    def journal_ignore(self, entry: NewEntry, attempt: Attempt | None = None) -> None:
        """Record an authentic event that no handler wanted (an existing entry keeps its
        state and its body)."""
        db_key = values.db_key(entry.key)
        params = self._entry_params(entry, db_key)
        params["attempts"] = values.attempts_json(attempt)
        self._one(self._q.ignore, params, write=True)

    def journal_get(self, key_or_run_id: str) -> JournalEntry | None:
        """The entry with this key, else the newest entry for this run id."""
        text = str(key_or_run_id)
        rows = self._rows(
            self._q.journal_get, {"key": values.db_key(text), "run": values.clean(text)}
        )
        return values.entry(rows[0]) if rows else None

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
        """Summaries (no body, no history) newest first, filtered; ``before`` is the key of
        the last entry of the previous page."""
        query = self._q.journal_list
        params: dict[str, Any] = {"limit": max(int(limit), 0)}
        if state == "failed":  # what needs an operator: failed, and pending past its lease
            query += (
                " AND j.state IN ('failed', 'pending')"
                " AND (j.state = 'failed' OR j.lease_until <= {now})"
            )
        elif state == "stalled":
            query += " AND j.state = 'pending' AND j.lease_until <= {now}"
        elif state == "pending":
            query += " AND j.state = 'pending' AND j.lease_until > {now}"
        elif state is not None:
            query += " AND j.state = %(state)s"
            params["state"] = values.clean(state)
        for column, value in (("event", event), ("agent_id", agent_id), ("run_id", run_id)):
            if value is not None:
                query += (
                    f" AND left(j.{column}, {PREFIX}) = left(%({column})s::text, {PREFIX})"
                    f" AND j.{column} = %({column})s"
                )
                params[column] = values.clean(value)
        if since is not None:
            query += " AND j.received_at >= %(since)s"
            params["since"] = since.timestamp()
        if until is not None:
            query += " AND j.received_at < %(until)s"
            params["until"] = until.timestamp()
        if before is not None:
            query += self._q.before
            params["before"] = values.db_key(str(before))
        query += " ORDER BY j.received_at DESC, j.key DESC LIMIT %(limit)s"
        query = query.replace("{now}", "%(now)s" if self._clock else _SERVER_NOW)
        return [values.entry(row) for row in self._rows(query, params)]

    def journal_resolve(self, key: str, note: str) -> bool:
        """Make the entry ``resolved`` with ``note``; False when there is no such entry."""
        params = {"key": values.db_key(str(key)), "note": values.clean(str(note))}
        return bool(self._rows(self._q.resolve, params, write=True))

    def claim_handler(self, key: str, handler: str, lease: float) -> Claim:
        """Take one deferred handler's own lease (``Claim.body`` holds the stored body)."""
        token = secrets.token_hex(8)
        params = {
            "key": values.db_key(key),
            "handler": values.clean(handler),
            "token": token,
            "lease": float(lease),
        }
        rows = self._rows(self._q.claim_handler, params, write=True)
        if not rows:
            raise KeyError(key)
        body, state, ok, retry_after, taken = rows[0]
        if taken:
            return Claim(
                ClaimState.ACQUIRED,
                token,
                body=bytes(body) if body is not None else None,
                prior_state=state or "",
            )
        if ok:
            return Claim(ClaimState.DONE, prior_state=state or "")
        return Claim(ClaimState.BUSY, retry_after=float(retry_after), prior_state=state or "")

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
        recorded = values.outcome_dict(outcome)
        recorded["deferred"] = True
        # What the worker does not know (its run count, when its job was sent) is kept from
        # the stored outcome; its lease ends with the run.
        for name in ("attempts", "queued_at", "lease_until"):
            if not recorded.get(name):
                recorded.pop(name, None)
        params = {
            "key": values.db_key(key),
            "handler": values.clean(handler),
            "token": token,
            "ok": bool(outcome.ok),
            "final": bool(final),
            "ttl": float(ttl),
            "outcome": Jsonb(recorded),
            "attempts": values.attempts_json(attempt),
            "channel": self._channel,
        }
        self._one(self._q.finish_handler, params, write=True)

    # -- awaiting a run's webhook (flymy_receiver.awaiting) -------------------------------

    def journal_settled(self, run_ids: Sequence[str]) -> dict[str, JournalEntry]:
        """For each run id, its newest entry whose handlers have finished (not ``pending``
        nor ``queued``), in one query: how waiters look many runs up at once."""
        if not run_ids:
            return {}
        stored = {values.clean(run_id): run_id for run_id in run_ids}
        params = {"runs": list(stored), "prefixes": sorted({r[:PREFIX] for r in stored})}
        rows = self._rows(self._q.journal_settled, params)
        # Oldest first: the newest entry of a run is the one kept.
        return {stored.get(row[2], row[2]): values.entry(row) for row in rows}

    def notifier(self) -> PostgresNotifier:
        """``LISTEN``/``NOTIFY`` on this database, to wake waiters in other processes
        (:class:`flymy_receiver.awaiting.Notifier`); connects only when used."""
        return PostgresNotifier(self)

    def record_refusal(self, refusal: Refusal) -> None:
        """Keep one refused delivery; the oldest go first past ``max_refusals``."""
        params = {
            "at": refusal.at.timestamp(),
            "status": int(refusal.status),
            "reason": values.clean(refusal.reason)[:_MAX_REASON],
            "detail": values.clean(refusal.detail)[:_MAX_DETAIL],
            "keep": self.max_refusals,
        }
        self._rows(self._q.refusal, params)

    def refusals(self, limit: int = 100) -> list[Refusal]:
        """Refused deliveries, newest first."""
        rows = self._rows(self._q.refusals, {"limit": max(int(limit), 0)})
        return [
            Refusal(to_datetime(at), int(status), str(reason), str(detail))
            for at, status, reason, detail in rows
        ]

    # -- housekeeping -------------------------------------------------------------------

    def schema_sql(self) -> str:
        """The statements that create (or upgrade) the store's tables, for a migration."""
        return ddl(self.schema)

    def purge(self) -> int:
        """Delete expired records now, in bounded batches; returns how many rows went."""
        total = 0
        while True:
            gone, more = self._purge_batch()
            total += gone
            if not more:
                return total

    def close(self) -> None:
        """Close the connections this process opened (a later call opens new ones)."""
        self._conn.close()

    def _purge_batch(self) -> tuple[int, bool]:
        """At most a batch of expired rows from each table, in one statement: (rows gone,
        whether any table gave a full batch)."""
        params = {"batch": _PURGE_BATCH, "shard": 0}
        row = self._one(self._q.purge, params)
        counts = [int(n) for n in row[:3]]
        return sum(counts), any(n >= _PURGE_BATCH for n in counts)

    # -- running statements -------------------------------------------------------------

    def _rows(
        self, statement: str, params: dict[str, Any], *, write: bool = False
    ) -> list[tuple[Any, ...]]:
        if self._clock is not None:
            params["now"] = self._clock()
        rows = self._conn.run(statement, params)
        if write and next(self._writes) % _PURGE_EVERY == 0:
            try:
                self._purge_batch()
            except StoreUnavailable as exc:  # the next purge will catch up
                logger.debug("postgres purge failed: %s", exc)
        return rows

    def _one(
        self, statement: str, params: dict[str, Any], *, write: bool = False
    ) -> tuple[Any, ...]:
        rows = self._rows(statement, params, write=write)
        if not rows:  # every statement here answers one row
            raise StoreUnavailable("postgres: the statement returned no row")
        return rows[0]

    def _entry_params(self, entry: NewEntry, db_key: str) -> dict[str, Any]:
        body = bytes(entry.body)
        params = {
            "key": db_key,
            # Shown as given when it was only too long; a key no text column can hold (NUL,
            # lone surrogates) is known by its digest, which then works as its key.
            "full_key": entry.key
            if db_key != entry.key and values.clean(entry.key) == entry.key
            else None,
            "event": values.clean(entry.event),
            "run_id": values.clean_or_none(entry.run_id),
            "agent_id": values.clean_or_none(entry.agent_id),
            "agent_name": values.clean_or_none(entry.agent_name),
            "retention": float(entry.retention),
            "body": body,
            "size": len(body),
            "headers": Jsonb({values.clean(k): values.clean(v) for k, v in entry.headers.items()}),
            "channel": self._channel,
        }
        if self.max_journal_bytes is not None:
            params["max_bytes"] = self.max_journal_bytes
            params["shard"] = zlib.crc32(db_key.encode("utf-8")) % BYTE_SHARDS
        return params

    def _set_up(self, cur: psycopg.Cursor[Any]) -> None:
        """First use in a process: the tables are there and current, or made so."""
        cur.execute(
            "SELECT (SELECT count(*) FROM pg_catalog.pg_tables"
            "  WHERE schemaname = %(schema)s AND tablename = ANY(%(tables)s)),"
            " (SELECT count(*) FROM pg_catalog.pg_attribute a"
            "  JOIN pg_catalog.pg_class c ON c.oid = a.attrelid"
            "  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
            "  WHERE n.nspname = %(schema)s AND c.relname = 'flymy_journal'"
            "  AND a.attname = ANY(%(columns)s) AND NOT a.attisdropped)",
            {"schema": self.schema, "tables": list(TABLES), "columns": list(REQUIRED_COLUMNS)},
        )
        row = cur.fetchone()
        tables, columns = (int(row[0]), int(row[1])) if row is not None else (0, 0)
        if tables == len(TABLES) and columns == len(REQUIRED_COLUMNS):
            return
        if not self.create:
            what = "are from an older version" if tables else "do not exist"
            raise StoreUnavailable(
                f"postgres: the journal's tables in schema {self.schema[:_LOGGED]!r} {what};"
                " this store was made with create=False, so it changes nothing: create or"
                " upgrade them with PostgresStore(...).schema_sql() or once with create=True"
            )
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
            cur.execute(f"CREATE SCHEMA IF NOT EXISTS {quote(self.schema)}")
        cur.execute(ddl(self.schema))

    # -- claims given up after their answer was lost (M2) --------------------------------

    def _give_up_later(self, db_key: str, token: str, lease: float, backend_pid: int) -> None:
        """Queue the release, by token, of a claim whose answer never came, once the server
        process that had it is gone (until then it may still commit it)."""
        with self._given_up_lock:
            if self._given_up is None or self._given_up_pid != os.getpid():
                self._given_up = queue.Queue(_GIVE_UP_QUEUE)
                self._given_up_pid = os.getpid()
                threading.Thread(
                    target=self._give_up_loop,
                    args=(self._given_up,),
                    name="flymy-postgres-give-up",
                    daemon=True,
                ).start()
            pending = self._given_up
        try:
            pending.put_nowait((db_key, token, backend_pid, time.monotonic() + lease))
        except queue.Full:  # its lease will end it
            logger.debug("too many claims to give up; %s waits for its lease", db_key[:_LOGGED])

    def _give_up_loop(self, pending: queue.Queue[tuple[str, str, int, float]]) -> None:
        while True:
            db_key, token, pid, deadline = pending.get()
            try:
                while time.monotonic() < deadline:
                    now = self._clock() if self._clock is not None else time.time()
                    attempt = Attempt(now, "sender", 503, "unavailable")
                    params = {
                        "key": db_key,
                        "token": token,
                        "pid": pid,
                        "attempts": values.attempts_json(attempt),
                    }
                    try:
                        if self._one(self._q.give_up, params)[0]:
                            break  # given up, or it never took effect
                    except StoreUnavailable as exc:
                        logger.debug("could not give up the claim on %s: %s", db_key[:_LOGGED], exc)
                    time.sleep(0.2)
            finally:
                pending.task_done()

    def _wait_given_up(self, timeout: float) -> bool:
        """Whether every claim given up so far was sent, waiting up to ``timeout`` (tests)."""
        deadline = time.monotonic() + timeout
        while self._given_up is not None and self._given_up.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True


def _warn_lease_lost(key: str) -> None:
    logger.warning(
        "the claim on %s expired before its handlers finished: another worker may have run "
        "them too; make Receiver(lease=...) longer than the slowest handler",
        key[:_LOGGED],
    )


# A forked worker starts its own queue of claims to give up (the parent's thread is not
# there); the store's lock must not be one another thread held at fork time.
def _reset_give_up() -> None:
    for store in list(_GIVING_UP):
        store._given_up_lock = threading.Lock()


_GIVING_UP: weakref.WeakSet[PostgresStore] = weakref.WeakSet()
postgres_pool.AFTER_FORK.append(_reset_give_up)
