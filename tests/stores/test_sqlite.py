"""SQLiteStore: durability, WAL, locking, fork safety and outages."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

import pytest

from flymy_receiver.errors import StoreUnavailable
from flymy_receiver.stores import ClaimState, SQLiteStore, store_from_url
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
