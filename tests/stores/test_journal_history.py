"""The journal contract, part two (flymy_receiver/stores/base.py): each entry's history of
attempts, what a later delivery may change (issue 22, M3), ``Claim.prior_state`` and
``journal_resolve``. Run against every store that keeps a journal."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from flymy_receiver.stores import ClaimState
from flymy_receiver.stores.records import HISTORY_LIMIT
from tests.stores.backends import JOURNAL_BACKENDS, Backend, make_backend
from tests.stores.journal_kit import (
    LEASE,
    TTL,
    attempt,
    failed,
    get,
    new_entry,
    ok,
    store_of,
)


@pytest.fixture(params=JOURNAL_BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from make_backend(request.param, request, tmp_path)


OLD = b'{"event":"run.completed","data":{"v":"old"}}'
NEW = b'{"event":"run.completed","data":{"v":"new"}}'


# -- history ------------------------------------------------------------------------------


def test_a_duplicate_and_an_in_flight_delivery_append_their_attempts(backend: Backend) -> None:
    store = store_of(backend)
    key = backend.key()
    claim = store.claim(key, LEASE, new_entry(key))
    assert get(store, key).history == ()  # the acquired delivery's attempt comes at its end
    assert store.claim(key, LEASE, new_entry(key)).state is ClaimState.BUSY
    store.complete(key, claim.token, TTL, {"app.h": ok()}, attempt("handled", 200, at=5.0))
    assert store.claim(key, LEASE, new_entry(key)).state is ClaimState.DONE
    history = get(store, key).history
    assert [(a.source, a.status, a.outcome) for a in history] == [
        ("sender", 409, "in_flight"),
        ("sender", 200, "handled"),
        ("sender", 200, "duplicate"),
    ]
    assert history[1].at == 5.0
    assert history[1].duration == 0.25
    assert history[0].at > 0
    assert history[2].at > 0


def test_release_and_ignore_append_the_attempt_given(backend: Backend) -> None:
    store = store_of(backend)
    key = backend.key()
    claim = store.claim(key, LEASE, new_entry(key))
    store.release(key, claim.token, {"app.h": failed()}, attempt("failed", 500, at=1.0))
    store.journal_ignore(new_entry(key), attempt("ignored", 200, at=2.0))
    entry = get(store, key)
    assert [(a.at, a.status, a.outcome) for a in entry.history] == [
        (1.0, 500, "failed"),
        (2.0, 200, "ignored"),
    ]
    assert entry.attempts == 2


def test_a_replay_that_finds_the_key_held_appends_a_replay_attempt(backend: Backend) -> None:
    store = store_of(backend)
    key = backend.key()
    store.claim(key, LEASE, new_entry(key))
    busy = store.claim(key, LEASE, replay=True)
    assert busy.state is ClaimState.BUSY
    entry = get(store, key)
    assert [(a.source, a.status, a.outcome) for a in entry.history] == [
        ("replay", 409, "in_flight")
    ]
    assert entry.attempts == 1  # a replay is not a delivery


def test_a_worker_attempt_keeps_its_handler_and_no_status(backend: Backend) -> None:
    store = store_of(backend)
    key = backend.key()
    claim = store.claim(key, LEASE, new_entry(key))
    store.complete(
        key,
        claim.token,
        TTL,
        {"app.h": ok()},
        attempt(status=None, source="worker", handler="app.h"),
    )
    [only] = get(store, key).history
    assert (only.source, only.status, only.handler) == ("worker", None, "app.h")


def test_the_history_keeps_the_newest_attempts_oldest_first(backend: Backend) -> None:
    store = store_of(backend)
    key = backend.key()
    total = HISTORY_LIMIT + 10
    for i in range(total):
        store.journal_ignore(new_entry(key), attempt("ignored", at=float(i + 1)))
    entry = get(store, key)
    assert entry.attempts == total
    assert [a.at for a in entry.history] == [float(i + 1) for i in range(10, total)]


# -- what a later delivery may change (M3) --------------------------------------------------


def test_an_ignored_delivery_never_hides_a_failed_entry_nor_swaps_its_body(
    backend: Backend,
) -> None:
    store = store_of(backend)
    key = backend.key()
    claim = store.claim(key, LEASE, new_entry(key, body=OLD))
    store.release(key, claim.token, {"app.h": failed()})
    store.journal_ignore(new_entry(key, body=NEW), attempt("ignored"))
    entry = get(store, key)
    assert entry.state == "failed"
    assert entry.body == OLD
    assert entry.body_size == len(OLD)
    assert entry.attempts == 2
    assert key in [e.key for e in store.journal_list(state="failed")]


def test_an_ignored_delivery_leaves_pending_and_handled_entries_alone(backend: Backend) -> None:
    store = store_of(backend)
    pending, handled = backend.key(), backend.key()
    store.claim(pending, 60, new_entry(pending, body=OLD))
    claim = store.claim(handled, LEASE, new_entry(handled, body=OLD))
    store.complete(handled, claim.token, TTL, {"app.h": ok()})
    for key, state in ((pending, "pending"), (handled, "handled")):
        store.journal_ignore(new_entry(key, body=NEW, event="run.other"))
        entry = get(store, key)
        assert (entry.state, entry.body, entry.event) == (state, OLD, "run.completed")


def test_a_duplicate_or_busy_claim_keeps_the_body_the_handlers_ran_on(backend: Backend) -> None:
    store = store_of(backend)
    key = backend.key()
    claim = store.claim(key, LEASE, new_entry(key, body=OLD))
    assert store.claim(key, LEASE, new_entry(key, body=NEW)).state is ClaimState.BUSY
    assert get(store, key).body == OLD
    store.complete(key, claim.token, TTL, {"app.h": ok()})
    assert store.claim(key, LEASE, new_entry(key, body=NEW)).state is ClaimState.DONE
    entry = get(store, key)
    assert (entry.state, entry.body) == ("handled", OLD)


def test_an_acquired_claim_with_another_body_stores_the_new_body(backend: Backend) -> None:
    store = store_of(backend)
    key = backend.key()
    claim = store.claim(key, LEASE, new_entry(key, body=OLD))
    store.release(key, claim.token, {"app.h": failed()})
    again = store.claim(key, LEASE, new_entry(key, body=NEW))
    assert again.state is ClaimState.ACQUIRED
    entry = get(store, key)
    assert (entry.state, entry.body, entry.body_size) == ("pending", NEW, len(NEW))


def test_an_acquired_delivery_takes_an_ignored_entry_over_with_its_body(backend: Backend) -> None:
    store = store_of(backend)
    key = backend.key()
    store.journal_ignore(new_entry(key, body=OLD))
    claim = store.claim(key, LEASE, new_entry(key, body=NEW))
    assert claim.state is ClaimState.ACQUIRED
    assert (get(store, key).state, get(store, key).body) == ("pending", NEW)


# -- Claim.prior_state ----------------------------------------------------------------------


def test_a_claim_reports_the_entrys_state_before_it(backend: Backend) -> None:
    store = store_of(backend)
    key = backend.key()
    first = store.claim(key, LEASE, new_entry(key))
    assert first.prior_state == ""  # a new entry
    store.release(key, first.token, {"app.h": failed()})
    second = store.claim(key, LEASE, new_entry(key))
    assert second.prior_state == "failed"
    assert store.claim(key, LEASE, new_entry(key)).prior_state == "pending"  # BUSY
    store.complete(key, second.token, TTL, {"app.h": ok()})
    assert store.claim(key, LEASE, new_entry(key)).prior_state == "handled"  # DONE
    forced = store.claim(key, LEASE, replay=True, force=True)
    assert forced.state is ClaimState.ACQUIRED
    assert forced.prior_state == "handled"
    assert store.claim(backend.key(), LEASE).prior_state == ""  # no journal entry at all


def test_prior_state_of_an_ignored_entry(backend: Backend) -> None:
    store = store_of(backend)
    key = backend.key()
    store.journal_ignore(new_entry(key))
    assert store.claim(key, LEASE, new_entry(key)).prior_state == "ignored"


# -- journal_resolve ------------------------------------------------------------------------


def test_resolve_dismisses_a_failed_entry_until_a_delivery_takes_it_again(
    backend: Backend,
) -> None:
    store = store_of(backend)
    key = backend.key()
    claim = store.claim(key, LEASE, new_entry(key))
    store.release(key, claim.token, {"app.h": failed()})
    assert store.journal_resolve(key, "refunded by hand, ticket #42 ✓") is True
    entry = get(store, key)
    assert (entry.state, entry.note) == ("resolved", "refunded by hand, ticket #42 ✓")
    assert entry.handlers["app.h"].error == "RuntimeError: boom"  # kept
    assert key not in [e.key for e in store.journal_list(state="failed")]
    assert [e.key for e in store.journal_list(state="resolved") if e.key == key] == [key]
    store.journal_ignore(new_entry(key))
    assert get(store, key).state == "resolved"  # an unwanted delivery changes nothing
    again = store.claim(key, LEASE, new_entry(key))
    assert again.state is ClaimState.ACQUIRED
    assert again.prior_state == "resolved"
    assert get(store, key).state == "pending"


def test_resolve_of_an_unknown_key_is_false(backend: Backend) -> None:
    store = store_of(backend)
    assert store.journal_resolve(backend.key(), "nothing there") is False
