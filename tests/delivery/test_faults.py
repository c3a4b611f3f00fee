"""Handlers that fail, stores that fail: what is answered and what runs again."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flymy_receiver import Receiver, RunCompleted
from flymy_receiver.errors import StoreUnavailable
from flymy_receiver.stores import Claim, MemoryStore
from flymy_receiver.testing import make_event, signed_request
from tests.conftest import SECRET
from tests.stores.backends import BACKENDS, Backend, make_backend


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from make_backend(request.param, request, tmp_path)


def _request(**fields: Any) -> tuple[bytes, dict[str, str]]:
    req = signed_request(make_event("run.completed", **fields), SECRET)
    return req.body, req.headers


def test_a_handler_that_fails_twice_then_succeeds(backend: Backend) -> None:
    receiver = Receiver(SECRET, store=backend.store)
    calls: list[str] = []

    @receiver.on("run.completed")
    def flaky(event: RunCompleted) -> None:
        calls.append(event.data.run_id)
        if len(calls) <= 2:
            raise RuntimeError("db password=hunter2 refused")  # must never reach the sender

    body, headers = _request()
    statuses = []
    for _ in range(4):
        response = receiver.handle(body, headers)
        statuses.append(response.status)
        assert b"hunter2" not in response.body
        assert b"Traceback" not in response.body
    assert statuses == [500, 500, 200, 200]
    assert len(calls) == 3
    assert json.loads(receiver.handle(body, headers).body) == {"received": True, "duplicate": True}


def test_only_the_failed_handler_runs_again(backend: Backend) -> None:
    receiver = Receiver(SECRET, store=backend.store)
    saved: list[str] = []
    notified: list[str] = []

    @receiver.on("run.completed")
    def save(event: RunCompleted) -> None:
        saved.append(event.data.run_id)

    @receiver.on("run.completed")
    def notify(event: RunCompleted) -> None:
        notified.append(event.data.run_id)
        if len(notified) == 1:
            raise ConnectionError("chat service down")

    body, headers = _request(run_id="run_partial")
    assert receiver.handle(body, headers).status == 500
    assert (saved, notified) == (["run_partial"], ["run_partial"])
    assert receiver.handle(body, headers).status == 200
    assert (saved, notified) == (["run_partial"], ["run_partial", "run_partial"])
    assert receiver.handle(body, headers).status == 200  # duplicate: nothing runs
    assert (len(saved), len(notified)) == (1, 2)


def test_only_the_failed_handler_runs_again_async(tmp_path: Path) -> None:
    from flymy_receiver.stores import SQLiteStore

    receiver = Receiver(SECRET, store=SQLiteStore(tmp_path / "d.sqlite3"))
    calls: dict[str, int] = {"save": 0, "notify": 0}

    @receiver.on("run.completed")
    async def save(event: RunCompleted) -> None:
        calls["save"] += 1

    @receiver.on("run.completed")
    def notify(event: RunCompleted) -> None:
        calls["notify"] += 1
        if calls["notify"] == 1:
            raise ConnectionError("chat service down")

    body, headers = _request()

    async def three_deliveries() -> list[int]:
        return [(await receiver.ahandle(body, headers)).status for _ in range(3)]

    assert asyncio.run(three_deliveries()) == [500, 200, 200]
    assert calls == {"save": 1, "notify": 2}


class _FlakyStore(MemoryStore):
    """A MemoryStore whose calls can be made to fail, one kind at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: set[str] = set()

    def _maybe_fail(self, name: str) -> None:
        if name in self.failing:
            raise StoreUnavailable(f"{name}: connection refused to 10.0.0.5")

    def claim(self, key: str, lease: float, *args: Any, **kwargs: Any) -> Claim:
        self._maybe_fail("claim")
        return super().claim(key, lease, *args, **kwargs)

    def mark_handler_done(self, key: str, token: str, handler: str, ttl: float, *args: Any) -> None:
        self._maybe_fail("mark_handler_done")
        super().mark_handler_done(key, token, handler, ttl, *args)

    def complete(self, key: str, token: str, ttl: float, *args: Any) -> None:
        self._maybe_fail("complete")
        super().complete(key, token, ttl, *args)


def test_unreachable_store_is_503_with_no_call() -> None:
    store = _FlakyStore()
    receiver = Receiver(SECRET, store=store)
    calls: list[str] = []
    receiver.on("run.completed")(lambda event: calls.append(event.data.run_id))
    body, headers = _request()
    store.failing = {"claim"}
    response = receiver.handle(body, headers)
    assert response.status == 503
    assert int(response.headers["Retry-After"]) >= 1
    assert b"10.0.0.5" not in response.body
    assert calls == []
    store.failing = set()
    assert receiver.handle(body, headers).status == 200
    assert len(calls) == 1


def test_a_store_that_raises_anything_is_503_not_a_crash() -> None:
    class Broken(MemoryStore):
        def claim(self, key: str, lease: float, *args: Any, **kwargs: Any) -> Claim:
            raise KeyError("surprise")

    receiver = Receiver(SECRET, store=Broken())
    receiver.on("run.completed")(lambda event: pytest.fail("handler must not run"))
    body, headers = _request()
    assert receiver.handle(body, headers).status == 503


def test_store_lost_after_the_handler_ran_answers_503_so_it_is_retried() -> None:
    """Success that cannot be recorded is not acknowledged: the sender must retry."""
    store = _FlakyStore()
    receiver = Receiver(SECRET, store=store)
    calls: list[str] = []
    receiver.on("run.completed")(lambda event: calls.append(event.data.run_id))
    body, headers = _request()
    store.failing = {"complete"}
    assert receiver.handle(body, headers).status == 503
    store.failing = set()
    # The claim is still held until its lease ends: a quick retry is told to wait.
    busy = receiver.handle(body, headers)
    assert busy.status == 409
    assert "Retry-After" in busy.headers
    assert len(calls) == 1


def test_failed_handler_record_is_503_and_the_handler_is_not_acknowledged() -> None:
    store = _FlakyStore()
    receiver = Receiver(SECRET, store=store)
    receiver.on("run.completed")(lambda event: None)
    receiver.on("run.completed", name="second")(lambda event: None)
    store.failing = {"mark_handler_done"}
    body, headers = _request()
    assert receiver.handle(body, headers).status == 503


def test_a_failing_custom_idempotency_key_is_500_not_a_crash() -> None:
    def key(event: Any) -> str:
        raise LookupError("no tenant")

    receiver = Receiver(SECRET, idempotency_key=key)
    receiver.on("run.completed")(lambda event: pytest.fail("handler must not run"))
    body, headers = _request()
    response = receiver.handle(body, headers)
    assert response.status == 500
    assert b"tenant" not in response.body


def test_custom_idempotency_key_decides_what_is_a_duplicate() -> None:
    # One row per agent and input, whatever the run: two runs with one input are duplicates.
    receiver = Receiver(
        SECRET, idempotency_key=lambda e: f"{e.data.agent_id}:{e.data.input['name']}"
    )
    calls: list[str] = []
    receiver.on("run.completed")(lambda event: calls.append(event.data.run_id))
    first = _request(run_id="run_1", input={"name": "Dana"})
    second = _request(run_id="run_2", input={"name": "Dana"})
    third = _request(run_id="run_3", input={"name": "Lee"})
    assert [receiver.handle(*r).status for r in (first, second, third)] == [200, 200, 200]
    assert calls == ["run_1", "run_3"]


def test_the_default_key_is_event_and_run_id() -> None:
    receiver = Receiver(SECRET)
    calls: list[str] = []
    receiver.on("*")(lambda event: calls.append(event.event))
    completed = signed_request(make_event("run.completed", run_id="run_same"), SECRET)
    failed = signed_request(make_event("run.failed", run_id="run_same"), SECRET)
    for req in (completed, failed, completed, failed):
        assert receiver.handle(req.body, req.headers).status == 200
    assert calls == ["run.completed", "run.failed"]


def test_huge_run_ids_make_short_store_keys() -> None:
    seen: list[str] = []

    class Spy(MemoryStore):
        def claim(self, key: str, lease: float, *args: Any, **kwargs: Any) -> Claim:
            seen.append(key)
            return super().claim(key, lease, *args, **kwargs)

    receiver = Receiver(SECRET, store=Spy())
    receiver.on("run.completed")(lambda event: None)
    long_a, long_b = "r" * 100_000 + "a", "r" * 100_000 + "b"
    for run_id in (long_a, long_b, long_a):
        assert receiver.handle(*_request(run_id=run_id)).status == 200
    assert all(len(key) <= 200 for key in seen)
    assert seen[0] != seen[1]
    assert seen[0] == seen[2]
