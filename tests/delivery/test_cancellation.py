"""A cancelled ``ahandle`` never leaves a claim held (review item M1).

The client goes away (or ``asyncio.wait_for`` gives up) while a blocking store's claim runs
in its worker thread: the claim completes after its caller left. It must be given back, so
the sender's retry is served at once instead of 409 for the whole lease.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from flymy_receiver import Receiver, RunCompleted
from flymy_receiver.stores import MemoryStore
from flymy_receiver.stores.base import Claim
from flymy_receiver.testing import make_event, signed_request
from tests.conftest import SECRET


class GatedStore(MemoryStore):
    """A blocking store whose first claim waits at a gate, as a slow database would."""

    blocking = True

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.settled = threading.Event()  # the first delivery's claim was released or done
        self._first = True

    def claim(self, key: str, lease: float, *args: Any, **kwargs: Any) -> Claim:
        if self._first:
            self._first = False
            self.entered.set()
            assert self.gate.wait(10), "the test never opened the gate"
        return super().claim(key, lease, *args, **kwargs)

    def release(self, *args: Any, **kwargs: Any) -> None:
        super().release(*args, **kwargs)
        self.settled.set()

    def complete(self, *args: Any, **kwargs: Any) -> None:
        super().complete(*args, **kwargs)
        self.settled.set()


async def _cancel_during_the_claim(receiver: Receiver, store: GatedStore) -> tuple[int, str]:
    req = signed_request(make_event("run.completed", run_id="run_gone"), SECRET)
    task = asyncio.ensure_future(receiver.ahandle(req.body, req.headers))
    assert await asyncio.to_thread(store.entered.wait, 10)
    with pytest.raises((TimeoutError, asyncio.TimeoutError)):
        await asyncio.wait_for(task, 0.01)  # the caller gives up while the claim is running
    store.gate.set()  # the claim completes after its caller went away
    assert await asyncio.to_thread(store.settled.wait, 10)
    retry = await receiver.ahandle(req.body, req.headers)
    assert receiver.journal is not None
    entry = receiver.journal.get("run_gone")
    assert entry is not None
    return retry.status, entry.state


def test_a_claim_acquired_after_the_caller_left_is_given_back_async_handler() -> None:
    store = GatedStore()
    receiver = Receiver(SECRET, store=store)
    ran: list[str] = []

    @receiver.on("run.completed")
    async def work(event: RunCompleted) -> None:
        ran.append(event.data.run_id)

    status, state = asyncio.run(_cancel_during_the_claim(receiver, store))
    assert status == 200  # served at once, not 409 for the lease
    assert ran == ["run_gone"]  # by the retry, once
    assert state == "handled"


def test_a_claim_acquired_after_the_caller_left_is_given_back_sync_handler() -> None:
    store = GatedStore()
    receiver = Receiver(SECRET, store=store)
    ran: list[str] = []

    @receiver.on("run.completed")
    def work(event: RunCompleted) -> None:
        ran.append(event.data.run_id)

    status, state = asyncio.run(_cancel_during_the_claim(receiver, store))
    assert status == 200
    assert ran == ["run_gone"]  # the retry ran it; the abandoned delivery did not
    assert state == "handled"
