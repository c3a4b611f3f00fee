"""The journal contract, part four (flymy_receiver/stores/base.py): deferred handlers, each
run by a task queue's worker under its own lease (``claim_handler``/``finish_handler``), and
the ``queued`` state. Run against every store that keeps a journal."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from flymy_receiver.awaiting import SETTLED_STATES, SettledLookup
from flymy_receiver.stores import ClaimState
from flymy_receiver.stores.base import JournalStore
from flymy_receiver.stores.records import HandlerOutcome, JournalEntry
from tests.stores.backends import JOURNAL_BACKENDS, Backend, make_backend
from tests.stores.journal_kit import (
    LEASE,
    TTL,
    attempt,
    failed,
    get,
    new_entry,
    ok,
    queued,
    store_of,
)


@pytest.fixture(params=JOURNAL_BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from make_backend(request.param, request, tmp_path)


BODY = b'{"event":"run.completed","data":{"run_id":"r","deferred":true}}'


def _delivered(store: JournalStore, key: str, *deferred: str) -> None:
    """A delivery whose inline handler ``app.inline`` succeeded and whose deferred handlers
    are queued: acknowledged, done for the sender."""
    claim = store.claim(key, LEASE, new_entry(key, body=BODY))
    store.mark_handler_done(key, claim.token, "app.inline", TTL, ok())
    outcomes = {"app.inline": ok(), **{name: queued() for name in deferred}}
    store.complete(key, claim.token, TTL, outcomes, attempt("queued", 200))


def _run(ok_: bool) -> HandlerOutcome:
    if ok_:
        return HandlerOutcome(ok=True, at=1_700_000_100.0, deferred=True)
    outcome = failed("worker boom")
    outcome.deferred = True
    return outcome


def _finish(
    store: JournalStore, key: str, handler: str, token: str, ok_: bool, final: bool = False
) -> None:
    run = attempt("handled" if ok_ else "failed", None, source="worker", handler=handler)
    store.finish_handler(key, handler, token, _run(ok_), run, final, TTL)


def _settled(store: JournalStore, run_id: str) -> Mapping[str, JournalEntry]:
    """What the waiters of flymy_receiver.awaiting find settled, as they look it up."""
    if isinstance(store, SettledLookup):
        return store.journal_settled([run_id])
    entry = store.journal_get(run_id)
    return {run_id: entry} if entry is not None and entry.state in SETTLED_STATES else {}


def test_complete_with_a_queued_handler_makes_the_entry_queued(backend: Backend) -> None:
    store = store_of(backend)
    key = backend.key()
    _delivered(store, key, "app.deferred")
    entry = get(store, key)
    assert entry.state == "queued"
    assert entry.handlers["app.deferred"].state == "queued"
    assert entry.handlers["app.deferred"].deferred
    assert entry.handlers["app.inline"].state == "ok"
    assert [a.outcome for a in entry.history] == ["queued"]
    assert store.claim(key, LEASE, new_entry(key)).state is ClaimState.DONE  # acknowledged
    assert key in [e.key for e in store.journal_list(state="queued")]
    assert key not in [e.key for e in store.journal_list(state="failed")]


def test_a_queued_entry_is_not_settled_for_the_waiters(backend: Backend) -> None:
    store = store_of(backend)
    key = backend.key()
    run_id = key.rpartition(":")[2]
    _delivered(store, key, "app.deferred")
    assert _settled(store, run_id) == {}
    claim = store.claim_handler(key, "app.deferred", LEASE)
    assert _settled(store, run_id) == {}
    _finish(store, key, "app.deferred", claim.token, True)
    assert _settled(store, run_id)[run_id].key == key


def test_claim_handler_takes_the_handlers_own_lease(backend: Backend) -> None:
    store = store_of(backend)
    key = backend.key()
    _delivered(store, key, "app.deferred", "app.other")
    claim = store.claim_handler(key, "app.deferred", LEASE)
    assert claim.state is ClaimState.ACQUIRED
    assert claim.token
    assert claim.body == BODY
    assert claim.prior_state == "queued"
    running = get(store, key).handlers["app.deferred"]
    assert (running.state, running.attempts) == ("running", 1)
    assert running.lease_until > 0
    busy = store.claim_handler(key, "app.deferred", LEASE)
    assert busy.state is ClaimState.BUSY
    assert 0 < busy.retry_after <= LEASE
    # Another handler of the same entry has a lease of its own.
    assert store.claim_handler(key, "app.other", LEASE).state is ClaimState.ACQUIRED
    backend.advance(LEASE)
    again = store.claim_handler(key, "app.deferred", LEASE)
    assert again.state is ClaimState.ACQUIRED
    assert again.token != claim.token
    assert get(store, key).handlers["app.deferred"].attempts == 2


def test_every_handler_ok_makes_the_entry_handled(backend: Backend) -> None:
    store = store_of(backend)
    key = backend.key()
    _delivered(store, key, "app.first", "app.second")
    first = store.claim_handler(key, "app.first", LEASE)
    _finish(store, key, "app.first", first.token, True)
    entry = get(store, key)
    assert entry.state == "queued"  # app.second still to run
    assert (entry.handlers["app.first"].state, entry.handlers["app.first"].attempts) == ("ok", 1)
    assert entry.handlers["app.first"].lease_until == 0
    assert store.claim_handler(key, "app.first", LEASE).state is ClaimState.DONE
    second = store.claim_handler(key, "app.second", LEASE)
    _finish(store, key, "app.second", second.token, True)
    entry = get(store, key)
    assert entry.state == "handled"
    workers = [(a.source, a.handler, a.status) for a in entry.history if a.source == "worker"]
    assert workers == [("worker", "app.first", None), ("worker", "app.second", None)]


def test_a_failure_that_the_queue_retries_keeps_the_entry_queued(backend: Backend) -> None:
    store = store_of(backend)
    key = backend.key()
    _delivered(store, key, "app.deferred")
    claim = store.claim_handler(key, "app.deferred", LEASE)
    _finish(store, key, "app.deferred", claim.token, False, final=False)
    entry = get(store, key)
    assert entry.state == "queued"
    outcome = entry.handlers["app.deferred"]
    assert (outcome.state, outcome.error) == ("failed", "RuntimeError: worker boom")
    assert outcome.attempts == 1
    retry = store.claim_handler(key, "app.deferred", LEASE)  # the queue's retry, at once
    assert retry.state is ClaimState.ACQUIRED
    assert retry.prior_state == "queued"
    _finish(store, key, "app.deferred", retry.token, True)
    assert get(store, key).state == "handled"


def test_a_final_failure_makes_the_entry_failed_and_replayable(backend: Backend) -> None:
    store = store_of(backend)
    key = backend.key()
    _delivered(store, key, "app.good", "app.bad")
    good = store.claim_handler(key, "app.good", LEASE)
    _finish(store, key, "app.good", good.token, True)
    bad = store.claim_handler(key, "app.bad", LEASE)
    _finish(store, key, "app.bad", bad.token, False, final=True)
    entry = get(store, key)
    assert entry.state == "failed"
    assert key in [e.key for e in store.journal_list(state="failed")]
    replay = store.claim(key, LEASE, replay=True)
    assert replay.state is ClaimState.ACQUIRED  # the key is no longer done
    assert replay.prior_state == "failed"
    assert replay.done_handlers == frozenset({"app.inline", "app.good"})


def test_ok_is_recorded_even_after_the_lease_was_lost(backend: Backend) -> None:
    store = store_of(backend)
    key = backend.key()
    _delivered(store, key, "app.deferred")
    slow = store.claim_handler(key, "app.deferred", LEASE)
    backend.advance(LEASE)
    assert store.claim_handler(key, "app.deferred", LEASE).state is ClaimState.ACQUIRED
    _finish(store, key, "app.deferred", slow.token, True)  # the work was done
    entry = get(store, key)
    assert entry.handlers["app.deferred"].state == "ok"
    assert entry.state == "handled"


def test_a_failure_with_a_lost_lease_changes_nothing(backend: Backend) -> None:
    store = store_of(backend)
    key = backend.key()
    _delivered(store, key, "app.deferred")
    slow = store.claim_handler(key, "app.deferred", LEASE)
    backend.advance(LEASE)
    fresh = store.claim_handler(key, "app.deferred", LEASE)
    assert fresh.state is ClaimState.ACQUIRED
    _finish(store, key, "app.deferred", slow.token, False, final=True)
    entry = get(store, key)
    assert entry.state == "queued"
    assert entry.handlers["app.deferred"].state == "running"
    assert store.claim(key, LEASE, replay=True).state is ClaimState.DONE  # still done
    _finish(store, key, "app.deferred", fresh.token, True)
    assert get(store, key).state == "handled"


def test_claim_handler_of_an_unknown_entry_raises_key_error(backend: Backend) -> None:
    store = store_of(backend)
    with pytest.raises(KeyError):
        store.claim_handler(backend.key(), "app.deferred", LEASE)
