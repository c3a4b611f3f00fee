"""An idempotency store and delivery journal in the project's own database, through the ORM.

Every call is one ``transaction.atomic(using=...)``. A claim locks its row with
``select_for_update`` (created with ``get_or_create``, whose unique key settles two workers
creating it at once) and writes the journal entry, its attempt included, in the same
transaction, so an entry exists exactly when its claim does. SQLite has no row locks: there
each transaction first takes the database's write lock (a write that changes nothing), so
that claims serialise there too. Times the store compares come from its clock (wall-clock
seconds, since several processes compare them). Writes never load a body they do not change.

Deferred handlers (DESIGN section 10) take their own lease on the entry (``claim_handler``);
an ``atomic=True`` deferred handler runs in one transaction with its record
(``run_deferred_atomic``). A queue whose jobs are rows of this same database (set as
``transactional_queue``, by :class:`~flymy_receiver.queues.django.DjangoTasksQueue`) gets
its jobs written by ``complete`` in the claim's own transaction: nothing waits for a sweep.

Models are imported on first use, never at import time, so that this module (and
``flymy_receiver.django``) can be imported before Django's app registry is ready.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Protocol

from ..errors import ConfigurationError, StoreUnavailable
from ..stores.base import Claim, ClaimState
from ..stores.records import (
    HISTORY_LIMIT,
    Attempt,
    HandlerOutcome,
    NewEntry,
    Refusal,
)
from .handler_runs import HandlerRuns
from .reading import JournalReads, aware, db_time, run_digest, stored_key, text

__all__ = ["DjangoStore", "TransactionalQueue", "aware", "db_time"]

logger = logging.getLogger("flymy_receiver")

APP = "flymy_receiver.django"
#: Expired rows are deleted once per this many claims, in the claim's transaction.
_PURGE_EVERY = 500
#: Seconds between two reads of the bytes the journal's bodies take (``max_journal_bytes``).
_KEPT_BYTES_REFRESH = 5.0


class TransactionalQueue(Protocol):
    """A queue whose ``enqueue`` writes to this store's database (see the module docstring)."""

    def enqueue(self, key: str, handler_id: str, context: Mapping[str, str]) -> None: ...

    def writes_to(self, using: str) -> bool:
        """Whether its jobs are rows of the database ``using``."""
        ...


class DjangoStore(HandlerRuns, JournalReads):
    """Claims, per-handler records, the journal and refusals in a Django database.

    Needs ``"flymy_receiver.django"`` in ``INSTALLED_APPS`` and ``manage.py migrate``.
    ``using`` is the database alias (``DATABASES["default"]`` by default). Constructing it
    touches no database. Call it outside your own transactions (the views provided are
    exempt from ``ATOMIC_REQUESTS``): a claim made inside an outer transaction is not seen
    by other workers before that transaction commits. ``max_refusals`` bounds the refusals
    kept; ``max_journal_bytes`` (optional) bounds the bytes of journal bodies: past it a new
    entry is kept without its body (``body_dropped``), claims are never refused. ``clock``
    returns epoch seconds (tests).

    With this store, ``on(..., atomic=True)`` handlers run in one ``transaction.atomic()``
    with the record that they succeeded (see :meth:`run_atomic`), deferred ones too.
    """

    blocking = True
    #: Rows deleted per statement when purging: no purge holds its locks for long.
    purge_batch = 500
    #: Set by a queue whose jobs live in this database: ``complete`` then enqueues the
    #: deferred handlers it leaves ``queued`` inside its own transaction.
    transactional_queue: TransactionalQueue | None = None

    def __init__(
        self,
        using: str = "default",
        *,
        max_refusals: int = 1000,
        max_journal_bytes: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_refusals < 1:
            raise ValueError("max_refusals must be at least 1")
        if max_journal_bytes is not None and max_journal_bytes < 0:
            raise ValueError("max_journal_bytes must be positive")
        self.using = using
        self.max_refusals = max_refusals
        self.max_journal_bytes = max_journal_bytes
        self._clock = clock
        self._claims = itertools.count(1)
        self._models: ModuleType | None = None
        self._kept_bytes: int | None = None
        self._kept_read_at = 0.0

    def __repr__(self) -> str:
        return f"DjangoStore(using={self.using!r})"

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
        journal ``entry`` (a delivery) or a replay's attempt, in one transaction."""
        now = self._clock()
        key = stored_key(key)
        with self._transaction() as m:
            claim = self._claim(m, key, lease, now, force)
            if entry is not None:
                claim.prior_state = self._journal_delivery(m, entry, claim, lease, now)
            elif replay:
                claim.prior_state = self._journal_replay(m, key, claim, lease, now)
            if next(self._claims) % _PURGE_EVERY == 0:
                self._purge(m, now)
        return claim

    def mark_handler_done(
        self, key: str, token: str, handler: str, ttl: float, outcome: HandlerOutcome | None = None
    ) -> None:
        """Remember that ``handler`` succeeded for ``key`` for ``ttl`` seconds."""
        now = self._clock()
        key = stored_key(key)
        with self._transaction() as m:
            self._mark(m, key, handler, ttl, outcome, now)

    def complete(
        self,
        key: str,
        token: str,
        ttl: float,
        outcomes: Mapping[str, HandlerOutcome] | None = None,
        attempt: Attempt | None = None,
        *,
        context: Mapping[str, str] | None = None,
    ) -> None:
        """Remember ``key`` as done for ``ttl`` seconds, whoever holds the claim now; the
        entry becomes ``handled``, or ``queued`` while deferred handlers wait for a worker
        (whose jobs ``transactional_queue`` writes here, with ``context``)."""
        now = self._clock()
        original, key = key, stored_key(key)
        queued = [n for n, o in (outcomes or {}).items() if o.deferred and o.state == "queued"]
        with self._transaction() as m:
            claims = m.DeliveryClaim.objects.using(self.using)
            row = claims.select_for_update().filter(key=key).first()
            if row is None or (row.token != token and not row.done):
                _warn_lease_lost(key)
            claims.update_or_create(
                key=key, defaults={"token": "", "done": True, "expires": now + ttl}
            )
            records = m.HandlerRecord.objects.using(self.using)
            if queued:  # a final failure of a deferred handler will need them (replay)
                for name, outcome in (outcomes or {}).items():
                    if outcome.ok:
                        self._mark(m, key, name, ttl, None, now)
            else:
                records.filter(key=key).delete()
            if outcomes is not None or attempt is not None:
                state = "queued" if queued else "handled"
                self._journal_update(m, key, now, state=state, outcomes=outcomes, attempt=attempt)
            queue = self.transactional_queue
            if not queued or queue is None or not _writes_here(queue, self.using):
                return
            for handler in queued:
                try:  # a row in this transaction: committed with the entry, or not at all
                    queue.enqueue(original, handler, context or {})
                except Exception as exc:
                    if _is_database_error(exc):
                        raise
                    logger.warning(
                        "could not enqueue deferred handler %s of %s (the sweep will): %r",
                        handler[:200],
                        key[:200],
                        exc,
                    )

    def release(
        self,
        key: str,
        token: str,
        outcomes: Mapping[str, HandlerOutcome] | None = None,
        attempt: Attempt | None = None,
    ) -> None:
        """Drop the claim held with ``token``; keep the per-handler records; the entry
        becomes ``failed`` with ``outcomes`` and ``attempt``."""
        now = self._clock()
        key = stored_key(key)
        with self._transaction() as m:
            held = m.DeliveryClaim.objects.using(self.using).filter(key=key, token=token)
            deleted, _ = held.filter(done=False).delete()
            if deleted and (outcomes is not None or attempt is not None):
                self._journal_update(
                    m, key, now, state="failed", outcomes=outcomes, attempt=attempt
                )

    # -- the journal's writes -----------------------------------------------------------

    def journal_ignore(self, entry: NewEntry, attempt: Attempt | None = None) -> None:
        """Record an authentic event that no handler wanted: a new entry is ``ignored``; an
        existing one only counts the attempt (its state and body stay: M3)."""
        now = self._clock()
        with self._transaction() as m:
            entries = m.JournalEntry.objects.using(self.using)
            fresh = self._fresh(m, entry, now, "ignored", attempt)
            row, created = (
                entries.select_for_update()
                .only("id", "expires", "history")
                .get_or_create(key=stored_key(entry.key), defaults=fresh)
            )
            if created:
                return
            if row.expires <= now:
                entries.filter(pk=row.pk).update(**fresh)
                return
            from django.db.models import F

            entries.filter(pk=row.pk).update(
                attempts=F("attempts") + 1,
                updated_at=db_time(now),
                retention=entry.retention,
                expires=now + entry.retention,
                **_appended(row, attempt),
            )

    def journal_resolve(self, key: str, note: str) -> bool:
        """Make the entry ``resolved`` with ``note``; False when there is no such entry."""
        now = self._clock()
        key = stored_key(key)
        with self._transaction() as m:
            entries = m.JournalEntry.objects.using(self.using)
            row = entries.filter(key=key, expires__gt=now).only("id", "retention").first()
            if row is None:
                return False
            entries.filter(pk=row.pk).update(
                state="resolved",
                note=note[:10_000],
                updated_at=db_time(now),
                expires=now + row.retention,
            )
            return True

    def record_refusal(self, refusal: Refusal) -> None:
        """Keep one refused delivery; the oldest go first past ``max_refusals``."""
        with self._transaction() as m:
            refusals = m.Refusal.objects.using(self.using)
            row = refusals.create(
                at=db_time(refusal.at.timestamp()),
                status=refusal.status,
                reason=refusal.reason[:100],
                detail=refusal.detail[:500],
            )
            refusals.filter(pk__lte=row.pk - self.max_refusals).delete()

    def refusals(self, limit: int = 100) -> list[Refusal]:
        """Refused deliveries, newest first."""
        if limit < 1:
            return []
        with self._reading() as m:
            rows = m.Refusal.objects.using(self.using).all()[:limit]
            return [Refusal(aware(r.at), r.status, r.reason, r.detail) for r in rows]

    # -- housekeeping -------------------------------------------------------------------

    def purge(self) -> int:
        """Delete expired claims, handler records and journal entries now, in batches of
        ``purge_batch`` rows (one short transaction each); returns how many."""
        gone = 0
        while True:
            with self._transaction() as m:
                count = self._purge(m, self._clock())
            gone += count
            if count == 0:
                return gone

    # -- the steps ----------------------------------------------------------------------

    def _claim(self, m: ModuleType, key: str, lease: float, now: float, force: bool) -> Claim:
        claims = m.DeliveryClaim.objects.using(self.using).select_for_update()
        token = secrets.token_hex(8)
        row, created = claims.get_or_create(
            key=key, defaults={"token": token, "done": False, "expires": now + lease}
        )
        if not created:
            if row.expires > now:
                if row.done and not force:
                    return Claim(ClaimState.DONE)
                if not row.done and row.token:
                    return Claim(ClaimState.BUSY, retry_after=row.expires - now)
            row.token, row.done, row.expires = token, False, now + lease
            row.save(update_fields=["token", "done", "expires"])
        records = m.HandlerRecord.objects.using(self.using).filter(key=key)
        if force:
            records.delete()
            return Claim(ClaimState.ACQUIRED, token)
        done = records.filter(expires__gt=now).values_list("handler", flat=True)
        return Claim(ClaimState.ACQUIRED, token, frozenset(done))

    def _mark(
        self,
        m: ModuleType,
        key: str,
        handler: str,
        ttl: float,
        outcome: HandlerOutcome | None,
        now: float,
    ) -> None:
        m.HandlerRecord.objects.using(self.using).update_or_create(
            key=key, handler=handler, defaults={"expires": now + ttl}
        )
        if outcome is not None:
            self._journal_update(m, key, now, outcomes={handler: outcome})

    def _fresh(
        self,
        m: ModuleType,
        entry: NewEntry,
        now: float,
        state: str,
        attempt: Attempt | None,
        keeps_body: bool = True,
    ) -> dict[str, Any]:
        """A new entry's columns (``keeps_body``: whether its body will be stored)."""
        at = db_time(now)
        body: bytes | None = entry.body
        if self.max_journal_bytes is not None and not (
            keeps_body and self._room_for(m, len(entry.body))
        ):
            body = None  # degrade the journal only: the claim goes on
        return {
            "full_key": entry.key if stored_key(entry.key) != entry.key else None,
            "event": text(entry.event, m.TEXT_LENGTH),
            "run_id": entry.run_id,
            "run_digest": run_digest(entry.run_id) if entry.run_id is not None else None,
            "agent_id": text(entry.agent_id, m.TEXT_LENGTH),
            "agent_name": text(entry.agent_name, m.TEXT_LENGTH),
            "state": state,
            "attempts": 1,
            "received_at": at,
            "updated_at": at,
            "body": body,
            "body_size": len(entry.body),
            "body_dropped": body is None,
            "headers": dict(entry.headers),
            "handlers": {},
            "history": [attempt.to_dict()] if attempt is not None else [],
            "leases": {},
            "lease_until": 0.0,
            "note": None,
            "retention": entry.retention,
            "expires": now + entry.retention,
        }

    def _journal_delivery(
        self, m: ModuleType, entry: NewEntry, claim: Claim, lease: float, now: float
    ) -> str:
        """Journal a delivery with its claim; returns the entry's state before it."""
        entries = m.JournalEntry.objects.using(self.using)
        acquired = claim.state is ClaimState.ACQUIRED
        attempt = None if acquired else _sender_attempt(claim, now)
        fresh = self._fresh(m, entry, now, "pending", attempt, keeps_body=acquired)
        if acquired:
            fresh["lease_until"] = now + lease
        elif claim.state is ClaimState.DONE:
            fresh["state"] = "handled"  # journal off or purged when it was handled
        else:
            fresh["lease_until"] = now + claim.retry_after
        row, created = (
            entries.select_for_update()
            .only("id", "expires", "state", "lease_until", "history")
            .get_or_create(key=stored_key(entry.key), defaults=fresh)
        )
        if created:
            return ""
        if row.expires <= now:  # expired but not purged yet: a new entry
            entries.filter(pk=row.pk).update(**fresh)
            return ""
        from django.db.models import F

        changes: dict[str, Any] = {
            "attempts": F("attempts") + 1,
            "updated_at": db_time(now),
            "retention": entry.retention,
            "expires": now + entry.retention,
        }
        if acquired:  # the handlers run on this body now
            for column in ("state", "body", "body_size", "body_dropped", "headers"):
                changes[column] = fresh[column]
            changes["lease_until"] = now + lease
        else:
            changes.update(_appended(row, attempt))
        entries.filter(pk=row.pk).update(**changes)
        return str(row.state)  # as stored: a stalled entry was pending

    def _journal_replay(
        self, m: ModuleType, key: str, claim: Claim, lease: float, now: float
    ) -> str:
        entries = m.JournalEntry.objects.using(self.using)
        row = (
            entries.select_for_update()
            .filter(key=key, expires__gt=now)
            .only("id", "state", "lease_until", "history", "retention")
            .first()
        )
        if row is None:
            return ""
        prior = str(row.state)
        changes: dict[str, Any] = {"updated_at": db_time(now), "expires": now + row.retention}
        if claim.state is ClaimState.ACQUIRED:
            changes.update(state="pending", lease_until=now + lease)
        elif claim.state is ClaimState.BUSY:
            changes.update(_appended(row, Attempt(now, "replay", 409, "in_flight")))
        else:
            return prior
        entries.filter(pk=row.pk).update(**changes)
        return prior

    def _journal_update(
        self,
        m: ModuleType,
        key: str,
        now: float,
        *,
        state: str | None = None,
        outcomes: Mapping[str, HandlerOutcome] | None = None,
        attempt: Attempt | None = None,
    ) -> None:
        entries = m.JournalEntry.objects.using(self.using)
        row = (
            entries.select_for_update()
            .filter(key=key)
            .only("id", "handlers", "history", "retention")
            .first()
        )
        if row is None:  # journal off when it was claimed, or purged meanwhile
            return
        changes: dict[str, Any] = {"updated_at": db_time(now), "expires": now + row.retention}
        if state is not None:
            changes["state"] = state
        if outcomes:
            handlers = dict(row.handlers or {})
            handlers.update({name: outcome.to_dict() for name, outcome in outcomes.items()})
            changes["handlers"] = handlers
        changes.update(_appended(row, attempt))
        entries.filter(pk=row.pk).update(**changes)

    def _room_for(self, m: ModuleType, size: int) -> bool:
        """Whether the journal's bodies stay within ``max_journal_bytes`` with ``size`` more
        (counting the bodies this process kept since the total was last read)."""
        from django.db.models import Sum

        limit = self.max_journal_bytes or 0
        if size > limit:
            return False
        moment = time.monotonic()
        if self._kept_bytes is None or moment - self._kept_read_at >= _KEPT_BYTES_REFRESH:
            # An aggregate over the live bodies, read again every few seconds (other
            # processes add theirs): only stores given a limit pay for it.
            total = (
                m.JournalEntry.objects.using(self.using)
                .filter(body_dropped=False, expires__gt=self._clock())
                .aggregate(total=Sum("body_size"))["total"]
            )
            self._kept_bytes, self._kept_read_at = int(total or 0), moment
        if self._kept_bytes + size > limit:
            return False
        self._kept_bytes += size
        return True

    def _purge(self, m: ModuleType, now: float) -> int:
        """One bounded batch per table of what has expired."""
        gone = 0
        for model in (m.DeliveryClaim, m.HandlerRecord, m.JournalEntry):
            rows = model.objects.using(self.using)
            batch = list(
                # No order (the model's would walk the whole journal): the expiry index.
                rows.filter(expires__lte=now)
                .order_by()
                .values_list("pk", flat=True)[: self.purge_batch]
            )
            if batch:
                count, _ = rows.filter(pk__in=batch).delete()
                gone += count
        return gone

    # -- the database ---------------------------------------------------------------------

    def _app_models(self) -> ModuleType:
        if self._models is None:
            from django.apps import apps

            if not apps.is_installed(APP):
                raise ConfigurationError(
                    f"DjangoStore needs {APP!r} in INSTALLED_APPS (then manage.py migrate)"
                )
            from . import models

            self._models = models
        return self._models

    def _connection(self) -> Any:
        from django.db import connections

        return connections[self.using]

    @contextmanager
    def _transaction(self) -> Iterator[ModuleType]:
        """One ``transaction.atomic``; a database error becomes StoreUnavailable."""
        from django.db import DatabaseError, transaction

        m = self._app_models()
        outermost = True
        try:
            connection = self._connection()
            outermost = not connection.in_atomic_block
            with transaction.atomic(using=self.using):
                if outermost:
                    self._take_write_lock(connection)
                yield m
        except DatabaseError as exc:
            raise self._unavailable(exc, outermost) from None

    @contextmanager
    def _reading(self) -> Iterator[ModuleType]:
        from django.db import DatabaseError

        m = self._app_models()
        try:
            yield m
        except DatabaseError as exc:
            raise self._unavailable(exc, not self._connection().in_atomic_block) from None

    def _take_write_lock(self, connection: Any) -> None:
        # SQLite starts a transaction with no lock and fails a reader that later writes while
        # another connection writes: take the write lock first, waiting on the busy timeout.
        if connection.vendor == "sqlite":
            with connection.cursor() as cursor:
                table = connection.ops.quote_name("flymy_receiver_deliveryclaim")
                cursor.execute(f"UPDATE {table} SET done = done WHERE 1 = 0")  # noqa: S608

    def _unavailable(self, exc: Exception, outermost: bool, what: str = "") -> StoreUnavailable:
        if outermost:
            # A connection broken by an outage would fail every later call of this thread
            # (ahandle's worker threads have no request end to close it): drop it, so the
            # next call connects again.
            try:
                self._connection().close_if_unusable_or_obsolete()
            except Exception:  # closing a broken connection may fail too
                logger.debug("closing the database connection failed", exc_info=True)
        # The exception's text may name the server or the user; the class says enough.
        where = f"django database {self.using!r}: {type(exc).__name__}"
        return StoreUnavailable(f"{what} ({where})" if what else where)


def _sender_attempt(claim: Claim, now: float) -> Attempt:
    if claim.state is ClaimState.DONE:
        return Attempt(now, "sender", 200, "duplicate")
    return Attempt(now, "sender", 409, "in_flight")


def _appended(row: Any, attempt: Attempt | None) -> dict[str, Any]:
    """The ``history`` column with ``attempt`` appended (the newest 50 kept), or nothing."""
    if attempt is None:
        return {}
    history = [*(row.history or ()), attempt.to_dict()]
    return {"history": history[-HISTORY_LIMIT:]}


def _writes_here(queue: TransactionalQueue, using: str) -> bool:
    try:
        return queue.writes_to(using)
    except Exception as exc:  # a misconfigured backend: the receiver sends the jobs
        logger.warning("cannot tell where %r writes its jobs: %r", queue, exc)
        return False


def _is_database_error(exc: BaseException) -> bool:
    from django.db import DatabaseError

    return isinstance(exc, DatabaseError)


def _warn_lease_lost(key: str) -> None:
    logger.warning(
        "the claim on %s expired before its handlers finished: another worker may have run "
        "them too; make Receiver(lease=...) longer than the slowest handler",
        key[:200],
    )
