"""Every journal read of DjangoStore is served by an index (issue 21, item 3): the query
plans of get, of each list filter and of the keyset page, on SQLite and on PostgreSQL, scan
no journal table and sort nothing (the index gives the order)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from flymy_receiver.stores.records import HandlerOutcome, NewEntry
from tests.stores.backends import FakeClock

TABLE = "flymy_receiver_journalentry"


def _fill(store: Any, count: int = 30) -> list[str]:
    keys = []
    for i in range(count):
        key = f"run.completed:run_{i}_{uuid.uuid4().hex[:8]}"
        body = b'{"event":"run.completed"}'
        entry = NewEntry(key, "run.completed", key[14:], f"agent_{i % 3}", None, body, {}, 3600.0)
        claim = store.claim(key, 30.0, entry)
        if i % 2:
            store.release(key, claim.token, {"app.h": HandlerOutcome(ok=False, error="x")})
        keys.append(key)
    return keys


def _statements(alias: str, read: Callable[[], object]) -> list[tuple[str, Any]]:
    """The SELECTs on the journal that ``read`` runs, with their parameters."""
    from django.db import connections

    seen: list[tuple[str, Any]] = []

    def record(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        if sql.lstrip().upper().startswith("SELECT") and TABLE in sql:
            seen.append((sql, params))
        return execute(sql, params, many, context)

    with connections[alias].execute_wrapper(record):
        read()
    assert seen
    return seen


def _plan(alias: str, sql: str, params: Any) -> str:
    from django.db import connections, transaction

    connection = connections[alias]
    with transaction.atomic(using=alias), connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            cursor.execute("EXPLAIN QUERY PLAN " + sql, params)
            return "\n".join(str(row[-1]) for row in cursor.fetchall())
        # A table this small is cheaper to scan: forbid that, so the plan shows whether
        # an index can serve the query at all (PostgreSQL falls back to a scan if not).
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute("SET LOCAL enable_sort = off")
        cursor.execute("EXPLAIN " + sql, params)
        return "\n".join(row[0] for row in cursor.fetchall())


def _check(alias: str, plan: str) -> None:
    if alias == "postgres":
        assert "Seq Scan" not in plan, plan
        assert not re.search(r"^\s*(->\s*)?Sort\b", plan, re.M), plan
    else:
        assert not re.search(rf"\bSCAN {TABLE}\b(?! USING)", plan), plan
        assert "TEMP B-TREE" not in plan, plan


def test_get_list_filters_and_keyset_use_indexes(alias: str) -> None:
    from flymy_receiver.django import DjangoStore

    store = DjangoStore(using=alias, clock=FakeClock())
    keys = _fill(store)
    since = datetime.now(timezone.utc) - timedelta(days=400)
    reads: dict[str, Callable[[], object]] = {
        "get by key": lambda: store.journal_get(keys[3]),
        "get by run id": lambda: store.journal_get("run_3_nothing"),
        "newest": lambda: store.journal_list(limit=10),
        "state": lambda: store.journal_list(state="handled", limit=10),
        "failed and stalled": lambda: store.journal_list(state="failed", limit=10),
        "event": lambda: store.journal_list(event="run.completed", limit=10),
        "agent": lambda: store.journal_list(agent_id="agent_1", limit=10),
        "run id": lambda: store.journal_list(run_id="run_5", limit=10),
        "since until": lambda: store.journal_list(since=since, until=since, limit=10),
        "keyset": lambda: store.journal_list(before=keys[20], limit=10),
        "keyset and state": lambda: store.journal_list(before=keys[20], state="failed"),
        "settled": lambda: store.journal_settled(["run_1", "run_2"]),
    }
    for name, read in reads.items():
        for sql, params in _statements(alias, read):
            try:
                _check(alias, _plan(alias, sql, params))
            except AssertionError as exc:
                raise AssertionError(f"{name}: {exc}") from None


def test_pruning_finds_expired_entries_through_the_expiry_index(alias: str) -> None:
    from flymy_receiver.django import DjangoStore

    clock = FakeClock()
    store = DjangoStore(using=alias, clock=clock)
    _fill(store)
    clock.advance(7200)  # past every entry's retention
    for sql, params in _statements(alias, store.purge):
        plan = _plan(alias, sql, params)
        _check(alias, plan)
        if alias == "postgres":  # a range of the index, not a walk of another one
            assert re.search(r"Index Cond: \(expires <=", plan), plan
        else:
            assert re.search(rf"SEARCH {TABLE} USING (COVERING )?INDEX \S*expires", plan), plan


@pytest.fixture(autouse=True)
def _django() -> None:
    from tests.conftest import require

    require("django")
