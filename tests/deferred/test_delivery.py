"""Deferred handlers in the delivery plan and the worker entry point, in one process.

The queue here is a recording one (the Celery queue and real workers are in
``test_celery_workers.py``); the store is a real SQLite file.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from flymy_receiver import Receiver
from flymy_receiver.deferred import Job
from flymy_receiver.errors import ConfigurationError
from flymy_receiver.routing import Router
from flymy_receiver.stores import MemoryStore, SQLiteStore
from flymy_receiver.testing import make_event, signed_request

SECRET = "whsec-deferred-plan"


class RecordingQueue:
    """Keeps the jobs it is given; ``refuse`` makes it raise like an unreachable broker."""

    broker_url = "redis://:hunter2-secret@broker.internal:6379/0"

    def __init__(self) -> None:
        self.jobs: list[tuple[str, str, dict[str, str]]] = []
        self.bound: Receiver | None = None
        self.refuse = False

    def bind(self, receiver: Receiver) -> None:
        self.bound = receiver

    def enqueue(self, key: str, handler_id: str, context: Mapping[str, str]) -> None:
        if self.refuse:
            raise ConnectionError(f"Error 111 connecting to {self.broker_url}: refused")
        self.jobs.append((key, handler_id, dict(context)))


def build(tmp_path: Path, **kwargs: Any) -> tuple[Receiver, RecordingQueue, list[str]]:
    queue = RecordingQueue()
    store = SQLiteStore(tmp_path / "journal.sqlite3")
    kwargs.setdefault("lease", timedelta(seconds=30))
    receiver = Receiver(SECRET, store=store, queue=queue, **kwargs)
    ran: list[str] = []

    @receiver.on("run.completed", name="inline")
    def inline(event: Any) -> None:
        ran.append("inline")

    @receiver.on("run.completed", name="later", defer=True)
    def later(event: Any) -> None:
        ran.append("later")

    @receiver.on("run.completed", name="later-async", defer=True)
    async def later_async(event: Any) -> None:
        ran.append("later-async")

    return receiver, queue, ran


def deliver(receiver: Receiver, event: Any) -> tuple[int, Any]:
    request = signed_request(event, SECRET)
    response = receiver.handle(request.body, request.headers)
    return response.status, orjson.loads(response.body)


# -- registration ------------------------------------------------------------------------


def test_bind_is_called_with_the_receiver(tmp_path: Path) -> None:
    receiver, queue, _ = build(tmp_path)
    assert queue.bound is receiver


def test_defer_without_a_queue_is_refused(tmp_path: Path) -> None:
    receiver = Receiver(SECRET, store=SQLiteStore(tmp_path / "j.sqlite3"))
    with pytest.raises(ConfigurationError, match="queue"):
        receiver.on("run.completed", defer=True)(lambda event: None)


def test_defer_with_the_memory_store_is_refused() -> None:
    receiver = Receiver(SECRET, store=MemoryStore(), queue=RecordingQueue())
    with pytest.raises(ConfigurationError, match="memory store"):
        receiver.on("run.completed", defer=True)(lambda event: None)


def test_defer_without_the_journal_is_refused(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "j.sqlite3")
    receiver = Receiver(SECRET, store=store, queue=RecordingQueue(), journal=False)
    with pytest.raises(ConfigurationError, match="journal"):
        receiver.on("run.completed", defer=True)(lambda event: None)


def test_a_router_with_deferred_handlers_is_refused_where_it_cannot_run(tmp_path: Path) -> None:
    router = Router()
    router.on("run.completed", name="later", defer=True)(lambda event: None)  # no queue known
    without_queue = Receiver(SECRET, store=SQLiteStore(tmp_path / "j.sqlite3"))
    with pytest.raises(ConfigurationError, match="queue"):
        without_queue.include(router)
    # Registered on the router after it was included: refused all the same.
    other = Router()
    Receiver(SECRET, store=MemoryStore(), queue=RecordingQueue()).include(other)
    with pytest.raises(ConfigurationError, match="memory store"):
        other.on("run.completed", name="late", defer=True)(lambda event: None)
    fine = Receiver(SECRET, store=SQLiteStore(tmp_path / "k.sqlite3"), queue=RecordingQueue())
    fine.include(router)
    assert [h.id for h in fine.handlers() if h.deferred] == ["later"]


def test_a_queue_taken_away_after_registration_is_refused(tmp_path: Path) -> None:
    receiver, queue, _ran = build(tmp_path)
    with pytest.raises(ConfigurationError, match="queue"):
        receiver.queue = None
    assert receiver.queue is queue  # unchanged
    other = RecordingQueue()
    receiver.queue = other  # a queue given later is bound like one given at construction
    assert receiver.queue is other
    assert other.bound is receiver


# -- the delivery ------------------------------------------------------------------------


def test_a_delivery_runs_inline_handlers_and_sends_one_job_per_deferred_handler(
    tmp_path: Path,
) -> None:
    receiver, queue, ran = build(tmp_path)
    event = make_event(run_id="run_defer_1")
    status, body = deliver(receiver, event)
    assert (status, body) == (200, {"received": True, "deferred": 2})
    assert ran == ["inline"]
    key = "run.completed:run_defer_1"
    assert [(k, h) for k, h, _ in queue.jobs] == [(key, "later"), (key, "later-async")]
    assert all(context == {} for _, _, context in queue.jobs)  # the trace context's place
    entry = receiver.journal.get(key)  # type: ignore[union-attr]
    assert entry is not None
    assert entry.state == "queued"
    assert entry.handlers["inline"].ok
    assert [(a.source, a.status, a.outcome) for a in entry.history] == [("sender", 200, "queued")]
    for name in ("later", "later-async"):
        outcome = entry.handlers[name]
        assert (outcome.ok, outcome.state, outcome.deferred) == (False, "queued", True)
        assert outcome.queued_at > 0
    # The key is done: the sender's retry is a duplicate and sends nothing again.
    status, body = deliver(receiver, event)
    assert (status, body) == (200, {"received": True, "duplicate": True})
    assert len(queue.jobs) == 2
    assert ran == ["inline"]


def test_an_inline_failure_answers_500_and_sends_nothing(tmp_path: Path) -> None:
    receiver, queue, _ran = build(tmp_path)
    broken = [True]

    @receiver.on("run.completed", name="fragile")
    def fragile(event: Any) -> None:
        if broken[0]:
            raise RuntimeError("db down")

    event = make_event(run_id="run_defer_2")
    status, _ = deliver(receiver, event)
    assert status == 500
    assert queue.jobs == []
    entry = receiver.journal.get("run_defer_2")  # type: ignore[union-attr]
    assert entry is not None
    assert entry.state == "failed"
    broken[0] = False
    status, body = deliver(receiver, event)  # the sender's retry
    assert (status, body) == (200, {"received": True, "deferred": 2})
    assert [h for _, h, _ in queue.jobs] == ["later", "later-async"]


def test_a_broker_that_refuses_never_fails_the_delivery(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    receiver, queue, _ran = build(tmp_path)
    queue.refuse = True
    with caplog.at_level(logging.WARNING, logger="flymy_receiver"):
        status, body = deliver(receiver, make_event(run_id="run_defer_3"))
    assert (status, body) == (200, {"received": True, "deferred": 2})
    entry = receiver.journal.get("run_defer_3")  # type: ignore[union-attr]
    assert entry is not None
    assert entry.state == "queued"
    lines = [r.getMessage() for r in caplog.records if "not sent" in r.getMessage()]
    assert len(lines) == 1  # one line for the delivery, not one per handler
    assert "hunter2" not in caplog.text
    assert "broker.internal" in lines[0]
    assert len(lines[0]) < 1000
    # Back up: the sweep sends both.
    queue.refuse = False
    sent = receiver.journal.sweep(older_than=timedelta(0))  # type: ignore[union-attr]
    assert sorted(sent, key=lambda j: j.handler) == [
        Job("run.completed:run_defer_3", "later"),
        Job("run.completed:run_defer_3", "later-async"),
    ]


def test_async_delivery_sends_the_jobs_too(tmp_path: Path) -> None:
    receiver, queue, _ran = build(tmp_path)
    request = signed_request(make_event(run_id="run_defer_4"), SECRET)
    response = asyncio.run(receiver.ahandle(request.body, request.headers))
    assert (response.status, orjson.loads(response.body)) == (
        200,
        {"received": True, "deferred": 2},
    )
    assert len(queue.jobs) == 2


# -- the worker entry point --------------------------------------------------------------


def test_run_deferred_runs_once_and_the_entry_ends_handled(tmp_path: Path) -> None:
    receiver, _queue, ran = build(tmp_path)
    deliver(receiver, make_event(run_id="run_defer_5"))
    key = "run.completed:run_defer_5"
    assert receiver.run_deferred(key, "later") == "ok"
    entry = receiver.journal.get(key)  # type: ignore[union-attr]
    assert entry is not None
    assert entry.state == "queued"
    assert receiver.run_deferred(key, "later-async") == "ok"
    assert receiver.run_deferred(key, "later") == "done"  # a redelivered job
    assert ran == ["inline", "later", "later-async"]
    entry = receiver.journal.get(key)  # type: ignore[union-attr]
    assert entry is not None
    assert entry.state == "handled"
    worker_runs = [a for a in entry.history if a.source == "worker"]
    assert [(a.handler, a.outcome, a.status) for a in worker_runs] == [
        ("later", "handled", None),
        ("later-async", "handled", None),
    ]


def test_run_deferred_skips_a_handler_another_worker_holds(tmp_path: Path) -> None:
    receiver, _queue, ran = build(tmp_path)
    deliver(receiver, make_event(run_id="run_defer_6"))
    key = "run.completed:run_defer_6"
    store = receiver.journal.store  # type: ignore[union-attr]
    held = store.claim_handler(key, "later", 30.0)  # another worker, mid-run
    assert held.state.value == "acquired"
    assert receiver.run_deferred(key, "later") == "busy"
    assert ran == ["inline"]


def test_a_failing_deferred_handler_records_each_attempt_then_fails_and_replays(
    tmp_path: Path,
) -> None:
    receiver, queue, ran = build(tmp_path)
    broken = [True]

    @receiver.on("run.failed", name="flaky", defer=True)
    def flaky(event: Any) -> None:
        if broken[0]:
            raise RuntimeError("CRM down")
        ran.append("flaky")

    deliver(receiver, make_event("run.failed", run_id="run_defer_7"))
    key = "run.failed:run_defer_7"
    for final in (False, False):
        with pytest.raises(RuntimeError, match="CRM down"):
            receiver.run_deferred(key, "flaky", final=final)
        entry = receiver.journal.get(key)  # type: ignore[union-attr]
        assert entry is not None
        assert entry.state == "queued"
    with pytest.raises(RuntimeError):
        receiver.run_deferred(key, "flaky", final=lambda exc: isinstance(exc, RuntimeError))
    entry = receiver.journal.get(key)  # type: ignore[union-attr]
    assert entry is not None
    assert entry.state == "failed"
    outcome = entry.handlers["flaky"]
    assert outcome.attempts == 3
    assert outcome.error == "RuntimeError: CRM down"
    assert [a.outcome for a in entry.history if a.source == "worker"] == ["failed"] * 3
    failed = receiver.journal.list(state="failed")  # type: ignore[union-attr]
    assert key in [e.key for e in failed]
    # After the fix, a replay runs it here, inline.
    broken[0] = False
    replayed = receiver.journal.replay(key)  # type: ignore[union-attr]
    assert replayed.state == "handled"
    assert ran == ["flaky"]
    assert len(queue.jobs) == 1  # the replay sent no job


def test_run_deferred_refuses_an_unknown_handler_or_entry(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    receiver, _queue, _ran = build(tmp_path)
    deliver(receiver, make_event(run_id="run_defer_8"))
    with caplog.at_level(logging.ERROR, logger="flymy_receiver"):
        with pytest.raises(LookupError, match="no deferred handler"):
            receiver.run_deferred("run.completed:run_defer_8", "inline")  # not deferred
        with pytest.raises(LookupError, match="no journal entry"):
            receiver.run_deferred("run.completed:nope", "later")
    assert "unknown handler" in caplog.text
    assert "missing journal entry" in caplog.text


def test_a_deferred_handler_for_another_event_with_the_same_id_is_not_run(
    tmp_path: Path,
) -> None:
    receiver, _queue, ran = build(tmp_path)

    @receiver.on("run.failed", name="later", defer=True)  # same id, another event
    def other(event: Any) -> None:
        ran.append("other")

    deliver(receiver, make_event(run_id="run_defer_9"))
    assert receiver.run_deferred("run.completed:run_defer_9", "later") == "ok"
    assert ran == ["inline", "later"]


# -- the sweep -----------------------------------------------------------------------------


def test_the_sweep_sends_queued_and_expired_leases_only(tmp_path: Path) -> None:
    receiver, queue, _ran = build(tmp_path, lease=timedelta(seconds=1))
    for run in ("a", "b", "c"):
        deliver(receiver, make_event(run_id=f"run_sweep_{run}"))
    queue.jobs.clear()
    store = receiver.journal.store  # type: ignore[union-attr]
    receiver.run_deferred("run.completed:run_sweep_a", "later")  # ok: never sent again
    store.claim_handler("run.completed:run_sweep_b", "later", 600.0)  # a live lease
    store.claim_handler("run.completed:run_sweep_c", "later", 0.001)  # its worker died
    time.sleep(0.01)
    # Not old enough yet: nothing.
    assert receiver.journal.sweep(older_than=timedelta(hours=1)) == []  # type: ignore[union-attr]
    sent = set(receiver.journal.sweep(older_than=timedelta(0)))  # type: ignore[union-attr]
    assert sent == {
        Job("run.completed:run_sweep_a", "later-async"),
        Job("run.completed:run_sweep_b", "later-async"),
        Job("run.completed:run_sweep_c", "later"),
        Job("run.completed:run_sweep_c", "later-async"),
    }
    assert {(k, h) for k, h, _ in queue.jobs} == {(j.key, j.handler) for j in sent}


def test_the_sweep_walks_every_page(tmp_path: Path) -> None:
    receiver, queue, _ran = build(tmp_path)
    for number in range(230):
        deliver(receiver, make_event(run_id=f"run_page_{number:03d}"))
    queue.jobs.clear()
    sent = receiver.journal.sweep(older_than=timedelta(0))  # type: ignore[union-attr]
    assert len(sent) == 460
    assert len(set(sent)) == 460


def test_the_sweep_stops_at_a_refusing_broker(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    receiver, queue, _ran = build(tmp_path)
    deliver(receiver, make_event(run_id="run_sweep_down"))
    queue.refuse = True
    with caplog.at_level(logging.WARNING, logger="flymy_receiver"):
        assert receiver.journal.sweep(older_than=timedelta(0)) == []  # type: ignore[union-attr]
    assert "sweep stopped" in caplog.text
    assert "hunter2" not in caplog.text


# -- awaiting ------------------------------------------------------------------------------


def test_wait_for_resolves_once_the_deferred_handlers_finished(tmp_path: Path) -> None:
    receiver, _queue, ran = build(tmp_path)
    deliver(receiver, make_event(run_id="run_wait_1"))

    async def scenario() -> list[str]:
        waiting = asyncio.ensure_future(receiver.wait_for("run_wait_1", timeout=30))
        await asyncio.sleep(0.5)  # the waiter has looked: queued is not settled
        assert not waiting.done()
        await asyncio.to_thread(receiver.run_deferred, "run.completed:run_wait_1", "later")
        await asyncio.to_thread(receiver.run_deferred, "run.completed:run_wait_1", "later-async")
        event = await waiting
        return [event.data.run_id, *ran]

    assert asyncio.run(scenario()) == ["run_wait_1", "inline", "later", "later-async"]
