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
import traceback
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol, TypeVar

from .awaiting import Waiters
from .errors import EventInFlight, HandlerFailed, StoreUnavailable, WebhookError
from .events import RunCompleted, RunFailed, UnknownEvent
from .journal import Journal
from .responses import DUPLICATE, RECEIVED, Response, refusal
from .routing import Handler, OutputMismatch, run_coroutine
from .stores.base import AtomicStore, Claim, ClaimState, JournalStore, Store
from .stores.records import HandlerOutcome, NewEntry

__all__ = [
    "AnyEvent",
    "Delivery",
    "Host",
    "Offload",
    "arun",
    "log_refusal",
    "run",
    "run_id_of",
]

logger = logging.getLogger("flymy_receiver")

AnyEvent = RunCompleted[Any] | RunFailed | UnknownEvent


class Host(Protocol):
    """What the plan reads from the receiver that runs it, at each delivery."""

    store: Store
    journal: Journal | None
    waiters: Waiters
    lease: timedelta
    retention: timedelta


@dataclass(slots=True)
class Delivery:
    """An authentic, parsed event on its way to its handlers (or replayed from the journal).

    ``entry`` is what the journal records with the claim (``None`` when the journal is off
    or for a replay); ``skip`` names handlers the journal already saw succeed. ``held`` is
    the token of the claim while this delivery holds it (given back if it is cancelled).
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
    held: str = ""


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
                if isinstance(step, _StoreCall):
                    result = step()
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
    in a worker thread (through ``offload``) so the event loop never stalls."""
    to_thread: Offload = offload or asyncio.to_thread
    store = host.store
    offload_store = getattr(store, "blocking", True)
    if not any(h.is_async for h in delivery.handlers) and (offload_store or delivery.handlers):
        # Only blocking work: the whole plan in one worker-thread hop, not one per store
        # call and handler. A cancelled caller stops waiting; the delivery still ends
        # properly in its thread, so no claim is left behind.
        return await to_thread(functools.partial(run, host, delivery))
    plan = _deliver(host, delivery)
    try:
        step = plan.send(None)
        while True:
            try:
                if isinstance(step, _StoreCall):
                    result = await to_thread(step) if offload_store else step()
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
        # Cancelled (the client went away, a timeout): give the claim back now, so the
        # sender's retry is not refused for a whole lease. It cannot be awaited here.
        if delivery.held:
            key, token = delivery.key, delivery.held
            _in_background(lambda: store.release(key, token))
        raise


# -- the plan ------------------------------------------------------------------------------


def _deliver(host: Host, d: Delivery) -> _Plan:
    """Claim the event, run the handlers that have not succeeded yet, record the result.

    With the journal on, the same store calls carry the entry and each handler's
    outcome. A replay runs this same plan over a stored body. Once the handlers have
    finished (or no handler wanted the event), the run's waiters are told.
    """
    store = host.store
    journal = host.journal is not None
    if not d.handlers and d.entry is not None:
        try:  # nothing can be lost: the answer is 200 whatever the store says
            yield _StoreCall(_as_journal_store(store).journal_ignore, (d.entry,))
        except Exception as exc:
            logger.warning("could not journal ignored event %s: %r", d.key[:200], exc)
        return (yield from _ended(host, d, RECEIVED))
    lease_s = host.lease.total_seconds()
    retention_s = host.retention.total_seconds()
    try:
        if journal:
            claim: Claim = yield _StoreCall(
                store.claim,
                (d.key, lease_s, d.entry),
                {"replay": True, "force": d.force} if d.replay else None,
            )
        else:
            claim = yield _StoreCall(store.claim, (d.key, lease_s))
    except Exception as exc:
        return _store_failed(exc, d, "claim")
    if claim.state is ClaimState.DONE:
        logger.info("duplicate of %s (run %s) acknowledged", d.event.event, d.run_id)
        return (yield from _ended(host, d, DUPLICATE))
    if claim.state is ClaimState.BUSY:
        error = EventInFlight(f"key {d.key!r}")
        log_refusal(error, d.event, level=logging.INFO)
        return refusal(error, retry_after=min(claim.retry_after, 60.0))
    token = d.held = claim.token
    outcomes: dict[str, HandlerOutcome] | None = {} if journal else None
    for handler in d.handlers:
        if handler.id in claim.done_handlers or handler.id in d.skip:
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
            if outcomes is not None:
                outcomes[handler.id] = _failure(exc)
                release_args = (d.key, token, outcomes)
            try:
                yield _StoreCall(store.release, release_args)
            except Exception as release_exc:  # the lease will expire on its own
                logger.warning("could not release the claim on %s: %r", d.key, release_exc)
            d.held = ""
            return (yield from _ended(host, d, refusal(HandlerFailed())))
        outcome = recorded
        if outcome is None and outcomes is not None:
            outcome = HandlerOutcome(ok=True, at=time.time())
        if outcomes is not None and outcome is not None:
            outcomes[handler.id] = outcome
        if len(d.handlers) > 1 and not handler.atomic:
            mark_args: tuple[Any, ...] = (d.key, token, handler.id, retention_s)
            if outcome is not None:
                mark_args = (*mark_args, outcome)
            try:
                yield _StoreCall(store.mark_handler_done, mark_args)
            except Exception as exc:
                return _store_failed(exc, d, "record a handler of")
    complete_args: tuple[Any, ...] = (d.key, token, retention_s)
    if outcomes is not None:
        complete_args = (*complete_args, outcomes)
    try:
        yield _StoreCall(store.complete, complete_args)
    except Exception as exc:
        return _store_failed(exc, d, "record")
    d.held = ""
    return (yield from _ended(host, d, RECEIVED))


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


def log_refusal(error: WebhookError, event: AnyEvent | None, level: int = logging.WARNING) -> None:
    """The one log line of a refused delivery."""
    logger.log(
        level,
        "refused delivery: reason=%s status=%d event=%s run_id=%s%s",
        error.code,
        error.status,
        event.event if event is not None else "-",
        run_id_of(event) or "-",
        f" ({error.detail})" if error.detail else "",
        extra={"flymy_reason": error.code, "flymy_status": error.status},
    )


def _store_failed(exc: Exception, d: Delivery, doing: str) -> Response:
    error = exc if isinstance(exc, StoreUnavailable) else StoreUnavailable(repr(exc))
    logger.error(
        "refused delivery: reason=%s status=%d event=%s run_id=%s (idempotency store failed"
        " to %s it: %s)",
        error.code,
        error.status,
        d.event.event,
        run_id_of(d.event) or "-",
        doing,
        error.detail or type(exc).__name__,
        extra={"flymy_reason": error.code, "flymy_status": error.status},
    )
    return refusal(error, retry_after=5)


def _log_handler_failure(handler: Handler, d: Delivery, exc: Exception) -> None:
    extra: dict[str, Any] = {
        "flymy_event": d.event.event,
        "flymy_run_id": run_id_of(d.event),
        "flymy_handler": handler.id,
        "flymy_reason": HandlerFailed.code,
        "flymy_status": HandlerFailed.status,
    }
    if isinstance(exc, OutputMismatch):
        extra["flymy_output"] = d.raw.get("data", {}).get("output")
        logger.error(
            "refused delivery: reason=handler_failed status=500 event=%s run_id=%s"
            " (handler %s not run: %s)",
            d.event.event,
            run_id_of(d.event) or "-",
            handler.id,
            exc,
            extra=extra,
        )
        return
    logger.error(
        "refused delivery: reason=handler_failed status=500 event=%s run_id=%s (handler %s raised)",
        d.event.event,
        run_id_of(d.event) or "-",
        handler.id,
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


def _failure(exc: BaseException) -> HandlerOutcome:
    """A failed handler's outcome: its error line and traceback, for the journal only."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return HandlerOutcome(
        ok=False,
        error=f"{type(exc).__name__}: {exc}"[:1000],
        traceback=text[-20_000:],
        at=time.time(),
    )


def _in_background(work: Callable[[], None]) -> None:
    """Run best-effort cleanup without waiting for it (it may block on the store)."""

    def run() -> None:
        try:
            work()
        except Exception as exc:  # the lease will expire on its own
            logger.debug("cleanup after a cancelled delivery failed: %r", exc)

    threading.Thread(target=run, name="flymy-release", daemon=True).start()
