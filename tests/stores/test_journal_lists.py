"""The journal contract, part three (flymy_receiver/stores/base.py): lists return summaries
(issue 22, M5), their filters and keyset pages, the derived ``stalled`` state (L2) and run ids
of any length (M6). Run against every store that keeps a journal."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from flymy_receiver.stores import ClaimState
from flymy_receiver.stores.base import JournalStore
from flymy_receiver.stores.records import JournalEntry
from tests.stores.backends import JOURNAL_BACKENDS, Backend, make_backend
from tests.stores.journal_kit import (
    LEASE,
    TTL,
    failed,
    get,
    new_entry,
    ok,
    store_of,
)


@pytest.fixture(params=JOURNAL_BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from make_backend(request.param, request, tmp_path)


def _keys(entries: list[JournalEntry]) -> list[str]:
    return [e.key for e in entries]


def _handled(store: JournalStore, key: str, run_id: str | None = None) -> None:
    claim = store.claim(key, LEASE, new_entry(key, run_id=run_id))
    store.complete(key, claim.token, TTL, {"app.h": ok()})


def _failed(store: JournalStore, key: str) -> None:
    claim = store.claim(key, LEASE, new_entry(key))
    store.release(key, claim.token, {"app.h": failed()})


def _pages(store: JournalStore, size: int, state: str | None = None) -> list[str]:
    """Every key, page after page, following the keyset (bounded)."""
    seen: list[str] = []
    before = None
    for _ in range(100):
        page = store.journal_list(state=state, before=before, limit=size)
        assert len(page) <= size
        seen.extend(_keys(page))
        if len(page) < size:
            return seen
        before = page[-1].key
    raise AssertionError("the pages never ended")


# -- summaries ------------------------------------------------------------------------------


def test_lists_return_summaries_without_body_nor_history(backend: Backend) -> None:
    store = store_of(backend)
    key = backend.key()
    body = b'{"event":"run.completed","data":{"big":"' + b"x" * 5000 + b'"}}'
    claim = store.claim(key, LEASE, new_entry(key, body=body))
    assert store.claim(key, LEASE, new_entry(key, body=body)).state is ClaimState.BUSY
    store.complete(key, claim.token, TTL, {"app.h": ok(), "app.g": failed()})
    [summary] = [e for e in store.journal_list() if e.key == key]
    assert summary.body is None
    assert summary.history == ()
    assert summary.body_size == len(body)
    assert summary.body_dropped is False
    assert set(summary.handlers) == {"app.h", "app.g"}
    assert summary.handlers["app.g"].error == "RuntimeError: boom"
    assert (summary.state, summary.attempts, summary.agent_id) == ("handled", 2, "agent_abc")
    full = get(store, key)
    assert full.body == body
    assert full.body_size == len(body)
    assert len(full.history) == 1


# -- filters --------------------------------------------------------------------------------


def test_list_filters_by_run_id(backend: Backend) -> None:
    store = store_of(backend)
    run_id = backend.key().rpartition(":")[2]
    started, completed = f"run.started:{run_id}", f"run.completed:{run_id}"
    store.journal_ignore(new_entry(started, run_id=run_id, event="run.started"))
    backend.advance(0.01)
    _handled(store, completed, run_id=run_id)
    _handled(store, backend.key())
    assert _keys(store.journal_list(run_id=run_id)) == [completed, started]
    assert store.journal_list(run_id="run_never_seen") == []


def test_since_is_inclusive_and_until_exclusive(backend: Backend) -> None:
    store = store_of(backend)
    keys = []
    for _ in range(3):
        keys.append(backend.key())
        store.journal_ignore(new_entry(keys[-1]))
        backend.advance(0.05)
    first, middle, last = (get(store, key).received_at for key in keys)
    assert first < middle < last
    listed = _keys(store.journal_list(since=middle, limit=1000))
    assert keys[1] in listed
    assert keys[2] in listed
    assert keys[0] not in listed
    listed = _keys(store.journal_list(since=first, until=middle, limit=1000))
    assert keys[0] in listed
    assert keys[1] not in listed
    assert keys[2] not in listed
    assert _keys(store.journal_list(since=middle, until=last, limit=1000)) == [keys[1]]
    assert store.journal_list(since=last + timedelta(days=1)) == []


def test_filters_combine(backend: Backend) -> None:
    store = store_of(backend)
    mine, other_agent, other_event = backend.key(), backend.key(), backend.key("run.failed")
    _failed(store, mine)
    claim = store.claim(other_agent, LEASE, new_entry(other_agent, agent_id="agent_zzz"))
    store.release(other_agent, claim.token, {"app.h": failed()})
    store.journal_ignore(new_entry(other_event, event="run.failed"))
    found = store.journal_list(state="failed", event="run.completed", agent_id="agent_abc")
    assert mine in _keys(found)
    assert other_agent not in _keys(found)
    assert other_event not in _keys(found)
    assert _keys(store.journal_list(state="ignored", event="run.failed")) == [other_event]


# -- keyset pages ---------------------------------------------------------------------------


def test_pages_cover_every_entry_once_newest_first_even_at_equal_times(backend: Backend) -> None:
    store = store_of(backend)
    keys = [backend.key() for _ in range(7)]
    for key in keys:  # without advancing the clock: equal received_at where time is simulated
        store.journal_ignore(new_entry(key))
    backend.advance(0.01)
    for key in keys[:3]:  # more attempts on some: the order is by first receipt
        store.journal_ignore(new_entry(key))
    everything = store.journal_list(limit=1000)
    ours = [e for e in everything if e.key in keys]
    expected = sorted(ours, key=lambda e: (e.received_at, e.key), reverse=True)
    assert _keys(ours) == _keys(expected)
    for size in (1, 2, 3, 7):
        paged = [key for key in _pages(store, size) if key in keys]
        assert paged == _keys(expected), size


def test_before_pages_within_a_filter(backend: Backend) -> None:
    store = store_of(backend)
    failed_keys = []
    for i in range(5):
        key = backend.key()
        if i % 2:
            _handled(store, key)
        else:
            _failed(store, key)
            failed_keys.append(key)
        backend.advance(0.01)
    paged = _pages(store, 2, state="failed")
    assert [key for key in paged if key in failed_keys] == list(reversed(failed_keys))
    [newest, *_] = store.journal_list(state="failed", limit=1)
    older = store.journal_list(state="failed", before=newest.key, limit=100)
    assert newest.key not in _keys(older)
    assert all(e.state in ("failed", "stalled") for e in older)


def test_before_with_every_other_filter(backend: Backend) -> None:
    store = store_of(backend)
    run_id = backend.key().rpartition(":")[2]
    keys = [f"run.completed:{run_id}:{i}" for i in range(4)]
    for key in keys:
        store.journal_ignore(new_entry(key, run_id=run_id))
        backend.advance(0.01)
    page = store.journal_list(run_id=run_id, before=keys[2], limit=10)
    assert _keys(page) == [keys[1], keys[0]]


# -- stalled (L2) ---------------------------------------------------------------------------


def test_a_pending_entry_whose_lease_ended_is_stalled_and_listed_as_failed(
    backend: Backend,
) -> None:
    store = store_of(backend)
    dead, alive, broken = backend.key(), backend.key(), backend.key()
    store.claim(dead, LEASE, new_entry(dead))  # its worker dies: no complete, no release
    backend.advance(0.01)
    _failed(store, broken)
    backend.advance(LEASE)
    store.claim(alive, 60, new_entry(alive))
    assert get(store, dead).state == "stalled"
    assert get(store, alive).state == "pending"
    failures = {e.key: e.state for e in store.journal_list(state="failed", limit=1000)}
    assert [key for key in failures if key in (dead, broken)] == [broken, dead]  # newest first
    assert failures.get(dead) == "stalled"
    assert failures.get(broken) == "failed"
    assert alive not in failures
    stalled = _keys(store.journal_list(state="stalled", limit=1000))
    assert dead in stalled
    assert broken not in stalled
    assert alive not in stalled
    pending = _keys(store.journal_list(state="pending", limit=1000))
    assert alive in pending
    assert dead not in pending


def test_a_stalled_entry_is_pending_again_once_claimed(backend: Backend) -> None:
    store = store_of(backend)
    key = backend.key()
    store.claim(key, LEASE, new_entry(key))
    backend.advance(LEASE)
    again = store.claim(key, 60, replay=True)
    assert again.state is ClaimState.ACQUIRED
    assert get(store, key).state == "pending"
    assert key not in _keys(store.journal_list(state="failed", limit=1000))
    store.complete(key, again.token, TTL, {"app.h": ok()})
    assert get(store, key).state == "handled"


# -- run ids of any length (M6) -------------------------------------------------------------


def test_a_run_id_of_ten_thousand_characters_is_journaled_and_found(backend: Backend) -> None:
    store = store_of(backend)
    prefix = backend.key().rpartition(":")[2] + "é" * 5000
    run_id, twin = prefix + "a" * 5000, prefix + "b" * 5000  # the same first 10 000 bytes
    key, twin_key = f"run.completed:{run_id}", f"run.completed:{twin}"
    claim = store.claim(key, LEASE, new_entry(key, run_id=run_id))
    assert claim.state is ClaimState.ACQUIRED
    store.complete(key, claim.token, TTL, {"app.h": ok()})
    store.journal_ignore(new_entry(twin_key, run_id=twin))
    assert get(store, run_id).key == key
    assert get(store, key).run_id == run_id
    assert get(store, twin).key == twin_key
    assert _keys(store.journal_list(run_id=run_id)) == [key]
    assert store.claim(key, LEASE, new_entry(key, run_id=run_id)).state is ClaimState.DONE
