"""The delivery plan: claim an authentic event, run its handlers, record how it went.

A delivery is a plan of steps (a generator of actions) that two small drivers run: one with
plain calls (:func:`run`), one that awaits async handlers and moves blocking work off the
event loop (:func:`arun`). The plan is written once, so both paths answer every case alike.
The :class:`~flymy_receiver.receiver.Receiver` checks a request, builds the
:class:`Delivery` and hands it here; this module performs no I/O of its own beyond the
store calls and handlers it is given.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol, TypeVar

from . import deferred as _deferred
from . import telemetry as _telemetry
from .awaiting import Waiters
from .errors import EventInFlight, HandlerFailed, StoreUnavailable, WebhookError
from .events import RunCompleted, RunFailed, UnknownEvent
from .journal import Journal
from .queues import Queue
from .responses import _JSON, DUPLICATE, RECEIVED, Response, deferred_received, refusal
from .routing import Handler, OutputMismatch, run_coroutine
from .stores.base import AtomicStore, Claim, ClaimState, JournalStore, Store
from .stores.records import Attempt, HandlerOutcome, JournalEntry, NewEntry

__all__ = [
    "NO_HANDLER",
    "AnyEvent",
    "Delivery",
    "Host",
    "Offload",
    "arun",
    "cut",
    "log_refusal",
    "run",
    "run_id_of",
]

logger = logging.getLogger("flymy_receiver")

AnyEvent = RunCompleted[Any] | RunFailed | UnknownEvent

#: A replay's answer when no registered handler wanted to run (see :func:`_ran_nothing`).
NO_HANDLER = Response(200, b'{"received":true,"no_handler":true}', _JSON)

#: Sender-chosen text (run ids, event names, keys) is cut to this many characters in logs.
LOG_TEXT_LIMIT = 120


class Host(Protocol):
    """What the plan reads from the receiver that runs it, at each delivery."""

    store: Store
    journal: Journal | None
    waiters: Waiters
    lease: timedelta
    retention: timedelta
    queue: Queue | None
    on_failure: Callable[[JournalEntry], object] | None


@dataclass(slots=True)
class Delivery:
    """An authentic, parsed event on its way to its handlers (or replayed from the journal).

    ``entry`` is what the journal records with the claim (``None`` when the journal is off
    or for a replay); ``skip`` names handlers the journal already saw succeed; ``failed``
    those it saw fail (a replay that runs none of them leaves the entry failed). ``held`` is
    the token of the claim while this delivery holds it; ``abandoned`` says its caller went
    away (a cancelled ``ahandle``): both change under :data:`_HOLD` only, so that a claim
    that completes after the caller left is given back by exactly one side.
    """

    event: AnyEvent
    raw: Any
    key: str
    run_id: str | None
    handlers: list[Handler]
    entry: NewEntry | None = None
    replay: bool = False
    force: bool = False
    skip: frozenset[str] = frozenset()
    failed: frozenset[str] = frozenset()
    held: str = ""
    abandoned: bool = False


#: Guards ``Delivery.held`` and ``Delivery.abandoned`` between a claim's thread and the
#: coroutine that was waiting for it. One lock for all deliveries: it is held for two reads.
_HOLD = threading.Lock()


@dataclass(slots=True)
class _StoreCall:
    """A step of the plan: call the store (may block on I/O)."""

    call: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any] | None = None

    def __call__(self) -> Any:
        if self.kwargs:
            return self.call(*self.args, **self.kwargs)
        return self.call(*self.args)


@dataclass(slots=True)
class _HandlerCall:
    """A step of the plan: run one handler with the event it wants."""

    handler: Handler
    event: Any

    def __call__(self) -> Any:
        """Run the handler to completion here (an async one in an event loop of its own)."""
        if self.handler.is_async:
            return run_coroutine(self.handler.func(self.event))
        return self.handler.func(self.event)

    async def acall(self, to_thread: Offload) -> Any:
        """Run the handler from an event loop (a sync one through ``to_thread``)."""
        if self.handler.is_async:
            return await self.handler.func(self.event)
        return await to_thread(functools.partial(self.handler.func, self.event))


_Action = _StoreCall | _HandlerCall
_Plan = Generator[_Action, Any, Response]


# -- the drivers ---------------------------------------------------------------------------


def run(host: Host, delivery: Delivery) -> Response:
    """The plain driver of the plan: every step is a direct call."""
    plan = _deliver(host, delivery)
    try:  # the plan's answer arrives as StopIteration
        step = plan.send(None)
        while True:
            try:
                if isinstance(step, _StoreCall):  # step() written out: one call fewer
                    kwargs = step.kwargs
                    result = step.call(*step.args, **kwargs) if kwargs else step.call(*step.args)
                elif (trace := _telemetry.current()) is not None:
                    result = _telemetry.traced_call(trace, step.handler.id, step)
                elif step.handler.is_async:
                    result = run_coroutine(step.handler.func(step.event))
                else:
                    result = step.handler.func(step.event)
            except Exception as exc:  # handed to the plan, which decides
                step = plan.throw(exc)
            else:
                step = plan.send(result)
    except StopIteration as stop:
        response: Response = stop.value
        return response


_T = TypeVar("_T")


class Offload(Protocol):
    """How the async driver runs one blocking call off the event loop: by default
    ``asyncio.to_thread``; an adapter may pass its framework's own (Django's ``aview`` uses
    ``sync_to_async``, so database connections follow Django's request lifecycle)."""

    def __call__(self, func: Callable[[], _T], /) -> Awaitable[_T]: ...


async def arun(host: Host, delivery: Delivery, offload: Offload | None = None) -> Response:
    """The async driver: awaits async handlers, runs sync handlers and blocking store calls
    in a worker thread (through ``offload``) so the event loop never stalls.

    A cancellation (the client went away, a timeout) at any await leaves no claim held: a
    claim acquired after it is given back by the claim's own thread (see :func:`_claimed`),
    one acquired before it is released here; the sender's retry is then served at once.
    """
    to_thread: Offload = offload or asyncio.to_thread
    store = host.store
    offload_store = getattr(store, "blocking", True)
    if not any(h.is_async for h in delivery.handlers) and (offload_store or delivery.handlers):
        # Only blocking work: the whole plan in one worker-thread hop, not one per store
        # call and handler. A cancelled caller stops waiting; a claim not yet acquired is
        # then given back at once, one already running its handlers ends in its thread.
        try:
            return await to_thread(functools.partial(run, host, delivery))
        except BaseException:
            with _HOLD:
                delivery.abandoned = True
            raise
    plan = _deliver(host, delivery)
    try:
        step = plan.send(None)
        while True:
            try:
                if isinstance(step, _StoreCall):
                    result = await to_thread(step) if offload_store else step()
                elif (trace := _telemetry.current()) is not None:
                    call = functools.partial(step.acall, to_thread)
                    result = await _telemetry.atraced_call(trace, step.handler.id, call)
                elif step.handler.is_async:
                    result = await step.handler.func(step.event)
                else:
                    result = await to_thread(functools.partial(step.handler.func, step.event))
            except Exception as exc:  # handed to the plan, which decides
                step = plan.throw(exc)
            else:
                step = plan.send(result)
    except StopIteration as stop:  # the plan's answer
        response: Response = stop.value
        return response
    except BaseException:
        # Cancelled: give the claim back now, so the sender's retry is not refused for a
        # whole lease. It cannot be awaited here.
        with _HOLD:
            delivery.abandoned = True
            token, delivery.held = delivery.held, ""
        if token:
            key = delivery.key
            _in_background(lambda: store.release(key, token))
        raise


# -- the plan ------------------------------------------------------------------------------


def _deliver(host: Host, d: Delivery) -> _Plan:
    """Claim the event, run the handlers that have not succeeded yet, record the result.

    With the journal on, the same store calls carry the entry, each handler's outcome and
    the :class:`Attempt` (its source, answer, outcome and duration). A replay runs this same
    plan over a stored body. Once the handlers have finished (or no handler wanted the
    event), the run's waiters are told.
    """
    store = host.store
    journal = host.journal is not None
    # When the attempt began, for the journal's history only.
    started, clock = (time.time(), time.perf_counter()) if journal else (0.0, 0.0)
    source = "replay" if d.replay else "sender"
    if not d.handlers and d.entry is not None:
        attempt = Attempt(started, source, 200, "ignored", time.perf_counter() - clock)
        try:  # nothing can be lost: the answer is 200 whatever the store says
            yield _StoreCall(_as_journal_store(store).journal_ignore, (d.entry, attempt))
        except Exception as exc:
            logger.warning("could not journal ignored event %s: %r", cut(d.key), exc)
        return (yield from _ended(host, d, RECEIVED))
    lease_s = host.lease.total_seconds()
    retention_s = host.retention.total_seconds()
    try:
        if journal:
            claim: Claim = yield _StoreCall(
                _claimed,
                (d, store, d.key, lease_s, d.entry),
                {"replay": True, "force": d.force} if d.replay else None,
            )
        else:
            claim = yield _StoreCall(_claimed, (d, store, d.key, lease_s))
    except Exception as exc:
        return _store_failed(exc, d, "claim")
    if claim.state is ClaimState.DONE:
        logger.info(
            "duplicate of %s (run %s) acknowledged", cut(d.event.event), cut(d.run_id or "-")
        )
        return (yield from _ended(host, d, DUPLICATE))
    if claim.state is ClaimState.BUSY:
        error = EventInFlight(f"key {cut(d.key)!r}")
        log_refusal(error, d.event, level=logging.INFO)
        return refusal(error, retry_after=min(claim.retry_after, 60.0))
    if not claim.token:  # acquired after the caller went away: given back by _claimed
        return refusal(StoreUnavailable("abandoned"), retry_after=0)
    token = claim.token
    outcomes: dict[str, HandlerOutcome] | None = {} if journal else None
    deferred: list[str] = []  # for the queue's workers, once the entry is durable
    succeeded: set[str] | None = set() if d.replay else None  # a replay checks what ran
    for handler in d.handlers:
        if handler.id in claim.done_handlers or handler.id in d.skip:
            continue
        if handler.deferred and not d.replay:  # a replay runs them here, inline
            deferred.append(handler.id)
            continue
        recorded: HandlerOutcome | None = None
        try:
            typed = handler.typed_event(d.event, d.raw)
            if handler.atomic:  # the handler and its record, in one transaction
                atomic_args = (d.key, token, handler.id, retention_s)
                call = _succeeded(handler, typed, journal)
                recorded = yield _StoreCall(
                    _as_atomic_store(store).run_atomic, (*atomic_args, call)
                )
            else:
                yield _HandlerCall(handler, typed)
        except Exception as exc:
            _log_handler_failure(handler, d, exc)
            release_args: tuple[Any, ...] = (d.key, token)
            attempt = Attempt(started, source, 500, "failed", time.perf_counter() - clock)
            if outcomes is not None:
                outcomes[handler.id] = HandlerOutcome.of_failure(exc)
                release_args = (d.key, token, outcomes, attempt)
            try:
                yield _StoreCall(store.release, release_args)
            except Exception as release_exc:  # the lease will expire on its own
                logger.warning("could not release the claim on %s: %r", cut(d.key), release_exc)
            d.held = ""
            if outcomes is not None and claim.prior_state != "failed":
                yield from _failed_first(host, d)
            return (yield from _ended(host, d, refusal(HandlerFailed())))
        outcome = recorded
        if outcome is None and outcomes is not None:
            outcome = HandlerOutcome(ok=True, at=time.time())
        if outcomes is not None and outcome is not None:
            outcomes[handler.id] = outcome
        if succeeded is not None:
            succeeded.add(handler.id)
        # Each handler that succeeded is recorded before the next one runs, so a failure
        # there never runs it again; the last one's record is the completion's (one round
        # trip fewer: DESIGN section 5).
        if len(d.handlers) > 1 and not handler.atomic and handler is not d.handlers[-1]:
            mark_args: tuple[Any, ...] = (d.key, token, handler.id, retention_s)
            if outcome is not None:
                mark_args = (*mark_args, outcome)
            try:
                yield _StoreCall(store.mark_handler_done, mark_args)
            except Exception as exc:
                return _store_failed(exc, d, "record a handler of")
    if deferred and outcomes is not None:  # the entry stays queued until they ran
        now = time.time()
        outcomes.update((name, _deferred.queued_outcome(now)) for name in deferred)
    if succeeded is not None and outcomes is not None and (not succeeded or d.failed - succeeded):
        # Nothing ran, or a handler that failed before has none to run it now.
        return (yield from _ran_nothing(host, d, token, outcomes, started, clock))
    complete_args: tuple[Any, ...] = (d.key, token, retention_s)
    if outcomes is not None:
        how = "queued" if deferred else "handled"
        attempt = Attempt(started, source, 200, how, time.perf_counter() - clock)
        complete_args = (*complete_args, outcomes, attempt)
    # A queue that writes its jobs in the store's own transaction (Django tasks on the
    # DjangoStore's database) gets them from ``complete``: nothing waits for a sweep.
    in_transaction = bool(deferred) and getattr(host.queue, "in_store_transaction", False)
    complete_kwargs = {"context": _deferred.job_context()} if in_transaction else None
    try:
        yield _StoreCall(store.complete, complete_args, complete_kwargs)
    except Exception as exc:
        return _store_failed(exc, d, "record")
    d.held = ""
    if deferred and host.queue is not None:  # the workers tell the waiters, when finished
        if not in_transaction:  # else the jobs committed with the entry (DjangoTasksQueue)
            yield _StoreCall(_deferred.send_jobs, (host.queue, d.key, deferred))
        return deferred_received(len(deferred))
    return (yield from _ended(host, d, RECEIVED))


def _claimed(d: Delivery, store: Store, *args: Any, **kwargs: Any) -> Claim:
    """The claim, taken where the store call runs (a worker thread under ``ahandle``).

    An acquired claim is held by the delivery from here; if its caller went away while the
    store worked, it is given back at once and the plan sees no token.
    """
    result: Claim = store.claim(*args, **kwargs)
    if result.state is ClaimState.ACQUIRED:
        with _HOLD:
            abandoned = d.abandoned
            if not abandoned:
                d.held = result.token
        if abandoned:
            try:
                store.release(d.key, result.token)
            except Exception as exc:  # the lease will expire on its own
                logger.debug("could not give back an abandoned claim: %r", exc)
            result = Claim(ClaimState.ACQUIRED, "", result.done_handlers, 0.0, None, "")
    return result


def _ran_nothing(
    host: Host,
    d: Delivery,
    token: str,
    outcomes: dict[str, HandlerOutcome],
    started: float,
    clock: float,
) -> _Plan:
    """A replay that found no handler to run for a failed one (removed, or its filter
    changed), or none at all: recorded as ``no_handler``. An entry with a failed handler
    left stays ``failed`` (never ``handled`` over a failed outcome); one without becomes
    ``handled``."""
    attempt = Attempt(started, "replay", 200, "no_handler", time.perf_counter() - clock)
    store = host.store
    try:
        if d.failed - outcomes.keys():
            yield _StoreCall(store.release, (d.key, token, outcomes, attempt))
        else:
            ttl = host.retention.total_seconds()
            yield _StoreCall(store.complete, (d.key, token, ttl, outcomes, attempt))
    except Exception as exc:
        return _store_failed(exc, d, "record")
    d.held = ""
    logger.warning(
        "replay of %s ran no handler: no registered handler wants this event any more",
        cut(d.key),
    )
    return (yield from _ended(host, d, NO_HANDLER))


def _failed_first(host: Host, d: Delivery) -> Generator[_Action, Any, None]:
    """Tell ``on_failure`` about an entry that has just become failed (not one that was
    already: a sender's retries that fail again are not news)."""
    callback, journal = host.on_failure, host.journal
    if callback is None or journal is None:
        return
    key = d.key

    def call() -> None:
        try:
            entry = journal.get(key)
            if entry is not None:
                callback(entry)
        except Exception as exc:  # an alerting hook never breaks a delivery
            logger.error("on_failure callback failed for %s", cut(key), exc_info=exc)

    yield _StoreCall(call, ())


def _ended(host: Host, d: Delivery, response: Response) -> _Plan:
    """The handlers have finished (or no handler wanted the event): tell the run's
    waiters, then answer ``response``."""
    announce = host.waiters.delivered(d.run_id, d.event)
    if announce is not None:  # other processes are told like a store call
        yield _StoreCall(announce, ())
    return response


# -- pieces --------------------------------------------------------------------------------


def run_id_of(event: AnyEvent | None) -> str | None:
    """The run id an event carries, if any."""
    if event is None:
        return None
    if isinstance(event, UnknownEvent):
        return event.run_id
    return event.data.run_id


def cut(text: str | None, limit: int = LOG_TEXT_LIMIT) -> str:
    """Sender-chosen text as a log line shows it: at most ``limit`` characters (``-`` for
    none), so that no delivery can make a log line long."""
    if not text:
        return "-"
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


def log_refusal(error: WebhookError, event: AnyEvent | None, level: int = logging.WARNING) -> None:
    """The one log line of a refused delivery (and its reason on the delivery's span)."""
    trace = _telemetry.current()
    if trace is not None:
        trace.refused(error.code)
    logger.log(
        level,
        "refused delivery: reason=%s status=%d event=%s run_id=%s%s",
        error.code,
        error.status,
        cut(event.event) if event is not None else "-",
        cut(run_id_of(event)),
        f" ({cut(error.detail, 500)})" if error.detail else "",
        extra={"flymy_reason": error.code, "flymy_status": error.status},
    )


def _store_failed(exc: Exception, d: Delivery, doing: str) -> Response:
    error = exc if isinstance(exc, StoreUnavailable) else StoreUnavailable(repr(exc))
    trace = _telemetry.current()
    if trace is not None:
        trace.refused(error.code)
    logger.error(
        "refused delivery: reason=%s status=%d event=%s run_id=%s (idempotency store failed"
        " to %s it: %s)",
        error.code,
        error.status,
        cut(d.event.event),
        cut(d.run_id),
        doing,
        cut(error.detail, 500) if error.detail else type(exc).__name__,
        extra={"flymy_reason": error.code, "flymy_status": error.status},
    )
    return refusal(error, retry_after=5)


def _log_handler_failure(handler: Handler, d: Delivery, exc: Exception) -> None:
    """A handler's failure: "handler failed" (the sender is answered 500 to retry; a replay
    says it is one), never "refused delivery": the event was accepted."""
    extra: dict[str, Any] = {
        "flymy_event": d.event.event,
        "flymy_run_id": d.run_id,
        "flymy_handler": handler.id,
        "flymy_reason": HandlerFailed.code,
        "flymy_status": HandlerFailed.status,
        "flymy_replay": d.replay,
    }
    what = "replay: handler failed" if d.replay else "handler failed"
    if isinstance(exc, OutputMismatch):
        extra["flymy_output"] = d.raw.get("data", {}).get("output")
        logger.error(
            "%s: handler=%s event=%s run_id=%s status=500 (not run: %s)",
            what,
            cut(handler.id),
            cut(d.event.event),
            cut(d.run_id),
            cut(str(exc), 500),
            extra=extra,
        )
        return
    logger.error(
        "%s: handler=%s event=%s run_id=%s status=500 (raised %s)",
        what,
        cut(handler.id),
        cut(d.event.event),
        cut(d.run_id),
        type(exc).__name__,
        exc_info=exc,
        extra=extra,
    )


def _as_journal_store(store: Store) -> JournalStore:
    """``store`` as a journaling store (checked by :func:`journals` before use)."""
    return store  # type: ignore[return-value]


def _as_atomic_store(store: Store) -> AtomicStore:
    """``store`` as one that runs atomic handlers (checked at registration)."""
    return store  # type: ignore[return-value]


def _succeeded(handler: Handler, event: Any, journal: bool) -> Callable[[], HandlerOutcome | None]:
    """An atomic handler's call for :meth:`AtomicStore.run_atomic`: run it, then say how it
    went (the outcome the journal records in the same transaction)."""

    def call() -> HandlerOutcome | None:
        handler.func(event)
        return HandlerOutcome(ok=True, at=time.time()) if journal else None

    return call


def _in_background(work: Callable[[], None]) -> None:
    """Run best-effort cleanup without waiting for it (it may block on the store)."""

    def run() -> None:
        try:
            work()
        except Exception as exc:  # the lease will expire on its own
            logger.debug("cleanup after a cancelled delivery failed: %r", exc)

    threading.Thread(target=run, name="flymy-release", daemon=True).start()
