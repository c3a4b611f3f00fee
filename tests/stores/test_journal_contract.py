"""The journal half of the store contract (flymy_receiver/stores/base.py, JournalStore),
run against every store that keeps a journal."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from flymy_receiver.stores import ClaimState
from flymy_receiver.stores.records import Refusal
from tests.stores.backends import JOURNAL_BACKENDS, Backend, make_backend
from tests.stores.journal_kit import LEASE, TTL
from tests.stores.journal_kit import failed as _failed
from tests.stores.journal_kit import new_entry as _entry
from tests.stores.journal_kit import ok as _ok
from tests.stores.journal_kit import store_of as _store


@pytest.fixture(params=JOURNAL_BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from make_backend(request.param, request, tmp_path)


def test_a_claim_with_an_entry_journals_it_pending_with_its_exact_body(backend: Backend) -> None:
    store = _store(backend)
    key = backend.key()
    body = b'{"event": "run.completed",\n "data": {"x": "\\u00e9\xc3\xa9"}}'
    claim = store.claim(key, LEASE, _entry(key, body=body))
    assert claim.state is ClaimState.ACQUIRED
    entry = store.journal_get(key)
    assert entry is not None
    assert entry.key == key
    assert entry.state == "pending"
    assert entry.attempts == 1
    assert entry.body == body
    assert entry.event == "run.completed"
    assert entry.agent_id == "agent_abc"
    assert entry.agent_name == "Sales Lead Profiler"
    assert entry.headers["Content-Length"] == str(len(body))
    assert entry.handlers == {}
    assert entry.received_at.tzinfo is not None
    assert entry.received_at.utcoffset() == timedelta(0)
    assert entry.updated_at >= entry.received_at


def test_complete_makes_it_handled_with_each_outcome(backend: Backend) -> None:
    store = _store(backend)
    key = backend.key()
    claim = store.claim(key, LEASE, _entry(key))
    store.mark_handler_done(key, claim.token, "app.first", TTL, _ok())
    store.complete(key, claim.token, TTL, {"app.first": _ok(), "app.second": _ok()})
    entry = store.journal_get(key)
    assert entry is not None
    assert entry.state == "handled"
    assert set(entry.handlers) == {"app.first", "app.second"}
    assert all(o.ok for o in entry.handlers.values())


def test_release_makes_it_failed_and_keeps_the_error_and_traceback(backend: Backend) -> None:
    store = _store(backend)
    key = backend.key()
    claim = store.claim(key, LEASE, _entry(key))
    store.mark_handler_done(key, claim.token, "app.first", TTL, _ok())
    store.release(key, claim.token, {"app.first": _ok(), "app.second": _failed()})
    entry = store.journal_get(key)
    assert entry is not None
    assert entry.state == "failed"
    assert entry.handlers["app.first"].ok
    failed = entry.handlers["app.second"]
    assert not failed.ok
    assert failed.error == "RuntimeError: boom"
    assert failed.traceback is not None
    assert "Traceback" in failed.traceback


def test_the_state_follows_the_last_attempt_and_outcomes_the_latest_run(backend: Backend) -> None:
    store = _store(backend)
    key = backend.key()
    first = store.claim(key, LEASE, _entry(key))
    store.release(key, first.token, {"app.h": _failed("first")})
    second = store.claim(key, LEASE, _entry(key))
    assert second.state is ClaimState.ACQUIRED
    entry = store.journal_get(key)
    assert entry is not None
    assert entry.state == "pending"
    assert entry.attempts == 2
    store.complete(key, second.token, TTL, {"app.h": _ok()})
    entry = store.journal_get(key)
    assert entry is not None
    assert entry.state == "handled"
    assert entry.handlers["app.h"].ok
    assert entry.handlers["app.h"].error is None


def test_every_delivery_counts_an_attempt_duplicates_and_busy_included(backend: Backend) -> None:
    store = _store(backend)
    key = backend.key()
    claim = store.claim(key, LEASE, _entry(key))
    assert store.claim(key, LEASE, _entry(key)).state is ClaimState.BUSY
    store.complete(key, claim.token, TTL, {"app.h": _ok()})
    assert store.claim(key, LEASE, _entry(key)).state is ClaimState.DONE
    entry = store.journal_get(key)
    assert entry is not None
    assert entry.attempts == 3
    assert entry.state == "handled"  # a duplicate changes nothing else


def test_a_replay_counts_no_attempt_and_force_takes_a_done_key(backend: Backend) -> None:
    store = _store(backend)
    key = backend.key()
    claim = store.claim(key, LEASE, _entry(key))
    store.mark_handler_done(key, claim.token, "app.h", TTL, _ok())
    store.complete(key, claim.token, TTL, {"app.h": _ok()})
    assert store.claim(key, LEASE, replay=True).state is ClaimState.DONE
    forced = store.claim(key, LEASE, replay=True, force=True)
    assert forced.state is ClaimState.ACQUIRED
    assert forced.done_handlers == frozenset()
    entry = store.journal_get(key)
    assert entry is not None
    assert entry.state == "pending"
    assert entry.attempts == 1
    # A forced replay never takes a key that is held.
    assert store.claim(key, LEASE, replay=True, force=True).state is ClaimState.BUSY
    store.release(key, forced.token, {"app.h": _failed()})
    entry = store.journal_get(key)
    assert entry is not None
    assert entry.state == "failed"
    # The sender's retry of a failed forced replay runs again.
    assert store.claim(key, LEASE, _entry(key)).state is ClaimState.ACQUIRED


def test_a_late_release_does_not_touch_the_entry_of_the_next_claim(backend: Backend) -> None:
    store = _store(backend)
    key = backend.key()
    dead = store.claim(key, LEASE, _entry(key))
    backend.advance(LEASE)
    alive = store.claim(key, LEASE, _entry(key))
    assert alive.state is ClaimState.ACQUIRED
    store.release(key, dead.token, {"app.h": _failed()})
    entry = store.journal_get(key)
    assert entry is not None
    assert entry.state == "pending"


def test_ignored_events_are_journaled_and_counted(backend: Backend) -> None:
    store = _store(backend)
    key = backend.key("run.cancelled")
    store.journal_ignore(_entry(key, event="run.cancelled"))
    store.journal_ignore(_entry(key, event="run.cancelled"))
    entry = store.journal_get(key)
    assert entry is not None
    assert entry.state == "ignored"
    assert entry.event == "run.cancelled"
    assert entry.attempts == 2


def test_get_finds_by_run_id_the_newest_entry(backend: Backend) -> None:
    store = _store(backend)
    run_id = backend.key().rpartition(":")[2]
    store.journal_ignore(_entry(f"run.started:{run_id}", run_id=run_id, event="run.started"))
    backend.advance(0.01)
    key = f"run.completed:{run_id}"
    store.claim(key, LEASE, _entry(key, run_id=run_id))
    entry = store.journal_get(run_id)
    assert entry is not None
    assert entry.key == key
    assert store.journal_get("run_that_never_came") is None


def test_list_is_newest_first_with_filters_and_a_limit(backend: Backend) -> None:
    store = _store(backend)
    keys = []
    start = datetime.now(timezone.utc) - timedelta(days=1)
    for i in range(5):
        key = backend.key()
        keys.append(key)
        claim = store.claim(key, LEASE, _entry(key, agent_id=f"agent_{i % 2}"))
        if i % 2:
            store.release(key, claim.token, {"app.h": _failed()})
        else:
            store.complete(key, claim.token, TTL, {"app.h": _ok()})
        backend.advance(0.01)
    ignored = backend.key("run.cancelled")
    store.journal_ignore(_entry(ignored, event="run.cancelled"))
    listed = [e.key for e in store.journal_list(limit=100)]
    assert listed[:6] == [ignored, *reversed(keys)]
    assert [e.key for e in store.journal_list(state="failed")][:2] == [keys[3], keys[1]]
    assert all(e.state == "failed" for e in store.journal_list(state="failed"))
    assert [e.key for e in store.journal_list(event="run.cancelled")] == [ignored]
    assert {e.key for e in store.journal_list(agent_id="agent_0")} >= {keys[0], keys[2], keys[4]}
    assert all(e.agent_id == "agent_0" for e in store.journal_list(agent_id="agent_0"))
    assert len(store.journal_list(limit=2)) == 2
    assert store.journal_list(since=start + timedelta(days=30)) == []


def test_entries_expire_after_their_retention(backend: Backend) -> None:
    store = _store(backend)
    key = backend.key()
    claim = store.claim(key, LEASE, _entry(key, retention=1.0))
    store.complete(key, claim.token, TTL, {"app.h": _ok()})
    assert store.journal_get(key) is not None
    backend.advance(1.5)
    assert store.journal_get(key) is None
    assert key not in [e.key for e in store.journal_list()]


def test_refusals_are_kept_newest_first_without_bodies(backend: Backend) -> None:
    store = _store(backend)
    now = datetime.now(timezone.utc)
    for i in range(3):
        store.record_refusal(Refusal(now + timedelta(seconds=i), 401, "bad_signature", f"hint {i}"))
    found = store.refusals(limit=2)
    assert [r.detail for r in found] == ["hint 2", "hint 1"]
    assert found[0].status == 401
    assert found[0].reason == "bad_signature"
    assert found[0].at.tzinfo is not None


def test_concurrent_deliveries_count_every_attempt(backend: Backend) -> None:
    store = _store(backend)
    key = backend.key()
    barrier = threading.Barrier(6, timeout=30)
    states: list[ClaimState] = []
    lock = threading.Lock()

    def deliver() -> None:
        barrier.wait()
        state = store.claim(key, 60, _entry(key)).state
        with lock:
            states.append(state)

    threads = [threading.Thread(target=deliver) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert states.count(ClaimState.ACQUIRED) == 1
    entry = store.journal_get(key)
    assert entry is not None
    assert entry.attempts == 6


def test_bodies_are_bytes_kept_exactly(backend: Backend) -> None:
    store = _store(backend)
    key = backend.key()
    body = b'{"event": "run.completed"}\x00\xff\xfe\xc3'  # not UTF-8, with a NUL byte
    store.claim(key, LEASE, _entry(key, body=body))
    entry = store.journal_get(key)
    assert entry is not None
    assert entry.body == body
    # A list gives summaries: the size, never the body (issue 22, M5).
    assert [(e.body, e.body_size) for e in store.journal_list() if e.key == key] == [
        (None, len(body))
    ]


def test_old_style_calls_leave_the_journal_alone(backend: Backend) -> None:
    store = _store(backend)
    key = backend.key()
    claim = store.claim(key, LEASE)
    store.mark_handler_done(key, claim.token, "app.h", TTL)
    store.complete(key, claim.token, TTL)
    assert store.journal_get(key) is None
    assert key not in [e.key for e in store.journal_list()]
    assert store.claim(key, LEASE).state is ClaimState.DONE


def test_a_delivery_after_its_entry_expired_starts_a_fresh_entry(backend: Backend) -> None:
    store = _store(backend)
    key = backend.key()
    claim = store.claim(key, LEASE, _entry(key, retention=1.0, body=b'{"first": 1}'))
    store.release(key, claim.token, {"app.h": _failed()})
    first = store.journal_get(key)
    assert first is not None
    backend.advance(1.5)
    assert store.journal_get(key) is None
    again = store.claim(key, LEASE, _entry(key, retention=60.0, body=b'{"again": 2}'))
    assert again.state is ClaimState.ACQUIRED
    entry = store.journal_get(key)
    assert entry is not None
    assert entry.attempts == 1
    assert entry.state == "pending"
    assert entry.handlers == {}
    assert entry.body == b'{"again": 2}'
    assert entry.received_at > first.received_at
    assert [e.key for e in store.journal_list()].count(key) == 1
