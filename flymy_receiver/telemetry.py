"""OpenTelemetry traces and metrics for deliveries and handlers (DESIGN section 11).

This is the only module that imports OpenTelemetry, and only when ``opentelemetry-api`` is
installed: without it :func:`telemetry_for` returns a switched-off :class:`Telemetry` and
nothing is imported. With the API but no SDK configured, a delivery pays one check of two
module globals; spans and metrics are made only once an application has set a tracer or a
meter provider (``opentelemetry-sdk``, or any distribution's auto-instrumentation).

What a delivery records:

- a span ``flymy_receiver.delivery`` (attributes ``flymy.event``, ``flymy.run_id``,
  ``flymy.agent_id``, ``http.response.status_code``, ``flymy.refusal_reason`` when refused,
  ``flymy.duplicate``, ``http.request.body.size``) with a child ``flymy_receiver.handler``
  per handler (``flymy.handler``; a failure is recorded on it with an error status);
- a deferred handler's span on a worker links to its delivery's span: the trace context
  travels with the job (:meth:`DeliveryTrace.job_context`, :meth:`Telemetry.worker_span`);
- counters ``flymy_receiver.deliveries`` (``flymy.event``, ``flymy.outcome``) and
  ``flymy_receiver.refusals`` (``flymy.refusal_reason``), histograms
  ``flymy_receiver.delivery.duration`` and ``flymy_receiver.handler.duration`` (seconds;
  ``flymy.handler``, ``flymy.ok``), and observable gauges of the journal
  (``flymy_receiver.journal.pending``, ``flymy_receiver.journal.failed``,
  ``flymy_receiver.journal.oldest_pending_age``) and of the deferred handlers' queue
  (``flymy_receiver.queue.lag``).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from .errors import public_name

if TYPE_CHECKING:
    from .journal import Journal
    from .responses import Response

__all__ = ["OUTCOMES", "DeliveryTrace", "Telemetry", "current", "telemetry_for"]

logger = logging.getLogger("flymy_receiver")

#: The values of ``flymy.outcome`` on ``flymy_receiver.deliveries``.
OUTCOMES = ("handled", "duplicate", "failed", "ignored", "refused", "deferred")

#: How many entries a journal gauge reads at most per collection (summaries, no bodies).
GAUGE_SCAN_LIMIT = 1000

_INSTRUMENTATION = "flymy_receiver"

#: The delivery being traced in this context (copied into worker threads with it).
_CURRENT: contextvars.ContextVar[DeliveryTrace | None] = contextvars.ContextVar(
    "flymy_receiver_delivery_trace", default=None
)
#: Where the job context says when the job was sent, for the queue lag.
ENQUEUED_AT = "flymy-enqueued-at"


#: The delivery traced in this context, if any (the plan's hooks read it): the context
#: variable's own ``get``, called with no Python frame of ours on every delivery.
current: Callable[[], DeliveryTrace | None] = _CURRENT.get


class Telemetry:
    """A receiver's telemetry: switched off, or spans and metrics through OpenTelemetry.

    :meth:`delivery` gives a :class:`DeliveryTrace` while a provider is configured, else
    ``None`` (the receiver then does nothing more for telemetry on that delivery).
    """

    def __init__(self, api: _Api | None) -> None:
        self._api = api

    def wanted(self) -> bool:
        """Whether a delivery should be traced now: the API is installed and an application
        configured a provider (checked on every delivery: one may be set at any time)."""
        api = self._api
        return api is not None and api.configured()

    @property
    def available(self) -> bool:
        """Whether ``opentelemetry-api`` is installed (spans may be made)."""
        return self._api is not None

    def delivery(self, body_size: int, replay: bool = False) -> DeliveryTrace | None:
        """Start a delivery's span (``flymy_receiver.replay`` for a replay), or ``None``
        when nothing is configured to receive it."""
        api = self._api
        if api is None or not api.configured():
            return None
        if replay:
            return DeliveryTrace(api, body_size, "flymy_receiver.replay")
        return DeliveryTrace(api, body_size)

    def observe(self, trace: DeliveryTrace, call: Callable[[], Response]) -> Response:
        """Run ``call`` (a delivery) as ``trace``'s span, then end it with the answer."""
        token = _CURRENT.set(trace)
        try:
            response = call()
        except BaseException:
            trace.end(500)
            raise
        finally:
            _CURRENT.reset(token)
        trace.end(response.status, response)
        return response

    async def aobserve(
        self, trace: DeliveryTrace, call: Callable[[], Awaitable[Response]]
    ) -> Response:
        """The async twin of :meth:`observe`."""
        token = _CURRENT.set(trace)
        try:
            response = await call()
        except BaseException:
            trace.end(499)  # cancelled or failed: no answer was given
            raise
        finally:
            _CURRENT.reset(token)
        trace.end(response.status, response)
        return response

    def watch(self, journal: Journal) -> None:
        """Report ``journal``'s backlog through the observable gauges."""
        if self._api is not None:
            self._api.watch(journal)

    def queue_lag(self, seconds: float) -> None:
        """A deferred handler started ``seconds`` after its job was enqueued."""
        if self._api is not None:
            self._api.last_lag = max(0.0, seconds)

    @contextlib.contextmanager
    def worker_span(
        self, handler_id: str, key: str, context: Mapping[str, str] | None
    ) -> Iterator[HandlerTrace | None]:
        """A deferred handler's run on a worker: a ``flymy_receiver.handler`` span linked to
        the delivery's span carried in ``context`` (``None`` when nothing is configured)."""
        api = self._api
        if api is None or not api.configured():
            yield None
            return
        links = []
        if context and ENQUEUED_AT in context:
            with contextlib.suppress(ValueError):
                api.last_lag = max(0.0, time.time() - float(context[ENQUEUED_AT]))
        if context:
            carried = api.trace.get_current_span(api.propagate.extract(dict(context)))
            span_context = carried.get_span_context()
            if span_context.is_valid:
                links.append(api.trace.Link(span_context))
        span = api.tracer.start_span(
            "flymy_receiver.handler",
            kind=api.trace.SpanKind.CONSUMER,
            links=links,
            attributes={
                "flymy.handler": handler_id,
                "flymy.key": key[:200],
                "flymy.deferred": True,
            },
        )
        with api.trace.use_span(span, end_on_exit=False):
            record = HandlerTrace(api, span, handler_id)
            try:
                yield record
            finally:
                record.end()


class DeliveryTrace:
    """One delivery's span and measurements; the receiver tells it what happened."""

    __slots__ = ("_api", "_event", "_outcome", "_span", "_start")

    def __init__(self, api: _Api, body_size: int, name: str = "flymy_receiver.delivery") -> None:
        self._api = api
        self._start = time.perf_counter()
        self._event = "-"
        self._outcome = ""
        self._span = api.tracer.start_span(
            name,
            kind=api.trace.SpanKind.SERVER,
            attributes={"http.request.body.size": body_size},
        )

    def event(self, name: str, run_id: str | None, agent_id: str | None) -> None:
        """The authentic event being delivered (sender text is cut)."""
        self._event = name[:64]
        attributes: dict[str, Any] = {"flymy.event": self._event}
        if run_id is not None:
            attributes["flymy.run_id"] = run_id[:200]
        if agent_id is not None:
            attributes["flymy.agent_id"] = agent_id[:200]
        self._span.set_attributes(attributes)

    def refused(self, reason: str) -> None:
        if self._outcome == "refused":  # one reason per delivery: the first
            return
        self._outcome = "refused"
        self._span.set_attribute("flymy.refusal_reason", reason)
        self._api.refusals.add(1, {"flymy.refusal_reason": reason})

    def outcome(self, outcome: str) -> None:
        """``handled``, ``duplicate``, ``failed``, ``ignored``, ``deferred`` (or ``refused``);
        by default it is read from the answer."""
        self._outcome = outcome

    @contextlib.contextmanager
    def handler(self, handler_id: str) -> Iterator[HandlerTrace]:
        """A handler's child span, current while it runs (so its own calls nest under it)."""
        api = self._api
        span = api.tracer.start_span(
            "flymy_receiver.handler",
            context=api.trace.set_span_in_context(self._span),
            attributes={"flymy.handler": handler_id},
        )
        with api.trace.use_span(span, end_on_exit=False):
            record = HandlerTrace(api, span, handler_id)
            try:
                yield record
            finally:
                record.end()

    def job_context(self) -> dict[str, str]:
        """The trace context for a deferred handler's job (W3C ``traceparent``) and when
        it was sent (for the queue lag)."""
        carrier: dict[str, str] = {ENQUEUED_AT: f"{time.time():.6f}"}
        self._api.propagate.inject(carrier, context=self._api.trace.set_span_in_context(self._span))
        return carrier

    def end(self, status: int, response: Response | None = None) -> None:
        api = self._api
        span = self._span
        if not self._outcome:
            self._outcome = _outcome_of(status, response)
        span.set_attribute("flymy.duplicate", self._outcome == "duplicate")
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(api.trace.Status(api.trace.StatusCode.ERROR))
        span.end()
        attributes = {"flymy.event": self._event, "flymy.outcome": self._outcome}
        api.deliveries.add(1, attributes)
        api.delivery_duration.record(time.perf_counter() - self._start, attributes)


def _outcome_of(status: int, response: Response | None) -> str:
    if status == 500:
        return "failed"
    if not 200 <= status < 300:
        return "refused"
    body = response.body if response is not None else b""
    if b'"duplicate"' in body:
        return "duplicate"
    if b'"deferred"' in body:
        return "deferred"
    return "handled"


def traced_call(trace: DeliveryTrace, handler_id: str, call: Callable[[], Any]) -> Any:
    """Run one handler inside its span (a failure recorded on it, then re-raised)."""
    with trace.handler(handler_id) as record:
        try:
            return call()
        except BaseException as exc:
            record.failed(exc)
            raise


async def atraced_call(
    trace: DeliveryTrace, handler_id: str, call: Callable[[], Awaitable[Any]]
) -> Any:
    """The async twin of :func:`traced_call`."""
    with trace.handler(handler_id) as record:
        try:
            return await call()
        except BaseException as exc:
            record.failed(exc)
            raise


class HandlerTrace:
    """One handler run's span; :meth:`failed` records the exception on it."""

    __slots__ = ("_api", "_handler", "_ok", "_span", "_start")

    def __init__(self, api: _Api, span: Any, handler_id: str) -> None:
        self._api = api
        self._span = span
        self._handler = handler_id
        self._ok = True
        self._start = time.perf_counter()

    def failed(self, exc: BaseException) -> None:
        self._ok = False
        self._span.record_exception(exc)
        self._span.set_status(
            self._api.trace.Status(self._api.trace.StatusCode.ERROR, type(exc).__name__)
        )

    def end(self) -> None:
        self._span.end()
        self._api.handler_duration.record(
            time.perf_counter() - self._start,
            {"flymy.handler": self._handler, "flymy.ok": self._ok},
        )


class _Api:
    """The OpenTelemetry API, imported once, with this library's instruments."""

    def __init__(self, tracer_provider: Any = None, meter_provider: Any = None) -> None:
        """The global providers by default; explicit ones (tests) count as configured."""
        from opentelemetry import metrics, propagate, trace

        self.trace = trace
        self.metrics = metrics
        self.propagate = propagate
        self._trace_module = trace
        metrics_internal: Any
        try:
            from opentelemetry.metrics import _internal as metrics_internal
        except ImportError:  # pragma: no cover - a future API without the module
            metrics_internal = None
        self._metrics_internal = metrics_internal
        from . import __version__

        self._explicit = tracer_provider is not None or meter_provider is not None
        self.tracer = trace.get_tracer(_INSTRUMENTATION, __version__, tracer_provider)
        meter = metrics.get_meter(_INSTRUMENTATION, __version__, meter_provider)
        self.deliveries = meter.create_counter(
            "flymy_receiver.deliveries", unit="{delivery}", description="Deliveries, by outcome"
        )
        self.refusals = meter.create_counter(
            "flymy_receiver.refusals", unit="{delivery}", description="Refused deliveries"
        )
        self.delivery_duration = _seconds_histogram(
            meter, "flymy_receiver.delivery.duration", "Time to answer a delivery"
        )
        self.handler_duration = _seconds_histogram(
            meter, "flymy_receiver.handler.duration", "Time a handler ran"
        )
        self.last_lag: float | None = None
        self._journals: weakref.WeakSet[Journal] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._backlog: tuple[float, dict[int, tuple[int, int, float]]] = (0.0, {})
        meter.create_observable_gauge(
            "flymy_receiver.journal.pending",
            [self._observe("pending")],
            unit="{entry}",
            description="Journal entries pending (handlers running or queued)",
        )
        meter.create_observable_gauge(
            "flymy_receiver.journal.failed",
            [self._observe("failed")],
            unit="{entry}",
            description="Journal entries failed or stalled (need an operator)",
        )
        meter.create_observable_gauge(
            "flymy_receiver.journal.oldest_pending_age",
            [self._observe("age")],
            unit="s",
            description="Age of the oldest pending journal entry",
        )
        meter.create_observable_gauge(
            "flymy_receiver.queue.lag",
            [self._observe_lag],
            unit="s",
            description="Seconds between a deferred handler's enqueue and its start (latest)",
        )

    def configured(self) -> bool:
        """Whether an application set a tracer or meter provider (two global reads)."""
        if self._explicit or self._trace_module._TRACER_PROVIDER is not None:
            return True
        internal = self._metrics_internal
        return internal is not None and internal._METER_PROVIDER is not None

    def watch(self, journal: Journal) -> None:
        self._journals.add(journal)

    def _observe_lag(self, options: Any) -> list[Any]:
        if self.last_lag is None:
            return []
        return [self.metrics.Observation(self.last_lag)]

    def _observe(self, what: str) -> Callable[[Any], list[Any]]:
        index = {"pending": 0, "failed": 1, "age": 2}[what]

        def callback(options: Any) -> list[Any]:
            observations = []
            for journal, counts in self._read_backlog():
                attributes = {"flymy.store": public_name(journal.store)}
                observations.append(self.metrics.Observation(counts[index], attributes))
            return observations

        return callback

    def _read_backlog(self) -> list[tuple[Journal, tuple[int, int, float]]]:
        """Each watched journal's (pending, failed, oldest pending age), read at most once
        per collection: the three gauges of one collection share one read."""
        now = time.monotonic()
        with self._lock:
            read_at, cached = self._backlog
            journals = list(self._journals)
            if now - read_at > 1.0:
                cached = {}
                for journal in journals:
                    counts = _backlog_of(journal)
                    if counts is not None:
                        cached[id(journal)] = counts
                self._backlog = (now, cached)
        return [(j, cached[id(j)]) for j in journals if id(j) in cached]


#: Seconds, as the HTTP semantic conventions bucket durations (the SDK's default buckets
#: are for milliseconds).
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


def _seconds_histogram(meter: Any, name: str, description: str) -> Any:
    try:
        return meter.create_histogram(
            name, unit="s", description=description, explicit_bucket_boundaries_advisory=_BUCKETS
        )
    except TypeError:  # an API older than 1.23 takes no advisory
        return meter.create_histogram(name, unit="s", description=description)


def _backlog_of(journal: Journal) -> tuple[int, int, float] | None:
    """(pending, failed, oldest pending age in seconds) from summaries; ``None`` when the
    store cannot answer (a gauge then skips: never raises into a collection)."""
    try:
        pending = journal.list(state="pending", limit=GAUGE_SCAN_LIMIT)
        pending += journal.list(state="queued", limit=GAUGE_SCAN_LIMIT)
        failed = journal.list(state="failed", limit=GAUGE_SCAN_LIMIT)
    except Exception as exc:  # a store that is down: skip this collection
        logger.debug("journal gauges skipped: %r", exc)
        return None
    oldest = min((entry.received_at.timestamp() for entry in pending), default=None)
    age = max(0.0, time.time() - oldest) if oldest is not None else 0.0
    return len(pending), len(failed), age


_api: _Api | None = None
_missing = False
_api_lock = threading.Lock()


def telemetry_for() -> Telemetry:
    """The telemetry of a new receiver: on when ``opentelemetry-api`` is installed."""
    global _api, _missing
    if _api is None:
        if _missing:
            return Telemetry(None)
        with _api_lock:
            if _api is None:
                try:
                    _api = _Api()
                except ImportError:  # opentelemetry-api is not installed: stay off
                    _missing = True
                    return Telemetry(None)
    return Telemetry(_api)
