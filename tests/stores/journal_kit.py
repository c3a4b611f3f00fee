"""What the journal contract tests share: small makers of entries, outcomes and attempts.

Each test module defines its own ``backend`` fixture (over ``JOURNAL_BACKENDS``).
"""

from __future__ import annotations

from flymy_receiver.stores.base import JournalStore, journals
from flymy_receiver.stores.records import Attempt, HandlerOutcome, JournalEntry, NewEntry
from tests.stores.backends import Backend

__all__ = [
    "LEASE",
    "TTL",
    "attempt",
    "failed",
    "get",
    "new_entry",
    "ok",
    "queued",
    "store_of",
]

# Short enough for the stores that are tested in real time (Redis, PostgreSQL).
LEASE = 0.3
TTL = 60.0


def store_of(backend: Backend) -> JournalStore:
    assert journals(backend.store)
    assert isinstance(backend.store, JournalStore)
    return backend.store


def get(store: JournalStore, key: str) -> JournalEntry:
    """The entry, which must exist."""
    entry = store.journal_get(key)
    assert entry is not None, key[:200]
    return entry


def new_entry(
    key: str,
    *,
    run_id: str | None = None,
    event: str = "run.completed",
    agent_id: str | None = "agent_abc",
    body: bytes = b'{"event":"run.completed"}',
    retention: float = 3600.0,
) -> NewEntry:
    return NewEntry(
        key=key,
        event=event,
        run_id=run_id if run_id is not None else key.rpartition(":")[2],
        agent_id=agent_id,
        agent_name="Sales Lead Profiler",
        body=body,
        headers={"Content-Length": str(len(body))},
        retention=retention,
    )


def ok() -> HandlerOutcome:
    return HandlerOutcome(ok=True, at=1_700_000_000.0)


def failed(message: str = "boom") -> HandlerOutcome:
    return HandlerOutcome(
        ok=False,
        error=f"RuntimeError: {message}",
        traceback="Traceback (most recent call last):\n  ...\nRuntimeError: " + message,
        at=1_700_000_001.0,
    )


def queued() -> HandlerOutcome:
    """A deferred handler's outcome as the delivery records it: its job about to be sent."""
    return HandlerOutcome(
        ok=False, state="queued", deferred=True, at=1_700_000_002.0, queued_at=1_700_000_002.0
    )


def attempt(
    outcome: str = "handled",
    status: int | None = 200,
    *,
    source: str = "sender",
    at: float = 1_700_000_000.0,
    handler: str | None = None,
) -> Attempt:
    return Attempt(at, source, status, outcome, 0.25, handler)
