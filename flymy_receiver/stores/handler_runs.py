"""How a store records a deferred handler's runs (DESIGN section 10), the same in every
store: the outcome while a worker holds the handler's lease, the outcome it finishes with,
and the entry's state that follows."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from .records import HandlerOutcome

__all__ = ["entry_state_after", "finished", "running"]


def running(before: HandlerOutcome | None, at: float, lease_until: float) -> HandlerOutcome:
    """The outcome of a handler a worker has just taken: one more attempt, leased."""
    return HandlerOutcome(
        ok=False,
        at=at,
        state="running",
        attempts=(before.attempts if before is not None else 0) + 1,
        deferred=True,
        queued_at=before.queued_at if before is not None else 0.0,
        lease_until=lease_until,
    )


def finished(outcome: HandlerOutcome, before: HandlerOutcome | None) -> HandlerOutcome:
    """A worker's run as recorded: ``ok`` or ``failed``, with the attempts its claims
    counted and when it was queued, and no lease any more."""
    return replace(
        outcome,
        state="ok" if outcome.ok else "failed",
        deferred=True,
        attempts=max(outcome.attempts, before.attempts if before is not None else 0),
        queued_at=outcome.queued_at or (before.queued_at if before is not None else 0.0),
        lease_until=0.0,
    )


def entry_state_after(states: Iterable[str], ok: bool, final: bool) -> str | None:
    """The entry's state once a run ended: ``handled`` when every handler (``states``: each
    one's outcome state, that run's included) is ok, ``failed`` when the run failed for
    good, else unchanged (None: still ``queued``)."""
    if all(state == "ok" for state in states):
        return "handled"
    if not ok and final:
        return "failed"
    return None
