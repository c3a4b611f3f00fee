"""PostgresStore on a real PostgreSQL server: outages, stalls, races, processes, privileges.

The shared store and journal contracts run against it too (tests/stores/backends.py); these
tests cover what only PostgreSQL has. Stalls and outages are bounded: a call that would hang
runs in a thread joined with a deadline, so a regression fails instead of hanging.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import pytest

from flymy_receiver import Receiver
from flymy_receiver.errors import StoreUnavailable
from flymy_receiver.stores import ClaimState, PostgresStore, store_from_url
from flymy_receiver.stores.records import HandlerOutcome, NewEntry, Refusal
from flymy_receiver.testing import make_event, signed_request
from tests.conftest import SECRET, require
from tests.postgres_server import PostgresServer
from tests.servers import free_port
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


# -- statements sent with the server's own placeholders --------------------------------------


def test_named_placeholders_become_numbered_ones_each_name_once() -> None:
    from flymy_receiver.stores.postgres_pool import native

    text, names = native("SELECT %(a)s, %(b)s, %(a)s::text, '100%%' WHERE %(b)s")
    assert text == b"SELECT $1, $2, $1::text, '100%' WHERE $2"
    assert names == ("a", "b")
    assert native("SELECT 1") == (b"SELECT 1", ())
    with pytest.raises(ValueError, match="lone %"):
        native("SELECT 5 % 2")


def test_every_statement_of_the_store_has_its_placeholders_numbered(server: PostgresServer) -> None:
    from flymy_receiver.stores.postgres_pool import native

    store = _store(server)
    for name in type(store._q).__slots__:
        text, names = native(getattr(store._q, name))
        assert b"%(" not in text, name
        assert len(names) == len(set(names)), name
        assert all(f"${n}".encode() in text for n in range(1, len(names) + 1)), name
    store.close()
