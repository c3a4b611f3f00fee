"""What the inspector looks at: a receiver's journal, or a journaling store on its own.

``inspect --app module:receiver`` brings the app's receiver (its handlers, needed to replay,
and its secret, needed to sign a test event); ``inspect --store URL`` reads a store alone,
read-only. With both, the app's receiver is used over the store given.
"""

from __future__ import annotations

import builtins
import copy
from datetime import datetime
from typing import Protocol

from ..journal import Journal, RefusalLog
from ..receiver import Receiver
from ..stores.base import JournalStore, Store, journals
from ..stores.records import JournalEntry, Refusal

__all__ = [
    "JournalView",
    "StoreJournal",
    "receiver_over",
]


class JournalView(Protocol):
    """The reading side of :class:`~flymy_receiver.journal.Journal`, all the page needs."""

    def get(self, key_or_run_id: str) -> JournalEntry | None: ...

    def list(
        self,
        state: str | None = None,
        event: str | None = None,
        agent_id: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> builtins.list[JournalEntry]: ...

    def refusals(self, limit: int = 100) -> builtins.list[Refusal]: ...


class StoreJournal:
    """A read-only journal straight over a journaling store (no receiver, so no replay)."""

    def __init__(self, store: JournalStore) -> None:
        self.store = store

    def get(self, key_or_run_id: str) -> JournalEntry | None:
        return self.store.journal_get(str(key_or_run_id))

    def list(
        self,
        state: str | None = None,
        event: str | None = None,
        agent_id: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> builtins.list[JournalEntry]:
        if limit < 1:
            return []
        return self.store.journal_list(
            state=state, event=event, agent_id=agent_id, since=since, limit=limit
        )

    def refusals(self, limit: int = 100) -> builtins.list[Refusal]:
        return self.store.refusals(limit)


def receiver_over(receiver: Receiver, store: Store) -> Receiver:
    """The app's receiver (handlers, secrets, settings) journaling in ``store`` instead.

    A shallow copy: the handlers are the same objects, so their ids, which the journal keys
    outcomes by, are the same too.
    """
    if not journals(store):
        raise ValueError(f"a {type(store).__name__} keeps no delivery journal")
    journal_store: JournalStore = store  # type: ignore[assignment]  # checked just above
    clone = copy.copy(receiver)
    clone.store = store
    refusals = RefusalLog(journal_store)
    clone._refusal_log = refusals
    clone.journal = Journal(clone, journal_store, refusals)
    return clone
