"""Awaiting through a shared store: the webhook reaches another receiver on the same store.

Two receivers on one store stand for two processes (see ``kit.py``): the waiting one hears
of the delivery only through the store, by polling its journal or through its notifier.
The same paths with real processes and servers are in ``test_processes.py``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import pytest

from flymy_receiver import Receiver, RunFailed
from flymy_receiver.awaiting import RedisNotifier
from tests.awaiting.kit import (
    BatchedStore,
    LocalNotifier,
    NotifyingStore,
    SharedStore,
    deliver,
    pair,
    signed,
)
from tests.conftest import SECRET
from tests.stores.redis_server import RedisServer


def wait_until(condition: Any, limit: float = 30.0) -> None:
    """A bounded wait for something a background thread does."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.01)


@pytest.fixture(params=["polled", "polled-per-run", "notified"])
def store(request: pytest.FixtureRequest) -> Any:
    if request.param == "polled":
        return BatchedStore()
    if request.param == "polled-per-run":
        return SharedStore()
    return NotifyingStore(LocalNotifier())


def test_wait_then_the_webhook_reaches_the_other_receiver(store: Any) -> None:
    waiting, receiving = pair(store)

    async def scenario() -> Any:
        call = asyncio.ensure_future(waiting.wait_for("run_elsewhere", timeout=30))
        await asyncio.to_thread(wait_until, lambda: waiting.waiters.runs)
        assert waiting.waiters.watching
        body, headers = signed(run_id="run_elsewhere")
        assert (await asyncio.to_thread(receiving.handle, body, headers)).status == 200
        return await call

    assert asyncio.run(scenario()).data.run_id == "run_elsewhere"
    assert len(waiting.waiters) == 0
    assert len(receiving.waiters) == 0
    if isinstance(store, NotifyingStore):
        assert store.notifier().published == ["run_elsewhere"]


def test_arrive_then_wait_reads_the_journal_after_subscribing(store: Any) -> None:
    waiting, receiving = pair(store)
    assert deliver(receiving, run_id="run_before")[0].status == 200
    assert deliver(receiving, "run.failed", run_id="run_failed_before")[0].status == 200

    async def scenario() -> list[Any]:
        return [
            await waiting.wait_for("run_before", timeout=30),
            await waiting.wait_for("run_failed_before", timeout=30),  # no handler: ignored
        ]

    completed, failed = asyncio.run(scenario())
    assert completed.data.run_id == "run_before"
    assert isinstance(failed, RunFailed)


def test_a_failed_handler_elsewhere_resolves(store: Any) -> None:
    waiting, receiving = Receiver(SECRET, store=store), Receiver(SECRET, store=store)

    @receiving.on("run.completed")
    def broken(event: Any) -> None:
        raise RuntimeError("down")

    async def scenario() -> Any:
        call = asyncio.ensure_future(waiting.wait_for("run_broken_elsewhere", timeout=30))
        await asyncio.to_thread(wait_until, lambda: waiting.waiters.runs)
        body, headers = signed(run_id="run_broken_elsewhere")
        assert (await asyncio.to_thread(receiving.handle, body, headers)).status == 500
        return await call

    assert asyncio.run(scenario()).data.run_id == "run_broken_elsewhere"


def test_results_across_in_resolution_order(store: Any) -> None:
    waiting, receiving = pair(store)
    deliver(receiving, run_id="run_r0")
    order = ["run_r2", "run_r1", "run_r3"]

    async def scenario() -> list[str]:
        results = waiting.results(["run_r1", "run_r2", "run_r3", "run_r0"], timeout=30)
        got = [(await anext(results)).data.run_id]
        for run in order:
            assert (await asyncio.to_thread(deliver, receiving, run_id=run))[0].status == 200
            got.append((await anext(results)).data.run_id)
        with pytest.raises(StopAsyncIteration):
            await anext(results)
        return got

    assert asyncio.run(scenario()) == ["run_r0", *order]
    assert len(waiting.waiters) == 0


def test_one_background_thread_ends_after_the_last_waiter_left(store: Any) -> None:
    waiting, receiving = pair(store)
    waiting.waiters.linger = 0.05
    before = set(threading.enumerate())

    async def scenario() -> None:
        calls = [
            asyncio.ensure_future(waiting.wait_for(f"run_t{i}", timeout=30)) for i in range(50)
        ]
        await asyncio.to_thread(wait_until, lambda: len(waiting.waiters.runs) == 50)
        started = set(threading.enumerate()) - before
        assert [t.name for t in started if t.name.startswith("flymy")] == ["flymy-awaiting"]
        for i in range(50):
            await asyncio.to_thread(deliver, receiving, run_id=f"run_t{i}")
        await asyncio.gather(*calls)

    asyncio.run(scenario())
    assert len(waiting.waiters) == 0
    wait_until(lambda: not waiting.waiters.watching)
    if isinstance(store, NotifyingStore):
        notifier = store.notifier()
        assert notifier.subscribed == 1
        assert notifier.subscriptions == []  # closed with the thread
    # A later waiter starts a new one.
    deliver(receiving, run_id="run_later")
    assert asyncio.run(waiting.wait_for("run_later", timeout=30)).data.run_id == "run_later"


def test_polling_backs_off_while_nothing_arrives() -> None:
    """An upper bound on lookups over a second of waiting: a slower machine makes fewer."""
    store = BatchedStore()
    waiting, _ = pair(store)

    async def scenario() -> None:
        with pytest.raises(TimeoutError):
            await waiting.wait_for("run_silent", timeout=1.0)

    asyncio.run(scenario())
    # The first look at once, then 0.1 s, 0.2 s, 0.4 s... capped at 1 s: five at most,
    # where a fixed 50 ms poll would have made twenty.
    assert 1 <= store.lookups <= 6


def test_a_lost_subscription_reads_every_waited_run_again() -> None:
    notifier = LocalNotifier()
    store = NotifyingStore(notifier)
    waiting, _ = pair(store)
    silent = Receiver(SECRET, store=store.inner)  # delivers without announcing

    @silent.on("run.completed")
    def handled(event: Any) -> None:
        pass

    async def scenario() -> Any:
        call = asyncio.ensure_future(waiting.wait_for("run_missed", timeout=30))
        await asyncio.to_thread(wait_until, lambda: notifier.subscriptions)
        await asyncio.to_thread(wait_until, lambda: store.lookups >= 1)  # the first look
        assert deliver(silent, run_id="run_missed")[0].status == 200  # announcement lost
        await asyncio.sleep(0.2)
        assert not call.done()
        notifier.subscriptions[0].messages.put(None)  # "re-subscribed, may have missed some"
        return await call

    assert asyncio.run(scenario()).data.run_id == "run_missed"


class FlakyNotifier(LocalNotifier):
    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def subscribe(self) -> Any:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("channel down")
        return super().subscribe()

    def publish(self, run_id: str) -> None:
        if self.failures:
            raise ConnectionError("channel down")
        super().publish(run_id)


def test_a_failing_channel_is_retried_and_a_failed_publish_is_only_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    notifier = FlakyNotifier(failures=2)
    store = NotifyingStore(notifier)
    waiting, receiving = pair(store)
    with caplog.at_level(logging.WARNING, logger="flymy_receiver"):
        assert deliver(receiving, run_id="run_unannounced")[0].status == 200

        async def scenario() -> Any:
            return await waiting.wait_for("run_unannounced", timeout=30)

        assert asyncio.run(scenario()).data.run_id == "run_unannounced"
    assert notifier.failures == 0  # subscribed at the third try
    messages = [r.getMessage() for r in caplog.records]
    assert any("could not announce the end of run run_unannounced" in m for m in messages)
    assert any("the store failed" in m for m in messages)


def test_redis_pub_sub_with_one_subscriber_connection(redis_server: RedisServer) -> None:
    client = redis_server.client()
    channel = f"test-{time.monotonic_ns()}:awaiting"
    store = NotifyingStore(RedisNotifier(client, channel))
    waiting, receiving = pair(store)
    deliver(receiving, run_id="run_redis_before")

    async def scenario() -> list[str]:
        calls = [
            asyncio.ensure_future(waiting.wait_for(f"run_redis_{i}", timeout=30))
            for i in range(100)
        ]
        before = await waiting.wait_for("run_redis_before", timeout=30)
        assert client.pubsub_numsub(channel) == [(channel.encode(), 1)]  # one for all
        for i in range(100):
            await asyncio.to_thread(deliver, receiving, run_id=f"run_redis_{i}")
        return [before.data.run_id] + [(await c).data.run_id for c in calls]

    got = asyncio.run(scenario())
    assert got == ["run_redis_before"] + [f"run_redis_{i}" for i in range(100)]
    assert len(waiting.waiters) == 0
    client.close()


class FakePubSub:
    """What redis-py's PubSub.get_message returns, from a list."""

    def __init__(self, messages: list[dict[str, Any]]) -> None:
        self.messages = messages

    def get_message(self, timeout: float = 0.0) -> dict[str, Any] | None:
        return self.messages.pop(0) if self.messages else None


def test_a_redis_subscription_that_reconnected_by_itself_asks_for_a_full_look() -> None:
    from flymy_receiver.awaiting import _RedisSubscription

    announced = _RedisSubscription(
        FakePubSub(
            [
                {"type": "message", "data": b"run_1"},
                {"type": "message", "data": "run_2"},  # a client that decodes
            ]
        )
    )
    assert announced.get(0.01) == ["run_1", "run_2"]
    assert announced.get(0.01) == []
    # redis-py reconnects and subscribes again on its own: its confirmation means a gap.
    again = _RedisSubscription(
        FakePubSub([{"type": "message", "data": b"run_3"}, {"type": "subscribe", "data": 1}])
    )
    assert again.get(0.01) is None
