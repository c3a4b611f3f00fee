"""Spans and metrics of real deliveries: in the core and through every adapter, for each
outcome; a replay; a deferred handler run by a worker, linked to its delivery."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.trace import StatusCode

from flymy_receiver import Receiver, RunCompleted
from flymy_receiver.stores import MemoryStore, SQLiteStore
from flymy_receiver.testing import make_event, signed_request
from tests.conftest import require
from tests.telemetry.conftest import Otel

SECRET = "whsec-telemetry"
Post = Callable[[Receiver, bytes, Mapping[str, str]], int]


def _core(receiver: Receiver, body: bytes, headers: Mapping[str, str]) -> int:
    return receiver.handle(body, headers).status


def _flask(receiver: Receiver, body: bytes, headers: Mapping[str, str]) -> int:
    require("flask")
    from flask import Flask

    from flymy_receiver.flask import blueprint

    app = Flask(__name__)
    app.register_blueprint(blueprint(receiver, url="/hook"))
    return app.test_client().post("/hook", data=body, headers=dict(headers)).status_code


def _starlette(receiver: Receiver, body: bytes, headers: Mapping[str, str]) -> int:
    require("starlette")
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from flymy_receiver.starlette import route

    with TestClient(Starlette(routes=[route(receiver, "/hook")])) as client:
        return client.post("/hook", content=body, headers=dict(headers)).status_code


def _django(receiver: Receiver, body: bytes, headers: Mapping[str, str]) -> int:
    require("django")
    from django.test import RequestFactory

    from flymy_receiver.django import view

    extra = {f"HTTP_{k.upper().replace('-', '_')}": v for k, v in headers.items()}
    request = RequestFactory().post("/hook", data=body, content_type="application/json", **extra)
    return int(view(receiver)(request).status_code)


ADAPTERS: dict[str, Post] = {
    "core": _core,
    "flask": _flask,
    "starlette": _starlette,
    "django": _django,
}


def _receiver(calls: list[str], fail: bool = False) -> Receiver:
    receiver = Receiver(secret=SECRET, store=MemoryStore())

    @receiver.on("run.completed", name="leads.save")
    def save(event: RunCompleted) -> None:
        calls.append(event.data.run_id)
        if fail:
            raise RuntimeError("CRM returned 503")

    return receiver


def _span_attrs(otel: Otel) -> list[dict[str, Any]]:
    return [dict(s.attributes or {}) for s in otel.spans("flymy_receiver.delivery")]


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_handled_duplicate_and_refused(otel: Otel, adapter: str) -> None:
    post = ADAPTERS[adapter]
    calls: list[str] = []
    receiver = _receiver(calls)
    req = signed_request(
        make_event("run.completed", run_id="run_t1", agent_id="agent_t"), secret=SECRET
    )
    assert post(receiver, req.body, req.headers) == 200
    assert post(receiver, req.body, req.headers) == 200  # the sender retried
    forged = {**req.headers, "X-FlyMyAI-Signature": "0" * 64}
    assert post(receiver, req.body, forged) == 401
    handled, duplicate, refused = _span_attrs(otel)
    assert handled["flymy.event"] == "run.completed"
    assert handled["flymy.run_id"] == "run_t1"
    assert handled["flymy.agent_id"] == "agent_t"
    assert handled["http.response.status_code"] == 200
    assert handled["http.request.body.size"] == len(req.body)
    assert handled["flymy.duplicate"] is False
    assert duplicate["flymy.duplicate"] is True
    assert refused["flymy.refusal_reason"] == "signature_mismatch"
    assert refused["http.response.status_code"] == 401
    assert [s.attributes["flymy.handler"] for s in otel.spans("flymy_receiver.handler")] == [
        "leads.save"
    ]
    for outcome in ("handled", "duplicate", "refused"):
        assert otel.count("flymy_receiver.deliveries", **{"flymy.outcome": outcome}) == 1
    assert (
        otel.count("flymy_receiver.refusals", **{"flymy.refusal_reason": "signature_mismatch"}) == 1
    )


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_a_failing_handler_and_an_ignored_event(otel: Otel, adapter: str) -> None:
    post = ADAPTERS[adapter]
    receiver = _receiver([], fail=True)
    req = signed_request(make_event("run.completed"), secret=SECRET)
    assert post(receiver, req.body, req.headers) == 500
    ignored = signed_request(make_event("run.failed"), secret=SECRET)  # no handler wants it
    assert post(receiver, ignored.body, ignored.headers) == 200
    (handler,) = otel.spans("flymy_receiver.handler")
    assert handler.status.status_code is StatusCode.ERROR
    (exception,) = handler.events
    assert exception.attributes is not None
    assert exception.attributes["exception.type"] == "RuntimeError"
    failed, _ = otel.spans("flymy_receiver.delivery")
    assert failed.status.status_code is StatusCode.ERROR
    assert handler.parent is not None
    assert handler.parent.span_id == failed.context.span_id
    assert otel.count("flymy_receiver.deliveries", **{"flymy.outcome": "failed"}) == 1
    assert otel.count("flymy_receiver.deliveries", **{"flymy.outcome": "ignored"}) == 1
    points = otel.points("flymy_receiver.handler.duration")
    assert [dict(p.attributes) for p in points] == [
        {"flymy.handler": "leads.save", "flymy.ok": False}
    ]


def test_async_handlers_under_ahandle(otel: Otel) -> None:
    receiver = Receiver(secret=SECRET, store=MemoryStore())
    seen: list[str] = []

    @receiver.on("run.completed", name="async.one")
    async def one(event: RunCompleted) -> None:
        seen.append("one")

    @receiver.on("run.completed", name="sync.two")
    def two(event: RunCompleted) -> None:
        seen.append("two")

    req = signed_request(make_event("run.completed"), secret=SECRET)
    assert asyncio.run(receiver.ahandle(req.body, req.headers)).status == 200
    assert seen == ["one", "two"]
    (delivery,) = otel.spans("flymy_receiver.delivery")
    handlers = otel.spans("flymy_receiver.handler")
    assert [s.attributes["flymy.handler"] for s in handlers] == ["async.one", "sync.two"]
    assert all(
        s.parent is not None and s.parent.span_id == delivery.context.span_id for s in handlers
    )


def test_a_replay_is_a_span_too(otel: Otel) -> None:
    broken = [True]
    receiver = Receiver(secret=SECRET, store=MemoryStore())

    @receiver.on("run.completed", name="leads.save")
    def save(event: RunCompleted) -> None:
        if broken[0]:
            raise RuntimeError("boom")

    req = signed_request(make_event("run.completed", run_id="run_r"), secret=SECRET)
    assert receiver.handle(req.body, req.headers).status == 500
    broken[0] = False
    assert receiver.journal is not None
    assert receiver.journal.replay("run_r").state == "handled"
    (replay,) = otel.spans("flymy_receiver.replay")
    assert replay.attributes is not None
    assert replay.attributes["flymy.run_id"] == "run_r"
    assert replay.attributes["http.response.status_code"] == 200


class _Jobs:
    def __init__(self) -> None:
        self.jobs: list[tuple[str, str, dict[str, str]]] = []

    def bind(self, receiver: Receiver) -> None:
        pass

    def enqueue(self, key: str, handler_id: str, context: Mapping[str, str]) -> None:
        self.jobs.append((key, handler_id, dict(context)))


def test_a_deferred_handler_span_links_to_its_delivery(otel: Otel, tmp_path: Path) -> None:
    queue = _Jobs()
    receiver = Receiver(secret=SECRET, store=SQLiteStore(tmp_path / "d.sqlite3"), queue=queue)

    @receiver.on("run.completed", defer=True, name="leads.enrich")
    def enrich(event: RunCompleted) -> None: ...

    req = signed_request(make_event("run.completed"), secret=SECRET)
    assert receiver.handle(req.body, req.headers).status == 200
    ((key, handler_id, context),) = queue.jobs
    assert "traceparent" in context
    assert receiver.run_deferred(key, handler_id, context=context) == "ok"
    (delivery,) = otel.spans("flymy_receiver.delivery")
    assert delivery.attributes is not None
    assert delivery.attributes["http.response.status_code"] == 200
    assert otel.count("flymy_receiver.deliveries", **{"flymy.outcome": "deferred"}) == 1
    (worker,) = otel.spans("flymy_receiver.handler")
    assert [link.context.trace_id for link in worker.links] == [delivery.context.trace_id]
    (lag,) = otel.points("flymy_receiver.queue.lag")
    assert 0 <= lag.value < 60
