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
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from .deferred import DEFAULT_SWEEP_AGE, Job
from .deferred import sweep as _sweep
from .errors import ConfigurationError, EventInFlight, StoreUnavailable
from .rationing import TokenBucket
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
]

logger = logging.getLogger("flymy_receiver")

#: How long an entry is kept after its last change, bodies included.
DEFAULT_JOURNAL_RETENTION = timedelta(days=30)


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
    ) -> builtins.list[JournalEntry]:
        """Entries newest first; each filter is optional. ``since`` is an aware datetime."""
        if limit < 1:
            return []
        return self.store.journal_list(
            state=state, event=event, agent_id=agent_id, since=since, limit=limit
        )

    def replay(self, key_or_run_id: str, force: bool = False) -> JournalEntry:
        """Run the handlers of an entry that have not succeeded yet (``force``: all of them).

        Returns the updated entry (``state`` tells how it went: a handler that raises again
        leaves it ``failed``). Raises :class:`KeyError` for an unknown entry,
        :class:`~flymy_receiver.errors.EventInFlight` while a delivery or another replay
        holds it, :class:`~flymy_receiver.errors.StoreUnavailable` when the store fails.
        """
        if self.receiver is None:
            raise ConfigurationError("replaying needs the receiver whose handlers it runs")
        entry = self.get(key_or_run_id)
        if entry is None:
            raise KeyError(f"no journal entry for {str(key_or_run_id)[:200]!r}")
        response = self.receiver._replay(entry, force=force)
        if response.status == EventInFlight.status:
            raise EventInFlight(f"key {entry.key[:200]!r} is being handled")
        if response.status == StoreUnavailable.status:
            raise StoreUnavailable("the store failed during the replay")
        updated = self.get(entry.key)
        return updated if updated is not None else entry

    def replay_failed(self, since: datetime | None = None) -> builtins.list[JournalEntry]:
        """Replay every ``failed`` entry (newest first); returns the updated entries.

        An entry held by a delivery right now is skipped (that delivery is handling it).
        """
        results: builtins.list[JournalEntry] = []
        # Bounded batches: replaying changes states, so each pass lists afresh.
        seen: set[str] = set()
        while True:
            listed = self.list(state="failed", since=since, limit=len(seen) + 100)
            batch = [entry for entry in listed if entry.key not in seen]
            if not batch:
                return results
            for entry in batch:
                seen.add(entry.key)
                try:
                    results.append(self.replay(entry.key))
                except EventInFlight:
                    logger.info("replay of %s skipped: it is being handled", entry.key[:200])

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
