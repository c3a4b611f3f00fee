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
import hashlib
import logging
import time
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any

import orjson

from . import events as _events
from .errors import (
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
from .routing import Handler, OutputMismatch, Router, run_coroutine
from .signature import (
    SIGNATURE_HEADER,
    Secrets,
    explain_mismatch,
    match_signature,
    normalize_secrets,
    signature_candidates,
)
from .stores.base import Claim, ClaimState, Store
from .stores.memory import MemoryStore

__all__ = ["DEFAULT_MAX_AGE", "DEFAULT_MAX_BODY_SIZE", "READ_HEADERS", "Receiver", "Response"]

logger = logging.getLogger("flymy_receiver")

#: 5 MiB: ample for agent outputs, small enough that a flood of bodies cannot exhaust memory.
DEFAULT_MAX_BODY_SIZE = 5 * 1024 * 1024
#: The platform signs only the body, so a retry carries the original timestamp: the window
#: must outlast the sender's whole retry schedule. Three days is the longest common schedule.
DEFAULT_MAX_AGE = timedelta(days=3)
DEFAULT_MAX_CLOCK_SKEW = timedelta(minutes=5)
DEFAULT_LEASE = timedelta(minutes=5)

Headers = Mapping[str, str] | Iterable[tuple[str | bytes, str | bytes]]
AnyEvent = RunCompleted[Any] | RunFailed | UnknownEvent

# Read-only: the common responses below share it.
_JSON: Mapping[str, str] = MappingProxyType({"Content-Type": "application/json"})
#: Longer idempotency keys are replaced by a digest of themselves.
_MAX_KEY_LENGTH = 200
#: Every request header the receiver reads. An adapter whose framework looks headers up
#: case-insensitively may pass only these: iterating all of a WSGI environ's headers cost
#: more than verifying a 1 KB body.
READ_HEADERS = (SIGNATURE_HEADER, "Content-Encoding", "Content-Length")


@dataclass(frozen=True, slots=True)
class Response:
    """What to answer the sender: a status, a JSON body and headers."""

    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=lambda: dict(_JSON))

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


_RECEIVED = Response(200, b'{"received":true}', _JSON)
_DUPLICATE = Response(200, b'{"received":true,"duplicate":true}', _JSON)


def _refusal(error: WebhookError, retry_after: float | None = None) -> Response:
    headers = dict(_JSON)
    if isinstance(error, MethodNotAllowed):
        headers["Allow"] = "POST"
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, int(retry_after + 0.999)))
    message = error.public_message
    if error.status == 400 and error.detail:
        message = f"{message}: {error.detail}"  # field names only, never input values
    body = b'{"error":' + orjson.dumps(message) + b"}"
    return Response(error.status, body, headers)


@dataclass(slots=True)
class _Delivery:
    """An authentic, parsed event on its way to its handlers."""

    event: AnyEvent
    raw: Any
    key: str
    handlers: list[Handler]


@dataclass(slots=True)
class _StoreCall:
    """A step of the plan: call the store (may block on I/O)."""

    call: Callable[..., Any]
    args: tuple[Any, ...]


@dataclass(slots=True)
class _HandlerCall:
    """A step of the plan: run one handler with the event it wants."""

    handler: Handler
    event: Any


_Action = _StoreCall | _HandlerCall
_Plan = Generator[_Action, Any, Response]


def _advance(plan: _Plan, result: Any, error: Exception | None = None) -> _Action | Response:
    """Give the plan the outcome of its last step; get its next step, or its answer."""
    try:
        return plan.throw(error) if error is not None else plan.send(result)
    except StopIteration as stop:
        response: Response = stop.value
        return response


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
    replay window (tests); by default the system clock.
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
        self._hint_budget = _Budget(per_second=1.0, burst=10)

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
        plan = self._deliver(delivery)
        step = _advance(plan, None)
        while not isinstance(step, Response):
            try:
                if isinstance(step, _StoreCall):
                    result = step.call(*step.args)
                elif step.handler.is_async:
                    result = run_coroutine(step.handler.func(step.event))
                else:
                    result = step.handler.func(step.event)
            except Exception as exc:  # handed to the plan, which decides
                step = _advance(plan, None, exc)
            else:
                step = _advance(plan, result)
        return step

    async def ahandle(self, body: bytes, headers: Headers = (), method: str = "POST") -> Response:
        """The async twin of :meth:`handle`: awaits async handlers, runs sync handlers and
        blocking store calls in a worker thread so the event loop never stalls."""
        delivery = self._accept(body, headers, method)
        if isinstance(delivery, Response):
            return delivery
        plan = self._deliver(delivery)
        step = _advance(plan, None)
        offload_store = getattr(self.store, "blocking", True)
        while not isinstance(step, Response):
            try:
                if isinstance(step, _StoreCall):
                    call, args = step.call, step.args
                    result = await asyncio.to_thread(call, *args) if offload_store else call(*args)
                elif step.handler.is_async:
                    result = await step.handler.func(step.event)
                else:
                    result = await asyncio.to_thread(step.handler.func, step.event)
            except Exception as exc:  # handed to the plan, which decides
                step = _advance(plan, None, exc)
            else:
                step = _advance(plan, result)
        return step

    def precheck(self, headers: Headers, method: str = "POST") -> Response | None:
        """The answer to give before reading the body, or ``None`` to go on reading.

        Adapters call this first so that a wrong method, an encoding or a ``Content-Length``
        over ``max_body_size`` is refused without reading a byte of the body.
        """
        try:
            self._check_request(headers, method)
        except WebhookError as exc:
            _log_refusal(exc, None)
            return _refusal(exc)
        return None

    def verify(self, body: bytes, headers: Headers) -> int:
        """Check the signature only; return the index of the secret that matched.

        Raises :class:`~flymy_receiver.errors.InvalidSignature`.
        """
        values, _, _ = _read_headers(headers)
        return match_signature(body, signature_candidates(values), self._keys)

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
                match_signature(body, candidates, self._keys)
            except InvalidSignature as exc:
                exc.detail = explain_mismatch(
                    body, self._keys, candidates, signatures, deep=self._hint_budget.take()
                )
                raise
            event, raw = _events.parse_event(body)
            self._check_window(event)
        except WebhookError as exc:
            _log_refusal(exc, event)
            return _refusal(exc)
        handlers = self.handlers_for(event)
        if not handlers:
            logger.debug("no handler for %s (run %s)", event.event, _run_id(event))
            return _RECEIVED
        try:
            key = self._key_for(event, body)
        except Exception as exc:  # a custom idempotency_key is user code: it must not escape
            logger.error(
                "idempotency_key failed for %s (run %s)", event.event, _run_id(event), exc_info=exc
            )
            return _refusal(HandlerFailed(code="idempotency_key_failed"))
        return _Delivery(event, raw, key, handlers)

    def _check_request(self, headers: Headers, method: str) -> list[str | bytes]:
        """Method, encoding and declared length; returns the signature header lines."""
        if method.upper() != "POST":
            raise MethodNotAllowed(f"method {method[:16]!r}")
        signatures, encoding, length = _read_headers(headers)
        if encoding:
            raise UnsupportedEncoding(f"content-encoding {encoding[:32]!r}")
        if length is not None and length > self.max_body_size:
            raise PayloadTooLarge(f"content-length {length}")
        return signatures

    def _deliver(self, d: _Delivery) -> _Plan:
        """Claim the event, run the handlers that have not succeeded yet, record the result."""
        store = self.store
        try:
            claim: Claim = yield _StoreCall(store.claim, (d.key, self._lease_s))
        except Exception as exc:
            return self._store_failed(exc, d, "claim")
        if claim.state is ClaimState.DONE:
            logger.info("duplicate of %s (run %s) acknowledged", d.event.event, _run_id(d.event))
            return _DUPLICATE
        if claim.state is ClaimState.BUSY:
            error = EventInFlight(f"key {d.key!r}")
            _log_refusal(error, d.event, level=logging.INFO)
            return _refusal(error, retry_after=min(claim.retry_after, 60.0))
        for handler in d.handlers:
            if handler.id in claim.done_handlers:
                continue
            try:
                typed = handler.typed_event(d.event, d.raw)
                yield _HandlerCall(handler, typed)
            except Exception as exc:
                self._log_handler_failure(handler, d, exc)
                try:
                    yield _StoreCall(store.release, (d.key, claim.token))
                except Exception as release_exc:  # the lease will expire on its own
                    logger.warning("could not release the claim on %s: %r", d.key, release_exc)
                return _refusal(HandlerFailed())
            if len(d.handlers) > 1:
                try:
                    yield _StoreCall(
                        store.mark_handler_done, (d.key, claim.token, handler.id, self._retention_s)
                    )
                except Exception as exc:
                    return self._store_failed(exc, d, "record a handler of")
        try:
            yield _StoreCall(store.complete, (d.key, claim.token, self._retention_s))
        except Exception as exc:
            return self._store_failed(exc, d, "record")
        return _RECEIVED

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

    def _key_for(self, event: AnyEvent, body: bytes) -> str:
        if self._idempotency_key is not None:
            key = str(self._idempotency_key(event))
        else:
            run_id = _run_id(event)
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
        return _refusal(error, retry_after=5)

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


def _read_headers(headers: Headers) -> tuple[list[str | bytes], str, int | None]:
    """The signature lines, the content encoding (``""`` for identity) and the length."""
    signatures: list[str | bytes] = []
    encoding = ""
    length: int | None = None
    items = headers.items() if isinstance(headers, Mapping) else headers
    for name, value in items:
        kind = _HEADER_KINDS.get(name)
        if kind is None:
            kind = _HEADER_KINDS.get(name.lower())  # bytes: ASCII only, as latin-1 names
            if kind is None:
                continue
        if kind is _SIGNATURE:
            signatures.append(value)
        elif kind is _ENCODING:
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            text = text.strip().lower()
            if text not in ("", "identity"):
                encoding = text
        else:
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            text = text.strip()
            if text.isdigit() and text.isascii():
                length = int(text[:20])
    return signatures, encoding, length


# Header name -> what it is, for str and bytes names alike (ASGI sends lowercase bytes):
# one dict lookup per header instead of decoding and lowering every name.
_SIGNATURE, _ENCODING, _LENGTH = "signature", "encoding", "length"
_HEADER_KINDS: dict[str | bytes, str] = {}
for _name, _kind in (
    (SIGNATURE_HEADER, _SIGNATURE),
    ("Content-Encoding", _ENCODING),
    ("Content-Length", _LENGTH),
):
    for _form in (_name, _name.lower(), _name.title()):
        _HEADER_KINDS[_form] = _HEADER_KINDS[_form.encode("ascii")] = _kind


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


class _Budget:
    """A token bucket: ``take()`` is true at most ``burst`` times at once, then
    ``per_second``. It rations the costly part of bad-signature hints, so that a flood of
    forged requests costs no more than an HMAC each."""

    __slots__ = ("_clock", "_last", "_per_second", "_tokens", "burst")

    def __init__(
        self, per_second: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._per_second, self.burst, self._clock = per_second, burst, clock
        self._tokens, self._last = float(burst), clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self._per_second)
        self._last = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True
