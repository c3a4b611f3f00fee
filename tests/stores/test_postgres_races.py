"""PostgresStore on a real PostgreSQL server: races between receivers, a server stopped
mid-traffic, forked and gunicorn workers (the other half of tests/stores/test_postgres.py)."""

from __future__ import annotations

import multiprocessing
import random
import sqlite3
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from flymy_receiver import Receiver, RunCompleted
from flymy_receiver.stores import ClaimState, PostgresStore
from tests.conftest import SECRET, require
from tests.postgres_server import PostgresServer
from tests.servers import EXAMPLES, free_port, gunicorn, post, serve, server_log

require("psycopg")

pytestmark = pytest.mark.postgres

from tests.stores.test_postgres import (  # noqa: E402 - the shared helpers of both files
    _idle_in_transaction,
    _locks_on,
    _request,
    _schema,
    _store,
    _until,
    server,
)

__all__ = ["server"]  # the fixture, shared with tests/stores/test_postgres.py


# -- races ----------------------------------------------------------------------------------


def test_two_receivers_with_eight_threads_each_race_duplicates(server: PostgresServer) -> None:
    """16 threads on 2 receivers (2 stores, 2 pools) deliver the same 40 events at once,
    retrying 409s like the sender: each of the 2 handlers runs once per event, and the
    journal counts every delivery."""
    schema = _schema()
    stores = [_store(server, schema=schema, timeout=10) for _ in range(2)]
    calls: Counter[tuple[str, str]] = Counter()
    deliveries: Counter[str] = Counter()
    lock = threading.Lock()
    receivers = []
    for store in stores:
        receiver = Receiver(SECRET, store=store)

        @receiver.on("run.completed")
        def save(event: RunCompleted) -> None:
            time.sleep(random.uniform(0, 0.003))  # widen the window for collisions
            with lock:
                calls[("save", event.data.run_id)] += 1

        @receiver.on("run.completed")
        def notify(event: RunCompleted) -> None:
            with lock:
                calls[("notify", event.data.run_id)] += 1

        receivers.append(receiver)
    run_ids = [f"run_{i:03d}" for i in range(40)]
    requests = [_request(run_id) for run_id in run_ids]
    threads_per_receiver = 8
    barrier = threading.Barrier(2 * threads_per_receiver, timeout=60)
    statuses: Counter[int] = Counter()

    def deliver(receiver: Receiver, seed: int) -> None:
        order = list(zip(run_ids, requests, strict=True))
        random.Random(seed).shuffle(order)
        barrier.wait()
        deadline = time.monotonic() + 120
        for run_id, (body, headers) in order:
            while True:
                assert time.monotonic() < deadline, "deliveries did not finish"
                response = receiver.handle(body, headers)
                with lock:
                    statuses[response.status] += 1
                    deliveries[run_id] += 1
                if response.ok:
                    break
                assert response.status == 409
                time.sleep(0.005)

    with ThreadPoolExecutor(2 * threads_per_receiver) as pool:
        futures = [
            pool.submit(deliver, receivers[i % 2], i) for i in range(2 * threads_per_receiver)
        ]
        for future in futures:
            future.result(timeout=180)

    assert calls == Counter({(h, r): 1 for h in ("save", "notify") for r in run_ids})
    assert set(statuses) <= {200, 409}
    assert statuses[200] == len(run_ids) * 2 * threads_per_receiver
    for run_id in run_ids:
        entry = stores[0].journal_get(run_id)
        assert entry is not None
        assert entry.state == "handled"
        assert entry.attempts == deliveries[run_id]  # every delivery counted, none lost
        assert len(entry.handlers) == 2
        assert all(outcome.ok for outcome in entry.handlers.values())
    assert _locks_on(server, schema) == []
    for store in stores:
        store.close()


def test_first_use_by_many_stores_at_once_creates_the_tables_once(server: PostgresServer) -> None:
    schema = _schema()
    stores = [_store(server, schema=schema, timeout=10) for _ in range(4)]
    barrier = threading.Barrier(16, timeout=60)

    def first_call(i: int) -> ClaimState:
        barrier.wait()
        return stores[i % 4].claim(f"key-{i}", 30).state

    with ThreadPoolExecutor(16) as pool:
        states = list(pool.map(first_call, range(16), timeout=120))
    assert states == [ClaimState.ACQUIRED] * 16
    for store in stores:
        store.close()


# -- outages --------------------------------------------------------------------------------


def test_postgres_stopped_mid_traffic_and_restarted(server: PostgresServer) -> None:
    """503 while PostgreSQL is down, no event lost: every event is handled once the sender
    retries. The handlers in flight when it stopped could not record their success, so they
    run again once their lease ends (at-least-once), one per sender at most."""
    store = _store(server)
    schema = store.schema
    receiver = Receiver(SECRET, store=store, lease=timedelta(seconds=2))
    handled: Counter[str] = Counter()
    lock = threading.Lock()
    stop_now, stopped = threading.Event(), threading.Event()

    @receiver.on("run.completed")
    def save(event: RunCompleted) -> None:
        with lock:
            handled[event.data.run_id] += 1
            if sum(handled.values()) >= 40:
                stop_now.set()
        if stop_now.is_set():
            stopped.wait(30)  # in flight when the server stops: success cannot be recorded

    senders, per_sender = 4, 40
    statuses: Counter[int] = Counter()
    retry_after_missing: list[int] = []
    run_ids = [f"run_{i:04d}" for i in range(senders * per_sender)]
    errors: list[BaseException] = []

    def sender(mine: list[str]) -> None:
        try:
            deadline = time.monotonic() + 120
            for run_id in mine:
                body, headers = _request(run_id)
                while True:
                    assert time.monotonic() < deadline, "sender gave up"
                    response = receiver.handle(body, headers)
                    with lock:
                        statuses[response.status] += 1
                    if response.ok:
                        break
                    if "Retry-After" not in response.headers:
                        retry_after_missing.append(response.status)
                    time.sleep(0.02)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(run_ids[i::senders],)) for i in range(senders)]
    for thread in threads:
        thread.start()
    try:
        assert stop_now.wait(60)
        server.stop()
        stopped.set()
        assert _until(lambda: statuses[503] >= 8, limit=60)
    finally:
        stopped.set()
        server.start()  # same port, same data
    for thread in threads:
        thread.join(150)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []

    assert statuses[503] >= 8
    assert set(statuses) <= {200, 409, 503}  # 409: a claim that outlived its worker's call
    assert retry_after_missing == []
    assert sorted(handled) == run_ids  # nothing lost
    again = [run_id for run_id, n in handled.items() if n > 1]
    assert len(again) <= senders
    assert all(handled[run_id] == 2 for run_id in again)
    # Nothing locked, nothing pending: every event is done and journaled as handled.
    assert _until(lambda: _locks_on(server, schema) == [])
    assert _idle_in_transaction(server) == 0
    assert all(
        store.claim(key, 30).state is ClaimState.DONE
        for key in (f"run.completed:{run_id}" for run_id in run_ids)
    )
    states = Counter(e.state for e in store.journal_list(limit=1000))
    assert states == Counter({"handled": len(run_ids)})
    store.close()


# -- processes ------------------------------------------------------------------------------


def _claim_in_child(store: PostgresStore, key: str, results: Any) -> None:
    try:
        claim = store.claim(key, 60)
        store.complete(key, claim.token, 60)
        results.put(claim.state.value)
    except BaseException as exc:  # the parent reports it
        results.put(f"error: {exc!r}")


def test_a_forked_worker_opens_its_own_connections(server: PostgresServer) -> None:
    """gunicorn imports the app, then forks: the child must not use the parent's pool."""
    store = _store(server, timeout=10)
    parent = store.claim("parent", 60)  # the parent now has a pool and a connection
    context = multiprocessing.get_context("fork")
    results: Any = context.Queue()
    child = context.Process(target=_claim_in_child, args=(store, "child", results))
    child.start()
    try:
        assert results.get(timeout=60) == "acquired"
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    assert store.claim("child", 60).state is ClaimState.DONE
    store.complete("parent", parent.token, 60)  # the parent's connections still work
    assert store.claim("parent", 60).state is ClaimState.DONE
    store.close()


@pytest.mark.e2e
def test_gunicorn_with_four_workers_races_duplicates(
    server: PostgresServer, tmp_path: Path
) -> None:
    """The Flask example on PostgreSQL under gunicorn -w 4: every event is sent by 8
    connections at once; each is acknowledged by all 8 and written by its handler once."""
    require("gunicorn")
    require("flask")
    store_url = server.create_database()
    leads_db = tmp_path / "leads.sqlite3"
    env = {"FLYMY_WEBHOOK_SECRET": SECRET, "FLYMY_STORE": store_url, "LEADS_DB": str(leads_db)}
    port = free_port()
    events, senders = 30, 8
    run_ids = [f"run_{i:03d}" for i in range(events)]
    requests = [_request(run_id) for run_id in run_ids]
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    barrier = threading.Barrier(senders, timeout=60)

    def deliver(body: bytes, headers: dict[str, str]) -> None:
        barrier.wait()  # all 8 copies of the event leave together
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, "never acknowledged"
            status, _ = post(port, body, headers)
            with lock:
                statuses[status] += 1
            if status == 200:
                return
            assert status == 409, status
            time.sleep(0.01)

    with serve(gunicorn("flask_app:app", port, workers=4), port, env=env, cwd=EXAMPLES) as proc:
        with ThreadPoolExecutor(senders) as pool:
            for body, headers in requests:
                futures = [pool.submit(deliver, body, headers) for _ in range(senders)]
                for future in futures:
                    future.result(timeout=120)
        log = server_log(proc)
    assert statuses[200] == events * senders
    assert set(statuses) <= {200, 409}
    with sqlite3.connect(leads_db) as db:
        rows = Counter(r for (r,) in db.execute("SELECT run_id FROM leads"))
    assert rows == Counter(dict.fromkeys(run_ids, 1))
    assert "Traceback" not in log
    journal = PostgresStore(store_url)
    entries = [journal.journal_get(run_id) for run_id in run_ids]
    assert {e.state if e is not None else None for e in entries} == {"handled"}
    journal.close()
