"""The app of the deferred-handler tests: a Celery app and a receiver, built from the
environment, so that a real ``celery -A tests.deferred.celery_app worker`` and the test
process (the "web process") build the same handlers.

Each handler records its effect as one row of a separate SQLite file (``effects``), with the
pid of the process that ran it, so a test counts effects and sees where they ran. What a
handler does is steered by the event's ``output`` and by marker files in ``FLYMY_TEST_DIR``:

- ``hold``: wait (bounded) until the file ``go-<run_id>`` exists before the effect, so that
  a test knows the answer came while the handler was still running (or kills its worker);
  the file ``pid-<run_id>`` says which process runs it;
- the file ``broken`` makes the ``flaky`` handler raise (the fix is deleting it).
"""

from __future__ import annotations

import os
import sqlite3
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from celery import Celery

from flymy_receiver import Receiver
from flymy_receiver.queues import Queue
from flymy_receiver.queues.celery import CeleryQueue
from flymy_receiver.stores import SQLiteStore

SECRET = "whsec-deferred-tests"
#: Short, so that the lease of a killed worker runs out within a test; long enough that a
#: busy machine's stalls (seconds, on a shared CI box) never outlast it by accident.
LEASE = timedelta(seconds=float(os.environ.get("FLYMY_TEST_LEASE", "10")))
#: The worker task's retry policy: three runs in all, no delay between them.
TASK_OPTIONS: dict[str, Any] = {
    "acks_late": True,
    "reject_on_worker_lost": True,
    "autoretry_for": (Exception,),
    "max_retries": 2,
    "default_retry_delay": 0,
}
#: How long a held handler waits for its go file at most (a test that forgets it ends).
HOLD_LIMIT = 60.0


def record(directory: Path, run_id: str, handler: str) -> None:
    """One effect: a row naming the run, the handler and this process."""
    with sqlite3.connect(directory / "effects.sqlite3", timeout=30) as db:
        db.execute(
            "CREATE TABLE IF NOT EXISTS effects (run_id TEXT, handler TEXT, pid INTEGER, at REAL)"
        )
        db.execute(
            "INSERT INTO effects VALUES (?, ?, ?, ?)", (run_id, handler, os.getpid(), time.time())
        )
    db.close()


def effects(directory: Path) -> list[tuple[str, str, int]]:
    """Every effect recorded so far: (run_id, handler, pid)."""
    path = directory / "effects.sqlite3"
    if not path.exists():
        return []
    with sqlite3.connect(path, timeout=30) as db:
        try:
            rows = db.execute("SELECT run_id, handler, pid FROM effects ORDER BY at").fetchall()
        except sqlite3.OperationalError:  # the table is not there yet
            rows = []
    db.close()
    return [(str(r), str(h), int(p)) for r, h, p in rows]


def celery_app(broker_url: str) -> Celery:
    app = Celery("flymy-deferred-tests", broker=broker_url)
    app.conf.update(
        task_ignore_result=True,
        worker_prefetch_multiplier=1,  # a killed worker holds one job, not a batch
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": 3600},
        worker_hijack_root_logger=False,
    )
    return app


def build(directory: Path, broker_url: str, queue: Queue | None = None) -> tuple[Celery, Receiver]:
    """The app and the receiver: one inline handler and three deferred ones."""
    app = celery_app(broker_url)
    store = SQLiteStore(directory / "journal.sqlite3")
    if queue is None:
        queue = CeleryQueue(app, **TASK_OPTIONS)
    receiver = Receiver(SECRET, store=store, queue=queue, lease=LEASE)

    @receiver.on("run.completed", name="note")
    def note(event: Any) -> None:
        record(directory, event.data.run_id, "note")

    @receiver.on("run.completed", name="enrich", defer=True)
    def enrich(event: Any) -> None:
        output = event.data.output if isinstance(event.data.output, dict) else {}
        if output.get("hold"):
            (directory / f"pid-{event.data.run_id}").write_text(str(os.getpid()))
            go = directory / f"go-{event.data.run_id}"
            deadline = time.monotonic() + HOLD_LIMIT
            while not go.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        record(directory, event.data.run_id, "enrich")

    @receiver.on("run.failed", name="flaky", defer=True)
    def flaky(event: Any) -> None:
        if (directory / "broken").exists():
            raise RuntimeError("the CRM is down")
        record(directory, event.data.run_id, "flaky")

    @receiver.on("run.failed", name="alert", defer=True)
    async def alert(event: Any) -> None:  # an async deferred handler, run by the worker
        record(directory, event.data.run_id, "alert")

    return app, receiver


def _from_environment() -> tuple[Celery, Receiver] | None:
    directory, broker = os.environ.get("FLYMY_TEST_DIR"), os.environ.get("FLYMY_TEST_BROKER")
    if not directory or not broker:
        return None  # imported by the tests themselves, which build their own
    return build(Path(directory), broker)


_built = _from_environment()
if _built is not None:
    app, receiver = _built
