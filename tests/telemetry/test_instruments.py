"""The telemetry module's spans, metrics and gauges, with the OpenTelemetry SDK."""

from __future__ import annotations

import pytest
from opentelemetry.trace import StatusCode

from flymy_receiver import telemetry
from flymy_receiver.journal import Journal
from flymy_receiver.stores import MemoryStore
from flymy_receiver.stores.records import HandlerOutcome, NewEntry
from tests.telemetry.conftest import Otel


def test_a_delivery_span_has_the_designed_attributes(otel: Otel) -> None:
    trace = telemetry.telemetry_for().delivery(1234)
    assert trace is not None
    trace.event("run.completed", "run_1", "agent_a")
    trace.outcome("handled")
    trace.end(200)
    (span,) = otel.spans("flymy_receiver.delivery")
    assert span.attributes is not None
    assert dict(span.attributes) == {
        "http.request.body.size": 1234,
        "flymy.event": "run.completed",
        "flymy.run_id": "run_1",
        "flymy.agent_id": "agent_a",
        "flymy.duplicate": False,
        "http.response.status_code": 200,
    }
    assert otel.count("flymy_receiver.deliveries", **{"flymy.outcome": "handled"}) == 1
    (duration,) = otel.points("flymy_receiver.delivery.duration")
    assert duration.count == 1


def test_a_failing_handler_is_an_error_child_span(otel: Otel) -> None:
    trace = telemetry.telemetry_for().delivery(10)
    assert trace is not None
    with trace.handler("leads.save") as handler:
        handler.failed(RuntimeError("boom"))
    trace.outcome("failed")
    trace.end(500)
    (child,) = otel.spans("flymy_receiver.handler")
    (parent,) = otel.spans("flymy_receiver.delivery")
    assert child.parent is not None
    assert child.parent.span_id == parent.context.span_id
    assert child.status.status_code is StatusCode.ERROR
    assert [e.name for e in child.events] == ["exception"]
    assert parent.status.status_code is StatusCode.ERROR
    points = otel.points("flymy_receiver.handler.duration")
    assert [dict(p.attributes) for p in points] == [
        {"flymy.handler": "leads.save", "flymy.ok": False}
    ]


def test_refusals_count_their_reason(otel: Otel) -> None:
    for _ in range(3):
        trace = telemetry.telemetry_for().delivery(10)
        assert trace is not None
        trace.refused("signature_mismatch")
        trace.end(401)
    assert (
        otel.count("flymy_receiver.refusals", **{"flymy.refusal_reason": "signature_mismatch"}) == 3
    )
    assert otel.count("flymy_receiver.deliveries", **{"flymy.outcome": "refused"}) == 3
    spans = otel.spans("flymy_receiver.delivery")
    assert {s.attributes["flymy.refusal_reason"] for s in spans if s.attributes} == {
        "signature_mismatch"
    }


def test_a_worker_span_links_to_its_delivery(otel: Otel) -> None:
    tele = telemetry.telemetry_for()
    trace = tele.delivery(10)
    assert trace is not None
    context = trace.job_context()
    assert "traceparent" in context
    trace.end(200)
    with tele.worker_span("leads.enrich", "run.completed:run_1", context) as run:
        assert run is not None
    (delivery,) = otel.spans("flymy_receiver.delivery")
    (worker,) = otel.spans("flymy_receiver.handler")
    assert [link.context.span_id for link in worker.links] == [delivery.context.span_id]
    assert worker.attributes is not None
    assert worker.attributes["flymy.deferred"] is True


def test_sender_text_is_cut_on_spans(otel: Otel) -> None:
    trace = telemetry.telemetry_for().delivery(10)
    assert trace is not None
    trace.event("run.completed", "r" * 10_000, "a" * 10_000)
    trace.end(200)
    (span,) = otel.spans()
    assert span.attributes is not None
    assert len(str(span.attributes["flymy.run_id"])) == 200
    assert len(str(span.attributes["flymy.agent_id"])) == 200


def _entry(key: str) -> NewEntry:
    return NewEntry(key, "run.completed", key, "agent", None, b"{}", {}, 3600.0)


def test_journal_gauges_read_the_backlog(otel: Otel) -> None:
    store = MemoryStore()
    journal = Journal(store)
    telemetry.telemetry_for().watch(journal)
    store.claim("k1", 60.0, _entry("k1"))  # pending
    claim = store.claim("k2", 60.0, _entry("k2"))
    store.release("k2", claim.token, {"h": HandlerOutcome(ok=False, error="E: x")})  # failed
    assert otel.count("flymy_receiver.journal.pending") == 1
    assert otel.count("flymy_receiver.journal.failed") == 1
    (age,) = otel.points("flymy_receiver.journal.oldest_pending_age")
    assert 0 <= age.value < 60


def test_a_store_that_is_down_makes_the_gauges_skip(otel: Otel) -> None:
    class Down(MemoryStore):
        def journal_list(self, **filters: object) -> list:  # type: ignore[override,type-arg]
            raise ConnectionError("store down")

    telemetry.telemetry_for().watch(Journal(Down()))
    assert otel.points("flymy_receiver.journal.pending") == []


def test_queue_lag_reports_the_latest_start(otel: Otel) -> None:
    tele = telemetry.telemetry_for()
    tele.queue_lag(2.5)
    (lag,) = otel.points("flymy_receiver.queue.lag")
    assert lag.value == 2.5


def test_nothing_is_made_without_a_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telemetry, "_api", telemetry._Api())
    # The test process never sets a global provider: the API alone makes no span.
    assert telemetry.telemetry_for().delivery(10) is None
