"""The idempotency store contract.

A store remembers which events were handled, so that a redelivered event is acknowledged
without running its handlers again. Every implementation follows the same contract, which
``tests/stores/test_contract.py`` checks for each of them:

- ``claim(key, lease)`` is atomic: of all the workers claiming one key at once, exactly one
  gets ``ACQUIRED``; the others get ``BUSY`` until the claim is released, completed, or its
  lease runs out (a worker that died never blocks an event for longer than the lease).
  A key that was completed gives ``DONE`` for ``ttl`` seconds.
- ``mark_handler_done`` records that one handler succeeded, so that after a partial
  failure only the handlers that failed run again. ``claim`` returns those names.
- ``complete`` records the whole event as done; ``release`` gives the claim up after a
  failure, keeping the per-handler records.
- ``complete`` and ``mark_handler_done`` record success even when the claim's lease ran out
  meanwhile (the work *was* done: forgetting it would only run it again); ``release`` acts
  only while ``token`` still holds the claim, so a late worker never frees someone else's.
- A store that cannot be reached raises :class:`~flymy_receiver.errors.StoreUnavailable`.

A store that also keeps the delivery journal (:class:`JournalStore`) takes the journal's
facts with the same calls, so that the entry changes in the same atomic step as the claim
(one transaction, one script, one combined statement: no extra round trip):

- ``claim(key, lease, entry)`` creates the entry (state ``pending``, one attempt) or counts
  one more attempt on it (duplicates included). Only a claim that is *acquired* changes an
  existing entry's state (to ``pending``) and its body (the handlers run on the new one);
  ``DONE`` and ``BUSY`` leave state and body alone and append an :class:`Attempt` to the
  history (source ``sender``, status 200 / outcome ``duplicate``, or status 409 / outcome
  ``in_flight``). ``claim(key, lease, replay=True)`` is a replay: it counts no attempt (a
  BUSY one appends source ``replay``, 409, ``in_flight``); ``force=True`` acquires even a done
  key (never a held one) and reports no done handlers.
- ``mark_handler_done(..., outcome)`` and ``complete(..., outcomes, attempt)`` record each
  handler's latest outcome; ``complete`` makes the entry ``handled``, or ``queued`` when one of
  ``outcomes`` is a deferred handler in state ``queued``; ``attempt`` (when given) is appended
  to the history. ``release(key, token, outcomes, attempt)`` records the outcomes and the
  attempt and makes the entry ``failed``, only while ``token`` still holds the claim.
- ``journal_ignore(entry, attempt)`` records an authentic event that no handler wanted: a new
  entry is ``ignored``; an existing one counts an attempt and appends ``attempt`` but keeps its
  state and its body (a later delivery no handler wants never hides a failed entry).
- ``journal_get(key_or_run_id)`` finds an entry by key, else the newest entry of that run
  (run ids of any length: stores index a digest or a bounded prefix), with its body (``None``
  when the byte limit dropped it) and history.
- ``journal_list(state=, event=, agent_id=, run_id=, since=, until=, before=, limit=)`` returns
  *summaries* (``body=None``, ``history=()``; ``body_size`` and ``handlers`` filled), newest
  first by ``(received_at, key)``; ``since``/``until`` bound ``received_at`` (``since``
  inclusive, ``until`` exclusive); ``before`` is the key of the last entry of the previous page
  (keyset: the entries strictly before it in that order). ``state="failed"`` lists the
  ``failed`` and the ``stalled`` entries (a ``pending`` entry whose claim's lease has ended),
  and ``state="stalled"`` only the latter. Every filter is served by an index; no list reads a
  body. Entries expire ``entry.retention`` seconds after their last change.
- ``journal_resolve(key, note)`` makes an entry ``resolved`` with ``note`` (returns False
  when there is no such entry). A resolved entry leaves the failure lists; a later delivery
  that acquires the claim makes it ``pending`` again.
- Deferred handlers (run by a task queue's worker, DESIGN section 10):
  ``claim_handler(key, handler, lease)`` takes that one handler's own lease: ``ACQUIRED``
  (with ``token`` and the stored ``body``; the outcome becomes ``running``, its ``attempts``
  one more, ``lease_until`` set), ``DONE`` when its outcome is ``ok``, ``BUSY`` while another
  worker's lease on it is live (``retry_after``); raises :class:`KeyError` when the journal
  has no such entry. ``finish_handler(key, handler, token, outcome, attempt, final, ttl)``
  records the run: ``ok`` always (like ``complete``), a failure only while ``token`` holds
  the handler's lease; appends ``attempt``; the entry becomes ``handled`` once every handler
  is ``ok``, ``failed`` when a failure is ``final`` (the queue will not retry it: then the
  key's done record is dropped, keeping the per-handler records, so that a replay can claim
  it), and stays ``queued`` otherwise. An entry that becomes ``handled`` or ``failed`` this
  way wakes the run's waiters like ``complete`` does.
- ``claim`` and ``claim_handler`` report the entry's state before them in
  ``Claim.prior_state`` (read in the same step, no extra round trip).
- ``record_refusal`` keeps a refused delivery (no body); ``refusals`` lists the newest
  first. Stores keep a bounded number of refusals.
- Bodies are bounded in bytes (``max_journal_bytes``, where the store takes it): past the
  bound the journal keeps the entry without its body (``body_dropped``), never refusing a
  claim nor evicting an idempotency record for it.

A store that keeps its records in the application's own database (:class:`AtomicStore`)
can run a handler registered with ``on(..., atomic=True)``: ``run_atomic`` calls it inside
one database transaction together with the record that it succeeded (the same record as
``mark_handler_done``, outcome included), so that the handler's writes and that record
commit or roll back together. What the handler raises rolls both back and propagates.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable

from .records import Attempt, HandlerOutcome, JournalEntry, NewEntry, Refusal

__all__ = ["AtomicStore", "Claim", "ClaimState", "JournalStore", "Store", "journals", "runs_atomic"]


class ClaimState(enum.Enum):
    """The outcome of :meth:`Store.claim`."""

    ACQUIRED = "acquired"
    DONE = "done"
    BUSY = "busy"


# Not frozen: one is made per delivery, and a frozen dataclass's __init__ costs about three
# times more (0.6 µs). Treat it as a value all the same.
@dataclass(slots=True)
class Claim:
    """What :meth:`Store.claim` found. ``token`` identifies an acquired claim."""

    state: ClaimState
    token: str = ""
    done_handlers: frozenset[str] = frozenset()  # immutable: shared, no factory call
    retry_after: float = 0.0
    body: bytes | None = None  # claim_handler only: the stored body the handler runs on
    #: Journal stores: the entry's state before this claim ("" for a new entry or without a
    #: journal), so the receiver can tell an entry that *becomes* failed (``on_failure``).
    prior_state: str = ""


@runtime_checkable
class Store(Protocol):
    """What the receiver needs from an idempotency store (all durations in seconds)."""

    #: True when calls may block on I/O; ``ahandle`` then runs them in a worker thread.
    blocking: bool

    def claim(self, key: str, lease: float) -> Claim:
        """Atomically take ``key`` for ``lease`` seconds, unless done or held elsewhere."""
        ...

    def mark_handler_done(self, key: str, token: str, handler: str, ttl: float) -> None:
        """Record that ``handler`` succeeded for ``key``; remembered for ``ttl`` seconds."""
        ...

    def complete(self, key: str, token: str, ttl: float) -> None:
        """Record ``key`` as done for ``ttl`` seconds and drop the claim."""
        ...

    def release(self, key: str, token: str) -> None:
        """Give up the claim held with ``token`` (a no-op if it is no longer held)."""
        ...


@runtime_checkable
class JournalStore(Store, Protocol):
    """A store that also keeps the delivery journal (see the module docstring)."""

    def claim(  # the journal's arguments are optional extras
        self,
        key: str,
        lease: float,
        entry: NewEntry | None = None,
        *,
        replay: bool = False,
        force: bool = False,
    ) -> Claim: ...

    def mark_handler_done(
        self, key: str, token: str, handler: str, ttl: float, outcome: HandlerOutcome | None = None
    ) -> None: ...

    def complete(
        self,
        key: str,
        token: str,
        ttl: float,
        outcomes: Mapping[str, HandlerOutcome] | None = None,
        attempt: Attempt | None = None,
    ) -> None: ...

    def release(
        self,
        key: str,
        token: str,
        outcomes: Mapping[str, HandlerOutcome] | None = None,
        attempt: Attempt | None = None,
    ) -> None: ...

    def journal_ignore(self, entry: NewEntry, attempt: Attempt | None = None) -> None:
        """Record an authentic event that no handler wanted (never changes an existing
        entry's state or body)."""
        ...

    def journal_get(self, key_or_run_id: str) -> JournalEntry | None:
        """The entry with this key, else the newest entry for this run id."""
        ...

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
        """Summaries (no body, no history) newest first, filtered; ``before`` is a key."""
        ...

    def journal_resolve(self, key: str, note: str) -> bool:
        """Make the entry ``resolved`` with ``note``; False when there is no such entry."""
        ...

    def claim_handler(self, key: str, handler: str, lease: float) -> Claim:
        """Take one deferred handler's own lease (``Claim.body`` holds the stored body)."""
        ...

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
        """Record a deferred handler's run (see the module docstring)."""
        ...

    def record_refusal(self, refusal: Refusal) -> None:
        """Keep one refused delivery (bounded; oldest dropped first)."""
        ...

    def refusals(self, limit: int = 100) -> list[Refusal]:
        """Refused deliveries, newest first."""
        ...


@runtime_checkable
class AtomicStore(Store, Protocol):
    """A store that can run a handler in one transaction with its record (see above)."""

    def run_atomic(
        self,
        key: str,
        token: str,
        handler: str,
        ttl: float,
        call: Callable[[], HandlerOutcome | None],
    ) -> HandlerOutcome | None:
        """Run ``call`` and record ``handler`` as done for ``key`` (with the outcome ``call``
        returns, if any) in one transaction; return that outcome."""
        ...

    def run_deferred_atomic(
        self,
        key: str,
        handler: str,
        token: str,
        attempt: Attempt,
        ttl: float,
        call: Callable[[], HandlerOutcome],
    ) -> HandlerOutcome:
        """A deferred handler's ``atomic=True`` run: ``call`` and ``finish_handler`` (with the
        outcome ``call`` returns and ``attempt``, ``final=False``) in one transaction."""
        ...


def journals(store: Store) -> bool:
    """Whether ``store`` keeps the delivery journal."""
    return callable(getattr(store, "journal_list", None))


def runs_atomic(store: Store) -> bool:
    """Whether ``store`` can run ``atomic=True`` handlers (:class:`AtomicStore`)."""
    return callable(getattr(store, "run_atomic", None))
