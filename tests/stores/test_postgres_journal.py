"""PostgresStore's journal on a real server: round trips, lost answers, long run ids, summaries,
stalled entries, schema names, upgrades, ``create=False``, the byte limit and the plans.

The shared journal contract runs against it too (tests/stores/test_journal_contract.py);
these cover what only PostgreSQL has, each item of the second review with its regression
test (see the names).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from flymy_receiver import Receiver
from flymy_receiver.errors import StoreUnavailable
from flymy_receiver.stores import ClaimState, PostgresStore
from flymy_receiver.stores.records import HISTORY_LIMIT, Attempt, HandlerOutcome, NewEntry
from flymy_receiver.testing import make_event, signed_request
from tests.conftest import SECRET, require
from tests.postgres_server import PostgresServer
from tests.stores.pg_proxy import pg_proxy

require("psycopg")
import psycopg  # noqa: E402 - after the check that it is installed

pytestmark = pytest.mark.postgres

TIMEOUT = 1.0


@pytest.fixture
def server(postgres_server: PostgresServer) -> PostgresServer:
    postgres_server.thaw()
    postgres_server.start()
    return postgres_server


def _schema() -> str:
    return f"t_{uuid.uuid4().hex[:16]}"


def _store(url: str, **kwargs: Any) -> PostgresStore:
    kwargs.setdefault("schema", _schema())
    kwargs.setdefault("timeout", TIMEOUT)
    return PostgresStore(url, **kwargs)


def _entry(key: str, run_id: str = "run_x", body: bytes = b'{"event":"run.completed"}') -> NewEntry:
    return NewEntry(key, "run.completed", run_id, "agent_1", "agent", body, {}, 3600.0)


def _request(run_id: str) -> tuple[bytes, dict[str, str]]:
    req = signed_request(make_event("run.completed", run_id=run_id), SECRET)
    return req.body, req.headers


def _until(check: Callable[[], bool], limit: float = 20.0) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


# -- issue 21: round trips --------------------------------------------------------------------


def test_a_one_handler_delivery_costs_two_round_trips(
    server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted as the server's ReadyForQuery messages: the claim with its entry, then the
    completion with its outcome and the waiters' NOTIFY. Each extra handler adds one; a
    duplicate and an ignored event cost one. (The purge of expired rows, one statement per
    hundred writes, is left out here.)"""
    from flymy_receiver.stores import postgres

    monkeypatch.setattr(postgres, "_PURGE_EVERY", 10**9)
    with pg_proxy(server.port) as proxy:
        store = _store(proxy.url())
        one = Receiver(SECRET, store=store)
        one.on("run.completed")(lambda event: None)
        two = Receiver(SECRET, store=store, idempotency_key=lambda e: "two:" + e.data.run_id)
        two.on("run.completed", name="first")(lambda event: None)
        two.on("run.completed", name="second")(lambda event: None)
        none = Receiver(SECRET, store=store)

        def cost(receiver: Receiver, run_id: str) -> int:
            proxy.reset()
            assert receiver.handle(*_request(run_id)).status == 200
            return proxy.round_trips

        # The tables checked, the pool filled, and statements prepared on each connection
        # (psycopg prepares on the fifth run, which waits for the PREPARE once).
        for i in range(16):
            cost(one, f"warm_{i}")
            cost(two, f"warm_{i}")
            cost(none, f"warm_{i}")
        assert [cost(one, f"run_{i}") for i in range(5)] == [2] * 5
        # One round trip per handler record; the last handler's record is the completion's.
        marks: list[str] = []
        mark = store.mark_handler_done

        def counted_mark(*args: Any) -> None:
            marks.append(args[2])
            mark(*args)

        store.mark_handler_done = counted_mark  # type: ignore[method-assign]
        for i in range(5):
            marks.clear()
            assert cost(two, f"run_{i}") == 2 + len(marks) == 3
        assert [cost(one, f"run_{i}") for i in range(5)] == [1] * 5  # duplicates
        assert [cost(none, f"new_{i}") for i in range(5)] == [1] * 5  # ignored
        store.close()


# -- M2: a claim whose answer was lost ----------------------------------------------------------


def test_m2_a_claim_whose_answer_was_lost_never_holds_the_event(server: PostgresServer) -> None:
    """The server runs and commits the claim, then its answer never comes (withheld by the
    proxy): 503 at the deadline, and the claim is given up by its token once the server
    answers again, so the sender's retry is served at once, not refused for the lease."""
    with pg_proxy(server.port) as proxy:
        store = _store(proxy.url())
        receiver = Receiver(SECRET, store=store, lease=timedelta(minutes=10))
        calls: list[str] = []
        receiver.on("run.completed")(lambda event: calls.append(event.data.run_id))
        assert receiver.handle(*_request("run_warm")).status == 200

        def commits_the_claim(data: bytes, in_transaction: bool) -> bool:
            # In autocommit the claim statement commits itself; in a transaction, COMMIT.
            if in_transaction:
                return b"COMMIT" in data
            return b"flymy_deliveries" in data

        proxy.stall_after(commits_the_claim)
        body, headers = _request("run_lost")
        assert receiver.handle(body, headers).status == 503
        assert _until(lambda: receiver.handle(body, headers).status == 200)
        assert calls == ["run_warm", "run_lost"]
        entry = store.journal_get("run_lost")
        assert entry is not None
        assert entry.state == "handled"
        store.close()


def test_m2_a_given_up_claim_leaves_its_entry_stalled_not_pending(server: PostgresServer) -> None:
    store = _store(server.url)
    claim = store.claim("k", 600, _entry("k"))
    store._give_up_later("k", claim.token, 600, 0)  # no server process to wait for
    assert store._wait_given_up(20)
    entry = store.journal_get("k")
    assert entry is not None
    assert entry.state == "stalled"  # found by the failure views at once
    assert [a.outcome for a in entry.history] == ["unavailable"]
    assert store.claim("k", 600).state is ClaimState.ACQUIRED  # not held for the lease
    store.close()


# -- M3: a later delivery no handler wants ------------------------------------------------------


def test_m3_a_later_ignored_delivery_never_hides_a_failed_entry(server: PostgresServer) -> None:
    store = _store(server.url)
    claim = store.claim("k", 30, _entry("k", body=b'{"first":1}'))
    store.release("k", claim.token, {"h": HandlerOutcome(ok=False, error="E: x", at=1.0)})
    attempt = Attempt(time.time(), "sender", 200, "ignored")
    store.journal_ignore(_entry("k", body=b'{"other":2}'), attempt)
    entry = store.journal_get("k")
    assert entry is not None
    assert entry.state == "failed"
    assert entry.body == b'{"first":1}'  # the body the handlers ran on
    assert entry.attempts == 2
    assert entry.history[-1].outcome == "ignored"
    assert [e.key for e in store.journal_list(state="failed")] == ["k"]
    store.close()


# -- M5: summaries only ----------------------------------------------------------------------


def test_m5_lists_read_summaries_never_bodies(server: PostgresServer) -> None:
    store = _store(server.url)
    body = b'{"event":"run.completed","pad":"' + b"x" * 200_000 + b'"}'
    claim = store.claim("k", 30, _entry("k", body=body))
    store.complete("k", claim.token, 60, {"h": HandlerOutcome(ok=True, at=1.0)})
    listed = store.journal_list()
    assert [e.key for e in listed] == ["k"]
    assert listed[0].body is None
    assert listed[0].body_size == len(body)
    assert listed[0].history == ()
    assert listed[0].handlers["h"].ok
    entry = store.journal_get("k")
    assert entry is not None
    assert entry.body == body  # read when asked for
    store.close()


# -- M6: run ids of any length ------------------------------------------------------------------


def test_m6_a_run_id_of_any_length_is_journaled_and_found(server: PostgresServer) -> None:
    store = _store(server.url)
    receiver = Receiver(SECRET, store=store)
    calls: list[str] = []
    receiver.on("run.completed")(lambda event: calls.append(event.data.run_id))
    run_id = "run_" + "é" * 3000 + uuid.uuid4().hex  # about 6 KB, past a btree entry
    body, headers = _request(run_id)
    assert receiver.handle(body, headers).status == 200
    assert receiver.handle(body, headers).status == 200  # a duplicate, not a 503
    assert calls == [run_id]
    entry = store.journal_get(run_id)
    assert entry is not None
    assert entry.run_id == run_id
    assert entry.state == "handled"
    assert [e.run_id for e in store.journal_list(run_id=run_id)] == [run_id]
    assert store.journal_list(run_id=run_id[:-1] + "!") == []
    # A key past what an index entry holds is stored as its digest, the same each time.
    long_key = "k" * 10_000
    first = store.claim(long_key, 30, _entry(long_key, run_id))
    assert first.state is ClaimState.ACQUIRED
    assert store.claim(long_key, 30).state is ClaimState.BUSY
    store.close()


# -- L2: a worker that died --------------------------------------------------------------------


def test_l2_a_pending_entry_past_its_lease_is_stalled_and_listed_as_failed(
    server: PostgresServer,
) -> None:
    store = _store(server.url)
    store.claim("dead", 0.3, _entry("dead", "run_dead"))
    store.claim("alive", 600, _entry("alive", "run_alive"))
    time.sleep(0.5)
    entry = store.journal_get("dead")
    assert entry is not None
    assert entry.state == "stalled"
    assert [e.key for e in store.journal_list(state="failed")] == ["dead"]
    assert [e.key for e in store.journal_list(state="stalled")] == ["dead"]
    assert [e.key for e in store.journal_list(state="pending")] == ["alive"]
    again = store.claim("dead", 30, replay=True)  # a replay takes it
    assert again.state is ClaimState.ACQUIRED
    assert again.prior_state == "stalled"
    assert store.journal_list(state="failed") == []
    store.close()


# -- L10: any schema name ------------------------------------------------------------------


@pytest.mark.parametrize("schema", ["100%", "x%(key)s", 'a"b', "Ünïcode schema", "x$1 $2"])
def test_l10_any_schema_name_the_constructor_accepts_works(
    server: PostgresServer, schema: str
) -> None:
    store = _store(server.url, schema=schema + uuid.uuid4().hex[:8])
    receiver = Receiver(SECRET, store=store)
    receiver.on("run.completed")(lambda event: None)
    assert receiver.handle(*_request("run_1")).status == 200
    assert [e.state for e in store.journal_list()] == ["handled"]
    store.purge()
    store.close()


# -- create=False, and tables of the previous release ------------------------------------------


def test_create_false_refuses_missing_tables_and_creates_nothing(server: PostgresServer) -> None:
    schema = _schema()
    store = _store(server.url, schema=schema, create=False)
    for call in (lambda: store.journal_list(), lambda: store.journal_get("k")):
        with pytest.raises(StoreUnavailable) as caught:
            call()
        assert "do not exist" in str(caught.value)
        assert "create=False" in str(caught.value)
    found = server.psql(f"SELECT count(*) FROM pg_namespace WHERE nspname = '{schema}'")  # noqa: S608
    assert found.strip() == "0"
    store.close()


_PREVIOUS_DDL = """
CREATE SCHEMA {s};
CREATE TABLE {s}.flymy_deliveries (key text PRIMARY KEY, token text NOT NULL,
    done boolean NOT NULL, expires double precision NOT NULL);
CREATE INDEX flymy_deliveries_expires ON {s}.flymy_deliveries (expires);
CREATE TABLE {s}.flymy_handlers (key text NOT NULL, handler text NOT NULL,
    expires double precision NOT NULL, PRIMARY KEY (key, handler));
CREATE INDEX flymy_handlers_expires ON {s}.flymy_handlers (expires);
CREATE TABLE {s}.flymy_journal (key text PRIMARY KEY, event text NOT NULL, run_id text,
    agent_id text, agent_name text, state text NOT NULL, attempts integer NOT NULL,
    received_at double precision NOT NULL, updated_at double precision NOT NULL,
    retention double precision NOT NULL, expires double precision NOT NULL,
    body bytea NOT NULL, headers jsonb NOT NULL, handlers jsonb NOT NULL);
CREATE INDEX flymy_journal_received ON {s}.flymy_journal (received_at);
CREATE INDEX flymy_journal_run ON {s}.flymy_journal (run_id, received_at);
CREATE INDEX flymy_journal_state ON {s}.flymy_journal (state, received_at);
CREATE INDEX flymy_journal_expires ON {s}.flymy_journal (expires);
CREATE TABLE {s}.flymy_refusals (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at double precision NOT NULL, status integer NOT NULL, reason text NOT NULL,
    detail text NOT NULL);
INSERT INTO {s}.flymy_journal VALUES ('run.completed:run_old', 'run.completed', 'run_old',
    'agent_1', 'agent', 'failed', 2, extract(epoch FROM now()) - 10,
    extract(epoch FROM now()) - 5, 3600, extract(epoch FROM now()) + 3600,
    '{{"old": true}}', '{{}}', '{{"h": {{"ok": false, "error": "E: x", "at": 1.0}}}}');
"""


def test_tables_of_the_previous_release_are_upgraded_in_place(server: PostgresServer) -> None:
    schema = _schema()
    server.psql(_PREVIOUS_DDL.format(s=f'"{schema}"'))
    read_only = _store(server.url, schema=schema, create=False)
    with pytest.raises(StoreUnavailable) as caught:
        read_only.journal_get("run_old")
    assert "older version" in str(caught.value)
    read_only.close()
    store = _store(server.url, schema=schema)
    old = store.journal_get("run_old")
    assert old is not None
    assert (old.state, old.attempts, old.body, old.history) == ("failed", 2, b'{"old": true}', ())
    assert old.body_size == len(b'{"old": true}')
    assert [e.key for e in store.journal_list(state="failed")] == [old.key]
    long_run = "run_" + "x" * 5000  # the old whole-run-id index is gone
    assert store.claim("long", 30, _entry("long", long_run)).state is ClaimState.ACQUIRED
    assert store.journal_get(long_run) is not None
    again = _store(server.url, schema=schema, create=False)  # current now: nothing to do
    assert again.journal_get("run_old") is not None
    again.close()
    store.close()


# -- M4: a byte limit on bodies ------------------------------------------------------------------


def test_m4_past_max_journal_bytes_entries_are_kept_without_their_body(
    server: PostgresServer,
) -> None:
    store = _store(server.url, max_journal_bytes=100)
    body = b"{" + b"x" * 58 + b"}"  # 60 bytes
    for key in ("a", "b"):
        claim = store.claim(key, 30, _entry(key, run_id=f"run_{key}", body=body))
        assert claim.state is ClaimState.ACQUIRED  # the claim never suffers
        store.complete(key, claim.token, 60, {"h": HandlerOutcome(ok=True, at=1.0)})
    a, b = store.journal_get("a"), store.journal_get("b")
    assert a is not None
    assert b is not None
    assert (a.body, a.body_dropped) == (body, False)
    assert (b.body, b.body_dropped, b.body_size) == (None, True, 60)
    assert store.claim("b", 30).state is ClaimState.DONE  # idempotency record kept
    # The bytes come back when entries go.
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute(
            psycopg.sql.SQL("UPDATE {} SET expires = 0").format(
                psycopg.sql.Identifier(store.schema, "flymy_journal")
            )
        )
    store.purge()
    store.claim("c", 30, _entry("c", run_id="run_c", body=body))
    c = store.journal_get("c")
    assert c is not None
    assert c.body == body
    store.close()


# -- the history -----------------------------------------------------------------------------------


def test_the_history_keeps_the_newest_attempts_only(server: PostgresServer) -> None:
    store = _store(server.url)
    claim = store.claim("k", 600, _entry("k"))
    for _ in range(HISTORY_LIMIT + 5):  # busy deliveries, each appended
        assert store.claim("k", 600, _entry("k")).state is ClaimState.BUSY
    store.complete("k", claim.token, 60, {}, Attempt(time.time(), "sender", 200, "handled"))
    entry = store.journal_get("k")
    assert entry is not None
    assert len(entry.history) == HISTORY_LIMIT
    assert entry.history[-1].outcome == "handled"
    assert {a.outcome for a in entry.history[:-1]} == {"in_flight"}
    assert entry.attempts == HISTORY_LIMIT + 6
    store.close()


# -- issue 21: plans at scale ----------------------------------------------------------------


def _explain(conn: psycopg.Connection[Any], query: str, params: dict[str, Any]) -> str:
    rows = conn.execute("EXPLAIN " + query, params).fetchall()
    return "\n".join(str(row[0]) for row in rows)


def test_get_and_every_list_filter_use_an_index_not_a_scan_of_the_journal(
    server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """50 000 entries, analyzed: the plans of get (key, run id) and of each filtered list
    page, keyset included, never read the journal sequentially."""
    store = _store(server.url)
    store.claim("seed", 30, _entry("seed", "run_seed"))  # the tables exist
    table = f'"{store.schema}".flymy_journal'
    server.psql(
        f"INSERT INTO {table} (key, event, run_id, agent_id, agent_name, state, attempts,"  # noqa: S608
        " received_at, updated_at, retention, expires, body, headers, handlers, lease_until)"
        " SELECT 'run.completed:run_' || i, CASE WHEN i % 10 = 0 THEN 'run.failed'"
        " ELSE 'run.completed' END, 'run_' || i, 'agent_' || (i % 50), 'agent',"
        " (ARRAY['handled','failed','ignored','pending','resolved','queued'])[1 + i % 6], 1,"
        " 1700000000 + i, 1700000000 + i, 1e9, 1e12, '\\x7b7d', '{}', '{}', 0"
        " FROM generate_series(1, 50000) i;"
        f" ANALYZE {table};"
    )
    plans: dict[str, str] = {}
    captured: list[tuple[str, dict[str, Any]]] = []
    real_run = store._conn.run

    def capture(statement: str, params: Any = None) -> Any:
        captured.append((statement, dict(params or {})))
        return real_run(statement, params)

    monkeypatch.setattr(store._conn, "run", capture)
    since = datetime.fromtimestamp(1_700_040_000, tz=timezone.utc)
    calls: dict[str, Callable[[], object]] = {
        "get by key": lambda: store.journal_get("run.completed:run_777"),
        "get by run id": lambda: store.journal_get("run_777"),
        "newest": lambda: store.journal_list(limit=50),
        "failed": lambda: store.journal_list(state="failed", limit=50),
        "handled": lambda: store.journal_list(state="handled", limit=50),
        "event": lambda: store.journal_list(event="run.failed", limit=50),
        "agent": lambda: store.journal_list(agent_id="agent_7", limit=50),
        "run id": lambda: store.journal_list(run_id="run_777", limit=50),
        "since": lambda: store.journal_list(since=since, limit=50),
        "until": lambda: store.journal_list(until=since, limit=50),
        "before": lambda: store.journal_list(before="run.completed:run_30000", limit=50),
        "failed before": lambda: store.journal_list(
            state="failed", before="run.completed:run_30001", limit=50
        ),
    }
    for name, call in calls.items():
        captured.clear()
        call()
        statement, params = captured[-1]
        with psycopg.connect(server.url, autocommit=True) as conn:
            plans[name] = _explain(conn, statement, params)
    scans = {name: plan for name, plan in plans.items() if "Seq Scan" in plan}
    assert scans == {}
    store.close()
