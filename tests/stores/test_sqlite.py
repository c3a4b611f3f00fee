"""SQLiteStore: durability, WAL, locking, fork safety and outages."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sqlite3
import tempfile
from datetime import datetime, timedelta, timezone
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

from flymy_receiver.errors import StoreUnavailable
from flymy_receiver.stores import ClaimState, SQLiteStore, store_from_url
from flymy_receiver.stores.records import HandlerOutcome, NewEntry, Refusal
from flymy_receiver.stores.sqlite import _PURGE_EVERY, _PURGE_LIMIT
from tests.stores.backends import FakeClock


def test_records_outlive_the_store_object(tmp_path: Path) -> None:
    path = tmp_path / "d.sqlite3"
    first = SQLiteStore(path)
    first.complete("run.completed:r1", first.claim("run.completed:r1", 60).token, 3600)
    first.close()
    assert SQLiteStore(path).claim("run.completed:r1", 60).state is ClaimState.DONE


def test_uses_wal_and_a_busy_timeout(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "d.sqlite3", timeout=2.5)
    store.claim("k", 60)
    db = store._connection()
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] == 2500


def test_a_lock_held_too_long_is_unavailable_not_an_error(tmp_path: Path) -> None:
    path = tmp_path / "d.sqlite3"
    store = SQLiteStore(path, timeout=0.2)
    store.claim("warm-up", 60)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process sits on the write lock
    try:
        with pytest.raises(StoreUnavailable):
            store.claim("k", 60)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert store.claim("k", 60).state is ClaimState.ACQUIRED  # and it recovers


@pytest.mark.parametrize("kind", ["missing directory", "a directory", "not a database"])
def test_unusable_files_are_unavailable(tmp_path: Path, kind: str) -> None:
    if kind == "missing directory":
        path = tmp_path / "nope" / "d.sqlite3"
    elif kind == "a directory":
        path = tmp_path
    else:
        path = tmp_path / "garbage.sqlite3"
        path.write_bytes(b"this is not an sqlite file at all" * 100)
    store = SQLiteStore(path, timeout=0.2)
    for call in (
        lambda: store.claim("k", 60),
        lambda: store.complete("k", "t", 60),
        lambda: store.mark_handler_done("k", "t", "h", 60),
        lambda: store.release("k", "t"),
    ):
        with pytest.raises(StoreUnavailable) as caught:
            call()
        assert caught.value.status == 503


def test_purge_deletes_only_expired_rows(tmp_path: Path) -> None:
    clock = FakeClock()
    store = SQLiteStore(tmp_path / "d.sqlite3", clock=clock)
    store.complete("old", store.claim("old", 60).token, 10)
    store.mark_handler_done("old-h", "t", "h", 10)
    store.complete("new", store.claim("new", 60).token, 1000)
    clock.advance(100)
    assert store.purge() == 2
    assert store.claim("new", 60).state is ClaimState.DONE
    assert store.claim("old", 60).state is ClaimState.ACQUIRED


def test_rejects_an_in_memory_database() -> None:
    with pytest.raises(ValueError, match="MemoryStore"):
        SQLiteStore(":memory:")


def test_store_from_url_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    absolute = store_from_url(f"sqlite:///{tmp_path}/abs.sqlite3")
    assert isinstance(absolute, SQLiteStore)
    assert Path(absolute.path) == tmp_path / "abs.sqlite3"
    monkeypatch.chdir(tmp_path)
    relative = store_from_url("sqlite:///rel.sqlite3")
    assert isinstance(relative, SQLiteStore)
    assert relative.path == "rel.sqlite3"


def _claim_in_child(store: SQLiteStore, key: str, results: multiprocessing.Queue[str]) -> None:
    try:
        claim = store.claim(key, 60)
        store.complete(key, claim.token, 3600)
        results.put(claim.state.value)
    except BaseException as exc:  # the parent reports it
        results.put(f"error: {exc!r}")


def test_a_forked_worker_opens_its_own_connection(tmp_path: Path) -> None:
    """gunicorn imports the app, then forks: the store must not share a connection."""
    store = SQLiteStore(tmp_path / "d.sqlite3")
    parent = store.claim("parent", 60)  # the parent now has a connection
    context = multiprocessing.get_context("fork")
    results: multiprocessing.Queue[str] = context.Queue()
    child = context.Process(target=_claim_in_child, args=(store, "child", results))
    child.start()
    try:
        assert results.get(timeout=30) == "acquired"
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    assert store.claim("child", 60).state is ClaimState.DONE
    store.complete("parent", parent.token, 60)  # the parent's connection still works
    assert store.claim("parent", 60).state is ClaimState.DONE


def _calls_on_a_read_only_file(path: str, conn: Connection, uid: int | None) -> None:
    """In a forked child: become an unprivileged user if need be, then try every write."""
    try:
        if uid is not None:  # root writes any file: drop to a user the permissions bind
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        store = SQLiteStore(path, timeout=60)  # a retried fault would cost a minute per call
        results = []
        for call in (
            lambda: store.claim("k", 60),
            lambda: store.claim("k", 60, _new_entry("k")),
            lambda: store.complete("k", "t", 60),
            lambda: store.release("k", "t"),
            lambda: store.journal_ignore(_new_entry("k2")),
        ):
            try:
                call()
                results.append("written")
            except StoreUnavailable as exc:
                results.append(str(exc))
        conn.send(results)
        conn.recv()  # the parent made the file writable again
        conn.send(store.claim("k", 60).state.value)
    except BaseException as exc:  # the parent reports it
        conn.send([f"error: {exc!r}"])


def _new_entry(key: str) -> NewEntry:
    return NewEntry(key, "run.completed", "run_1", None, None, b"{}", {}, 3600.0)


def test_a_read_only_file_fails_fast_while_the_fault_lasts(tmp_path: Path) -> None:
    """A database the process may not write: every call is a 503 at once, not after the busy
    timeout (the switch to WAL used to be retried on any error); writable again, the same
    store works. A rollback-journal file (as another tool leaves one) is the case where the
    switch to WAL itself fails. Tests may run as root, whom file modes do not stop, so the
    calls run in a forked child that becomes an unprivileged user first."""
    uid = 65534 if os.geteuid() == 0 else None  # "nobody"
    directory = Path(tempfile.mkdtemp(prefix="flymy-ro-"))  # not under a private tmp_path
    try:
        directory.chmod(0o777)
        path = directory / "d.sqlite3"
        plain = sqlite3.connect(path)
        plain.execute("CREATE TABLE notes (text TEXT)")
        plain.commit()
        plain.close()
        if uid is not None:
            os.chown(path, uid, uid)
        path.chmod(0o444)
        context = multiprocessing.get_context("fork")
        ours, theirs = context.Pipe()
        child = context.Process(target=_calls_on_a_read_only_file, args=(str(path), theirs, uid))
        child.start()
        try:
            # Five calls that each waited for the 60 s timeout would take five minutes.
            assert ours.poll(30), "the calls waited for the busy timeout"
            results = ours.recv()
            assert results == ["sqlite: attempt to write a readonly database"] * 5
            path.chmod(0o644)
            ours.send("go")
            assert ours.poll(30)
            assert ours.recv() == "acquired"
        finally:
            child.join(10)
            if child.is_alive():
                child.kill()
                child.join(10)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


_OLD_SCHEMA = """
CREATE TABLE flymy_deliveries (
    key TEXT PRIMARY KEY, token TEXT NOT NULL, done INTEGER NOT NULL, expires REAL NOT NULL
);
CREATE TABLE flymy_handlers (
    key TEXT NOT NULL, handler TEXT NOT NULL, expires REAL NOT NULL, PRIMARY KEY (key, handler)
);
CREATE INDEX flymy_deliveries_expires ON flymy_deliveries (expires);
CREATE INDEX flymy_handlers_expires ON flymy_handlers (expires);
"""


def test_a_file_from_before_the_journal_gains_it_and_keeps_its_records(tmp_path: Path) -> None:
    path = tmp_path / "d.sqlite3"
    old = sqlite3.connect(path, isolation_level=None)
    old.execute("PRAGMA journal_mode = WAL")
    old.executescript(_OLD_SCHEMA)
    old.execute("INSERT INTO flymy_deliveries VALUES ('done-before', '', 1, 9e12)")
    old.execute("INSERT INTO flymy_handlers VALUES ('half-before', 'app.save', 9e12)")
    columns_before = {
        table: old.execute(f"PRAGMA table_info({table})").fetchall()
        for table in ("flymy_deliveries", "flymy_handlers")
    }
    old.close()

    store = SQLiteStore(path)
    assert store.claim("done-before", 60).state is ClaimState.DONE
    half = store.claim("half-before", 60)
    assert half.done_handlers == frozenset({"app.save"})
    claim = store.claim("new", 60, _new_entry("new"))
    store.complete("new", claim.token, 60, {"app.h": HandlerOutcome(ok=True, at=1.0)})
    entry = store.journal_get("new")
    assert entry is not None
    assert entry.state == "handled"
    db = store._connection()
    for table, columns in columns_before.items():
        assert db.execute(f"PRAGMA table_info({table})").fetchall() == columns
    store.close()
    # Opening it again changes nothing.
    again = SQLiteStore(path)
    assert again.journal_get("new") == entry


def test_expired_entries_are_purged_a_bounded_number_per_write(tmp_path: Path) -> None:
    clock = FakeClock()
    store = SQLiteStore(tmp_path / "d.sqlite3", clock=clock)
    backlog = 3 * _PURGE_LIMIT
    for i in range(backlog):
        store.journal_ignore(NewEntry(f"k{i}", "run.x", None, None, None, b"x" * 100, {}, 10.0))
    clock.advance(100)
    db = store._connection()
    assert store.journal_list(limit=10_000) == []  # expired: gone for readers at once
    counts = []
    for i in range(_PURGE_EVERY * 4):
        store.claim(f"fresh{i}", 60)
        counts.append(db.execute("SELECT count(*) FROM flymy_journal").fetchone()[0])
    drops = [before - after for before, after in zip([backlog, *counts], counts, strict=False)]
    assert max(drops) == _PURGE_LIMIT  # a backlog is worked off in bounded steps
    assert drops.count(0) >= len(drops) - 4
    assert counts[-1] == 0
    assert db.execute("SELECT count(*) FROM flymy_journal_bodies").fetchone()[0] == 0


def test_only_the_newest_refusals_are_kept(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "d.sqlite3", max_refusals=10)
    start = datetime(2024, 5, 1, tzinfo=timezone.utc)
    for i in range(25):
        store.record_refusal(Refusal(start + timedelta(seconds=i), 401, "bad", f"n{i}"))
    kept = store.refusals(limit=100)
    assert [r.detail for r in kept] == [f"n{i}" for i in range(24, 14, -1)]
    assert kept[0].at == start + timedelta(seconds=24)
    db = store._connection()
    assert db.execute("SELECT count(*) FROM flymy_refusals").fetchone()[0] == 10
