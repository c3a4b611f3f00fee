"""RedisStore's journal on a real redis-server: what the scripts keep, index and bound.

The store contract suite covers what every store does; these tests cover how Redis does it
(bodies in keys of their own under a byte budget and ``maxmemory``, indexes written by the
claim's own script, lists that read no body and walk an index, digests for long run ids) and
the fixes of issue 22 (M3 to M6, L4) and the journal operations of issue 17 on Redis.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from flymy_receiver.stores import ClaimState, RedisStore
from flymy_receiver.stores.records import HISTORY_LIMIT, Attempt, HandlerOutcome, NewEntry
from tests.stores.redis_server import RedisServer, running_redis

LEASE = 30.0
TTL = 60.0


def _entry(
    key: str,
    body: bytes = b'{"event":"run.completed"}',
    *,
    run_id: str | None = None,
    event: str = "run.completed",
    agent_id: str | None = "agent_a",
    retention: float = 3600.0,
) -> NewEntry:
    run = run_id if run_id is not None else key.rpartition(":")[2]
    return NewEntry(key, event, run, agent_id, "Agent", body, {}, retention)


def _ok() -> HandlerOutcome:
    return HandlerOutcome(ok=True, at=time.time())


def _failed() -> HandlerOutcome:
    return HandlerOutcome(ok=False, error="RuntimeError: boom", at=time.time())


def _attempt(outcome: str, status: int | None = 200, source: str = "sender") -> Attempt:
    return Attempt(time.time(), source, status, outcome, 0.01)


@pytest.fixture
def store(redis_url: str) -> Iterator[RedisStore]:
    store = RedisStore(redis_url)
    yield store
    store.client.close()


def _fail(store: RedisStore, key: str, **kwargs: Any) -> None:
    claim = store.claim(key, LEASE, _entry(key, **kwargs))
    assert claim.state is ClaimState.ACQUIRED
    store.release(key, claim.token, {"app.h": _failed()})


def _handle(store: RedisStore, key: str, **kwargs: Any) -> None:
    claim = store.claim(key, LEASE, _entry(key, **kwargs))
    assert claim.state is ClaimState.ACQUIRED
    store.complete(key, claim.token, TTL, {"app.h": _ok()})


def _commands(raw: Any) -> dict[str, int]:
    """Calls per command since the last CONFIG RESETSTAT."""
    stats = raw.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


# -- M3: a later delivery that no handler wants never hides a failed entry ----------------


def test_an_ignored_delivery_keeps_a_failed_entry_failed_with_its_body(store: RedisStore) -> None:
    _fail(store, "run.completed:r1", body=b'{"the": "first"}')
    store.journal_ignore(_entry("run.completed:r1", b'{"the": "second"}'))
    entry = store.journal_get("run.completed:r1")
    assert entry is not None
    assert entry.state == "failed"
    assert entry.body == b'{"the": "first"}'  # the body the handlers ran on
    assert entry.attempts == 2
    assert [e.key for e in store.journal_list(state="failed")] == ["run.completed:r1"]


@pytest.mark.parametrize("first", ["handled", "pending"])
def test_an_ignored_delivery_changes_neither_handled_nor_pending(
    store: RedisStore, first: str
) -> None:
    key = "run.completed:r1"
    if first == "handled":
        _handle(store, key)
    else:
        store.claim(key, LEASE, _entry(key))
    store.journal_ignore(_entry(key, b"{}"))
    entry = store.journal_get(key)
    assert entry is not None
    assert entry.state == first
    assert entry.body == b'{"event":"run.completed"}'


def test_duplicates_and_busy_deliveries_keep_the_body_and_append_attempts(
    store: RedisStore,
) -> None:
    key = "run.completed:r1"
    claim = store.claim(key, LEASE, _entry(key, b'{"n": 1}'))
    assert store.claim(key, LEASE, _entry(key, b'{"n": 2}')).state is ClaimState.BUSY
    store.complete(key, claim.token, TTL, {"app.h": _ok()}, _attempt("handled"))
    duplicate = store.claim(key, LEASE, _entry(key, b'{"n": 3}'))
    assert duplicate.state is ClaimState.DONE
    assert duplicate.prior_state == "handled"
    entry = store.journal_get(key)
    assert entry is not None
    assert entry.body == b'{"n": 1}'
    assert [(a.status, a.outcome) for a in entry.history] == [
        (409, "in_flight"),
        (200, "handled"),
        (200, "duplicate"),
    ]
    assert entry.attempts == 3


def test_the_history_keeps_the_newest_attempts(store: RedisStore) -> None:
    key = "run.completed:r1"
    _handle(store, key)
    store.journal_ignore(_entry(key), _attempt("ignored"))
    for _ in range(HISTORY_LIMIT + 4):
        store.claim(key, LEASE, _entry(key))
    entry = store.journal_get(key)
    assert entry is not None
    assert len(entry.history) == HISTORY_LIMIT
    assert entry.attempts == HISTORY_LIMIT + 6
    assert {a.outcome for a in entry.history} == {"duplicate"}


# -- M4: bodies are bounded, and never cost a claim -------------------------------------


def test_bodies_past_the_byte_budget_are_dropped_and_the_entry_says_so(redis_url: str) -> None:
    store = RedisStore(redis_url, max_journal_bytes=100)
    _handle(store, "run.completed:a", body=b"a" * 60)
    claim = store.claim("run.completed:b", LEASE, _entry("run.completed:b", b"b" * 60))
    assert claim.state is ClaimState.ACQUIRED  # the claim is never refused for a body
    store.complete("run.completed:b", claim.token, TTL, {"app.h": _ok()})
    kept, dropped = store.journal_get("run.completed:a"), store.journal_get("run.completed:b")
    assert kept is not None
    assert dropped is not None
    assert (kept.body, kept.body_dropped, kept.body_size) == (b"a" * 60, False, 60)
    assert (dropped.body, dropped.body_dropped, dropped.body_size) == (None, True, 60)
    assert dropped.state == "handled"
    assert store.claim("run.completed:b", LEASE).state is ClaimState.DONE
    with pytest.raises(LookupError, match="dropped"):
        dropped.parse()


def test_the_bytes_of_expired_bodies_are_given_back(redis_url: str) -> None:
    store = RedisStore(redis_url, max_journal_bytes=100)
    store.journal_ignore(_entry("run.started:a", b"a" * 80, retention=0.2))
    time.sleep(0.4)
    store.journal_ignore(_entry("run.started:b", b"b" * 80))
    entry = store.journal_get("run.started:b")
    assert entry is not None
    assert entry.body == b"b" * 80


def test_bodies_and_claims_live_in_separate_keys(
    redis_server: RedisServer, redis_url: str, store: RedisStore
) -> None:
    key = "run.completed:r1"
    claim = store.claim(key, LEASE, _entry(key, b"the body"))
    raw = redis_server.client()
    assert raw.get("flymy:{run.completed:r1}:b") == b"the body"
    assert b"body" not in raw.hgetall("flymy:{run.completed:r1}:j")
    assert raw.get("flymy:{run.completed:r1}") == f"claim:{claim.token}".encode()


def test_under_maxmemory_bodies_never_refuse_a_claim_nor_evict_a_done_record() -> None:
    """``noeviction`` with the advised budget: 60 bodies of 200 KB in a Redis of 8 MB."""
    with running_redis("--maxmemory", "8mb", "--maxmemory-policy", "noeviction") as server:
        store = RedisStore(server.url, max_journal_bytes=2 * 1024 * 1024)
        body = b"x" * 200_000
        for i in range(60):
            _handle(store, f"run.completed:r{i}", body=body)
        for i in range(60):
            key = f"run.completed:r{i}"
            duplicate = store.claim(key, LEASE, _entry(key, body))
            assert duplicate.state is ClaimState.DONE
        kept = [store.journal_get(f"run.completed:r{i}") for i in range(60)]
        assert all(e is not None and e.state == "handled" for e in kept)
        assert sum(1 for e in kept if e is not None and e.body == body) == 10
        store.client.close()


# -- M5: lists read summaries through an index ------------------------------------------


def test_a_state_filter_reads_only_what_it_lists_and_no_body(
    redis_server: RedisServer, store: RedisStore
) -> None:
    for i in range(300):
        _handle(store, f"run.completed:ok{i}", body=b"b" * 1000)
    _fail(store, "run.completed:bad1")
    _fail(store, "run.completed:bad2")
    raw = redis_server.client()
    raw.config_resetstat()
    failed = store.journal_list(state="failed")
    calls = _commands(raw)
    assert [e.key for e in failed] == ["run.completed:bad2", "run.completed:bad1"]
    assert all(e.body is None and e.history == () for e in failed)
    assert [e.body_size for e in failed] == [len(b'{"event":"run.completed"}')] * 2
    assert calls.get("hgetall", 0) <= 2  # the failed ones, not the 300 handled
    assert "get" not in calls
    assert "lrange" not in calls


def test_a_list_reads_no_body(redis_server: RedisServer, store: RedisStore) -> None:
    for i in range(5):
        _handle(store, f"run.completed:r{i}", body=b"b" * 100_000)
    raw = redis_server.client()
    raw.config_resetstat()
    listed = store.journal_list()
    assert [e.body for e in listed] == [None] * 5
    assert [e.body_size for e in listed] == [100_000] * 5
    assert "get" not in _commands(raw)


def test_filters_and_keyset_pages(store: RedisStore) -> None:
    start = datetime.now(timezone.utc)
    for i in range(7):
        agent = "agent_even" if i % 2 == 0 else "agent_odd"
        if i % 3 == 0:
            _fail(store, f"run.completed:r{i}", agent_id=agent)
        else:
            _handle(store, f"run.completed:r{i}", agent_id=agent)
        time.sleep(0.002)
    store.journal_ignore(_entry("run.started:r2", event="run.started", run_id="r2"))
    middle = store.journal_get("run.completed:r3")
    assert middle is not None
    every = [e.key for e in store.journal_list()]
    assert every == ["run.started:r2", *[f"run.completed:r{i}" for i in range(6, -1, -1)]]
    pages, before = [], None
    for _ in range(10):
        page = store.journal_list(limit=3, before=before)
        if not page:
            break
        pages.append([e.key for e in page])
        before = page[-1].key
    assert [key for page in pages for key in page] == every
    assert [len(page) for page in pages] == [3, 3, 2]
    assert [e.key for e in store.journal_list(state="failed")] == [
        f"run.completed:r{i}" for i in (6, 3, 0)
    ]
    assert [e.key for e in store.journal_list(state="failed", agent_id="agent_even")] == [
        "run.completed:r6",
        "run.completed:r0",
    ]
    assert [e.key for e in store.journal_list(event="run.started")] == ["run.started:r2"]
    assert [e.key for e in store.journal_list(run_id="r2")] == [
        "run.started:r2",
        "run.completed:r2",
    ]
    assert [e.key for e in store.journal_list(until=middle.received_at, state="handled")] == [
        "run.completed:r2",
        "run.completed:r1",
    ]
    since = [e.key for e in store.journal_list(since=middle.received_at, event="run.completed")]
    assert since == [f"run.completed:r{i}" for i in (6, 5, 4, 3)]
    assert store.journal_list(since=start + timedelta(days=1)) == []


def test_a_stalled_entry_is_listed_with_the_failed_ones(store: RedisStore) -> None:
    _fail(store, "run.completed:failed")
    store.claim("run.completed:died", 0.2, _entry("run.completed:died"))
    store.claim("run.completed:running", LEASE, _entry("run.completed:running"))
    time.sleep(0.3)
    assert [e.key for e in store.journal_list(state="failed")] == [
        "run.completed:died",
        "run.completed:failed",
    ]
    assert [e.state for e in store.journal_list(state="failed")] == ["stalled", "failed"]
    assert [e.key for e in store.journal_list(state="stalled")] == ["run.completed:died"]
    assert [e.key for e in store.journal_list(state="pending")] == ["run.completed:running"]
    again = store.claim("run.completed:died", LEASE, _entry("run.completed:died"))
    assert (again.state, again.prior_state) == (ClaimState.ACQUIRED, "stalled")


# -- M6: long run ids --------------------------------------------------------------------


def test_a_long_run_id_is_journaled_found_and_kept_out_of_key_names(
    redis_server: RedisServer, store: RedisStore
) -> None:
    run_id = "run_" + "x" * 10_000
    key = "run.completed:sha256:abc"  # the receiver digests long keys itself
    _fail(store, key, run_id=run_id)
    entry = store.journal_get(run_id)
    assert entry is not None
    assert entry.key == key
    assert entry.run_id == run_id
    assert [e.key for e in store.journal_list(run_id=run_id)] == [key]
    assert store.journal_settled([run_id])[run_id].key == key
    index_names = redis_server.client().keys("flymy:journal*")
    assert index_names
    assert max(len(name) for name in index_names) < 100


def test_the_store_log_lines_cut_long_keys(
    store: RedisStore, caplog: pytest.LogCaptureFixture
) -> None:
    key = "run.completed:" + "k" * 10_000
    claim = store.claim(key, 0.05, _entry(key))
    time.sleep(0.1)
    store.claim(key, LEASE, _entry(key))  # another worker took it meanwhile
    with caplog.at_level(logging.WARNING, logger="flymy_receiver"):
        store.complete(key, claim.token, TTL, {"app.h": _ok()})
    assert caplog.records
    assert max(len(r.getMessage()) for r in caplog.records) < 1000


# -- L4: indexed by the claim's own script -----------------------------------------------


def test_the_claim_script_alone_indexes_the_entry(store: RedisStore) -> None:
    """What a timeout right after the claim's reply left unlisted before: nothing follows
    the script."""
    reply = store._claim_with("run.completed:r1", LEASE, "token-1", _entry("run.completed:r1"))
    assert reply[0] == b"acquired"
    assert [e.key for e in store.journal_list()] == ["run.completed:r1"]
    assert [e.key for e in store.journal_list(state="pending")] == ["run.completed:r1"]
    found = store.journal_get("r1")
    assert found is not None
    assert found.key == "run.completed:r1"


def test_an_entry_whose_indexes_were_lost_is_indexed_by_its_next_step(
    redis_server: RedisServer, store: RedisStore
) -> None:
    claim = store.claim("run.completed:r1", LEASE, _entry("run.completed:r1"))
    raw = redis_server.client()
    raw.delete(*raw.keys("flymy:journal*"))
    store.release("run.completed:r1", claim.token, {"app.h": _failed()})
    assert [e.key for e in store.journal_list(state="failed")] == ["run.completed:r1"]
    assert [e.key for e in store.journal_list()] == ["run.completed:r1"]


def test_reading_unindexes_expired_entries_from_every_index(
    redis_server: RedisServer, store: RedisStore
) -> None:
    for i in range(3):
        _fail(store, f"run.completed:r{i}", retention=0.2)
    time.sleep(0.4)
    assert store.journal_list(state="failed") == []
    raw = redis_server.client()
    assert raw.keys("flymy:journal*") == []  # every index, the meta and the byte count


# -- issue 17: resolve; issue 18: deferred handlers ---------------------------------------


def test_resolve_takes_an_entry_out_of_the_failure_lists(store: RedisStore) -> None:
    _fail(store, "run.completed:r1")
    assert store.journal_resolve("run.completed:r1", "the customer was refunded")
    assert not store.journal_resolve("run.completed:nope", "x")
    entry = store.journal_get("run.completed:r1")
    assert entry is not None
    assert (entry.state, entry.note) == ("resolved", "the customer was refunded")
    assert store.journal_list(state="failed") == []
    assert [e.key for e in store.journal_list(state="resolved")] == ["run.completed:r1"]
    again = store.claim("run.completed:r1", LEASE, _entry("run.completed:r1"))
    assert (again.state, again.prior_state) == (ClaimState.ACQUIRED, "resolved")
    assert [e.key for e in store.journal_list(state="pending")] == ["run.completed:r1"]


def _queued(store: RedisStore, key: str) -> None:
    claim = store.claim(key, LEASE, _entry(key, b'{"deferred": 1}'))
    queued = HandlerOutcome(ok=False, state="queued", deferred=True, queued_at=time.time())
    store.complete(key, claim.token, TTL, {"app.inline": _ok(), "app.slow": queued})


def test_a_deferred_handler_runs_under_its_own_lease(store: RedisStore) -> None:
    key = "run.completed:r1"
    _queued(store, key)
    entry = store.journal_get(key)
    assert entry is not None
    assert entry.state == "queued"
    assert store.journal_settled(["r1"]) == {}  # queued is not settled
    first = store.claim_handler(key, "app.slow", LEASE)
    assert first.state is ClaimState.ACQUIRED
    assert first.body == b'{"deferred": 1}'
    assert first.prior_state == "queued"
    busy = store.claim_handler(key, "app.slow", LEASE)
    assert busy.state is ClaimState.BUSY
    assert 0 < busy.retry_after <= LEASE
    running = store.journal_get(key)
    assert running is not None
    assert running.handlers["app.slow"].state == "running"
    assert running.handlers["app.slow"].attempts == 1
    store.finish_handler(
        key, "app.slow", first.token, _ok(), _attempt("handled", None, "worker"), False, TTL
    )
    done = store.journal_get(key)
    assert done is not None
    assert done.state == "handled"
    assert done.history[-1].source == "worker"
    assert store.claim_handler(key, "app.slow", LEASE).state is ClaimState.DONE
    assert store.journal_settled(["r1"])["r1"].state == "handled"
    with pytest.raises(KeyError):
        store.claim_handler("run.completed:nope", "app.slow", LEASE)


def test_a_final_failure_makes_the_entry_failed_and_replayable(store: RedisStore) -> None:
    key = "run.completed:r1"
    _queued(store, key)
    for final in (False, True):
        claim = store.claim_handler(key, "app.slow", LEASE)
        failure = HandlerOutcome(ok=False, error="RuntimeError: boom", deferred=True)
        store.finish_handler(
            key, "app.slow", claim.token, failure, _attempt("failed", None, "worker"), final, TTL
        )
        entry = store.journal_get(key)
        assert entry is not None
        assert entry.state == ("failed" if final else "queued")
    assert [e.key for e in store.journal_list(state="failed")] == [key]
    replay = store.claim(key, LEASE, replay=True)
    assert replay.state is ClaimState.ACQUIRED
    assert replay.done_handlers == frozenset({"app.inline"})  # it need not run again


def test_a_late_worker_failure_does_not_overwrite_the_current_run(store: RedisStore) -> None:
    key = "run.completed:r1"
    _queued(store, key)
    late = store.claim_handler(key, "app.slow", 0.1)
    time.sleep(0.2)
    current = store.claim_handler(key, "app.slow", LEASE)
    assert current.state is ClaimState.ACQUIRED
    failure = HandlerOutcome(ok=False, error="RuntimeError: late", deferred=True)
    store.finish_handler(key, "app.slow", late.token, failure, _attempt("failed"), True, TTL)
    entry = store.journal_get(key)
    assert entry is not None
    assert entry.state == "queued"
    assert entry.handlers["app.slow"].state == "running"


# -- waiters are woken by the script that settles the entry -------------------------------


def test_the_settling_scripts_publish_the_run_id(redis_server: RedisServer, redis_url: str) -> None:
    store = RedisStore(redis_url)
    subscription = store.notifier().subscribe()
    try:
        _handle(store, "run.completed:handled")
        _fail(store, "run.completed:failed")
        store.journal_ignore(_entry("run.started:ignored"))
        _queued(store, "run.completed:queued")  # not settled: no wake-up
        claim = store.claim_handler("run.completed:queued", "app.slow", LEASE)
        store.finish_handler(
            "run.completed:queued", "app.slow", claim.token, _ok(), _attempt("ok"), False, TTL
        )
        heard: list[str] = []
        deadline = time.monotonic() + 10
        while len(heard) < 4 and time.monotonic() < deadline:
            heard += subscription.get(0.5) or []
        assert heard == ["handled", "failed", "ignored", "queued"]
        store.notifier().publish("nothing")  # the scripts did it: no command of its own
        assert subscription.get(0.3) == []
    finally:
        subscription.close()
        store.client.close()


def test_a_deferred_delivery_through_the_receiver_on_redis(
    redis_server: RedisServer, redis_url: str
) -> None:
    """Acknowledged once journaled (2 round trips, counted through the proxy); the worker's
    run takes the handler's lease, reads the stored body and makes the entry handled."""
    from collections.abc import Mapping

    from benchmarks.latency_proxy import LatencyProxy
    from flymy_receiver import Receiver
    from flymy_receiver.testing import make_event, signed_request
    from tests.conftest import SECRET

    class Jobs:
        def __init__(self) -> None:
            self.jobs: list[tuple[str, str]] = []

        def bind(self, receiver: Receiver) -> None:
            pass

        def enqueue(self, key: str, handler_id: str, context: Mapping[str, str]) -> None:
            self.jobs.append((key, handler_id))

    with LatencyProxy("127.0.0.1", redis_server.port) as proxy:
        jobs = Jobs()
        store = RedisStore(f"redis://127.0.0.1:{proxy.port}/0")
        receiver = Receiver(SECRET, store=store, queue=jobs)
        ran: list[str] = []
        receiver.on("run.completed", name="later", defer=True)(
            lambda event: ran.append(event.data.run_id)
        )
        warm = signed_request(make_event("run.completed", run_id="run_warm"), SECRET)
        assert receiver.handle(warm.body, warm.headers).status == 200
        req = signed_request(make_event("run.completed", run_id="run_1"), SECRET)
        proxy.reset()
        response = receiver.handle(req.body, req.headers)
        assert (response.status, proxy.bursts) == (200, 2)
        assert b'"deferred":1' in response.body
        assert ran == []
        key, handler_id = jobs.jobs[-1]
        entry = store.journal_get("run_1")
        assert entry is not None
        assert entry.state == "queued"
        assert receiver.run_deferred(key, handler_id) == "ok"
        assert ran == ["run_1"]
        done = store.journal_get("run_1")
        assert done is not None
        assert done.state == "handled"
        assert done.handlers[handler_id].state == "ok"
        assert [a.source for a in done.history] == ["sender", "worker"]
        assert receiver.run_deferred(key, handler_id) == "done"
        store.client.close()
