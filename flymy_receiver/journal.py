"""The delivery journal: every authentic event kept until it is handled, and replayable.

The sender retries for a while and then gives up, and an agent run is paid work. So each
authentic delivery is written down, with its exact body, in the same store step that claims
it, before any handler runs; each handler's outcome is recorded as it finishes. This module
is the operator's side of it: :class:`Journal` reads entries from the store and replays
them through the receiver's own delivery plan (the same claim, the same recording), and
:class:`RefusalLog` keeps refused deliveries, rationed so that a flood of forgeries cannot
become a flood of writes. The store persists; the receiver orchestrates.
"""

from __future__ import annotations

import builtins
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from .deferred import DEFAULT_SWEEP_AGE, Job
from .deferred import sweep as _sweep
from .errors import ConfigurationError, EventInFlight, StoreUnavailable
from .rationing import TokenBucket
from .resend import curl_command, post_signed
from .stores.base import JournalStore
from .stores.records import HandlerOutcome, JournalEntry, Refusal

if TYPE_CHECKING:
    from .receiver import Receiver

__all__ = [
    "DEFAULT_JOURNAL_RETENTION",
    "HandlerOutcome",
    "Journal",
    "JournalEntry",
    "Refusal",
    "RefusalLog",
    "ReplayReport",
]

logger = logging.getLogger("flymy_receiver")

#: How long an entry is kept after its last change, bodies included.
DEFAULT_JOURNAL_RETENTION = timedelta(days=30)
#: Entries per keyset page when a bulk operation reads what matches.
_PAGE = 500


class Journal:
    """Entries of authentic deliveries, refusals, and replay: ``receiver.journal``.

    Reads go straight to the store; :meth:`replay` runs the receiver's delivery plan over
    the stored body, so a replay and a sender's retry take the same claim and never both run
    a handler. ``Journal(store)`` alone reads a journal (say, a production store from a
    laptop); replaying needs the receiver whose handlers it runs.
    """

    def __init__(
        self,
        store: JournalStore,
        receiver: Receiver | None = None,
        refusals: RefusalLog | None = None,
    ) -> None:
        self.store = store
        self.receiver = receiver
        self._refusals = refusals

    def __repr__(self) -> str:
        return f"Journal(store={type(self.store).__name__})"

    def get(self, key_or_run_id: str) -> JournalEntry | None:
        """The entry with this idempotency key, else the newest for this run id; or None."""
        return self.store.journal_get(str(key_or_run_id))

    def list(
        self,
        state: str | None = None,
        event: str | None = None,
        agent_id: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
        *,
        run_id: str | None = None,
        until: datetime | None = None,
        before: JournalEntry | str | None = None,
    ) -> builtins.list[JournalEntry]:
        """Entry summaries (no body, no history) newest first; each filter is optional.

        ``since`` (inclusive) and ``until`` (exclusive) are aware datetimes bounding when an
        entry was first received. ``before`` is the last entry (or its key) of the previous
        page: the next page holds the entries strictly older than it (keyset paging, so a
        page costs the same however deep it is).
        """
        if limit < 1:
            return []
        before_key = before.key if isinstance(before, JournalEntry) else before
        return self.store.journal_list(
            state=state,
            event=event,
            agent_id=agent_id,
            run_id=run_id,
            since=since,
            until=until,
            before=before_key,
            limit=limit,
        )

    def resolve(self, key_or_run_id: str, note: str = "") -> JournalEntry:
        """Dismiss an entry that will never succeed: state ``resolved`` with ``note`` (kept,
        shown, never replayed in bulk, not listed as failed). A later delivery of it that
        runs its handlers makes it ``pending`` again. Returns the updated entry; raises
        :class:`KeyError` for an unknown entry."""
        entry = self.get(key_or_run_id)
        if entry is None or not self.store.journal_resolve(entry.key, str(note)[:2000]):
            raise KeyError(f"no journal entry for {str(key_or_run_id)[:200]!r}")
        updated = self.get(entry.key)
        return updated if updated is not None else entry

    def replay(self, key_or_run_id: str, force: bool = False) -> JournalEntry:
        """Run the handlers of an entry that have not succeeded yet (``force``: all of them).

        Returns the updated entry: its ``state`` tells how it went (a handler that raises
        again leaves it ``failed``), its last ``history`` attempt what the replay did. A
        replay that finds no registered handler for a handler that failed (removed, or its
        filter changed) runs nothing, records ``no_handler`` and leaves the entry ``failed``.
        Raises :class:`KeyError` for an unknown entry, :class:`LookupError` for one whose
        body was dropped, :class:`~flymy_receiver.errors.EventInFlight` while a delivery or
        another replay holds it, :class:`~flymy_receiver.errors.StoreUnavailable` when the
        store fails.
        """
        if self.receiver is None:
            raise ConfigurationError("replaying needs the receiver whose handlers it runs")
        entry = self.get(key_or_run_id)
        if entry is None:
            raise KeyError(f"no journal entry for {str(key_or_run_id)[:200]!r}")
        response = self.receiver.replay_entry(entry, force=force)
        if response.status == EventInFlight.status:
            raise EventInFlight(f"key {entry.key[:200]!r} is being handled")
        if response.status == StoreUnavailable.status:
            raise StoreUnavailable("the store failed during the replay")
        updated = self.get(entry.key)
        return updated if updated is not None else entry

    def replay_all(
        self,
        state: str | None = "failed",
        event: str | None = None,
        agent_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        dry_run: bool = False,
        per_second: float | None = None,
    ) -> ReplayReport:
        """Replay every entry the filters match (``state="failed"`` includes stalled ones;
        ``since``/``until`` bound when an entry was first received). ``resolved`` entries
        are never replayed. ``dry_run`` only lists what would be; ``per_second`` paces the
        replays. Returns a :class:`ReplayReport`."""
        if per_second is not None and not per_second > 0:
            raise ValueError("per_second must be a positive number, or None")
        if state == "resolved":
            raise ValueError("resolved entries are never replayed in bulk")
        matched = self._matching(state, event, agent_id, since, until)
        report = ReplayReport(matched=matched, dry_run=dry_run)
        if dry_run or not matched:
            return report
        if self.receiver is None:
            raise ConfigurationError("replaying needs the receiver whose handlers it runs")
        interval = 0.0 if per_second is None else 1.0 / per_second
        next_at = time.monotonic()
        for key in matched:
            if interval:
                wait = next_at - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                next_at = max(next_at, time.monotonic()) + interval
            try:
                entry = self.replay(key)
            except EventInFlight:
                logger.info("replay of %s skipped: it is being handled", key[:200])
                report.in_flight.append(key)
                continue
            except (KeyError, LookupError):  # expired, or its body dropped, meanwhile
                report.failed.append(key)
                continue
            (report.handled if entry.state == "handled" else report.failed).append(key)
        return report

    def replay_failed(self, since: datetime | None = None) -> builtins.list[JournalEntry]:
        """Replay every ``failed`` (or stalled) entry, newest first: the shorthand of
        :meth:`replay_all`. Returns the updated entries; one held by a delivery right now is
        skipped (that delivery is handling it)."""
        report = self.replay_all(state="failed", since=since)
        entries = []
        for key in [*report.handled, *report.failed]:
            entry = self.get(key)
            if entry is not None:
                entries.append(entry)
        return entries

    def resend(self, key_or_run_id: str, url: str, timeout: float = 30.0) -> int:
        """POST an entry's stored body to ``url`` (a staging or local app), signed afresh with
        the receiver's first secret; returns the HTTP status, whatever it is (a 500 is
        returned, not raised). Nothing is recorded here: the app at ``url`` journals it.
        Raises :class:`KeyError` for an unknown entry, :class:`LookupError` when its body
        was dropped, :class:`ValueError` for a URL that is not ``http(s)``, and
        :class:`~flymy_receiver.resend.ResendFailed` when ``url`` cannot be reached."""
        if self.receiver is None:
            raise ConfigurationError("resending needs the receiver whose secret signs it")
        body = self._body_of(key_or_run_id)
        return post_signed(url, body, self.receiver.sign(body), timeout)

    def curl(self, key_or_run_id: str, url: str) -> str:
        """A ``curl`` command that POSTs an entry's stored body to ``url``, signing it with
        ``$FLYMY_WEBHOOK_SECRET`` as it runs (no secret, no signature in the text)."""
        return curl_command(url, self._body_of(key_or_run_id))

    def sweep(self, older_than: timedelta = DEFAULT_SWEEP_AGE) -> builtins.list[Job]:
        """Send again the deferred handlers' jobs that may have been lost (a broker outage, a
        web process killed before it sent them, a worker killed mid-handler): the entries
        still ``queued`` after ``older_than``. Returns the jobs sent; run it every few
        minutes (a Celery beat task, cron). See :func:`flymy_receiver.deferred.sweep`."""
        if self.receiver is None:
            raise ConfigurationError("the sweep needs the receiver whose queue sends the jobs")
        return _sweep(self.receiver, older_than)

    def refusals(self, limit: int = 100) -> builtins.list[Refusal]:
        """Refused deliveries, newest first (no bodies)."""
        if self._refusals is not None:
            self._refusals.flush()
        return self.store.refusals(limit)

    def _body_of(self, key_or_run_id: str) -> bytes:
        entry = self.get(key_or_run_id)
        if entry is None:
            raise KeyError(f"no journal entry for {str(key_or_run_id)[:200]!r}")
        if entry.body is None:
            raise LookupError(f"the body of {entry.key[:200]!r} was dropped (journal byte limit)")
        return entry.body

    def _matching(
        self,
        state: str | None,
        event: str | None,
        agent_id: str | None,
        since: datetime | None,
        until: datetime | None,
    ) -> builtins.list[str]:
        """Every key the filters match, newest first, read in keyset pages (summaries)."""
        keys: builtins.list[str] = []
        before: str | None = None
        while True:
            page = self.store.journal_list(
                state=state,
                event=event,
                agent_id=agent_id,
                since=since,
                until=until,
                before=before,
                limit=_PAGE,
            )
            keys.extend(e.key for e in page if e.state != "resolved")
            if len(page) < _PAGE:
                return keys
            before = page[-1].key


@dataclass(slots=True)
class ReplayReport:
    """What :meth:`Journal.replay_all` did: ``matched`` keys newest first; after a run, the
    keys that ended ``handled``, those still ``failed`` (a handler raised again, or none was
    left to run), and those skipped because a delivery held them (``in_flight``)."""

    matched: builtins.list[str]
    dry_run: bool = False
    handled: builtins.list[str] = field(default_factory=builtins.list)
    failed: builtins.list[str] = field(default_factory=builtins.list)
    in_flight: builtins.list[str] = field(default_factory=builtins.list)

    @property
    def ok(self) -> bool:
        """Whether every matched entry ended handled (a dry run: whether nothing matched)."""
        if self.dry_run:
            return not self.matched
        return not self.failed and not self.in_flight

    def to_dict(self) -> dict[str, object]:
        return {
            "matched": builtins.list(self.matched),
            "dry_run": self.dry_run,
            "handled": builtins.list(self.handled),
            "failed": builtins.list(self.failed),
            "in_flight": builtins.list(self.in_flight),
        }


class RefusalLog:
    """Records refused deliveries in the store, rationed by a token bucket.

    The first ``burst`` refusals are written at once, then ``per_second``; the rest are only
    counted, and the next one written says how many went unrecorded. Writes to a blocking
    store go through one background thread, so a refusal never waits on the store.
    """

    def __init__(
        self,
        store: JournalStore,
        *,
        per_second: float = 1.0,
        burst: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self._budget = TokenBucket(per_second, burst, clock)
        self._skipped = 0
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self._pending: list[concurrent.futures.Future[None]] = []

    def note(self, status: int, reason: str, detail: str = "") -> None:
        """Record one refusal if the budget allows; never raises."""
        with self._lock:
            if not self._budget.take():
                self._skipped += 1
                return
            skipped, self._skipped = self._skipped, 0
        if skipped:
            detail = f"{detail} (+{skipped} earlier refusals not recorded)".lstrip()
        refusal = Refusal(datetime.now(timezone.utc), status, reason, detail[:500])
        if not getattr(self.store, "blocking", True):
            self._write(refusal)
            return
        with self._lock:
            pool = self._executor()
            self._pending = [f for f in self._pending if not f.done()]
            self._pending.append(pool.submit(self._write, refusal))

    def flush(self, timeout: float = 5.0) -> None:
        """Wait (bounded) for the refusals handed to the background thread."""
        with self._lock:
            pending, self._pending = self._pending, []
        concurrent.futures.wait(pending, timeout=timeout)

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        # A pool inherited through fork has no thread behind it: start one per process.
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = concurrent.futures.ThreadPoolExecutor(1, "flymy-refusals")
            self._pool_pid = os.getpid()
            self._pending = []
        return self._pool

    def _write(self, refusal: Refusal) -> None:
        try:
            self.store.record_refusal(refusal)
        except Exception as exc:  # a refusal is already answered; the log line has it
            logger.debug("could not journal a refusal: %r", exc)
