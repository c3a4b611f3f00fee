"""What only the in-memory store promises: a bound on what it remembers, journal included."""

from __future__ import annotations

import logging
import os
import tracemalloc

import pytest

from flymy_receiver.stores import ClaimState, MemoryStore
from flymy_receiver.stores.records import HandlerOutcome, NewEntry


def _handle(store: MemoryStore, key: str) -> None:
    claim = store.claim(key, lease=60)
    assert claim.state is ClaimState.ACQUIRED
    store.complete(key, claim.token, ttl=3600)


def test_the_oldest_handled_events_are_forgotten_first_past_max_entries() -> None:
    store = MemoryStore(max_entries=3)
    for key in ("a", "b", "c", "d"):
        _handle(store, key)
    assert len(store) == 3
    assert store.claim("a", lease=60).state is ClaimState.ACQUIRED  # forgotten
    for key in ("b", "c", "d"):
        assert store.claim(key, lease=60).state is ClaimState.DONE


def test_per_handler_records_are_bounded_too() -> None:
    store = MemoryStore(max_entries=2)
    for key in ("a", "b", "c"):
        claim = store.claim(key, lease=60)
        store.mark_handler_done(key, claim.token, "h", ttl=3600)
        store.release(key, claim.token)
    assert store.claim("a", lease=60).done_handlers == frozenset()
    assert store.claim("c", lease=60).done_handlers == frozenset({"h"})


def test_tokens_are_unique() -> None:
    store = MemoryStore()
    tokens = set()
    for n in range(100):
        claim = store.claim(f"k{n}", lease=60)
        tokens.add(claim.token)
        store.release(f"k{n}", claim.token)
    assert len(tokens) == 100


# -- the journal's bounds (issue 22: M4, L3) ------------------------------------------------


def _entry(key: str, body: bytes = b"x" * 40) -> NewEntry:
    return NewEntry(key, "run.completed", key, "agent", None, body, {}, 3600.0)


def _journal(store: MemoryStore, key: str, outcome: str, body: bytes = b"x" * 40) -> None:
    """One delivery of ``key`` ending ``handled``, ``failed``, ``ignored`` or ``pending``."""
    if outcome == "ignored":
        store.journal_ignore(_entry(key, body))
        return
    claim = store.claim(key, 60, _entry(key, body))
    assert claim.state is ClaimState.ACQUIRED
    if outcome == "handled":
        store.complete(key, claim.token, 3600, {"h": HandlerOutcome(ok=True)})
    elif outcome == "failed":
        store.release(key, claim.token, {"h": HandlerOutcome(ok=False, error="E: x")})


def _kept(store: MemoryStore) -> list[str]:
    return sorted(e.key for e in store.journal_list(limit=1000))


def test_the_journal_bodies_are_bounded_by_default_to_32_mib() -> None:
    assert MemoryStore().max_journal_bytes == 32 * 1024 * 1024
    store = MemoryStore(max_journal_bytes=1024 * 1024)
    big = b"x" * (600 * 1024)
    _journal(store, "first", "failed", big)
    _journal(store, "second", "failed", big)  # past the bound: kept without its body
    second = store.journal_get("second")
    assert second is not None
    assert (second.body, second.body_dropped, second.body_size) == (None, True, len(big))
    assert second.state == "failed"
    first = store.journal_get("first")
    assert first is not None
    assert first.body == big
    assert not first.body_dropped
    assert store._journal.bytes == len(big)


def test_a_dropped_body_is_let_go_of_not_only_uncounted() -> None:
    # The journal keeps the delivery's NewEntry as it arrived (no copy per delivery): once
    # its body is dropped, nothing of the store may still hold those bytes.
    store = MemoryStore(max_journal_bytes=1024 * 1024)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(40):  # 40 bodies of 256 KiB: 10 MiB through a 1 MiB bound
            _journal(store, f"k{i}", "handled" if i % 2 else "failed", os.urandom(256 * 1024))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert store._journal.bytes <= 1024 * 1024
    kept = [e for e in store.journal_list(limit=100) if not e.body_dropped]
    assert 0 < len(kept) <= 4
    assert held < 2 * 1024 * 1024  # the bound, plus the entries' small records


def test_handled_and_ignored_bodies_are_dropped_first_never_a_claim() -> None:
    store = MemoryStore(max_journal_bytes=100)
    _journal(store, "handled", "handled")
    _journal(store, "ignored", "ignored")
    _journal(store, "failed", "failed")  # 120 bytes: the handled entry's body makes room
    assert _body(store, "failed") == b"x" * 40
    assert _body(store, "handled") is None
    assert _body(store, "ignored") == b"x" * 40
    _journal(store, "pending", "pending")  # then the ignored one's
    assert _body(store, "ignored") is None
    assert _body(store, "pending") == b"x" * 40
    _journal(store, "another", "pending")  # nothing settled is left: this one goes bodiless
    assert _body(store, "another") is None
    assert _body(store, "failed") == b"x" * 40
    # Claims and idempotency records never depend on the journal's bound.
    assert store.claim("handled", 60).state is ClaimState.DONE
    assert store.claim("pending", 60).state is ClaimState.BUSY
    assert _kept(store) == ["another", "failed", "handled", "ignored", "pending"]


def _body(store: MemoryStore, key: str) -> bytes | None:
    entry = store.journal_get(key)
    assert entry is not None
    assert entry.body_dropped is (entry.body is None)
    return entry.body


def test_a_new_body_for_an_entry_replaces_the_old_in_the_count() -> None:
    store = MemoryStore(max_journal_bytes=100)
    _journal(store, "k", "failed", b"a" * 60)
    claim = store.claim("k", 60, _entry("k", b"b" * 70))  # the retry's body replaces it
    assert claim.state is ClaimState.ACQUIRED
    assert _body(store, "k") == b"b" * 70
    assert store._journal.bytes == 70


def test_a_full_journal_evicts_handled_and_ignored_entries_first(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = MemoryStore(max_journal=3)
    _journal(store, "a-failed", "failed")
    _journal(store, "b-handled", "handled")
    _journal(store, "c-ignored", "ignored")
    with caplog.at_level(logging.WARNING, logger="flymy_receiver"):
        _journal(store, "d-pending", "pending")
        assert _kept(store) == ["a-failed", "c-ignored", "d-pending"]
        _journal(store, "e-failed", "failed")
        assert _kept(store) == ["a-failed", "d-pending", "e-failed"]
    assert caplog.records == []  # nothing that could need a replay went


def test_dropping_an_unreplayed_entry_logs_a_bounded_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = MemoryStore(max_journal=2)
    long_key = "run.completed:" + "r" * 5000
    _journal(store, long_key, "failed")
    _journal(store, "pending", "pending")
    with caplog.at_level(logging.WARNING, logger="flymy_receiver"):
        _journal(store, "third", "handled")
    assert _kept(store) == ["pending", "third"]
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    message = record.getMessage()
    assert "failed" in message
    assert "r" * 200 not in message
    assert len(message) < 500
    assert "max_journal=2" in message
