"""What the awaiting tests share: signed deliveries and stores that stand for other processes.

Two receivers on one :class:`SharedStore` behave like two processes on one database: the
one that receives a delivery wakes only its own waiters, so the other one's waiters must
hear of it through the store (its poller, or its notifier's subscriber).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from flymy_receiver import Receiver, Response
from flymy_receiver.stores import JournalEntry, MemoryStore
from flymy_receiver.testing import make_event, signed_request
from tests.conftest import SECRET


def deliver(receiver: Receiver, name: str = "run.completed", **fields: Any) -> tuple[Response, Any]:
    """Deliver one signed event (``run_id=...`` to choose the run); the answer and the event."""
    event = make_event(name, **fields)
    request = signed_request(event, SECRET)
    return receiver.handle(request.body, request.headers), event


def signed(name: str = "run.completed", **fields: Any) -> tuple[bytes, dict[str, str]]:
    request = signed_request(make_event(name, **fields), SECRET)
    return request.body, request.headers


class UnexpiringMemoryStore(MemoryStore):
    """MemoryStore looks for expired journal entries on every read, which costs a scan of
    the journal: the tests that look ten thousand runs up do without (nothing expires)."""

    def _expire_journal(self) -> None:
        pass


class SharedStore:
    """A MemoryStore that the awaiting code treats as shared by processes (it is not a
    MemoryStore), counting the journal lookups made on it."""

    blocking = False

    def __init__(self, inner: MemoryStore | None = None) -> None:
        self.inner = inner if inner is not None else UnexpiringMemoryStore()
        self.lookups = 0  # journal queries
        self.looked_up = 0  # run ids asked for
        self.largest_lookup = 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def journal_get(self, key_or_run_id: str) -> JournalEntry | None:
        self._count(1)
        return self.inner.journal_get(key_or_run_id)

    def _count(self, run_ids: int) -> None:
        with self._lock:
            self.lookups += 1
            self.looked_up += run_ids
            self.largest_lookup = max(self.largest_lookup, run_ids)


class BatchedStore(SharedStore):
    """A shared store that looks many runs up in one query (``journal_settled``)."""

    def journal_settled(self, run_ids: Sequence[str]) -> Mapping[str, JournalEntry]:
        self._count(len(run_ids))
        found = {}
        for run_id in run_ids:
            entry = self.inner.journal_get(run_id)
            if entry is not None and entry.run_id == run_id and entry.state != "pending":
                found[run_id] = entry
        return found


class LocalNotifier:
    """An in-process stand-in for pub/sub: every subscription gets every announcement."""

    def __init__(self) -> None:
        self.subscriptions: list[LocalSubscription] = []
        self.published: list[str] = []
        self.subscribed = 0
        self._lock = threading.Lock()

    def publish(self, run_id: str) -> None:
        with self._lock:
            self.published.append(run_id)
            for subscription in self.subscriptions:
                subscription.messages.put(run_id)

    def subscribe(self) -> LocalSubscription:
        subscription = LocalSubscription(self)
        with self._lock:
            self.subscriptions.append(subscription)
            self.subscribed += 1
        return subscription


class LocalSubscription:
    def __init__(self, notifier: LocalNotifier) -> None:
        self.notifier = notifier
        self.messages: queue.Queue[str | None] = queue.Queue()
        self.closed = False

    def get(self, timeout: float) -> list[str] | None:
        try:
            first = self.messages.get(timeout=timeout)
        except queue.Empty:
            return []
        if first is None:
            return None  # stands for "re-subscribed: announcements may have been missed"
        return [first]

    def close(self) -> None:
        self.closed = True
        with self.notifier._lock:
            self.notifier.subscriptions.remove(self)


class NotifyingStore(BatchedStore):
    """A shared store that announces through ``notifier()``."""

    def __init__(self, notifier: Any, inner: MemoryStore | None = None) -> None:
        super().__init__(inner)
        self._notifier = notifier

    def notifier(self) -> Any:
        return self._notifier


def pair(store: Any) -> tuple[Receiver, Receiver]:
    """Two receivers on one store: the first waits, the second receives (another process)."""
    waiting, receiving = Receiver(SECRET, store=store), Receiver(SECRET, store=store)
    for receiver in (waiting, receiving):

        @receiver.on("run.completed")
        def handled(event: Any) -> None:
            pass

    return waiting, receiving
