"""What only the in-memory store promises: a bound on what it remembers."""

from __future__ import annotations

from flymy_receiver.stores import ClaimState, MemoryStore


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
