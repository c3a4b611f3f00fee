"""Waiters that give up leave nothing behind, and many waiters cost little."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import traceback
import tracemalloc
from typing import Any

import pytest

from flymy_receiver import Receiver
from tests.awaiting.kit import BatchedStore, LocalNotifier, NotifyingStore, deliver, pair, signed
from tests.conftest import SECRET

MANY = 10_000


def test_a_cancelled_wait_for_leaves_nothing() -> None:
    receiver = Receiver(SECRET)

    async def scenario() -> None:
        call = asyncio.ensure_future(receiver.wait_for("run_cancelled", timeout=30))
        await asyncio.sleep(0)
        assert len(receiver.waiters) == 1
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    asyncio.run(scenario())
    assert len(receiver.waiters) == 0
    assert receiver.waiters.runs == frozenset()
    # A delivery after it has nobody to wake and nothing to trip over.
    assert deliver(receiver, run_id="run_cancelled")[0].status == 200


def test_an_outer_timeout_around_wait_for_leaves_nothing() -> None:
    receiver = Receiver(SECRET)

    async def scenario() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(receiver.wait_for("run_outer", timeout=None), 0.01)

    asyncio.run(scenario())
    assert len(receiver.waiters) == 0


def test_results_left_early_or_cancelled_leave_nothing() -> None:
    receiver = Receiver(SECRET)
    deliver(receiver, run_id="run_a")

    async def scenario() -> None:
        results = receiver.results(["run_a", "run_b", "run_c"], timeout=30)
        async for event in results:
            assert event.data.run_id == "run_a"
            break
        assert len(receiver.waiters) == 1  # suspended at the yield, still waiting for b and c
        await results.aclose()
        assert len(receiver.waiters) == 0

        async def consume() -> None:
            async for _ in receiver.results(["run_d", "run_e"], timeout=30):
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0)
        assert receiver.waiters.runs == {"run_d", "run_e"}
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert len(receiver.waiters) == 0
    assert receiver.waiters.runs == frozenset()


def test_a_waiter_whose_loop_is_gone_does_not_break_the_delivery() -> None:
    receiver = Receiver(SECRET)
    loop = asyncio.new_event_loop()
    call = loop.create_task(receiver.wait_for("run_orphan", timeout=30))
    loop.run_until_complete(asyncio.sleep(0))
    assert len(receiver.waiters) == 1
    loop.close()  # the task never finishes: its loop is gone (a thread that died)
    assert deliver(receiver, run_id="run_orphan")[0].status == 200
    assert receiver.waiters.runs == frozenset()  # the run was resolved and forgotten
    del call


def _forked_child(receiver: Receiver) -> None:
    # The parent's waiter is not this process's: nothing here may try to wake it.
    assert deliver(receiver, run_id="run_parent")[0].status == 200
    assert len(receiver.waiters) == 0

    async def wait_here() -> str:
        call = asyncio.ensure_future(receiver.wait_for("run_child", timeout=30))
        await asyncio.sleep(0)
        assert len(receiver.waiters) == 1
        await asyncio.to_thread(deliver, receiver, run_id="run_child")
        return str((await call).data.run_id)

    assert asyncio.run(wait_here()) == "run_child"
    assert len(receiver.waiters) == 0


def _fork(receiver: Receiver) -> int:
    """Run ``_forked_child`` in a forked process; its exit status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into the test run
        code = 1
        try:
            _forked_child(receiver)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX only")
def test_a_forked_child_has_its_own_waiters() -> None:
    receiver = Receiver(SECRET)

    async def scenario() -> Any:
        call = asyncio.ensure_future(receiver.wait_for("run_parent", timeout=60))
        await asyncio.sleep(0)
        # Forked from a worker thread, so that no event loop runs in the child's thread.
        assert await asyncio.to_thread(_fork, receiver) == 0
        await asyncio.sleep(0)
        assert not call.done()
        assert len(receiver.waiters) == 1
        deliver(receiver, run_id="run_parent")
        return await call

    assert asyncio.run(scenario()).data.run_id == "run_parent"
    assert len(receiver.waiters) == 0


def test_ten_thousand_waiters_in_one_process() -> None:
    receiver = Receiver(SECRET)
    runs = [f"run_many_{i}" for i in range(MANY)]
    requests = [signed(run_id=run) for run in runs]

    async def scenario() -> int:
        gc.collect()
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            calls = [asyncio.ensure_future(receiver.wait_for(run, timeout=60)) for run in runs]
            await asyncio.sleep(0)
            waiting = tracemalloc.get_traced_memory()[0] - baseline
        finally:
            tracemalloc.stop()
        assert len(receiver.waiters) == MANY
        for body, headers in requests:
            assert (await receiver.ahandle(body, headers)).status == 200
        events = await asyncio.gather(*calls)
        assert [e.data.run_id for e in events] == runs
        return waiting

    waiting = asyncio.run(scenario())
    assert len(receiver.waiters) == 0
    assert receiver.waiters.runs == frozenset()
    assert not receiver.waiters.watching  # a MemoryStore needs no background thread
    # Tasks, futures and registry entries: a few kilobytes per waiting call, all given back.
    assert waiting < MANY * 4096


@pytest.mark.parametrize("kind", ["polled", "notified"])
def test_ten_thousand_waiters_through_a_shared_store(kind: str) -> None:
    notifier = LocalNotifier() if kind == "notified" else None
    store = BatchedStore() if notifier is None else NotifyingStore(notifier)
    store.inner.max_journal = MANY * 2
    waiting, receiving = pair(store)
    runs = [f"run_shared_{i}" for i in range(MANY)]
    half = MANY // 2
    for run in runs[:half]:  # half have arrived before anyone waits
        assert deliver(receiving, run_id=run)[0].status == 200
    before = set(threading.enumerate())

    async def scenario() -> list[str]:
        calls = [asyncio.ensure_future(waiting.wait_for(run, timeout=120)) for run in runs]
        results = asyncio.ensure_future(_collect(waiting.results(runs, timeout=120)))
        await asyncio.sleep(0)
        started = set(threading.enumerate()) - before
        assert [t.name for t in started if t.name.startswith("flymy")] == ["flymy-awaiting"]
        for run in runs[half:]:
            await asyncio.to_thread(deliver, receiving, run_id=run)
        events = await asyncio.gather(*calls)
        assert [e.data.run_id for e in events] == runs
        return await results

    got = asyncio.run(scenario())
    assert sorted(got) == sorted(runs)
    assert len(waiting.waiters) == 0
    assert waiting.waiters.runs == frozenset()
    # One thread looks up for everyone, in batches; nothing loops per waiter.
    assert store.largest_lookup <= 500
    if notifier is None:
        # Polled: each look covers every waited run; far fewer looks than waiters.
        assert store.lookups < MANY // 20, store.lookups
    else:
        # Notified: one subscription; a run is looked up when announced (several
        # announcements read together share a lookup), plus one batched first look.
        assert notifier.subscribed == 1
        # The first look covers the wait_for calls and the results call (2 * MANY runs).
        assert store.looked_up <= 2 * MANY + half, store.looked_up
        assert store.lookups <= half + 2 * MANY // 500 + 2, store.lookups


async def _collect(results: Any) -> list[str]:
    return [event.data.run_id async for event in results]
