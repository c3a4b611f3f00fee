"""Deferred handlers: acknowledged once journaled, run on a task queue's workers.

The journal is the outbox (DESIGN section 10). A delivery records each deferred handler
(``@receiver.on(..., defer=True)``) as ``queued`` in the same store step that completes the
key, so the entry is durable before anything is sent; then it sends one job per handler,
carrying the entry's key and the handler's id, never the body. This module is the rest:

- :func:`check_deferrable`, the registration check (a queue, and a store that other
  processes share and that keeps the journal);
- :func:`send_jobs`, the delivery's hand-off, which never fails the delivery: a broker that
  refuses a job leaves the entry ``queued`` for :func:`sweep`;
- :func:`run_deferred`, the worker's entry point (``receiver.run_deferred``): the handler's
  own lease, the typed event from the stored body, the outcome and the attempt recorded;
- :func:`sweep` (``receiver.journal.sweep``): sends again the jobs a broker outage, a web
  process killed between commit and enqueue, or a worker killed mid-handler left behind.

Nothing here imports a task queue; each one is a module of :mod:`flymy_receiver.queues`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

from . import telemetry as _telemetry
from .errors import ConfigurationError
from .events import parse_event
from .routing import Handler, run_coroutine
from .stores.base import AtomicStore, ClaimState, JournalStore, journals
from .stores.memory import MemoryStore
from .stores.records import Attempt, HandlerOutcome, to_datetime
from .stores.urls import redacted_url, without_credentials

if TYPE_CHECKING:
    from .queues import Queue
    from .receiver import Receiver

__all__ = [
    "DEFAULT_SWEEP_AGE",
    "Final",
    "Job",
    "check_deferrable",
    "job_context",
    "queued_outcome",
    "run_deferred",
    "send_jobs",
    "sweep",
]

logger = logging.getLogger("flymy_receiver")

#: What ``sweep()`` leaves alone: jobs younger than this are presumed still on their way.
DEFAULT_SWEEP_AGE = timedelta(minutes=5)
#: Entries read per page of the sweep (summaries only, never bodies).
_SWEEP_PAGE = 100
#: Longest cut of a broker's error message in a log line.
_MAX_ERROR_SHOWN = 300

#: Whether a failed run is the handler's last (the queue will not retry it): a bool, or a
#: function of the exception (the queue's retry policy may depend on its type).
Final = bool | Callable[[BaseException], bool]

RunResult = Literal["ok", "done", "busy"]


@dataclass(frozen=True, slots=True)
class Job:
    """One deferred handler's job: the entry's key and the handler's id."""

    key: str
    handler: str


def check_deferrable(receiver: Receiver, handler: Handler) -> None:
    """Refuse ``defer=True`` where no worker could run it (at registration)."""
    if not handler.deferred:
        return
    where = f"handler {handler.id}: defer=True"
    if receiver.queue is None:
        raise ConfigurationError(
            f"{where} needs a task queue whose workers run it: Receiver(queue=CeleryQueue(app))"
        )
    if isinstance(receiver.store, MemoryStore):
        raise ConfigurationError(
            f"{where} needs a store that the workers' processes share; the in-process memory"
            " store is seen by this process only (use SQLiteStore, RedisStore, PostgresStore"
            " or DjangoStore)"
        )
    if receiver.journal is None:
        raise ConfigurationError(
            f"{where} needs the delivery journal (the journal is the outbox): journal=True"
        )
    if not callable(getattr(receiver.store, "claim_handler", None)):
        raise ConfigurationError(
            f"{where}: {type(receiver.store).__name__} cannot run deferred handlers"
            " (it has no claim_handler)"
        )


def job_context() -> dict[str, str]:
    """The trace context a job carries to its worker (filled when telemetry is on)."""
    trace = _telemetry.current()
    return trace.job_context() if trace is not None else {}


def queued_outcome(now: float) -> HandlerOutcome:
    """A deferred handler's outcome as the delivery records it: durable, its job to send."""
    return HandlerOutcome(ok=False, at=now, state="queued", deferred=True, queued_at=now)


def send_jobs(queue: Queue, key: str, handler_ids: Iterable[str]) -> int:
    """Send one job per handler; return how many the queue took. Never raises.

    The entry is durable already: a refused job is logged (one line, no credentials) and
    left to :func:`sweep`. The first refusal stops the rest, so an unreachable broker costs
    a delivery one refusal, not one per handler.
    """
    ids = list(handler_ids)
    context = job_context()
    for sent, handler_id in enumerate(ids):
        try:
            queue.enqueue(key, handler_id, context)
        except Exception as exc:
            logger.warning(
                "deferred jobs not sent: key=%s handlers=%d broker=%s (%s); the entry stays"
                " queued and journal.sweep() sends them",
                key[:200],
                len(ids) - sent,
                _broker_of(queue),
                _shown_error(queue, exc),
            )
            return sent
    return len(ids)


def run_deferred(
    receiver: Receiver,
    key: str,
    handler_id: str,
    *,
    final: Final = True,
    context: Mapping[str, str] | None = None,
) -> RunResult:
    """Run one deferred handler of one journal entry, as a worker does.

    Returns ``"ok"`` when it ran and succeeded, ``"done"`` when it had succeeded already,
    ``"busy"`` when another worker holds its lease (that worker records the outcome; if it
    died, the lease runs out and :func:`sweep` sends the job again). A handler that raises
    has its failure recorded and the exception re-raised, so the queue retries it with its
    own policy; ``final`` says whether this run is its last (then the entry becomes
    ``failed`` and replayable). Raises :class:`LookupError` for a handler id this receiver
    does not know or an entry the journal does not have (logged).
    """
    del context  # the telemetry hook reads it (the worker span's link); nothing else does
    store = _journal_store(receiver)
    if not any(h.id == handler_id and h.deferred for h in receiver.handlers()):
        logger.error("deferred job for an unknown handler %r (key %s)", handler_id[:200], key[:200])
        raise LookupError(f"no deferred handler {handler_id[:200]!r} in this receiver")
    try:
        claim = store.claim_handler(key, handler_id, receiver.lease.total_seconds())
    except KeyError:
        logger.error("deferred job for a missing journal entry %s (expired?)", key[:200])
        raise LookupError(f"no journal entry {key[:200]!r}") from None
    if claim.state is ClaimState.DONE:
        logger.info("deferred handler %s of %s already ran", handler_id, key[:200])
        return "done"
    if claim.state is ClaimState.BUSY:
        logger.info(
            "deferred handler %s of %s is running elsewhere (lease ends in %.0f s)",
            handler_id,
            key[:200],
            claim.retry_after,
        )
        return "busy"
    started, clock = time.time(), time.perf_counter()
    attempt = Attempt(started, "worker", None, "handled", 0.0, handler_id)
    ttl = receiver.retention.total_seconds()
    run_id: str | None = None
    try:
        if claim.body is None:
            raise LookupError(f"the body of {key[:200]!r} was dropped (journal byte limit)")
        event, raw = parse_event(claim.body)  # authenticated when it arrived
        run_id = _run_id(event)
        handler = _handler_for(receiver, event, handler_id)
        typed = handler.typed_event(event, raw)
        if handler.atomic:  # the handler, its outcome and the attempt in one transaction

            def call() -> HandlerOutcome:
                handler.func(typed)
                attempt.duration = time.perf_counter() - clock
                return HandlerOutcome(ok=True, at=time.time(), deferred=True)

            atomic = _atomic_store(store)
            atomic.run_deferred_atomic(key, handler_id, claim.token, attempt, ttl, call)
        else:
            result = handler.func(typed)
            if handler.is_async:
                run_coroutine(result)
    except Exception as exc:
        attempt.outcome, attempt.duration = "failed", time.perf_counter() - clock
        last = final(exc) if callable(final) else bool(final)
        logger.error(
            "deferred handler %s of %s raised (%s)",
            handler_id,
            key[:200],
            "its last attempt: the entry is failed" if last else "the queue retries it",
            exc_info=exc,
            extra={"flymy_handler": handler_id, "flymy_reason": "handler_failed"},
        )
        try:
            outcome = failure_outcome(exc)
            store.finish_handler(key, handler_id, claim.token, outcome, attempt, last, ttl)
        except Exception as store_exc:  # the lease runs out; the sweep sends the job again
            logger.warning(
                "could not record deferred handler %s of %s: %r", handler_id, key[:200], store_exc
            )
        receiver.waiters.changed(run_id)
        raise
    if not handler.atomic:
        attempt.duration = time.perf_counter() - clock
        outcome = HandlerOutcome(ok=True, at=time.time(), deferred=True)
        # A store failure here propagates: the queue retries, and the retry finds the lease
        # (still held) or, once it ran out, runs the handler again (at least once).
        store.finish_handler(key, handler_id, claim.token, outcome, attempt, False, ttl)
    receiver.waiters.changed(run_id)
    return "ok"


def sweep(receiver: Receiver, older_than: timedelta = DEFAULT_SWEEP_AGE) -> list[Job]:
    """Send again the deferred jobs that may have been lost; return the jobs it sent.

    Reads the ``queued`` entries received more than ``older_than`` ago (summaries, page by
    page) and sends a job for each deferred handler that is still ``queued`` since before
    then, ``running`` with its lease run out (its worker died), or ``failed`` but not for the
    last time since before then (a retry the queue lost). A job sent twice is harmless: the
    handler's lease and its ``ok`` record make the second a no-op. Keep ``older_than`` above
    the queue's usual lag and retry delays, or busy queues get needless duplicates.
    Stops at the first job the broker refuses (the next sweep tries again).
    """
    if older_than < timedelta(0):
        raise ValueError("older_than must not be negative")
    queue = receiver.queue
    if queue is None:
        raise ConfigurationError("sweep() needs a receiver built with queue=")
    store = _journal_store(receiver)
    now = time.time()
    cutoff = now - older_than.total_seconds()
    until = to_datetime(cutoff)
    sent: list[Job] = []
    context = job_context()
    before: str | None = None
    while True:
        page = store.journal_list(state="queued", until=until, before=before, limit=_SWEEP_PAGE)
        for entry in page:
            for handler_id, outcome in entry.handlers.items():
                if not _lost(outcome, now, cutoff):
                    continue
                try:
                    queue.enqueue(entry.key, handler_id, context)
                except Exception as exc:
                    logger.warning(
                        "sweep stopped: broker=%s refused a job (%s); %d sent",
                        _broker_of(queue),
                        _shown_error(queue, exc),
                        len(sent),
                    )
                    return sent
                sent.append(Job(entry.key, handler_id))
        if len(page) < _SWEEP_PAGE:
            break
        before = page[-1].key
    if sent:
        logger.info("sweep sent %d deferred jobs again", len(sent))
    return sent


def failure_outcome(exc: BaseException) -> HandlerOutcome:
    """A failed deferred run's outcome: the plan's failure record, marked deferred."""
    return HandlerOutcome.of_failure(exc, deferred=True)


def _lost(outcome: HandlerOutcome, now: float, cutoff: float) -> bool:
    """Whether a deferred handler's job may have been lost (see :func:`sweep`)."""
    if not outcome.deferred:
        return False
    if outcome.state == "queued":
        return (outcome.queued_at or outcome.at) <= cutoff
    if outcome.state == "running":
        return outcome.lease_until <= now
    if outcome.state == "failed":  # the entry is still queued: the failure was not final
        return outcome.at <= cutoff
    return False


def _run_id(event: Any) -> str | None:
    run_id = getattr(event, "run_id", None) or getattr(getattr(event, "data", None), "run_id", None)
    return run_id if isinstance(run_id, str) else None


def _handler_for(receiver: Receiver, event: Any, handler_id: str) -> Handler:
    # Ids are unique among the handlers one event reaches, not across events.
    for handler in receiver.handlers_for(event):
        if handler.id == handler_id and handler.deferred:
            return handler
    raise LookupError(f"no deferred handler {handler_id[:200]!r} for {event.event[:64]!r}")


def _journal_store(receiver: Receiver) -> JournalStore:
    journal = receiver.journal
    if journal is None or not journals(journal.store):
        raise ConfigurationError("deferred handlers need the delivery journal (journal=True)")
    return journal.store


def _atomic_store(store: JournalStore) -> AtomicStore:
    if not callable(getattr(store, "run_deferred_atomic", None)):
        raise ConfigurationError(
            f"{type(store).__name__} cannot run a deferred handler with atomic=True"
        )
    return store  # type: ignore[return-value]  # checked just above


def _broker_of(queue: Queue) -> str:
    url = getattr(queue, "broker_url", None)
    return redacted_url(url) if isinstance(url, str) and url else type(queue).__name__


def _shown_error(queue: Queue, exc: BaseException) -> str:
    """A broker's error, bounded, without the credentials its URL may carry."""
    text = f"{type(exc).__name__}: {exc}"
    url = getattr(queue, "broker_url", None)
    if isinstance(url, str) and url:
        text = without_credentials(text, url)
    return "".join(c if c.isprintable() else "?" for c in text[:_MAX_ERROR_SHOWN])
