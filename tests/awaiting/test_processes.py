"""Awaiting a run whose webhook another process receives, through SQLite and a real Redis.

The test process waits; ``tests/awaiting/deliverer.py`` runs in a child process with its
own receiver on the same store, as another gunicorn worker or another machine would.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from flymy_receiver import Receiver, RunCompleted, RunFailed
from flymy_receiver.stores import JournalEntry, SQLiteStore
from flymy_receiver.stores.postgres import PostgresNotifier
from tests.awaiting.deliverer import open_store, write_requests
from tests.awaiting.kit import signed
from tests.conftest import SECRET, require
from tests.servers import ROOT
from tests.stores.redis_server import RedisServer


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'deliveries.sqlite3'}"
    elif request.param == "postgres":
        require("psycopg")
        yield request.getfixturevalue("postgres_url")  # a fresh database of its own
    else:
        # A prefix of its own: the awaiting channel is the prefix's, and the receivers of
        # earlier tests may still be subscribed to theirs.
        yield f"{request.getfixturevalue('redis_url')}#test{time.monotonic_ns()}:"


def other_process(
    store_url: str, requests: list[tuple[bytes, dict[str, str]]], path: Path
) -> list[int]:
    """Deliver ``requests`` in a child process; the statuses it answered."""
    write_requests(str(path), requests)
    result = subprocess.run(
        [sys.executable, "-m", "tests.awaiting.deliverer", store_url, str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [int(line) for line in result.stdout.split()]


def listeners(receiver: Receiver, store_url: str) -> int:
    """How many connections listen for announcements on the waiting receiver's channel
    (Redis pub/sub, PostgreSQL LISTEN); for a polled store, 1 while its poller runs."""
    if not receiver.waiters.watching:
        return 0
    notifier = receiver.waiters.notifier
    if notifier is None:
        return 1
    if store_url.startswith("redis"):
        channel = notifier.channel  # type: ignore[attr-defined]
        return int(notifier.client.pubsub_numsub(channel)[0][1])  # type: ignore[attr-defined]
    import psycopg

    with psycopg.connect(store_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND query LIKE 'LISTEN %'"
        ).fetchone()
    return int(row[0]) if row is not None else 0


async def until(condition: Any, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "gave up waiting"
        await asyncio.sleep(0.01)


def test_wait_then_another_process_receives(store_url: str, tmp_path: Path) -> None:
    receiver = Receiver(SECRET, store=open_store(store_url))
    requests = [
        signed(run_id="run_p1"),
        signed("run.failed", run_id="run_p2"),  # its handler raises over there
        signed("run.cancelled", run_id="run_p3"),  # no handler over there
    ]

    async def scenario() -> tuple[list[int], list[Any]]:
        waiting = asyncio.ensure_future(
            _collect(receiver.results(["run_p1", "run_p2", "run_p3"], timeout=60))
        )
        await until(lambda: listeners(receiver, store_url) > 0)
        statuses = await asyncio.to_thread(other_process, store_url, requests, tmp_path / "r")
        return statuses, await waiting

    statuses, events = asyncio.run(scenario())
    assert statuses == [200, 500, 200]
    assert [_run(e) for e in events] == ["run_p1", "run_p2", "run_p3"]  # in arrival order
    assert isinstance(events[0], RunCompleted)
    assert isinstance(events[1], RunFailed)
    assert events[2].event == "run.cancelled"
    assert len(receiver.waiters) == 0


def test_another_process_received_before_anyone_waited(store_url: str, tmp_path: Path) -> None:
    statuses = other_process(store_url, [signed(run_id="run_earlier")], tmp_path / "r")
    assert statuses == [200]
    receiver = Receiver(SECRET, store=open_store(store_url))
    event = asyncio.run(receiver.wait_for("run_earlier", timeout=60))
    assert event.data.run_id == "run_earlier"
    assert len(receiver.waiters) == 0


class CountingSQLiteStore(SQLiteStore):
    """Counts the journal queries the waiting side makes."""

    batches = 0
    largest = 0
    single = 0

    def journal_settled(self, run_ids: Sequence[str]) -> dict[str, JournalEntry]:
        self.batches += 1
        self.largest = max(self.largest, len(run_ids))
        return super().journal_settled(run_ids)

    def journal_get(self, key_or_run_id: str) -> JournalEntry | None:
        self.single += 1
        return super().journal_get(key_or_run_id)


def test_many_waiters_one_listener_across_processes(store_url: str, tmp_path: Path) -> None:
    counting = None
    if store_url.startswith("sqlite:"):
        counting = CountingSQLiteStore(store_url.removeprefix("sqlite:///"))
    receiver = Receiver(SECRET, store=counting or open_store(store_url))
    runs = [f"run_many_{i}" for i in range(1000)]
    requests = [signed(run_id=run) for run in runs]

    async def scenario() -> list[str]:
        calls = [asyncio.ensure_future(receiver.wait_for(run, timeout=120)) for run in runs]
        await until(lambda: listeners(receiver, store_url) > 0)
        assert listeners(receiver, store_url) == 1  # one connection for all of them
        if store_url.startswith("postgresql"):
            assert isinstance(receiver.waiters.notifier, PostgresNotifier)  # not polling
        statuses = await asyncio.to_thread(other_process, store_url, requests, tmp_path / "r")
        assert statuses == [200] * len(runs)
        return [(await call).data.run_id for call in calls]

    assert asyncio.run(scenario()) == runs
    assert len(receiver.waiters) == 0
    if counting is not None:
        # One poller, batched queries (each for every waited run): not one per waiter.
        assert counting.single == 0
        assert counting.largest <= 500
        assert counting.batches < len(runs) // 10, counting.batches


def test_a_timeout_across_processes_leaves_nothing(store_url: str) -> None:
    receiver = Receiver(SECRET, store=open_store(store_url))
    receiver.waiters.linger = 0.05

    async def scenario() -> None:
        with pytest.raises(TimeoutError):
            await receiver.wait_for("run_nobody_sends", timeout=0.3)

    asyncio.run(scenario())
    assert len(receiver.waiters) == 0
    deadline = time.monotonic() + 30
    while receiver.waiters.watching:  # the listener goes once nobody waits
        assert time.monotonic() < deadline
        time.sleep(0.01)


def _run(event: Any) -> str:
    return str(event.run_id if event.event == "run.cancelled" else event.data.run_id)


async def _collect(results: Any) -> list[Any]:
    return [event async for event in results]


@pytest.mark.parametrize("kind", ["redis", "postgres"])
def test_the_listener_comes_back_after_the_server_restarts(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The subscription is lost with the server; once it is back the listener subscribes
    again and reads every waited run, so a delivery made meanwhile is not missed."""
    if kind == "redis":
        server: Any = RedisServer()
        server.start()
        url = server.url
        restart = server.kill, server.start
    else:
        require("psycopg")
        server = request.getfixturevalue("postgres_server")
        url = request.getfixturevalue("postgres_url")
        restart = server.stop, server.start
    try:
        receiver = Receiver(SECRET, store=open_store(url))

        async def scenario() -> Any:
            before = asyncio.ensure_future(receiver.wait_for("run_across_restart", timeout=90))
            await until(lambda: listeners(receiver, url) == 1)
            await asyncio.to_thread(restart[0])  # the listening connection dies with it
            await asyncio.to_thread(restart[1])
            # Delivered as soon as the server is back, maybe before the listener is.
            statuses = await asyncio.to_thread(
                other_process, url, [signed(run_id="run_across_restart")], tmp_path / "r"
            )
            assert statuses == [200]
            return await before

        assert asyncio.run(scenario()).data.run_id == "run_across_restart"
        assert len(receiver.waiters) == 0
    finally:
        if kind == "redis":
            server.stop()
