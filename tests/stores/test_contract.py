"""The store contract (flymy_receiver/stores/base.py), run against every store."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from flymy_receiver.stores import ClaimState, Store
from tests.stores.backends import BACKENDS, Backend, make_backend

# Short enough for Redis, which can only be tested in real time.
LEASE = 0.3
TTL = 0.6


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from make_backend(request.param, request, tmp_path)


def test_follows_the_protocol(backend: Backend) -> None:
    assert isinstance(backend.store, Store)
    assert isinstance(backend.store.blocking, bool)


def test_first_claim_is_acquired_and_the_next_is_busy(backend: Backend) -> None:
    key = backend.key()
    first = backend.store.claim(key, LEASE)
    assert first.state is ClaimState.ACQUIRED
    assert first.token
    assert first.done_handlers == frozenset()
    second = backend.store.claim(key, LEASE)
    assert second.state is ClaimState.BUSY
    assert not second.token
    assert 0 < second.retry_after <= LEASE


def test_completed_key_is_done_for_every_later_claim(backend: Backend) -> None:
    key = backend.key()
    claim = backend.store.claim(key, LEASE)
    backend.store.complete(key, claim.token, 60)
    for _ in range(3):
        assert backend.store.claim(key, LEASE).state is ClaimState.DONE


def test_keys_are_independent(backend: Backend) -> None:
    a, b = backend.key(), backend.key()
    backend.store.complete(a, backend.store.claim(a, LEASE).token, 60)
    assert backend.store.claim(b, LEASE).state is ClaimState.ACQUIRED
    assert backend.store.claim(a, LEASE).state is ClaimState.DONE


def test_release_lets_the_next_claim_in_with_a_new_token(backend: Backend) -> None:
    key = backend.key()
    first = backend.store.claim(key, LEASE)
    backend.store.release(key, first.token)
    again = backend.store.claim(key, LEASE)
    assert again.state is ClaimState.ACQUIRED
    assert again.token != first.token


def test_release_with_another_token_is_a_no_op(backend: Backend) -> None:
    key = backend.key()
    backend.store.claim(key, LEASE)
    backend.store.release(key, "not-the-token")
    assert backend.store.claim(key, LEASE).state is ClaimState.BUSY


def test_release_after_complete_keeps_it_done(backend: Backend) -> None:
    key = backend.key()
    claim = backend.store.claim(key, LEASE)
    backend.store.complete(key, claim.token, 60)
    backend.store.release(key, claim.token)
    assert backend.store.claim(key, LEASE).state is ClaimState.DONE


def test_a_dead_workers_claim_expires_after_its_lease(backend: Backend) -> None:
    key = backend.key()
    dead = backend.store.claim(key, LEASE)  # its worker never completes nor releases
    backend.advance(LEASE)
    retry = backend.store.claim(key, LEASE)
    assert retry.state is ClaimState.ACQUIRED
    assert retry.token != dead.token
    # The late worker's release must not free the claim its successor holds.
    backend.store.release(key, dead.token)
    assert backend.store.claim(key, LEASE).state is ClaimState.BUSY


def test_late_completion_is_still_recorded(backend: Backend) -> None:
    key = backend.key()
    slow = backend.store.claim(key, LEASE)
    backend.advance(LEASE)
    second = backend.store.claim(key, LEASE)
    assert second.state is ClaimState.ACQUIRED
    # The slow worker did finish the work: forgetting that would only run it again.
    backend.store.complete(key, slow.token, 60)
    backend.store.release(key, second.token)  # the second worker failed afterwards
    assert backend.store.claim(key, LEASE).state is ClaimState.DONE


def test_done_is_remembered_for_ttl_then_forgotten(backend: Backend) -> None:
    key = backend.key()
    backend.store.complete(key, backend.store.claim(key, LEASE).token, TTL)
    backend.advance(TTL / 3)
    assert backend.store.claim(key, LEASE).state is ClaimState.DONE
    backend.advance(TTL)
    assert backend.store.claim(key, LEASE).state is ClaimState.ACQUIRED


def test_handlers_done_survive_a_release(backend: Backend) -> None:
    key = backend.key()
    claim = backend.store.claim(key, LEASE)
    backend.store.mark_handler_done(key, claim.token, "app.save_lead", 60)
    backend.store.mark_handler_done(key, claim.token, "app.notify", 60)
    backend.store.release(key, claim.token)
    again = backend.store.claim(key, LEASE)
    assert again.state is ClaimState.ACQUIRED
    assert again.done_handlers == frozenset({"app.save_lead", "app.notify"})


def test_handlers_done_survive_an_expired_lease(backend: Backend) -> None:
    key = backend.key()
    claim = backend.store.claim(key, LEASE)
    backend.store.mark_handler_done(key, claim.token, "app.save_lead", 60)
    backend.advance(LEASE)  # the worker died before the second handler finished
    again = backend.store.claim(key, LEASE)
    assert again.state is ClaimState.ACQUIRED
    assert again.done_handlers == frozenset({"app.save_lead"})


def test_handler_records_expire_after_their_ttl(backend: Backend) -> None:
    key = backend.key()
    claim = backend.store.claim(key, LEASE)
    backend.store.mark_handler_done(key, claim.token, "app.save_lead", TTL)
    backend.store.release(key, claim.token)
    backend.advance(TTL)
    assert backend.store.claim(key, LEASE).done_handlers == frozenset()


def test_complete_clears_the_handler_records(backend: Backend) -> None:
    key = backend.key()
    claim = backend.store.claim(key, LEASE)
    backend.store.mark_handler_done(key, claim.token, "app.save_lead", 60)
    backend.store.complete(key, claim.token, TTL)
    backend.advance(TTL)  # the done record is gone; nothing of the old run is left
    again = backend.store.claim(key, LEASE)
    assert again.state is ClaimState.ACQUIRED
    assert again.done_handlers == frozenset()


@pytest.mark.parametrize(
    "key",
    [
        "run.completed:ключ-é-🙂",
        "run.completed:{braces}}{",
        "run.completed:with spaces and ' quotes \"",
        "x" * 200,
    ],
)
def test_any_key_text_works(backend: Backend, key: str) -> None:
    claim = backend.store.claim(key, LEASE)
    assert claim.state is ClaimState.ACQUIRED
    assert backend.store.claim(key + "-other", LEASE).state is ClaimState.ACQUIRED
    backend.store.complete(key, claim.token, 60)
    assert backend.store.claim(key, LEASE).state is ClaimState.DONE


def test_claims_are_atomic_across_threads(backend: Backend) -> None:
    """8 threads claim each of 10 keys at the same moment: exactly one wins each key."""
    keys = [backend.key() for _ in range(10)]
    threads = 8
    barrier = threading.Barrier(threads, timeout=30)
    wins: list[list[str]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            for key in keys:
                barrier.wait()
                if backend.store.claim(key, 60).state is ClaimState.ACQUIRED:
                    wins[index].append(key)
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)
            barrier.abort()

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(60)
    assert not errors
    won = sorted(key for w in wins for key in w)
    assert won == sorted(keys)
