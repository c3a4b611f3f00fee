"""``DjangoTasksQueue`` with real worker processes: the tasks framework's database worker
(``db_worker`` of ``django_tasks_db``) started by the test and stopped by PID, with
DjangoStore on SQLite and on PostgreSQL. The deliveries run in processes of their own too
(``tests/django/tasks_cli.py``), as a web process would.

Nothing here measures time: "at once" is shown by the answer coming back while the handler
is still blocked in the worker, waiting for a file only the test writes after the answer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require

CLI = Path(__file__).with_name("tasks_cli.py")
ROOT = Path(__file__).resolve().parents[2]
#: Bound of every wait on a worker (a worker runs a job well within it).
PATIENCE = 90.0


class Project:
    """The test project on one database: its commands and its worker processes."""

    def __init__(self, database: dict[str, Any], folder: Path) -> None:
        self.folder = folder
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "FLYMY_TEST_DATABASE": json.dumps(database),
            "FLYMY_TEST_DIR": str(folder),
        }
        self.workers: list[subprocess.Popen[bytes]] = []

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(CLI), *args],
            capture_output=True,
            text=True,
            timeout=PATIENCE,
            env=self.env,
            check=False,
        )

    def json(self, *args: str) -> Any:
        done = self.run(*args)
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    def state(self, run_id: str) -> dict[str, Any]:
        state: dict[str, Any] = self.json("state", run_id)
        return state

    def start_worker(self) -> subprocess.Popen[bytes]:
        log = (self.folder / f"worker-{len(self.workers)}.log").open("wb")
        worker = subprocess.Popen(
            [sys.executable, str(CLI), "worker"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        log.close()
        self.workers.append(worker)
        return worker

    def stop_workers(self) -> None:
        for worker in self.workers:
            if worker.poll() is None:
                os.kill(worker.pid, signal.SIGTERM)
                try:
                    worker.wait(30)
                except subprocess.TimeoutExpired:
                    os.kill(worker.pid, signal.SIGKILL)
                    worker.wait(30)

    def until(self, what: str, check: Callable[[], Any]) -> Any:
        """Poll ``check`` until it returns something true (bounded)."""
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            found = check()
            if found:
                return found
            if any(w.poll() not in (None, -signal.SIGKILL, 17) for w in self.workers):
                break
            time.sleep(0.2)
        logs = "\n".join(p.read_text()[-3000:] for p in self.folder.glob("worker-*.log"))
        raise AssertionError(f"gave up waiting for {what}\n{logs}")

    def started_by(self, run_id: str) -> int:
        marker = self.folder / f"{run_id}.started"
        return int(self.until(f"{run_id} to start", lambda: marker.exists() and marker.read_text()))

    def release(self, run_id: str) -> None:
        (self.folder / f"{run_id}.release").write_text("go")

    def settled(self, run_id: str, state: str = "handled") -> dict[str, Any]:
        found: dict[str, Any] = self.until(
            f"{run_id} to be {state}", lambda: (s := self.state(run_id))["state"] == state and s
        )
        return found

    def swept(self, run_id: str) -> dict[str, Any]:
        """Sweep (``older_than=0``) until the entry is ``handled``, as a periodic sweep
        would: a job whose worker died is sent again once the handler's lease has ended."""

        def sweep_then_look() -> dict[str, Any] | None:
            done = self.run("sweep")
            assert done.returncode == 0, done.stdout + done.stderr
            state = self.state(run_id)
            return state if state["state"] == "handled" else None

        found: dict[str, Any] = self.until(f"a sweep to get {run_id} handled", sweep_then_look)
        return found


@pytest.fixture(params=["sqlite", "postgres"])
def project(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Project]:
    require("django")
    require("django_tasks_db")
    if request.param == "sqlite":
        database: dict[str, Any] = {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(tmp_path / "project.sqlite3"),
            "OPTIONS": {"timeout": 30},
        }
    else:
        require("psycopg")
        from urllib.parse import urlsplit

        url = urlsplit(request.getfixturevalue("postgres_server").create_database())
        database = {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": url.path.lstrip("/"),
            "USER": url.username,
            "HOST": url.hostname,
            "PORT": str(url.port),
        }
    project = Project(database, tmp_path)
    done = project.run("setup")
    assert done.returncode == 0, done.stdout + done.stderr
    try:
        yield project
    finally:
        project.stop_workers()


def _run_id() -> str:
    return f"run_{uuid.uuid4().hex[:12]}"


def test_the_answer_comes_at_once_and_the_worker_runs_the_slow_handler(project: Project) -> None:
    worker = project.start_worker()
    run_id = _run_id()
    delivered = project.json("deliver", run_id, "slow")
    assert delivered["answer"] == {"status": 200, "body": {"received": True, "deferred": 2}}
    assert delivered["entry"]["state"] == "queued"
    assert delivered["entry"]["leads"] == 0
    # The handler runs in the worker's process, still blocked after the answer came back.
    assert project.started_by(run_id) == worker.pid
    assert project.state(run_id)["handlers"]["slow"]["state"] == "running"
    project.release(run_id)
    entry = project.settled(run_id)
    assert entry["leads"] == 1
    assert entry["handlers"]["slow"] == {"state": "ok", "attempts": 1}


def test_a_worker_killed_mid_handler_gets_it_run_again_after_its_lease(project: Project) -> None:
    first = project.start_worker()
    run_id = _run_id()
    assert project.json("deliver", run_id, "slow")["answer"]["status"] == 200
    assert project.started_by(run_id) == first.pid
    os.kill(first.pid, signal.SIGKILL)
    first.wait(30)
    (project.folder / f"{run_id}.started").unlink()
    project.release(run_id)  # the next run goes through
    second = project.start_worker()
    # Within the lease the job is left alone; once it ends, the sweep sends it again.
    entry = project.swept(run_id)
    assert project.started_by(run_id) == second.pid
    assert entry["handlers"]["slow"] == {"state": "ok", "attempts": 2}
    assert entry["leads"] == 1


def test_an_atomic_deferred_handler_takes_effect_exactly_once(project: Project) -> None:
    # Killed inside its transaction, after its write: the write is rolled back.
    first = project.start_worker()
    run_id = _run_id()
    (project.folder / f"{run_id}.hold").write_text("wait inside the transaction")
    assert project.json("deliver", run_id, "atomic")["answer"]["status"] == 200
    assert project.started_by(run_id) == first.pid
    os.kill(first.pid, signal.SIGKILL)
    first.wait(30)
    assert project.state(run_id)["leads"] == 0
    (project.folder / f"{run_id}.hold").unlink()
    project.start_worker()
    entry = project.swept(run_id)
    assert entry["leads"] == 1
    assert entry["handlers"]["atomic_effect"] == {"state": "ok", "attempts": 2}
    # Killed the moment its write and its record committed: never run again.
    crashed = _run_id()
    assert project.json("deliver", crashed, "commit_exit")["answer"]["status"] == 200
    project.until("the worker to end at the commit", lambda: project.workers[-1].poll() == 17)
    assert project.state(crashed)["leads"] == 1
    project.start_worker()  # for the jobs left, and the copies the sweep sends
    entry = project.swept(crashed)
    assert entry["leads"] == 1
    assert entry["handlers"]["atomic_effect"] == {"state": "ok", "attempts": 1}
    assert project.json("deliver", crashed, "commit_exit")["answer"]["body"]["duplicate"]
    project.run("sweep")
    assert project.state(crashed)["leads"] == 1


def test_jobs_written_in_the_claims_transaction_need_no_sweep(project: Project) -> None:
    run_id = _run_id()
    # The web process dies right after the entry committed, before sending any job itself.
    died = project.run("deliver-then-die", run_id, "slow")
    assert died.returncode == 3, died.stdout + died.stderr
    assert project.state(run_id)["state"] == "queued"
    project.release(run_id)
    project.start_worker()
    entry = project.settled(run_id)  # no sweep ran
    assert entry["leads"] == 1


# -- in this process: the task's path, its retries, what it needs ---------------------------


class _Recorder:
    """What a receiver's ``run_deferred`` was asked, failing ``failures`` times."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[tuple[str, str, bool, dict[str, str]]] = []

    def __call__(self, key: str, handler_id: str, *, final: bool, context: Any) -> str:
        self.calls.append((key, handler_id, final, dict(context)))
        if len(self.calls) <= self.failures:
            raise RuntimeError("crm is down")
        return "ok"


@pytest.fixture
def bound() -> Iterator[tuple[Any, _Recorder]]:
    """A registered receiver on DjangoTasksQueue(attempts=3), the tasks framework's
    immediate backend (this process has no TASKS setting), and a recording run_deferred."""
    require("django")
    require("django_tasks")
    from flymy_receiver import Receiver
    from flymy_receiver.django import DjangoStore, registry
    from flymy_receiver.queues.django import DjangoTasksQueue
    from tests.conftest import SECRET

    queue = DjangoTasksQueue(attempts=3)
    receiver = Receiver(SECRET, store=DjangoStore(), queue=queue)
    assert queue.receiver is receiver
    recorder = _Recorder(failures=0)
    receiver.run_deferred = recorder  # type: ignore[attr-defined,method-assign]
    registry.register(receiver)
    try:
        yield queue, recorder
    finally:
        registry.unregister()


def test_the_task_is_found_by_its_path() -> None:
    require("django_tasks")
    from django.utils.module_loading import import_string

    from flymy_receiver.queues.django import TASK_PATH

    assert import_string(TASK_PATH).module_path == TASK_PATH


def test_a_failing_handler_is_sent_again_until_its_last_attempt(
    bound: tuple[Any, _Recorder],
) -> None:
    queue, recorder = bound
    recorder.failures = 5
    queue.enqueue("run.completed:run_1", "app.enrich", {"traceparent": "00-ab-cd-01"})
    assert [call[2] for call in recorder.calls] == [False, False, True]  # final the third
    assert {call[:2] for call in recorder.calls} == {("run.completed:run_1", "app.enrich")}
    assert all(call[3] == {"traceparent": "00-ab-cd-01"} for call in recorder.calls)
    recorder.calls.clear()
    recorder.failures = 0
    queue.enqueue("run.completed:run_2", "app.enrich", {})
    assert [call[2] for call in recorder.calls] == [False]


def test_jobs_outside_the_stores_database_are_sent_by_the_receiver(
    bound: tuple[Any, _Recorder],
) -> None:
    queue, _ = bound
    assert queue.in_store_transaction is False  # the immediate backend writes no rows
    assert queue.receiver.store.transactional_queue is queue


def test_the_worker_needs_the_receiver() -> None:
    require("django_tasks")
    from flymy_receiver import ConfigurationError
    from flymy_receiver.django import registry
    from flymy_receiver.queues.django import _job

    registry.unregister()
    with pytest.raises(ConfigurationError, match="FLYMY_RECEIVER"):
        _job("run.completed:run_1", "app.enrich", {})
