"""An in-process idempotency store: the default, for one worker process."""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from datetime import datetime

from .base import Claim, ClaimState
from .records import HandlerOutcome, JournalEntry, NewEntry, Refusal, to_datetime

__all__ = ["MemoryStore", "warn_if_several_processes"]

logger = logging.getLogger("flymy_receiver")

_DONE = Claim(ClaimState.DONE)


class MemoryStore:
    """Keeps claims in dicts guarded by a lock; bounded and expiring.

    Shared by the threads of one process only: with several worker processes use
    :class:`~flymy_receiver.stores.SQLiteStore` or :class:`~flymy_receiver.stores.RedisStore`.
    When ``max_entries`` handled events are remembered, the oldest are forgotten first, so a
    duplicate of a very old event could run again; size it for the deliveries of your replay
    window (each record takes about a hundred bytes). Nothing survives a restart.

    The journal keeps the newest ``max_journal`` entries (bodies included) and
    ``max_refusals`` refusals: enough to develop with, bounded whatever arrives.
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
        max_refusals: int = 200,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if max_entries < 1 or max_journal < 1 or max_refusals < 1:
            raise ValueError("max_entries, max_journal and max_refusals must be at least 1")
        self.max_entries = max_entries
        self.max_journal = max_journal
        self._clock = clock if clock is not None else time.monotonic
        # Journal times are shown to people, so they come from the wall clock.
        self._wall = clock if clock is not None else time.time
        # Bounded by dropping the oldest: OrderedDicts, whose oldest item is found at once
        # (a dict's first live item is found by scanning past the deleted ones, which cost
        # 25 µs per delivery at 100,000 entries).
        # key -> the entry; insertion order is arrival order (oldest first).
        self._journal: OrderedDict[str, _Kept] = OrderedDict()
        self._by_run: dict[str, str] = {}  # run id -> key of its newest entry
        self._refusals: deque[Refusal] = deque(maxlen=max_refusals)
        # Three mappings rather than one of record objects: a handled event is a str ->
        # float entry, not an object for the garbage collector to walk.
        self._done: OrderedDict[str, float] = OrderedDict()  # key -> end of retention
        self._claims: dict[str, tuple[str, float]] = {}  # key -> (token, end of lease)
        # key -> (expiry, names)
        self._handlers: OrderedDict[str, tuple[float, set[str]]] = OrderedDict()
        self._tokens = itertools.count(1)
        self._lock = threading.Lock()
        self._pid: int | None = None  # the default store's builder, to notice a fork

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
        if self._pid is not None and self._pid != os.getpid():  # the default store only
            self._forked()
        now = self._clock()
        with self._lock:
            claim = self._claim(key, lease, now, force)
            if entry is not None:
                self._journal_delivery(entry, claim.state is ClaimState.ACQUIRED)
            elif replay and claim.state is ClaimState.ACQUIRED:
                self._journal_update(key, state="pending")
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

    def mark_handler_done(
        self, key: str, token: str, handler: str, ttl: float, outcome: HandlerOutcome | None = None
    ) -> None:
        """Remember that ``handler`` succeeded for ``key`` for ``ttl`` seconds."""
        now = self._clock()
        with self._lock:
            if outcome is not None:
                self._journal_update(key, outcomes={handler: outcome})
            if key in self._done:
                return
            expires, names = self._handlers.get(key, (0.0, set()))
            if expires <= now:
                names = set()
            names.add(handler)
            self._handlers[key] = (max(expires, now + ttl), names)
            while len(self._handlers) > self.max_entries:
                self._handlers.popitem(last=False)

    def complete(
        self, key: str, token: str, ttl: float, outcomes: Mapping[str, HandlerOutcome] | None = None
    ) -> None:
        """Remember ``key`` as done for ``ttl`` seconds, whoever holds the claim now."""
        now = self._clock()
        with self._lock:
            if outcomes is not None:
                self._journal_update(key, state="handled", outcomes=outcomes)
            self._claims.pop(key, None)
            self._handlers.pop(key, None)
            self._done.pop(key, None)  # re-inserted last, so eviction stays oldest-first
            self._done[key] = now + ttl
            while len(self._done) > self.max_entries:
                self._done.popitem(last=False)

    def release(
        self, key: str, token: str, outcomes: Mapping[str, HandlerOutcome] | None = None
    ) -> None:
        """Drop the claim held with ``token``; keep the per-handler records."""
        with self._lock:
            held = self._claims.get(key)
            if held is not None and held[0] == token:
                del self._claims[key]
                if outcomes is not None:
                    self._journal_update(key, state="failed", outcomes=outcomes)

    # -- the journal --------------------------------------------------------------------

    def journal_ignore(self, entry: NewEntry) -> None:
        """Record an authentic event that no handler wanted."""
        with self._lock:
            self._journal_delivery(entry, False, state="ignored")

    def journal_get(self, key_or_run_id: str) -> JournalEntry | None:
        """The entry with this key, else the newest entry for this run id."""
        with self._lock:
            self._expire_journal()
            fields = self._journal.get(key_or_run_id)
            if fields is None:
                key = self._by_run.get(key_or_run_id)
                fields = self._journal.get(key) if key is not None else None
            return _entry(fields) if fields is not None else None

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
        after = since.timestamp() if since is not None else None
        found: list[JournalEntry] = []
        with self._lock:
            self._expire_journal()
            for fields in reversed(self._journal.values()):
                if len(found) >= limit:
                    break
                if (
                    (state is None or fields.state == state)
                    and (event is None or fields.new.event == event)
                    and (agent_id is None or fields.new.agent_id == agent_id)
                    and (after is None or fields.received_at >= after)
                ):
                    found.append(_entry(fields))
        return found

    def record_refusal(self, refusal: Refusal) -> None:
        """Keep one refused delivery; the oldest go first past ``max_refusals``."""
        with self._lock:
            self._refusals.append(refusal)

    def refusals(self, limit: int = 100) -> list[Refusal]:
        """Refused deliveries, newest first."""
        with self._lock:
            return list(reversed(self._refusals))[:limit]

    def _journal_delivery(self, entry: NewEntry, acquired: bool, state: str = "pending") -> None:
        now = self._wall()
        fields = self._journal.get(entry.key)
        if fields is None:
            self._journal[entry.key] = _Kept(entry, state, now)
            if entry.run_id is not None:
                self._by_run[entry.run_id] = entry.key
            if len(self._journal) > self.max_journal:
                self._forget(next(iter(self._journal)))
            return
        fields.attempts += 1
        fields.updated_at = now
        fields.new = entry  # the newest retention applies
        if acquired or state == "ignored":
            fields.state = state

    def _journal_update(
        self,
        key: str,
        *,
        state: str | None = None,
        outcomes: Mapping[str, HandlerOutcome] | None = None,
    ) -> None:
        fields = self._journal.get(key)
        if fields is None:  # forgotten meanwhile (bounded journal): nothing to update
            return
        if state is not None:
            fields.state = state
        if outcomes:
            fields.handlers.update(outcomes)
        fields.updated_at = self._wall()

    def _expire_journal(self) -> None:
        now = self._wall()
        gone = [k for k, f in self._journal.items() if f.updated_at + f.new.retention <= now]
        for key in gone:
            self._forget(key)

    def _forget(self, key: str) -> None:
        fields = self._journal.pop(key)
        run_id = fields.new.run_id
        if run_id is not None and self._by_run.get(run_id) == key:
            del self._by_run[run_id]

    def _handlers_done(self, key: str, now: float) -> frozenset[str]:
        record = self._handlers.get(key)
        if record is None:
            return frozenset()
        if record[0] <= now:
            del self._handlers[key]
            return frozenset()
        return frozenset(record[1])

    def _forked(self) -> None:
        parent, self._pid = self._pid, os.getpid()
        warn_if_several_processes(
            f"this process (pid {self._pid}) was forked from the one that built the "
            f"receiver (pid {parent}), as a pre-forking server does with a preloaded app"
        )

    def _drop_expired_claims(self, now: float) -> None:
        # Claims are few (one per delivery in progress) unless workers keep dying mid-handler.
        for key in [k for k, (_, until) in self._claims.items() if until <= now]:
            del self._claims[key]


class _Kept:
    """One journal entry as the memory store keeps it: what arrived, and what changed."""

    __slots__ = ("attempts", "handlers", "new", "received_at", "state", "updated_at")

    def __init__(self, new: NewEntry, state: str, now: float) -> None:
        self.new = new
        self.state = state
        self.attempts = 1
        self.received_at = self.updated_at = now
        self.handlers: dict[str, HandlerOutcome] = {}


def _entry(fields: _Kept) -> JournalEntry:
    new = fields.new
    return JournalEntry(
        key=new.key,
        event=new.event,
        run_id=new.run_id,
        agent_id=new.agent_id,
        agent_name=new.agent_name,
        state=fields.state,
        attempts=fields.attempts,
        received_at=to_datetime(fields.received_at),
        updated_at=to_datetime(fields.updated_at),
        body=new.body,
        headers=dict(new.headers),
        handlers=dict(fields.handlers),
    )


class _DefaultMemoryStore(MemoryStore):
    """The default store: notices being used in a process forked after it was built."""

    def __init__(self) -> None:
        super().__init__()
        self._pid = os.getpid()  # checked by claim(): one int comparison per delivery


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
