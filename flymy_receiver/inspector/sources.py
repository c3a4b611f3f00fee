"""What the inspector looks at: a receiver's journal, or a journaling store on its own.

``inspect --app module:receiver`` brings the app's receiver (its handlers, needed to replay,
and its secret, needed to sign a test event); ``inspect --store URL`` reads a store alone,
read-only. With both, the app's receiver is used over the store given.
"""

from __future__ import annotations

import copy

from ..journal import Journal, RefusalLog
from ..receiver import Receiver
from ..stores.base import JournalStore, Store, journals

__all__ = [
    "receiver_over",
]


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
    clone.journal = Journal(journal_store, clone, refusals)
    return clone
