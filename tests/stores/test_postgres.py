"""PostgresStore on a real PostgreSQL server: outages, stalls, races, processes, privileges.

The shared store and journal contracts run against it too (tests/stores/backends.py); these
tests cover what only PostgreSQL has. Stalls and outages are bounded: a call that would hang
runs in a thread joined with a deadline, so a regression fails instead of hanging.
"""

from __future__ import annotations

import logging
import multiprocessing
import random
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from flymy_receiver import Receiver, RunCompleted
from flymy_receiver.errors import StoreUnavailable
from flymy_receiver.stores import ClaimState, PostgresStore, store_from_url
from flymy_receiver.stores.records import HandlerOutcome, NewEntry, Refusal
from flymy_receiver.testing import make_event, signed_request
from tests.conftest import SECRET, require
from tests.postgres_server import PostgresServer
from tests.servers import EXAMPLES, free_port, gunicorn, post, serve, server_log
from tests.stores.backends import FakeClock

require("psycopg")
import psycopg  # noqa: E402 - after the check that it is installed
from psycopg import sql  # noqa: E402

pytestmark = pytest.mark.postgres

#: A short timeout, so that outages are answered quickly in these tests.
TIMEOUT = 1.0
#: How long a call may take when the server is unreachable or stalled, with TIMEOUT: the
#: pool's wait, then the client-side deadline; generous, since machines are noisy. This
#: checks that the wait is bounded at all (unbounded, it would hang for minutes).
BOUND = 15.0


@pytest.fixture
def server(postgres_server: PostgresServer) -> Iterator[PostgresServer]:
    """The session's server, running; started and thawed again whatever the test did."""
    postgres_server.thaw()
    postgres_server.start()
    yield postgres_server
    postgres_server.thaw()
    postgres_server.start()


def _schema() -> str:
    return f"t_{uuid.uuid4().hex[:16]}"


def _store(server: PostgresServer, **kwargs: Any) -> PostgresStore:
    kwargs.setdefault("schema", _schema())
    kwargs.setdefault("timeout", TIMEOUT)
    return PostgresStore(server.url, **kwargs)


def _in_thread(call: Callable[[], Any], limit: float = 60.0) -> tuple[Any, float]:
    """Run ``call`` in a thread; its result or exception, and how long it took."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:
            outcome.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"the call did not return within {limit}s"
    return outcome[0], time.monotonic() - started


def _until(check: Callable[[], bool], limit: float = 20.0) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


def _table(store: PostgresStore, name: str) -> sql.Identifier:
    return sql.Identifier(store.schema, name)


def _locks_on(server: PostgresServer, schema: str) -> list[tuple[Any, ...]]:
    """Locks that other sessions hold on the tables of ``schema``."""
    with psycopg.connect(server.url, autocommit=True) as conn:
        return conn.execute(
            "SELECT l.pid, c.relname, l.mode FROM pg_locks l"
            " JOIN pg_class c ON c.oid = l.relation"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND l.pid <> pg_backend_pid()",
            (schema,),
        ).fetchall()


def _idle_in_transaction(server: PostgresServer) -> int:
    with psycopg.connect(server.url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = 'flymy_receiver' AND state LIKE 'idle in transaction%'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def _request(run_id: str) -> tuple[bytes, dict[str, str]]:
    req = signed_request(make_event("run.completed", run_id=run_id), SECRET)
    return req.body, req.headers


# -- construction, URLs, passwords ------------------------------------------------------------


def test_constructing_touches_no_server_and_the_first_call_is_a_quick_503(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"postgresql://app:hunter2@127.0.0.1:{free_port()}/app"
    store = PostgresStore(url, timeout=TIMEOUT)  # nothing listens there: no error yet
    assert "hunter2" not in repr(store)
    assert repr(store) == f"PostgresStore('{url.replace(':hunter2', '')}', schema='public')"
    for call in (
        lambda: store.claim("k", 30),
        lambda: store.mark_handler_done("k", "t", "h", 60),
        lambda: store.complete("k", "t", 60),
        lambda: store.release("k", "t"),
        lambda: store.journal_get("k"),
        lambda: store.refusals(),
    ):
        caught, took = _in_thread(call)
        assert isinstance(caught, StoreUnavailable)
        assert caught.status == 503
        assert "hunter2" not in str(caught)
        assert took < BOUND
    receiver = Receiver(SECRET, store=store)
    receiver.on("run.completed")(lambda event: None)
    body, headers = _request("run_unreachable")
    response, took = _in_thread(lambda: receiver.handle(body, headers))
    assert response.status == 503
    assert response.headers["Retry-After"] == "5"
    assert took < BOUND
    assert "hunter2" not in caplog.text
    store.close()


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:hunter2@127.0.0.1:5432/app?bogus=1",
        "postgresql://app:hunter2@127.0.0.1:notaport/app",
        "host=127.0.0.1 password=hunter2 bogus",
        "host=127.0.0.1 password='hunter2",
    ],
)
def test_a_malformed_url_is_an_error_without_the_password(url: str) -> None:
    with pytest.raises(ValueError) as caught:
        PostgresStore(url)
    assert "hunter2" not in str(caught.value)
    assert "hunter2" not in repr(caught.value)


def test_store_from_url_knows_both_schemes_and_hides_the_password() -> None:
    for scheme in ("postgresql", "postgres", "POSTGRESQL"):
        store = store_from_url(f"{scheme}://app:hunter2@db.internal:5433/leads")
        assert isinstance(store, PostgresStore)
        assert store.blocking is True
        assert "hunter2" not in repr(store)
        assert "db.internal:5433/leads" in repr(store)


@pytest.mark.parametrize("kwargs", [{"timeout": 0}, {"timeout": float("nan")}, {"schema": ""}])
def test_bad_settings_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        PostgresStore("postgresql://127.0.0.1/app", **kwargs)


def test_a_wrong_password_is_one_clear_error_without_the_password(
    server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server.psql(
        "DO $$ BEGIN CREATE ROLE pw_user LOGIN PASSWORD 'right'; EXCEPTION WHEN"
        " duplicate_object THEN NULL; END $$"
    )
    hba = server.data / "pg_hba.conf"
    original = hba.read_text()
    hba.write_text("host all pw_user 127.0.0.1/32 scram-sha-256\n" + original)
    server.psql("SELECT pg_reload_conf()")
    try:
        url = f"postgresql://pw_user:hunter2@127.0.0.1:{server.port}/postgres"
        store = PostgresStore(url, timeout=TIMEOUT)
        for _ in range(2):  # the same one error each time, not the pool's retries
            caught, _ = _in_thread(lambda: store.claim("k", 30))
            assert isinstance(caught, StoreUnavailable)
            assert "password authentication failed" in str(caught)  # the cause, named...
            assert "hunter2" not in str(caught)  # ...without the password
        assert "hunter2" not in caplog.text
        # No pool retrying in the background: no warnings, no PoolTimeout.
        assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
        assert "PoolTimeout" not in caplog.text
        store.close()
    finally:
        hba.write_text(original)
        server.psql("SELECT pg_reload_conf()")


# -- stalls ---------------------------------------------------------------------------------


def test_a_table_locked_elsewhere_is_503_within_seconds_and_then_works(
    server: PostgresServer,
) -> None:
    store = _store(server)
    schema = store.schema
    assert store.claim("warm", 30).state is ClaimState.ACQUIRED  # tables exist now
    blocker = psycopg.connect(server.url)
    try:
        lock = sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE")
        blocker.execute(lock.format(_table(store, "flymy_deliveries")))
        caught, took = _in_thread(lambda: store.claim("k", 30))
        assert isinstance(caught, StoreUnavailable)
        assert took < BOUND
        receiver = Receiver(SECRET, store=store)
        receiver.on("run.completed")(lambda event: None)
        body, headers = _request("run_locked")
        response, took = _in_thread(lambda: receiver.handle(body, headers))
        assert response.status == 503
        assert took < BOUND
    finally:
        blocker.rollback()
        blocker.close()
    assert store.claim("k", 30).state is ClaimState.ACQUIRED  # nothing of the failed try left
    assert receiver.handle(body, headers).status == 200
    assert _locks_on(server, schema) == []
    store.close()


def test_a_row_held_by_a_stuck_transaction_is_503_not_a_hang(server: PostgresServer) -> None:
    store = _store(server)
    store.claim("held", 0.001)  # its row stays, expired: the next claim must update it
    time.sleep(0.05)
    stuck = psycopg.connect(server.url)
    try:
        query = sql.SQL("SELECT * FROM {} WHERE key = %s FOR UPDATE")
        stuck.execute(query.format(_table(store, "flymy_deliveries")), ("held",))
        caught, took = _in_thread(lambda: store.claim("held", 30))
        assert isinstance(caught, StoreUnavailable)
        assert took < BOUND
    finally:
        stuck.rollback()
        stuck.close()
    assert store.claim("held", 30).state is ClaimState.ACQUIRED
    store.close()


def test_a_frozen_server_is_503_within_seconds_and_leaves_nothing_locked(
    server: PostgresServer,
) -> None:
    """SIGSTOP on every server process: TCP still accepts, nothing answers. The store cuts
    its connection at its deadline; the server, once it wakes, rolls the claim back."""
    store = _store(server)
    schema = store.schema
    receiver = Receiver(SECRET, store=store)
    calls: list[str] = []
    receiver.on("run.completed")(lambda event: calls.append(event.data.run_id))
    body, headers = _request("run_frozen")
    assert store.claim("warm", 30).state is ClaimState.ACQUIRED  # a pooled connection exists
    server.freeze()
    try:
        response, took = _in_thread(lambda: receiver.handle(body, headers))
        assert response.status == 503
        assert took < BOUND
        caught, took = _in_thread(lambda: store.journal_list())
        assert isinstance(caught, StoreUnavailable)
        assert took < BOUND
    finally:
        server.thaw()
    assert calls == []
    assert _until(lambda: receiver.handle(body, headers).status == 200)
    assert calls == ["run_frozen"]  # not blocked for the lease by the cut delivery's claim
    assert _until(lambda: _locks_on(server, schema) == [])
    assert _idle_in_transaction(server) == 0
    store.close()


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


# -- the rest -------------------------------------------------------------------------------


def test_keys_no_postgres_text_can_hold_still_work(server: PostgresServer) -> None:
    """PostgreSQL text cannot hold NUL: such keys are stored hashed, distinct and stable."""
    store = _store(server)
    a, b = "run.completed:a\x00b", "run.completed:a\x00c"
    claim = store.claim(a, 30, _entry(a, run_id="a\x00b", agent_name="x\x00y"))
    assert claim.state is ClaimState.ACQUIRED
    assert store.claim(b, 30).state is ClaimState.ACQUIRED
    assert store.claim("run.completed:a\ufffdb", 30).state is ClaimState.ACQUIRED
    store.complete(a, claim.token, 60, {"h\x00": _outcome_with_nul()})
    assert store.claim(a, 30).state is ClaimState.DONE
    entry = store.journal_get(a)
    assert entry is not None
    assert entry.state == "handled"
    assert entry.agent_name == "x\ufffdy"
    assert "\x00" not in entry.handlers["h\ufffd"].error  # type: ignore[operator]
    store.close()


def _entry(key: str, run_id: str = "run_x", agent_name: str = "agent") -> NewEntry:
    body = b'{"event":"run.completed"}'
    return NewEntry(key, "run.completed", run_id, "agent_1", agent_name, body, {}, 3600.0)


def _outcome_with_nul() -> HandlerOutcome:
    return HandlerOutcome(ok=False, error="ValueError: bad \x00 byte", traceback="tb\x00", at=1.0)


def test_a_clock_of_our_own_replaces_the_servers(server: PostgresServer) -> None:
    clock = FakeClock()
    store = _store(server, clock=clock)
    dead = store.claim("k", 30)
    assert store.claim("k", 30).state is ClaimState.BUSY
    clock.advance(30)  # no waiting: the lease ends on our clock
    again = store.claim("k", 30)
    assert again.state is ClaimState.ACQUIRED
    assert again.token != dead.token
    store.claim("j", 30, _entry("j"))
    entry = store.journal_get("j")
    assert entry is not None
    assert entry.received_at.timestamp() == pytest.approx(clock.now)
    store.close()


def test_expired_rows_are_purged_in_bounded_batches(
    server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flymy_receiver.stores import postgres

    monkeypatch.setattr(postgres, "_PURGE_BATCH", 50)
    clock = FakeClock()
    store = _store(server, clock=clock)
    for i in range(120):
        key = f"k{i}"
        claim = store.claim(key, 10, _entry(key, run_id=f"r{i}"))
        store.mark_handler_done(key, claim.token, "h", 10)
        if i % 2:
            store.release(key, claim.token)  # the others' workers died holding the claim
    clock.advance(5000)  # every claim, handler record and entry (3600 s) has expired
    assert store.journal_list() == []  # invisible at once, whether purged or not
    gone, more = store._purge_batch()
    assert (gone, more) == (150, True)  # one batch: at most 50 rows of each table
    assert store.purge() == 60 + 120 + 120 - 150
    assert store.purge() == 0
    with psycopg.connect(server.url) as conn:
        for table in ("flymy_deliveries", "flymy_handlers", "flymy_journal"):
            query = sql.SQL("SELECT count(*) FROM {}").format(_table(store, table))
            row = conn.execute(query).fetchone()
            assert row == (0,)
    store.close()


def test_the_periodic_purge_keeps_up_without_being_asked(server: PostgresServer) -> None:
    clock = FakeClock()
    store = _store(server, clock=clock)
    for i in range(50):
        store.complete(f"old{i}", store.claim(f"old{i}", 10).token, 10)
    clock.advance(100)
    for i in range(150):  # 300 more writes: the purge runs every 100 writes of a process
        store.complete(f"new{i}", store.claim(f"new{i}", 10).token, 1000)
    with psycopg.connect(server.url) as conn:
        query = sql.SQL("SELECT count(*) FROM {} WHERE key LIKE %s")
        row = conn.execute(query.format(_table(store, "flymy_deliveries")), ("old%",)).fetchone()
    assert row == (0,)
    store.close()


def test_refusals_are_bounded(server: PostgresServer) -> None:
    store = _store(server, max_refusals=3)
    now = datetime.now(timezone.utc)
    for i in range(10):
        store.record_refusal(Refusal(now, 401, "bad_signature", f"hint {i}" + "x" * 5000))
    found = store.refusals(limit=100)
    assert [r.detail[:6] for r in found] == ["hint 9", "hint 8", "hint 7"]
    assert all(len(r.detail) <= 1000 for r in found)
    store.close()


def test_a_pool_of_our_own_is_used_and_left_open(server: PostgresServer) -> None:
    from psycopg_pool import ConnectionPool

    pool: ConnectionPool[Any] = ConnectionPool(server.url, min_size=1, max_size=2, open=True)
    try:
        store = PostgresStore(pool, schema=_schema(), timeout=TIMEOUT)
        assert "pool=" in repr(store)
        claim = store.claim("k", 30)
        store.complete("k", claim.token, 60)
        assert store.claim("k", 30).state is ClaimState.DONE
        # Its timeouts are set per transaction, even on a pool that does not set them.
        blocker = psycopg.connect(server.url)
        try:
            blocker.execute(sql.SQL("LOCK TABLE {}").format(_table(store, "flymy_deliveries")))
            caught, took = _in_thread(lambda: store.claim("j", 30))
            assert isinstance(caught, StoreUnavailable)
            assert took < BOUND
        finally:
            blocker.rollback()
            blocker.close()
        store.close()  # not ours to close
        with pool.connection() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        pool.close()


def test_tables_made_by_a_migration_work_without_the_create_privilege(
    server: PostgresServer,
) -> None:
    """An application user that may not CREATE: the tables come from ``schema_sql()``."""
    schema = _schema()
    maker = PostgresStore(server.url, schema=schema)
    role = f"app_{uuid.uuid4().hex[:8]}"
    server.psql(
        f'CREATE SCHEMA "{schema}"; {maker.schema_sql()}'
        f'CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA "{schema}" TO {role};'
        f' GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "{schema}" TO {role};'
    )
    url = f"postgresql://{role}@127.0.0.1:{server.port}/postgres"
    store = PostgresStore(url, schema=schema, timeout=TIMEOUT)
    claim = store.claim("k", 30, _entry("k"))
    assert claim.state is ClaimState.ACQUIRED
    store.complete("k", claim.token, 60, {})
    store.record_refusal(Refusal(datetime.now(timezone.utc), 401, "bad_signature"))
    assert store.journal_get("k") is not None
    assert len(store.refusals()) == 1
    store.close()


def test_after_a_restart_the_first_call_works_on_fresh_connections(
    server: PostgresServer,
) -> None:
    """The pool still holds connections the restart closed: they are replaced on the spot,
    not answered 503 one by one."""
    store = _store(server, timeout=10)
    barrier = threading.Barrier(6, timeout=60)

    def busy(i: int) -> None:
        barrier.wait()  # six calls at once: the pool grows to six connections
        store.claim(f"before-{i}", 30)
        time.sleep(0.2)
        store.claim(f"before-{i}-again", 30)

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(busy, range(6), timeout=60))
    server.stop()
    server.start()
    assert store.claim("after", 30).state is ClaimState.ACQUIRED
    assert store.claim("before-0", 30).state is ClaimState.BUSY  # the data outlived the restart
    store.close()
