"""CeleryQueue: the tasks it registers, the options it honours, what a job carries."""

from __future__ import annotations

import base64
import json
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from flymy_receiver import Receiver
from flymy_receiver.errors import ConfigurationError
from flymy_receiver.queues import Queue
from flymy_receiver.queues.celery import CeleryQueue, _final_for
from flymy_receiver.stores import SQLiteStore

SECRET = "whsec-celery-queue"


def receiver_with(tmp_path: Path, queue: CeleryQueue, name: str = "j") -> Receiver:
    return Receiver(SECRET, store=SQLiteStore(tmp_path / f"{name}.sqlite3"), queue=queue)


def test_building_the_receiver_registers_the_tasks_with_the_options_as_given(
    tmp_path: Path,
) -> None:
    app = Celery("t", broker="memory://")
    queue = CeleryQueue(
        app,
        acks_late=True,
        reject_on_worker_lost=True,
        autoretry_for=(ConnectionError,),
        max_retries=7,
        default_retry_delay=3,
        retry_backoff=True,
    )
    assert isinstance(queue, Queue)
    receiver = receiver_with(tmp_path, queue)
    assert queue.receiver is receiver
    task = app.tasks["flymy_receiver.run_deferred"]
    assert task is queue.task
    assert (task.acks_late, task.reject_on_worker_lost) == (True, True)
    assert (task.max_retries, task.default_retry_delay, task.retry_backoff) == (7, 3, True)
    assert tuple(task.autoretry_for) == (ConnectionError,)
    assert task.ignore_result is True
    assert "flymy_receiver.sweep" in app.tasks


def test_task_names_can_be_chosen_and_a_clash_is_refused(tmp_path: Path) -> None:
    app = Celery("t", broker="memory://")
    receiver_with(tmp_path, CeleryQueue(app))
    with pytest.raises(ConfigurationError, match="already has a task"):
        receiver_with(tmp_path, CeleryQueue(app), "k")
    other = CeleryQueue(app, name="second.run", sweep_name="second.sweep")
    receiver_with(tmp_path, other, "l")
    assert {"second.run", "second.sweep"} <= set(app.tasks)


def test_a_queue_serves_one_receiver(tmp_path: Path) -> None:
    queue = CeleryQueue(Celery("t", broker="memory://"))
    receiver_with(tmp_path, queue)
    with pytest.raises(ConfigurationError, match="one receiver"):
        receiver_with(tmp_path, queue, "k")


def test_enqueue_before_bind_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="not bound"):
        CeleryQueue(Celery("t", broker="memory://")).enqueue("k", "h", {})


def _task(app: Celery, **options: Any) -> Any:
    @app.task(name=f"probe{len(app.tasks)}", bind=True, shared=False, lazy=False, **options)
    def probe(self: Any) -> None: ...

    return probe


def test_final_follows_the_retry_policy() -> None:
    app = Celery("t", broker="memory://")
    never = _task(app)  # no autoretry_for: Celery never retries, every failure is the last
    assert _final_for(never)(ConnectionError()) is True
    retried = _task(app, autoretry_for=(ConnectionError,), max_retries=2)
    for retries, expected in ((0, False), (1, False), (2, True)):
        retried.push_request(retries=retries)
        try:
            assert _final_for(retried)(ConnectionError()) is expected
            assert _final_for(retried)(ValueError()) is True  # not retried for this type
        finally:
            retried.pop_request()
    forever = _task(app, autoretry_for=(Exception,), max_retries=None)
    forever.push_request(retries=1000)
    try:
        assert _final_for(forever)(RuntimeError()) is False
    finally:
        forever.pop_request()
    skipped = _task(app, autoretry_for=(Exception,), dont_autoretry_for=(KeyError,))
    assert _final_for(skipped)(KeyError()) is True


def test_schedule_sweep_adds_a_beat_entry(tmp_path: Path) -> None:
    app = Celery("t", broker="memory://")
    queue = CeleryQueue(app)
    receiver_with(tmp_path, queue)
    entry = queue.schedule_sweep(every=timedelta(minutes=2), older_than=timedelta(minutes=10))
    assert app.conf.beat_schedule["flymy_receiver.sweep"] == entry
    assert entry == {
        "task": "flymy_receiver.sweep",
        "schedule": 120.0,
        "kwargs": {"older_than": 600.0},
    }
    with pytest.raises(ValueError, match="positive"):
        queue.schedule_sweep(every=timedelta(0))


@pytest.mark.redis
def test_a_job_carries_the_key_the_handler_and_the_context_never_the_body(
    tmp_path: Path, redis_url: str, redis_server: Any
) -> None:
    app = Celery("t", broker=redis_url)
    queue = CeleryQueue(app)
    receiver_with(tmp_path, queue)
    queue.enqueue("run.completed:run_1", "enrich", {"traceparent": "00-abc-def-01"})
    client = redis_server.client()
    try:
        (raw,) = client.lrange("celery", 0, -1)
    finally:
        client.close()
    message = json.loads(raw)
    assert message["headers"]["task"] == "flymy_receiver.run_deferred"
    args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    assert args == ["run.completed:run_1", "enrich"]
    assert kwargs == {"context": {"traceparent": "00-abc-def-01"}}
    app.close()


def test_the_broker_url_is_shown_without_its_password() -> None:
    queue = CeleryQueue(Celery("t", broker="redis://:hunter2@cache.internal:6379/0"))
    assert "hunter2" not in repr(queue)
    assert "hunter2" not in queue.broker_url_shown
    assert "cache.internal" in queue.broker_url_shown


def test_threads_that_come_and_go_never_exhaust_the_broker_pool(
    tmp_path: Path, redis_url: str, redis_server: Any
) -> None:
    """A server's threads come and go; jobs sent from each must give their connection back,
    or the pool (``broker_pool_limit``) runs dry and the next enqueue waits for ever."""
    app = Celery("t", broker=redis_url)
    app.conf.broker_pool_limit = 2
    queue = CeleryQueue(app)
    receiver_with(tmp_path, queue)
    for number in range(6):  # three times the pool, each from a thread that then ends
        sender = threading.Thread(target=queue.enqueue, args=(f"k{number}", "enrich", {}))
        sender.start()
        sender.join(timeout=10)
        assert not sender.is_alive(), f"enqueue number {number} is stuck waiting for the pool"
    client = redis_server.client()
    try:
        assert client.llen("celery") == 6
    finally:
        client.close()
    app.close()
