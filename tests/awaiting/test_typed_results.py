"""``wait_for(run_id, output=Model)`` gives a typed result; a process that only waits needs
no secret (``Waiters.for_store``); ``results()`` gives its waiter back when closed."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from flymy_receiver import Receiver, RunCompleted, RunFailed
from flymy_receiver.awaiting import Waiters
from flymy_receiver.routing import OutputMismatch
from flymy_receiver.signature import SECRET_ENV_VAR
from flymy_receiver.stores import MemoryStore, SQLiteStore
from tests.awaiting.kit import deliver
from tests.conftest import SECRET


class Lead(BaseModel):
    score: int
    company: str


def test_wait_for_with_output_gives_the_typed_event() -> None:
    receiver = Receiver(SECRET, store=MemoryStore())
    receiver.on("run.completed")(lambda event: None)
    deliver(receiver, run_id="run_typed", output={"score": 7, "company": "Acme"})

    event = asyncio.run(receiver.wait_for("run_typed", timeout=5, output=Lead))
    assert isinstance(event, RunCompleted)
    assert isinstance(event.data.output, Lead)
    assert event.data.output.company == "Acme"


def test_wait_for_with_output_leaves_a_failed_run_as_it_is() -> None:
    receiver = Receiver(SECRET, store=MemoryStore())
    receiver.on("run.failed")(lambda event: None)
    deliver(receiver, "run.failed", run_id="run_failed_typed")
    event = asyncio.run(receiver.wait_for("run_failed_typed", timeout=5, output=Lead))
    assert isinstance(event, RunFailed)


def test_an_output_that_does_not_match_is_an_output_mismatch() -> None:
    receiver = Receiver(SECRET, store=MemoryStore())
    receiver.on("run.completed")(lambda event: None)
    deliver(receiver, run_id="run_odd", output={"score": "many"})
    with pytest.raises(OutputMismatch, match="does not match Lead"):
        asyncio.run(receiver.wait_for("run_odd", timeout=5, output=Lead))


def test_results_with_output_types_each_event() -> None:
    receiver = Receiver(SECRET, store=MemoryStore())
    receiver.on("run.completed")(lambda event: None)
    for number in range(2):
        deliver(receiver, run_id=f"run_many_{number}", output={"score": number, "company": "A"})

    async def collect() -> list[Any]:
        return [e async for e in receiver.results(["run_many_0", "run_many_1"], 5, output=Lead)]

    assert all(isinstance(e.data.output, Lead) for e in asyncio.run(collect()))


def test_a_process_that_only_waits_needs_no_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "deliveries.sqlite3"
    app = Receiver(SECRET, store=SQLiteStore(path))
    app.on("run.completed")(lambda event: None)
    monkeypatch.delenv(SECRET_ENV_VAR, raising=False)
    assert not os.environ.get(SECRET_ENV_VAR)
    waiters = Waiters.for_store(SQLiteStore(path))  # another process would open the same file

    async def scenario() -> Any:
        waiting = asyncio.ensure_future(waiters.wait_for("run_elsewhere", 30, output=Lead))
        await asyncio.sleep(0)
        await asyncio.to_thread(
            deliver, app, run_id="run_elsewhere", output={"score": 1, "company": "B"}
        )
        return await waiting

    event = asyncio.run(scenario())
    assert event.data.output == Lead(score=1, company="B")


def test_waiters_for_a_store_without_a_journal_is_refused() -> None:
    class Bare:
        blocking = False

    with pytest.raises(ValueError, match="keeps no delivery journal"):
        Waiters.for_store(Bare())  # type: ignore[arg-type]


def test_closing_results_early_gives_its_waiter_back() -> None:
    receiver = Receiver(SECRET, store=MemoryStore())
    receiver.on("run.completed")(lambda event: None)
    deliver(receiver, run_id="run_first")

    async def scenario() -> int:
        results = receiver.results(["run_first", "run_never"], timeout=30)
        async with contextlib.aclosing(results):
            async for _event in results:
                break
        return len(receiver.waiters)

    assert asyncio.run(scenario()) == 0
