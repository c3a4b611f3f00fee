"""RedisStore: server-side expiry, outages, client options."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from flymy_receiver.errors import StoreUnavailable
from flymy_receiver.stores import ClaimState, RedisStore, store_from_url
from flymy_receiver.stores.records import Attempt, HandlerOutcome, NewEntry, Refusal
from flymy_receiver.stores.redis_scripts import PURGE_LIMIT as _PURGE_LIMIT
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


def _new_entry(key: str, body: bytes = b"{}", retention: float = 3600.0) -> NewEntry:
    return NewEntry(key, "run.completed", "run_1", None, None, body, {}, retention)


def test_a_client_that_decodes_responses_still_keeps_bodies_as_bytes(
    redis_server: RedisServer, redis_url: str
) -> None:
    store = RedisStore(redis_server.client(decode_responses=True))
    body = b'{"x": "\xff\xfe not UTF-8 \x00"}'
    claim = store.claim("k", 30, _new_entry("k", body))
    store.complete("k", claim.token, 60, {"app.h": HandlerOutcome(ok=True, at=1.5)})
    entry = store.journal_get("k")
    assert entry is not None
    assert entry.body == body
    assert entry.handlers["app.h"] == HandlerOutcome(ok=True, at=1.5)
    assert [e.key for e in store.journal_list()] == ["k"]


@pytest.mark.parametrize("key", ["run.completed:run_1", "run.completed:{braces}}{"])
def test_an_events_keys_share_one_cluster_slot(
    redis_server: RedisServer, redis_url: str, key: str
) -> None:
    from redis.crc import key_slot

    store = RedisStore(redis_url, prefix="t:")
    claim = store.claim(key, 30, _new_entry(key))
    store.mark_handler_done(key, claim.token, "app.h", 60, HandlerOutcome(ok=True))
    attempt = Attempt(time.time(), "sender", 500, "failed")
    store.release(key, claim.token, {"app.h": HandlerOutcome(ok=True)}, attempt)
    raw = redis_server.client()
    event_keys = {k for k in raw.keys("t:*") if not k.startswith(b"t:journal")}
    # the entry, its body, its history and the handlers done; the claim was released
    assert len(event_keys) == 4
    assert len({key_slot(k) for k in event_keys}) == 1


def test_a_prefix_with_a_hash_tag_puts_every_key_in_one_slot(
    redis_server: RedisServer, redis_url: str
) -> None:
    """What Redis Cluster needs: the scripts write an event's keys and the indexes at once."""
    from redis.crc import key_slot

    store = RedisStore(redis_url, prefix="{t}:")
    for key in ("run.completed:run_1", "run.failed:{x}"):
        claim = store.claim(key, 30, _new_entry(key))
        store.complete(key, claim.token, 60, {"app.h": HandlerOutcome(ok=True)})
    store.journal_ignore(_new_entry("run.started:run_1"))
    raw = redis_server.client()
    names = set(raw.keys("*"))
    assert len(names) > 10
    assert {key_slot(k) for k in names} == {key_slot(b"{t}")}


def test_a_claim_given_up_before_it_ran_takes_nothing(redis_url: str) -> None:
    """After a timeout the give-up may reach the server before the claim it gives up."""
    store = RedisStore(redis_url)
    store._run(store._give_up, "k", ["token-1", 30_000])
    late = store._claim_with("k", 30, "token-1", _new_entry("k"))
    assert late[0] == b"busy"
    claim = store.claim("k", 30, _new_entry("k"))
    assert claim.state is ClaimState.ACQUIRED
    entry = store.journal_get("k")
    assert entry is not None
    assert entry.attempts == 2  # the late claim was a delivery that arrived, all the same


def test_a_claim_given_up_after_it_ran_is_released(redis_url: str) -> None:
    store = RedisStore(redis_url)
    ran = store._claim_with("k", 30, "token-1", _new_entry("k"))
    assert ran[0] == b"acquired"
    store._run(store._give_up, "k", ["token-1", 30_000])
    assert store.claim("k", 30).state is ClaimState.ACQUIRED


def test_the_same_claim_run_twice_is_acquired_and_counted_once(redis_url: str) -> None:
    """A client that resends a claim (its connection broke before the reply) gets it."""
    store = RedisStore(redis_url)
    first = store._claim_with("k", 30, "token-1", _new_entry("k"))
    again = store._claim_with("k", 30, "token-1", _new_entry("k"))
    assert (first[0], again[0]) == (b"acquired", b"acquired")
    entry = store.journal_get("k")
    assert entry is not None
    assert entry.attempts == 1
    assert store.claim("k", 30, _new_entry("k")).state is ClaimState.BUSY  # another token
    entry = store.journal_get("k")
    assert entry is not None
    assert entry.attempts == 2


def test_expired_entries_leave_the_indexes_a_bounded_number_per_write(
    redis_server: RedisServer, redis_url: str
) -> None:
    store = RedisStore(redis_url)
    backlog = 3 * _PURGE_LIMIT
    for i in range(backlog):
        # Long enough that none has expired before the last is written, on a busy machine.
        store.journal_ignore(_new_entry(f"old{i}", retention=4.0))
    time.sleep(4.2)
    raw = redis_server.client()
    assert store.journal_get("old0") is None  # expired on the server
    sizes = []
    for i in range(5):
        store.claim(f"new{i}", 30, _new_entry(f"new{i}"))
        sizes.append(raw.zcard("flymy:journal:expiry"))
    # Each write indexes itself and drops at most _PURGE_LIMIT expired entries.
    assert sizes == [backlog + 1 - _PURGE_LIMIT, backlog + 2 - 2 * _PURGE_LIMIT, 3, 4, 5]
    assert raw.zcard("flymy:journal") == 5
    assert [e.key for e in store.journal_list()] == [f"new{i}" for i in range(4, -1, -1)]


def test_reading_drops_expired_entries_from_the_list(
    redis_server: RedisServer, redis_url: str
) -> None:
    store = RedisStore(redis_url)
    for i in range(3):
        store.journal_ignore(_new_entry(f"old{i}", retention=0.2))
    time.sleep(0.5)
    assert store.journal_list() == []
    assert redis_server.client().zcard("flymy:journal") == 0


def test_only_the_newest_refusals_are_kept(redis_server: RedisServer, redis_url: str) -> None:
    store = RedisStore(redis_url, max_refusals=10)
    start = datetime(2024, 5, 1, tzinfo=timezone.utc)
    for i in range(25):
        store.record_refusal(Refusal(start + timedelta(seconds=i), 401, "bad", f"n{i}"))
    kept = store.refusals(limit=100)
    assert [r.detail for r in kept] == [f"n{i}" for i in range(24, 14, -1)]
    assert kept[0].at == start + timedelta(seconds=24)
    assert redis_server.client().llen("flymy:journal:refusals") == 10


def test_claims_given_up_are_sent_and_the_queue_drains(redis_url: str) -> None:
    store = RedisStore(redis_url)
    ran = store._claim_with("k", 30, "token-1", _new_entry("k"))
    assert ran[0] == b"acquired"
    store._give_up_later("k", "token-1", 30)  # as after a timeout on the claim's reply
    assert store._wait_given_up(10)
    assert store.claim("k", 30).state is ClaimState.ACQUIRED
    store._give_up_later("other", "token-2", 30)  # before its claim ran: remembered
    assert store._wait_given_up(10)
    assert store._claim_with("other", 30, "token-2", None)[0] == b"busy"


@pytest.mark.parametrize("handlers", [1, 2])
@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_delivery_costs_two_round_trips_and_one_per_extra_handler(
    redis_server: RedisServer, redis_url: str, asynchronous: bool, handlers: int
) -> None:
    """Counted as request bursts through a proxy (benchmarks/latency_proxy.py): the claim
    with its entry, then the completion with outcome, history and the waiters' wake-up;
    each handler but the last is recorded before the next one runs."""
    import asyncio

    from benchmarks.latency_proxy import LatencyProxy
    from flymy_receiver import Receiver, RunCompleted
    from flymy_receiver.testing import make_event, signed_request
    from tests.conftest import SECRET

    with LatencyProxy("127.0.0.1", redis_server.port) as proxy:
        store = RedisStore(f"redis://127.0.0.1:{proxy.port}/0")
        receiver = Receiver(SECRET, store=store)
        handled: list[str] = []

        @receiver.on("run.completed")
        def handle(event: RunCompleted) -> None:
            handled.append(event.data.run_id)

        if handlers == 2:
            receiver.on("run.completed", name="second")(lambda event: None)

        def deliver(run_id: str) -> int:
            req = signed_request(make_event("run.completed", run_id=run_id), SECRET)
            if asynchronous:
                return asyncio.run(receiver.ahandle(req.body, req.headers)).status
            return receiver.handle(req.body, req.headers).status

        assert deliver("run_warm") == 200  # connects and loads the scripts
        counts = []
        for i in range(3):
            proxy.reset()
            assert deliver(f"run_{i}") == 200
            counts.append(proxy.bursts)
        proxy.reset()
        assert deliver("run_0") == 200  # a duplicate: the claim only
        duplicate = proxy.bursts
        store.client.close()
    assert counts == [handlers + 1] * 3
    assert duplicate == 1
    assert handled == ["run_warm", "run_0", "run_1", "run_2"]


def test_on_redis_cluster_a_prefix_with_a_hash_tag_works_and_a_plain_one_says_why(
    tmp_path: Any,
) -> None:
    """A one-node cluster owning every slot: what a cluster checks, slots, is checked."""
    import redis

    nodes = str(tmp_path / "nodes.conf")
    with running_redis("--cluster-enabled", "yes", "--cluster-config-file", nodes) as server:
        raw = server.client()
        raw.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        for _ in range(100):
            if raw.cluster("info")["cluster_state"] == "ok":
                break
            time.sleep(0.1)
        tagged = RedisStore(redis.Redis.from_url(server.url), prefix="{flymy}:")
        claim = tagged.claim("run.completed:run_1", 30, _new_entry("run.completed:run_1"))
        tagged.complete("run.completed:run_1", claim.token, 60, {"app.h": HandlerOutcome(ok=True)})
        assert [e.state for e in tagged.journal_list()] == ["handled"]
        plain = RedisStore(redis.Redis.from_url(server.url), prefix="flymy:")
        with pytest.raises(StoreUnavailable, match=r"prefix with a hash tag"):
            plain.claim("run.completed:run_2", 30, _new_entry("run.completed:run_2"))
        for store in (tagged, plain):
            store.client.close()
        raw.close()
