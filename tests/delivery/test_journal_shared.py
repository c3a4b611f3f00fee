"""The delivery journal in a real shared store (an SQLite file, a real redis-server), used by
several receivers: separate processes for the workers, threads where a race is the point."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from flymy_receiver import EventInFlight, Receiver, RunCompleted
from flymy_receiver.journal import Journal
from flymy_receiver.stores import store_from_url
from flymy_receiver.testing import make_event, signed_request, wrong_secret_request
from tests.conftest import SECRET
from tests.delivery import workers

STORES = ["sqlite", "redis"]


@pytest.fixture(params=STORES)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "redis":
        url: str = request.getfixturevalue("redis_url")  # emptied for this test
        return url
    return f"sqlite:///{tmp_path}/deliveries.sqlite3"


def _request(run_id: str) -> tuple[bytes, dict[str, str]]:
    req = signed_request(make_event("run.completed", run_id=run_id), SECRET)
    return req.body, dict(req.headers)


def _journal(receiver: Receiver) -> Journal:
    assert receiver.journal is not None
    return receiver.journal


def _ledger(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def _in_process(target: Any, *args: Any) -> Any:
    """Run ``target(*args)`` in a fresh (spawned) process; return its result."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply_async(target, args).get(timeout=120)


def test_one_worker_fails_another_replays_from_the_shared_journal(
    store_url: str, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger.txt"
    body, headers = _request("run_shared")
    # Worker A (its own process) gets every attempt of the sender while its CRM is down.
    statuses = _in_process(workers.deliver_while_broken, store_url, body, headers, str(ledger), 3)
    assert statuses == [500, 500, 500]
    (worker_a,) = {pid for _, _, pid in _ledger(ledger)}

    # Worker B (this process) sees the entry A journaled, and replays it.
    receiver = workers.shared_receiver(store_url, str(ledger), broken=False)
    journal = _journal(receiver)
    entry = journal.get("run_shared")
    assert entry is not None
    assert entry.state == "failed"
    assert entry.attempts == 3
    assert entry.body == body
    assert [e.key for e in journal.list(state="failed")] == [entry.key]
    save_id = next(h for h in entry.handlers if h.endswith(".save"))
    notify_id = next(h for h in entry.handlers if h.endswith(".notify"))
    assert entry.handlers[save_id].ok
    assert entry.handlers[notify_id].error == "RuntimeError: crm is down"

    replayed = journal.replay("run_shared")
    assert replayed.state == "handled"
    assert replayed.handlers[notify_id].ok
    assert replayed.attempts == 3
    late = receiver.handle(body, headers)  # the sender's late retry, here
    assert late.body == b'{"received":true,"duplicate":true}'
    worker_b = str(multiprocessing.current_process().pid)
    assert _ledger(ledger) == [
        ["save", "run_shared", worker_a],  # once in all, on the first attempt
        ["notify-failed", "run_shared", worker_a],
        ["notify-failed", "run_shared", worker_a],
        ["notify-failed", "run_shared", worker_a],
        ["notify", "run_shared", worker_b],
    ]
    # And worker A, asked again, agrees it is done.
    assert _in_process(workers.deliver_while_broken, store_url, body, headers, str(ledger), 1) == [
        200
    ]
    assert len(_ledger(ledger)) == 5


def test_a_worker_killed_inside_its_handler_leaves_a_pending_entry(
    store_url: str, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger.txt"
    body, headers = _request("run_killed")
    context = multiprocessing.get_context("spawn")
    worker = context.Process(
        target=workers.exit_in_handler, args=(store_url, body, headers, str(ledger))
    )
    worker.start()
    worker.join(60)
    if worker.is_alive():
        worker.kill()
        worker.join(10)
        pytest.fail("the worker did not die in its handler")
    assert worker.exitcode == 3
    assert [line[0] for line in _ledger(ledger)] == ["started"]

    receiver = Receiver(SECRET, store=store_from_url(store_url))
    runs: list[str] = []
    receiver.on("run.completed")(lambda event: runs.append(event.data.run_id))
    journal = _journal(receiver)
    pending = journal.list(state="pending")
    assert [e.run_id for e in pending] == ["run_killed"]
    assert pending[0].attempts == 1
    assert pending[0].handlers == {}  # it never finished a handler
    assert pending[0].body is None  # a list gives summaries; get gives the body
    stored = journal.get(pending[0].key)  # lists give summaries: the body is read by get
    assert stored is not None
    assert stored.body == body

    # The dead worker's claim outlives it until its lease (5 s) ends; then replay works.
    refused = 0
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline, "the lease never ended"
        try:
            entry = journal.replay("run_killed")
            break
        except EventInFlight:
            refused += 1
            time.sleep(0.1)
    assert refused >= 1
    assert entry.state == "handled"
    assert runs == ["run_killed"]
    assert receiver.handle(body, headers).body == b'{"received":true,"duplicate":true}'
    assert runs == ["run_killed"]


def _race(sender: Receiver, journal: Journal, run_id: str) -> dict[str, Any]:
    """Release an operator's replay and the sender's retry of ``run_id`` at one moment."""
    body, headers = _request(run_id)
    barrier = threading.Barrier(2, timeout=30)
    results: dict[str, Any] = {}

    def replay() -> None:
        barrier.wait()
        try:
            results["replay"] = journal.replay(run_id).state
        except EventInFlight:
            results["replay"] = "in flight"

    def retry() -> None:
        barrier.wait()
        results["retry"] = sender.handle(body, headers).status

    threads = [threading.Thread(target=replay), threading.Thread(target=retry)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    return results


def test_a_replay_racing_a_sender_retry_runs_each_handler_once(store_url: str) -> None:
    """Round after round: a failed event, then an operator's replay and the sender's retry
    released at the same moment, through two receivers on one store."""
    rounds = 25
    runs: Counter[str] = Counter()
    lock = threading.Lock()
    broken: set[str] = set()

    def handler(event: RunCompleted) -> None:
        run_id = event.data.run_id
        with lock:
            runs[run_id] += 1
        if run_id in broken:
            raise RuntimeError("crm is down")
        time.sleep(0.005)  # widen the window in which the other one may collide

    def receiver() -> Receiver:
        r = Receiver(SECRET, store=store_from_url(store_url))
        r.on("run.completed")(handler)
        return r

    sender, operator = receiver(), receiver()
    journal = _journal(operator)
    for i in range(rounds):
        run_id = f"run_race_{i:02d}"
        body, headers = _request(run_id)
        broken.add(run_id)
        assert sender.handle(body, headers).status == 500
        broken.discard(run_id)
        results = _race(sender, journal, run_id)
        assert runs[run_id] == 2, (run_id, results)  # the failed run, then exactly one more
        # Whoever lost saw the other's claim (409, EventInFlight) or its completion.
        assert results["retry"] in (200, 409)
        assert results["replay"] in ("handled", "in flight")
        assert not (results["retry"] == 409 and results["replay"] == "in flight")
        entry = journal.get(run_id)
        assert entry is not None
        assert entry.state == "handled"
        after = sender.handle(body, headers)
        assert after.body == b'{"received":true,"duplicate":true}'
        assert runs[run_id] == 2


def _refusal_rows(store_url: str, store: Any) -> int:
    """How many refusals the store holds, counted in the store itself."""
    if store_url.startswith("redis"):
        return int(store.client.llen("flymy:journal:refusals"))
    db = store._connection()
    return int(db.execute("SELECT count(*) FROM flymy_refusals").fetchone()[0])


def _redis_writes(store: Any) -> int:
    stats = store.client.info("commandstats")
    return int(stats.get("cmdstat_lpush", {}).get("calls", 0))


def test_a_forged_flood_makes_a_rationed_number_of_refusal_writes(store_url: str) -> None:
    store = store_from_url(store_url)
    writes: list[Any] = []
    record = store.record_refusal  # type: ignore[attr-defined]

    def counted(refusal: Any) -> None:
        writes.append(refusal)
        record(refusal)

    store.record_refusal = counted  # type: ignore[attr-defined]
    server_writes_before = _redis_writes(store) if store_url.startswith("redis") else 0
    receiver = Receiver(SECRET, store=store)
    handled: list[str] = []
    receiver.on("run.completed")(lambda event: handled.append(event.data.run_id))
    forged = wrong_secret_request(make_event("run.completed"))
    for _ in range(2_000):
        assert receiver.handle(forged.body, forged.headers).status == 401
    refusals = _journal(receiver).refusals(limit=1000)  # waits for the background writes
    assert 1 <= len(writes) <= 40  # the first of a burst, then about one a second
    assert len(refusals) == len(writes) == _refusal_rows(store_url, store)
    if store_url.startswith("redis"):  # the server's own count of writes agrees
        assert _redis_writes(store) - server_writes_before == len(writes)
    assert refusals[0].status == 401
    assert refusals[0].reason == "signature_mismatch"
    assert all(SECRET not in r.detail for r in refusals)
    assert handled == []
    assert _journal(receiver).list() == []  # a forgery never becomes an entry
    # An authentic event still gets through at once.
    assert receiver.handle(*_request("run_real")).status == 200
    assert handled == ["run_real"]
