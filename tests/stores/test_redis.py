"""RedisStore: server-side expiry, outages, client options."""

from __future__ import annotations

import pytest

from flymy_receiver.errors import StoreUnavailable
from flymy_receiver.stores import ClaimState, RedisStore, store_from_url
from tests.servers import free_port
from tests.stores.redis_server import RedisServer, running_redis


def test_keys_expire_on_the_server(redis_server: RedisServer, redis_url: str) -> None:
    store = RedisStore(redis_url, prefix="t1:")
    claim = store.claim("run.completed:r1", 30)
    raw = redis_server.client()
    assert 0 < raw.pttl("t1:{run.completed:r1}") <= 30_000
    store.mark_handler_done("run.completed:r1", claim.token, "h", 120)
    assert 60_000 < raw.pttl("t1:{run.completed:r1}:h") <= 120_000
    store.complete("run.completed:r1", claim.token, 3600)
    assert raw.get("t1:{run.completed:r1}") == b"done"
    assert 3_000_000 < raw.pttl("t1:{run.completed:r1}") <= 3_600_000
    assert not raw.exists("t1:{run.completed:r1}:h")
    assert set(raw.keys("*")) == {b"t1:{run.completed:r1}"}  # the prefix holds everything


def test_prefixes_keep_receivers_apart(redis_url: str) -> None:
    a, b = RedisStore(redis_url, prefix="a:"), RedisStore(redis_url, prefix="b:")
    a.complete("k", a.claim("k", 30).token, 60)
    assert a.claim("k", 30).state is ClaimState.DONE
    assert b.claim("k", 30).state is ClaimState.ACQUIRED


def test_accepts_a_client_that_decodes_responses(redis_server: RedisServer, redis_url: str) -> None:
    store = RedisStore(redis_server.client(decode_responses=True))
    claim = store.claim("k", 30)
    store.mark_handler_done("k", claim.token, "app.save", 60)
    store.release("k", claim.token)
    again = store.claim("k", 30)
    assert again.done_handlers == frozenset({"app.save"})
    store.complete("k", again.token, 60)
    assert store.claim("k", 30).state is ClaimState.DONE


def test_nothing_listening_is_unavailable() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0")
    for call in (
        lambda: store.claim("k", 30),
        lambda: store.mark_handler_done("k", "t", "h", 60),
        lambda: store.complete("k", "t", 60),
        lambda: store.release("k", "t"),
    ):
        with pytest.raises(StoreUnavailable) as caught:
            call()
        assert caught.value.status == 503


def test_works_again_after_a_restart_that_lost_the_scripts() -> None:
    with running_redis() as server:
        store = RedisStore(server.url)
        store.complete("before", store.claim("before", 30).token, 60)
        server.kill()
        with pytest.raises(StoreUnavailable):
            store.claim("during", 30)
        server.start()  # same port, empty: no keys, no cached scripts
        assert store.claim("during", 30).state is ClaimState.ACQUIRED
        assert store.claim("before", 30).state is ClaimState.ACQUIRED  # nothing persisted


def test_store_from_url_and_repr_hide_the_password(redis_url: str) -> None:
    store = store_from_url(redis_url)
    assert isinstance(store, RedisStore)
    assert store.claim("k", 30).state is ClaimState.ACQUIRED
    secret_url = "redis://:hunter2-password@127.0.0.1:1/0"
    assert "hunter2" not in repr(store_from_url(secret_url))
