"""The same event delivered at once by many threads, processes and machines."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from flymy_receiver import Receiver, RunCompleted
from flymy_receiver.receiver import Response
from flymy_receiver.testing import make_event, signed_request
from tests.conftest import SECRET
from tests.delivery.workers import deliver_all
from tests.stores.backends import BACKENDS, Backend, make_backend


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from make_backend(request.param, request, tmp_path)


def test_eight_threads_deliver_one_event_and_it_runs_once(backend: Backend) -> None:
    """While the handler runs, every other delivery is told 409 with Retry-After; after it
    finishes, deliveries are acknowledged as duplicates."""
    receiver = Receiver(SECRET, store=backend.store)
    calls: list[str] = []
    release = threading.Event()

    @receiver.on("run.completed")
    def slow(event: RunCompleted) -> None:
        calls.append(event.data.run_id)
        release.wait(30)  # held until all the other deliveries have been answered

    req = signed_request(make_event("run.completed"), SECRET)
    threads = 8
    barrier = threading.Barrier(threads, timeout=30)
    answers: list[Response] = []
    lock = threading.Lock()

    def deliver() -> None:
        barrier.wait()
        response = receiver.handle(req.body, req.headers)
        with lock:
            answers.append(response)

    pool = [threading.Thread(target=deliver) for _ in range(threads)]
    for thread in pool:
        thread.start()
    deadline = time.monotonic() + 30
    while len(answers) < threads - 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    refused = list(answers)
    release.set()
    for thread in pool:
        thread.join(30)

    assert len(calls) == 1
    assert len(refused) == threads - 1
    assert {r.status for r in refused} == {409}
    assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)
    assert sorted(r.status for r in answers) == [200] + [409] * (threads - 1)
    after = receiver.handle(req.body, req.headers)
    assert (after.status, after.body) == (200, b'{"received":true,"duplicate":true}')
    assert len(calls) == 1


def test_eight_async_deliveries_run_the_handler_once(backend: Backend) -> None:
    receiver = Receiver(SECRET, store=backend.store)
    calls: list[str] = []

    @receiver.on("run.completed")
    async def save(event: RunCompleted) -> None:
        calls.append(event.data.run_id)
        await asyncio.sleep(0.05)

    req = signed_request(make_event("run.completed"), SECRET)

    async def until_acknowledged() -> int:
        for _ in range(200):
            response = await receiver.ahandle(req.body, req.headers)
            if response.ok:
                return response.status
            assert response.status == 409
            await asyncio.sleep(0.01)
        raise AssertionError("never acknowledged")

    async def main() -> list[int]:
        return await asyncio.gather(*(until_acknowledged() for _ in range(8)))

    assert asyncio.run(main()) == [200] * 8
    assert len(calls) == 1


def _run_workers(store_url: str, workers: int, events: int, ledger: Path) -> list[Counter[str]]:
    requests = []
    for i in range(events):
        req = signed_request(make_event("run.completed", run_id=f"run_{i:04d}"), SECRET)
        requests.append((req.body, req.headers))
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(workers, mp_context=context) as pool:
        start = manager.Barrier(workers, timeout=60)
        futures = [
            pool.submit(deliver_all, store_url, requests, str(ledger), seed, start)
            for seed in range(workers)
        ]
        results = [Counter(f.result(timeout=120)) for f in futures]
    runs = Counter(line.split()[0] for line in ledger.read_text().splitlines())
    assert sorted(runs) == [f"run_{i:04d}" for i in range(events)]
    assert set(runs.values()) == {1}, [r for r, n in runs.items() if n > 1]
    total = sum(results, Counter())
    # Every worker acknowledged every event; only one of them ran each.
    assert total["received"] == events
    assert total["duplicate"] == (workers - 1) * events
    assert total["other"] == 0
    return results


def test_four_processes_share_one_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/deliveries.sqlite3"
    results = _run_workers(url, workers=4, events=60, ledger=tmp_path / "ledger.txt")
    assert all(r["received"] + r["duplicate"] == 60 for r in results)


def test_three_receivers_share_one_redis(redis_url: str, tmp_path: Path) -> None:
    results = _run_workers(redis_url, workers=3, events=60, ledger=tmp_path / "ledger.txt")
    assert all(r["received"] + r["duplicate"] == 60 for r in results)
