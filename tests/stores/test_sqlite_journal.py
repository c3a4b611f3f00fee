"""SQLiteStore's journal: the migration of a file written by the previous version, read-only
opening (``create=False``), the query plans of every lookup (issue 21: no scan of the
journal), pruning in bounded batches, the byte bound (issue 22, M4) and the commits a
delivery costs."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from flymy_receiver.errors import StoreUnavailable
from flymy_receiver.stores import ClaimState, SQLiteStore
from flymy_receiver.stores import sqlite as sqlite_module
from flymy_receiver.stores.records import Attempt, HandlerOutcome, NewEntry, to_datetime
from tests.stores.backends import FakeClock

# The journal's tables as version 1 (before history, resolve and the list indexes) made them.
_VERSION_1 = """
CREATE TABLE flymy_deliveries (key TEXT PRIMARY KEY, token TEXT NOT NULL, done INTEGER NOT NULL,
    expires REAL NOT NULL);
CREATE TABLE flymy_handlers (key TEXT NOT NULL, handler TEXT NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (key, handler));
CREATE INDEX flymy_deliveries_expires ON flymy_deliveries (expires);
CREATE INDEX flymy_handlers_expires ON flymy_handlers (expires);
CREATE TABLE flymy_journal (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE,
    event TEXT NOT NULL, run_id TEXT, agent_id TEXT, agent_name TEXT, state TEXT NOT NULL,
    attempts INTEGER NOT NULL, received_at REAL NOT NULL, updated_at REAL NOT NULL,
    retention REAL NOT NULL, expires REAL NOT NULL, headers BLOB NOT NULL,
    handlers BLOB NOT NULL);
CREATE INDEX flymy_journal_run ON flymy_journal (run_id);
CREATE TABLE flymy_journal_bodies (id INTEGER PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE flymy_refusals (id INTEGER PRIMARY KEY, at REAL NOT NULL, status INTEGER NOT NULL,
    reason TEXT NOT NULL, detail TEXT NOT NULL);
"""
NOW = 1_700_000_000.0


def _entry(key: str, body: bytes = b'{"event":"run.completed"}', **fields: str) -> NewEntry:
    return NewEntry(
        key,
        fields.get("event", "run.completed"),
        fields.get("run_id", key.rpartition(":")[2]),
        fields.get("agent_id", "agent_a"),
        None,
        body,
        {},
        3600.0,
    )


def _version_1_file(path: Path) -> None:
    old = sqlite3.connect(path, isolation_level=None)
    old.execute("PRAGMA journal_mode = WAL")
    old.executescript(_VERSION_1)
    for i, (key, state) in enumerate((("e:failed", "failed"), ("e:running", "pending"))):
        old.execute(
            "INSERT INTO flymy_journal VALUES (?, ?, 'run.completed', ?, 'a', NULL, ?, 2, ?, ?, "
            "3600, ?, '{}', ?)",
            (i + 1, key, key[2:], state, NOW + i, NOW + i, NOW + 3600, b'{"h": {"ok": false}}'),
        )
        old.execute("INSERT INTO flymy_journal_bodies VALUES (?, ?)", (i + 1, b"body-" + b"x" * i))
    # The pending entry's worker still holds its claim, for 60 more seconds.
    old.execute("INSERT INTO flymy_deliveries VALUES ('e:running', 'tok', 0, ?)", (NOW + 60,))
    old.execute("INSERT INTO flymy_deliveries VALUES ('e:done', '', 1, ?)", (NOW + 3600,))
    old.close()


# -- migration ----------------------------------------------------------------------------


def test_a_version_1_file_is_migrated_and_keeps_every_record(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    _version_1_file(path)
    clock = FakeClock(NOW + 1)
    store = SQLiteStore(path, clock=clock)
    failed = store.journal_get("e:failed")
    assert failed is not None
    assert (failed.state, failed.attempts, failed.body, failed.body_size) == (
        "failed",
        2,
        b"body-",
        5,
    )
    assert failed.history == ()
    assert not failed.handlers["h"].ok
    running = store.journal_get("e:running")
    assert running is not None
    assert running.state == "pending"  # its claim is still held: not stalled
    assert store.claim("e:done", 60).state is ClaimState.DONE
    assert [e.key for e in store.journal_list(state="failed")] == ["e:failed"]
    clock.advance(60)
    assert [e.key for e in store.journal_list(state="failed")] == ["e:running", "e:failed"]
    db = store._connection()
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    indexes = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "flymy_journal_run" not in indexes  # replaced by the (run_id, time, key) index
    assert {"flymy_journal_state", "flymy_journal_runs", "flymy_journal_time"} <= indexes
    # The new contract works on the migrated entries.
    again = store.claim("e:failed", 60, _entry("e:failed", b"new body"))
    assert again.prior_state == "failed"
    store.complete("e:failed", again.token, 60, {"h": HandlerOutcome(ok=True)}, _attempt())
    entry = store.journal_get("e:failed")
    assert entry is not None
    assert (entry.state, entry.body, entry.body_size, len(entry.history)) == (
        "handled",
        b"new body",
        8,
        1,
    )
    assert db.execute("SELECT bytes FROM flymy_journal_size").fetchone()[0] == 8 + 6
    store.close()
    assert SQLiteStore(path, clock=clock).journal_get("e:failed") == entry  # migrated once


def _attempt() -> Attempt:
    return Attempt(NOW, "sender", 200, "handled", 0.01)


# -- create=False ---------------------------------------------------------------------------


def test_create_false_refuses_a_missing_file_and_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "missing.sqlite3"
    with pytest.raises(StoreUnavailable, match=r"no database file at .*missing\.sqlite3"):
        SQLiteStore(path, create=False)
    assert list(tmp_path.iterdir()) == []


def test_create_false_refuses_a_file_without_the_stores_tables(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite3"
    sqlite3.connect(path).execute("CREATE TABLE unrelated (x)").connection.close()
    store = SQLiteStore(path, create=False)
    with pytest.raises(StoreUnavailable, match="holds no flymy_receiver records"):
        store.journal_list()
    tables = {row[0] for row in sqlite3.connect(path).execute("SELECT name FROM sqlite_master")}
    assert tables == {"unrelated"}


def test_create_false_reads_an_existing_store_and_never_recreates_it(tmp_path: Path) -> None:
    path = tmp_path / "d.sqlite3"
    writer = SQLiteStore(path)
    writer.journal_ignore(_entry("run.completed:r1"))
    writer.close()
    reader = SQLiteStore(path, create=False)
    assert [e.key for e in reader.journal_list()] == ["run.completed:r1"]
    reader.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    with pytest.raises(StoreUnavailable):
        reader.journal_list()  # a fresh connection in "rw" mode: the file is not made again
    assert not path.exists()


# -- query plans (issue 21) -----------------------------------------------------------------


@contextmanager
def _statements(store: SQLiteStore) -> Iterator[list[str]]:
    """The SQL the store runs meanwhile, with its values in place."""
    seen: list[str] = []
    db = store._connection()
    db.set_trace_callback(seen.append)
    try:
        yield seen
    finally:
        db.set_trace_callback(None)


def _plans(store: SQLiteStore, statements: list[str]) -> list[str]:
    db = store._connection()
    plans = []
    for sql in statements:
        if sql.lstrip().upper().startswith("SELECT") and "flymy_journal" in sql:
            steps = db.execute(f"EXPLAIN QUERY PLAN {sql}").fetchall()
            plans.append(" | ".join(step[3] for step in steps))
    return plans


@pytest.fixture(scope="module", params=[False, True], ids=["as-is", "analyzed"])
def filled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> SQLiteStore:
    """A store with a few hundred entries of every state, agent and event, with and without
    the statistics of ``ANALYZE`` (which the planner uses when they are there)."""
    clock = FakeClock(NOW)
    store = SQLiteStore(tmp_path_factory.mktemp("filled") / "d.sqlite3", clock=clock)
    for i in range(300):
        key = f"run.completed:run_{i}"
        entry = _entry(key, agent_id=f"agent_{i % 7}", event=("run.completed", "run.failed")[i % 2])
        claim = store.claim(key, 5, entry)
        if i % 3 == 0:
            store.complete(key, claim.token, 60, {"h": HandlerOutcome(ok=True)})
        elif i % 3 == 1:
            store.release(key, claim.token, {"h": HandlerOutcome(ok=False)})
        clock.advance(0.01)
    clock.advance(10)  # the pending ones are stalled now
    if request.param:
        store._connection().execute("ANALYZE")
    return store


@pytest.mark.parametrize(
    "filters",
    [
        {},
        {"state": "failed"},
        {"state": "stalled"},
        {"state": "pending"},
        {"state": "handled"},
        {"event": "run.failed"},
        {"agent_id": "agent_3"},
        {"run_id": "run_17"},
        {"since": 0.5},
        {"since": 0.5, "until": 2.0},
        {"state": "failed", "agent_id": "agent_3", "event": "run.completed"},
        {"before": "run.completed:run_250"},
        {"state": "failed", "before": "run.completed:run_250"},
        {"agent_id": "agent_2", "before": "run.completed:run_250"},
    ],
)
def test_every_list_is_served_by_an_index(filled: SQLiteStore, filters: dict[str, Any]) -> None:
    filters = dict(filters)
    for name in ("since", "until"):  # seconds after the first entry
        if name in filters:
            filters[name] = to_datetime(NOW + filters[name])
    with _statements(filled) as seen:
        page = filled.journal_list(limit=20, **filters)
    assert page or filters.get("state") == "pending"
    plans = _plans(filled, seen)
    assert plans
    for plan in plans:
        _assert_indexed(plan)


def _assert_indexed(plan: str) -> None:
    """No scan of the journal, and no sort but of one run's few entries (which SQLite may
    prefer to reading that run's index backwards)."""
    assert "USING INDEX" in plan or "USING COVERING INDEX" in plan, plan
    assert "SCAN j |" not in f"{plan} |", plan
    if "flymy_journal_runs (run_id=?)" not in plan:
        assert "TEMP B-TREE" not in plan, plan


@pytest.mark.parametrize("target", ["run.completed:run_5", "run_6", "run_unknown"])
def test_get_by_key_or_run_id_is_served_by_an_index(filled: SQLiteStore, target: str) -> None:
    with _statements(filled) as seen:
        filled.journal_get(target)
    plans = _plans(filled, seen)
    assert plans
    for plan in plans:
        assert "SEARCH j USING" in plan, plan
        _assert_indexed(plan)


# -- pruning --------------------------------------------------------------------------------


def test_purge_deletes_in_bounded_transactions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "_PURGE_BATCH", 10)
    clock = FakeClock(NOW)
    store = SQLiteStore(tmp_path / "d.sqlite3", clock=clock)
    for i in range(25):
        store.journal_ignore(_entry(f"k:{i}"))
    store.journal_ignore(NewEntry("k:kept", "e", None, None, None, b"b", {}, 1e6))
    clock.advance(7200)
    with _statements(store) as seen:
        assert store.purge() == 25
    assert sum(1 for sql in seen if sql.strip().upper() == "COMMIT") == 4  # 10 + 10 + 5 + 0
    assert [e.key for e in store.journal_list()] == ["k:kept"]
    db = store._connection()
    assert db.execute("SELECT count(*) FROM flymy_journal_bodies").fetchone()[0] == 1
    assert db.execute("SELECT bytes FROM flymy_journal_size").fetchone()[0] == 1


def test_expired_entries_behind_long_lived_ones_are_pruned_too(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    store = SQLiteStore(tmp_path / "d.sqlite3", clock=clock)
    for i in range(300):  # the oldest rows live long
        store.journal_ignore(NewEntry(f"long:{i}", "e", None, None, None, b"b", {}, 1e6))
    for i in range(20):
        store.journal_ignore(NewEntry(f"short:{i}", "e", None, None, None, b"b", {}, 10.0))
    clock.advance(100)
    for i in range(sqlite_module._PURGE_EVERY):  # enough writes for one purge on the way
        store.claim(f"fresh:{i}", 60)
    db = store._connection()
    assert db.execute("SELECT count(*) FROM flymy_journal").fetchone()[0] == 300


# -- the byte bound (M4) --------------------------------------------------------------------


def test_past_max_journal_bytes_an_entry_is_kept_without_its_body(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    store = SQLiteStore(tmp_path / "d.sqlite3", clock=clock, max_journal_bytes=100)
    first = store.claim("k:1", 60, _entry("k:1", b"a" * 60))
    second = store.claim("k:2", 60, _entry("k:2", b"b" * 60))
    assert second.state is ClaimState.ACQUIRED  # the bound never refuses a claim
    entry = store.journal_get("k:2")
    assert entry is not None
    assert (entry.body, entry.body_dropped, entry.body_size) == (None, True, 60)
    with pytest.raises(LookupError, match="dropped"):
        entry.parse()
    store.complete("k:2", second.token, 60, {"h": HandlerOutcome(ok=True)})
    assert store.claim("k:2", 60).state is ClaimState.DONE
    store.release("k:1", first.token, {"h": HandlerOutcome(ok=False)})
    retry = store.claim("k:1", 60, _entry("k:1", b"c" * 30))  # a smaller body replaces it
    assert retry.state is ClaimState.ACQUIRED
    kept = store.journal_get("k:1")
    assert kept is not None
    assert (kept.body, kept.body_dropped) == (b"c" * 30, False)
    store.journal_ignore(_entry("k:3", b"d" * 60))  # 30 + 60 fits
    assert _body(store, "k:3") == b"d" * 60
    db = store._connection()
    assert db.execute("SELECT bytes FROM flymy_journal_size").fetchone()[0] == 90


def test_without_max_journal_bytes_every_body_is_kept(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "d.sqlite3")
    big = b"x" * (2 * 1024 * 1024)
    for i in range(3):
        store.journal_ignore(_entry(f"k:{i}", big))
    assert [_body(store, f"k:{i}") for i in range(3)] == [big] * 3


def _body(store: SQLiteStore, key: str) -> bytes | None:
    entry = store.journal_get(key)
    assert entry is not None
    return entry.body


# -- the cost of a delivery -----------------------------------------------------------------


def test_a_journaled_one_handler_delivery_commits_twice(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "d.sqlite3")
    store.journal_ignore(_entry("warm:up"))  # the schema is in place before counting
    with _statements(store) as seen:
        claim = store.claim("k:1", 60, _entry("k:1"))
        store.complete("k:1", claim.token, 60, {"h": HandlerOutcome(ok=True)}, _attempt())
    assert sum(1 for sql in seen if sql.strip().upper() == "COMMIT") == 2
    entry = store.journal_get("k:1")
    assert entry is not None
    assert (entry.state, len(entry.history)) == ("handled", 1)


def test_the_waiters_lookup_is_served_by_the_run_index(filled: SQLiteStore) -> None:
    with _statements(filled) as seen:
        found = filled.journal_settled([f"run_{i}" for i in range(0, 300, 7)])
    assert found
    plans = _plans(filled, seen)
    assert plans
    for plan in plans:
        assert "flymy_journal_runs (run_id=?)" in plan, plan


@pytest.mark.parametrize("state", [None, "failed", "handled"])
def test_lists_never_read_a_body(filled: SQLiteStore, state: str | None) -> None:
    with _statements(filled) as seen:
        page = filled.journal_list(state=state, limit=50)
    assert page
    assert all(entry.body is None and entry.body_size > 0 for entry in page)
    assert not [sql for sql in seen if "flymy_journal_bodies" in sql or "body," in sql]
