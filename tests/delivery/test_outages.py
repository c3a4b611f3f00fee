"""Faults of the machinery: Redis killed mid-traffic, a worker killed inside its handler."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest

from flymy_receiver import Receiver, RunCompleted
from flymy_receiver.stores import RedisStore
from flymy_receiver.testing import make_event, signed_request
from tests.conftest import SECRET
from tests.servers import PYTHON, ROOT, stop
from tests.stores.redis_server import RedisServer, running_redis


def test_redis_killed_mid_traffic_and_restarted() -> None:
    """503 while Redis is down, no event lost: every event is handled once the sender
    retries. Handlers that ran just before the crash may run again (at-least-once), one per
    sender at most, since their success could not be recorded."""
    server = RedisServer()
    server.start()
    try:
        receiver = Receiver(SECRET, store=RedisStore(server.url))
        handled: Counter[str] = Counter()
        lock = threading.Lock()
        crash_now, crashed = threading.Event(), threading.Event()

        @receiver.on("run.completed")
        def save(event: RunCompleted) -> None:
            with lock:
                handled[event.data.run_id] += 1
                if sum(handled.values()) >= 50:
                    crash_now.set()
            if crash_now.is_set():
                crashed.wait(30)  # in flight when Redis dies: completion cannot be recorded

        senders, per_sender = 4, 50
        statuses: Counter[int] = Counter()
        retry_after_missing: list[int] = []
        run_ids = [f"run_{i:04d}" for i in range(senders * per_sender)]

        def sender(mine: list[str]) -> None:
            deadline = time.monotonic() + 60
            for run_id in mine:
                req = signed_request(make_event("run.completed", run_id=run_id), SECRET)
                for _ in range(5000):
                    assert time.monotonic() < deadline, "sender gave up"
                    response = receiver.handle(req.body, req.headers)
                    with lock:
                        statuses[response.status] += 1
                    if response.ok:
                        break
                    if "Retry-After" not in response.headers:
                        retry_after_missing.append(response.status)
                    time.sleep(0.005)

        threads = [
            threading.Thread(target=sender, args=(run_ids[i::senders],)) for i in range(senders)
        ]
        for thread in threads:
            thread.start()
        assert crash_now.wait(30)
        server.kill()
        crashed.set()
        deadline = time.monotonic() + 30
        while statuses[503] < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.start()  # same port, empty
        for thread in threads:
            thread.join(90)
        assert not any(thread.is_alive() for thread in threads)

        assert statuses[503] >= 40
        assert set(statuses) <= {200, 503}
        assert retry_after_missing == []
        assert sorted(handled) == run_ids  # nothing lost
        again = [run_id for run_id, n in handled.items() if n > 1]
        assert len(again) <= senders
        assert all(handled[run_id] == 2 for run_id in again)
    finally:
        server.stop()


@pytest.mark.parametrize("store", ["sqlite", "redis", "postgres"])
def test_a_worker_killed_inside_its_handler(
    store: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The dead worker's claim blocks the event (409) until its lease ends; then the
    sender's retry runs the handler elsewhere."""
    if store == "redis":
        url = request.getfixturevalue("redis_url")
    elif store == "postgres":
        url = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite:///{tmp_path}/deliveries.sqlite3"
    lease = 4.0  # ample for the checks made while the dead worker still holds the claim
    req = signed_request(make_event("run.completed", run_id="run_killed"), SECRET)
    request_file, started = tmp_path / "request.json", tmp_path / "started.txt"
    request_file.write_bytes(req.body)
    Path(f"{request_file}.sig").write_text(req.headers["X-FlyMyAI-Signature"])
    argv = [PYTHON, "-m", "tests.delivery.workers", url, str(request_file), str(started)]
    worker = subprocess.Popen([*argv, str(lease)], cwd=ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not started.exists() and worker.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert started.read_text().split() == ["run_killed"]
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(10)
    finally:
        stop(worker)

    from flymy_receiver.stores import store_from_url

    receiver = Receiver(SECRET, store=store_from_url(url))
    calls: list[str] = []
    receiver.on("run.completed")(lambda event: calls.append(event.data.run_id))
    statuses = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        response = receiver.handle(req.body, req.headers)
        statuses.append(response.status)
        if response.ok:
            break
        assert 1 <= int(response.headers["Retry-After"]) <= lease + 1
        time.sleep(0.2)
    assert statuses[0] == 409  # the claim outlived its worker...
    assert set(statuses[:-1]) == {409}
    assert statuses[-1] == 200  # ...but not its lease
    assert calls == ["run_killed"]
    assert receiver.handle(req.body, req.headers).body == b'{"received":true,"duplicate":true}'


def test_a_claim_that_timed_out_on_a_stalled_redis_leaves_no_lock() -> None:
    """Redis stalls (``DEBUG SLEEP 3``) past the client's 1 s timeout: the claim is answered
    503, yet the server runs it when it wakes. The store gives that claim up, so the sender's
    retry runs the handler instead of getting 409 for the whole five-minute lease."""
    import redis

    with running_redis("--enable-debug-command", "local") as server:
        store = RedisStore(server.url)
        receiver = Receiver(SECRET, store=store, lease=timedelta(minutes=5))
        calls: list[str] = []
        receiver.on("run.completed")(lambda event: calls.append(event.data.run_id))
        warm = signed_request(make_event("run.completed", run_id="run_warm"), SECRET)
        assert receiver.handle(warm.body, warm.headers).status == 200  # scripts loaded
        calls.clear()
        req = signed_request(make_event("run.completed", run_id="run_stalled"), SECRET)

        sleeper = server.client()
        stall = threading.Thread(target=sleeper.execute_command, args=("DEBUG", "SLEEP", "3"))
        probe = redis.Redis.from_url(server.url, socket_timeout=0.2)
        stall.start()
        try:
            for _ in range(50):  # until the server is seen stalled
                try:
                    probe.ping()
                except redis.TimeoutError:
                    break
                time.sleep(0.02)
            else:
                pytest.fail("redis never stalled")
            stalled = receiver.handle(req.body, req.headers)
        finally:
            stall.join(30)
            sleeper.close()
            probe.close()
        assert stalled.status == 503
        assert calls == []

        statuses = []
        deadline = time.monotonic() + 30  # far below the lease
        while time.monotonic() < deadline:
            response = receiver.handle(req.body, req.headers)
            statuses.append(response.status)
            if response.ok:
                break
            time.sleep(0.1)
        assert statuses[-1] == 200, statuses
        assert calls == ["run_stalled"]
        entry = store.journal_get("run_stalled")
        assert entry is not None
        assert entry.state == "handled"
        # The stalled claim did run on the server: it counted an attempt.
        assert entry.attempts == len(statuses) + 1
