"""The delivery journal of :class:`~flymy_receiver.stores.MemoryStore`: bounded in entries
and in body bytes, evicting what no one needs to replay first.

Not thread-safe by itself: the store calls it under its lock, in the same step as the claim
records it changes with. Times are wall-clock epoch seconds, cut to microseconds so that a
time read back from an entry (a ``datetime``) finds that entry again in ``since``/``until``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping

from .base import Claim, ClaimState
from .handler_runs import entry_state_after, finished, running
from .records import HISTORY_LIMIT, Attempt, HandlerOutcome, JournalEntry, NewEntry, to_datetime

__all__ = ["MemoryJournal"]

logger = logging.getLogger("flymy_receiver")

#: Entries nobody needs to replay: evicted first, and their bodies dropped first.
_SETTLED = frozenset({"handled", "ignored", "resolved"})


class _Kept:
    """One journal entry as the memory store keeps it.

    No ``__slots__``: what most entries never change is a class attribute until it is set,
    so building one (once per delivery) sets six attributes rather than thirteen.
    """

    attempts = 1
    history: list[Attempt] | None = None  # made on the first attempt recorded
    note: str | None = None
    lease_until = 0.0  # the delivery claim's end: a pending entry past it is stalled
    leases: dict[str, tuple[str, float]] | None = None  # deferred handler -> (token, until)
    body: bytes | None = None
    body_dropped = False

    def __init__(self, new: NewEntry, state: str, now: float) -> None:
        # What arrived. Its ``body`` is the same bytes object as ``body`` below (no copy);
        # once the body is dropped, ``new`` is replaced by a copy without it (_drop_body).
        # Never read ``new.body``: ``body`` is the journal's.
        self.new = new
        self.state = state
        self.received_at = self.updated_at = now
        self.handlers: dict[str, HandlerOutcome] = {}
        self.body_size = len(new.body)

    def record(self, attempt: Attempt) -> None:
        if self.history is None:
            self.history = [attempt]
            return
        self.history.append(attempt)
        if len(self.history) > HISTORY_LIMIT:
            del self.history[0]

    def public_state(self, now: float) -> str:
        if self.state == "pending" and self.lease_until <= now:
            return "stalled"
        return self.state


class MemoryJournal:
    """The newest ``max_entries`` entries, their bodies within ``max_bytes`` in all."""

    def __init__(self, max_entries: int, max_bytes: int, wall: Callable[[], float]) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._wall = wall
        # key -> entry, oldest received first (an OrderedDict finds its oldest item at once).
        self._entries: OrderedDict[str, _Kept] = OrderedDict()
        self._by_run: dict[str, str] = {}  # run id -> key of its newest entry
        # Settled entries, oldest settled first: evicted before any other.
        self._settled: OrderedDict[str, None] = OrderedDict()
        # Settled entries that still hold a body: their bodies go first past ``max_bytes``.
        self._settled_bodies: OrderedDict[str, None] = OrderedDict()
        self.bytes = 0  # the bodies kept

    def __len__(self) -> int:
        return len(self._entries)

    def now(self) -> float:
        # Cut to whole microseconds (what a datetime holds); int() is 4x cheaper than round().
        return int(self._wall() * 1_000_000) / 1_000_000

    # -- reading --------------------------------------------------------------------------

    def find(self, key: str, now: float | None = None) -> _Kept | None:
        """The live entry with this key (an expired one is forgotten); ``now`` saves
        reading the clock again."""
        kept = self._entries.get(key)
        if kept is not None and kept.updated_at + kept.new.retention <= (now or self._wall()):
            self._forget(key)
            return None
        return kept

    def get(self, key_or_run_id: str) -> JournalEntry | None:
        kept = self.find(key_or_run_id)
        if kept is None:
            key = self._by_run.get(key_or_run_id)
            kept = self.find(key) if key is not None else None
        return self._entry(kept, full=True) if kept is not None else None

    def settled(self, run_id: str, states: frozenset[str]) -> JournalEntry | None:
        key = self._by_run.get(run_id)
        kept = self.find(key) if key is not None else None
        if kept is None or kept.public_state(self._wall()) not in states:
            return None
        return self._entry(kept, full=True)

    def summaries(
        self,
        states: frozenset[str] | None,
        match: Callable[[NewEntry], bool],
        since: float | None,
        until: float | None,
        before: str | None,
        limit: int,
    ) -> list[JournalEntry]:
        now = self._wall()
        self.expire()
        bound: tuple[float, str] | None = None
        if before is not None:
            start = self._entries.get(before)
            if start is None:  # the previous page's last entry is gone: nothing is "before" it
                return []
            bound = (start.received_at, before)
        found = [
            kept
            for key, kept in self._entries.items()
            if (states is None or kept.public_state(now) in states)
            and (since is None or kept.received_at >= since)
            and (until is None or kept.received_at < until)
            and (bound is None or (kept.received_at, key) < bound)
            and match(kept.new)
        ]
        found.sort(key=lambda kept: (kept.received_at, kept.new.key), reverse=True)
        return [self._entry(kept, full=False) for kept in found[: max(0, limit)]]

    def _entry(self, kept: _Kept, *, full: bool) -> JournalEntry:
        new = kept.new
        return JournalEntry(
            key=new.key,
            event=new.event,
            run_id=new.run_id,
            agent_id=new.agent_id,
            agent_name=new.agent_name,
            state=kept.public_state(self._wall()),
            attempts=kept.attempts,
            received_at=to_datetime(kept.received_at),
            updated_at=to_datetime(kept.updated_at),
            body=kept.body if full else None,
            headers=dict(new.headers),
            handlers=dict(kept.handlers),
            history=tuple(kept.history) if full and kept.history else (),
            note=kept.note,
            body_size=kept.body_size,
            body_dropped=kept.body_dropped,
        )

    # -- writing --------------------------------------------------------------------------

    def delivered(
        self,
        entry: NewEntry,
        state: str,
        attempt: Attempt | None = None,
        acquired: bool = False,
        lease_until: float = 0.0,
        now: float | None = None,
    ) -> str:
        """A delivery of ``entry``: a new entry in ``state``, or one more attempt on the
        existing one, which takes ``state`` and the new body only when the delivery
        ``acquired`` the claim (the handlers run on it). ``lease_until`` is when a
        ``pending`` entry's claim ends (``now``: the caller's :meth:`now`). Returns the
        state before ("" for a new entry)."""
        if now is None:
            now = self.now()
        kept = self.find(entry.key, now)  # an expired entry starts afresh
        if kept is None:
            kept = _Kept(entry, state, now)
            self._entries[entry.key] = kept
            if entry.run_id is not None:
                self._by_run[entry.run_id] = entry.key
            self._set_body(kept, entry.body)
            if state in _SETTLED:  # a new entry is in no eviction order yet
                self._settle(kept)
            prior = ""
        else:
            prior = kept.state
            kept.attempts += 1
            kept.updated_at = now
            if acquired:
                self._replace(kept, entry)
                kept.state = state
                self._settle(kept)
            else:  # only the newest retention applies: the rest stays as the handlers saw it
                kept.new = _stripped(kept.new, entry.retention)
        if kept.state == "pending" and (acquired or not prior):
            kept.lease_until = lease_until
        if attempt is not None:
            kept.record(attempt)
        if len(self._entries) > self.max_entries:
            self._bound()
        return prior

    def update(
        self,
        key: str,
        state: str | None = None,
        outcomes: Mapping[str, HandlerOutcome] | None = None,
        attempt: Attempt | None = None,
        lease_until: float | None = None,
    ) -> str | None:
        """Change a live entry; returns its state before (None: there is no such entry)."""
        now = self.now()
        kept = self.find(key, now)
        if kept is None:  # forgotten meanwhile (bounded journal): nothing to update
            return None
        prior = kept.state
        if outcomes:
            kept.handlers.update(outcomes)
        if attempt is not None:
            kept.record(attempt)
        if lease_until is not None:
            kept.lease_until = lease_until
        if state is not None:
            kept.state = state
            self._settle(kept)
        kept.updated_at = now
        return prior

    def resolve(self, key: str, note: str) -> bool:
        kept = self.find(key)
        if kept is None:
            return False
        kept.note = note
        self.update(key, state="resolved")
        return True

    def claim_handler(self, key: str, handler: str, lease: float, now: float, token: str) -> Claim:
        """Take ``handler``'s own lease on entry ``key`` (``now`` on the store's claim
        clock); raises KeyError when there is no such entry."""
        kept = self.find(key)
        if kept is None:
            raise KeyError(key)
        prior = kept.state
        before = kept.handlers.get(handler)
        if before is not None and before.state == "ok":
            return Claim(ClaimState.DONE, prior_state=prior)
        if kept.leases is None:
            kept.leases = {}
        held = kept.leases.get(handler)
        if held is not None and held[1] > now:
            return Claim(ClaimState.BUSY, retry_after=held[1] - now, prior_state=prior)
        kept.leases[handler] = (token, now + lease)
        wall = self.now()
        kept.handlers[handler] = running(before, wall, wall + lease)
        kept.updated_at = wall
        return Claim(ClaimState.ACQUIRED, token, body=kept.body, prior_state=prior)

    def finish_handler(
        self,
        key: str,
        handler: str,
        token: str,
        outcome: HandlerOutcome,
        attempt: Attempt,
        final: bool,
    ) -> set[str] | None:
        """Record a deferred handler's run: ``ok`` always, a failure only while ``token``
        holds its lease. Returns the handlers that are ok when the entry has just failed for
        good (the store then lets a replay claim the key again), else None."""
        kept = self.find(key)
        if kept is None:
            return None
        held = kept.leases.get(handler) if kept.leases is not None else None
        holds = held is not None and held[0] == token
        if not outcome.ok and not holds:
            return None  # a late worker: whoever holds the lease now records the run
        if holds and kept.leases is not None:
            del kept.leases[handler]
        kept.handlers[handler] = finished(outcome, kept.handlers.get(handler))
        kept.record(attempt)
        state = entry_state_after((o.state for o in kept.handlers.values()), outcome.ok, final)
        self.update(key, state=state)
        if state != "failed":
            return None
        return {name for name, o in kept.handlers.items() if o.state == "ok"}

    def expire(self) -> None:
        now = self._wall()
        gone = [k for k, f in self._entries.items() if f.updated_at + f.new.retention <= now]
        for key in gone:
            self._forget(key)

    # -- bounds ---------------------------------------------------------------------------

    def _replace(self, kept: _Kept, entry: NewEntry) -> None:
        """An acquired claim: the handlers run on this delivery's body and fields."""
        old_run = kept.new.run_id
        if (
            old_run is not None
            and old_run != entry.run_id
            and self._by_run.get(old_run) == entry.key
        ):
            del self._by_run[old_run]
        if entry.run_id is not None:
            self._by_run[entry.run_id] = entry.key
        self._drop_body(kept, dropped=False)
        kept.new = entry
        kept.body_size = len(entry.body)
        self._set_body(kept, entry.body)

    def _set_body(self, kept: _Kept, body: bytes) -> None:
        """Keep ``body`` within the byte bound: settled entries' bodies go first; when that
        is not enough this entry is kept without its body."""
        while self.bytes + len(body) > self.max_bytes and self._settled_bodies:
            oldest = next(iter(self._settled_bodies))
            self._drop_body(self._entries[oldest], dropped=True)
        if self.bytes + len(body) > self.max_bytes:
            kept.body, kept.body_dropped = None, True
            kept.new = _stripped(kept.new)
            logger.warning(
                "the in-memory journal keeps %s without its body: its bodies already take "
                "max_journal_bytes=%d",
                kept.new.key[:200],
                self.max_bytes,
            )
            return
        kept.body, kept.body_dropped = body, False
        self.bytes += len(body)
        if kept.state in _SETTLED:
            self._settled_bodies[kept.new.key] = None

    def _drop_body(self, kept: _Kept, *, dropped: bool) -> None:
        if kept.body is not None:
            self.bytes -= len(kept.body)
        kept.body, kept.body_dropped = None, dropped
        self._settled_bodies.pop(kept.new.key, None)
        if dropped:  # the entry stays: let go of the bytes its ``new`` still refers to
            kept.new = _stripped(kept.new)

    def _settle(self, kept: _Kept) -> None:
        """Keep the eviction order in step with the entry's state."""
        key = kept.new.key
        self._settled.pop(key, None)
        self._settled_bodies.pop(key, None)
        if kept.state in _SETTLED:
            self._settled[key] = None
            if kept.body is not None:
                self._settled_bodies[key] = None

    def _bound(self) -> None:
        entries, settled = self._entries, self._settled
        while len(entries) > self.max_entries:
            if settled:  # the oldest settled entry goes first (popitem: no iterator made)
                self._forget(settled.popitem(last=False)[0])
                continue
            key, kept = next(iter(self._entries.items()))
            logger.warning(
                "the in-memory journal is full (max_journal=%d) of entries not handled: it "
                "dropped the %s entry %s, which can no longer be replayed; use a durable store",
                self.max_entries,
                kept.public_state(self._wall()),
                key[:200],
            )
            self._forget(key)

    def _forget(self, key: str) -> None:
        kept = self._entries.pop(key)
        self._drop_body(kept, dropped=False)
        self._settled.pop(key, None)
        run_id = kept.new.run_id
        if run_id is not None and self._by_run.get(run_id) == key:
            del self._by_run[run_id]


def _stripped(new: NewEntry, retention: float | None = None) -> NewEntry:
    """``new`` without its body (whose bytes the byte bound accounts for apart), with
    ``retention`` if given."""
    if not new.body and (retention is None or retention == new.retention):
        return new
    keep = new.retention if retention is None else retention
    return NewEntry(
        new.key, new.event, new.run_id, new.agent_id, new.agent_name, b"", new.headers, keep
    )
