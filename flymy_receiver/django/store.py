"""An idempotency store and delivery journal in the project's own database, through the ORM.

Every call is one ``transaction.atomic(using=...)``. A claim locks its row with
``select_for_update`` (created with ``get_or_create``, whose unique key settles two workers
creating it at once) and writes the journal entry in the same transaction, so an entry
exists exactly when its claim does. SQLite has no row locks: there each transaction first
takes the database's write lock (a write that changes nothing), so that claims serialise
there too. Times the store compares come from its clock (wall-clock seconds, since several
processes compare them).

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
from datetime import datetime, timezone
from types import ModuleType
from typing import Any

from ..errors import ConfigurationError, StoreUnavailable
from ..stores.base import Claim, ClaimState
from ..stores.records import HandlerOutcome, JournalEntry, NewEntry, Refusal, to_datetime

__all__ = ["DjangoStore"]

logger = logging.getLogger("flymy_receiver")

APP = "flymy_receiver.django"
_DONE = Claim(ClaimState.DONE)
#: Expired rows are deleted once per this many claims, in the claim's transaction.
_PURGE_EVERY = 500


class DjangoStore:
    """Claims, per-handler records, the journal and refusals in a Django database.

    Needs ``"flymy_receiver.django"`` in ``INSTALLED_APPS`` and ``manage.py migrate``.
    ``using`` is the database alias (``DATABASES["default"]`` by default). Constructing it
    touches no database. Call it outside your own transactions (the views provided are
    exempt from ``ATOMIC_REQUESTS``): a claim made inside an outer transaction is not seen
    by other workers before that transaction commits. ``max_refusals`` bounds the refusals
    kept; ``clock`` returns epoch seconds (tests).

    With this store, ``on(..., atomic=True)`` handlers run in one ``transaction.atomic()``
    with the record that they succeeded (see :meth:`run_atomic`).
    """

    blocking = True

    def __init__(
        self,
        using: str = "default",
        *,
        max_refusals: int = 1000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_refusals < 1:
            raise ValueError("max_refusals must be at least 1")
        self.using = using
        self.max_refusals = max_refusals
        self._clock = clock
        self._claims = itertools.count(1)
        self._models: ModuleType | None = None

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
        journal ``entry`` (a delivery) or mark a replay's entry pending, in one transaction."""
        now = self._clock()
        with self._transaction() as m:
            claim = self._claim(m, key, lease, now, force)
            acquired = claim.state is ClaimState.ACQUIRED
            if entry is not None:
                self._journal_delivery(m, entry, acquired, now)
            elif replay and acquired:
                self._journal_update(m, key, now, state="pending")
            if next(self._claims) % _PURGE_EVERY == 0:
                self._purge(m, now)
        return claim

    def mark_handler_done(
        self, key: str, token: str, handler: str, ttl: float, outcome: HandlerOutcome | None = None
    ) -> None:
        """Remember that ``handler`` succeeded for ``key`` for ``ttl`` seconds."""
        now = self._clock()
        with self._transaction() as m:
            self._mark(m, key, handler, ttl, outcome, now)

    def complete(
        self, key: str, token: str, ttl: float, outcomes: Mapping[str, HandlerOutcome] | None = None
    ) -> None:
        """Remember ``key`` as done for ``ttl`` seconds, whoever holds the claim now."""
        now = self._clock()
        with self._transaction() as m:
            claims = m.DeliveryClaim.objects.using(self.using)
            row = claims.select_for_update().filter(key=key).first()
            if row is None or (row.token != token and not row.done):
                _warn_lease_lost(key)
            claims.update_or_create(
                key=key, defaults={"token": "", "done": True, "expires": now + ttl}
            )
            m.HandlerRecord.objects.using(self.using).filter(key=key).delete()
            if outcomes is not None:
                self._journal_update(m, key, now, state="handled", outcomes=outcomes)

    def release(
        self, key: str, token: str, outcomes: Mapping[str, HandlerOutcome] | None = None
    ) -> None:
        """Drop the claim held with ``token``; keep the per-handler records."""
        now = self._clock()
        with self._transaction() as m:
            held = m.DeliveryClaim.objects.using(self.using).filter(key=key, token=token)
            deleted, _ = held.filter(done=False).delete()
            if deleted and outcomes is not None:
                self._journal_update(m, key, now, state="failed", outcomes=outcomes)

    def run_atomic(
        self,
        key: str,
        token: str,
        handler: str,
        ttl: float,
        call: Callable[[], HandlerOutcome | None],
    ) -> HandlerOutcome | None:
        """Run ``call`` (an ``atomic=True`` handler) in one ``transaction.atomic()`` with the
        record that ``handler`` succeeded: its writes to this database and that record commit
        together, or roll back together when it raises (which propagates unchanged)."""
        from django.db import DatabaseError, transaction

        m = self._app_models()
        connection = self._connection()
        outermost = not connection.in_atomic_block
        ran = False
        try:
            with transaction.atomic(using=self.using):
                if outermost:
                    self._take_write_lock(connection)
                outcome = call()
                ran = True
                self._mark(m, key, handler, ttl, outcome, self._clock())
        except DatabaseError as exc:
            if not ran:
                raise  # the handler's own database error: a handler failure
            raise self._unavailable(exc, outermost) from None
        return outcome

    # -- the journal --------------------------------------------------------------------

    def journal_ignore(self, entry: NewEntry) -> None:
        """Record an authentic event that no handler wanted."""
        now = self._clock()
        with self._transaction() as m:
            self._journal_delivery(m, entry, False, now, state="ignored")

    def journal_get(self, key_or_run_id: str) -> JournalEntry | None:
        """The entry with this key, else the newest entry for this run id."""
        with self._reading() as m:
            live = m.JournalEntry.objects.using(self.using).filter(expires__gt=self._clock())
            row = live.filter(key=key_or_run_id).first()
            if row is None:
                row = live.filter(run_id=_text(key_or_run_id, m.KEY_LENGTH)).first()
            return _entry(row) if row is not None else None

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
        if limit < 1:
            return []
        with self._reading() as m:
            rows = m.JournalEntry.objects.using(self.using).filter(expires__gt=self._clock())
            if state is not None:
                rows = rows.filter(state=state)
            if event is not None:
                rows = rows.filter(event=_text(event, m.TEXT_LENGTH))
            if agent_id is not None:
                rows = rows.filter(agent_id=_text(agent_id, m.TEXT_LENGTH))
            if since is not None:
                rows = rows.filter(received_at__gte=db_time(since.timestamp()))
            return [_entry(row) for row in rows[:limit]]

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
        """Delete expired claims, handler records and journal entries now; returns how many."""
        with self._transaction() as m:
            return self._purge(m, self._clock())

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
                    return _DONE
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

    def _journal_delivery(
        self, m: ModuleType, entry: NewEntry, acquired: bool, now: float, state: str = "pending"
    ) -> None:
        entries = m.JournalEntry.objects.using(self.using)
        at = db_time(now)
        fresh = {
            "event": _text(entry.event, m.TEXT_LENGTH),
            "run_id": _text(entry.run_id, m.KEY_LENGTH),
            "agent_id": _text(entry.agent_id, m.TEXT_LENGTH),
            "agent_name": _text(entry.agent_name, m.TEXT_LENGTH),
            "state": state,
            "attempts": 1,
            "received_at": at,
            "updated_at": at,
            "body": entry.body,
            "headers": dict(entry.headers),
            "handlers": {},
            "retention": entry.retention,
            "expires": now + entry.retention,
        }
        row, created = entries.select_for_update().get_or_create(key=entry.key, defaults=fresh)
        if created:
            return
        if row.expires <= now:  # expired but not purged yet: a new entry
            entries.filter(pk=row.pk).update(**fresh)
            return
        from django.db.models import F

        changes: dict[str, Any] = {
            "attempts": F("attempts") + 1,
            "updated_at": at,
            "retention": entry.retention,
            "expires": now + entry.retention,
        }
        if acquired or state == "ignored":
            changes["state"] = state
        entries.filter(pk=row.pk).update(**changes)

    def _journal_update(
        self,
        m: ModuleType,
        key: str,
        now: float,
        *,
        state: str | None = None,
        outcomes: Mapping[str, HandlerOutcome] | None = None,
    ) -> None:
        entries = m.JournalEntry.objects.using(self.using)
        row = entries.select_for_update().filter(key=key).only("id", "handlers", "retention")
        found = row.first()
        if found is None:  # journal off when it was claimed, or purged meanwhile
            return
        changes: dict[str, Any] = {"updated_at": db_time(now), "expires": now + found.retention}
        if state is not None:
            changes["state"] = state
        if outcomes:
            handlers = dict(found.handlers or {})
            handlers.update({name: outcome.to_dict() for name, outcome in outcomes.items()})
            changes["handlers"] = handlers
        entries.filter(pk=found.pk).update(**changes)

    def _purge(self, m: ModuleType, now: float) -> int:
        gone = 0
        for model in (m.DeliveryClaim, m.HandlerRecord, m.JournalEntry):
            count, _ = model.objects.using(self.using).filter(expires__lte=now).delete()
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

    def _unavailable(self, exc: Exception, outermost: bool) -> StoreUnavailable:
        if outermost:
            # A connection broken by an outage would fail every later call of this thread
            # (ahandle's worker threads have no request end to close it): drop it, so the
            # next call connects again.
            try:
                self._connection().close_if_unusable_or_obsolete()
            except Exception:  # closing a broken connection may fail too
                logger.debug("closing the database connection failed", exc_info=True)
        # The exception's text may name the server or the user; the class says enough.
        return StoreUnavailable(f"django database {self.using!r}: {type(exc).__name__}")


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


def _text(value: str | None, length: int) -> str | None:
    # The sender chooses these: keep them to the column, so that no run id makes a row fail.
    return value[:length] if value is not None else None


def _entry(row: Any) -> JournalEntry:
    return JournalEntry(
        key=row.key,
        event=row.event,
        run_id=row.run_id,
        agent_id=row.agent_id,
        agent_name=row.agent_name,
        state=row.state,
        attempts=row.attempts,
        received_at=aware(row.received_at),
        updated_at=aware(row.updated_at),
        body=bytes(row.body),
        headers=dict(row.headers or {}),
        handlers={n: HandlerOutcome.from_dict(o) for n, o in (row.handlers or {}).items()},
    )


def _warn_lease_lost(key: str) -> None:
    logger.warning(
        "the claim on %s expired before its handlers finished: another worker may have run "
        "them too; make Receiver(lease=...) longer than the slowest handler",
        key[:200],
    )
