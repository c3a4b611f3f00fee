"""The delivery journal's reads and writes for :class:`~flymy_receiver.stores.SQLiteStore`.

Each function runs on a connection inside the store's transaction (the same one as the
claim or completion it goes with), so a delivery still commits twice. Times are epoch
seconds cut to microseconds, so that a time read back from an entry (a ``datetime``) finds
that entry again in ``since``/``until``.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import orjson

from .records import (
    Attempt,
    HandlerOutcome,
    JournalEntry,
    NewEntry,
    history_from_json,
    outcomes_from_json,
    to_datetime,
)
from .sqlite_schema import ADD_BYTES, APPEND_HISTORY, FULL, INSERT_ENTRY, SUMMARY

__all__ = ["UNREAD", "delete", "deliver", "entry_from_row", "get", "list_entries", "update", "wall"]

logger = logging.getLogger("flymy_receiver")

#: Marks a row not read yet (``None`` is a row read and not found).
UNREAD: Any = object()


def wall(now: float) -> float:
    """A time as the journal keeps it (microseconds, as a datetime holds)."""
    return round(now, 6)


def attempt_json(attempt: Attempt) -> str:
    return orjson.dumps(attempt.to_dict()).decode()


def deliver(
    db: sqlite3.Connection,
    entry: NewEntry,
    now: float,
    state: str,
    *,
    acquired: bool = False,
    attempt: Attempt | None = None,
    lease_until: float = 0.0,
    found: Any = UNREAD,
    max_bytes: int | None = None,
) -> str:
    """A delivery of ``entry``: a new entry in ``state``, or one more attempt on the live
    one, which takes ``state``, the new body and fields only when the delivery ``acquired``
    the claim (the handlers run on it; its attempt is recorded when it ends). ``found`` is
    the entry's ``(id, expires, state)`` as already read (``None``: no row). Returns the
    state before ("" for a new entry)."""
    now = wall(now)
    expires = now + entry.retention
    if found is UNREAD:
        found = db.execute(
            "SELECT id, expires, state FROM flymy_journal WHERE key = ?", (entry.key,)
        ).fetchone()
    history = attempt_json(attempt) if attempt is not None else None
    if found is not None and found[1] > now:
        entry_id, _, prior = found
        if not acquired:  # an attempt counted; the entry stays as its handlers saw it
            appended = (
                ("", ()) if history is None else (f", history = {APPEND_HISTORY}", (history,))
            )
            db.execute(
                "UPDATE flymy_journal SET attempts = attempts + 1, updated_at = ?, "  # noqa: S608
                f"retention = ?, expires = ?{appended[0]} WHERE id = ?",
                (now, entry.retention, expires, *appended[1], entry_id),
            )
            return str(prior)
        db.execute(
            "UPDATE flymy_journal SET attempts = attempts + 1, updated_at = ?, retention = ?, "
            "expires = ?, state = ?, event = ?, run_id = ?, agent_id = ?, agent_name = ?, "
            "headers = ?, lease_until = ? WHERE id = ?",
            (
                now,
                entry.retention,
                expires,
                state,
                entry.event,
                entry.run_id,
                entry.agent_id,
                entry.agent_name,
                orjson.dumps(dict(entry.headers)),
                lease_until,
                entry_id,
            ),
        )
        _store_body(db, entry_id, entry, max_bytes, replace=True)
        return str(prior)
    if found is not None:  # expired, not purged yet: a fresh entry, arrived now
        delete(db, [found[0]])
    cursor = db.execute(
        INSERT_ENTRY,
        (
            entry.key,
            entry.event,
            entry.run_id,
            entry.agent_id,
            entry.agent_name,
            state,
            now,
            now,
            entry.retention,
            expires,
            orjson.dumps(dict(entry.headers)),
            f"[{history}]" if history is not None else "[]",
            len(entry.body),
            0,
            lease_until,
        ),
    )
    _store_body(db, cursor.lastrowid or 0, entry, max_bytes, replace=False)
    return ""


def _store_body(
    db: sqlite3.Connection, entry_id: int, entry: NewEntry, max_bytes: int | None, *, replace: bool
) -> None:
    """Keep the body of entry ``entry_id``, unless that would pass ``max_bytes`` of bodies
    in all: then the entry is kept without it (``body_dropped``)."""
    size = len(entry.body)
    if replace:
        old = db.execute(
            "SELECT length(body) FROM flymy_journal_bodies WHERE id = ?", (entry_id,)
        ).fetchone()
        if old is not None:
            size -= old[0]
            db.execute("DELETE FROM flymy_journal_bodies WHERE id = ?", (entry_id,))
    if max_bytes is not None:
        (total,) = db.execute("SELECT bytes FROM flymy_journal_size WHERE id = 0").fetchone()
        if total + size > max_bytes:
            db.execute(
                "UPDATE flymy_journal SET body_dropped = 1, body_size = ? WHERE id = ?",
                (len(entry.body), entry_id),
            )
            db.execute(ADD_BYTES, (size - len(entry.body),))
            logger.warning(
                "the journal keeps %s without its body: its bodies already take "
                "max_journal_bytes=%d",
                entry.key[:200],
                max_bytes,
            )
            return
    db.execute("INSERT INTO flymy_journal_bodies (id, body) VALUES (?, ?)", (entry_id, entry.body))
    if replace:
        db.execute(
            "UPDATE flymy_journal SET body_dropped = 0, body_size = ? WHERE id = ?",
            (len(entry.body), entry_id),
        )
    db.execute(ADD_BYTES, (size,))


def update(
    db: sqlite3.Connection,
    key: str,
    now: float,
    state: str | None,
    outcomes: Mapping[str, HandlerOutcome] | None = None,
    attempt: Attempt | None = None,
    stored: Any = UNREAD,
    **columns: Any,
) -> None:
    """Set the state, merge in handler outcomes, append ``attempt`` and set ``columns``;
    an entry gone or expired stays so. ``stored`` is the entry's outcomes as already read
    (``None``: no live entry)."""
    now = wall(now)
    sets = ["state = coalesce(?, state)", "updated_at = ?", "expires = ? + retention"]
    args: list[Any] = [state, now, now]
    if attempt is not None:
        sets.append(f"history = {APPEND_HISTORY}")
        args.append(attempt_json(attempt))
    if outcomes:
        if stored is UNREAD:
            row = db.execute(
                "SELECT handlers FROM flymy_journal WHERE key = ? AND expires > ?", (key, now)
            ).fetchone()
            stored = row[0] if row is not None else None
        if stored is None:
            return
        merged = orjson.loads(stored) if stored else {}  # as stored: no objects to build
        merged.update((name, outcome.to_dict()) for name, outcome in outcomes.items())
        sets.append("handlers = ?")
        args.append(orjson.dumps(merged))
    for column, value in columns.items():  # only the names the store passes, never input
        sets.append(f"{column} = ?")
        args.append(value)
    db.execute(
        f"UPDATE flymy_journal SET {', '.join(sets)} WHERE key = ? AND expires > ?",  # noqa: S608
        (*args, key, now),
    )


def delete(db: sqlite3.Connection, ids: list[int]) -> int:
    """Delete these entries and their bodies, keeping the bodies' byte count right."""
    if not ids:
        return 0
    marks = ",".join("?" * len(ids))  # only placeholders are joined in
    (freed,) = db.execute(
        "SELECT coalesce(sum(length(body)), 0) FROM flymy_journal_bodies "  # noqa: S608
        f"WHERE id IN ({marks})",
        ids,
    ).fetchone()
    db.execute(f"DELETE FROM flymy_journal_bodies WHERE id IN ({marks})", ids)  # noqa: S608
    gone = db.execute(f"DELETE FROM flymy_journal WHERE id IN ({marks})", ids).rowcount  # noqa: S608
    db.execute(ADD_BYTES, (-freed,))
    return int(gone)


def get(db: sqlite3.Connection, key_or_run_id: str, now: float) -> JournalEntry | None:
    row = db.execute(FULL + "WHERE j.key = ? AND j.expires > ?", (key_or_run_id, now)).fetchone()
    if row is None:
        row = db.execute(
            FULL + "WHERE j.run_id = ? AND +j.expires > ? "
            "ORDER BY j.received_at DESC, j.key DESC LIMIT 1",
            (key_or_run_id, now),
        ).fetchone()
    return entry_from_row(row, now, full=True) if row is not None else None


def list_entries(
    db: sqlite3.Connection,
    now: float,
    *,
    state: str | None,
    filters: Mapping[str, str | None],
    since: datetime | None,
    until: datetime | None,
    before: str | None,
    limit: int,
) -> list[JournalEntry]:
    """Summaries newest first by ``(received_at, key)``. Each stored state a ``state`` asks
    for is one indexed query of at most ``limit`` rows (``failed`` is the failed rows and
    the stalled pending ones), merged here: no query sorts or scans the table."""
    limit = max(0, limit)
    # "+j.expires": the expiry is checked on the rows found, never used to find them (its
    # index would range over the whole journal and then sort it).
    where = ["+j.expires > ?"]
    args: list[Any] = [now]
    for column, value in filters.items():  # the store's fixed column names; values bound
        if value is not None:
            where.append(f"j.{column} = ?")
            args.append(value)
    if since is not None:
        where.append("j.received_at >= ?")
        args.append(wall(since.timestamp()))
    if until is not None:
        where.append("j.received_at < ?")
        args.append(wall(until.timestamp()))
    if before is not None:
        bound = db.execute(
            "SELECT received_at FROM flymy_journal WHERE key = ?", (before,)
        ).fetchone()
        if bound is None:  # the previous page's last entry is gone: nothing is "before" it
            return []
        where.append("(j.received_at, j.key) < (?, ?)")
        args.extend((bound[0], before))
    rows: list[Any] = []
    conditions = _state_conditions(state, now)
    for condition, extra in conditions:
        query = (
            f"SELECT {SUMMARY} FROM flymy_journal j "  # noqa: S608 (fixed text; values bound)
            f"WHERE {' AND '.join(where + condition)} "
            "ORDER BY j.received_at DESC, j.key DESC LIMIT ?"
        )
        rows.extend(db.execute(query, (*args, *extra, limit)).fetchall())
    if len(conditions) > 1:  # several queries: merge their pages
        rows.sort(key=lambda row: (row[7], row[0]), reverse=True)
        del rows[limit:]
    return [entry_from_row(row, now, full=False) for row in rows]


def _state_conditions(state: str | None, now: float) -> list[tuple[list[str], tuple[Any, ...]]]:
    """The stored states a ``state`` filter means (``stalled`` is derived, never stored)."""
    stalled = (["j.state = 'pending'", "j.lease_until <= ?"], (now,))
    if state is None:
        return [([], ())]
    if state == "failed":
        return [(["j.state = 'failed'"], ()), stalled]
    if state == "stalled":
        return [stalled]
    if state == "pending":
        return [(["j.state = 'pending'", "j.lease_until > ?"], (now,))]
    return [(["j.state = ?"], (state,))]


def entry_from_row(row: Any, now: float, *, full: bool) -> JournalEntry:
    """A :data:`SUMMARY` row (then body and history when ``full``) as an entry."""
    key, event, run_id, agent_id, agent_name, state, attempts, received, updated = row[:9]
    headers, handlers, note, body_size, body_dropped, lease_until = row[9:15]
    if state == "pending" and lease_until <= now:
        state = "stalled"
    body = bytes(row[15]) if full and row[15] is not None else None
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
        body=body,
        headers=orjson.loads(headers) if headers else {},
        handlers=outcomes_from_json(handlers),
        history=history_from_json(row[16]) if full else (),
        note=note,
        body_size=int(body_size),
        body_dropped=bool(body_dropped),
    )
