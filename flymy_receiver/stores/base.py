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
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

__all__ = ["Claim", "ClaimState", "Store"]


class ClaimState(enum.Enum):
    """The outcome of :meth:`Store.claim`."""

    ACQUIRED = "acquired"
    DONE = "done"
    BUSY = "busy"


@dataclass(frozen=True, slots=True)
class Claim:
    """What :meth:`Store.claim` found. ``token`` identifies an acquired claim."""

    state: ClaimState
    token: str = ""
    done_handlers: frozenset[str] = field(default_factory=frozenset)
    retry_after: float = 0.0


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
