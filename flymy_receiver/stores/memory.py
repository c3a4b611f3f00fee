"""An in-process idempotency store: the default, for one worker process."""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

from .base import Claim, ClaimState
from .memory_journal import MemoryJournal
from .records import FAILURE_STATES, Attempt, HandlerOutcome, JournalEntry, NewEntry, Refusal

__all__ = ["MemoryStore", "warn_if_several_processes"]

logger = logging.getLogger("flymy_receiver")

_DONE = Claim(ClaimState.DONE)
#: What the waiters of flymy_receiver.awaiting take as a run's end (not pending nor queued).
_SETTLED = frozenset({"handled", "failed", "ignored"})


class MemoryStore:
    """Keeps claims in dicts guarded by a lock; bounded and expiring.

    Shared by the threads of one process only: with several worker processes use
    :class:`~flymy_receiver.stores.SQLiteStore` or :class:`~flymy_receiver.stores.RedisStore`.
    When ``max_entries`` handled events are remembered, the oldest are forgotten first, so a
    duplicate of a very old event could run again; size it for the deliveries of your replay
    window (each record takes about a hundred bytes). Nothing survives a restart.

    The journal keeps the newest ``max_journal`` entries and ``max_refusals`` refusals, and
    at most ``max_journal_bytes`` of bodies: enough to develop with, bounded whatever
    arrives. Handled and ignored entries (and their bodies) go first; an entry that could
    still need a replay is dropped only when nothing else is left, with a WARNING. Past the
    byte bound an entry is kept without its body (``body_dropped``); claims and idempotency
    records never depend on the journal's bounds.
    """

    blocking = False

    @classmethod
    def default(cls) -> MemoryStore:
        """The store a :class:`~flymy_receiver.Receiver` builds when given none: a
        ``MemoryStore`` that warns (once per process) where it cannot be right, under a
        multi-process server or in a process forked after it was built. Passing
        ``store=MemoryStore()`` yourself says one process is what you run: no warning."""
        warn_if_several_processes()
        return _DefaultMemoryStore()

    def __init__(
        self,
        max_entries: int = 100_000,
        *,
        max_journal: int = 1_000,
        max_journal_bytes: int = 32 * 1024 * 1024,
        max_refusals: int = 200,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if max_entries < 1 or max_journal < 1 or max_refusals < 1:
            raise ValueError("max_entries, max_journal and max_refusals must be at least 1")
        if max_journal_bytes < 0:
            raise ValueError("max_journal_bytes must not be negative")
        self.max_entries = max_entries
        self._clock = clock if clock is not None else time.monotonic
        # Journal times are shown to people, so they come from the wall clock.
        self._journal = MemoryJournal(
            max_journal, max_journal_bytes, clock if clock is not None else time.time
        )
        self._refusals: deque[Refusal] = deque(maxlen=max_refusals)
        # Bounded by dropping the oldest: OrderedDicts, whose oldest item is found at once
        # (a dict's first live item is found by scanning past the deleted ones, which cost
        # 25 µs per delivery at 100,000 entries). Three mappings rather than one of record
        # objects: a handled event is a str -> float entry, not an object for the garbage
        # collector to walk.
        self._done: OrderedDict[str, float] = OrderedDict()  # key -> end of retention
        self._claims: dict[str, tuple[str, float]] = {}  # key -> (token, end of lease)
        # key -> (expiry, names)
        self._handlers: OrderedDict[str, tuple[float, set[str]]] = OrderedDict()
        self._tokens = itertools.count(1)
        self._lock = threading.Lock()
        self._pid: int | None = None  # the default store's builder, to notice a fork
        self._forks: int | None = None  # the default store: forks counted when built

    @property
    def max_journal(self) -> int:
        """How many journal entries are kept (may be changed on a live store)."""
        return self._journal.max_entries

    @max_journal.setter
    def max_journal(self, value: int) -> None:
        self._journal.max_entries = value

    @property
    def max_journal_bytes(self) -> int:
        """How many bytes of bodies the journal keeps (may be changed on a live store)."""
        return self._journal.max_bytes

    @max_journal_bytes.setter
    def max_journal_bytes(self, value: int) -> None:
        self._journal.max_bytes = value

    def __len__(self) -> int:
        return len(self._done) + len(self._claims.keys() | self._handlers.keys())

    def __repr__(self) -> str:
        return f"MemoryStore(max_entries={self.max_entries}, entries={len(self)})"

    def claim(
        self,
        key: str,
        lease: float,
        entry: NewEntry | None = None,
        *,
        replay: bool = False,
        force: bool = False,
    ) -> Claim:
        """Take ``key`` for ``lease`` seconds unless it is done or held by a live claim."""
        if self._forks is not None and self._forks != _forks:  # the default store, forked
            self._forked()
        now = self._clock()
        with self._lock:
            claim = self._claim(key, lease, now, force)
            if entry is None and not replay:
                return claim
            prior = self._journal_claim(key, lease, entry, claim)
            if prior:
                if claim is _DONE:  # shared: never changed
                    claim = Claim(ClaimState.DONE)
                claim.prior_state = prior
            return claim

    def _claim(self, key: str, lease: float, now: float, force: bool) -> Claim:
        done_until = self._done.get(key)
        if done_until is not None:
            if done_until > now and not force:
                return _DONE
            del self._done[key]
        held = self._claims.get(key)
        if held is not None and held[1] > now:
            return Claim(ClaimState.BUSY, retry_after=held[1] - now)
        token = str(next(self._tokens))
        self._claims[key] = (token, now + lease)
        if len(self._claims) > self.max_entries:
            self._drop_expired_claims(now)
        if force:
            self._handlers.pop(key, None)
            return Claim(ClaimState.ACQUIRED, token)
        return Claim(ClaimState.ACQUIRED, token, self._handlers_done(key, now))

    def _journal_claim(self, key: str, lease: float, entry: NewEntry | None, claim: Claim) -> str:
        """Journal a claim (``entry`` given: a delivery; else a replay); the prior state."""
        journal = self._journal
        now = journal.now()
        acquired = claim.state is ClaimState.ACQUIRED
        if entry is not None:
            if acquired:
                return journal.delivered(entry, "pending", None, True, now + lease, now)
            if claim.state is ClaimState.DONE:
                dup = Attempt(now, "sender", 200, "duplicate")
                return journal.delivered(entry, "handled", dup, now=now)
            busy = Attempt(now, "sender", 409, "in_flight")
            until = now + claim.retry_after
            return journal.delivered(entry, "pending", busy, lease_until=until, now=now)
        if acquired:
            prior = journal.update(key, state="pending", lease_until=now + lease)
        elif claim.state is ClaimState.BUSY:
            prior = journal.update(key, attempt=Attempt(now, "replay", 409, "in_flight"))
        else:
            kept = journal.find(key)
            prior = kept.state if kept is not None else None
        return prior or ""

    def mark_handler_done(
        self, key: str, token: str, handler: str, ttl: float, outcome: HandlerOutcome | None = None
    ) -> None:
        """Remember that ``handler`` succeeded for ``key`` for ``ttl`` seconds."""
        now = self._clock()
        with self._lock:
            if outcome is not None:
                self._journal.update(key, outcomes={handler: outcome})
            if key in self._done:
                return
            self._remember_handlers(key, {handler}, now + ttl, now)

    def _remember_handlers(self, key: str, names: set[str], expires: float, now: float) -> None:
        until, kept = self._handlers.get(key, (0.0, set()))
        if until <= now:
            kept = set()
        self._handlers[key] = (max(until, expires), kept | names)
        while len(self._handlers) > self.max_entries:
            self._handlers.popitem(last=False)

    def complete(
        self,
        key: str,
        token: str,
        ttl: float,
        outcomes: Mapping[str, HandlerOutcome] | None = None,
        attempt: Attempt | None = None,
    ) -> None:
        """Remember ``key`` as done for ``ttl`` seconds, whoever holds the claim now."""
        now = self._clock()
        with self._lock:
            if outcomes is not None or attempt is not None:
                state = None
                if outcomes is not None:
                    queued = any(o.deferred and o.state == "queued" for o in outcomes.values())
                    state = "queued" if queued else "handled"
                self._journal.update(key, state, outcomes, attempt)
            self._claims.pop(key, None)
            self._handlers.pop(key, None)
            self._done.pop(key, None)  # re-inserted last, so eviction stays oldest-first
            self._done[key] = now + ttl
            while len(self._done) > self.max_entries:
                self._done.popitem(last=False)

    def release(
        self,
        key: str,
        token: str,
        outcomes: Mapping[str, HandlerOutcome] | None = None,
        attempt: Attempt | None = None,
    ) -> None:
        """Drop the claim held with ``token``; keep the per-handler records."""
        with self._lock:
            held = self._claims.get(key)
            if held is not None and held[0] == token:
                del self._claims[key]
                if outcomes is not None or attempt is not None:
                    state = "failed" if outcomes is not None else None
                    self._journal.update(key, state=state, outcomes=outcomes, attempt=attempt)

    # -- the journal --------------------------------------------------------------------

    def journal_ignore(self, entry: NewEntry, attempt: Attempt | None = None) -> None:
        """Record an authentic event that no handler wanted (an existing entry keeps its
        state and body)."""
        with self._lock:
            self._journal.delivered(entry, "ignored", attempt)

    def journal_get(self, key_or_run_id: str) -> JournalEntry | None:
        """The entry with this key, else the newest entry for this run id."""
        with self._lock:
            return self._journal.get(key_or_run_id)

    def journal_settled(self, run_ids: Sequence[str]) -> dict[str, JournalEntry]:
        """For each run id whose newest entry is settled (handled, failed or ignored: not
        pending nor queued), that entry (see :mod:`flymy_receiver.awaiting`)."""
        found: dict[str, JournalEntry] = {}
        with self._lock:
            for run_id in run_ids:
                entry = self._journal.settled(run_id, _SETTLED)
                if entry is not None:
                    found[run_id] = entry
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
        """Summaries newest first, filtered; ``before`` is the previous page's last key."""

        def match(new: NewEntry) -> bool:
            return (
                (event is None or new.event == event)
                and (agent_id is None or new.agent_id == agent_id)
                and (run_id is None or new.run_id == run_id)
            )

        states = None
        if state is not None:
            states = frozenset(FAILURE_STATES) if state == "failed" else frozenset({state})
        start = since.timestamp() if since is not None else None
        end = until.timestamp() if until is not None else None
        with self._lock:
            return self._journal.summaries(states, match, start, end, before, limit)

    def journal_resolve(self, key: str, note: str) -> bool:
        """Make the entry ``resolved`` with ``note``; False when there is no such entry."""
        with self._lock:
            return self._journal.resolve(key, note)

    def claim_handler(self, key: str, handler: str, lease: float) -> Claim:
        """Take one deferred handler's own lease; KeyError when there is no such entry."""
        now = self._clock()
        with self._lock:
            return self._journal.claim_handler(key, handler, lease, now, str(next(self._tokens)))

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
        now = self._clock()
        with self._lock:
            done = self._journal.finish_handler(key, handler, token, outcome, attempt, final)
            if done is not None:  # failed for good: a replay may claim the key again
                self._done.pop(key, None)
                self._remember_handlers(key, done, now + ttl, now)

    def record_refusal(self, refusal: Refusal) -> None:
        """Keep one refused delivery; the oldest go first past ``max_refusals``."""
        with self._lock:
            self._refusals.append(refusal)

    def refusals(self, limit: int = 100) -> list[Refusal]:
        """Refused deliveries, newest first."""
        with self._lock:
            return list(reversed(self._refusals))[:limit]

    def _handlers_done(self, key: str, now: float) -> frozenset[str]:
        record = self._handlers.get(key)
        if record is None:
            return _NO_HANDLERS
        if record[0] <= now:
            del self._handlers[key]
            return _NO_HANDLERS
        return frozenset(record[1])

    def _forked(self) -> None:
        self._forks = _forks
        parent, self._pid = self._pid, os.getpid()
        warn_if_several_processes(
            f"this process (pid {self._pid}) was forked from the one that built the "
            f"receiver (pid {parent}), as a pre-forking server does with a preloaded app"
        )

    def _drop_expired_claims(self, now: float) -> None:
        # Claims are few (one per delivery in progress) unless workers keep dying mid-handler.
        for key in [k for k, (_, until) in self._claims.items() if until <= now]:
            del self._claims[key]


class _DefaultMemoryStore(MemoryStore):
    """The default store: notices being used in a process forked after it was built."""

    def __init__(self) -> None:
        super().__init__()
        self._pid = os.getpid()
        self._forks = _forks  # checked by claim(): one int comparison per delivery


_NO_HANDLERS: frozenset[str] = frozenset()

# Forks of this process so far, counted in each child: a default store built before a fork
# notices it by one comparison (os.getpid() is a system call on every delivery).
_forks = 0


def _count_fork() -> None:
    global _forks
    _forks += 1


if hasattr(os, "register_at_fork"):  # not on Windows, which cannot fork
    os.register_at_fork(after_in_child=_count_fork)


_warned_pid: int | None = None
_warn_lock = threading.Lock()


def warn_if_several_processes(reason: str | None = None) -> bool:
    """Log a WARNING, once per process, when an in-memory store cannot be right here.

    ``reason`` says why; without one the environment is checked: gunicorn sets
    ``SERVER_SOFTWARE`` in the master before it loads the app or forks a worker, so the
    app's workers (preloaded or not) all see it. Returns whether it warned.
    """
    global _warned_pid
    if reason is None:
        software = os.environ.get("SERVER_SOFTWARE", "")
        if not software.lower().startswith("gunicorn"):
            return False
        reason = (
            f"it runs under {software[:40]}, whose workers are separate processes "
            "(and are restarted, which empties their memory)"
        )
    with _warn_lock:
        if _warned_pid == os.getpid():
            return False
        _warned_pid = os.getpid()
    logger.warning(
        "the default in-memory idempotency store is private to one process, but %s: each "
        "process keeps its own records, so a duplicate that reaches another one runs the "
        "handlers again. Use store=SQLiteStore(path) (the workers of one machine) or "
        "store=RedisStore(url) (several machines); pass store=MemoryStore() to say you run "
        "one process.",
        reason,
    )
    return True
