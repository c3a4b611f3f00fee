"""Deferred handlers on real Celery workers with a real redis-server broker.

The test process is the web process: it delivers through the receiver of
``tests/deferred/celery_app.py``; the workers are ``python -m celery -A
tests.deferred.celery_app worker`` processes that build the same receiver on the same
SQLite store. Every process is stopped by its PID.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from flymy_receiver.testing import make_event, signed_request
from tests.deferred.celery_app import SECRET, build, effects
from tests.deferred.workers import Worker, running_workers, wait_until
from tests.servers import ROOT
from tests.stores.redis_server import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.e2e]


def deliver(receiver: Any, event: Any) -> tuple[int, Any]:
    request = signed_request(event, SECRET)
    response = receiver.handle(request.body, request.headers)
    return response.status, orjson.loads(response.body)


def state(receiver: Any, key: str) -> str:
    entry = receiver.journal.get(key)
    return str(entry.state) if entry is not None else "missing"


def handled(receiver: Any, key: str) -> bool:
    return state(receiver, key) == "handled"


def test_the_answer_comes_at_once_and_the_handler_runs_in_the_worker(
    web: Any, env: dict[str, str], tmp_path: Path
) -> None:
    with running_workers(1, env, tmp_path / "logs") as (worker,):
        event = make_event(run_id="run_slow", output={"hold": True})
        status, body = deliver(web, event)
        # Answered while the handler waits for its go file: the sender never waits for it.
        assert (status, body) == (200, {"received": True, "deferred": 1})
        key = "run.completed:run_slow"
        wait_until(
            lambda: web.journal.get(key).handlers["enrich"].state == "running",
            what="the worker to take the job",
        )
        assert [e[1] for e in effects(tmp_path)] == ["note"]
        assert state(web, key) == "queued"
        (tmp_path / "go-run_slow").touch()
        wait_until(lambda: handled(web, key), what="the entry to be handled")
        rows = {handler: pid for _, handler, pid in effects(tmp_path)}
        assert rows["note"] == os.getpid()  # inline: in the web process
        assert rows["enrich"] == worker.pid  # deferred: in the worker's process
        entry = web.journal.get(key)
        runs = [a for a in entry.history if a.source == "worker"]
        assert [(a.handler, a.outcome) for a in runs] == [("enrich", "handled")]


def test_broker_down_at_delivery_then_back_the_sweep_sends_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = RedisServer()  # not started: nothing listens on its port yet
    app, web = build(tmp_path, broker.url)
    try:
        status, body = deliver(web, make_event(run_id="run_outage"))
        assert (status, body) == (200, {"received": True, "deferred": 1})
        key = "run.completed:run_outage"
        assert state(web, key) == "queued"
        broker.start()
        env = {"FLYMY_TEST_DIR": str(tmp_path), "FLYMY_TEST_BROKER": broker.url}
        with running_workers(1, env, tmp_path / "logs"):
            sent = web.journal.sweep(older_than=timedelta(0))
            assert [(j.key, j.handler) for j in sent] == [(key, "enrich")]
            wait_until(lambda: handled(web, key), what="the entry to be handled")
        assert sorted(e[1] for e in effects(tmp_path)) == ["enrich", "note"]
    finally:
        broker.stop()
        app.close()


def test_a_worker_killed_mid_handler_runs_again_after_its_lease(
    web: Any, env: dict[str, str], tmp_path: Path
) -> None:
    key = "run.completed:run_killed"
    worker = Worker("doomed", env, tmp_path / "logs" / "doomed.log")
    worker.start()
    try:
        deliver(web, make_event(run_id="run_killed", output={"hold": True}))
        wait_until(
            lambda: web.journal.get(key).handlers["enrich"].state == "running",
            what="the worker to start the handler",
        )
        worker.kill()  # SIGKILL, mid-handler: nothing recorded, the job unacknowledged
    finally:
        worker.stop()
    assert [e[1] for e in effects(tmp_path)] == ["note"]
    outcome = web.journal.get(key).handlers["enrich"]
    assert outcome.state == "running"
    # Nothing to sweep while the dead worker's lease lasts ...
    assert web.journal.sweep(older_than=timedelta(0)) == []
    wait_until(
        lambda: web.journal.get(key).handlers["enrich"].lease_until < time.time(),
        what="the lease to run out",
    )
    # ... then the sweep sends it again, and a new worker runs it to the end.
    (tmp_path / "go-run_killed").touch()
    with running_workers(1, env, tmp_path / "logs"):
        sent = web.journal.sweep(older_than=timedelta(0))
        assert [(j.key, j.handler) for j in sent] == [(key, "enrich")]
        wait_until(lambda: handled(web, key), timeout=60, what="the entry to be handled")
    assert sorted(e[1] for e in effects(tmp_path)) == ["enrich", "note"]
    entry = web.journal.get(key)
    assert entry.handlers["enrich"].attempts == 2


def test_a_pool_process_killed_mid_handler_is_redelivered_and_runs_once(
    web: Any, env: dict[str, str], tmp_path: Path
) -> None:
    """Celery's own redelivery (acks_late, reject_on_worker_lost): the new pool process gets
    the job while the dead one's lease lasts and leaves it; the sweep sends it after."""
    key = "run.completed:run_pool"
    worker = Worker("pool", env, tmp_path / "logs" / "pool.log", pool="prefork")
    worker.start()
    try:
        deliver(web, make_event(run_id="run_pool", output={"hold": True}))
        pid_file = tmp_path / "pid-run_pool"
        wait_until(pid_file.exists, what="a pool process to start the handler")
        child = int(pid_file.read_text())
        assert child != worker.pid
        os.kill(child, signal.SIGKILL)
        wait_until(
            lambda: "running elsewhere" in worker.output(),
            what="the redelivered job to find the lease held",
        )
        assert [e[1] for e in effects(tmp_path)] == ["note"]
        wait_until(
            lambda: web.journal.get(key).handlers["enrich"].lease_until < time.time(),
            what="the lease to run out",
        )
        (tmp_path / "go-run_pool").touch()
        sent = web.journal.sweep(older_than=timedelta(0))
        assert [(j.key, j.handler) for j in sent] == [(key, "enrich")]
        wait_until(lambda: handled(web, key), timeout=60, what="the entry to be handled")
    finally:
        worker.stop()
    assert sorted(e[1] for e in effects(tmp_path)) == ["enrich", "note"]
    assert web.journal.get(key).handlers["enrich"].attempts == 2


def test_a_web_process_killed_between_commit_and_enqueue_loses_nothing(
    web: Any, env: dict[str, str], tmp_path: Path
) -> None:
    request = signed_request(make_event(run_id="run_exit"), SECRET)
    script = textwrap.dedent(
        """
        import json, os, sys
        from pathlib import Path
        from tests.deferred.celery_app import build

        class DyingQueue:
            def bind(self, receiver):
                pass

            def enqueue(self, key, handler_id, context):
                os._exit(17)  # the web process dies after the commit, before the job

        app, receiver = build(Path(sys.argv[1]), sys.argv[2], queue=DyingQueue())
        body = sys.stdin.buffer.read()
        receiver.handle(body, json.loads(sys.argv[3]))
        os._exit(0)
        """
    )
    headers = json.dumps(request.headers)
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), env["FLYMY_TEST_BROKER"], headers],
        input=request.body,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 17, done.stderr.decode()[-2000:]
    key = "run.completed:run_exit"
    assert state(web, key) == "queued"
    with running_workers(1, env, tmp_path / "logs"):
        sent = web.journal.sweep(older_than=timedelta(0))
        assert [(j.key, j.handler) for j in sent] == [(key, "enrich")]
        wait_until(lambda: handled(web, key), what="the entry to be handled")
    assert sorted(e[1] for e in effects(tmp_path)) == ["enrich", "note"]


def test_the_same_job_delivered_twice_at_once_runs_once(
    web: Any, env: dict[str, str], tmp_path: Path
) -> None:
    with running_workers(2, env, tmp_path / "logs") as workers:
        deliver(web, make_event(run_id="run_twice", output={"hold": True}))
        key = "run.completed:run_twice"
        wait_until(
            lambda: web.journal.get(key).handlers["enrich"].state == "running",
            what="a worker to take the job",
        )
        web.queue.enqueue(key, "enrich", {})  # the broker delivers it again meanwhile
        wait_until(
            lambda: any("running elsewhere" in w.output() for w in workers),
            what="the second worker to find the lease held",
        )
        (tmp_path / "go-run_twice").touch()
        wait_until(lambda: handled(web, key), what="the entry to be handled")
        web.queue.enqueue(key, "enrich", {})  # and once more, after it succeeded
        wait_until(
            lambda: any("already ran" in w.output() for w in workers),
            what="a worker to find it done",
        )
    assert [e[1] for e in effects(tmp_path)].count("enrich") == 1


def test_a_failing_deferred_handler_is_retried_then_failed_then_replayed(
    web: Any, env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "broken").touch()
    key = "run.failed:run_flaky"
    with running_workers(1, env, tmp_path / "logs"):
        status, body = deliver(web, make_event("run.failed", run_id="run_flaky"))
        assert (status, body) == (200, {"received": True, "deferred": 2})
        wait_until(lambda: state(web, key) == "failed", what="the entry to fail")
    entry = web.journal.get(key)
    flaky = entry.handlers["flaky"]
    assert (flaky.state, flaky.attempts, flaky.error) == (
        "failed",
        3,
        "RuntimeError: the CRM is down",
    )
    assert entry.handlers["alert"].ok  # the async one ran on the worker
    runs = [(a.handler, a.outcome) for a in entry.history if a.source == "worker"]
    assert runs.count(("flaky", "failed")) == 3
    assert ("alert", "handled") in runs
    # The fix, then a replay: the failed handler runs here, inline; the ok one does not.
    (tmp_path / "broken").unlink()
    replayed = web.journal.replay(key)
    assert replayed.state == "handled"
    rows = [(handler, pid) for _, handler, pid in effects(tmp_path)]
    assert sorted(h for h, _ in rows) == ["alert", "flaky"]
    assert dict(rows)["flaky"] == os.getpid()


def test_many_deliveries_with_duplicates_through_two_workers_run_each_handler_once(
    web: Any, env: dict[str, str], tmp_path: Path
) -> None:
    runs = [f"run_bulk_{n:03d}" for n in range(400)]
    requests = [signed_request(make_event(run_id=run), SECRET) for run in runs]
    # 500 deliveries: every run once, a hundred of them twice, the copy next to the
    # original so that the two are handled at the same time.
    deliveries = []
    for number, request in enumerate(requests):
        deliveries += [request, request] if number % 4 == 0 else [request]
    with running_workers(2, env, tmp_path / "logs"):
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda r: web.handle(r.body, r.headers).status, deliveries))
        assert len(answers) == 500
        assert set(answers) <= {200, 409}
        for run in runs[::5]:  # and jobs sent twice, as a broker may
            web.queue.enqueue(f"run.completed:{run}", "enrich", {})
        for status, request in zip(answers, deliveries, strict=True):
            if status == 409:  # another delivery held it: the sender retries
                assert web.handle(request.body, request.headers).status == 200
        wait_until(
            lambda: len([e for e in effects(tmp_path) if e[1] == "enrich"]) >= len(runs),
            timeout=60,
            what="every deferred handler to run",
        )
        wait_until(
            lambda: (
                all(e.state == "handled" for e in web.journal.list(limit=1000))
                and len(web.journal.list(limit=1000)) == len(runs)
            ),
            timeout=30,
            what="every entry to be handled",
        )
    counts = collections.Counter((run, handler) for run, handler, _ in effects(tmp_path))
    assert set(counts.values()) == {1}
    assert len(counts) == 2 * len(runs)
    pids = {pid for _, handler, pid in effects(tmp_path) if handler == "enrich"}
    assert os.getpid() not in pids
