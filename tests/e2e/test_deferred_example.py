"""examples/deferred: gunicorn answers at once, a real Celery worker pushes to the CRM.

The README's commands, run for real: a redis-server as the broker, the Flask app on
gunicorn, ``celery -A webhooks worker``, a SQLite journal shared by them.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from flymy_receiver.stores import SQLiteStore
from flymy_receiver.testing import make_event, signed_request
from tests.conftest import SECRET, require
from tests.servers import EXAMPLES, free_port, gunicorn, post, serve
from tests.stores.redis_server import running_redis

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

EXAMPLE = EXAMPLES / "deferred"


def crm_rows(path: Path) -> list[tuple[str, int]]:
    if not path.exists():
        return []
    db = sqlite3.connect(path, timeout=30)
    try:
        return [(str(r), int(p)) for r, _, p in db.execute("SELECT * FROM crm").fetchall()]
    except sqlite3.OperationalError:  # no table yet
        return []
    finally:
        db.close()


def test_the_example_answers_at_once_and_the_worker_does_the_work(tmp_path: Path) -> None:
    require("celery")
    require("gunicorn")
    require("flask")
    from tests.deferred.workers import Worker, wait_until

    journal = tmp_path / "deliveries.sqlite3"
    leads = tmp_path / "leads.sqlite3"
    with running_redis() as broker:
        env = {
            "FLYMY_WEBHOOK_SECRET": SECRET,
            "CELERY_BROKER_URL": broker.url,
            "FLYMY_STORE": f"sqlite:///{journal}",
            "LEADS_DB": str(leads),
            "CRM_SECONDS": "1",
        }
        port = free_port()
        worker = Worker(
            "example",
            env,
            tmp_path / "worker.log",
            module="webhooks",
            cwd=EXAMPLE,
            extra_path=(str(EXAMPLE),),
        )
        with serve(gunicorn("web:app", port), port, env=env, cwd=EXAMPLE):
            event = make_event("run.completed", run_id="run_example")
            request = signed_request(event, SECRET)
            status, body = post(port, request.body, request.headers)
            assert (status, json.loads(body)) == (200, {"received": True, "deferred": 1})
            # Answered before any worker runs: the CRM has nothing yet.
            assert crm_rows(leads) == []
            worker.start()
            try:
                wait_until(lambda: crm_rows(leads), timeout=60, what="the CRM row")
                status, body = post(port, request.body, request.headers)  # a sender retry
                assert (status, json.loads(body)) == (200, {"received": True, "duplicate": True})
                store = SQLiteStore(journal)
                wait_until(
                    lambda: store.journal_get("run_example").state == "handled",  # type: ignore[union-attr]
                    what="the entry to be handled",
                )
            finally:
                worker.stop()
        assert crm_rows(leads) == [("run_example", worker.pid)]
