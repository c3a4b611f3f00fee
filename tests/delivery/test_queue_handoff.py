"""examples/queue_handoff: the webhook enqueues, an RQ worker does the work, once per event."""

from __future__ import annotations

import importlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from flymy_receiver.testing import make_event, signed_request
from tests.conftest import SECRET, require
from tests.servers import EXAMPLES, PYTHON, free_port, gunicorn, post, serve

EXAMPLE = EXAMPLES / "queue_handoff"


@pytest.fixture
def example(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ModuleType]:
    require("rq")
    require("flask")
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("FLYMY_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("LEADS_DB", str(tmp_path / "leads.sqlite3"))
    monkeypatch.syspath_prepend(str(EXAMPLE))  # the worker imports lead_jobs by name
    for name in ("webhook_app", "lead_jobs"):
        sys.modules.pop(name, None)
    module = importlib.import_module("webhook_app")
    yield module
    for name in ("webhook_app", "lead_jobs"):
        sys.modules.pop(name, None)


def _work(module: ModuleType) -> None:
    from rq import SimpleWorker

    worker = SimpleWorker([module.queue], connection=module.queue.connection)
    worker.work(burst=True)  # runs every queued job in this process, then returns


def _rows(tmp_path: Path) -> list[tuple[str, str, int]]:
    db = sqlite3.connect(tmp_path / "leads.sqlite3")
    try:
        return list(db.execute("SELECT * FROM enriched_leads ORDER BY run_id"))
    finally:
        db.close()


def test_each_event_is_enqueued_once_and_worked(example: ModuleType, tmp_path: Path) -> None:
    client = example.app.test_client()
    requests = [
        signed_request(make_event("run.completed", run_id=f"run_q{i}"), SECRET) for i in range(3)
    ]
    for req in [*requests, requests[0], requests[2]]:  # two redeliveries
        response = client.post("/webhooks/flymy", data=req.body, headers=req.headers)
        assert response.status_code == 200
    assert example.queue.count == 3  # answered before any work was done
    assert not (tmp_path / "leads.sqlite3").exists()
    _work(example)
    assert example.queue.count == 0
    rows = _rows(tmp_path)
    assert [r[0] for r in rows] == ["run_q0", "run_q1", "run_q2"]
    assert all(r[2] == 2 for r in rows)  # two buying triggers in the default output


def test_a_job_that_runs_twice_saves_once(example: ModuleType, tmp_path: Path) -> None:
    profile = {"background": "b", "buying_triggers": ["x"], "outreach_angle": "a"}
    lead_jobs = sys.modules["lead_jobs"]
    assert lead_jobs.enrich_lead("run_twice", profile) == "run_twice"
    assert lead_jobs.enrich_lead("run_twice", profile) == "run_twice"
    assert _rows(tmp_path) == [("run_twice", "a", 1)]


def test_queue_down_means_5xx_so_the_sender_retries(
    example: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    def refuse(*args: object, **kwargs: object) -> None:
        raise RedisConnectionError("queue unreachable")

    req = signed_request(make_event("run.completed", run_id="run_retry"), SECRET)
    client = example.app.test_client()
    with monkeypatch.context() as patch:
        patch.setattr(example.queue, "enqueue", refuse)
        response = client.post("/webhooks/flymy", data=req.body, headers=req.headers)
    assert response.status_code == 500
    assert b"unreachable" not in response.data
    assert client.post("/webhooks/flymy", data=req.body, headers=req.headers).status_code == 200
    _work(example)
    assert [r[0] for r in _rows(tmp_path)] == ["run_retry"]


@pytest.mark.e2e
def test_the_readme_commands_work(redis_url: str, tmp_path: Path) -> None:
    """gunicorn serving the webhook, the real ``rq worker --burst`` draining the queue."""
    require("rq")
    require("gunicorn")
    env = {"REDIS_URL": redis_url, "FLYMY_WEBHOOK_SECRET": SECRET}
    env["LEADS_DB"] = str(tmp_path / "leads.sqlite3")
    port = free_port()
    argv = gunicorn("webhook_app:app", port, workers=2)
    with serve(argv, port, env=env, cwd=EXAMPLE):
        for i in range(3):
            req = signed_request(make_event("run.completed", run_id=f"run_e{i}"), SECRET)
            for _ in range(2):  # each event twice
                status, _ = post(port, req.body, req.headers)
                assert status == 200
    worker = subprocess.run(
        [PYTHON, "-m", "rq.cli", "worker", "--burst", "--url", redis_url, "leads"],
        cwd=EXAMPLE,
        env={**os.environ, **env},
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert worker.returncode == 0, worker.stderr.decode(errors="replace")[-2000:]
    assert [r[0] for r in _rows(tmp_path)] == ["run_e0", "run_e1", "run_e2"]
