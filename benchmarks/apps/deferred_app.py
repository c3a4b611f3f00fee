"""Inline against deferred handlers, one Flask app, four endpoints (one receiver and one
journal file each), and the Celery app whose worker runs the deferred ones:

    BENCH_DIR=/tmp/x BENCH_BROKER=redis://127.0.0.1:6379/0 \
        gunicorn benchmarks.apps.deferred_app:app
    BENCH_DIR=/tmp/x BENCH_BROKER=... celery -A benchmarks.apps.deferred_app:celery_app worker

- ``/inline-noop``: an inline handler that does nothing;
- ``/deferred``: one deferred handler (records when it started, for the queue lag);
- ``/inline-slow`` and ``/deferred-slow``: a handler that takes ``BENCH_SLOW`` seconds (2).

``BENCH_STORE`` is ``sqlite`` (default: a file per endpoint in ``BENCH_DIR``) or a
``postgresql://`` URL (a schema per endpoint).
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from celery import Celery
from flask import Flask

from benchmarks.payloads import SECRET
from flymy_receiver import Receiver
from flymy_receiver.flask import blueprint
from flymy_receiver.queues.celery import CeleryQueue
from flymy_receiver.stores import SQLiteStore, Store

_directory = Path(os.environ["BENCH_DIR"])
SLOW = float(os.environ.get("BENCH_SLOW", "2"))

celery_app = Celery("bench-deferred", broker=os.environ["BENCH_BROKER"])
celery_app.conf.update(task_ignore_result=True, worker_prefetch_multiplier=1)


def _store(name: str) -> Store:
    url = os.environ.get("BENCH_STORE", "sqlite")
    if url == "sqlite":
        return SQLiteStore(_directory / f"{name}.sqlite3")
    from flymy_receiver.stores import PostgresStore

    return PostgresStore(url, schema=f"bench_{name}")


def started(run_id: str) -> None:
    """When a deferred handler started, for the queue lag (one row per run)."""
    db = sqlite3.connect(_directory / "started.sqlite3", timeout=30)
    with db:
        db.execute("CREATE TABLE IF NOT EXISTS started (run_id TEXT, at REAL)")
        db.execute("INSERT INTO started VALUES (?, ?)", (run_id, time.time()))
    db.close()


def receiver_for(name: str, *, deferred: bool, slow: bool) -> Receiver:
    queue = CeleryQueue(celery_app, name=f"bench.{name}", sweep_name=f"bench.{name}.sweep")
    receiver = Receiver(SECRET, store=_store(name.replace("-", "_")), queue=queue)

    @receiver.on("run.completed", name=name, defer=deferred)
    def handler(event: Any) -> None:
        if deferred:
            started(event.data.run_id)
        if slow:
            time.sleep(SLOW)

    return receiver


app = Flask(__name__)
for _name, _deferred, _slow in (
    ("inline-noop", False, False),
    ("deferred", True, False),
    ("inline-slow", False, True),
    ("deferred-slow", True, True),
):
    _receiver = receiver_for(_name, deferred=_deferred, slow=_slow)
    app.register_blueprint(blueprint(_receiver, url=f"/{_name}", name=_name.replace("-", "_")))
