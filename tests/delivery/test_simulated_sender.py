"""A simulated FlyMy.AI sender against the Flask example under gunicorn with 4 workers.

1 000 distinct events are delivered at least once, with random duplicates, in random
order, from a small pool of concurrent connections; every non-2xx answer (and every
connection error) is retried, like the platform's at-least-once delivery. The workers share
the SQLite idempotency store; the example's handlers write one row per event they handle.
At the end every event must have exactly one row.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from flymy_receiver.testing import make_event, signed_request
from tests.conftest import SECRET, require
from tests.servers import EXAMPLES, free_port, gunicorn, post, serve, server_log

EVENTS = 1000
FAILED_EVERY = 10  # one event in ten is a run.failed
SENDERS = 8
MAX_ATTEMPTS = 200
DEADLINE = 180.0


@pytest.mark.e2e
def test_every_event_handled_exactly_once(tmp_path: Path) -> None:
    require("gunicorn")
    require("flask")
    assert (EXAMPLES / "flask_app.py").exists()
    rng = random.Random(20250115)
    requests = []
    for i in range(EVENTS):
        name = "run.failed" if i % FAILED_EVERY == 0 else "run.completed"
        req = signed_request(make_event(name, run_id=f"run_{i:04d}"), SECRET)
        requests.append((req.body, req.headers))
    # At least once each; about a third again, some of them twice; all in random order.
    schedule = list(range(EVENTS))
    schedule += rng.sample(range(EVENTS), EVENTS // 3)
    schedule += rng.sample(range(EVENTS), EVENTS // 10)
    rng.shuffle(schedule)

    leads_db = tmp_path / "leads.sqlite3"
    env = {
        "FLYMY_WEBHOOK_SECRET": SECRET,
        "FLYMY_STORE": f"sqlite:///{tmp_path / 'deliveries.sqlite3'}",
        "LEADS_DB": str(leads_db),
    }
    port = free_port()
    argv = gunicorn("flask_app:app", port, workers=4)
    statuses: Counter[str] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + DEADLINE

    def deliver(index: int) -> str:
        body, headers = requests[index]
        for _ in range(MAX_ATTEMPTS):
            if time.monotonic() > deadline:
                return "deadline"
            try:
                status, answer = post(port, body, headers, timeout=30)
            except OSError:
                status, answer = 0, b""  # connection refused or reset: retried like a 5xx
            with lock:
                statuses[f"{status}{' duplicate' if b'duplicate' in answer else ''}"] += 1
            if 200 <= status < 300:
                return "ok"
            time.sleep(rng.uniform(0.01, 0.05))  # a sender's backoff, shortened
        return "gave up"

    with serve(argv, port, env=env, cwd=EXAMPLES) as server:
        with ThreadPoolExecutor(SENDERS) as pool:
            outcomes = Counter(pool.map(deliver, schedule))
        log = server_log(server)

    assert outcomes == {"ok": len(schedule)}, (outcomes, statuses, log[-3000:])
    db = sqlite3.connect(leads_db)
    try:
        rows = Counter(r[0] for r in db.execute("SELECT run_id FROM leads"))
        rows.update(r[0] for r in db.execute("SELECT run_id FROM failures"))
        failures = {r[0] for r in db.execute("SELECT run_id FROM failures")}
    finally:
        db.close()
    assert sorted(rows) == [f"run_{i:04d}" for i in range(EVENTS)]
    assert [run_id for run_id, n in rows.items() if n != 1] == []
    assert failures == {f"run_{i:04d}" for i in range(0, EVENTS, FAILED_EVERY)}
    # Each redelivery of a handled event was acknowledged without running a handler.
    assert statuses["200"] == EVENTS
    assert statuses["200 duplicate"] == len(schedule) - EVENTS
