"""Deferred handlers in :class:`~flymy_receiver.stores.SQLiteStore` (DESIGN section 10):
each handler's own lease, kept in the entry's ``leases`` column, and the runs its workers
record. Each function runs inside the store's ``BEGIN IMMEDIATE`` transaction."""

from __future__ import annotations

import secrets
import sqlite3

import orjson

from . import sqlite_journal as journal
from .base import Claim, ClaimState
from .handler_runs import entry_state_after, finished, running
from .records import Attempt, HandlerOutcome, outcomes_from_json

__all__ = ["claim_handler", "finish_handler"]


def claim_handler(
    db: sqlite3.Connection, key: str, handler: str, lease: float, now: float
) -> Claim:
    """Take one deferred handler's own lease (``Claim.body`` holds the stored body);
    raises KeyError when the journal has no such entry."""
    row = db.execute(
        "SELECT j.state, j.handlers, j.leases, b.body FROM flymy_journal j "
        "LEFT JOIN flymy_journal_bodies b ON b.id = j.id "
        "WHERE j.key = ? AND j.expires > ?",
        (key, now),
    ).fetchone()
    if row is None:
        raise KeyError(key)
    prior, stored, leases_json, body = row
    outcomes = outcomes_from_json(stored)
    before = outcomes.get(handler)
    if before is not None and before.state == "ok":
        return Claim(ClaimState.DONE, prior_state=prior)
    leases = orjson.loads(leases_json) if leases_json else {}
    held = leases.get(handler)
    if held is not None and held[1] > now:
        return Claim(ClaimState.BUSY, retry_after=held[1] - now, prior_state=prior)
    token = secrets.token_hex(8)
    leases[handler] = [token, now + lease]
    outcome = running(before, journal.wall(now), now + lease)
    journal.update(
        db,
        key,
        now,
        None,
        {handler: outcome},
        None,
        stored,
        leases=orjson.dumps(leases).decode(),
    )
    body = bytes(body) if body is not None else None
    return Claim(ClaimState.ACQUIRED, token, body=body, prior_state=prior)


def finish_handler(
    db: sqlite3.Connection,
    key: str,
    handler: str,
    token: str,
    outcome: HandlerOutcome,
    attempt: Attempt,
    final: bool,
    ttl: float,
    now: float,
) -> None:
    """Record a deferred handler's run (see :mod:`flymy_receiver.stores.base`)."""
    row = db.execute(
        "SELECT handlers, leases FROM flymy_journal WHERE key = ? AND expires > ?",
        (key, now),
    ).fetchone()
    if row is None:
        return
    outcomes = outcomes_from_json(row[0])
    leases = orjson.loads(row[1]) if row[1] else {}
    held = leases.get(handler)
    holds = held is not None and held[0] == token
    if not outcome.ok and not holds:
        return  # a late worker: whoever holds the lease now records the run
    if holds:
        del leases[handler]
    outcomes[handler] = finished(outcome, outcomes.get(handler))
    state = entry_state_after((o.state for o in outcomes.values()), outcome.ok, final)
    journal.update(
        db,
        key,
        now,
        state,
        {handler: outcomes[handler]},
        attempt,
        row[0],
        leases=orjson.dumps(leases).decode(),
    )
    if state == "failed":  # for good: a replay may claim the key again
        db.execute("DELETE FROM flymy_deliveries WHERE key = ? AND done = 1", (key,))
        ok = [(key, name, now + ttl) for name, o in outcomes.items() if o.state == "ok"]
        db.executemany(
            "INSERT OR REPLACE INTO flymy_handlers (key, handler, expires) VALUES (?, ?, ?)",
            ok,
        )
