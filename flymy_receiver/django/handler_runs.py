"""One handler's run as :class:`~flymy_receiver.django.DjangoStore` records it: an
``atomic=True`` handler inside the transaction of its record, and a deferred handler's own
lease and outcome (DESIGN section 10).

A deferred handler's lease lives on its entry (``leases``: handler id -> token, and the
outcome's ``lease_until``), so taking it locks one row. An ``atomic=True`` deferred handler
commits its writes with its ``ok`` in one transaction; before committing, that transaction
re-reads the entry under its row lock, and when another worker already recorded the handler
``ok`` it rolls the handler's writes back: the effect happens exactly once, even when a
worker died between its effect and its record, or when a lease ran out mid-run.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..errors import StoreUnavailable
from ..stores.base import Claim, ClaimState
from ..stores.records import HISTORY_LIMIT, Attempt, HandlerOutcome
from .reading import db_time, stored_key

__all__ = ["HandlerRuns"]


class _AlreadyDone(Exception):
    """Another worker recorded the handler ok first: roll this run's writes back."""

    def __init__(self, outcome: HandlerOutcome) -> None:
        self.outcome = outcome


class HandlerRuns:
    """Per-handler runs, mixed into DjangoStore (which provides the attributes)."""

    using: str
    _clock: Callable[[], float]

    if TYPE_CHECKING:  # DjangoStore's

        def _transaction(self) -> AbstractContextManager[ModuleType]: ...
        def _app_models(self) -> ModuleType: ...
        def _connection(self) -> Any: ...
        def _take_write_lock(self, connection: Any) -> None: ...
        def _unavailable(
            self, exc: Exception, outermost: bool, what: str = ""
        ) -> StoreUnavailable: ...
        def _mark(
            self,
            m: ModuleType,
            key: str,
            handler: str,
            ttl: float,
            outcome: HandlerOutcome | None,
            now: float,
        ) -> None: ...

    # -- atomic=True ----------------------------------------------------------------------

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
        together, or roll back together when it raises (which propagates unchanged). A
        transaction that cannot commit raises StoreUnavailable saying why."""
        m, key = self._app_models(), stored_key(key)
        with self._atomic_run() as step:
            outcome = call()
            step("record")
            self._mark(m, key, handler, ttl, outcome, self._clock())
            step("commit")
        return outcome

    def run_deferred_atomic(
        self,
        key: str,
        handler: str,
        token: str,
        attempt: Attempt,
        ttl: float,
        call: Callable[[], HandlerOutcome],
    ) -> HandlerOutcome:
        """A deferred handler's ``atomic=True`` run: ``call`` and its record
        (:meth:`finish_handler` with ``final=False``) in one transaction; exactly once."""
        m, key = self._app_models(), stored_key(key)
        try:
            with self._atomic_run() as step:
                outcome = call()
                step("record")
                self._finish(m, key, handler, token, outcome, attempt, False, ttl, atomic=True)
                step("commit")
        except _AlreadyDone as done:
            return done.outcome
        return outcome

    @contextmanager
    def _atomic_run(self) -> Iterator[Callable[[str], None]]:
        """A transaction around a handler; ``step(...)`` says how far it got, so a failure
        after the handler says what happened (a handler's own error propagates as is)."""
        from django.db import DatabaseError, transaction

        connection = self._connection()
        outermost = not connection.in_atomic_block
        stage = ["handler"]

        def step(name: str) -> None:
            if name == "record" and connection.needs_rollback:
                stage[0] = "rollback-only"
                raise StoreUnavailable(
                    "the transaction was marked rollback-only (the handler caught a database"
                    " error inside it, or called set_rollback): nothing it wrote was committed"
                )
            stage[0] = name

        try:
            with transaction.atomic(using=self.using):
                if outermost:
                    self._take_write_lock(connection)
                yield step
        except DatabaseError as exc:
            if stage[0] == "handler":
                raise  # the handler's own database error: a handler failure
            what = {
                "record": "could not record the handler's success; nothing was committed",
                "commit": "commit failed; nothing the handler wrote was committed",
            }[stage[0]]
            if stage[0] == "commit" and not outermost:
                what = "recording failed inside an outer transaction"
            raise self._unavailable(exc, outermost, _with_reason(what, exc)) from None

    # -- deferred handlers: the lease and the record ------------------------------------

    def claim_handler(self, key: str, handler: str, lease: float) -> Claim:
        """Take one deferred handler's own lease: ``ACQUIRED`` (``body`` holds the stored
        body), ``DONE`` when it is ok, ``BUSY`` while another worker's lease is live.
        Raises KeyError when the journal has no such entry."""
        now, key = self._clock(), stored_key(key)
        with self._transaction() as m:
            entries = m.JournalEntry.objects.using(self.using)
            row = (
                entries.select_for_update()
                .filter(key=key, expires__gt=now)
                .only("id", "state", "lease_until", "handlers", "leases", "body")
                .first()
            )
            if row is None:
                raise KeyError(key)
            prior = str(row.state)
            handlers = dict(row.handlers or {})
            current = HandlerOutcome.from_dict(handlers.get(handler) or {"ok": False})
            if handler in handlers and current.ok:
                return Claim(ClaimState.DONE, prior_state=prior)
            leases = dict(row.leases or {})
            if current.state == "running" and current.lease_until > now and leases.get(handler):
                return Claim(
                    ClaimState.BUSY, retry_after=current.lease_until - now, prior_state=prior
                )
            token = secrets.token_hex(8)
            running = HandlerOutcome(
                ok=False,
                at=current.at or now,
                state="running",
                attempts=current.attempts + 1,
                deferred=True,
                queued_at=current.queued_at,
                lease_until=now + lease,
            )
            handlers[handler] = running.to_dict()
            leases[handler] = token
            entries.filter(pk=row.pk).update(
                handlers=handlers, leases=leases, updated_at=db_time(now)
            )
            body = bytes(row.body) if row.body is not None else None
            return Claim(ClaimState.ACQUIRED, token, body=body, prior_state=prior)

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
        """Record a deferred handler's run: ``ok`` always, a failure only while ``token``
        holds its lease; ``handled`` once every handler is ok, ``failed`` after a ``final``
        failure (the done record dropped so that a replay can claim it), else ``queued``."""
        with self._transaction() as m:
            self._finish(m, stored_key(key), handler, token, outcome, attempt, final, ttl)

    def _finish(
        self,
        m: ModuleType,
        key: str,
        handler: str,
        token: str,
        outcome: HandlerOutcome,
        attempt: Attempt,
        final: bool,
        ttl: float,
        *,
        atomic: bool = False,
    ) -> None:
        now = self._clock()
        entries = m.JournalEntry.objects.using(self.using)
        row = (
            entries.select_for_update()
            .filter(key=key)
            .only("id", "state", "handlers", "leases", "history", "retention")
            .first()
        )
        if row is None:  # purged meanwhile: nothing to record on
            return
        handlers = dict(row.handlers or {})
        stored = HandlerOutcome.from_dict(handlers.get(handler) or {"ok": False})
        if atomic and handler in handlers and stored.ok:
            raise _AlreadyDone(stored)  # rolls this run's writes back
        leases = dict(row.leases or {})
        holds = leases.get(handler) == token
        recorded = outcome.ok or holds
        if recorded:
            outcome.deferred = True
            outcome.attempts = max(outcome.attempts, stored.attempts)
            outcome.queued_at = outcome.queued_at or stored.queued_at
            outcome.lease_until = 0.0
            handlers[handler] = outcome.to_dict()
            if holds:
                del leases[handler]
        outcomes = {name: HandlerOutcome.from_dict(value) for name, value in handlers.items()}
        claims = m.DeliveryClaim.objects.using(self.using)
        records = m.HandlerRecord.objects.using(self.using)
        if all(o.ok for o in outcomes.values()):
            state = "handled"
            claims.update_or_create(
                key=key, defaults={"token": "", "done": True, "expires": now + ttl}
            )
            records.filter(key=key).delete()
        elif recorded and not outcome.ok and final:
            state = "failed"
            claims.filter(key=key, done=True).delete()  # a replay may claim it now
            for name, kept in outcomes.items():
                if kept.ok:
                    self._mark(m, key, name, ttl, None, now)
        elif row.state in ("failed", "resolved", "pending"):
            state = row.state
        else:
            state = "queued"
        if outcome.ok and recorded and state != "handled":
            self._mark(m, key, handler, ttl, None, now)  # kept for a replay after a failure
        history = [*(row.history or ()), attempt.to_dict()][-HISTORY_LIMIT:]
        entries.filter(pk=row.pk).update(
            state=state,
            handlers=handlers,
            leases=leases,
            history=history,
            updated_at=db_time(now),
            expires=now + row.retention,
        )


def _with_reason(what: str, exc: BaseException) -> str:
    # A constraint's own message says which one failed (it names no server nor user);
    # other errors may name them: their class says enough.
    from django.db import IntegrityError

    if isinstance(exc, IntegrityError):
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"{what}: {line[:200]}" if line else what
    return what
