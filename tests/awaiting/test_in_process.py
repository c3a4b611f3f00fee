"""Awaiting a run's webhook in one process: the delivery and the waiter share a receiver."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from flymy_receiver import Receiver, RunCompleted, RunFailed, UnknownEvent
from flymy_receiver.errors import StoreUnavailable
from flymy_receiver.stores import MemoryStore
from tests.awaiting.kit import deliver, signed
from tests.conftest import SECRET


def receiver_with_handler(**options: Any) -> tuple[Receiver, list[str]]:
    receiver = Receiver(SECRET, **options)
    ran: list[str] = []

    @receiver.on("run.completed")
    def handled(event: RunCompleted) -> None:
        ran.append(event.data.run_id)

    return receiver, ran


async def settle(task: asyncio.Future[Any], turns: int = 10) -> None:
    """Let the loop run a few turns (no clock involved): a waiter due to resolve does."""
    for _ in range(turns):
        if task.done():
            return
        await asyncio.sleep(0)


def test_wait_then_the_webhook_arrives_in_a_worker_thread() -> None:
    receiver, ran = receiver_with_handler()
    body, headers = signed(run_id="run_wait_first")

    async def scenario() -> Any:
        waiting = asyncio.ensure_future(receiver.wait_for("run_wait_first", timeout=30))
        await settle(waiting)
        assert not waiting.done()
        assert len(receiver.waiters) == 1
        assert receiver.waiters.runs == {"run_wait_first"}
        # The delivery runs where a WSGI server would run it: another thread.
        worker = threading.Thread(target=receiver.handle, args=(body, headers))
        worker.start()
        event = await waiting
        worker.join()
        return event

    event = asyncio.run(scenario())
    assert isinstance(event, RunCompleted)
    assert event.data.run_id == "run_wait_first"
    assert ran == ["run_wait_first"]  # resolved after the handler ran
    assert len(receiver.waiters) == 0
    assert receiver.waiters.runs == frozenset()


def test_wait_then_the_webhook_arrives_through_ahandle_on_the_same_loop() -> None:
    receiver, ran = receiver_with_handler()
    body, headers = signed(run_id="run_same_loop")

    async def scenario() -> tuple[int, Any]:
        waiting = asyncio.ensure_future(receiver.wait_for("run_same_loop", timeout=30))
        await settle(waiting)
        response = await receiver.ahandle(body, headers)
        return response.status, await waiting

    status, event = asyncio.run(scenario())
    assert status == 200
    assert event.data.run_id == "run_same_loop"
    assert ran == ["run_same_loop"]


def test_a_delivery_on_another_event_loop_wakes_waiters_on_two_loops() -> None:
    receiver, _ = receiver_with_handler()
    body, headers = signed(run_id="run_two_loops")
    registered = threading.Barrier(3, timeout=30)
    found: list[str] = []

    def wait_in_own_loop() -> None:
        async def wait() -> None:
            waiting = asyncio.ensure_future(receiver.wait_for("run_two_loops", timeout=30))
            await settle(waiting)
            registered.wait()
            found.append((await waiting).data.run_id)

        asyncio.run(wait())

    threads = [threading.Thread(target=wait_in_own_loop) for _ in range(2)]
    for thread in threads:
        thread.start()
    registered.wait()
    assert len(receiver.waiters) == 2

    async def deliver_async() -> int:  # a third loop, as an ASGI server's would be
        return (await receiver.ahandle(body, headers)).status

    assert asyncio.run(deliver_async()) == 200
    for thread in threads:
        thread.join(30)
    assert found == ["run_two_loops", "run_two_loops"]
    assert len(receiver.waiters) == 0


def test_an_event_already_handled_resolves_at_once() -> None:
    receiver, ran = receiver_with_handler()
    response, sent = deliver(receiver, run_id="run_arrived_first")
    assert response.status == 200

    async def scenario() -> Any:
        waiting = asyncio.ensure_future(receiver.wait_for("run_arrived_first", timeout=30))
        await settle(waiting)
        assert waiting.done()  # from the journal, no delivery needed
        return waiting.result()

    event = asyncio.run(scenario())
    assert event.data.run_id == "run_arrived_first"
    assert event.data.output == sent.data.output
    assert ran == ["run_arrived_first"]
    assert len(receiver.waiters) == 0


def test_a_pending_entry_does_not_resolve_until_its_handlers_finish() -> None:
    receiver = Receiver(SECRET)
    started, release = threading.Event(), threading.Event()

    @receiver.on("run.completed")
    def slow(event: RunCompleted) -> None:
        started.set()
        release.wait(30)

    body, headers = signed(run_id="run_pending")

    async def scenario() -> Any:
        worker = threading.Thread(target=receiver.handle, args=(body, headers))
        worker.start()
        assert await asyncio.to_thread(started.wait, 30)
        assert receiver.journal is not None
        entry = receiver.journal.get("run_pending")
        assert entry is not None
        assert entry.state == "pending"
        waiting = asyncio.ensure_future(receiver.wait_for("run_pending", timeout=30))
        await settle(waiting)
        assert not waiting.done()  # a pending entry is not an answer
        release.set()
        event = await waiting
        worker.join()
        return event

    assert asyncio.run(scenario()).data.run_id == "run_pending"


def test_timeout_raises_and_leaves_nothing() -> None:
    receiver, _ = receiver_with_handler()

    async def scenario() -> None:
        with pytest.raises(TimeoutError, match="no webhook for run 'run_never'"):
            await receiver.wait_for("run_never", timeout=0.05)

    asyncio.run(scenario())
    assert len(receiver.waiters) == 0
    assert receiver.waiters.runs == frozenset()


def test_a_failed_handler_still_resolves() -> None:
    receiver = Receiver(SECRET)

    @receiver.on("run.failed")
    def broken(event: RunFailed) -> None:
        raise RuntimeError("crm is down")

    body, headers = signed("run.failed", run_id="run_broken")

    async def scenario() -> tuple[int, Any]:
        waiting = asyncio.ensure_future(receiver.wait_for("run_broken", timeout=30))
        await settle(waiting)
        status = (await receiver.ahandle(body, headers)).status
        return status, await waiting

    status, event = asyncio.run(scenario())
    assert status == 500
    assert isinstance(event, RunFailed)
    assert event.data.error.type == "tool_error"
    assert receiver.journal is not None
    entry = receiver.journal.get("run_broken")
    assert entry is not None
    assert entry.state == "failed"  # ...and a later waiter finds it settled
    assert asyncio.run(receiver.wait_for("run_broken", timeout=30)).event == "run.failed"


def test_an_event_no_handler_wants_resolves() -> None:
    receiver = Receiver(SECRET)  # no handler at all
    body, headers = signed(run_id="run_ignored")
    cancelled_body, cancelled_headers = signed("run.cancelled", run_id="run_cancelled")

    async def scenario() -> list[Any]:
        waiting = [
            asyncio.ensure_future(receiver.wait_for(run, timeout=30))
            for run in ("run_ignored", "run_cancelled")
        ]
        await settle(waiting[0])
        assert (await receiver.ahandle(body, headers)).status == 200
        assert (await receiver.ahandle(cancelled_body, cancelled_headers)).status == 200
        return list(await asyncio.gather(*waiting))

    ignored, cancelled = asyncio.run(scenario())
    assert ignored.data.run_id == "run_ignored"
    assert isinstance(cancelled, UnknownEvent)  # any event carrying the run id
    assert cancelled.run_id == "run_cancelled"
    assert receiver.journal is not None
    assert receiver.journal.get("run_ignored").state == "ignored"  # type: ignore[union-attr]


def test_results_yields_each_run_once_in_the_order_they_resolve() -> None:
    receiver, _ = receiver_with_handler()
    deliver(receiver, run_id="run_3")  # already handled: out first

    async def scenario() -> list[str]:
        # A run id given twice is awaited once.
        results = receiver.results(["run_1", "run_2", "run_3", "run_4", "run_2"], timeout=30)
        got = [(await anext(results)).data.run_id]
        assert len(receiver.waiters) == 1
        for run in ("run_2", "run_2", "run_4", "run_3", "run_1"):  # with duplicates
            assert deliver(receiver, run_id=run)[0].status == 200
        got += [event.data.run_id async for event in results]
        return got

    assert asyncio.run(scenario()) == ["run_3", "run_2", "run_4", "run_1"]
    assert len(receiver.waiters) == 0


def test_results_in_arrival_order_with_a_simple_loop() -> None:
    receiver, _ = receiver_with_handler()
    order = ["run_c", "run_a", "run_b"]

    async def scenario() -> list[str]:
        async def send() -> None:
            for run in order:
                await asyncio.sleep(0)
                body, headers = signed(run_id=run)
                assert (await receiver.ahandle(body, headers)).status == 200
                assert (await receiver.ahandle(body, headers)).status == 200  # a duplicate

        sender = asyncio.ensure_future(send())
        got = [e.data.run_id async for e in receiver.results(["run_a", "run_b", "run_c"], 30)]
        await sender
        return got

    assert asyncio.run(scenario()) == order


def test_duplicates_do_not_resolve_a_second_waiter_call_twice() -> None:
    receiver, ran = receiver_with_handler()
    body, headers = signed(run_id="run_dup")

    async def scenario() -> list[Any]:
        calls = [asyncio.ensure_future(receiver.wait_for("run_dup", timeout=30)) for _ in range(3)]
        await settle(calls[0])
        for _ in range(3):
            await receiver.ahandle(body, headers)
        return list(await asyncio.gather(*calls))

    events = asyncio.run(scenario())
    assert [e.data.run_id for e in events] == ["run_dup"] * 3
    assert ran == ["run_dup"]
    assert len(receiver.waiters) == 0


def test_results_timeout_is_an_overall_deadline() -> None:
    receiver, _ = receiver_with_handler()
    deliver(receiver, run_id="run_here")

    async def scenario() -> list[str]:
        results = receiver.results(["run_here", "run_x", "run_y"], timeout=0.05)
        got = [(await anext(results)).data.run_id]
        with pytest.raises(TimeoutError, match="2 of 3 runs had no webhook"):
            await anext(results)
        return got

    assert asyncio.run(scenario()) == ["run_here"]
    assert len(receiver.waiters) == 0


class BrokenClaims(MemoryStore):
    def claim(self, *args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("down")


def test_a_refused_delivery_does_not_resolve() -> None:
    """409 (another worker holds it) and 503 (store down): no handler finished yet."""
    busy, _ = receiver_with_handler()
    body, headers = signed(run_id="run_held")
    assert busy.store.claim("run.completed:run_held", 60).state.value == "acquired"
    down, _ = receiver_with_handler(store=BrokenClaims())

    async def scenario() -> None:
        for receiver, status in ((busy, 409), (down, 503)):
            waiting = asyncio.ensure_future(receiver.wait_for("run_held", timeout=30))
            await settle(waiting)
            assert (await receiver.ahandle(body, headers)).status == status
            await settle(waiting)
            assert not waiting.done()
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert len(receiver.waiters) == 0

    asyncio.run(scenario())


def test_without_a_journal_deliveries_to_this_receiver_still_resolve() -> None:
    receiver, _ = receiver_with_handler(journal=False)
    body, headers = signed(run_id="run_no_journal")

    async def scenario() -> Any:
        waiting = asyncio.ensure_future(receiver.wait_for("run_no_journal", timeout=30))
        await settle(waiting)
        await receiver.ahandle(body, headers)
        return await waiting

    assert asyncio.run(scenario()).data.run_id == "run_no_journal"


def test_a_replay_of_a_failed_entry_resolves_a_later_waiter() -> None:
    receiver = Receiver(SECRET)
    broken = [True]

    @receiver.on("run.completed")
    def flaky(event: RunCompleted) -> None:
        if broken[0]:
            raise RuntimeError("down")

    assert deliver(receiver, run_id="run_replayed")[0].status == 500
    broken[0] = False
    assert receiver.journal is not None

    async def scenario() -> Any:
        waiting = asyncio.ensure_future(receiver.wait_for("run_replayed", timeout=30))
        await settle(waiting)
        assert waiting.done()  # failed is settled: it resolved from the journal
        assert receiver.journal is not None
        assert (await asyncio.to_thread(receiver.journal.replay, "run_replayed")).state == (
            "handled"
        )
        return waiting.result()

    assert asyncio.run(scenario()).data.run_id == "run_replayed"


def test_run_ids_and_timeouts_are_checked() -> None:
    receiver, _ = receiver_with_handler()
    deliver(receiver, run_id="12345")

    async def scenario() -> None:
        assert (await receiver.wait_for(12345, timeout=5)).data.run_id == "12345"  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await receiver.wait_for(None, timeout=5)  # type: ignore[arg-type]
        for bad in (0, -1, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="timeout"):
                await receiver.wait_for("run_x", timeout=bad)
            with pytest.raises(ValueError, match="timeout"):
                await anext(receiver.results(["run_x"], timeout=bad))
        assert [e async for e in receiver.results([], timeout=5)] == []

    asyncio.run(scenario())
    assert len(receiver.waiters) == 0
