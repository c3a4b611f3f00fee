"""DjangoStore's journal beyond the shared contract: what the second review found (issue 22:
M3, M4, M5, M6, L2), the attempt history's bound, the deferred handlers' leases, and purging
in bounded batches. On SQLite and on PostgreSQL (the ``alias`` fixture)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from flymy_receiver.stores import ClaimState
from flymy_receiver.stores.records import Attempt, HandlerOutcome, NewEntry
from tests.stores.backends import FakeClock

LEASE = 30.0
TTL = 3600.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(alias: str, clock: FakeClock) -> Any:
    from flymy_receiver.django import DjangoStore

    return DjangoStore(using=alias, clock=clock)


def _key(label: str = "run.completed") -> str:
    return f"{label}:run_{uuid.uuid4().hex[:12]}"


def _entry(key: str, body: bytes = b'{"event":"run.completed"}', **fields: Any) -> NewEntry:
    values: dict[str, Any] = {
        "event": "run.completed",
        "run_id": key.rpartition(":")[2],
        "agent_id": "agent_abc",
        "agent_name": "Sales Lead Profiler",
        "headers": {"Content-Length": str(len(body))},
        "retention": 86400.0,
    }
    values.update(fields)
    return NewEntry(key=key, body=body, **values)


def _failed() -> HandlerOutcome:
    return HandlerOutcome(ok=False, error="RuntimeError: boom", traceback="...", at=1.0)


def _queued() -> HandlerOutcome:
    return HandlerOutcome(ok=False, state="queued", deferred=True, queued_at=1.0)


@pytest.fixture
def queries(alias: str) -> Iterator[list[str]]:
    """The SQL of every statement the store runs on ``alias`` meanwhile."""
    from django.db import connections

    seen: list[str] = []

    def record(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        seen.append(sql)
        return execute(sql, params, many, context)

    with connections[alias].execute_wrapper(record):
        yield seen


# -- M3: a later delivery no handler wants never hides a failed entry ----------------------


@pytest.mark.parametrize("before", ["failed", "pending", "handled"])
def test_an_ignored_delivery_keeps_the_state_and_the_body(store: Any, before: str) -> None:
    key = _key()
    claim = store.claim(key, LEASE, _entry(key, body=b'{"ran": "on this"}'))
    if before == "failed":
        store.release(key, claim.token, {"app.h": _failed()})
    elif before == "handled":
        store.complete(key, claim.token, TTL, {"app.h": HandlerOutcome(ok=True)})
    ignored = Attempt(2.0, "sender", 200, "ignored")
    store.journal_ignore(_entry(key, body=b'{"another": "body"}'), ignored)
    entry = store.journal_get(key)
    assert entry.state == before
    assert entry.body == b'{"ran": "on this"}'
    assert entry.attempts == 2
    assert entry.history[-1] == ignored
    if before == "failed":
        assert [e.key for e in store.journal_list(state="failed")] == [key]


# -- M5: lists read summaries, never bodies ------------------------------------------------


def test_a_list_reads_no_body_and_says_how_big_it_is(store: Any, queries: list[str]) -> None:
    key = _key()
    body = b'{"big": "' + b"x" * 100_000 + b'"}'
    claim = store.claim(key, LEASE, _entry(key, body=body))
    store.release(key, claim.token, {"app.h": _failed()})
    queries.clear()
    for state in (None, "failed"):
        [summary] = store.journal_list(state=state)
        assert summary.body is None
        assert summary.history == ()
        assert summary.body_size == len(body)
        assert summary.handlers["app.h"].error == "RuntimeError: boom"
    reads = [sql for sql in queries if "journalentry" in sql.lower()]
    assert reads
    assert not any('."body"' in sql or '."history"' in sql for sql in reads), reads


# -- M6: run ids of any length -------------------------------------------------------------


def test_a_run_id_of_any_length_is_claimed_journaled_and_found(store: Any) -> None:
    run_id = "run_" + "é" * 5000 + uuid.uuid4().hex  # over PostgreSQL's btree row limit
    key = f"run.completed:sha256:{uuid.uuid4().hex}"  # the receiver digests long keys
    claim = store.claim(key, LEASE, _entry(key, run_id=run_id))
    assert claim.state is ClaimState.ACQUIRED
    store.complete(key, claim.token, TTL, {"app.h": HandlerOutcome(ok=True)})
    entry = store.journal_get(run_id)
    assert entry is not None
    assert entry.key == key
    assert entry.run_id == run_id  # whole, not cut
    assert [e.key for e in store.journal_list(run_id=run_id)] == [key]
    assert store.journal_list(run_id=run_id[:-1]) == []
    assert set(store.journal_settled([run_id])) == {run_id}


# -- L2: a worker that died leaves a stalled entry the failure views find -----------------


def test_a_pending_entry_whose_lease_ended_is_stalled_and_listed_as_failed(
    store: Any, clock: FakeClock
) -> None:
    dead, alive = _key(), _key()
    store.claim(dead, LEASE, _entry(dead))
    clock.advance(1)
    store.claim(alive, 3 * LEASE, _entry(alive))
    assert store.journal_get(dead).state == "pending"
    clock.advance(LEASE + 1)
    assert store.journal_get(dead).state == "stalled"
    assert store.journal_get(alive).state == "pending"
    assert [e.key for e in store.journal_list(state="failed")] == [dead]
    assert [e.key for e in store.journal_list(state="stalled")] == [dead]
    assert [e.key for e in store.journal_list(state="pending")] == [alive]
    # The sender's retry takes the claim again: pending again (it was stored pending).
    again = store.claim(dead, LEASE, _entry(dead))
    assert again.state is ClaimState.ACQUIRED
    assert again.prior_state == "pending"
    assert store.journal_get(dead).state == "pending"


def test_failed_lists_merge_failed_and_stalled_newest_first(store: Any, clock: FakeClock) -> None:
    keys = [_key() for _ in range(4)]
    for i, key in enumerate(keys):
        claim = store.claim(key, LEASE, _entry(key))
        if i % 2 == 0:
            store.release(key, claim.token, {"app.h": _failed()})
        clock.advance(1)
    clock.advance(LEASE)
    assert [e.key for e in store.journal_list(state="failed")] == keys[::-1]
    assert [e.key for e in store.journal_list(state="failed", limit=3)] == keys[:0:-1]


# -- the history, resolve, the keyset ------------------------------------------------------


def test_the_history_keeps_the_newest_fifty_attempts(store: Any, clock: FakeClock) -> None:
    key = _key()
    claim = store.claim(key, LEASE, _entry(key))
    store.complete(key, claim.token, TTL, {"app.h": HandlerOutcome(ok=True)})
    for _ in range(60):
        clock.advance(1)
        assert store.claim(key, LEASE, _entry(key)).state is ClaimState.DONE
    entry = store.journal_get(key)
    assert entry.attempts == 61
    assert len(entry.history) == 50
    assert all(a.outcome == "duplicate" and a.status == 200 for a in entry.history)
    assert entry.history[-1].at == clock.now


def test_keyset_pages_walk_every_entry_once_even_with_equal_times(store: Any) -> None:
    keys = sorted(_key() for _ in range(7))  # one received_at for all: the key breaks ties
    for key in keys:
        store.journal_ignore(_entry(key, event="run.cancelled"))
    seen: list[str] = []
    before = None
    for _ in range(10):
        page = store.journal_list(before=before, limit=3)
        if not page:
            break
        seen += [e.key for e in page]
        before = page[-1].key
    assert seen == keys[::-1]


def test_resolve_takes_an_entry_out_of_the_failure_lists(store: Any) -> None:
    key = _key()
    claim = store.claim(key, LEASE, _entry(key))
    store.release(key, claim.token, {"app.h": _failed()})
    assert store.journal_resolve(key, "refunded by hand")
    entry = store.journal_get(key)
    assert (entry.state, entry.note) == ("resolved", "refunded by hand")
    assert store.journal_list(state="failed") == []
    assert store.journal_resolve("run.completed:nothing", "x") is False


# -- M4: a byte limit on bodies degrades the journal only ---------------------------------


def test_past_the_byte_limit_the_entry_is_kept_without_its_body(alias: str) -> None:
    from flymy_receiver.django import DjangoStore

    store = DjangoStore(using=alias, max_journal_bytes=100, clock=FakeClock())
    first, second = _key(), _key()
    assert store.claim(first, LEASE, _entry(first, body=b"x" * 60)).state is ClaimState.ACQUIRED
    claim = store.claim(second, LEASE, _entry(second, body=b"y" * 60))
    assert claim.state is ClaimState.ACQUIRED  # the claim is never refused
    kept, dropped = store.journal_get(first), store.journal_get(second)
    assert kept.body == b"x" * 60
    assert not kept.body_dropped
    assert dropped.body is None
    assert dropped.body_dropped
    assert dropped.body_size == 60
    with pytest.raises(LookupError, match="dropped"):
        dropped.parse()
    store.complete(second, claim.token, TTL, {"app.h": HandlerOutcome(ok=True)})
    assert store.claim(second, LEASE, _entry(second)).state is ClaimState.DONE


# -- deferred handlers: their own leases ---------------------------------------------------


def test_a_deferred_handler_lease_final_failure_and_replay(store: Any, clock: FakeClock) -> None:
    key = _key()
    claim = store.claim(key, LEASE, _entry(key, body=b'{"stored": 1}'))
    store.complete(
        key, claim.token, TTL, {"app.inline": HandlerOutcome(ok=True), "app.d": _queued()}
    )
    assert store.journal_get(key).state == "queued"
    assert store.journal_settled([key.rpartition(":")[2]]) == {}  # not settled while queued
    first = store.claim_handler(key, "app.d", LEASE)
    assert (first.state, first.body, first.prior_state) == (
        ClaimState.ACQUIRED,
        b'{"stored": 1}',
        "queued",
    )
    assert store.claim_handler(key, "app.d", LEASE).state is ClaimState.BUSY
    clock.advance(LEASE + 1)  # the first worker died: its lease ends
    second = store.claim_handler(key, "app.d", LEASE)
    assert second.state is ClaimState.ACQUIRED
    run = Attempt(clock.now, "worker", None, "failed", handler="app.d")
    failure = HandlerOutcome(ok=False, error="RuntimeError: late", at=clock.now)
    store.finish_handler(key, "app.d", first.token, failure, run, False, TTL)  # lost its lease
    assert store.journal_get(key).handlers["app.d"].state == "running"
    store.finish_handler(key, "app.d", second.token, _failed(), run, True, TTL)
    entry = store.journal_get(key)
    assert entry.state == "failed"
    assert entry.handlers["app.d"].attempts == 2
    assert entry.history[-2:] == (run, run)
    # The done record was dropped: a replay claims it, skipping the inline handler.
    replay = store.claim(key, LEASE, replay=True)
    assert replay.state is ClaimState.ACQUIRED
    assert replay.done_handlers == frozenset({"app.inline"})


def test_a_deferred_handler_ok_makes_the_entry_handled(store: Any, clock: FakeClock) -> None:
    key = _key()
    claim = store.claim(key, LEASE, _entry(key))
    store.complete(key, claim.token, TTL, {"app.d": _queued(), "app.e": _queued()})
    for name in ("app.d", "app.e"):
        held = store.claim_handler(key, name, LEASE)
        run = Attempt(clock.now, "worker", None, "handled", handler=name)
        store.finish_handler(key, name, held.token, HandlerOutcome(ok=True), run, False, TTL)
        assert store.claim_handler(key, name, LEASE).state is ClaimState.DONE
    entry = store.journal_get(key)
    assert entry.state == "handled"
    assert all(o.ok and o.deferred and o.attempts == 1 for o in entry.handlers.values())
    assert store.claim(key, LEASE, _entry(key)).state is ClaimState.DONE
    with pytest.raises(KeyError):
        store.claim_handler("run.completed:none", "app.d", LEASE)


# -- retention: pruning in bounded batches -------------------------------------------------


def test_purge_deletes_in_bounded_batches(store: Any, clock: FakeClock, queries: list[str]) -> None:
    store.purge_batch = 10
    for _ in range(35):
        key = _key()
        claim = store.claim(key, LEASE, _entry(key, retention=1.0))
        store.complete(key, claim.token, 1.0, {"app.h": HandlerOutcome(ok=True)})
    live = _key()
    store.claim(live, LEASE, _entry(live))
    clock.advance(2)
    queries.clear()
    assert store.purge() == 70  # 35 claims and 35 entries
    deletes = [
        sql
        for sql in queries
        if sql.lstrip().upper().startswith("DELETE") and "journalentry" in sql
    ]
    assert len(deletes) == 4  # 10 + 10 + 10 + 5
    assert [e.key for e in store.journal_list()] == [live]


def test_waiters_look_many_runs_up_in_one_query(store: Any, queries: list[str]) -> None:
    keys = [_key() for _ in range(3)]
    for key in keys:
        claim = store.claim(key, LEASE, _entry(key))
        store.complete(key, claim.token, TTL, {"app.h": HandlerOutcome(ok=True)})
    queries.clear()
    found = store.journal_settled([key.rpartition(":")[2] for key in keys])
    assert {entry.key for entry in found.values()} == set(keys)
    assert all(entry.body == b'{"event":"run.completed"}' for entry in found.values())
    assert len(queries) == 1
