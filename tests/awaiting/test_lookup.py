"""``journal_settled`` of SQLite and PostgreSQL: many waited runs looked up in one query."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flymy_receiver import Receiver
from flymy_receiver.awaiting import SettledLookup
from flymy_receiver.stores import NewEntry, SQLiteStore
from tests.awaiting.kit import deliver
from tests.conftest import SECRET, require


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "sqlite":
        sqlite = SQLiteStore(tmp_path / "deliveries.sqlite3")
        yield sqlite
        sqlite.close()
    else:
        require("psycopg")
        from flymy_receiver.stores import PostgresStore

        postgres = PostgresStore(request.getfixturevalue("postgres_url"))
        yield postgres
        postgres.close()


def test_the_newest_settled_entry_of_each_run(store: Any) -> None:
    assert isinstance(store, SettledLookup)
    receiver = Receiver(SECRET, store=store)

    @receiver.on("run.completed")
    def handled(event: Any) -> None:
        pass

    @receiver.on("run.failed")
    def broken(event: Any) -> None:
        raise RuntimeError("down")

    deliver(receiver, run_id="run_done")
    deliver(receiver, "run.failed", run_id="run_failed")
    deliver(receiver, "run.cancelled", run_id="run_ignored")
    deliver(receiver, "run.failed", run_id="run_twice")
    deliver(receiver, run_id="run_twice")  # newer: this one is the answer
    # A pending entry: claimed with its entry, handlers not finished.
    key = "run.completed:run_pending"
    entry = NewEntry(key, "run.completed", "run_pending", None, None, b"{}", {}, 3600.0)
    assert store.claim(key, 60, entry).state.value == "acquired"

    asked = ["run_done", "run_failed", "run_ignored", "run_twice", "run_pending", "run_unknown"]
    found = store.journal_settled(asked)
    assert {run: entry.state for run, entry in found.items()} == {
        "run_done": "handled",
        "run_failed": "failed",
        "run_ignored": "ignored",
        "run_twice": "handled",
    }
    assert found["run_twice"].event == "run.completed"
    assert found["run_done"].parse().data.run_id == "run_done"
    assert store.journal_settled([]) == {}
    many = [f"run_absent_{i}" for i in range(499)] + ["run_done"]  # one query, 500 parameters
    assert list(store.journal_settled(many)) == ["run_done"]
