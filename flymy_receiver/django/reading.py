"""How :class:`~flymy_receiver.django.DjangoStore` reads the journal: one entry with its body
and history, summaries without them, the keyset pages and the derived ``stalled`` state.

Every read is one query on an index (see :class:`~flymy_receiver.django.models.JournalEntry`):
the filter's column, then ``(received_at, key)`` walked backwards, so a page costs the same
with a thousand entries or a million, and whatever the size of the bodies (lists defer them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..stores.records import (
    Attempt,
    HandlerOutcome,
    JournalEntry,
    to_datetime,
)

__all__ = ["JournalReads", "aware", "db_time", "run_digest", "stored_key", "text"]

#: What a summary never reads.
_SUMMARY_DEFERS = ("body", "history", "leases")


class JournalReads:
    """The journal's read side, mixed into DjangoStore (which provides the attributes)."""

    using: str
    _clock: Callable[[], float]

    if TYPE_CHECKING:

        def _reading(self) -> AbstractContextManager[ModuleType]: ...  # DjangoStore's

    def journal_get(self, key_or_run_id: str) -> JournalEntry | None:
        """The entry with this key, else the newest entry for this run id (any length)."""
        now = self._clock()
        with self._reading() as m:
            live = _live(m.JournalEntry.objects.using(self.using), now)
            row = live.filter(key=stored_key(key_or_run_id)).first()
            if row is None:
                newest = live.filter(run_digest=run_digest(key_or_run_id))
                row = newest.order_by("-received_at", "-key").first()
            if row is None:
                return None
            return entry_from_row(row, now, body=True, history=True)

    def journal_settled(self, run_ids: Sequence[str]) -> dict[str, JournalEntry]:
        """For each run id, its newest entry whose handlers have all finished (neither
        ``pending`` nor ``queued``), in one query: how waiters poll this store."""
        if not run_ids:
            return {}
        wanted = {run_digest(run_id): run_id for run_id in run_ids}
        now = self._clock()
        with self._reading() as m:
            rows = (
                _live(m.JournalEntry.objects.using(self.using), now)
                .filter(run_digest__in=list(wanted))
                .exclude(state__in=("pending", "queued"))
                .defer("history", "leases")
                .order_by()
            )
            found: dict[str, JournalEntry] = {}
            # A few rows per run: ordered here, oldest first, so that the newest is kept.
            for row in sorted(rows, key=lambda row: (row.received_at, row.key)):
                if row.run_id == wanted.get(row.run_digest):
                    found[row.run_id] = entry_from_row(row, now, body=True)
            return found

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
        """Summaries (no body, no history) newest first by ``(received_at, key)``, filtered;
        ``before`` is the key of the last entry of the previous page."""
        if limit < 1:
            return []
        now = self._clock()
        with self._reading() as m:
            rows = _live(m.JournalEntry.objects.using(self.using), now)
            if event is not None:
                rows = rows.filter(event=text(event, m.TEXT_LENGTH))
            if agent_id is not None:
                rows = rows.filter(agent_id=text(agent_id, m.TEXT_LENGTH))
            if run_id is not None:
                rows = rows.filter(run_digest=run_digest(run_id))
            if since is not None:
                rows = rows.filter(received_at__gte=db_time(since.timestamp()))
            if until is not None:
                rows = rows.filter(received_at__lt=db_time(until.timestamp()))
            if before is not None:
                cursor = (
                    m.JournalEntry.objects.using(self.using)
                    .filter(key=stored_key(before))
                    .values_list("received_at", flat=True)
                    .first()
                )
                if cursor is None:
                    return []  # the previous page's last entry is gone: no well-defined page
                # The first condition is the index range; the second breaks ties on the key.
                from django.db.models import Q

                rows = rows.filter(received_at__lte=cursor).filter(
                    Q(received_at__lt=cursor) | Q(key__lt=stored_key(before))
                )
            rows = rows.defer(*_SUMMARY_DEFERS).order_by("-received_at", "-key")
            if state is None:
                return [entry_from_row(row, now) for row in rows[:limit]]
            return self._by_state(rows, state, now, limit)

    def _by_state(self, rows: Any, state: str, now: float, limit: int) -> list[JournalEntry]:
        # "failed" is the stored state plus the derived "stalled": two index walks (state,
        # received_at, key), merged, rather than one OR that no index serves in order.
        walks: list[Any] = []
        if state in ("failed", "stalled"):
            walks.append(rows.filter(state="pending", lease_until__lte=now))
        if state == "failed":
            walks.append(rows.filter(state="failed"))
        elif state == "pending":
            walks.append(rows.filter(state="pending", lease_until__gt=now))
        elif state != "stalled":
            walks.append(rows.filter(state=state))
        found = [entry_from_row(row, now) for walk in walks for row in walk[:limit]]
        if len(walks) > 1:
            found.sort(key=lambda e: (e.received_at, e.key), reverse=True)
        return found[:limit]


def _live(rows: Any, now: float) -> Any:
    """The entries not yet expired. ``expires + 0`` keeps the planner off the ``expires``
    index (SQLite would walk it, then sort every live entry): the filter's own index and the
    order serve the page, and expiry is checked on the rows they give (purged regularly)."""
    from django.db.models import F

    return rows.alias(live_until=F("expires") + 0.0).filter(live_until__gt=now)


def entry_from_row(
    row: Any, now: float, *, body: bool = False, history: bool = False
) -> JournalEntry:
    """A row as a journal entry: a summary, or with its ``body`` and its ``history`` (read
    only when asked: the query deferred them otherwise)."""
    state = row.state
    if state == "pending" and row.lease_until <= now:
        state = "stalled"  # its claim's lease has ended: its worker died
    stored = bytes(row.body) if body and row.body is not None else None
    attempts = tuple(Attempt.from_dict(item) for item in (row.history or ())) if history else ()
    return JournalEntry(
        key=row.full_key or row.key,
        event=row.event,
        run_id=row.run_id,
        agent_id=row.agent_id,
        agent_name=row.agent_name,
        state=state,
        attempts=row.attempts,
        received_at=aware(row.received_at),
        updated_at=aware(row.updated_at),
        body=stored,
        headers=dict(row.headers or {}),
        handlers={n: HandlerOutcome.from_dict(o) for n, o in (row.handlers or {}).items()},
        history=attempts,
        note=row.note,
        body_size=row.body_size,
        body_dropped=row.body_dropped,
    )


#: Keys longer than this are stored as ``sha256:`` and their digest (the models' KEY_LENGTH).
_KEY_LENGTH = 255


def stored_key(key: str) -> str:
    """The key as the tables hold it: itself, or ``sha256:<digest>`` when longer than the
    column (the journal keeps the whole key beside it, in ``full_key``)."""
    if len(key) <= _KEY_LENGTH:
        return key
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def run_digest(run_id: str) -> str:
    """What the journal indexes for a run id: its SHA-256, whatever its length."""
    return hashlib.sha256(run_id.encode("utf-8", "surrogatepass")).hexdigest()


def text(value: str | None, length: int) -> str | None:
    """Sender-chosen text kept to its column (a bounded prefix), so no value fails a row."""
    return value[:length] if value is not None else None


def db_time(seconds: float) -> datetime:
    """Epoch seconds as the datetime Django stores: aware UTC, or naive UTC without USE_TZ."""
    from django.conf import settings

    moment = to_datetime(seconds)
    return moment if settings.USE_TZ else moment.replace(tzinfo=None)


def aware(moment: datetime) -> datetime:
    """A stored datetime as an aware UTC one (naive ones were stored as UTC)."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)
