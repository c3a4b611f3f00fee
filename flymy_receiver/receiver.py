"""The sans-I/O receiver: bytes and headers in, a :class:`Response` out.

This module performs no I/O of its own and imports no web framework. The only I/O a delivery
causes is through the idempotency store it is given and the handlers it runs. Adapters read
the raw body, call :meth:`Receiver.handle` or :meth:`Receiver.ahandle`, and translate the
:class:`Response` back; every decision about a status code is made here or in the delivery
plan it hands an authentic event to (:mod:`flymy_receiver.delivery`), once.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any

from . import deferred as _deferred
from . import events as _events
from . import telemetry as _telemetry
from .awaiting import DEFAULT_TIMEOUT, Waiters
from .delivery import AnyEvent, Delivery, Offload, arun, cut, log_refusal, run, run_id_of
from .errors import (
    ConfigurationError,
    HandlerFailed,
    InvalidSignature,
    MethodNotAllowed,
    PayloadTooLarge,
    StaleEvent,
    UnsupportedEncoding,
    WebhookError,
    public_name,
)
from .events import UnknownEvent
from .headers import READ_HEADERS, Headers, read_headers
from .journal import DEFAULT_JOURNAL_RETENTION, Journal, RefusalLog
from .queues import Queue
from .rationing import TokenBucket
from .responses import RECEIVED, Response, refusal
from .routing import Handler, Router
from .signature import (
    SIGNATURE_HEADER,
    Secrets,
    explain_mismatch,
    match_signature,
    normalize_secrets,
    sign,
    signature_candidates,
)
from .stores.base import JournalStore, Store, journals, runs_atomic
from .stores.memory import MemoryStore
from .stores.records import JournalEntry, NewEntry

__all__ = ["DEFAULT_MAX_AGE", "DEFAULT_MAX_BODY_SIZE", "READ_HEADERS", "Receiver", "Response"]

logger = logging.getLogger("flymy_receiver")

#: 5 MiB: ample for agent outputs, small enough that a flood of bodies cannot exhaust memory.
DEFAULT_MAX_BODY_SIZE = 5 * 1024 * 1024
#: The platform signs only the body, so a retry carries the original timestamp: the window
#: must outlast the sender's whole retry schedule. Three days is the longest common schedule.
DEFAULT_MAX_AGE = timedelta(days=3)
DEFAULT_MAX_CLOCK_SKEW = timedelta(minutes=5)
DEFAULT_LEASE = timedelta(minutes=5)

#: Longer idempotency keys are replaced by a digest of themselves.
_MAX_KEY_LENGTH = 200

# Event names already warned about as wanted by no handler, in this process (bounded: the
# names are the sender's text). Once per name and process, so a flood stays quiet.
_UNWANTED_SEEN: set[str] = set()
_UNWANTED_LIMIT = 100
_UNWANTED_LOCK = threading.Lock()


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
    (see :attr:`journal`; ``False`` keeps idempotency records only). ``on_failure`` is
    called with the :class:`~flymy_receiver.journal.JournalEntry` when an entry first ends an
    attempt ``failed`` (not again for retries that fail after it; again once it was handled
    or resolved and fails anew); for alerting. It needs the journal; what it raises is
    logged, never raised into a delivery. ``queue`` is the task queue whose workers run the
    handlers registered with ``defer=True`` (:class:`~flymy_receiver.queues.celery.CeleryQueue`,
    ...); it is bound to this receiver here, so the worker task exists wherever the receiver
    is built.
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
        queue: Queue | None = None,
        on_failure: Callable[[JournalEntry], object] | None = None,
    ) -> None:
        super().__init__()
        self._queue: Queue | None = None
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
        self._journaling = journal
        #: OpenTelemetry spans and metrics (switched off without opentelemetry-api).
        self._telemetry = _telemetry.telemetry_for()
        self._use_store(self.store)
        if on_failure is not None and self.journal is None:
            raise ConfigurationError(
                "on_failure needs the delivery journal (journal=True and a store that keeps"
                f" one); {public_name(self.store)} with journal={journal} keeps none"
            )
        #: Called with an entry that has just become ``failed`` (see the class docstring).
        self.on_failure: Callable[[JournalEntry], object] | None = on_failure
        self.queue = queue

    def _use_store(self, store: Store) -> None:
        """Keep records, the journal and the waiters in ``store`` from now on."""
        self.store = store
        self.journal, self._refusal_log = None, None
        if self._journaling and journals(store):
            journal_store: JournalStore = store  # type: ignore[assignment]  # journals() said so
            self._refusal_log = RefusalLog(journal_store)
            self.journal = Journal(journal_store, self, self._refusal_log)
        #: The calls waiting for runs' webhooks (:meth:`wait_for`, :meth:`results`).
        self.waiters = Waiters(store, self.journal.store if self.journal else None)
        if self.journal is not None:
            self._telemetry.watch(self.journal)

    @property
    def queue(self) -> Queue | None:
        """The task queue of the deferred handlers (``None``: every handler runs inline)."""
        return self._queue

    @queue.setter
    def queue(self, queue: Queue | None) -> None:
        # Given later than the handlers: they are checked again (refused without a queue).
        previous, self._queue = self._queue, queue
        try:
            for handler in self.handlers():
                _deferred.check_deferrable(self, handler)
        except ConfigurationError:
            self._queue = previous
            raise
        if queue is not None and queue is not previous:
            queue.bind(self)  # registers the worker task: `celery -A module worker` finds it

    def with_store(self, store: Store) -> Receiver:
        """This receiver (the same handlers, secrets and settings) journaling in ``store``.

        For tools that look at another store with an app's handlers, such as the inspector
        given ``--app`` and ``--store``. A shallow copy: the handlers are the same objects,
        so their ids, which the journal keys outcomes by, are the same too. Raises
        :class:`ValueError` when ``store`` keeps no journal.
        """
        if not journals(store):
            raise ValueError(f"a {public_name(store)} keeps no delivery journal")
        clone = copy.copy(self)
        clone._journaling = True
        clone._use_store(store)
        return clone

    def sign(self, body: bytes) -> str:
        """The signature header value of ``body`` under this receiver's first (newest)
        secret, for tools that send a stored or test delivery (never the secret itself)."""
        return sign(body, self._keys[0])

    def __repr__(self) -> str:
        return (
            f"Receiver(secrets={len(self._keys)}, store={type(self.store).__name__}, "
            f"max_body_size={self.max_body_size}, max_age={self.max_age})"
        )

    # -- public entry points ------------------------------------------------------------

    def handle(self, body: bytes, headers: Headers = (), method: str = "POST") -> Response:
        """Answer one delivery: verify, parse, dispatch to handlers, say which status."""
        if not self._telemetry.wanted():
            return self._handle(body, headers, method)
        trace = self._telemetry.delivery(_size(body))
        if trace is not None:
            return self._telemetry.observe(trace, lambda: self._handle(body, headers, method))
        return self._handle(body, headers, method)

    def _handle(self, body: bytes, headers: Headers, method: str) -> Response:
        delivery = self._accept(body, headers, method)
        if isinstance(delivery, Response):
            return delivery
        return run(self, delivery)

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
        :class:`~flymy_receiver.delivery.Offload`)."""
        if not self._telemetry.wanted():
            return await self._ahandle(body, headers, method, offload)
        trace = self._telemetry.delivery(_size(body))
        if trace is not None:
            return await self._telemetry.aobserve(
                trace, lambda: self._ahandle(body, headers, method, offload)
            )
        return await self._ahandle(body, headers, method, offload)

    async def _ahandle(
        self, body: bytes, headers: Headers, method: str, offload: Offload | None
    ) -> Response:
        delivery = self._accept(body, headers, method)
        if isinstance(delivery, Response):
            return delivery
        return await arun(self, delivery, offload)

    async def wait_for(
        self,
        run_id: str,
        timeout: float | None = DEFAULT_TIMEOUT,
        *,
        output: type[Any] | None = None,
    ) -> AnyEvent:
        """The event of run ``run_id`` once a delivery of it ended after its handlers ran
        (whether they succeeded or not), at once if the journal has one; raises
        :class:`TimeoutError` after ``timeout`` seconds. ``output=Model`` gives a
        ``run.completed`` event as ``RunCompleted[Model]`` (its output validated; a
        mismatch raises :class:`~flymy_receiver.routing.OutputMismatch`). A process that
        only waits needs no receiver: see :meth:`Waiters.for_store
        <flymy_receiver.awaiting.Waiters.for_store>`.
        """
        return await self.waiters.wait_for(run_id, timeout, output=output)

    def results(
        self,
        run_ids: Iterable[str],
        timeout: float | None = DEFAULT_TIMEOUT,
        *,
        output: type[Any] | None = None,
    ) -> AsyncIterator[AnyEvent]:
        """Each run's event once, in the order they resolve (``async for``); ``timeout`` is
        an overall deadline. The iterator holds its waiter until it is exhausted or closed:
        leave the ``async for`` with ``break`` inside ``contextlib.aclosing(...)`` (or call
        ``aclose()``) to stop waiting at once."""
        return self.waiters.results(run_ids, timeout, output=output)

    def precheck(self, headers: Headers, method: str = "POST") -> Response | None:
        """The answer to give before reading the body, or ``None`` to go on reading.

        Adapters call this first so that a wrong method, an encoding or a ``Content-Length``
        over ``max_body_size`` is refused without reading a byte of the body.
        """
        try:
            self._check_request(headers, method)
        except WebhookError as exc:
            log_refusal(exc, None)
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
                f" transaction with its record (DjangoStore); {public_name(self.store)} cannot"
            )
        _deferred.check_deferrable(self, handler)
        super()._check(handler)

    def run_deferred(
        self,
        key: str,
        handler_id: str,
        *,
        final: _deferred.Final = True,
        context: Mapping[str, str] | None = None,
    ) -> str:
        """Run one deferred handler of a journal entry: the queue's worker task calls this.

        Takes the handler's own lease, runs it on the stored body and records the outcome;
        ``"done"`` when it had succeeded already, ``"busy"`` while another worker runs it. A
        failure is recorded and re-raised (the queue retries); ``final`` says whether this
        run is the last. See :func:`flymy_receiver.deferred.run_deferred`.
        """
        with self._telemetry.worker_span(handler_id, key, context) as span:
            try:
                return _deferred.run_deferred(self, key, handler_id, final=final, context=context)
            except BaseException as exc:
                if span is not None:
                    span.failed(exc)
                raise

    # -- the plan -----------------------------------------------------------------------

    def _accept(self, body: bytes, headers: Headers, method: str) -> Delivery | Response:
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
            log_refusal(exc, event)
            self._note_refusal(exc)
            return refusal(exc)
        handlers = self.handlers_for(event)
        run_id = run_id_of(event)
        trace = _telemetry.current()
        if trace is not None:
            trace.event(event.event, run_id, _agent_id_of(event))
            if not handlers:
                trace.outcome("ignored")
        if not handlers:
            _warn_unwanted(event.event, run_id)
            if self.journal is None:
                return RECEIVED
        try:
            key = self._key_for(event, run_id, body)
        except Exception as exc:  # a custom idempotency_key is user code: it must not escape
            logger.error(
                "idempotency_key failed for %s (run %s)",
                cut(event.event),
                cut(run_id),
                exc_info=exc,
            )
            return refusal(HandlerFailed(code="idempotency_key_failed"))
        entry = None
        if self.journal is not None:
            entry = self._new_entry(event, key, run_id, body, secret_index)
        return Delivery(event, raw, key, run_id, handlers, entry)

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

    def replay_entry(self, entry: JournalEntry, force: bool = False) -> Response:
        """Deliver a journal entry again through the same plan; what
        :meth:`Journal.replay <flymy_receiver.journal.Journal.replay>` runs. The answer is
        :data:`~flymy_receiver.delivery.NO_HANDLER` when no handler was left to run."""
        if entry.body is None:
            raise LookupError(f"the body of {entry.key[:200]!r} is not in the journal")
        event, raw = _events.parse_event(entry.body)  # authenticated when it arrived
        skip = frozenset() if force else frozenset(n for n, o in entry.handlers.items() if o.ok)
        failed = frozenset(n for n, o in entry.handlers.items() if o.state == "failed")
        handlers = self.handlers_for(event)
        delivery = Delivery(
            event, raw, entry.key, run_id_of(event), handlers, replay=True, force=force, skip=skip
        )
        delivery.failed = failed
        trace = self._telemetry.delivery(len(entry.body), replay=True)
        if trace is not None:
            trace.event(entry.event, entry.run_id, entry.agent_id)
            return self._telemetry.observe(trace, lambda: run(self, delivery))
        return run(self, delivery)

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


def _span(delta: timedelta) -> str:
    """``3 days``, ``5 minutes``: a duration as people write it."""
    seconds = int(delta.total_seconds())
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds} seconds"


def _warn_unwanted(event: str, run_id: str | None) -> None:
    """An authentic event no handler wants: a WARNING once per event name and process (a
    typo in a handler's event name, or an agent filter, would otherwise drop events
    quietly); DEBUG after that."""
    name = event[:200]
    with _UNWANTED_LOCK:
        first = name not in _UNWANTED_SEEN and len(_UNWANTED_SEEN) < _UNWANTED_LIMIT
        if first:
            _UNWANTED_SEEN.add(name)
    if first:
        logger.warning(
            "no handler wants %s events (run %s): answered 200 and journaled as ignored;"
            " register one with receiver.on(%r) if this is not meant (logged once per event"
            " name)",
            cut(event),
            cut(run_id),
            cut(event, 60),
        )
    else:
        logger.debug("no handler for %s (run %s)", cut(event), cut(run_id))


def _size(body: Any) -> int:
    """The body's length for the span (0 for what is not bytes: it is refused anyway)."""
    return len(body) if isinstance(body, (bytes, bytearray, memoryview)) else 0


def _agent_id_of(event: AnyEvent) -> str | None:
    if isinstance(event, UnknownEvent):
        agent_id = event.data.get("agent_id")
        return agent_id if isinstance(agent_id, str) else None
    return event.data.agent_id
