"""The sans-I/O receiver: bytes and headers in, a :class:`Response` out.

This module performs no I/O of its own and imports no web framework. The only I/O a delivery
causes is through the idempotency store it is given and the handlers it runs. Adapters read
the raw body, call :meth:`Receiver.handle` or :meth:`Receiver.ahandle`, and translate the
:class:`Response` back; every decision about a status code is made here, once.

A delivery is a plan of steps (a generator of actions) that two small drivers run: one with
plain calls, one that awaits async handlers and moves blocking work off the event loop. The
plan is written once, so both paths answer every case alike.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import threading
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, Protocol, TypeVar

from . import events as _events
from .awaiting import DEFAULT_TIMEOUT, Waiters
from .errors import (
    ConfigurationError,
    EventInFlight,
    HandlerFailed,
    InvalidSignature,
    MethodNotAllowed,
    PayloadTooLarge,
    StaleEvent,
    StoreUnavailable,
    UnsupportedEncoding,
    WebhookError,
)
from .events import RunCompleted, RunFailed, UnknownEvent
from .headers import READ_HEADERS, Headers, read_headers
from .journal import DEFAULT_JOURNAL_RETENTION, Journal, RefusalLog
from .rationing import TokenBucket
from .responses import DUPLICATE, RECEIVED, Response, refusal
from .routing import Handler, OutputMismatch, Router, run_coroutine
from .signature import (
    SIGNATURE_HEADER,
    Secrets,
    explain_mismatch,
    match_signature,
    normalize_secrets,
    signature_candidates,
)
from .stores.base import AtomicStore, Claim, ClaimState, JournalStore, Store, journals, runs_atomic
from .stores.memory import MemoryStore
from .stores.records import HandlerOutcome, JournalEntry, NewEntry

__all__ = [
    "DEFAULT_MAX_AGE",
    "DEFAULT_MAX_BODY_SIZE",
    "READ_HEADERS",
    "Offload",
    "Receiver",
    "Response",
]

logger = logging.getLogger("flymy_receiver")

#: 5 MiB: ample for agent outputs, small enough that a flood of bodies cannot exhaust memory.
DEFAULT_MAX_BODY_SIZE = 5 * 1024 * 1024
#: The platform signs only the body, so a retry carries the original timestamp: the window
#: must outlast the sender's whole retry schedule. Three days is the longest common schedule.
DEFAULT_MAX_AGE = timedelta(days=3)
DEFAULT_MAX_CLOCK_SKEW = timedelta(minutes=5)
DEFAULT_LEASE = timedelta(minutes=5)

AnyEvent = RunCompleted[Any] | RunFailed | UnknownEvent

#: Longer idempotency keys are replaced by a digest of themselves.
_MAX_KEY_LENGTH = 200

_T = TypeVar("_T")


class Offload(Protocol):
    """How :meth:`Receiver.ahandle` runs one blocking call off the event loop: by default
    ``asyncio.to_thread``; an adapter may pass its framework's own (Django's ``aview`` uses
    ``sync_to_async``, so database connections follow Django's request lifecycle)."""

    def __call__(self, func: Callable[[], _T], /) -> Awaitable[_T]: ...


@dataclass(slots=True)
class _Delivery:
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


class Receiver(Router):
    """Verifies, parses and dispatches FlyMy.AI webhook deliveries.

    ``secret`` is one secret or a list (newest first) while rotating; ``None`` reads
    ``FLYMY_WEBHOOK_SECRET``. ``store`` remembers handled events (default: a
    :class:`~flymy_receiver.stores.MemoryStore` for one process). ``max_age`` is the replay
    window on the signed ``timestamp`` (``None`` turns it off); ``max_clock_skew`` how far in
    the future a timestamp may be. ``lease`` is how long a claim lasts if its worker dies: keep
    it longer than your slowest handler. ``retention`` is how long handled events are
    remembered (default: the replay window plus the skew, so a replay is always caught).
    ``idempotency_key`` maps an event to its key (default ``"{event}:{run_id}"``).
    ``max_body_size`` is in bytes. ``clock`` returns the current aware ``datetime`` for the
    replay window (tests); by default the system clock. ``journal`` keeps every authentic
    delivery with its body in the store, for ``journal_retention`` after its last change
    (see :attr:`journal`; ``False`` keeps idempotency records only).
    """

    def __init__(
        self,
        secret: Secrets | None = None,
        *,
        store: Store | None = None,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        max_age: timedelta | None = DEFAULT_MAX_AGE,
        max_clock_skew: timedelta = DEFAULT_MAX_CLOCK_SKEW,
        lease: timedelta = DEFAULT_LEASE,
        retention: timedelta | None = None,
        idempotency_key: Callable[[Any], str] | None = None,
        clock: Callable[[], datetime] | None = None,
        journal: bool = True,
        journal_retention: timedelta = DEFAULT_JOURNAL_RETENTION,
    ) -> None:
        super().__init__()
        self._keys = normalize_secrets(secret)
        if max_body_size < 1:
            raise ValueError("max_body_size must be positive")
        if lease <= timedelta(0):
            raise ValueError("lease must be positive")
        self.store: Store = store if store is not None else MemoryStore.default()
        self.max_body_size = max_body_size
        self.max_age = max_age
        self.max_clock_skew = max_clock_skew
        self.lease = lease
        if retention is None:
            retention = (max_age + max_clock_skew) if max_age is not None else DEFAULT_MAX_AGE
        self.retention = retention
        self._idempotency_key = idempotency_key
        self._clock = clock
        self._max_age_s = max_age.total_seconds() if max_age is not None else 0.0
        self._max_skew_s = max_clock_skew.total_seconds()
        self._lease_s = lease.total_seconds()
        self._retention_s = retention.total_seconds()
        self._hint_budget = TokenBucket(per_second=1.0, burst=10)
        if journal_retention <= timedelta(0):
            raise ValueError("journal_retention must be positive")
        self.journal_retention = journal_retention
        self._journal_retention_s = journal_retention.total_seconds()
        #: The delivery journal (:class:`~flymy_receiver.journal.Journal`), or ``None`` when
        #: ``journal=False`` or the store keeps no journal.
        self.journal: Journal | None = None
        self._refusal_log: RefusalLog | None = None
        # Shared, read-only: the headers an entry records, per secret that matched.
        self._entry_headers = [
            MappingProxyType({SIGNATURE_HEADER: f"valid (secret {i + 1} of {len(self._keys)})"})
            for i in range(len(self._keys))
        ]
        if journal and journals(self.store):
            journal_store = _as_journal_store(self.store)
            self._refusal_log = RefusalLog(journal_store)
            self.journal = Journal(journal_store, self, self._refusal_log)
        #: The calls waiting for runs' webhooks (:meth:`wait_for`, :meth:`results`).
        self.waiters = Waiters(self.store, self.journal.store if self.journal else None)

    def __repr__(self) -> str:
        return (
            f"Receiver(secrets={len(self._keys)}, store={type(self.store).__name__}, "
            f"max_body_size={self.max_body_size}, max_age={self.max_age})"
        )

    # -- public entry points ------------------------------------------------------------

    def handle(self, body: bytes, headers: Headers = (), method: str = "POST") -> Response:
        """Answer one delivery: verify, parse, dispatch to handlers, say which status."""
        delivery = self._accept(body, headers, method)
        if isinstance(delivery, Response):
            return delivery
        return self._run(delivery)

    def _run(self, delivery: _Delivery) -> Response:
        """The plain driver of the plan: every step is a direct call."""
        plan = self._deliver(delivery)
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

    async def ahandle(
        self,
        body: bytes,
        headers: Headers = (),
        method: str = "POST",
        *,
        offload: Offload | None = None,
    ) -> Response:
        """The async twin of :meth:`handle`: awaits async handlers, runs sync handlers and
        blocking store calls in a worker thread so the event loop never stalls.

        ``offload`` runs each blocking call (default ``asyncio.to_thread``; see
        :class:`Offload`)."""
        to_thread: Offload = offload or asyncio.to_thread
        delivery = self._accept(body, headers, method)
        if isinstance(delivery, Response):
            return delivery
        offload_store = getattr(self.store, "blocking", True)
        if not any(h.is_async for h in delivery.handlers) and (offload_store or delivery.handlers):
            # Only blocking work: the whole plan in one worker-thread hop, not one per store
            # call and handler. A cancelled caller stops waiting; the delivery still ends
            # properly in its thread, so no claim is left behind.
            return await to_thread(lambda: self._run(delivery))
        plan = self._deliver(delivery)
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
                store, key, token = self.store, delivery.key, delivery.held
                _in_background(lambda: store.release(key, token))
            raise

    async def wait_for(self, run_id: str, timeout: float | None = DEFAULT_TIMEOUT) -> AnyEvent:
        """The event of run ``run_id`` once a delivery of it ended after its handlers ran
        (whether they succeeded or not), at once if the journal has one; raises
        :class:`TimeoutError` after ``timeout`` seconds. See :mod:`flymy_receiver.awaiting`.
        """
        return await self.waiters.wait_for(run_id, timeout)

    def results(
        self, run_ids: Iterable[str], timeout: float | None = DEFAULT_TIMEOUT
    ) -> AsyncIterator[AnyEvent]:
        """Each run's event once, in the order they resolve (``async for``); ``timeout`` is
        an overall deadline."""
        return self.waiters.results(run_ids, timeout)

    def precheck(self, headers: Headers, method: str = "POST") -> Response | None:
        """The answer to give before reading the body, or ``None`` to go on reading.

        Adapters call this first so that a wrong method, an encoding or a ``Content-Length``
        over ``max_body_size`` is refused without reading a byte of the body.
        """
        try:
            self._check_request(headers, method)
        except WebhookError as exc:
            _log_refusal(exc, None)
            self._note_refusal(exc)
            return refusal(exc)
        return None

    def verify(self, body: bytes, headers: Headers) -> int:
        """Check the signature only; return the index of the secret that matched.

        Raises :class:`~flymy_receiver.errors.InvalidSignature`.
        """
        values, _, _ = read_headers(headers)
        return match_signature(body, signature_candidates(values), self._keys)

    def _check(self, handler: Handler) -> None:
        """Refuse ``atomic=True`` as soon as it is registered here when the store cannot."""
        if handler.atomic and not runs_atomic(self.store):
            raise ConfigurationError(
                f"handler {handler.id}: atomic=True needs a store that runs a handler in one"
                f" transaction with its record (DjangoStore); {type(self.store).__name__} cannot"
            )
        super()._check(handler)

    # -- the plan -----------------------------------------------------------------------

    def _accept(self, body: bytes, headers: Headers, method: str) -> _Delivery | Response:
        """Every check that needs no store: method, encoding, size, signature, envelope."""
        event: AnyEvent | None = None
        try:
            signatures = self._check_request(headers, method)
            if len(body) > self.max_body_size:
                raise PayloadTooLarge(f"{len(body)} bytes")
            candidates = signature_candidates(signatures)
            try:
                secret_index = match_signature(body, candidates, self._keys)
            except InvalidSignature as exc:
                exc.detail = explain_mismatch(
                    body, self._keys, candidates, signatures, deep=self._hint_budget.take()
                )
                raise
            event, raw = _events.parse_event(body)
            self._check_window(event)
        except WebhookError as exc:
            _log_refusal(exc, event)
            self._note_refusal(exc)
            return refusal(exc)
        handlers = self.handlers_for(event)
        run_id = _run_id(event)
        if not handlers:
            logger.debug("no handler for %s (run %s)", event.event, run_id)
            if self.journal is None:
                return RECEIVED
        try:
            key = self._key_for(event, run_id, body)
        except Exception as exc:  # a custom idempotency_key is user code: it must not escape
            logger.error(
                "idempotency_key failed for %s (run %s)", event.event, run_id, exc_info=exc
            )
            return refusal(HandlerFailed(code="idempotency_key_failed"))
        entry = None
        if self.journal is not None:
            entry = self._new_entry(event, key, run_id, body, secret_index)
        return _Delivery(event, raw, key, run_id, handlers, entry)

    def _new_entry(
        self, event: AnyEvent, key: str, run_id: str | None, body: bytes, secret_index: int
    ) -> NewEntry:
        if isinstance(event, UnknownEvent):
            agent_id, agent_name = event.data.get("agent_id"), event.data.get("agent_name")
            agent_id = agent_id if isinstance(agent_id, str) else None
            agent_name = agent_name if isinstance(agent_name, str) else None
        else:
            agent_id, agent_name = event.data.agent_id, event.data.agent_name
        # The body itself, not a copy. Of the headers, what the receiver read: the signature
        # is never kept (it is the expected one).
        headers = self._entry_headers[secret_index]
        retention = self._journal_retention_s
        return NewEntry(key, event.event, run_id, agent_id, agent_name, body, headers, retention)

    def _note_refusal(self, error: WebhookError) -> None:
        if self._refusal_log is not None:
            self._refusal_log.note(error.status, error.code, error.detail)

    def _replay(self, entry: JournalEntry, force: bool) -> Response:
        """Deliver a journal entry again through the same plan (see Journal.replay)."""
        event, raw = _events.parse_event(entry.body)  # authenticated when it arrived
        skip = frozenset() if force else frozenset(n for n, o in entry.handlers.items() if o.ok)
        handlers = self.handlers_for(event)
        delivery = _Delivery(
            event, raw, entry.key, _run_id(event), handlers, replay=True, force=force, skip=skip
        )
        return self._run(delivery)

    def _check_request(self, headers: Headers, method: str) -> list[Any]:
        """Method, encoding and declared length; returns the signature header lines."""
        if not isinstance(method, str) or (method != "POST" and method.upper() != "POST"):
            shown = method[:16] if isinstance(method, str) else type(method).__name__
            raise MethodNotAllowed(f"method {shown!r}")
        signatures, encoding, length = read_headers(headers)
        if encoding:
            raise UnsupportedEncoding(f"content-encoding {encoding[:32]!r}")
        if length is not None and length > self.max_body_size:
            raise PayloadTooLarge(f"content-length {length}")
        return signatures

    def _deliver(self, d: _Delivery) -> _Plan:
        """Claim the event, run the handlers that have not succeeded yet, record the result.

        With the journal on, the same store calls carry the entry and each handler's
        outcome. A replay runs this same plan over a stored body. Once the handlers have
        finished (or no handler wanted the event), the run's waiters are told.
        """
        store = self.store
        journal = self.journal is not None
        if not d.handlers and d.entry is not None:
            try:  # nothing can be lost: the answer is 200 whatever the store says
                yield _StoreCall(_as_journal_store(store).journal_ignore, (d.entry,))
            except Exception as exc:
                logger.warning("could not journal ignored event %s: %r", d.key[:200], exc)
            return (yield from self._ended(d, RECEIVED))
        try:
            if journal:
                claim: Claim = yield _StoreCall(
                    store.claim,
                    (d.key, self._lease_s, d.entry),
                    {"replay": True, "force": d.force} if d.replay else None,
                )
            else:
                claim = yield _StoreCall(store.claim, (d.key, self._lease_s))
        except Exception as exc:
            return self._store_failed(exc, d, "claim")
        if claim.state is ClaimState.DONE:
            logger.info("duplicate of %s (run %s) acknowledged", d.event.event, d.run_id)
            return (yield from self._ended(d, DUPLICATE))
        if claim.state is ClaimState.BUSY:
            error = EventInFlight(f"key {d.key!r}")
            _log_refusal(error, d.event, level=logging.INFO)
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
                    atomic_args = (d.key, token, handler.id, self._retention_s)
                    call = _succeeded(handler, typed, journal)
                    recorded = yield _StoreCall(
                        _as_atomic_store(store).run_atomic, (*atomic_args, call)
                    )
                else:
                    yield _HandlerCall(handler, typed)
            except Exception as exc:
                self._log_handler_failure(handler, d, exc)
                release_args: tuple[Any, ...] = (d.key, token)
                if outcomes is not None:
                    outcomes[handler.id] = _failure(exc)
                    release_args = (d.key, token, outcomes)
                try:
                    yield _StoreCall(store.release, release_args)
                except Exception as release_exc:  # the lease will expire on its own
                    logger.warning("could not release the claim on %s: %r", d.key, release_exc)
                d.held = ""
                return (yield from self._ended(d, refusal(HandlerFailed())))
            outcome = recorded
            if outcome is None and outcomes is not None:
                outcome = HandlerOutcome(ok=True, at=time.time())
            if outcomes is not None and outcome is not None:
                outcomes[handler.id] = outcome
            if len(d.handlers) > 1 and not handler.atomic:
                mark_args: tuple[Any, ...] = (d.key, token, handler.id, self._retention_s)
                if outcome is not None:
                    mark_args = (*mark_args, outcome)
                try:
                    yield _StoreCall(store.mark_handler_done, mark_args)
                except Exception as exc:
                    return self._store_failed(exc, d, "record a handler of")
        complete_args: tuple[Any, ...] = (d.key, token, self._retention_s)
        if outcomes is not None:
            complete_args = (*complete_args, outcomes)
        try:
            yield _StoreCall(store.complete, complete_args)
        except Exception as exc:
            return self._store_failed(exc, d, "record")
        d.held = ""
        return (yield from self._ended(d, RECEIVED))

    def _ended(self, d: _Delivery, response: Response) -> _Plan:
        """The handlers have finished (or no handler wanted the event): tell the run's
        waiters, then answer ``response``."""
        announce = self.waiters.delivered(d.run_id, d.event)
        if announce is not None:  # other processes are told like a store call
            yield _StoreCall(announce, ())
        return response

    # -- pieces ---------------------------------------------------------------------------

    def _check_window(self, event: AnyEvent) -> None:
        if self.max_age is None:
            return
        # Seconds as floats: a third of the cost of datetime arithmetic on every delivery.
        now = time.time() if self._clock is None else self._clock().timestamp()
        age = now - event.timestamp.timestamp()
        if age > self._max_age_s:
            raise StaleEvent(f"timestamp older than {_span(self.max_age)}", code="too_old")
        if -age > self._max_skew_s:
            raise StaleEvent(
                f"timestamp more than {_span(self.max_clock_skew)} in the future",
                code="from_the_future",
            )

    def _key_for(self, event: AnyEvent, run_id: str | None, body: bytes) -> str:
        if self._idempotency_key is not None:
            key = str(self._idempotency_key(event))
        else:
            if run_id is None:  # an unknown event without a run id: its exact bytes identify it
                return f"{event.event[:64]}:sha256:{hashlib.sha256(body).hexdigest()}"
            key = f"{event.event}:{run_id}"
        if len(key) > _MAX_KEY_LENGTH:
            # The sender chooses run ids: keep store keys and log lines small whatever it sends.
            digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
            key = f"{event.event[:64]}:sha256:{digest}"
        return key

    def _store_failed(self, exc: Exception, d: _Delivery, doing: str) -> Response:
        error = exc if isinstance(exc, StoreUnavailable) else StoreUnavailable(repr(exc))
        logger.error(
            "refused delivery: reason=%s status=%d event=%s run_id=%s (idempotency store failed"
            " to %s it: %s)",
            error.code,
            error.status,
            d.event.event,
            _run_id(d.event) or "-",
            doing,
            error.detail or type(exc).__name__,
            extra={"flymy_reason": error.code, "flymy_status": error.status},
        )
        return refusal(error, retry_after=5)

    def _log_handler_failure(self, handler: Handler, d: _Delivery, exc: Exception) -> None:
        extra: dict[str, Any] = {
            "flymy_event": d.event.event,
            "flymy_run_id": _run_id(d.event),
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
                _run_id(d.event) or "-",
                handler.id,
                exc,
                extra=extra,
            )
            return
        logger.error(
            "refused delivery: reason=handler_failed status=500 event=%s run_id=%s"
            " (handler %s raised)",
            d.event.event,
            _run_id(d.event) or "-",
            handler.id,
            exc_info=exc,
            extra=extra,
        )


def _span(delta: timedelta) -> str:
    """``3 days``, ``5 minutes``: a duration as people write it."""
    seconds = int(delta.total_seconds())
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds} seconds"


def _run_id(event: AnyEvent | None) -> str | None:
    if event is None:
        return None
    if isinstance(event, UnknownEvent):
        return event.run_id
    return event.data.run_id


def _log_refusal(error: WebhookError, event: AnyEvent | None, level: int = logging.WARNING) -> None:
    logger.log(
        level,
        "refused delivery: reason=%s status=%d event=%s run_id=%s%s",
        error.code,
        error.status,
        event.event if event is not None else "-",
        _run_id(event) or "-",
        f" ({error.detail})" if error.detail else "",
        extra={"flymy_reason": error.code, "flymy_status": error.status},
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
